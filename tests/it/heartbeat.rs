//! Heartbeats and dead sites: detection, instant errors, recovery on its own.

use std::time::Duration;

use crate::support::*;
use livemux::config::SiteParams;
use livemux::site::SiteState;

#[tokio::test]
async fn a_hung_core_is_detected_by_the_heartbeat_and_recovers_on_its_own() {
    let params = SiteParams { channel_timeout: Duration::from_secs(10), ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    s.set_knobs(|k| k.hang = true);
    p.wait_state("s1", SiteState::Down).await;

    // Every query is answered at once (not after channel_timeout) with the
    // site's name and the last failure.
    let started = tokio::time::Instant::now();
    let (code, body) = query(&p, "s1", "GET hosts\nColumns: name").await;
    // Well below channel_timeout (10 s), which a query would wait for if the
    // proxy did not know the site is down.
    assert!(started.elapsed() < Duration::from_secs(5), "answered without waiting for a channel");
    assert_eq!(code, 502);
    assert_eq!(body, "site 's1' is down: heartbeat not answered within 200ms\n");

    s.set_knobs(|k| k.hang = false);
    p.wait_state("s1", SiteState::Ready).await;
    let (code, _) = query(&p, "s1", "GET hosts\nColumns: name\nLimit: 1").await;
    assert_eq!(code, 200);
    p.shutdown().await;
}

#[tokio::test]
async fn a_stopped_site_fails_fast_others_are_unaffected_and_it_heals() {
    let a = sim("a").await;
    let b = sim("b").await;
    let p = Proxy::start(vec![("a", a.address(), fast_params()), ("b", b.address(), fast_params())]).await;
    p.wait_state("a", SiteState::Ready).await;
    p.wait_state("b", SiteState::Ready).await;

    a.stop();
    p.wait_state("a", SiteState::Down).await;
    let (code, body) = query(&p, "a", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 502);
    // The first failure seen may be a connection the stopping site still
    // accepted and closed; from the next reconnect on, the refused connect.
    assert!(
        body.starts_with("site 'a' is down: cannot connect to ")
            || body == "site 'a' is down: the site closed the connection without answering\n",
        "{body}"
    );
    let refused = format!("cannot connect to {}", a.address());
    eventually_snapshot(&p, "a", "the refused reconnect recorded", |snap| {
        snap.last_error.as_deref().is_some_and(|e| e.starts_with(&refused))
    })
    .await;
    let (code, body) = query(&p, "a", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 502);
    assert!(body.starts_with(&format!("site 'a' is down: {refused}")), "{body}");
    let (code, body) = query(&p, "b", "GET status\nColumns: num_hosts").await;
    assert_eq!((code, body.as_str()), (200, "100\n"));

    let snap = p.site("a").snapshot(Duration::from_secs(1)).await.unwrap();
    assert_eq!(snap.state, SiteState::Down);
    assert!(snap.last_failed_connect.is_some());
    assert!(snap.channels.is_empty(), "all channels closed: {:?}", snap.channels);

    a.restart().await.unwrap();
    p.wait_state("a", SiteState::Ready).await;
    let (code, body) = query(&p, "a", "GET status\nColumns: num_hosts").await;
    assert_eq!((code, body.as_str()), (200, "100\n"));
    assert_eq!(p.site("b").status().generation, 0, "b never went down");
    p.shutdown().await;
}

#[tokio::test]
async fn program_start_changes_are_seen_by_the_next_heartbeat() {
    let (p, s) = Proxy::with_sim("s1", fast_params()).await;
    let h = p.site("s1");
    assert_eq!(h.status().program_start, Some(s.program_start() as i64));
    s.set_program_start(1_234_567);
    let st = tokio::time::timeout(PATIENCE, h.wait_for(|st| st.program_start == Some(1_234_567))).await.unwrap();
    assert_eq!(st.state, SiteState::Ready);
    p.shutdown().await;
}

#[tokio::test]
async fn a_site_busy_with_slow_but_progressing_answers_is_not_declared_dead() {
    let params = SiteParams { channels: 1, channels_max: 1, ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    // 64 KiB in 1 KiB pieces every 40 ms: about 2.5 s, far longer than
    // heartbeat interval + timeout (500 ms), with bytes flowing all along.
    let size = 64 * 1024;
    s.set_knobs(|k| {
        k.bulk_bytes = size;
        k.write_chunk = 1024;
        k.write_pause = Duration::from_millis(40);
        k.fault_table = Some("bulk".into());
    });
    let connections = s.stats().accepted;
    let (code, body) = query(&p, "s1", "GET bulk").await;
    assert_eq!(code, 200);
    let mut check = livemux_simsite::bulk::Checker::new();
    check.update(body.as_bytes());
    assert!(check.is_complete(size), "complete and exact");
    let st = p.site("s1").status();
    assert_eq!((st.state, st.generation), (SiteState::Ready, 0), "never declared down");
    assert_eq!(s.stats().accepted, connections, "bytes kept flowing: no extra heartbeat connection needed");
    p.shutdown().await;
}

#[tokio::test]
async fn a_busy_but_silent_site_is_checked_on_an_extra_connection() {
    let params = SiteParams { channels: 1, channels_max: 1, channel_timeout: Duration::from_secs(10), ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    // The one channel waits 2 s for its first byte; the core is healthy.
    s.set_knobs(|k| {
        k.delay = Duration::from_secs(2);
        k.fault_table = Some("hosts".into());
    });
    let heartbeats = p.site("s1").status().heartbeats;
    let connections = s.stats().accepted;
    let (code, body) = query(&p, "s1", "GET hosts\nColumns: name\nLimit: 1").await;
    assert_eq!((code, body.as_str()), (200, "host-0000\n"));
    let st = p.site("s1").status();
    assert_eq!((st.state, st.generation), (SiteState::Ready, 0), "a slow query is not a dead site");
    assert!(s.stats().accepted > connections, "the heartbeat went out on an extra connection");
    assert!(st.heartbeats > heartbeats, "heartbeats went on meanwhile");
    p.shutdown().await;
}

#[tokio::test]
async fn a_hung_core_with_every_channel_busy_is_declared_down() {
    let params = SiteParams { channels: 1, channels_max: 1, ..fast_params() };
    let (p, s) = Proxy::with_sim("s1", params).await;
    // First the one channel is taken by a query that hangs (only queries on
    // `hosts` hang, so no heartbeat can be caught by it); then the whole
    // core hangs: only a heartbeat on an extra connection can find out.
    s.set_knobs(|k| {
        k.hang = true;
        k.fault_table = Some("hosts".into());
    });
    let mut c = p.client("s1").await;
    tokio::io::AsyncWriteExt::write_all(&mut c, b"GET hosts\nColumns: name\nResponseHeader: fixed16\n\n")
        .await
        .unwrap();
    eventually("the query holds the channel", || s.queries_on("hosts") == 1).await;
    let connections = s.stats().accepted;
    s.set_knobs(|k| k.fault_table = None);
    p.wait_state("s1", SiteState::Down).await;
    assert_eq!(s.stats().accepted, connections + 1, "detected on one extra connection");
    // The query in flight is released with the reason, long before query_timeout.
    let (code, body) = read_answer(&mut c).await;
    assert_eq!(code, 502);
    assert_eq!(body, "site 's1' is down: heartbeat not answered within 200ms\n", "with the cause");
    p.shutdown().await;
}

#[tokio::test]
async fn the_state_file_describes_every_site() {
    let a = sim("a").await;
    let b = sim("b").await;
    let p = Proxy::start(vec![("a", a.address(), fast_params()), ("b", b.address(), fast_params())]).await;
    p.wait_state("a", SiteState::Ready).await;
    b.stop();
    p.wait_state("b", SiteState::Down).await;
    let path = p.config.state_file.clone();
    let read = || -> serde_json::Value {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    };
    let mut json = serde_json::Value::Null;
    // b may first be marked down by a heartbeat cut off by the stop; the
    // reconnect after connect_retry then records the refused connect.
    let refused = format!("cannot connect to {}", b.address());
    eventually("state file shows a ready with both channels and b down, refusing connections", || {
        json = read();
        json["sites"][0]["state"] == "ready"
            && json["sites"][0]["channels"].as_array().is_some_and(|c| c.len() == 2)
            && json["sites"][1]["state"] == "down"
            && json["sites"][1]["last_error"].as_str().is_some_and(|e| e.starts_with(&refused))
    })
    .await;
    assert_eq!(json["version"], 1);
    let sa = &json["sites"][0];
    assert_eq!(sa["name"], "a");
    assert_eq!(sa["address"], a.address());
    assert!(sa["heartbeats_received"].as_u64().unwrap() >= 1);
    assert_eq!(sa["program_start"].as_i64(), Some(a.program_start() as i64));
    assert_eq!(sa["channels"].as_array().unwrap().len(), 2);
    assert!(sa["channels"][0]["since"].is_string());
    assert!(sa["since"].as_str().unwrap().ends_with('Z'));
    assert_eq!(sa["clients_waiting"], 0);
    let sb = &json["sites"][1];
    assert!(sb["last_failed_connect"].is_string());
    // Rewritten atomically: no temporary files are left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
    p.shutdown().await;
}
