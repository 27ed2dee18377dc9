//! The query cache (`Cache: reload`) and single-flight, against the
//! simulated site, which counts the queries it receives per table.

use crate::support::*;
use livemux::config::SiteParams;
use livemux::site::SiteState;
use livemux_simsite::bulk::Checker;
use tokio::io::AsyncWriteExt;

const GROUPS: &str = "GET hostgroups\nCache: reload\nColumns: name alias";

fn stats(p: &Proxy, site: &str) -> livemux::cache::CacheStats {
    p.app.as_ref().expect("running").cache_stats(site)
}

#[tokio::test]
async fn a_cache_reload_query_is_asked_once_and_then_answered_from_memory() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    let (code, first) = query(&p, "s1", GROUPS).await;
    assert_eq!(code, 200);
    assert!(first.contains("Group db"), "{first}");
    for _ in 0..3 {
        assert_eq!(query(&p, "s1", GROUPS).await, (200, first.clone()));
    }
    assert_eq!(s.queries_on("hostgroups"), 1, "one query reached the site");
    let st = stats(&p, "s1");
    assert_eq!((st.misses, st.hits, st.entries), (1, 3, 1));
    assert!(st.bytes > first.len() as u64);
    // The same answer the site gives directly, and the site never saw a `Cache:` header.
    let direct = direct_tcp(s.tcp_addr().unwrap(), "GET hostgroups\nColumns: name alias\n\n").await;
    assert_eq!(first.as_bytes(), &direct[..]);
    assert!(!s.requests().iter().any(|r| r.windows(6).any(|w| w == b"Cache:")), "header stripped");
    p.shutdown().await;
}

#[tokio::test]
async fn cached_and_uncached_answers_keep_their_order_on_one_keepalive_connection() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    let mut c = p.client("s1").await;
    let cached = format!("{GROUPS}\nKeepAlive: on\nResponseHeader: fixed16\n\n");
    let plain = "GET hosts\nColumns: name\nLimit: 2\nKeepAlive: on\nResponseHeader: fixed16\n\n";
    // All five pipelined in one write.
    c.write_all(format!("{cached}{plain}{cached}{plain}{cached}").as_bytes()).await.unwrap();
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(read_answer(&mut c).await);
    }
    let hosts = (200, "host-0000\nhost-0001\n".to_owned());
    assert_eq!(answers[1], hosts);
    assert_eq!(answers[3], hosts);
    assert_eq!(answers[0].0, 200);
    assert_eq!(answers[0], answers[2]);
    assert_eq!(answers[0], answers[4]);
    assert_eq!(s.queries_on("hostgroups"), 1);
    assert_eq!(s.queries_on("hosts"), 2, "uncached queries always go to the site");
    p.shutdown().await;
}

#[tokio::test]
async fn without_fixed16_a_cached_answer_is_the_bare_body_and_the_connection_closes() {
    let (p, _s) = Proxy::with_sim("s1", fast_params()).await;
    let (_, body) = query(&p, "s1", GROUPS).await;
    let mut c = p.client("s1").await;
    c.write_all(format!("{GROUPS}\n\n").as_bytes()).await.unwrap();
    assert_eq!(read_to_eof(&mut c).await, body.as_bytes());
    assert_eq!(stats(&p, "s1").hits, 1);
    p.shutdown().await;
}

#[tokio::test]
async fn the_key_separates_auth_users_and_output_formats() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    let variants = [
        "GET hostgroups\nColumns: name\nCache: reload",
        "GET hostgroups\nColumns: name\nAuthUser: alice\nCache: reload",
        "GET hostgroups\nColumns: name\nAuthUser: bob\nCache: reload",
        "GET hostgroups\nColumns: name\nOutputFormat: json\nCache: reload",
        "GET hostgroups\nCache: reload\nColumns: name\nOutputFormat: csv",
    ];
    let mut first = Vec::new();
    for v in variants {
        let (code, body) = query(&p, "s1", v).await;
        assert_eq!(code, 200, "{v}");
        first.push(body);
    }
    assert_eq!(s.queries_on("hostgroups"), 5, "each variant is its own entry");
    assert!(first[3].starts_with('['), "the json answer is json: {}", first[3]);
    assert!(!first[0].starts_with('['));
    for (v, body) in variants.iter().zip(&first) {
        assert_eq!(&query(&p, "s1", v).await.1, body, "{v}");
    }
    assert_eq!(s.queries_on("hostgroups"), 5, "the repeats were hits");
    let st = stats(&p, "s1");
    assert_eq!((st.misses, st.hits, st.entries), (5, 5, 5));
    // Sites are separate too (the daemon-wide cache is keyed per site).
    let s2 = sim("s2").await;
    let p2 = Proxy::start(vec![("a", s.address(), fast_params()), ("b", s2.address(), fast_params())]).await;
    p2.wait_state("a", SiteState::Ready).await;
    p2.wait_state("b", SiteState::Ready).await;
    let before = s.queries_on("hostgroups");
    query(&p2, "a", variants[0]).await;
    query(&p2, "b", variants[0]).await;
    query(&p2, "a", variants[0]).await;
    assert_eq!((s.queries_on("hostgroups") - before, s2.queries_on("hostgroups")), (1, 1));
    p2.shutdown().await;
    p.shutdown().await;
}

#[tokio::test]
async fn no_stale_answer_after_the_heartbeat_that_sees_a_new_program_start() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    let q = "GET status\nColumns: program_start\nCache: reload";
    let old = s.program_start();
    assert_eq!(query(&p, "s1", q).await, (200, format!("{old}\n")));
    assert_eq!(query(&p, "s1", q).await, (200, format!("{old}\n")), "cached");
    assert_eq!(stats(&p, "s1").hits, 1);
    // The core reloads; once a heartbeat has seen it, the old answer is gone.
    let new = old + 100;
    s.set_program_start(new);
    let h = p.site("s1");
    tokio::time::timeout(PATIENCE, h.wait_for(|st| st.program_start == Some(new as i64))).await.unwrap();
    assert_eq!(query(&p, "s1", q).await, (200, format!("{new}\n")));
    let st = stats(&p, "s1");
    assert_eq!((st.invalidations, st.misses, st.entries), (1, 2, 1));
    assert_eq!(query(&p, "s1", q).await, (200, format!("{new}\n")), "the fresh answer is cached again");
    p.shutdown().await;
}

#[tokio::test]
async fn a_reconnect_drops_the_sites_entries() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    let (_, body) = query(&p, "s1", GROUPS).await;
    assert_eq!(query(&p, "s1", GROUPS).await.1, body);
    assert_eq!(s.queries_on("hostgroups"), 1);
    let before = p.site("s1").status().program_start;
    s.stop();
    p.wait_state("s1", SiteState::Down).await;
    let (code, down) = query(&p, "s1", GROUPS).await;
    assert_eq!(code, 502, "a down site is not answered from the cache: {down}");
    s.restart().await.unwrap();
    p.wait_state("s1", SiteState::Ready).await;
    assert_eq!(p.site("s1").status().program_start, before, "same program_start: the reconnect alone counts");
    assert_eq!(query(&p, "s1", GROUPS).await, (200, body));
    assert_eq!(s.queries_on("hostgroups"), 2);
    assert_eq!(stats(&p, "s1").entries, 1);
    p.shutdown().await;
}

/// A proxy for one simulated site with a small cache.
async fn small_cache(budget: usize, max_entry: usize) -> (Proxy, livemux_simsite::SimSite) {
    let s = sim("s1").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let mut config = test_config(dir.path(), vec![("s1", s.address(), fast_params())]);
    config.cache_budget = budget;
    config.cache_max_entry = max_entry;
    let p = Proxy::start_config(dir, config).await;
    p.wait_state("s1", SiteState::Ready).await;
    (p, s)
}

fn hosts(limit: usize) -> String {
    format!("GET hosts\nColumns: name\nLimit: {limit}\nCache: reload")
}

#[tokio::test]
async fn the_byte_budget_evicts_least_recently_used_entries() {
    let budget = 2000;
    let (p, s) = small_cache(budget, 1 << 20).await;
    for n in 1..=20 {
        let (code, body) = query(&p, "s1", &hosts(n)).await;
        assert_eq!((code, body.lines().count()), (200, n));
    }
    let st = stats(&p, "s1");
    assert!(st.bytes <= budget as u64, "{st:?}");
    assert!(st.entries >= 2 && st.entries < 20, "{st:?}");
    assert_eq!(st.entries + st.evictions, 20, "{st:?}");
    assert_eq!(s.queries_on("hosts"), 20);
    // The newest is still there, the oldest was evicted.
    assert_eq!(query(&p, "s1", &hosts(20)).await.1.lines().count(), 20);
    assert_eq!(s.queries_on("hosts"), 20);
    assert_eq!(query(&p, "s1", &hosts(1)).await.1, "host-0000\n");
    assert_eq!(s.queries_on("hosts"), 21);
    assert!(stats(&p, "s1").bytes <= budget as u64);
    p.shutdown().await;
}

#[tokio::test]
async fn answers_over_the_entry_limit_and_errors_are_relayed_but_not_stored() {
    let (p, s) = small_cache(1 << 20, 200).await;
    let all = "GET hosts\nColumns: name\nCache: reload";
    let (code, body) = query(&p, "s1", all).await;
    assert_eq!((code, body.lines().count()), (200, 100), "complete, though too large to cache");
    assert_eq!(query(&p, "s1", all).await, (200, body));
    assert_eq!(s.queries_on("hosts"), 2);
    assert_eq!(query(&p, "s1", &hosts(2)).await.0, 200);
    assert_eq!(query(&p, "s1", &hosts(2)).await.0, 200);
    assert_eq!(s.queries_on("hosts"), 3, "a small answer is cached");
    let bad = "GET nosuchtable\nCache: reload";
    let (code, err) = query(&p, "s1", bad).await;
    assert_ne!(code, 200);
    assert_eq!(query(&p, "s1", bad).await, (code, err));
    assert_eq!(s.queries_on("nosuchtable"), 2, "errors are never cached");
    assert_eq!(stats(&p, "s1").entries, 1);
    p.shutdown().await;
}

#[tokio::test]
async fn with_cache_off_the_header_is_stripped_and_nothing_is_stored() {
    let params = SiteParams { cache: false, ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    let (code, body) = query(&p, "s1", GROUPS).await;
    assert_eq!(code, 200);
    assert_eq!(query(&p, "s1", GROUPS).await, (200, body));
    assert_eq!(s.queries_on("hostgroups"), 2);
    assert!(!s.requests().iter().any(|r| r.windows(6).any(|w| w == b"Cache:")), "header stripped");
    assert_eq!(stats(&p, "s1"), livemux::cache::CacheStats::default());
    p.shutdown().await;
}

/// Start `n` clients sending `q` (fixed16); their answers, in any order.
fn clients(p: &Proxy, n: usize, q: &str) -> tokio::task::JoinSet<(u16, Vec<u8>)> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let path = p.socket("s1");
        let request = format!("{q}\nResponseHeader: fixed16\n\n");
        set.spawn(async move {
            let mut c = tokio::net::UnixStream::connect(path).await.expect("connect");
            c.write_all(request.as_bytes()).await.expect("write");
            read_answer_bytes(&mut c).await
        });
    }
    set
}

#[tokio::test]
async fn a_hundred_identical_cacheable_queries_arriving_together_cost_the_site_one() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    let direct = direct_tcp(s.tcp_addr().unwrap(), "GET hostgroups\nColumns: name alias\n\n").await;
    // The site holds the first query until all hundred are in.
    s.set_knobs(|k| {
        k.hang = true;
        k.fault_table = Some("hostgroups".into());
    });
    let before = s.queries_on("hostgroups");
    let mut set = clients(&p, 100, GROUPS);
    eventually("99 queries wait for the first", || stats(&p, "s1").coalesced == 99).await;
    assert_eq!(s.queries_on("hostgroups") - before, 1);
    s.set_knobs(|k| k.hang = false);
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap(), (200, direct.clone()));
        n += 1;
    }
    assert_eq!(n, 100);
    assert_eq!(s.queries_on("hostgroups") - before, 1, "one query reached the site");
    let st = stats(&p, "s1");
    assert_eq!((st.misses, st.coalesced, st.entries), (1, 99, 1));
    p.shutdown().await;
}

#[tokio::test]
async fn waiting_queries_do_not_wait_for_a_slow_leading_client() {
    // The leading client's relay could only end at query_timeout; make that
    // longer than any wait here, so a waiter held by it would fail the test.
    let params = SiteParams { query_timeout: 2 * PATIENCE, ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    let size = 900 * 1024;
    s.set_knobs(|k| {
        k.bulk_bytes = size;
        k.hang = true;
        k.fault_table = Some("bulk".into());
    });
    let q = "GET bulk\nCache: reload\nResponseHeader: fixed16\n\n";
    // The first client asks and then reads nothing.
    let mut stalled = p.client("s1").await;
    stalled.write_all(q.as_bytes()).await.unwrap();
    eventually("the first query reached the site", || s.queries_on("bulk") == 1).await;
    let mut waiter = p.client("s1").await;
    waiter.write_all(q.as_bytes()).await.unwrap();
    eventually("the second waits for the first", || stats(&p, "s1").coalesced == 1).await;
    s.set_knobs(|k| k.hang = false);
    let (code, body) = read_answer_bytes(&mut waiter).await;
    assert_eq!(code, 200);
    let mut check = Checker::new();
    check.update(&body);
    assert!(check.is_complete(size), "complete and exact");
    assert_eq!(s.queries_on("bulk"), 1);
    // The stalled client still gets all of it when it reads.
    let (code, body) = read_answer_bytes(&mut stalled).await;
    assert_eq!((code, body.len() as u64), (200, size));
    p.shutdown().await;
}

#[tokio::test]
async fn coalescing_uncached_queries_is_a_per_site_option() {
    let q = "GET hostgroups\nColumns: name";
    for coalesce in [true, false] {
        let params = SiteParams { coalesce, channels: 3, channels_max: 3, ..fast_params() };
        let (p, s) = Proxy::with_sim("s1", params).await;
        s.set_knobs(|k| {
            k.hang = true;
            k.fault_table = Some("hostgroups".into());
        });
        let mut set = clients(&p, 3, q);
        if coalesce {
            eventually("two queries wait for the first", || stats(&p, "s1").coalesced == 2).await;
            assert_eq!(s.queries_on("hostgroups"), 1);
        } else {
            eventually("three queries reach the site", || s.queries_on("hostgroups") == 3).await;
        }
        s.set_knobs(|k| k.hang = false);
        while let Some(r) = set.join_next().await {
            let (code, body) = r.unwrap();
            assert_eq!(code, 200);
            assert!(String::from_utf8(body).unwrap().contains("db\n"));
        }
        let sent = s.queries_on("hostgroups");
        assert_eq!(query(&p, "s1", q).await.0, 200);
        assert_eq!(s.queries_on("hostgroups"), sent + 1, "uncached answers are shared, never stored");
        assert_eq!(stats(&p, "s1").entries, 0);
        p.shutdown().await;
    }
}

#[tokio::test]
async fn commands_are_never_coalesced() {
    let params = SiteParams { coalesce: true, ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    let cmd = "COMMAND [1700000000] SCHEDULE_FORCED_HOST_CHECK;host-0001;1700000000\n\n";
    let mut a = p.client("s1").await;
    let mut b = p.client("s1").await;
    a.write_all(cmd.as_bytes()).await.unwrap();
    b.write_all(cmd.as_bytes()).await.unwrap();
    eventually("both commands reached the site", || s.commands().len() == 2).await;
    p.shutdown().await;
}

#[tokio::test]
async fn the_state_file_shows_each_sites_cache() {
    let (p, _s) = Proxy::with_sim("s1", fast_params()).await;
    query(&p, "s1", GROUPS).await;
    query(&p, "s1", GROUPS).await;
    let path = p.config.state_file.clone();
    let mut json = serde_json::Value::Null;
    eventually("the state file shows a hit", || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        json["sites"][0]["cache"]["hits"] == 1
    })
    .await;
    let c = &json["sites"][0]["cache"];
    assert_eq!((c["entries"].as_u64(), c["misses"].as_u64(), c["evictions"].as_u64()), (Some(1), Some(1), Some(0)));
    assert!(c["bytes"].as_u64().unwrap() > 0);
    p.shutdown().await;
}
