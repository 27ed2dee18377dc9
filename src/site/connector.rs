//! Opening connections to a site, each under `connect_timeout`.
//!
//! The site actor opens connections through a [`Connect`]: the network
//! ([`NetConnector`]: TCP, UNIX, TLS) in the daemon, an in-memory simulated
//! site in the actor's tests, which run on tokio's paused clock.
//!
//! [`SiteStream`] is the connection type of a channel: TCP or UNIX. On TCP
//! the proxy sets `TCP_NODELAY` (a query goes out in one write) and re-arms
//! `TCP_QUICKACK` before reads: Icinga 2 and Naemon write the fixed16
//! header and the body in two writes without `TCP_NODELAY`, so with delayed
//! ACKs on our side their Nagle algorithm holds the body for ~40 ms on
//! every keep-alive query. Quick ACKs make that stall impossible. The
//! option is re-armed when a read is about to wait for the first time since
//! data last arrived (the kernel leaves quick-ACK mode on its own as it
//! acknowledges data): one system call per answer, not one per poll. And
//! only while the site is seen to split its answers ([`QuickAck::wanted`]):
//! a site whose answers arrive whole, with their header, in the first read
//! (the simulated site; any core behind a proxy that coalesces) cannot be
//! stalled by a delayed ACK, and its channels make no such call at all.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{SiteAddress, SiteParams};
use crate::error::SiteError;

/// A connection to a site.
#[derive(Debug)]
pub enum SiteStream {
    /// Livestatus over TCP.
    Tcp(TcpStream, QuickAck),
    /// Livestatus over a UNIX socket.
    Unix(UnixStream),
    /// Livestatus over TLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>, QuickAck),
    /// An in-memory connection to a simulated site (tests).
    #[cfg(test)]
    Memory(tokio::io::DuplexStream),
}

/// Whether `TCP_QUICKACK` was armed since data last arrived, and whether
/// it is wanted at all.
#[derive(Debug)]
pub struct QuickAck {
    armed: bool,
    /// The site's last answer did not arrive whole in its first read (set
    /// by the channel's reader, see [`crate::site::exchange`]); true until
    /// an answer shows otherwise.
    wanted: Arc<AtomicBool>,
}

impl Default for QuickAck {
    fn default() -> Self {
        QuickAck { armed: false, wanted: Arc::new(AtomicBool::new(true)) }
    }
}

impl QuickAck {
    /// After a read of `s` returned `r`: arm quick ACKs if the read waits,
    /// they were not armed since data last arrived, and the site splits
    /// its answers.
    fn after_read<T>(&mut self, s: &TcpStream, r: &Poll<T>) {
        if r.is_ready() {
            self.armed = false;
        } else if !self.armed && self.wanted.load(Ordering::Relaxed) {
            self.armed = true;
            #[cfg(target_os = "linux")]
            {
                // Best effort: on failure only the latency optimisation is lost.
                let _ = socket2::SockRef::from(s).set_tcp_quickack(true);
            }
            #[cfg(not(target_os = "linux"))]
            let _ = s;
        }
    }
}

impl SiteStream {
    /// The TCP connection under it (TCP and TLS).
    pub(crate) fn tcp(&self) -> Option<&TcpStream> {
        match self {
            SiteStream::Tcp(s, _) => Some(s),
            SiteStream::Tls(s, _) => Some(s.get_ref().0),
            _ => None,
        }
    }

    /// The TCP connection under it, taken out of the runtime (TCP and TLS;
    /// a TLS session ends without its close_notify).
    pub(crate) fn into_tcp(self) -> Option<std::net::TcpStream> {
        let tcp = match self {
            SiteStream::Tcp(s, _) => s,
            SiteStream::Tls(s, _) => s.into_inner().0,
            _ => return None,
        };
        tcp.into_std().ok()
    }

    /// The switch that says whether quick ACKs are wanted on this
    /// connection (TCP and TLS; `None` for UNIX sockets).
    pub(crate) fn quickack_switch(&self) -> Option<Arc<AtomicBool>> {
        match self {
            SiteStream::Tcp(_, ack) | SiteStream::Tls(_, ack) => Some(ack.wanted.clone()),
            _ => None,
        }
    }
}

impl AsyncRead for SiteStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SiteStream::Tcp(s, ack) => {
                let r = Pin::new(&mut *s).poll_read(cx, buf);
                // About to wait for data: have it acknowledged at once.
                ack.after_read(s, &r);
                r
            }
            SiteStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            SiteStream::Tls(s, ack) => {
                let r = Pin::new(s.as_mut()).poll_read(cx, buf);
                ack.after_read(s.get_ref().0, &r);
                r
            }
            #[cfg(test)]
            SiteStream::Memory(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SiteStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SiteStream::Tcp(s, _) => Pin::new(s).poll_write(cx, buf),
            SiteStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            SiteStream::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
            #[cfg(test)]
            SiteStream::Memory(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SiteStream::Tcp(s, _) => Pin::new(s).poll_flush(cx),
            SiteStream::Unix(s) => Pin::new(s).poll_flush(cx),
            SiteStream::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(test)]
            SiteStream::Memory(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SiteStream::Tcp(s, _) => Pin::new(s).poll_shutdown(cx),
            SiteStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            SiteStream::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(test)]
            SiteStream::Memory(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The future of one connection attempt.
pub(crate) type Connecting = Pin<Box<dyn std::future::Future<Output = Result<SiteStream, SiteError>> + Send>>;

/// How the site actor opens a connection to its site.
pub(crate) trait Connect: Send + Sync + 'static {
    /// Start one connection attempt.
    fn connect(&self) -> Connecting;
}

/// Connections over the network, to a site's configured address.
pub(crate) struct NetConnector {
    address: SiteAddress,
    params: SiteParams,
    tls: Option<std::sync::Arc<crate::tls::SiteTls>>,
}

impl NetConnector {
    pub(crate) fn new(
        address: SiteAddress,
        params: SiteParams,
        tls: Option<std::sync::Arc<crate::tls::SiteTls>>,
    ) -> Self {
        NetConnector { address, params, tls }
    }
}

impl Connect for NetConnector {
    fn connect(&self) -> Connecting {
        let (address, params, tls) = (self.address.clone(), self.params.clone(), self.tls.clone());
        Box::pin(async move { connect(&address, &params, tls.as_ref()).await })
    }
}

/// Open one connection to `address`: TCP or UNIX within
/// `params.connect_timeout` (with the site's socket options,
/// [`crate::sockopt::tune_site`]), then for `tls://` the TLS handshake within
/// `tls_handshake_timeout`.
///
/// A host name is resolved on every connect, and each resolved address is
/// tried in turn until one answers; the connect timeout covers all of it.
pub async fn connect(
    address: &SiteAddress,
    params: &SiteParams,
    tls: Option<&std::sync::Arc<crate::tls::SiteTls>>,
) -> Result<SiteStream, SiteError> {
    match address {
        SiteAddress::Unix(path) => within(address, params, UnixStream::connect(path)).await.map(SiteStream::Unix),
        SiteAddress::Tcp { host, port } => {
            tcp(address, params, host, *port).await.map(|s| SiteStream::Tcp(s, QuickAck::default()))
        }
        SiteAddress::Tls { host, port } => {
            let stream = tcp(address, params, host, *port).await?;
            let Some(tls) = tls else {
                let detail = "no TLS settings for this site".to_owned();
                return Err(SiteError::Tls { address: address.to_string(), detail });
            };
            let connector = tokio_rustls::TlsConnector::from(tls.config().await);
            let after = tls.handshake_timeout();
            match tokio::time::timeout(after, connector.connect(tls.server_name(), stream)).await {
                Ok(Ok(s)) => {
                    let resumed = s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                    tls.note_handshake(resumed);
                    Ok(SiteStream::Tls(Box::new(s), QuickAck::default()))
                }
                Ok(Err(e)) => Err(crate::tls::classify(&address.to_string(), &e)
                    .unwrap_or_else(|| SiteError::Tls { address: address.to_string(), detail: e.to_string() })),
                Err(_) => Err(SiteError::TlsTimeout { address: address.to_string(), after }),
            }
        }
    }
}

async fn tcp(address: &SiteAddress, params: &SiteParams, host: &str, port: u16) -> Result<TcpStream, SiteError> {
    within(address, params, async {
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address"));
        for addr in tokio::net::lookup_host((host, port)).await? {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    crate::sockopt::tune_site(&s, params)?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    })
    .await
}

async fn within<T>(
    address: &SiteAddress,
    params: &SiteParams,
    attempt: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, SiteError> {
    match tokio::time::timeout(params.connect_timeout, attempt).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(SiteError::Connect { address: address.to_string(), source }),
        Err(_) => Err(SiteError::ConnectTimeout { address: address.to_string(), after: params.connect_timeout }),
    }
}

/// A failure on a new connection (its connect, handshake or first
/// heartbeat), made more specific where possible: TLS errors inside I/O
/// errors, and a `first` plaintext connection reset or closed without a
/// word (often a TLS port on a `tcp://` address).
pub(crate) fn explain(address: &SiteAddress, e: SiteError, first: bool) -> SiteError {
    let fresh_plaintext = first && matches!(address, SiteAddress::Tcp { .. });
    let hint = |what: &str| {
        SiteError::HeartbeatAnswer(format!(
            "the site {what} without answering (if it expects TLS, use a tls:// address)"
        ))
    };
    match e {
        SiteError::Io(io) if fresh_plaintext && io.kind() == io::ErrorKind::ConnectionReset => {
            hint("reset the connection")
        }
        SiteError::Io(io) => crate::tls::classify(&address.to_string(), &io).unwrap_or(SiteError::Io(io)),
        SiteError::ClosedWithoutAnswer if fresh_plaintext => hint("closed the connection"),
        other => other,
    }
}
