//! Assembling the daemon: config → bind → spawn → run → bounded drain.
//!
//! [`App::start`] binds every site's socket before anything else runs, so a
//! configuration that cannot be served fails at once and leaves nothing
//! behind. [`App::shutdown`] stops accepting, lets sessions finish the
//! responses they are sending (up to `shutdown_grace`), writes the state file
//! a last time and removes the sockets.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::listener::{self, BindError};
use std::sync::Arc;

use crate::config::{Config, SiteAddress};
use crate::error::fmt_duration;
use crate::site::SiteHandle;
use crate::tls::SiteTls;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A directory could not be created.
    #[error("cannot create directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The spool directory cannot hold spool files.
    #[error("spool_dir {path} is not usable (set spool_disk_budget = 0 to run without spool files): {source}")]
    Spool {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The state file's directory does not take new files.
    #[error("cannot write the state file in {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A site's socket could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A site's TLS files are missing or unusable.
    #[error("site '{site}': {source}")]
    Tls {
        /// Site name.
        site: String,
        /// What is wrong.
        #[source]
        source: crate::tls::TlsSetupError,
    },
}

/// A site's TLS, loaded: toward the site, and for its listener.
struct SiteTlsParts {
    client: Option<Arc<SiteTls>>,
    server: Option<tokio_rustls::TlsAcceptor>,
}

/// Load every site's TLS files (what `check-config` also verifies).
fn prepare_tls(config: &Config) -> Result<Vec<SiteTlsParts>, StartError> {
    config
        .sites
        .iter()
        .map(|site| {
            let err = |source| StartError::Tls { site: site.name.clone(), source };
            let client = match &site.address {
                SiteAddress::Tls { host, .. } => Some(Arc::new(SiteTls::new(&site.params.tls, host).map_err(err)?)),
                _ => None,
            };
            let server = match site.listen.as_ref().and_then(|l| l.tls.as_ref()) {
                Some(t) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(t).map_err(err)?)),
                None => None,
            };
            Ok(SiteTlsParts { client, server })
        })
        .collect()
}

/// Check what can be checked without binding anything: TLS files.
pub fn check(config: &Config) -> Result<(), StartError> {
    prepare_tls(config).map(|_| ())
}

/// The running daemon.
pub struct App {
    config: Config,
    sites: Vec<SiteHandle>,
    budget: std::sync::Arc<crate::spool::SpoolBudget>,
    cache: Arc<crate::cache::Cache>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// The site actors stop only after the sessions (and the final state
    /// file, which needs their snapshots).
    sites_stop: CancellationToken,
    sites_tracker: TaskTracker,
    /// The socket files this daemon bound (removed at exit if still its own).
    sockets: Vec<listener::SocketFile>,
}

impl App {
    /// Bind all sockets, then start every site, listener and the state writer.
    pub async fn start(config: Config) -> Result<App, StartError> {
        let tls = prepare_tls(&config)?;
        create_dir(&config.socket_dir)?;
        if config.spool.disk_budget > 0 {
            prepare_spool_dir(&config.spool.dir)?;
        }
        if let Some(dir) = config.state_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_dir(dir)?;
            // The state file is written atomically through a temporary file
            // beside it: prove that works now rather than warn every 5 s.
            tempfile::tempfile_in(dir).map_err(|source| StartError::StateDir { path: dir.to_owned(), source })?;
        }
        let mut bound = Vec::with_capacity(config.sites.len());
        for site in &config.sites {
            let path = config.socket_path(&site.name);
            let result = listener::bind(&path).and_then(|(unix, file)| {
                let tcp = site.listen.as_ref().map(listener::bind_tcp).transpose();
                if tcp.is_err() {
                    file.remove();
                }
                Ok((unix, file, tcp?))
            });
            match result {
                Ok(b) => bound.push(b),
                Err(e) => {
                    for (_, file, _) in &bound {
                        file.remove();
                    }
                    return Err(e.into());
                }
            }
        }
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (sites_stop, sites_tracker) = (CancellationToken::new(), TaskTracker::new());
        let sockets: Vec<listener::SocketFile> = bound.iter().map(|(_, file, _)| file.clone()).collect();
        let budget = crate::spool::SpoolBudget::new(config.spool.clone());
        let cache = crate::cache::Cache::new(config.cache_budget, config.cache_max_entry);
        let mut sites = Vec::with_capacity(config.sites.len());
        for ((site, (l, file, tcp)), tls) in config.sites.iter().zip(bound).zip(tls) {
            let handle = SiteHandle::spawn(site.clone(), tls.client, cache.clone(), sites_stop.clone(), &sites_tracker);
            let ctx = listener::Accepting {
                site: handle.clone(),
                shutdown: shutdown.clone(),
                tracker: tracker.clone(),
                budget: budget.clone(),
                limit: std::sync::Arc::new(tokio::sync::Semaphore::new(site.params.max_clients)),
                cache: cache.clone(),
            };
            use tracing::Instrument;
            if let (Some(t), Some(listen)) = (tcp, site.listen.clone()) {
                let addr = t.local_addr().map_or_else(|_| listen.addr.to_string(), |a| a.to_string());
                if let Ok(a) = t.local_addr() {
                    handle.set_listen_addr(a);
                    tracing::info!(site = %site.name, addr = %a, "TCP listener ready");
                }
                let span = tracing::info_span!("listen", site = %site.name, on = %addr);
                tracker.spawn(listener::serve_tcp(t, listen, tls.server, ctx.clone()).instrument(span));
            }
            let span = tracing::info_span!("listen", site = %site.name, on = %file.path().display());
            tracker.spawn(listener::serve_unix(l, file, ctx).instrument(span));
            sites.push(handle);
        }
        if let Some(inv) = config.inventory.clone() {
            let span = tracing::info_span!("inventory");
            tracker.spawn(tracing::Instrument::instrument(
                crate::inventory::run(inv, sites.clone(), shutdown.clone()),
                span,
            ));
        }
        tracker.spawn(crate::state::run(
            config.state_file.clone(),
            config.state_interval,
            sites.clone(),
            budget.clone(),
            cache.clone(),
            shutdown.clone(),
        ));
        tracing::info!(sites = sites.len(), socket_dir = %config.socket_dir.display(), "livemux started");
        Ok(App { config, sites, budget, cache, shutdown, tracker, sites_stop, sites_tracker, sockets })
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// All sites, in configuration order.
    pub fn sites(&self) -> &[SiteHandle] {
        &self.sites
    }

    /// How much of the spool budget is in use.
    pub fn spool_usage(&self) -> crate::spool::SpoolUsage {
        self.budget.usage()
    }

    /// A site's cache counters.
    pub fn cache_stats(&self, site: &str) -> crate::cache::CacheStats {
        self.cache.stats(site)
    }

    /// A site by name.
    pub fn site(&self, name: &str) -> Option<&SiteHandle> {
        self.sites.iter().find(|s| s.name() == name)
    }

    /// Stop: refuse new clients, let responses in progress finish within
    /// `shutdown_grace`, write the state file (while the site actors can
    /// still describe themselves), stop the sites, remove the sockets.
    pub async fn shutdown(self) {
        tracing::info!("livemux shutting down");
        self.shutdown.cancel();
        self.tracker.close();
        let grace = self.config.shutdown_grace;
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(
                "shutdown grace period of {} passed with work in progress; stopping anyway",
                fmt_duration(grace)
            );
        }
        crate::state::write(&self.config.state_file, &self.sites, &self.budget).await;
        self.sites_stop.cancel();
        self.sites_tracker.close();
        if tokio::time::timeout(SITES_STOP_TIMEOUT, self.sites_tracker.wait()).await.is_err() {
            tracing::debug!("site actors still finishing; stopping anyway");
        }
        for file in &self.sockets {
            file.remove();
        }
    }
}

/// How long shutdown waits for the site actors once the sessions are done.
const SITES_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Create the spool directory (0700) and prove a spool file can be made in it.
fn prepare_spool_dir(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    create_dir(dir)?;
    let check = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .and_then(|()| tempfile::tempfile_in(dir).map(drop));
    check.map_err(|source| StartError::Spool { path: dir.to_owned(), source })
}

fn create_dir(path: &std::path::Path) -> Result<(), StartError> {
    std::fs::create_dir_all(path).map_err(|source| StartError::Dir { path: path.to_owned(), source })
}
