//! Moving a site's answer to the client.
//!
//! The body is read from the channel in chunks and written to the client;
//! there is one deadline for the whole query (`query_timeout` from the moment
//! the query was received) and no other timer. Slowness of the client is
//! back-pressure, not an error. The response header is held back until the
//! first body chunk has arrived, so a site that fails before sending any body
//! still lets the proxy answer with a proper error response; once bytes have
//! gone to the client, a failure can only close the connection (the fixed16
//! length then tells the client the body is short).
//!
//! The channel is released the moment the last body byte is read from it.

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::error::QueryError;
use crate::site::exchange::body_error;
use crate::site::{Lease, SiteHandle, SiteResponse};
use livemux_protocol::{FIXED16_LEN, ReplyStyle};

/// Bytes read from a site per step.
pub const CHUNK: usize = 64 * 1024;

/// When a client leaves mid-response, a remainder up to this size is read
/// and dropped so the channel stays usable; a larger one closes the channel.
pub const DRAIN_LIMIT: u64 = 1 << 20;

/// How a relay ended.
#[derive(Debug)]
pub enum Relayed {
    /// The whole response reached the client.
    Complete,
    /// The query failed before any byte was sent; an error response can follow.
    NothingSent(QueryError),
    /// The client went away.
    ClientGone {
        /// Bytes sent.
        sent: u64,
        /// Bytes in the response.
        total: u64,
    },
    /// The query failed after part of the response was sent.
    Cut {
        /// Why.
        error: QueryError,
        /// Bytes sent.
        sent: u64,
        /// Bytes in the response.
        total: u64,
    },
}

/// A reusable buffer for [`relay`]: the header slot plus one chunk.
pub struct RelayBuf(Box<[u8]>);

impl Default for RelayBuf {
    fn default() -> Self {
        RelayBuf(vec![0u8; FIXED16_LEN + CHUNK].into_boxed_slice())
    }
}

/// Send `resp` to `client` in the form `style` asks for.
pub async fn relay<C: AsyncWrite + Unpin>(
    site: &SiteHandle,
    resp: SiteResponse,
    client: &mut C,
    style: ReplyStyle,
    deadline: Instant,
    buf: &mut RelayBuf,
) -> Relayed {
    let SiteResponse { raw_header, header, lease } = resp;
    let down = lease.down_signal();
    let mut lease = Some(lease);
    let head = if style.fixed16 { FIXED16_LEN } else { 0 };
    let total = head as u64 + header.length;
    buf.0[..FIXED16_LEN].copy_from_slice(&raw_header);
    let (mut got, mut sent) = (0u64, 0u64);
    let mut first = true;
    loop {
        let start = if first { FIXED16_LEN - head } else { FIXED16_LEN };
        let mut end = FIXED16_LEN;
        if let Some(l) = lease.as_mut().filter(|_| got < header.length) {
            let want = (header.length - got).min(CHUNK as u64) as usize;
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, l.read(&mut buf.0[FIXED16_LEN..FIXED16_LEN + want])) => r,
                _ = down.cancelled() => return fail(site.down_error(), sent, total),
            };
            let n = match read {
                Ok(Ok(0)) => {
                    let e = body_error(
                        std::io::ErrorKind::UnexpectedEof.into(),
                        FIXED16_LEN as u64 + got,
                        FIXED16_LEN as u64 + header.length,
                    );
                    return fail(site_error(site, e), sent, total);
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    let e = body_error(e, FIXED16_LEN as u64 + got, FIXED16_LEN as u64 + header.length);
                    return fail(site_error(site, e), sent, total);
                }
                Err(_) => return fail(site.timeout_error(), sent, total),
            };
            got += n as u64;
            end += n;
        }
        if got == header.length
            && let Some(l) = lease.take()
        {
            l.release();
        }
        let out = &buf.0[start..end];
        match tokio::time::timeout_at(deadline, client.write_all(out)).await {
            Ok(Ok(())) => sent += out.len() as u64,
            Ok(Err(_)) => {
                if let Some(l) = lease.take() {
                    drain(l, header.length - got, deadline).await;
                }
                return Relayed::ClientGone { sent, total };
            }
            Err(_) => return fail(site.timeout_error(), sent, total),
        }
        first = false;
        if got == header.length {
            return Relayed::Complete;
        }
    }
}

fn site_error(site: &SiteHandle, source: crate::error::SiteError) -> QueryError {
    QueryError::Site { site: site.name().to_owned(), source }
}

fn fail(error: QueryError, sent: u64, total: u64) -> Relayed {
    if sent == 0 { Relayed::NothingSent(error) } else { Relayed::Cut { error, sent, total } }
}

/// Read and drop what is left of an answer whose client is gone, so the
/// channel can be reused; give the channel up if that is too much.
async fn drain(mut lease: Lease, mut left: u64, deadline: Instant) {
    if left > DRAIN_LIMIT {
        lease.discard("client left with a large remainder unread");
        return;
    }
    let mut scratch = [0u8; 8192];
    while left > 0 {
        let want = left.min(scratch.len() as u64) as usize;
        match tokio::time::timeout_at(deadline, lease.read(&mut scratch[..want])).await {
            Ok(Ok(n)) if n > 0 => left -= n as u64,
            _ => {
                lease.discard("failed while draining an abandoned answer");
                return;
            }
        }
    }
    lease.release();
}
