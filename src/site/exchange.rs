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
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::channel::Lease;
use super::pool::Want;
use super::{Asker, SiteHandle};
use crate::config::SiteParams;
use crate::deadline::Deadline;
use crate::error::{QueryError, SiteError};
use livemux_protocol::{FIXED16_LEN, ResponseHeader, Status};

/// Bytes read together with the response header: most answers to GUI
/// queries fit, and each query in flight holds at most this much extra.
pub(crate) const PREFETCH: usize = 8 * 1024;

/// Read buffers kept for reuse per thread: a query takes one and its
/// session gives it back, so the everyday query allocates none. (An idle
/// session holds none: tens of thousands of idle clients cost nothing here.)
const SPARE_BUFFERS: usize = 32;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A read buffer of [`PREFETCH`] bytes, from this thread's spares if there is one.
fn take_buffer() -> BytesMut {
    SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_else(|| BytesMut::with_capacity(PREFETCH))
}

/// Give a read buffer back for reuse (kept only if it is one of ours,
/// untouched by a split, and this thread holds fewer than [`SPARE_BUFFERS`]).
pub(crate) fn recycle(mut buf: BytesMut) {
    buf.clear();
    if buf.capacity() == PREFETCH {
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_BUFFERS {
                s.push(buf);
            }
        });
    }
}

/// A failure while waiting for the response header.
pub struct HeaderFailure {
    /// At least one byte of the answer had arrived.
    pub any_byte: bool,
    /// What happened.
    pub error: SiteError,
}

/// The longest unframed error line read from a core (mk-livestatus formats
/// its error messages into 8 KiB); a longer one is cut here.
const UNFRAMED_LIMIT: usize = 8 * 1024;

/// Read the response header into `buf` (emptied first), and in the same
/// reads whatever part of the body has arrived with it (up to `buf`'s
/// capacity, at least `prefetch` bytes in all): one `recv` for a small
/// answer instead of two. On success `buf` holds the header and the body
/// bytes that came with it; bytes past the body come back as the surplus.
///
/// A core that answers with a line of text instead of the header (see
/// [`SiteError::Unframed`]) is noticed at the first byte that cannot belong
/// to a header; its line is read to its end (or EOF, or
/// [`UNFRAMED_LIMIT`]), each read waiting at most `unframed_wait`.
pub async fn read_response_start<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    prefetch: usize,
    unframed_wait: std::time::Duration,
) -> Result<ResponseStart, HeaderFailure> {
    buf.clear();
    buf.reserve(prefetch.max(FIXED16_LEN));
    let mut first_read = None;
    while buf.len() < FIXED16_LEN {
        if !livemux_protocol::response::could_be_header(buf) {
            let error = read_unframed(r, std::mem::take(buf), unframed_wait).await;
            return Err(HeaderFailure { any_byte: true, error });
        }
        match r.read_buf(buf).await {
            Ok(0) if buf.is_empty() => {
                return Err(HeaderFailure { any_byte: false, error: SiteError::ClosedWithoutAnswer });
            }
            Ok(0) => {
                let error = SiteError::Truncated { got: buf.len() as u64, expected: FIXED16_LEN as u64 };
                return Err(HeaderFailure { any_byte: true, error });
            }
            Ok(n) => {
                first_read.get_or_insert(n);
            }
            Err(e) => return Err(HeaderFailure { any_byte: !buf.is_empty(), error: SiteError::Io(e) }),
        }
    }
    if !livemux_protocol::response::could_be_header(buf) {
        let error = read_unframed(r, std::mem::take(buf), unframed_wait).await;
        return Err(HeaderFailure { any_byte: true, error });
    }
    let mut raw = [0u8; FIXED16_LEN];
    raw.copy_from_slice(&buf[..FIXED16_LEN]);
    let header = ResponseHeader::decode(&raw).map_err(|e| HeaderFailure { any_byte: true, error: e.into() })?;
    // Bytes beyond the announced body: the next pipelined answer, or bytes
    // that belong to no request (a core answering the leftovers of a
    // request it stopped reading). The caller decides.
    let end = FIXED16_LEN as u64 + header.length;
    let whole = first_read.is_some_and(|n| n as u64 >= end);
    let surplus = if buf.len() as u64 > end {
        let surplus = Bytes::copy_from_slice(&buf[end as usize..]);
        buf.truncate(end as usize);
        surplus
    } else {
        Bytes::new()
    };
    Ok(ResponseStart { raw, header, surplus, whole })
}

/// The start of a framed answer, as [`read_response_start`] read it (the
/// body bytes that came with it are in the caller's buffer).
pub struct ResponseStart {
    /// The header as the site sent it.
    pub raw: [u8; FIXED16_LEN],
    /// The decoded header.
    pub header: ResponseHeader,
    /// Bytes read past the body.
    pub surplus: Bytes,
    /// The first read brought the header and the whole body.
    pub whole: bool,
}

/// The rest of an answer that did not start with a header: a TLS record,
/// a core's unframed error line, or something else altogether.
async fn read_unframed<R: AsyncRead + Unpin>(r: &mut R, mut buf: BytesMut, wait: std::time::Duration) -> SiteError {
    use livemux_protocol::response::is_text;
    // A TLS record is told by its first two bytes: with one, wait for the
    // next (else a record cut after its first byte reads as garbage; found
    // by fuzzing).
    while matches!(buf[..], [0x15 | 0x16]) {
        buf.reserve(1024);
        match tokio::time::timeout(wait, r.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    if matches!(buf[..], [0x15 | 0x16, 0x03, ..]) {
        // A TLS alert or handshake record.
        return SiteError::TlsOnPlain;
    }
    let garbage = |buf: &[u8]| {
        let shown = String::from_utf8_lossy(&buf[..buf.len().min(FIXED16_LEN)]).into_owned();
        SiteError::BadHeader(livemux_protocol::HeaderError::BadStatus(shown))
    };
    loop {
        let line_end = buf.iter().position(|b| *b == b'\n').unwrap_or(buf.len());
        if !is_text(&buf[..line_end]) {
            return garbage(&buf);
        }
        if line_end < buf.len() || buf.len() >= UNFRAMED_LIMIT {
            break;
        }
        buf.reserve(1024);
        match tokio::time::timeout(wait, r.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            // EOF (how the core ends it), an error or silence: the line is what came.
            _ => break,
        }
    }
    let line = &buf[..buf.iter().position(|b| *b == b'\n').unwrap_or(buf.len()).min(UNFRAMED_LIMIT)];
    let (status, message) = livemux_protocol::unframed_error(line);
    SiteError::Unframed { status, message: String::from_utf8_lossy(message).into_owned() }
}

/// A site's answer whose header has arrived; the body is still on the
/// channel, but for the bytes that came with the header.
pub struct SiteResponse {
    /// The header as the site sent it (its last byte may be a custom separator).
    pub raw_header: [u8; FIXED16_LEN],
    /// The decoded header.
    pub header: ResponseHeader,
    /// The header and the first body bytes, as read.
    read: BytesMut,
    /// The channel, positioned right after the first body bytes.
    pub lease: Lease,
}

impl SiteResponse {
    /// The first body bytes, read together with the header.
    pub fn prefix(&self) -> &[u8] {
        &self.read[FIXED16_LEN..]
    }

    /// The whole body came with the header: nothing is left on the channel.
    pub fn complete(&self) -> bool {
        (self.read.len() - FIXED16_LEN) as u64 == self.header.length
    }

    /// The header and the body's first bytes as the site sent them.
    pub fn as_read(&self) -> &[u8] {
        &self.read
    }

    /// The whole answer fits the buffer its start was read into (up to
    /// [`PREFETCH`] bytes: nearly every answer a GUI asks for).
    pub fn fits(&self) -> bool {
        FIXED16_LEN as u64 + self.header.length <= self.read.capacity() as u64
    }

    /// Read the rest of an answer that [`fits`](SiteResponse::fits) into
    /// its buffer (a core that writes its header and body apart, as Icinga
    /// 2 and Naemon do, sends them in two segments): each read waits at
    /// most `idle` (`response_idle_timeout`), all of them end by the
    /// deadline, and the site going down ends them. On an error the
    /// channel is closed, and the error is the query's.
    pub(crate) async fn read_rest(
        mut self,
        site: &SiteHandle,
        deadline: Instant,
        idle: std::time::Duration,
    ) -> Result<SiteResponse, QueryError> {
        let end = FIXED16_LEN as u64 + self.header.length;
        let down = self.lease.down_signal();
        let failure = loop {
            let got = self.read.len() as u64;
            if got >= end {
                return Ok(self);
            }
            let until = deadline.min(Instant::now() + idle);
            let mut limited = (&mut self.lease).take(end - got);
            let read = tokio::select! {
                biased;
                r = tokio::time::timeout_at(until, limited.read_buf(&mut self.read)) => r,
                _ = down.cancelled() => break site.down_error(),
            };
            let (head, expected) = (got, end);
            match read {
                Ok(Ok(0)) => {
                    let source = body_error(io::ErrorKind::UnexpectedEof.into(), head, expected);
                    break QueryError::Site { site: site.name().to_owned(), source };
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    break QueryError::Site { site: site.name().to_owned(), source: body_error(e, head, expected) };
                }
                Err(_) if until < deadline => {
                    break QueryError::Site { site: site.name().to_owned(), source: SiteError::ResponseIdle(idle) };
                }
                Err(_) => break site.timeout_error(),
            }
        };
        // The channel is in an unknown state: it goes, with the reason.
        self.lease.discard(failure.to_string());
        recycle(self.read);
        Err(failure)
    }

    /// The read buffer, to be given back with [`recycle`] once written.
    pub(crate) fn into_read(self) -> (BytesMut, Lease) {
        (self.read, self.lease)
    }

    /// The first body bytes as a shared buffer (for a relay), and the lease.
    pub fn into_prefix(mut self) -> (Bytes, Lease) {
        let prefix = self.read.split_off(FIXED16_LEN).freeze();
        (prefix, self.lease)
    }
}

/// Why an attempt ended before the answer's header.
enum Failed {
    /// The channel was poisoned before this query read a byte.
    Poisoned(super::channel::Poisoned),
    /// Sending or reading the header failed.
    Header(HeaderFailure),
}

/// Send a query (already encoded for the site) and wait for its header;
/// `pipelinable` (see `Query::pipelinable`) lets it join a busy channel.
///
/// Waits for a channel at most `channel_timeout`, and for everything at most
/// until `deadline`. A query that got no byte of its answer because its
/// channel turned out stale (reused, failed at once), failed behind other
/// answers, or was given up with its pipeline (see `channel`), is sent once
/// more, on a fresh channel of its own: the safest place there is. Never
/// more than once.
pub async fn send_query(
    site: &SiteHandle,
    wire: &[u8],
    pipelinable: bool,
    deadline: Instant,
) -> Result<SiteResponse, QueryError> {
    send_query_with(site, wire, pipelinable, &mut Deadline::new(deadline), &site.params(), &Asker::INTERNAL).await
}

/// [`send_query`] for a caller that keeps its own [`Deadline`] (a session:
/// one timer for all its queries) and has the site's settings at hand.
pub async fn send_query_with(
    site: &SiteHandle,
    wire: &[u8],
    pipelinable: bool,
    deadline: &mut Deadline,
    params: &SiteParams,
    asker: &Asker<'_>,
) -> Result<SiteResponse, QueryError> {
    // A query a core might choke on goes alone (see `Query::pipelinable`).
    let mut want = if pipelinable { Want::Get } else { Want::Alone };
    let mut retried = false;
    let mut read = take_buffer();
    loop {
        let mut lease = match site.acquire(want, asker, deadline.at()).await {
            Ok(l) => l,
            Err(e) => {
                recycle(read);
                return Err(e);
            }
        };
        let down = lease.down_signal();
        let (unframed_wait, turn_wait) = (params.response_idle_timeout, params.channel_timeout);
        let attempt = async {
            lease.send(wire, turn_wait).await.map_err(|e| match e {
                Ok(p) => Failed::Poisoned(p),
                Err(io) => Failed::Header(HeaderFailure { any_byte: false, error: io.into() }),
            })?;
            read_response_start(&mut lease, &mut read, PREFETCH, unframed_wait).await.map_err(Failed::Header)
        };
        let outcome = tokio::select! {
            biased;
            r = attempt => Some(r),
            _ = deadline.expired() => None,
            _ = down.cancelled() => {
                recycle(read);
                return Err(site.down_error());
            }
        };
        let failure = match outcome {
            Some(Ok(ResponseStart { raw, header, surplus, whole })) => {
                lease.answer_arrived(whole);
                if header.status != Status::Ok {
                    lease.answered_with_error();
                }
                lease.unread(surplus);
                return Ok(SiteResponse { raw_header: raw, header, read, lease });
            }
            Some(Err(Failed::Poisoned(p))) if !retried => {
                tracing::debug!(channel = lease.channel_id(), reason = %p,
                    "pipelined query given up before its answer; sending it again on another channel");
                lease.discard(p.to_string());
                retried = true;
                want = Want::Fresh;
                continue;
            }
            Some(Err(Failed::Poisoned(p))) => {
                lease.discard(p.to_string());
                let source = SiteError::ChannelLost(p.0);
                QueryError::Site { site: site.name().to_owned(), source }
            }
            Some(Err(Failed::Header(f))) if !f.any_byte && lease.reused() && !retried => {
                tracing::debug!(channel = lease.channel_id(), error = %f.error,
                    "reused channel failed before answering; retrying once on a fresh channel");
                lease.discard(f.error.to_string());
                retried = true;
                want = Want::Fresh;
                continue;
            }
            Some(Err(Failed::Header(f))) => {
                lease.discard(f.error.to_string());
                QueryError::from_site(site.name(), f.error)
            }
            None => {
                lease.discard("query timeout");
                site.timeout_error()
            }
        };
        recycle(read);
        return Err(failure);
    }
}

/// Forward `COMMAND`s (already encoded, each with its empty line). The
/// site sends no answer to them, except an mk-livestatus core to one it
/// rejects: a line like `400: Unknown command` (without the fixed16 header).
/// They take a channel of their own: nothing is pipelined with them.
///
/// After the commands a heartbeat goes out on the same channel, and the call
/// returns when it is answered (at most `heartbeat_timeout`): the site
/// executes a channel's requests in order, so a query the client sends next,
/// on whatever channel, sees the commands' effect. A core's error line
/// arrives before the heartbeat's answer: the call returns it as
/// [`QueryError::Refused`], and the channel is closed (the heartbeat's
/// answer is still on it), as it is whenever the heartbeat is not answered
/// cleanly.
pub async fn send_commands(
    site: &SiteHandle,
    wire: &[u8],
    deadline: Instant,
    asker: &Asker<'_>,
) -> Result<(), QueryError> {
    let mut lease = site.acquire(Want::Alone, asker, deadline).await?;
    match tokio::time::timeout_at(deadline, lease.send_unanswered(wire)).await {
        Ok(Ok(())) => {
            let until = deadline.min(Instant::now() + site.params().heartbeat_timeout);
            let heartbeat = async {
                lease.send(super::heartbeat::QUERY, until.saturating_duration_since(Instant::now())).await.map_err(
                    |e| match e {
                        Ok(p) => SiteError::ChannelLost(p.0),
                        Err(io) => SiteError::Io(io),
                    },
                )?;
                super::heartbeat::read_answer(&mut lease).await
            };
            match tokio::time::timeout_at(until, heartbeat).await {
                Ok(Ok((_, surplus))) if surplus.is_empty() => lease.release(),
                Ok(Ok(_)) => lease.discard("after a COMMAND the site sent more than the heartbeat's answer"),
                Ok(Err(SiteError::Unframed { status, message })) => {
                    lease.discard("after a COMMAND the site answered with an error line");
                    return Err(QueryError::Refused { site: site.name().to_owned(), status, message });
                }
                Ok(Err(e)) => {
                    tracing::info!(error = %e,
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// The start of the answer in `bytes`, and what of it is in the buffer.
    async fn read_start(bytes: &[u8]) -> (Result<ResponseStart, HeaderFailure>, BytesMut) {
        let mut buf = BytesMut::new();
        (super::read_response_start(&mut &bytes[..], &mut buf, PREFETCH, Duration::from_secs(1)).await, buf)
    }

    async fn start_of(bytes: &[u8]) -> Result<ResponseStart, HeaderFailure> {
        read_start(bytes).await.0
    }

    async fn read_response_start<R: AsyncRead + Unpin>(
        r: &mut R,
        prefetch: usize,
        wait: Duration,
    ) -> Result<ResponseStart, HeaderFailure> {
        super::read_response_start(r, &mut BytesMut::new(), prefetch, wait).await
    }

    #[tokio::test]
    async fn a_header_and_its_body_and_nothing_more() {
        let (s, buf) = read_start(b"200           4\n100\n").await;
        let s = s.ok().expect("a framed answer");
        assert_eq!(
            (s.header.status, s.header.length, &buf[..], &s.surplus[..]),
            (Status::Ok, 4, &b"200           4\n100\n"[..], &b""[..])
        );
        let (s, buf) = read_start(b"400           4\nbad\nInvalid request method\n").await;
        let s = s.ok().expect("a framed answer");
        assert_eq!(&buf[FIXED16_LEN..], b"bad\n", "the body, not what follows it");
        assert_eq!(&s.surplus[..], b"Invalid request method\n", "what follows, for the caller to judge");
    }

    #[tokio::test]
    async fn an_unframed_error_line_is_the_cores_answer() {
        let Err(f) = start_of(b"Invalid request method\n").await else { panic!("not a header") };
        assert!(f.any_byte);
        match f.error {
            SiteError::Unframed { status, message } => {
                assert_eq!((status, message.as_str()), (Status::InvalidRequest, "Invalid request method"))
            }
            other => panic!("{other}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_error_line_on_an_open_connection_does_not_wait_for_16_bytes() {
        // A rejected COMMAND's line is shorter than a header, and the core
        // keeps the connection open: the line ends the answer.
        let (mut site, mut proxy) = tokio::io::duplex(1024);
        site.write_all(b"400: Bad\n").await.unwrap();
        let f = read_response_start(&mut proxy, PREFETCH, Duration::from_secs(3600)).await.err().expect("unframed");
        assert!(matches!(f.error, SiteError::Unframed { status: Status::BadRequest, ref message } if message == "Bad"));
        drop(site);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unfinished_error_line_is_taken_as_it_is_after_the_wait() {
        let (mut site, mut proxy) = tokio::io::duplex(1024);
        site.write_all(b"Invalid request").await.unwrap();
        let started = Instant::now();
        let f = read_response_start(&mut proxy, PREFETCH, Duration::from_secs(30)).await.err().expect("unframed");
        assert_eq!(started.elapsed(), Duration::from_secs(30), "one wait for the rest of the line, then no more");
        assert!(matches!(f.error, SiteError::Unframed { ref message, .. } if message == "Invalid request"));
        drop(site);
    }

    #[tokio::test]
    async fn binary_garbage_and_tls_are_not_taken_for_text() {
        let Err(f) = start_of(&[0x16, 0x03, 0x03, 0x00, 0x10]).await else { panic!() };
        assert!(matches!(f.error, SiteError::TlsOnPlain));
        let Err(f) = start_of(b"\x00\x01\x02garbage garbage garbage").await else { panic!() };
        assert!(matches!(f.error, SiteError::BadHeader(_)), "{}", f.error);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tls_record_is_told_when_its_bytes_arrive_one_at_a_time() {
        // Found by fuzzing (fuzz/corpus/fixed16_response): with the first
        // byte alone in the buffer, a TLS record was taken for garbage.
        let (mut site, mut proxy) = tokio::io::duplex(1024);
        let reader =
            tokio::spawn(async move { read_response_start(&mut proxy, PREFETCH, Duration::from_secs(5)).await });
        site.write_all(&[0x16]).await.unwrap();
        tokio::task::yield_now().await;
        site.write_all(&[0x03, 0x01, 0x02, 0x00]).await.unwrap();
        let f = reader.await.unwrap().err().expect("not a header");
        assert!(matches!(f.error, SiteError::TlsOnPlain), "{}", f.error);
    }
}
