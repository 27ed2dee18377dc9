//! TLS toward sites (stunnel in front of Icinga 2 or the simulated site,
//! certificates made at test time) and on the cascading listener.

use std::time::Duration;

use crate::support::process::ProxyProcess;
use crate::support::realsite::{Core, RealSite};
use crate::support::tls::{Pair, Pki, Stunnel};
use crate::support::*;
use livemux::config::{SiteParams, TcpListen, TlsSettings};
use livemux::site::SiteState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tls_params(ca: &std::path::Path) -> SiteParams {
    SiteParams {
        tls: TlsSettings {
            ca_file: Some(ca.to_owned()),
            // Longer than the 3 s within which the "quickly" tests expect
            // their error: those errors must not be handshake timeouts.
            handshake_timeout: Duration::from_secs(5),
            ..TlsSettings::default()
        },
        ..fast_params()
    }
}

/// A proxy with one site at `address` and `params`; not waiting for ready.
async fn proxy(address: String, params: SiteParams) -> Proxy {
    Proxy::start(vec![("s1", address, params)]).await
}

/// The site goes down; returns the error a client gets (status, body).
async fn down_error(p: &Proxy) -> (u16, String) {
    p.wait_state("s1", SiteState::Down).await;
    query(p, "s1", "GET status\nColumns: num_hosts").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icinga_behind_stunnel_answers_through_livemux_as_it_does_in_plaintext() {
    a_real_core_behind_stunnel_answers_as_it_does_in_plaintext(Core::Icinga).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naemon_behind_stunnel_answers_through_livemux_as_it_does_in_plaintext() {
    a_real_core_behind_stunnel_answers_as_it_does_in_plaintext(Core::Naemon).await;
}

async fn a_real_core_behind_stunnel_answers_as_it_does_in_plaintext(core: Core) {
    let Some(ic) = tokio::task::spawn_blocking(move || RealSite::start(core, 50, 4)).await.unwrap() else {
        return;
    };
    let pki = Pki::new();
    let st = tokio::task::block_in_place(|| Stunnel::start(([127, 0, 0, 1], ic.port).into(), &pki.server, None));
    let p = proxy(st.address(), SiteParams { channels: 2, channels_max: 2, ..tls_params(&pki.ca) }).await;
    p.wait_state("s1", SiteState::Ready).await;
    for q in [
        "GET hosts\nColumns: name state address",
        "GET services\nColumns: host_name description state plugin_output\nFilter: state != 0",
        "GET services\nStats: state = 0\nStats: state = 1\nStats: state = 2\nStats: state = 3",
        "GET hostgroups\nColumns: name num_hosts",
        "GET status\nColumns: num_hosts num_services program_version",
    ] {
        let direct = direct_tcp(([127, 0, 0, 1], ic.port).into(), &format!("{q}\nResponseHeader: fixed16\n\n")).await;
        let (dcode, dbody) = read_answer(&mut direct.as_slice()).await;
        let (pcode, pbody) = query(&p, "s1", q).await;
        let sorted = |b: &str| {
            let mut v: Vec<&str> = b.lines().collect();
            v.sort();
            v.join("\n")
        };
        assert_eq!((pcode, sorted(&pbody)), (dcode, sorted(&dbody)), "{q:?}");
    }
    let tls = p.site("s1").snapshot(Duration::from_secs(1)).await.unwrap().tls.unwrap();
    assert!(tls.handshakes_full >= 1);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_an_untrusted_ca_marks_the_site_down_with_495() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let st = tokio::task::block_in_place(|| Stunnel::start(s.tcp_addr().unwrap(), &pki.rogue_server, None));
    let started = tokio::time::Instant::now();
    let p = proxy(st.address(), tls_params(&pki.ca)).await;
    let (code, body) = down_error(&p).await;
    assert_eq!(code, 495, "{body}");
    // Below the handshake timeout (5 s): the failure is seen, not waited out.
    assert!(started.elapsed() < Duration::from_secs(3), "quickly");
    assert!(
        body.starts_with(&format!("site 's1' is down: certificate of {} could not be verified: ", st.address())),
        "{body}"
    );
    assert!(body.contains("'CN=impostor.example' issued by 'CN=rogue CA'"), "names the certificate: {body}");
    assert!(body.contains("issued by a CA that is not in ca_file"), "says why: {body}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_already_waiting_when_a_certificate_fails_get_495_too() {
    // A site whose TLS handshake is held until the test lets it go: a query
    // sent while the site is starting waits for the first channel, and the
    // certificate failure must reach it as a 495, as it reaches later ones.
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = livemux::tls::server_config(&livemux::config::ListenerTls::new(
        pki.rogue_server.cert.clone(),
        pki.rogue_server.key.clone(),
    ))
    .unwrap();
    let (go, held) = tokio::sync::oneshot::channel::<()>();
    let site = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = held.await;
        // The handshake fails on livemux's side; the outcome here is moot.
        let _ = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await;
    });
    let params = SiteParams { channel_timeout: Duration::from_secs(10), ..tls_params(&pki.ca) };
    let p = proxy(format!("tls://127.0.0.1:{port}"), params).await;
    let mut c = p.client("s1").await;
    c.write_all(b"GET status\nColumns: num_hosts\nResponseHeader: fixed16\n\n").await.unwrap();
    eventually_snapshot(&p, "s1", "the query waits for the first channel", |s| s.clients_waiting == 1).await;
    go.send(()).unwrap();
    let (code, body) = read_answer(&mut c).await;
    assert_eq!(code, 495, "{body}");
    assert!(body.contains("issued by a CA that is not in ca_file"), "{body}");
    site.await.unwrap();
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_v1_certificate_is_explained_in_words() {
    // OpenSSL-based clients accept a version 1 certificate; rustls does not.
    // The operator must learn what is wrong and how to reissue it.
    let pki = Pki::new();
    let v1 = tokio::task::block_in_place(|| pki.v1_server());
    let s = sim("s1").await;
    let st = tokio::task::block_in_place(|| Stunnel::start(s.tcp_addr().unwrap(), &v1, None));
    let p = proxy(st.address(), tls_params(&pki.ca)).await;
    let (code, body) = down_error(&p).await;
    assert_eq!(code, 495, "{body}");
    assert!(body.contains("'CN=v1-site.example' issued by 'CN=livemux test CA'"), "names the certificate: {body}");
    assert!(
        body.contains("it is an X.509 version 1 certificate (no extensions), and livemux needs version 3: reissue it"),
        "says what is wrong and what to do: {body}"
    );
    assert!(!body.contains("OtherError"), "no library names: {body}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_marks_the_site_down_with_495() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let st = tokio::task::block_in_place(|| Stunnel::start(s.tcp_addr().unwrap(), &pki.expired, None));
    let p = proxy(st.address(), tls_params(&pki.ca)).await;
    let (code, body) = down_error(&p).await;
    assert_eq!(code, 495);
    assert!(body.contains("'CN=old-site.example'") && body.contains(": it expired at 2021-01-01"), "{body}");
    assert!(body.contains("renew the site's certificate"), "says what to do: {body}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_presented_and_a_wrong_one_is_reported() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let st = tokio::task::block_in_place(|| Stunnel::start(s.tcp_addr().unwrap(), &pki.server, Some(&pki.client_ca)));
    // No client certificate, and one the site does not trust: clear errors.
    for client in [None, Some(pki.rogue_client.clone())] {
        let mut params = tls_params(&pki.ca);
        params.tls.client_cert = client.map(|c| (c.cert, c.key));
        let p = proxy(st.address(), params).await;
        let (code, body) = down_error(&p).await;
        assert_eq!(code, 502);
        assert!(body.contains("the site rejected livemux's client certificate"), "{body}");
        p.shutdown().await;
    }
    // The right one.
    let mut params = tls_params(&pki.ca);
    params.tls.client_cert = Some((pki.client.cert.clone(), pki.client.key.clone()));
    let p = proxy(st.address(), params).await;
    p.wait_state("s1", SiteState::Ready).await;
    assert_eq!(query(&p, "s1", "GET status\nColumns: num_hosts").await, (200, "100\n".to_owned()));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_site_on_a_tls_address_gives_a_clear_error_quickly() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let started = tokio::time::Instant::now();
    // The simulated site waits for a request and never answers the
    // ClientHello: the handshake timeout ends the wait.
    let mut params = tls_params(&pki.ca);
    params.tls.handshake_timeout = Duration::from_secs(1);
    let p = proxy(format!("tls://{}", s.tcp_addr().unwrap()), params).await;
    let (code, body) = down_error(&p).await;
    // The handshake timeout (1 s) + SCHEDULING_MARGIN, well below query_timeout.
    assert!(started.elapsed() < Duration::from_secs(1) + SCHEDULING_MARGIN, "no hang: {:?}", started.elapsed());
    assert_eq!(code, 502);
    assert!(body.contains("does the site speak TLS on this port?"), "{body}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_site_on_a_tcp_address_gives_a_clear_error_quickly() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let st = tokio::task::block_in_place(|| Stunnel::start(s.tcp_addr().unwrap(), &pki.server, None));
    let started = tokio::time::Instant::now();
    let p = proxy(format!("tcp://127.0.0.1:{}", st.port), fast_params()).await;
    let (code, body) = down_error(&p).await;
    // The heartbeat timeout (200 ms) + SCHEDULING_MARGIN, well below query_timeout.
    assert!(started.elapsed() < Duration::from_millis(200) + SCHEDULING_MARGIN, "no hang: {:?}", started.elapsed());
    assert_eq!(code, 502);
    assert!(body.contains("tls://"), "points to tls://: {body}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_ca_file_is_read_again_and_healthy_channels_stay() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let st = tokio::task::block_in_place(|| Stunnel::start(s.tcp_addr().unwrap(), &pki.server, None));
    let ca = pki.dir.path().join("site-ca.pem");
    // First the wrong CA: down.
    std::fs::copy(&pki.rogue_ca, &ca).unwrap();
    let p = proxy(st.address(), tls_params(&ca)).await;
    let (code, _) = down_error(&p).await;
    assert_eq!(code, 495);
    // The operator puts the right CA in place: livemux recovers on its own.
    std::fs::copy(&pki.ca, &ca).unwrap();
    p.wait_state("s1", SiteState::Ready).await;
    let before = eventually_snapshot(&p, "s1", "both channels open", |s| s.channels.len() == 2).await;
    let ids: Vec<u64> = before.channels.iter().map(|c| c.id).collect();
    // A CA change that would refuse the site touches no open channel:
    // queries keep being answered on the same channels.
    std::fs::copy(&pki.rogue_ca, &ca).unwrap();
    for _ in 0..20 {
        assert_eq!(query(&p, "s1", "GET status\nColumns: num_hosts").await, (200, "100\n".to_owned()));
    }
    let after = p.site("s1").snapshot(Duration::from_secs(1)).await.unwrap();
    assert_eq!(after.state, SiteState::Ready);
    assert_eq!(after.channels.iter().map(|c| c.id).collect::<Vec<_>>(), ids, "the same channels");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_resume_the_tls_session() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let st = tokio::task::block_in_place(|| Stunnel::start(s.tcp_addr().unwrap(), &pki.server, None));
    let p =
        proxy(st.address(), SiteParams { heartbeat_interval: Duration::from_secs(60), ..tls_params(&pki.ca) }).await;
    p.wait_state("s1", SiteState::Ready).await;
    // Both channels up and idle (their first heartbeats answered), and
    // stunnel connected onward for each: the site holds two idle connections.
    let first = eventually_snapshot(&p, "s1", "both channels idle", |snap| {
        snap.channels.len() == 2 && snap.channels.iter().all(|c| c.state == "idle")
    })
    .await
    .tls
    .unwrap();
    eventually("the site holds both connections", || s.open_peers().len() == 2).await;
    // The site drops its idle connections; stunnel closes ours; livemux reconnects.
    s.close_idle_connections();
    let before = first.handshakes_full + first.handshakes_resumed;
    let snap = eventually_snapshot(&p, "s1", "channels reconnected", |snap| {
        snap.tls.as_ref().is_some_and(|t| t.handshakes_full + t.handshakes_resumed >= before + 2)
    })
    .await;
    let tls = snap.tls.unwrap();
    assert!(tls.handshakes_resumed >= 1, "reconnects resume the session: {tls:?}");
    assert_eq!(query(&p, "s1", "GET status\nColumns: num_hosts").await, (200, "100\n".to_owned()));
    p.shutdown().await;
}

/// A proxy for a simulated site, with a TLS listener on a free port.
async fn tls_listener(pki: &Pki, s: &livemux_simsite::SimSite) -> (Proxy, std::net::SocketAddr) {
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let mut config = test_config(dir.path(), vec![("s1", s.address(), fast_params())]);
    config.sites[0].listen = Some(TcpListen {
        addr: "127.0.0.1:0".parse().unwrap(),
        only_from: vec![],
        tls: Some(livemux::config::ListenerTls::new(pki.server.cert.clone(), pki.server.key.clone())),
    });
    let p = Proxy::start_config(dir, config).await;
    p.wait_state("s1", SiteState::Ready).await;
    let addr = p.site("s1").listen_addr().unwrap();
    (p, addr)
}

/// A Rust TLS client that trusts the test CA.
async fn tls_client(
    pki: &Pki,
    addr: std::net::SocketAddr,
    rcvbuf: Option<u32>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = client_config(pki, None);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(n) = rcvbuf {
        socket.set_recv_buffer_size(n).unwrap();
    }
    let tcp = socket.connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_listener_serves_tls_clients_only() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let (p, addr) = tls_listener(&pki, &s).await;

    // A real client: openssl s_client.
    let ca = pki.ca.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new("openssl")
            .args(["s_client", "-quiet", "-verify_return_error", "-CAfile"])
            .arg(&ca)
            .args(["-connect", &addr.to_string(), "-servername", "localhost"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"GET status\nColumns: num_hosts num_services\n\n").unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "100;1000\n");

    // A Rust client with keep-alive.
    let mut c = tls_client(&pki, addr, None).await;
    for _ in 0..3 {
        c.write_all(b"GET hosts\nColumns: name\nLimit: 1\nKeepAlive: on\nResponseHeader: fixed16\n\n").await.unwrap();
        assert_eq!(read_answer(&mut c).await, (200, "host-0000\n".to_owned()));
    }

    // A plaintext client gets nothing.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET status\nColumns: num_hosts\nResponseHeader: fixed16\n\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, plain.read_to_end(&mut got)).await.expect("closed in time");
    assert!(!got.starts_with(b"200"), "no answer in plaintext");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keepalive_tls_client_reading_slowly_gets_every_byte() {
    // The end of an answer must not stay in the TLS layer's buffer (written
    // while the socket was full) while the session waits for the client's
    // next request.
    let pki = Pki::new();
    let s = sim("s1").await;
    let size: u64 = 8 << 20;
    s.set_knobs(|k| k.bulk_bytes = size);
    let (p, addr) = tls_listener(&pki, &s).await;
    let mut c = tls_client(&pki, addr, Some(32 * 1024)).await;
    for round in 0..10 {
        c.write_all(b"GET bulk\nKeepAlive: on\nResponseHeader: fixed16\n\n").await.unwrap();
        let mut raw = [0u8; 16];
        tokio::time::timeout(PATIENCE, c.read_exact(&mut raw)).await.unwrap().unwrap();
        assert_eq!(livemux_protocol::ResponseHeader::decode(&raw).unwrap().length, size);
        let mut check = livemux_simsite::bulk::Checker::new();
        let mut buf = vec![0u8; 32 * 1024];
        while check.len() < size {
            let want = ((size - check.len()) as usize).min(buf.len());
            let n = tokio::time::timeout(PATIENCE, c.read(&mut buf[..want]))
                .await
                .unwrap_or_else(|_| panic!("round {round}: stuck at {} of {size} bytes", check.len()))
                .unwrap();
            assert!(n > 0, "round {round}: closed at {}", check.len());
            check.update(&buf[..n]);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(check.is_complete(size), "round {round}: complete and exact");
    }
    p.shutdown().await;
}

// === mutual TLS on the listener (tls_client_ca, tls_client_names) ===

/// A Rust TLS client that trusts the test CA and presents `cert`, if any.
fn client_config(pki: &Pki, cert: Option<&Pair>) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&pki.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    std::sync::Arc::new(match cert {
        Some(p) => {
            let chain =
                rustls::pki_types::CertificateDer::pem_file_iter(&p.cert).unwrap().map(Result::unwrap).collect();
            builder
                .with_client_auth_cert(chain, rustls::pki_types::PrivateKeyDer::from_pem_file(&p.key).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    })
}

/// One `GET status` (fixed16, no keep-alive) over TLS as a client with
/// `cert`: every byte until the end, or the error that ended the exchange
/// (in TLS 1.3 the client's side of the handshake is done before the
/// server has looked at its certificate: a refusal arrives as an alert on
/// the first read).
async fn ask_as(pki: &Pki, addr: std::net::SocketAddr, cert: Option<&Pair>) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = tokio_rustls::TlsConnector::from(client_config(pki, cert)).connect(name, tcp).await?;
        c.write_all(b"GET status\nColumns: num_hosts num_services\nResponseHeader: fixed16\n\n").await?;
        let mut got = Vec::new();
        c.read_to_end(&mut got).await?;
        Ok(got)
    };
    tokio::time::timeout(PATIENCE, exchange).await.expect("the exchange ends in time")
}

/// The TLS alert that ended an exchange.
fn alert(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// What the simulated site answers `GET status` with, fixed16.
const STATUS_ANSWER: &[u8] = b"200           9\n100;1000\n";

/// The listener's address, from its "TCP listener ready" log line.
fn listener_addr(line: &str) -> std::net::SocketAddr {
    let at = line.find("addr=").unwrap_or_else(|| panic!("no addr= in {line:?}")) + "addr=".len();
    line[at..].split_whitespace().next().unwrap().trim_end_matches(':').parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_listener_refuses_clients_without_its_certificate_and_says_why_in_the_log() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let site = format!(
        "listen = \"127.0.0.1:0\"\ntls = {{ cert_file = \"{}\", key_file = \"{}\", tls_client_ca = \"{}\" }}\n",
        pki.server.cert.display(),
        pki.server.key.display(),
        pki.client_ca.display()
    );
    let mut p = tokio::task::block_in_place(|| {
        ProxyProcess::start_with_sites(dir.path(), "", "", &[("s1", s.address(), site.as_str())])
    });
    let addr = listener_addr(&tokio::task::block_in_place(|| p.log.find("TCP listener ready")));

    // No certificate, one from another CA, an expired one: each refused at
    // the handshake with the alert that fits, and not one byte of an answer.
    let refusals = [
        (None, rustls::AlertDescription::CertificateRequired),
        (Some(&pki.rogue_client), rustls::AlertDescription::UnknownCA),
        (Some(&pki.expired_client), rustls::AlertDescription::CertificateExpired),
    ];
    for (cert, expected) in refusals {
        let e = ask_as(&pki, addr, cert).await.expect_err("refused");
        assert_eq!(alert(&e), Some(expected), "{:?}: {e}", cert.map(|c| &c.cert));
    }
    // Each refusal says in words which certificate and why.
    let lines = tokio::task::block_in_place(|| {
        [
            p.log.find("it presented no certificate"),
            p.log.find("'CN=intruder' issued by 'CN=rogue CA'"),
            p.log.find("'CN=old-gui' issued by 'CN=client CA'"),
        ]
    });
    assert!(
        lines[0].contains(
            "TLS client refused: it presented no certificate, and this listener requires one signed by \
                           a CA of its tls_client_ca"
        ),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("it was issued by a CA that is not in tls_client_ca"), "{}", lines[1]);
    assert!(lines[2].contains("it expired at 2021-01-01T00:00:00Z (now is "), "{}", lines[2]);
    for l in &lines {
        assert!(l.contains("INFO") && l.contains("client{site=s1 peer=127.0.0.1:"), "level and client: {l}");
    }

    // A certificate the CA signed: served, byte for byte.
    assert_eq!(ask_as(&pki, addr, Some(&pki.client)).await.expect("served"), STATUS_ANSWER);
    // Its session's log lines name the certificate's subject.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut c =
        tokio_rustls::TlsConnector::from(client_config(&pki, Some(&pki.client))).connect(name, tcp).await.unwrap();
    c.write_all(b"GOT status\n\n").await.unwrap();
    let _ = tokio::time::timeout(PATIENCE, read_to_eof(&mut c)).await;
    let line = tokio::task::block_in_place(|| p.log.find("client request rejected"));
    assert!(line.contains("cert=livemux-central"), "{line}");
    tokio::task::block_in_place(|| p.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_names_refuse_a_good_certificate_with_another_name() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let site = format!(
        "listen = \"127.0.0.1:0\"\ntls = {{ cert_file = \"{}\", key_file = \"{}\", tls_client_ca = \"{}\", \
         tls_client_names = [\"thruk\", \"nagvis.example\"] }}\n",
        pki.server.cert.display(),
        pki.server.key.display(),
        pki.client_ca.display()
    );
    let mut p = tokio::task::block_in_place(|| {
        ProxyProcess::start_with_sites(dir.path(), "", "", &[("s1", s.address(), site.as_str())])
    });
    let addr = listener_addr(&tokio::task::block_in_place(|| p.log.find("TCP listener ready")));
    // Signed by the right CA, but for `livemux-central`: access denied.
    let e = ask_as(&pki, addr, Some(&pki.client)).await.expect_err("refused");
    assert_eq!(alert(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    let line = tokio::task::block_in_place(|| p.log.find("its name is not allowed here"));
    assert!(
        line.contains("TLS client refused: its certificate 'CN=livemux-central' issued by 'CN=client CA' (valid ")
            && line.contains(
                "its name is not allowed here: it names CN 'livemux-central', DNS 'localhost', and tls_client_names \
             allows 'thruk', 'nagvis.example'"
            ),
        "{line}"
    );
    // `thruk`, on the list: served.
    assert_eq!(ask_as(&pki, addr, Some(&pki.thruk_client)).await.expect("served"), STATUS_ANSWER);
    tokio::task::block_in_place(|| p.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_gives_the_listener_its_new_client_ca_in_place() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let mut config = test_config(dir.path(), vec![("s1", s.address(), fast_params())]);
    let tls = |ca: &std::path::Path| livemux::config::ListenerTls {
        client_ca: Some(ca.to_owned()),
        ..livemux::config::ListenerTls::new(pki.server.cert.clone(), pki.server.key.clone())
    };
    config.sites[0].listen =
        Some(TcpListen { addr: "127.0.0.1:0".parse().unwrap(), only_from: vec![], tls: Some(tls(&pki.client_ca)) });
    let mut p = Proxy::start_config(dir, config.clone()).await;
    p.wait_state("s1", SiteState::Ready).await;
    let addr = p.site("s1").listen_addr().unwrap();
    assert_eq!(ask_as(&pki, addr, Some(&pki.client)).await.expect("served"), STATUS_ANSWER);
    // A client connected before the reload keeps its session.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut kept =
        tokio_rustls::TlsConnector::from(client_config(&pki, Some(&pki.client))).connect(name, tcp).await.unwrap();
    kept.write_all(b"GET status\nColumns: num_hosts\nKeepAlive: on\nResponseHeader: fixed16\n\n").await.unwrap();
    assert_eq!(read_answer(&mut kept).await, (200, "100\n".to_owned()));

    // Now only the rogue CA's clients: on the same address, at once.
    let mut new = config.clone();
    new.sites[0].listen.as_mut().unwrap().tls = Some(tls(&pki.rogue_ca));
    let report = p.app.as_mut().unwrap().reload(new.clone()).await;
    assert_eq!(report.changed, ["s1"], "{report}");
    assert!(report.failed.is_empty() && report.reconnected.is_empty(), "{report}");
    p.config = new;
    assert_eq!(p.site("s1").listen_addr(), Some(addr), "not rebound");
    let e = ask_as(&pki, addr, Some(&pki.client)).await.expect_err("refused now");
    assert_eq!(alert(&e), Some(rustls::AlertDescription::UnknownCA), "{e}");
    assert_eq!(ask_as(&pki, addr, Some(&pki.rogue_client)).await.expect("served now"), STATUS_ANSWER);
    kept.write_all(b"GET status\nColumns: num_hosts\nKeepAlive: on\nResponseHeader: fixed16\n\n").await.unwrap();
    assert_eq!(read_answer(&mut kept).await, (200, "100\n".to_owned()), "the earlier client stays");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_s_listener_asks_for_client_certificates_too() {
    let pki = Pki::new();
    let s = sim("s1").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let mut config = test_config(dir.path(), vec![("s1", s.address(), fast_params())]);
    config.federations = vec![livemux::config::FederationConfig {
        name: "all".into(),
        sites: vec!["s1".into()],
        fail_on_site_error: false,
        listen: Some(TcpListen {
            addr: "127.0.0.1:0".parse().unwrap(),
            only_from: vec![],
            tls: Some(livemux::config::ListenerTls {
                client_ca: Some(pki.client_ca.clone()),
                client_names: vec!["thruk".into()],
                ..livemux::config::ListenerTls::new(pki.server.cert.clone(), pki.server.key.clone())
            }),
        }),
        dialect: livemux::config::Dialect::Livestatus,
        client: SiteParams::default(),
    }];
    let p = Proxy::start_config(dir, config).await;
    p.wait_state("s1", SiteState::Ready).await;
    let addr = p.app.as_ref().unwrap().federation_addr("all").unwrap();
    let e = ask_as(&pki, addr, None).await.expect_err("no certificate: refused");
    assert_eq!(alert(&e), Some(rustls::AlertDescription::CertificateRequired), "{e}");
    let e = ask_as(&pki, addr, Some(&pki.client)).await.expect_err("another name: refused");
    assert_eq!(alert(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    assert_eq!(ask_as(&pki, addr, Some(&pki.thruk_client)).await.expect("served"), STATUS_ANSWER);
    p.shutdown().await;
}

#[test]
fn check_config_loads_a_federation_listener_s_client_ca() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("livemux.toml");
    let missing = dir.path().join("no-such-ca.pem");
    std::fs::write(
        &config,
        format!(
            "socket_dir = \"/tmp/x\"\n[[site]]\nname = \"a\"\naddress = \"tcp://127.0.0.1:6557\"\n\
             [[federation]]\nname = \"all\"\nlisten = \"127.0.0.1:6560\"\n\
             tls = {{ cert_file = \"{}\", key_file = \"{}\", tls_client_ca = \"{}\" }}\n",
            pki.server.cert.display(),
            pki.server.key.display(),
            missing.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(crate::support::process::BIN)
        .args(["check-config", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("'all': tls_client_ca file {}: ", missing.display())), "{err}");
}
