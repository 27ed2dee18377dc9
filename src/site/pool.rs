//! The channel pool's bookkeeping and decisions, without I/O.
//!
//! Which idle channel a waiting query gets, which one carries the next
//! heartbeat, how many connections to open, and how large the pool is when
//! the site serves fewer connections than configured: plain values in,
//! decisions out. The site actor owns the pool and carries its decisions
//! out (connects, heartbeats, replies); the pool never waits, reads a clock
//! or touches a socket, so every rule here is tested with plain values
//! (time enters as arguments, as tokio's `Instant` so that the actor's
//! paused-clock tests and these agree).
//!
//! The pool is generic over the channel ([`Conn`]) and the waiting query
//! ([`Waiting`]): the actor uses its `Channel` and a reply sender, the
//! tests numbers.
//!
//! Sizes: the pool keeps `channels` connections open or opening while the
//! site is ready. A new channel answers a heartbeat before it is lent
//! ("admission"); when one is not served, the pool's size (`capacity`)
//! shrinks to the channels the site does serve, and one more is tried every
//! `channel_retry` until all are served again.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// What the pool needs to know of a channel.
pub(crate) trait Conn {
    /// Its number, unique within the site.
    fn id(&self) -> u64;
    /// It carried a query or heartbeat before.
    fn used(&self) -> bool;
}

/// What the pool needs to know of a query waiting for a channel.
pub(crate) trait Waiting {
    /// It wants a channel that never carried anything (a retry after a
    /// reused channel failed).
    fn fresh(&self) -> bool;
    /// It stopped waiting (its client gave up).
    fn gone(&self) -> bool;
}

/// What a lent channel is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// A query.
    Query,
    /// A heartbeat (the scheduled one, or the first on a new connection).
    Heartbeat,
    /// The heartbeat that proves it clean after an error answer.
    Verify,
}

impl Use {
    /// The name in the state file.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Use::Query => "busy",
            Use::Heartbeat => "heartbeat",
            Use::Verify => "verifying",
        }
    }
}

/// A new channel was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shrink {
    /// No channel works: the site is down.
    Down,
    /// The pool now holds the `serving` channels that work; `first` is true
    /// when this is the smallest size seen so far (worth a warning).
    Limited { serving: usize, first: bool },
}

/// A new channel was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grow {
    /// Nothing changes.
    Same,
    /// The site serves every configured channel again.
    AllServed,
    /// The pool reached its reduced size: try one more at once.
    TryOneMore,
}

/// The pool of one site.
pub(crate) struct Pool<C, W> {
    /// The configured size (`channels`).
    channels: usize,
    /// How often one more channel is tried while the pool is reduced.
    channel_retry: Duration,
    /// Idle channels; front = least recently used (heartbeats take it),
    /// back = most recently used (queries take it, so rarely used channels
    /// are the ones the heartbeat keeps checking).
    idle: VecDeque<C>,
    /// Lent channels: what for, and since when (for the state file).
    busy: BTreeMap<u64, (Use, SystemTime)>,
    /// Connects in flight for the pool (the probe included).
    connecting: usize,
    /// New channels whose admission heartbeat is in flight.
    admitting: usize,
    /// The site served fewer channels than `channels`: the pool's size.
    capacity: Option<usize>,
    /// When to try one channel more than `capacity`.
    grow_at: Option<Instant>,
    /// The smallest capacity warned about so far.
    warned: Option<usize>,
    /// Queries waiting for a channel, in arrival order.
    waiters: VecDeque<W>,
}

impl<C: Conn, W: Waiting> Pool<C, W> {
    pub(crate) fn new(channels: usize, channel_retry: Duration) -> Self {
        Pool {
            channels,
            channel_retry,
            idle: VecDeque::new(),
            busy: BTreeMap::new(),
            connecting: 0,
            admitting: 0,
            capacity: None,
            grow_at: None,
            warned: None,
            waiters: VecDeque::new(),
        }
    }

    // === sizes ===

    /// The pool's size: `channels`, or fewer while the site serves fewer.
    pub(crate) fn limit(&self) -> usize {
        self.capacity.unwrap_or(self.channels)
    }

    /// Channels that answered a heartbeat (idle or lent).
    pub(crate) fn serving(&self) -> usize {
        self.idle.len() + self.busy.len()
    }

    /// Channels open or on their way.
    pub(crate) fn open(&self) -> usize {
        self.serving() + self.connecting + self.admitting
    }

    /// Connections to open now to bring the pool to its size.
    pub(crate) fn connects_wanted(&self) -> usize {
        self.limit().saturating_sub(self.open())
    }

    /// The reduced size, if the site serves fewer than `channels`.
    pub(crate) fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// The pool is reduced and holds every channel the site serves: one
    /// more connection would not be served.
    pub(crate) fn at_known_capacity(&self) -> bool {
        self.capacity.is_some_and(|c| self.serving() >= c)
    }

    /// Connects and admissions in flight.
    pub(crate) fn opening(&self) -> usize {
        self.connecting + self.admitting
    }

    // === connections on their way ===

    pub(crate) fn connect_started(&mut self) {
        self.connecting += 1;
    }

    pub(crate) fn connect_finished(&mut self) {
        self.connecting = self.connecting.saturating_sub(1);
    }

    pub(crate) fn admission_started(&mut self) {
        self.admitting += 1;
    }

    pub(crate) fn admission_finished(&mut self) {
        self.admitting = self.admitting.saturating_sub(1);
    }

    /// A new channel answered its admission heartbeat: it joins the pool.
    pub(crate) fn admitted(&mut self, c: C) -> Grow {
        self.idle.push_back(c);
        let Some(cap) = self.capacity else { return Grow::Same };
        let open = self.open();
        if open >= self.channels {
            self.capacity = None;
            self.warned = None;
            self.grow_at = None;
            Grow::AllServed
        } else if open >= cap {
            self.capacity = Some(cap + 1);
            Grow::TryOneMore
        } else {
            Grow::Same
        }
    }

    /// A new channel could not be connected in time, or did not answer its
    /// admission heartbeat (`limited`: the kind of failure a site gives when
    /// it serves no more connections). With other channels working, the
    /// pool shrinks to them and tries one more after `channel_retry`; with
    /// none, or for another kind of failure, the site is down.
    pub(crate) fn not_admitted(&mut self, now: Instant, limited: bool) -> Shrink {
        // Channels still connecting or being admitted count: if they fail
        // too, the site goes down with their (often clearer) reason.
        let serving = self.open();
        if serving == 0 || !limited {
            return Shrink::Down;
        }
        self.capacity = Some(serving.min(self.limit()));
        self.grow_at = Some(now + self.channel_retry);
        let first = self.warned.is_none_or(|w| serving < w);
        if first {
            self.warned = Some(serving);
        }
        Shrink::Limited { serving, first }
    }

    /// When the next timer of the pool is due.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.grow_at
    }

    /// The timer: while reduced, allow one more channel every
    /// `channel_retry`. True when a connect should start.
    pub(crate) fn on_timer(&mut self, now: Instant, ready: bool) -> bool {
        if self.grow_at.is_none_or(|t| now < t) {
            return false;
        }
        self.grow_at = None;
        match self.capacity {
            Some(c) if ready => {
                self.capacity = Some(c + 1);
                true
            }
            _ => false,
        }
    }

    // === channels ===

    /// An idle channel (a new one after its first heartbeat, or one whose
    /// lease or heartbeat ended cleanly).
    pub(crate) fn push_idle(&mut self, c: C) {
        self.busy.remove(&c.id());
        self.idle.push_back(c);
    }

    /// A lent channel came back (to be closed, verified or made idle by the
    /// caller): it is no longer busy.
    pub(crate) fn returned(&mut self, id: u64) {
        self.busy.remove(&id);
    }

    /// Mark a channel as busy with `what` (a heartbeat on a new connection,
    /// a verification).
    pub(crate) fn lent(&mut self, id: u64, what: Use, now: SystemTime) {
        self.busy.insert(id, (what, now));
    }

    /// Drop the idle channels `alive` says are dead; how many were dropped.
    pub(crate) fn retain_idle(&mut self, mut alive: impl FnMut(&mut C) -> bool) -> usize {
        let before = self.idle.len();
        self.idle.retain_mut(|c| alive(c));
        before - self.idle.len()
    }

    /// The idle channels, for watching them (a readable idle channel died).
    pub(crate) fn idle_mut(&mut self) -> &mut [C] {
        self.idle.make_contiguous()
    }

    /// Take out the idle channel at `index` (it died).
    pub(crate) fn remove_idle(&mut self, index: usize) -> Option<C> {
        self.idle.remove(index)
    }

    /// The channel for the scheduled heartbeat: the least recently used
    /// idle one.
    pub(crate) fn take_for_heartbeat(&mut self, now: SystemTime) -> Option<C> {
        let c = self.idle.pop_front()?;
        self.busy.insert(c.id(), (Use::Heartbeat, now));
        Some(c)
    }

    // === waiting queries ===

    /// A query waits for a channel (first come, first served).
    pub(crate) fn wait(&mut self, w: W) {
        self.waiters.push_back(w);
    }

    /// The next waiting query that an idle channel can serve, and that
    /// channel (marked busy): the most recently used one, or for a retry a
    /// channel that never carried anything. Queries that stopped waiting
    /// are dropped on the way.
    pub(crate) fn next_lend(&mut self, now: SystemTime) -> Option<(W, C)> {
        let mut i = 0;
        while i < self.waiters.len() && !self.idle.is_empty() {
            if self.waiters[i].gone() {
                self.waiters.remove(i);
                continue;
            }
            let pick = if self.waiters[i].fresh() {
                self.idle.iter().rposition(|c| !c.used())
            } else {
                Some(self.idle.len() - 1)
            };
            let Some(pos) = pick else {
                i += 1;
                continue;
            };
            let (Some(w), Some(c)) = (self.waiters.remove(i), self.idle.remove(pos)) else { break };
            self.busy.insert(c.id(), (Use::Query, now));
            return Some((w, c));
        }
        None
    }

    /// A lent channel that never reached its query (the query stopped
    /// waiting just then): idle again, as it was.
    pub(crate) fn unlend(&mut self, c: C) {
        self.busy.remove(&c.id());
        self.idle.push_back(c);
    }

    /// A retry waits for a never-used channel and none is on its way: start
    /// a connect, trading the least recently used idle channel for it when
    /// the pool is full. `Some(traded)` means connect (and close `traded`).
    pub(crate) fn fresh_connect(&mut self) -> Option<Option<C>> {
        if self.connecting > 0 || !self.waiters.iter().any(|w| w.fresh() && !w.gone()) {
            return None;
        }
        if let Some(c) = self.idle.pop_front() {
            return Some(Some(c));
        }
        (self.open() < self.limit()).then_some(None)
    }

    /// Queries waiting that still want an answer.
    pub(crate) fn waiting(&self) -> usize {
        self.waiters.iter().filter(|w| !w.gone()).count()
    }

    /// Forget queries that stopped waiting.
    pub(crate) fn drop_gone_waiters(&mut self) {
        self.waiters.retain(|w| !w.gone());
    }

    /// Every waiting query, to be answered otherwise (site down, shutdown).
    pub(crate) fn take_waiters(&mut self) -> VecDeque<W> {
        std::mem::take(&mut self.waiters)
    }

    // === the site went down, or the daemon stops ===

    /// The site went down: every channel is gone, the pool's size is
    /// `channels` again (the site may serve more when it is back). Returns
    /// the waiting queries, to be answered with the failure.
    pub(crate) fn reset(&mut self) -> VecDeque<W> {
        self.idle.clear();
        self.busy.clear();
        self.capacity = None;
        self.grow_at = None;
        self.warned = None;
        self.take_waiters()
    }

    /// Close the idle channels (shutdown).
    pub(crate) fn close_idle(&mut self) {
        self.idle.clear();
    }

    /// Queries still hold a channel.
    pub(crate) fn queries_in_flight(&self) -> bool {
        self.busy.values().any(|(what, _)| *what == Use::Query)
    }

    // === the state file ===

    /// Every open channel: (id, state name, since), in id order.
    pub(crate) fn describe(&self, idle_since: impl Fn(&C) -> SystemTime) -> Vec<(u64, &'static str, SystemTime)> {
        let mut all: Vec<_> = self.idle.iter().map(|c| (c.id(), "idle", idle_since(c))).collect();
        all.extend(self.busy.iter().map(|(id, (what, since))| (*id, what.name(), *since)));
        all.sort_by_key(|(id, ..)| *id);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct C {
        id: u64,
        used: bool,
    }

    impl Conn for C {
        fn id(&self) -> u64 {
            self.id
        }
        fn used(&self) -> bool {
            self.used
        }
    }

    #[derive(Debug, PartialEq)]
    struct W {
        n: u32,
        fresh: bool,
        gone: bool,
    }

    impl Waiting for W {
        fn fresh(&self) -> bool {
            self.fresh
        }
        fn gone(&self) -> bool {
            self.gone
        }
    }

    fn w(n: u32) -> W {
        W { n, fresh: false, gone: false }
    }

    fn c(id: u64) -> C {
        C { id, used: true }
    }

    const T: SystemTime = SystemTime::UNIX_EPOCH;

    /// A pool of `n` configured channels with channels 1..=n idle.
    fn full(n: usize) -> Pool<C, W> {
        let mut p = Pool::new(n, Duration::from_secs(60));
        for id in 1..=n as u64 {
            p.push_idle(c(id));
        }
        p
    }

    #[test]
    fn queries_get_the_most_recently_used_channel_in_arrival_order() {
        let mut p = full(3);
        p.wait(w(1));
        p.wait(w(2));
        let (first, ch) = p.next_lend(T).expect("a lend");
        assert_eq!((first.n, ch.id), (1, 3), "first come, most recently used channel");
        let (second, ch2) = p.next_lend(T).expect("a lend");
        assert_eq!((second.n, ch2.id), (2, 2));
        assert_eq!(p.next_lend(T), None, "nobody waits");
        assert_eq!((p.serving(), p.open(), p.connects_wanted()), (3, 3, 0));
        p.push_idle(ch);
        assert!(p.queries_in_flight(), "channel 2 is still out");
        p.push_idle(ch2);
        assert!(!p.queries_in_flight());
    }

    #[test]
    fn the_heartbeat_takes_the_least_recently_used_channel() {
        let mut p = full(3);
        let hb = p.take_for_heartbeat(T).expect("an idle channel");
        assert_eq!(hb.id, 1);
        assert_eq!(
            p.describe(|_| T).iter().map(|(id, s, _)| (*id, *s)).collect::<Vec<_>>(),
            [(1, "heartbeat"), (2, "idle"), (3, "idle")]
        );
    }

    #[test]
    fn queries_that_stopped_waiting_are_skipped_and_forgotten() {
        let mut p = full(1);
        p.wait(W { n: 1, fresh: false, gone: true });
        p.wait(w(2));
        assert_eq!(p.waiting(), 1);
        let (got, _) = p.next_lend(T).expect("a lend");
        assert_eq!(got.n, 2);
        assert_eq!(p.take_waiters().len(), 0, "the gone one was dropped on the way");
    }

    #[test]
    fn a_retry_gets_only_a_never_used_channel_and_trades_an_idle_one_for_it() {
        let mut p = full(2);
        p.wait(W { n: 1, fresh: true, gone: false });
        assert_eq!(p.next_lend(T), None, "every idle channel was used");
        // The pool is full: the least recently used idle channel is traded.
        let traded = p.fresh_connect().expect("a connect");
        assert_eq!(traded, Some(c(1)));
        p.connect_started();
        assert_eq!(p.fresh_connect(), None, "one connect on its way is enough");
        p.connect_finished();
        p.admission_started();
        p.admission_finished();
        p.push_idle(C { id: 3, used: false });
        let (got, ch) = p.next_lend(T).expect("the new channel");
        assert_eq!((got.n, ch.id), (1, 3));
    }

    #[test]
    fn the_pool_opens_up_to_its_size_counting_connections_on_their_way() {
        let mut p: Pool<C, W> = Pool::new(5, Duration::from_secs(60));
        assert_eq!(p.connects_wanted(), 5);
        p.connect_started();
        p.connect_started();
        assert_eq!(p.connects_wanted(), 3);
        p.connect_finished();
        p.admission_started();
        assert_eq!((p.open(), p.opening(), p.connects_wanted()), (2, 2, 3));
    }

    #[test]
    fn a_site_serving_fewer_channels_shrinks_the_pool_and_one_more_is_tried_every_channel_retry() {
        let t0 = Instant::now();
        let mut p = full(2);
        p.channels = 4;
        p.admission_started(); // the third, not served
        p.admission_finished();
        assert_eq!(p.not_admitted(t0, true), Shrink::Limited { serving: 2, first: true });
        assert_eq!((p.limit(), p.capacity(), p.connects_wanted()), (2, Some(2), 0));
        assert!(p.at_known_capacity());
        assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(60)));
        assert!(!p.on_timer(t0 + Duration::from_secs(59), true), "not before channel_retry");
        assert!(p.on_timer(t0 + Duration::from_secs(60), true), "one more try");
        assert_eq!((p.limit(), p.connects_wanted()), (3, 1));
        p.connect_started();
        p.connect_finished();
        p.admission_started();
        p.admission_finished();
        // Not served again: no second warning for the same size.
        let t1 = t0 + Duration::from_secs(62);
        assert_eq!(p.not_admitted(t1, true), Shrink::Limited { serving: 2, first: false });
        assert_eq!(p.next_deadline(), Some(t1 + Duration::from_secs(60)));
        // Served this time: the pool reached its reduced size, try one more at once.
        assert!(p.on_timer(t1 + Duration::from_secs(60), true));
        assert_eq!(p.admitted(c(3)), Grow::TryOneMore);
        assert_eq!((p.limit(), p.connects_wanted()), (4, 1));
        assert_eq!(p.admitted(c(4)), Grow::AllServed);
        assert_eq!((p.capacity(), p.next_deadline()), (None, None));
    }

    #[test]
    fn no_working_channel_or_another_failure_means_the_site_is_down() {
        let t0 = Instant::now();
        let mut p: Pool<C, W> = Pool::new(3, Duration::from_secs(60));
        assert_eq!(p.not_admitted(t0, true), Shrink::Down, "nothing works");
        let mut p = full(1);
        assert_eq!(p.not_admitted(t0, false), Shrink::Down, "not the kind of failure of a limited site");
    }

    #[test]
    fn growth_waits_for_the_site_to_be_ready() {
        let t0 = Instant::now();
        let mut p = full(1);
        p.channels = 2;
        assert!(matches!(p.not_admitted(t0, true), Shrink::Limited { .. }));
        assert!(!p.on_timer(t0 + Duration::from_secs(60), false), "not while down or starting");
        assert_eq!(p.next_deadline(), None, "the timer is spent");
    }

    #[test]
    fn going_down_empties_the_pool_and_hands_back_the_waiters() {
        let t0 = Instant::now();
        let mut p = full(2);
        p.channels = 3;
        let _ = p.not_admitted(t0, true);
        p.wait(w(1));
        assert!(p.next_lend(T).is_some());
        p.wait(w(2));
        p.wait(w(3));
        let waiters = p.reset();
        assert_eq!(waiters.iter().map(|w| w.n).collect::<Vec<_>>(), [2, 3]);
        assert_eq!((p.serving(), p.capacity(), p.next_deadline(), p.limit()), (0, None, None, 3));
    }

    #[test]
    fn dead_idle_channels_are_dropped() {
        let mut p = full(3);
        assert_eq!(p.retain_idle(|c| c.id != 2), 1);
        assert_eq!(p.connects_wanted(), 1);
        assert_eq!(p.remove_idle(0), Some(c(1)));
        assert_eq!(p.connects_wanted(), 2);
    }
}
