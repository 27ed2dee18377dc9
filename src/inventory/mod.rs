//! HW/SW inventory sync: the central site's copy of every remote host's
//! inventory tree (`var/check_mk/inventory`), which Checkmk's GUI reads
//! locally because it is too large to fetch for every page.
//!
//! One task per site, every `interval`, through the site's own pool (one
//! channel at a time, never pipelined with clients' queries):
//! 1. probe `status.mk_inventory_last` (the mtime of the site's
//!    `inventory/.last`, touched by every save);
//! 2. when [`plan::Probe`] says so (a changed value, a value not yet
//!    covered by a listing, or every `full_interval`), list
//!    `hosts.name, mk_inventory_last`;
//! 3. fetch the trees of hosts whose timestamp differs from what livemux
//!    wrote ([`plan::plan`]), in batches of [`BATCH_HOSTS`], as
//!    `OutputFormat: python3` (the only format that carries bytes intact),
//!    streamed through the parser on the blocking pool straight into
//!    temporary files ([`store`]), so memory does not grow with the trees;
//! 4. remove the files of hosts the site no longer lists.
//!
//! A core without inventory columns (Icinga 2, Naemon) answers the probe
//! with an error (or with no integer): the site's sync is switched `off`,
//! logged once, and tried again only when the core restarts.

mod batch;
pub mod plan;
pub mod store;

mod fetch;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use livemux_protocol::python::{Event, FeedError, RowParser, Sink, SyntaxError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use batch::{Batch, BatchJob};

use crate::config::InventoryConfig;
use crate::error::QueryError;
use crate::site::{SiteHandle, SiteState, timestamp};
use fetch::Scalar;
pub use store::{Registry, SiteStore, StoreError};

/// Hosts fetched per query.
pub const BATCH_HOSTS: usize = 50;
/// Chunks of an answer in flight between the network and the disk.
const PIPE_CHUNKS: usize = 4;

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The query did not get an answer (site down, no free channel, ...).
    #[error(transparent)]
    Query(Box<QueryError>),
    /// The site's core answered with an error.
    #[error("site '{site}' answered {status}: {message}")]
    Refused {
        /// Site name.
        site: String,
        /// The status code.
        status: u16,
        /// The core's words.
        message: String,
    },
    /// The answer broke off or was unusable.
    #[error("site '{site}': {message}")]
    Answer {
        /// Site name.
        site: String,
        /// What happened.
        message: String,
    },
    /// The answer is not well-formed python3.
    #[error("site '{site}' sent a malformed answer: {source}")]
    Parse {
        /// Site name.
        site: String,
        /// Where and what.
        source: SyntaxError,
    },
    /// The site serves no inventory.
    #[error("site '{site}' serves no HW/SW inventory ({why})")]
    Unsupported {
        /// Site name.
        site: String,
        /// The core's answer to the probe.
        why: String,
    },
    /// The inventory directory failed us.
    #[error("inventory directory: {0}")]
    Store(#[from] StoreError),
}

impl SyncError {
    fn from_query(e: QueryError) -> SyncError {
        SyncError::Query(Box::new(e))
    }
}

/// A site's sync as the state file shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct InventorySnapshot {
    /// `idle`, `running`, `failed` or `off`.
    pub state: &'static str,
    /// When the last successful sync ended (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<String>,
    /// Hosts written by the last successful sync.
    pub last_sync_hosts: u64,
    /// Bytes written by the last successful sync.
    pub last_sync_bytes: u64,
    /// Hosts removed by the last successful sync.
    pub last_sync_removed: u64,
    /// Hosts whose files livemux holds for this site.
    pub hosts: usize,
    /// Syncs that completed since start.
    pub syncs_ok: u64,
    /// Syncs that failed since start.
    pub syncs_failed: u64,
    /// Why the last sync failed, or why the sync is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Shared between a site's sync task and its handle (state file).
#[derive(Debug, Default)]
pub struct InventoryStatus(Mutex<InventorySnapshot>);

impl InventoryStatus {
    /// A status in `state`.
    pub fn new(state: &'static str) -> Arc<Self> {
        Arc::new(InventoryStatus(Mutex::new(InventorySnapshot { state, ..Default::default() })))
    }

    /// The current status.
    pub fn snapshot(&self) -> InventorySnapshot {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut InventorySnapshot)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// A reload's changes to the set of synced sites.
pub enum Control {
    /// A site was added (or its `inventory` turned on or its address
    /// changed): start (or restart) its sync.
    Start(SiteHandle),
    /// A site was removed (or its `inventory` turned off): stop its sync.
    Stop(String),
}

/// Start the sync of every site that has it on; ends when `stop` is
/// cancelled. All sites' manifests are loaded (in configuration order,
/// so the first site to hold a host name keeps it) before any sync runs.
pub async fn run(
    cfg: InventoryConfig,
    mut sites: Vec<SiteHandle>,
    stop: CancellationToken,
    mut control: mpsc::Receiver<Control>,
) {
    let cfg = Arc::new(cfg);
    let mut syncing = Vec::new();
    for s in &sites {
        let status = InventoryStatus::new(if s.params().inventory { "idle" } else { "off" });
        s.set_inventory_status(status.clone());
        if s.params().inventory {
            syncing.push((s.clone(), status));
        }
    }
    let registry = Arc::new(Registry::default());
    let stores = loop {
        let (dir, names, reg, max) = (
            cfg.dir.clone(),
            syncing.iter().map(|(s, _)| s.name().to_owned()).collect::<Vec<_>>(),
            registry.clone(),
            cfg.max_file_bytes,
        );
        let opened = tokio::task::spawn_blocking(move || open_all(&dir, &names, reg, max)).await;
        match opened {
            Ok(Ok(stores)) => break stores,
            Ok(Err(e)) => {
                tracing::error!(dir = %cfg.dir.display(), error = %e, "inventory sync cannot start; retrying every interval");
                for (_, status) in &syncing {
                    status.update(|s| {
                        s.state = "failed";
                        s.last_error = Some(e.to_string());
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "inventory sync start-up task failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut running = std::collections::HashMap::new();
    for ((site, status), store) in syncing.into_iter().zip(stores) {
        let name = site.name().to_owned();
        running.insert(name, spawn_syncer(&mut tasks, &cfg, site, status, store));
    }
    loop {
        let order = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            o = control.recv() => o,
        };
        match order {
            None => stop.cancelled().await,
            Some(Control::Stop(name)) => {
                if let Some(task) = running.remove(&name) {
                    task.abort();
                }
                if let Some(site) = sites.iter().find(|s| s.name() == name) {
                    site.set_inventory_status(InventoryStatus::new("off"));
                }
            }
            Some(Control::Start(site)) => {
                let name = site.name().to_owned();
                if let Some(task) = running.remove(&name) {
                    task.abort();
                }
                sites.retain(|s| s.name() != name);
                sites.push(site.clone());
                let status = InventoryStatus::new("idle");
                site.set_inventory_status(status.clone());
                let (dir, reg, max, n) = (cfg.dir.clone(), registry.clone(), cfg.max_file_bytes, name.clone());
                match tokio::task::spawn_blocking(move || open_all(&dir, &[n], reg, max)).await {
                    Ok(Ok(mut stores)) if !stores.is_empty() => {
                        let store = stores.remove(0);
                        running.insert(name, spawn_syncer(&mut tasks, &cfg, site, status, store));
                    }
                    Ok(Err(e)) => {
                        tracing::error!(site = %name, error = %e, "inventory sync of a reloaded site cannot start");
                        status.update(|s| {
                            s.state = "failed";
                            s.last_error = Some(e.to_string());
                        });
                    }
                    _ => tracing::error!(site = %name, "inventory sync of a reloaded site cannot start"),
                }
            }
        }
    }
    tasks.shutdown().await;
}

fn spawn_syncer(
    tasks: &mut tokio::task::JoinSet<()>,
    cfg: &Arc<InventoryConfig>,
    site: SiteHandle,
    status: Arc<InventoryStatus>,
    store: SiteStore,
) -> tokio::task::AbortHandle {
    status.update(|s| s.hosts = store.written().len());
    let span = tracing::info_span!("inventory", site = %site.name());
    let syncer = Syncer {
        site,
        cfg: cfg.clone(),
        store: Arc::new(Mutex::new(store)),
        status,
        probe: plan::Probe::default(),
        last_full: None,
        warned: HashSet::new(),
    };
    tasks.spawn(tracing::Instrument::instrument(syncer.run(), span))
}

fn open_all(
    dir: &std::path::Path,
    sites: &[String],
    registry: Arc<Registry>,
    max_file_bytes: u64,
) -> Result<Vec<SiteStore>, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError { action: "create", path: dir.to_owned(), source })?;
    let stale = store::remove_stale_temps(dir)?;
    if stale > 0 {
        tracing::info!(dir = %dir.display(), files = stale, "removed temporary inventory files left by an earlier run");
    }
    let mut stores = Vec::with_capacity(sites.len());
    for site in sites {
        let store::Opened { store, conflicts, warning } = SiteStore::open(dir, site, registry.clone(), max_file_bytes)?;
        if let Some(w) = warning {
            tracing::warn!(site = %site, "{w}");
        }
        for (host, other) in conflicts {
            tracing::warn!(site = %site, host = %host, owner = %other,
                "inventory host written by two sites; the one listed first keeps it");
        }
        stores.push(store);
    }
    Ok(stores)
}

/// One site's sync task.
struct Syncer {
    site: SiteHandle,
    cfg: Arc<InventoryConfig>,
    store: Arc<Mutex<SiteStore>>,
    status: Arc<InventoryStatus>,
    probe: plan::Probe,
    last_full: Option<Instant>,
    /// Hosts already logged as skipped for their name or a conflict.
    warned: HashSet<String>,
}

/// What a sync changed.
#[derive(Debug, Default)]
struct Changes {
    written: u64,
    bytes: u64,
    removed: u64,
    skipped: u64,
}

impl Syncer {
    async fn run(mut self) {
        loop {
            // A sync is no use before the site is up; wait for it (a while).
            let ready = self.site.wait_for(|s| s.state == SiteState::Ready);
            let _ = tokio::time::timeout(self.cfg.interval, ready).await;
            let started = Instant::now();
            self.status.update(|s| s.state = "running");
            match self.sync().await {
                Ok(changes) => {
                    let hosts = self.lock_store().written().len();
                    if changes.written + changes.removed + changes.skipped > 0 {
                        tracing::info!(
                            written = changes.written,
                            bytes = changes.bytes,
                            removed = changes.removed,
                            skipped = changes.skipped,
                            hosts,
                            took_ms = started.elapsed().as_millis() as u64,
                            "inventory synced"
                        );
                    }
                    self.status.update(|s| {
                        s.state = "idle";
                        s.syncs_ok += 1;
                        s.last_sync = Some(timestamp(SystemTime::now()));
                        s.last_sync_hosts = changes.written;
                        s.last_sync_bytes = changes.bytes;
                        s.last_sync_removed = changes.removed;
                        s.hosts = hosts;
                        s.last_error = None;
                    });
                }
                Err(SyncError::Unsupported { why, .. }) => {
                    tracing::info!(answer = %why,
                        "the site serves no HW/SW inventory (no inventory columns); its sync is off until the core restarts");
                    self.status.update(|s| {
                        s.state = "off";
                        s.last_error = Some(format!("the site serves no HW/SW inventory: {why}"));
                    });
                    let start = self.site.status().program_start;
                    self.site.wait_for(|s| s.program_start.is_some() && s.program_start != start).await;
                    continue;
                }
                Err(e) => {
                    self.probe.failed();
                    tracing::warn!(error = %e, "inventory sync failed; retrying in {}", humantime::format_duration(self.cfg.interval));
                    let hosts = self.lock_store().written().len();
                    self.status.update(|s| {
                        s.state = "failed";
                        s.syncs_failed += 1;
                        s.last_error = Some(e.to_string());
                        s.hosts = hosts;
                    });
                }
            }
            tokio::time::sleep(self.cfg.interval).await;
        }
    }

    fn lock_store(&self) -> std::sync::MutexGuard<'_, SiteStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn sync(&mut self) -> Result<Changes, SyncError> {
        let name = self.site.name().to_owned();
        let probe = self.probe_value().await?;
        let full = self.last_full.is_none_or(|t| t.elapsed() >= self.cfg.full_interval);
        if !self.probe.wants_listing(probe, full) {
            self.probe.done(probe, false);
            return Ok(Changes::default());
        }
        let confirming = self.probe.confirming(probe);
        let listing = self.listing().await?;
        let plan = {
            let store = self.lock_store();
            plan::plan(&listing, store.written(), |h| store.registry().other_owner(h, &name))
        };
        let mut changes = Changes::default();
        for (host, why) in &plan.skipped {
            changes.skipped += 1;
            match why {
                plan::Skip::BadName(what) => {
                    if self.warned.insert(host.clone()) {
                        tracing::warn!(host = ?host, "inventory of a host not written: {what}");
                    }
                }
                plan::Skip::Conflict(other) => self.conflict(host, other),
            }
        }
        if !plan.remove.is_empty() {
            let store = self.store.clone();
            let remove = plan.remove.clone();
            changes.removed = remove.len() as u64;
            blocking(move || {
                let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
                for host in &remove {
                    s.remove(host)?;
                }
                s.save()
            })
            .await?;
        }
        for batch in plan.fetch.chunks(BATCH_HOSTS) {
            let done = self.fetch(batch, probe, confirming).await?;
            changes.written += done.written;
            changes.bytes += done.bytes;
            changes.skipped += done.skipped.len() as u64;
            for (host, why) in done.skipped {
                tracing::warn!(host = %host, "inventory of a host not written: {why}; its files stay as they were");
            }
            changes.skipped += done.conflicts.len() as u64;
            for (host, other) in &done.conflicts {
                self.conflict(host, other);
            }
        }
        self.probe.done(probe, true);
        if full {
            self.last_full = Some(Instant::now());
        }
        Ok(changes)
    }

    /// A host name another site holds: logged once per host.
    fn conflict(&mut self, host: &str, owner: &str) {
        if self.warned.insert(host.to_owned()) {
            tracing::warn!(host = %host, owner = %owner,
                "inventory host name also on another site, which wrote it first; not written here");
        }
    }

    async fn probe_value(&self) -> Result<i64, SyncError> {
        let site = self.site.name();
        let text = "GET status\nColumns: mk_inventory_last\nOutputFormat: python3\n";
        let unsupported = |why: String| SyncError::Unsupported { site: site.to_owned(), why };
        let body = match fetch::send(&self.site, text).await {
            Ok(r) => r.read_all(fetch::ERROR_BODY_LIMIT).await?,
            Err(SyncError::Refused { status, message, .. }) => return Err(unsupported(format!("{status} {message}"))),
            Err(SyncError::Query(q)) if matches!(*q, QueryError::Refused { .. }) => {
                return Err(unsupported(q.to_string()));
            }
            Err(e) => return Err(e),
        };
        let shown = || String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        match fetch::scalar_rows(site, &body).as_deref() {
            Ok([row]) => match row.as_slice() {
                [Scalar::Int(n)] => Ok(*n),
                _ => Err(unsupported(format!("200 with {:?}", shown()))),
            },
            _ => Err(unsupported(format!("200 with {:?}", shown()))),
        }
    }

    async fn listing(&self) -> Result<Vec<(String, i64)>, SyncError> {
        let site = self.site.name();
        let text = "GET hosts\nColumns: name mk_inventory_last\nOutputFormat: python3\n";
        let body = fetch::send(&self.site, text).await?.read_all(fetch::LISTING_LIMIT).await?;
        let rows = fetch::scalar_rows(site, &body)?;
        let mut listing = Vec::with_capacity(rows.len());
        for row in rows {
            match row.as_slice() {
                [Scalar::Str(name), Scalar::Int(t)] => listing.push((name.clone(), *t)),
                other => {
                    return Err(SyncError::Answer {
                        site: site.to_owned(),
                        message: format!("a host listing row is not (name, timestamp): {other:?}"),
                    });
                }
            }
        }
        Ok(listing)
    }

    /// Fetch and write one batch of hosts.
    async fn fetch(&self, hosts: &[(String, i64)], probe: i64, confirming: bool) -> Result<Batch, SyncError> {
        let mut text = String::from("GET hosts\nColumns: name mk_inventory_last mk_inventory mk_inventory_gz\n");
        for (h, _) in hosts {
            text.push_str("Filter: name = ");
            text.push_str(h);
            text.push('\n');
        }
        if hosts.len() > 1 {
            text.push_str(&format!("Or: {}\n", hosts.len()));
        }
        text.push_str("OutputFormat: python3\n");
        let mut reading = fetch::send(&self.site, &text).await?;
        let (tx, rx) = mpsc::channel::<Bytes>(PIPE_CHUNKS);
        let job = BatchJob {
            store: self.store.clone(),
            wanted: hosts.iter().map(|(h, _)| h.clone()).collect(),
            probe,
            confirming,
            limit: self.cfg.max_file_bytes,
            dir: self.cfg.dir.clone(),
            site: self.site.name().to_owned(),
        };
        let writer = tokio::task::spawn_blocking(move || job.run(rx));
        let read = async {
            while let Some(chunk) = reading.next().await? {
                if tx.send(chunk).await.is_err() {
                    // The writer stopped (its error is the one to report).
                    break;
                }
            }
            Ok::<(), SyncError>(())
        }
        .await;
        drop(tx);
        drop(reading);
        let written = writer.await.map_err(|e| SyncError::Answer {
            site: self.site.name().to_owned(),
            message: format!("the inventory writer failed: {e}"),
        })?;
        read?;
        written
    }
}

/// Run blocking file work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, SyncError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(SyncError::Store),
        Err(e) => Err(SyncError::Store(StoreError {
            action: "finish a task in",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })),
    }
}
