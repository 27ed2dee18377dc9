//! A simulated Livestatus site for tests, the demo and benchmarks.
//!
//! It speaks enough Livestatus to stand in for a monitoring core (synthetic
//! `hosts`, `services`, `hostgroups` and `status` tables; see [`query`] for the
//! query language it understands) and has fault knobs ([`Knobs`]) that tests
//! turn at run time: delays, never answering, closing mid-response, slow
//! writes, refusing connections, responses of any size (`GET bulk`), and a
//! changed `program_start`. It is *not* a substitute for a real core: the
//! proxy's integration tests also run against Icinga 2.
//!
//! Knobs can be set through the Rust API ([`SimSite::set_knobs`]) or, for a
//! site running as its own process, with a control command on any connection:
//! `COMMAND [0] LIVEMUX_SIM;<key>=<value>` (keys as in [`Knobs::apply`]).
//!
//! # Layout
//! - [`data`]: the synthetic objects, computed from their indices.
//! - [`query`]: the query engine (columns, filters, stats, output formats).
//! - [`bulk`]: the deterministic body of `GET bulk` and its checker.
//! - this file: the server, its knobs and counters.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bulk;
pub mod data;
pub mod inventory;
pub mod query;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use livemux_protocol::{Framer, Limits, Query, ReplyStyle, Request, ResponseHeader, Status, error_response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::data::{Dataset, StatusCounters};

/// How many raw requests [`SimSite::requests`] remembers.
const REQUEST_LOG_LEN: usize = 256;
/// Default size of one write of a response body.
const DEFAULT_WRITE_CHUNK: usize = 256 * 1024;

/// Where a simulated site listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A TCP address; port 0 picks a free port.
    Tcp(SocketAddr),
    /// A UNIX socket path (a stale file is replaced).
    Unix(PathBuf),
    /// No socket: connections come from [`SimSite::connect_in_memory`].
    Memory,
}

/// What a simulated site serves and where.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Site name (appears in host aliases).
    pub name: String,
    /// Number of hosts.
    pub hosts: usize,
    /// Services per host.
    pub services_per_host: usize,
    /// Listening address.
    pub listen: Listen,
}

impl SimConfig {
    /// A site called `name` with 100 hosts of 10 services on 127.0.0.1, free port.
    pub fn tcp(name: &str) -> Self {
        SimConfig {
            name: name.to_owned(),
            hosts: 100,
            services_per_host: 10,
            listen: Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
        }
    }
}

/// Fault knobs. They apply to every query, or only to queries on
/// `fault_table` when that is set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Knobs {
    /// Wait this long before answering a query.
    pub delay: Duration,
    /// Read queries but do not answer them while set (the core hangs, the
    /// port is open). Held queries are answered once it is cleared.
    pub hang: bool,
    /// Close the connection without a byte for the next N queries
    /// (as Icinga 2 does for some bad queries).
    pub close_without_answer: u32,
    /// Close the connection after this many bytes of a response.
    pub close_after_bytes: Option<u64>,
    /// Bytes per write of a response (0: 256 KiB).
    pub write_chunk: usize,
    /// Pause between two writes of a response (slow writes).
    pub write_pause: Duration,
    /// When set, the faults above apply only to queries on this table.
    pub fault_table: Option<String>,
    /// Body size of `GET bulk`.
    pub bulk_bytes: u64,
    /// A simulated network round trip: every answer leaves this long after
    /// its request arrived (pipelined requests arriving together are
    /// answered together, as over a real network), the first answer on a
    /// new connection once more (its TCP handshake). Applies to all tables,
    /// unlike the fault knobs.
    pub rtt: Duration,
    /// Round trips of a TLS handshake in front of this site (stunnel on
    /// loopback adds none of its own): the first answer on a new
    /// connection pays them too, as it pays the TCP handshake's. TLS 1.3
    /// takes 1, TLS 1.2 takes 2.
    pub tls_handshake_rtts: u32,
    /// Serve at most this many connections at once (0: no limit). Further
    /// connections are accepted by the kernel but not read until a served
    /// one closes, as Icinga 2's Livestatus does (a pool thread per
    /// connection for its whole life).
    pub max_connections: usize,
    /// Answer every `COMMAND` with this line, without a response header (as
    /// old mk-livestatus versions answer a command they reject).
    pub command_reply: Option<String>,
    /// Answer a `GET` (on the fault table) with this line, without the
    /// response header it asked for, and close: what an mk-livestatus core
    /// does with a request it rejects before reading its headers.
    pub unframed_reply: Option<String>,
    /// Close a connection after it answered this many requests, even with
    /// more requests of it waiting (0: never): a core dying mid-pipeline.
    pub close_after_answers: u32,
    /// Read headers as mk-livestatus (Naemon, Checkmk) does: a header the
    /// core does not know ends the request with `400 Undefined request
    /// header`, and the lines after it are read as the next request; a first
    /// line that is neither `GET` nor `COMMAND` gets a bare `Invalid request
    /// method` line, and the connection closes. Keep-alive connections stay
    /// open after error answers (Icinga 2 closes them).
    pub mk_headers: bool,
}

impl Knobs {
    /// Set one knob from text, as the control command and the command line do.
    ///
    /// Keys: `delay_ms`, `hang` (0/1), `close_without_answer`,
    /// `close_after_bytes` (or `none`), `write_chunk`, `write_pause_ms`,
    /// `fault_table` (or `none`), `bulk_bytes`, `rtt_ms`, `tls_handshake_rtts`, `max_connections`,
    /// `command_reply` (or `none`), `unframed_reply` (or `none`), `mk_headers` (0/1),
    /// `close_after_answers`.
    pub fn apply(&mut self, key: &str, value: &str) -> Result<(), String> {
        let num = |v: &str| v.parse::<u64>().map_err(|_| format!("{key}: '{v}' is not a number"));
        match key {
            "delay_ms" => self.delay = Duration::from_millis(num(value)?),
            "hang" => self.hang = num(value)? != 0,
            "close_without_answer" => self.close_without_answer = num(value)? as u32,
            "close_after_bytes" if value == "none" => self.close_after_bytes = None,
            "close_after_bytes" => self.close_after_bytes = Some(num(value)?),
            "write_chunk" => self.write_chunk = num(value)? as usize,
            "write_pause_ms" => self.write_pause = Duration::from_millis(num(value)?),
            "fault_table" if value == "none" => self.fault_table = None,
            "fault_table" => self.fault_table = Some(value.to_owned()),
            "bulk_bytes" => self.bulk_bytes = num(value)?,
            "rtt_ms" => self.rtt = Duration::from_millis(num(value)?),
            "tls_handshake_rtts" => self.tls_handshake_rtts = num(value)? as u32,
            "max_connections" => self.max_connections = num(value)? as usize,
            "command_reply" if value == "none" => self.command_reply = None,
            "command_reply" => self.command_reply = Some(value.to_owned()),
            "unframed_reply" if value == "none" => self.unframed_reply = None,
            "unframed_reply" => self.unframed_reply = Some(value.to_owned()),
            "mk_headers" => self.mk_headers = num(value)? != 0,
            "close_after_answers" => self.close_after_answers = num(value)? as u32,
            _ => return Err(format!("unknown knob '{key}'")),
        }
        Ok(())
    }

    fn hang_applies_to(&self, table: &str) -> bool {
        self.hang && self.applies_to(table)
    }

    fn applies_to(&self, table: &str) -> bool {
        self.fault_table.as_deref().is_none_or(|t| t == table)
    }
}

/// Counters of a simulated site.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open now.
    pub open: u64,
    /// `GET` requests received.
    pub queries: u64,
    /// `COMMAND` lines received.
    pub commands: u64,
    /// The most connections open at once so far.
    pub peak_open: u64,
    /// Requests that had arrived whole before the answer ahead of them on
    /// their connection was written (pipelined by the client).
    pub pipelined: u64,
}

struct Shared {
    data: RwLock<Dataset>,
    knobs: Mutex<Knobs>,
    /// Bumped whenever the knobs change (wakes held queries).
    knobs_changed: tokio::sync::watch::Sender<u64>,
    program_start: AtomicU64,
    accepted: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
    pipelined: AtomicU64,
    queries: AtomicU64,
    /// `GET` requests per table.
    per_table: Mutex<std::collections::HashMap<String, u64>>,
    commands: AtomicU64,
    requests: Mutex<VecDeque<Vec<u8>>>,
    command_log: Mutex<Vec<String>>,
    /// Wakes connections that are waiting for a request, to close them.
    kick_idle: Notify,
    /// Client addresses of the open TCP connections.
    peers: Mutex<std::collections::HashSet<SocketAddr>>,
    /// Connections being served (see `Knobs::max_connections`).
    serving: Mutex<usize>,
    /// A served connection ended.
    slot_freed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short-lived locks would be a bug in
    // this test server; keep serving rather than cascade it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running simulated site.
pub struct SimSite {
    shared: Arc<Shared>,
    listen: Listen,
    running: Mutex<CancellationToken>,
}

impl SimSite {
    /// Bind and start serving.
    pub async fn start(cfg: SimConfig) -> io::Result<SimSite> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let shared = Arc::new(Shared {
            data: RwLock::new(Dataset::new(&cfg.name, cfg.hosts, cfg.services_per_host)),
            knobs: Mutex::new(Knobs { bulk_bytes: 1 << 20, ..Knobs::default() }),
            knobs_changed: tokio::sync::watch::channel(0).0,
            program_start: AtomicU64::new(now),
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            peak_open: AtomicU64::new(0),
            pipelined: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            per_table: Mutex::new(std::collections::HashMap::new()),
            commands: AtomicU64::new(0),
            requests: Mutex::new(VecDeque::new()),
            command_log: Mutex::new(Vec::new()),
            kick_idle: Notify::new(),
            peers: Mutex::new(std::collections::HashSet::new()),
            serving: Mutex::new(0),
            slot_freed: Notify::new(),
        });
        let token = CancellationToken::new();
        let listen = bind_and_serve(&shared, &cfg.listen, token.clone()).await?;
        Ok(SimSite { shared, listen, running: Mutex::new(token) })
    }

    /// The address in livemux's notation: `tcp://127.0.0.1:PORT` or
    /// `unix:///path` (`memory` for an in-memory site).
    pub fn address(&self) -> String {
        match &self.listen {
            Listen::Tcp(a) => format!("tcp://{a}"),
            Listen::Unix(p) => format!("unix://{}", p.display()),
            Listen::Memory => "memory".to_owned(),
        }
    }

    /// A connection without a socket, served like an accepted one (and
    /// refused while the site is stopped): for tests on tokio's paused
    /// clock, where no real I/O may stand between two timers.
    pub fn connect_in_memory(&self) -> io::Result<tokio::io::DuplexStream> {
        let token = lock(&self.running).clone();
        if token.is_cancelled() {
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "the simulated site is stopped"));
        }
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        spawn_conn(&self.shared, theirs, token.child_token(), None);
        Ok(ours)
    }

    /// The bound TCP address, if TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.listen {
            Listen::Tcp(a) => Some(*a),
            Listen::Unix(_) | Listen::Memory => None,
        }
    }

    /// Change knobs.
    pub fn set_knobs(&self, f: impl FnOnce(&mut Knobs)) {
        f(&mut lock(&self.shared.knobs));
        self.shared.knobs_changed.send_modify(|g| *g += 1);
    }

    /// Current knobs.
    pub fn knobs(&self) -> Knobs {
        lock(&self.shared.knobs).clone()
    }

    /// The client addresses of the open TCP connections, sorted: a
    /// client's connections are the same ones while this stays the same.
    pub fn open_peers(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = lock(&self.shared.peers).iter().copied().collect();
        v.sort();
        v
    }

    /// Read or change the site's objects (host names, inventory).
    pub fn with_dataset<R>(&self, f: impl FnOnce(&mut Dataset) -> R) -> R {
        let mut data = self.shared.data.write().unwrap_or_else(|e| e.into_inner());
        f(&mut data)
    }

    /// Set `program_start` (as a core reload would).
    pub fn set_program_start(&self, ts: u64) {
        self.shared.program_start.store(ts, Ordering::Relaxed);
    }

    /// Current `program_start`.
    pub fn program_start(&self) -> u64 {
        self.shared.program_start.load(Ordering::Relaxed)
    }

    /// Counters.
    pub fn stats(&self) -> SimStats {
        let s = &self.shared;
        SimStats {
            accepted: s.accepted.load(Ordering::Relaxed),
            open: s.open.load(Ordering::Relaxed),
            queries: s.queries.load(Ordering::Relaxed),
            commands: s.commands.load(Ordering::Relaxed),
            peak_open: s.peak_open.load(Ordering::Relaxed),
            pipelined: s.pipelined.load(Ordering::Relaxed),
        }
    }

    /// `GET` requests received for `table` (heartbeats ask `status`).
    pub fn queries_on(&self, table: &str) -> u64 {
        lock(&self.shared.per_table).get(table).copied().unwrap_or(0)
    }

    /// The last raw requests received (up to 256), oldest first.
    pub fn requests(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.requests).iter().cloned().collect()
    }

    /// Every `COMMAND` line received, oldest first.
    pub fn commands(&self) -> Vec<String> {
        lock(&self.shared.command_log).clone()
    }

    /// Close every connection that is waiting for its next request.
    pub fn close_idle_connections(&self) {
        self.shared.kick_idle.notify_waiters();
    }

    /// Stop listening and drop every connection: connects are refused from now on.
    pub fn stop(&self) {
        lock(&self.running).cancel();
    }

    /// Listen again on the same address after [`SimSite::stop`].
    pub async fn restart(&self) -> io::Result<()> {
        let token = CancellationToken::new();
        bind_and_serve(&self.shared, &self.listen, token.clone()).await?;
        *lock(&self.running) = token;
        Ok(())
    }
}

impl Drop for SimSite {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn bind_and_serve(shared: &Arc<Shared>, listen: &Listen, token: CancellationToken) -> io::Result<Listen> {
    match listen {
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr).await?;
            let bound = l.local_addr()?;
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    let conn = tokio::select! {
                        _ = token.cancelled() => return,
                        c = l.accept() => c,
                    };
                    if let Ok((s, peer)) = conn {
                        let _ = s.set_nodelay(true);
                        spawn_conn(&shared, s, token.child_token(), Some(peer));
                    }
                }
            });
            Ok(Listen::Tcp(bound))
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = UnixListener::bind(path)?;
            let shared = shared.clone();
            let path2 = path.clone();
            tokio::spawn(async move {
                loop {
                    let conn = tokio::select! {
                        _ = token.cancelled() => { let _ = std::fs::remove_file(&path2); return }
                        c = l.accept() => c,
                    };
                    if let Ok((s, _)) = conn {
                        spawn_conn(&shared, s, token.child_token(), None);
                    }
                }
            });
            Ok(Listen::Unix(path.clone()))
        }
        Listen::Memory => Ok(Listen::Memory),
    }
}

fn spawn_conn<S>(shared: &Arc<Shared>, stream: S, token: CancellationToken, peer: Option<SocketAddr>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = shared.clone();
    if let Some(p) = peer {
        lock(&shared.peers).insert(p);
    }
    shared.accepted.fetch_add(1, Ordering::Relaxed);
    let open = shared.open.fetch_add(1, Ordering::Relaxed) + 1;
    shared.peak_open.fetch_max(open, Ordering::Relaxed);
    tokio::spawn(async move {
        tokio::select! {
            _ = token.cancelled() => {}
            _ = async {
                let _slot = Slot::take(&shared).await;
                serve(&shared, stream).await
            } => {}
        }
        shared.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(p) = peer {
            lock(&shared.peers).remove(&p);
        }
    });
}

/// One of `max_connections` served connections.
struct Slot<'a>(&'a Shared);

impl<'a> Slot<'a> {
    async fn take(shared: &'a Shared) -> Slot<'a> {
        let mut changed = shared.knobs_changed.subscribe();
        loop {
            let freed = shared.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let max = lock(&shared.knobs).max_connections;
                let mut n = lock(&shared.serving);
                if max == 0 || *n < max {
                    *n += 1;
                    return Slot(shared);
                }
            }
            tokio::select! {
                _ = &mut freed => {}
                _ = changed.changed() => {}
            }
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *lock(&self.0.serving) -= 1;
        self.0.slot_freed.notify_waiters();
    }
}

/// Bytes read ahead of the request being answered, at most (a test
/// server's bound; a client pipelining more waits for the kernel).
const READ_AHEAD: usize = 1 << 20;

/// When the bytes of a connection arrived, for the simulated round trip.
#[derive(Default)]
struct Arrivals {
    /// Reads whose bytes are not all taken yet: (bytes left, when read).
    reads: VecDeque<(usize, tokio::time::Instant)>,
}

impl Arrivals {
    fn read(&mut self, n: usize) {
        if n > 0 {
            self.reads.push_back((n, tokio::time::Instant::now()));
        }
    }

    /// Take `n` bytes (a request, with the empty lines before it): when
    /// the last of them arrived.
    fn take(&mut self, mut n: usize) -> tokio::time::Instant {
        let mut when = tokio::time::Instant::now();
        while n > 0 {
            let Some((left, at)) = self.reads.front_mut() else { break };
            when = *at;
            let k = n.min(*left);
            *left -= k;
            n -= k;
            if *left == 0 {
                self.reads.pop_front();
            }
        }
        when
    }

    /// `n` bytes taken are unread again (they are the next request).
    fn put_back(&mut self, n: usize, at: tokio::time::Instant) {
        if n > 0 {
            self.reads.push_front((n, at));
        }
    }
}

/// What to do after answering a request.
enum Next {
    Continue,
    Close,
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(shared: &Shared, mut s: S) -> io::Result<()> {
    let limits = Limits { max_request_bytes: 64 << 20, max_header_lines: 1 << 20, max_line_bytes: 16 << 20 };
    let mut buf = BytesMut::with_capacity(4096);
    let mut framer = Framer::new();
    let mut first = true;
    // The simulated round trip counts from when a request's last byte
    // arrived, so requests pipelined on one connection pay it in parallel,
    // as over a real network. Bytes are therefore read (and their arrival
    // noted) while an answer waits for its round trip, too.
    let mut arrivals = Arrivals::default();
    let mut eof = false;
    let mut answered = 0u32;
    loop {
        // A request found whole without reading: it arrived while the
        // previous answer was being prepared.
        let mut read_for_it = false;
        let frame = loop {
            match framer.scan(&buf, &limits) {
                Ok(Some(f)) => break Some(f),
                Ok(None) => {}
                Err(e) => {
                    s.write_all(&error_response(e.status(), &e.to_string(), true)).await?;
                    return Ok(());
                }
            }
            if eof {
                break framer.finish(&buf);
            }
            let idle = buf.is_empty();
            let n = tokio::select! {
                n = s.read_buf(&mut buf) => n?,
                _ = shared.kick_idle.notified(), if idle => return Ok(()),
            };
            read_for_it = true;
            eof = n == 0;
            arrivals.read(n);
        };
        let Some(frame) = frame else { return Ok(()) };
        if !read_for_it && answered > 0 {
            shared.pipelined.fetch_add(1, Ordering::Relaxed);
        }
        let block = buf[frame.start..frame.end].to_vec();
        buf.advance(frame.end);
        let arrived = arrivals.take(frame.end);
        {
            let mut log = lock(&shared.requests);
            if log.len() == REQUEST_LOG_LEN {
                log.pop_front();
            }
            log.push_back(block.clone());
        }
        let (rtt, tls_rtts) = {
            let k = lock(&shared.knobs);
            (k.rtt, k.tls_handshake_rtts)
        };
        if !rtt.is_zero() {
            let trips = if first { 2 + tls_rtts } else { 1 };
            let due = arrived + rtt * trips;
            let sleep = tokio::time::sleep_until(due);
            tokio::pin!(sleep);
            loop {
                let room = buf.len() < READ_AHEAD;
                tokio::select! {
                    _ = &mut sleep => break,
                    n = s.read_buf(&mut buf), if room && !eof => {
                        let n = n?;
                        eof = n == 0;
                        arrivals.read(n);
                    }
                }
            }
        }
        first = false;
        if lock(&shared.knobs).mk_headers {
            match mk_dialect(&block) {
                MkRead::Whole => {}
                MkRead::InvalidMethod => {
                    s.write_all(b"Invalid request method\n").await?;
                    s.shutdown().await.ok();
                    return Ok(());
                }
                MkRead::StopsAt { line, end } => {
                    // The lines after the bad one stay unread: they are
                    // the next request.
                    arrivals.put_back(block.len() - end, arrived);
                    let mut rest = BytesMut::from(&block[end..]);
                    rest.extend_from_slice(&buf);
                    buf = rest;
                    framer = Framer::new();
                    let style = ReplyStyle::sniff(&block[..end]);
                    let msg = format!("Undefined request header '{line}'");
                    s.write_all(&error_response(Status::BadRequest, &msg, style.fixed16)).await?;
                    if !style.keepalive {
                        s.shutdown().await.ok();
                        return Ok(());
                    }
                    continue;
                }
            }
        }
        let next = match Request::parse(&block) {
            Ok(Request::Get(q)) => answer(shared, &mut s, &q).await?,
            Ok(Request::Command(c)) => {
                for line in &c.commands {
                    command(shared, &String::from_utf8_lossy(line));
                }
                let reply = lock(&shared.knobs).command_reply.clone();
                if let Some(line) = reply {
                    s.write_all(format!("{line}\n").as_bytes()).await?;
                } else if c.style.fixed16 {
                    s.write_all(&ResponseHeader::new(Status::Ok, 0).encode()).await?;
                }
                Next::Continue
            }
            Err(e) => {
                s.write_all(&error_response(e.status(), &e.to_string(), true)).await?;
                Next::Close
            }
        };
        answered += 1;
        let limit = lock(&shared.knobs).close_after_answers;
        if matches!(next, Next::Close) || (limit > 0 && answered >= limit) {
            s.shutdown().await.ok();
            return Ok(());
        }
    }
}

fn command(shared: &Shared, line: &str) {
    shared.commands.fetch_add(1, Ordering::Relaxed);
    lock(&shared.command_log).push(line.to_owned());
    // "COMMAND [ts] NAME;args"
    let Some(body) = line.split_once("] ").map(|(_, b)| b) else { return };
    let mut parts = body.split(';');
    match parts.next() {
        Some("LIVEMUX_SIM") => {
            for kv in parts {
                if let Some((k, v)) = kv.split_once('=') {
                    match k {
                        "program_start" => {
                            if let Ok(ts) = v.parse() {
                                shared.program_start.store(ts, Ordering::Relaxed);
                            }
                        }
                        "close_idle" => shared.kick_idle.notify_waiters(),
                        _ => {
                            let _ = lock(&shared.knobs).apply(k, v);
                            shared.knobs_changed.send_modify(|g| *g += 1);
                        }
                    }
                }
            }
        }
        Some("LIVEMUX_SIM_INVENTORY") => {
            // LIVEMUX_SIM_INVENTORY;<host>;<marker>: the host's inventory is
            // saved anew (timestamp: now; `.last` touched), or removed with
            // the marker `-`.
            let args: Vec<&str> = parts.collect();
            if let [host, marker, ..] = args[..] {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
                let mut data = shared.data.write().unwrap_or_else(|e| e.into_inner());
                if let Some(h) = data.host_index(host) {
                    let inv = &data.inventory;
                    let tree = (marker != "-")
                        .then(|| crate::inventory::generate(host, inv.layout, inv.tree_bytes, marker, now));
                    data.inventory.set(h, tree, now);
                }
            }
        }
        Some("PROCESS_HOST_CHECK_RESULT") => {
            let args: Vec<&str> = parts.collect();
            if let [host, state, output, ..] = args[..] {
                let mut data = shared.data.write().unwrap_or_else(|e| e.into_inner());
                if let (Some(h), Ok(st)) = (data.host_index(host), state.parse()) {
                    data.set_host_state(h, st, output.to_owned());
                }
            }
        }
        Some("PROCESS_SERVICE_CHECK_RESULT") => {
            let args: Vec<&str> = parts.collect();
            if let [host, svc, state, output, ..] = args[..] {
                let mut data = shared.data.write().unwrap_or_else(|e| e.into_inner());
                if let (Some(h), Ok(st)) = (data.host_index(host), state.parse()) {
                    data.set_service_state(h, svc, st, output.to_owned());
                }
            }
        }
        _ => {}
    }
}

/// The body of an answer: built in memory, or generated (`GET bulk`).
enum Body {
    Bytes(Vec<u8>),
    Bulk(u64),
}

/// How an mk-livestatus core reads a request (see [`Knobs::mk_headers`]).
enum MkRead {
    /// Every line.
    Whole,
    /// The first line is no request method.
    InvalidMethod,
    /// Up to the unknown header `line`, which ends at byte `end`.
    StopsAt { line: String, end: usize },
}

/// The header names naemon-livestatus 1.5 knows.
const MK_HEADERS: &[&str] = &[
    "Filter",
    "Sort",
    "Or",
    "And",
    "Negate",
    "StatsOr",
    "StatsAnd",
    "StatsNegate",
    "Stats",
    "StatsGroupBy",
    "Columns",
    "ColumnHeaders",
    "Limit",
    "Offset",
    "Timelimit",
    "AuthUser",
    "Separators",
    "OutputFormat",
    "ResponseHeader",
    "KeepAlive",
    "WaitCondition",
    "WaitConditionAnd",
    "WaitConditionOr",
    "WaitConditionNegate",
    "WaitTrigger",
    "WaitObject",
    "WaitTimeout",
    "Localtime",
];

fn mk_dialect(block: &[u8]) -> MkRead {
    let mut pos = 0;
    let mut first = true;
    for line in block.split_inclusive(|b| *b == b'\n') {
        pos += line.len();
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\n', '\r']);
        if text.is_empty() {
            continue;
        }
        if first {
            first = false;
            if text.starts_with("GET") {
                continue;
            }
            if text.starts_with("COMMAND ") {
                return MkRead::Whole;
            }
            return MkRead::InvalidMethod;
        }
        let known = text.split_once(':').is_some_and(|(name, _)| MK_HEADERS.contains(&name));
        if !known {
            return MkRead::StopsAt { line: text.to_owned(), end: pos };
        }
    }
    MkRead::Whole
}

async fn answer<S: AsyncWrite + Unpin>(shared: &Shared, s: &mut S, q: &Query) -> io::Result<Next> {
    shared.queries.fetch_add(1, Ordering::Relaxed);
    *lock(&shared.per_table).entry(q.table.clone()).or_default() += 1;
    let knobs = {
        let mut k = lock(&shared.knobs);
        if !k.applies_to(&q.table) {
            Knobs { bulk_bytes: k.bulk_bytes, rtt: k.rtt, ..Knobs::default() }
        } else {
            let snapshot = k.clone();
            k.close_without_answer = k.close_without_answer.saturating_sub(1);
            snapshot
        }
    };
    if knobs.close_without_answer > 0 {
        return Ok(Next::Close);
    }
    if let Some(line) = &knobs.unframed_reply {
        s.write_all(format!("{line}\n").as_bytes()).await?;
        return Ok(Next::Close);
    }
    if knobs.hang {
        let mut changed = shared.knobs_changed.subscribe();
        while lock(&shared.knobs).hang_applies_to(&q.table) {
            if changed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
    if !knobs.delay.is_zero() {
        tokio::time::sleep(knobs.delay).await;
    }
    let counters = StatusCounters {
        program_start: shared.program_start.load(Ordering::Relaxed) as i64,
        connections: shared.accepted.load(Ordering::Relaxed),
        requests: shared.queries.load(Ordering::Relaxed),
    };
    let (status, body) = if q.table == "bulk" {
        (Status::Ok, Body::Bulk(knobs.bulk_bytes))
    } else {
        let data = shared.data.read().unwrap_or_else(|e| e.into_inner());
        match query::run(&data, q, &counters) {
            Ok(b) => (Status::Ok, Body::Bytes(b)),
            Err(e) => (e.status, Body::Bytes(livemux_protocol::response::error_body(&e.message))),
        }
    };
    let len = match &body {
        Body::Bytes(b) => b.len() as u64,
        Body::Bulk(n) => *n,
    };
    let mut w = FaultyWriter { s, sent: 0, knobs: &knobs };
    if q.style.fixed16 {
        let header = ResponseHeader::new(status, len).encode();
        if !w.write(&header).await? {
            return Ok(Next::Close);
        }
    }
    let complete = match body {
        Body::Bytes(b) => w.write(&b).await?,
        Body::Bulk(n) => {
            let chunk = if knobs.write_chunk == 0 { DEFAULT_WRITE_CHUNK } else { knobs.write_chunk };
            let mut block = vec![0u8; chunk];
            let mut off = 0u64;
            let mut ok = true;
            while ok && off < n {
                let take = (n - off).min(chunk as u64) as usize;
                bulk::fill(off, &mut block[..take]);
                ok = w.write(&block[..take]).await?;
                off += take as u64;
            }
            ok
        }
    };
    // Icinga 2 ends a keep-alive connection after an error answer;
    // mk-livestatus keeps it.
    let keep = status == Status::Ok || lock(&shared.knobs).mk_headers;
    Ok(if complete && q.style.keepalive && keep { Next::Continue } else { Next::Close })
}

/// Writes a response under the write knobs: chunked, paused, cut short.
struct FaultyWriter<'a, S> {
    s: &'a mut S,
    sent: u64,
    knobs: &'a Knobs,
}

impl<S: AsyncWrite + Unpin> FaultyWriter<'_, S> {
    /// Write `data`; `Ok(false)` when the response was cut by `close_after_bytes`.
    async fn write(&mut self, mut data: &[u8]) -> io::Result<bool> {
        let chunk = if self.knobs.write_chunk == 0 { usize::MAX } else { self.knobs.write_chunk };
        while !data.is_empty() {
            if self.sent > 0 && !self.knobs.write_pause.is_zero() {
                tokio::time::sleep(self.knobs.write_pause).await;
            }
            let mut n = data.len().min(chunk);
            let mut cut = false;
            if let Some(limit) = self.knobs.close_after_bytes {
                let left = limit.saturating_sub(self.sent);
                if (n as u64) >= left {
                    n = left as usize;
                    cut = true;
                }
            }
            self.s.write_all(&data[..n]).await?;
            self.sent += n as u64;
            data = &data[n..];
            if cut {
                self.s.flush().await?;
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::time::{Duration, Instant};

    async fn answer_of(c: &mut tokio::io::DuplexStream) -> String {
        let mut head = [0u8; 16];
        c.read_exact(&mut head).await.expect("header");
        let len: usize = String::from_utf8_lossy(&head[4..15]).trim().parse().expect("length");
        let mut body = vec![0u8; len];
        c.read_exact(&mut body).await.expect("body");
        String::from_utf8(body).expect("utf-8")
    }

    /// Requests pipelined on one connection each pay the round trip from
    /// their own arrival, in parallel, as over a network; only the first
    /// answer on a connection pays the handshakes too.
    #[tokio::test(start_paused = true)]
    async fn the_round_trip_counts_from_each_requests_arrival() {
        let site = SimSite::start(SimConfig { listen: Listen::Memory, ..SimConfig::tcp("rtt") }).await.expect("site");
        let rtt = Duration::from_millis(20);
        site.set_knobs(|k| {
            k.rtt = rtt;
            k.tls_handshake_rtts = 1;
        });
        let mut c = site.connect_in_memory().expect("connect");
        let q = |n: usize| format!("GET hosts\nColumns: name\nLimit: {n}\nResponseHeader: fixed16\nKeepAlive: on\n\n");
        let t0 = Instant::now();
        c.write_all(q(1).as_bytes()).await.expect("write");
        assert_eq!(answer_of(&mut c).await, "host-0000\n");
        assert_eq!(t0.elapsed(), 3 * rtt, "TCP and TLS handshakes, then the query");
        let t1 = Instant::now();
        c.write_all(q(1).as_bytes()).await.expect("write");
        tokio::time::sleep(Duration::from_millis(5)).await;
        c.write_all(q(2).as_bytes()).await.expect("write");
        assert_eq!(answer_of(&mut c).await, "host-0000\n");
        assert_eq!(t1.elapsed(), rtt);
        assert_eq!(answer_of(&mut c).await, "host-0000\nhost-0001\n");
        assert_eq!(t1.elapsed(), rtt + Duration::from_millis(5), "not a round trip after the first answer");
        assert_eq!(site.stats().pipelined, 1);
    }
}
