//! Federated sockets: `<socket_dir>/<name>` answers one Livestatus query
//! with every selected site's rows, merged ([`plan`] decides what each site
//! is asked and how the answers combine).
//!
//! A `GET` goes to the selected sites at once, through their pools like any
//! client's query (`send_query`: pipelining, retries, instant errors for
//! down sites). Each site's JSON answer is cut into rows as it arrives
//! ([`RowSplitter`]) and handed to the merger over a bounded queue: plain
//! rows are rendered as they come, `Stats` merged per group key, and `Sort`
//! collects the rows within `federation_sort_budget`. The rendered answer
//! goes through a spooled file (memory up to [`SPOOL_MEMORY`], then disk):
//! a `fixed16` header needs the length before the body, and memory stays
//! bounded whatever the union's size. A site that fails is named (in
//! `wrapped_json`'s `failed` and the log) and the others answer; with every
//! site failed (or `on_site_error = "fail"` and any) the client gets an
//! error. A `COMMAND` goes to every site of the federation.

pub mod plan;

use std::io::{Read, Seek, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use livemux_protocol::{Framer, Limits, ReplyStyle, ResponseHeader, Status, error_response};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::FederationConfig;
use crate::site::{SiteHandle, send_commands, send_query};
use plan::{Plan, Refused, Renderer, StatsMerge};

/// Rendered answer bytes kept in memory before they spill to a file.
pub const SPOOL_MEMORY: usize = 4 << 20;
/// Largest single row a site may send.
pub const MAX_ROW_BYTES: usize = 64 << 20;
/// Rows in flight between the sites' readers and the merger.
const QUEUE: usize = 256;
/// How long a client may stay idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// A request must arrive whole within this once it began.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A federation at run time.
pub struct Federation {
    /// Its configuration.
    pub cfg: FederationConfig,
    /// Its sites, in configuration order.
    pub sites: Vec<SiteHandle>,
    /// `federation_sort_budget`.
    pub sort_budget: usize,
    /// Where spilled answers go (the spool directory).
    pub spool_dir: std::path::PathBuf,
}

/// Cuts a JSON array of rows (`[[...],[...]]`) into rows as bytes arrive.
#[derive(Debug, Default)]
pub struct RowSplitter {
    started: bool,
    done: bool,
    depth: usize,
    in_string: bool,
    escape: bool,
    row: Vec<u8>,
}

impl RowSplitter {
    /// Feed bytes; complete rows go to `emit`.
    pub fn feed(&mut self, bytes: &[u8], mut emit: impl FnMut(Vec<Value>)) -> Result<(), String> {
        for &b in bytes {
            if self.done {
                if b.is_ascii_whitespace() {
                    continue;
                }
                return Err("data after the end of the answer".into());
            }
            if !self.started {
                match b {
                    b'[' => self.started = true,
                    b if b.is_ascii_whitespace() => {}
                    _ => return Err("the answer is not a JSON list".into()),
                }
                continue;
            }
            if self.depth == 0 {
                match b {
                    b'[' => {
                        self.depth = 1;
                        self.row.clear();
                        self.row.push(b);
                    }
                    b']' => self.done = true,
                    b',' => {}
                    b if b.is_ascii_whitespace() => {}
                    _ => return Err("a row is not a JSON list".into()),
                }
                continue;
            }
            self.row.push(b);
            if self.row.len() > MAX_ROW_BYTES {
                return Err(format!("a row is larger than {MAX_ROW_BYTES} bytes"));
            }
            if self.in_string {
                match (self.escape, b) {
                    (true, _) => self.escape = false,
                    (false, b'\\') => self.escape = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' => self.depth += 1,
                b']' | b'}' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let row: Vec<Value> =
                            serde_json::from_slice(&self.row).map_err(|e| format!("a row is not valid JSON: {e}"))?;
                        emit(row);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The answer ended: was it complete?
    pub fn finish(&self) -> Result<(), String> {
        if self.done || (!self.started && self.row.is_empty()) { Ok(()) } else { Err("the answer ends early".into()) }
    }
}

/// Accept clients on a federation's socket until `shutdown`.
pub async fn serve(listener: UnixListener, fed: Arc<Federation>, shutdown: CancellationToken, tracker: TaskTracker) {
    let mut n = 0u64;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((s, _)) => {
                n += 1;
                let span = tracing::info_span!(parent: None, "client", federation = %fed.cfg.name, peer = %format!("unix#{n}"));
                let (fed, stop) = (fed.clone(), shutdown.clone());
                tracker.spawn(tracing::Instrument::instrument(session(s, fed, stop), span));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn session(mut stream: UnixStream, fed: Arc<Federation>, shutdown: CancellationToken) {
    let mut buf = BytesMut::new();
    let mut framer = Framer::new();
    let limits = Limits::default();
    let mut eof = false;
    loop {
        let block = match framer.scan(&buf, &limits) {
            Ok(Some(f)) => {
                let b = buf.split_to(f.end).freeze();
                b.slice(f.start..)
            }
            Ok(None) if eof => match framer.finish(&buf) {
                Some(f) => {
                    let b = buf.split_to(f.end).freeze();
                    b.slice(f.start..)
                }
                None => return,
            },
            Ok(None) => {
                let skipped = framer.take_skipped();
                let _ = buf.split_to(skipped);
                let wait = if buf.is_empty() { IDLE_TIMEOUT } else { REQUEST_TIMEOUT };
                buf.reserve(16 * 1024);
                let read = tokio::select! {
                    r = tokio::time::timeout(wait, stream.read_buf(&mut buf)) => r,
                    _ = shutdown.cancelled(), if buf.is_empty() => return,
                };
                match read {
                    Ok(Ok(0)) => eof = true,
                    Ok(Ok(_)) => {}
                    _ => return,
                }
                continue;
            }
            Err(e) => {
                let style = framer.style();
                let _ = stream.write_all(&error_response(e.status(), &e.to_string(), style.fixed16)).await;
                return;
            }
        };
        let style = ReplyStyle::sniff(&block);
        let text = String::from_utf8_lossy(&block).into_owned();
        let ok = if text.starts_with("COMMAND ") {
            command(&fed, &block, style, &mut stream).await
        } else {
            get(&fed, &text, style, &mut stream).await
        };
        if !ok || !style.keepalive || eof {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Fan a `COMMAND` out to every site of the federation.
async fn command(fed: &Federation, block: &[u8], style: ReplyStyle, stream: &mut UnixStream) -> bool {
    let req = match livemux_protocol::Request::parse(block) {
        Ok(livemux_protocol::Request::Command(c)) => c,
        Ok(_) => return false,
        Err(e) => {
            return stream.write_all(&error_response(e.status(), &e.to_string(), style.fixed16)).await.is_ok();
        }
    };
    let mut wire = Vec::new();
    req.encode_for_site(&mut wire);
    let mut failed = Vec::new();
    let mut jobs = tokio::task::JoinSet::new();
    for site in fed.sites.clone() {
        let wire = wire.clone();
        jobs.spawn(async move {
            let deadline = Instant::now() + site.params().query_timeout;
            (site.name().to_owned(), send_commands(&site, &wire, deadline).await)
        });
    }
    while let Some(r) = jobs.join_next().await {
        if let Ok((site, Err(e))) = r {
            tracing::warn!(site = %site, error = %e, "federated COMMAND failed on a site");
            failed.push(format!("{site}: {e}"));
        }
    }
    if !style.fixed16 {
        return true;
    }
    let answer = if failed.is_empty() {
        ResponseHeader::new(Status::Ok, 0).encode().to_vec()
    } else {
        error_response(Status::SiteUnavailable, &format!("COMMAND failed on: {}", failed.join("; ")), true)
    };
    stream.write_all(&answer).await.is_ok()
}

/// One site's part of an answer.
enum Part {
    Row(usize, Vec<Value>),
    Done(usize, Result<(), String>),
}

/// Ask one site and hand its rows on.
async fn ask_site(i: usize, site: SiteHandle, wire: Arc<Vec<u8>>, tx: tokio::sync::mpsc::Sender<Part>) {
    let deadline = Instant::now() + site.params().query_timeout;
    let result = async {
        let resp = send_query(&site, &wire, true, deadline).await.map_err(|e| e.to_string())?;
        let status = resp.header.status;
        let mut remaining = resp.header.length.saturating_sub(resp.prefix.len() as u64);
        let mut lease = resp.lease;
        let mut splitter = RowSplitter::default();
        let mut rows = Vec::new();
        let mut error_text = Vec::new();
        let mut chunk = resp.prefix.to_vec();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if status == Status::Ok {
                splitter.feed(&chunk, |r| rows.push(r))?;
                for r in rows.drain(..) {
                    if tx.send(Part::Row(i, r)).await.is_err() {
                        return Ok(());
                    }
                }
            } else if error_text.len() < 4096 {
                error_text.extend_from_slice(&chunk);
            }
            if remaining == 0 {
                break;
            }
            let want = (remaining as usize).min(buf.len());
            let n = tokio::time::timeout_at(deadline, lease.read(&mut buf[..want]))
                .await
                .map_err(|_| "query_timeout passed".to_owned())?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the site closed the channel mid-answer".to_owned());
            }
            remaining -= n as u64;
            chunk = buf[..n].to_vec();
        }
        lease.release();
        if status != Status::Ok {
            let text = String::from_utf8_lossy(&error_text);
            return Err(format!("{} {}", status.code(), text.lines().next().unwrap_or_default().trim()));
        }
        splitter.finish()
    }
    .await;
    let _ = tx.send(Part::Done(i, result)).await;
}

/// A rendered answer, in memory up to [`SPOOL_MEMORY`], then in a file.
type Spooled = tempfile::SpooledTempFile;

/// Answer a federated `GET`; false if the client is gone.
async fn get(fed: &Federation, text: &str, style: ReplyStyle, stream: &mut UnixStream) -> bool {
    let plan = match plan::plan(text) {
        Ok(p) => p,
        Err(Refused { status, message }) => {
            tracing::info!(%message, "federated query refused");
            let status = Status::from_code(status);
            return stream.write_all(&error_response(status, &message, style.fixed16)).await.is_ok();
        }
    };
    let sites: Vec<SiteHandle> =
        fed.sites.iter().filter(|s| plan.sites.as_ref().is_none_or(|set| set.contains(s.name()))).cloned().collect();
    let (status, body) = match answer(fed, &plan, &sites).await {
        Ok(b) => b,
        Err((status, message)) => {
            return stream.write_all(&error_response(status, &message, style.fixed16)).await.is_ok();
        }
    };
    send_spooled(stream, status, body, style.fixed16).await
}

/// Merge the selected sites' answers into the client's rendered answer.
async fn answer(fed: &Federation, plan: &Plan, sites: &[SiteHandle]) -> Result<(Status, Spooled), (Status, String)> {
    let wire = {
        let mut w = Vec::new();
        match livemux_protocol::Query::from_text(&plan.site_query) {
            Ok(q) => q.encode_for_site(&mut w),
            Err(e) => return Err((e.status(), e.to_string())),
        }
        Arc::new(w)
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(QUEUE);
    let mut readers = tokio::task::JoinSet::new();
    for (i, site) in sites.iter().enumerate() {
        readers.spawn(ask_site(i, site.clone(), wire.clone(), tx.clone()));
    }
    drop(tx);
    let mut spooled = tempfile::spooled_tempfile_in(SPOOL_MEMORY, &fed.spool_dir);
    let header = plan.headers.then(|| plan.header_names(0));
    let mut head = Vec::new();
    let mut renderer = Renderer::start(plan, header.as_deref(), &mut head);
    write_spool(&mut spooled, &head)?;
    let mut failed: Vec<(String, String)> = Vec::new();
    let mut stats = StatsMerge::default();
    let mut sorted: Vec<Vec<Value>> = Vec::new();
    let mut sorted_bytes = 0usize;
    let (mut skipped, mut given, mut total) = (0usize, 0usize, 0usize);
    let mut pending = Vec::with_capacity(16 * 1024);
    while let Some(part) = rx.recv().await {
        match part {
            Part::Done(i, Err(why)) => {
                tracing::warn!(site = %sites[i].name(), reason = %why, "site left out of a federated answer");
                failed.push((sites[i].name().to_owned(), why));
            }
            Part::Done(_, Ok(())) => {}
            Part::Row(i, row) => {
                total += 1;
                if !plan.stats.is_empty() {
                    stats.add(plan, sites[i].name(), row);
                } else if !plan.sort.is_empty() {
                    let row = plan.client_row(sites[i].name(), row);
                    sorted_bytes += serde_json::to_string(&row).map_or(64, |s| s.len() + 64);
                    if sorted_bytes > fed.sort_budget {
                        readers.abort_all();
                        return Err((
                            Status::from_code(413),
                            format!(
                                "Sort needs more than federation_sort_budget ({} bytes) for the rows it orders; \
                                 add filters or a Limit, or raise the budget",
                                fed.sort_budget
                            ),
                        ));
                    }
                    sorted.push(row);
                } else if skipped < plan.offset {
                    skipped += 1;
                } else if plan.limit.is_none_or(|l| given < l) {
                    given += 1;
                    renderer.row(&plan.client_row(sites[i].name(), row), &mut pending);
                    if pending.len() >= 16 * 1024 {
                        write_spool(&mut spooled, &pending)?;
                        pending.clear();
                    }
                }
            }
        }
    }
    let mut rows = if !plan.stats.is_empty() {
        std::mem::take(&mut stats).rows(plan)
    } else {
        plan::sort(plan, &mut sorted);
        sorted
    };
    if plan.stats.is_empty() && !plan.sort.is_empty() {
        let end = plan.limit.map_or(rows.len(), |l| (plan.offset + l).min(rows.len()));
        rows = rows.drain(plan.offset.min(rows.len())..end).collect();
    }
    for row in &rows {
        renderer.row(row, &mut pending);
    }
    if plan.stats.is_empty() && plan.sort.is_empty() {
        total = total.max(given);
    } else {
        total = rows.len();
    }
    renderer.finish(&failed, total, &mut pending);
    write_spool(&mut spooled, &pending)?;
    failed.sort();
    let all_failed = !sites.is_empty() && failed.len() == sites.len();
    if sites.is_empty() {
        return Err((Status::from_code(404), "no site of this federation is selected".into()));
    }
    if all_failed || (fed.cfg.fail_on_site_error && !failed.is_empty()) {
        let list: Vec<String> = failed.iter().map(|(s, w)| format!("{s}: {w}")).collect();
        return Err((Status::SiteUnavailable, format!("federated query failed on {}", list.join("; "))));
    }
    Ok((Status::Ok, spooled))
}

fn write_spool(f: &mut Spooled, bytes: &[u8]) -> Result<(), (Status, String)> {
    f.write_all(bytes).map_err(|e| (Status::SiteUnavailable, format!("cannot hold the federated answer: {e}")))
}

/// Send a spooled answer (with its fixed16 header when asked).
async fn send_spooled(stream: &mut UnixStream, status: Status, mut body: Spooled, fixed16: bool) -> bool {
    let len = match body.seek(std::io::SeekFrom::End(0)) {
        Ok(n) => n,
        Err(_) => return false,
    };
    if body.rewind().is_err() {
        return false;
    }
    if fixed16 && stream.write_all(&ResponseHeader::new(status, len).encode()).await.is_err() {
        return false;
    }
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match body.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(_) => return false,
        };
        if stream.write_all(&chunk[..n]).await.is_err() {
            return false;
        }
    }
}
