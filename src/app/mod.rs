//! Assembling the daemon: config → bind → spawn → run → bounded drain.
//!
//! [`App::start`] binds every site's socket before anything else runs, so a
//! configuration that cannot be served fails at once and leaves nothing
//! behind. [`App::shutdown`] stops accepting, lets sessions finish the
//! responses they are sending (up to `shutdown_grace`), writes the state file
//! a last time and removes the sockets.

mod reload;

pub use reload::ReloadReport;

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::listener::{self, BindError};
use std::sync::Arc;

use crate::config::{Config, SiteAddress, SiteConfig};
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

/// Check what can be checked without binding anything: TLS files (the
/// sites' and their listeners', the federations' listeners').
pub fn check(config: &Config) -> Result<(), StartError> {
    prepare_tls(config)?;
    for f in &config.federations {
        if let Some(t) = f.listen.as_ref().and_then(|l| l.tls.as_ref()) {
            crate::tls::server_config(t).map_err(|source| StartError::Tls { site: f.name.clone(), source })?;
        }
    }
    Ok(())
}

/// The running daemon.
pub struct App {
    config: Config,
    sites: Vec<SiteRuntime>,
    /// The budgets and the cache every client session uses.
    shared: crate::client::Shared,
    /// Stops every listener and idle session; each site's own token is a child.
    shutdown: CancellationToken,
    /// The daemon's own tasks (state writer, inventory).
    tracker: TaskTracker,
    /// The site actors stop only after the sessions (and the final state
    /// file, which needs their snapshots); each site's token is a child.
    sites_stop: CancellationToken,
    sites_tracker: TaskTracker,
    /// Sites removed by a reload, finishing their answers.
    retiring: TaskTracker,
    /// The site list the state file shows.
    list: tokio::sync::watch::Sender<Arc<Vec<SiteHandle>>>,
    state: crate::state::StateSource,
    inventory: Option<tokio::sync::mpsc::Sender<crate::inventory::Control>>,
    /// Where `/metrics` is served.
    metrics_addr: Option<std::net::SocketAddr>,
    /// The federated sockets, in configuration order.
    federations: Vec<FederationRuntime>,
    /// Federations removed by a reload, finishing their answers.
    retiring_federations: TaskTracker,
}

/// One federation at run time: its socket, listeners and sessions.
struct FederationRuntime {
    fed: Arc<crate::federation::Federation>,
    socket: listener::SocketFile,
    /// Stops its listeners and idle sessions.
    stop: CancellationToken,
    /// Its sessions.
    sessions: TaskTracker,
    tcp: Option<FederationTcp>,
}

/// A federation's running TCP listener.
struct FederationTcp {
    /// The configured address (a reload with another one rebinds; other
    /// settings change in place).
    addr: std::net::SocketAddr,
    /// As bound (the port when 0 was asked for).
    bound: Option<std::net::SocketAddr>,
    settings: crate::federation::TcpSettings,
    stop: CancellationToken,
}

/// A federation's sockets and TLS, bound and not yet served.
type BoundFederation = (
    tokio::net::UnixListener,
    listener::SocketFile,
    Option<tokio::net::TcpListener>,
    Option<tokio_rustls::TlsAcceptor>,
);

/// Bind a federation's UNIX socket and TCP listener (both or neither), with
/// its TLS settings.
fn bind_federation(config: &Config, f: &crate::config::FederationConfig) -> Result<BoundFederation, StartError> {
    let tls = match f.listen.as_ref().and_then(|l| l.tls.as_ref()) {
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(
            crate::tls::server_config(t).map_err(|source| StartError::Tls { site: f.name.clone(), source })?,
        )),
        None => None,
    };
    let (unix, file) = listener::bind(&config.socket_path(&f.name), &f.client.socket)?;
    match f.listen.as_ref().map(listener::bind_tcp).transpose() {
        Ok(tcp) => Ok((unix, file, tcp, tls)),
        Err(e) => {
            file.remove();
            Err(e.into())
        }
    }
}

/// One site at run time: its actor, socket, listeners and sessions.
struct SiteRuntime {
    config: SiteConfig,
    handle: SiteHandle,
    socket: listener::SocketFile,
    /// Stops this site's listeners and idle sessions.
    stop: CancellationToken,
    /// This site's listeners and sessions.
    sessions: TaskTracker,
    /// Stops this site's actor.
    actor_stop: CancellationToken,
    limit: Arc<listener::ClientLimit>,
    tcp: Option<TcpRuntime>,
}

/// A site's running TCP listener.
struct TcpRuntime {
    addr: std::net::SocketAddr,
    settings: listener::SharedTcpSettings,
    stop: CancellationToken,
}

/// A site's sockets, bound and not yet served.
type Bound = (tokio::net::UnixListener, listener::SocketFile, Option<tokio::net::TcpListener>);

/// Bind a site's UNIX socket and its TCP listener (both or neither).
fn bind_site(config: &Config, site: &SiteConfig) -> Result<Bound, BindError> {
    let path = config.socket_path(&site.name);
    let (unix, file) = listener::bind(&path, &site.params.socket)?;
    match site.listen.as_ref().map(listener::bind_tcp).transpose() {
        Ok(tcp) => Ok((unix, file, tcp)),
        Err(e) => {
            file.remove();
            Err(e)
        }
    }
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
        let metrics = match config.metrics_listen {
            Some(addr) => {
                let listen = crate::config::TcpListen { addr, only_from: Vec::new(), tls: None };
                Some(listener::bind_tcp(&listen)?)
            }
            None => None,
        };
        let mut bound = Vec::with_capacity(config.sites.len());
        for site in &config.sites {
            match bind_site(&config, site) {
                Ok(b) => bound.push(b),
                Err(e) => {
                    for (_, file, _) in &bound {
                        file.remove();
                    }
                    return Err(e.into());
                }
            }
        }
        let mut federated = Vec::with_capacity(config.federations.len());
        for f in &config.federations {
            match bind_federation(&config, f) {
                Ok(b) => federated.push(b),
                Err(e) => {
                    for (_, file, _) in &bound {
                        file.remove();
                    }
                    for (_, file, _, _) in &federated {
                        file.remove();
                    }
                    return Err(e);
                }
            }
        }
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (sites_stop, sites_tracker) = (CancellationToken::new(), TaskTracker::new());
        let shared = crate::client::Shared {
            spool: crate::spool::SpoolBudget::new(config.spool.clone()),
            requests: crate::client::reader::RequestBudget::new(
                config.request_memory_budget,
                config.request_memory_wait,
            ),
            cache: crate::cache::Cache::new(config.cache_budget, config.cache_max_entry),
        };
        let (list, list_rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
        let state = crate::state::StateSource {
            sites: list_rx,
            budget: shared.spool.clone(),
            requests: shared.requests.clone(),
            cache: shared.cache.clone(),
            reloads: Default::default(),
            interval: config.state_interval,
            federations: Default::default(),
        };
        let mut app = App {
            config: config.clone(),
            sites: Vec::with_capacity(config.sites.len()),
            shared,
            shutdown,
            tracker,
            sites_stop,
            sites_tracker,
            retiring: TaskTracker::new(),
            list,
            state,
            inventory: None,
            metrics_addr: None,
            federations: Vec::new(),
            retiring_federations: TaskTracker::new(),
        };
        for ((site, b), tls) in config.sites.iter().zip(bound).zip(tls) {
            app.start_site(site.clone(), b, tls);
        }
        app.publish_sites();
        for (f, b) in config.federations.iter().zip(federated) {
            app.start_federation(f.clone(), b);
        }
        app.publish_federations();
        if let Some(inv) = config.inventory.clone() {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            app.inventory = Some(tx);
            let span = tracing::info_span!("inventory");
            app.tracker.spawn(tracing::Instrument::instrument(
                crate::inventory::run(inv, app.handles(), app.shutdown.clone(), rx),
                span,
            ));
        }
        app.tracker.spawn(crate::state::run(config.state_file.clone(), app.state.clone(), app.shutdown.clone()));
        if let Some(l) = metrics {
            if let Ok(a) = l.local_addr() {
                tracing::info!(addr = %a, "metrics served on http://{a}/metrics");
                app.metrics_addr = Some(a);
            }
            app.tracker.spawn(crate::metrics::serve(l, app.state.clone(), app.shutdown.clone()));
        }
        tracing::info!(sites = app.sites.len(), socket_dir = %config.socket_dir.display(), "livemux started");
        Ok(app)
    }

    /// Start a site on its bound sockets.
    fn start_site(&mut self, site: SiteConfig, (unix, socket, tcp): Bound, tls: SiteTlsParts) {
        use tracing::Instrument;
        let actor_stop = self.sites_stop.child_token();
        let handle = SiteHandle::spawn(
            site.clone(),
            tls.client,
            self.shared.cache.clone(),
            actor_stop.clone(),
            &self.sites_tracker,
        );
        let stop = self.shutdown.child_token();
        let sessions = TaskTracker::new();
        let limit = Arc::new(listener::ClientLimit::new(site.params.max_clients));
        let ctx = listener::Accepting {
            site: handle.clone(),
            shutdown: stop.clone(),
            tracker: sessions.clone(),
            shared: self.shared.clone(),
            limit: limit.clone(),
            failing: Default::default(),
        };
        let tcp = match (tcp, site.listen.clone()) {
            (Some(t), Some(listen)) => {
                let settings =
                    Arc::new(std::sync::RwLock::new(Arc::new(listener::TcpSettings { listen, tls: tls.server })));
                Some(spawn_tcp(t, settings, &ctx))
            }
            _ => None,
        };
        let span = tracing::info_span!("listen", site = %site.name, on = %socket.path().display());
        sessions.spawn(listener::serve_unix(unix, ctx).instrument(span));
        self.sites.push(SiteRuntime { config: site, handle, socket, stop, sessions, actor_stop, limit, tcp });
    }

    fn handles(&self) -> Vec<SiteHandle> {
        self.sites.iter().map(|s| s.handle.clone()).collect()
    }

    fn publish_sites(&self) {
        self.list.send_replace(Arc::new(self.handles()));
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The metrics listener's address (with its port when 0 was asked for).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// A federation's TCP listener address (with its port when 0 was asked for).
    pub fn federation_addr(&self, name: &str) -> Option<std::net::SocketAddr> {
        self.federations.iter().find(|f| f.fed.name == name).and_then(|f| f.tcp.as_ref()).and_then(|t| t.bound)
    }

    /// Serve a bound federation: its socket, its TCP listener, its sessions.
    fn start_federation(&mut self, f: crate::config::FederationConfig, bound: BoundFederation) {
        let (unix, file, tcp, tls) = bound;
        let sites = f.sites.iter().filter_map(|n| self.site(n)).collect();
        let config = &self.config;
        let spool_dir = if config.spool.disk_budget > 0 { config.spool.dir.clone() } else { std::env::temp_dir() };
        let fed = Arc::new(crate::federation::Federation::new(
            f.clone(),
            sites,
            config.federation_sort_budget,
            spool_dir,
            &self.shared,
        ));
        let stop = self.shutdown.child_token();
        let sessions = TaskTracker::new();
        let tcp = match (tcp, f.listen.clone()) {
            (Some(t), Some(listen)) => Some(self.serve_federation_tcp(&fed, t, listen, tls, &sessions)),
            _ => None,
        };
        let span = tracing::info_span!("listen", federation = %f.name, on = %file.path().display());
        let serve = crate::federation::serve(unix, fed.clone(), stop.clone(), sessions.clone());
        self.tracker.spawn(tracing::Instrument::instrument(serve, span));
        self.federations.push(FederationRuntime { fed, socket: file, stop, sessions, tcp });
    }

    /// Serve a federation's bound TCP listener (stopped with the
    /// federation, or alone when a reload moves it).
    fn serve_federation_tcp(
        &self,
        fed: &Arc<crate::federation::Federation>,
        t: tokio::net::TcpListener,
        listen: crate::config::TcpListen,
        tls: Option<tokio_rustls::TlsAcceptor>,
        sessions: &TaskTracker,
    ) -> FederationTcp {
        let bound = t.local_addr().ok();
        let on = bound.map_or_else(|| listen.addr.to_string(), |a| a.to_string());
        tracing::info!(federation = %fed.name, addr = %on, "federated TCP listener ready");
        let span = tracing::info_span!("listen", federation = %fed.name, on = %on);
        let stop = self.shutdown.child_token();
        let addr = listen.addr;
        let settings = Arc::new(std::sync::RwLock::new((listen, tls)));
        let serve = crate::federation::serve_tcp(t, settings.clone(), fed.clone(), stop.clone(), sessions.clone());
        self.tracker.spawn(tracing::Instrument::instrument(serve, span));
        FederationTcp { addr, bound, settings, stop }
    }

    /// The federations the state file shows.
    fn publish_federations(&self) {
        let feds = self.federations.iter().map(|f| f.fed.clone()).collect();
        *self.state.federations.write().unwrap_or_else(|e| e.into_inner()) = feds;
    }

    /// All sites, in configuration order.
    pub fn sites(&self) -> Vec<SiteHandle> {
        self.handles()
    }

    /// How much of the request budget is in use.
    pub fn request_usage(&self) -> crate::client::reader::RequestUsage {
        self.shared.requests.usage()
    }

    /// How much of the spool budget is in use.
    pub fn spool_usage(&self) -> crate::spool::SpoolUsage {
        self.shared.spool.usage()
    }

    /// A site's cache counters.
    pub fn cache_stats(&self, site: &str) -> crate::cache::CacheStats {
        self.shared.cache.stats(site)
    }

    /// A site by name.
    pub fn site(&self, name: &str) -> Option<SiteHandle> {
        self.sites.iter().find(|s| s.handle.name() == name).map(|s| s.handle.clone())
    }

    async fn inventory_control(&self, c: crate::inventory::Control) {
        if let Some(tx) = &self.inventory {
            let _ = tx.send(c).await;
        }
    }

    /// Stop: refuse new clients, let responses in progress finish within
    /// `shutdown_grace`, write the state file (while the site actors can
    /// still describe themselves), stop the sites, remove the sockets.
    pub async fn shutdown(self) {
        tracing::info!("livemux shutting down");
        self.shutdown.cancel();
        self.tracker.close();
        let grace = self.config.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        let mut late = false;
        for s in &self.sites {
            s.sessions.close();
            late |= tokio::time::timeout_at(deadline, s.sessions.wait()).await.is_err();
        }
        for f in &self.federations {
            f.sessions.close();
            late |= tokio::time::timeout_at(deadline, f.sessions.wait()).await.is_err();
        }
        self.retiring_federations.close();
        late |= tokio::time::timeout_at(deadline, self.retiring_federations.wait()).await.is_err();
        late |= tokio::time::timeout_at(deadline, self.tracker.wait()).await.is_err();
        self.retiring.close();
        late |= tokio::time::timeout_at(deadline, self.retiring.wait()).await.is_err();
        if late {
            tracing::warn!(
                "shutdown grace period of {} passed with work in progress; stopping anyway",
                fmt_duration(grace)
            );
        }
        crate::state::write(&self.config.state_file, &self.state).await;
        self.sites_stop.cancel();
        self.sites_tracker.close();
        if tokio::time::timeout(SITES_STOP_TIMEOUT, self.sites_tracker.wait()).await.is_err() {
            tracing::debug!("site actors still finishing; stopping anyway");
        }
        for s in &self.sites {
            s.socket.remove();
        }
        for f in &self.federations {
            f.socket.remove();
        }
    }
}

/// Retire what a reload removed (a site or a federation): stop its
/// listeners now, and once its sessions are done (at most `grace`), run
/// `then` (its socket file goes) on `tracker`.
fn wind_down(
    tracker: &TaskTracker,
    grace: std::time::Duration,
    what: String,
    stop: &CancellationToken,
    tcp: Option<&CancellationToken>,
    sessions: TaskTracker,
    then: impl FnOnce() + Send + 'static,
) {
    stop.cancel();
    if let Some(t) = tcp {
        t.cancel();
    }
    sessions.close();
    tracker.spawn(async move {
        if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
            tracing::warn!("removed {what}: its answers did not finish within shutdown_grace");
        }
        then();
        tracing::info!("removed {what} stopped");
    });
}

/// Start serving a bound TCP listener.
fn spawn_tcp(
    t: tokio::net::TcpListener,
    settings: listener::SharedTcpSettings,
    ctx: &listener::Accepting,
) -> TcpRuntime {
    use tracing::Instrument;
    let site = ctx.site.name().to_owned();
    let addr = t.local_addr().ok();
    let shown = addr.map_or_else(String::new, |a| a.to_string());
    if let Some(a) = addr {
        ctx.site.set_listen_addr(a);
        tracing::info!(site = %site, addr = %a, "TCP listener ready");
    }
    let stop = CancellationToken::new();
    let span = tracing::info_span!("listen", site = %site, on = %shown);
    let configured = settings.read().unwrap_or_else(|e| e.into_inner()).listen.addr;
    ctx.tracker.spawn(listener::serve_tcp(t, settings.clone(), stop.clone(), ctx.clone()).instrument(span));
    TcpRuntime { addr: configured, settings, stop }
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
