//! A federated `GET`, without I/O: what to ask each site, and how to merge
//! and render the answers.
//!
//! The client's request is split into what the sites answer (the query
//! with the virtual `site` column taken out, `OutputFormat: json`, `Limit`
//! raised by `Offset`, `avg` asked as `sum` and a count) and what livemux
//! does over the union: the `site` column, `Sites:`/`Backends:` and the
//! site column's tests in filters and stats (decided per site by
//! [`sitefilter`]: which sites are asked, and what each is asked), merging
//! `Stats` per group key, `Sort`, `Offset`, `Limit`, and the client's output
//! format and headers.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde_json::Value;

pub mod sitefilter;

use sitefilter::{Expr, STATS, Stack, StrOp, StrTest};

/// Where the forwarded `Columns:` line goes, until it is known.
const COLUMNS_PLACEHOLDER: &str = "\u{0}columns";

/// csv's separators unless `Separators:` says otherwise.
const DEFAULT_SEPARATORS: [u8; 4] = [b'\n', b';', b',', b'|'];

/// The names of the virtual column (LMD's `peer_name` and `peer_key` too).
const SITE_COLUMNS: [&str; 3] = ["site", "peer_name", "peer_key"];

/// How a stats column is merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// Counts and sums add.
    Add,
    /// The smallest.
    Min,
    /// The largest.
    Max,
    /// `avg`: asked as a sum and a count, divided at the end.
    Avg,
}

/// The client's output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// csv with separators.
    Csv,
    /// JSON rows.
    Json,
    /// Python 2 literal (`u"..."` strings).
    Python,
    /// Python 3 literal.
    Python3,
    /// LMD's `{"columns", "data", "failed", "total_count"}`.
    WrappedJson,
}

/// How the sites' rows become the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Parsed, merged and rendered again (Stats, Sort, the site column,
    /// LMD's columns, the Python formats).
    Parse,
    /// Spliced through as the sites sent them: JSON rows (for `json` and
    /// `wrapped_json`), cut at their brackets and never parsed.
    Json,
    /// Spliced through as the sites sent them: csv rows with the default
    /// separators, without `Offset` or `Limit` (cut at each `\n`).
    Csv,
    /// `Sort` with a `Limit`: the rows come unread, and only their sort
    /// keys are read until a row is known to be within the page's
    /// `Offset + Limit` (see [`super::merge`]).
    Top,
}

/// A federated query, planned.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The table.
    pub table: String,
    /// The request's lines each selected site gets before its filters (the
    /// `GET` line, `Columns`, the headers livemux passes on).
    head: String,
    /// The filter stack, with the site column's tests (decided per site).
    filters: Stack,
    /// The stats columns as the sites are asked for them.
    stat_lines: Vec<Stat>,
    /// The `Limit` the sites get (the client's raised by its `Offset`).
    site_limit: Option<usize>,
    /// Explicit columns (with the virtual ones), if any.
    pub columns: Vec<String>,
    /// Positions in `columns` of the virtual site column.
    pub site_positions: Vec<usize>,
    /// Positions in `columns` of LMD's computed columns (asked of the sites
    /// as the column they are computed from).
    pub computed: Vec<(usize, Computed)>,
    /// Positions in `columns` of LMD-only columns (not asked of the sites).
    pub lmd: Vec<(usize, LmdColumn)>,
    /// Merge of each stats column, in client order (empty: no stats).
    pub stats: Vec<Merge>,
    /// Sites the filters and headers allow (None: all of the federation's).
    pub sites: Option<BTreeSet<String>>,
    /// Sort keys, in order.
    pub sort: Vec<SortKey>,
    /// Rows to skip.
    pub offset: usize,
    /// Rows to give at most.
    pub limit: Option<usize>,
    /// Output format.
    pub format: Format,
    /// A header row (`ColumnHeaders: on`).
    pub headers: bool,
    /// csv separators: dataset, field, list, host/service.
    pub separators: [u8; 4],
    /// `Cache: reload`: each site's answer may come from its cache.
    pub cache_reload: bool,
    /// Columns the client sees (those after are asked only to sort by).
    pub visible: usize,
    /// Whether the rows need reading, or can be spliced through.
    pub pass: Pass,
    /// For each of `columns`, its place in a site's row (None: livemux
    /// makes it); only for [`Pass::Top`].
    site_index: Vec<Option<usize>>,
}

/// A sort key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    /// The column's index in the output row.
    pub col: usize,
    /// Descending.
    pub desc: bool,
    /// `Sort: custom_variables NAME`: the variable (upper case) whose value
    /// orders (an empty one last when ascending, first when descending).
    pub var: Option<String>,
}

/// LMD's columns computed from a site's column (`sni/lmd`'s datarow):
/// (name, the column asked of the sites).
const COMPUTED: [(&str, &str, Computed); 3] = [
    ("state_order", "state", Computed::StateOrder),
    ("last_state_change_order", "last_state_change", Computed::LastStateChangeOrder),
    ("has_long_plugin_output", "long_plugin_output", Computed::HasLongPluginOutput),
];

/// LMD's columns no core has, answered by livemux itself (Thruk asks for
/// them on `status`, `hosts` and `services` when it talks to LMD).
const LMD_ONLY: [(&str, LmdColumn); 8] = [
    ("peer_addr", LmdColumn::Addr),
    ("peer_section", LmdColumn::Empty),
    ("peer_status", LmdColumn::Zero),
    ("peer_last_error", LmdColumn::Empty),
    ("peer_last_update", LmdColumn::Now),
    ("lmd_last_cache_update", LmdColumn::Now),
    ("thruk", LmdColumn::Object),
    ("configtool", LmdColumn::Object),
];

/// The value of an LMD-only column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmdColumn {
    /// The site's address.
    Addr,
    /// `""`.
    Empty,
    /// 0 (the site answered: it is up).
    Zero,
    /// Now, in Unix seconds (livemux's rows are live, never a cached copy).
    Now,
    /// `{}`.
    Object,
}

/// What livemux knows of the site a row came from.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowSite<'a> {
    /// Its name (the site column).
    pub name: &'a str,
    /// Its address (LMD's `peer_addr`; empty unless asked for).
    pub addr: &'a str,
    /// Its core's `program_start` (for `last_state_change_order`).
    pub program_start: Option<i64>,
}

/// How a computed column is made from its site column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Computed {
    /// `state`, with CRITICAL (2) as 4: it sorts above UNKNOWN (3).
    StateOrder,
    /// `last_state_change`, or the core's `program_start` where it is 0
    /// (never changed).
    LastStateChangeOrder,
    /// 1 when `long_plugin_output` is not empty, else 0.
    HasLongPluginOutput,
}

impl Computed {
    fn apply(self, v: &Value, program_start: Option<i64>) -> Value {
        match self {
            Computed::StateOrder => match v.as_i64() {
                Some(2) => Value::from(4),
                Some(n) => Value::from(n),
                None => v.clone(),
            },
            Computed::LastStateChangeOrder => match v.as_i64() {
                Some(0) => Value::from(program_start.unwrap_or(0)),
                _ => v.clone(),
            },
            Computed::HasLongPluginOutput => Value::from(i64::from(v.as_str().is_some_and(|s| !s.is_empty()))),
        }
    }
}

/// Whether a client's column is asked of the sites (not made by livemux).
fn asked_of_sites(c: &str) -> bool {
    !SITE_COLUMNS.contains(&c) && !LMD_ONLY.iter().any(|(n, _)| *n == c)
}

/// The column a site is asked for in place of a client's column.
fn site_column(c: &str) -> &str {
    COMPUTED.iter().find(|(name, _, _)| *name == c).map_or(c, |(_, from, _)| from)
}

/// One stats column as the sites are asked for it.
#[derive(Debug, Clone)]
enum Stat {
    /// An aggregate (`sum`, `min`, `max`; `avg` as a sum and a count):
    /// lines passed on as they are.
    Aggregate(Vec<String>),
    /// A count of the rows a filter expression passes.
    Count(Expr),
}

/// A request livemux refuses, with its status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Livestatus status code.
    pub status: u16,
    /// Why.
    pub message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refused {
    Refused { status, message: message.into() }
}

/// A count filter that every row of `table` passes (for `avg`'s count).
fn universal_filter(table: &str) -> Option<&'static str> {
    bounds(table).map(|(all, _)| all)
}

/// Count filters every row of `table` passes, and none: (all, none). Not
/// `StatsNegate:` of the first: Icinga 2 ignores that header.
fn bounds(table: &str) -> Option<(&'static str, &'static str)> {
    Some(match table {
        "hosts" | "hostsbygroup" => ("name !=", "name ="),
        "services" | "servicesbygroup" | "servicesbyhostgroup" => ("description !=", "description ="),
        "hostgroups" | "servicegroups" | "contactgroups" | "contacts" | "commands" | "timeperiods" => {
            ("name !=", "name =")
        }
        "comments" | "downtimes" => ("id >= 0", "id < 0"),
        "log" | "statehist" => ("time >= 0", "time < 0"),
        _ => return None,
    })
}

/// Plan the client's `GET` (`block` without its empty line).
pub fn plan(block: &str) -> Result<Plan, Refused> {
    let mut lines = block.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    let table = first.strip_prefix("GET ").map(str::trim).filter(|t| !t.is_empty());
    let Some(table) = table else { return Err(refuse(400, "a federated request must be a GET with a table")) };
    let mut p = Plan {
        table: table.to_owned(),
        head: format!("GET {table}\n"),
        filters: Stack::default(),
        stat_lines: Vec::new(),
        site_limit: None,
        columns: Vec::new(),
        site_positions: Vec::new(),
        computed: Vec::new(),
        lmd: Vec::new(),
        stats: Vec::new(),
        sites: None,
        sort: Vec::new(),
        offset: 0,
        limit: None,
        format: Format::Csv,
        headers: false,
        separators: DEFAULT_SEPARATORS,
        cache_reload: false,
        visible: 0,
        pass: Pass::Parse,
        site_index: Vec::new(),
    };
    let mut sort_names: Vec<(String, bool, Option<String>)> = Vec::new();
    let mut forwarded = Vec::new();
    // The count part of the Stats lines, as a stack (StatsAnd/Or/Negate
    // combine counts only).
    let mut counts = Stack::default();
    for line in lines {
        let (name, value) = line.split_once(':').map(|(n, v)| (n.trim(), v.trim())).unwrap_or((line, ""));
        match name {
            "Columns" => {
                for (i, c) in value.split_whitespace().enumerate() {
                    if SITE_COLUMNS.contains(&c) {
                        p.site_positions.push(i);
                    }
                    p.columns.push(c.to_owned());
                }
                // Written at the end: Sort may add columns to it.
                forwarded.push(COLUMNS_PLACEHOLDER.to_owned());
            }
            "Filter" => p.filters.items.push(atom(value)?),
            "And" | "Or" => {
                let n: usize = value.parse().map_err(|_| refuse(400, format!("{name}: '{value}' is not a number")))?;
                p.filters.combine(n, name == "And", name).map_err(|m| refuse(400, m))?;
            }
            "Negate" => p.filters.negate(name).map_err(|m| refuse(400, m))?,
            // LMD: an empty list means every site.
            "Sites" | "Backends" if value.is_empty() => {}
            "Sites" | "Backends" => {
                let set: BTreeSet<String> = value.split_whitespace().map(str::to_owned).collect();
                p.sites = Some(match p.sites.take() {
                    Some(old) => old.intersection(&set).cloned().collect(),
                    None => set,
                });
            }
            "Stats" => {
                let (first, rest) = value.split_once(' ').unwrap_or((value, ""));
                let kind = match first {
                    "sum" => Some(Merge::Add),
                    "min" => Some(Merge::Min),
                    "max" => Some(Merge::Max),
                    "avg" => Some(Merge::Avg),
                    "std" | "suminv" | "avginv" => {
                        return Err(refuse(
                            452,
                            format!("Stats: {first} cannot be merged exactly across sites; ask each site's socket"),
                        ));
                    }
                    _ => None,
                };
                match kind {
                    Some(Merge::Avg) if !rest.is_empty() => {
                        let Some(all) = universal_filter(table) else {
                            return Err(refuse(
                                452,
                                format!("Stats: avg on table '{table}' is not supported federated"),
                            ));
                        };
                        p.stat_lines.push(Stat::Aggregate(vec![format!("sum {rest}"), all.to_owned()]));
                        p.stats.push(Merge::Avg);
                    }
                    Some(k) if !rest.is_empty() => {
                        p.stat_lines.push(Stat::Aggregate(vec![value.to_owned()]));
                        p.stats.push(k);
                    }
                    _ => {
                        p.stat_lines.push(Stat::Count(atom(value)?));
                        p.stats.push(Merge::Add);
                    }
                }
            }
            "StatsAnd" | "StatsOr" | "StatsNegate" => {
                let n: usize = match name {
                    "StatsNegate" => 1,
                    _ => value.parse().map_err(|_| refuse(400, format!("{name}: '{value}' is not a number")))?,
                };
                // The top n stats columns, all counts, become one.
                let top = p.stat_lines.len().saturating_sub(n);
                if n == 0 || n > p.stat_lines.len() || p.stat_lines[top..].iter().any(|s| !matches!(s, Stat::Count(_)))
                {
                    return Err(refuse(452, format!("{name}: {n} combines no count filters")));
                }
                counts.items = p
                    .stat_lines
                    .drain(top..)
                    .filter_map(|s| match s {
                        Stat::Count(e) => Some(e),
                        Stat::Aggregate(_) => None,
                    })
                    .collect();
                match name {
                    "StatsNegate" => counts.negate(name),
                    _ => counts.combine(n, name == "StatsAnd", name),
                }
                .map_err(|m| refuse(400, m))?;
                p.stats.truncate(top);
                p.stats.push(Merge::Add);
                p.stat_lines.extend(counts.items.drain(..).map(Stat::Count));
            }
            "Sort" => {
                let mut w = value.split_whitespace();
                let col = w.next().unwrap_or_default().to_owned();
                // LMD's `Sort: custom_variables NAME asc`.
                let var = match col.as_str() {
                    "custom_variables" | "host_custom_variables" => w.next().map(str::to_uppercase),
                    _ => None,
                };
                let desc = match w.next() {
                    None | Some("asc") => false,
                    Some("desc") => true,
                    Some(other) => return Err(refuse(400, format!("Sort: '{other}' is not asc or desc"))),
                };
                sort_names.push((col, desc, var));
            }
            "Limit" => {
                p.limit = Some(value.parse().map_err(|_| refuse(400, format!("Limit: '{value}' is not a number")))?)
            }
            "Offset" => {
                p.offset = value.parse().map_err(|_| refuse(400, format!("Offset: '{value}' is not a number")))?
            }
            "OutputFormat" => {
                p.format = match value {
                    "csv" => Format::Csv,
                    "json" => Format::Json,
                    "python" => Format::Python,
                    "python3" => Format::Python3,
                    "wrapped_json" => Format::WrappedJson,
                    other => return Err(refuse(452, format!("OutputFormat: '{other}' is not supported"))),
                }
            }
            "ColumnHeaders" => p.headers = value == "on",
            "Separators" => {
                let v: Vec<u8> = value.split_whitespace().filter_map(|n| n.parse().ok()).collect();
                if v.len() != 4 {
                    return Err(refuse(400, "Separators: needs four byte values"));
                }
                p.separators = [v[0], v[1], v[2], v[3]];
            }
            "Cache" if value == "reload" => p.cache_reload = true,
            "Cache" => return Err(refuse(400, format!("Cache: '{value}' is not 'reload'"))),
            // The client's framing is livemux's business.
            "ResponseHeader" | "KeepAlive" => {}
            _ => forwarded.push(line.to_owned()),
        }
    }
    if universal_filter(table).is_none() && p.stat_lines.iter().any(|s| matches!(s, Stat::Count(e) if e.has_site())) {
        return Err(refuse(452, format!("Stats on the site column are not supported federated on table '{table}'")));
    }
    if p.columns.is_empty() && p.stats.is_empty() && !p.site_positions.is_empty() {
        return Err(refuse(400, "the site column needs explicit Columns"));
    }
    if !p.stats.is_empty() && !sort_names.is_empty() {
        return Err(refuse(452, "Sort with Stats is not supported federated"));
    }
    p.visible = p.columns.len();
    for (name, desc, var) in sort_names {
        let i = match p.columns.iter().position(|c| *c == name) {
            Some(i) => i,
            // Asked of the sites too, and not shown.
            None if !p.columns.is_empty() => {
                p.columns.push(name.clone());
                if SITE_COLUMNS.contains(&name.as_str()) {
                    p.site_positions.push(p.columns.len() - 1);
                }
                p.columns.len() - 1
            }
            None => {
                return Err(refuse(
                    452,
                    format!("Sort: '{name}' needs explicit Columns (without, the sites' column order is not known)"),
                ));
            }
        };
        p.sort.push(SortKey { col: i, desc, var });
    }
    for (i, c) in p.columns.iter().enumerate() {
        if let Some((_, _, how)) = COMPUTED.iter().find(|(name, _, _)| name == c) {
            p.computed.push((i, *how));
        }
        if let Some((_, what)) = LMD_ONLY.iter().find(|(name, _)| name == c) {
            p.lmd.push((i, *what));
        }
    }
    if !p.stats.is_empty() && !p.lmd.is_empty() {
        return Err(refuse(452, "Stats grouped by an LMD-only column are not supported federated"));
    }
    let real: Vec<&str> = p.columns.iter().map(String::as_str).filter(|c| asked_of_sites(c)).map(site_column).collect();
    if let Some(at) = forwarded.iter().position(|l| l == COLUMNS_PLACEHOLDER) {
        if real.is_empty() {
            forwarded.remove(at);
        } else {
            forwarded[at] = format!("Columns: {}", real.join(" "));
        }
    }
    // wrapped_json's `total_count` is every matching row before Offset and
    // Limit (Thruk's pager): the sites are asked for all of them there.
    if p.stats.is_empty()
        && p.sort.is_empty()
        && p.format != Format::WrappedJson
        && let Some(l) = p.limit
    {
        // Saturating: `Limit` and `Offset` are the client's numbers.
        p.site_limit = Some(l.saturating_add(p.offset));
    }
    for l in forwarded {
        p.head.push_str(&l);
        p.head.push('\n');
    }
    p.pass = splice(&p);
    // Read per row only by a sorted page.
    let mut at = 0;
    p.site_index = (0..if p.pass == Pass::Top { p.columns.len() } else { 0 })
        .map(|i| {
            let made = p.site_positions.contains(&i) || p.lmd.iter().any(|(l, _)| *l == i);
            (!made).then(|| {
                at += 1;
                at - 1
            })
        })
        .collect();
    Ok(p)
}

/// Whether the sites' rows are the client's rows byte for byte: nothing
/// to merge (no Stats, Sort, site column or LMD column) and explicit
/// Columns (without, each core answers with a header row of its own).
fn splice(p: &Plan) -> Pass {
    let plain = p.stats.is_empty()
        && p.sort.is_empty()
        && p.site_positions.is_empty()
        && p.computed.is_empty()
        && p.lmd.is_empty()
        && !p.columns.is_empty();
    if p.stats.is_empty() && !p.sort.is_empty() && p.limit.is_some() {
        return Pass::Top;
    }
    match p.format {
        Format::Json | Format::WrappedJson if plain => Pass::Json,
        // The cores' csv is livemux's with the default separators; a row
        // ends at the first `\n`, so no Offset or Limit is applied to it.
        Format::Csv if plain && p.separators == DEFAULT_SEPARATORS && p.offset == 0 && p.limit.is_none() => Pass::Csv,
        _ => Pass::Parse,
    }
}

/// A `Filter:` or `Stats:` line's condition: a test of the site column, or
/// a line for the sites.
fn atom(value: &str) -> Result<Expr, Refused> {
    let mut w = value.splitn(3, ' ');
    let (col, op, arg) = (w.next().unwrap_or(""), w.next().unwrap_or(""), w.next().unwrap_or(""));
    if !SITE_COLUMNS.contains(&col) {
        return Ok(Expr::Line(value.to_owned()));
    }
    let Some(op) = StrOp::parse(op) else {
        return Err(refuse(400, format!("'{op}' is not an operator for the string column '{col}'")));
    };
    StrTest::new(op, arg).map(|t| Expr::Site(Box::new(t))).map_err(|m| refuse(400, m))
}

impl Plan {
    /// The request `site` gets (without the empty line), or `None` when the
    /// filters exclude it (its rows would all be filtered out).
    pub fn query_for(&self, site: &str) -> Option<String> {
        let mut q = String::with_capacity(self.head.len() + 128);
        q.push_str(&self.head);
        self.filters.for_site(site, &mut q)?;
        for s in &self.stat_lines {
            match s {
                Stat::Aggregate(lines) => {
                    for l in lines {
                        q.push_str("Stats: ");
                        q.push_str(l);
                        q.push('\n');
                    }
                }
                Stat::Count(e) if !e.has_site() => e.render(STATS, &mut q),
                Stat::Count(e) => match e.for_site(site) {
                    // Every row or none (the table's bounds were checked
                    // to exist when planned).
                    Expr::Const(b) => {
                        let (all, none) = bounds(&self.table).unwrap_or(("name !=", "name ="));
                        q.push_str("Stats: ");
                        q.push_str(if b { all } else { none });
                        q.push('\n');
                    }
                    e => e.render(STATS, &mut q),
                },
            }
        }
        if let Some(l) = self.site_limit {
            let _ = writeln!(q, "Limit: {l}");
        }
        q.push_str(if self.pass == Pass::Csv { "OutputFormat: csv\n" } else { "OutputFormat: json\n" });
        Some(q)
    }

    /// The request for `site` without the columns it lacks (`missing`,
    /// some of the columns asked), in JSON; and where in each of its rows
    /// the missing columns go (as `""`, LMD's answer). None when the
    /// filters exclude the site, or no column would be left.
    pub fn query_without(&self, site: &str, missing: &BTreeSet<String>) -> Option<(String, Vec<usize>)> {
        let q = self.query_for(site)?;
        let asked = self.asked();
        let kept: Vec<&str> = asked.iter().copied().filter(|c| !missing.contains(*c)).collect();
        if kept.is_empty() {
            return None;
        }
        let line = format!("\nColumns: {}\n", asked.join(" "));
        let q = q.replacen(&line, &format!("\nColumns: {}\n", kept.join(" ")), 1);
        let q = q.replacen("OutputFormat: csv\n", "OutputFormat: json\n", 1);
        let at = asked.iter().enumerate().filter(|(_, c)| missing.contains(**c)).map(|(i, _)| i).collect();
        Some((q, at))
    }

    /// The columns the sites are asked for, in order (a site's row).
    fn asked(&self) -> Vec<&str> {
        self.columns.iter().map(String::as_str).filter(|c| asked_of_sites(c)).map(site_column).collect()
    }

    /// Whether `column` is one the sites are asked for.
    pub fn asks(&self, column: &str) -> bool {
        self.asked().contains(&column)
    }

    /// Whether a row of livemux's own (the `sites` table, whose site column
    /// is `site`) passes the filter stack; `line` decides a filter line.
    pub fn row_passes(&self, site: &str, mut line: impl FnMut(&str) -> bool) -> bool {
        self.filters.items.iter().all(|e| e.eval(site, &mut line))
    }

    /// Whether some site may get a different request from the others.
    pub fn per_site(&self) -> bool {
        self.filters.has_site() || self.stat_lines.iter().any(|s| matches!(s, Stat::Count(e) if e.has_site()))
    }

    /// The output columns' names (for `ColumnHeaders` and `wrapped_json`).
    pub fn header_names(&self, stats_from_row: usize) -> Vec<String> {
        if !self.stats.is_empty() {
            let mut v = self.columns.clone();
            v.extend((1..=self.stats.len()).map(|i| format!("stats_{i}")));
            return v;
        }
        if self.columns.is_empty() {
            return (0..stats_from_row).map(|i| format!("column_{i}")).collect();
        }
        self.columns[..self.visible.min(self.columns.len())].to_vec()
    }

    /// A site's row (as the site answered) as the client's row: the site
    /// column put in its places.
    pub fn client_row(&self, site: &str, row: Vec<Value>) -> Vec<Value> {
        self.client_row_of(RowSite { name: site, ..RowSite::default() }, row)
    }

    /// [`Plan::client_row`], with LMD's computed and LMD-only columns made.
    pub fn client_row_of(&self, site: RowSite<'_>, row: Vec<Value>) -> Vec<Value> {
        let mut out = if self.site_positions.is_empty() && self.lmd.is_empty() {
            row
        } else {
            let mut out = Vec::with_capacity(row.len() + self.site_positions.len() + self.lmd.len());
            let mut it = row.into_iter();
            for i in 0..self.columns.len() {
                if let Some(v) = self.virtual_value(site, i) {
                    out.push(v);
                } else if let Some(v) = it.next() {
                    out.push(v);
                }
            }
            out.extend(it);
            out
        };
        for (i, how) in &self.computed {
            if let Some(v) = out.get_mut(*i) {
                *v = how.apply(v, site.program_start);
            }
        }
        out
    }

    /// The value of client column `i` when livemux makes it (the site
    /// column, LMD-only columns), else None (the site answers it).
    fn virtual_value(&self, site: RowSite<'_>, i: usize) -> Option<Value> {
        if self.site_positions.contains(&i) {
            return Some(Value::String(site.name.to_owned()));
        }
        let (_, what) = self.lmd.iter().find(|(at, _)| *at == i)?;
        Some(match what {
            LmdColumn::Addr => Value::from(site.addr),
            LmdColumn::Empty => Value::from(""),
            LmdColumn::Zero => Value::from(0),
            LmdColumn::Now => {
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                Value::from(t.as_secs())
            }
            LmdColumn::Object => Value::Object(serde_json::Map::new()),
        })
    }

    /// Whether a site's `row` (as sent, its columns at `cols`, see
    /// [`super::rows::columns`]) sorts before a row with the sort keys
    /// `worst`: its keys are read one by one until one differs (a string
    /// without escapes compared as sent, without being copied).
    pub fn sorts_before(
        &self,
        site: RowSite<'_>,
        row: &[u8],
        cols: &[std::ops::Range<usize>],
        worst: &[Value],
    ) -> Result<bool, String> {
        for (k, w) in self.sort.iter().zip(worst) {
            let o = match self.site_index.get(k.col).copied().flatten() {
                None => order(k, &self.virtual_value(site, k.col).unwrap_or_default(), w),
                Some(at) => {
                    let raw = cols.get(at).and_then(|c| row.get(c.clone())).unwrap_or(b"null");
                    let computed = self.computed.iter().find(|(at, _)| *at == k.col);
                    match (raw, w) {
                        ([b'"', s @ .., b'"'], Value::String(w))
                            if k.var.is_none() && computed.is_none() && !s.contains(&b'\\') =>
                        {
                            let o = s.cmp(w.as_bytes());
                            if k.desc { o.reverse() } else { o }
                        }
                        _ => {
                            let v: Value =
                                serde_json::from_slice(raw).map_err(|e| format!("a row is not valid JSON: {e}"))?;
                            let v = match computed {
                                Some((_, how)) => how.apply(&v, site.program_start),
                                None => v,
                            };
                            order(k, &v, w)
                        }
                    }
                }
            };
            if o.is_ne() {
                return Ok(o.is_lt());
            }
        }
        Ok(false)
    }

    /// A client row's sort keys, in the order of `Sort`.
    pub fn key_of_row(&self, row: &[Value]) -> Vec<Value> {
        self.sort.iter().map(|k| row.get(k.col).cloned().unwrap_or(Value::Null)).collect()
    }

    /// Group key columns of a stats row (the explicit, non-site columns).
    fn group_len(&self) -> usize {
        self.columns.len() - self.site_positions.len()
    }
}

/// Merged stats: per group key, the accumulated stats values.
#[derive(Debug, Default)]
pub struct StatsMerge {
    /// (site for the site column, group key) → accumulators, in first-seen order.
    groups: Vec<(Vec<Value>, Vec<f64>)>,
    index: std::collections::HashMap<String, usize>,
}

fn num(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap_or(0.0),
        Value::String(s) => s.parse().unwrap_or(0.0),
        _ => 0.0,
    }
}

impl StatsMerge {
    /// Add one site's stats row.
    pub fn add(&mut self, plan: &Plan, site: &str, row: Vec<Value>) {
        let g = plan.group_len();
        let mut key: Vec<Value> = row.iter().take(g).cloned().collect();
        if !plan.site_positions.is_empty() {
            // The site column is part of the group key: one group per site.
            key.insert(0, Value::String(site.to_owned()));
        }
        let values: Vec<f64> = row.iter().skip(g).map(num).collect();
        let k = serde_json::to_string(&key).unwrap_or_default();
        let at = *self.index.entry(k).or_insert_with(|| {
            self.groups.push((key, Vec::new()));
            self.groups.len() - 1
        });
        let acc = &mut self.groups[at].1;
        let mut v = values.into_iter();
        let mut i = 0;
        for m in &plan.stats {
            let (x, extra) = match m {
                Merge::Avg => (v.next().unwrap_or(0.0), Some(v.next().unwrap_or(0.0))),
                _ => (v.next().unwrap_or(0.0), None),
            };
            if acc.len() <= i {
                acc.push(match m {
                    Merge::Min => f64::INFINITY,
                    Merge::Max => f64::NEG_INFINITY,
                    _ => 0.0,
                });
                if extra.is_some() {
                    acc.push(0.0);
                }
            }
            match m {
                Merge::Add => acc[i] += x,
                Merge::Min => acc[i] = acc[i].min(x),
                Merge::Max => acc[i] = acc[i].max(x),
                Merge::Avg => {
                    acc[i] += x;
                    acc[i + 1] += extra.unwrap_or(0.0);
                }
            }
            i += if extra.is_some() { 2 } else { 1 };
        }
    }

    /// The merged rows, in the client's column order.
    pub fn rows(self, plan: &Plan) -> Vec<Vec<Value>> {
        let number = |x: f64| {
            if x.fract() == 0.0 && x.abs() < 9e15 {
                Value::from(x as i64)
            } else {
                serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
            }
        };
        let mut out = Vec::with_capacity(self.groups.len());
        for (mut key, acc) in self.groups {
            let site = (!plan.site_positions.is_empty()).then(|| key.remove(0));
            let mut row = Vec::new();
            let mut k = key.into_iter();
            for i in 0..plan.columns.len() {
                if plan.site_positions.contains(&i) {
                    row.push(site.clone().unwrap_or(Value::Null));
                } else if let Some(v) = k.next() {
                    row.push(v);
                }
            }
            let mut i = 0;
            for m in &plan.stats {
                match m {
                    Merge::Avg => {
                        let (s, n) = (acc.get(i).copied().unwrap_or(0.0), acc.get(i + 1).copied().unwrap_or(0.0));
                        row.push(if n > 0.0 {
                            serde_json::Number::from_f64(s / n).map_or(Value::Null, Value::Number)
                        } else {
                            Value::from(0)
                        });
                        i += 2;
                    }
                    Merge::Min | Merge::Max if !acc.get(i).is_some_and(|x| x.is_finite()) => {
                        row.push(Value::from(0));
                        i += 1;
                    }
                    _ => {
                        row.push(number(acc.get(i).copied().unwrap_or(0.0)));
                        i += 1;
                    }
                }
            }
            out.push(row);
        }
        if out.is_empty() && plan.columns.is_empty() {
            // Stats without groups: one row of zeros, as a core answers.
            out.push(plan.stats.iter().map(|_| Value::from(0)).collect());
        }
        out
    }
}

/// Compare two values as a core sorts: numbers numerically, the rest as text.
pub fn compare(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x.as_f64().unwrap_or(0.0).partial_cmp(&y.as_f64().unwrap_or(0.0)).unwrap_or(Ordering::Equal)
        }
        (Value::String(x), Value::String(y)) => x.cmp(y),
        _ => a.to_string().cmp(&b.to_string()),
    }
}

/// The rows an answer holds until every site has answered (a `Stats`
/// answer's merged groups, or the rows a `Sort` orders), in order, with
/// `Offset` and `Limit` applied to sorted rows.
pub fn held_rows(plan: &Plan, stats: StatsMerge, mut sorted: Vec<Vec<Value>>) -> Vec<Vec<Value>> {
    if !plan.stats.is_empty() {
        return stats.rows(plan);
    }
    sort(plan, &mut sorted);
    if !plan.sort.is_empty() {
        let end = plan.limit.map_or(sorted.len(), |l| plan.offset.saturating_add(l).min(sorted.len()));
        sorted = sorted.drain(plan.offset.min(sorted.len())..end).collect();
    }
    sorted
}

/// Sort rows by the plan's keys (stable: equal rows keep the order they
/// came in).
pub fn sort(plan: &Plan, rows: &mut [Vec<Value>]) {
    let null = Value::Null;
    rows.sort_by(|a, b| {
        plan.sort
            .iter()
            .map(|k| order(k, a.get(k.col).unwrap_or(&null), b.get(k.col).unwrap_or(&null)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    });
}

/// Compare two rows' sort keys ([`Plan::sort_key`], [`Plan::key_of_row`]).
pub fn compare_keys(plan: &Plan, a: &[Value], b: &[Value]) -> Ordering {
    plan.sort
        .iter()
        .zip(a.iter().zip(b))
        .map(|(k, (x, y))| order(k, x, y))
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}

/// Two values in the order of one sort key.
fn order(k: &SortKey, x: &Value, y: &Value) -> Ordering {
    let o = match &k.var {
        Some(name) => compare_var(custom_var(x, name), custom_var(y, name)),
        None => compare(x, y),
    };
    if k.desc { o.reverse() } else { o }
}

/// A custom variable's value in a `custom_variables` column: an object
/// (`{"NAME": "value"}`) or a list of pairs (`[["NAME", "value"]]`).
fn custom_var<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => m.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v),
        Value::Array(pairs) => pairs.iter().find_map(|p| match p.as_array().map(Vec::as_slice) {
            Some([k, v]) if k.as_str().is_some_and(|k| k.eq_ignore_ascii_case(name)) => Some(v),
            _ => None,
        }),
        _ => None,
    }
}

/// Order custom variables' values: as [`compare`], an empty or missing one
/// after every other (so last ascending, first descending, as LMD).
fn compare_var(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    let empty = |v: Option<&Value>| v.is_none_or(|v| v.is_null() || v.as_str() == Some(""));
    match (empty(a), empty(b)) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => compare(a.unwrap_or(&Value::Null), b.unwrap_or(&Value::Null)),
    }
}

/// Writes rows in the client's format.
pub struct Renderer {
    format: Format,
    sep: [u8; 4],
    rows: usize,
}

impl Renderer {
    /// A renderer; `out` gets the opening (`[` or `{"columns":..., "data": [`).
    pub fn start(plan: &Plan, header: Option<&[String]>, out: &mut Vec<u8>) -> Renderer {
        let mut r = Renderer { format: plan.format, sep: plan.separators, rows: 0 };
        match plan.format {
            Format::Csv => {}
            Format::WrappedJson => {
                // As LMD: `columns` only with `ColumnHeaders: on`.
                out.push(b'{');
                if let Some(h) = header {
                    let cols: Vec<Value> = h.iter().map(|c| Value::String(c.clone())).collect();
                    out.extend_from_slice(b"\"columns\":");
                    out.extend_from_slice(serde_json::to_string(&cols).unwrap_or_default().as_bytes());
                    out.push(b',');
                }
                out.extend_from_slice(b"\"data\":[");
            }
            _ => out.push(b'['),
        }
        if plan.format != Format::WrappedJson
            && let Some(h) = header
        {
            let row: Vec<Value> = h.iter().map(|c| Value::String(c.clone())).collect();
            r.row(&row, out);
        }
        r
    }

    /// One row.
    pub fn row(&mut self, row: &[Value], out: &mut Vec<u8>) {
        match self.format {
            Format::Csv => {
                for (i, v) in row.iter().enumerate() {
                    if i > 0 {
                        out.push(self.sep[1]);
                    }
                    self.csv_value(v, 0, out);
                }
                out.push(self.sep[0]);
            }
            _ => {
                if self.rows > 0 {
                    out.extend_from_slice(b",\n");
                }
                out.push(b'[');
                for (i, v) in row.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.value(v, out);
                }
                out.push(b']');
            }
        }
        self.rows += 1;
    }

    fn csv_value(&self, v: &Value, depth: usize, out: &mut Vec<u8>) {
        match v {
            Value::Null => {}
            Value::String(s) => out.extend_from_slice(s.as_bytes()),
            Value::Bool(b) => out.push(if *b { b'1' } else { b'0' }),
            Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Value::Array(items) => {
                let sep = if depth == 0 { self.sep[2] } else { self.sep[3] };
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(sep);
                    }
                    self.csv_value(x, depth + 1, out);
                }
            }
            Value::Object(_) => out.extend_from_slice(v.to_string().as_bytes()),
        }
    }

    fn value(&self, v: &Value, out: &mut Vec<u8>) {
        match (self.format, v) {
            (Format::Python | Format::Python3, Value::Null) => out.extend_from_slice(b"None"),
            (Format::Python | Format::Python3, Value::Bool(b)) => {
                out.extend_from_slice(if *b { b"True" } else { b"False" })
            }
            (Format::Python | Format::Python3, Value::String(s)) => {
                if self.format == Format::Python {
                    out.push(b'u');
                }
                livemux_protocol::python::render_str(s, out);
            }
            (Format::Python | Format::Python3, Value::Array(items)) => {
                out.push(b'[');
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.value(x, out);
                }
                out.push(b']');
            }
            _ => out.extend_from_slice(serde_json::to_string(v).unwrap_or_default().as_bytes()),
        }
    }

    /// `n` rows as a site sent them, spliced: csv rows each with its `\n`,
    /// JSON rows each after a `,\n` (left out before the answer's first).
    pub fn spliced(&mut self, rows: &[u8], n: usize, out: &mut Vec<u8>) {
        let rows = match self.format {
            Format::Csv => rows,
            _ if self.rows == 0 => rows.get(2..).unwrap_or_default(),
            _ => rows,
        };
        out.extend_from_slice(rows);
        self.rows += n;
    }

    /// The end of the answer (`failed`: site → reason, for `wrapped_json`).
    pub fn finish(self, failed: &[(String, String)], total: usize, out: &mut Vec<u8>) {
        match self.format {
            Format::Csv => {}
            Format::WrappedJson => {
                out.extend_from_slice(b"],\"failed\":{");
                for (i, (site, why)) in failed.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(serde_json::to_string(site).unwrap_or_default().as_bytes());
                    out.push(b':');
                    out.extend_from_slice(serde_json::to_string(why).unwrap_or_default().as_bytes());
                }
                out.extend_from_slice(format!("}},\"total_count\":{total}}}\n").as_bytes());
            }
            _ => out.extend_from_slice(b"]\n"),
        }
    }
}

#[cfg(test)]
mod tests;
