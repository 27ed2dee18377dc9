//! One site's part of a federated answer: its request sent through the
//! site's pool (or answered from its cache), its answer cut into the
//! merger's batches as it arrives ([`Feed`]: parsed rows, rows to splice,
//! or reads for a sorted page), and, in LMD's dialect, the site asked again
//! without a column it lacks.

use std::collections::BTreeSet;
use std::sync::Arc;

use livemux_protocol::Status;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::plan::{Pass, Plan};
use super::rows::{CsvSplitter, RowSplitter};
use crate::deadline::Deadline;
use crate::site::{Asker, SiteHandle, send_query_with};

/// What a site's reader hands the merger.
pub(super) enum Part {
    /// Rows of site `.0`, parsed ([`Pass::Parse`]), and the bytes they
    /// came in.
    Rows(usize, Vec<Vec<Value>>, usize),
    /// Rows of site `.0` as it sent them, to splice ([`Pass::Json`],
    /// [`Pass::Csv`]; see [`plan::Renderer::spliced`]), and the end of each
    /// row in those bytes.
    Raw(usize, Vec<u8>, Vec<u32>),
    /// A read of site `.0`'s answer as it came, cut into rows by the
    /// merger ([`Pass::Top`]).
    Read(usize, Vec<u8>),
    /// Site `.0` answered whole, or why not.
    Done(usize, Result<(), String>),
}

/// A site's answer, cut into the merger's batches: one per read.
struct Feed {
    i: usize,
    pass: Pass,
    /// Where `""` goes in each row, for columns the site lacks (ascending).
    missing: Box<[usize]>,
    json: RowSplitter,
    csv: CsvSplitter,
    tx: tokio::sync::mpsc::Sender<Part>,
    /// The federated client, for the sites' fair share.
    client: u64,
}

impl Feed {
    fn new(i: usize, pass: Pass, tx: tokio::sync::mpsc::Sender<Part>, missing: Box<[usize]>, client: u64) -> Self {
        Feed { i, pass, json: RowSplitter::default(), csv: CsvSplitter::default(), tx, missing, client }
    }

    /// The rows complete in `bytes` go to the merger; false when it is
    /// gone (the client or the query ended).
    async fn chunk(&mut self, bytes: &[u8]) -> Result<bool, String> {
        let part = match self.pass {
            Pass::Parse => {
                let (mut rows, mut raw_len) = (Vec::new(), 0);
                let missing = &self.missing;
                self.json.feed_raw(bytes, |raw| {
                    raw_len += raw.len();
                    let mut row: Vec<Value> =
                        serde_json::from_slice(raw).map_err(|e| format!("a row is not valid JSON: {e}"))?;
                    for &at in missing {
                        row.insert(at.min(row.len()), Value::from(""));
                    }
                    rows.push(row);
                    Ok(())
                })?;
                if rows.is_empty() {
                    return Ok(true);
                }
                Part::Rows(self.i, rows, raw_len)
            }
            Pass::Top => Part::Read(self.i, bytes.to_vec()),
            Pass::Json => {
                let (mut out, mut ends) = (Vec::with_capacity(bytes.len() + 256), Vec::new());
                self.json.feed_raw(bytes, |row| {
                    out.extend_from_slice(b",\n");
                    out.extend_from_slice(row);
                    ends.push(out.len() as u32);
                    Ok(())
                })?;
                if ends.is_empty() {
                    return Ok(true);
                }
                Part::Raw(self.i, out, ends)
            }
            Pass::Csv => {
                let mut got = None;
                let mut ends = Vec::new();
                self.csv.feed(bytes, &mut ends, |rows, e| got = Some((rows.to_vec(), e.to_vec())))?;
                let Some((rows, ends)) = got else { return Ok(true) };
                Part::Raw(self.i, rows, ends)
            }
        };
        Ok(self.tx.send(part).await.is_ok())
    }

    /// The answer ended: was it whole?
    async fn end(&mut self) -> Result<bool, String> {
        match self.pass {
            Pass::Csv => {}
            // The merger cuts the rows, and checks the end.
            Pass::Top => return Ok(true),
            Pass::Parse | Pass::Json => return self.json.finish().map(|()| true),
        }
        let mut got = None;
        self.csv.finish(|rows, e| got = Some((rows.to_vec(), e.to_vec())));
        match got {
            Some((rows, ends)) => Ok(self.tx.send(Part::Raw(self.i, rows, ends)).await.is_ok()),
            None => Ok(true),
        }
    }
}

/// What a federation in LMD's dialect needs to ask a site again without a
/// column it lacks.
pub struct Lmd {
    /// The query.
    pub(super) plan: Plan,
    /// The federation's knowledge of the columns sites lack.
    pub(super) lacking: Arc<Lacking>,
}

/// The columns each site lacks, per table (learnt from their errors, in
/// LMD's dialect), until the site's core restarts.
#[derive(Default)]
pub struct Lacking(std::sync::Mutex<std::collections::HashMap<SiteTable, Lacked>>);

/// A site's name and a table's.
type SiteTable = (String, String);

/// The core's `program_start` when learnt, and the columns it lacks.
type Lacked = (Option<i64>, BTreeSet<String>);

impl Lacking {
    /// The columns of `table` that `site` lacks.
    pub(super) fn of(&self, site: &SiteHandle, table: &str) -> BTreeSet<String> {
        let start = site.status().program_start;
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&(site.name().to_owned(), table.to_owned())) {
            Some((at, cols)) if *at == start => cols.clone(),
            _ => BTreeSet::new(),
        }
    }

    /// `site` lacks `column` of `table`; the columns it lacks now.
    fn learn(&self, site: &SiteHandle, table: &str, column: &str) -> BTreeSet<String> {
        let start = site.status().program_start;
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry((site.name().to_owned(), table.to_owned())).or_default();
        if entry.0 != start {
            *entry = (start, BTreeSet::new());
        }
        entry.1.insert(column.to_owned());
        entry.1.clone()
    }
}

/// The column a core's error says a table lacks: Icinga 2's `Column 'x'
/// does not exist in table 'hosts'.`, mk-livestatus' `Table 'hosts' has no
/// column 'x'` (Naemon answers `""` itself).
fn lacked_column(error: &str) -> Option<&str> {
    if let Some(at) = error.find("Column '") {
        let (column, rest) = error[at + "Column '".len()..].split_once('\'')?;
        return rest.starts_with(" does not exist in table").then_some(column);
    }
    let at = error.find("' has no column '")?;
    error[at + "' has no column '".len()..].split_once('\'').map(|(column, _)| column)
}

/// What one site is asked: the request, and where the columns it lacks go
/// in its rows (LMD's dialect).
pub(super) struct SiteRequest {
    pub(super) wire: Arc<Vec<u8>>,
    pub(super) missing: Vec<usize>,
}

/// Ask one site and hand its rows on. With `Cache: reload` (and the
/// site's `cache` on) or the site's `coalesce`, the answer may come from the
/// cache or an identical query in flight, and is shared as a site socket's
/// would be.
#[allow(clippy::too_many_arguments)]
pub(super) async fn ask_site(
    i: usize,
    site: SiteHandle,
    wire: Arc<Vec<u8>>,
    tx: tokio::sync::mpsc::Sender<Part>,
    cache: Arc<crate::cache::Cache>,
    cache_reload: bool,
    pass: Pass,
    client: u64,
) {
    let deadline = Instant::now() + site.params().query_timeout;
    let mut feed = Feed::new(i, pass, tx.clone(), Box::default(), client);
    let result = attempt(&site, &wire, &mut feed, &cache, cache_reload, deadline).await;
    let _ = tx.send(Part::Done(i, result)).await;
}

/// [`ask_site`] in LMD's dialect: a site that lacks a column asked is
/// asked again without it (each such column once), and its rows get `""`
/// there.
#[allow(clippy::too_many_arguments)]
pub(super) async fn ask_site_lmd(
    i: usize,
    site: SiteHandle,
    req: SiteRequest,
    tx: tokio::sync::mpsc::Sender<Part>,
    cache: Arc<crate::cache::Cache>,
    cache_reload: bool,
    pass: Pass,
    lmd: Arc<Lmd>,
    client: u64,
) {
    let deadline = Instant::now() + site.params().query_timeout;
    let result = lacking_columns(i, &site, req, &tx, &cache, cache_reload, pass, &lmd, deadline, client).await;
    let _ = tx.send(Part::Done(i, result)).await;
}

/// The requests of [`ask_site_lmd`].
#[allow(clippy::too_many_arguments)]
async fn lacking_columns(
    i: usize,
    site: &SiteHandle,
    mut req: SiteRequest,
    tx: &tokio::sync::mpsc::Sender<Part>,
    cache: &Arc<crate::cache::Cache>,
    cache_reload: bool,
    pass: Pass,
    lmd: &Lmd,
    deadline: Instant,
    client: u64,
) -> Result<(), String> {
    loop {
        // Rows with columns put in are parsed (and asked as JSON).
        let pass = if req.missing.is_empty() { pass } else { Pass::Parse };
        let mut feed = Feed::new(i, pass, tx.clone(), std::mem::take(&mut req.missing).into_boxed_slice(), client);
        let result = attempt(site, &req.wire, &mut feed, cache, cache_reload, deadline).await;
        let again = match &result {
            Err(why) => lacked_column(why).filter(|c| lmd.plan.asks(c)).and_then(|c| {
                if lmd.lacking.of(site, &lmd.plan.table).contains(c) {
                    return None;
                }
                let now = lmd.lacking.learn(site, &lmd.plan.table, c);
                tracing::info!(site = %site.name(), table = %lmd.plan.table, column = c,
                    "the site lacks a column: answered as \"\" from it (LMD's dialect)");
                lmd.plan.query_without(site.name(), &now)
            }),
            Ok(()) => None,
        };
        let Some((text, missing)) = again else { return result };
        let Ok(q) = livemux_protocol::Query::from_text(&text) else { return result };
        let mut w = Vec::new();
        q.encode_for_site(&mut w);
        req = SiteRequest { wire: Arc::new(w), missing };
    }
}

/// One request to a site, its answer handed to `feed`.
async fn attempt(
    site: &SiteHandle,
    wire: &Arc<Vec<u8>>,
    feed: &mut Feed,
    cache: &Arc<crate::cache::Cache>,
    cache_reload: bool,
    deadline: Instant,
) -> Result<(), String> {
    let params = site.params();
    let cacheable = params.cache && cache_reload;
    let mut capture = None;
    if cacheable || params.coalesce {
        let status = site.status();
        let tag = crate::cache::Tag { generation: status.generation, program_start: status.program_start };
        let key = crate::cache::Key::new(site.name(), wire);
        match cache.plan(key, tag, params.cache_max_age, cacheable, deadline).await {
            crate::cache::Plan::Hit(entry) => {
                if entry.status != Status::Ok {
                    let text = String::from_utf8_lossy(&entry.body);
                    return Err(format!("{} {}", entry.status.code(), text.lines().next().unwrap_or_default()));
                }
                for piece in entry.body.chunks(64 * 1024) {
                    if !feed.chunk(piece).await? {
                        return Ok(());
                    }
                }
                return feed.end().await.map(|_| ());
            }
            crate::cache::Plan::Lead(c) => capture = Some(c),
            crate::cache::Plan::Alone => {}
            crate::cache::Plan::TimedOut => return Err(site.timeout_error().to_string()),
        }
    }
    let asker = Asker { unix: None, key: feed.client };
    let resp = send_query_with(site, wire, true, &mut Deadline::new(deadline), &site.params(), &asker)
        .await
        .map_err(|e| e.to_string())?;
    let mut capture = capture.filter(|c| c.accepts(resp.header.length));
    let raw_header = resp.raw_header;
    let status = resp.header.status;
    let mut remaining = resp.header.length.saturating_sub(resp.prefix().len() as u64);
    // The part that came with the header first; only an answer that
    // did not come whole with it needs more reads.
    let mut buf = resp.prefix().to_vec();
    let mut lease = resp.lease;
    let mut error_text = Vec::new();
    let mut n = buf.len();
    loop {
        let chunk = &buf[..n];
        if let Some(c) = capture.as_mut()
            && !chunk.is_empty()
        {
            c.push(&bytes::Bytes::copy_from_slice(chunk));
        }
        if status == Status::Ok {
            if !feed.chunk(chunk).await? {
                return Ok(());
            }
        } else if error_text.len() < 4096 {
            error_text.extend_from_slice(chunk);
        }
        if remaining == 0 {
            break;
        }
        if buf.len() < 64 * 1024 {
            buf.resize(64 * 1024, 0);
        }
        let want = (remaining as usize).min(buf.len());
        n = tokio::time::timeout_at(deadline, lease.read(&mut buf[..want]))
            .await
            .map_err(|_| "query_timeout passed".to_owned())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the site closed the channel mid-answer".to_owned());
        }
        remaining -= n as u64;
    }
    lease.release();
    if let Some(c) = capture {
        c.finish(raw_header, status);
    }
    if status != Status::Ok {
        let text = String::from_utf8_lossy(&error_text);
        return Err(format!("{} {}", status.code(), text.lines().next().unwrap_or_default().trim()));
    }
    feed.end().await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::lacked_column;

    #[test]
    fn the_column_a_core_lacks_is_read_from_its_error() {
        let icinga = "452 Error: Column 'depends_exec' does not exist in table 'services'.";
        assert_eq!(lacked_column(icinga), Some("depends_exec"));
        assert_eq!(lacked_column("400 Table 'hosts' has no column 'thruk_x'"), Some("thruk_x"));
        assert_eq!(lacked_column("452 Error: Unknown operator for column 'name': <>"), None);
        assert_eq!(lacked_column("404 Table 'x' does not exist."), None);
        assert_eq!(lacked_column("452 Error: Column 'x"), None);
    }
}
