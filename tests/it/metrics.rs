//! Prometheus metrics on `metrics_listen`: counts after known traffic, a
//! site going down and up, histogram buckets, bad HTTP requests, scrapes
//! under load, and the shipped Grafana dashboard and alerts.

use std::time::Duration;

use livemux::site::SiteState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// A proxy with metrics on a free port.
async fn proxy_with_metrics(sites: Vec<(&str, String)>) -> (Proxy, std::net::SocketAddr) {
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
    let list = sites.iter().map(|(n, a)| (*n, a.clone(), fast_params())).collect();
    let mut config = test_config(dir.path(), list);
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let p = Proxy::start_config(dir, config.clone()).await;
    for s in &config.sites {
        p.wait_state(&s.name, SiteState::Ready).await;
    }
    let addr = p.app.as_ref().and_then(|a| a.metrics_addr()).expect("metrics listener");
    (p, addr)
}

/// Send raw `request` bytes; the whole response (status line, headers, body).
async fn http(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await.expect("answer in time").expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let r = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("content-type: application/openmetrics-text"), "{r}");
    r.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

/// The value of the sample `name` (with its labels, as exposed).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

#[tokio::test]
async fn queries_are_counted_by_outcome_with_durations_and_the_site_state_follows() {
    let s = sim("mt1").await;
    let (p, addr) = proxy_with_metrics(vec![("mt1", s.address())]).await;
    for _ in 0..5 {
        let (code, _) = query(&p, "mt1", "GET hosts\nColumns: name").await;
        assert_eq!(code, 200);
    }
    let (code, _) = query(&p, "mt1", "GET hosts\nKeepAlive: maybe").await;
    assert_eq!(code, 400, "a request livemux refuses itself");
    let m = scrape(addr).await;
    let ok = r#"livemux_queries_total{site="mt1",outcome="ok"}"#;
    assert_eq!(sample(&m, ok), Some(5.0), "{m}");
    assert_eq!(sample(&m, r#"livemux_queries_total{site="mt1",outcome="bad_request"}"#), Some(1.0));
    assert_eq!(sample(&m, r#"livemux_queries_total{site="mt1",outcome="timeout"}"#), Some(0.0));
    assert_eq!(sample(&m, r#"livemux_query_duration_seconds_count{site="mt1"}"#), Some(6.0));
    // Sub-millisecond buckets exist, and the +Inf bucket holds all.
    assert!(m.contains(r#"livemux_query_duration_seconds_bucket{le="0.0001",site="mt1"}"#), "{m}");
    assert_eq!(sample(&m, r#"livemux_query_duration_seconds_bucket{le="+Inf",site="mt1"}"#), Some(6.0));
    assert_eq!(sample(&m, r#"livemux_channel_wait_seconds_count{site="mt1"}"#), Some(5.0));
    assert!(sample(&m, r#"livemux_site_received_bytes_total{site="mt1"}"#).is_some_and(|b| b > 0.0));
    assert_eq!(sample(&m, r#"livemux_site_up{site="mt1"}"#), Some(1.0));
    assert_eq!(sample(&m, r#"livemux_site_state{site="mt1",state="ready"}"#), Some(1.0));
    assert_eq!(sample(&m, r#"livemux_channels_max{site="mt1"}"#), Some(2.0));
    assert!(sample(&m, r#"livemux_heartbeat_rtt_seconds{site="mt1"}"#).is_some_and(|s| s > 0.0 && s < 1.0));
    assert!(sample(&m, "process_resident_memory_bytes").is_some_and(|b| b > 1e6));
    assert!(sample(&m, "process_open_fds").is_some_and(|n| n > 3.0));
    assert!(m.contains("livemux_build_info{version=\""), "{m}");
    assert!(m.trim_end().ends_with("# EOF"));
    let changes = sample(&m, r#"livemux_site_state_changes_total{site="mt1"}"#).expect("state changes");

    // Down: up 0, a query fails as a site error, one more state change.
    s.stop();
    p.wait_state("mt1", SiteState::Down).await;
    let (code, _) = query(&p, "mt1", "GET hosts\nColumns: name").await;
    assert_eq!(code, 502);
    let m = scrape(addr).await;
    assert_eq!(sample(&m, r#"livemux_site_up{site="mt1"}"#), Some(0.0));
    assert_eq!(sample(&m, r#"livemux_site_state{site="mt1",state="down"}"#), Some(1.0));
    assert_eq!(sample(&m, r#"livemux_queries_total{site="mt1",outcome="site_error"}"#), Some(1.0));
    assert_eq!(sample(&m, r#"livemux_site_state_changes_total{site="mt1"}"#), Some(changes + 1.0));
    // And up again.
    s.restart().await.expect("restart");
    p.wait_state("mt1", SiteState::Ready).await;
    let m = scrape(addr).await;
    assert_eq!(sample(&m, r#"livemux_site_up{site="mt1"}"#), Some(1.0));
    assert_eq!(sample(&m, r#"livemux_site_state_changes_total{site="mt1"}"#), Some(changes + 2.0));
    p.shutdown().await;
}

#[tokio::test]
async fn anything_but_get_metrics_is_a_404_and_an_oversized_request_is_refused() {
    let s = sim("mt2").await;
    let (p, addr) = proxy_with_metrics(vec![("mt2", s.address())]).await;
    for req in [
        &b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        b"GET /metrics/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ] {
        let r = http(addr, req).await;
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
    }
    let big = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "a".repeat(64 * 1024));
    let r = http(addr, big.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431") || r.is_empty(), "refused: {r}");
    // Not HTTP at all: the connection ends, the listener serves on.
    let r = http(addr, b"\x16\x03\x01 nonsense\r\n\r\n").await;
    assert!(!r.contains("200 OK"), "{r}");
    assert!(!scrape(addr).await.is_empty());
    p.shutdown().await;
}

#[tokio::test]
async fn concurrent_scrapes_under_load_are_all_answered_and_queries_are_unaffected() {
    let s = sim("mt3").await;
    let (p, addr) = proxy_with_metrics(vec![("mt3", s.address())]).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let path = p.socket("mt3");
        tasks.spawn(async move {
            let mut c = tokio::net::UnixStream::connect(path).await.expect("connect");
            for _ in 0..100 {
                let (code, body) =
                    ask(&mut c, "GET hosts\nColumns: name\nKeepAlive: on\nResponseHeader: fixed16\n\n").await;
                assert_eq!((code, body.lines().count()), (200, 100));
            }
        });
    }
    let mut scrapes = tokio::task::JoinSet::new();
    for _ in 0..8 {
        scrapes.spawn(async move {
            for _ in 0..5 {
                let m = scrape(addr).await;
                assert!(m.contains("livemux_site_up{site=\"mt3\"} 1"), "{m}");
            }
        });
    }
    while let Some(r) = scrapes.join_next().await {
        r.expect("scrape task");
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("client task");
    }
    let m = scrape(addr).await;
    assert_eq!(sample(&m, r#"livemux_queries_total{site="mt3",outcome="ok"}"#), Some(600.0));
    p.shutdown().await;
}

#[tokio::test]
async fn the_dashboard_and_alerts_use_only_metrics_that_exist() {
    let s = sim("mt4").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
    let mut config = test_config(dir.path(), vec![("mt4", s.address(), fast_params())]);
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    // With the inventory sync on, its metrics exist too.
    config.inventory = Some(livemux::config::InventoryConfig::new(dir.path().join("inventory")));
    let p = Proxy::start_config(dir, config).await;
    p.wait_state("mt4", SiteState::Ready).await;
    let addr = p.app.as_ref().and_then(|a| a.metrics_addr()).expect("metrics listener");
    let h = p.site("mt4");
    tokio::time::timeout(PATIENCE, async {
        while h.inventory_status().is_none_or(|s| s.last_sync.is_none()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a first inventory sync");
    let m = scrape(addr).await;
    let exposed: std::collections::HashSet<&str> =
        m.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    // Every sample name a family exposes (counters end in _total,
    // histograms in _bucket/_sum/_count).
    let known = |name: &str| {
        exposed.contains(name)
            || ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name.strip_suffix(suffix).is_some_and(|base| exposed.contains(base)))
    };
    let names_in = |text: &str| -> Vec<String> {
        let mut v = Vec::new();
        let b = text.as_bytes();
        let mut i = 0;
        while let Some(at) =
            text[i..].find("livemux_").map(|k| k + i).or_else(|| text[i..].find("process_").map(|k| k + i))
        {
            let end =
                b[at..].iter().position(|c| !(c.is_ascii_alphanumeric() || *c == b'_')).map_or(b.len(), |k| at + k);
            v.push(text[at..end].to_owned());
            i = end;
        }
        v
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!("{root}/dist/grafana-dashboard.json")).expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() >= 6), "panels");
    let alerts = std::fs::read_to_string(format!("{root}/dist/prometheus-alerts.yml")).expect("alerts");
    for (file, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        let names = names_in(text);
        assert!(!names.is_empty(), "{file} names metrics");
        for n in names {
            assert!(known(&n), "{file} uses {n}, which livemux does not expose");
        }
    }
    p.shutdown().await;
}

/// docs/METRICS.md names every family `/metrics` exposes (with every
/// feature on: `[inventory]` too), and only those (a counter is documented
/// with its `_total` samples' name).
#[tokio::test]
async fn the_metrics_reference_names_every_family_exposed_and_no_other() {
    let s = sim("mtdoc").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
    let mut config = test_config(dir.path(), vec![("mtdoc", s.address(), fast_params())]);
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.inventory = Some(livemux::config::InventoryConfig::new(dir.path().join("inventory")));
    let p = Proxy::start_config(dir, config).await;
    p.wait_state("mtdoc", SiteState::Ready).await;
    let addr = p.app.as_ref().and_then(|a| a.metrics_addr()).expect("metrics listener");
    // The last sync's time is there once a sync has ended.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut m = scrape(addr).await;
    while !m.contains("# TYPE livemux_inventory_last_sync_timestamp_seconds") {
        assert!(tokio::time::Instant::now() < deadline, "no inventory sync ended: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = scrape(addr).await;
    }
    let exposed: std::collections::BTreeSet<String> =
        m.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).map(str::to_owned).collect();
    assert!(exposed.len() > 20, "{m}");
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/METRICS.md")).expect("reference");
    let mut documented = std::collections::BTreeSet::new();
    for row in doc.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split(" | ").next().unwrap_or_default();
        for name in first.split('`').skip(1).step_by(2) {
            documented.insert(name.strip_suffix("_total").unwrap_or(name).to_owned());
        }
    }
    let undocumented: Vec<&String> = exposed.difference(&documented).collect();
    assert!(undocumented.is_empty(), "exposed but not in docs/METRICS.md: {undocumented:?}");
    let unknown: Vec<&String> = documented.difference(&exposed).collect();
    assert!(unknown.is_empty(), "in docs/METRICS.md but not exposed: {unknown:?}");
    p.shutdown().await;
}
