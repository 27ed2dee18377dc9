//! The site actor: one task per site that owns its channels, its heartbeat
//! and its state.
//!
//! Everything that changes a site's state happens in this task, in one
//! `select!` over: shutdown, events from its own helpers (channels returned,
//! connects finished, heartbeats answered), requests from handles (acquire a
//! channel, snapshot), an idle channel becoming readable (the site closed it),
//! and the next timer (heartbeat, reconnect, stall check). The actor never
//! waits for I/O itself: connects and heartbeats run in helper tasks that
//! report back as events, so a slow site never delays another request.
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
//! pool, never a query stuck on a connection nobody reads. The pool tries to
//! grow back every `channel_retry`.
//!
//! A heartbeat normally borrows the least recently used idle channel. When
//! every channel is busy the heartbeat waits for one; if meanwhile the site
//! sends nothing for `heartbeat_interval + heartbeat_timeout`, the heartbeat
//! goes out on one extra, temporary connection. A site busy with slow queries
//! answers it and stays ready (its queries are not disturbed); a hung core
//! does not, and is declared down.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::channel::{Activity, Channel, Lease, Return, looks_alive, poll_dead_idle};
use super::connector::{SiteStream, connect};
use super::heartbeat;
use super::{ChannelSnapshot, SiteSnapshot, SiteState, SiteStatus, timestamp};
use crate::config::SiteConfig;
use crate::error::{SiteError, fmt_duration};

/// Requests from [`SiteHandle`](super::SiteHandle)s.
pub(crate) enum Request {
    /// Lend a channel; `fresh` asks for one that never carried a query.
    Acquire { fresh: bool, reply: oneshot::Sender<Result<Lease, AcquireError>> },
    /// Describe the site for the state file.
    Snapshot { reply: oneshot::Sender<SiteSnapshot> },
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

/// Reports from the actor's helpers and leases.
pub(crate) enum Event {
    /// A lease ended.
    Returned { channel: Channel, how: Return, reason: Option<String> },
    /// A connect attempt finished.
    Connected { generation: u64, purpose: Purpose, result: Result<SiteStream, SiteError> },
    /// A heartbeat finished; the channel comes back only if it answered.
    Heartbeat { generation: u64, purpose: Purpose, channel: Option<Channel>, result: Result<i64, SiteError> },
    /// A new pool channel's admission heartbeat finished.
    Admitted { generation: u64, channel: Option<Channel>, result: Result<i64, SiteError> },
    /// The heartbeat that proves a channel clean after an error answer finished.
    Verified { generation: u64, id: u64, channel: Option<Channel>, result: Result<i64, SiteError> },
}

struct Waiter {
    fresh: bool,
    reply: oneshot::Sender<Result<Lease, AcquireError>>,
}

#[derive(Debug, Clone, Copy)]
enum Busy {
    Query,
    Heartbeat,
    /// Proved clean with a heartbeat after an error answer.
    Verify,
}

pub(crate) struct Actor {
    cfg: SiteConfig,
    /// TLS toward the site (`tls://` addresses).
    tls: Option<Arc<crate::tls::SiteTls>>,
    requests: mpsc::Receiver<Request>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Cloned into leases and helper tasks. Unbounded by type, bounded in
    /// practice: each lease, connect and heartbeat sends exactly one event.
    events_tx: mpsc::UnboundedSender<Event>,
    status_tx: watch::Sender<SiteStatus>,
    shutdown: CancellationToken,
    activity: Arc<Activity>,

    /// Idle channels; front = least recently used (heartbeats take it),
    /// back = most recently used (queries take it).
    idle: VecDeque<Channel>,
    /// Lent channels: id → what for and since when.
    busy: BTreeMap<u64, (Busy, SystemTime)>,
    /// Connect attempts in flight for the pool (and the probe).
    connecting: usize,
    /// New pool channels whose admission heartbeat is in flight.
    admitting: usize,
    /// The site served fewer channels than configured: the pool's size.
    capacity: Option<usize>,
    /// When to try one channel more than `capacity`.
    grow_at: Option<Instant>,
    /// The smallest capacity reported in the log so far.
    warned_capacity: Option<usize>,
    /// Queries waiting for a channel, in arrival order.
    waiters: VecDeque<Waiter>,

    state: SiteState,
    state_since: SystemTime,
    /// The failure that took the site down last.
    last_error: Option<Arc<SiteError>>,
    last_failed_connect: Option<SystemTime>,
    heartbeats: u64,
    program_start: Option<i64>,
    /// Bumped each time the site goes down; channels of older generations
    /// are closed when they come back.
    generation: u64,
    /// Cancelled when the site goes down, to stop queries in flight.
    down_token: CancellationToken,
    next_heartbeat: Option<Instant>,
    heartbeat_in_flight: bool,
    /// A heartbeat is due but every channel is busy (since when). If the
    /// site stays silent for a heartbeat period, the heartbeat goes out on an
    /// extra connection.
    heartbeat_pending: Option<Instant>,
    retry_at: Option<Instant>,
    next_id: u64,
}

impl Actor {
    pub(crate) fn new(
        cfg: SiteConfig,
        tls: Option<Arc<crate::tls::SiteTls>>,
        requests: mpsc::Receiver<Request>,
        status_tx: watch::Sender<SiteStatus>,
        shutdown: CancellationToken,
    ) -> Actor {
        let (events_tx, events) = mpsc::unbounded_channel();
        Actor {
            cfg,
            tls,
            requests,
            events,
            events_tx,
            status_tx,
            shutdown,
            activity: Arc::new(Activity::new()),
            idle: VecDeque::new(),
            busy: BTreeMap::new(),
            connecting: 0,
            admitting: 0,
            capacity: None,
            grow_at: None,
            warned_capacity: None,
            waiters: VecDeque::new(),
            state: SiteState::Starting,
            state_since: SystemTime::now(),
            last_error: None,
            last_failed_connect: None,
            heartbeats: 0,
            program_start: None,
            generation: 0,
            down_token: CancellationToken::new(),
            next_heartbeat: None,
            heartbeat_in_flight: false,
            heartbeat_pending: None,
            retry_at: None,
            next_id: 1,
        }
    }

    pub(crate) async fn run(mut self) {
        self.start_connect(Purpose::Probe);
        loop {
            let timer = self.next_deadline();
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(ev) = self.events.recv() => self.on_event(ev),
                req = self.requests.recv() => match req {
                    Some(r) => self.on_request(r),
                    None => break,
                },
                i = std::future::poll_fn(|cx| poll_dead_idle(self.idle.make_contiguous(), cx)) => {
                    if let Some(ch) = self.idle.remove(i) {
                        tracing::debug!(site = %self.cfg.name, channel = ch.id, "idle channel closed by the site; replacing it");
                    }
                    self.ensure_channels();
                }
                _ = sleep_until(timer) => self.on_timer(),
            }
        }
        self.drain().await;
    }

    /// Shutdown: refuse new queries, close idle channels, and let the
    /// queries in flight finish (the daemon bounds this by `shutdown_grace`);
    /// no more heartbeats or connects.
    async fn drain(mut self) {
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(Err(AcquireError::ShuttingDown));
        }
        self.idle.clear();
        while self.busy.values().any(|(kind, _)| matches!(kind, Busy::Query)) {
            tokio::select! {
                Some(ev) = self.events.recv() => {
                    if let Event::Returned { channel, .. } = ev {
                        self.busy.remove(&channel.id);
                    }
                }
                req = self.requests.recv() => match req {
                    Some(Request::Acquire { reply, .. }) => {
                        let _ = reply.send(Err(AcquireError::ShuttingDown));
                    }
                    Some(Request::Snapshot { reply }) => {
                        let _ = reply.send(self.snapshot());
                    }
                    None => break,
                },
            }
        }
        self.down_token.cancel();
    }

    fn next_deadline(&self) -> Option<Instant> {
        let stall = self.heartbeat_pending.map(|since| self.stall_deadline(since));
        [self.retry_at, self.next_heartbeat, stall, self.grow_at].into_iter().flatten().min()
    }

    fn stall_deadline(&self, pending_since: Instant) -> Instant {
        let p = &self.cfg.params;
        pending_since.max(self.activity.last_rx()) + p.heartbeat_interval + p.heartbeat_timeout
    }

    // === requests ===

    fn on_request(&mut self, req: Request) {
        match req {
            Request::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Request::Acquire { fresh, reply } => {
                if self.state == SiteState::Down
                    && let Some(cause) = &self.last_error
                {
                    let _ = reply.send(Err(AcquireError::Down(cause.clone())));
                    return;
                }
                self.waiters.push_back(Waiter { fresh, reply });
                self.dispatch();
            }
        }
    }

    /// Hand idle channels to the pending heartbeat, then to waiters in order.
    fn dispatch(&mut self) {
        let before = self.idle.len();
        self.idle.retain_mut(looks_alive);
        if self.idle.len() < before {
            self.ensure_channels();
        }
        if self.heartbeat_pending.is_some()
            && !self.heartbeat_in_flight
            && let Some(ch) = self.idle.pop_front()
        {
            self.start_heartbeat(ch, Purpose::Pool);
        }
        let mut i = 0;
        while i < self.waiters.len() && !self.idle.is_empty() {
            if self.waiters[i].reply.is_closed() {
                self.waiters.remove(i);
                continue;
            }
            let fresh = self.waiters[i].fresh;
            let pick = if fresh { self.idle.iter().rposition(|c| c.uses == 0) } else { Some(self.idle.len() - 1) };
            let Some(pos) = pick else {
                i += 1;
                continue;
            };
            let Some(w) = self.waiters.remove(i) else { break };
            let Some(ch) = self.idle.remove(pos) else { break };
            let id = ch.id;
            let lease = Lease::new(ch, self.events_tx.clone(), self.activity.clone(), self.down_token.clone());
            self.busy.insert(id, (Busy::Query, SystemTime::now()));
            if let Err(Ok(lease)) = w.reply.send(Ok(lease)) {
                // The client stopped waiting just now: the channel is untouched.
                self.busy.remove(&id);
                if let Some(ch) = lease.unlend() {
                    self.idle.push_back(ch);
                }
            }
        }
        self.make_fresh_channel_if_needed();
    }

    /// A retry waits for a never-used channel. If none is on its way, trade
    /// the least recently used idle channel for a new connection.
    fn make_fresh_channel_if_needed(&mut self) {
        if self.state != SiteState::Ready || self.connecting > 0 || !self.waiters.iter().any(|w| w.fresh) {
            return;
        }
        if self.idle.pop_front().is_some() || self.open_channels() < self.channel_limit() {
            self.start_connect(Purpose::Pool);
        }
    }

    // === events ===

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Returned { channel, how, reason } => {
                self.busy.remove(&channel.id);
                if how == Return::Verify && channel.generation == self.generation && self.state != SiteState::Down {
                    self.start_verification(channel);
                } else if how == Return::Close || channel.generation != self.generation || self.state == SiteState::Down
                {
                    if let Some(reason) = reason {
                        tracing::debug!(site = %self.cfg.name, channel = channel.id, %reason, "channel closed");
                    }
                    drop(channel);
                    self.ensure_channels();
                } else {
                    self.idle.push_back(channel);
                }
                self.dispatch();
            }
            Event::Connected { generation, purpose, result } => {
                if purpose != Purpose::Extra {
                    self.connecting -= 1;
                }
                if generation != self.generation {
                    self.ensure_channels();
                    return;
                }
                match result {
                    Ok(stream) => {
                        let ch = self.new_channel(stream);
                        if purpose == Purpose::Pool {
                            self.start_admission(ch);
                        } else {
                            self.start_heartbeat(ch, purpose);
                        }
                    }
                    Err(e) => {
                        self.last_failed_connect = Some(SystemTime::now());
                        if purpose == Purpose::Pool && matches!(e, SiteError::ConnectTimeout { .. }) {
                            // A connect that timed out (a lost SYN, a
                            // firewall limiting new connections) while other
                            // channels work: the pool shrinks to those. A
                            // refused connect means nobody listens any more.
                            self.not_admitted(e);
                        } else {
                            self.go_down(e);
                        }
                    }
                }
            }
            Event::Heartbeat { generation, purpose, channel, result } => {
                if generation != self.generation {
                    return;
                }
                self.heartbeat_in_flight = false;
                match (result, channel) {
                    (Ok(program_start), Some(mut ch)) => {
                        self.busy.remove(&ch.id);
                        ch.uses += 1;
                        ch.since = SystemTime::now();
                        self.heartbeats += 1;
                        self.note_program_start(program_start);
                        if purpose != Purpose::Extra || self.open_channels() < self.channel_limit() {
                            self.idle.push_back(ch);
                        }
                        if purpose == Purpose::Probe {
                            self.set_state(SiteState::Ready, "connected and answering heartbeats".into());
                            self.next_heartbeat = Some(Instant::now() + self.cfg.params.heartbeat_interval);
                            self.ensure_channels();
                        }
                        self.dispatch();
                    }
                    (Err(e), _) if purpose == Purpose::Extra && self.at_known_capacity() && !self.silent_too_long() => {
                        // The site has shown it serves no more connections
                        // than the busy pool: an extra one going unserved
                        // says nothing about its health, until the site has
                        // been silent for `response_idle_timeout`.
                        tracing::debug!(site = %self.cfg.name, error = %e,
                            "extra-connection heartbeat unanswered while the site serves only the busy pool; not a failure");
                    }
                    (Err(e), _) => {
                        let e = super::connector::explain(&self.cfg.address, e, purpose == Purpose::Probe);
                        self.go_down(e);
                    }
                    (Ok(_), None) => self.go_down(SiteError::ClosedWithoutAnswer),
                }
            }
            Event::Verified { generation, id, channel, result } => {
                self.busy.remove(&id);
                match (result, channel) {
                    (Ok(program_start), Some(ch)) if generation == self.generation && self.state != SiteState::Down => {
                        self.note_program_start(program_start);
                        self.idle.push_back(ch);
                    }
                    (Ok(_), _) => {}
                    (Err(e), _) => {
                        // Not the site's failure: the channel carried a bad
                        // request, and the core dealt with it in its own way.
                        tracing::debug!(site = %self.cfg.name, channel = id, error = %e,
                            "channel closed: not clean after an error answer");
                    }
                }
                self.ensure_channels();
                self.dispatch();
            }
            Event::Admitted { generation, channel, result } => {
                self.admitting -= 1;
                if generation != self.generation {
                    self.ensure_channels();
                    return;
                }
                match (result, channel) {
                    (Ok(program_start), Some(ch)) => {
                        self.note_program_start(program_start);
                        self.idle.push_back(ch);
                        self.grew();
                        self.dispatch();
                    }
                    (Err(e), _) => self.not_admitted(e),
                    (Ok(_), None) => self.not_admitted(SiteError::ClosedWithoutAnswer),
                }
            }
        }
    }

    /// A new pool channel could not be connected in time, or did not answer
    /// its admission heartbeat. With other channels working, the site serves
    /// no more connections than those: the pool shrinks to them (whether the
    /// site is alive is the heartbeat's business). With none, the site is down.
    fn not_admitted(&mut self, e: SiteError) {
        // Channels connecting or being admitted count: if they fail too, the
        // site goes down with their (often clearer) reason.
        let serving = self.open_channels();
        let limited = matches!(
            e,
            SiteError::HeartbeatTimeout(_)
                | SiteError::ClosedWithoutAnswer
                | SiteError::Io(_)
                | SiteError::ConnectTimeout { .. }
        );
        if serving == 0 || !limited {
            let e = super::connector::explain(&self.cfg.address, e, false);
            self.go_down(e);
            return;
        }
        self.capacity = Some(serving.min(self.channel_limit()));
        self.grow_at = Some(Instant::now() + self.cfg.params.channel_retry);
        let reason = match &e {
            SiteError::HeartbeatTimeout(t) => format!("got no answer within {}", fmt_duration(*t)),
            SiteError::ClosedWithoutAnswer => "was closed without an answer".to_owned(),
            other => format!("failed ({other})"),
        };
        if self.warned_capacity.is_none_or(|w| serving < w) {
            self.warned_capacity = Some(serving);
            crate::events::ChannelsLimited {
                site: &self.cfg.name,
                serving,
                configured: self.cfg.params.channels,
                reason: &reason,
                retry: self.cfg.params.channel_retry,
            }
            .emit();
        } else {
            tracing::debug!(site = %self.cfg.name, serving, %reason, "one more channel is still not served");
        }
    }

    /// A new channel was admitted. While the pool is limited, one that
    /// reached the limit tries one more right away: the site may serve
    /// more now.
    fn grew(&mut self) {
        let Some(c) = self.capacity else { return };
        let open = self.open_channels();
        if open >= self.cfg.params.channels {
            tracing::info!(site = %self.cfg.name, channels = self.cfg.params.channels, "site serves all channels again");
            self.capacity = None;
            self.warned_capacity = None;
            self.grow_at = None;
        } else if open >= c {
            self.capacity = Some(c + 1);
            self.ensure_channels();
        }
    }

    /// No byte from the site for `response_idle_timeout`.
    fn silent_too_long(&self) -> bool {
        self.activity.last_rx().elapsed() >= self.cfg.params.response_idle_timeout
    }

    /// The site serves fewer connections than `channels`, and the pool
    /// holds all it serves.
    fn at_known_capacity(&self) -> bool {
        self.capacity.is_some_and(|c| self.serving_channels() >= c)
    }

    /// The pool's size: `channels`, or fewer if the site serves fewer.
    fn channel_limit(&self) -> usize {
        self.capacity.unwrap_or(self.cfg.params.channels)
    }

    fn note_program_start(&mut self, ps: i64) {
        if let Some(old) = self.program_start
            && old != ps
        {
            tracing::info!(site = %self.cfg.name, old, new = ps, "site's core restarted or reloaded (program_start changed)");
        }
        self.program_start = Some(ps);
        self.publish();
    }

    // === timers ===

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            self.start_connect(Purpose::Probe);
        }
        if self.state == SiteState::Ready
            && let Some(t) = self.next_heartbeat
            && now >= t
        {
            self.next_heartbeat = Some(now + self.cfg.params.heartbeat_interval);
            self.waiters.retain(|w| !w.reply.is_closed());
            if !self.heartbeat_in_flight {
                self.heartbeat_pending.get_or_insert(now);
                self.dispatch();
            }
        }
        if self.grow_at.is_some_and(|t| now >= t) {
            self.grow_at = None;
            if self.state == SiteState::Ready
                && let Some(c) = self.capacity
            {
                self.capacity = Some(c + 1);
                self.ensure_channels();
            }
        }
        if let Some(since) = self.heartbeat_pending
            && now >= self.stall_deadline(since)
            && !self.heartbeat_in_flight
        {
            tracing::debug!(site = %self.cfg.name, "all channels busy and the site silent; heartbeat on an extra connection");
            self.heartbeat_pending = None;
            self.heartbeat_in_flight = true;
            self.start_connect(Purpose::Extra);
        }
    }

    // === connections and heartbeats ===

    /// Channels that answered the site's heartbeat (idle or in use).
    fn serving_channels(&self) -> usize {
        self.idle.len() + self.busy.len()
    }

    fn open_channels(&self) -> usize {
        self.idle.len() + self.busy.len() + self.connecting + self.admitting
    }

    /// While ready, keep `channels` (or as many as the site serves)
    /// connections open or opening.
    fn ensure_channels(&mut self) {
        if self.state != SiteState::Ready {
            return;
        }
        for _ in self.open_channels()..self.channel_limit() {
            self.start_connect(Purpose::Pool);
        }
    }

    fn start_connect(&mut self, purpose: Purpose) {
        if purpose != Purpose::Extra {
            self.connecting += 1;
        }
        let (address, params) = (self.cfg.address.clone(), self.cfg.params.clone());
        let (tx, generation, tls) = (self.events_tx.clone(), self.generation, self.tls.clone());
        tokio::spawn(async move {
            let result = connect(&address, &params, tls.as_ref()).await;
            let _ = tx.send(Event::Connected { generation, purpose, result });
        });
    }

    fn new_channel(&mut self, stream: SiteStream) -> Channel {
        let id = self.next_id;
        self.next_id += 1;
        Channel { id, stream, uses: 0, generation: self.generation, since: SystemTime::now() }
    }

    /// Check a new pool channel with a heartbeat before lending it.
    fn start_admission(&mut self, ch: Channel) {
        self.admitting += 1;
        let generation = self.generation;
        self.spawn_heartbeat(ch, move |channel, result| Event::Admitted { generation, channel, result });
    }

    /// Prove a channel clean after an error answer: a heartbeat on it must
    /// be answered, else it is closed (see `channel::Return::Verify`).
    fn start_verification(&mut self, ch: Channel) {
        let (generation, id) = (self.generation, ch.id);
        self.busy.insert(id, (Busy::Verify, SystemTime::now()));
        self.spawn_heartbeat(ch, move |channel, result| Event::Verified { generation, id, channel, result });
    }

    fn start_heartbeat(&mut self, ch: Channel, purpose: Purpose) {
        self.heartbeat_in_flight = true;
        self.heartbeat_pending = None;
        self.busy.insert(ch.id, (Busy::Heartbeat, SystemTime::now()));
        let generation = self.generation;
        self.spawn_heartbeat(ch, move |channel, result| Event::Heartbeat { generation, purpose, channel, result });
    }

    /// Send a heartbeat on `ch` in a helper task, bounded by
    /// `heartbeat_timeout`; `report` makes the event (the channel comes back
    /// only if it answered).
    fn spawn_heartbeat(
        &self,
        mut ch: Channel,
        report: impl FnOnce(Option<Channel>, Result<i64, SiteError>) -> Event + Send + 'static,
    ) {
        let tx = self.events_tx.clone();
        let timeout = self.cfg.params.heartbeat_timeout;
        tokio::spawn(async move {
            let (channel, result) = match tokio::time::timeout(timeout, heartbeat::exchange(&mut ch.stream)).await {
                Ok(Ok(ps)) => (Some(ch), Ok(ps)),
                Ok(Err(e)) => (None, Err(e)),
                Err(_) => (None, Err(SiteError::HeartbeatTimeout(timeout))),
            };
            let _ = tx.send(report(channel, result));
        });
    }

    // === state ===

    /// The site failed with `e`: record it and publish the state first, then
    /// answer every waiter and stop the queries in flight, so that all of
    /// them see the cause (a certificate failure is a 495 for them too).
    fn go_down(&mut self, e: SiteError) {
        let was = self.state;
        let cause = Arc::new(e);
        self.last_error = Some(cause.clone());
        self.generation += 1;
        let in_flight = std::mem::take(&mut self.down_token);
        self.idle.clear();
        self.busy.clear();
        self.heartbeat_in_flight = false;
        self.heartbeat_pending = None;
        self.next_heartbeat = None;
        self.retry_at = Some(Instant::now() + self.cfg.params.connect_retry);
        self.capacity = None;
        self.grow_at = None;
        self.warned_capacity = None;
        if was == SiteState::Down {
            tracing::debug!(site = %self.cfg.name, reason = %cause, "reconnect failed; retrying in {}", fmt_duration(self.cfg.params.connect_retry));
            self.publish();
        } else {
            self.set_state(SiteState::Down, cause.to_string());
        }
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(Err(AcquireError::Down(cause.clone())));
        }
        in_flight.cancel();
    }

    fn set_state(&mut self, to: SiteState, reason: String) {
        let from = self.state;
        if from == to {
            return;
        }
        let was_for = SystemTime::now().duration_since(self.state_since).unwrap_or_default();
        self.state = to;
        self.state_since = SystemTime::now();
        crate::events::SiteStateChanged { site: &self.cfg.name, from, to, reason: &reason, after: was_for }.emit();
        self.publish();
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

    fn snapshot(&self) -> SiteSnapshot {
        let mut channels: Vec<ChannelSnapshot> =
            self.idle.iter().map(|c| ChannelSnapshot { id: c.id, state: "idle", since: timestamp(c.since) }).collect();
        for (id, (kind, since)) in &self.busy {
            let state = match kind {
                Busy::Query => "busy",
                Busy::Heartbeat => "heartbeat",
                Busy::Verify => "verifying",
            };
            channels.push(ChannelSnapshot { id: *id, state, since: timestamp(*since) });
        }
        channels.sort_by_key(|c| c.id);
        SiteSnapshot {
            name: self.cfg.name.clone(),
            address: self.cfg.address.to_string(),
            state: self.state,
            since: timestamp(self.state_since),
            last_error: self.last_error.as_ref().map(|e| e.to_string()),
            last_failed_connect: self.last_failed_connect.map(timestamp),
            heartbeats_received: self.heartbeats,
            program_start: self.program_start,
            channels,
            channels_connecting: self.connecting + self.admitting,
            channels_served: self.capacity,
            clients_waiting: self.waiters.iter().filter(|w| !w.reply.is_closed()).count(),
            clients_connected: 0,
            clients_reaped: 0,
            last_reaped: None,
            listen: None,
            tls: self.tls.as_ref().map(|t| t.snapshot()),
            cache: None,
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
