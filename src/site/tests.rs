//! The site actor's timers on tokio's paused clock, against an in-memory
//! simulated site: every timer fires at its exact virtual instant, and no
//! socket stands between two of them (the clock moves only when nothing
//! else can run).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use livemux_simsite::{Listen, SimConfig, SimSite};
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connector::{Connect, Connecting, SiteStream};
use super::*;
use crate::config::{SiteAddress, SiteConfig, SiteParams};

/// Connections to an in-memory simulated site; counts the attempts.
struct Memory {
    site: Arc<SimSite>,
    attempts: AtomicU64,
    /// Connects fail as when livemux has no descriptor left (EMFILE).
    out_of_fds: std::sync::atomic::AtomicBool,
}

impl Connect for Memory {
    fn connect(&self) -> Connecting {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if self.out_of_fds.load(Ordering::Relaxed) {
            let source = std::io::Error::from_raw_os_error(nix::libc::EMFILE);
            let e = SiteError::Connect { address: "memory".into(), source };
            return Box::pin(async move { Err(e) });
        }
        let result = self
            .site
            .connect_in_memory()
            .map(SiteStream::Memory)
            .map_err(|source| SiteError::Connect { address: "memory".into(), source });
        Box::pin(async move { result })
    }
}

struct Fixture {
    handle: SiteHandle,
    site: Arc<SimSite>,
    connector: Arc<Memory>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// When the actor was started (virtual time).
    t0: Instant,
}

impl Fixture {
    async fn start(params: SiteParams) -> Fixture {
        let cfg = SimConfig { listen: Listen::Memory, ..SimConfig::tcp("mem") };
        let site = Arc::new(SimSite::start(cfg).await.expect("in-memory site"));
        let connector =
            Arc::new(Memory { site: site.clone(), attempts: AtomicU64::new(0), out_of_fds: Default::default() });
        let cfg = SiteConfig { name: "mem".into(), address: SiteAddress::Unix("/mem".into()), params, listen: None };
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let t0 = Instant::now();
        let cache = crate::cache::Cache::new(1 << 20, 1 << 16);
        let handle = SiteHandle::spawn_with(cfg, connector.clone(), None, cache, shutdown.clone(), &tracker);
        Fixture { handle, site, connector, shutdown, tracker, t0 }
    }

    /// Sleep until `at` after the start.
    async fn at(&self, at: Duration) {
        sleep_until(self.t0 + at).await;
    }

    fn state(&self) -> SiteState {
        self.handle.status().state
    }

    fn attempts(&self) -> u64 {
        self.connector.attempts.load(Ordering::Relaxed)
    }

    fn heartbeats(&self) -> u64 {
        self.site.queries_on("status")
    }

    async fn snapshot(&self) -> SiteSnapshot {
        self.handle.snapshot(Duration::from_secs(1)).await.expect("snapshot")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// One query through the handle; the answer's status and body.
async fn ask(h: &SiteHandle, text: &str) -> Result<(u16, String), QueryError> {
    let q = livemux_protocol::Query::from_text(text).expect("a valid query");
    let mut wire = Vec::new();
    q.encode_for_site(&mut wire);
    let resp = send_query(h, &wire, q.pipelinable, Instant::now() + h.params().query_timeout).await?;
    let header = resp.header;
    let (prefix, mut lease) = resp.into_prefix();
    let mut body = prefix.to_vec();
    let mut rest = vec![0u8; header.length as usize - body.len()];
    lease.read_exact(&mut rest).await.expect("the body");
    body.extend(rest);
    lease.release();
    Ok((header.status.code(), String::from_utf8(body).expect("utf-8")))
}

const MS: Duration = Duration::from_millis(1);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[tokio::test(start_paused = true)]
async fn heartbeats_go_out_every_heartbeat_interval() {
    let f = Fixture::start(SiteParams { channels: 1, ..SiteParams::default() }).await;
    f.at(MS).await;
    assert_eq!(f.state(), SiteState::Ready, "ready at once: the first connection answered its heartbeat");
    let first = f.heartbeats();
    for n in 1..=3u64 {
        f.at(secs(5 * n) - MS).await;
        assert_eq!(f.heartbeats(), first + n - 1, "not before {}s", 5 * n);
        f.at(secs(5 * n) + MS).await;
        assert_eq!(f.heartbeats(), first + n, "at {}s", 5 * n);
    }
    f.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_hung_core_is_down_after_heartbeat_timeout_and_retried_every_connect_retry() {
    // Defaults: heartbeat every 5 s, 2 s to answer, 4 s between reconnects.
    let f = Fixture::start(SiteParams { channels: 1, ..SiteParams::default() }).await;
    f.at(MS).await;
    assert_eq!(f.state(), SiteState::Ready);
    f.site.set_knobs(|k| k.hang = true);
    f.at(secs(7) - MS).await;
    assert_eq!(f.state(), SiteState::Ready, "the heartbeat at 5 s has 2 s to be answered");
    f.at(secs(7) + MS).await;
    assert_eq!(f.state(), SiteState::Down);
    let (code, body) = match ask(&f.handle, "GET status\nColumns: num_hosts").await {
        Err(e) => (e.status().code(), e.to_string()),
        Ok(a) => panic!("answered while down: {a:?}"),
    };
    assert_eq!((code, body.as_str()), (502, "site 'mem' is down: heartbeat not answered within 2s"));
    // Reconnects: at 11 s (its heartbeat hangs too: down at 13 s), at 17 s, ...
    let attempts = f.attempts();
    f.at(secs(11) - MS).await;
    assert_eq!(f.attempts(), attempts, "cooling for connect_retry");
    f.at(secs(11) + MS).await;
    assert_eq!(f.attempts(), attempts + 1, "one reconnect at 11 s");
    f.at(secs(13) + MS).await;
    assert_eq!(f.state(), SiteState::Down, "its heartbeat was not answered either");
    f.site.set_knobs(|k| k.hang = false);
    f.at(secs(17) - MS).await;
    assert_eq!((f.state(), f.attempts()), (SiteState::Down, attempts + 1));
    f.at(secs(17) + MS).await;
    assert_eq!((f.state(), f.attempts()), (SiteState::Ready, attempts + 2), "ready again with the reconnect at 17 s");
    f.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_query_waits_channel_timeout_for_a_channel_and_no_longer() {
    let params = SiteParams { channels: 1, channels_max: 1, pipeline_depth: 1, ..SiteParams::default() };
    let f = Fixture::start(params).await;
    f.at(MS).await;
    f.site.set_knobs(|k| {
        k.hang = true;
        k.fault_table = Some("hosts".into());
    });
    let busy = tokio::spawn({
        let h = f.handle.clone();
        async move { ask(&h, "GET hosts\nColumns: name").await }
    });
    f.at(secs(1)).await;
    let started = Instant::now();
    let waited = ask(&f.handle, "GET status\nColumns: num_hosts").await.expect_err("no channel");
    assert_eq!(Instant::now() - started, secs(3), "channel_timeout, exactly");
    assert_eq!(waited.to_string(), "no channel to site 'mem' became free within 3s");
    f.site.set_knobs(|k| k.hang = false);
    assert_eq!(busy.await.expect("task").expect("answered").0, 200);
    f.stop().await;
}

#[tokio::test(start_paused = true)]
async fn idle_channels_the_site_closes_are_replaced_at_once() {
    let f = Fixture::start(SiteParams { channels: 2, ..SiteParams::default() }).await;
    f.at(MS).await;
    assert_eq!(f.snapshot().await.channels.len(), 2);
    let attempts = f.attempts();
    f.site.close_idle_connections();
    f.at(secs(1)).await;
    assert_eq!(f.attempts(), attempts + 2, "both replaced, without waiting for a heartbeat");
    let snap = f.snapshot().await;
    assert_eq!((snap.channels.len(), snap.state), (2, SiteState::Ready));
    assert_eq!(ask(&f.handle, "GET status\nColumns: num_hosts").await.expect("answer"), (200, "100\n".into()));
    f.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_site_serving_fewer_channels_gets_a_smaller_pool_and_one_more_try_every_channel_retry() {
    // 3 channels asked for, 2 served: the third's admission heartbeat goes
    // unanswered for heartbeat_timeout (2 s); one more is tried every
    // channel_retry (60 s).
    let f = Fixture::start(SiteParams { channels: 3, channels_max: 3, ..SiteParams::default() }).await;
    f.site.set_knobs(|k| k.max_connections = 2);
    f.at(MS).await;
    assert_eq!((f.state(), f.attempts()), (SiteState::Ready, 3), "the probe and two pool channels");
    f.at(secs(2) + MS).await;
    let snap = f.snapshot().await;
    assert_eq!((snap.channels_served, snap.channels.len(), snap.channels_connecting), (Some(2), 2, 0));
    f.at(secs(62) - MS).await;
    assert_eq!(f.attempts(), 3, "no new try before channel_retry");
    f.at(secs(62) + MS).await;
    assert_eq!(f.attempts(), 4, "one more try at 62 s");
    f.at(secs(64) + MS).await;
    assert_eq!(f.snapshot().await.channels_served, Some(2), "still not served");
    // The site serves a third connection now: the next try (60 s after the
    // last one failed, at 64 s) succeeds.
    f.site.set_knobs(|k| k.max_connections = 3);
    f.at(secs(124) - MS).await;
    assert_eq!(f.attempts(), 4);
    f.at(secs(124) + MS).await;
    let snap = f.snapshot().await;
    assert_eq!((f.attempts(), snap.channels_served, snap.channels.len()), (5, None, 3));
    assert_eq!(f.state(), SiteState::Ready, "never down meanwhile");
    f.stop().await;
}

#[tokio::test(start_paused = true)]
async fn waiting_queries_grow_the_pool_and_it_shrinks_back_after_channel_idle_timeout() {
    let params = SiteParams {
        channels: 1,
        channels_max: 4,
        pipeline_depth: 1,
        channel_idle_timeout: secs(60),
        channel_timeout: secs(10),
        ..SiteParams::default()
    };
    let f = Fixture::start(params).await;
    f.at(MS).await;
    f.site.set_knobs(|k| {
        k.delay = secs(1);
        k.fault_table = Some("hosts".into());
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let h = f.handle.clone();
        tasks.spawn(async move { ask(&h, "GET hosts\nColumns: name\nLimit: 1").await });
    }
    f.at(secs(1)).await;
    assert_eq!(f.snapshot().await.channels.len(), 4, "grown to channels_max for the waiting queries");
    assert_eq!(f.attempts(), 4);
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.expect("task").expect("answered"), (200, "host-0000\n".into()));
    }
    // All done by 2 s (two rounds of 1 s answers on 4 channels); the three
    // above `channels` close once idle for 60 s; heartbeats keep the one.
    f.at(secs(61)).await;
    assert_eq!(f.snapshot().await.channels.len(), 4, "not before channel_idle_timeout");
    f.at(secs(63)).await;
    let snap = f.snapshot().await;
    assert_eq!(snap.channels.len(), 1, "back to channels: {:?}", snap.channels);
    assert_eq!(f.state(), SiteState::Ready);
    f.stop().await;
}

#[tokio::test(start_paused = true)]
async fn running_out_of_descriptors_is_not_the_sites_fault_and_connects_wait_connect_retry() {
    let params = SiteParams {
        channels: 1,
        channels_max: 2,
        pipeline_depth: 1,
        connect_retry: secs(1),
        channel_timeout: secs(5),
        ..SiteParams::default()
    };
    let f = Fixture::start(params).await;
    f.at(MS).await;
    assert_eq!(f.state(), SiteState::Ready);
    f.site.set_knobs(|k| {
        k.delay = secs(3);
        k.fault_table = Some("hosts".into());
    });
    f.connector.out_of_fds.store(true, Ordering::Relaxed);
    let before = f.attempts();
    // Two queries: the second waits, the pool wants a second channel.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let h = f.handle.clone();
        tasks.spawn(async move { ask(&h, "GET hosts\nColumns: name\nLimit: 1").await });
    }
    f.at(MS * 10).await;
    assert_eq!(f.attempts(), before + 1, "one failed connect");
    f.at(MS * 900).await;
    assert_eq!(f.attempts(), before + 1, "no new attempt before connect_retry");
    assert_eq!(f.state(), SiteState::Ready, "the site is not blamed");
    // Descriptors free again: the next try opens the channel.
    f.connector.out_of_fds.store(false, Ordering::Relaxed);
    f.at(MS * 1100).await;
    assert_eq!(f.attempts(), before + 2);
    assert_eq!(f.snapshot().await.channels.len(), 2);
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.expect("task").expect("answered"), (200, "host-0000\n".into()));
    }
    assert_eq!(f.handle.status().generation, 0, "never down");
    f.stop().await;
}

/// Good queries and their exact answers.
const GOOD: &[(&str, &str)] = &[
    ("GET hosts\nColumns: name\nFilter: name = host-0007", "host-0007\n"),
    ("GET status\nColumns: num_hosts", "100\n"),
    ("GET hosts\nColumns: name state\nFilter: name = host-0042", "host-0042;0\n"),
    ("GET services\nStats: state >= 0", "1000\n"),
];

/// Bad queries, as issue 28 mixed them in (an unknown table, an unknown
/// column, a bad filter), and their error answers. Without `mk_headers`
/// the simulated site closes a keep-alive connection after an error
/// answer, as Icinga 2 does; with it, it keeps it, as Naemon does.
const BAD: &[(&str, u16, &str)] = &[
    ("GET nosuchtable\nColumns: name", 404, "Table 'nosuchtable' does not exist.\n"),
    ("GET hosts\nColumns: nosuchcolumn", 400, "Table 'hosts' has no column 'nosuchcolumn'\n"),
    ("GET hosts\nColumns: name\nFilter: name ~~~ x", 400, "invalid operator '~~~' in 'name ~~~ x'\n"),
];

#[tokio::test(start_paused = true)]
async fn good_queries_pipelined_with_bad_ones_that_cost_their_channel_wait_at_most_a_reconnect() {
    // Issue 28's setup: one channel kept, two at most, four queries per
    // channel, 20 clients looping over good queries, and now and then a bad
    // one among them, further apart than channel_timeout. Each bad answer
    // costs its channel and sends the queries pipelined behind it to
    // channels of their own. Those used to wait for a channel that never
    // came (the GETs that kept coming kept both channels busy) until
    // channel_timeout: `503 no channel to site 'mem' became free within 3s`.
    for mk in [false, true] {
        let params = SiteParams {
            channels: 1,
            channels_max: 2,
            pipeline_depth: 4,
            heartbeat_interval: secs(1),
            channel_timeout: secs(3),
            ..SiteParams::default()
        };
        let f = Fixture::start(params).await;
        f.at(MS).await;
        // A round trip per answer (pipelined ones travel together), so that
        // queries queue up and pipeline; a new connection's first answer
        // takes two (its handshake).
        let rtt = MS * 10;
        f.site.set_knobs(|k| {
            k.rtt = rtt;
            k.mk_headers = mk;
        });
        let bad_every = secs(4);
        let end = f.t0 + bad_every * (BAD.len() as u32 + 1);
        let mut clients = tokio::task::JoinSet::new();
        for client in 0..20usize {
            let h = f.handle.clone();
            clients.spawn(async move {
                let (mut longest, mut wrong, mut round) = (Duration::ZERO, Vec::new(), 0);
                while Instant::now() < end {
                    let (q, want) = GOOD[(client + round) % GOOD.len()];
                    let started = Instant::now();
                    let got = ask(&h, q).await.map_err(|e| e.to_string());
                    longest = longest.max(started.elapsed());
                    if got != Ok((200, want.to_owned())) {
                        wrong.push(format!("client {client}, round {round}, {q:?}: {got:?}"));
                    }
                    round += 1;
                }
                (longest, wrong)
            });
        }
        let bad = tokio::spawn({
            let (h, t0) = (f.handle.clone(), f.t0);
            async move {
                let mut answers = Vec::new();
                for (n, (q, code, msg)) in BAD.iter().enumerate() {
                    sleep_until(t0 + bad_every * (n as u32 + 1)).await;
                    answers.push((ask(&h, q).await.map_err(|e| e.to_string()), Ok((*code, msg.to_string()))));
                }
                answers
            }
        });
        let (mut longest, mut wrong) = (Duration::ZERO, Vec::new());
        while let Some(r) = clients.join_next().await {
            let (l, w) = r.expect("a client");
            longest = longest.max(l);
            wrong.extend(w);
        }
        for (got, want) in bad.await.expect("the bad client") {
            assert_eq!(got, want, "mk_headers {mk}");
        }
        assert_eq!(wrong, Vec::<String>::new(), "mk_headers {mk}: every good query answered, exactly");
        // A GET waits 3 round trips here without bad queries (20 clients,
        // 8 places). A retry waits for its new connection (2 round trips)
        // and, with three retries and two channels, the third for the
        // first one's answer; the GETs meanwhile for the retries' channels
        // (80 ms in all). Far from channel_timeout (300 round trips).
        assert!(longest <= rtt * 10, "mk_headers {mk}: a good query waited {longest:?}");
        assert_eq!(f.handle.status().generation, 0, "never down");
        f.stop().await;
    }
}
