//! Elastic pools and pipelined channels against the simulated site: the
//! pool grows under waiting queries within `channels_max` and what the site
//! serves; pipelined answers reach the right clients, complete and in
//! order; a channel that dies mid-pipeline, a bad query among good ones, a
//! slow client ahead in the pipeline cost the queries behind at most a
//! retry; `COMMAND`s are never pipelined.

use std::time::Duration;

use crate::support::*;
use livemux::config::{SiteParams, SpoolConfig};
use livemux::site::SiteState;
use livemux_simsite::bulk::Checker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A keep-alive client asks for hosts one after another; every answer must
/// be exactly that host.
async fn ask_hosts(p: &Proxy, client: usize, each: usize) {
    let mut c = UnixStream::connect(p.socket("s1")).await.unwrap();
    for i in 0..each {
        let h = (client * 7 + i * 13) % 100;
        let q =
            format!("GET hosts\nColumns: name\nFilter: name = host-{h:04}\nKeepAlive: on\nResponseHeader: fixed16\n\n");
        c.write_all(q.as_bytes()).await.unwrap();
        assert_eq!(read_answer(&mut c).await, (200, format!("host-{h:04}\n")), "client {client}, query {i}");
    }
}

/// `clients` keep-alive clients at once, `each` queries each.
async fn many_clients(p: &Proxy, clients: usize, each: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let path = p.socket("s1");
        tasks.spawn(async move {
            let mut c = UnixStream::connect(path).await.unwrap();
            for i in 0..each {
                let h = (client * 7 + i * 13) % 100;
                let q = format!(
                    "GET hosts\nColumns: name\nFilter: name = host-{h:04}\nKeepAlive: on\nResponseHeader: fixed16\n\n"
                );
                c.write_all(q.as_bytes()).await.unwrap();
                assert_eq!(read_answer(&mut c).await, (200, format!("host-{h:04}\n")), "client {client}, query {i}");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

fn pipelined(depth: usize) -> SiteParams {
    SiteParams { channels: 1, channels_max: 1, pipeline_depth: depth, ..fast_params() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_queries_grow_the_pool_to_channels_max_and_no_further() {
    let params = SiteParams { channels: 2, channels_max: 5, ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    s.set_knobs(|k| k.delay = Duration::from_millis(50));
    many_clients(&p, 20, 5).await;
    let stats = s.stats();
    // The pool's 5, and one extra connection a heartbeat may use while
    // every channel is busy and the site silent.
    assert!(stats.peak_open <= 5 + 1, "at most channels_max + 1 connections: {}", stats.peak_open);
    assert!(stats.peak_open >= 5, "the pool grew to channels_max: {}", stats.peak_open);
    assert_eq!(stats.pipelined, 0, "pipeline_depth 1: nothing pipelined");
    let snap = p.site("s1").snapshot(Duration::from_secs(1)).await.unwrap();
    assert_eq!(snap.channels_peak, 5, "the state file shows the peak at channels_max");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_never_opens_more_than_the_site_serves() {
    let params = SiteParams { channels: 2, channels_max: 8, channel_retry: Duration::from_secs(3600), ..fast_params() };
    let s = sim("s1").await;
    s.set_knobs(|k| {
        k.max_connections = 3;
        k.delay = Duration::from_millis(30);
        k.fault_table = Some("hosts".into());
    });
    let p = Proxy::start(vec![("s1", s.address(), SiteParams { query_timeout: 2 * PATIENCE, ..params })]).await;
    p.wait_state("s1", SiteState::Ready).await;
    many_clients(&p, 12, 4).await;
    let snap = p.site("s1").snapshot(Duration::from_secs(1)).await.unwrap();
    assert_eq!(snap.channels_served, Some(3), "the cap is what the site serves");
    assert!(snap.channels.len() <= 3, "{:?}", snap.channels);
    assert_eq!(p.site("s1").status().generation, 0, "never declared down");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_answers_reach_the_right_clients_complete_and_in_order() {
    let (p, s) = Proxy::with_sim("s1", pipelined(8)).await;
    // A little delay per answer, so requests queue up on the one channel.
    s.set_knobs(|k| {
        k.delay = Duration::from_millis(2);
        k.fault_table = Some("hosts".into());
    });
    many_clients(&p, 30, 10).await;
    let stats = s.stats();
    assert!(stats.pipelined > 0, "queries were pipelined: {stats:?}");
    assert_eq!(stats.accepted, 1, "all of them on the one channel");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_closed_by_the_site_mid_pipeline_loses_no_get() {
    let (p, s) = Proxy::with_sim("s1", SiteParams { channels_max: 2, ..pipelined(8) }).await;
    s.set_knobs(|k| {
        k.delay = Duration::from_millis(2);
        k.fault_table = Some("hosts".into());
    });
    // Every connection dies after 5 answers, with more requests queued on it.
    s.set_knobs(|k| k.close_after_answers = 5);
    many_clients(&p, 20, 10).await;
    assert!(s.stats().pipelined > 0, "queries were pipelined");
    assert!(s.stats().accepted > 2, "channels died and were replaced");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_among_pipelined_good_ones_cost_them_only_a_retry() {
    // Two kinds of bad query, as a core sees them: an unknown table (a
    // well-formed request: it is pipelined; the simulated site, like
    // Icinga 2, closes the connection after the error) and an unknown
    // header (mk-livestatus mode: the core would read the rest of the
    // request as the next one; such a query is never pipelined).
    for mk in [false, true] {
        let (p, s) = Proxy::with_sim("s1", SiteParams { channels_max: 2, ..pipelined(8) }).await;
        s.set_knobs(|k| {
            k.mk_headers = mk;
            k.delay = Duration::from_millis(2);
            k.fault_table = Some("hosts".into());
        });
        let (bad, want) = if mk {
            ("GET hosts\nFoo: bar\nLimit: 2\n", (400, "Undefined request header 'Foo: bar'\n"))
        } else {
            ("GET nosuchtable\nColumns: name\n", (404, "Table 'nosuchtable' does not exist.\n"))
        };
        let mut bad_clients = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let path = p.socket("s1");
            bad_clients.spawn(async move {
                let mut c = UnixStream::connect(path).await.unwrap();
                for _ in 0..5 {
                    let (code, body) = ask(&mut c, &format!("{bad}KeepAlive: on\nResponseHeader: fixed16\n\n")).await;
                    assert_eq!((code, body.as_str()), want, "{bad:?}");
                }
            });
        }
        many_clients(&p, 20, 10).await;
        while let Some(r) = bad_clients.join_next().await {
            r.unwrap();
        }
        assert!(s.stats().pipelined > 0, "queries were pipelined");
        assert_eq!(p.site("s1").status().generation, 0, "bad queries never took the site down");
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_never_goes_behind_a_query_nor_a_query_behind_a_command() {
    let (p, s) = Proxy::with_sim("s1", SiteParams { channel_timeout: Duration::from_secs(10), ..pipelined(8) }).await;
    s.set_knobs(|k| {
        k.hang = true;
        k.fault_table = Some("hosts".into());
    });
    let mut busy = p.client("s1").await;
    busy.write_all(b"GET hosts\nColumns: name\nLimit: 1\nResponseHeader: fixed16\n\n").await.unwrap();
    eventually("the query holds the channel", || s.queries_on("hosts") == 1).await;
    let mut cmd = p.client("s1").await;
    cmd.write_all(b"COMMAND [1] NOP;x\nResponseHeader: fixed16\n\n").await.unwrap();
    eventually_snapshot(&p, "s1", "the command waits for an idle channel", |snap| snap.clients_waiting == 1).await;
    assert_eq!(s.stats().commands, 0, "not written behind the query");
    s.set_knobs(|k| k.hang = false);
    assert_eq!(read_answer(&mut busy).await, (200, "host-0000\n".to_owned()));
    assert_eq!(read_answer(&mut cmd).await, (200, String::new()));
    assert_eq!(s.stats().commands, 1);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_behind_a_large_answer_waits_only_for_the_site_not_for_a_slow_client() {
    // One channel; a slow client's 16 MiB answer ahead, a small query
    // pipelined behind it. The spool reads the large answer at the site's
    // speed, so the small one is answered long before the slow client has
    // read half of its own.
    let size = 16 << 20;
    let (p, s) = Proxy::with_sim("s1", pipelined(4)).await;
    s.set_knobs(|k| k.bulk_bytes = size);
    let mut slow = p.client("s1").await;
    slow.write_all(b"GET bulk\nResponseHeader: fixed16\n\n").await.unwrap();
    let mut head = [0u8; 16];
    slow.read_exact(&mut head).await.unwrap();
    let mut check = Checker::new();
    let mut buf = vec![0u8; 64 * 1024];
    let n = slow.read(&mut buf).await.unwrap();
    check.update(&buf[..n]);
    // The small query, while the slow client reads nothing.
    let (code, body) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
    assert_eq!((code, body.as_str()), (200, "100\n"));
    assert!(check.len() < size / 2, "answered while the slow client had read {} bytes", check.len());
    while check.len() < size {
        let n = slow.read(&mut buf).await.unwrap();
        assert!(n > 0, "EOF after {}", check.len());
        check.update(&buf[..n]);
    }
    assert!(check.is_complete(size));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_pipelined_behind_an_answer_that_streams_to_a_slow_client_is_let_go() {
    // No spool: the answer ahead streams at its slow client's pace. The
    // query behind it must not wait for that client: it leaves the channel
    // (and, with no other channel to go to, gets a clear 503 after
    // channel_timeout), while the slow client is still reading.
    let size = 16 << 20;
    let params = SiteParams { channel_timeout: Duration::from_millis(500), ..pipelined(4) };
    let s = sim("s1").await;
    s.set_knobs(|k| k.bulk_bytes = size);
    let spool = SpoolConfig { memory_per_response: 0, memory_budget: 0, disk_budget: 0, ..SpoolConfig::default() };
    let p = Proxy::start_with_spool(vec![("s1", s.address(), params)], spool).await;
    p.wait_state("s1", SiteState::Ready).await;
    let mut slow = p.client("s1").await;
    slow.write_all(b"GET bulk\nResponseHeader: fixed16\n\n").await.unwrap();
    let mut head = [0u8; 16];
    slow.read_exact(&mut head).await.unwrap();
    let (code, body) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("became free within 500ms"), "{body}");
    // The slow client still gets all of its answer.
    let mut check = Checker::new();
    let mut buf = vec![0u8; 256 * 1024];
    while check.len() < size {
        let n = slow.read(&mut buf).await.unwrap();
        assert!(n > 0, "EOF after {}", check.len());
        check.update(&buf[..n]);
    }
    assert!(check.is_complete(size));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_client_is_served_as_before() {
    let (p, _s) = Proxy::with_sim("s1", pipelined(8)).await;
    ask_hosts(&p, 1, 20).await;
    p.shutdown().await;
}
