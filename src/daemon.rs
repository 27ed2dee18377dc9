//! `livemux run`: the daemon's life around [`App`]: the pid file, systemd's
//! notify protocol (readiness, reloads, stopping, status, watchdog), and the
//! signals: SIGTERM/SIGINT stop it, SIGHUP reloads the configuration file.
//!
//! A reload reads and validates the whole file first (on the blocking
//! pool); an invalid file is logged with every problem's key and line and
//! recorded in the state file, and the daemon runs on with the old
//! configuration. systemd sees `RELOADING=1` (with `MONOTONIC_USEC`) and
//! `READY=1` around it, so `Type=notify-reload` works.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_notify::NotifyState;

use crate::app::{App, StartError};
use crate::config::Config;

/// The pid file: refused when a live process holds it, written once the
/// sockets are bound, removed at exit.
#[derive(Debug)]
pub struct PidFile(PathBuf);

/// The pid file could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PidError {
    /// Another process lives under the pid in it.
    #[error("pid file {path} names process {pid}, which is running (is another livemux running?)")]
    Held {
        /// The file.
        path: PathBuf,
        /// Its pid.
        pid: i32,
    },
    /// It could not be written.
    #[error("cannot write pid file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// The pid a pid file names, if it names a live process (other than us).
pub fn live_pid(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    if pid <= 0 || pid as u32 == std::process::id() {
        return None;
    }
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None);
    // EPERM: it exists, owned by someone else.
    matches!(alive, Ok(()) | Err(nix::errno::Errno::EPERM)).then_some(pid)
}

impl PidFile {
    /// Refuse if a live process holds `path`; else write our pid (atomically).
    pub fn create(path: &Path) -> Result<PidFile, PidError> {
        if let Some(pid) = live_pid(path) {
            return Err(PidError::Held { path: path.to_owned(), pid });
        }
        let io_err = |source| PidError::Io { path: path.to_owned(), source };
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let mut tmp = tempfile::Builder::new().prefix(".livemux-pid.").tempfile_in(dir).map_err(io_err)?;
        use std::io::Write;
        writeln!(tmp, "{}", std::process::id()).map_err(io_err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(io_err)?;
        }
        tmp.persist(path).map_err(|e| io_err(e.error))?;
        Ok(PidFile(path.to_owned()))
    }

    /// Remove the file if it still names us.
    pub fn remove(&self) {
        let ours = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .is_some_and(|p| p == std::process::id());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Tell systemd (when `NOTIFY_SOCKET` is set; otherwise nothing happens).
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot notify the service manager");
    }
}

/// One line for systemd's `STATUS=`: how many sites are ready.
fn status_line(app: &App) -> String {
    let sites = app.sites();
    let ready = sites.iter().filter(|s| s.status().state == crate::site::SiteState::Ready).count();
    let down = sites.iter().filter(|s| s.status().state == crate::site::SiteState::Down).count();
    format!("{} sites: {ready} ready, {down} down, {} starting", sites.len(), sites.len() - ready - down)
}

/// Signals the daemon reacts to.
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// Install the handlers; before start-up, so that a SIGHUP during it does
/// not kill the daemon.
fn install_signals() -> io::Result<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok(Signals { term: signal(SignalKind::terminate())?, hup: signal(SignalKind::hangup())? })
}

/// Why `livemux run` could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The daemon did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The pid file is held or cannot be written.
    #[error(transparent)]
    Pid(#[from] PidError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
}

/// Run the daemon until SIGTERM or SIGINT; `path` is re-read on SIGHUP.
pub async fn run(path: PathBuf, config: Config) -> Result<(), RunError> {
    let mut signals = install_signals().map_err(RunError::Signals)?;
    if let Some(p) = &config.pid_file
        && let Some(pid) = live_pid(p)
    {
        return Err(PidError::Held { path: p.clone(), pid }.into());
    }
    let state_interval = config.state_interval;
    let mut app = App::start(config.clone()).await?;
    let pid = match config.pid_file.as_deref().map(PidFile::create).transpose() {
        Ok(p) => p,
        Err(e) => {
            app.shutdown().await;
            return Err(e.into());
        }
    };
    say_if_idle(&app, &path);
    notify(&[NotifyState::Ready, NotifyState::Status(&status_line(&app))]);
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut beat = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut status = tokio::time::interval(state_interval);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = signals.term.recv() => break,
            _ = signals.hup.recv() => reload(&mut app, &path).await,
            // Sent from the runtime's own loop: a stuck runtime stops it.
            _ = beat.tick(), if watchdog.is_some() => notify(&[NotifyState::Watchdog]),
            _ = status.tick() => notify(&[NotifyState::Status(&status_line(&app))]),
        }
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    app.shutdown().await;
    if let Some(p) = pid {
        p.remove();
    }
    Ok(())
}

/// With no `[[site]]` the daemon runs and serves nothing: say so, and what
/// to add (the packaged default configuration starts this way).
fn say_if_idle(app: &App, path: &Path) {
    if app.sites().is_empty() {
        tracing::warn!(
            "no [[site]] is configured, so there is nothing to serve: add a [[site]] table with its name and \
             address (name = \"berlin\", address = \"tcp://10.0.1.5:6557\") to {} and reload (systemctl reload \
             livemux, or SIGHUP)",
            path.display()
        );
    }
}

/// SIGHUP: read and validate the file, then apply it (or keep the old one).
async fn reload(app: &mut App, path: &Path) {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
    tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
    let p = path.to_owned();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&p)).await;
    match loaded {
        Ok(Ok(new)) => {
            let report = app.reload(new).await;
            app.note_reload(Ok(&report));
            say_if_idle(app, path);
        }
        Ok(Err(errors)) => {
            let lines: Vec<String> = errors.0.iter().map(|e| format!("{}: {e}", path.display())).collect();
            app.note_reload(Err(lines.join("\n")));
        }
        Err(e) => app.note_reload(Err(format!("reading the configuration failed: {e}"))),
    }
    notify(&[NotifyState::Ready, NotifyState::Status(&status_line(app))]);
}

/// `livemux reload --config FILE`: SIGHUP to the daemon named by the
/// configuration's pid file.
pub fn signal_reload(config: &Config) -> Result<i32, String> {
    let Some(path) = &config.pid_file else {
        return Err("the configuration sets no pid_file, so the daemon cannot be found; \
                    send SIGHUP to its process yourself"
            .into());
    };
    let Some(pid) = live_pid(path) else {
        return Err(format!("no running livemux: {} is missing or names no live process", path.display()));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
        .map_err(|e| format!("cannot signal process {pid}: {e}"))?;
    Ok(pid)
}
