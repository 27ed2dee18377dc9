//! One query's trip to a site: get a channel, send, read the response header.
//!
//! [`send_query`] is what every client of a site uses, whether a socket
//! client's session or an internal client (inventory sync, a federated
//! query): it returns the site's header and the lease, positioned at the start
//! of the body, and the caller reads the body at its own pace. A query that
//! fails on a reused channel before a single answer byte arrived is sent once
//! more on a fresh channel: a stale keep-alive connection looks exactly like
//! that. `COMMAND`s are never retried (they may have been executed).

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::SiteHandle;
use super::channel::Lease;
use crate::error::{QueryError, SiteError};
use livemux_protocol::{FIXED16_LEN, ResponseHeader};

/// Bytes read together with the response header: most answers to GUI
/// queries fit, and each query in flight holds at most this much extra.
const PREFETCH: usize = 8 * 1024;

/// A failure while waiting for the response header.
pub(crate) struct HeaderFailure {
    /// At least one byte of the answer had arrived.
    pub any_byte: bool,
    /// What happened.
    pub error: SiteError,
}

/// Read the response header, and in the same reads whatever part of the
/// body has arrived with it (up to `prefetch` bytes in all): one `recv` for
/// a small answer instead of two.
pub(crate) async fn read_response_start<R: AsyncRead + Unpin>(
    r: &mut R,
    prefetch: usize,
) -> Result<([u8; FIXED16_LEN], ResponseHeader, Bytes), HeaderFailure> {
    let mut buf = BytesMut::with_capacity(prefetch.max(FIXED16_LEN));
    while buf.len() < FIXED16_LEN {
        match r.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => {
                return Err(HeaderFailure { any_byte: false, error: SiteError::ClosedWithoutAnswer });
            }
            Ok(0) => {
                let error = SiteError::Truncated { got: buf.len() as u64, expected: FIXED16_LEN as u64 };
                return Err(HeaderFailure { any_byte: true, error });
            }
            Ok(_) => {}
            Err(e) => return Err(HeaderFailure { any_byte: !buf.is_empty(), error: SiteError::Io(e) }),
        }
    }
    let mut raw = [0u8; FIXED16_LEN];
    raw.copy_from_slice(&buf[..FIXED16_LEN]);
    if matches!(raw, [0x15 | 0x16, 0x03, ..]) {
        // A TLS alert or handshake record, not a fixed16 header.
        return Err(HeaderFailure { any_byte: true, error: SiteError::TlsOnPlain });
    }
    let header = ResponseHeader::decode(&raw).map_err(|e| HeaderFailure { any_byte: true, error: e.into() })?;
    let prefix = buf.split_off(FIXED16_LEN).freeze();
    if prefix.len() as u64 > header.length {
        let error = SiteError::BadHeader(livemux_protocol::HeaderError::BadLength(format!(
            "the site sent {} bytes after a header announcing {}",
            prefix.len(),
            header.length
        )));
        return Err(HeaderFailure { any_byte: true, error });
    }
    Ok((raw, header, prefix))
}

/// A site's answer whose header has arrived; the body is still on the channel.
pub struct SiteResponse {
    /// The header as the site sent it (its last byte may be a custom separator).
    pub raw_header: [u8; FIXED16_LEN],
    /// The decoded header.
    pub header: ResponseHeader,
    /// The first body bytes, read together with the header.
    pub prefix: Bytes,
    /// The channel, positioned right after `prefix`.
    pub lease: Lease,
}

/// Send a query (already encoded for the site) and wait for its header.
///
/// Waits for a channel at most `channel_timeout`, and for everything at most
/// until `deadline`.
pub async fn send_query(site: &SiteHandle, wire: &[u8], deadline: Instant) -> Result<SiteResponse, QueryError> {
    let mut fresh = false;
    loop {
        let mut lease = site.acquire(fresh, deadline).await?;
        let reused = lease.reused();
        let down = lease.down_signal();
        let attempt = async {
            let sent = async {
                lease.write_all(wire).await?;
                lease.flush().await
            };
            sent.await.map_err(|e| HeaderFailure { any_byte: false, error: e.into() })?;
            read_response_start(&mut lease, PREFETCH).await
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout_at(deadline, attempt) => r,
            _ = down.cancelled() => return Err(site.down_error()),
        };
        match outcome {
            Ok(Ok((raw_header, header, prefix))) => return Ok(SiteResponse { raw_header, header, prefix, lease }),
            Ok(Err(f)) if !f.any_byte && reused && !fresh => {
                tracing::debug!(site = %site.name(), channel = lease.channel_id(), error = %f.error,
                    "reused channel failed before answering; retrying once on a fresh channel");
                lease.discard(f.error.to_string());
                fresh = true;
            }
            Ok(Err(f)) => {
                lease.discard(f.error.to_string());
                return Err(QueryError::Site { site: site.name().to_owned(), source: f.error });
            }
            Err(_) => {
                lease.discard("query timeout");
                return Err(site.timeout_error());
            }
        }
    }
}

/// Forward `COMMAND`s (already encoded, each with its empty line). The
/// site sends no answer to them.
///
/// After the commands a heartbeat goes out on the same channel, and the call
/// returns when it is answered (at most `heartbeat_timeout`): the site
/// executes a channel's requests in order, so a query the client sends next,
/// on whatever channel, sees the commands' effect. And a core that answers a
/// rejected command with an error line, or dies of it, cannot leave bytes
/// on the channel for the next query to read as its answer: the channel is
/// closed instead of reused.
pub async fn send_commands(site: &SiteHandle, wire: &[u8], deadline: Instant) -> Result<(), QueryError> {
    let mut lease = site.acquire(false, deadline).await?;
    let write = tokio::time::timeout_at(deadline, async {
        lease.write_all(wire).await?;
        lease.flush().await
    });
    match write.await {
        Ok(Ok(())) => {
            let until = deadline.min(Instant::now() + site.params().heartbeat_timeout);
            match tokio::time::timeout_at(until, super::heartbeat::exchange(&mut lease)).await {
                Ok(Ok(_)) => lease.release(),
                Ok(Err(e)) => {
                    tracing::info!(site = %site.name(), error = %e,
                        "channel closed: the site's answer after a COMMAND was not clean");
                    lease.discard(format!("after a COMMAND: {e}"));
                }
                Err(_) => lease.discard("no answer to the heartbeat after a COMMAND"),
            }
            Ok(())
        }
        Ok(Err(e)) => {
            lease.discard(e.to_string());
            Err(QueryError::Site { site: site.name().to_owned(), source: SiteError::Io(e) })
        }
        Err(_) => {
            lease.discard("command write timeout");
            Err(site.timeout_error())
        }
    }
}

/// Classify an I/O error on the proxy→site hop during the body.
pub(crate) fn body_error(e: io::Error, got: u64, expected: u64) -> SiteError {
    if e.kind() == io::ErrorKind::UnexpectedEof { SiteError::Truncated { got, expected } } else { SiteError::Io(e) }
}
