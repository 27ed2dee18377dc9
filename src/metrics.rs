//! Prometheus metrics: `GET /metrics` on `metrics_listen`.
//!
//! Counters and histograms that accumulate (queries by outcome, query
//! duration, channel wait, state changes, bytes) live in one process-wide
//! [`Metrics`], each site holding its own handles ([`SiteMetrics`]) so that
//! counting costs an atomic add. Everything that is a state (channels,
//! waiting queries, cache and spool usage, inventory, process figures) is
//! read when Prometheus scrapes: a fresh registry is filled from the sites'
//! snapshots and the accumulated families, and encoded with
//! `prometheus-client`. Labels are the configured site names and fixed
//! words only: nothing a client sends becomes a label.
//!
//! The listener is plain HTTP/1.1 (hyper): at most [`MAX_CONNECTIONS`] at
//! once, request headers within [`HEADER_TIMEOUT`] and [`MAX_HEADER_BYTES`],
//! each connection closed after [`CONNECTION_TIMEOUT`]; anything but
//! `GET /metrics` is a 404. It runs beside the proxy's tasks and only reads
//! what they publish.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::counters::{ResultLabel, SiteLabel, SiteResultLabel, StateLabel, VersionLabel, global};
use crate::site::{SiteHandle, SiteState};
use crate::state::StateSource;

/// Connections the metrics listener serves at once.
pub const MAX_CONNECTIONS: usize = 8;
/// A request's headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this, whatever it does.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// A family of per-scrape values with one label set per site.
fn gauge_family<L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static>()
-> Family<L, Gauge<f64, std::sync::atomic::AtomicU64>> {
    Family::default()
}

/// The text of one scrape.
pub async fn render(src: &StateSource) -> String {
    let sites: Arc<Vec<SiteHandle>> = src.sites.borrow().clone();
    let m = global();
    let mut reg = Registry::default();
    reg.register("livemux_queries", "Client requests by how they ended", m.queries.clone());
    reg.register(
        "livemux_query_duration_seconds",
        "From a request's arrival to the last byte handed to the client",
        m.duration.clone(),
    );
    reg.register("livemux_channel_wait_seconds", "How long queries waited for a channel", m.wait.clone());
    reg.register("livemux_site_state_changes", "Site state changes (starting, ready, down)", m.state_changes.clone());
    reg.register("livemux_site_received_bytes", "Answer bytes read from the site", m.from_site.clone());
    reg.register("livemux_client_sent_bytes", "Answer bytes written to clients", m.to_clients.clone());

    let up = gauge_family::<SiteLabel>();
    let state = gauge_family::<StateLabel>();
    let open = gauge_family::<SiteLabel>();
    let busy = gauge_family::<SiteLabel>();
    let max = gauge_family::<SiteLabel>();
    let waiting = gauge_family::<SiteLabel>();
    let rtt = gauge_family::<SiteLabel>();
    let clients = gauge_family::<SiteLabel>();
    let reaped: Family<SiteLabel, Counter> = Family::default();
    let cache_hits: Family<SiteLabel, Counter> = Family::default();
    let cache_misses: Family<SiteLabel, Counter> = Family::default();
    let cache_evictions: Family<SiteLabel, Counter> = Family::default();
    let cache_bytes = gauge_family::<SiteLabel>();
    let inv_hosts = gauge_family::<SiteLabel>();
    let inv_last = gauge_family::<SiteLabel>();
    let inv_syncs: Family<SiteResultLabel, Counter> = Family::default();
    for s in sites.iter() {
        let l = SiteLabel { site: s.name().to_owned() };
        let st = s.status().state;
        up.get_or_create(&l).set(f64::from(u8::from(st == SiteState::Ready)));
        for (name, v) in [(SiteState::Starting, "starting"), (SiteState::Ready, "ready"), (SiteState::Down, "down")] {
            let sl = StateLabel { site: l.site.clone(), state: v };
            state.get_or_create(&sl).set(f64::from(u8::from(st == name)));
        }
        if let Some(snap) = s.snapshot(Duration::from_secs(1)).await {
            open.get_or_create(&l).set(snap.channels.len() as f64);
            let b = snap.channels.iter().filter(|c| c.state != "idle").count();
            busy.get_or_create(&l).set(b as f64);
            max.get_or_create(&l).set(snap.channels_max as f64);
            waiting.get_or_create(&l).set(snap.clients_waiting as f64);
            if let Some(ms) = snap.heartbeat_rtt_ms {
                rtt.get_or_create(&l).set(ms / 1000.0);
            }
            clients.get_or_create(&l).set(snap.clients_connected as f64);
            reaped.get_or_create(&l).inc_by(snap.clients_reaped);
            if let Some(inv) = &snap.inventory {
                inv_hosts.get_or_create(&l).set(inv.hosts as f64);
                if let Some(t) =
                    inv.last_sync.as_deref().and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
                {
                    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
                    inv_last.get_or_create(&l).set(secs);
                }
                for (result, n) in [("ok", inv.syncs_ok), ("failed", inv.syncs_failed)] {
                    inv_syncs.get_or_create(&SiteResultLabel { site: l.site.clone(), result }).inc_by(n);
                }
            }
        }
        let c = src.cache.stats(s.name());
        cache_hits.get_or_create(&l).inc_by(c.hits);
        cache_misses.get_or_create(&l).inc_by(c.misses);
        cache_evictions.get_or_create(&l).inc_by(c.evictions);
        cache_bytes.get_or_create(&l).set(c.bytes as f64);
    }
    reg.register("livemux_site_up", "1 if the site is ready (answers queries), else 0", up);
    reg.register("livemux_site_state", "1 for the site's current state", state);
    reg.register("livemux_channels_open", "Channels open to the site", open);
    reg.register("livemux_channels_busy", "Channels carrying a query or heartbeat", busy);
    reg.register("livemux_channels_max", "channels_max in effect", max);
    reg.register("livemux_queries_waiting", "Queries waiting for a channel", waiting);
    reg.register("livemux_heartbeat_rtt_seconds", "The last answered heartbeat's round trip", rtt);
    reg.register("livemux_clients_connected", "Client connections open on the site's sockets", clients);
    reg.register("livemux_clients_reaped", "TCP clients dropped as dead or stalled", reaped);
    reg.register("livemux_cache_hits", "Cache: reload queries answered from the cache", cache_hits);
    reg.register("livemux_cache_misses", "Cache: reload queries sent to the site", cache_misses);
    reg.register("livemux_cache_evictions", "Cached answers dropped for the cache budget", cache_evictions);
    reg.register("livemux_cache_bytes", "Bytes of cached answers", cache_bytes);
    reg.register("livemux_inventory_hosts", "Hosts whose inventory files livemux holds for the site", inv_hosts);
    reg.register(
        "livemux_inventory_last_sync_timestamp_seconds",
        "When the site's last successful inventory sync ended",
        inv_last,
    );
    reg.register("livemux_inventory_syncs", "Inventory syncs by result", inv_syncs);

    let usage = src.budget.usage();
    let spool = |v: u64| {
        let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        g.set(v as f64);
        g
    };
    reg.register(
        "livemux_spool_memory_bytes",
        "Memory holding answers for slow clients",
        spool(usage.memory_used as u64),
    );
    reg.register("livemux_spool_disk_bytes", "Spool file bytes not yet sent to clients", spool(usage.disk_used));
    let requests = src.requests.usage();
    reg.register(
        "livemux_request_memory_bytes",
        "Memory holding requests being received (within request_memory_budget)",
        spool(requests.memory_used as u64),
    );
    let waits: Counter = Counter::default();
    waits.inc_by(requests.waits);
    reg.register("livemux_request_memory_waits", "Clients that waited for room in request_memory_budget", waits);
    let reloads: Family<ResultLabel, Counter> = Family::default();
    {
        let r = src.reloads.lock().unwrap_or_else(|e| e.into_inner());
        reloads.get_or_create(&ResultLabel { result: "ok" }).inc_by(r.ok);
        reloads.get_or_create(&ResultLabel { result: "failed" }).inc_by(r.failed);
    }
    reg.register("livemux_config_reloads", "Configuration reloads by result", reloads);
    let build: Family<VersionLabel, Gauge> = Family::default();
    build.get_or_create(&VersionLabel { version: env!("CARGO_PKG_VERSION") }).set(1);
    reg.register("livemux_build_info", "Always 1; the version as a label", build);
    process_metrics(&mut reg);

    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// The process's RSS, open descriptors, CPU time and start time (the names
/// Prometheus' own clients use).
fn process_metrics(reg: &mut Registry) {
    let g = |v: f64| {
        let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        g.set(v);
        g
    };
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as f64;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
        && let Some(rss) = statm.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok())
    {
        reg.register("process_resident_memory_bytes", "Resident memory", g(rss * page));
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        reg.register("process_open_fds", "Open file descriptors", g(fds.count() as f64));
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (num(11), num(12)) {
            let c: Counter<f64, std::sync::atomic::AtomicU64> = Counter::default();
            c.inc_by((u + s) / ticks);
            reg.register("process_cpu_seconds", "CPU time used, user and system", c);
        }
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok())));
        if let (Some(start), Some(boot)) = (num(19), boot) {
            reg.register("process_start_time_seconds", "When the process started (Unix time)", g(boot + start / ticks));
        }
    }
}

/// Serve `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, src: StateSource, shutdown: CancellationToken) {
    use hyper::service::service_fn;
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics listener: too many connections; closing this one");
            continue;
        };
        let src = src.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let src = src.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &src).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                r = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {
                    if let Ok(Err(e)) = r {
                        tracing::debug!(%peer, error = %e, "metrics connection ended");
                    }
                }
                _ = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}

async fn answer(
    req: &hyper::Request<hyper::body::Incoming>,
    src: &StateSource,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, kind, body) = if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
        (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", render(src).await)
    } else {
        (404, "text/plain; charset=utf-8", "not found: livemux serves GET /metrics\n".to_owned())
    };
    let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::NOT_FOUND);
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}
