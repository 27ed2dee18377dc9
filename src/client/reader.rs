//! Receiving client requests, within a daemon-wide memory budget.
//!
//! Each client's partly received request sits in a buffer of its own that
//! grows (doubling, capped near `max_request_bytes`) as the request
//! arrives. A thousand clients each sending a 4 MiB request slowly would
//! claim 4 GiB, so every buffer beyond [`UNBUDGETED_BYTES`] is charged to
//! one [`RequestBudget`] (`request_memory_budget`). A client whose buffer
//! would take the budget over waits for room up to `request_memory_wait`
//! (and within the `client_request_timeout` that bounds receiving its
//! request anyway); if none comes, it gets a 503 naming the budget and the
//! connection closes, which gives its buffer back. The wait is short and
//! counts from when it began, so when many clients hold parts of the
//! budget and all want more, they give up one after the other and the
//! rest go on, instead of all waiting out the same deadline.
//!
//! The first [`UNBUDGETED_BYTES`] of every buffer are free, so the everyday
//! requests of a GUI (a few hundred bytes to a few KiB) never wait behind
//! large ones: their memory is bounded by `max_clients` instead.
//!
//! A buffer is charged from the moment it grows past the free part until
//! the request it held has been answered (the request's bytes live that
//! long) and the buffer is empty again. Bytes beyond the free part are
//! charged `1 + COPIES` times: while a request is answered, parsing it and
//! encoding it for the site each make a copy, and charging for them as the
//! request arrives means a client learns that there is no room before it
//! has sent everything, not after.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::session::ClientStream;
use crate::deadline::Deadline;
use livemux_protocol::{Framer, Limits, ReplyStyle, RequestError, Status};
use std::future::Future;
use std::task::Poll;

/// Bytes of each request buffer that are not charged to the budget.
pub const UNBUDGETED_BYTES: usize = 16 * 1024;

/// Copies of a request made while it is answered (the parsed query's
/// headers, the text sent to the site), charged with its buffer.
pub const COPIES: usize = crate::config::REQUEST_COPIES;

/// Free space kept in a request buffer before each read: enough for a
/// typical request; the buffer grows (doubling) for larger ones.
const READ_RESERVE: usize = 1024;

/// The daemon-wide budget for request buffers (`request_memory_budget`).
#[derive(Debug)]
pub struct RequestBudget {
    limit: AtomicUsize,
    /// `request_memory_wait`, in milliseconds.
    wait_ms: AtomicU64,
    used: AtomicUsize,
    /// Woken when bytes are given back.
    room: Notify,
    /// The budget was found full and that has been logged (reset once
    /// usage falls below half the limit).
    full: AtomicBool,
    waits: AtomicU64,
    refused: AtomicU64,
}

/// How much of the request budget is in use (state file, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RequestUsage {
    /// Bytes of request buffers charged now.
    pub memory_used: usize,
    /// `request_memory_budget`.
    pub memory_budget: usize,
    /// Times a client had to wait for room.
    pub waits: u64,
    /// Clients answered 503 because no room came within `request_memory_wait`.
    pub refused: u64,
}

impl RequestBudget {
    /// A budget of `limit` bytes; a client waits up to `wait` for room.
    pub fn new(limit: usize, wait: Duration) -> Arc<RequestBudget> {
        Arc::new(RequestBudget {
            limit: AtomicUsize::new(limit),
            wait_ms: AtomicU64::new(wait.as_millis() as u64),
            used: AtomicUsize::new(0),
            room: Notify::new(),
            full: AtomicBool::new(false),
            waits: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Apply a reloaded `request_memory_budget` and `request_memory_wait`
    /// (buffers charged already stay charged; a smaller budget makes new
    /// charges wait).
    pub fn set(&self, limit: usize, wait: Duration) {
        self.limit.store(limit, Ordering::Relaxed);
        self.wait_ms.store(wait.as_millis() as u64, Ordering::Relaxed);
        self.room.notify_waiters();
    }

    /// The figures for the state file and the metrics.
    pub fn usage(&self) -> RequestUsage {
        RequestUsage {
            memory_used: self.used.load(Ordering::Relaxed),
            memory_budget: self.limit.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    fn try_take(&self, n: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(n).filter(|t| *t <= limit))
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.used.fetch_sub(n, Ordering::AcqRel);
        if before - n < self.limit.load(Ordering::Relaxed) / 2 && self.full.swap(false, Ordering::Relaxed) {
            tracing::info!("request memory budget has room again");
        }
        self.room.notify_waiters();
    }

    /// Take `n` more bytes for a buffer holding `held` already, waiting
    /// for room up to `request_memory_wait` but not beyond `until`; false
    /// if none came.
    async fn take(&self, n: usize, held: usize, until: Instant) -> bool {
        if self.try_take(n) {
            return true;
        }
        if held + n > self.limit.load(Ordering::Relaxed) {
            // More than the whole budget (a reload made it smaller than a
            // request may be): waiting would not help.
            self.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.waits.fetch_add(1, Ordering::Relaxed);
        if !self.full.swap(true, Ordering::Relaxed) {
            let u = self.usage();
            tracing::warn!(
                used = u.memory_used,
                budget = u.memory_budget,
                "request memory budget is in use: clients sending large requests wait (request_memory_budget)"
            );
        }
        let wait = Duration::from_millis(self.wait_ms.load(Ordering::Relaxed));
        let until = until.min(Instant::now() + wait);
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.try_take(n) {
                return true;
            }
            if tokio::time::timeout_at(until, room).await.is_err() {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
    }
}

/// Why a client's request was refused before it was parsed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Over a limit, or not finished in time.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// No room in the request budget within `request_memory_wait`.
    #[error(
        "request memory budget in use: the requests being received from all clients hold the {budget} bytes of \
         request_memory_budget; waited {waited_ms} ms for room (request_memory_wait)"
    )]
    Budget {
        /// `request_memory_budget`.
        budget: usize,
        /// How long the client waited for room.
        waited_ms: u64,
    },
}

impl Refusal {
    /// The status code of the error answer.
    pub fn status(&self) -> Status {
        match self {
            Refusal::Request(e) => e.status(),
            Refusal::Budget { .. } => Status::Busy,
        }
    }
}

/// Why no request came.
#[derive(Debug)]
pub enum ReadError {
    /// The request was refused (answer it with an error, then close).
    Refused(Refusal),
    /// The connection failed.
    Io(std::io::Error),
}

/// The timeouts of receiving requests (a site's or `[defaults]`').
#[derive(Debug, Clone, Copy)]
pub struct ReadTimeouts {
    /// `client_idle_timeout`: between requests.
    pub idle: Duration,
    /// `client_request_timeout`: from a request's first byte to its end.
    pub request: Duration,
}

/// One connection's request buffer and framer.
pub struct RequestReader {
    buf: BytesMut,
    framer: Framer,
    /// The client half-closed (or closed): what is buffered is all there is.
    eof: bool,
    /// When the first byte of the request being received arrived.
    started: Option<Instant>,
    budget: Arc<RequestBudget>,
    /// Bytes charged to the budget for this buffer (and the copies of the
    /// requests in it).
    charged: usize,
    /// The end of the request returned last: dropped at the next call.
    consumed: usize,
}

impl RequestReader {
    /// An empty reader charging `budget`.
    pub fn new(budget: Arc<RequestBudget>) -> Self {
        RequestReader {
            buf: BytesMut::new(),
            framer: Framer::new(),
            eof: false,
            started: None,
            budget,
            charged: 0,
            consumed: 0,
        }
    }

    /// How the client wants answers, as far as the request seen so far
    /// tells (for an error answer before the request is complete).
    pub fn style(&self) -> ReplyStyle {
        self.framer.style(&self.buf)
    }

    /// Whether the client has half-closed its side.
    pub fn at_eof(&self) -> bool {
        self.eof
    }

    /// The next request, or `None` at end of input, idle timeout or
    /// shutdown while idle: where its bytes lie, for [`RequestReader::request`].
    ///
    /// The request returned last is dropped from the buffer by this call
    /// (its bytes are charged until then; answer it first). A buffer
    /// emptied that way goes back to this thread's spares, so an idle
    /// session holds none and a busy one allocates none.
    ///
    /// `timer` is the session's timer for these waits (made at the first
    /// wait that needs one): a read that can go on at once needs none.
    pub async fn next<S: ClientStream>(
        &mut self,
        stream: &mut S,
        limits: &Limits,
        timeouts: ReadTimeouts,
        shutdown: &CancellationToken,
        timer: &mut Option<Deadline>,
    ) -> Result<Option<Range<usize>>, ReadError> {
        self.buf.advance(std::mem::take(&mut self.consumed));
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            recycle(std::mem::take(&mut self.buf));
        }
        // The last request has been answered: its buffer is gone unless
        // more requests are in it.
        if self.buf.capacity() == 0 {
            self.release();
        }
        loop {
            match self.framer.scan(&self.buf, limits) {
                Ok(Some(f)) => {
                    self.started = None;
                    self.consumed = f.end;
                    return Ok(Some(f.start..f.end));
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::Refused(e.into())),
            }
            if self.eof {
                return Ok(self.framer.finish(&self.buf).map(|f| {
                    self.consumed = f.end;
                    f.start..f.end
                }));
            }
            // Empty lines before a request are dropped, so that a client
            // sending nothing else cannot grow the buffer.
            let skipped = self.framer.take_skipped();
            self.buf.advance(skipped);
            // Between requests (nothing buffered) a shutdown ends the
            // session and the idle timeout applies; a request being
            // received is finished first, within `client_request_timeout`.
            let waiting_for_new = self.buf.is_empty();
            let until = if waiting_for_new {
                self.started = None;
                Instant::now() + timeouts.idle
            } else {
                let started = *self.started.get_or_insert_with(Instant::now);
                let until = started + timeouts.request;
                self.make_room(limits, until).await?;
                until
            };
            let buf = &mut self.buf;
            let read = async {
                if buf.is_empty() {
                    // An idle session holds no buffer while it waits.
                    std::future::poll_fn(|cx| stream.poll_sent(cx)).await?;
                    if buf.capacity() - buf.len() < READ_RESERVE {
                        *buf = spare();
                    }
                }
                stream.read_buf(buf).await
            };
            tokio::pin!(read);
            // Bytes already here need no timer and no shutdown watch.
            let ready = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
            let r = match ready {
                Poll::Ready(r) => Some(r),
                Poll::Pending => {
                    let timer = match timer {
                        Some(t) => {
                            t.set(until);
                            t
                        }
                        None => timer.insert(Deadline::new(until)),
                    };
                    tokio::select! {
                        r = read => Some(r),
                        _ = timer.expired() => None,
                        _ = shutdown.cancelled(), if waiting_for_new => return Ok(None),
                    }
                }
            };
            let n = match r {
                Some(r) => r.map_err(ReadError::Io)?,
                None if waiting_for_new => {
                    tracing::debug!("closing client connection idle for {}", crate::error::fmt_duration(timeouts.idle));
                    return Ok(None);
                }
                None => {
                    let waited_ms = timeouts.request.as_millis() as u64;
                    return Err(ReadError::Refused(RequestError::Incomplete { waited_ms }.into()));
                }
            };
            if n == 0 {
                self.eof = true;
            }
        }
    }

    /// Make sure the buffer has [`READ_RESERVE`] bytes free, charging what
    /// it grows beyond [`UNBUDGETED_BYTES`]; waits for room in the budget
    /// until `until`.
    async fn make_room(&mut self, limits: &Limits, until: Instant) -> Result<(), ReadError> {
        let len = self.buf.len();
        if self.buf.capacity() - len >= READ_RESERVE {
            return Ok(());
        }
        // Double, but not beyond the largest request there can be (the
        // framer refuses a request as soon as it outgrows the limit, so
        // `len` never exceeds it).
        let most = limits.max_request_bytes.saturating_add(READ_RESERVE);
        let want = (len + READ_RESERVE).max(len.saturating_mul(2).min(most));
        let need = charge(want).saturating_sub(self.charged);
        if need > 0 {
            self.take(need, until).await?;
            self.charged += need;
        }
        grow(&mut self.buf, want);
        Ok(())
    }

    /// Take `n` bytes from the budget for this client, or the refusal.
    async fn take(&self, n: usize, until: Instant) -> Result<(), ReadError> {
        let began = Instant::now();
        if self.budget.take(n, self.charged, until).await {
            return Ok(());
        }
        let budget = self.budget.limit.load(Ordering::Relaxed);
        let waited_ms = began.elapsed().as_millis() as u64;
        Err(ReadError::Refused(Refusal::Budget { budget, waited_ms }))
    }

    /// The bytes of a request [`RequestReader::next`] returned.
    pub fn request(&self, at: Range<usize>) -> &[u8] {
        &self.buf[at]
    }

    /// Give back what the buffer had charged (it is empty and freed).
    fn release(&mut self) {
        self.budget.give_back(std::mem::take(&mut self.charged));
    }
}

impl Drop for RequestReader {
    fn drop(&mut self) {
        self.release();
        // A client that asked one query and left gives its buffer to the next.
        recycle(std::mem::take(&mut self.buf));
    }
}

/// What a buffer of `capacity` bytes is charged: the part beyond the free
/// one, and its copies.
fn charge(capacity: usize) -> usize {
    capacity.saturating_sub(UNBUDGETED_BYTES).saturating_mul(1 + COPIES)
}

/// Request buffers of [`READ_RESERVE`] bytes kept per thread for reuse
/// (every everyday request fits one).
const SPARE_BUFFERS: usize = 64;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty buffer of [`READ_RESERVE`] bytes, a spare if there is one.
fn spare() -> BytesMut {
    SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_else(|| BytesMut::with_capacity(READ_RESERVE))
}

/// Keep an emptied buffer of [`READ_RESERVE`] bytes for reuse (larger
/// ones, grown for a large request, are freed).
fn recycle(mut buf: BytesMut) {
    buf.clear();
    // Empty: this takes back the room the requests were advanced over
    // (without allocating), so the capacity is the original one again.
    buf.reserve(READ_RESERVE);
    if buf.capacity() == READ_RESERVE {
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_BUFFERS {
                s.push(buf);
            }
        });
    }
}

/// Move the buffer's bytes to a new one of exactly `capacity` bytes (so
/// what is charged is what is allocated: `BytesMut::reserve` may double).
fn grow(buf: &mut BytesMut, capacity: usize) {
    let mut bigger = BytesMut::with_capacity(capacity);
    bigger.extend_from_slice(buf);
    *buf = bigger;
}

#[cfg(test)]
mod tests;
