//! The pool's rules on plain values: numbers for channels and waiters.

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
    want: Want,
    gone: bool,
    /// Its client (each waiter its own unless a test says otherwise).
    client: u64,
}

impl Waiting for W {
    fn wants(&self) -> Want {
        self.want
    }
    fn gone(&self) -> bool {
        self.gone
    }
    fn client(&self) -> u64 {
        self.client
    }
}

fn w(n: u32) -> W {
    W { n, want: Want::Get, gone: false, client: 1000 + u64::from(n) }
}

impl W {
    fn wanting(self, want: Want) -> W {
        W { want, ..self }
    }
    fn gone_if(self, gone: bool) -> W {
        W { gone, ..self }
    }
}

fn c(id: u64) -> C {
    C { id, used: true }
}

const T: SystemTime = SystemTime::UNIX_EPOCH;
const ANY: fn(&C) -> bool = |_| true;

fn sizes(channels: usize, channels_max: usize, depth: usize) -> Sizes {
    Sizes {
        channels,
        channels_max,
        pipeline_depth: depth,
        idle_timeout: Duration::from_secs(60),
        channel_retry: Duration::from_secs(60),
        fair: true,
    }
}

/// A pool with channels 1..=n idle (n = `channels`).
fn pool(channels: usize, channels_max: usize, depth: usize) -> Pool<C, W> {
    let mut p = Pool::new(sizes(channels, channels_max, depth));
    let now = Instant::now();
    for id in 1..=channels as u64 {
        p.push_idle(c(id), now);
    }
    p
}

/// Lend to every waiter that can be served now: (waiter, channel) pairs.
fn lend_all(p: &mut Pool<C, W>) -> Vec<(u32, u64)> {
    std::iter::from_fn(|| p.next_lend(T, ANY).map(|(w, id)| (w.n, id))).collect()
}

#[test]
fn queries_get_the_most_recently_used_idle_channel_in_arrival_order() {
    let mut p = pool(3, 3, 1);
    p.wait(w(1));
    p.wait(w(2));
    assert_eq!(lend_all(&mut p), [(1, 3), (2, 2)]);
    assert_eq!((p.serving(), p.open(), p.connects_wanted()), (3, 3, 0));
    assert!(p.queries_in_flight());
    assert_eq!(p.left(3, Back::Reuse, UNCOUNTED).map(|(c, back)| (c.id, back)), Some((3, Back::Reuse)));
    p.push_idle(c(3), Instant::now());
    assert_eq!(p.left(2, Back::Reuse, UNCOUNTED), Some((c(2), Back::Reuse)));
    assert!(!p.queries_in_flight());
}

#[test]
fn the_heartbeat_takes_the_least_recently_used_channel() {
    let mut p = pool(3, 3, 1);
    let hb = p.take_for_heartbeat(T).expect("an idle channel");
    assert_eq!(hb.id, 1);
    let states: Vec<_> = p.describe(|_| T).iter().map(|(id, s, _, _)| (*id, *s)).collect();
    assert_eq!(states, [(1, "heartbeat"), (2, "idle"), (3, "idle")]);
}

#[test]
fn queries_that_stopped_waiting_are_skipped_and_forgotten() {
    let mut p = pool(1, 1, 1);
    p.wait(W { client: 1000 + 1, ..w(1).wanting(Want::Get).gone_if(true) });
    p.wait(w(2));
    assert_eq!(p.waiting(), 1);
    assert_eq!(lend_all(&mut p), [(2, 1)]);
    assert_eq!(p.take_waiters().len(), 0, "the gone one was dropped on the way");
}

#[test]
fn a_retry_gets_only_a_never_used_channel_and_trades_an_idle_one_for_it_when_full() {
    let mut p = pool(2, 2, 4);
    p.wait(W { client: 1000 + 1, ..w(1).wanting(Want::Fresh).gone_if(false) });
    assert_eq!(lend_all(&mut p), [], "every idle channel was used, and a retry is never pipelined");
    // The pool is at its limit: the least recently used idle channel is traded.
    assert_eq!(p.fresh_connect(), Some(Some(c(1))));
    p.connect_started();
    assert_eq!(p.fresh_connect(), None, "one connect on its way is enough");
    p.connect_finished();
    p.admission_started();
    p.admission_finished();
    p.push_idle(C { id: 3, used: false }, Instant::now());
    assert_eq!(lend_all(&mut p), [(1, 3)]);
}

#[test]
fn the_pool_keeps_its_floor_open_counting_connections_on_their_way() {
    let mut p: Pool<C, W> = Pool::new(sizes(5, 10, 1));
    assert_eq!(p.connects_wanted(), 5);
    p.connect_started();
    p.connect_started();
    assert_eq!(p.connects_wanted(), 3);
    p.connect_finished();
    p.admission_started();
    assert_eq!((p.open(), p.opening(), p.connects_wanted()), (2, 2, 3));
}

#[test]
fn waiting_queries_open_more_channels_up_to_channels_max() {
    let mut p = pool(2, 5, 1);
    for n in 0..10 {
        p.wait(w(n));
    }
    assert_eq!(lend_all(&mut p).len(), 2, "the idle ones first");
    assert_eq!(p.waiting(), 8);
    assert_eq!(p.connects_wanted(), 3, "up to channels_max (5), not one per waiter");
    for _ in 0..3 {
        p.connect_started();
    }
    assert_eq!(p.connects_wanted(), 0);
}

#[test]
fn idle_channels_above_the_floor_close_after_the_idle_timeout() {
    let t0 = Instant::now();
    let mut p: Pool<C, W> = Pool::new(sizes(2, 5, 1));
    for id in 1..=5 {
        p.push_idle(c(id), t0 + Duration::from_secs(id));
    }
    // Three above the floor of 2; the least recently used go first.
    assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(61)));
    let (grow, closed) = p.on_timer(t0 + Duration::from_secs(62), true);
    assert!(!grow);
    assert_eq!(closed, [c(1), c(2)], "idle for 60 s");
    assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(63)));
    let (_, closed) = p.on_timer(t0 + Duration::from_secs(600), true);
    assert_eq!(closed, [c(3)]);
    assert_eq!((p.serving(), p.next_deadline()), (2, None), "the floor stays however idle");
}

#[test]
fn lent_channels_count_towards_the_floor() {
    let t0 = Instant::now();
    let mut p: Pool<C, W> = Pool::new(sizes(2, 4, 1));
    for id in 1..=4 {
        p.push_idle(c(id), t0);
    }
    p.wait(w(1));
    p.wait(w(2));
    assert_eq!(lend_all(&mut p).len(), 2);
    let (_, closed) = p.on_timer(t0 + Duration::from_secs(60), true);
    assert_eq!(closed.len(), 2, "two lent channels make the floor: both idle ones above it close");
}

#[test]
fn gets_are_pipelined_only_when_the_pool_is_at_its_limit_behind_the_fewest() {
    let mut p = pool(2, 3, 3);
    for n in 0..4 {
        p.wait(w(n));
    }
    assert_eq!(lend_all(&mut p), [(0, 2), (1, 1)], "below the limit: the others wait for a new channel");
    p.connect_started();
    // Now every channel is open or on its way: pipeline behind the fewest.
    assert_eq!(lend_all(&mut p), [(2, 1), (3, 2)]);
    for n in 4..9 {
        p.wait(w(n));
    }
    assert_eq!(lend_all(&mut p), [(4, 1), (5, 2)], "depth 3 reached on both");
    assert_eq!(p.waiting(), 3);
    let described: Vec<_> = p.describe(|_| T).iter().map(|(id, s, _, n)| (*id, *s, *n)).collect();
    assert_eq!(described, [(1, "busy", 3), (2, "busy", 3)]);
    // One leaves: its place goes to the next waiter.
    assert_eq!(p.left(1, Back::Reuse, UNCOUNTED), None, "two queries are still on it");
    assert_eq!(lend_all(&mut p), [(6, 1)]);
}

#[test]
fn commands_and_retries_are_never_pipelined_and_nothing_joins_a_command() {
    let mut p = pool(1, 1, 4);
    p.wait(W { client: 1000 + 1, ..w(1).wanting(Want::Alone).gone_if(false) });
    assert_eq!(lend_all(&mut p), [(1, 1)]);
    p.wait(w(2));
    p.wait(W { client: 1000 + 3, ..w(3).wanting(Want::Fresh).gone_if(false) });
    assert_eq!(lend_all(&mut p), [], "nothing behind a COMMAND");
    assert_eq!(p.left(1, Back::Reuse, UNCOUNTED), Some((c(1), Back::Reuse)));
    p.push_idle(c(1), Instant::now());
    // The retry needs a channel that never carried anything: the idle one
    // is traded for a new connection, which the retry gets for itself.
    assert_eq!(lend_all(&mut p), []);
    assert_eq!(p.fresh_connect(), Some(Some(c(1))));
    p.connect_started();
    p.connect_finished();
    p.push_idle(C { id: 2, used: false }, Instant::now());
    assert_eq!(lend_all(&mut p), [(3, 2)], "the GET is not pipelined behind the retry");
    p.wait(W { client: 1000 + 4, ..w(4).wanting(Want::Alone).gone_if(false) });
    assert_eq!(lend_all(&mut p), [], "a COMMAND never joins a busy channel, nor a retry's");
}

#[test]
fn a_never_used_channel_goes_to_a_retry_before_queries_that_came_earlier() {
    let mut p = pool(1, 2, 4);
    p.wait(w(1));
    p.wait(W { client: 1000 + 2, ..w(2).wanting(Want::Alone).gone_if(false) });
    p.wait(W { client: 1000 + 3, ..w(3).wanting(Want::Fresh).gone_if(false) });
    p.push_idle(C { id: 2, used: false }, Instant::now());
    assert_eq!(lend_all(&mut p), [(3, 2), (1, 1)], "the retry first; the COMMAND waits for an idle channel");
}

#[test]
fn the_heartbeat_leaves_a_never_used_channel_to_a_waiting_retry() {
    let mut p: Pool<C, W> = Pool::new(sizes(2, 2, 4));
    p.push_idle(C { id: 1, used: false }, Instant::now());
    p.wait(W { client: 1000 + 1, ..w(1).wanting(Want::Fresh).gone_if(false) });
    assert_eq!(p.take_for_heartbeat(T), None, "it would use up the retry's channel");
    p.push_idle(c(2), Instant::now());
    assert_eq!(p.take_for_heartbeat(T), Some(c(2)), "a used one is the heartbeat's");
    assert_eq!(lend_all(&mut p), [(1, 1)]);
}

#[test]
fn retries_short_of_a_channel_in_a_full_busy_pool_stop_the_pipelining_until_one_comes_free_to_trade() {
    // Issue 28: two channels, both busy with pipelined GETs that keep
    // coming. Three retries wait for channels of their own. Without a stop
    // the GETs kept both channels busy forever, and the retries waited
    // until channel_timeout.
    let mut p = pool(2, 2, 4);
    for n in 0..8 {
        p.wait(w(n));
    }
    assert_eq!(lend_all(&mut p).len(), 8, "both channels full");
    for n in 10..13 {
        p.wait(w(n).wanting(Want::Fresh));
    }
    p.wait(w(20));
    assert_eq!(p.fresh_connect(), None, "nothing idle to trade, no room to connect");
    // A GET leaves: its place is not given to the next GET.
    assert_eq!(p.left(1, Back::Reuse, UNCOUNTED), None);
    assert_eq!(lend_all(&mut p), [], "the busy channels drain for the retries");
    for _ in 0..2 {
        assert_eq!(p.left(1, Back::Reuse, UNCOUNTED), None);
    }
    assert_eq!(p.left(1, Back::Reuse, UNCOUNTED), Some((c(1), Back::Reuse)));
    p.push_idle(c(1), Instant::now());
    assert_eq!(lend_all(&mut p), [], "the idle channel is to be traded");
    assert_eq!(p.fresh_connect(), Some(Some(c(1))), "traded for a new connection");
    p.connect_started();
    assert_eq!(p.fresh_connect(), None, "nothing else to trade");
    assert_eq!(lend_all(&mut p), [], "two retries still short, the pool full");
    // The new channel goes to the first retry, alone.
    p.connect_finished();
    p.push_idle(C { id: 3, used: false }, Instant::now());
    assert_eq!(lend_all(&mut p), [(10, 3)]);
    // Channel 2 drains and is traded for the second retry; the first
    // retry's channel, when it is done, for the third.
    for _ in 0..4 {
        let _ = p.left(2, Back::Reuse, UNCOUNTED);
    }
    p.push_idle(c(2), Instant::now());
    assert_eq!((lend_all(&mut p), p.fresh_connect()), (vec![], Some(Some(c(2)))));
    p.connect_started();
    assert_eq!(p.left(3, Back::Reuse, UNCOUNTED).map(|(c, back)| (c.id, back)), Some((3, Back::Reuse)));
    p.push_idle(c(3), Instant::now());
    assert_eq!((lend_all(&mut p), p.fresh_connect()), (vec![], Some(Some(c(3)))));
    p.connect_started();
    // Every retry has a connection on its way: the GETs go on meanwhile.
    assert_eq!(lend_all(&mut p), [], "no channel open: nothing to pipeline on yet");
    p.connect_finished();
    p.push_idle(C { id: 4, used: false }, Instant::now());
    assert_eq!(lend_all(&mut p), [(11, 4)]);
    p.connect_finished();
    p.push_idle(C { id: 5, used: false }, Instant::now());
    assert_eq!(lend_all(&mut p), [(12, 5)]);
    assert_eq!(p.left(4, Back::Reuse, UNCOUNTED).map(|(c, back)| (c.id, back)), Some((4, Back::Reuse)));
    p.push_idle(c(4), Instant::now());
    assert_eq!(lend_all(&mut p), [(20, 4)], "the waiting GET is served again");
}

#[test]
fn a_channel_a_query_left_badly_takes_no_more_and_comes_out_with_the_worst() {
    let mut p = pool(1, 1, 4);
    for n in 0..3 {
        p.wait(w(n));
    }
    assert_eq!(lend_all(&mut p).len(), 3);
    assert_eq!(p.left(1, Back::Verify, UNCOUNTED), None);
    p.wait(w(9));
    assert_eq!(lend_all(&mut p), [], "not shareable after a bad answer");
    assert_eq!(p.left(1, Back::Reuse, UNCOUNTED), None);
    assert_eq!(p.left(1, Back::Close, UNCOUNTED), Some((c(1), Back::Close)), "the worst of all");
}

#[test]
fn the_caller_decides_which_busy_channels_are_shareable() {
    let mut p = pool(2, 2, 4);
    p.wait(w(1));
    p.wait(w(2));
    assert_eq!(lend_all(&mut p).len(), 2);
    p.wait(w(3));
    let only_1 = |c: &C| c.id == 1;
    assert_eq!(p.next_lend(T, only_1).map(|(w, id)| (w.n, id)), Some((3, 1)));
}

#[test]
fn a_site_serving_fewer_channels_caps_the_pool_and_one_more_is_tried_every_channel_retry() {
    let t0 = Instant::now();
    let mut p = pool(2, 4, 1);
    for n in 0..4 {
        p.wait(w(n));
    }
    assert_eq!(lend_all(&mut p).len(), 2);
    p.admission_started(); // a third, not served
    p.admission_finished();
    assert_eq!(p.not_admitted(t0, true), Shrink::Limited { serving: 2, first: true });
    assert_eq!((p.limit(), p.capacity(), p.connects_wanted()), (2, Some(2), 0));
    assert!(p.at_known_capacity());
    assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(60)));
    assert!(!p.on_timer(t0 + Duration::from_secs(59), true).0, "not before channel_retry");
    assert!(p.on_timer(t0 + Duration::from_secs(60), true).0, "one more try");
    assert_eq!((p.limit(), p.connects_wanted()), (3, 1));
    p.connect_started();
    p.connect_finished();
    p.admission_started();
    p.admission_finished();
    // Not served again: no second warning for the same size.
    let t1 = t0 + Duration::from_secs(62);
    assert_eq!(p.not_admitted(t1, true), Shrink::Limited { serving: 2, first: false });
    assert_eq!(p.next_deadline(), Some(t1 + Duration::from_secs(60)));
    // Served this time: the pool reached its cap, try one more at once.
    assert!(p.on_timer(t1 + Duration::from_secs(60), true).0);
    assert_eq!(p.admitted(c(3), t1), Grow::TryOneMore);
    assert_eq!((p.limit(), p.connects_wanted()), (4, 1));
    assert_eq!(p.admitted(c(4), t1), Grow::AllServed);
    assert_eq!((p.capacity(), p.limit()), (None, 4));
}

#[test]
fn no_working_channel_or_another_failure_means_the_site_is_down() {
    let t0 = Instant::now();
    let mut p: Pool<C, W> = Pool::new(sizes(3, 3, 1));
    assert_eq!(p.not_admitted(t0, true), Shrink::Down, "nothing works");
    let mut p = pool(1, 1, 1);
    assert_eq!(p.not_admitted(t0, false), Shrink::Down, "not the kind of failure of a limited site");
}

#[test]
fn growth_waits_for_the_site_to_be_ready() {
    let t0 = Instant::now();
    let mut p = pool(1, 2, 1);
    p.wait(w(1));
    p.wait(w(2));
    assert_eq!(lend_all(&mut p).len(), 1);
    assert!(matches!(p.not_admitted(t0, true), Shrink::Limited { .. }));
    assert!(!p.on_timer(t0 + Duration::from_secs(60), false).0, "not while down or starting");
    assert_eq!(p.next_deadline(), None, "the timer is spent");
}

#[test]
fn going_down_empties_the_pool_and_hands_back_the_waiters() {
    let t0 = Instant::now();
    let mut p = pool(2, 3, 1);
    p.wait(w(1));
    assert_eq!(lend_all(&mut p).len(), 1);
    p.admission_started();
    p.admission_finished();
    let _ = p.not_admitted(t0, true);
    p.wait(w(2));
    p.wait(w(3));
    assert_eq!(lend_all(&mut p).len(), 1);
    p.wait(w(4));
    let (waiters, gone) = p.reset();
    assert_eq!(waiters.iter().map(|w| w.n).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(gone.len(), 2, "both channels come back to be closed");
    assert_eq!((p.serving(), p.capacity(), p.next_deadline(), p.limit()), (0, None, None, 3));
}

#[test]
fn dead_idle_channels_are_dropped() {
    let mut p = pool(3, 3, 1);
    assert_eq!(p.retain_idle(|c| c.id != 2), 1);
    assert_eq!(p.connects_wanted(), 1);
    assert_eq!(p.remove_idle(0), Some(c(1)));
    assert_eq!(p.connects_wanted(), 2);
}

#[test]
fn the_desk_lends_what_a_waiting_query_would_get_and_takes_back_only_clean_current_channels() {
    let now = Instant::now();
    let mut p = pool(2, 2, 2);
    // The most recently used idle channel, as for a waiter; not one that
    // looks dead; never for a retry.
    assert_eq!(p.lend_idle(Want::Get, T, |_| false), None, "a channel that may have died is the actor's");
    assert_eq!(p.lend_idle(Want::Fresh, T, |_| true), None);
    assert_eq!(p.lend_idle(Want::Get, T, |_| true), Some(2));
    assert_eq!(p.lend_idle(Want::Alone, T, |_| true), Some(1));
    assert_eq!(p.lend_idle(Want::Get, T, |_| true), None, "none idle");
    // Both busy, the pool at its limit: a place behind the fewest, by the
    // pipelining rules (not behind COMMANDs: channel 1 is Alone).
    assert_eq!(p.lend_pipelined(ANY, UNCOUNTED), Some(2));
    assert_eq!(p.lend_pipelined(ANY, UNCOUNTED), None, "pipeline_depth 2 reached");
    assert_eq!(p.pipelined(), 1);
    // Given back: the first query of two leaves the channel to the other,
    // the last makes it idle.
    assert_eq!(p.give_back_clean(2, now, |_| true, UNCOUNTED), Some(false), "still the other query's");
    assert_eq!(p.describe(|_| T).iter().find(|d| d.0 == 2).map(|d| (d.1, d.3)), Some(("busy", 1)));
    assert_eq!(p.give_back_clean(2, now, |_| true, UNCOUNTED), Some(true), "idle again");
    assert_eq!(p.idle_count(), 1);
    // Not current (an older generation): the actor's.
    assert_eq!(p.give_back_clean(1, now, |_| false, UNCOUNTED), None);
    // A pool that may still grow does not pipeline: the actor opens a
    // channel instead.
    let mut q = pool(1, 2, 2);
    assert_eq!(q.lend_idle(Want::Get, T, |_| true), Some(1));
    assert_eq!(q.lend_pipelined(ANY, UNCOUNTED), None);
    // After a worse return by a query before it, the channel is the actor's.
    assert_eq!(p.lend_idle(Want::Get, T, |_| true), Some(2));
    assert_eq!(p.lend_pipelined(ANY, UNCOUNTED), Some(2));
    assert_eq!(p.left(2, Back::Verify, UNCOUNTED), None, "the other query is still on it");
    assert_eq!(p.give_back_clean(2, now, |_| true, UNCOUNTED), None);
    assert_eq!(p.left(2, Back::Reuse, UNCOUNTED), Some((c(2), Back::Verify)));
}

/// A waiter of client `client`.
fn of(client: u64, n: u32) -> W {
    W { client, ..w(n) }
}

const GREEDY: u64 = 7;
const OTHER: u64 = 8;

/// Every channel lent (the pool at `channels`, no pipelining), ten more
/// queries of the greedy client waiting, then one of another client;
/// channels come back one at a time. Returns the order waiters are served.
fn serve_order(fair: bool) -> Vec<u32> {
    let mut p = pool(2, 2, 1);
    p.resize(Sizes { fair, ..sizes(2, 2, 1) });
    for n in 1..=2 {
        p.wait(of(GREEDY, n));
    }
    let mut lent: VecDeque<u64> = lend_all(&mut p).into_iter().map(|(_, id)| id).collect();
    for n in 3..=12 {
        p.wait(of(GREEDY, n));
    }
    p.wait(of(OTHER, 100));
    let mut order = Vec::new();
    while let Some(id) = lent.pop_front() {
        let (ch, _) = p.left(id, Back::Reuse, GREEDY).expect("the channel comes back");
        p.push_idle(ch, Instant::now());
        for (n, id) in lend_all(&mut p) {
            order.push(n);
            lent.push_back(id);
        }
    }
    order
}

#[test]
fn with_fair_share_a_client_with_many_queries_waiting_delays_another_by_one_query_at_most() {
    let order = serve_order(true);
    // The greedy client had its turn (two queries on the channels): the
    // other client's query is next, then the backlog.
    assert_eq!(order, [100, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    // Without fair share: arrival order, behind the whole backlog.
    assert_eq!(serve_order(false), [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 100]);
}

#[test]
fn with_fair_share_clients_take_turns_and_each_keeps_its_own_order() {
    let mut p = pool(1, 1, 1);
    p.wait(of(GREEDY, 1));
    let (_, id) = p.next_lend(T, ANY).expect("lent");
    for n in 2..=4 {
        p.wait(of(GREEDY, n));
    }
    for n in 10..=12 {
        p.wait(of(OTHER, n));
    }
    let mut order = Vec::new();
    let mut id = id;
    let mut client = GREEDY;
    loop {
        let (ch, _) = p.left(id, Back::Reuse, client).expect("back");
        p.push_idle(ch, Instant::now());
        let Some((w, next)) = p.next_lend(T, ANY) else { break };
        order.push(w.n);
        (id, client) = (next, w.client);
    }
    // The greedy client's first query had its turn: then one each.
    assert_eq!(order, [10, 2, 11, 3, 12, 4]);
}

#[test]
fn with_fair_share_a_client_with_queries_on_channels_leaves_the_least_busy_one_to_others() {
    // Two channels, pipelines four deep; the greedy client has one query
    // on each and six more waiting.
    let mut p = pool(2, 2, 4);
    for n in 1..=2 {
        p.wait(of(GREEDY, n));
    }
    assert_eq!(lend_all(&mut p).len(), 2);
    for n in 3..=8 {
        p.wait(of(GREEDY, n));
    }
    // Its queries join one channel only: the other keeps one query.
    let joined = lend_all(&mut p);
    assert_eq!(joined.len(), 3, "{joined:?}");
    assert!(joined.iter().all(|(_, id)| *id == joined[0].1), "{joined:?}");
    let reserve = 3 - joined[0].1;
    assert_eq!(p.waiting(), 3);
    // Another client's query goes behind that one query at once.
    p.wait(of(OTHER, 100));
    assert_eq!(lend_all(&mut p), [(100, reserve)]);
    // Without fair share the greedy client fills both pipelines.
    let mut p = pool(2, 2, 4);
    p.resize(Sizes { fair: false, ..sizes(2, 2, 4) });
    for n in 1..=8 {
        p.wait(of(GREEDY, n));
    }
    assert_eq!(lend_all(&mut p).len(), 8);
    p.wait(of(OTHER, 100));
    assert_eq!(lend_all(&mut p), [], "the other client waits behind four queries");
}

#[test]
fn the_desk_counts_what_it_pipelines_for_the_fair_share() {
    let mut p = pool(2, 2, 2);
    p.wait(of(GREEDY, 1));
    p.wait(of(GREEDY, 2));
    assert_eq!(lend_all(&mut p), [(1, 2), (2, 1)]);
    // The greedy client joins one channel, never both: the other is kept.
    assert_eq!(p.lend_pipelined(ANY, GREEDY), Some(2));
    assert_eq!(p.lend_pipelined(ANY, GREEDY), None, "channel 1 is the reserve");
    assert_eq!(p.lend_pipelined(ANY, OTHER), Some(1));
    // The other client now has a query on a channel too: the reserve is
    // gone for it (both channels are full anyway).
    assert_eq!(p.lend_pipelined(ANY, OTHER), None);
    // Its query leaves (clean, behind the greedy one): counted out.
    assert_eq!(p.give_back_clean(1, Instant::now(), |_| true, OTHER), Some(false));
    assert!(!p.in_flight.contains_key(&OTHER));
}

#[test]
fn with_one_channel_every_client_shares_it() {
    let mut p = pool(1, 1, 4);
    p.wait(of(GREEDY, 1));
    assert_eq!(lend_all(&mut p).len(), 1);
    assert_eq!(p.lend_pipelined(ANY, GREEDY), Some(1), "nothing to keep: pipelined as without fair share");
}
