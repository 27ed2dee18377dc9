//! One client connection.
//!
//! A session reads one request at a time (pipelined requests wait in the
//! buffer or the kernel until their turn), answers it, and keeps the
//! connection only if the client asked for `KeepAlive: on`. Errors are
//! answered in the form the client asked for: with fixed16, a status code and
//! a one-line reason; without it, the reason alone, and the connection closes.
//!
//! Timing: waiting for the next request is bounded by `client_idle_timeout`;
//! receiving it, once its first byte is here, by `client_request_timeout`
//! (see [`super::reader`], which also keeps the request buffers within
//! `request_memory_budget`);
//! answering it by `query_timeout` from the moment it was received. On
//! shutdown an idle session ends at once; a session in the middle of a
//! response finishes it first.

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::reader::{ReadError, ReadTimeouts, Refusal, RequestReader, UNBUDGETED_BYTES};
use crate::cache::{Cache, Capture, Entry, Key, Plan, Tag};
use crate::config::SiteParams;
use crate::counters::Outcome;
use crate::deadline::Deadline;
use crate::error::QueryError;
use crate::events;
use crate::relay::{RelayContext, Relayed, SendEnd, relay, send};
use crate::site::{SiteHandle, SiteResponse, send_commands, send_query_with};
use crate::spool::SpoolBudget;
use crate::watchdog::{Reaped, Watchdog};
use livemux_protocol::{
    CommandRequest, ForSite, GetSummary, ReplyStyle, Request, ResponseHeader, Status, error_response,
};

/// How long an error answer may take to write once the query's deadline has
/// passed (it is a line of text; a client that cannot take it reads nothing).
const ERROR_WRITE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the closing handshake with a client may take (a TLS
/// close_notify to a client that reads nothing would otherwise wait forever).
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A client connection's transport.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether ending the session takes a shutdown before the close: a TLS
    /// client needs its close_notify, a TCP client its FIN before a
    /// possible reset. A UNIX client sees the end at the close itself, so
    /// the system call is saved (one per GUI page and site).
    const SHUTDOWN_BEFORE_CLOSE: bool = true;

    /// Ready when the client has sent something (or closed): an idle
    /// session waits here holding no read buffer. Streams that cannot tell
    /// (TLS) are always ready and wait in the read itself.
    fn poll_sent(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    /// The client process's credentials (UNIX sockets: `SO_PEERCRED`).
    fn peer_cred(&self) -> Option<super::peer::Cred> {
        None
    }

    /// The socket, where credentials can be read from it (UNIX sockets).
    fn unix_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// The client for the pool's fair share: its number, or (a UNIX client
/// whose credentials were not read yet) its socket, to read them from
/// only if the query has to wait.
fn asker<'a, S: ClientStream>(
    stream: &'a S,
    peer: &std::cell::Cell<Peer>,
    cred_read: &std::cell::Cell<bool>,
) -> crate::site::Asker<'a> {
    let peer = peer.get();
    let unix = if cred_read.get() { None } else { stream.unix_fd() };
    crate::site::Asker { unix, key: peer.share_key() }
}

impl ClientStream for tokio::net::UnixStream {
    const SHUTDOWN_BEFORE_CLOSE: bool = false;

    fn peer_cred(&self) -> Option<super::peer::Cred> {
        super::peer::Cred::of(self)
    }

    fn unix_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }

    fn poll_sent(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.poll_read_ready(cx)
    }
}
impl ClientStream for tokio::net::TcpStream {
    fn poll_sent(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.poll_read_ready(cx)
    }
}
impl ClientStream for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {}

pub use super::peer::Peer;

/// The span of a client session: every log line of it names the site and
/// the client, `client{site=berlin peer=unix#17}`.
pub fn client_span(site: &SiteHandle, peer: &Peer) -> tracing::Span {
    tracing::info_span!(parent: None, "client", site = %site.name(), peer = %peer)
}

/// One client connection to a site's socket.
pub struct Session<S> {
    site: SiteHandle,
    stream: S,
    /// The request buffer (charged to the daemon's request budget).
    reader: RequestReader,
    budget: std::sync::Arc<SpoolBudget>,
    /// TCP clients only: watches the connection while answers are sent.
    watchdog: Option<Watchdog>,
    /// The daemon's query cache.
    cache: std::sync::Arc<Cache>,
    wire: Vec<u8>,
    /// The current query's deadline, one timer for all the session's
    /// queries (made at the first).
    timer: Option<Deadline>,
    /// Waiting for the next request, likewise.
    idle_timer: Option<Deadline>,
    shutdown: CancellationToken,
    /// The client was found dead (reaped): close without a goodbye.
    dead: bool,
    /// How the current request ended (for the metrics).
    outcome: Outcome,
    /// Who the client is; a UNIX client's credentials are read when
    /// first needed (a log line, a command, a wait for a channel): a
    /// client that only asks and reads costs no system call for them.
    peer: std::cell::Cell<Peer>,
    /// Its credentials were asked for (or came with it).
    cred_read: std::cell::Cell<bool>,
    /// Bytes of the current request's answer sent (for the slow-query log).
    sent: u64,
    /// The session's span, made when it first logs (see `Session::log`).
    span: std::cell::OnceCell<tracing::Span>,
}

impl<S: ClientStream> Session<S> {
    /// A session for `stream`, a client of `site` (ended by `shutdown`
    /// while idle); TCP clients bring a send-stall [`Watchdog`]. `span`
    /// is the session's span if it was made already (else it is made by
    /// the first log line).
    pub fn new(
        site: SiteHandle,
        stream: S,
        shutdown: CancellationToken,
        daemon: &Shared,
        watchdog: Option<Watchdog>,
        peer: Peer,
        span: Option<tracing::Span>,
    ) -> Self {
        Session {
            site,
            stream,
            reader: RequestReader::new(daemon.requests.clone()),
            budget: daemon.spool.clone(),
            cache: daemon.cache.clone(),
            watchdog,
            wire: Vec::new(),
            timer: None,
            idle_timer: None,
            shutdown,
            dead: false,
            outcome: Outcome::Ok,
            cred_read: std::cell::Cell::new(peer.cred().is_some()),
            peer: std::cell::Cell::new(peer),
            sent: 0,
            span: span.map(std::cell::OnceCell::from).unwrap_or_default(),
        }
    }

    /// Log inside the session's span (`client{site=.. peer=..}`), made
    /// now if this is the session's first line: a client that only asks
    /// and reads costs no span at all.
    fn log(&self, emit: impl FnOnce()) {
        self.span.get_or_init(|| client_span(&self.site, &self.peer())).in_scope(emit);
    }

    /// Who the client is (its credentials read now if not yet).
    fn peer(&self) -> Peer {
        if !self.cred_read.replace(true)
            && let Peer::Unix { n, cred: None } = self.peer.get()
        {
            self.peer.set(Peer::Unix { n, cred: self.stream.peer_cred() });
        }
        self.peer.get()
    }

    /// Serve the connection until the client leaves or must be dropped.
    pub async fn run(mut self) {
        let _count = self.site.client_connected();
        let mut held = self.site.hold_params();
        loop {
            let params = self.site.refresh(&mut held);
            let timeouts = ReadTimeouts { idle: params.client_idle_timeout, request: params.client_request_timeout };
            let read = self
                .reader
                .next(&mut self.stream, &params.limits, timeouts, &self.shutdown, &mut self.idle_timer)
                .await;
            let at = match read {
                Ok(Some(at)) => at,
                Ok(None) => break,
                Err(ReadError::Refused(e)) => {
                    self.site.note_query();
                    self.site.note_error();
                    let outcome = match e {
                        Refusal::Budget { .. } => Outcome::RequestBudget,
                        Refusal::Request(_) => Outcome::BadRequest,
                    };
                    self.site.metrics().query(outcome, std::time::Duration::ZERO);
                    self.log(|| events::RequestRejected { status: e.status(), error: &e }.emit());
                    let style = self.reader.style();
                    let deadline = Instant::now() + params.query_timeout;
                    self.write_error(e.status(), &e.to_string(), style, deadline).await;
                    break;
                }
                Err(ReadError::Io(e)) => {
                    match (&self.watchdog, e.kind()) {
                        // Keepalive found the peer gone while it was idle.
                        (Some(w), std::io::ErrorKind::TimedOut) => {
                            let reason = format!("keepalive: peer unreachable ({e})");
                            self.log(|| events::ClientReaped { peer: &w.peer, reason: &reason, stuck: 0 }.emit());
                            self.site.note_reaped(&w.peer, &reason);
                        }
                        _ => self.log(|| tracing::debug!(error = %e, "client read failed")),
                    }
                    break;
                }
            };
            let arrived = Instant::now();
            let deadline = arrived + params.query_timeout;
            match self.timer.as_mut() {
                Some(t) => t.set(deadline),
                None => self.timer = Some(Deadline::new(deadline)),
            }
            self.site.note_query();
            self.outcome = Outcome::Ok;
            self.sent = 0;
            // A GET is written for the site as it is parsed, into the
            // session's buffer for it.
            let parsed = Request::parse_for_site(self.reader.request(at.clone()), &mut self.wire);
            // Answering is boxed: an idle session's task stays small (a
            // daemon holds tens of thousands of idle clients).
            let keep = match parsed {
                Ok(ForSite::Get(q)) => Box::pin(self.answer(q, params)).await,
                Ok(ForSite::Command(c)) => Box::pin(self.command(&c, params)).await,
                Err(e) => {
                    self.site.note_error();
                    self.outcome = Outcome::BadRequest;
                    self.log(|| events::RequestRejected { status: e.status(), error: &e }.emit());
                    let style = ReplyStyle::sniff(self.reader.request(at.clone()));
                    self.write_error(e.status(), &e.to_string(), style, deadline).await;
                    style.keepalive && style.fixed16
                }
            };
            let took = arrived.elapsed();
            self.site.metrics().query(self.outcome, took);
            if params.slow_query_threshold.is_some_and(|t| took > t) {
                self.slow_query(self.reader.request(at), took, params.slow_query_log_values);
            }
            if self.wire.capacity() > UNBUDGETED_BYTES {
                // A large request's copy goes with it (kept up to the size
                // the request budget leaves free; beyond, it was charged
                // only while its request was answered).
                self.wire = Vec::new();
            }
            if !keep {
                break;
            }
        }
        if !self.dead && S::SHUTDOWN_BEFORE_CLOSE {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.stream.shutdown()).await;
        }
    }

    /// Count an answer's bytes: from the site, and sent to the client.
    fn note_bytes(&mut self, from_site: u64, to_client: u64) {
        self.site.metrics().bytes(from_site, to_client);
        self.sent += to_client;
    }

    /// The slow-query log line for `request`.
    fn slow_query(&self, request: &[u8], took: std::time::Duration, values: bool) {
        let (first_line, headers) = events::describe_request(request, values);
        let (first_line, headers) = (first_line.as_str(), headers.as_str());
        let (site, bytes, client) = (self.site.name(), self.sent, &self.peer());
        self.log(|| events::SlowQuery { site, took, bytes, client, first_line, headers }.emit());
    }

    /// The current query's deadline.
    fn deadline(&self) -> Instant {
        // Set for every request before it is answered.
        self.timer.as_ref().map_or_else(Instant::now, Deadline::at)
    }

    /// Answer a `GET`; returns whether the connection stays open.
    ///
    /// A `Cache: reload` query (with caching on) is answered from the cache
    /// when it can be; with `coalesce`, any query joins an identical one in
    /// flight. Otherwise it goes to the site.
    async fn answer(&mut self, q: GetSummary, params: &SiteParams) -> bool {
        let cacheable = params.cache && q.cache.is_some();
        if !(cacheable || params.coalesce) {
            return self.fetch(q, params, None).await;
        }
        let deadline = self.deadline();
        let status = self.site.status();
        let tag = Tag { generation: status.generation, program_start: status.program_start };
        let key = Key::new(self.site.name(), &self.wire);
        match self.cache.plan(key, tag, params.cache_max_age, cacheable, deadline).await {
            Plan::Hit(entry) => self.serve_entry(&entry, q.style, deadline).await,
            Plan::Lead(capture) => self.fetch(q, params, Some(capture)).await,
            Plan::Alone => self.fetch(q, params, None).await,
            Plan::TimedOut => self.query_failed(&self.site.timeout_error(), q.style, deadline).await,
        }
    }

    /// Write a complete answer held in memory. The body is written from the
    /// shared entry, not copied: a thousand slow clients of one cached
    /// answer cost one copy of it.
    async fn serve_entry(&mut self, entry: &Entry, style: ReplyStyle, deadline: Instant) -> bool {
        let head: &[u8] = if style.fixed16 { &entry.raw_header } else { &[] };
        let total = (head.len() + entry.body.len()) as u64;
        let mut out = Buf::chain(head, entry.body.clone());
        let mut sent = 0;
        if let Some(w) = self.watchdog.as_mut() {
            w.start();
        }
        let result = send(&mut self.stream, &mut out, &mut sent, deadline, self.watchdog.as_mut()).await;
        self.note_bytes(0, sent);
        match result {
            Ok(()) => style.keepalive && (style.fixed16 || entry.status == Status::Ok),
            Err(end) => {
                self.sending_failed(end, sent, total);
                false
            }
        }
    }

    /// Log why an answer could not be sent completely.
    fn sending_failed(&mut self, end: SendEnd, sent: u64, total: u64) {
        self.outcome = if matches!(end, SendEnd::Deadline) { Outcome::Timeout } else { Outcome::ClientGone };
        match end {
            SendEnd::Gone => self.log(|| events::ClientClosedMidResponse { sent, total }.emit()),
            SendEnd::Reaped(reaped) => self.reaped(&reaped, sent, total),
            SendEnd::Deadline => {
                let error = self.site.timeout_error();
                self.log(|| events::ResponseCut { sent, total, error: &error }.emit());
            }
        }
    }

    fn reaped(&mut self, reaped: &Reaped, sent: u64, total: u64) {
        self.dead = true;
        let peer = self.watchdog.as_ref().map_or("?", |w| w.peer.as_str());
        let reason = format!("{} ({sent} of {total} bytes sent)", reaped.reason);
        self.log(|| events::ClientReaped { peer, reason: &reason, stuck: reaped.stuck }.emit());
        self.site.note_reaped(peer, &reason);
    }

    /// Send a query to the site and relay its answer; a `leader` gets the
    /// answer for the cache and for identical queries waiting.
    async fn fetch(&mut self, q: GetSummary, params: &SiteParams, capture: Option<Capture>) -> bool {
        let style = q.style;
        let Some(timer) = self.timer.as_mut() else { return false };
        let asker = asker(&self.stream, &self.peer, &self.cred_read);
        // (Inside the boxed answer: an idle session's own state stays small.)
        let resp = match send_query_with(&self.site, &self.wire, q.pipelinable, timer, params, &asker).await {
            Ok(r) => r,
            Err(e) => return self.query_failed(&e, style, self.deadline()).await,
        };
        if capture.is_none() && resp.fits() {
            // Small enough to hold in the buffer it began in: read the rest
            // there (a core that writes the header apart from the body) and
            // write it whole, without the relay.
            if resp.complete() {
                return self.write_whole(resp, style).await;
            }
            let deadline = self.deadline();
            return match resp.read_rest(&self.site, deadline, params.response_idle_timeout).await {
                Ok(resp) => self.write_whole(resp, style).await,
                Err(e) => self.query_failed(&e, style, deadline).await,
            };
        }
        let deadline = self.deadline();
        let status = resp.header.status;
        let from_site = resp.header.length;
        let head = if style.fixed16 { livemux_protocol::FIXED16_LEN as u64 } else { 0 };
        let ctx = RelayContext {
            site: &self.site,
            style,
            deadline,
            budget: &self.budget,
            watchdog: self.watchdog.as_mut(),
            capture,
        };
        let relayed = Box::pin(relay(resp, &mut self.stream, ctx)).await;
        let to_client = match &relayed {
            Relayed::Complete => from_site + head,
            Relayed::NothingSent(_) => 0,
            Relayed::ClientGone { sent, .. } | Relayed::Reaped { sent, .. } | Relayed::Cut { sent, .. } => *sent,
        };
        self.note_bytes(from_site, to_client);
        match relayed {
            Relayed::Complete => style.keepalive && (style.fixed16 || status == Status::Ok),
            Relayed::NothingSent(e) => self.query_failed(&e, style, deadline).await,
            Relayed::ClientGone { sent, total } => {
                self.outcome = Outcome::ClientGone;
                self.log(|| events::ClientClosedMidResponse { sent, total }.emit());
                false
            }
            Relayed::Reaped { sent, total, reaped } => {
                self.outcome = Outcome::ClientGone;
                self.reaped(&reaped, sent, total);
                false
            }
            Relayed::Cut { error, sent, total } => {
                self.outcome = Outcome::of(&error);
                self.log(|| events::ResponseCut { sent, total, error: &error }.emit());
                false
            }
        }
    }

    /// An answer that came whole with its header (most answers a GUI asks
    /// for): the channel goes back at once, and the client gets the answer
    /// in one write straight from the read buffer, with the site's header
    /// when it asked for fixed16. What the relay guarantees holds here
    /// trivially: the answer is complete before the client's first byte.
    async fn write_whole(&mut self, resp: SiteResponse, style: ReplyStyle) -> bool {
        let (status, length) = (resp.header.status, resp.header.length);
        let (read, lease) = resp.into_read();
        lease.release();
        let out = if style.fixed16 { &read[..] } else { &read[livemux_protocol::FIXED16_LEN..] };
        let total = out.len() as u64;
        let mut sent = 0;
        if let Some(w) = self.watchdog.as_mut() {
            w.start();
        }
        let deadline = self.deadline();
        let result = send(&mut self.stream, &mut &out[..], &mut sent, deadline, self.watchdog.as_mut()).await;
        crate::site::exchange::recycle(read);
        self.note_bytes(length, sent);
        match result {
            Ok(()) => style.keepalive && (style.fixed16 || status == Status::Ok),
            Err(end) => {
                self.sending_failed(end, sent, total);
                false
            }
        }
    }

    async fn query_failed(&mut self, e: &QueryError, style: ReplyStyle, deadline: Instant) -> bool {
        self.site.note_error();
        self.outcome = Outcome::of(e);
        self.log(|| events::QueryFailed { error: e }.emit());
        self.write_error(e.status(), &e.to_string(), style, deadline).await
    }

    /// Forward `COMMAND`s, if this client may send them (`commands`,
    /// `commands_from_uids`/`groups`; a refusal is a 403 with fixed16, an
    /// error line otherwise, and nothing reaches the site). Like a core, the
    /// proxy sends no answer to forwarded ones, except the empty `200` that
    /// a client asking for fixed16 expects (as Icinga 2 sends). The
    /// connection stays open, as a core keeps it. Each command is audited.
    async fn command(&mut self, c: &CommandRequest, params: &SiteParams) -> bool {
        let deadline = self.deadline();
        if let Err(why) = crate::client::peer::may_command(&params.commands, &self.peer()) {
            self.outcome = Outcome::BadRequest;
            self.audit(c, params, &format!("refused: {why}"));
            let message = format!("COMMAND refused: {why}");
            return self.write_error(Status::Forbidden, &message, c.style, deadline).await;
        }
        self.wire.clear();
        c.encode_for_site(&mut self.wire);
        let asker = asker(&self.stream, &self.peer, &self.cred_read);
        let sent = Box::pin(send_commands(&self.site, &self.wire, deadline, &asker)).await;
        match sent {
            Ok(()) => {
                self.audit(c, params, "forwarded");
                if c.style.fixed16 {
                    let ok = ResponseHeader::new(Status::Ok, 0).encode();
                    self.write_by(&ok, deadline).await
                } else {
                    true
                }
            }
            Err(e) => {
                self.audit(c, params, &format!("failed: {e}"));
                self.log(|| events::CommandFailed { commands: c.commands.len(), error: &e }.emit());
                if c.style.fixed16 {
                    self.write_error(e.status(), &e.to_string(), c.style, deadline).await
                } else {
                    true
                }
            }
        }
    }

    /// The audit line of each command of `c`.
    fn audit(&self, c: &CommandRequest, params: &SiteParams, outcome: &str) {
        for line in &c.commands {
            let line = line.strip_prefix(b"COMMAND ").unwrap_or(line);
            self.log(|| {
                events::CommandAudit {
                    sites: self.site.name(),
                    client: &self.peer(),
                    line,
                    arguments: params.audit_command_arguments,
                    outcome,
                }
                .emit()
            });
        }
    }

    /// Send an error response, by the query's deadline (or, when that has
    /// passed, within [`ERROR_WRITE_GRACE`]: the 504 itself must not wait a
    /// second `query_timeout` for a client that reads nothing); returns
    /// whether the connection can stay open.
    async fn write_error(&mut self, status: Status, message: &str, style: ReplyStyle, deadline: Instant) -> bool {
        let answer = error_response(status, message, style.fixed16);
        let by = deadline.max(Instant::now() + ERROR_WRITE_GRACE);
        self.write_by(&answer, by).await && style.keepalive && style.fixed16
    }

    /// Write and flush `data` by `deadline` (through the relay's writer, so
    /// the watchdog looks after TCP clients here too).
    async fn write_by(&mut self, mut data: &[u8], deadline: Instant) -> bool {
        if let Some(w) = self.watchdog.as_mut() {
            w.start();
        }
        let (mut sent, total) = (0, data.len() as u64);
        match send(&mut self.stream, &mut data, &mut sent, deadline, self.watchdog.as_mut()).await {
            Ok(()) => true,
            Err(SendEnd::Reaped(r)) => {
                self.reaped(&r, sent, total);
                false
            }
            Err(_) => false,
        }
    }
}
