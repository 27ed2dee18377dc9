//! livemux in front of real Livestatus servers, Icinga 2 and Naemon (with
//! naemon-livestatus, the mk-livestatus family), and with a real third-party
//! client (Monitoring::Livestatus).
//!
//! Every test runs against both cores (`icinga::*` and `naemon::*`); where
//! the cores behave differently, the test says which behaviour it expects
//! from which core. Both sites hold the same objects in the same static
//! states (`scripts/icinga-site.sh`, `scripts/naemon-site.sh`).
//!
//! Icinga 2 returns rows in hash order, so its rows are compared as sorted
//! lists; Naemon sorts them, so its answers are compared byte for byte.
//! Icinga 2 serves at most 2 × cores connections per site at once (4 on a
//! 2-core machine), so every site here gets at most 2 channels, leaving room
//! for a direct connection and the occasional extra heartbeat.

use std::time::Duration;

use crate::support::realsite::{Core, RealSite};
use crate::support::*;
use livemux::config::SiteParams;
use livemux::site::SiteState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Instantiate each named test (`async fn name(core: Core)`) once per core.
macro_rules! on_both_cores {
    ($($name:ident),* $(,)?) => {
        mod icinga {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Core::Icinga).await
                }
            )*
        }
        mod naemon {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Core::Naemon).await
                }
            )*
        }
    };
}

on_both_cores!(
    a_battery_of_queries_gets_the_same_answers_through_livemux,
    no_bad_request_changes_what_another_client_receives,
    commands_reach_the_core_and_take_effect,
    a_denied_command_gets_403_and_never_reaches_the_core,
    many_keepalive_clients_on_two_channels_get_complete_correct_answers,
    a_stopped_core_fails_fast_the_other_is_unaffected_and_a_restart_heals,
    a_frozen_core_is_detected_by_the_heartbeat,
    monitoring_livestatus_gets_the_same_rows_through_livemux,
    cached_answers_equal_direct_ones_and_a_reload_makes_them_fresh,
    pipelined_answers_equal_direct_ones_with_bad_queries_among_them,
    the_pool_grows_under_waiting_queries_and_shrinks_back_when_idle,
    a_core_without_inventory_columns_switches_the_sync_off_and_nothing_else,
    good_queries_behind_bad_ones_that_cost_their_channel_never_wait_channel_timeout,
);

fn params() -> SiteParams {
    SiteParams {
        channels: 2,
        channels_max: 2,
        pipeline_depth: 1,
        heartbeat_interval: Duration::from_millis(500),
        heartbeat_timeout: Duration::from_millis(400),
        connect_retry: Duration::from_millis(500),
        ..SiteParams::default()
    }
}

async fn site(core: Core, hosts: usize, services: usize) -> Option<RealSite> {
    tokio::task::spawn_blocking(move || RealSite::start(core, hosts, services)).await.expect("start task")
}

/// An answer reduced to what must be equal: status, and the rows (sorted
/// for Icinga 2, whose row order is its hash order; csv lines, or json
/// rows); for errors only the first line of the message (Icinga 2 appends
/// a stack trace).
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    rows: Vec<String>,
}

fn normalise(core: Core, status: u16, body: &[u8], json: bool) -> Answer {
    let text = String::from_utf8_lossy(body);
    let mut rows: Vec<String> = if status != 200 {
        text.lines().take(1).map(str::to_owned).collect()
    } else if json {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("json {e}: {text}"));
        v.as_array().expect("json rows").iter().map(|r| r.to_string()).collect()
    } else {
        text.lines().map(str::to_owned).collect()
    };
    if core == Core::Icinga {
        rows.sort();
    }
    Answer { status, rows }
}

/// Read a fixed16 answer from any stream.
async fn fixed16<R: tokio::io::AsyncRead + Unpin>(s: &mut R) -> (u16, Vec<u8>) {
    read_answer_bytes(s).await
}

/// One request on a new direct TCP connection; everything until EOF (or,
/// for a core that keeps the connection open, until it is quiet).
async fn direct_raw(site: &RealSite, request: &str) -> Vec<u8> {
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

async fn a_battery_of_queries_gets_the_same_answers_through_livemux(core: Core) {
    let Some(rs) = site(core, 100, 5).await else { return };
    let p = Proxy::start(vec![("rs", rs.tcp_address(), params())]).await;
    p.wait_state("rs", SiteState::Ready).await;

    for q in BATTERY {
        let json = q.contains("OutputFormat: json");
        // fixed16, one query per connection.
        let req = format!("{q}ResponseHeader: fixed16\n\n");
        let d = direct_raw(&rs, &req).await;
        let (ds, db) = fixed16(&mut d.as_slice()).await;
        let pr = proxy_raw(&p, "rs", &req).await;
        let (ps, pb) = fixed16(&mut pr.as_slice()).await;
        match core {
            // Naemon's answers are deterministic: the same bytes.
            Core::Naemon => assert_eq!(String::from_utf8_lossy(&pr), String::from_utf8_lossy(&d), "fixed16: {q:?}"),
            Core::Icinga => {
                assert_eq!(normalise(core, ps, &pb, json), normalise(core, ds, &db, json), "fixed16: {q:?}")
            }
        }
        assert_eq!(d.len() as u64, 16 + db.len() as u64, "one answer, nothing more");

        // Plain: the body of a 200 is the same.
        let req = format!("{q}\n");
        let d = direct_raw(&rs, &req).await;
        let pr = proxy_raw(&p, "rs", &req).await;
        match (core, ds) {
            (Core::Naemon, _) => assert_eq!(String::from_utf8_lossy(&pr), String::from_utf8_lossy(&d), "plain: {q:?}"),
            (Core::Icinga, 200) => {
                assert_eq!(normalise(core, 200, &pr, json), normalise(core, 200, &d, json), "plain: {q:?}")
            }
            // Icinga 2 sends nothing for errors without fixed16; livemux
            // forwards the site's message.
            (Core::Icinga, _) => {
                assert!(d.is_empty(), "Icinga 2 sends nothing for errors without fixed16");
                assert_eq!(normalise(core, ds, &pr, json), normalise(core, ds, &db, json), "plain error: {q:?}");
            }
        }
    }

    // Keep-alive with fixed16: the battery on one connection each.
    let mut d = TcpStream::connect(("127.0.0.1", rs.port)).await.unwrap();
    let mut c = p.client("rs").await;
    for q in BATTERY {
        let json = q.contains("OutputFormat: json");
        let req = format!("{q}ResponseHeader: fixed16\nKeepAlive: on\n\n");
        d.write_all(req.as_bytes()).await.unwrap();
        let (ds, db) = fixed16(&mut d).await;
        if ds != 200 && core == Core::Icinga {
            // Icinga 2 may end a keep-alive connection after an error
            // answer (Naemon keeps it): go on on a new one.
            d = TcpStream::connect(("127.0.0.1", rs.port)).await.unwrap();
        }
        c.write_all(req.as_bytes()).await.unwrap();
        let (ps, pb) = fixed16(&mut c).await;
        assert_eq!(normalise(core, ps, &pb, json), normalise(core, ds, &db, json), "keepalive: {q:?}");
    }
    drop(d);
    p.shutdown().await;
}

/// Requests each core rejects in its own way, one of every error class.
fn bad_requests(now: u64) -> Vec<(&'static str, String)> {
    vec![
        ("bad header", "GET hosts\nColumns: name\nFoo: bar\nLimit: 2\n".into()),
        ("bad filter", "GET hosts\nColumns: name\nFilter: name <> host-0001\n".into()),
        ("filter without operator", "GET hosts\nColumns: name\nFilter: name\n".into()),
        ("bad stats", "GET services\nStats: foo\n".into()),
        ("unknown table", "GET nosuchtable\nColumns: name\n".into()),
        ("unknown column", "GET hosts\nColumns: nosuchcolumn\nLimit: 2\n".into()),
        ("lower-case verb", "get hosts\nColumns: name\n".into()),
        ("bad limit", "GET hosts\nColumns: name\nLimit: abc\n".into()),
        ("bad command", format!("COMMAND [{now}] NO_SUCH_COMMAND;host-0001\n")),
    ]
}

/// Good queries with one deterministic answer on both cores.
const GOOD: &[&str] = &[
    "GET hosts\nColumns: name state plugin_output\nFilter: name = host-0049\n",
    "GET status\nColumns: num_hosts num_services\n",
    "GET services\nColumns: host_name description state\nFilter: host_name = host-0003\nFilter: description = cpu\n",
];

/// `request` with `ResponseHeader: fixed16` right after its first line, as
/// livemux sends it (a core may stop reading at a bad line).
fn fixed16_first(request: &str) -> String {
    let (first, rest) = request.split_once('\n').unwrap_or((request, ""));
    format!("{first}\nResponseHeader: fixed16\n{rest}\n")
}

/// The first line a core sends for `request` on a new connection (for a
/// `COMMAND`, which leaves the connection open).
async fn direct_line(site: &RealSite, request: &str) -> String {
    use tokio::io::AsyncBufReadExt;
    let mut s = tokio::io::BufReader::new(TcpStream::connect(("127.0.0.1", site.port)).await.unwrap());
    s.get_mut().write_all(request.as_bytes()).await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(PATIENCE, s.read_line(&mut line)).await.expect("a line in time").expect("read");
    line
}

/// What livemux must answer to a bad request (with fixed16 asked for),
/// from what the core answers to it directly.
async fn expected_bad_answer(core: Core, rs: &RealSite, what: &str, bad: &str) -> Answer {
    let answer = |status, text: &str| Answer { status, rows: vec![text.to_owned()] };
    match (what, core) {
        // livemux refuses it itself (the core never sees it).
        ("lower-case verb", _) => answer(452, "invalid request method 'get' (expected GET or COMMAND)"),
        // Naemon answers a rejected command with a bare `400: ...` line (and
        // keeps the connection); a client asking for fixed16 gets it as a
        // proper answer.
        ("bad command", Core::Naemon) => {
            let line = direct_line(rs, &format!("{bad}\n")).await;
            let (status, message) = livemux_protocol::unframed_error(line.as_bytes());
            assert_eq!(status.code(), 400, "Naemon's answer: {line:?}");
            answer(400, &String::from_utf8_lossy(message))
        }
        // Icinga 2 answers no command; livemux sends the empty 200 it sends
        // to a client asking for fixed16.
        ("bad command", Core::Icinga) => Answer { status: 200, rows: vec![] },
        _ => {
            let direct = direct_raw(rs, &fixed16_first(bad)).await;
            if direct.is_empty() {
                // Icinga 2 closes the connection without a byte for some bad
                // queries (Naemon always answers).
                assert_eq!(core, Core::Icinga, "{what}: no answer from {}", core.name());
                return answer(502, "site 'rs': the site closed the connection without answering");
            }
            let (status, body) = fixed16(&mut direct.as_slice()).await;
            normalise(core, status, &body, false)
        }
    }
}

async fn no_bad_request_changes_what_another_client_receives(core: Core) {
    // One channel, so every query goes where the bad one went. Naemon stops
    // reading a request at a bad header and takes the rest for the next
    // request; Icinga 2 closes the connection after some errors. Either way
    // the next client's query must get exactly what the core answers it
    // directly.
    let Some(rs) = site(core, 100, 5).await else { return };
    let p = Proxy::start(vec![("rs", rs.tcp_address(), SiteParams { channels: 1, channels_max: 1, ..params() })]).await;
    p.wait_state("rs", SiteState::Ready).await;
    let mut good = Vec::new();
    for q in GOOD {
        good.push(direct_raw(&rs, &format!("{q}ResponseHeader: fixed16\n\n")).await);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    for (what, bad) in bad_requests(now) {
        let want = expected_bad_answer(core, &rs, what, &bad).await;
        for round in 0..2 {
            let mut a = p.client("rs").await;
            let (code, body) = ask(&mut a, &format!("{bad}ResponseHeader: fixed16\n\n")).await;
            assert_eq!(normalise(core, code, body.as_bytes(), false), want, "{what} (round {round})");
            drop(a);
            for (q, want) in GOOD.iter().zip(&good) {
                let got = proxy_raw(&p, "rs", &format!("{q}ResponseHeader: fixed16\n\n")).await;
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(want),
                    "after a {what} (round {round}): {q:?}"
                );
            }
        }
        // The same on one keep-alive connection: the bad request, then a
        // good one from the same client.
        let mut c = p.client("rs").await;
        let (code, _) = ask(&mut c, &format!("{bad}ResponseHeader: fixed16\nKeepAlive: on\n\n")).await;
        assert_eq!(code, want.status, "{what}, keep-alive");
        let (code, body) = ask(&mut c, &format!("{}ResponseHeader: fixed16\nKeepAlive: on\n\n", GOOD[1])).await;
        assert_eq!((code, body.as_bytes()), (200, &good[1][16..]), "after a {what}, keep-alive");
    }
    assert_eq!(p.site("rs").status().generation, 0, "bad queries never took the site down");
    p.shutdown().await;
}

async fn commands_reach_the_core_and_take_effect(core: Core) {
    let Some(rs) = site(core, 20, 2).await else { return };
    let p = Proxy::start(vec![("rs", rs.unix_address(), params())]).await;
    p.wait_state("rs", SiteState::Ready).await;
    // Icinga 2 drops a passive result older than the object's last check,
    // which the site's start-up forced a moment ago: date it one second on.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 1;
    let mut c = p.client("rs").await;
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
        let (_, state) = query(&p, "rs", "GET hosts\nColumns: state plugin_output\nFilter: name = host-0003").await;
        let (_, comments) =
            query(&p, "rs", "GET comments\nColumns: host_name comment\nFilter: author = livemux-test").await;
        if state == "1;set by livemux test\n" && comments == "host-0004;comment via livemux\n" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "commands had no effect: {state:?} {comments:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.shutdown().await;
}

/// `commands = "deny"`: the client gets a 403 (fixed16) and the core never
/// sees the command; the same core through a socket that allows commands
/// takes the next one, and once that one shows, the denied one still does
/// not (livemux returns from a forwarded COMMAND only when the core has
/// read it: a heartbeat follows it on its channel).
async fn a_denied_command_gets_403_and_never_reaches_the_core(core: Core) {
    let Some(rs) = site(core, 20, 2).await else { return };
    let mut deny = params();
    deny.commands.allow = false;
    let p = Proxy::start(vec![("ro", rs.unix_address(), deny), ("rw", rs.unix_address(), params())]).await;
    p.wait_state("ro", SiteState::Ready).await;
    p.wait_state("rw", SiteState::Ready).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let comment = |author: &str| format!("COMMAND [{now}] ADD_HOST_COMMENT;host-0005;1;{author};via livemux\n");
    let mut c = p.client("ro").await;
    c.write_all(format!("{}ResponseHeader: fixed16\n\n", comment("denied-test")).as_bytes()).await.unwrap();
    let (code, body) = read_answer(&mut c).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("COMMAND refused: commands are denied on this socket"), "{body}");
    // Without fixed16: the error line, and the connection closes.
    let mut c = p.client("ro").await;
    c.write_all(format!("{}\n", comment("denied-test")).as_bytes()).await.unwrap();
    let mut line = String::new();
    c.read_to_string(&mut line).await.unwrap();
    assert!(line.starts_with("COMMAND refused: commands are denied on this socket"), "{line:?}");
    let mut c = p.client("rw").await;
    c.write_all(format!("{}\n", comment("allowed-test")).as_bytes()).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, authors) = query(&p, "rw", "GET comments\nColumns: author\nFilter: host_name = host-0005").await;
        if authors.contains("allowed-test") {
            assert!(!authors.contains("denied-test"), "a denied command reached the core: {authors:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the allowed command had no effect: {authors:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.shutdown().await;
}

async fn many_keepalive_clients_on_two_channels_get_complete_correct_answers(core: Core) {
    let Some(rs) = site(core, 100, 5).await else { return };
    let p = Proxy::start(vec![("rs", rs.tcp_address(), params())]).await;
    p.wait_state("rs", SiteState::Ready).await;
    let mut tasks = Vec::new();
    for client in 0..30usize {
        let path = p.socket("rs");
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

async fn a_stopped_core_fails_fast_the_other_is_unaffected_and_a_restart_heals(core: Core) {
    let (a, b) = tokio::join!(site(core, 20, 2), site(core, 20, 2));
    let (Some(a), Some(b)) = (a, b) else { return };
    let p = Proxy::start(vec![("a", a.tcp_address(), params()), ("b", b.tcp_address(), params())]).await;
    p.wait_state("a", SiteState::Ready).await;
    p.wait_state("b", SiteState::Ready).await;

    tokio::task::block_in_place(|| a.stop());
    p.wait_state("a", SiteState::Down).await;
    let started = tokio::time::Instant::now();
    let (code, body) = query(&p, "a", "GET status\nColumns: num_hosts").await;
    // Below channel_timeout (3 s), which the query would wait for if the
    // proxy did not know the site is down.
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

async fn a_frozen_core_is_detected_by_the_heartbeat(core: Core) {
    let Some(rs) = site(core, 20, 2).await else { return };
    let p = Proxy::start(vec![("rs", rs.tcp_address(), params())]).await;
    p.wait_state("rs", SiteState::Ready).await;
    tokio::task::block_in_place(|| rs.signal("STOP"));
    p.wait_state("rs", SiteState::Down).await;
    let (code, body) = query(&p, "rs", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 502);
    assert_eq!(body, "site 'rs' is down: heartbeat not answered within 400ms\n");
    tokio::task::block_in_place(|| rs.signal("CONT"));
    p.wait_state("rs", SiteState::Ready).await;
    let (code, _) = query(&p, "rs", "GET status\nColumns: num_hosts").await;
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

async fn monitoring_livestatus_gets_the_same_rows_through_livemux(core: Core) {
    let Some(rs) = site(core, 100, 5).await else { return };
    let p = Proxy::start(vec![("rs", rs.tcp_address(), params())]).await;
    p.wait_state("rs", SiteState::Ready).await;
    let sock = p.socket("rs").display().to_string();
    let peer = format!("127.0.0.1:{}", rs.port);
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

async fn cached_answers_equal_direct_ones_and_a_reload_makes_them_fresh(core: Core) {
    let Some(rs) = site(core, 20, 2).await else { return };
    let p = Proxy::start(vec![("rs", rs.tcp_address(), params())]).await;
    p.wait_state("rs", SiteState::Ready).await;
    // What the GUI marks `Cache: reload`.
    let gui = [
        "GET status\nColumns: livestatus_version program_version program_start num_hosts num_services\n",
        "GET hostgroups\nColumns: name alias\n",
        "GET commands\nColumns: name\n",
        "GET hosts\nColumns: alias\nFilter: name = host-0001\n",
        "GET hosts\nColumns: name groups\nOutputFormat: json\n",
    ];
    let stats = || p.app.as_ref().unwrap().cache_stats("rs");
    for q in gui {
        let json = q.contains("json");
        let (status, body) = fixed16(&mut (direct_conn(&rs, &format!("{q}ResponseHeader: fixed16\n\n")).await)).await;
        let direct = normalise(core, status, &body, json);
        assert_eq!(direct.status, 200, "{q}");
        for round in 0..2 {
            let (code, body) = query(&p, "rs", &format!("{q}Cache: reload")).await;
            assert_eq!(normalise(core, code, body.as_bytes(), json), direct, "{q} (round {round})");
        }
    }
    let st = stats();
    assert_eq!((st.misses, st.hits, st.entries), (5, 5, 5));

    // A reload: the heartbeat sees the new program_start, and the cached
    // site status is asked again.
    let q = "GET status\nColumns: program_start\nCache: reload";
    let (_, before) = query(&p, "rs", q).await;
    let old: i64 = before.trim().parse().unwrap();
    // program_start has a resolution of one second.
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(1100)).await;
    tokio::task::block_in_place(|| rs.reload());
    let h = p.site("rs");
    let seen = tokio::time::timeout(PATIENCE, h.wait_for(|s| s.program_start.is_some_and(|ps| ps != old)))
        .await
        .expect("the heartbeat sees the reload");
    p.wait_state("rs", SiteState::Ready).await;
    let fresh = seen.program_start.unwrap();
    assert!(fresh > old, "{fresh} after {old}");
    let (code, after) = query(&p, "rs", q).await;
    assert_eq!((code, after), (200, format!("{fresh}\n")), "no stale answer after the reload");
    let direct = direct_raw(&rs, "GET status\nColumns: program_start\n\n").await;
    assert_eq!(String::from_utf8_lossy(&direct), format!("{fresh}\n"));
    assert!(stats().invalidations >= 1);
    p.shutdown().await;
}

/// A direct TCP connection with `request` sent.
async fn direct_conn(site: &RealSite, request: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", site.port)).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    s
}

async fn pipelined_answers_equal_direct_ones_with_bad_queries_among_them(core: Core) {
    // One channel, up to 8 queries pipelined on it, 16 clients at once each
    // running the battery (good queries and bad ones: Icinga 2 closes the
    // connection after some errors, Naemon reads a bad request's rest as the
    // next request). Every answer equals the direct one.
    let Some(rs) = site(core, 100, 5).await else { return };
    let params = SiteParams { channels: 1, channels_max: 1, pipeline_depth: 8, ..params() };
    let p = Proxy::start(vec![("rs", rs.tcp_address(), params)]).await;
    p.wait_state("rs", SiteState::Ready).await;
    let mut queries: Vec<String> = BATTERY.iter().map(|q| q.to_string()).collect();
    queries.push("GET hosts\nColumns: name\nFoo: bar\nLimit: 2\n".into());
    let mut want = Vec::new();
    for q in &queries {
        let d = direct_raw(&rs, &fixed16_first(q)).await;
        let (status, body) = fixed16(&mut d.as_slice()).await;
        want.push(normalise(core, status, &body, q.contains("OutputFormat: json")));
    }
    let (queries, want) = (std::sync::Arc::new(queries), std::sync::Arc::new(want));
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..16usize {
        let (path, queries, want) = (p.socket("rs"), queries.clone(), want.clone());
        tasks.spawn(async move {
            let mut c = UnixStream::connect(path).await.unwrap();
            for round in 0..3 {
                for k in 0..queries.len() {
                    let i = (k + client) % queries.len();
                    let q = &queries[i];
                    let (status, body) = ask(&mut c, &format!("{q}ResponseHeader: fixed16\nKeepAlive: on\n\n")).await;
                    let got = normalise(core, status, body.as_bytes(), q.contains("OutputFormat: json"));
                    assert_eq!(got, want[i], "client {client}, round {round}: {q:?}");
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let snap = p.site("rs").snapshot(Duration::from_secs(1)).await.unwrap();
    assert!(snap.queries_pipelined > 0, "queries were pipelined: {snap:?}");
    assert_eq!(p.site("rs").status().generation, 0, "never declared down");
    p.shutdown().await;
}

async fn the_pool_grows_under_waiting_queries_and_shrinks_back_when_idle(core: Core) {
    // One channel kept; 12 clients at once make queries wait, so the pool
    // opens more, never past channels_max; once idle for
    // channel_idle_timeout it is back to one.
    let Some(rs) = site(core, 100, 5).await else { return };
    let params = SiteParams {
        channels: 1,
        channels_max: 3,
        pipeline_depth: 1,
        channel_idle_timeout: Duration::from_millis(500),
        ..params()
    };
    let p = Proxy::start(vec![("rs", rs.tcp_address(), params)]).await;
    p.wait_state("rs", SiteState::Ready).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let path = p.socket("rs");
        tasks.spawn(async move {
            let mut c = UnixStream::connect(path).await.unwrap();
            for _ in 0..10 {
                let q = "GET services\nColumns: host_name description state plugin_output\nKeepAlive: on\nResponseHeader: fixed16\n\n";
                let (status, body) = ask(&mut c, q).await;
                assert_eq!((status, body.lines().count()), (200, 500));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let snap = p.site("rs").snapshot(Duration::from_secs(1)).await.unwrap();
    assert!((2..=3).contains(&snap.channels_peak), "grew, within channels_max: {snap:?}");
    assert_eq!(snap.queries_pipelined, 0);
    eventually_snapshot(&p, "rs", "back to one channel", |s| s.channels.len() == 1).await;
    assert_eq!(p.site("rs").status().generation, 0, "never declared down");
    p.shutdown().await;
}

async fn good_queries_behind_bad_ones_that_cost_their_channel_never_wait_channel_timeout(core: Core) {
    // Issue 28, with the settings it was seen with: one channel kept, two
    // at most, four queries pipelined on each, 20 keep-alive clients
    // looping over good queries, and a bad one (unknown table, unknown
    // column, bad filter) now and then, further apart than channel_timeout.
    // Icinga 2 closes the channel after the error answer (or without one);
    // Naemon keeps it, but the queries pipelined behind a bad one go
    // elsewhere all the same. They are sent again on channels of their
    // own, which used to never come while the other queries kept both
    // channels busy: `503 no channel to site 'rs' became free within 3s`.
    // Every good query is answered exactly, none waits channel_timeout.
    let Some(rs) = site(core, 200, 5).await else { return };
    let params = SiteParams {
        channels: 1,
        channels_max: 2,
        pipeline_depth: 4,
        heartbeat_interval: Duration::from_secs(1),
        channel_timeout: Duration::from_secs(3),
        ..SiteParams::default()
    };
    let channel_timeout = params.channel_timeout;
    let p = Proxy::start(vec![("rs", rs.tcp_address(), params)]).await;
    p.wait_state("rs", SiteState::Ready).await;
    let mut want = Vec::new();
    for q in GOOD {
        let d = direct_raw(&rs, &format!("{q}ResponseHeader: fixed16\n\n")).await;
        let (status, body) = fixed16(&mut d.as_slice()).await;
        assert_eq!(status, 200, "{q:?}");
        want.push(normalise(core, status, &body, false));
    }
    let bad: Vec<(&str, String)> = bad_requests(0)
        .into_iter()
        .filter(|(what, _)| ["unknown table", "unknown column", "bad filter"].contains(what))
        .collect();
    let mut bad_want = Vec::new();
    for (what, q) in &bad {
        bad_want.push(expected_bad_answer(core, &rs, what, q).await);
    }
    let every = Duration::from_secs(4);
    let start = tokio::time::Instant::now();
    let end = start + every * (bad.len() as u32 + 1);
    let want = std::sync::Arc::new(want);
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..20usize {
        let (path, want) = (p.socket("rs"), want.clone());
        clients.spawn(async move {
            let mut c = UnixStream::connect(path).await.unwrap();
            let (mut longest, mut answered, mut wrong) = (Duration::ZERO, 0u64, Vec::new());
            for round in 0usize.. {
                if tokio::time::Instant::now() >= end {
                    break;
                }
                let i = (client + round) % GOOD.len();
                let started = tokio::time::Instant::now();
                let (status, body) =
                    ask(&mut c, &format!("{}ResponseHeader: fixed16\nKeepAlive: on\n\n", GOOD[i])).await;
                longest = longest.max(started.elapsed());
                answered += 1;
                let got = normalise(core, status, body.as_bytes(), false);
                if got != want[i] {
                    wrong.push(format!("client {client}, round {round}, {:?}: {got:?}", GOOD[i]));
                }
            }
            (longest, answered, wrong)
        });
    }
    for (n, ((what, q), want)) in bad.iter().zip(&bad_want).enumerate() {
        tokio::time::sleep_until(start + every * (n as u32 + 1)).await;
        let (status, body) = ask(&mut p.client("rs").await, &format!("{q}ResponseHeader: fixed16\n\n")).await;
        assert_eq!(&normalise(core, status, body.as_bytes(), false), want, "{what}");
    }
    let (mut longest, mut answered, mut wrong) = (Duration::ZERO, 0, Vec::new());
    while let Some(r) = clients.join_next().await {
        let (l, n, w) = r.unwrap();
        longest = longest.max(l);
        answered += n;
        wrong.extend(w);
    }
    assert_eq!(wrong, Vec::<String>::new(), "every good query answered, exactly ({answered} in all)");
    assert!(longest < channel_timeout, "a good query waited {longest:?}");
    let snap = p.site("rs").snapshot(Duration::from_secs(1)).await.unwrap();
    assert!(snap.queries_pipelined > 0, "queries were pipelined: {snap:?}");
    assert_eq!(p.site("rs").status().generation, 0, "never declared down");
    p.shutdown().await;
}

async fn a_core_without_inventory_columns_switches_the_sync_off_and_nothing_else(core: Core) {
    // Neither core has Checkmk's inventory columns: Icinga 2 answers the
    // probe with 452 (unknown column), Naemon with 400 (no python3 output
    // format). The sync goes off after that one answer; the site stays
    // ready and its queries are answered as before.
    let Some(rs) = site(core, 20, 2).await else { return };
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
    let mut config = test_config(dir.path(), vec![("rs", rs.tcp_address(), params())]);
    let inv = dir.path().join("inventory");
    config.inventory = Some(livemux::config::InventoryConfig {
        interval: Duration::from_millis(100),
        ..livemux::config::InventoryConfig::new(inv.clone())
    });
    let p = Proxy::start_config(dir, config).await;
    p.wait_state("rs", SiteState::Ready).await;
    let h = p.site("rs");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let st = loop {
        // (The sync task attaches its status once it runs: none yet is not "off".)
        let st = h.inventory_status();
        if let Some(st) = st.as_ref().filter(|st| st.state == "off") {
            break st.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "sync not switched off: {st:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let why = st.last_error.unwrap_or_default();
    let expected = match core {
        Core::Icinga => "452",
        Core::Naemon => "400",
    };
    assert!(why.contains(expected), "{}: {why}", core.name());
    // Ten more intervals: still off, the site never went down, queries work.
    let beats = h.status().heartbeats;
    tokio::time::timeout(PATIENCE, h.wait_for(|s| s.heartbeats >= beats + 2)).await.expect("heartbeats go on");
    assert_eq!(h.inventory_status().expect("configured").state, "off");
    assert_eq!(h.status().generation, 0, "the probe's error answer is not a site failure");
    let (code, body) = query(&p, "rs", "GET status\nColumns: num_hosts").await;
    assert_eq!((code, body.as_str()), (200, "20\n"));
    let files: Vec<_> = std::fs::read_dir(&inv).expect("dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(files, vec![std::ffi::OsString::from(".livemux")], "nothing written");
    p.shutdown().await;
}

// === Icinga 2 only ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icinga_queries_it_drops_silently_get_a_clear_error_through_livemux() {
    let Some(ic) = site(Core::Icinga, 20, 2).await else { return };
    let p = Proxy::start(vec![("ic", ic.tcp_address(), params())]).await;
    p.wait_state("ic", SiteState::Ready).await;
    // Icinga 2 closes the connection without a byte for a filter without an
    // operator, even with fixed16 first. (Naemon answers it with a 400:
    // see `no_bad_request_changes_what_another_client_receives`.)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icinga_more_channels_than_it_serves_shrink_the_pool_and_every_query_is_answered() {
    // Icinga 2 serves at most 2 × its cores connections at once (fewer
    // while checks run in the same thread pool). Naemon serves every
    // connection with a thread of its own, so this is Icinga's alone.
    let Some(ic) = site(Core::Icinga, 20, 2).await else { return };
    let limit = 2 * std::thread::available_parallelism().map_or(1, |n| n.get());
    let channels = limit + 1;
    let params = SiteParams { channels, channels_max: channels, query_timeout: 2 * PATIENCE, ..params() };
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

// === Both cores at once ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_of_icinga_and_naemon_answers_with_the_union_and_merged_stats() {
    let Some(ic) = site(Core::Icinga, 20, 3).await else { return };
    let Some(nm) = site(Core::Naemon, 10, 2).await else { return };
    let p = crate::federation::federated(vec![("ic", ic.tcp_address()), ("nm", nm.tcp_address())], 64 << 20).await;
    // Rows: the union of both direct answers, each with its site.
    let q = "GET services\nColumns: host_name description state\nOutputFormat: json\n";
    let mut want = std::collections::BTreeSet::new();
    for (name, s) in [("ic", &ic), ("nm", &nm)] {
        let body = direct_raw(s, &format!("{q}\n")).await;
        let rows: Vec<Vec<serde_json::Value>> = serde_json::from_slice(&body).expect("direct JSON");
        for r in rows {
            want.insert((name.to_owned(), r[0].to_string(), r[1].to_string(), r[2].as_f64().unwrap_or(-1.0) as i64));
        }
    }
    let (code, body) =
        crate::federation::fed(&p, "GET services\nColumns: site host_name description state\nOutputFormat: json").await;
    assert_eq!(code, 200, "{body}");
    let rows: Vec<Vec<serde_json::Value>> = serde_json::from_str(&body).expect("federated JSON");
    let got: std::collections::BTreeSet<_> = rows
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap_or("?").to_owned(),
                r[1].to_string(),
                r[2].to_string(),
                r[3].as_f64().unwrap_or(-1.0) as i64,
            )
        })
        .collect();
    assert_eq!(rows.len(), want.len());
    assert_eq!(got, want);
    // Stats: the counts of the union.
    let (code, body) =
        crate::federation::fed(&p, "GET services\nStats: state = 0\nStats: state != 0\nOutputFormat: json").await;
    assert_eq!(code, 200, "{body}");
    let merged: Vec<Vec<serde_json::Value>> = serde_json::from_str(&body).expect("stats JSON");
    let ok = want.iter().filter(|w| w.3 == 0).count() as f64;
    assert_eq!(merged[0][0].as_f64(), Some(ok));
    assert_eq!(merged[0][1].as_f64(), Some(want.len() as f64 - ok));
    // Site tests under Or, Negate and And, and in Stats: each answer equals
    // the whole filter applied to the union (each core gets only what it knows).
    let rows_of = |body: &str| -> std::collections::BTreeSet<_> {
        let rows: Vec<Vec<serde_json::Value>> = serde_json::from_str(body).expect("federated JSON");
        rows.iter()
            .map(|r| {
                let state = r[3].as_f64().unwrap_or(-1.0) as i64;
                (r[0].as_str().unwrap_or("?").to_owned(), r[1].to_string(), r[2].to_string(), state)
            })
            .collect()
    };
    let cols = "GET services\nColumns: site host_name description state\nOutputFormat: json\n";
    for (filters, keep) in [
        (
            "Filter: state != 0\nFilter: site = nm\nOr: 2",
            &(|w: &(String, String, String, i64)| w.0 == "nm" || w.3 != 0)
                as &dyn Fn(&(String, String, String, i64)) -> bool,
        ),
        ("Filter: site = ic\nNegate:\nFilter: state = 0\nAnd: 2", &|w| w.0 != "ic" && w.3 == 0),
        ("Filter: peer_name ~ ^i\nFilter: state >= 1\nAnd: 2", &|w| w.0 == "ic" && w.3 >= 1),
    ] {
        let (code, body) = crate::federation::fed(&p, &format!("{cols}{filters}")).await;
        assert_eq!(code, 200, "{filters}: {body}");
        let expected: std::collections::BTreeSet<_> = want.iter().filter(|w| keep(w)).cloned().collect();
        assert_eq!(rows_of(&body), expected, "{filters}");
    }
    let (code, body) = crate::federation::fed(
        &p,
        "GET services\nStats: site = ic\nStats: state = 0\nStats: site ~ ^n\nStatsAnd: 2\nOutputFormat: json",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let merged: Vec<Vec<serde_json::Value>> = serde_json::from_str(&body).expect("stats JSON");
    // LMD's computed columns, made from each core's own, and sorted on.
    let (code, body) = crate::federation::fed(
        &p,
        "GET services\nColumns: site host_name state state_order has_long_plugin_output last_state_change_order\n\
         Sort: state_order desc\nSort: site asc\nSort: host_name asc\nOutputFormat: json",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let rows: Vec<Vec<serde_json::Value>> = serde_json::from_str(&body).expect("JSON");
    assert_eq!(rows.len(), want.len());
    let orders: Vec<i64> = rows.iter().map(|r| r[3].as_i64().unwrap_or(-1)).collect();
    for r in &rows {
        let state = r[2].as_i64().unwrap_or(-1);
        assert_eq!(r[3].as_i64(), Some(if state == 2 { 4 } else { state }), "{r:?}");
        assert!(matches!(r[4].as_i64(), Some(0 | 1)), "{r:?}");
        assert!(r[5].as_i64().is_some_and(|t| t > 0), "a time, the core's start where it never changed: {r:?}");
    }
    assert!(orders.windows(2).all(|w| w[0] >= w[1]), "sorted by state_order, descending: {orders:?}");
    // Thruk's process-info query (LMD-only columns answered by livemux):
    // one row per site, keyed by peer_key.
    let (code, body) = crate::federation::fed(
        &p,
        "GET status\nColumns: program_start program_version peer_key peer_name peer_addr thruk configtool \
         lmd_last_cache_update peer_key\nOutputFormat: wrapped_json",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let data = v["data"].as_array().expect("data");
    let keys: std::collections::BTreeSet<&str> = data.iter().filter_map(|r| r[2].as_str()).collect();
    assert_eq!(keys, ["ic", "nm"].into(), "{body}");
    for r in data {
        let addr = if r[2] == "ic" { ic.tcp_address() } else { nm.tcp_address() };
        assert_eq!(
            (r[4].as_str(), &r[5], &r[6]),
            (Some(addr.as_str()), &serde_json::json!({}), &serde_json::json!({}))
        );
        assert!(r[0].as_i64().is_some_and(|t| t > 0) && r[8] == r[2], "{r:?}");
    }
    assert_eq!((&v["failed"], &v["total_count"]), (&serde_json::json!({}), &serde_json::json!(2)));
    let ic_rows = want.iter().filter(|w| w.0 == "ic").count() as f64;
    let nm_ok = want.iter().filter(|w| w.0 == "nm" && w.3 == 0).count() as f64;
    assert_eq!((merged[0][0].as_f64(), merged[0][1].as_f64()), (Some(ic_rows), Some(nm_ok)), "{body}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icinga_a_federation_of_three_sites_of_different_sizes_equals_their_union() {
    let mut sites = Vec::new();
    for (hosts, services) in [(20, 3), (10, 2), (5, 1)] {
        let Some(s) = site(Core::Icinga, hosts, services).await else { return };
        sites.push(s);
    }
    let names = ["i1", "i2", "i3"];
    let list: Vec<(&str, String)> = names.iter().zip(&sites).map(|(n, s)| (*n, s.tcp_address())).collect();
    let p = crate::federation::federated(list, 64 << 20).await;
    let mut want_hosts = std::collections::BTreeSet::new();
    let mut want_services = 0usize;
    for (n, s) in names.iter().zip(&sites) {
        let body = direct_raw(s, "GET hosts\nColumns: name\nOutputFormat: json\n\n").await;
        let rows: Vec<Vec<serde_json::Value>> = serde_json::from_slice(&body).expect("json");
        want_hosts.extend(rows.into_iter().map(|r| (n.to_string(), r[0].as_str().unwrap_or("?").to_owned())));
        let body = direct_raw(s, "GET services\nColumns: description\nOutputFormat: json\n\n").await;
        want_services += serde_json::from_slice::<Vec<serde_json::Value>>(&body).expect("json").len();
    }
    assert_eq!(want_hosts.len(), 35);
    let (code, body) = crate::federation::fed(&p, "GET hosts\nColumns: site name\nOutputFormat: json").await;
    assert_eq!(code, 200, "{body}");
    let rows: Vec<Vec<serde_json::Value>> = serde_json::from_str(&body).expect("json");
    let got: std::collections::BTreeSet<(String, String)> = rows
        .iter()
        .map(|r| (r[0].as_str().unwrap_or("?").to_owned(), r[1].as_str().unwrap_or("?").to_owned()))
        .collect();
    assert_eq!(got, want_hosts);
    let (_, body) = crate::federation::fed(&p, "GET services\nStats: state >= 0\nOutputFormat: json").await;
    let stats: Vec<Vec<serde_json::Value>> = serde_json::from_str(&body).expect("json");
    assert_eq!(stats[0][0].as_f64(), Some(want_services as f64));
    let (_, body) = crate::federation::fed(&p, "GET hosts\nColumns: name\nSites: i3\nSort: name desc\nLimit: 2").await;
    let mut last3: Vec<String> = want_hosts.iter().filter(|(s, _)| s == "i3").map(|(_, h)| h.clone()).collect();
    last3.sort();
    last3.reverse();
    assert_eq!(body.lines().collect::<Vec<_>>(), last3[..2].iter().map(String::as_str).collect::<Vec<_>>());
    p.shutdown().await;
}

// === Thruk through a federated socket (issue 24) ===

/// Thruk's wait after a command (`cmd.pm`): the `Wait*` headers go to every
/// site with the query, and the answer equals the union of the sites' own
/// answers to the same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_headers_reach_both_cores_through_a_federation() {
    let Some(ic) = site(Core::Icinga, 10, 2).await else { return };
    let Some(nm) = site(Core::Naemon, 10, 2).await else { return };
    let p = crate::federation::federated(vec![("ic", ic.tcp_address()), ("nm", nm.tcp_address())], 64 << 20).await;
    let q = "GET hosts\nColumns: name state\nFilter: name = host-0001\nWaitObject: host-0001\n\
             WaitCondition: state = 0\nWaitTrigger: all\nWaitTimeout: 300\nOutputFormat: json";
    let mut want = Vec::new();
    for (name, s) in [("ic", &ic), ("nm", &nm)] {
        let rows: Vec<Vec<serde_json::Value>> =
            serde_json::from_slice(&direct_raw(s, &format!("{q}\n\n")).await).expect("direct JSON");
        want.extend(rows.into_iter().map(|mut r| {
            r.push(serde_json::Value::from(name));
            r.to_vec()
        }));
    }
    assert_eq!(want.len(), 2, "each core answers the waiting query: {want:?}");
    let (code, body) = crate::federation::fed(&p, &q.replace("Columns: name state", "Columns: name state site")).await;
    assert_eq!(code, 200, "{body}");
    let mut got: Vec<Vec<serde_json::Value>> = serde_json::from_str(&body).expect("JSON");
    got.sort_by_key(|r| r[2].to_string());
    assert_eq!(got, want);
    p.shutdown().await;
}

/// The requests Thruk sends for its main pages (`tests/thruk/corpus.txt`),
/// replayed against a federation over an Icinga 2 and a Naemon site; each
/// answer is compared with the one computed from the sites' own answers
/// (rows, order, `total_count`, `failed`, stats).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thruk_corpus_through_a_federation_of_icinga_and_naemon_equals_the_sites_answers() {
    use serde_json::Value;
    let Some(ic) = site(Core::Icinga, 30, 3).await else { return };
    let Some(nm) = site(Core::Naemon, 20, 2).await else { return };
    let p = crate::federation::federated(vec![("ic", ic.tcp_address()), ("nm", nm.tcp_address())], 64 << 20).await;
    let sites = [("ic", &ic), ("nm", &nm)];
    let corpus =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/thruk/corpus.txt")).expect("corpus");
    let mut entries = Vec::new();
    for chunk in corpus.split("\n== ").skip(1) {
        let (head, body) = chunk.split_once('\n').expect("an entry's request");
        let (kind, what) = head.split_once(": ").expect("kind: what");
        let request = body.trim_end().replace("{backends}", "ic nm");
        entries.push((kind.to_owned(), what.to_owned(), request));
    }
    assert_eq!(entries.len(), 10, "every entry read");
    // The direct request for a site: what livemux answers itself taken out.
    let direct = |request: &str| -> String {
        let mut out = String::new();
        for l in request.lines() {
            let name = l.split(':').next().unwrap_or_default();
            if ["Backends", "Limit", "Offset", "Sort", "OutputFormat", "ResponseHeader"].contains(&name) {
                continue;
            }
            if let Some(cols) = l.strip_prefix("Columns: ") {
                let kept: Vec<&str> = cols.split(' ').filter(|c| *c != "peer_key").collect();
                if !kept.is_empty() {
                    out.push_str(&format!("Columns: {}\n", kept.join(" ")));
                }
                continue;
            }
            out.push_str(l);
            out.push('\n');
        }
        out + "OutputFormat: json\n\n"
    };
    let rows_of = |body: &[u8]| -> Vec<Vec<Value>> {
        serde_json::from_slice(body).unwrap_or_else(|e| panic!("JSON ({e}): {}", String::from_utf8_lossy(body)))
    };
    for (kind, what, request) in &entries {
        let mut union: Vec<Vec<Value>> = Vec::new();
        if ["rows", "page", "stats", "bykey"].contains(&kind.as_str()) {
            for (name, s) in sites {
                for mut r in rows_of(&direct_raw(s, &direct(request)).await) {
                    // peer_key where the request has it: last, or the stats' group key.
                    match kind.as_str() {
                        "stats" => {}
                        "bykey" => r.insert(0, Value::from(name)),
                        _ => r.push(Value::from(name)),
                    }
                    union.push(r);
                }
            }
        }
        if kind == "command" {
            let mut c = tokio::net::UnixStream::connect(p.config.socket_path("all")).await.expect("connect");
            c.write_all(format!("{request}\n\n").as_bytes()).await.expect("send");
            c.shutdown().await.expect("half-close, as Thruk does");
            assert_eq!(String::from_utf8_lossy(&read_to_eof(&mut c).await), "", "{what}: silence is success");
            for (name, s) in sites {
                let q = "GET hosts\nColumns: notifications_enabled\nFilter: name = host-0003\nOutputFormat: json\n\n";
                let deadline = tokio::time::Instant::now() + PATIENCE;
                while rows_of(&direct_raw(s, q).await) != vec![vec![Value::from(0)]] {
                    assert!(tokio::time::Instant::now() < deadline, "{what}: not in effect on {name}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            continue;
        }
        let (code, body) = crate::federation::fed(&p, request.trim_end_matches("\nResponseHeader: fixed16")).await;
        assert_eq!(code, 200, "{what}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: JSON ({e}): {body}"));
        let wrapped = request.contains("wrapped_json");
        if wrapped {
            assert_eq!(v["failed"], serde_json::json!({}), "{what}: no site failed");
        }
        let data: Vec<Vec<Value>> =
            serde_json::from_value(if wrapped { v["data"].clone() } else { v.clone() }).expect("rows");
        let text = |rows: &[Vec<Value>]| -> Vec<String> {
            let mut t: Vec<String> = rows.iter().map(|r| Value::from(r.clone()).to_string()).collect();
            t.sort();
            t
        };
        match kind.as_str() {
            "rows" | "bykey" => assert_eq!(text(&data), text(&union), "{what}"),
            "stats" => {
                let sum: Vec<f64> = (0..union[0].len())
                    .map(|i| union.iter().map(|r| r[i].as_f64().unwrap_or(f64::NAN)).sum())
                    .collect();
                let got: Vec<f64> = data[0].iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect();
                assert_eq!((data.len(), got), (1, sum), "{what}");
            }
            "page" => {
                let cols: Vec<&str> =
                    request.lines().find_map(|l| l.strip_prefix("Columns: ")).expect("Columns").split(' ').collect();
                let keys: Vec<(usize, bool)> = request
                    .lines()
                    .filter_map(|l| l.strip_prefix("Sort: "))
                    .map(|s| {
                        let (c, dir) = s.split_once(' ').expect("Sort: col dir");
                        (cols.iter().position(|x| *x == c).expect("a sort column in Columns"), dir == "desc")
                    })
                    .collect();
                let field = |name: &str| -> usize {
                    request.lines().find_map(|x| x.strip_prefix(name)).map_or(0, |n| n.trim().parse().unwrap_or(0))
                };
                let (limit, offset) = (field("Limit:"), field("Offset:"));
                let key = |r: &Vec<Value>| -> Vec<String> {
                    keys.iter()
                        .map(|(i, _)| match &r[*i] {
                            Value::Number(n) => format!("{:020.6}", n.as_f64().unwrap_or(0.0)),
                            other => other.as_str().unwrap_or_default().to_owned(),
                        })
                        .collect()
                };
                union.sort_by(|a, b| {
                    for (n, (_, desc)) in keys.iter().enumerate() {
                        let o = key(a)[n].cmp(&key(b)[n]);
                        let o = if *desc { o.reverse() } else { o };
                        if o != std::cmp::Ordering::Equal {
                            return o;
                        }
                    }
                    std::cmp::Ordering::Equal
                });
                assert_eq!(v["total_count"].as_u64(), Some(union.len() as u64), "{what}: total_count");
                let page: Vec<Vec<Value>> = union.iter().skip(offset).take(limit).cloned().collect();
                assert_eq!(data.len(), page.len(), "{what}: the page's size");
                assert_eq!(
                    data.iter().map(key).collect::<Vec<_>>(),
                    page.iter().map(key).collect::<Vec<_>>(),
                    "{what}: order"
                );
                let all = text(&union);
                for r in &data {
                    assert!(
                        all.binary_search(&Value::from(r.clone()).to_string()).is_ok(),
                        "{what}: a row of the sites: {r:?}"
                    );
                }
            }
            "status" => {
                assert_eq!(data.len(), 2, "{what}: one row per site");
                for (name, s) in sites {
                    let row = data.iter().find(|r| r[4] == name).unwrap_or_else(|| panic!("{what}: no row for {name}"));
                    let start =
                        rows_of(&direct_raw(s, "GET status\nColumns: program_start\nOutputFormat: json\n\n").await);
                    assert_eq!(row[0], start[0][0], "{what}: {name}'s program_start");
                    assert_eq!(
                        (row[5].as_str(), row[6].as_str()),
                        (Some(name), Some(s.tcp_address().as_str())),
                        "{what}"
                    );
                    assert_eq!(row[10], row[4], "{what}: peer_key twice");
                }
            }
            "sites" => {
                let keys: Vec<&str> = data.iter().filter_map(|r| r[2].as_str()).collect();
                assert_eq!(keys, ["ic", "nm"], "{what}");
                assert!(data.iter().all(|r| r[5] == 0 && r[0] == r[2] && r[23] == r[0]), "{what}: {body}");
            }
            other => panic!("unknown kind {other}"),
        }
    }
    p.shutdown().await;
}

/// LMD's dialect over real cores: Thruk asks for columns Icinga 2 lacks
/// (`depends_exec`, `parents` on services); Icinga 2 refuses the query,
/// Naemon answers them itself. Through a federation with `dialect = "lmd"`
/// every row of both comes, Icinga 2's with `""` there, the rest equal to
/// each site's own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_lmd_s_dialect_columns_icinga_lacks_answer_empty_through_a_federation() {
    use serde_json::Value;
    let Some(ic) = site(Core::Icinga, 12, 2).await else { return };
    let Some(nm) = site(Core::Naemon, 8, 2).await else { return };
    let p =
        crate::federation::federated_with(vec![("ic", ic.tcp_address()), ("nm", nm.tcp_address())], 64 << 20, |f| {
            f.dialect = livemux::config::Dialect::Lmd
        })
        .await;
    let own = "GET services\nColumns: host_name description state\nOutputFormat: json\n\n";
    let lacked = direct_raw(&ic, "GET services\nColumns: depends_exec\nResponseHeader: fixed16\n\n").await;
    assert!(
        String::from_utf8_lossy(&lacked).contains("does not exist"),
        "Icinga 2 lacks it: {}",
        String::from_utf8_lossy(&lacked)
    );
    for round in 0..2 {
        let q = "GET services\nColumns: host_name description depends_exec state parents peer_key\n\
                 Sort: peer_key asc\nSort: host_name asc\nSort: description asc\nLimit: 1000\nOutputFormat: json";
        let (code, body) = crate::federation::fed(&p, q).await;
        assert_eq!(code, 200, "round {round}: {body}");
        let rows: Vec<Vec<Value>> = serde_json::from_str(&body).expect("JSON");
        for (name, s) in [("ic", &ic), ("nm", &nm)] {
            let mut want: Vec<Vec<Value>> = serde_json::from_slice(&direct_raw(s, own).await).expect("JSON");
            want.sort_by(|a, b| (a[0].as_str(), a[1].as_str()).cmp(&(b[0].as_str(), b[1].as_str())));
            let got: Vec<Vec<Value>> =
                rows.iter().filter(|r| r[5] == name).map(|r| vec![r[0].clone(), r[1].clone(), r[3].clone()]).collect();
            assert_eq!(got, want, "round {round}, {name}'s rows");
        }
        let ic_rows: Vec<&Vec<Value>> = rows.iter().filter(|r| r[5] == "ic").collect();
        assert!(ic_rows.iter().all(|r| r[2] == "" && r[4] == ""), "round {round}: Icinga 2's lacked columns: {body}");
    }
    p.shutdown().await;
}

/// Thruk's log page through a federation: the `log` table of two Naemon
/// sites merged globally, newest first, `total_count` the two logs'
/// entries, the page the newest of the union; and the same rows as each
/// site's own log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_tables_of_two_naemon_sites_are_merged_newest_first() {
    use serde_json::Value;
    let Some(n1) = site(Core::Naemon, 6, 1).await else { return };
    let Some(n2) = site(Core::Naemon, 4, 1).await else { return };
    let p = crate::federation::federated(vec![("n1", n1.tcp_address()), ("n2", n2.tcp_address())], 64 << 20).await;
    let own = "GET log\nColumns: time type message\nFilter: time >= 1\nOutputFormat: json\n\n";
    let mut union: Vec<Vec<Value>> = Vec::new();
    for (name, s) in [("n1", &n1), ("n2", &n2)] {
        let rows: Vec<Vec<Value>> = serde_json::from_slice(&direct_raw(s, own).await).expect("JSON");
        assert!(!rows.is_empty(), "{name} has a log");
        union.extend(rows.into_iter().map(|mut r| {
            r.push(Value::from(name));
            r
        }));
    }
    let q = "GET log\nColumns: time type message peer_key\nFilter: time >= 1\nSort: time desc\nLimit: 20\n\
             OutputFormat: wrapped_json";
    let (code, body) = crate::federation::fed(&p, q).await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["total_count"], union.len(), "{body}");
    let page: Vec<Vec<Value>> = serde_json::from_value(v["data"].clone()).expect("rows");
    assert_eq!(page.len(), union.len().min(20), "{body}");
    let time = |r: &Vec<Value>| r[0].as_i64().unwrap_or_default();
    assert!(page.windows(2).all(|w| time(&w[0]) >= time(&w[1])), "newest first: {body}");
    union.sort_by_key(|r| std::cmp::Reverse(time(r)));
    let cut = time(&page[page.len() - 1]);
    assert!(union.iter().take(page.len()).all(|r| time(r) >= cut), "the page holds the union's newest");
    for r in &page {
        assert!(union.contains(r), "a row of a site's own log: {r:?}");
    }
    p.shutdown().await;
}
