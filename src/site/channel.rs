//! Channels (persistent connections to a site) and leases on them.
//!
//! The site actor owns idle channels. A query borrows one as a [`Lease`]: the
//! lease is the connection (it implements `AsyncRead`/`AsyncWrite`) plus the
//! way back to the actor. [`Lease::release`] returns a channel whose answer
//! was read completely; [`Lease::discard`] closes one in an unknown state.
//! A lease dropped without either (a task cancelled mid-query) counts as
//! discarded, so a channel is never leaked and never reused half-read.
//!
//! A channel is reused only when the site has consumed exactly the request
//! it answered. After a `200` that holds. After an error answer it need not:
//! an mk-livestatus core (Naemon, Checkmk) stops reading a request at a bad
//! header line and takes the lines after it for the next request, so the
//! next query on that connection would read the answer to those leftovers.
//! A lease whose answer was an error ([`Lease::answered_with_error`]) is
//! therefore returned as [`Return::Verify`]: the actor sends a heartbeat on
//! it and reuses it only if that is answered cleanly (leftovers cannot turn
//! keep-alive on, since the proxy strips the client's `KeepAlive` and
//! `ResponseHeader` lines, so a core that read leftovers answers them and
//! closes: the heartbeat sees that). Anything else closes the channel.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::actor::Event;
use super::connector::SiteStream;

/// When the site last sent any byte, shared by the actor and all leases.
///
/// The heartbeat logic reads it: a site whose channels are all busy but whose
/// answers keep arriving is alive.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    last_rx_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Activity { base: Instant::now(), last_rx_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_rx_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// The last time bytes arrived from the site (or the actor's start).
    pub fn last_rx(&self) -> Instant {
        self.base + std::time::Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed))
    }
}

/// One persistent connection to a site.
#[derive(Debug)]
pub struct Channel {
    /// Number, unique within the site; new connections get new numbers.
    pub id: u64,
    /// The connection.
    pub stream: SiteStream,
    /// Queries (and heartbeats) sent on it so far.
    pub uses: u64,
    /// The site generation it was opened in; stale after the site went down.
    pub generation: u64,
    /// When it entered its current state (for the state file).
    pub since: SystemTime,
}

/// What becomes of a channel when its lease ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Return {
    /// Clean: back to the idle pool.
    Reuse,
    /// Its last answer was an error: the site may not have read all of the
    /// request. Reused only after a heartbeat on it is answered cleanly.
    Verify,
    /// In an unknown state: closed.
    Close,
}

/// A channel lent to one query.
pub struct Lease {
    channel: Option<Channel>,
    reused: bool,
    /// The site answered with an error status: see [`Return::Verify`].
    error_answer: bool,
    /// The site sent bytes beyond its answer: closed when released.
    dirty: bool,
    /// A byte was written or read: the channel's state is the query's now.
    touched: bool,
    returns: mpsc::UnboundedSender<Event>,
    activity: Arc<Activity>,
    down: CancellationToken,
}

impl Lease {
    pub(crate) fn new(
        mut channel: Channel,
        returns: mpsc::UnboundedSender<Event>,
        activity: Arc<Activity>,
        down: CancellationToken,
    ) -> Lease {
        let reused = channel.uses > 0;
        channel.uses += 1;
        channel.since = SystemTime::now();
        Lease {
            channel: Some(channel),
            reused,
            error_answer: false,
            dirty: false,
            touched: false,
            returns,
            activity,
            down,
        }
    }

    /// True if the channel carried a query before: a failure before any answer
    /// byte may then be a stale connection, worth one retry on a fresh one.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// The channel's number.
    pub fn channel_id(&self) -> u64 {
        self.channel.as_ref().map_or(0, |c| c.id)
    }

    /// Cancelled when the site is declared down; the query should stop.
    pub fn down_signal(&self) -> CancellationToken {
        self.down.clone()
    }

    /// The site's answer on this channel is an error: when released, the
    /// channel is proved clean with a heartbeat before it is reused.
    pub fn answered_with_error(&mut self) {
        self.error_answer = true;
    }

    /// The site sent more than its answer: when released, the channel is
    /// closed, not reused.
    pub fn close_after_answer(&mut self) {
        self.dirty = true;
    }

    /// Return the channel for reuse: its answer was read completely (after
    /// an error answer, reuse waits for a clean heartbeat on it).
    pub fn release(mut self) {
        if self.dirty {
            return self.give_back(Return::Close, Some("the site sent more than its answer".into()));
        }
        let how = if self.error_answer { Return::Verify } else { Return::Reuse };
        self.give_back(how, None);
    }

    /// Close the channel: it is in an unknown state.
    pub fn discard(mut self, reason: impl Into<String>) {
        self.give_back(Return::Close, Some(reason.into()));
    }

    /// Take the channel back out of a lease that never reached a query
    /// (the waiting client went away); it is as it was.
    pub(crate) fn unlend(mut self) -> Option<Channel> {
        let mut ch = self.channel.take()?;
        ch.uses -= 1;
        Some(ch)
    }

    fn give_back(&mut self, how: Return, reason: Option<String>) {
        if let Some(mut channel) = self.channel.take() {
            channel.since = SystemTime::now();
            // If the actor is gone the channel is simply closed here.
            let _ = self.returns.send(Event::Returned { channel, how, reason });
        }
    }

    fn stream(&mut self) -> io::Result<&mut SiteStream> {
        match self.channel.as_mut() {
            Some(c) => Ok(&mut c.stream),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "channel already returned")),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.touched {
            self.give_back(Return::Close, Some("query abandoned mid-answer".into()));
        } else if let Some(mut channel) = self.channel.take() {
            // Never used (the query gave up waiting just as it arrived): the
            // channel is as good as before.
            channel.uses -= 1;
            let _ = self.returns.send(Event::Returned { channel, how: Return::Reuse, reason: None });
        }
    }
}

impl AsyncRead for Lease {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.touched = true;
        let before = buf.filled().len();
        let res = Pin::new(this.stream()?).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        res
    }
}

impl AsyncWrite for Lease {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.touched = true;
        Pin::new(this.stream()?).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream()?).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream()?).poll_shutdown(cx)
    }
}

/// Poll idle channels for a sign that they died: any readable event on an
/// idle channel (EOF, stray data, error) means it cannot be used. Returns the
/// index of the first such channel; registers for wake-ups on all others.
pub(crate) fn poll_dead_idle(idle: &mut [Channel], cx: &mut Context<'_>) -> Poll<usize> {
    for (i, ch) in idle.iter_mut().enumerate() {
        if ch.stream.poll_idle_event(cx).is_ready() {
            return Poll::Ready(i);
        }
    }
    Poll::Pending
}

/// True if an idle channel can be handed out: nothing is readable on it.
pub(crate) fn looks_alive(ch: &mut Channel) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    ch.stream.poll_idle_event(&mut cx).is_pending()
}
