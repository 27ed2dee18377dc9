//! Binding a site's UNIX socket and accepting its clients.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::session::Session;
use crate::site::SiteHandle;
use livemux_protocol::{Status, error_response};

/// Mode of the per-site sockets: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

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

/// Bind `path`, replacing a stale socket file but never a live one.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let io_err = |source| BindError::Io { path: path.to_owned(), source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_err)?;
        }
        Ok(_) => return Err(BindError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(io_err)?;
    Ok(listener)
}

/// Accept clients on a site's socket until `shutdown`; then remove the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    site: SiteHandle,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    budget: Arc<crate::spool::SpoolBudget>,
) {
    let limit = Arc::new(Semaphore::new(site.params().max_clients));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(site = site.name(), error = %e, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                let session = Session::new(site.clone(), stream, shutdown.clone(), budget.clone());
                tracker.spawn(async move {
                    session.run().await;
                    drop(permit);
                });
            }
            Err(_) => {
                tracing::warn!(
                    site = site.name(),
                    max_clients = site.params().max_clients,
                    "client refused: too many clients on this site's socket"
                );
                tracker.spawn(refuse(stream, site.params().max_clients));
            }
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
}

async fn refuse(mut stream: UnixStream, max: usize) {
    let msg = format!("too many clients: this site's socket serves at most {max} (max_clients)");
    let answer = error_response(Status::Busy, &msg, true);
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    })
    .await;
}
