//! Moving a site's answer to the client: two halves around a [`Spool`].
//!
//! The *reader* half reads the body from the channel at the site's speed
//! and pushes it into the spool; the moment the last byte is read it
//! releases the channel, however far the client still is behind. The
//! *writer* half takes data out of the spool at the client's speed. Both
//! run in the session's task, bounded by one deadline: `query_timeout` from
//! the moment the query was received. No other timer can end a response; a
//! client that is slow or pauses is back-pressure, not an error.
//!
//! What the client can be sure of:
//! - an answer up to `spool_memory_per_response` (2 MiB: nearly every
//!   answer a GUI asks for) is held until it is complete, so a site that
//!   fails while sending it becomes an error answer (502), never a short
//!   one; the client waits no longer for the whole answer than it would
//!   have (it cannot use a fixed16 body before its end anyway);
//! - a larger answer with fixed16 streams from its first body bytes (holding
//!   it would mean spooling it all first); a body cut short is visible from
//!   the announced length;
//! - without fixed16 the end of the connection is the only end marker, so
//!   every answer is held until it is complete (or the spool is full), and a
//!   site failure before that becomes an error message instead of a short
//!   body.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::cache::Capture;
use crate::error::QueryError;
use crate::site::exchange::body_error;
use crate::site::{Lease, SiteHandle, SiteResponse};
use crate::spool::{Next, Spool, SpoolBudget};
use crate::watchdog::{Reaped, Watchdog};
use livemux_protocol::{FIXED16_LEN, ReplyStyle, ResponseHeader};

/// Bytes read from a site per step (also the streaming window per answer).
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
    /// The client's kernel stopped acknowledging anything: it was dropped.
    Reaped {
        /// Bytes sent.
        sent: u64,
        /// Bytes in the response.
        total: u64,
        /// The watchdog's verdict.
        reaped: Reaped,
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

/// What a relay needs besides the answer and the client.
pub struct RelayContext<'a> {
    /// The site answering.
    pub site: &'a SiteHandle,
    /// How the client wants the answer.
    pub style: ReplyStyle,
    /// The query's deadline.
    pub deadline: Instant,
    /// The daemon's spool budget.
    pub budget: &'a std::sync::Arc<SpoolBudget>,
    /// For TCP clients: the send-stall watchdog.
    pub watchdog: Option<&'a mut Watchdog>,
    /// Keep a copy of the body, if it is small enough.
    pub capture: Option<Capture>,
}

/// Send `resp` to `client` in the form `ctx.style` asks for.
pub async fn relay<C: AsyncWrite + Unpin>(resp: SiteResponse, client: &mut C, ctx: RelayContext<'_>) -> Relayed {
    let RelayContext { site, style, deadline, budget, watchdog, capture } = ctx;
    let (raw_header, header) = (resp.raw_header, resp.header);
    let (prefix, lease) = resp.into_prefix();
    let capture = capture.filter(|c| c.accepts(header.length));
    let spool = Spool::new(budget.clone());
    let total = header.length + if style.fixed16 { FIXED16_LEN as u64 } else { 0 };
    let head = style.fixed16.then_some(raw_header);
    let hold = !style.fixed16 || header.length <= budget.memory_per_response() as u64;
    let (_, written) = tokio::join!(
        read_half(site, lease, prefix, (raw_header, header), deadline, &spool, capture),
        write_half(site, client, head, hold, deadline, &spool, watchdog),
    );
    match written {
        Written::Complete => Relayed::Complete,
        Written::Failed { error, sent: 0 } => Relayed::NothingSent(error),
        Written::Failed { error, sent } => Relayed::Cut { error, sent, total },
        Written::ClientGone { sent } => Relayed::ClientGone { sent, total },
        Written::Reaped { sent, reaped } => Relayed::Reaped { sent, total, reaped },
    }
}

/// Read `length` body bytes (the first of them already in `prefix`) from
/// the channel into the spool.
async fn read_half(
    site: &SiteHandle,
    lease: Lease,
    prefix: Bytes,
    (raw_header, header): ([u8; FIXED16_LEN], ResponseHeader),
    deadline: Instant,
    spool: &Spool,
    mut capture: Option<Capture>,
) {
    let length = header.length;
    let down = lease.down_signal();
    let idle = site.params().response_idle_timeout;
    let mut lease = Some(lease);
    let mut buf = BytesMut::new();
    let mut got = prefix.len() as u64;
    if got == length
        && let Some(l) = lease.take()
    {
        l.release();
    }
    if let Some(c) = capture.as_mut() {
        c.push(&prefix);
    }
    if !prefix.is_empty() && spool.push(prefix).await.is_err() {
        if let Some(l) = lease.take() {
            drain(l, length - got, deadline, idle).await;
        }
        return;
    }
    while got < length {
        let Some(l) = lease.as_mut() else { break };
        buf.reserve(CHUNK);
        let want = (length - got).min(CHUNK as u64);
        let mut limited = l.take(want);
        // The idle timer runs only while reading: waiting for room in the
        // spool (a slow client) does not count against the site.
        let until = deadline.min(Instant::now() + idle);
        let read = tokio::select! {
            r = tokio::time::timeout_at(until, limited.read_buf(&mut buf)) => r,
            _ = down.cancelled() => return fail(spool, &mut lease, site.down_error()),
        };
        let n = match read {
            Ok(Ok(0)) => {
                let e = std::io::ErrorKind::UnexpectedEof.into();
                return fail(spool, &mut lease, site_error(site, e, got, length));
            }
            Ok(Ok(n)) => n as u64,
            Ok(Err(e)) => return fail(spool, &mut lease, site_error(site, e, got, length)),
            Err(_) if until < deadline => {
                let source = crate::error::SiteError::ResponseIdle(idle);
                return fail(spool, &mut lease, QueryError::Site { site: site.name().to_owned(), source });
            }
            Err(_) => return fail(spool, &mut lease, site.timeout_error()),
        };
        got += n;
        if got == length
            && let Some(l) = lease.take()
        {
            l.release();
        }
        let chunk = buf.split().freeze();
        if let Some(c) = capture.as_mut() {
            c.push(&chunk);
        }
        // Queries pipelined behind this answer must not wait for this
        // client: if it streams, they go elsewhere.
        let stalls = || {
            if let Some(l) = lease.as_ref() {
                l.stalls();
            }
        };
        match tokio::time::timeout_at(deadline, spool.push_with(chunk, stalls)).await {
            // Both halves share this task: let the writer take the chunk out
            // before reading more, or a fast site would fill the spool (and
            // spill to disk) even for a client that keeps up.
            Ok(Ok(())) => tokio::task::yield_now().await,
            Ok(Err(_gone)) => {
                if let Some(l) = lease.take() {
                    drain(l, length - got, deadline, idle).await;
                }
                return;
            }
            Err(_) => return fail(spool, &mut lease, site.timeout_error()),
        }
    }
    if let Some(c) = capture {
        c.finish(raw_header, header.status);
    }
    spool.finish(Ok(()));
}

fn site_error(site: &SiteHandle, e: std::io::Error, got: u64, length: u64) -> QueryError {
    let head = FIXED16_LEN as u64;
    QueryError::Site { site: site.name().to_owned(), source: body_error(e, head + got, head + length) }
}

fn fail(spool: &Spool, lease: &mut Option<Lease>, error: QueryError) {
    if let Some(l) = lease.take() {
        l.discard(error.to_string());
    }
    spool.finish(Err(error));
}

enum Written {
    Complete,
    Failed { error: QueryError, sent: u64 },
    ClientGone { sent: u64 },
    Reaped { sent: u64, reaped: Reaped },
}

/// Take the answer out of the spool and write it to the client; with
/// `hold`, only once it is complete (or the spool is full).
async fn write_half<C: AsyncWrite + Unpin>(
    site: &SiteHandle,
    client: &mut C,
    mut head: Option<[u8; FIXED16_LEN]>,
    hold: bool,
    deadline: Instant,
    spool: &Spool,
    mut watchdog: Option<&mut Watchdog>,
) -> Written {
    let mut sent = 0u64;
    if let Some(w) = watchdog.as_deref_mut() {
        w.start();
    }
    if hold {
        if tokio::time::timeout_at(deadline, spool.wait_complete_or_full()).await.is_err() {
            spool.close();
            return Written::Failed { error: site.timeout_error(), sent };
        }
        if let Some(error) = spool.take_failure() {
            spool.close();
            return Written::Failed { error, sent };
        }
    }
    loop {
        let next = match tokio::time::timeout_at(deadline, spool.next()).await {
            Ok(n) => n,
            Err(_) => {
                spool.close();
                return Written::Failed { error: site.timeout_error(), sent };
            }
        };
        let (data, last) = match next {
            Next::Data(d) => (d, false),
            // An empty body: only the header is left to send.
            Next::End(Ok(())) => match head.take() {
                Some(h) => (bytes::Bytes::copy_from_slice(&h), true),
                None => return Written::Complete,
            },
            Next::End(Err(error)) => {
                // Also when the error is the writer's own (a spool file read
                // failed): the reader must stop too.
                spool.close();
                return Written::Failed { error, sent };
            }
        };
        let mut out = head.take().map(|h| bytes::Bytes::copy_from_slice(&h)).unwrap_or_default().chain(data);
        match send(client, &mut out, &mut sent, deadline, watchdog.as_deref_mut()).await {
            Ok(()) if last => return Written::Complete,
            Ok(()) => {}
            Err(end) => {
                spool.close();
                return match end {
                    SendEnd::Gone => Written::ClientGone { sent },
                    SendEnd::Reaped(reaped) => Written::Reaped { sent, reaped },
                    SendEnd::Deadline => Written::Failed { error: site.timeout_error(), sent },
                };
            }
        }
    }
}

/// Why [`send`] stopped before everything was written.
pub enum SendEnd {
    /// The client closed the connection or it failed.
    Gone,
    /// The watchdog found the client dead (its socket now closes with a reset).
    Reaped(Reaped),
    /// The query's deadline passed.
    Deadline,
}

/// Write all of `out` to the client and flush it, counting into `sent`, by
/// `deadline`; with a watchdog, the connection is sampled while a write
/// waits. The flush matters for TLS: a write may leave the last bytes in
/// the TLS layer's buffer, and a keep-alive client would wait for them.
pub async fn send<C: AsyncWrite + Unpin>(
    client: &mut C,
    out: &mut impl Buf,
    sent: &mut u64,
    deadline: Instant,
    mut watchdog: Option<&mut Watchdog>,
) -> Result<(), SendEnd> {
    // What the client's socket takes at once needs no timer: write until
    // it would wait (a small answer goes out here whole, and the flush of
    // a plain socket is done at once too).
    let at_once = std::future::poll_fn(|cx| {
        use std::task::Poll;
        loop {
            if !out.has_remaining() {
                return match std::pin::Pin::new(&mut *client).poll_flush(cx) {
                    Poll::Ready(Ok(())) => Poll::Ready(Some(Ok(()))),
                    Poll::Ready(Err(_)) => Poll::Ready(Some(Err(SendEnd::Gone))),
                    Poll::Pending => Poll::Ready(None),
                };
            }
            // A header chained before a body goes out in the same call.
            let mut parts = [std::io::IoSlice::new(&[]); 2];
            let written = match out.chunks_vectored(&mut parts) {
                n if n > 1 => std::pin::Pin::new(&mut *client).poll_write_vectored(cx, &parts[..n]),
                _ => std::pin::Pin::new(&mut *client).poll_write(cx, out.chunk()),
            };
            match written {
                Poll::Ready(Ok(n)) if n > 0 => {
                    out.advance(n);
                    *sent += n as u64;
                }
                Poll::Ready(_) => return Poll::Ready(Some(Err(SendEnd::Gone))),
                Poll::Pending => return Poll::Ready(None),
            }
        }
    })
    .await;
    if let Some(done) = at_once {
        return done;
    }
    loop {
        let step = async {
            if out.has_remaining() {
                client.write_buf(out).await.map(Some)
            } else {
                client.flush().await.map(|()| None)
            }
        };
        let wrote = tokio::select! {
            r = tokio::time::timeout_at(deadline, step) => r,
            _ = sample_tick(watchdog.as_deref()) => {
                if let Some(w) = watchdog.as_deref_mut()
                    && let Some(reaped) = w.check(Instant::now())
                {
                    w.abort_on_close();
                    return Err(SendEnd::Reaped(reaped));
                }
                continue;
            }
        };
        match wrote {
            Ok(Ok(Some(n))) if n > 0 => *sent += n as u64,
            Ok(Ok(None)) => return Ok(()),
            Ok(_) => return Err(SendEnd::Gone),
            Err(_) => return Err(SendEnd::Deadline),
        }
    }
}

/// Completes when the watchdog should sample the client (never without one).
async fn sample_tick(watchdog: Option<&Watchdog>) {
    match watchdog {
        Some(w) => tokio::time::sleep(w.interval()).await,
        None => std::future::pending().await,
    }
}

/// Read and drop what is left of an answer whose client is gone, so the
/// channel can be reused; give the channel up if that is too much.
///
/// Each read waits at most `idle` (`response_idle_timeout`) and not past
/// the deadline; the site going down ends it too.
async fn drain(mut lease: Lease, mut left: u64, deadline: Instant, idle: std::time::Duration) {
    if left > DRAIN_LIMIT {
        lease.discard("client left with a large remainder unread");
        return;
    }
    let down = lease.down_signal();
    let mut scratch = [0u8; 8192];
    while left > 0 {
        let want = left.min(scratch.len() as u64) as usize;
        let until = deadline.min(Instant::now() + idle);
        let read = tokio::select! {
            r = tokio::time::timeout_at(until, lease.read(&mut scratch[..want])) => r,
            _ = down.cancelled() => return lease.discard("the site went down while draining an abandoned answer"),
        };
        match read {
            Ok(Ok(n)) if n > 0 => left -= n as u64,
            _ => {
                lease.discard("failed while draining an abandoned answer");
                return;
            }
        }
    }
    lease.release();
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A writer like a TLS stream: a write is taken into a buffer and
    /// reaches the wire only with the next write or a flush.
    #[derive(Default)]
    struct Buffering {
        wire: Vec<u8>,
        pending: Vec<u8>,
    }

    impl AsyncWrite for Buffering {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            this.wire.append(&mut this.pending);
            let n = buf.len().min(1000);
            this.pending.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            this.wire.append(&mut this.pending);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    #[tokio::test]
    async fn send_leaves_nothing_in_the_writers_buffer() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut w = Buffering::default();
        let mut sent = 0;
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let result = send(&mut w, &mut Bytes::from(data.clone()), &mut sent, deadline, None).await;
        assert!(result.is_ok());
        assert_eq!(sent, data.len() as u64);
        assert_eq!(w.wire, data, "every byte reached the wire, none is left in a buffer");
    }
}
