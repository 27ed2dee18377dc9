//! The site's desk: the everyday query takes an idle channel and gives it
//! back without a message to the site's actor. What must hold however a
//! query ends, and while the actor's own work (heartbeats, reloads) goes on.

use livemux::site::SiteState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// The site's channels once every one is idle again: their numbers.
async fn idle_channels(p: &Proxy, site: &str, n: usize) -> Vec<u64> {
    let snap = eventually_snapshot(p, site, "every channel idle", |s| {
        s.channels.len() == n && s.channels.iter().all(|c| c.state == "idle")
    })
    .await;
    snap.channels.iter().map(|c| c.id).collect()
}

#[tokio::test]
async fn a_channel_taken_at_the_desk_comes_back_however_its_query_ends() {
    let (p, s) = Proxy::with_sim("dk", fast_params()).await;
    s.set_knobs(|k| k.bulk_bytes = 8 << 20);
    let first = idle_channels(&p, "dk", 2).await;

    // Clean answers on a keep-alive connection: the same channels, back
    // at the desk each time (no new connection to the site).
    let mut c = p.client("dk").await;
    for _ in 0..50 {
        let (code, body) =
            ask(&mut c, "GET status\nColumns: num_hosts\nResponseHeader: fixed16\nKeepAlive: on\n\n").await;
        assert_eq!((code, body.as_str()), (200, "100\n"));
    }
    assert_eq!(idle_channels(&p, "dk", 2).await, first, "the same channels, none opened");
    assert_eq!(s.stats().accepted, 2, "the site saw no new connection");

    // A client that leaves in the middle of a large answer: that channel
    // is closed (it cannot be reused half-read) and replaced.
    let mut gone = p.client("dk").await;
    gone.write_all(b"GET bulk\nResponseHeader: fixed16\n\n").await.expect("send");
    let mut head = [0u8; 16];
    tokio::time::timeout(PATIENCE, gone.read_exact(&mut head)).await.expect("header in time").expect("header");
    drop(gone);
    let after_cut = idle_channels(&p, "dk", 2).await;
    assert_eq!(after_cut.iter().filter(|id| !first.contains(id)).count(), 1, "one channel replaced: {after_cut:?}");

    // An error answer from a core that keeps the connection: the channel
    // is proved clean by a heartbeat, then back in the pool.
    s.set_knobs(|k| k.mk_headers = true);
    let (code, _) = ask(&mut c, "GET nosuchtable\nResponseHeader: fixed16\nKeepAlive: on\n\n").await;
    assert_eq!(code, 404);
    assert_eq!(idle_channels(&p, "dk", 2).await, after_cut, "the channel came back after its heartbeat");
    s.set_knobs(|k| k.mk_headers = false);

    // COMMANDs take a channel of their own, and give it back.
    let (code, body) = ask(&mut c, "COMMAND [1] DISABLE_NOTIFICATIONS\nResponseHeader: fixed16\n\n").await;
    assert_eq!((code, body.as_str()), (200, ""));
    assert_eq!(idle_channels(&p, "dk", 2).await, after_cut);
    assert_eq!(s.stats().commands, 1);

    // A client that vanishes while waiting for its next request holds
    // nothing: the pool is whole, and queries go on.
    drop(c);
    let (code, _) = query(&p, "dk", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 200);
    assert_eq!(idle_channels(&p, "dk", 2).await, after_cut);
    assert_eq!(s.stats().open, 2, "no channel left open beside the pool");
    p.shutdown().await;
}

#[tokio::test]
async fn heartbeats_go_on_while_every_query_goes_through_the_desk() {
    let (p, _s) = Proxy::with_sim("dh", fast_params()).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (mut c, stop) = (p.client("dh").await, stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let (code, _) =
                    ask(&mut c, "GET status\nColumns: num_hosts\nResponseHeader: fixed16\nKeepAlive: on\n\n").await;
                assert_eq!(code, 200);
                n += 1;
            }
            n
        }));
    }
    // Three heartbeats (300 ms apart) while four clients keep both
    // channels busy: the schedule closes the desk to claim a channel.
    let h = p.site("dh");
    let start = h.status().heartbeats;
    tokio::time::timeout(PATIENCE, h.wait_for(|s| s.heartbeats >= start + 3)).await.expect("heartbeats under load");
    stop.cancel();
    for c in clients {
        assert!(c.await.expect("client") > 0, "every client got answers meanwhile");
    }
    assert_eq!(h.status().state, SiteState::Ready);
    p.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_removes_a_site_takes_its_channels_back() {
    let (a, b) = (sim("dra").await, sim("drb").await);
    let sites = vec![("dra", a.address(), fast_params()), ("drb", b.address(), fast_params())];
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
    let config = test_config(dir.path(), sites);
    let mut p = Proxy::start_config(dir, config.clone()).await;
    p.wait_state("dra", SiteState::Ready).await;
    p.wait_state("drb", SiteState::Ready).await;
    // A keep-alive client of dra asking all the time.
    let mut c = p.client("dra").await;
    let asking = tokio::spawn(async move {
        let mut answered = 0u64;
        loop {
            let req = b"GET status\nColumns: num_hosts\nResponseHeader: fixed16\nKeepAlive: on\n\n";
            if c.write_all(req).await.is_err() {
                return answered;
            }
            let mut head = [0u8; 16];
            match tokio::time::timeout(PATIENCE, c.read_exact(&mut head)).await.expect("no hang") {
                Ok(_) => {}
                // The connection ends between two answers.
                Err(_) => return answered,
            }
            let h = livemux_protocol::ResponseHeader::decode(&head).expect("fixed16");
            assert_eq!(h.status.code(), 200, "every answer before the end is complete");
            let mut body = vec![0u8; h.length as usize];
            c.read_exact(&mut body).await.expect("body");
            answered += 1;
        }
    });
    eventually("queries through the desk", || a.stats().queries > 50).await;
    let mut without = config.clone();
    without.sites.retain(|s| s.name != "dra");
    let report = p.app.as_mut().expect("running").reload(without.clone()).await;
    p.config = without;
    assert_eq!(report.removed, vec!["dra".to_owned()]);
    let answered = tokio::time::timeout(PATIENCE, asking).await.expect("the client's connection ends").expect("client");
    assert!(answered > 0);
    // Every channel to the removed site is closed.
    eventually("dra's channels closed", || a.stats().open == 0).await;
    assert_eq!(b.stats().open, 2, "the other site keeps its channels");
    let (code, _) = query(&p, "drb", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 200);
    p.shutdown().await;
}

/// An answer small enough to be held in the read buffer, sent by the site
/// in pieces (as Icinga 2 and Naemon send header and body apart): read
/// whole and exact while the pieces keep coming; a site that falls silent
/// between them for `response_idle_timeout` fails the query with that
/// reason, and the client gets the error, never part of the answer.
#[tokio::test]
async fn a_small_answer_sent_in_pieces_is_read_whole_or_fails_on_the_idle_timeout() {
    let params =
        livemux::config::SiteParams { response_idle_timeout: std::time::Duration::from_secs(1), ..fast_params() };
    let (p, s) = Proxy::with_sim("dp", params).await;
    let q = "GET hosts\nColumns: name address\nLimit: 20";
    let whole = query(&p, "dp", q).await;
    assert_eq!(whole.0, 200);
    assert!(whole.1.len() > 100 && whole.1.len() < 8000, "an answer the read buffer holds: {}", whole.1.len());
    // In 16-byte pieces (the header alone first), 20 ms apart.
    s.set_knobs(|k| {
        k.fault_table = Some("hosts".into());
        k.write_chunk = 16;
        k.write_pause = std::time::Duration::from_millis(20);
    });
    assert_eq!(query(&p, "dp", q).await, whole, "the same answer, byte for byte");
    // Silent for longer than response_idle_timeout after the header.
    s.set_knobs(|k| k.write_pause = std::time::Duration::from_secs(3));
    let (code, body) = query(&p, "dp", q).await;
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("the site sent nothing for 1s in the middle of the answer"), "{body}");
    s.set_knobs(|k| *k = livemux_simsite::Knobs::default());
    assert_eq!(query(&p, "dp", q).await, whole, "the site's other channels still serve");
    p.shutdown().await;
}
