//! Slow and vanishing clients, and sites that fail mid-answer. Each test
//! reproduces a production failure it guards against:
//! - Werk #18748 (seed 000): transient client back-pressure treated as fatal;
//!   a multi-site request read site by site must not cost anyone an answer.
//! - lighttpd #2796 (seed 002): with minimal buffering the proxy stopped
//!   reading the backend and never resumed; responses hung or were cut.

use std::time::Duration;

use crate::support::process::*;
use crate::support::*;
use livemux::config::{SiteParams, SpoolConfig};
use livemux::site::SiteState;
use livemux_simsite::bulk::Checker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const MIB: u64 = 1 << 20;

/// Send `GET bulk` with fixed16; return the announced body length.
async fn ask_bulk(c: &mut UnixStream) -> u64 {
    c.write_all(b"GET bulk\nResponseHeader: fixed16\n\n").await.unwrap();
    let mut raw = [0u8; 16];
    tokio::time::timeout(PATIENCE, c.read_exact(&mut raw)).await.expect("header in time").unwrap();
    let h = livemux_protocol::ResponseHeader::decode(&raw).unwrap();
    assert_eq!(h.status.code(), 200);
    h.length
}

/// Read up to `n` body bytes into `check`; returns how many arrived before EOF.
async fn read_body(c: &mut UnixStream, n: u64, check: &mut Checker) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < n {
        let want = (n - got).min(buf.len() as u64) as usize;
        let r = tokio::time::timeout(PATIENCE, c.read(&mut buf[..want])).await.expect("data in time").unwrap();
        if r == 0 {
            break;
        }
        check.update(&buf[..r]);
        got += r as u64;
    }
    got
}

async fn paused_client_gets_everything(pause: Duration) {
    let params = SiteParams { query_timeout: Duration::from_secs(120), ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    let size = 24 * MIB;
    s.set_knobs(|k| k.bulk_bytes = size);
    let mut c = p.client("s1").await;
    let len = ask_bulk(&mut c).await;
    assert_eq!(len, size);
    let mut check = Checker::new();
    read_body(&mut c, MIB, &mut check).await;
    tokio::time::sleep(pause).await;
    read_body(&mut c, size - MIB, &mut check).await;
    assert!(
        check.is_complete(size),
        "complete and byte-exact after a {pause:?} pause: {} bytes, error at {:?}",
        check.len(),
        check.first_error
    );
    p.shutdown().await;
}

#[tokio::test]
async fn a_client_pausing_5s_mid_response_gets_it_complete() {
    paused_client_gets_everything(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_client_pausing_30s_mid_response_gets_it_complete() {
    paused_client_gets_everything(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_paused_past_query_timeout_is_cut_at_the_deadline_and_not_before() {
    let timeout = Duration::from_secs(3);
    let (p, s) = Proxy::with_sim("s1", SiteParams { query_timeout: timeout, ..fast_params() }).await;
    let size = 24 * MIB;
    s.set_knobs(|k| k.bulk_bytes = size);
    let mut c = p.client("s1").await;
    let sent_at = tokio::time::Instant::now();
    let len = ask_bulk(&mut c).await;
    assert_eq!(len, size);
    // Pause (read nothing) and watch for the proxy closing its end.
    let std = c.into_std().unwrap();
    let probe = std.try_clone().unwrap();
    let mut c = UnixStream::from_std(std).unwrap();
    let closed_after = tokio::task::spawn_blocking(move || {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(probe.as_fd(), PollFlags::from_bits_retain(nix::libc::POLLRDHUP))];
        let n = poll(&mut fds, PollTimeout::from(6000u16)).expect("poll");
        (n, sent_at.elapsed())
    })
    .await
    .unwrap();
    let (events, elapsed) = closed_after;
    assert_eq!(events, 1, "the proxy closed the connection");
    assert!(elapsed >= timeout, "cut at the deadline, not before: {elapsed:?}");
    assert!(elapsed < timeout + Duration::from_secs(2), "cut at the deadline: {elapsed:?}");
    let mut check = Checker::new();
    let got = read_body(&mut c, size, &mut check).await;
    assert!(got < size, "the answer is short ({got} of {size}) and the connection closed");
    assert!(check.first_error.is_none(), "what arrived is exact");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_000_a_multi_site_request_read_site_by_site_costs_nobody_an_answer() {
    // Ten sites, one channel each: without spooling, the slow reader below
    // would hold every channel and all other clients would wait.
    let params = SiteParams {
        channels: 1,
        channels_max: 1,
        channel_timeout: Duration::from_secs(1),
        query_timeout: Duration::from_secs(60),
        ..fast_params()
    };
    let mut sims = Vec::new();
    for i in 0..10 {
        let s = sim(&format!("site{i}")).await;
        s.set_knobs(|k| k.bulk_bytes = 6 * MIB);
        sims.push(s);
    }
    let names: Vec<String> = (0..10).map(|i| format!("site{i}")).collect();
    let p =
        Proxy::start(names.iter().zip(&sims).map(|(n, s)| (n.as_str(), s.address(), params.clone())).collect()).await;
    for n in &names {
        p.wait_state(n, SiteState::Ready).await;
    }
    // The GUI worker sends the query to every site first ...
    let mut conns = Vec::new();
    for n in &names {
        let mut c = p.client(n).await;
        c.write_all(b"GET bulk\nResponseHeader: fixed16\n\n").await.unwrap();
        conns.push(c);
    }
    // ... the sites answer at their speed, and every channel is free again
    // while the worker has not read a byte.
    for n in &names {
        eventually_snapshot(&p, n, "channel free again", |s| {
            s.channels.len() == 1 && s.channels[0].state == "idle" && s.clients_waiting == 0
        })
        .await;
    }
    // Meanwhile other clients are answered at once.
    for n in &names {
        let (code, body) = query(&p, n, "GET status\nColumns: num_hosts").await;
        assert_eq!((code, body.as_str()), (200, "100\n"), "{n}");
    }
    // Now the worker reads the answers one after another, slowly.
    for (n, c) in names.iter().zip(conns.iter_mut()) {
        let mut raw = [0u8; 16];
        c.read_exact(&mut raw).await.unwrap();
        assert_eq!(&raw, b"200     6291456\n");
        let mut check = Checker::new();
        let mut buf = vec![0u8; 512 * 1024];
        while check.len() < 6 * MIB {
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "EOF after {} bytes", check.len());
            check.update(&buf[..n]);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(check.is_complete(6 * MIB), "{n}: complete and exact");
    }
    p.shutdown().await;
}

#[tokio::test]
async fn seed_002_streaming_with_no_spool_never_stops_reading_for_good() {
    let s = sim("s1").await;
    // Larger than every kernel and proxy buffer on the way (loopback TCP can
    // absorb tens of MB).
    let size = 64 * MIB;
    s.set_knobs(|k| k.bulk_bytes = size);
    let no_spool = SpoolConfig { memory_per_response: 0, memory_budget: 0, disk_budget: 0, ..SpoolConfig::default() };
    let params = SiteParams { query_timeout: Duration::from_secs(60), ..fast_params() };
    let p = Proxy::start_with_spool(vec![("s1", s.address(), params)], no_spool).await;
    p.wait_state("s1", SiteState::Ready).await;
    let mut c = p.client("s1").await;
    assert_eq!(ask_bulk(&mut c).await, size);
    // The client is slower than the site and keeps stopping.
    let mut check = Checker::new();
    while check.len() < size {
        let before = check.len();
        read_body(&mut c, (size - before).min(4 * MIB), &mut check).await;
        assert!(check.len() > before, "the stream stalled at {before} bytes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(check.is_complete(size), "complete and byte-exact");
    let usage = p.app.as_ref().unwrap().spool_usage();
    assert!(usage.responses_streamed >= 1, "the answer was streamed: {usage:?}");
    assert_eq!(usage.memory_used, 0);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_fixed16_never_gets_a_short_answer_that_looks_complete() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    s.set_knobs(|k| {
        k.bulk_bytes = 4 * MIB;
        k.close_after_bytes = Some(16 + MIB);
        k.fault_table = Some("bulk".into());
    });
    let mut c = p.client("s1").await;
    c.write_all(b"GET bulk\n\n").await.unwrap();
    let got = read_to_eof(&mut c).await;
    let want = "site 's1': the site closed the connection after 1048592 of 4194320 bytes of the answer\n";
    assert!(
        got == want.as_bytes(),
        "got {} bytes starting {:?}",
        got.len(),
        String::from_utf8_lossy(&got[..got.len().min(80)])
    );
    p.shutdown().await;
}

/// A client that reads part of an answer and then goes away (`kill`: it is
/// a separate process killed with SIGKILL; otherwise it closes its socket).
async fn client_leaves_mid_response(kill: bool) {
    let s = sim("s1").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let mut proxy = tokio::task::block_in_place(|| {
        ProxyProcess::start(
            dir.path(),
            "",
            "channels = 2\nheartbeat_interval = \"300ms\"\nheartbeat_timeout = \"200ms\"",
            &[("s1", s.address())],
        )
    });
    let sock = proxy.socket("s1");
    // A long answer: 64 MiB, sent slowly, so the client is mid-way for a while.
    s.set_knobs(|k| {
        k.bulk_bytes = 64 * MIB;
        k.write_pause = Duration::from_millis(10);
        k.write_chunk = 256 * 1024;
    });
    if kill {
        let mut child = std::process::Command::new(BIN)
            .args(["query", "--socket", sock.to_str().unwrap(), "GET bulk"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let state_dir = dir.path().to_owned();
        tokio::task::block_in_place(|| {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            while !std::fs::read_to_string(state_dir.join("state.json")).unwrap_or_default().contains("\"busy\"") {
                assert!(tokio::time::Instant::now() < deadline, "the query never started");
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        child.kill().unwrap();
        child.wait().unwrap();
    } else {
        let mut c = UnixStream::connect(&sock).await.unwrap();
        assert_eq!(ask_bulk(&mut c).await, 64 * MIB);
        let mut check = Checker::new();
        read_body(&mut c, 2 * MIB, &mut check).await;
        drop(c);
    }
    let line = tokio::task::block_in_place(|| proxy.log.wait_for("client closed connection while sending response"));
    assert!(line.contains("INFO") && line.contains("s1") && line.contains("of 67108880 bytes sent"), "{line}");
    // Nothing else is disturbed: the next 100 queries on the site succeed.
    s.set_knobs(|k| k.write_pause = Duration::ZERO);
    for i in 0..100 {
        let mut c = UnixStream::connect(&sock).await.unwrap();
        let (code, body) = ask(&mut c, "GET hosts\nColumns: name\nLimit: 1\nResponseHeader: fixed16\n\n").await;
        assert_eq!((code, body.as_str()), (200, "host-0000\n"), "query {i}");
    }
    let lines = tokio::task::block_in_place(|| proxy.stop());
    assert!(!lines.iter().any(|l| l.contains("WARN") || l.contains("ERROR")), "no alarm:\n{}", lines.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_mid_response_ends_only_its_own_session() {
    client_leaves_mid_response(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_response_ends_only_its_own_session() {
    client_leaves_mid_response(true).await;
}

/// Send 1 GiB through a proxy process to a client that is slow in the way
/// `slow` describes; return the proxy's peak RSS.
async fn one_gib_to_a_slow_client(top: &str, spool_to_disk: bool) -> u64 {
    let size = 1 << 30;
    let s = sim("s1").await;
    s.set_knobs(|k| k.bulk_bytes = size);
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let mut proxy = tokio::task::block_in_place(|| {
        ProxyProcess::start(dir.path(), top, "query_timeout = \"300s\"", &[("s1", s.address())])
    });
    let mut c = UnixStream::connect(proxy.socket("s1")).await.unwrap();
    assert_eq!(ask_bulk(&mut c).await, size);
    let mut check = Checker::new();
    if spool_to_disk {
        // The client reads nothing until the whole answer sits in the spool.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let st = proxy.state();
            let spooled =
                st["spool"]["disk_used"].as_u64().unwrap_or(0) + st["spool"]["memory_used"].as_u64().unwrap_or(0);
            if spooled >= size - 2 * MIB
                && st["sites"][0]["channels"].as_array().is_some_and(|c| c.iter().all(|c| c["state"] == "idle"))
            {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the answer was not spooled: {st}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        read_body(&mut c, size, &mut check).await;
    } else {
        // The client stops every 64 MiB.
        while check.len() < size {
            let before = check.len();
            read_body(&mut c, (size - before).min(64 * MIB), &mut check).await;
            assert!(check.len() > before, "stalled at {before}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(check.is_complete(size), "1 GiB complete and exact");
    let peak = proxy.peak_rss();
    tokio::task::block_in_place(|| proxy.log.drain().len());
    drop(proxy);
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_spooled_to_disk_for_a_slow_client_stays_under_64_mib() {
    let peak = one_gib_to_a_slow_client("", true).await;
    eprintln!("peak RSS of the proxy, 1 GiB spooled to disk: {} MiB", peak / MIB);
    assert!(peak < 64 * MIB, "peak RSS {} MiB", peak / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_streamed_to_a_slow_client_stays_under_64_mib() {
    let top = "spool_memory_per_response = 0\nspool_memory_budget = 0\nspool_disk_budget = 0";
    let peak = one_gib_to_a_slow_client(top, false).await;
    eprintln!("peak RSS of the proxy, 1 GiB streamed: {} MiB", peak / MIB);
    assert!(peak < 64 * MIB, "peak RSS {} MiB", peak / MIB);
}
