//! The counters and histograms every query and site adds to: one
//! process-wide [`Metrics`], each site holding its own handles
//! ([`SiteMetrics`]) so that counting costs an atomic add. This is the
//! ground the site side and the client side count on; the `/metrics`
//! exporter ([`crate::metrics`]) reads these families with everything else
//! it observes when Prometheus scrapes.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Histogram buckets in seconds: from 100 µs (a cached answer) to the
/// default `query_timeout`.
const BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SiteLabel {
    pub(crate) site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    pub(crate) site: String,
    pub(crate) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabel {
    pub(crate) site: String,
    pub(crate) state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SiteResultLabel {
    pub(crate) site: String,
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct VersionLabel {
    pub(crate) version: &'static str,
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

pub(crate) type Histograms = Family<SiteLabel, DurationHistogram>;

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
    pub(crate) queries: Family<OutcomeLabel, Counter>,
    pub(crate) duration: Histograms,
    pub(crate) wait: Histograms,
    pub(crate) state_changes: Family<SiteLabel, Counter>,
    pub(crate) from_site: Family<SiteLabel, Counter>,
    pub(crate) to_clients: Family<SiteLabel, Counter>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

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
