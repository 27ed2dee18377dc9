//! Binding a site's UNIX socket (and TCP listener) and accepting its clients.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::AsFd;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::session::{ClientStream, Peer, Session, client_span};
use crate::config::{SocketOwnership, TcpListen};
use crate::site::SiteHandle;
use livemux_protocol::{Status, error_response};

/// Pause after a failed `accept()` (e.g. out of file descriptors), so the
/// loop does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// How long a client refused for `max_clients` gets to read its error.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process is serving this socket.
    #[error("{0} is in use by another running process (is another livemux running?)")]
    InUse(PathBuf),
    /// A file that is not a socket is in the way.
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// A TCP listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Tcp {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket file's mode or group could not be set.
    #[error(
        "cannot give {path} mode {mode:04o}{}: {source}{}",
        group.map_or_else(String::new, |g| format!(" and group {g}")),
        if group.is_some() {
            " (to give a socket a group, livemux must run as root or be a member of that group)"
        } else {
            ""
        }
    )]
    Ownership {
        /// Socket path.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
        /// The group id asked for.
        group: Option<u32>,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket file is no longer the one this daemon bound.
    #[error("{0} was replaced by another process since livemux bound it; its mode and group are left alone")]
    Replaced(PathBuf),
    /// The OS refused.
    #[error("cannot bind {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A socket file this daemon bound, known by its inode: removing it never
/// removes a socket another daemon has bound at the same path since (a
/// successor started while this one was still finishing its answers).
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and change time (an inode number may be reused at once).
    id: (u64, u64, i64, i64),
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Give the socket file a new mode and group (a reload), if it is still
    /// the one this daemon bound. `was` is what it has now: a group set
    /// before and now unset goes back to livemux's own.
    pub fn set_ownership(&mut self, was: &SocketOwnership, now: &SocketOwnership) -> Result<(), BindError> {
        let io_err = |source| BindError::Io { path: self.path.clone(), source };
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if identity(&m) == self.id => {}
            Ok(_) => return Err(BindError::Replaced(self.path.clone())),
            Err(e) => return Err(io_err(e)),
        }
        let group = now.group.or_else(|| was.group.map(|_| nix::unistd::getegid().as_raw()));
        apply(&self.path, now.mode, group)?;
        // chmod and chown change the file's ctime, part of its identity.
        let meta = std::fs::symlink_metadata(&self.path).map_err(io_err)?;
        self.id = identity(&meta);
        Ok(())
    }

    /// Remove the file if it is still the one this daemon bound.
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if identity(&m) == self.id => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => {
                tracing::debug!(path = %self.path.display(), "socket file replaced by another process; left in place")
            }
            Err(_) => {}
        }
    }
}

/// Set a socket file's mode and (when given) group; the owner stays.
fn apply(path: &Path, mode: u32, group: Option<u32>) -> Result<(), BindError> {
    let err = |source| BindError::Ownership { path: path.to_owned(), mode, group, source };
    // The group first: while it changes, the mode is still the one the
    // socket was made with, or the old one. No chown when the file has the
    // group already (made in a set-group-ID directory of that group, say):
    // a sandbox may forbid the system call.
    if let Some(gid) = group {
        use std::os::unix::fs::MetadataExt;
        let has = std::fs::symlink_metadata(path).map_err(err)?.gid();
        if has != gid {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

/// Bind `path` with `owner`'s mode and group, replacing a stale socket
/// file (nobody listening: the connect is refused) but never a live one,
/// nor one whose state is unclear.
pub fn bind(path: &Path, owner: &SocketOwnership) -> Result<(UnixListener, SocketFile), BindError> {
    let io_err = |source| BindError::Io { path: path.to_owned(), source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match probe(path) {
            Probe::Stale => std::fs::remove_file(path).map_err(io_err)?,
            Probe::Live => return Err(BindError::InUse(path.to_owned())),
            Probe::Unclear(e) => return Err(io_err(e)),
        },
        Ok(_) => return Err(BindError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    let made = apply(path, owner.mode, owner.group).and_then(|()| std::fs::symlink_metadata(path).map_err(io_err));
    match made {
        Ok(meta) => Ok((listener, SocketFile { path: path.to_owned(), id: identity(&meta) })),
        Err(e) => {
            // Nobody serves it: a file left behind would only be stale.
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

fn identity(m: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

enum Probe {
    Stale,
    Live,
    Unclear(io::Error),
}

/// Is anybody listening on the socket file? A non-blocking connect: a
/// listener with a full backlog (EAGAIN) is live, and must not make the
/// start hang either.
fn probe(path: &Path) -> Probe {
    let attempt = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).and_then(|s| {
        s.set_nonblocking(true)?;
        s.connect(&socket2::SockAddr::unix(path)?)
    });
    match attempt {
        Ok(()) => Probe::Live,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Probe::Stale,
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock
                || e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) =>
        {
            Probe::Live
        }
        Err(e) => Probe::Unclear(e),
    }
}

/// A site's `max_clients`: permits shared by its UNIX socket and TCP
/// listener. A reload that changes the number gives new clients a new set
/// of permits; clients already connected keep theirs until they leave.
#[derive(Debug)]
pub struct ClientLimit(std::sync::RwLock<(usize, Arc<Semaphore>)>);

impl ClientLimit {
    /// `max` permits.
    pub fn new(max: usize) -> Self {
        ClientLimit(std::sync::RwLock::new((max, Arc::new(Semaphore::new(max)))))
    }

    fn try_acquire(&self) -> Result<OwnedSemaphorePermit, tokio::sync::TryAcquireError> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).1.clone().try_acquire_owned()
    }

    /// Apply a reloaded `max_clients`.
    pub fn set(&self, max: usize) {
        let mut l = self.0.write().unwrap_or_else(|e| e.into_inner());
        if l.0 != max {
            *l = (max, Arc::new(Semaphore::new(max)));
        }
    }
}

/// A TCP listener's settings that a reload may change in place.
pub struct TcpSettings {
    /// Address and `only_from`.
    pub listen: TcpListen,
    /// TLS for the listener's clients.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// [`TcpSettings`], replaceable while the listener runs.
pub type SharedTcpSettings = Arc<std::sync::RwLock<Arc<TcpSettings>>>;

/// What every accept loop of a site shares.
#[derive(Clone)]
pub struct Accepting {
    /// The site its clients talk to.
    pub site: SiteHandle,
    /// Stops accepting (and idle sessions).
    pub shutdown: CancellationToken,
    /// Sessions run here, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// The daemon's budgets and cache.
    pub shared: super::Shared,
    /// `max_clients` permits, shared by the site's UNIX socket and TCP listener.
    pub limit: Arc<ClientLimit>,
    /// `accept()` failures (out of descriptors, say), logged once per episode.
    pub failing: Arc<AcceptFailures>,
}

/// An episode of failing `accept()`s: it begins with the first failure and
/// ends once accepting worked with no failure for [`EPISODE_QUIET`].
#[derive(Debug, Default)]
pub struct AcceptFailures(std::sync::Mutex<Option<Episode>>);

#[derive(Debug)]
struct Episode {
    last: tokio::time::Instant,
    count: u64,
}

/// Accepting must work this long without a failure to end an episode.
const EPISODE_QUIET: Duration = Duration::from_secs(1);

impl AcceptFailures {
    /// A failure; true if it begins an episode.
    fn failed(&self) -> bool {
        let mut e = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        match e.as_mut() {
            Some(ep) => {
                ep.last = now;
                ep.count += 1;
                false
            }
            None => {
                *e = Some(Episode { last: now, count: 1 });
                true
            }
        }
    }

    /// An accept worked: the failures of an episode that ended, if one did.
    fn worked(&self) -> Option<u64> {
        let mut e = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match e.as_ref() {
            Some(ep) if ep.last.elapsed() >= EPISODE_QUIET => e.take().map(|ep| ep.count),
            _ => None,
        }
    }
}

impl Accepting {
    /// A client was accepted: if accepting had failed, say it works again.
    fn accepted(&self) {
        if let Some(n) = self.failing.worked() {
            tracing::info!(failures = n, "accepting clients again");
        }
    }

    /// Run a session for an accepted client, or refuse it when the site has
    /// `max_clients` already.
    fn admit<S>(&self, stream: S, peer: Peer, watchdog: Option<crate::watchdog::Watchdog>)
    where
        S: ClientStream,
    {
        match self.limit.try_acquire() {
            Ok(permit) => self.spawn_session(stream, peer, None, watchdog, permit),
            Err(_) => {
                self.log_busy();
                self.tracker.spawn(refuse(stream, self.site.params().max_clients));
            }
        }
    }

    /// The span of a client's session: every log line of it names the
    /// site and the client.
    fn span(&self, peer: &Peer) -> tracing::Span {
        client_span(&self.site, peer)
    }

    /// Run a session for an admitted client; its permit ends with it.
    ///
    /// The session's span (`client{site=.. peer=..}`) is made when the
    /// session first logs something: most sessions never do, and making a
    /// span costs as much as answering a query. With debug logging on, it
    /// is made at once and every line of the session runs in it; `span`
    /// is one made already (a TLS client's handshake ran in it).
    fn spawn_session<S>(
        &self,
        stream: S,
        peer: Peer,
        span: Option<tracing::Span>,
        watchdog: Option<crate::watchdog::Watchdog>,
        permit: OwnedSemaphorePermit,
    ) where
        S: ClientStream,
    {
        use tracing::Instrument;
        let eager = span.or_else(|| tracing::enabled!(tracing::Level::DEBUG).then(|| self.span(&peer)));
        let session =
            Session::new(self.site.clone(), stream, self.shutdown.clone(), &self.shared, watchdog, peer, eager.clone());
        let run = async move {
            session.run().await;
            drop(permit);
        };
        match eager {
            Some(span) => self.tracker.spawn(run.instrument(span)),
            None => self.tracker.spawn(run),
        };
    }

    fn log_busy(&self) {
        let max = self.site.params().max_clients;
        tracing::warn!(max_clients = max, "client refused: too many clients for this site");
    }

    /// Wait out an `accept()` failure (e.g. no file descriptors left);
    /// `false` on shutdown.
    async fn backoff(&self, error: &io::Error) -> bool {
        if self.failing.failed() {
            tracing::warn!(%error, "accept failed; new clients wait until it works again (retrying every {} ms, \
                logged once until then)", ACCEPT_ERROR_BACKOFF.as_millis());
        } else {
            tracing::debug!(%error, "accept failed again");
        }
        tokio::select! {
            _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => true,
            _ = self.shutdown.cancelled() => false,
        }
    }
}

/// Accept clients on a site's UNIX socket until shutdown. The socket file
/// stays: its owner removes it once the site's answers in progress are done.
pub async fn serve_unix(listener: UnixListener, ctx: Accepting) {
    let mut clients = 0u64;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = ctx.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((s, _)) => {
                ctx.accepted();
                // UNIX clients have no address: they are numbered, and
                // named by the credentials the kernel recorded (read when
                // first needed; at once where debug logging makes the
                // session's span now).
                clients += 1;
                let peer = match tracing::enabled!(tracing::Level::DEBUG) {
                    true => Peer::of_unix(&s, clients),
                    false => Peer::Unix { n: clients, cred: None },
                };
                ctx.admit(s, peer, None);
            }
            Err(e) if ctx.backoff(&e).await => continue,
            Err(_) => break,
        }
    }
}

/// Accept clients on a site's cascading TCP listener until shutdown; with
/// `tls`, each client's TLS handshake runs in its own task (bounded by
/// `tls_handshake_timeout`) and only TLS clients are served.
pub async fn serve_tcp(listener: TcpListener, settings: SharedTcpSettings, stop: CancellationToken, ctx: Accepting) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = ctx.shutdown.cancelled() => break,
            _ = stop.cancelled() => break,
        };
        let params = ctx.site.params();
        let current = settings.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (listen, tls) = (&current.listen, &current.tls);
        let (stream, peer) = match accepted {
            // IPv4 clients of a dual-stack listener show as plain IPv4.
            Ok((s, p)) => {
                ctx.accepted();
                (s, std::net::SocketAddr::new(p.ip().to_canonical(), p.port()))
            }
            Err(e) if ctx.backoff(&e).await => continue,
            Err(_) => break,
        };
        if !listen.allows(peer.ip()) {
            crate::events::ClientRefused { peer }.emit();
            // A clean close: FIN first (a query already sent may still turn
            // it into a reset; either way the client gets no data).
            let mut stream = stream;
            let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, stream.shutdown()).await;
            continue;
        }
        if let Err(e) = crate::sockopt::tune_client(&stream, &params.keepalive) {
            tracing::warn!(%peer, error = %e, "cannot set keepalive on a TCP client");
        }
        let watchdog = match stream.as_fd().try_clone_to_owned() {
            Ok(fd) => Some(crate::watchdog::Watchdog::new(fd, peer.to_string(), params.send_stall_grace)),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "no send-stall watchdog for this client");
                None
            }
        };
        let Some(acceptor) = tls.clone() else {
            ctx.admit(stream, Peer::Tcp(peer), watchdog);
            continue;
        };
        // The permit comes first, so handshakes in progress count too. A
        // TLS client cannot read a plaintext refusal: it is just closed.
        let Ok(permit) = ctx.limit.try_acquire() else {
            ctx.log_busy();
            continue;
        };
        // As `client_span`, with room for the subject of a verified client
        // certificate (`tls_client_ca`).
        let span = tracing::info_span!(parent: None, "client", site = %ctx.site.name(), peer = %peer,
            cert = tracing::field::Empty);
        let (ctx2, after) = (ctx.clone(), params.tls.handshake_timeout);
        let handshake = async move {
            match tokio::time::timeout(after, acceptor.accept(stream)).await {
                Ok(Ok(s)) => {
                    let span = tracing::Span::current();
                    if let Some(subject) = crate::tls::client_subject(s.get_ref().1) {
                        span.record("cert", tracing::field::display(&subject));
                    }
                    ctx2.spawn_session(s, Peer::Tcp(peer), Some(span), watchdog, permit)
                }
                Ok(Err(e)) => crate::tls::client_handshake_failed(peer, &e),
                Err(_) => tracing::info!("TLS handshake with client {peer} did not finish in time"),
            }
        };
        ctx.tracker.spawn(tracing::Instrument::instrument(handshake, span));
    }
}

/// Bind a site's TCP listener.
pub fn bind_tcp(listen: &TcpListen) -> Result<TcpListener, BindError> {
    let io_err = |source| BindError::Tcp { addr: listen.addr, source };
    let sock = if listen.addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .map_err(io_err)?;
    sock.set_reuseaddr(true).map_err(io_err)?;
    sock.bind(listen.addr).map_err(io_err)?;
    sock.listen(1024).map_err(io_err)
}

async fn refuse<S: tokio::io::AsyncWrite + Unpin>(mut stream: S, max: usize) {
    let msg = format!("too many clients: this site's socket serves at most {max} (max_clients)");
    let answer = error_response(Status::Busy, &msg, true);
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    })
    .await;
}
