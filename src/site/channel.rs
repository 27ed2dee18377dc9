//! Channels (persistent connections to a site), the [`Link`] that several
//! pipelined queries share, and the [`Lease`] each query holds.
//!
//! The site actor owns every channel; a query borrows one as a [`Lease`].
//! The connection itself is a [`Link`]: its writing side takes one whole
//! request at a time, and each request that expects an answer draws a
//! ticket as it is written. Answers come in the order the requests went
//! out, so the reading side goes to the tickets in turn: a query reads its
//! answer when its [`Turn`] comes, and gives the reading side on (with any
//! bytes it read past its answer) when it has read all of it. One query
//! alone on a channel gets its turn at once, so pipelining costs nothing
//! when it is not used.
//!
//! A query behind another on a channel must not get what is not its answer.
//! Whatever makes the channel untrustworthy for those behind it *poisons*
//! it: an error answer (an mk-livestatus core may take the rest of a bad
//! request for the next request), bytes that belong to no request, a read
//! that failed, a query that gave up mid-answer or before its turn, an
//! answer ahead that has to wait for a slow client. Every query still
//! waiting for its turn on a poisoned channel gets [`Poisoned`] without
//! reading a byte, and sends its `GET` again on another channel; the
//! channel is closed when the last query has left it.
//!
//! A channel is reused only when the site has consumed exactly the requests
//! it answered. After a `200` that holds. After an error answer it need not,
//! so a lease whose answer was an error ([`Lease::answered_with_error`]) is
//! returned as [`Return::Verify`]: the actor sends a heartbeat on it and
//! reuses it only if that is answered cleanly (leftovers cannot turn
//! keep-alive on, since the proxy strips the client's `KeepAlive` and
//! `ResponseHeader` lines, so a core that read leftovers answers them and
//! closes: the heartbeat sees that). Anything else closes the channel.
//!
//! A lease dropped without [`Lease::release`] or [`Lease::discard`] (a task
//! cancelled mid-query) counts as discarded, so a channel is never leaked
//! and never reused half-read.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::actor::Event;
use super::closing::Closing;
use super::connector::SiteStream;
use super::desk::Desk;

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

/// A channel's tickets: the order its answers come in, and its reading side.
#[derive(Default)]
struct Turns {
    /// Tickets drawn so far (the next one's number).
    issued: u64,
    /// The ticket whose answer is next on the wire.
    serving: u64,
    /// Why queries still waiting must not read here.
    poisoned: Option<&'static str>,
    /// Queries waiting for their turn: (ticket, waker). The one whose turn
    /// comes is woken alone; all are when the channel is poisoned.
    waiting: Vec<(u64, std::task::Waker)>,
    /// The reading side, while no query holds it.
    reader: Option<Reader>,
}

/// The reading side of a connection, and what was read past an answer.
struct Reader {
    half: ReadHalf<SiteStream>,
    pending: Bytes,
}

/// A connection to a site, shared by the queries pipelined on it.
pub struct Link {
    /// Requests go out whole, one at a time.
    /// (`None` only while the link is dropped: see `closing`.)
    writer: tokio::sync::Mutex<Option<WriteHalf<SiteStream>>>,
    /// Tickets and the reading side; only ever locked for a few steps.
    turns: Mutex<Turns>,
    activity: Arc<Activity>,
    /// Quick ACKs wanted (TCP): see `connector::QuickAck`.
    quickack: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Where a TCP connection goes when it is closed on a suspect path.
    closing: Option<Arc<Closing>>,
    /// A heartbeat on it went unanswered.
    silent: std::sync::atomic::AtomicBool,
}

/// The channel cannot be read for this ticket: the query received no byte
/// of its answer and may be sent again elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poisoned(pub &'static str);

impl std::fmt::Display for Poisoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl Drop for Link {
    /// A TCP connection closed on a suspect path goes to the site's
    /// `Closing` list instead of simply closing.
    fn drop(&mut self) {
        let Some(closing) = self.closing.take() else { return };
        let Some(write) = self.writer.get_mut().take() else { return };
        let reader = self.turns.get_mut().unwrap_or_else(|e| e.into_inner()).reader.take();
        // Without its reading side (a query's turn ended abnormally) the
        // stream cannot be put together: it closes the usual way.
        let Some(reader) = reader.filter(|r| r.half.is_pair_of(&write)) else { return };
        let stream = reader.half.unsplit(write);
        let silent = *self.silent.get_mut();
        if stream.tcp().is_some_and(|s| closing.wants(silent, s))
            && let Some(sock) = stream.into_tcp()
        {
            closing.keep(sock);
        }
    }
}

impl Link {
    pub(crate) fn new(stream: SiteStream, activity: Arc<Activity>, closing: Option<Arc<Closing>>) -> Link {
        let quickack = stream.quickack_switch();
        let closing = closing.filter(|_| stream.tcp().is_some());
        let (half, write) = tokio::io::split(stream);
        let turns = Turns { reader: Some(Reader { half, pending: Bytes::new() }), ..Turns::default() };
        Link {
            writer: tokio::sync::Mutex::new(Some(write)),
            turns: Mutex::new(turns),
            activity,
            quickack,
            closing,
            silent: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A heartbeat on this connection went unanswered: when it closes, the
    /// site may not hear of it (see `closing`).
    pub(crate) fn mark_silent(&self) {
        self.silent.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn turns(&self) -> MutexGuard<'_, Turns> {
        // Held for a few assignments only; they leave it consistent.
        self.turns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake every query waiting for its turn (the channel was poisoned).
    fn wake_all(t: &mut Turns) {
        for (_, w) in t.waiting.drain(..) {
            w.wake();
        }
    }

    /// Write a request that expects an answer; its ticket is its place in
    /// the order of answers. A poisoned channel takes no more requests.
    pub(crate) async fn send(&self, wire: &[u8]) -> Result<(u64, bool), Result<Poisoned, io::Error>> {
        let mut guard = self.writer.lock().await;
        let Some(w) = guard.as_mut() else { return Err(Ok(Poisoned("the channel is closed"))) };
        let (ticket, ahead) = {
            let mut t = self.turns();
            if let Some(why) = t.poisoned {
                return Err(Ok(Poisoned(why)));
            }
            let ticket = t.issued;
            t.issued += 1;
            (ticket, t.serving < ticket)
        };
        let written = async {
            w.write_all(wire).await?;
            w.flush().await
        };
        match written.await {
            Ok(()) => Ok((ticket, ahead)),
            Err(e) => {
                // The request may be half out: nobody can trust this channel.
                self.poison("a request could not be written");
                Err(Err(e))
            }
        }
    }

    /// Write requests that expect no answer (`COMMAND`s).
    pub(crate) async fn send_unanswered(&self, wire: &[u8]) -> io::Result<()> {
        let mut guard = self.writer.lock().await;
        let Some(w) = guard.as_mut() else { return Err(io::ErrorKind::NotConnected.into()) };
        w.write_all(wire).await?;
        w.flush().await
    }

    /// The reading side for `ticket` if it is its turn now; `Ok(None)` if
    /// answers ahead of it are still to come.
    fn try_turn(self: &Arc<Self>, ticket: u64) -> Result<Option<Turn>, Poisoned> {
        let mut t = self.turns();
        if let Some(why) = t.poisoned {
            return Err(Poisoned(why));
        }
        if t.serving != ticket {
            return Ok(None);
        }
        match t.reader.take() {
            Some(reader) => Ok(Some(Turn { link: self.clone(), ticket, reader: Some(reader), finished: false })),
            None => Err(Poisoned("the channel's reading side is gone")),
        }
    }

    /// Wait until the answer to `ticket` is next, and take the reading side.
    pub(crate) async fn turn(self: &Arc<Self>, ticket: u64) -> Result<Turn, Poisoned> {
        // Taken off the list however the wait ends (a query may give up).
        struct Waiting<'a>(&'a Link, u64);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.turns().waiting.retain(|(t, _)| *t != self.1);
            }
        }
        let _waiting = Waiting(self, ticket);
        std::future::poll_fn(|cx| {
            if let Some(turn) = self.try_turn(ticket)? {
                return Poll::Ready(Ok(turn));
            }
            let mut t = self.turns();
            match t.waiting.iter_mut().find(|(n, _)| *n == ticket) {
                Some((_, w)) => w.clone_from(cx.waker()),
                None => t.waiting.push((ticket, cx.waker().clone())),
            }
            // The turn may have come between the look and the listing.
            if t.serving == ticket || t.poisoned.is_some() {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        })
        .await
    }

    /// Make every query still waiting for its turn go elsewhere.
    pub(crate) fn poison(&self, why: &'static str) {
        let mut t = self.turns();
        if t.poisoned.is_none() {
            t.poisoned = Some(why);
            Self::wake_all(&mut t);
        }
    }

    /// Lift the poison of a channel that has no request left on the wire
    /// (every ticket was read), to prove it clean with a heartbeat; false
    /// if requests are still outstanding.
    pub(crate) fn recover(&self) -> bool {
        let mut t = self.turns();
        let ok = t.serving == t.issued;
        if ok {
            t.poisoned = None;
        }
        ok
    }

    /// Why the channel cannot be trusted any more, if it cannot.
    pub(crate) fn poisoned(&self) -> Option<&'static str> {
        self.turns().poisoned
    }

    /// Tickets drawn after `ticket` (queries waiting behind it).
    fn behind(&self, ticket: u64) -> u64 {
        self.turns().issued.saturating_sub(ticket + 1)
    }

    /// Poll an idle channel for a sign that it died: EOF, an error or stray
    /// bytes (nothing should arrive on an idle connection). Registers for a
    /// wake-up otherwise.
    pub(crate) fn poll_idle_event(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut guard = self.turns();
        let Some(r) = guard.reader.as_mut() else { return Poll::Ready(()) };
        if !r.pending.is_empty() {
            return Poll::Ready(());
        }
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Pin::new(&mut r.half).poll_read(cx, &mut buf).map(|_| ())
    }
}

/// The reading side of a channel while a query reads its answer.
pub(crate) struct Turn {
    link: Arc<Link>,
    ticket: u64,
    reader: Option<Reader>,
    finished: bool,
}

impl Turn {
    /// Bytes read past this answer go back: they are the next answer's.
    pub(crate) fn unread(&mut self, bytes: Bytes) {
        if let Some(r) = self.reader.as_mut()
            && !bytes.is_empty()
        {
            let mut all = bytes::BytesMut::with_capacity(bytes.len() + r.pending.len());
            all.extend_from_slice(&bytes);
            all.extend_from_slice(&r.pending);
            r.pending = all.freeze();
        }
    }

    /// Queries waiting for their turn behind this one.
    pub(crate) fn behind(&self) -> u64 {
        self.link.behind(self.ticket)
    }

    /// The whole answer was read: the next ticket's turn.
    pub(crate) fn finish(mut self) {
        self.finished = true;
        self.hand_on();
    }

    fn hand_on(&mut self) {
        let mut t = self.link.turns();
        if let Some(r) = self.reader.take() {
            t.reader = Some(r);
        }
        if !self.finished {
            t.poisoned.get_or_insert("a query gave up in the middle of its answer");
            Link::wake_all(&mut t);
        }
        if t.serving == self.ticket {
            t.serving += 1;
            // The next answer's query, and no other.
            let next = t.serving;
            if let Some(i) = t.waiting.iter().position(|(n, _)| *n == next) {
                t.waiting.swap_remove(i).1.wake();
            }
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.reader.is_some() {
            self.hand_on();
        }
    }
}

impl AsyncRead for Turn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(r) = this.reader.as_mut() else {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "turn already finished")));
        };
        if !r.pending.is_empty() {
            let n = r.pending.len().min(buf.remaining());
            buf.put_slice(&r.pending[..n]);
            r.pending.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut r.half).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.link.activity.touch();
        }
        res
    }
}

/// One persistent connection to a site, as the actor keeps it.
pub struct Channel {
    /// Number, unique within the site; new connections get new numbers.
    pub id: u64,
    /// The connection.
    pub link: Arc<Link>,
    /// Queries (and heartbeats) sent on it so far.
    pub uses: u64,
    /// The site generation it was opened in; stale after the site went down.
    pub generation: u64,
    /// When it entered its current state (for the state file).
    pub since: SystemTime,
}

impl Channel {
    pub(crate) fn new(
        id: u64,
        stream: SiteStream,
        generation: u64,
        activity: Arc<Activity>,
        closing: Option<Arc<Closing>>,
    ) -> Channel {
        let link = Arc::new(Link::new(stream, activity, closing));
        Channel { id, link, uses: 0, generation, since: SystemTime::now() }
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("id", &self.id).field("uses", &self.uses).finish()
    }
}

/// What becomes of a channel when its lease ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Return {
    /// Clean: back to the idle pool.
    Reuse,
    /// Its last answer was an error: the site may not have read all of the
    /// request. Reused only after a heartbeat on it is answered cleanly.
    Verify,
    /// In an unknown state: closed.
    Close,
}

/// A channel lent to one query (possibly one of several pipelined on it).
pub struct Lease {
    id: u64,
    link: Arc<Link>,
    /// This query's ticket, once its request is out.
    ticket: Option<u64>,
    /// Answers were outstanding ahead of it when it was sent.
    behind_others: bool,
    /// The reading side, while it is this query's turn.
    turn: Option<Turn>,
    reused: bool,
    /// The site answered with an error status: see [`Return::Verify`].
    error_answer: bool,
    /// The site sent bytes beyond its answer with nobody behind: closed when released.
    dirty: bool,
    /// A byte was written or read: the channel's state is the query's now.
    touched: bool,
    /// Already given back.
    done: bool,
    /// Where it goes back: the desk, or through it to the actor.
    desk: Arc<Desk>,
    /// The query's client as the pool's fair share counted it
    /// (`pool::UNCOUNTED`: not counted).
    client: u64,
    down: CancellationToken,
}

impl Lease {
    pub(crate) fn new(channel: &mut Channel, desk: Arc<Desk>, down: CancellationToken, client: u64) -> Lease {
        let reused = channel.uses > 0;
        channel.uses += 1;
        channel.since = SystemTime::now();
        Lease {
            id: channel.id,
            link: channel.link.clone(),
            ticket: None,
            behind_others: false,
            turn: None,
            reused,
            error_answer: false,
            dirty: false,
            touched: false,
            done: false,
            desk,
            down,
            client,
        }
    }

    /// True if the channel carried a query before, or this one was sent
    /// behind others: a failure before any byte of its answer may then be a
    /// stale connection or what came before it, worth one more try.
    pub fn reused(&self) -> bool {
        self.reused || self.behind_others
    }

    /// How the answer's start arrived: `whole` if its first read brought
    /// the header and the whole body. A site that splits its answers gets
    /// quick ACKs before the reads that wait (see `connector::QuickAck`).
    pub(crate) fn answer_arrived(&self, whole: bool) {
        if let Some(q) = &self.link.quickack
            && q.load(std::sync::atomic::Ordering::Relaxed) == whole
        {
            q.store(!whole, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The channel's number.
    pub fn channel_id(&self) -> u64 {
        self.id
    }

    /// Cancelled when the site is declared down; the query should stop.
    pub fn down_signal(&self) -> CancellationToken {
        self.down.clone()
    }

    /// Send the query (it expects an answer), then wait for its turn to read,
    /// at most `turn_wait` (a query pipelined behind an answer that takes
    /// longer gives the channel up and goes elsewhere). `Err(Ok(p))`: the
    /// channel was given up for it before it read a byte.
    pub(crate) async fn send(
        &mut self,
        wire: &[u8],
        turn_wait: std::time::Duration,
    ) -> Result<(), Result<Poisoned, io::Error>> {
        self.touched = true;
        let (ticket, behind_others) = self.link.send(wire).await?;
        self.ticket = Some(ticket);
        self.behind_others = behind_others;
        // Alone on the channel (the common case), the turn is this query's
        // at once: no timer.
        if let Some(turn) = self.link.try_turn(ticket).map_err(Ok)? {
            self.turn = Some(turn);
            return Ok(());
        }
        let turn = match tokio::time::timeout(turn_wait, self.link.turn(ticket)).await {
            Ok(t) => t.map_err(Ok)?,
            Err(_) => {
                let why = "the answer ahead of it took longer than channel_timeout";
                self.link.poison(why);
                return Err(Ok(Poisoned(why)));
            }
        };
        self.turn = Some(turn);
        Ok(())
    }

    /// Send requests that expect no answer (`COMMAND`s, on a channel lent
    /// to them alone).
    pub(crate) async fn send_unanswered(&mut self, wire: &[u8]) -> io::Result<()> {
        self.touched = true;
        self.link.send_unanswered(wire).await
    }

    /// Bytes read past this query's answer go back to the channel: with
    /// queries behind, they are the next answers; with none, they belong to
    /// no request and the channel is closed after this one.
    pub(crate) fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        match self.turn.as_mut() {
            Some(t) if t.behind() > 0 => t.unread(bytes),
            _ => {
                self.dirty = true;
                self.link.poison("the site sent more than was asked");
            }
        }
    }

    /// The site's answer on this channel is an error: queries behind it go
    /// elsewhere (a core may take the rest of a bad request for the next
    /// request), and when released, the channel is proved clean with a
    /// heartbeat before it is reused.
    pub fn answered_with_error(&mut self) {
        self.error_answer = true;
        self.link.poison("an answer ahead of it was an error");
    }

    /// This query's answer has to wait for its slow client: queries
    /// pipelined behind it must not wait for that client too.
    pub(crate) fn stalls(&self) {
        if self.turn.as_ref().is_some_and(|t| t.behind() > 0) {
            self.link.poison("an answer ahead of it waits for a slow client");
        }
    }

    /// Return the channel for reuse: the answer was read completely (after
    /// an error answer, reuse waits for a clean heartbeat on it).
    pub fn release(mut self) {
        if let Some(t) = self.turn.take() {
            t.finish();
        }
        let behind = self.ticket.map_or(0, |t| self.link.behind(t));
        let how = if self.dirty {
            Return::Close
        } else if self.error_answer {
            // With requests behind it on the wire, their answers would meet
            // the heartbeat: only a channel it had alone can be proved clean.
            if behind == 0 { Return::Verify } else { Return::Close }
        } else if self.link.poisoned().is_some() {
            Return::Close
        } else {
            Return::Reuse
        };
        self.give_back(how, None);
    }

    /// Close the channel: it is in an unknown state.
    pub fn discard(mut self, reason: impl Into<String>) {
        self.link.poison("the channel failed");
        self.turn = None;
        self.give_back(Return::Close, Some(reason.into()));
    }

    /// The query never used the lease (it stopped waiting just as the
    /// channel arrived): the channel is as it was.
    pub(crate) fn unlend(mut self) {
        self.give_back(Return::Reuse, None);
    }

    fn give_back(&mut self, how: Return, reason: Option<String>) {
        if self.done {
            return;
        }
        self.done = true;
        // A clean channel goes back to the desk while nobody waits for one;
        // everything else is the actor's to settle.
        if how == Return::Reuse && self.desk.give_back(self.id, self.client) {
            return;
        }
        // If the actor is gone the channel is simply closed with it.
        let (id, client) = (self.id, self.client);
        let _ = self.desk.report(Event::Returned { id, how, reason: reason.map(Box::new), client });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.touched {
            self.link.poison("a query gave up");
            self.turn = None;
            self.give_back(Return::Close, Some("query abandoned mid-answer".into()));
        } else {
            // Never used (the query gave up waiting just as it arrived): the
            // channel is as good as before.
            self.give_back(Return::Reuse, None);
        }
    }
}

impl AsyncRead for Lease {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().turn.as_mut() {
            Some(t) => Pin::new(t).poll_read(cx, buf),
            None => Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "not this query's turn"))),
        }
    }
}

/// Poll idle channels for a sign that they died: any readable event on an
/// idle channel (EOF, stray data, error) means it cannot be used. Returns the
/// index of the first such channel; registers for wake-ups on all others.
pub(crate) fn poll_dead_idle<'a>(idle: impl Iterator<Item = &'a mut Channel>, cx: &mut Context<'_>) -> Poll<usize> {
    for (i, ch) in idle.enumerate() {
        if ch.link.poll_idle_event(cx).is_ready() {
            return Poll::Ready(i);
        }
    }
    Poll::Pending
}

/// True if an idle channel can be handed out: nothing is readable on it.
pub(crate) fn looks_alive(ch: &mut Channel) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    ch.link.poll_idle_event(&mut cx).is_pending()
}
