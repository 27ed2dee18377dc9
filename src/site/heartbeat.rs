//! The heartbeat: a protocol-level query that proves the site's core answers.
//!
//! `GET status` with `Columns: program_start` is cheap on every core and
//! returns the core's start time, which changes when the core restarts or
//! reloads its configuration (what invalidates cached answers).

use tokio::io::{AsyncRead, AsyncReadExt};

use super::channel::Link;
use super::exchange::read_response_start;
use crate::error::SiteError;
use livemux_protocol::Status;

/// The heartbeat as sent to the site.
pub(crate) const QUERY: &[u8] = b"GET status\nResponseHeader: fixed16\nKeepAlive: on\nColumns: program_start\n\n";

/// A heartbeat answer is a number; anything longer is not a heartbeat answer.
const MAX_BODY: u64 = 4096;

/// Send a heartbeat on an idle channel and return the site's
/// `program_start` (the caller bounds it by `heartbeat_timeout`).
pub(crate) async fn exchange(link: &std::sync::Arc<Link>) -> Result<i64, SiteError> {
    let (ticket, _) = link.send(QUERY).await.map_err(|e| match e {
        Ok(p) => SiteError::HeartbeatAnswer(format!("the channel cannot be used: {p}")),
        Err(io) => SiteError::Io(io),
    })?;
    let mut turn = link.turn(ticket).await.map_err(|p| SiteError::HeartbeatAnswer(format!("{p}")))?;
    let (program_start, surplus) = read_answer(&mut turn).await?;
    if !surplus.is_empty() {
        return Err(SiteError::HeartbeatAnswer("the site sent more bytes than its answer".into()));
    }
    turn.finish();
    Ok(program_start)
}

/// Read a heartbeat answer (after [`QUERY`] was sent): the site's
/// `program_start`, and whatever was read past the answer.
pub(crate) async fn read_answer<R: AsyncRead + Unpin>(r: &mut R) -> Result<(i64, bytes::Bytes), SiteError> {
    // The caller bounds the whole exchange (`heartbeat_timeout`).
    let unbounded = std::time::Duration::MAX;
    let mut read = bytes::BytesMut::new();
    let start = read_response_start(r, &mut read, MAX_BODY as usize, unbounded).await.map_err(|f| f.error)?;
    let (header, prefix) = (start.header, &read[livemux_protocol::FIXED16_LEN..]);
    if header.length > MAX_BODY {
        return Err(SiteError::HeartbeatAnswer(format!("answer of {} bytes is not a heartbeat answer", header.length)));
    }
    let mut body = vec![0u8; header.length as usize];
    body[..prefix.len()].copy_from_slice(prefix);
    r.read_exact(&mut body[prefix.len()..]).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            SiteError::Truncated { got: 16 + prefix.len() as u64, expected: 16 + header.length }
        }
        _ => SiteError::Io(e),
    })?;
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    if header.status != Status::Ok {
        let first = text.lines().next().unwrap_or_default();
        return Err(SiteError::HeartbeatAnswer(format!("the site answered {}: {first}", header.status)));
    }
    let ps = text
        .trim_matches(|c| c == '[' || c == ']' || c == '\n')
        .trim()
        .parse::<i64>()
        .map_err(|_| SiteError::HeartbeatAnswer(format!("program_start is not a number: {text:?}")))?;
    Ok((ps, start.surplus))
}

/// When heartbeats are due, and when a site whose channels are all busy
/// has been silent long enough to check it on an extra connection: plain
/// values in, decisions out (no clock is read here).
///
/// A heartbeat is due every `interval` while the site is ready. It takes
/// an idle channel; while every channel is busy it waits ("pending"). If
/// the site sends nothing for `interval + timeout` after the heartbeat
/// became pending (or after its last byte, whichever is later), the
/// heartbeat goes out on one extra connection instead: a site busy with
/// slow queries answers it, a hung core does not.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    interval: std::time::Duration,
    timeout: std::time::Duration,
    /// The next heartbeat (None while the site is not ready).
    next: Option<tokio::time::Instant>,
    /// A heartbeat is on its way.
    in_flight: bool,
    /// A heartbeat is due but waits for a channel, since then.
    pending: Option<tokio::time::Instant>,
}

impl Schedule {
    pub(crate) fn new(interval: std::time::Duration, timeout: std::time::Duration) -> Self {
        Schedule { interval, timeout, next: None, in_flight: false, pending: None }
    }

    /// New timing (a configuration reload); a scheduled heartbeat keeps its
    /// time unless the new interval brings it nearer.
    pub(crate) fn set_timing(&mut self, interval: std::time::Duration, timeout: std::time::Duration) {
        if let Some(next) = self.next {
            let sooner = tokio::time::Instant::now() + interval;
            self.next = Some(next.min(sooner));
        }
        self.interval = interval;
        self.timeout = timeout;
    }

    /// The site became ready at `now`: the first heartbeat is one interval away.
    pub(crate) fn start(&mut self, now: tokio::time::Instant) {
        self.next = Some(now + self.interval);
    }

    /// The site went down: no heartbeats until it is ready again.
    pub(crate) fn stop(&mut self) {
        *self = Schedule::new(self.interval, self.timeout);
    }

    /// The timer at `now`: true when a heartbeat became due (it is pending
    /// until a channel takes it).
    pub(crate) fn due(&mut self, now: tokio::time::Instant) -> bool {
        if self.next.is_none_or(|t| now < t) {
            return false;
        }
        self.next = Some(now + self.interval);
        if !self.in_flight {
            self.pending.get_or_insert(now);
        }
        true
    }

    /// A heartbeat waits for an idle channel.
    pub(crate) fn wants_channel(&self) -> bool {
        self.pending.is_some() && !self.in_flight
    }

    /// A heartbeat went out (on a pool channel, a new connection, or an
    /// extra connection).
    pub(crate) fn sent(&mut self) {
        self.in_flight = true;
        self.pending = None;
    }

    /// The heartbeat in flight finished (answered or not).
    pub(crate) fn finished(&mut self) {
        self.in_flight = false;
    }

    /// When a pending heartbeat goes out on an extra connection, given when
    /// the site last sent a byte.
    pub(crate) fn stall_deadline(&self, last_rx: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let since = self.pending?;
        Some(since.max(last_rx) + self.interval + self.timeout)
    }

    /// The pending heartbeat has waited too long at `now`: send it on an
    /// extra connection (and mark it sent).
    pub(crate) fn take_stalled(&mut self, now: tokio::time::Instant, last_rx: tokio::time::Instant) -> bool {
        if self.in_flight || self.stall_deadline(last_rx).is_none_or(|t| now < t) {
            return false;
        }
        self.sent();
        true
    }

    /// The next instant this schedule needs the timer for.
    pub(crate) fn next_deadline(&self, last_rx: tokio::time::Instant) -> Option<tokio::time::Instant> {
        [self.next, self.stall_deadline(last_rx)].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::Schedule;

    #[test]
    fn a_heartbeat_is_due_every_interval_while_ready() {
        let t0 = Instant::now();
        let s5 = Duration::from_secs(5);
        let mut s = Schedule::new(s5, Duration::from_secs(2));
        assert!(!s.due(t0 + s5), "not before the site is ready");
        s.start(t0);
        assert_eq!(s.next_deadline(t0), Some(t0 + s5));
        assert!(!s.due(t0 + s5 - Duration::from_millis(1)));
        assert!(s.due(t0 + s5));
        assert!(s.wants_channel());
        s.sent();
        assert!(!s.wants_channel());
        assert_eq!(s.next_deadline(t0), Some(t0 + 2 * s5));
        // Still in flight at the next interval: nothing new pending.
        assert!(s.due(t0 + 2 * s5));
        assert!(!s.wants_channel());
        s.finished();
        s.stop();
        assert_eq!(s.next_deadline(t0), None);
    }

    #[test]
    fn a_pending_heartbeat_goes_out_on_an_extra_connection_once_the_site_is_silent_long_enough() {
        let t0 = Instant::now();
        let (s5, s2) = (Duration::from_secs(5), Duration::from_secs(2));
        let mut s = Schedule::new(s5, s2);
        s.start(t0);
        assert!(s.due(t0 + s5)); // every channel busy: it stays pending
        let pending = t0 + s5;
        // The site keeps answering the busy channels: the deadline moves.
        let last_rx = pending + Duration::from_secs(4);
        assert_eq!(s.stall_deadline(last_rx), Some(last_rx + s5 + s2));
        assert!(!s.take_stalled(last_rx + s5 + s2 - Duration::from_millis(1), last_rx));
        assert!(s.take_stalled(last_rx + s5 + s2, last_rx));
        assert!(!s.wants_channel(), "sent on the extra connection");
        assert_eq!(s.stall_deadline(last_rx), None);
    }
}
