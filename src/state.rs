//! The state file: a JSON snapshot of every site, rewritten atomically every
//! `state_interval` (and once more at shutdown).
//!
//! The file is written to a temporary file in the same directory, flushed to
//! disk and renamed over the old one, so a reader never sees half a file.
//! Its `version` field changes only with incompatible layout changes.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::site::{SiteHandle, SiteSnapshot, timestamp};

/// Layout version of the state file.
pub const VERSION: u32 = 1;

/// How long one site may take to describe itself.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1);

/// The file's content.
#[derive(Debug, Serialize)]
pub struct StateFile {
    /// Layout version.
    pub version: u32,
    /// Process id of the daemon.
    pub pid: u32,
    /// When this snapshot was taken (RFC 3339).
    pub written_at: String,
    /// How often the daemon rewrites this file (`livemux status` calls a
    /// file older than three intervals stale).
    pub state_interval_ms: u64,
    /// Configuration reloads since start.
    pub reloads: ReloadRecord,
    /// Answers held for slow clients.
    pub spool: crate::spool::SpoolUsage,
    /// Requests being received.
    pub requests: crate::client::reader::RequestUsage,
    /// Federated sockets.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub federations: Vec<crate::federation::FederationSnapshot>,
    /// One entry per site, in configuration order; a site whose actor did
    /// not answer in time is listed with state `unknown`.
    pub sites: Vec<SiteEntry>,
}

/// A site in the state file.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum SiteEntry {
    /// A site that answered.
    Known(Box<SiteSnapshot>),
    /// A site whose actor did not answer.
    Unknown {
        /// Site name.
        name: String,
        /// Always `unknown`.
        state: &'static str,
    },
}

/// Configuration reloads, as the state file shows them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadRecord {
    /// Reloads applied.
    pub ok: u64,
    /// Reloads refused (the file was invalid) or applied in part.
    pub failed: u64,
    /// The last one: when, whether it applied, and what it did or why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<LastReload>,
}

/// The last reload.
#[derive(Debug, Clone, Serialize)]
pub struct LastReload {
    /// When (RFC 3339).
    pub at: String,
    /// Applied in full.
    pub ok: bool,
    /// Its summary, or why it failed.
    pub message: String,
}

/// Everything the state file is made of, shared with the daemon.
#[derive(Clone)]
pub struct StateSource {
    /// The sites, as the last reload left them.
    pub sites: tokio::sync::watch::Receiver<std::sync::Arc<Vec<SiteHandle>>>,
    /// The spool's budget.
    pub budget: std::sync::Arc<crate::spool::SpoolBudget>,
    /// The budget of requests being received.
    pub requests: std::sync::Arc<crate::client::reader::RequestBudget>,
    /// The query cache.
    pub cache: std::sync::Arc<crate::cache::Cache>,
    /// Reloads so far.
    pub reloads: std::sync::Arc<std::sync::Mutex<ReloadRecord>>,
    /// `state_interval`.
    pub interval: Duration,
    /// The federated sockets (replaced by a reload).
    pub federations: std::sync::Arc<std::sync::RwLock<Vec<std::sync::Arc<crate::federation::Federation>>>>,
}

impl StateSource {
    fn sites(&self) -> std::sync::Arc<Vec<SiteHandle>> {
        self.sites.borrow().clone()
    }
}

/// Take a snapshot of all sites.
pub async fn collect(src: &StateSource) -> StateFile {
    let sites = src.sites();
    let mut entries = Vec::with_capacity(sites.len());
    for s in sites.iter() {
        entries.push(match s.snapshot(SNAPSHOT_TIMEOUT).await {
            Some(snap) => SiteEntry::Known(Box::new(snap)),
            None => SiteEntry::Unknown { name: s.name().to_owned(), state: "unknown" },
        });
    }
    StateFile {
        version: VERSION,
        pid: std::process::id(),
        written_at: timestamp(SystemTime::now()),
        state_interval_ms: src.interval.as_millis() as u64,
        reloads: src.reloads.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        spool: src.budget.usage(),
        requests: src.requests.usage(),
        federations: src.federations.read().unwrap_or_else(|e| e.into_inner()).iter().map(|f| f.snapshot()).collect(),
        sites: entries,
    }
}

/// The state file is written in pieces of this size.
const STATE_WRITE_BUFFER: usize = 64 * 1024;

/// Write `state` to `path` atomically.
pub fn write_atomically(path: &Path, state: &StateFile) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".state.").suffix(".tmp").tempfile_in(dir)?;
    // Through a buffer: straight into the file it would be a system call
    // per JSON token (with 10,000 sites, most of the daemon's idle CPU),
    // and the whole text in memory would be megabytes at that scale.
    let mut out = std::io::BufWriter::with_capacity(STATE_WRITE_BUFFER, tmp.as_file_mut());
    serde_json::to_writer_pretty(&mut out, state)?;
    out.write_all(b"\n")?;
    out.flush()?;
    drop(out);
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// How often each site's cache counters are logged (when they changed).
const CACHE_LOG_INTERVAL: Duration = Duration::from_secs(300);

/// Logs each site's cache counters every [`CACHE_LOG_INTERVAL`] and at
/// shutdown, for sites whose counters changed since the last line.
#[derive(Default)]
struct CacheLog {
    last: Option<tokio::time::Instant>,
    logged: std::collections::HashMap<String, crate::cache::CacheStats>,
}

impl CacheLog {
    fn maybe_log(&mut self, sites: &[SiteHandle], cache: &crate::cache::Cache, force: bool) {
        let now = tokio::time::Instant::now();
        let last = *self.last.get_or_insert(now);
        if !force && now.duration_since(last) < CACHE_LOG_INTERVAL {
            return;
        }
        self.last = Some(now);
        for s in sites {
            let st = cache.stats(s.name());
            if self.logged.get(s.name()) == Some(&st) || st == crate::cache::CacheStats::default() {
                continue;
            }
            tracing::info!(
                site = s.name(),
                entries = st.entries,
                bytes = st.bytes,
                hits = st.hits,
                misses = st.misses,
                evictions = st.evictions,
                coalesced = st.coalesced,
                invalidations = st.invalidations,
                "query cache"
            );
            self.logged.insert(s.name().to_owned(), st);
        }
    }
}

/// Rewrite the state file every `interval` until `shutdown`; the daemon
/// writes the last one itself with [`write`], once the sessions are done.
pub async fn run(path: PathBuf, src: StateSource, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(src.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut cache_log = CacheLog::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => {
                cache_log.maybe_log(&src.sites(), &src.cache, true);
                return;
            }
        }
        cache_log.maybe_log(&src.sites(), &src.cache, false);
        let ok = write(&path, &src).await;
        match (ok, failing) {
            (true, true) => {
                tracing::info!(path = %path.display(), "state file written again");
                failing = false;
            }
            (false, false) => failing = true,
            _ => {}
        }
    }
}

/// Collect and write the state file (the daemon also calls this for the
/// last one, at shutdown); false (after a log line) if it failed.
pub async fn write(path: &Path, src: &StateSource) -> bool {
    let state = collect(src).await;
    let p = path.to_owned();
    match tokio::task::spawn_blocking(move || write_atomically(&p, &state)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot write state file");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "state file writer failed");
            false
        }
    }
}
