//! Configuration reload in the running daemon ([`livemux::app::App::reload`];
//! SIGHUP, the pid file and systemd's notify protocol are tested against
//! the binary in `cli`): unchanged sites keep their connections, changed
//! ones keep their clients and answers in flight, added sites are served,
//! removed ones go after their answers, and reloads under load lose nothing.

use std::time::Duration;

use livemux::config::{Config, SiteParams};
use livemux::site::SiteState;
use livemux_simsite::bulk::Checker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::support::*;

const MIB: u64 = 1 << 20;

/// A proxy for `sites` in its own directory, and its configuration.
async fn proxy(sites: Vec<(&str, String, SiteParams)>) -> Proxy {
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
    let config = test_config(dir.path(), sites);
    let p = Proxy::start_config(dir, config.clone()).await;
    for s in &config.sites {
        p.wait_state(&s.name, SiteState::Ready).await;
    }
    p
}

/// The proxy's configuration with `f` applied.
fn changed(p: &Proxy, f: impl FnOnce(&mut Config)) -> Config {
    let mut c = p.config.clone();
    f(&mut c);
    c
}

async fn reload(p: &mut Proxy, c: Config) -> livemux::app::ReloadReport {
    let report = p.app.as_mut().expect("running").reload(c.clone()).await;
    p.config = c;
    report
}

/// Send `GET bulk` with fixed16 on `c`; the announced length.
async fn ask_bulk(c: &mut UnixStream) -> u64 {
    c.write_all(b"GET bulk\nResponseHeader: fixed16\nKeepAlive: on\n\n").await.expect("send");
    let mut raw = [0u8; 16];
    tokio::time::timeout(PATIENCE, c.read_exact(&mut raw)).await.expect("header in time").expect("header");
    let h = livemux_protocol::ResponseHeader::decode(&raw).expect("fixed16");
    assert_eq!(h.status.code(), 200);
    h.length
}

/// Read `n` body bytes into `check`.
async fn read_body(c: &mut UnixStream, n: u64, check: &mut Checker) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < n {
        let want = (n - got).min(buf.len() as u64) as usize;
        let r = tokio::time::timeout(PATIENCE, c.read(&mut buf[..want])).await.expect("data in time").expect("read");
        assert!(r > 0, "answer cut after {got} of {n} bytes");
        check.update(&buf[..r]);
        got += r as u64;
    }
}

/// Wait for `n` more heartbeats of `site` (time passing, observed).
async fn heartbeats(p: &Proxy, site: &str, n: u64) {
    let h = p.site(site);
    let start = h.status().heartbeats;
    tokio::time::timeout(PATIENCE, h.wait_for(|s| s.heartbeats >= start + n)).await.expect("heartbeats");
}

#[tokio::test]
async fn a_reload_that_changes_nothing_keeps_every_connection() {
    let (a, b) = (sim("ra").await, sim("rb").await);
    let mut p = proxy(vec![("ra", a.address(), fast_params()), ("rb", b.address(), fast_params())]).await;
    let mut client = p.client("ra").await;
    let (code, _) =
        ask(&mut client, "GET status\nColumns: num_hosts\nKeepAlive: on\nResponseHeader: fixed16\n\n").await;
    assert_eq!(code, 200);
    heartbeats(&p, "ra", 1).await;
    let before = (a.open_peers(), b.open_peers(), a.stats().accepted, b.stats().accepted);
    let same = changed(&p, |_| {});
    let report = reload(&mut p, same).await;
    assert_eq!(report, livemux::app::ReloadReport { kept: 2, ..Default::default() });
    heartbeats(&p, "ra", 2).await;
    heartbeats(&p, "rb", 2).await;
    let after = (a.open_peers(), b.open_peers(), a.stats().accepted, b.stats().accepted);
    assert_eq!(before, after, "the same TCP connections (client ports) and no new one");
    // The client connected before the reload is served on.
    let (code, body) =
        ask(&mut client, "GET status\nColumns: num_hosts\nKeepAlive: on\nResponseHeader: fixed16\n\n").await;
    assert_eq!((code, body.as_str()), (200, "100\n"));
    assert_eq!(p.site("ra").status().generation, 0);
    p.shutdown().await;
}

#[tokio::test]
async fn a_changed_channel_count_keeps_clients_and_answers_in_flight_and_resizes_the_pool() {
    let s = sim("rc").await;
    let size = 16 * MIB;
    s.set_knobs(|k| k.bulk_bytes = size);
    let mut p = proxy(vec![("rc", s.address(), fast_params())]).await;
    let mut reader = p.client("rc").await;
    let len = ask_bulk(&mut reader).await;
    let mut check = Checker::new();
    read_body(&mut reader, MIB, &mut check).await;

    let more = changed(&p, |c| {
        c.sites[0].params.channels = 4;
        c.sites[0].params.channels_max = 4;
        c.sites[0].params.query_timeout = Duration::from_secs(30);
    });
    let report = reload(&mut p, more).await;
    assert_eq!(report.changed, vec!["rc".to_owned()]);
    assert!(report.reconnected.is_empty() && report.failed.is_empty(), "{report:?}");
    assert_eq!(p.site("rc").params().query_timeout, Duration::from_secs(30), "in place at once");
    eventually_snapshot(&p, "rc", "four channels", |snap| snap.channels.len() == 4).await;
    // The answer in flight and the client's connection are untouched.
    read_body(&mut reader, len - MIB, &mut check).await;
    assert!(check.is_complete(size), "complete: {} bytes, error at {:?}", check.len(), check.first_error);
    let (code, body) = ask(&mut reader, "GET status\nColumns: num_hosts\nResponseHeader: fixed16\n\n").await;
    assert_eq!((code, body.as_str()), (200, "100\n"));

    let fewer = changed(&p, |c| {
        c.sites[0].params.channels = 1;
        c.sites[0].params.channels_max = 1;
    });
    reload(&mut p, fewer).await;
    eventually_snapshot(&p, "rc", "one channel", |snap| snap.channels.len() == 1).await;
    assert_eq!(p.site("rc").status().generation, 0, "never down");
    p.shutdown().await;
}

#[tokio::test]
async fn an_added_site_is_served_and_a_removed_sites_socket_goes_after_its_answer_in_progress() {
    let (a, b) = (sim("rd").await, sim("re").await);
    let size = 8 * MIB;
    a.set_knobs(|k| k.bulk_bytes = size);
    let mut p = proxy(vec![("rd", a.address(), fast_params())]).await;
    let added = changed(&p, |c| {
        let mut site = c.sites[0].clone();
        site.name = "re".into();
        site.address = b.address().parse().expect("address");
        c.sites.push(site);
    });
    let report = reload(&mut p, added).await;
    assert_eq!(report.added, vec!["re".to_owned()]);
    p.wait_state("re", SiteState::Ready).await;
    let (code, body) = query(&p, "re", "GET status\nColumns: num_hosts").await;
    assert_eq!((code, body.as_str()), (200, "100\n"));

    // A large answer in progress on rd while rd is removed.
    let mut reader = p.client("rd").await;
    let len = ask_bulk(&mut reader).await;
    let mut check = Checker::new();
    read_body(&mut reader, MIB, &mut check).await;
    let removed = changed(&p, |c| c.sites.retain(|s| s.name != "rd"));
    let report = reload(&mut p, removed).await;
    assert_eq!(report.removed, vec!["rd".to_owned()]);
    assert_eq!(report.kept, 1);
    let socket = p.config.socket_path("rd");
    assert!(socket.exists(), "the socket stays while its answer is in progress");
    assert!(UnixStream::connect(&socket).await.is_err(), "no new clients");
    read_body(&mut reader, len - MIB, &mut check).await;
    assert!(check.is_complete(size), "the answer in progress completes");
    eventually("the removed site's socket is gone", || !socket.exists()).await;
    assert!(p.app.as_ref().expect("app").site("rd").is_none());
    p.shutdown().await;
}

#[tokio::test]
async fn a_reload_to_a_new_address_during_a_large_answer_does_not_truncate_it() {
    let s = sim("rf").await;
    let size = 32 * MIB;
    s.set_knobs(|k| k.bulk_bytes = size);
    let mut p = proxy(vec![("rf", s.address(), fast_params())]).await;
    let mut reader = p.client("rf").await;
    let len = ask_bulk(&mut reader).await;
    let mut check = Checker::new();
    read_body(&mut reader, MIB, &mut check).await;
    // The same site under another name: new channels, the old one retires
    // once this answer is read.
    let port = s.tcp_addr().expect("tcp").port();
    let moved = changed(&p, |c| c.sites[0].address = format!("tcp://localhost:{port}").parse().expect("address"));
    let report = reload(&mut p, moved).await;
    assert_eq!(report.reconnected, vec!["rf".to_owned()]);
    read_body(&mut reader, len - MIB, &mut check).await;
    assert!(check.is_complete(size), "complete: {} bytes, error at {:?}", check.len(), check.first_error);
    let (code, body) = query(&p, "rf", "GET status\nColumns: num_hosts").await;
    assert_eq!((code, body.as_str()), (200, "100\n"));
    let snap = p.site("rf").snapshot(Duration::from_secs(1)).await.expect("snapshot");
    assert_eq!(snap.address, format!("tcp://localhost:{port}"));
    p.shutdown().await;
}

/// Ask for every host over one keep-alive connection until `stop`; every
/// answer must be complete. How many were answered.
async fn hosts_through(path: std::path::PathBuf, stop: tokio_util::sync::CancellationToken) -> usize {
    let mut c = UnixStream::connect(&path).await.expect("connect");
    let mut ok = 0;
    while !stop.is_cancelled() {
        let q = "GET hosts\nColumns: name\nKeepAlive: on\nResponseHeader: fixed16\n\n";
        let (code, body) = ask(&mut c, q).await;
        assert_eq!((code, body.lines().count()), (200, 100), "{body}");
        ok += 1;
    }
    ok
}

#[tokio::test]
async fn twenty_reloads_in_a_row_under_load_lose_no_query() {
    let s = sim("rg").await;
    let port = s.tcp_addr().expect("tcp").port();
    let mut p = proxy(vec![("rg", s.address(), fast_params())]).await;
    let mut clients = tokio::task::JoinSet::new();
    let stop = tokio_util::sync::CancellationToken::new();
    for _ in 0..8 {
        clients.spawn(hosts_through(p.socket("rg"), stop.clone()));
    }
    for i in 0..20 {
        let next = changed(&p, |c| {
            let site = &mut c.sites[0];
            site.params.channels = 2 + i % 3;
            site.params.channels_max = 2 + i % 3;
            if i % 5 == 4 {
                let host = if i % 10 == 4 { "localhost" } else { "127.0.0.1" };
                site.address = format!("tcp://{host}:{port}").parse().expect("address");
            }
        });
        let report = reload(&mut p, next).await;
        assert!(report.failed.is_empty(), "{report:?}");
        heartbeats(&p, "rg", 1).await;
    }
    stop.cancel();
    while let Some(r) = clients.join_next().await {
        // Every answer was complete (asserted in the task), and every
        // client kept being served throughout.
        assert!(r.expect("client task") > 0);
    }
    assert_eq!(p.site("rg").status().generation, 4, "four address changes, never down");
    p.shutdown().await;
}

/// `request_memory_budget` applies at once: after a reload to a smaller
/// budget, a client whose request no longer fits beside another's is
/// refused with a 503 naming it.
#[tokio::test]
async fn a_reload_applies_a_smaller_request_memory_budget_at_once() {
    let s = sim("rm").await;
    let mut p = proxy(vec![("rm", s.address(), fast_params())]).await;
    assert_eq!(p.app.as_ref().unwrap().request_usage().memory_budget, 64 * MIB as usize);
    let smaller = changed(&p, |c| c.request_memory_budget = 12 * MIB as usize);
    let report = reload(&mut p, smaller).await;
    assert_eq!(report, livemux::app::ReloadReport { kept: 1, ..Default::default() });
    assert_eq!(p.app.as_ref().unwrap().request_usage().memory_budget, 12 * MIB as usize);
    let head = |n: usize| {
        let mut r = b"GET status\nColumns: program_version\nResponseHeader: fixed16\n".to_vec();
        while r.len() < n {
            r.extend_from_slice(format!("X-Padding: {}\n", "p".repeat(1000)).as_bytes());
        }
        r
    };
    // a's 3 MiB, unfinished, take (three times over) nearly all of it.
    let mut a = p.client("rm").await;
    a.write_all(&head(3 * MIB as usize)).await.expect("send a");
    let app = p.app.as_ref().unwrap();
    let held = async {
        while app.request_usage().memory_used < 9 * MIB as usize {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, held).await.expect("a's request is charged");
    let mut b = p.client("rm").await;
    // b's writes fail once livemux refuses it and closes; its answer is there.
    let _ = b.write_all(&head(MIB as usize)).await;
    let (code, body) = read_answer(&mut b).await;
    assert_eq!(code, 503);
    assert!(body.contains("the 12582912 bytes of request_memory_budget"), "{body}");
    assert_eq!(app.request_usage().refused, 1);
    drop(a);
    p.shutdown().await;
}

/// A reload that moves a site to a new address while a heartbeat is on its
/// way: that heartbeat's answer, from an old channel, is ignored, and the
/// new channels get heartbeats of their own (before, the schedule waited
/// for the ignored one for good: no heartbeat ever went out again).
#[tokio::test]
async fn a_new_address_while_a_heartbeat_is_in_flight_keeps_the_heartbeats_going() {
    let (a, b) = (sim("hx").await, sim("hy").await);
    let params = SiteParams { heartbeat_timeout: Duration::from_secs(3), ..fast_params() };
    let mut p = proxy(vec![("hx", a.address(), params)]).await;
    // a answers heartbeats (GET status) after a second.
    a.set_knobs(|k| {
        k.delay = Duration::from_secs(1);
        k.fault_table = Some("status".into());
    });
    eventually_snapshot(&p, "hx", "a heartbeat in flight", |s| s.channels.iter().any(|c| c.state == "heartbeat")).await;
    let moved = changed(&p, |c| c.sites[0].address = b.address().parse().expect("address"));
    let report = reload(&mut p, moved).await;
    assert_eq!(report.reconnected, vec!["hx".to_owned()]);
    // Heartbeats go on, against b.
    heartbeats(&p, "hx", 5).await;
    // Once a's slow answer is in, no channel is left in a heartbeat.
    eventually_snapshot(&p, "hx", "every channel idle", |s| {
        s.channels.len() == 2 && s.channels.iter().all(|c| c.state == "idle")
    })
    .await;
    eventually("a's channels gone, b holds both", || a.open_peers().is_empty() && b.open_peers().len() == 2).await;
    assert_eq!(p.site("hx").status().state, SiteState::Ready);
    p.shutdown().await;
}

/// `[[federation]]` tables reload like sites: an added federation is served;
/// a changed one keeps its clients, whose next queries see its new sites;
/// an unchanged one is left alone; a removed one answers the query in
/// progress whole, and its socket goes after that.
#[tokio::test]
async fn federations_are_added_changed_and_removed_by_a_reload() {
    use livemux::config::FederationConfig;
    let (a, b) = (sim("fa").await, sim("fb").await);
    a.with_dataset(|d| {
        d.host_prefix = "a-".into();
        d.hosts = 5;
    });
    b.with_dataset(|d| {
        d.host_prefix = "b-".into();
        d.hosts = 3;
    });
    let mut p = proxy(vec![("fa", a.address(), fast_params()), ("fb", b.address(), fast_params())]).await;
    let fed = |name: &str, sites: &[&str]| FederationConfig {
        name: name.into(),
        sites: sites.iter().map(|s| (*s).to_owned()).collect(),
        fail_on_site_error: false,
        listen: None,
        dialect: livemux::config::Dialect::Livestatus,
        client: SiteParams::default(),
    };
    let hosts = "GET hosts\nColumns: name\nKeepAlive: on\nResponseHeader: fixed16\n\n";
    let c = changed(&p, |c| c.federations = vec![fed("one", &["fa"])]);
    let report = reload(&mut p, c).await;
    assert_eq!(report.federations_added, vec!["one".to_owned()], "{report}");
    assert!(report.needs_restart.is_empty() && report.failed.is_empty(), "{report}");
    let mut one = UnixStream::connect(p.config.socket_path("one")).await.expect("the added federation's socket");
    let (code, body) = ask(&mut one, hosts).await;
    assert_eq!((code, body.lines().count()), (200, 5), "{body}");

    // "one" changes (a second site), "two" is added.
    let c = changed(&p, |c| c.federations = vec![fed("one", &["fa", "fb"]), fed("two", &["fa", "fb"])]);
    let report = reload(&mut p, c).await;
    assert_eq!(
        (report.federations_changed.clone(), report.federations_added.clone()),
        (vec!["one".to_owned()], vec!["two".to_owned()]),
        "{report}"
    );
    assert!(report.to_string().contains("federations changed: one"), "{report}");
    let (code, body) = ask(&mut one, hosts).await;
    assert_eq!((code, body.lines().count()), (200, 8), "the same connection, the new sites: {body}");

    // Nothing changes: nothing reported, the client stays.
    let same = p.config.clone();
    let report = reload(&mut p, same).await;
    assert!(report.federations_added.is_empty() && report.federations_changed.is_empty(), "{report}");
    assert!(report.federations_removed.is_empty(), "{report}");
    assert_eq!(ask(&mut one, hosts).await.0, 200);

    // "two" is removed while a query on it waits for a slow site.
    // (Only its hosts answers are late: heartbeats keep it ready.)
    b.set_knobs(|k| {
        k.fault_table = Some("hosts".into());
        k.delay = Duration::from_millis(1500);
    });
    let mut two = UnixStream::connect(p.config.socket_path("two")).await.expect("connect");
    two.write_all(b"GET hosts\nColumns: name\nResponseHeader: fixed16\n\n").await.expect("send");
    eventually_snapshot(&p, "fb", "the query in progress at fb", |s| s.channels.iter().any(|c| c.state == "busy"))
        .await;
    let c = changed(&p, |c| c.federations = vec![fed("one", &["fa", "fb"])]);
    let report = reload(&mut p, c).await;
    assert_eq!(report.federations_removed, vec!["two".to_owned()], "{report}");
    assert!(p.config.socket_path("two").exists(), "the socket stays while its answer is in progress");
    let (code, body) = read_answer(&mut two).await;
    assert_eq!((code, body.lines().count()), (200, 8), "the answer in progress, whole: {body}");
    eventually("the removed federation's socket gone", || !p.config.socket_path("two").exists()).await;
    assert!(UnixStream::connect(p.config.socket_path("two")).await.is_err());
    b.set_knobs(|k| *k = livemux_simsite::Knobs::default());
    assert_eq!(ask(&mut one, hosts).await.0, 200, "the other federation's client is untouched");
    p.shutdown().await;
}
