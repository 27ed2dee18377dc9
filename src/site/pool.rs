//! The channel pool's bookkeeping and decisions, without I/O.
//!
//! Which channel a waiting query gets, when a query is pipelined behind
//! others on a busy channel, which channel carries the next heartbeat, how
//! many connections to open or close, and how large the pool may grow when
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
//! Sizes. While the site is ready the pool keeps `channels` connections
//! open or opening (the floor). When queries wait and no channel is idle it
//! opens more, up to `channels_max`; a channel above the floor that stays
//! idle for `channel_idle_timeout` is closed. Every new channel answers a
//! heartbeat before it is lent ("admission"); one that is not served caps
//! the pool at the channels the site does serve (`capacity`), and one more
//! is tried every `channel_retry` until all are served again.
//!
//! Pipelining. With `pipeline_depth` above 1, a `GET` that finds no idle
//! channel while the pool is at its limit (every channel open or on its
//! way) joins the busy channel with the fewest queries in flight, up to
//! `pipeline_depth` each. A `COMMAND`, or a query sent again, only ever
//! takes an idle channel, and nothing joins a channel while it carries one.
//!
//! Retries. A query sent again (a channel lost to a bad query ahead of it,
//! or a stale one) needs a channel that never carried anything. A new
//! channel goes to a waiting retry before anyone else (the heartbeat
//! included); a retry with none on its way gets a connect, for the least
//! recently used idle channel when the pool is full; and with the pool full
//! and no channel idle, nobody else gets a channel or a place on one until
//! a channel comes free to be traded. A retry so waits for one reconnect
//! (and, when more retries wait than the pool has channels, for a retry
//! ahead of it), never for `channel_timeout` while other queries keep every
//! channel busy (issue 28).
//!
//! Fair share (`fair_share`, issue 26). Waiting queries are served by
//! client in turn ([`queue`]). And a client that has queries on channels
//! (counted where queries wait or join busy channels: the desk's lending
//! of an idle channel is not counted) is pipelined only onto the busy
//! channels other than the one with the fewest queries, which so stays
//! for a client that has none there: its query waits behind at most the
//! queries on that channel, not behind another client's backlog. With one
//! channel there is no such reserve. livemux's own queries are not counted
//! (a federated query counts as the client that sent it).

use std::collections::{HashMap, VecDeque};
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
    /// What it may be given.
    fn wants(&self) -> Want;
    /// It stopped waiting (its client gave up).
    fn gone(&self) -> bool;
    /// Its client, for the fair share (one local process, or one remote
    /// address).
    fn client(&self) -> u64;
}

/// What a query may be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A `GET`: an idle channel, or a place in the pipeline of a busy one.
    Get,
    /// A `GET` sent again after it got no byte of its answer: an idle
    /// channel that never carried anything, of its own (nothing joins it,
    /// so nothing can go wrong ahead of it).
    Fresh,
    /// `COMMAND`s: an idle channel, not shared while they are on it.
    Alone,
}

/// What a lent channel is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// Queries (one, or several pipelined).
    Query,
    /// `COMMAND`s, or a query sent again: nothing joins it.
    Alone,
    /// A heartbeat (the scheduled one, or the first on a new connection).
    Heartbeat,
    /// The heartbeat that proves it clean after an error answer.
    Verify,
}

impl Use {
    /// The name in the state file.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Use::Query | Use::Alone => "busy",
            Use::Heartbeat => "heartbeat",
            Use::Verify => "verifying",
        }
    }
}

/// How one query left a channel, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Back {
    /// Clean: it can be lent again.
    Reuse,
    /// Prove it clean with a heartbeat first.
    Verify,
    /// Close it.
    Close,
}

/// A new channel was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shrink {
    /// No channel works: the site is down.
    Down,
    /// The pool is capped at the `serving` channels that work; `first` is
    /// true when this is the smallest size seen so far (worth a warning).
    Limited { serving: usize, first: bool },
}

/// A new channel was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grow {
    /// Nothing changes.
    Same,
    /// The site serves every channel the pool may open again.
    AllServed,
    /// The pool reached its cap: the site may serve more, try one more.
    TryOneMore,
}

/// The sizes the pool works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sizes {
    /// Channels kept open while idle (`channels`).
    pub channels: usize,
    /// Channels open at most (`channels_max`).
    pub channels_max: usize,
    /// Queries in flight per channel at most (`pipeline_depth`; 1 = none).
    pub pipeline_depth: usize,
    /// A channel above `channels` idle this long is closed.
    pub idle_timeout: Duration,
    /// How often one more channel is tried while the site serves fewer.
    pub channel_retry: Duration,
    /// Fair share between clients (`fair_share`): see the module.
    pub fair: bool,
}

/// A channel that is lent (its channel value is away during a heartbeat).
struct Lent<C> {
    channel: Option<C>,
    what: Use,
    since: SystemTime,
    /// Queries on it (for `Use::Query`).
    in_flight: usize,
    /// The worst way a query has left it so far.
    back: Back,
    /// Idle since when, for a channel away for a heartbeat: a heartbeat
    /// does not make a channel wanted, so it keeps its idle age.
    idle_since: Option<Instant>,
}

/// The lent channels by number: a few at most (`channels_max`), so a list.
/// It keeps its room when emptied: lending and taking back the one channel
/// of a quiet site allocates nothing (a map's node would come and go with
/// every query).
struct Busy<C>(Vec<(u64, Lent<C>)>);

impl<C> Busy<C> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn get(&self, id: &u64) -> Option<&Lent<C>> {
        self.0.iter().find(|(i, _)| i == id).map(|(_, l)| l)
    }

    fn get_mut(&mut self, id: &u64) -> Option<&mut Lent<C>> {
        self.0.iter_mut().find(|(i, _)| i == id).map(|(_, l)| l)
    }

    fn insert(&mut self, id: u64, lent: Lent<C>) {
        match self.get_mut(&id) {
            Some(l) => *l = lent,
            None => self.0.push((id, lent)),
        }
    }

    fn remove(&mut self, id: &u64) -> Option<Lent<C>> {
        let i = self.0.iter().position(|(n, _)| n == id)?;
        Some(self.0.swap_remove(i).1)
    }

    fn iter(&self) -> impl Iterator<Item = (&u64, &Lent<C>)> {
        self.0.iter().map(|(id, l)| (id, l))
    }

    fn values(&self) -> impl Iterator<Item = &Lent<C>> {
        self.0.iter().map(|(_, l)| l)
    }
}

/// An idle channel, and since when.
struct Idle<C> {
    channel: C,
    since: Instant,
}

/// The pool of one site.
pub(crate) struct Pool<C, W> {
    sizes: Sizes,
    /// Idle channels; front = least recently used (heartbeats take it),
    /// back = most recently used (queries take it, so rarely used channels
    /// are the ones the heartbeat keeps checking).
    idle: VecDeque<Idle<C>>,
    /// Lent channels.
    busy: Busy<C>,
    /// Connects in flight for the pool (the probe included).
    connecting: usize,
    /// New channels whose admission heartbeat is in flight.
    admitting: usize,
    /// The site served fewer channels than the pool asked for: the cap.
    capacity: Option<usize>,
    /// When to try one channel more than `capacity`.
    grow_at: Option<Instant>,
    /// The smallest capacity warned about so far.
    warned: Option<usize>,
    /// Queries waiting for a channel, in the order they are served.
    waiters: Queue<W>,
    /// Queries on channels per client (fair share: see `pipeline_slot`).
    in_flight: HashMap<u64, u32>,
    /// Queries pipelined behind others so far.
    pipelined: u64,
    /// The most channels serving at once so far.
    peak: usize,
}

impl<C: Conn, W: Waiting> Pool<C, W> {
    pub(crate) fn new(sizes: Sizes) -> Self {
        Pool {
            sizes,
            idle: VecDeque::new(),
            busy: Busy(Vec::new()),
            connecting: 0,
            admitting: 0,
            capacity: None,
            grow_at: None,
            warned: None,
            waiters: Queue::new(sizes.fair),
            in_flight: HashMap::new(),
            pipelined: 0,
            peak: 0,
        }
    }

    /// Queries pipelined behind others so far.
    pub(crate) fn pipelined(&self) -> u64 {
        self.pipelined
    }

    /// The most channels serving at once so far.
    pub(crate) fn peak(&self) -> usize {
        self.peak
    }

    // === sizes ===

    /// Channels open at most: `channels_max`, or fewer while the site
    /// serves fewer.
    pub(crate) fn limit(&self) -> usize {
        self.capacity.map_or(self.sizes.channels_max, |c| c.min(self.sizes.channels_max))
    }

    /// Channels kept open while idle: `channels`, or fewer while the site
    /// serves fewer.
    fn floor(&self) -> usize {
        self.sizes.channels.min(self.limit())
    }

    /// Channels that answered the site's heartbeat (idle or lent).
    pub(crate) fn serving(&self) -> usize {
        self.idle.len() + self.busy.len()
    }

    /// Channels open or on their way.
    pub(crate) fn open(&self) -> usize {
        self.serving() + self.connecting + self.admitting
    }

    /// Queries waiting that still want an answer.
    pub(crate) fn waiting(&self) -> usize {
        self.waiters.iter().filter(|w| !w.gone()).count()
    }

    /// Connections to open now: up to the floor always, and beyond it (up
    /// to the limit) for the queries that wait while no channel is idle.
    pub(crate) fn connects_wanted(&self) -> usize {
        let demand = self.busy.len() + self.waiting();
        let want = demand.max(self.floor()).min(self.limit());
        want.saturating_sub(self.open())
    }

    /// The cap, if the site serves fewer channels than the pool may open.
    pub(crate) fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// The pool is capped and holds every channel the site serves: one
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
    pub(crate) fn admitted(&mut self, c: C, now: Instant) -> Grow {
        self.push_idle(c, now);
        let Some(cap) = self.capacity else { return Grow::Same };
        let open = self.open();
        if open >= self.sizes.channels_max {
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
    /// pool is capped at them and tries one more after `channel_retry`; with
    /// none, or for another kind of failure, the site is down.
    pub(crate) fn not_admitted(&mut self, now: Instant, limited: bool) -> Shrink {
        // Channels still connecting or being admitted count: if they fail
        // too, the site goes down with their (often clearer) reason.
        let serving = self.open();
        if serving == 0 || !limited {
            return Shrink::Down;
        }
        self.capacity = Some(serving.min(self.limit()));
        self.grow_at = Some(now + self.sizes.channel_retry);
        let first = self.warned.is_none_or(|w| serving < w);
        if first {
            self.warned = Some(serving);
        }
        Shrink::Limited { serving, first }
    }

    /// When the next timer of the pool is due: a growth try, or an idle
    /// channel above the floor to close.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let expiry = (self.idle.len() > self.floor_for_idle())
            .then(|| self.oldest_idle().map(|(_, since)| since + self.sizes.idle_timeout))
            .flatten();
        [self.grow_at, expiry].into_iter().flatten().min()
    }

    /// The idle channel idle the longest: (index, since). The queue is in
    /// heartbeat order, not idle age, since heartbeats keep a channel's age.
    fn oldest_idle(&self) -> Option<(usize, Instant)> {
        self.idle.iter().enumerate().map(|(n, i)| (n, i.since)).min_by_key(|(_, since)| *since)
    }

    /// How many idle channels are kept however long they are idle: the
    /// floor, less the channels already lent.
    fn floor_for_idle(&self) -> usize {
        self.floor().saturating_sub(self.busy.len())
    }

    /// The timer: allow one more channel every `channel_retry` while capped
    /// (true when a connect should be considered), and take out the idle
    /// channels above the floor that were idle for `channel_idle_timeout`
    /// (to be closed).
    pub(crate) fn on_timer(&mut self, now: Instant, ready: bool) -> (bool, Vec<C>) {
        let mut grow = false;
        if self.grow_at.is_some_and(|t| now >= t) {
            self.grow_at = None;
            if let (Some(c), true) = (self.capacity, ready) {
                self.capacity = Some(c + 1);
                grow = true;
            }
        }
        let mut expired = Vec::new();
        while self.idle.len() > self.floor_for_idle()
            && let Some((n, since)) = self.oldest_idle()
            && now >= since + self.sizes.idle_timeout
            && let Some(i) = self.idle.remove(n)
        {
            expired.push(i.channel);
        }
        (grow, expired)
    }

    // === channels ===

    /// An idle channel (a new one after its first heartbeat, or one whose
    /// queries or heartbeat ended cleanly).
    pub(crate) fn push_idle(&mut self, c: C, now: Instant) {
        let since = self.unlend(c.id()).and_then(|l| l.idle_since).unwrap_or(now);
        self.idle.push_back(Idle { channel: c, since });
        self.peak = self.peak.max(self.serving());
    }

    /// A channel away for a heartbeat or verification: no longer busy.
    pub(crate) fn returned(&mut self, id: u64) {
        self.unlend(id);
    }

    /// Take a channel's entry out of the lent ones.
    fn unlend(&mut self, id: u64) -> Option<Lent<C>> {
        self.busy.remove(&id)
    }

    /// Mark a channel as lent for `what` (a heartbeat on a new connection,
    /// a verification); the channel itself is away.
    /// (A channel taken for a heartbeat keeps its idle age.)
    pub(crate) fn lent(&mut self, id: u64, what: Use, now: SystemTime) {
        let idle_since = self.busy.get(&id).and_then(|l| l.idle_since);
        self.busy.insert(id, Lent { channel: None, what, since: now, in_flight: 0, back: Back::Reuse, idle_since });
    }

    /// Drop the idle channels `alive` says are dead; how many were dropped.
    pub(crate) fn retain_idle(&mut self, mut alive: impl FnMut(&mut C) -> bool) -> usize {
        let before = self.idle.len();
        self.idle.retain_mut(|i| alive(&mut i.channel));
        before - self.idle.len()
    }

    /// The idle channels, for watching them (a readable idle channel died).
    pub(crate) fn idle_mut(&mut self) -> impl Iterator<Item = &mut C> {
        self.idle.iter_mut().map(|i| &mut i.channel)
    }

    /// Take out the idle channel at `index` (it died).
    pub(crate) fn remove_idle(&mut self, index: usize) -> Option<C> {
        self.idle.remove(index).map(|i| i.channel)
    }

    /// The channel for the scheduled heartbeat: the least recently used
    /// idle one (it is away until the heartbeat ends), but never one that
    /// never carried anything while a retry waits for such a channel (the
    /// heartbeat would use it up; it waits for the next one instead).
    pub(crate) fn take_for_heartbeat(&mut self, now: SystemTime) -> Option<C> {
        let retry_waits = self.fresh_waiting() > 0;
        let pos = self.idle.iter().position(|i| i.channel.used() || !retry_waits)?;
        let Idle { channel, since } = self.idle.remove(pos)?;
        let lent = Lent {
            channel: None,
            what: Use::Heartbeat,
            since: now,
            in_flight: 0,
            back: Back::Reuse,
            idle_since: Some(since),
        };
        self.busy.insert(channel.id(), lent);
        Some(channel)
    }

    /// The idle channel given back last (the next to be lent).
    pub(crate) fn last_idle_mut(&mut self) -> Option<&mut C> {
        self.idle.back_mut().map(|i| &mut i.channel)
    }

    /// Lend the most recently used idle channel for `want` (a `GET` or
    /// `COMMAND`s; never for [`Want::Fresh`]) if `alive` says it can be
    /// used: the desk's lending, which the caller allows only while nobody
    /// waits. `None` if there is no idle channel, or it may have died.
    pub(crate) fn lend_idle(&mut self, want: Want, now: SystemTime, alive: impl FnOnce(&mut C) -> bool) -> Option<u64> {
        if want == Want::Fresh || !alive(&mut self.idle.back_mut()?.channel) {
            return None;
        }
        let idle = self.idle.pop_back()?;
        let what = if want == Want::Get { Use::Query } else { Use::Alone };
        let id = idle.channel.id();
        let lent =
            Lent { channel: Some(idle.channel), what, since: now, in_flight: 1, back: Back::Reuse, idle_since: None };
        self.busy.insert(id, lent);
        Some(id)
    }

    /// A place behind others on a busy channel for a `GET`, by the rules
    /// of [`Pool::next_lend`] for a waiting query (the pool at its limit,
    /// the channel with the fewest queries below the depth, one that
    /// `shareable` allows): the desk's lending when no channel is idle,
    /// which the caller allows only while nobody waits.
    pub(crate) fn lend_pipelined(&mut self, shareable: impl Fn(&C) -> bool, client: u64) -> Option<u64> {
        let id = self.pipeline_slot(&shareable, client)?;
        let l = self.busy.get_mut(&id)?;
        l.in_flight += 1;
        self.pipelined += 1;
        self.count(client);
        Some(id)
    }

    // === the fair share's count of queries on channels, per client ===

    /// A query of `client` got a channel or a place on one (counted only
    /// where it matters: while queries wait or join busy channels).
    fn count(&mut self, client: u64) {
        if self.sizes.fair && client != UNCOUNTED {
            *self.in_flight.entry(client).or_default() += 1;
        }
    }

    /// A counted query of `client` left its channel.
    fn uncount(&mut self, client: u64) {
        if let Some(n) = self.in_flight.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&client);
            }
        }
    }

    /// Take back a channel a query left clean, if `current` says it may
    /// be reused (the desk's give-back, which the caller allows only while
    /// nobody waits): with queries pipelined behind it the channel stays
    /// theirs; with none it is idle again. False for anything else (a
    /// worse return by a query before, not current), which is then the
    /// actor's to settle with [`Pool::left`]. `Some(true)`: the channel is
    /// idle again (the last idle one).
    pub(crate) fn give_back_clean(
        &mut self,
        id: u64,
        now: Instant,
        current: impl FnOnce(&C) -> bool,
        client: u64,
    ) -> Option<bool> {
        let l = self.busy.get_mut(&id)?;
        if !matches!(l.what, Use::Query | Use::Alone) || l.back != Back::Reuse {
            return None;
        }
        if l.in_flight > 1 {
            l.in_flight -= 1;
            self.uncount(client);
            return Some(false);
        }
        if !(l.in_flight == 1 && l.channel.as_ref().is_some_and(current)) {
            return None;
        }
        let c = self.unlend(id).and_then(|l| l.channel)?;
        self.uncount(client);
        self.idle.push_back(Idle { channel: c, since: now });
        Some(true)
    }

    /// Queries wait for a channel (some may have stopped waiting).
    pub(crate) fn has_waiters(&self) -> bool {
        !self.waiters.is_empty()
    }

    /// A lent channel, to make a lease on it.
    pub(crate) fn channel_mut(&mut self, id: u64) -> Option<&mut C> {
        self.busy.get_mut(&id)?.channel.as_mut()
    }

    // === waiting queries ===

    /// A query waits for a channel (in its turn: see [`queue`]).
    pub(crate) fn wait(&mut self, w: W) {
        self.waiters.push(w);
    }

    /// The next waiting query that can be served now, and the channel it
    /// gets (see the module's rules): an idle channel (the most recently
    /// used one; for [`Want::Fresh`] one that never carried anything), or,
    /// for a `GET` while the pool is at its limit, a place behind the
    /// fewest queries on a busy channel that `shareable` allows. Queries
    /// that stopped waiting are dropped on the way.
    ///
    /// Retries come first: a channel that never carried anything goes to
    /// the first retry waiting, whoever came before it. And while the pool
    /// is at its limit with retries waiting that no such channel is on its
    /// way for ([`Pool::fresh_connect`] has none to trade), nobody else is
    /// given a channel or a place on one: the busy channels drain, and the
    /// first one idle is traded for a new connection. (Else the queries
    /// that keep coming keep every channel busy, and a retry waits until
    /// `channel_timeout`.)
    pub(crate) fn next_lend(&mut self, now: SystemTime, shareable: impl Fn(&C) -> bool) -> Option<(W, u64)> {
        if let Some(pos) = self.idle.iter().rposition(|c| !c.channel.used())
            && let Some(i) = self.first_fresh()
        {
            return self.lend_waiter(i, pos, now);
        }
        if self.open() >= self.limit() && self.fresh_short() > 0 {
            return None;
        }
        let mut i = 0;
        while let Some((gone, client, want)) = self.waiters.get(i).map(|q| (q.gone(), q.client(), q.wants())) {
            if gone {
                self.waiters.drop_at(i);
                continue;
            }
            match want {
                // Served above, or a channel is on its way for it.
                Want::Fresh => {
                    i += 1;
                    continue;
                }
                Want::Alone => {}
                Want::Get => {
                    if self.idle.is_empty()
                        && let Some(id) = self.pipeline_slot(&shareable, client)
                        && let Some(w) = self.waiters.serve(i)
                    {
                        if let Some(l) = self.busy.get_mut(&id) {
                            l.in_flight += 1;
                        }
                        self.pipelined += 1;
                        self.count(client);
                        return Some((w, id));
                    }
                }
            }
            if let Some(pos) = self.idle.len().checked_sub(1) {
                return self.lend_waiter(i, pos, now);
            }
            i += 1;
        }
        None
    }

    /// Lend the idle channel at `pos` to the waiter at `i`.
    fn lend_waiter(&mut self, i: usize, pos: usize, now: SystemTime) -> Option<(W, u64)> {
        let w = self.waiters.serve(i)?;
        self.count(w.client());
        let idle = self.idle.remove(pos)?;
        let want = w.wants();
        // A retry is alone on its channel: nothing can go wrong ahead of it.
        let what = if want == Want::Get { Use::Query } else { Use::Alone };
        let id = idle.channel.id();
        let lent =
            Lent { channel: Some(idle.channel), what, since: now, in_flight: 1, back: Back::Reuse, idle_since: None };
        self.busy.insert(id, lent);
        Some((w, id))
    }

    /// A busy channel a `GET` of `client` may be pipelined on: only while
    /// the pool is at its limit, the one with the fewest queries below the
    /// depth. With fair share, a client that has queries on channels
    /// already leaves the channel with the fewest alone (the reserve): a
    /// client that has none gets it, behind at most the queries on it.
    /// (With a single channel there is no reserve.)
    fn pipeline_slot(&self, shareable: &impl Fn(&C) -> bool, client: u64) -> Option<u64> {
        if self.sizes.pipeline_depth <= 1 || self.open() < self.limit() {
            return None;
        }
        let open = self
            .busy
            .iter()
            .filter(|(_, l)| l.what == Use::Query && l.back == Back::Reuse && l.in_flight < self.sizes.pipeline_depth)
            .filter_map(|(id, l)| Some(((l.in_flight, *id), l.channel.as_ref()?)))
            .filter(|(_, c)| shareable(c))
            .map(|(key, _)| key);
        // The fewest and the next fewest, in one pass.
        let (mut first, mut second) = (None::<(usize, u64)>, None::<(usize, u64)>);
        for key in open {
            if first.is_none_or(|f| key < f) {
                second = first;
                first = Some(key);
            } else if second.is_none_or(|s| key < s) {
                second = Some(key);
            }
        }
        // (With one channel there is nothing to keep: all share it.)
        let reserve =
            self.sizes.fair && client != UNCOUNTED && self.in_flight.contains_key(&client) && self.busy.len() > 1;
        if reserve { second } else { first }.map(|(_, id)| id)
    }

    /// A query of `client` left a channel (`back`: how). When it was the
    /// last one on it, the channel comes out with the worst way any query
    /// left it, for the caller to make idle, verify or close.
    pub(crate) fn left(&mut self, id: u64, back: Back, client: u64) -> Option<(C, Back)> {
        let l = self.busy.get_mut(&id)?;
        l.back = l.back.max(back);
        l.in_flight = l.in_flight.saturating_sub(1);
        let last = l.in_flight == 0;
        self.uncount(client);
        if !last {
            return None;
        }
        let l = self.unlend(id)?;
        Some((l.channel?, l.back))
    }

    /// The first retry waiting, if any.
    fn first_fresh(&self) -> Option<usize> {
        self.waiters.iter().position(|w| w.wants() == Want::Fresh && !w.gone())
    }

    /// Retries waiting (that still want an answer).
    fn fresh_waiting(&self) -> usize {
        self.waiters.iter().filter(|w| w.wants() == Want::Fresh && !w.gone()).count()
    }

    /// Retries waiting beyond the channels that never carried anything,
    /// idle or on their way (a connect or an admission in flight: a new
    /// channel goes to a retry first).
    fn fresh_short(&self) -> usize {
        let fresh_idle = self.idle.iter().filter(|i| !i.channel.used()).count();
        self.fresh_waiting().saturating_sub(self.connecting + self.admitting + fresh_idle)
    }

    /// A retry waits for a never-used channel and none is on its way for
    /// it: start a connect, trading the least recently used idle channel
    /// for it when the pool is full (with none idle, [`Pool::next_lend`]
    /// lets the busy ones drain). `Some(traded)` means connect (and close
    /// `traded`); ask again after the connect started, for the next retry.
    pub(crate) fn fresh_connect(&mut self) -> Option<Option<C>> {
        if self.fresh_short() == 0 {
            return None;
        }
        if self.open() < self.limit() {
            return Some(None);
        }
        self.idle.pop_front().map(|i| Some(i.channel))
    }

    /// Forget queries that stopped waiting.
    pub(crate) fn drop_gone_waiters(&mut self) {
        self.waiters.retain_waiting();
    }

    /// Every waiting query, to be answered otherwise (site down, shutdown).
    pub(crate) fn take_waiters(&mut self) -> VecDeque<W> {
        self.waiters.take()
    }

    // === the site went down, or the daemon stops ===

    /// The site went down: every channel is gone, and the cap with them
    /// (the site may serve more when it is back). Returns the waiting
    /// queries, to be answered with the failure.
    /// The channels come back too, to be closed by the caller.
    pub(crate) fn reset(&mut self) -> (VecDeque<W>, Vec<C>) {
        let mut gone: Vec<C> = self.idle.drain(..).map(|i| i.channel).collect();
        gone.extend(std::mem::take(&mut self.busy.0).into_iter().filter_map(|(_, l)| l.channel));
        self.in_flight.clear();
        self.capacity = None;
        self.grow_at = None;
        self.warned = None;
        (self.take_waiters(), gone)
    }

    /// Idle channels.
    pub(crate) fn idle_count(&self) -> usize {
        self.idle.len()
    }

    /// New sizes (a configuration reload). Idle channels beyond the new
    /// `channels` are handed back to be closed at once (an operator asked
    /// for fewer); a larger pool grows as usual.
    pub(crate) fn resize(&mut self, sizes: Sizes) -> Vec<C> {
        self.sizes = sizes;
        self.waiters.set_fair(sizes.fair);
        if !sizes.fair {
            self.in_flight.clear();
        }
        let keep = self.sizes.channels.saturating_sub(self.busy.len());
        let mut closed = Vec::new();
        while self.idle.len() > keep {
            match self.idle.pop_front() {
                Some(i) => closed.push(i.channel),
                None => break,
            }
        }
        closed
    }

    /// Close the idle channels (shutdown).
    pub(crate) fn close_idle(&mut self) {
        self.idle.clear();
    }

    /// Queries still hold a channel.
    pub(crate) fn queries_in_flight(&self) -> bool {
        self.busy.values().any(|l| matches!(l.what, Use::Query | Use::Alone))
    }

    // === the state file ===

    /// Every open channel: (id, state name, since, queries on it), in id order.
    pub(crate) fn describe(
        &self,
        idle_since: impl Fn(&C) -> SystemTime,
    ) -> Vec<(u64, &'static str, SystemTime, usize)> {
        let mut all: Vec<_> = self.idle.iter().map(|i| (i.channel.id(), "idle", idle_since(&i.channel), 0)).collect();
        all.extend(self.busy.iter().map(|(id, l)| (*id, l.what.name(), l.since, l.in_flight)));
        all.sort_by_key(|(id, ..)| *id);
        all
    }
}

/// The client of a query the fair share does not count (the desk's
/// lending of an idle channel, livemux's own queries).
pub(crate) const UNCOUNTED: u64 = 0;

mod queue;
use queue::Queue;

#[cfg(test)]
mod tests;
