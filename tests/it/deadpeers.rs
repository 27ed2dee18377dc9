//! Dead peers, in private network namespaces with nftables (root only; see
//! `crate::support::netns`). Each test reproduces a production failure:
//! - half-open clients wedging the send path (seed 004): reaped by the
//!   send-stall watchdog, while paused, slow and zero-window clients are not;
//! - idle clients that vanish without a FIN piling up (seed 003): cleaned up
//!   by TCP keepalive;
//! - sites that black-hole, never answer, or vanish mid-answer: marked down
//!   within their bound, clients get errors, recovery when the fault lifts.
//!
//! Every "is reaped" test has a twin proving that activity just inside the
//! limit keeps the peer alive.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::netns::*;
use crate::support::*;
use livemux::config::{Keepalive, SiteParams, SpoolConfig, TcpListen};
use livemux::site::SiteState;
use livemux_simsite::bulk::Checker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const MIB: u64 = 1 << 20;
const GRACE: Duration = Duration::from_millis(1500);

fn params() -> SiteParams {
    SiteParams {
        channels: 1,
        channels_max: 1,
        pipeline_depth: 1,
        heartbeat_interval: Duration::from_millis(500),
        heartbeat_timeout: Duration::from_millis(300),
        connect_retry: Duration::from_millis(300),
        connect_timeout: Duration::from_secs(1),
        query_timeout: Duration::from_secs(30),
        send_stall_grace: GRACE,
        keepalive: Keepalive { idle: Duration::from_secs(1), interval: Duration::from_secs(1), count: 2 },
        tcp_user_timeout: Duration::from_secs(2),
        response_idle_timeout: Duration::from_secs(2),
        ..SiteParams::default()
    }
}

fn no_spool() -> SpoolConfig {
    SpoolConfig { memory_per_response: 0, memory_budget: 0, disk_budget: 0, ..SpoolConfig::default() }
}

/// A proxy for `site` with a TCP listener on 127.0.0.1 (free port).
async fn proxy_with_listener(
    site: &livemux_simsite::SimSite,
    params: SiteParams,
    spool: SpoolConfig,
) -> (Proxy, SocketAddr) {
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let mut config = test_config(dir.path(), vec![("s1", site.address(), params)]);
    config.sites[0].listen = Some(TcpListen { addr: "127.0.0.1:0".parse().unwrap(), only_from: vec![], tls: None });
    config.spool = SpoolConfig { dir: dir.path().join("spool"), ..spool };
    let p = Proxy::start_config(dir, config).await;
    p.wait_state("s1", SiteState::Ready).await;
    let addr = p.site("s1").listen_addr().expect("listener bound");
    (p, addr)
}

/// A TCP client with a small receive buffer (so the proxy's writes block).
async fn client(addr: SocketAddr, rcvbuf: u32) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(rcvbuf).unwrap();
    s.connect(addr).await.unwrap()
}

async fn ask_bulk(c: &mut TcpStream) -> u64 {
    c.write_all(b"GET bulk\nResponseHeader: fixed16\n\n").await.unwrap();
    let mut raw = [0u8; 16];
    tokio::time::timeout(PATIENCE, c.read_exact(&mut raw)).await.unwrap().unwrap();
    livemux_protocol::ResponseHeader::decode(&raw).unwrap().length
}

/// Read `n` bytes in `step`-sized reads, pausing `pause` between reads.
async fn read_paced(c: &mut TcpStream, n: u64, step: usize, pause: Duration, check: &mut Checker) {
    let mut buf = vec![0u8; step];
    while check.len() < n {
        let want = (n - check.len()).min(step as u64) as usize;
        let got = tokio::time::timeout(PATIENCE, c.read(&mut buf[..want])).await.expect("data in time").unwrap();
        assert!(got > 0, "EOF after {} bytes", check.len());
        check.update(&buf[..got]);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

async fn reaped(p: &Proxy) -> u64 {
    p.site("s1").snapshot(Duration::from_secs(1)).await.unwrap().clients_reaped
}

#[test]
fn a_half_open_client_mid_response_is_reaped_and_its_channel_freed() {
    in_netns("half-open client", || async {
        let s = sim("s1").await;
        s.set_knobs(|k| k.bulk_bytes = 256 * MIB);
        // Streaming: the stalled answer holds the only channel until reaped.
        let (p, addr) = proxy_with_listener(&s, params(), no_spool()).await;
        let mut c = client(addr, 64 * 1024).await;
        assert_eq!(ask_bulk(&mut c).await, 256 * MIB);
        let mut check = Checker::new();
        read_paced(&mut c, MIB, 64 * 1024, Duration::ZERO, &mut check).await;
        let port = c.local_addr().unwrap().port();
        drop_port("halfopen", port);
        let t0 = Instant::now();
        let snap = eventually_snapshot(&p, "s1", "client reaped", |s| s.clients_reaped == 1).await;
        let took = t0.elapsed();
        assert!(took >= GRACE, "not before the grace period: {took:?}");
        assert!(took <= GRACE + SCHEDULING_MARGIN, "within the grace (+ the margin): {took:?}");
        let last = snap.last_reaped.expect("the reap is recorded");
        assert!(last.peer.starts_with("127.0.0.1:") && last.reason.contains("no ACK"), "{last:?}");
        // The channel is free again: the next query is answered.
        let (code, body) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
        assert_eq!((code, body.as_str()), (200, "100\n"));
        lift("halfopen");
        p.shutdown().await;
    });
}

#[test]
fn a_client_unreachable_for_less_than_the_grace_is_kept() {
    in_netns("short outage", || async {
        let s = sim("s1").await;
        let size = 32 * MIB;
        s.set_knobs(|k| k.bulk_bytes = size);
        let (p, addr) = proxy_with_listener(&s, params(), no_spool()).await;
        let mut c = client(addr, 64 * 1024).await;
        assert_eq!(ask_bulk(&mut c).await, size);
        let mut check = Checker::new();
        read_paced(&mut c, MIB, 64 * 1024, Duration::ZERO, &mut check).await;
        // Well inside the grace, clear of TCP's retransmission backoff
        // (retransmits at 0.2, 0.6, 1.4 s after the loss on loopback).
        drop_port("blip", c.local_addr().unwrap().port());
        tokio::time::sleep(GRACE / 3).await;
        lift("blip");
        read_paced(&mut c, size, 256 * 1024, Duration::ZERO, &mut check).await;
        assert!(check.is_complete(size), "complete and exact after the outage");
        assert_eq!(reaped(&p).await, 0);
        p.shutdown().await;
    });
}

#[test]
fn a_paused_client_is_not_reaped() {
    in_netns("SIGSTOP client", || async {
        let s = sim("s1").await;
        // A slow site: its answer takes over a second.
        s.set_knobs(|k| {
            k.bulk_bytes = 64 * MIB;
            k.write_chunk = 256 * 1024;
            k.write_pause = Duration::from_millis(5);
        });
        let (p, addr) = proxy_with_listener(&s, params(), SpoolConfig::default()).await;
        let mut child = std::process::Command::new(crate::support::process::BIN)
            .args(["query", "--tcp", &addr.to_string(), "GET bulk"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The site has begun its answer (about 1.3 s of writes): the client
        // is stopped while the proxy has the answer to send.
        eventually("the site is answering", || s.queries_on("bulk") == 1).await;
        crate::support::process::interrupt(&child, nix::sys::signal::Signal::SIGSTOP);
        tokio::time::sleep(GRACE * 2).await;
        crate::support::process::interrupt(&child, nix::sys::signal::Signal::SIGCONT);
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
        assert!(status.success(), "the paused client got its whole answer");
        assert_eq!(reaped(&p).await, 0);
        p.shutdown().await;
    });
}

#[test]
fn a_slow_reader_at_80_kb_per_second_is_not_reaped() {
    in_netns("slow reader", || async {
        let s = sim("s1").await;
        let size = 400 * 1024;
        s.set_knobs(|k| k.bulk_bytes = size);
        let (p, addr) = proxy_with_listener(&s, params(), no_spool()).await;
        let mut c = client(addr, 16 * 1024).await;
        assert_eq!(ask_bulk(&mut c).await, size);
        let mut check = Checker::new();
        read_paced(&mut c, size, 8 * 1024, Duration::from_millis(100), &mut check).await;
        assert!(check.is_complete(size));
        assert_eq!(reaped(&p).await, 0);
        p.shutdown().await;
    });
}

#[test]
fn a_client_that_half_closes_after_its_request_is_not_reaped() {
    in_netns("half-close", || async {
        let s = sim("s1").await;
        let size = 16 * MIB;
        s.set_knobs(|k| k.bulk_bytes = size);
        let (p, addr) = proxy_with_listener(&s, params(), no_spool()).await;
        let mut c = client(addr, 64 * 1024).await;
        // The request ends with EOF (as `nc -N` or a script does): the
        // proxy's side of the connection is in CLOSE_WAIT while it answers.
        c.write_all(b"GET bulk\nResponseHeader: fixed16\n\n").await.unwrap();
        c.shutdown().await.unwrap();
        let mut raw = [0u8; 16];
        tokio::time::timeout(PATIENCE, c.read_exact(&mut raw)).await.unwrap().unwrap();
        assert_eq!(livemux_protocol::ResponseHeader::decode(&raw).unwrap().length, size);
        // Pauses longer than the watchdog's sampling interval, every 2 MiB,
        // while the proxy's writes wait for room.
        let mut check = Checker::new();
        while check.len() < size {
            let upto = (check.len() + 2 * MIB).min(size);
            read_paced(&mut c, upto, 64 * 1024, Duration::ZERO, &mut check).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(check.is_complete(size));
        assert_eq!(reaped(&p).await, 0);
        p.shutdown().await;
    });
}

#[test]
fn a_client_with_a_tiny_receive_window_is_not_reaped() {
    in_netns("tiny window", || async {
        let s = sim("s1").await;
        let size = 300 * 1024;
        s.set_knobs(|k| k.bulk_bytes = size);
        let (p, addr) = proxy_with_listener(&s, params(), no_spool()).await;
        let mut c = client(addr, 2048).await;
        assert_eq!(ask_bulk(&mut c).await, size);
        let mut check = Checker::new();
        read_paced(&mut c, size, 1024, Duration::from_millis(10), &mut check).await;
        assert!(check.is_complete(size));
        assert_eq!(reaped(&p).await, 0);
        p.shutdown().await;
    });
}

#[test]
fn an_idle_client_that_vanishes_is_dropped_by_keepalive_and_a_live_one_is_kept() {
    in_netns("idle vanish", || async {
        let s = sim("s1").await;
        let (p, addr) = proxy_with_listener(&s, params(), SpoolConfig::default()).await;
        let mut gone = client(addr, 64 * 1024).await;
        let mut alive = client(addr, 64 * 1024).await;
        for c in [&mut gone, &mut alive] {
            c.write_all(b"GET status\nColumns: num_hosts\nKeepAlive: on\nResponseHeader: fixed16\n\n").await.unwrap();
            assert_eq!(read_answer(c).await, (200, "100\n".to_owned()));
        }
        drop_port("idle", gone.local_addr().unwrap().port());
        let t0 = Instant::now();
        let ka = params().keepalive;
        let bound = ka.idle + ka.interval * ka.count;
        let snap = eventually_snapshot(&p, "s1", "the vanished client dropped", |s| s.clients_connected == 1).await;
        let took = t0.elapsed();
        // Keepalive probes are timed by the kernel in whole seconds: one more
        // second than the scheduling margin.
        let kernel = Duration::from_secs(1);
        assert!(took <= bound + kernel + SCHEDULING_MARGIN, "gone after idle + interval × count: {took:?}");
        assert!(took >= ka.idle, "not before keepalive could tell: {took:?}");
        assert_eq!(snap.clients_reaped, 1);
        assert!(snap.last_reaped.unwrap().reason.starts_with("keepalive"));
        // The live client, idle just as long, is still served.
        tokio::time::sleep(bound.saturating_sub(took) + Duration::from_millis(500)).await;
        alive.write_all(b"GET status\nColumns: num_hosts\nResponseHeader: fixed16\n\n").await.unwrap();
        assert_eq!(read_answer(&mut alive).await, (200, "100\n".to_owned()));
        lift("idle");
        p.shutdown().await;
    });
}

#[test]
fn a_black_holed_site_is_marked_down_clients_get_errors_and_it_recovers() {
    in_netns("black hole", || async {
        let s = sim("s1").await;
        let params = params();
        let p = Proxy::start(vec![("s1", s.address(), params.clone())]).await;
        p.wait_state("s1", SiteState::Ready).await;
        drop_port("hole", s.tcp_addr().unwrap().port());
        let t0 = Instant::now();
        p.wait_state("s1", SiteState::Down).await;
        let bound = params.heartbeat_interval + params.heartbeat_timeout;
        assert!(t0.elapsed() <= bound + SCHEDULING_MARGIN, "down within its bound: {:?}", t0.elapsed());
        let started = Instant::now();
        let (code, body) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
        // Not waiting for a channel (channel_timeout, 3 s) or a connect (1 s).
        assert!(started.elapsed() < params.connect_timeout, "answered at once: {:?}", started.elapsed());
        assert_eq!(code, 502);
        assert!(body.starts_with("site 's1' is down: "), "{body}");
        // Reconnects meet the black hole: they end by connect_timeout, not a refusal.
        let snap = eventually_snapshot(&p, "s1", "a reconnect timed out", |s| {
            s.last_error.as_deref().is_some_and(|e| e.contains("timed out after 1s"))
        })
        .await;
        assert_eq!(snap.state, SiteState::Down);
        lift("hole");
        p.wait_state("s1", SiteState::Ready).await;
        let (code, _) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
        assert_eq!(code, 200);
        p.shutdown().await;
    });
}

#[test]
fn a_site_that_accepts_but_never_answers_is_marked_down() {
    in_netns("accepts, never answers", || async {
        // The kernel completes the handshake; nobody ever reads.
        let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = mute.local_addr().unwrap();
        let p = Proxy::start(vec![("s1", format!("tcp://{addr}"), params())]).await;
        p.wait_state("s1", SiteState::Down).await;
        let (code, body) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
        assert_eq!((code, body.as_str()), (502, "site 's1' is down: heartbeat not answered within 300ms\n"));
        // A real site appears on that port: recovery on its own.
        drop(mute);
        let cfg = livemux_simsite::SimConfig {
            listen: livemux_simsite::Listen::Tcp(addr),
            ..livemux_simsite::SimConfig::tcp("s1")
        };
        let _s = livemux_simsite::SimSite::start(cfg).await.unwrap();
        p.wait_state("s1", SiteState::Ready).await;
        p.shutdown().await;
    });
}

#[test]
fn a_site_that_vanishes_mid_answer_is_marked_down_and_the_client_is_not_left_hanging() {
    in_netns("site vanishes", || async {
        let s = sim("s1").await;
        s.set_knobs(|k| {
            k.bulk_bytes = 64 * MIB;
            k.write_chunk = 64 * 1024;
            k.write_pause = Duration::from_millis(10);
        });
        let params = SiteParams { channels: 2, channels_max: 2, ..params() };
        let p = Proxy::start(vec![("s1", s.address(), params.clone())]).await;
        p.wait_state("s1", SiteState::Ready).await;
        let mut c = p.client("s1").await;
        c.write_all(b"GET bulk\nResponseHeader: fixed16\n\n").await.unwrap();
        let mut head = [0u8; 16];
        c.read_exact(&mut head).await.unwrap();
        drop_port("vanish", s.tcp_addr().unwrap().port());
        let t0 = Instant::now();
        p.wait_state("s1", SiteState::Down).await;
        let bound = params.heartbeat_interval + params.heartbeat_timeout;
        assert!(t0.elapsed() <= bound + SCHEDULING_MARGIN, "down within its bound: {:?}", t0.elapsed());
        // The client gets the end of the connection, with a body shorter
        // than announced; never a hang.
        let rest = read_to_eof(&mut c).await;
        assert!((rest.len() as u64) < 64 * MIB);
        lift("vanish");
        p.wait_state("s1", SiteState::Ready).await;
        p.shutdown().await;
    });
}

/// ESTABLISHED TCP sockets in this namespace on `port`: (the site's side,
/// the connecting side), as `ss -t state established` would count them.
fn established(port: u16) -> (usize, usize) {
    let text = std::fs::read_to_string("/proc/thread-self/net/tcp").expect("/proc/thread-self/net/tcp");
    let port_of = |a: &str| a.rsplit(':').next().and_then(|h| u16::from_str_radix(h, 16).ok());
    let mut counts = (0, 0);
    for f in text.lines().skip(1).map(|l| l.split_whitespace().collect::<Vec<_>>()) {
        if f.len() > 3 && f[3] == "01" {
            counts.0 += usize::from(port_of(f[1]) == Some(port));
            counts.1 += usize::from(port_of(f[2]) == Some(port));
        }
    }
    counts
}

/// Seen in the chaos soak on Icinga 2 (4 Livestatus threads on 2 cores): a
/// black hole longer than `tcp_user_timeout` swallowed the FINs of the
/// channels livemux gave up, the kernel stopped retransmitting them, and the
/// site's threads stayed blocked reading connections nobody used; after a
/// few such outages the site answered no heartbeat. Now the site holds no
/// connection livemux gave up once it is reachable again.
#[test]
fn channels_given_up_in_a_black_hole_do_not_hold_the_site_after_it() {
    in_netns("given-up channels after a black hole", || async {
        let s = sim("s1").await;
        let port = s.tcp_addr().unwrap().port();
        let params = SiteParams { channels: 2, channels_max: 2, ..params() };
        let p = Proxy::start(vec![("s1", s.address(), params.clone())]).await;
        p.wait_state("s1", SiteState::Ready).await;
        eventually("both channels open on both sides", || established(port) == (2, 2)).await;
        drop_port("hole", port);
        p.wait_state("s1", SiteState::Down).await;
        let snap = eventually_snapshot(&p, "s1", "the given-up channels kept", |s| s.channels_closing >= 2).await;
        assert!(snap.channels_closing <= params.channels_max + 2, "bounded: {}", snap.channels_closing);
        // The outage outlasts tcp_user_timeout (2 s): by itself the kernel
        // would have stopped retransmitting the FINs by now.
        tokio::time::sleep(params.tcp_user_timeout + Duration::from_secs(2)).await;
        assert_eq!(established(port).0, 2, "the site still holds the two channels it never heard closed");
        lift("hole");
        p.wait_state("s1", SiteState::Ready).await;
        eventually("the site holds only the connections livemux has open", || {
            let (site, livemux) = established(port);
            site == livemux
        })
        .await;
        eventually_snapshot(&p, "s1", "nothing left closing", |s| s.channels_closing == 0).await;
        let (code, _) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
        assert_eq!(code, 200);
        p.shutdown().await;
    });
}

#[test]
fn only_from_admits_listed_sources_and_refuses_others_ipv4_and_ipv6() {
    in_netns("only_from", || async {
        run("ip", &["-6", "addr", "add", "::2/128", "dev", "lo"]);
        let s = sim("s1").await;
        let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
        let mut proxy = tokio::task::block_in_place(|| {
            crate::support::process::ProxyProcess::start_with_sites(
                dir.path(),
                "",
                "",
                &[("s1", s.address(), "listen = \"[::]:0\"\nonly_from = [\"127.0.0.1\", \"::1\"]")],
            )
        });
        let line = tokio::task::block_in_place(|| proxy.log.find("TCP listener ready"));
        let port: u16 = line.rsplit("]:").next().unwrap().trim().parse().expect("port in the log line");
        for (source, target, allowed) in [
            ("127.0.0.1", format!("127.0.0.1:{port}"), true),
            ("127.0.0.2", format!("127.0.0.1:{port}"), false),
            ("::1", format!("[::1]:{port}"), true),
            ("::2", format!("[::1]:{port}"), false),
        ] {
            let src: std::net::IpAddr = source.parse().unwrap();
            let sock =
                if src.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.unwrap();
            sock.bind(SocketAddr::new(src, 0)).unwrap();
            let mut c = sock.connect(target.parse().unwrap()).await.unwrap();
            let _ = c.write_all(b"GET status\nColumns: num_hosts\nResponseHeader: fixed16\n\n").await;
            // A refused client may see the end of the connection or a reset
            // (its query arrived at a closed socket); it never gets data.
            let mut got = Vec::new();
            let _ = tokio::time::timeout(PATIENCE, c.read_to_end(&mut got)).await.expect("closed in time");
            if allowed {
                assert_eq!(got, b"200           4\n100\n", "{source} is allowed");
            } else {
                assert!(got.is_empty(), "{source} is refused with a clean close");
                let shown = if src.is_ipv4() {
                    format!("refused TCP client {source}:")
                } else {
                    format!("refused TCP client [{source}]:")
                };
                tokio::task::block_in_place(|| proxy.log.wait_for(&shown));
            }
        }
        tokio::task::block_in_place(|| proxy.stop());
    });
}

#[test]
fn a_new_channel_timing_out_while_others_work_shrinks_the_pool_and_the_site_stays_up() {
    in_netns("new connections dropped", || async {
        let s = sim("s1").await;
        let params = SiteParams { channels: 2, channels_max: 2, channel_retry: Duration::from_secs(3600), ..params() };
        let (p, _addr) = proxy_with_listener(&s, params, SpoolConfig::default()).await;
        eventually_snapshot(&p, "s1", "both channels open", |snap| {
            snap.channels.len() == 2 && snap.channels_connecting == 0
        })
        .await;
        // New connections to the site vanish (their SYN is dropped, as by a
        // firewall limiting new connections); established channels work on.
        let port = s.tcp_addr().unwrap().port();
        nft(&format!(
            "table inet newconn {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
             tcp dport {port} tcp flags & (syn | ack) == syn drop\n  }}\n}}\n"
        ));
        // The site cuts one answer: that channel is closed, its replacement
        // cannot connect within connect_timeout.
        s.set_knobs(|k| {
            k.close_after_bytes = Some(100);
            k.fault_table = Some("hosts".into());
        });
        let mut c = p.client("s1").await;
        c.write_all(b"GET hosts\nColumns: name\nResponseHeader: fixed16\n\n").await.unwrap();
        let cut = read_to_eof(&mut c).await;
        assert!(cut.len() < 16 + 1000, "the answer was cut: {} bytes", cut.len());
        s.set_knobs(|k| k.close_after_bytes = None);
        eventually_snapshot(&p, "s1", "a pool of the one channel left", |snap| snap.channels_served == Some(1)).await;
        for _ in 0..10 {
            let (code, body) = query(&p, "s1", "GET status\nColumns: num_hosts").await;
            assert_eq!((code, body.as_str()), (200, "100\n"));
        }
        let st = p.site("s1").status();
        assert_eq!((st.state, st.generation), (SiteState::Ready, 0), "never declared down");
        lift("newconn");
        p.shutdown().await;
    });
}
