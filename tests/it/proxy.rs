//! The proxy in front of simulated sites: framing, header rewriting,
//! commands, pipelining, channel waits, timeouts, retries.

use std::time::Duration;

use crate::support::*;
use livemux::site::SiteState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Ask the simulated site directly over TCP; everything until EOF.
async fn direct(site: &livemux_simsite::SimSite, request: &str) -> Vec<u8> {
    direct_tcp(site.tcp_addr().unwrap(), request).await
}

const BATTERY: &[&str] = &[
    "GET hosts\nColumns: name state plugin_output\n",
    "GET hosts\nColumns: name groups\nFilter: groups >= db\nOutputFormat: json\n",
    "GET services\nColumns: host_name description state\nFilter: state = 2\nLimit: 7\n",
    "GET services\nStats: state = 0\nStats: state = 1\nStats: state = 2\nStats: state = 3\n",
    "GET services\nColumns: host_name\nStats: state != 0\nFilter: host_name ~ host-000\nOutputFormat: json\n",
    "GET hosts\nFilter: name = host-0001\nFilter: name = host-0002\nOr: 2\n",
    "GET hostgroups\nColumns: name num_hosts\n",
    "GET nosuchtable\n",
    "GET hosts\nColumns: nosuchcolumn\n",
];

#[tokio::test]
async fn answers_equal_direct_answers_byte_for_byte() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    for q in BATTERY {
        // With fixed16: exact header and body.
        let want = direct(&s, &format!("{q}ResponseHeader: fixed16\n\n")).await;
        let mut c = p.client("s1").await;
        c.write_all(format!("{q}ResponseHeader: fixed16\n\n").as_bytes()).await.unwrap();
        let got = read_to_eof(&mut c).await;
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want), "fixed16: {q:?}");

        // Without fixed16 and without keep-alive: the body, then EOF.
        let want = direct(&s, &format!("{q}\n")).await;
        let mut c = p.client("s1").await;
        c.write_all(format!("{q}\n").as_bytes()).await.unwrap();
        let got = read_to_eof(&mut c).await;
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want), "plain: {q:?}");
    }
    // Keep-alive with fixed16: the whole battery on one connection.
    let mut c = p.client("s1").await;
    for q in BATTERY {
        let want = direct(&s, &format!("{q}ResponseHeader: fixed16\n\n")).await;
        let (code, body) = ask(&mut c, &format!("{q}ResponseHeader: fixed16\nKeepAlive: on\n\n")).await;
        let mut got =
            livemux_protocol::ResponseHeader::new(livemux_protocol::Status::from_code(code), body.len() as u64)
                .encode()
                .to_vec();
        got.extend_from_slice(body.as_bytes());
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want), "keepalive: {q:?}");
    }
    p.shutdown().await;
}

#[tokio::test]
async fn site_gets_fixed16_and_keepalive_right_after_get_and_no_client_copies() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    let mut c = p.client("s1").await;
    let req = "GET hosts\nColumns: name\nCache: reload\nKeepAlive: on\nAuthUser: alice\nFilter: state = 1\n\
               ResponseHeader: fixed16\nOutputFormat: json\n\n";
    let (code, _) = ask(&mut c, req).await;
    assert_eq!(code, 200);
    let sent = s.requests().into_iter().rev().find(|r| r.starts_with(b"GET hosts")).unwrap();
    assert_eq!(
        String::from_utf8(sent).unwrap(),
        "GET hosts\nResponseHeader: fixed16\nKeepAlive: on\nColumns: name\nAuthUser: alice\nFilter: state = 1\n\
         OutputFormat: json\n\n"
    );
    p.shutdown().await;
}

#[tokio::test]
async fn commands_are_forwarded_one_by_one_and_not_answered() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    let mut c = p.client("s1").await;
    // Two commands in one request, then a query on the same connection: the
    // only bytes that come back are the query's answer.
    c.write_all(b"COMMAND [1] PROCESS_HOST_CHECK_RESULT;host-0003;1;down now\nCOMMAND [2] NOP;x\n\n").await.unwrap();
    let (code, body) = ask(
        &mut c,
        "GET hosts\nColumns: name state plugin_output\nFilter: name = host-0003\nResponseHeader: fixed16\n\n",
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "host-0003;1;down now\n"));
    let raw: Vec<Vec<u8>> = s.requests().into_iter().filter(|r| r.starts_with(b"COMMAND")).collect();
    assert_eq!(
        raw,
        vec![
            b"COMMAND [1] PROCESS_HOST_CHECK_RESULT;host-0003;1;down now\n\n".to_vec(),
            b"COMMAND [2] NOP;x\n\n".to_vec()
        ]
    );
    assert_eq!(s.stats().commands, 2);

    // A client that asks for fixed16 on a COMMAND gets the empty 200 a core sends.
    let mut c = p.client("s1").await;
    c.write_all(b"COMMAND [3] NOP;y\nResponseHeader: fixed16\n\n").await.unwrap();
    let (code, body) = read_answer(&mut c).await;
    assert_eq!((code, body.as_str()), (200, ""));
    p.shutdown().await;
}

#[tokio::test]
async fn a_core_answering_a_command_cannot_spoil_the_next_query() {
    // Old mk-livestatus versions answer a rejected COMMAND with a bare error
    // line. On the one channel, the next query must not read it as its answer.
    let (p, s) = Proxy::with_sim("s1", SiteParams { channels: 1, channels_max: 1, ..fast_params() }).await;
    s.set_knobs(|k| k.command_reply = Some("400: unknown command".into()));
    let mut c = p.client("s1").await;
    c.write_all(b"COMMAND [1] NO_SUCH_COMMAND;x\n\n").await.unwrap();
    for _ in 0..3 {
        let (code, body) =
            ask(&mut c, "GET status\nColumns: num_hosts\nKeepAlive: on\nResponseHeader: fixed16\n\n").await;
        assert_eq!((code, body.as_str()), (200, "100\n"));
    }
    assert_eq!(s.stats().commands, 1);
    p.shutdown().await;
}

#[tokio::test]
async fn a_rejected_command_is_reported_to_a_client_asking_for_fixed16() {
    // mk-livestatus answers a command it rejects with a bare `400: ...`
    // line; a client that asked for fixed16 gets it as a proper answer.
    let (p, s) = Proxy::with_sim("s1", SiteParams { channels: 1, channels_max: 1, ..fast_params() }).await;
    s.set_knobs(|k| k.command_reply = Some("400: Unknown command 'NO_SUCH_COMMAND'".into()));
    let mut c = p.client("s1").await;
    let (code, body) = ask(&mut c, "COMMAND [1] NO_SUCH_COMMAND;x\nResponseHeader: fixed16\n\n").await;
    assert_eq!((code, body.as_str()), (400, "Unknown command 'NO_SUCH_COMMAND'\n"));
    let (code, body) = ask(&mut c, "GET status\nColumns: num_hosts\nKeepAlive: on\nResponseHeader: fixed16\n\n").await;
    assert_eq!((code, body.as_str()), (200, "100\n"), "the connection stays usable, as with a core");
    p.shutdown().await;
}

/// The numbers of the proxy's open channels to `site`.
async fn channel_ids(p: &Proxy, site: &str) -> Vec<u64> {
    let snap = p.site(site).snapshot(Duration::from_secs(5)).await.expect("snapshot");
    snap.channels.iter().map(|c| c.id).collect()
}

#[tokio::test]
async fn a_bad_header_cannot_spoil_another_clients_query() {
    // An mk-livestatus core stops reading a request at a header it does not
    // know and reads the rest as the next request (`Limit: 2` here, which it
    // answers with a bare `Invalid request method` and a close). On the one
    // channel, another client's query must get its own answer.
    let slow = Duration::from_secs(2);
    let params =
        SiteParams { channels: 1, channels_max: 1, heartbeat_interval: slow, heartbeat_timeout: slow, ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    // With a round trip, the leftovers' answer comes well after the error
    // answer: the channel looks clean when the error answer has been read.
    s.set_knobs(|k| {
        k.mk_headers = true;
        k.rtt = Duration::from_millis(100);
    });
    let bad = "GET hosts\nFoo: bar\nLimit: 2\nResponseHeader: fixed16\n\n";
    let want = direct(&s, "GET hosts\nResponseHeader: fixed16\nFoo: bar\nLimit: 2\n\n").await;
    assert_eq!(String::from_utf8_lossy(&want), "400          36\nUndefined request header 'Foo: bar'\n");
    for round in 0..3 {
        let mut a = p.client("s1").await;
        a.write_all(bad.as_bytes()).await.unwrap();
        assert_eq!(read_to_eof(&mut a).await, want, "round {round}");
        let (code, body) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
        assert_eq!((code, body.as_str()), (200, "100\n"), "round {round}");
    }
    assert_eq!(p.site("s1").status().generation, 0, "a bad query is not a dead site");
    p.shutdown().await;
}

#[tokio::test]
async fn after_an_error_answer_a_clean_channel_is_proved_and_kept() {
    // An error that leaves the connection clean (the core read the whole
    // request) costs a heartbeat on the channel, not a new connection.
    let (p, s) = Proxy::with_sim("s1", SiteParams { channels: 1, channels_max: 1, ..fast_params() }).await;
    s.set_knobs(|k| k.mk_headers = true);
    let before = channel_ids(&p, "s1").await;
    assert_eq!(before.len(), 1);
    let (code, _) = query(&p, "s1", "GET nosuchtable").await;
    assert_eq!(code, 404);
    let (code, body) = query(&p, "s1", "GET hosts\nColumns: name\nLimit: 1").await;
    assert_eq!((code, body.as_str()), (200, "host-0000\n"));
    assert_eq!(channel_ids(&p, "s1").await, before, "the same connection");
    p.shutdown().await;
}

#[tokio::test]
async fn an_unframed_error_reaches_the_client_in_the_form_it_asked_for() {
    // A core that answers without the fixed16 header it was asked for: the
    // client gets the core's words, never a 502 about an invalid header.
    let (p, s) = Proxy::with_sim("s1", SiteParams { channels: 1, channels_max: 1, ..fast_params() }).await;
    s.set_knobs(|k| {
        k.unframed_reply = Some("Invalid request method".into());
        k.fault_table = Some("hosts".into());
    });
    let (code, body) = query(&p, "s1", "GET hosts\nColumns: name").await;
    assert_eq!((code, body.as_str()), (452, "Invalid request method\n"));
    let mut c = p.client("s1").await;
    c.write_all(b"GET hosts\nColumns: name\n\n").await.unwrap();
    assert_eq!(read_to_eof(&mut c).await, b"Invalid request method\n");
    let (code, body) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
    assert_eq!((code, body.as_str()), (200, "100\n"));
    assert_eq!(p.site("s1").status().generation, 0);
    p.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_a_query_in_flight_finish() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    s.set_knobs(|k| {
        k.delay = Duration::from_millis(500);
        k.fault_table = Some("hosts".into());
    });
    let mut c = p.client("s1").await;
    c.write_all(b"GET hosts\nColumns: name\nLimit: 2\nResponseHeader: fixed16\n\n").await.unwrap();
    eventually("the query reached the site", || s.queries_on("hosts") == 1).await;
    // Shutdown starts while the site is still working on the answer.
    let stopping = tokio::spawn(p.shutdown());
    let (code, body) = read_answer(&mut c).await;
    assert_eq!((code, body.as_str()), (200, "host-0000\nhost-0001\n"));
    tokio::time::timeout(PATIENCE, stopping).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_request_trickling_in_is_cut_at_client_request_timeout() {
    let params = SiteParams { client_request_timeout: Duration::from_millis(400), ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    // Within the limit, a request in pieces is fine.
    let mut c = p.client("s1").await;
    c.write_all(b"GET status\nColumns: num_hosts\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.write_all(b"ResponseHeader: fixed16\nKeepAlive: on\n\n").await.unwrap();
    assert_eq!(read_answer(&mut c).await, (200, "100\n".to_owned()));
    // A request that never ends is answered with 451 and the connection closed.
    let started = tokio::time::Instant::now();
    c.write_all(b"GET hosts\nResponseHeader: fixed16\nColumns: name\n").await.unwrap();
    let raw = String::from_utf8(read_to_eof(&mut c).await).unwrap();
    let msg = "incomplete request: it did not end with an empty line within 400 ms (client_request_timeout)\n";
    assert_eq!(raw, format!("451 {:>11}\n{msg}", msg.len()));
    assert!(started.elapsed() >= Duration::from_millis(400), "not before the limit");
    assert_eq!(s.queries_on("hosts"), 0, "nothing reached the site");
    p.shutdown().await;
}

#[tokio::test]
async fn many_pipelining_clients_share_two_channels() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    let mut tasks = Vec::new();
    for client in 0..40 {
        let path = p.socket("s1");
        tasks.push(tokio::spawn(async move {
            let mut c = tokio::net::UnixStream::connect(path).await.unwrap();
            let mut batch = String::new();
            let hosts: Vec<usize> = (0..25).map(|i| (client * 7 + i * 3) % 100).collect();
            for h in &hosts {
                batch.push_str(&format!(
                    "GET hosts\nColumns: name alias\nFilter: name = host-{h:04}\nKeepAlive: on\nResponseHeader: fixed16\n\n"
                ));
            }
            c.write_all(batch.as_bytes()).await.unwrap();
            for h in hosts {
                let (code, body) = read_answer(&mut c).await;
                assert_eq!(code, 200);
                assert_eq!(body, format!("host-{h:04};Host {h} of s1\n"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.stats().accepted, 2, "only the two channels ever connected");
    p.shutdown().await;
}

#[tokio::test]
async fn reused_channel_failing_before_any_byte_is_retried_once_on_a_fresh_one() {
    let (p, s) = Proxy::with_sim("s1", SiteParams { channels: 1, channels_max: 1, ..fast_params() }).await;
    let (code, _) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 200);
    let before = s.stats();
    s.set_knobs(|k| {
        k.close_without_answer = 1;
        k.fault_table = Some("hosts".into());
    });
    let (code, body) = query(&p, "s1", "GET hosts\nColumns: name\nLimit: 1").await;
    assert_eq!((code, body.as_str()), (200, "host-0000\n"));
    let after = s.stats();
    assert_eq!(s.queries_on("hosts"), 2, "the query was sent twice");
    assert_eq!(after.accepted - before.accepted, 1, "the retry used one new connection");
    p.shutdown().await;
}

#[tokio::test]
async fn site_closing_without_answer_costs_a_clear_error_not_a_hang() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    s.set_knobs(|k| {
        k.close_without_answer = 100;
        k.fault_table = Some("hosts".into());
    });
    let (code, body) = query(&p, "s1", "GET hosts\nColumns: name").await;
    assert_eq!(code, 502);
    assert_eq!(body, "site 's1': the site closed the connection without answering\n");
    // The site itself is fine: other tables still answer.
    let (code, _) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 200);
    p.shutdown().await;
}

use livemux::config::SiteParams;

#[tokio::test]
async fn idle_channels_closed_by_the_site_are_replaced_before_a_client_gets_them() {
    let params =
        SiteParams { channels: 2, channels_max: 2, heartbeat_interval: Duration::from_secs(60), ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    eventually("both channels open", || s.stats().open == 2).await;
    assert_eq!(s.stats().accepted, 2);
    s.close_idle_connections();
    eventually("the proxy reopened both channels", || s.stats().accepted == 4 && s.stats().open == 2).await;
    let queries = s.stats().queries;
    let (code, _) = query(&p, "s1", "GET hosts\nColumns: name\nLimit: 1").await;
    assert_eq!(code, 200);
    assert_eq!(s.stats().queries, queries + 1, "answered on the first try");
    assert_eq!(s.stats().accepted, 4, "no retry connection was needed");
    p.shutdown().await;
}

#[tokio::test]
async fn queries_wait_for_a_channel_in_order_and_give_up_after_channel_timeout() {
    let params =
        SiteParams { channels: 1, channels_max: 1, channel_timeout: Duration::from_millis(400), ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    s.set_knobs(|k| {
        k.delay = Duration::from_secs(2);
        k.fault_table = Some("hosts".into());
    });
    let mut slow = p.client("s1").await;
    slow.write_all(b"GET hosts\nColumns: name\nLimit: 1\nResponseHeader: fixed16\n\n").await.unwrap();
    eventually_snapshot(&p, "s1", "the slow query holds the channel", |s| s.channels.iter().any(|c| c.state == "busy"))
        .await;
    let started = tokio::time::Instant::now();
    let (code, body) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 503);
    assert_eq!(body, "no channel to site 's1' became free within 400ms\n");
    assert!(started.elapsed() >= Duration::from_millis(400));
    let (code, body) = read_answer(&mut slow).await;
    assert_eq!((code, body.as_str()), (200, "host-0000\n"));
    p.shutdown().await;
}

#[tokio::test]
async fn waiting_queries_are_served_first_come_first_served() {
    let params = SiteParams { channels: 1, channels_max: 1, channel_timeout: Duration::from_secs(10), ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    s.set_knobs(|k| {
        k.delay = Duration::from_millis(300);
        k.fault_table = Some("hosts".into());
    });
    let mut first = p.client("s1").await;
    first.write_all(b"GET hosts\nColumns: name\nLimit: 1\nResponseHeader: fixed16\n\n").await.unwrap();
    eventually_snapshot(&p, "s1", "first query running", |s| s.channels.iter().any(|c| c.state == "busy")).await;
    let mut waiting = Vec::new();
    for i in 0..4 {
        let mut c = p.client("s1").await;
        c.write_all(format!("GET status\nColumns: num_hosts\nLimit: {i}\nResponseHeader: fixed16\n\n").as_bytes())
            .await
            .unwrap();
        eventually_snapshot(&p, "s1", "query queued", |s| s.clients_waiting == i + 1).await;
        waiting.push(c);
    }
    read_answer(&mut first).await;
    for c in &mut waiting {
        assert_eq!(read_answer(c).await.0, 200);
    }
    let order: Vec<String> = s
        .requests()
        .iter()
        .filter(|r| r.starts_with(b"GET status\nResponseHeader"))
        .filter_map(|r| String::from_utf8_lossy(r).lines().find(|l| l.starts_with("Limit")).map(str::to_owned))
        .collect();
    assert_eq!(order, vec!["Limit: 0", "Limit: 1", "Limit: 2", "Limit: 3"]);
    p.shutdown().await;
}

#[tokio::test]
async fn a_hanging_query_is_cut_at_query_timeout() {
    let params = SiteParams { query_timeout: Duration::from_millis(700), ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    s.set_knobs(|k| {
        k.hang = true;
        k.fault_table = Some("hosts".into());
    });
    let started = tokio::time::Instant::now();
    let (code, body) = query(&p, "s1", "GET hosts\nColumns: name").await;
    let took = started.elapsed();
    assert_eq!((code, body.as_str()), (504, "query to site 's1' not answered within 700ms\n"));
    assert!(took >= Duration::from_millis(700), "cut at the deadline, not before: {took:?}");
    // Heartbeats keep working (status is not hung): the site stays ready.
    assert_eq!(p.site("s1").status().state, SiteState::Ready);
    p.shutdown().await;
}

#[tokio::test]
async fn unterminated_request_at_eof_is_answered() {
    let (p, _s) = Proxy::with_sim("s1", fast_params()).await;
    let mut c = p.client("s1").await;
    c.write_all(b"GET hosts\nColumns: name\nLimit: 2").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(read_to_eof(&mut c).await, b"host-0000\nhost-0001\n");
    p.shutdown().await;
}

#[tokio::test]
async fn client_idle_timeout_closes_quiet_connections() {
    let params = SiteParams { client_idle_timeout: Duration::from_millis(300), ..fast_params() };
    let (p, _s) = Proxy::with_sim("s1", params).await;
    let mut c = p.client("s1").await;
    let (code, _) = ask(&mut c, "GET status\nColumns: num_hosts\nKeepAlive: on\nResponseHeader: fixed16\n\n").await;
    assert_eq!(code, 200);
    let started = tokio::time::Instant::now();
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(PATIENCE, c.read(&mut byte)).await.unwrap().unwrap();
    assert_eq!(n, 0, "closed by the proxy");
    assert!(started.elapsed() >= Duration::from_millis(300));
    p.shutdown().await;
}

#[tokio::test]
async fn a_site_cutting_its_answer_gives_an_error_or_a_short_body_never_a_complete_looking_one() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    // Cut inside the header: nothing was forwarded yet, so a clean error.
    s.set_knobs(|k| {
        k.close_after_bytes = Some(10);
        k.fault_table = Some("bulk".into());
        k.bulk_bytes = 1 << 20;
    });
    let (code, body) = query(&p, "s1", "GET bulk").await;
    assert_eq!(code, 502);
    assert_eq!(body, "site 's1': the site closed the connection after 10 of 16 bytes of the answer\n");

    // Cut after 300 KiB of a 1 MiB body: an answer that size is held
    // whole before it is sent, so the cut becomes an error answer.
    s.set_knobs(|k| k.close_after_bytes = Some(16 + 300 * 1024));
    let (code, body) = query(&p, "s1", "GET bulk").await;
    assert_eq!(code, 502);
    assert_eq!(body, "site 's1': the site closed the connection after 307216 of 1048592 bytes of the answer\n");

    // Cut after 300 KiB of a 4 MiB body (larger than
    // spool_memory_per_response: it streams): the client sees the
    // announced length and then the end of the connection.
    s.set_knobs(|k| k.bulk_bytes = 4 << 20);
    let mut c = p.client("s1").await;
    c.write_all(b"GET bulk\nResponseHeader: fixed16\n\n").await.unwrap();
    let raw = read_to_eof(&mut c).await;
    assert_eq!(&raw[..16], b"200     4194304\n");
    assert!(raw.len() < 16 + (4 << 20), "short: {} bytes", raw.len());
    let mut check = livemux_simsite::bulk::Checker::new();
    check.update(&raw[16..]);
    assert!(check.first_error.is_none(), "what did arrive is exact");

    // The site is still in service for the next client.
    s.set_knobs(|k| k.close_after_bytes = None);
    let (code, _) = query(&p, "s1", "GET bulk").await;
    assert_eq!(code, 200);
    p.shutdown().await;
}
