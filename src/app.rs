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

/// Check what can be checked without binding anything: TLS files.
pub fn check(config: &Config) -> Result<(), StartError> {
    prepare_tls(config).map(|_| ())
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
    let (unix, file) = listener::bind(&config.socket_path(&f.name))?;
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
    let (unix, file) = listener::bind(&path)?;
    match site.listen.as_ref().map(listener::bind_tcp).transpose() {
        Ok(tcp) => Ok((unix, file, tcp)),
        Err(e) => {
            file.remove();
            Err(e)
        }
    }
}

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Sites added.
    pub added: Vec<String>,
    /// Sites removed (their answers in progress finish first).
    pub removed: Vec<String>,
    /// Sites whose settings changed in place.
    pub changed: Vec<String>,
    /// Sites with a new address or TLS settings: new channels.
    pub reconnected: Vec<String>,
    /// Sites left exactly as they were.
    pub kept: usize,
    /// Global keys that only a restart applies.
    pub needs_restart: Vec<&'static str>,
    /// Sites (and federations, as `federation NAME`) whose change could
    /// not be applied, and why.
    pub failed: Vec<(String, String)>,
    /// Federations added.
    pub federations_added: Vec<String>,
    /// Federations removed (their answers in progress finish first).
    pub federations_removed: Vec<String>,
    /// Federations whose definition changed (in place; their clients stay).
    pub federations_changed: Vec<String>,
}

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| if v.is_empty() { "none".to_owned() } else { v.join(", ") };
        write!(
            f,
            "added: {}; removed: {}; changed in place: {}; new channels: {}; kept: {}",
            list(&self.added),
            list(&self.removed),
            list(&self.changed),
            list(&self.reconnected),
            self.kept
        )?;
        let feds = [
            ("federations added", &self.federations_added),
            ("federations removed", &self.federations_removed),
            ("federations changed", &self.federations_changed),
        ];
        for (what, names) in feds {
            if !names.is_empty() {
                write!(f, "; {what}: {}", names.join(", "))?;
            }
        }
        if !self.needs_restart.is_empty() {
            write!(f, "; needs a restart to apply: {}", self.needs_restart.join(", "))?;
        }
        for (site, why) in &self.failed {
            write!(f, "; site '{site}' not applied: {why}")?;
        }
        Ok(())
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

    /// Apply the reloaded `[[federation]]` tables (after the sites, whose
    /// handles they take): an unchanged federation keeps its socket and
    /// clients (it only takes the sites' current handles); a changed one
    /// changes in place (its TCP listener rebound on a new `listen`); an
    /// added one is bound and served; a removed one stops accepting and its
    /// socket goes once its answers in progress are done.
    fn reload_federations(&mut self, new: &Config, report: &mut ReloadReport) {
        let keep: std::collections::HashSet<&str> = new.federations.iter().map(|f| f.name.as_str()).collect();
        let (gone, stay): (Vec<FederationRuntime>, Vec<FederationRuntime>) =
            std::mem::take(&mut self.federations).into_iter().partition(|f| !keep.contains(f.fed.name.as_str()));
        self.federations = stay;
        for f in gone {
            report.federations_removed.push(f.fed.name.clone());
            self.retire_federation(f);
        }
        for cfg in &new.federations {
            let sites: Vec<SiteHandle> = cfg.sites.iter().filter_map(|n| self.site(n)).collect();
            match self.federations.iter().position(|f| f.fed.name == cfg.name) {
                Some(i) => {
                    let old = self.federations[i].fed.setup().cfg.clone();
                    if old != *cfg {
                        if old.listen != cfg.listen
                            && let Err(why) = self.move_federation_tcp(i, cfg)
                        {
                            report.failed.push((format!("federation {}", cfg.name), why));
                            continue;
                        }
                        report.federations_changed.push(cfg.name.clone());
                    }
                    self.federations[i].fed.replace(cfg.clone(), sites);
                }
                None => match bind_federation(&self.config, cfg) {
                    Ok(b) => {
                        self.start_federation(cfg.clone(), b);
                        report.federations_added.push(cfg.name.clone());
                    }
                    Err(e) => report.failed.push((format!("federation {}", cfg.name), e.to_string())),
                },
            }
        }
        let order: Vec<&str> = new.federations.iter().map(|f| f.name.as_str()).collect();
        self.federations.sort_by_key(|f| order.iter().position(|n| *n == f.fed.name).unwrap_or(usize::MAX));
        self.publish_federations();
    }

    /// A federation's TCP listener for a changed `listen`: on the same
    /// address its settings change in place; on another the new one is
    /// bound before the old one stops (a failure leaves the old in place).
    fn move_federation_tcp(&mut self, i: usize, cfg: &crate::config::FederationConfig) -> Result<(), String> {
        let tls = match cfg.listen.as_ref().and_then(|l| l.tls.as_ref()) {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(t).map_err(|e| e.to_string())?)),
            None => None,
        };
        if let (Some(t), Some(l)) = (&self.federations[i].tcp, &cfg.listen)
            && t.addr == l.addr
        {
            *t.settings.write().unwrap_or_else(|e| e.into_inner()) = (l.clone(), tls);
            return Ok(());
        }
        let fresh = match &cfg.listen {
            Some(l) => Some((listener::bind_tcp(l).map_err(|e| e.to_string())?, l.clone(), tls)),
            None => None,
        };
        let rt = &self.federations[i];
        let tcp = fresh.map(|(t, l, tls)| self.serve_federation_tcp(&rt.fed, t, l, tls, &rt.sessions));
        if let Some(old) = std::mem::replace(&mut self.federations[i].tcp, tcp) {
            old.stop.cancel();
        }
        Ok(())
    }

    /// A removed federation: stop accepting now; once its sessions are done
    /// (at most `shutdown_grace`) its socket file goes.
    fn retire_federation(&self, f: FederationRuntime) {
        let tcp = f.tcp.as_ref().map(|t| &t.stop);
        let what = format!("federation '{}'", f.fed.name);
        wind_down(
            &self.retiring_federations,
            self.config.shutdown_grace,
            what,
            &f.stop,
            tcp,
            f.sessions.clone(),
            move || {
                f.socket.remove();
            },
        );
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

    /// Apply a new, validated configuration without a restart: unchanged
    /// sites are not touched; changed ones get their new settings in place
    /// (a new address or TLS settings: new channels, while queries in
    /// flight finish on the old ones); added sites are bound and started;
    /// removed sites stop accepting and go once their answers in progress
    /// are done (up to `shutdown_grace`). Global keys that need a restart
    /// are reported and otherwise ignored. One log line says what happened.
    pub async fn reload(&mut self, new: Config) -> ReloadReport {
        let mut report = ReloadReport { needs_restart: restart_keys(&self.config, &new), ..Default::default() };
        // Removed sites first: their names (and sockets) may be reused.
        let keep: std::collections::HashSet<&str> = new.sites.iter().map(|s| s.name.as_str()).collect();
        let (gone, stay): (Vec<SiteRuntime>, Vec<SiteRuntime>) =
            std::mem::take(&mut self.sites).into_iter().partition(|s| !keep.contains(s.config.name.as_str()));
        self.sites = stay;
        for site in gone {
            report.removed.push(site.config.name.clone());
            self.inventory_control(crate::inventory::Control::Stop(site.config.name.clone())).await;
            self.retire(site);
        }
        let mut order = Vec::with_capacity(new.sites.len());
        for cfg in &new.sites {
            let name = cfg.name.clone();
            match self.sites.iter().position(|s| s.config.name == name) {
                Some(i) if self.sites[i].config == *cfg => report.kept += 1,
                Some(i) => match self.change_site(i, cfg.clone()).await {
                    Ok(reconnect) => {
                        if reconnect {
                            report.reconnected.push(name.clone())
                        } else {
                            report.changed.push(name.clone())
                        }
                    }
                    Err(why) => report.failed.push((name.clone(), why)),
                },
                None => {
                    let added = prepare_tls(&Config { sites: vec![cfg.clone()], ..new.clone() })
                        .map_err(|e| e.to_string())
                        .and_then(|mut t| {
                            let b = bind_site(&self.config, cfg).map_err(|e| e.to_string())?;
                            Ok((b, t.remove(0)))
                        });
                    match added {
                        Ok((b, tls)) => {
                            self.start_site(cfg.clone(), b, tls);
                            report.added.push(name.clone());
                            if new.inventory.is_some() && cfg.params.inventory {
                                let h = self.sites.last().map(|s| s.handle.clone());
                                if let Some(h) = h {
                                    self.inventory_control(crate::inventory::Control::Start(h)).await;
                                }
                            }
                        }
                        Err(why) => report.failed.push((name.clone(), why)),
                    }
                }
            }
            order.push(name);
        }
        // Configuration order, as in the file.
        self.sites.sort_by_key(|s| order.iter().position(|n| *n == s.config.name).unwrap_or(usize::MAX));
        self.publish_sites();
        // What applies in place of the global keys.
        self.config.shutdown_grace = new.shutdown_grace;
        self.config.request_memory_budget = new.request_memory_budget;
        self.config.request_memory_wait = new.request_memory_wait;
        self.shared.requests.set(new.request_memory_budget, new.request_memory_wait);
        self.config.sites = self.sites.iter().map(|s| s.config.clone()).collect();
        self.reload_federations(&new, &mut report);
        self.config.federations = self.federations.iter().map(|f| f.fed.setup().cfg.clone()).collect();
        report
    }

    /// A changed site: settings in place, new channels for a new address
    /// or TLS settings, the TCP listener adjusted. `Ok(true)` if the
    /// channels are replaced.
    async fn change_site(&mut self, i: usize, cfg: SiteConfig) -> Result<bool, String> {
        let parts = prepare_tls(&Config { sites: vec![cfg.clone()], ..self.config.clone() })
            .map_err(|e| e.to_string())?
            .remove(0);
        let site = &mut self.sites[i];
        let old = site.config.clone();
        let reconnect = old.address != cfg.address || old.params.tls != cfg.params.tls;
        // The TCP listener: rebind on a new address, else settings in place.
        match (&mut site.tcp, cfg.listen.clone()) {
            (Some(t), Some(listen)) if t.addr == listen.addr => {
                *t.settings.write().unwrap_or_else(|e| e.into_inner()) =
                    Arc::new(listener::TcpSettings { listen, tls: parts.server });
            }
            (current, want) => {
                let fresh = match &want {
                    Some(l) => Some(listener::bind_tcp(l).map_err(|e| e.to_string())?),
                    None => None,
                };
                if let Some(t) = current.take() {
                    t.stop.cancel();
                }
                if let (Some(t), Some(listen)) = (fresh, want) {
                    let ctx = listener::Accepting {
                        site: site.handle.clone(),
                        shutdown: site.stop.clone(),
                        tracker: site.sessions.clone(),
                        shared: self.shared.clone(),
                        limit: site.limit.clone(),
                        failing: Default::default(),
                    };
                    let settings =
                        Arc::new(std::sync::RwLock::new(Arc::new(listener::TcpSettings { listen, tls: parts.server })));
                    site.tcp = Some(spawn_tcp(t, settings, &ctx));
                }
            }
        }
        site.limit.set(cfg.params.max_clients);
        site.handle.reconfigure(cfg.clone(), parts.client).await;
        site.config = cfg.clone();
        let handle = site.handle.clone();
        if self.config.inventory.is_some() {
            if !cfg.params.inventory {
                self.inventory_control(crate::inventory::Control::Stop(cfg.name.clone())).await;
            } else if reconnect || !old.params.inventory {
                self.inventory_control(crate::inventory::Control::Start(handle)).await;
            }
        }
        Ok(reconnect)
    }

    async fn inventory_control(&self, c: crate::inventory::Control) {
        if let Some(tx) = &self.inventory {
            let _ = tx.send(c).await;
        }
    }

    /// A removed site: stop accepting now; once its sessions are done (at
    /// most `shutdown_grace`) its socket file goes and its actor stops.
    fn retire(&self, site: SiteRuntime) {
        let tcp = site.tcp.as_ref().map(|t| &t.stop);
        let what = format!("site '{}'", site.config.name);
        wind_down(
            &self.retiring,
            self.config.shutdown_grace,
            what,
            &site.stop,
            tcp,
            site.sessions.clone(),
            move || {
                site.socket.remove();
                site.actor_stop.cancel();
            },
        );
    }

    /// Record a reload's outcome (state file) and log it.
    pub fn note_reload(&self, outcome: Result<&ReloadReport, String>) {
        let mut r = self.state.reloads.lock().unwrap_or_else(|e| e.into_inner());
        let at = crate::site::timestamp(std::time::SystemTime::now());
        match outcome {
            Ok(report) if report.failed.is_empty() => {
                r.ok += 1;
                tracing::info!("configuration reloaded: {report}");
                r.last = Some(crate::state::LastReload { at, ok: true, message: report.to_string() });
            }
            Ok(report) => {
                r.failed += 1;
                tracing::error!("configuration reloaded in part: {report}");
                r.last = Some(crate::state::LastReload { at, ok: false, message: report.to_string() });
            }
            Err(why) => {
                r.failed += 1;
                tracing::error!("configuration not reloaded, still running on the previous one:\n{why}");
                r.last = Some(crate::state::LastReload { at, ok: false, message: why });
            }
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

/// Global keys that differ and only a restart applies.
fn restart_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |differs: bool, key: &'static str| {
        if differs {
            keys.push(key);
        }
    };
    check(old.socket_dir != new.socket_dir, "socket_dir");
    check(old.state_file != new.state_file, "state_file");
    check(old.state_interval != new.state_interval, "state_interval");
    check(old.worker_threads != new.worker_threads, "worker_threads");
    check(old.spool != new.spool, "spool_*");
    check(old.cache_budget != new.cache_budget, "cache_budget");
    check(old.cache_max_entry != new.cache_max_entry, "cache_max_entry");
    check(old.inventory != new.inventory, "inventory");
    check(old.pid_file != new.pid_file, "pid_file");
    check(old.metrics_listen != new.metrics_listen, "metrics_listen");
    check(old.federation_sort_budget != new.federation_sort_budget, "federation_sort_budget");
    keys
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
