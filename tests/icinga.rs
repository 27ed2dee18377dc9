//! livemux in front of a real Livestatus server (Icinga 2) and with a real
//! third-party client (Monitoring::Livestatus).
//!
//! Icinga 2 returns rows in hash order, so rows are compared as sorted lists.
//! Icinga 2 serves at most 2 × cores connections per site at once (4 on a
//! 2-core machine), so every site here gets at most 2 channels, leaving room
//! for a direct connection and the occasional extra heartbeat.

mod support;

use std::time::Duration;

use livemux::config::SiteParams;
use livemux::site::SiteState;
use support::icinga::IcingaSite;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};

fn params() -> SiteParams {
    SiteParams {
        channels: 2,
        heartbeat_interval: Duration::from_millis(500),
        heartbeat_timeout: Duration::from_millis(400),
        connect_retry: Duration::from_millis(500),
        ..SiteParams::default()
    }
}

async fn icinga(hosts: usize, services: usize) -> Option<IcingaSite> {
    tokio::task::spawn_blocking(move || IcingaSite::start(hosts, services)).await.expect("start task")
}

/// An answer reduced to what must be equal: status, and the rows sorted
/// (csv lines, or json rows); for errors only the first line of the message.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    rows: Vec<String>,
}

fn normalise(status: u16, body: &[u8], json: bool) -> Answer {
    let text = String::from_utf8_lossy(body);
    let mut rows: Vec<String> = if status != 200 {
        text.lines().take(1).map(str::to_owned).collect()
    } else if json {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("json {e}: {text}"));
        v.as_array().expect("json rows").iter().map(|r| r.to_string()).collect()
    } else {
        text.lines().map(str::to_owned).collect()
    };
    rows.sort();
    Answer { status, rows }
}

/// Read a fixed16 answer from any stream.
async fn fixed16<R: tokio::io::AsyncRead + Unpin>(s: &mut R) -> (u16, Vec<u8>) {
    read_answer_bytes(s).await
}

/// One request on a new direct TCP connection; everything until EOF.
async fn direct_raw(site: &IcingaSite, request: &str) -> Vec<u8> {
    direct_tcp(([127, 0, 0, 1], site.port).into(), request).await
}

async fn proxy_raw(p: &Proxy, site: &str, request: &str) -> Vec<u8> {
    let mut s = p.client(site).await;
    s.write_all(request.as_bytes()).await.unwrap();
    read_to_eof(&mut s).await
}

const BATTERY: &[&str] = &[
    "GET hosts\nColumns: name state address groups num_services\n",
    "GET hosts\nColumns: name state plugin_output\nFilter: state = 1\nLimit: 10\n",
    "GET hosts\nColumns: name\nFilter: groups >= db\nFilter: state = 0\nAnd: 2\nOutputFormat: json\n",
    "GET services\nColumns: host_name description state plugin_output perf_data\nFilter: state != 0\n",
    "GET services\nColumns: host_name description groups\nOutputFormat: json\n",
    "GET services\nStats: state = 0\nStats: state = 1\nStats: state = 2\nStats: state = 3\n",
    "GET services\nColumns: description\nStats: state != 0\nOutputFormat: json\n",
    "GET services\nStats: sum state\nStats: max state\nStats: min state\n",
    "GET hostgroups\nColumns: name num_hosts members\n",
    "GET servicegroups\nColumns: name num_services\nOutputFormat: json\n",
    "GET contacts\nColumns: name email\n",
    "GET comments\nColumns: host_name comment author\n",
    "GET downtimes\nColumns: host_name comment\nOutputFormat: json\n",
    "GET status\nColumns: program_version livestatus_version num_hosts num_services program_start\n",
    "GET nosuchtable\n",
    "GET hosts\nColumns: nosuchcolumn\n",
    "GET hosts\nColumns: name\nFilter: state = abc\n",
    "GET hosts\nColumns: name\nFilter: name <> host-0001\n",
];

#[tokio::test]
async fn a_battery_of_queries_gets_the_same_answers_through_livemux() {
    let Some(ic) = icinga(100, 5).await else { return };
    let p = Proxy::start(vec![("ic", ic.tcp_address(), params())]).await;
    p.wait_state("ic", SiteState::Ready).await;

    for q in BATTERY {
        let json = q.contains("OutputFormat: json");
        // fixed16, one query per connection.
        let req = format!("{q}ResponseHeader: fixed16\n\n");
        let d = direct_raw(&ic, &req).await;
        let (ds, db) = fixed16(&mut d.as_slice()).await;
        let (ps, pb) = fixed16(&mut proxy_raw(&p, "ic", &req).await.as_slice()).await;
        assert_eq!(normalise(ps, &pb, json), normalise(ds, &db, json), "fixed16: {q:?}");
        assert_eq!(d.len() as u64, 16 + db.len() as u64, "one answer, nothing more");

        // Plain: the body of a 200 is the same. (On errors Icinga 2 sends
        // nothing without fixed16; livemux forwards the site's message.)
        let req = format!("{q}\n");
        let d = direct_raw(&ic, &req).await;
        let pr = proxy_raw(&p, "ic", &req).await;
        if ds == 200 {
            assert_eq!(normalise(200, &pr, json), normalise(200, &d, json), "plain: {q:?}");
        } else {
            assert!(d.is_empty(), "Icinga 2 sends nothing for errors without fixed16");
            assert_eq!(normalise(ds, &pr, json), normalise(ds, &db, json), "plain error: {q:?}");
        }
    }

    // Keep-alive with fixed16: the battery on one connection each.
    let mut d = TcpStream::connect(("127.0.0.1", ic.port)).await.unwrap();
    let mut c = p.client("ic").await;
    for q in BATTERY {
        let json = q.contains("OutputFormat: json");
        // Icinga 2 ends a keep-alive connection after an error answer; send
        // errors on their own connection.
        let req = format!("{q}ResponseHeader: fixed16\nKeepAlive: on\n\n");
        d.write_all(req.as_bytes()).await.unwrap();
        let (ds, db) = fixed16(&mut d).await;
        if ds != 200 {
            d = TcpStream::connect(("127.0.0.1", ic.port)).await.unwrap();
        }
        c.write_all(req.as_bytes()).await.unwrap();
        let (ps, pb) = fixed16(&mut c).await;
        assert_eq!(normalise(ps, &pb, json), normalise(ds, &db, json), "keepalive: {q:?}");
    }
    drop(d);
    p.shutdown().await;
}

#[tokio::test]
async fn queries_icinga_drops_silently_get_a_clear_error_through_livemux() {
    let Some(ic) = icinga(20, 2).await else { return };
    let p = Proxy::start(vec![("ic", ic.tcp_address(), params())]).await;
    p.wait_state("ic", SiteState::Ready).await;
    // Icinga 2 closes the connection without a byte for a filter without an
    // operator, even with fixed16 first.
    let req = "GET hosts\nResponseHeader: fixed16\nFilter: name\n\n";
    assert!(direct_raw(&ic, req).await.is_empty());
    let mut c = p.client("ic").await;
    let (code, body) = ask(&mut c, req).await;
    assert_eq!((code, body.as_str()), (502, "site 'ic': the site closed the connection without answering\n"));
    // The site stays usable.
    let (code, body) = query(&p, "ic", "GET status\nColumns: num_hosts").await;
    assert_eq!((code, body.as_str()), (200, "20\n"));
    assert_eq!(p.site("ic").status().generation, 0, "a bad query is not a dead site");
    p.shutdown().await;
}

#[tokio::test]
async fn commands_reach_icinga_and_take_effect() {
    let Some(ic) = icinga(20, 2).await else { return };
    let p = Proxy::start(vec![("ic", ic.unix_address(), params())]).await;
    p.wait_state("ic", SiteState::Ready).await;
    // Icinga 2 drops a passive result older than the object's last check,
    // which the site's start-up forced a moment ago: date it one second on.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 1;
    let mut c = p.client("ic").await;
    c.write_all(
        format!(
            "COMMAND [{now}] PROCESS_HOST_CHECK_RESULT;host-0003;1;set by livemux test\n\
             COMMAND [{now}] ADD_HOST_COMMENT;host-0004;1;livemux-test;comment via livemux\n\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Commands are executed asynchronously by the core; poll through the proxy.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, state) = query(&p, "ic", "GET hosts\nColumns: state plugin_output\nFilter: name = host-0003").await;
        let (_, comments) =
            query(&p, "ic", "GET comments\nColumns: host_name comment\nFilter: author = livemux-test").await;
        if state == "1;set by livemux test\n" && comments == "host-0004;comment via livemux\n" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "commands had no effect: {state:?} {comments:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.shutdown().await;
}

#[tokio::test]
async fn many_keepalive_clients_on_two_channels_get_complete_correct_answers() {
    let Some(ic) = icinga(100, 5).await else { return };
    let p = Proxy::start(vec![("ic", ic.tcp_address(), params())]).await;
    p.wait_state("ic", SiteState::Ready).await;
    let mut tasks = Vec::new();
    for client in 0..30usize {
        let path = p.socket("ic");
        tasks.push(tokio::spawn(async move {
            let mut c = UnixStream::connect(path).await.unwrap();
            for i in 0..10usize {
                let h = (client * 13 + i * 7) % 100;
                let q = format!(
                    "GET services\nColumns: host_name description state\nFilter: host_name = host-{h:04}\n\
                     KeepAlive: on\nResponseHeader: fixed16\n\n"
                );
                c.write_all(q.as_bytes()).await.unwrap();
                let (code, body) = read_answer(&mut c).await;
                assert_eq!(code, 200);
                let mut rows: Vec<&str> = body.lines().collect();
                rows.sort();
                let mut want: Vec<String> = ["cpu", "disk", "load", "memory", "ping"]
                    .iter()
                    .map(|d| {
                        let j = ["ping", "cpu", "memory", "load", "disk"].iter().position(|x| x == d).unwrap();
                        let g = h * 5 + j;
                        let st = if g % 7 == 3 {
                            1
                        } else if g % 13 == 5 {
                            2
                        } else if g % 29 == 11 {
                            3
                        } else {
                            0
                        };
                        format!("host-{h:04};{d};{st}")
                    })
                    .collect();
                want.sort();
                assert_eq!(rows, want, "host-{h:04}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_icinga_fails_fast_the_other_is_unaffected_and_a_restart_heals() {
    let (a, b) = tokio::join!(icinga(20, 2), icinga(20, 2));
    let (Some(a), Some(b)) = (a, b) else { return };
    let p = Proxy::start(vec![("a", a.tcp_address(), params()), ("b", b.tcp_address(), params())]).await;
    p.wait_state("a", SiteState::Ready).await;
    p.wait_state("b", SiteState::Ready).await;

    tokio::task::block_in_place(|| a.stop());
    p.wait_state("a", SiteState::Down).await;
    let started = tokio::time::Instant::now();
    let (code, body) = query(&p, "a", "GET status\nColumns: num_hosts").await;
    assert!(started.elapsed() < Duration::from_secs(2), "failed fast");
    assert_eq!(code, 502);
    assert!(body.starts_with("site 'a' is down: "), "{body}");
    let (code, body) = query(&p, "b", "GET status\nColumns: num_hosts").await;
    assert_eq!((code, body.as_str()), (200, "20\n"));

    tokio::task::block_in_place(|| a.restart());
    p.wait_state("a", SiteState::Ready).await;
    let (code, body) = query(&p, "a", "GET status\nColumns: num_hosts").await;
    assert_eq!((code, body.as_str()), (200, "20\n"));
    assert_eq!(p.site("b").status().generation, 0);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigstopped_icinga_is_detected_by_the_heartbeat() {
    let Some(ic) = icinga(20, 2).await else { return };
    let p = Proxy::start(vec![("ic", ic.tcp_address(), params())]).await;
    p.wait_state("ic", SiteState::Ready).await;
    tokio::task::block_in_place(|| ic.signal("STOP"));
    p.wait_state("ic", SiteState::Down).await;
    let (code, body) = query(&p, "ic", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 502);
    assert_eq!(body, "site 'ic' is down: heartbeat not answered within 400ms\n");
    tokio::task::block_in_place(|| ic.signal("CONT"));
    p.wait_state("ic", SiteState::Ready).await;
    let (code, _) = query(&p, "ic", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 200);
    p.shutdown().await;
}

/// Run the Perl client; its output lines are sorted answers.
fn perl(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/perl/lsq.pl");
    let out = std::process::Command::new("perl").arg(script).args(args).output().expect("run perl");
    assert!(
        out.status.success(),
        "perl {args:?} failed (is libmonitoring-livestatus-perl installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_livestatus_gets_the_same_rows_through_livemux() {
    let Some(ic) = icinga(100, 5).await else { return };
    let p = Proxy::start(vec![("ic", ic.tcp_address(), params())]).await;
    p.wait_state("ic", SiteState::Ready).await;
    let sock = p.socket("ic").display().to_string();
    let peer = format!("127.0.0.1:{}", ic.port);
    let (direct, via0, via1) = tokio::task::block_in_place(|| {
        (
            perl(&["peer", &peer, "0", "queries"]),
            perl(&["socket", &sock, "0", "queries"]),
            perl(&["socket", &sock, "1", "queries"]),
        )
    });
    assert!(direct.lines().count() > 100, "the client got real answers:\n{direct}");
    assert!(direct.contains("error\tnosuchtable\t404"), "{direct}");
    assert_eq!(via0, direct, "keepalive off");
    assert_eq!(via1, direct, "keepalive on");
    let done = tokio::task::block_in_place(|| perl(&["socket", &sock, "1", "command"]));
    assert_eq!(done, "command\tvisible\n");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_equal_direct_ones_and_a_reload_makes_them_fresh() {
    let Some(ic) = icinga(20, 2).await else { return };
    let p = Proxy::start(vec![("ic", ic.tcp_address(), params())]).await;
    p.wait_state("ic", SiteState::Ready).await;
    // What the GUI marks `Cache: reload`.
    let gui = [
        "GET status\nColumns: livestatus_version program_version program_start num_hosts num_services\n",
        "GET hostgroups\nColumns: name alias\n",
        "GET commands\nColumns: name\n",
        "GET hosts\nColumns: alias\nFilter: name = host-0001\n",
        "GET hosts\nColumns: name groups\nOutputFormat: json\n",
    ];
    let stats = || p.app.as_ref().unwrap().cache_stats("ic");
    for q in gui {
        let json = q.contains("json");
        let (status, body) = fixed16(&mut (direct_conn(&ic, &format!("{q}ResponseHeader: fixed16\n\n")).await)).await;
        let direct = normalise(status, &body, json);
        assert_eq!(direct.status, 200, "{q}");
        for round in 0..2 {
            let (code, body) = query(&p, "ic", &format!("{q}Cache: reload")).await;
            assert_eq!(normalise(code, body.as_bytes(), json), direct, "{q} (round {round})");
        }
    }
    let st = stats();
    assert_eq!((st.misses, st.hits, st.entries), (5, 5, 5));

    // A reload: the heartbeat sees the new program_start, and the cached
    // site status is asked again.
    let q = "GET status\nColumns: program_start\nCache: reload";
    let (_, before) = query(&p, "ic", q).await;
    let old: i64 = before.trim().parse().unwrap();
    tokio::task::block_in_place(|| ic.reload());
    let h = p.site("ic");
    let seen = tokio::time::timeout(PATIENCE, h.wait_for(|s| s.program_start.is_some_and(|ps| ps != old)))
        .await
        .expect("the heartbeat sees the reload");
    p.wait_state("ic", SiteState::Ready).await;
    let fresh = seen.program_start.unwrap();
    assert!(fresh > old, "{fresh} after {old}");
    let (code, after) = query(&p, "ic", q).await;
    assert_eq!((code, after), (200, format!("{fresh}\n")), "no stale answer after the reload");
    let direct = direct_raw(&ic, "GET status\nColumns: program_start\n\n").await;
    assert_eq!(String::from_utf8_lossy(&direct), format!("{fresh}\n"));
    assert!(stats().invalidations >= 1);
    p.shutdown().await;
}

/// A direct TCP connection with `request` sent.
async fn direct_conn(site: &IcingaSite, request: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", site.port)).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_channels_than_icinga_serves_shrink_the_pool_and_every_query_is_answered() {
    let Some(ic) = icinga(20, 2).await else { return };
    // Icinga 2 serves at most 2 × its cores connections at once (fewer
    // while checks run in the same thread pool).
    let limit = 2 * std::thread::available_parallelism().map_or(1, |n| n.get());
    let channels = limit + 1;
    let params = SiteParams { channels, query_timeout: 2 * PATIENCE, ..params() };
    let p = Proxy::start(vec![("ic", ic.tcp_address(), params)]).await;
    p.wait_state("ic", SiteState::Ready).await;
    let snap =
        eventually_snapshot(&p, "ic", "a smaller pool", |s| s.channels_served.is_some() && s.channels_connecting == 0)
            .await;
    let served = snap.channels_served.unwrap();
    assert!(served < channels && snap.channels.len() <= served, "{snap:?}");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..channels * 2 {
        let path = p.socket("ic");
        tasks.spawn(async move {
            let mut c = UnixStream::connect(path).await.unwrap();
            for _ in 0..3 {
                c.write_all(b"GET status\nColumns: num_hosts\nKeepAlive: on\nResponseHeader: fixed16\n\n")
                    .await
                    .unwrap();
                assert_eq!(read_answer(&mut c).await, (200, "20\n".to_owned()));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(p.site("ic").status().generation, 0, "never declared down");
    p.shutdown().await;
}
