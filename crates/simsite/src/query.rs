//! A small Livestatus query engine over a [`Dataset`].
//!
//! Supported: `Columns:`, `ColumnHeaders:`, `Filter:` with `And:`/`Or:`/
//! `Negate:`, `Stats:` (counting filters and `sum|min|max|avg <col>`) with
//! `StatsAnd:`/`StatsOr:`/`StatsNegate:` and grouping by `Columns:`,
//! `Limit:`, and `OutputFormat: csv|json|python`. Operators: `= != < > <= >=`,
//! `~ !~` (substring, standing in for regular expressions), `~~ !~~`
//! (case-insensitive substring), `=~ !=~` (case-insensitive equality); on list
//! columns `>=` means "contains" and `= ` with an empty value "is empty".
//! Other header lines are ignored, as real cores ignore unknown headers.

use std::collections::BTreeMap;

use livemux_protocol::{Query, Status};

use crate::data::{Dataset, StatusCounters, Table, Value};

/// A query the engine refused, with the status a real core would send.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryError {
    /// Status code.
    pub status: Status,
    /// Message (the response body).
    pub message: String,
}

fn err(status: Status, message: impl Into<String>) -> QueryError {
    QueryError { status, message: message.into() }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Contains,
    NotContains,
    IContains,
    NotIContains,
    IEq,
    NotIEq,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "=" => Op::Eq,
            "!=" => Op::Ne,
            "<" => Op::Lt,
            ">" => Op::Gt,
            "<=" => Op::Le,
            ">=" => Op::Ge,
            "~" => Op::Contains,
            "!~" => Op::NotContains,
            "~~" => Op::IContains,
            "!~~" => Op::NotIContains,
            "=~" => Op::IEq,
            "!=~" => Op::NotIEq,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
enum Filter {
    Cmp { col: &'static str, op: Op, value: String },
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
}

#[derive(Debug, Clone, Copy)]
enum Agg {
    Sum,
    Min,
    Max,
    Avg,
}

#[derive(Debug, Clone)]
enum Stat {
    Count(Filter),
    Agg(Agg, &'static str),
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Csv,
    Json,
    /// Checkmk's python3 renderer: blobs as `b"..."`.
    Python3,
}

/// A parsed query, ready to run.
#[derive(Debug)]
struct Plan {
    table: Table,
    columns: Vec<&'static str>,
    explicit_columns: bool,
    headers: bool,
    filter: Filter,
    stats: Vec<Stat>,
    limit: Option<usize>,
    format: Format,
}

/// Run a query and return the response body.
pub fn run(ds: &Dataset, q: &Query, st: &StatusCounters) -> Result<Vec<u8>, QueryError> {
    let plan = plan(q)?;
    if !ds.inventory.enabled {
        // A core without inventory (Icinga 2, Naemon) does not know them.
        let text = String::from_utf8_lossy(q.forwarded_headers());
        if let Some(c) = plan.table.extra_columns().iter().find(|c| text.contains(*c)) {
            return Err(err(Status::BadRequest, format!("Table '{}' has no column '{c}'", q.table)));
        }
    }
    if plan.stats.is_empty() { rows(ds, &plan, st) } else { stats(ds, &plan, st) }
}

fn column(t: Table, name: &str, table: &str) -> Result<&'static str, QueryError> {
    t.columns()
        .iter()
        .chain(t.extra_columns())
        .find(|c| **c == name)
        .copied()
        .ok_or_else(|| err(Status::BadRequest, format!("Table '{table}' has no column '{name}'")))
}

fn pop_n<T>(stack: &mut Vec<T>, n: &str, what: &str) -> Result<Vec<T>, QueryError> {
    let n: usize = n.trim().parse().map_err(|_| err(Status::BadRequest, format!("invalid count '{n}' for {what}")))?;
    if n > stack.len() {
        return Err(err(
            Status::Incomplete,
            format!("{what} is referencing {n} filters; stack only contains {}", stack.len()),
        ));
    }
    Ok(stack.split_off(stack.len() - n))
}

fn plan(q: &Query) -> Result<Plan, QueryError> {
    let table = Table::by_name(&q.table)
        .ok_or_else(|| err(Status::NotFound, format!("Table '{}' does not exist.", q.table)))?;
    let format = match q.output_format.as_deref() {
        None | Some("csv") => Format::Csv,
        Some("json" | "python") => Format::Json,
        Some("python3") => Format::Python3,
        Some(other) => return Err(err(Status::BadRequest, format!("unsupported OutputFormat '{other}'"))),
    };
    let mut p = Plan {
        table,
        columns: Vec::new(),
        explicit_columns: false,
        headers: false,
        filter: Filter::And(Vec::new()),
        stats: Vec::new(),
        limit: None,
        format,
    };
    let mut filters: Vec<Filter> = Vec::new();
    let text = String::from_utf8_lossy(q.forwarded_headers());
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name {
            "Columns" => {
                p.explicit_columns = true;
                for c in value.split(' ') {
                    p.columns.push(column(table, c, &q.table)?);
                }
            }
            "ColumnHeaders" => p.headers = value == "on",
            "Limit" => {
                let n = value.parse().map_err(|_| err(Status::BadRequest, format!("invalid Limit '{value}'")))?;
                p.limit = Some(n);
            }
            "Filter" => filters.push(cmp(table, value, &q.table)?),
            "And" => {
                let v = pop_n(&mut filters, value, "And")?;
                filters.push(Filter::And(v));
            }
            "Or" => {
                let v = pop_n(&mut filters, value, "Or")?;
                filters.push(Filter::Or(v));
            }
            "Negate" => {
                let mut v = pop_n(&mut filters, "1", "Negate")?;
                filters.push(Filter::Not(Box::new(v.remove(0))));
            }
            "Stats" => p.stats.push(stat(table, value, &q.table)?),
            "StatsAnd" | "StatsOr" => {
                let v = pop_n(&mut p.stats, value, name)?;
                let fs = v.into_iter().map(count_filter).collect::<Result<Vec<_>, _>>()?;
                let f = if name == "StatsAnd" { Filter::And(fs) } else { Filter::Or(fs) };
                p.stats.push(Stat::Count(f));
            }
            "StatsNegate" => {
                let mut v = pop_n(&mut p.stats, "1", name)?;
                let f = count_filter(v.remove(0))?;
                p.stats.push(Stat::Count(Filter::Not(Box::new(f))));
            }
            _ => {}
        }
    }
    p.filter = Filter::And(filters);
    if !p.explicit_columns && p.stats.is_empty() {
        p.columns = table.columns().to_vec();
        p.headers = true;
    }
    Ok(p)
}

fn count_filter(s: Stat) -> Result<Filter, QueryError> {
    match s {
        Stat::Count(f) => Ok(f),
        Stat::Agg(..) => Err(err(Status::BadRequest, "cannot combine aggregating Stats")),
    }
}

fn cmp(t: Table, spec: &str, table: &str) -> Result<Filter, QueryError> {
    let mut parts = spec.splitn(3, ' ');
    let col = parts.next().unwrap_or_default();
    let col = column(t, col, table)?;
    let op = parts.next().unwrap_or_default();
    let op = Op::parse(op).ok_or_else(|| err(Status::BadRequest, format!("invalid operator '{op}' in '{spec}'")))?;
    let value = parts.next().unwrap_or_default().to_owned();
    Ok(Filter::Cmp { col, op, value })
}

fn stat(t: Table, spec: &str, table: &str) -> Result<Stat, QueryError> {
    let (first, rest) = spec.split_once(' ').unwrap_or((spec, ""));
    let agg = match first {
        "sum" => Some(Agg::Sum),
        "min" => Some(Agg::Min),
        "max" => Some(Agg::Max),
        "avg" => Some(Agg::Avg),
        _ => None,
    };
    match agg {
        Some(a) if !rest.is_empty() && !rest.contains(' ') => Ok(Stat::Agg(a, column(t, rest.trim(), table)?)),
        _ => cmp(t, spec, table).map(Stat::Count),
    }
}

fn matches(ds: &Dataset, t: Table, row: usize, f: &Filter, st: &StatusCounters) -> bool {
    match f {
        Filter::And(v) => v.iter().all(|f| matches(ds, t, row, f, st)),
        Filter::Or(v) => v.iter().any(|f| matches(ds, t, row, f, st)),
        Filter::Not(f) => !matches(ds, t, row, f, st),
        Filter::Cmp { col, op, value } => match ds.cell(t, row, col, st) {
            Some(v) => compare(&v, *op, value),
            None => false,
        },
    }
}

fn compare(v: &Value, op: Op, want: &str) -> bool {
    use std::cmp::Ordering;
    let ord = |o: Ordering| match op {
        Op::Eq => o == Ordering::Equal,
        Op::Ne => o != Ordering::Equal,
        Op::Lt => o == Ordering::Less,
        Op::Gt => o == Ordering::Greater,
        Op::Le => o != Ordering::Greater,
        Op::Ge => o != Ordering::Less,
        _ => false,
    };
    match v {
        Value::Int(n) => want.trim().parse::<f64>().is_ok_and(|w| ord((*n as f64).total_cmp(&w))),
        Value::Float(x) => want.trim().parse::<f64>().is_ok_and(|w| ord(x.total_cmp(&w))),
        Value::Str(s) => {
            let (sl, wl) = (s.to_lowercase(), want.to_lowercase());
            match op {
                Op::Contains => s.contains(want),
                Op::NotContains => !s.contains(want),
                Op::IContains => sl.contains(&wl),
                Op::NotIContains => !sl.contains(&wl),
                Op::IEq => sl == wl,
                Op::NotIEq => sl != wl,
                _ => ord(s.as_str().cmp(want)),
            }
        }
        Value::List(items) => match op {
            Op::Ge => items.iter().any(|i| i == want),
            Op::Lt => !items.iter().any(|i| i == want),
            Op::Eq => want.is_empty() && items.is_empty(),
            Op::Ne => !(want.is_empty() && items.is_empty()),
            _ => false,
        },
        Value::Blob(_) => false,
    }
}

fn rows(ds: &Dataset, p: &Plan, st: &StatusCounters) -> Result<Vec<u8>, QueryError> {
    let mut out = Output::new(p.format);
    if p.headers {
        out.row(p.columns.iter().map(|c| Value::Str((*c).to_owned())));
    }
    let limit = p.limit.unwrap_or(usize::MAX);
    let mut n = 0;
    for row in 0..ds.rows(p.table) {
        if n >= limit {
            break;
        }
        if matches(ds, p.table, row, &p.filter, st) {
            let cells = p.columns.iter().map(|c| ds.cell(p.table, row, c, st).unwrap_or(Value::Str(String::new())));
            out.row(cells);
            n += 1;
        }
    }
    Ok(out.finish())
}

#[derive(Debug, Clone, Copy)]
struct Acc {
    count: i64,
    sum: f64,
    min: f64,
    max: f64,
}

fn stats(ds: &Dataset, p: &Plan, st: &StatusCounters) -> Result<Vec<u8>, QueryError> {
    let fresh = vec![Acc { count: 0, sum: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY }; p.stats.len()];
    let mut groups: BTreeMap<Vec<String>, Vec<Acc>> = BTreeMap::new();
    if p.columns.is_empty() {
        groups.insert(Vec::new(), fresh.clone());
    }
    for row in 0..ds.rows(p.table) {
        if !matches(ds, p.table, row, &p.filter, st) {
            continue;
        }
        let key: Vec<String> = p
            .columns
            .iter()
            .map(|c| ds.cell(p.table, row, c, st).map(|v| render_csv(&v)).unwrap_or_default())
            .collect();
        let accs = groups.entry(key).or_insert_with(|| fresh.clone());
        for (acc, s) in accs.iter_mut().zip(&p.stats) {
            match s {
                Stat::Count(f) => acc.count += i64::from(matches(ds, p.table, row, f, st)),
                Stat::Agg(_, col) => {
                    let x = match ds.cell(p.table, row, col, st) {
                        Some(Value::Int(n)) => n as f64,
                        Some(Value::Float(x)) => x,
                        _ => 0.0,
                    };
                    acc.count += 1;
                    acc.sum += x;
                    acc.min = acc.min.min(x);
                    acc.max = acc.max.max(x);
                }
            }
        }
    }
    let mut out = Output::new(p.format);
    if p.headers {
        let names = p.columns.iter().map(|c| (*c).to_owned());
        let stats = (1..=p.stats.len()).map(|i| format!("stats_{i}"));
        out.row(names.chain(stats).map(Value::Str));
    }
    for (key, accs) in groups {
        let mut cells: Vec<Value> = key.into_iter().map(Value::Str).collect();
        for (acc, s) in accs.iter().zip(&p.stats) {
            cells.push(match s {
                Stat::Count(_) => Value::Int(acc.count),
                Stat::Agg(a, _) => agg_value(*a, acc),
            });
        }
        out.row(cells.into_iter());
    }
    Ok(out.finish())
}

fn agg_value(a: Agg, acc: &Acc) -> Value {
    let num = |x: f64| if x.fract() == 0.0 && x.abs() < 1e15 { Value::Int(x as i64) } else { Value::Float(x) };
    match a {
        Agg::Sum => num(acc.sum),
        Agg::Min if acc.count > 0 => num(acc.min),
        Agg::Max if acc.count > 0 => num(acc.max),
        Agg::Avg if acc.count > 0 => Value::Float(acc.sum / acc.count as f64),
        _ => Value::Int(0),
    }
}

/// Renders rows as csv (`;` between fields, `,` in lists) or json.
struct Output {
    format: Format,
    buf: Vec<u8>,
    rows: usize,
}

impl Output {
    fn new(format: Format) -> Self {
        let buf = if format == Format::Csv { Vec::new() } else { b"[".to_vec() };
        Output { format, buf, rows: 0 }
    }

    fn row(&mut self, cells: impl Iterator<Item = Value>) {
        match self.format {
            Format::Csv => {
                for (i, c) in cells.enumerate() {
                    if i > 0 {
                        self.buf.push(b';');
                    }
                    self.buf.extend_from_slice(render_csv(&c).as_bytes());
                }
                self.buf.push(b'\n');
            }
            Format::Json | Format::Python3 => {
                if self.rows > 0 {
                    self.buf.extend_from_slice(b",\n");
                }
                self.buf.push(b'[');
                for (i, c) in cells.enumerate() {
                    if i > 0 {
                        self.buf.push(b',');
                    }
                    if self.format == Format::Json {
                        render_json(&c, &mut self.buf);
                    } else {
                        render_python3(&c, &mut self.buf);
                    }
                }
                self.buf.push(b']');
            }
        }
        self.rows += 1;
    }

    fn finish(mut self) -> Vec<u8> {
        if self.format != Format::Csv {
            self.buf.extend_from_slice(b"]\n");
        }
        self.buf
    }
}

fn render_csv(v: &Value) -> String {
    match v {
        Value::Int(n) => n.to_string(),
        Value::Float(x) => x.to_string(),
        Value::Str(s) => s.clone(),
        Value::List(l) => l.join(","),
        Value::Blob(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

fn render_python3(v: &Value, out: &mut Vec<u8>) {
    use livemux_protocol::python::{render_blob, render_str};
    match v {
        Value::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::Float(x) => out.extend_from_slice(x.to_string().as_bytes()),
        Value::Str(s) => render_str(s, out),
        Value::Blob(b) => render_blob(b, out),
        Value::List(l) => {
            out.push(b'[');
            for (i, s) in l.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                render_str(s, out);
            }
            out.push(b']');
        }
    }
}

fn render_json(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::Float(x) => out.extend_from_slice(x.to_string().as_bytes()),
        Value::Str(s) => json_str(s, out),
        // As Checkmk does: the bytes read as Latin-1.
        Value::Blob(b) => json_str(&b.iter().map(|&c| char::from(c)).collect::<String>(), out),
        Value::List(l) => {
            out.push(b'[');
            for (i, s) in l.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_str(s, out);
            }
            out.push(b']');
        }
    }
}

fn json_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            c if (c as u32) < 0x20 => out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes()),
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str) -> String {
        let ds = Dataset::new("s1", 100, 5);
        let st = StatusCounters { program_start: 42, ..Default::default() };
        let query = Query::from_text(text).unwrap();
        match run(&ds, &query, &st) {
            Ok(body) => String::from_utf8(body).unwrap(),
            Err(e) => format!("ERR {} {}", e.status, e.message),
        }
    }

    #[test]
    fn columns_filters_and_limit() {
        assert_eq!(q("GET hosts\nColumns: name state\nFilter: state = 1\nLimit: 2\n"), "host-0049;1\nhost-0099;1\n");
        assert_eq!(
            q("GET hosts\nColumns: name\nFilter: name = host-0001\nFilter: name = host-0002\nOr: 2\n"),
            "host-0001\nhost-0002\n"
        );
        assert_eq!(
            q("GET hosts\nColumns: name\nFilter: groups >= db\nLimit: 2\nOutputFormat: json\n"),
            "[[\"host-0001\"],\n[\"host-0005\"]]\n"
        );
        assert_eq!(q("GET status\nColumns: program_start num_hosts num_services\n"), "42;100;500\n");
    }

    #[test]
    fn stats_with_and_without_grouping() {
        // 500 services: states by index rules.
        let all = q("GET services\nStats: state = 0\nStats: state = 1\nStats: state = 2\nStats: state = 3\n");
        let n: Vec<i64> = all.trim().split(';').map(|x| x.parse().unwrap()).collect();
        assert_eq!(n.iter().sum::<i64>(), 500);
        assert_eq!(n[1], (0..500).filter(|g| g % 7 == 3).count() as i64);
        let grouped = q("GET hosts\nColumns: state\nStats: state >= 0\n");
        assert_eq!(grouped, "0;98\n1;2\n");
        assert_eq!(q("GET hosts\nStats: sum num_services\n"), "500\n");
    }

    #[test]
    fn errors_like_a_core() {
        assert_eq!(q("GET nosuch\n"), "ERR 404 Table 'nosuch' does not exist.");
        assert_eq!(q("GET hosts\nColumns: bogus\n"), "ERR 400 Table 'hosts' has no column 'bogus'");
        assert!(q("GET hosts\nOr: 3\n").starts_with("ERR 451"));
    }

    #[test]
    fn all_columns_with_header_row() {
        let out = q("GET hostgroups\n");
        assert!(out.starts_with("name;alias;members;num_hosts\nall;Group all;host-0000,"));
    }
}
