//! Remote sites: one actor task per site, reached through a [`SiteHandle`].
//!
//! The handle is cheap to clone and is all that clients of a site need:
//! socket sessions, the state writer, and (later) internal clients such as
//! inventory sync or a federated query that fans out to many handles at once.
//!
//! - [`actor`]: the task that owns channels, heartbeat and state.
//! - [`pool`]: the pool's bookkeeping and decisions, without I/O.
//! - [`channel`]: channels and the leases that lend them to queries.
//! - [`connector`]: opening TCP/UNIX connections under a timeout.
//! - [`heartbeat`]: the protocol-level liveness query.
//! - [`exchange`]: one query's trip (acquire, send, read header, retry once).

pub(crate) mod actor;
pub mod channel;
pub(crate) mod closing;
pub mod connector;
mod desk;
pub(crate) mod events;
pub mod exchange;
pub(crate) mod heartbeat;
mod inbox;
pub(crate) mod pool;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{SiteConfig, SiteParams};
use crate::error::{QueryError, SiteError};
use actor::{AcquireError, Actor, Request};
pub use channel::Lease;
pub use exchange::{SiteResponse, send_commands, send_query, send_query_with};
pub use pool::Want;

/// Who asks, for the pool's fair share (see `pool`): named only when a
/// query must wait or join a busy channel, so a query that finds an idle
/// channel costs no system call for it.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    /// A UNIX client whose credentials are not read yet: its socket.
    pub unix: Option<std::os::fd::BorrowedFd<'a>>,
    /// The client's number otherwise (and when they cannot be read).
    pub key: u64,
}

impl Asker<'static> {
    /// livemux's own queries (the inventory sync): not counted
    /// by the fair share (they take turns in the queue as one client).
    pub const INTERNAL: Asker<'static> = Asker { unix: None, key: pool::UNCOUNTED };
}

impl Asker<'_> {
    /// The client's number.
    pub fn key(&self) -> u64 {
        match self.unix.map(crate::sockopt::peer_cred) {
            Some(Ok((uid, _, pid))) => crate::sockopt::share_key(uid, pid),
            _ => self.key,
        }
    }
}

/// Capacity of a site's request queue. Requests are tiny and the actor
/// answers each at once; the bound only matters if it is stuck.
const REQUEST_QUEUE: usize = 256;

/// A site's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteState {
    /// The first connection is being made; queries wait for a channel.
    Starting,
    /// Connected and answering heartbeats.
    Ready,
    /// Unreachable or not answering; queries fail at once.
    Down,
}

impl std::fmt::Display for SiteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SiteState::Starting => "starting",
            SiteState::Ready => "ready",
            SiteState::Down => "down",
        })
    }
}

/// What a handle can see of a site without asking the actor.
#[derive(Debug, Clone)]
pub struct SiteStatus {
    /// Current state.
    pub state: SiteState,
    /// Bumped each time the site goes down or a reload changes its address
    /// or TLS settings (cached answers of older generations are not used).
    pub generation: u64,
    /// The core's start time from the last heartbeat.
    pub program_start: Option<i64>,
    /// Heartbeats answered so far.
    pub heartbeats: u64,
    /// The failure that took the site down last (kept after it recovered).
    pub last_error: Option<Arc<SiteError>>,
}

/// One channel in a [`SiteSnapshot`].
#[derive(Debug, Clone, Serialize)]
pub struct ChannelSnapshot {
    /// Channel number.
    pub id: u64,
    /// `idle`, `busy`, `heartbeat`, or `verifying` (after an error answer).
    pub state: &'static str,
    /// Queries on it (more than one when pipelined).
    pub queries: usize,
    /// Since when (RFC 3339).
    pub since: String,
}

/// A site as written to the state file.
#[derive(Debug, Clone, Serialize)]
pub struct SiteSnapshot {
    /// Site name.
    pub name: String,
    /// Site address.
    pub address: String,
    /// Current state.
    pub state: SiteState,
    /// Since when (RFC 3339).
    pub since: String,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// When a connect last failed (RFC 3339).
    pub last_failed_connect: Option<String>,
    /// Heartbeats answered.
    pub heartbeats_received: u64,
    /// The core's start time (Unix seconds).
    pub program_start: Option<i64>,
    /// Open channels.
    pub channels: Vec<ChannelSnapshot>,
    /// Connections being opened.
    pub channels_connecting: usize,
    /// Connections closed on a path that was failing, whose FIN the site
    /// has not acknowledged yet (reset when it answers again).
    pub channels_closing: usize,
    /// Queries waiting for a channel.
    pub clients_waiting: usize,
    /// Client connections on the site's socket (and TCP listener).
    pub clients_connected: u64,
    /// TCP clients dropped because their host stopped answering.
    pub clients_reaped: u64,
    /// The last such client: when, who, why.
    pub last_reaped: Option<ReapRecord>,
    /// The TCP listener's address, if the site has one.
    pub listen: Option<String>,
    /// TLS toward the site, for `tls://` addresses.
    pub tls: Option<crate::tls::TlsSnapshot>,
    /// The site's query cache.
    pub cache: Option<crate::cache::CacheStats>,
    /// `channels_max` in effect.
    pub channels_max: usize,
    /// The last answered heartbeat's round trip, milliseconds.
    pub heartbeat_rtt_ms: Option<f64>,
    /// Requests from clients since start (GETs and COMMANDs).
    pub queries: u64,
    /// Of those, answered with the proxy's own error (site down, timeout,
    /// no free channel, a malformed or oversized request, ...).
    pub errors: u64,
    /// HW/SW inventory sync (absent unless `[inventory]` is configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inventory: Option<crate::inventory::InventorySnapshot>,
    /// Set when the site served fewer channels than the pool asked for:
    /// how many it does (the pool's cap until a retry gets one more).
    pub channels_served: Option<usize>,
    /// Queries pipelined behind others on a busy channel so far.
    pub queries_pipelined: u64,
    /// The most channels open at once since the daemon started (to size
    /// `channels_max`: a peak at it says queries waited or were pipelined).
    pub channels_peak: usize,
}

/// What the actor reports of its site: the part of a [`SiteSnapshot`] only
/// it knows.
pub(crate) struct PoolReport {
    pub state: SiteState,
    pub since: SystemTime,
    pub last_error: Option<String>,
    pub last_failed_connect: Option<SystemTime>,
    pub heartbeats: u64,
    pub program_start: Option<i64>,
    /// (id, state, since, queries) of every open channel.
    pub channels: Vec<(u64, &'static str, SystemTime, usize)>,
    /// Queries pipelined behind others so far.
    pub pipelined: u64,
    /// The most channels serving at once so far.
    pub peak: usize,
    /// Connects and admissions in flight.
    pub opening: usize,
    pub served: Option<usize>,
    pub waiting: usize,
    pub tls: Option<crate::tls::TlsSnapshot>,
    pub heartbeat_rtt_us: Option<u64>,
    pub channels_max: usize,
    pub closing: usize,
}

/// A dropped TCP client, for the state file.
#[derive(Debug, Clone, Serialize)]
pub struct ReapRecord {
    /// When (RFC 3339).
    pub at: String,
    /// The client's address.
    pub peer: String,
    /// Why.
    pub reason: String,
}

pub(crate) use crate::config::units::timestamp;

/// The way to a site's actor.
#[derive(Clone)]
pub struct SiteHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    name: String,
    /// Replaced by a reload (short critical sections only).
    address: std::sync::RwLock<String>,
    params: std::sync::RwLock<Arc<SiteParams>>,
    /// Bumped when a reload replaces `params` (see [`HeldParams`]).
    params_version: AtomicU64,
    /// The daemon's query cache (for the site's counters in its snapshot).
    cache: Arc<crate::cache::Cache>,
    requests: mpsc::Sender<Request>,
    /// The pool, where the everyday query takes and gives back a channel
    /// without a message to the actor.
    desk: Arc<desk::Desk>,
    status: watch::Receiver<SiteStatus>,
    clients: AtomicU64,
    reaped: AtomicU64,
    queries: AtomicU64,
    errors: AtomicU64,
    metrics: crate::counters::SiteMetrics,
    /// Short critical sections only (no await while held).
    last_reaped: std::sync::Mutex<Option<ReapRecord>>,
    inventory: std::sync::Mutex<Option<Arc<crate::inventory::InventoryStatus>>>,
    listen: std::sync::OnceLock<std::net::SocketAddr>,
}

impl SiteHandle {
    /// Start a site's actor on `tracker`; it stops when `shutdown` is cancelled.
    /// `tls` is required for a `tls://` address.
    pub fn spawn(
        cfg: SiteConfig,
        tls: Option<std::sync::Arc<crate::tls::SiteTls>>,
        cache: Arc<crate::cache::Cache>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> SiteHandle {
        let connector = Arc::new(connector::NetConnector::new(cfg.address.clone(), cfg.params.clone(), tls.clone()));
        SiteHandle::spawn_with(cfg, connector, tls, cache, shutdown, tracker)
    }

    /// [`SiteHandle::spawn`] with connections opened by `connector`.
    pub(crate) fn spawn_with(
        cfg: SiteConfig,
        connector: Arc<dyn connector::Connect>,
        tls: Option<std::sync::Arc<crate::tls::SiteTls>>,
        cache: Arc<crate::cache::Cache>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> SiteHandle {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let initial = SiteStatus {
            state: SiteState::Starting,
            generation: 0,
            program_start: None,
            heartbeats: 0,
            last_error: None,
        };
        let (status_tx, status_rx) = watch::channel(initial);
        let metrics = crate::counters::global().site(&cfg.name);
        let span = tracing::info_span!("site", site = %cfg.name);
        let (actor, desk) = Actor::new(cfg.clone(), connector, tls, rx, status_tx, shutdown, metrics.clone());
        let inner = HandleInner {
            name: cfg.name.clone(),
            address: std::sync::RwLock::new(cfg.address.to_string()),
            params: std::sync::RwLock::new(Arc::new(cfg.params.clone())),
            params_version: AtomicU64::new(0),
            cache,
            requests: tx,
            desk,
            status: status_rx,
            clients: AtomicU64::new(0),
            reaped: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            metrics: metrics.clone(),
            last_reaped: std::sync::Mutex::new(None),
            inventory: std::sync::Mutex::new(None),
            listen: std::sync::OnceLock::new(),
        };
        tracker.spawn(tracing::Instrument::instrument(actor.run(), span));
        SiteHandle { inner: Arc::new(inner) }
    }

    /// Site name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Site settings (a reload may replace them; take them per use).
    pub fn params(&self) -> Arc<SiteParams> {
        self.inner.params.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The settings for a session to hold (see [`HeldParams`]).
    pub fn hold_params(&self) -> HeldParams {
        let version = self.inner.params_version.load(Ordering::Acquire);
        HeldParams { version, params: self.params() }
    }

    /// `held`, re-read if a reload replaced the settings since.
    pub fn refresh<'a>(&self, held: &'a mut HeldParams) -> &'a Arc<SiteParams> {
        if self.inner.params_version.load(Ordering::Acquire) != held.version {
            *held = self.hold_params();
        }
        &held.params
    }

    /// The site's address, as configured.
    pub fn address(&self) -> String {
        self.inner.address.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Apply a reload's settings: `params` at once for everything that
    /// reads them per query; the actor resizes its pool and, with a new
    /// address or TLS settings, retires its channels (queries in flight
    /// finish on them) and opens new ones.
    pub async fn reconfigure(&self, cfg: SiteConfig, tls: Option<Arc<crate::tls::SiteTls>>) {
        let reconnect = self.address() != cfg.address.to_string() || self.params().tls != cfg.params.tls;
        *self.inner.params.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cfg.params.clone());
        self.inner.params_version.fetch_add(1, Ordering::Release);
        *self.inner.address.write().unwrap_or_else(|e| e.into_inner()) = cfg.address.to_string();
        let connector = Arc::new(connector::NetConnector::new(cfg.address.clone(), cfg.params.clone(), tls.clone()));
        let r = actor::Reconfigure { cfg, connector, tls, reconnect };
        // A gone actor (shutdown) has nothing to reconfigure.
        let _ = self.inner.requests.send(Request::Reconfigure(Box::new(r))).await;
    }

    /// The site's current status.
    pub fn status(&self) -> SiteStatus {
        self.inner.status.borrow().clone()
    }

    /// Wait until the status satisfies `f` (returns at once if it already does).
    pub async fn wait_for(&self, mut f: impl FnMut(&SiteStatus) -> bool) -> SiteStatus {
        let mut rx = self.inner.status.clone();
        match rx.wait_for(|s| f(s)).await {
            Ok(s) => s.clone(),
            Err(_) => self.status(),
        }
    }

    /// Borrow a channel (or a place on one) for `want`: at most
    /// `channel_timeout`, and not past `deadline`.
    pub async fn acquire(&self, want: Want, asker: &Asker<'_>, deadline: Instant) -> Result<Lease, QueryError> {
        // The everyday case: an idle channel, nobody waiting.
        if let Some(lease) = self.inner.desk.take_idle(want, asker) {
            self.inner.metrics.waited(Duration::ZERO);
            return Ok(lease);
        }
        let params = self.params();
        let start = Instant::now();
        let wait_until = deadline.min(start + params.channel_timeout);
        let (reply, rx) = oneshot::channel();
        let sent = tokio::time::timeout_at(
            wait_until,
            self.inner.requests.send(Request::Acquire { want, client: asker.key(), reply }),
        );
        match sent.await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(QueryError::ShuttingDown),
            Err(_) => return Err(self.wait_error(start, wait_until, deadline)),
        }
        match tokio::time::timeout_at(wait_until, rx).await {
            Ok(Ok(Ok(lease))) => {
                self.inner.metrics.waited(start.elapsed());
                Ok(lease)
            }
            Ok(Ok(Err(AcquireError::Down(cause)))) => {
                Err(QueryError::SiteDown { site: self.inner.name.clone(), cause })
            }
            Ok(Ok(Err(AcquireError::ShuttingDown))) | Ok(Err(_)) => Err(QueryError::ShuttingDown),
            Err(_) => Err(self.wait_error(start, wait_until, deadline)),
        }
    }

    fn wait_error(&self, start: Instant, wait_until: Instant, deadline: Instant) -> QueryError {
        let site = self.inner.name.clone();
        let waited = wait_until.saturating_duration_since(start);
        if wait_until >= deadline {
            return self.timeout_error();
        }
        match self.status().state {
            SiteState::Starting => QueryError::NotConnected { site, waited },
            SiteState::Down => self.down_error(),
            SiteState::Ready => QueryError::NoFreeChannel { site, waited },
        }
    }

    pub(crate) fn timeout_error(&self) -> QueryError {
        QueryError::Timeout { site: self.inner.name.clone(), after: self.params().query_timeout }
    }

    /// The error for queries cut off because the site went down: the cause
    /// (published before queries are stopped), when known.
    pub(crate) fn down_error(&self) -> QueryError {
        let site = self.inner.name.clone();
        let status = self.inner.status.borrow();
        match (&status.state, &status.last_error) {
            (SiteState::Down, Some(cause)) => QueryError::SiteDown { site, cause: cause.clone() },
            _ => QueryError::WentDown { site },
        }
    }

    /// Describe the site for the state file: what the actor reports, the
    /// handle's client counters and the site's cache counters, composed
    /// here and nowhere else. `None` if the actor is gone or does not
    /// answer within `timeout`.
    pub async fn snapshot(&self, timeout: Duration) -> Option<SiteSnapshot> {
        let (reply, rx) = oneshot::channel();
        let ask = async {
            self.inner.requests.send(Request::Snapshot { reply }).await.ok()?;
            rx.await.ok()
        };
        let r = tokio::time::timeout(timeout, ask).await.ok().flatten()?;
        let i = &self.inner;
        Some(SiteSnapshot {
            name: i.name.clone(),
            address: self.address(),
            state: r.state,
            since: timestamp(r.since),
            last_error: r.last_error,
            last_failed_connect: r.last_failed_connect.map(timestamp),
            heartbeats_received: r.heartbeats,
            program_start: r.program_start,
            channels: r
                .channels
                .into_iter()
                .map(|(id, state, since, queries)| ChannelSnapshot { id, state, since: timestamp(since), queries })
                .collect(),
            channels_connecting: r.opening,
            channels_closing: r.closing,
            channels_served: r.served,
            queries_pipelined: r.pipelined,
            channels_peak: r.peak,
            clients_waiting: r.waiting,
            clients_connected: i.clients.load(Ordering::Relaxed),
            clients_reaped: i.reaped.load(Ordering::Relaxed),
            last_reaped: i.last_reaped.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            listen: i.listen.get().map(|a| a.to_string()),
            tls: r.tls,
            cache: Some(i.cache.stats(&i.name)),
            inventory: self.inventory_status(),
            channels_max: r.channels_max,
            heartbeat_rtt_ms: r.heartbeat_rtt_us.map(|us| us as f64 / 1000.0),
            queries: i.queries.load(Ordering::Relaxed),
            errors: i.errors.load(Ordering::Relaxed),
        })
    }

    /// The site's accumulating metrics.
    pub fn metrics(&self) -> &crate::counters::SiteMetrics {
        &self.inner.metrics
    }

    /// Count a client's request.
    pub fn note_query(&self) {
        self.inner.queries.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a request answered with the proxy's own error.
    pub fn note_error(&self) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a dropped TCP client.
    pub fn note_reaped(&self, peer: &str, reason: &str) {
        self.inner.reaped.fetch_add(1, Ordering::Relaxed);
        let rec = ReapRecord { at: timestamp(SystemTime::now()), peer: peer.to_owned(), reason: reason.to_owned() };
        *self.inner.last_reaped.lock().unwrap_or_else(|e| e.into_inner()) = Some(rec);
    }

    /// Attach the site's inventory sync status.
    pub fn set_inventory_status(&self, status: Arc<crate::inventory::InventoryStatus>) {
        *self.inner.inventory.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
    }

    /// The site's inventory sync status, if the sync is configured.
    pub fn inventory_status(&self) -> Option<crate::inventory::InventorySnapshot> {
        self.inner.inventory.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|s| s.snapshot())
    }

    /// Record the address the site's TCP listener is bound to.
    pub fn set_listen_addr(&self, addr: std::net::SocketAddr) {
        let _ = self.inner.listen.set(addr);
    }

    /// The address the site's TCP listener is bound to, if it has one.
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.listen.get().copied()
    }

    /// Count a client connection for the state file; the guard uncounts it.
    pub fn client_connected(&self) -> ClientCount {
        self.inner.clients.fetch_add(1, Ordering::Relaxed);
        ClientCount(self.clone())
    }
}

/// A site's settings as a session holds them between requests: re-read
/// (through the handle's lock) only after a reload replaced them, so that
/// a query reads them without touching anything another core writes.
#[derive(Debug, Clone)]
pub struct HeldParams {
    version: u64,
    params: Arc<SiteParams>,
}

/// Keeps a client counted while alive.
pub struct ClientCount(SiteHandle);

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.inner.clients.fetch_sub(1, Ordering::Relaxed);
    }
}
