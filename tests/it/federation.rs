//! Federated sockets: one query, several sites, merged. Against simulated
//! sites of different sizes (faults) and, in `realpeers`, Icinga 2 and
//! Naemon side by side.

use std::collections::BTreeSet;

use livemux::config::FederationConfig;
use livemux::site::SiteState;
use livemux_simsite::SimSite;
use serde_json::Value;

use crate::support::*;

/// A proxy with a federation `all` over `sites`.
pub async fn federated(sites: Vec<(&str, String)>, budget: usize) -> Proxy {
    federated_with(sites, budget, |_| {}).await
}

/// [`federated`], with the federation's settings changed by `change`.
pub async fn federated_with(
    sites: Vec<(&str, String)>,
    budget: usize,
    change: impl FnOnce(&mut FederationConfig),
) -> Proxy {
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
    let list = sites.iter().map(|(n, a)| (*n, a.clone(), fast_params())).collect();
    let mut config = test_config(dir.path(), list);
    let mut fed = FederationConfig {
        name: "all".into(),
        sites: sites.iter().map(|(n, _)| (*n).to_owned()).collect(),
        fail_on_site_error: false,
        listen: None,
        dialect: livemux::config::Dialect::Livestatus,
        client: livemux::config::SiteParams::default(),
    };
    change(&mut fed);
    config.federations = vec![fed];
    config.federation_sort_budget = budget;
    let p = Proxy::start_config(dir, config.clone()).await;
    for s in &config.sites {
        p.wait_state(&s.name, SiteState::Ready).await;
    }
    p
}

/// Ask the federation (fixed16); status and body.
pub async fn fed(p: &Proxy, q: &str) -> (u16, String) {
    let mut c = tokio::net::UnixStream::connect(p.config.socket_path("all")).await.expect("connect");
    ask(&mut c, &format!("{q}\nResponseHeader: fixed16\n\n")).await
}

async fn three() -> (SimSite, SimSite, SimSite, Proxy) {
    let (a, b, c) = (sim("fa").await, sim("fb").await, sim("fc").await);
    a.with_dataset(|d| d.host_prefix = "a-".into());
    b.with_dataset(|d| {
        d.host_prefix = "b-".into();
        d.hosts = 30;
    });
    c.with_dataset(|d| {
        d.host_prefix = "c-".into();
        d.hosts = 7;
    });
    let p = federated(vec![("fa", a.address()), ("fb", b.address()), ("fc", c.address())], 64 << 20).await;
    (a, b, c, p)
}

fn json_rows(body: &str) -> Vec<Vec<Value>> {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn rows_are_the_union_with_the_site_column_and_sites_can_be_selected() {
    let (_a, _b, _c, p) = three().await;
    let (code, body) = fed(&p, "GET hosts\nColumns: site name\nOutputFormat: json").await;
    assert_eq!(code, 200, "{body}");
    let rows = json_rows(&body);
    assert_eq!(rows.len(), 100 + 30 + 7);
    let pairs: BTreeSet<(String, String)> =
        rows.iter().map(|r| (r[0].as_str().unwrap().to_owned(), r[1].as_str().unwrap().to_owned())).collect();
    assert!(pairs.contains(&("fa".into(), "a-0000".into())));
    assert!(pairs.contains(&("fb".into(), "b-0029".into())));
    assert!(pairs.contains(&("fc".into(), "c-0006".into())));
    assert!(pairs.iter().all(|(s, h)| h.starts_with(&s[1..])), "every row names its own site");

    let (_, body) = fed(&p, "GET hosts\nColumns: name\nSites: fb fc").await;
    assert_eq!(body.lines().count(), 37);
    let (_, body) = fed(&p, "GET hosts\nColumns: name\nFilter: site = fc").await;
    assert_eq!(body.lines().collect::<Vec<_>>(), (0..7).map(|i| format!("c-{i:04}")).collect::<Vec<_>>());
    let (_, body) = fed(&p, "GET hosts\nColumns: name\nBackends: fc\nLimit: 3\nOffset: 2").await;
    assert_eq!(body, "c-0002\nc-0003\nc-0004\n");
    p.shutdown().await;
}

/// The cases, as a client writes them: site tests under `Or`, `And`
/// and `Negate`, with other operators, and in `Stats`; each answer equals
/// the whole filter applied to the union (fa: 100 hosts a-*, fb: 30 b-*,
/// fc: 7 c-*; host i is DOWN when i % 50 == 49).
#[tokio::test]
async fn site_filters_work_under_and_or_negate_and_in_stats() {
    let (_a, _b, _c, p) = three().await;
    let names = |body: &str| -> BTreeSet<String> { body.lines().map(str::to_owned).collect() };
    let hosts = |prefix: &str, n: usize| -> BTreeSet<String> { (0..n).map(|i| format!("{prefix}-{i:04}")).collect() };
    let ask = |q: &'static str| {
        let p = &p;
        async move {
            let (code, body) = fed(p, &format!("GET hosts\nColumns: name\n{q}")).await;
            assert_eq!(code, 200, "{q}: {body}");
            body
        }
    };
    let or = ask("Filter: site = fb\nFilter: site = fc\nOr: 2").await;
    assert_eq!(names(&or), hosts("b", 30).union(&hosts("c", 7)).cloned().collect());
    let and = ask("Filter: state = 1\nFilter: site = fa\nAnd: 2").await;
    assert_eq!(names(&and), ["a-0049".to_owned(), "a-0099".to_owned()].into());
    let not = ask("Filter: site != fa").await;
    assert_eq!(names(&not).len(), 37);
    assert_eq!(ask("Filter: site ~ ^f[bc]$\nNegate:").await, ask("Filter: peer_key = fa").await);
    assert_eq!(names(&ask("Filter: peer_name ~~ FC").await), hosts("c", 7));
    // A site's own column under Or with a site test: fb whole, the others filtered.
    let mixed = ask("Filter: state = 1\nFilter: site = fb\nOr: 2").await;
    let mut want = hosts("b", 30);
    want.extend(["a-0049".to_owned(), "a-0099".to_owned()]);
    assert_eq!(names(&mixed), want);
    // A filter no site passes: an empty answer, not an error.
    assert_eq!(ask("Filter: site = nowhere").await, "");
    // Stats: per site counts through site tests, exactly.
    let (code, body) = fed(
        &p,
        "GET hosts\nStats: site = fa\nStats: site != fa\nStats: state = 1\nStats: site = fb\nStatsOr: 2\nOutputFormat: json",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json_rows(&body), vec![vec![Value::from(100), Value::from(37), Value::from(30 + 2)]]);
    p.shutdown().await;
}

#[tokio::test]
async fn stats_equal_the_statistics_of_the_union() {
    let (a, b, c, p) = three().await;
    // Direct answers, per site, of every service's state and latency.
    let mut states = Vec::new();
    for s in [&a, &b, &c] {
        let body =
            direct_tcp(s.tcp_addr().unwrap(), "GET services\nColumns: state latency\nOutputFormat: json\n\n").await;
        let rows: Vec<Vec<Value>> = serde_json::from_slice(&body).unwrap();
        states.extend(rows.into_iter().map(|r| (r[0].as_i64().unwrap(), r[1].as_f64().unwrap())));
    }
    let q = "GET services\nStats: state = 0\nStats: state = 2\nStats: sum latency\nStats: min latency\nStats: max latency\nStats: avg latency\nStats: state = 1\nStats: state = 3\nStatsOr: 2\nOutputFormat: json";
    let (code, body) = fed(&p, q).await;
    assert_eq!(code, 200, "{body}");
    let row = &json_rows(&body)[0];
    let n = states.len() as f64;
    let sum: f64 = states.iter().map(|s| s.1).sum();
    let count = |k: i64| states.iter().filter(|s| s.0 == k).count() as f64;
    let want = [
        count(0),
        count(2),
        sum,
        states.iter().map(|s| s.1).fold(f64::INFINITY, f64::min),
        states.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max),
        sum / n,
        count(1) + count(3),
    ];
    for (i, w) in want.iter().enumerate() {
        let got = row[i].as_f64().unwrap();
        assert!((got - w).abs() < 1e-6, "stat {i}: {got} vs {w}: {body}");
    }
    // Grouped: one row per state over all sites.
    let (_, body) = fed(&p, "GET services\nColumns: state\nStats: state >= 0\nOutputFormat: json").await;
    let grouped: Vec<(i64, f64)> = json_rows(&body)
        .into_iter()
        .map(|r| (r[0].as_str().and_then(|s| s.parse().ok()).or(r[0].as_i64()).unwrap(), r[1].as_f64().unwrap()))
        .collect();
    for (state, n) in grouped {
        assert_eq!(n, count(state), "state {state}");
    }
    p.shutdown().await;
}

#[tokio::test]
async fn sort_limit_every_format_and_a_sort_over_budget() {
    let (_a, _b, _c, p) = three().await;
    let (_, body) = fed(&p, "GET hosts\nColumns: name site\nSort: name desc\nLimit: 3\nOutputFormat: json").await;
    let rows = json_rows(&body);
    assert_eq!(rows.iter().map(|r| r[0].as_str().unwrap()).collect::<Vec<_>>(), ["c-0006", "c-0005", "c-0004"]);
    // By a column the client did not ask to see.
    let (_, body) = fed(&p, "GET hosts\nColumns: name\nSort: latency desc\nSort: name asc\nLimit: 2").await;
    assert_eq!(body, "a-0099\na-0098\n");
    for (format, check) in
        [("csv", "csv"), ("json", "json"), ("python", "python"), ("python3", "python3"), ("wrapped_json", "wrapped")]
    {
        let (code, body) =
            fed(&p, &format!("GET hosts\nColumns: name site\nFilter: site = fc\nOutputFormat: {format}")).await;
        assert_eq!(code, 200);
        match check {
            "csv" => assert_eq!(body.lines().next(), Some("c-0000;fc")),
            "json" => assert_eq!(json_rows(&body).len(), 7),
            "wrapped" => {
                let v: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["total_count"], 7);
                assert_eq!(v["data"][0], serde_json::json!(["c-0000", "fc"]));
                assert!(v.get("columns").is_none() && v["failed"] == serde_json::json!({}), "{body}");
                let q = "GET hosts\nColumns: name site\nBackends: fc\nOutputFormat: wrapped_json\nColumnHeaders: on";
                let (_, body) = fed(&p, q).await;
                let v: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["columns"], serde_json::json!(["name", "site"]));
            }
            _ => assert!(body.starts_with("[[") && body.contains("\"c-0000\"") && body.ends_with("]]\n"), "{body}"),
        }
    }
    p.shutdown().await;
    let (a, b) = (sim("fd").await, sim("fe").await);
    let p = federated(vec![("fd", a.address()), ("fe", b.address())], 4096).await;
    let (code, body) = fed(&p, "GET hosts\nColumns: name alias\nSort: name asc").await;
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("federation_sort_budget"), "{body}");
    p.shutdown().await;
}

#[tokio::test]
async fn a_stopped_site_gives_a_partial_answer_naming_it_and_all_stopped_is_an_error() {
    let (a, b) = (sim("ff").await, sim("fg").await);
    let p = federated(vec![("ff", a.address()), ("fg", b.address())], 64 << 20).await;
    b.stop();
    p.wait_state("fg", SiteState::Down).await;
    let (code, body) = fed(&p, "GET hosts\nColumns: name site\nOutputFormat: wrapped_json").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 100);
    assert!(v["failed"]["fg"].as_str().is_some_and(|w| w.contains("down")), "{body}");
    // The state file names it too.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let entry = loop {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p.config.state_file).unwrap_or_default())
            .unwrap_or_default();
        if v["federations"][0]["partial_answers"] == 1 {
            break v["federations"][0].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no partial answer in the state file: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(entry["name"], "all");
    assert!(entry["last_partial"]["sites"]["fg"].is_string(), "{entry}");
    a.stop();
    p.wait_state("ff", SiteState::Down).await;
    let (code, body) = fed(&p, "GET hosts\nColumns: name").await;
    assert_eq!(code, 502);
    assert!(body.contains("ff:") && body.contains("fg:"), "{body}");
    // In wrapped_json (LMD's, Thruk's) every site down is a 200 whose
    // `failed` names them all: Thruk marks each backend down from it.
    let (code, body) = fed(&p, "GET hosts\nColumns: name\nOutputFormat: wrapped_json").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["data"].as_array().map(Vec::len), v["total_count"].as_u64()), (Some(0), Some(0)), "{body}");
    assert!(v["failed"]["ff"].is_string() && v["failed"]["fg"].is_string(), "{body}");
    // The sites table shows them down, with the reason.
    let (code, body) = fed(&p, "GET sites\nColumns: key status last_error\nOutputFormat: json").await;
    assert_eq!(code, 200, "{body}");
    for row in json_rows(&body) {
        assert_eq!(row[1], 2, "{body}");
        assert!(row[2].as_str().is_some_and(|e| e.contains("down") || e.contains("connect")), "{body}");
    }
    p.shutdown().await;
}

/// LMD's `Backends:`: a key the federation lacks is reported in `failed`
/// in LMD's words, the others answer; only unknown keys are an error in
/// plain json (502) and an empty answer with `failed` in wrapped_json.
#[tokio::test]
async fn backends_naming_an_unknown_site_report_it_as_lmd_does() {
    let (_a, _b, _c, p) = three().await;
    let (code, body) = fed(&p, "GET hosts\nColumns: name\nBackends: fc nosuch\nOutputFormat: wrapped_json").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"].as_array().map(Vec::len), Some(7), "{body}");
    assert_eq!(v["failed"], serde_json::json!({"nosuch": "bad request: backend nosuch does not exist"}));
    assert_eq!(v["total_count"], 7);
    let (code, body) = fed(&p, "GET hosts\nColumns: name\nBackends: nosuch\nOutputFormat: json").await;
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("bad request: backend nosuch does not exist"), "{body}");
    let (code, body) = fed(&p, "GET hosts\nColumns: name\nBackends: nosuch\nOutputFormat: wrapped_json").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["data"].as_array().map(Vec::len), v["failed"]["nosuch"].is_string()), (Some(0), true));
    // An empty Backends: means every site.
    let (_, body) = fed(&p, "GET hosts\nColumns: name\nBackends:").await;
    assert_eq!(body.lines().count(), 137);
    p.shutdown().await;
}

/// LMD's virtual `sites` table, as Thruk's `get_sites` asks for it: one row
/// per site from livemux's live state, the key equal to `peer_key` and to
/// `Backends:`, unknown columns `""`, `Backends:`, filters and sort applied.
#[tokio::test]
async fn the_sites_table_lists_the_federation_s_sites_as_lmd_does() {
    let (_a, _b, c, p) = three().await;
    let cols = "peer_key peer_name key name addr status bytes_send bytes_received queries last_error last_update \
                last_online response_time idling last_query parent section lmd_last_cache_update federation_key \
                federation_name federation_addr federation_type federation_version";
    let (code, body) = fed(&p, &format!("GET sites\nColumns: {cols}\nOutputFormat: json")).await;
    assert_eq!(code, 200, "{body}");
    let rows = json_rows(&body);
    assert_eq!(rows.iter().map(|r| r[2].as_str().unwrap()).collect::<Vec<_>>(), ["fa", "fb", "fc"]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    for r in &rows {
        assert!(r[0] == r[2] && r[1] == r[3] && r[0] == r[1], "key, name, peer_key, peer_name: {r:?}");
        assert!(r[4].as_str().is_some_and(|a| a.starts_with("tcp://")), "addr: {r:?}");
        assert_eq!((r[5].as_i64(), r[9].as_str()), (Some(0), Some("")), "up, no error: {r:?}");
        assert!(r[10].as_u64().is_some_and(|t| t + 5 >= now), "last_update is now: {r:?}");
        assert!(r[12].as_f64().is_some_and(|s| s > 0.0 && s < 1.0), "response_time in seconds: {r:?}");
        assert_eq!((r[15].as_str(), r[16].as_str(), r[17].as_str()), (Some(""), Some(""), Some("")), "{r:?}");
        assert_eq!(r[18], serde_json::json!([]), "federation_key: {r:?}");
    }
    // Backends:, a filter and a sort apply; without Columns every column and a header row.
    let (_, body) = fed(&p, "GET sites\nColumns: key\nBackends: fb fc\nSort: key desc\nOutputFormat: json").await;
    assert_eq!(json_rows(&body), vec![vec![Value::from("fc")], vec![Value::from("fb")]]);
    let (_, body) = fed(&p, "GET backends\nColumns: key\nFilter: name ~ ^f[ab]\nOutputFormat: json").await;
    assert_eq!(json_rows(&body).len(), 2, "{body}");
    let (_, body) = fed(&p, "GET sites\nOutputFormat: json").await;
    let all = json_rows(&body);
    assert_eq!((all.len(), all[0][2].as_str()), (4, Some("key")), "header row, then the sites: {body}");
    // A stopped site: status 2, its reason, and left out of `Filter: status = 0`.
    c.stop();
    p.wait_state("fc", SiteState::Down).await;
    let (_, body) = fed(&p, "GET sites\nColumns: key status last_error\nBackends: fc\nOutputFormat: json").await;
    let row = &json_rows(&body)[0];
    assert_eq!(row[1], 2, "{body}");
    assert!(row[2].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    let (_, body) = fed(&p, "GET sites\nColumns: key\nFilter: status = 0\nOutputFormat: wrapped_json").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"], serde_json::json!([["fa"], ["fb"]]), "{body}");
    p.shutdown().await;
}

#[tokio::test]
async fn with_on_site_error_fail_one_failed_site_fails_the_query() {
    let (a, b) = (sim("fl").await, sim("fm").await);
    let p =
        federated_with(vec![("fl", a.address()), ("fm", b.address())], 64 << 20, |f| f.fail_on_site_error = true).await;
    let (code, _) = fed(&p, "GET hosts\nColumns: name").await;
    assert_eq!(code, 200);
    b.stop();
    p.wait_state("fm", SiteState::Down).await;
    let (code, body) = fed(&p, "GET hosts\nColumns: name").await;
    assert_eq!(code, 502);
    assert!(body.starts_with("federated query failed on fm:"), "{body}");
    p.shutdown().await;
}

#[tokio::test]
async fn without_fixed16_rows_stream_as_the_sites_answer_and_the_connection_ends() {
    let (_a, _b, _c, p) = three().await;
    let mut c = tokio::net::UnixStream::connect(p.config.socket_path("all")).await.expect("connect");
    use tokio::io::AsyncWriteExt;
    c.write_all(b"GET hosts\nColumns: name site\nOutputFormat: json\n\n").await.expect("send");
    let body = read_to_eof(&mut c).await;
    let rows = json_rows(&String::from_utf8_lossy(&body));
    assert_eq!(rows.len(), 137);
    // csv too, every row complete.
    let mut c = tokio::net::UnixStream::connect(p.config.socket_path("all")).await.expect("connect");
    c.write_all(b"GET hosts\nColumns: name site\n\n").await.expect("send");
    let body = String::from_utf8(read_to_eof(&mut c).await).expect("utf-8");
    assert_eq!(body.lines().count(), 137);
    assert!(body.lines().all(|l| l.split(';').count() == 2), "{body}");
    p.shutdown().await;
}

#[tokio::test]
async fn a_command_goes_to_every_site() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, b) = (sim("fh").await, sim("fi").await);
    let p = federated(vec![("fh", a.address()), ("fi", b.address())], 64 << 20).await;
    let cmd = "COMMAND [1700000000] PROCESS_HOST_CHECK_RESULT;host-0001;1;federated";
    let mut c = tokio::net::UnixStream::connect(p.config.socket_path("all")).await.expect("connect");
    let (code, _) = ask(&mut c, &format!("{cmd}\nResponseHeader: fixed16\n\n")).await;
    assert_eq!(code, 200);
    assert_eq!(a.commands(), vec![cmd.to_owned()]);
    assert_eq!(b.commands(), vec![cmd.to_owned()]);
    let (_, body) = fed(&p, "GET hosts\nColumns: site state plugin_output\nFilter: name = host-0001").await;
    assert_eq!(body.lines().collect::<BTreeSet<_>>(), ["fh;1;federated", "fi;1;federated"].into());
    // As Thruk sends them: several COMMAND blocks on one connection, each
    // with its own `Backends:`, no framing; an unknown backend is a
    // `502:` line.
    let one = "COMMAND [1700000001] PROCESS_HOST_CHECK_RESULT;host-0002;1;only fi";
    let two = "COMMAND [1700000002] PROCESS_HOST_CHECK_RESULT;host-0003;1;both";
    let mut c = tokio::net::UnixStream::connect(p.config.socket_path("all")).await.expect("connect");
    c.write_all(format!("{one}\nBackends: fi\n\n{two}\nBackends: fh fi\n\n").as_bytes()).await.expect("send");
    c.shutdown().await.expect("half-close, as Thruk does");
    let mut reply = String::new();
    tokio::time::timeout(PATIENCE, c.read_to_string(&mut reply)).await.expect("closed").expect("read");
    assert_eq!(reply, "", "silence is success");
    assert_eq!(a.commands(), vec![cmd.to_owned(), two.to_owned()]);
    assert_eq!(b.commands(), vec![cmd.to_owned(), one.to_owned(), two.to_owned()]);
    let mut c = tokio::net::UnixStream::connect(p.config.socket_path("all")).await.expect("connect");
    c.write_all(format!("{one}\nBackends: nosuch\n\n").as_bytes()).await.expect("send");
    c.shutdown().await.expect("half-close");
    let mut reply = String::new();
    tokio::time::timeout(PATIENCE, c.read_to_string(&mut reply)).await.expect("closed").expect("read");
    assert_eq!(reply, "502: COMMAND failed on: nosuch: bad request: backend nosuch does not exist\n");
    assert_eq!(b.commands().len(), 3, "sent nowhere");
    p.shutdown().await;
}

#[tokio::test]
async fn a_federation_may_listen_on_tcp_for_the_addresses_it_allows() {
    let (a, b) = (sim("fj").await, sim("fk").await);
    let listen = livemux::config::TcpListen {
        addr: "127.0.0.1:0".parse().unwrap(),
        only_from: vec!["127.0.0.1/32".parse().unwrap()],
        tls: None,
    };
    let p = federated_with(vec![("fj", a.address()), ("fk", b.address())], 64 << 20, |f| f.listen = Some(listen)).await;
    let addr = p.app.as_ref().and_then(|a| a.federation_addr("all")).expect("TCP listener");
    let body = direct_tcp(addr, "GET hosts\nColumns: site name\nLimit: 3\n\n").await;
    assert_eq!(String::from_utf8_lossy(&body).lines().count(), 3);
    let body = direct_tcp(addr, "GET status\nColumns: site num_hosts\n\n").await;
    let lines: BTreeSet<String> = String::from_utf8_lossy(&body).lines().map(str::to_owned).collect();
    assert_eq!(lines, ["fj;100".to_owned(), "fk;100".to_owned()].into());
    p.shutdown().await;
}

#[tokio::test]
async fn cache_reload_queries_are_answered_from_each_sites_cache() {
    let (a, b) = (sim("fn").await, sim("fo").await);
    let p = federated(vec![("fn", a.address()), ("fo", b.address())], 64 << 20).await;
    let q = "GET hosts\nColumns: site name\nCache: reload\nOutputFormat: json";
    let (code, first) = fed(&p, q).await;
    assert_eq!(code, 200, "{first}");
    let asked = (a.queries_on("hosts"), b.queries_on("hosts"));
    assert_eq!(asked, (1, 1));
    let (code, second) = fed(&p, q).await;
    assert_eq!(code, 200);
    assert_eq!(second, first, "the same answer");
    assert_eq!((a.queries_on("hosts"), b.queries_on("hosts")), asked, "from the cache: no site asked again");
    // A core reload makes the answers fresh, as for a site's socket.
    a.set_program_start(a.program_start() + 10);
    let h = p.site("fn");
    let ps = h.status().program_start;
    tokio::time::timeout(PATIENCE, h.wait_for(|s| s.program_start != ps)).await.expect("program_start seen");
    let (_, _) = fed(&p, q).await;
    assert_eq!((a.queries_on("hosts"), b.queries_on("hosts")), (2, 1));
    // Without the header every query goes to the sites.
    let (_, _) = fed(&p, "GET hosts\nColumns: site name\nOutputFormat: json").await;
    assert_eq!((a.queries_on("hosts"), b.queries_on("hosts")), (3, 2));
    p.shutdown().await;
}

/// Thruk's pager: `total_count` is every matching row of the union before
/// `Offset` and `Limit`, with and without `Sort` (a status page sorts, a
/// plain list need not), while `data` holds only the page.
#[tokio::test]
async fn total_count_counts_every_matching_row_before_offset_and_limit() {
    let (_a, _b, _c, p) = three().await;
    for q in [
        "GET hosts\nColumns: name\nSort: name desc\nOffset: 10\nLimit: 5\nOutputFormat: wrapped_json",
        "GET hosts\nColumns: name\nOffset: 10\nLimit: 5\nOutputFormat: wrapped_json",
        "GET hosts\nColumns: name\nFilter: state = 0\nLimit: 3\nOutputFormat: wrapped_json",
    ] {
        let (code, body) = fed(&p, q).await;
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        // (fa's hosts 49 and 99 are DOWN.)
        let want_total = if q.contains("state = 0") { 135 } else { 137 };
        assert_eq!(v["total_count"], want_total, "{q}: {body}");
        let page = v["data"].as_array().map(Vec::len);
        assert_eq!(page, Some(if q.contains("Limit: 3") { 3 } else { 5 }), "{q}");
    }
    let (_, body) =
        fed(&p, "GET hosts\nColumns: name\nSort: name desc\nOffset: 10\nLimit: 2\nOutputFormat: wrapped_json").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    // c-0006 … c-0000, b-0029 … b-0027 skipped.
    assert_eq!(v["data"], serde_json::json!([["b-0026"], ["b-0025"]]), "sorted, then the page: {body}");
    p.shutdown().await;
}

/// LMD's dialect (`dialect = "lmd"`): a column a site lacks answers `""`
/// from that site (Thruk asks for LMD-only and core-specific columns), in
/// every way the rows are merged; the site is asked once without it, and
/// from then on directly. A filter on such a column stays the site's error.
/// In plain Livestatus the same query is the sites' error.
#[tokio::test]
async fn in_lmd_s_dialect_a_column_a_site_lacks_answers_empty() {
    let (a, b) = (sim("fl").await, sim("fm").await);
    a.with_dataset(|d| d.host_prefix = "a-".into());
    b.with_dataset(|d| {
        d.host_prefix = "b-".into();
        d.hosts = 30;
    });
    let sites = vec![("fl", a.address()), ("fm", b.address())];
    let p = federated_with(sites.clone(), 64 << 20, |f| f.dialect = livemux::config::Dialect::Lmd).await;
    let (code, body) = fed(&p, "GET hosts\nColumns: name depends_exec state\nOutputFormat: json").await;
    assert_eq!(code, 200, "{body}");
    let rows = json_rows(&body);
    assert_eq!(rows.len(), 130, "{body}");
    assert!(rows.iter().all(|r| r.len() == 3 && r[1] == "" && r[2].is_number()), "{body}");
    assert_eq!((a.queries_on("hosts"), b.queries_on("hosts")), (2, 2), "asked, then asked without the column");
    let (code, body) = fed(&p, "GET hosts\nColumns: name depends_exec\nFilter: name = b-0003").await;
    assert_eq!((code, body.as_str()), (200, "b-0003;\n"));
    assert_eq!((a.queries_on("hosts"), b.queries_on("hosts")), (3, 3), "known now: asked without it at once");
    let q = "GET hosts\nColumns: depends_exec name\nSort: depends_exec asc\nSort: name desc\nLimit: 3\n\
             OutputFormat: wrapped_json";
    let (code, body) = fed(&p, q).await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"], serde_json::json!([["", "b-0029"], ["", "b-0028"], ["", "b-0027"]]), "{body}");
    assert_eq!(v["total_count"], 130, "{body}");
    let (code, body) = fed(&p, "GET hosts\nColumns: name\nFilter: depends_exec = x\nOutputFormat: json").await;
    assert_eq!(code, 502, "a filter on it stays the sites' error: {body}");
    assert!(body.contains("has no column 'depends_exec'"), "{body}");
    p.shutdown().await;

    let p = federated(sites, 64 << 20).await;
    let (code, body) = fed(&p, "GET hosts\nColumns: name depends_exec state\nOutputFormat: json").await;
    assert_eq!(code, 502, "plain Livestatus: {body}");
    assert!(body.contains("fl: 400 Table 'hosts' has no column 'depends_exec'"), "{body}");
    p.shutdown().await;
}
