//! The site actor: one task per site that owns its channels, its heartbeat
//! and its state.
//!
//! Everything that changes a site's state happens in this task, in one
//! `select!` over: shutdown, events from its own helpers (channels returned,
//! connects finished, heartbeats answered), requests from handles (acquire a
//! channel, snapshot), an idle channel becoming readable (the site closed
//! it), and the next timer. The actor never waits for I/O itself: connects
//! and heartbeats run in helper tasks it owns (a `JoinSet`, aborted with
//! the actor) that report back as events, so a slow site never delays
//! another request. What to do is decided by the [`Pool`] (which channel,
//! how many connections) and the heartbeat [`Schedule`]; the actor reads as
//! "on X, ask them, do Y".
//!
//! States: `starting` (first connect and heartbeat in progress; queries wait
//! for a channel), `ready`, `down` (answers every query at once with the last
//! failure, and reconnects on its own after `connect_retry`). A site counts as
//! ready again only when a fresh connection has answered a heartbeat, so a
//! core that accepts connections but hangs does not flap.
//!
//! A new pool channel answers a heartbeat before it is lent to anyone
//! ("admission"): a site that accepts more connections than it serves
//! (Icinga 2 serves 2 × its cores; the rest wait in the kernel's backlog) or
//! closes the surplus (xinetd's `instances`) costs a warning and a smaller
//! pool, never a query stuck on a connection nobody reads. After an error
//! answer a channel is proved clean the same way before it is lent again.
//!
//! A heartbeat normally borrows the least recently used idle channel. When
//! every channel is busy the heartbeat waits for one; if meanwhile the site
//! sends nothing for `heartbeat_interval + heartbeat_timeout`, the heartbeat
//! goes out on one extra, temporary connection. A site busy with slow queries
//! answers it and stays ready (its queries are not disturbed); a hung core
//! does not, and is declared down.
//!
//! This file is the loop and the query side (requests, lending, returns,
//! timers, reload, the snapshot); `health.rs` is the side toward the site
//! (connects, admission, verification, heartbeats, state changes).

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::channel::{Activity, Channel, Lease, Return, looks_alive, poll_dead_idle};
use super::closing::Closing;
use super::connector::{Connect, SiteStream};
use super::desk::{Desk, DeskState};
use super::heartbeat::Schedule;
use super::inbox::{Inbox, Outbox, inbox};
use super::pool::{Back, Conn, Pool, Sizes, Waiting, Want};
use super::{PoolReport, SiteState, SiteStatus};
use crate::config::SiteConfig;
use crate::error::SiteError;

mod health;

/// Requests from [`SiteHandle`](super::SiteHandle)s.
pub(crate) enum Request {
    /// Lend a channel (or a place on one) for `want`.
    Acquire { want: Want, client: u64, reply: oneshot::Sender<Result<Lease, AcquireError>> },
    /// Describe the site for the state file.
    Snapshot { reply: oneshot::Sender<PoolReport> },
    /// New settings (a configuration reload), see [`Reconfigure`].
    Reconfigure(Box<Reconfigure>),
}

/// A reload's new settings for a site. The connector always carries the new
/// connect settings; with `reconnect` (a new address or TLS settings) the
/// channels in use are retired: idle ones close now, busy ones when their
/// queries are done, and new queries get channels to the new place.
pub(crate) struct Reconfigure {
    pub(crate) cfg: SiteConfig,
    pub(crate) connector: Arc<dyn Connect>,
    pub(crate) tls: Option<Arc<crate::tls::SiteTls>>,
    pub(crate) reconnect: bool,
}

/// Why the actor refused to lend a channel.
#[derive(Debug, Clone)]
pub(crate) enum AcquireError {
    /// The site is down: the failure that took it down.
    Down(Arc<SiteError>),
    /// The proxy is shutting down.
    ShuttingDown,
}

/// What a new connection or a heartbeat is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A pool channel for queries.
    Pool,
    /// The first connection while starting or after the site was down: the
    /// site is ready once it answers a heartbeat.
    Probe,
    /// A temporary connection for the heartbeat while every pool channel is
    /// busy and the site has been silent: it tells a busy site from a hung one.
    Extra,
}

/// Reports from the actor's helpers and leases. Kept small (32 bytes): an
/// unbounded channel holds its messages in blocks of 32 and keeps a few
/// blocks for reuse, per site (with 128-byte events that was 12 KiB of a
/// site's 24); the rare, large reports are boxed.
pub(crate) enum Event {
    /// A lease ended.
    // A thin pointer for the rare reason keeps the event at 32 bytes.
    #[allow(clippy::box_collection)]
    Returned { id: u64, how: Return, reason: Option<Box<String>>, client: u64 },
    /// A helper finished.
    Helper(Box<HelperDone>),
}

/// What a helper task reports.
pub(crate) enum HelperDone {
    /// A connect attempt finished.
    Connected { generation: u64, purpose: Purpose, result: Result<SiteStream, SiteError> },
    /// A heartbeat on channel `id` finished; the channel comes back only if it answered.
    Heartbeat { generation: u64, id: u64, purpose: Purpose, channel: Option<Channel>, result: Result<i64, SiteError> },
    /// A new pool channel's admission heartbeat finished.
    Admitted { generation: u64, channel: Option<Channel>, result: Result<i64, SiteError> },
    /// The heartbeat that proves a channel clean after an error answer finished.
    Verified { generation: u64, id: u64, channel: Option<Channel>, result: Result<i64, SiteError> },
}

/// A query waiting for a channel.
pub(crate) struct Waiter {
    want: Want,
    /// Its client, for the fair share.
    client: u64,
    reply: oneshot::Sender<Result<Lease, AcquireError>>,
}

impl Waiting for Waiter {
    fn wants(&self) -> Want {
        self.want
    }
    fn client(&self) -> u64 {
        self.client
    }

    fn gone(&self) -> bool {
        self.reply.is_closed()
    }
}

impl Conn for Channel {
    fn id(&self) -> u64 {
        self.id
    }

    fn used(&self) -> bool {
        self.uses > 0
    }
}

pub(crate) struct Actor {
    cfg: SiteConfig,
    /// Opens connections to the site.
    connector: Arc<dyn Connect>,
    /// TLS toward the site (`tls://` addresses), for the snapshot.
    tls: Option<Arc<crate::tls::SiteTls>>,
    requests: mpsc::Receiver<Request>,
    events: Inbox,
    /// Cloned into leases and helper tasks. Unbounded by type, bounded in
    /// practice: each lease, connect and heartbeat sends exactly one event.
    events_tx: Outbox,
    status_tx: watch::Sender<SiteStatus>,
    shutdown: CancellationToken,
    activity: Arc<Activity>,
    /// Connects and heartbeats in flight; aborted when the actor ends.
    helpers: JoinSet<()>,
    /// The last answered heartbeat's round trip, µs (0: none yet).
    heartbeat_rtt_us: Arc<std::sync::atomic::AtomicU64>,
    metrics: crate::counters::SiteMetrics,

    /// The pool, shared with the queries (see `desk`).
    desk: Arc<Desk>,
    /// Closed connections the site may not have heard of (see `closing`).
    closing: Arc<Closing>,
    schedule: Schedule,

    state: SiteState,
    state_since: SystemTime,
    /// The failure that took the site down last.
    last_error: Option<Arc<SiteError>>,
    last_failed_connect: Option<SystemTime>,
    heartbeats: u64,
    program_start: Option<i64>,
    /// Bumped each time the site goes down or a reload gives it a new
    /// address or TLS settings; channels of older generations are closed
    /// when they come back.
    generation: u64,
    /// Draining for shutdown: the desk stays closed.
    stopping: bool,
    /// When to reconnect after the site went down.
    retry_at: Option<Instant>,
    /// When to try pool connects again after livemux ran out of descriptors.
    local_retry_at: Option<Instant>,
    /// livemux is out of descriptors (logged once per episode).
    fd_exhausted: bool,
    next_id: u64,
}

impl Actor {
    /// The actor for a site, and the desk its handles lend channels from.
    pub(crate) fn new(
        cfg: SiteConfig,
        connector: Arc<dyn Connect>,
        tls: Option<Arc<crate::tls::SiteTls>>,
        requests: mpsc::Receiver<Request>,
        status_tx: watch::Sender<SiteStatus>,
        shutdown: CancellationToken,
        metrics: crate::counters::SiteMetrics,
    ) -> (Actor, Arc<Desk>) {
        let (events_tx, events) = inbox();
        let p = &cfg.params;
        let pool = Pool::new(sizes(p));
        let desk = Desk::new(pool, events_tx.clone());
        let schedule = Schedule::new(p.heartbeat_interval, p.heartbeat_timeout);
        let closing = Arc::new(Closing::new(closing_limit(p)));
        let actor = Actor {
            cfg,
            connector,
            tls,
            requests,
            events,
            events_tx,
            status_tx,
            shutdown,
            activity: Arc::new(Activity::new()),
            helpers: JoinSet::new(),
            heartbeat_rtt_us: Arc::default(),
            metrics,
            desk: desk.clone(),
            closing,
            schedule,
            state: SiteState::Starting,
            state_since: SystemTime::now(),
            last_error: None,
            last_failed_connect: None,
            heartbeats: 0,
            program_start: None,
            generation: 0,
            stopping: false,
            retry_at: None,
            local_retry_at: None,
            fd_exhausted: false,
            next_id: 1,
        };
        (actor, desk)
    }

    /// The pool, under the desk's lock (never held across a call that
    /// takes it again: bind what is needed, then let it go).
    fn desk(&self) -> std::sync::MutexGuard<'_, DeskState> {
        self.desk.lock()
    }

    pub(crate) async fn run(mut self) {
        self.start_connect(Purpose::Probe);
        // One timer for the actor's life, moved to each next deadline.
        let sleep = tokio::time::sleep_until(far_future());
        tokio::pin!(sleep);
        loop {
            let timer = self.settle();
            sleep.as_mut().reset(timer.unwrap_or_else(far_future));
            let desk = self.desk.clone();
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                ev = self.events.recv() => self.on_event(ev),
                req = self.requests.recv() => match req {
                    Some(r) => self.on_request(r),
                    None => break,
                },
                i = std::future::poll_fn(|cx| {
                    let mut d = desk.lock();
                    // Channels given back at the desk are watched with this waker.
                    d.set_actor(cx.waker());
                    poll_dead_idle(d.pool.idle_mut(), cx)
                }) => {
                    let ch = self.desk().pool.remove_idle(i);
                    if let Some(ch) = ch {
                        tracing::debug!(channel = ch.id, "idle channel closed by the site; replacing it");
                    }
                    self.ensure_channels();
                }
                Some(_) = self.helpers.join_next(), if !self.helpers.is_empty() => {}
                _ = &mut sleep, if timer.is_some() => self.on_timer(),
            }
        }
        // Boxed: the drain's state would otherwise sit in every site's
        // task for its whole life.
        Box::pin(self.drain()).await;
    }

    /// Shutdown: refuse new queries, close idle channels, and let the
    /// queries in flight finish (the daemon bounds this by `shutdown_grace`);
    /// no more heartbeats or connects.
    async fn drain(mut self) {
        self.stopping = true;
        let waiters = {
            let mut d = self.desk();
            d.open = false;
            d.pool.close_idle();
            d.pool.take_waiters()
        };
        for w in waiters {
            let _ = w.reply.send(Err(AcquireError::ShuttingDown));
        }
        self.helpers.abort_all();
        while self.desk().pool.queries_in_flight() {
            tokio::select! {
                ev = self.events.recv() => {
                    if let Event::Returned { id, client, .. } = ev {
                        let _ = self.desk().pool.left(id, Back::Close, client);
                    }
                }
                req = self.requests.recv() => match req {
                    Some(Request::Acquire { reply, .. }) => {
                        let _ = reply.send(Err(AcquireError::ShuttingDown));
                    }
                    Some(Request::Snapshot { reply }) => {
                        let _ = reply.send(self.report());
                    }
                    Some(Request::Reconfigure(_)) => {}
                    None => break,
                },
            }
        }
        let down = self.desk().down.clone();
        down.cancel();
    }

    /// Before the actor waits: open or close the desk (see `desk`), give a
    /// heartbeat waiting for a channel one that came back at the desk
    /// meanwhile, and note when the actor's timer fires (returned).
    fn settle(&mut self) -> Option<Instant> {
        loop {
            let heartbeat = self.schedule.next_deadline(self.activity.last_rx());
            let wants = self.schedule.wants_channel();
            let ready = self.state == SiteState::Ready && !self.stopping;
            let mut d = self.desk();
            d.open = ready && !wants;
            d.generation = self.generation;
            if ready && wants && d.pool.idle_count() > 0 {
                drop(d);
                self.dispatch();
                continue;
            }
            let timer =
                [self.retry_at, self.local_retry_at, heartbeat, d.pool.next_deadline()].into_iter().flatten().min();
            d.timer = timer;
            return timer;
        }
    }

    // === requests ===

    fn on_request(&mut self, req: Request) {
        match req {
            Request::Snapshot { reply } => {
                let _ = reply.send(self.report());
            }
            Request::Reconfigure(r) => self.reconfigure(*r),
            Request::Acquire { want, client, reply } => {
                if self.state == SiteState::Down
                    && let Some(cause) = &self.last_error
                {
                    let _ = reply.send(Err(AcquireError::Down(cause.clone())));
                    return;
                }
                self.desk().pool.wait(Waiter { want, client, reply });
                self.dispatch();
                // Queries that found no idle channel may grow the pool.
                self.ensure_channels();
            }
        }
    }

    /// Apply a reload's settings (see [`Reconfigure`]).
    fn reconfigure(&mut self, r: Reconfigure) {
        let p = &r.cfg.params;
        let closed = self.desk().pool.resize(sizes(p));
        if !closed.is_empty() {
            tracing::debug!(closed = closed.len(), "idle channels closed: the reload asked for fewer");
        }
        drop(closed);
        self.closing.set_limit(closing_limit(p));
        self.schedule.set_timing(p.heartbeat_interval, p.heartbeat_timeout);
        self.connector = r.connector;
        self.tls = r.tls;
        self.cfg = r.cfg;
        if r.reconnect {
            // Channels of the old generation close when they come back;
            // connects and heartbeats still on their way are ignored.
            self.generation += 1;
            self.desk().pool.close_idle();
            // A heartbeat in flight belongs to the old channels: its answer
            // will be ignored, and must not hold back the new channels' own.
            self.schedule.finished();
            tracing::info!(address = %self.cfg.address, "site's address or TLS settings changed: new channels");
            if self.state != SiteState::Ready {
                self.retry_at = Some(Instant::now());
            }
            self.publish();
        }
        self.ensure_channels();
        self.dispatch();
    }

    /// Hand idle channels to the pending heartbeat, then to waiters in order.
    fn dispatch(&mut self) {
        let dead = self.desk().pool.retain_idle(looks_alive);
        if dead > 0 {
            self.ensure_channels();
        }
        if self.schedule.wants_channel() {
            let ch = self.desk().pool.take_for_heartbeat(SystemTime::now());
            if let Some(ch) = ch {
                self.start_heartbeat(ch, Purpose::Pool);
            }
        }
        // Leases are made under the lock and handed out after it: a reply
        // that finds its query gone gives the lease back at the desk.
        // Each connect started for a retry may let the others be served:
        // round again until the pool wants none.
        loop {
            let mut lent = Vec::new();
            let traded = {
                let mut d = self.desk();
                let down = d.down.clone();
                let shareable = |c: &Channel| c.link.poisoned().is_none();
                while let Some((w, id)) = d.pool.next_lend(SystemTime::now(), shareable) {
                    let Some(ch) = d.pool.channel_mut(id) else { continue };
                    let client = w.client;
                    lent.push((w, Lease::new(ch, self.desk.clone(), down.clone(), client)));
                }
                if self.state == SiteState::Ready { d.pool.fresh_connect() } else { None }
            };
            for (w, lease) in lent {
                if let Err(Ok(lease)) = w.reply.send(Ok(lease)) {
                    // The client stopped waiting just now: the channel is untouched.
                    lease.unlend();
                }
            }
            let Some(traded) = traded else { break };
            drop(traded);
            self.start_connect(Purpose::Pool);
        }
    }

    // === events ===

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Returned { id, how, reason, client } => self.on_returned(id, how, reason, client),
            Event::Helper(done) => match *done {
                HelperDone::Connected { generation, purpose, result } => self.on_connected(generation, purpose, result),
                HelperDone::Heartbeat { generation, id, purpose, channel, result } => {
                    self.on_heartbeat(generation, id, purpose, channel, result)
                }
                HelperDone::Admitted { generation, channel, result } => self.on_admitted(generation, channel, result),
                HelperDone::Verified { generation, id, channel, result } => {
                    self.on_verified(generation, id, channel, result)
                }
            },
        }
    }

    #[allow(clippy::box_collection)]
    fn on_returned(&mut self, id: u64, how: Return, reason: Option<Box<String>>, client: u64) {
        let back = match how {
            Return::Reuse => Back::Reuse,
            Return::Verify => Back::Verify,
            Return::Close => Back::Close,
        };
        if let Some(reason) = &reason {
            tracing::debug!(channel = id, %reason, "a query left its channel");
        }
        // The channel comes out when its last query left.
        let left = self.desk().pool.left(id, back, client);
        if let Some((channel, back)) = left {
            let current = channel.generation == self.generation && self.state != SiteState::Down;
            match back {
                Back::Reuse if current => self.desk().pool.push_idle(channel, Instant::now()),
                Back::Verify if current && channel.link.recover() => self.start_verification(channel),
                _ => {
                    tracing::debug!(channel = id, "channel closed");
                    drop(channel);
                    self.ensure_channels();
                }
            }
        }
        self.dispatch();
    }

    // === timers ===

    fn on_timer(&mut self) {
        let now = Instant::now();
        let swept = self.closing.sweep(2 * self.cfg.params.heartbeat_interval);
        if swept.reset > 0 {
            tracing::debug!(connections = swept.reset, "reset closed connections the site never acknowledged");
        }
        if self.local_retry_at.is_some_and(|t| now >= t) {
            self.local_retry_at = None;
            self.ensure_channels();
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            self.start_connect(Purpose::Probe);
        }
        if self.schedule.due(now) {
            self.desk().pool.drop_gone_waiters();
            if self.schedule.wants_channel() {
                self.dispatch();
            }
        }
        let (grow, idle_too_long) = self.desk().pool.on_timer(now, self.state == SiteState::Ready);
        if !idle_too_long.is_empty() {
            tracing::debug!(channels = idle_too_long.len(), "closing channels idle for channel_idle_timeout");
            drop(idle_too_long);
            self.publish();
        }
        if grow {
            self.ensure_channels();
        }
        if self.schedule.take_stalled(now, self.activity.last_rx()) {
            tracing::debug!("all channels busy and the site silent; heartbeat on an extra connection");
            self.start_connect(Purpose::Extra);
        }
    }

    fn publish(&self) {
        self.status_tx.send_replace(SiteStatus {
            state: self.state,
            generation: self.generation,
            program_start: self.program_start,
            heartbeats: self.heartbeats,
            last_error: self.last_error.clone(),
        });
    }

    /// What only the actor knows of the site, for its snapshot.
    fn report(&self) -> PoolReport {
        let d = self.desk();
        PoolReport {
            state: self.state,
            since: self.state_since,
            last_error: self.last_error.as_ref().map(|e| e.to_string()),
            last_failed_connect: self.last_failed_connect,
            heartbeats: self.heartbeats,
            program_start: self.program_start,
            channels: d.pool.describe(|c| c.since),
            pipelined: d.pool.pipelined(),
            peak: d.pool.peak(),
            opening: d.pool.opening(),
            served: d.pool.capacity(),
            waiting: d.pool.waiting(),
            tls: self.tls.as_ref().map(|t| t.snapshot()),
            heartbeat_rtt_us: Some(self.heartbeat_rtt_us.load(std::sync::atomic::Ordering::Relaxed))
                .filter(|us| *us > 0),
            channels_max: self.cfg.params.channels_max,
            closing: self.closing.len(),
        }
    }
}

/// How many closed connections a site's `Closing` keeps: its pool, a
/// probe and an extra heartbeat connection.
fn closing_limit(p: &crate::config::SiteParams) -> usize {
    p.channels_max + 2
}

/// A deadline that never comes (the actor's timer while nothing is due).
fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(365 * 86_400)
}

/// The pool's sizes and rules from a site's settings.
fn sizes(p: &crate::config::SiteParams) -> Sizes {
    Sizes {
        channels: p.channels,
        channels_max: p.channels_max,
        pipeline_depth: p.pipeline_depth,
        idle_timeout: p.channel_idle_timeout,
        channel_retry: p.channel_retry,
        fair: p.fair_share,
    }
}
