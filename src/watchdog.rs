//! The send-stall watchdog for TCP clients.
//!
//! While livemux is sending an answer to a TCP client, the watchdog samples
//! what the kernel knows about the connection. A client whose kernel no
//! longer acknowledges anything for `send_stall_grace` is dead (half-open:
//! its host vanished without a FIN) and is reaped. A client that is slow,
//! paused (SIGSTOP) or has closed its receive window is alive: its kernel
//! still acknowledges data or answers zero-window probes, and it is left to
//! `query_timeout`. The rule, validated on this kernel (see the
//! fault-injection notes):
//!
//! - progress: nothing is queued, or the acknowledged byte count advanced;
//! - dead: no progress for the grace period, no ACK at all for the grace
//!   period, and either data in flight (retransmissions unanswered) or at
//!   least two unanswered zero-window probes;
//! - otherwise stalled but alive (a zero window the peer keeps answering).
//!
//! Deliberately not used: a small `TCP_USER_TIMEOUT` on client sockets, which
//! the kernel also applies to a zero window and so kills paused clients.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use livemux_sockinfo::{TCP_CLOSE_WAIT, TCP_ESTABLISHED, send_queue, tcp_info};
use tokio::time::Instant;

/// Why a client was reaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// The signal that decided it.
    pub reason: String,
    /// Bytes stuck in the send queue.
    pub stuck: u32,
}

/// Watches one TCP client connection.
#[derive(Debug)]
pub struct Watchdog {
    /// A duplicate of the client's socket, for `TCP_INFO` (the session owns
    /// the stream itself).
    fd: OwnedFd,
    /// The client's address, for the log line.
    pub peer: String,
    grace: Duration,
    /// Since when no progress was seen.
    stall_since: Option<Instant>,
    last_acked: Option<u64>,
}

impl Watchdog {
    /// A watchdog over `fd` (a duplicate of the client socket).
    pub fn new(fd: OwnedFd, peer: String, grace: Duration) -> Watchdog {
        Watchdog { fd, peer, grace, stall_since: None, last_acked: None }
    }

    /// How often to sample while a write is waiting.
    pub fn interval(&self) -> Duration {
        (self.grace / 8).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// A write to the client is about to start: reset the stall clock.
    pub fn start(&mut self) {
        self.stall_since = None;
        self.last_acked = None;
    }

    /// Sample the connection; `Some` if the client is dead.
    pub fn check(&mut self, now: Instant) -> Option<Reaped> {
        let fd = self.fd.as_fd();
        let (Ok(queued), Ok(info)) = (send_queue(fd), tcp_info(fd)) else {
            // No information (another OS, a closed socket): never guess.
            return None;
        };
        // A client that half-closed after its request (as `nc -N` or a
        // script that ends its request with EOF does) is in CLOSE_WAIT and
        // still reads its answer.
        if info.state != TCP_ESTABLISHED && info.state != TCP_CLOSE_WAIT {
            return Some(Reaped { reason: format!("connection closed (TCP state {})", info.state), stuck: queued });
        }
        let advanced = info.bytes_acked.is_some() && info.bytes_acked != self.last_acked;
        if queued == 0 || advanced || self.stall_since.is_none() {
            self.last_acked = info.bytes_acked;
            self.stall_since = Some(now);
            return None;
        }
        let stalled = self.stall_since.map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        let no_ack = Duration::from_millis(u64::from(info.last_ack_recv_ms));
        if stalled < self.grace || no_ack < self.grace {
            return None;
        }
        let reason = if info.unacked > 0 {
            format!(
                "no ACK for {} with {} segments unacknowledged ({} retransmissions)",
                crate::error::fmt_duration(no_ack),
                info.unacked,
                info.retransmits
            )
        } else if info.probes >= 2 {
            format!("no ACK for {}; {} zero-window probes unanswered", crate::error::fmt_duration(no_ack), info.probes)
        } else {
            return None;
        };
        Some(Reaped { reason, stuck: queued })
    }

    /// Make the socket's close discard what is queued (RST instead of a FIN
    /// behind megabytes nobody will acknowledge), so the kernel frees it now.
    pub fn abort_on_close(&self) {
        let _ = socket2::SockRef::from(&self.fd).set_linger(Some(Duration::ZERO));
    }
}
