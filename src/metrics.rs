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

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

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

/// Histogram buckets in seconds: from 100 µs (a cached answer) to the
/// default `query_timeout`.
const BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteLabel {
    site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    site: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    site: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteResultLabel {
    site: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// [`BUCKETS`] in nanoseconds (the same bounds, compared as integers).
const BUCKETS_NS: [u64; BUCKETS.len()] = {
    let mut ns = [0u64; BUCKETS.len()];
    let micros: [u64; BUCKETS.len()] = [
        100,
        250,
        500,
        1_000,
        2_500,
        5_000,
        10_000,
        25_000,
        50_000,
        100_000,
        250_000,
        500_000,
        1_000_000,
        2_500_000,
        5_000_000,
        10_000_000,
        30_000_000,
        60_000_000,
        120_000_000,
    ];
    let mut i = 0;
    while i < micros.len() {
        ns[i] = micros[i] * 1_000;
        i += 1;
    }
    ns
};

/// A histogram of durations that records with two atomic adds and no lock
/// (a query records one or two of them, so a lock per observation would
/// be the one thing every query on every core takes): a count per bucket
/// (the last for anything above the largest bound) and the sum in
/// nanoseconds. Encoded as a Prometheus histogram over [`BUCKETS`].
#[derive(Clone, Debug, Default)]
pub struct DurationHistogram(Arc<HistogramCells>);

#[derive(Debug, Default)]
struct HistogramCells {
    buckets: [std::sync::atomic::AtomicU64; BUCKETS.len() + 1],
    sum_ns: std::sync::atomic::AtomicU64,
}

impl DurationHistogram {
    /// Count one duration.
    pub fn observe(&self, d: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The first bound the value does not exceed (Prometheus' `le`).
        let i = BUCKETS_NS.partition_point(|b| *b < ns);
        self.0.buckets[i].fetch_add(1, Relaxed);
        if ns > 0 {
            self.0.sum_ns.fetch_add(ns, Relaxed);
        }
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        use std::sync::atomic::Ordering::Relaxed;
        let counts: Vec<u64> = self.0.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let bounds = BUCKETS.iter().copied().chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds.zip(counts.iter().copied()).collect();
        (self.0.sum_ns.load(Relaxed) as f64 / 1e9, counts.iter().sum(), buckets)
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

type Histograms = Family<SiteLabel, DurationHistogram>;

/// How a client's request ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (by the site or from the cache), whatever the site's status.
    Ok,
    /// The site was down, failed or refused the request.
    SiteError,
    /// No channel came free within `channel_timeout`.
    NoFreeChannel,
    /// `query_timeout` passed.
    Timeout,
    /// The client left (or was dropped) before the answer was complete.
    ClientGone,
    /// The request was malformed or too large.
    BadRequest,
    /// The request could not be received: `request_memory_budget` was in use.
    RequestBudget,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::SiteError,
        Outcome::NoFreeChannel,
        Outcome::Timeout,
        Outcome::ClientGone,
        Outcome::BadRequest,
        Outcome::RequestBudget,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::SiteError => "site_error",
            Outcome::NoFreeChannel => "no_free_channel",
            Outcome::Timeout => "timeout",
            Outcome::ClientGone => "client_gone",
            Outcome::BadRequest => "bad_request",
            Outcome::RequestBudget => "request_budget",
        }
    }

    /// The outcome of a query that failed with `e`.
    pub fn of(e: &crate::error::QueryError) -> Outcome {
        use crate::error::QueryError as Q;
        match e {
            Q::NoFreeChannel { .. } => Outcome::NoFreeChannel,
            Q::Timeout { .. } => Outcome::Timeout,
            _ => Outcome::SiteError,
        }
    }
}

/// The accumulating families, process-wide.
pub struct Metrics {
    queries: Family<OutcomeLabel, Counter>,
    duration: Histograms,
    wait: Histograms,
    state_changes: Family<SiteLabel, Counter>,
    from_site: Family<SiteLabel, Counter>,
    to_clients: Family<SiteLabel, Counter>,
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    queries: Family::default(),
    duration: Family::default(),
    wait: Family::default(),
    state_changes: Family::default(),
    from_site: Family::default(),
    to_clients: Family::default(),
});

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

impl Metrics {
    /// A site's handles (created on first use; the same ones for the same
    /// name, so a reloaded site keeps counting).
    pub fn site(&self, name: &str) -> SiteMetrics {
        let l = SiteLabel { site: name.to_owned() };
        let outcome = |o: Outcome| {
            self.queries.get_or_create(&OutcomeLabel { site: name.to_owned(), outcome: o.label() }).clone()
        };
        SiteMetrics {
            outcomes: Outcome::ALL.map(outcome),
            duration: self.duration.get_or_create(&l).clone(),
            wait: self.wait.get_or_create(&l).clone(),
            state_changes: self.state_changes.get_or_create(&l).clone(),
            from_site: self.from_site.get_or_create(&l).clone(),
            to_clients: self.to_clients.get_or_create(&l).clone(),
        }
    }
}

/// One site's accumulating metrics.
#[derive(Clone, Debug)]
pub struct SiteMetrics {
    outcomes: [Counter; Outcome::ALL.len()],
    duration: DurationHistogram,
    wait: DurationHistogram,
    state_changes: Counter,
    from_site: Counter,
    to_clients: Counter,
}

impl SiteMetrics {
    /// A request ended with `outcome`, `took` after it arrived.
    pub fn query(&self, outcome: Outcome, took: Duration) {
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.outcomes[i].inc();
        }
        self.duration.observe(took);
    }

    /// A query waited `d` for its channel.
    pub fn waited(&self, d: Duration) {
        self.wait.observe(d);
    }

    /// The site changed state.
    pub fn state_changed(&self) {
        self.state_changes.inc();
    }

    /// Bytes read from the site and written to a client for one answer.
    pub fn bytes(&self, from_site: u64, to_client: u64) {
        self.from_site.inc_by(from_site);
        self.to_clients.inc_by(to_client);
    }

    /// Bytes read from the site and written to clients so far.
    pub fn bytes_so_far(&self) -> (u64, u64) {
        (self.from_site.get(), self.to_clients.get())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_into_the_first_bucket_they_do_not_exceed_and_encode_cumulatively() {
        let h = DurationHistogram::default();
        for us in [0, 100, 101, 250, 1_500, 200_000_000] {
            h.observe(Duration::from_micros(us));
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 6);
        assert!((sum - 200.001951).abs() < 1e-9, "{sum}");
        let at = |le: f64| buckets.iter().find(|(b, _)| *b == le).map(|(_, n)| *n);
        assert_eq!(at(0.0001), Some(2), "0 and exactly 100 µs");
        assert_eq!(at(0.00025), Some(2), "101 and 250 µs");
        assert_eq!(at(0.0025), Some(1));
        assert_eq!(at(f64::INFINITY), Some(1), "beyond the largest bound");
        let mut registry = Registry::default();
        registry.register("d", "durations", h);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("d_bucket{le=\"0.0001\"} 2\n"), "{text}");
        assert!(text.contains("d_bucket{le=\"0.00025\"} 4\n"), "{text}");
        assert!(text.contains("d_bucket{le=\"+Inf\"} 6\n"), "{text}");
        assert!(text.contains("d_count 6\n"), "{text}");
    }
}
