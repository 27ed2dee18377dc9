//! The client side: bad input, limits, error shapes, the socket file.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::support::*;
use livemux::app::{App, StartError};
use livemux::client::listener::BindError;
use livemux::config::SiteParams;
use livemux::site::SiteState;
use livemux_protocol::Limits;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn errors_have_a_status_and_one_line_with_fixed16_and_the_line_alone_without() {
    let s = sim("s1").await;
    let p = Proxy::start(vec![("s1", s.address(), fast_params())]).await;
    p.wait_state("s1", SiteState::Ready).await;
    s.stop();
    // The stopping site may first show a closed connection; from the next
    // reconnect on, the refused connect is the reason.
    let refused = format!("cannot connect to {}", s.address());
    eventually_snapshot(&p, "s1", "down, refusing connections", |snap| {
        snap.state == SiteState::Down && snap.last_error.as_deref().is_some_and(|e| e.starts_with(&refused))
    })
    .await;

    let mut c = p.client("s1").await;
    c.write_all(b"GET hosts\nResponseHeader: fixed16\n\n").await.unwrap();
    let raw = read_to_eof(&mut c).await;
    let text = String::from_utf8(raw).unwrap();
    let (header, body) = text.split_at(16);
    assert_eq!(header, format!("502 {:>11}\n", body.len()));
    assert!(body.starts_with("site 's1' is down: cannot connect to ") && body.ends_with('\n'), "{body}");
    assert_eq!(body.matches('\n').count(), 1, "one line");

    // Without fixed16: the reason alone, then the connection closes (even
    // with KeepAlive, since the client could not delimit answers).
    let mut c = p.client("s1").await;
    c.write_all(b"GET hosts\nKeepAlive: on\n\n").await.unwrap();
    let raw = String::from_utf8(read_to_eof(&mut c).await).unwrap();
    assert_eq!(raw, body);
    p.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_get_clear_errors_and_keepalive_clients_keep_their_connection() {
    let (p, _s) = Proxy::with_sim("s1", fast_params()).await;
    let mut c = p.client("s1").await;
    for (req, code, msg) in [
        ("get hosts\n", 452, "invalid request method 'get' (expected GET or COMMAND)\n"),
        ("GET\n", 452, "invalid GET request, missing table name\n"),
        ("GET hosts\nKeepAlive: yes\n", 400, "invalid value 'yes' for header KeepAlive (expected 'on' or 'off')\n"),
        ("GET hosts\nCache: sometimes\n", 400, "invalid value 'sometimes' for header Cache (expected 'reload')\n"),
    ] {
        let full = format!("{req}ResponseHeader: fixed16\nKeepAlive: on\n\n");
        let (got_code, got_msg) = ask(&mut c, &full).await;
        assert_eq!((got_code, got_msg.as_str()), (code, msg), "{req:?}");
    }
    // Still usable.
    let (code, body) = ask(&mut c, "GET status\nColumns: num_hosts\nResponseHeader: fixed16\nKeepAlive: on\n\n").await;
    assert_eq!((code, body.as_str()), (200, "100\n"));
    p.shutdown().await;
}

#[tokio::test]
async fn oversized_requests_are_refused_with_413_and_the_limit_named() {
    let limits = Limits { max_request_bytes: 4096, max_header_lines: 20, max_line_bytes: 512 };
    let (p, s) = Proxy::with_sim("s1", SiteParams { limits, ..fast_params() }).await;
    let long_line = format!("GET hosts\nResponseHeader: fixed16\nFilter: name = {}\n\n", "x".repeat(600));
    let many_lines = format!("GET hosts\nResponseHeader: fixed16\n{}\n", "Filter: state = 0\n".repeat(25));
    let big =
        format!("GET hosts\nResponseHeader: fixed16\n{}\n", format!("Filter: name = {}\n", "y".repeat(400)).repeat(12));
    for (req, msg) in [
        (long_line, "request line too large: more than 512 bytes (max_line_bytes)\n"),
        (many_lines, "request too large: more than 20 header lines (max_header_lines)\n"),
        (big, "request too large: more than 4096 bytes (max_request_bytes)\n"),
    ] {
        let mut c = p.client("s1").await;
        // The proxy may answer and close before the whole request is written.
        let _ = c.write_all(req.as_bytes()).await;
        let raw = String::from_utf8(read_to_eof(&mut c).await).unwrap();
        assert_eq!(raw, format!("413 {:>11}\n{msg}", msg.len()));
    }
    // An endless line is cut off without being buffered: the proxy answers
    // after max_line_bytes, long before the client stops sending.
    let mut c = p.client("s1").await;
    let writer = tokio::spawn(async move {
        let chunk = vec![b'z'; 64 * 1024];
        let mut sent = 0usize;
        while c.write_all(&chunk).await.is_ok() {
            sent += chunk.len();
            if sent > 64 << 20 {
                break;
            }
        }
        sent
    });
    let sent = tokio::time::timeout(PATIENCE, writer).await.unwrap().unwrap();
    assert!(sent < 64 << 20, "the proxy closed the connection");
    assert!(!s.requests().iter().any(|r| r.starts_with(b"GET hosts")), "nothing reached the site");
    let (code, _) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 200);
    p.shutdown().await;
}

#[tokio::test]
async fn max_clients_refuses_extra_clients_with_503() {
    let (p, _s) = Proxy::with_sim("s1", SiteParams { max_clients: 2, ..fast_params() }).await;
    let _a = p.client("s1").await;
    let _b = p.client("s1").await;
    eventually_snapshot(&p, "s1", "two clients counted", |s| s.clients_connected == 2).await;
    let mut c = p.client("s1").await;
    let (code, body) = read_answer(&mut c).await;
    assert_eq!(code, 503);
    assert_eq!(body, "too many clients: this site's socket serves at most 2 (max_clients)\n");
    drop(_a);
    eventually_snapshot(&p, "s1", "one client left", |s| s.clients_connected == 1).await;
    let (code, _) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 200);
    p.shutdown().await;
}

#[tokio::test]
async fn sockets_are_0660_stale_files_are_replaced_and_live_ones_refused() {
    let s = sim("s1").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let sockets = dir.path().join("s");
    std::fs::create_dir_all(&sockets).unwrap();
    // A stale socket file from a crashed run.
    drop(std::os::unix::net::UnixListener::bind(sockets.join("s1")).unwrap());
    let config = test_config(dir.path(), vec![("s1", s.address(), fast_params())]);
    let app = App::start(config.clone()).await.expect("stale socket replaced");
    let mode = std::fs::metadata(sockets.join("s1")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);

    // A second instance on the same socket directory is refused.
    match App::start(config.clone()).await {
        Err(StartError::Bind(BindError::InUse(path))) => assert_eq!(path, sockets.join("s1")),
        other => panic!("expected InUse, got {:?}", other.err()),
    }
    app.shutdown().await;
    assert!(!sockets.join("s1").exists(), "socket removed at shutdown");

    // A regular file is never removed.
    std::fs::write(sockets.join("s1"), b"precious").unwrap();
    match App::start(config).await {
        Err(StartError::Bind(BindError::NotASocket(_))) => {}
        other => panic!("expected NotASocket, got {:?}", other.err()),
    }
    assert_eq!(std::fs::read(sockets.join("s1")).unwrap(), b"precious");
}

#[tokio::test]
async fn clients_vanishing_while_their_queries_wait_leave_nothing_behind() {
    // Ten clients send a slow query on a one-channel site and vanish at
    // once: nine wait for the channel, one holds it. livemux learns that a
    // client left when it writes the answer; each query then ends, with its
    // session, its place in the queue and its hold on the channel.
    let params = SiteParams { channels: 1, channels_max: 1, channel_timeout: Duration::from_secs(10), ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    s.set_knobs(|k| {
        k.delay = Duration::from_millis(100);
        k.fault_table = Some("hosts".into());
    });
    for _ in 0..10 {
        let mut c = p.client("s1").await;
        c.write_all(b"GET hosts\nColumns: name\nResponseHeader: fixed16\n\n").await.unwrap();
        drop(c);
    }
    eventually("the site answered all ten", || s.queries_on("hosts") == 10).await;
    eventually_snapshot(&p, "s1", "no session, waiter or busy channel left", |snap| {
        snap.clients_waiting == 0 && snap.clients_connected == 0 && snap.channels.iter().all(|c| c.state == "idle")
    })
    .await;
    // The channel was handed back clean: the next query is answered on it.
    let (code, body) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
    assert_eq!((code, body.as_str()), (200, "100\n"));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_empty_lines_is_not_buffered() {
    let s = sim("s1").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let proxy = tokio::task::block_in_place(|| {
        crate::support::process::ProxyProcess::start(dir.path(), "", "", &[("s1", s.address())])
    });
    let mut c = tokio::net::UnixStream::connect(proxy.socket("s1")).await.unwrap();
    // 256 MiB of empty lines (skipped, as between requests), then a request.
    let chunk = vec![b'\n'; 1 << 20];
    for _ in 0..256 {
        c.write_all(&chunk).await.unwrap();
    }
    let (code, body) = ask(&mut c, "GET status\nColumns: num_hosts\nResponseHeader: fixed16\n\n").await;
    assert_eq!((code, body.as_str()), (200, "100\n"));
    let peak = proxy.peak_rss();
    assert!(peak < 64 << 20, "peak RSS {} MiB: the empty lines were buffered", peak >> 20);
    drop(proxy);
}

#[tokio::test]
async fn a_stopping_daemon_leaves_a_successors_socket_alone() {
    let (mut p, _s) = Proxy::with_sim("s1", fast_params()).await;
    let path = p.socket("s1");
    // The file system may hand the successor's socket the same inode number;
    // its change time differs once the clock has moved on (coarse, per tick).
    let ours = std::fs::metadata(&path).unwrap().modified().unwrap();
    let probe = path.with_file_name("clock");
    eventually("the file system clock moved on", || {
        std::fs::write(&probe, b"").unwrap();
        std::fs::metadata(&probe).unwrap().modified().unwrap() > ours
    })
    .await;
    // A successor took the path over while this daemon was finishing.
    std::fs::remove_file(&path).unwrap();
    let successor = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // Stop the daemon, keeping the directory (the test harness owns it).
    p.app.take().unwrap().shutdown().await;
    assert!(path.exists(), "the successor's socket is still there");
    std::os::unix::net::UnixStream::connect(&path).expect("and still reaches the successor");
    drop(successor);
    drop(p);
}
