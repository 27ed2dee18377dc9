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

mod ask;
pub mod merge;
pub mod plan;
pub mod rows;
pub mod sites;

use std::io::{Read, Seek, Write};
use std::sync::Arc;
use std::time::Duration;

use crate::client::peer::{Peer, may_command};
use crate::client::reader::{ReadError, ReadTimeouts, RequestBudget, RequestReader};
use livemux_protocol::{FIXED16_LEN, ReplyStyle, ResponseHeader, Status, error_response};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Dialect, FederationConfig};
use crate::site::{SiteHandle, send_commands};
pub use ask::Lacking;
use ask::{Lmd, Part, SiteRequest, ask_site, ask_site_lmd};
use merge::{Merger, TopError};
use plan::{Plan, Refused};
pub use rows::{MAX_ROW_BYTES, RowSplitter};

/// Rendered answer bytes kept in memory before they spill to a file.
pub const SPOOL_MEMORY: usize = 4 << 20;
/// Batches of rows (each from one read of a site's answer) in flight
/// between the sites' readers and the merger.
const QUEUE: usize = 32;

/// How long an error answer to a refused request may take to write.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// A federation at run time.
pub struct Federation {
    /// Its name (its socket's); a reload never changes it.
    pub name: String,
    /// Its configuration and sites, replaced whole by a reload.
    setup: std::sync::RwLock<Arc<Setup>>,
    /// `federation_sort_budget`.
    pub sort_budget: usize,
    /// Where spilled answers go (the spool directory).
    pub spool_dir: std::path::PathBuf,
    /// Counters and the last sites left out, for the state file.
    pub status: std::sync::Mutex<FederationSnapshot>,
    /// The daemon's query cache (per site, as for the sites' sockets).
    pub cache: Arc<crate::cache::Cache>,
    /// The daemon's budget for requests being received.
    pub requests: Arc<RequestBudget>,
    /// The columns its sites lack (LMD's dialect).
    pub lacking: Arc<Lacking>,
}

/// A federation in the state file.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FederationSnapshot {
    /// Its name.
    pub name: String,
    /// Its sites.
    pub sites: Vec<String>,
    /// `GET`s answered (also partly) since start.
    pub queries: u64,
    /// Of those, answers without some site's rows.
    pub partial_answers: u64,
    /// `GET`s that got an error answer.
    pub failed: u64,
    /// The last answer without some site's rows: when, and which sites why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_partial: Option<LastPartial>,
}

/// The last partial answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastPartial {
    /// When (RFC 3339).
    pub at: String,
    /// Site → why it was left out.
    pub sites: std::collections::BTreeMap<String, String>,
}

/// What a federation is now: what each query and session starts with.
pub struct Setup {
    /// Its configuration.
    pub cfg: FederationConfig,
    /// Its sites, in configuration order.
    pub sites: Vec<SiteHandle>,
}

impl Federation {
    /// A federation over `sites`.
    pub fn new(
        cfg: FederationConfig,
        sites: Vec<SiteHandle>,
        sort_budget: usize,
        spool_dir: std::path::PathBuf,
        shared: &crate::client::Shared,
    ) -> Self {
        let status = FederationSnapshot { name: cfg.name.clone(), sites: cfg.sites.clone(), ..Default::default() };
        Federation {
            name: cfg.name.clone(),
            setup: std::sync::RwLock::new(Arc::new(Setup { cfg, sites })),
            sort_budget,
            spool_dir,
            status: std::sync::Mutex::new(status),
            cache: shared.cache.clone(),
            requests: shared.requests.clone(),
            lacking: Arc::default(),
        }
    }

    /// Its configuration and sites now.
    pub fn setup(&self) -> Arc<Setup> {
        self.setup.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A reload's configuration and sites (a site removed and added again
    /// has a new handle): queries from now on use them; those in progress
    /// finish with what they started with.
    pub fn replace(&self, cfg: FederationConfig, sites: Vec<SiteHandle>) {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).sites = cfg.sites.clone();
        *self.setup.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Setup { cfg, sites });
    }

    /// The state file's entry.
    pub fn snapshot(&self) -> FederationSnapshot {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn note(&self, result: &Result<(), Failure>) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => s.queries += 1,
            Err(Failure::Answer(..)) => s.failed += 1,
            Err(Failure::ClientGone) => {}
        }
    }

    fn note_failed(&self, failed: &[(String, String)]) {
        if failed.is_empty() {
            return;
        }
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.partial_answers += 1;
        s.last_partial = Some(LastPartial {
            at: crate::site::timestamp(std::time::SystemTime::now()),
            sites: failed.iter().cloned().collect(),
        });
    }
}

/// A client connection (UNIX, TCP, TLS over TCP).
pub trait Client: crate::client::session::ClientStream {}
impl<T: crate::client::session::ClientStream> Client for T {}

/// A federation's TCP listener's settings (`listen`, with `only_from`, and
/// its TLS), which a reload may replace while the listener stays bound.
pub type TcpSettings = Arc<std::sync::RwLock<(crate::config::TcpListen, Option<tokio_rustls::TlsAcceptor>)>>;

/// Accept clients on a federation's cascading TCP listener (`listen`,
/// `only_from`, `tls`) until `shutdown`.
pub async fn serve_tcp(
    listener: TcpListener,
    settings: TcpSettings,
    fed: Arc<Federation>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, p)) => (s, std::net::SocketAddr::new(p.ip().to_canonical(), p.port())),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let (allowed, tls) = {
            let current = settings.read().unwrap_or_else(|e| e.into_inner());
            (current.0.allows(peer.ip()), current.1.clone())
        };
        if !allowed {
            crate::events::ClientRefused { peer }.emit();
            continue;
        }
        // `cert`: the subject of a verified client certificate (`tls_client_ca`).
        let span = tracing::info_span!(parent: None, "client", federation = %fed.name, peer = %peer,
            cert = tracing::field::Empty);
        let (fed, stop) = (fed.clone(), shutdown.clone());
        match tls {
            None => {
                let client = Peer::Tcp(peer);
                tracker.spawn(tracing::Instrument::instrument(session(stream, fed, stop, client), span));
            }
            Some(acceptor) => {
                let after = Duration::from_secs(10);
                tracker.spawn(tracing::Instrument::instrument(
                    async move {
                        match tokio::time::timeout(after, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => {
                                if let Some(subject) = crate::tls::client_subject(s.get_ref().1) {
                                    tracing::Span::current().record("cert", tracing::field::display(&subject));
                                }
                                session(s, fed, stop, Peer::Tcp(peer)).await
                            }
                            Ok(Err(e)) => crate::tls::client_handshake_failed(peer, &e),
                            Err(_) => tracing::info!("TLS handshake with client {peer} did not finish in time"),
                        }
                    },
                    span,
                ));
            }
        }
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
                let peer = Peer::of_unix(&s, n);
                let span = tracing::info_span!(parent: None, "client", federation = %fed.name, peer = %peer);
                let (fed, stop) = (fed.clone(), shutdown.clone());
                tracker.spawn(tracing::Instrument::instrument(session(s, fed, stop, peer), span));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn session<S: Client>(stream: S, fed: Arc<Federation>, shutdown: CancellationToken, peer: Peer) {
    // Counts the bytes of each answer, for the slow-query log.
    let mut stream = Counted { inner: stream, sent: 0 };
    let mut reader = RequestReader::new(fed.requests.clone());
    // As on a site's socket: `[defaults]`' request limits and client timeouts.
    let client = fed.setup().cfg.client.clone();
    let limits = client.limits;
    let timeouts = ReadTimeouts { idle: client.client_idle_timeout, request: client.client_request_timeout };
    let mut timer = None;
    loop {
        let block = match reader.next(&mut stream, &limits, timeouts, &shutdown, &mut timer).await {
            Ok(Some(at)) => bytes::Bytes::copy_from_slice(reader.request(at)),
            Ok(None) => return,
            Err(ReadError::Io(e)) => {
                tracing::debug!(error = %e, "client read failed");
                return;
            }
            Err(ReadError::Refused(e)) => {
                crate::events::RequestRejected { status: e.status(), error: &e }.emit();
                let style = reader.style();
                let answer = error_response(e.status(), &e.to_string(), style.fixed16);
                let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, stream.write_all(&answer)).await;
                return;
            }
        };
        let style = ReplyStyle::sniff(&block);
        let text = String::from_utf8_lossy(&block).into_owned();
        // COMMAND blocks may follow one another on one connection (as on a
        // core, and as LMD takes them from Thruk): a COMMAND does not end it.
        let is_command = text.starts_with("COMMAND ");
        let ok = if is_command {
            command(&fed, &block, style, &mut stream, &peer).await
        } else {
            let (started, sent) = (Instant::now(), stream.sent);
            let ok = get(&fed, &text, style, &mut stream, peer.share_key()).await;
            let took = started.elapsed();
            let client = &fed.setup().cfg.client;
            if client.slow_query_threshold.is_some_and(|t| took > t) {
                let (first_line, headers) = crate::events::describe_request(&block, client.slow_query_log_values);
                let site = format!("federation {}", fed.name);
                let bytes = stream.sent - sent;
                let (first_line, headers) = (first_line.as_str(), headers.as_str());
                crate::events::SlowQuery { site: &site, took, bytes, client: &peer, first_line, headers }.emit();
            }
            ok
        };
        if !ok || !(style.keepalive || is_command) || reader.at_eof() {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// A client's stream that counts the bytes written to it.
struct Counted<S> {
    inner: S,
    sent: u64,
}

impl<S: Client> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: Client> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.sent += n as u64;
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.sent += n as u64;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Client> crate::client::session::ClientStream for Counted<S> {
    const SHUTDOWN_BEFORE_CLOSE: bool = S::SHUTDOWN_BEFORE_CLOSE;

    fn poll_sent(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.inner.poll_sent(cx)
    }
}

/// Fan a `COMMAND` out to every site of the federation (if this client
/// may send commands here: see [`may_command`]); each command is audited.
async fn command<S: Client>(fed: &Federation, block: &[u8], style: ReplyStyle, stream: &mut S, peer: &Peer) -> bool {
    let req = match livemux_protocol::Request::parse(block) {
        Ok(livemux_protocol::Request::Command(c)) => c,
        Ok(_) => return false,
        Err(e) => {
            return stream.write_all(&error_response(e.status(), &e.to_string(), style.fixed16)).await.is_ok();
        }
    };
    let policy = &fed.setup().cfg.client;
    let audit = |sites: &str, outcome: &str| {
        for line in &req.commands {
            let line = line.strip_prefix(b"COMMAND ").unwrap_or(line);
            let arguments = policy.audit_command_arguments;
            crate::events::CommandAudit { sites, client: peer, line, arguments, outcome }.emit();
        }
    };
    if let Err(why) = may_command(&policy.commands, peer) {
        audit(&format!("federation {}", fed.name), &format!("refused: {why}"));
        let answer = error_response(Status::Forbidden, &format!("COMMAND refused: {why}"), style.fixed16);
        let _ = stream.write_all(&answer).await;
        return false;
    }
    let mut wire = Vec::new();
    req.encode_for_site(&mut wire);
    let mut failed = Vec::new();
    // LMD's `Backends:` on a COMMAND block (Thruk sends one after each
    // command): only those sites get it; a name the federation lacks fails.
    let text = String::from_utf8_lossy(block);
    let backends: Option<Vec<&str>> = text
        .lines()
        .find_map(|l| l.strip_prefix("Backends:"))
        .map(|v| v.split_whitespace().collect::<Vec<_>>())
        .filter(|v| !v.is_empty());
    let setup = fed.setup();
    let mut targets = Vec::with_capacity(setup.sites.len());
    for site in &setup.sites {
        if backends.as_ref().is_none_or(|b| b.contains(&site.name())) {
            targets.push(site.clone());
        }
    }
    for n in backends.iter().flatten().filter(|n| !setup.sites.iter().any(|s| s.name() == **n)) {
        failed.push(format!("{n}: bad request: backend {n} does not exist"));
    }
    let names: Vec<&str> = targets.iter().map(|s| s.name()).collect();
    audit(&names.join(","), "forwarded");
    let mut jobs = tokio::task::JoinSet::new();
    let key = peer.share_key();
    for site in targets {
        let wire = wire.clone();
        jobs.spawn(async move {
            let deadline = Instant::now() + site.params().query_timeout;
            let asker = crate::site::Asker { unix: None, key };
            (site.name().to_owned(), send_commands(&site, &wire, deadline, &asker).await)
        });
    }
    while let Some(r) = jobs.join_next().await {
        if let Ok((site, Err(e))) = r {
            tracing::warn!(site = %site, error = %e, "federated COMMAND failed on a site");
            failed.push(format!("{site}: {e}"));
        }
    }
    if !style.fixed16 {
        // Silence is success (as a core answers a COMMAND); a client that
        // chose sites (LMD's way, Thruk) gets a failure as one `502: ...`
        // line, which is what it reads.
        if backends.is_some() && !failed.is_empty() {
            let line = format!("502: COMMAND failed on: {}\n", failed.join("; "));
            return stream.write_all(line.as_bytes()).await.is_ok();
        }
        return true;
    }
    let answer = if failed.is_empty() {
        ResponseHeader::new(Status::Ok, 0).encode().to_vec()
    } else {
        error_response(Status::SiteUnavailable, &format!("COMMAND failed on: {}", failed.join("; ")), true)
    };
    stream.write_all(&answer).await.is_ok()
}

/// A rendered answer, in memory up to [`SPOOL_MEMORY`], then in a file.
type Spooled = tempfile::SpooledTempFile;

/// Answer a federated `GET` for `client` (its number for the sites' fair
/// share); false if the client is gone.
async fn get<S: Client>(fed: &Federation, text: &str, style: ReplyStyle, stream: &mut S, client: u64) -> bool {
    let plan = match plan::plan(text) {
        Ok(p) => p,
        Err(Refused { status, message }) => {
            tracing::info!(%message, "federated query refused");
            let status = Status::from_code(status);
            // In LMD's words: Thruk shows a "bad request:" as it is, and
            // takes any other error for a daemon in trouble (and retries).
            let message = format!("bad request: {message}");
            return stream.write_all(&error_response(status, &message, style.fixed16)).await.is_ok();
        }
    };
    let setup = fed.setup();
    let sites: Vec<SiteHandle> =
        setup.sites.iter().filter(|s| plan.sites.as_ref().is_none_or(|set| set.contains(s.name()))).cloned().collect();
    // `Backends:` naming a site the federation lacks: reported as LMD does.
    let unknown: Vec<(String, String)> = plan
        .sites
        .iter()
        .flatten()
        .filter(|n| !setup.sites.iter().any(|s| s.name() == n.as_str()))
        .map(|n| (n.clone(), format!("bad request: backend {n} does not exist")))
        .collect();
    if sites::is_sites(&plan.table) {
        return sites_table(&plan, &sites, unknown, style, stream).await;
    }
    // Plain rows without fixed16 go to the client as the sites answer; the
    // rest needs the whole answer (its length, or all rows) first.
    let streaming = !style.fixed16 && plan.stats.is_empty() && plan.sort.is_empty();
    let mut sink = if streaming {
        Sink::Stream { stream, flushed: false }
    } else {
        Sink::Spool(tempfile::spooled_tempfile_in(SPOOL_MEMORY, &fed.spool_dir))
    };
    let result = answer(fed, &setup.cfg, &plan, &sites, unknown, &mut sink, client).await;
    fed.note(&result);
    match (result, sink) {
        (Ok(()), Sink::Spool(body)) => send_spooled(stream, Status::Ok, body, style.fixed16).await,
        (Ok(()), Sink::Stream { .. }) => true,
        (Err(Failure::ClientGone), _) => false,
        (Err(Failure::Answer(status, message)), Sink::Stream { flushed: true, .. }) => {
            tracing::warn!(%message, ?status, "federated answer cut after it began");
            false
        }
        (Err(Failure::Answer(status, message)), _) => {
            stream.write_all(&error_response(status, &message, style.fixed16)).await.is_ok()
        }
    }
}

/// Where a federated answer goes.
enum Sink<'a, S> {
    /// Held until complete (fixed16, Stats, Sort).
    Spool(Spooled),
    /// Straight to the client; `flushed` once a byte went out.
    Stream { stream: &'a mut S, flushed: bool },
}

/// Why a federated answer failed.
enum Failure {
    /// The client is gone.
    ClientGone,
    /// An error answer.
    Answer(Status, String),
}

impl From<(Status, String)> for Failure {
    fn from((s, m): (Status, String)) -> Self {
        Failure::Answer(s, m)
    }
}

impl<S: Client> Sink<'_, S> {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        match self {
            Sink::Spool(f) => write_spool(f, bytes).map_err(Failure::from),
            Sink::Stream { stream, flushed } => {
                *flushed = true;
                stream.write_all(bytes).await.map_err(|_| Failure::ClientGone)
            }
        }
    }
}

/// Merge the selected sites' answers into the client's rendered answer.
async fn answer<S: Client>(
    fed: &Federation,
    cfg: &FederationConfig,
    plan: &Plan,
    sites: &[SiteHandle],
    unknown: Vec<(String, String)>,
    sink: &mut Sink<'_, S>,
    client: u64,
) -> Result<(), Failure> {
    if sites.is_empty() && unknown.is_empty() {
        return Err(Failure::Answer(Status::NotFound, "no site of this federation is selected".into()));
    }
    // Each site's request: the same for all unless a filter tests the site
    // column; a site whose filter is false is not asked.
    let encode = |text: &str| -> Result<Arc<Vec<u8>>, Failure> {
        let mut w = Vec::new();
        match livemux_protocol::Query::from_text(text) {
            Ok(q) => q.encode_for_site(&mut w),
            Err(e) => return Err(Failure::Answer(e.status(), e.to_string())),
        }
        Ok(Arc::new(w))
    };
    let mut asked: Vec<(&SiteHandle, Arc<Vec<u8>>)> = Vec::with_capacity(sites.len());
    if plan.per_site() {
        let mut wires: Vec<(String, Arc<Vec<u8>>)> = Vec::new();
        for site in sites {
            let Some(text) = plan.query_for(site.name()) else { continue };
            let wire = match wires.iter().find(|(t, _)| *t == text) {
                Some((_, w)) => w.clone(),
                None => {
                    let w = encode(&text)?;
                    wires.push((text, w.clone()));
                    w
                }
            };
            asked.push((site, wire));
        }
    } else if let Some(text) = sites.first().and_then(|s| plan.query_for(s.name())) {
        let wire = encode(&text)?;
        asked.extend(sites.iter().map(|s| (s, wire.clone())));
    }
    // LMD's dialect: a site is asked without the columns it is known to
    // lack, and again without one it turns out to lack.
    let lmd = (cfg.dialect == Dialect::Lmd).then(|| Arc::new(Lmd { plan: plan.clone(), lacking: fed.lacking.clone() }));
    let (tx, mut rx) = tokio::sync::mpsc::channel(QUEUE);
    let mut readers = tokio::task::JoinSet::new();
    for (i, (site, wire)) in asked.iter().enumerate() {
        let (site, wire, tx) = ((*site).clone(), wire.clone(), tx.clone());
        let (cache, reload, pass) = (fed.cache.clone(), plan.cache_reload, plan.pass);
        let Some(lmd) = &lmd else {
            readers.spawn(ask_site(i, site, wire, tx, cache, reload, pass, client));
            continue;
        };
        let mut req = SiteRequest { wire, missing: Vec::new() };
        let lacks = lmd.lacking.of(&site, &plan.table);
        if !lacks.is_empty()
            && let Some((text, missing)) = plan.query_without(site.name(), &lacks)
        {
            req = SiteRequest { wire: encode(&text)?, missing };
        }
        readers.spawn(ask_site_lmd(i, site, req, tx, cache, reload, pass, lmd.clone(), client));
    }
    drop(tx);
    let name = |i: usize| asked[i].0.name();
    // What the computed and LMD-only columns need of the site (only when
    // asked for: an address is a string made per call).
    let addrs: Vec<String> =
        if plan.lmd.is_empty() { Vec::new() } else { asked.iter().map(|(s, _)| s.address()).collect() };
    let row_site = |i: usize| plan::RowSite {
        name: asked[i].0.name(),
        addr: addrs.get(i).map_or("", String::as_str),
        program_start: if plan.computed.is_empty() { None } else { asked[i].0.status().program_start },
    };
    let mut pending = Vec::with_capacity(16 * 1024);
    let mut merger = Merger::start(plan, fed.sort_budget, &mut pending);
    let unknown_sites = unknown.len();
    let mut failed: Vec<(String, String)> = unknown;
    // Sites whose rows the merger found bad (already in `failed`).
    let mut bad: Vec<usize> = Vec::new();
    while let Some(part) = rx.recv().await {
        match part {
            Part::Done(i, Err(why)) if !bad.contains(&i) => {
                tracing::warn!(site = %name(i), reason = %why, "site left out of a federated answer");
                failed.push((name(i).to_owned(), why));
            }
            Part::Done(i, Ok(())) if !bad.contains(&i) => {
                if let Err(why) = merger.top_end(i) {
                    tracing::warn!(site = %name(i), reason = %why, "site left out of a federated answer");
                    failed.push((name(i).to_owned(), why));
                }
            }
            Part::Done(..) => {}
            // The rest of a site that failed is not taken.
            Part::Raw(i, ..) | Part::Rows(i, ..) | Part::Read(i, _) if bad.contains(&i) => {}
            Part::Read(i, bytes) => match merger.top(i, row_site(i), &bytes) {
                Ok(()) => {}
                Err(TopError::OverBudget) => {
                    readers.abort_all();
                    return Err(over_budget(fed.sort_budget));
                }
                Err(TopError::Site(why)) => {
                    tracing::warn!(site = %name(i), reason = %why, "site left out of a federated answer");
                    failed.push((name(i).to_owned(), why));
                    bad.push(i);
                }
            },
            Part::Raw(_, bytes, ends) => merger.raw(&bytes, &ends, &mut pending),
            Part::Rows(i, rows, raw_len) => {
                if merger.rows(row_site(i), rows, raw_len, &mut pending).is_err() {
                    readers.abort_all();
                    return Err(over_budget(fed.sort_budget));
                }
            }
        }
        if pending.len() >= 16 * 1024 {
            sink.put(&pending).await?;
            pending.clear();
        }
    }
    failed.sort();
    // No site could answer: an error, except in `wrapped_json`, whose
    // `failed` says so (as LMD answers, and Thruk expects).
    let none_answered = !failed.is_empty() && failed.len() == asked.len() + unknown_sites;
    if (none_answered && plan.format != plan::Format::WrappedJson) || (cfg.fail_on_site_error && !failed.is_empty()) {
        let list: Vec<String> = failed.iter().map(|(s, w)| format!("{s}: {w}")).collect();
        return Err(Failure::Answer(Status::SiteUnavailable, format!("federated query failed on {}", list.join("; "))));
    }
    merger.finish(&failed, &mut pending);
    sink.put(&pending).await?;
    fed.note_failed(&failed);
    Ok(())
}

/// `Sort` would hold more than `federation_sort_budget`.
fn over_budget(budget: usize) -> Failure {
    Failure::Answer(
        Status::PayloadTooLarge,
        format!(
            "Sort needs more than federation_sort_budget ({budget} bytes) for the rows it orders; \
             add filters or a Limit, or raise the budget"
        ),
    )
}

/// Answer a query on the virtual `sites` table (see [`sites`]).
async fn sites_table<S: Client>(
    plan: &Plan,
    selected: &[SiteHandle],
    failed: Vec<(String, String)>,
    style: ReplyStyle,
    stream: &mut S,
) -> bool {
    if !plan.stats.is_empty() {
        let msg = "bad request: Stats on the sites table are not supported";
        return stream.write_all(&error_response(Status::BadRequest, msg, style.fixed16)).await.is_ok();
    }
    let names: Vec<String> = if plan.columns.is_empty() {
        sites::COLUMNS.iter().map(|c| (*c).to_owned()).collect()
    } else {
        plan.columns.clone()
    };
    let mut rows = Vec::with_capacity(selected.len());
    for site in selected {
        let row = sites::row(site).await;
        if plan.row_passes(site.name(), |l| sites::holds(l, &row)) {
            let value = |c: &String| row.iter().find(|(n, _)| n == c).map_or(Value::from(""), |(_, v)| v.clone());
            rows.push(names.iter().map(value).collect::<Vec<_>>());
        }
    }
    let total = rows.len();
    plan::sort(plan, &mut rows);
    let end = plan.limit.map_or(rows.len(), |l| plan.offset.saturating_add(l).min(rows.len()));
    let rows: Vec<Vec<Value>> = rows.drain(plan.offset.min(end)..end).collect();
    // Without Columns, every column and a header row (as a core answers).
    let header = if plan.columns.is_empty() { Some(names) } else { plan.headers.then(|| plan.header_names(0)) };
    let mut body = Vec::with_capacity(256 * (rows.len() + 1));
    let mut renderer = plan::Renderer::start(plan, header.as_deref(), &mut body);
    for mut row in rows {
        if !plan.columns.is_empty() {
            row.truncate(plan.visible);
        }
        renderer.row(&row, &mut body);
    }
    renderer.finish(&failed, total, &mut body);
    let mut out = Vec::with_capacity(body.len() + FIXED16_LEN);
    if style.fixed16 {
        out.extend_from_slice(&ResponseHeader::new(Status::Ok, body.len() as u64).encode());
    }
    out.extend_from_slice(&body);
    stream.write_all(&out).await.is_ok()
}

fn write_spool(f: &mut Spooled, bytes: &[u8]) -> Result<(), (Status, String)> {
    // A spooled file beyond SPOOL_MEMORY is a plain file in the spool
    // directory: written through the page cache, never synced.
    f.write_all(bytes).map_err(|e| (Status::SiteUnavailable, format!("cannot hold the federated answer: {e}")))
}

/// Send a spooled answer (with its fixed16 header when asked).
async fn send_spooled<S: Client>(stream: &mut S, status: Status, mut body: Spooled, fixed16: bool) -> bool {
    let len = match body.seek(std::io::SeekFrom::End(0)) {
        Ok(n) => n,
        Err(_) => return false,
    };
    if body.rewind().is_err() {
        return false;
    }
    // The header goes out with the first part of the body: one write for
    // a small answer.
    let mut chunk = vec![0u8; (len as usize).saturating_add(FIXED16_LEN).min(64 * 1024)];
    let mut head = 0;
    if fixed16 {
        chunk[..FIXED16_LEN].copy_from_slice(&ResponseHeader::new(status, len).encode());
        head = FIXED16_LEN;
    }
    loop {
        let n = match body.read(&mut chunk[head..]) {
            Ok(n) => n,
            Err(_) => return false,
        };
        if head + n > 0 && stream.write_all(&chunk[..head + n]).await.is_err() {
            return false;
        }
        if n == 0 {
            return true;
        }
        head = 0;
    }
}
