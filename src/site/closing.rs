//! Connections livemux closed that the site may not know are closed.
//!
//! A Livestatus core gives each connection a thread (mk-livestatus, Naemon)
//! or one of a few pool threads (Icinga 2: 2 × its cores), and that thread
//! waits in `read` until the client's FIN or RST arrives. When livemux gives
//! up a channel because the path to the site is gone (a black hole, a link
//! down), its FIN is dropped like everything else; the kernel retransmits it
//! with growing gaps and, with `TCP_USER_TIMEOUT` set, gives up silently
//! after that long. A FIN that never arrives pins the site's thread for
//! good: after a few outages a site with four threads serves nobody, and
//! livemux's own heartbeats are the first to go unanswered.
//!
//! So a TCP channel closed while its path is suspect (the site is down, the
//! channel's heartbeat went unanswered, or the site had not acknowledged
//! everything sent on it) is not simply dropped. Its socket is half-closed
//! (the FIN goes out, as a close would send it), its user timeout cleared so
//! the kernel keeps retransmitting the FIN (up to `tcp_retries2`, about 15
//! minutes), and it is kept here:
//!
//! - an entry whose FIN the site acknowledged (or that the kernel ended) is
//!   closed at the next sweep: the site knows;
//! - when the site answers again, the entries still unacknowledged are reset
//!   (`SO_LINGER` 0: an RST goes out at once on the path that works now),
//!   which frees the site's threads at once rather than at the kernel's next
//!   retransmission, seconds or minutes later;
//! - while the site is ready, an entry left unacknowledged for two heartbeat
//!   intervals is reset too.
//!
//! At most `limit` entries per site (beyond, the oldest is closed the usual
//! way): the descriptors this holds are bounded by the pool's size.

use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// `tcpi_state` values of a socket whose FIN is still unacknowledged.
const FIN_WAIT1: u8 = 4;
const CLOSING: u8 = 11;

/// A site's closed-but-unconfirmed connections (shared by the actor and the
/// channels' links).
#[derive(Debug)]
pub(crate) struct Closing {
    /// The site is down: every channel closed now is kept.
    suspect: AtomicBool,
    entries: Mutex<Vec<Entry>>,
    limit: AtomicUsize,
}

#[derive(Debug)]
struct Entry {
    sock: TcpStream,
    since: Instant,
}

/// What a sweep or a recovery did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Swept {
    /// Entries the site acknowledged (or the kernel ended): closed.
    pub(crate) confirmed: usize,
    /// Entries reset.
    pub(crate) reset: usize,
    /// Entries still kept.
    pub(crate) kept: usize,
}

impl Closing {
    pub(crate) fn new(limit: usize) -> Closing {
        Closing {
            suspect: AtomicBool::new(false),
            entries: Mutex::new(Vec::new()),
            limit: AtomicUsize::new(limit.max(1)),
        }
    }

    /// A reload changed the pool's size.
    pub(crate) fn set_limit(&self, limit: usize) {
        self.limit.store(limit.max(1), Ordering::Relaxed);
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        // Pushes and retains only: a panic elsewhere leaves it consistent.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The site went down (`true`) or answers again (`false`).
    pub(crate) fn set_suspect(&self, down: bool) {
        self.suspect.store(down, Ordering::Relaxed);
    }

    /// Whether a channel closed now, on its own evidence (`silent`: its
    /// heartbeat went unanswered), is to be kept here.
    pub(crate) fn wants(&self, silent: bool, sock: &impl AsFd) -> bool {
        if silent || self.suspect.load(Ordering::Relaxed) {
            return true;
        }
        // Sent and never acknowledged: the path may be gone.
        livemux_sockinfo::tcp_info(sock.as_fd()).is_ok_and(|i| i.unacked > 0)
    }

    /// Half-close `sock` and keep it until the site has seen its FIN.
    pub(crate) fn keep(&self, sock: TcpStream) {
        if sock.shutdown(Shutdown::Write).is_err() {
            // Not connected any more: nothing the site could wait for.
            return;
        }
        // The kernel's own retransmission limit, not the channel's user timeout.
        let _ = socket2::SockRef::from(&sock).set_tcp_user_timeout(None);
        let mut entries = self.entries();
        if entries.len() >= self.limit.load(Ordering::Relaxed) {
            // The oldest closes the usual way (the kernel retransmits its FIN as an orphan).
            entries.remove(0);
        }
        entries.push(Entry { sock, since: Instant::now() });
    }

    /// Close the entries the site has acknowledged; reset those unacknowledged
    /// for longer than `patience` while the site answers heartbeats.
    pub(crate) fn sweep(&self, patience: Duration) -> Swept {
        let ready = !self.suspect.load(Ordering::Relaxed);
        let now = Instant::now();
        let mut s = Swept::default();
        self.entries().retain(|e| {
            if !unconfirmed(&e.sock) {
                s.confirmed += 1;
                false
            } else if ready && now.saturating_duration_since(e.since) >= patience {
                reset(&e.sock);
                s.reset += 1;
                false
            } else {
                s.kept += 1;
                true
            }
        });
        s
    }

    /// The site answers again: reset every entry it has not acknowledged.
    pub(crate) fn recovered(&self) -> Swept {
        self.set_suspect(false);
        let mut s = Swept::default();
        for e in self.entries().drain(..) {
            if unconfirmed(&e.sock) {
                reset(&e.sock);
                s.reset += 1;
            } else {
                s.confirmed += 1;
            }
        }
        s
    }

    /// Entries kept now.
    pub(crate) fn len(&self) -> usize {
        self.entries().len()
    }
}

/// Still waiting for the site to acknowledge our FIN.
fn unconfirmed(sock: &TcpStream) -> bool {
    livemux_sockinfo::tcp_info(sock.as_fd()).is_ok_and(|i| matches!(i.state, FIN_WAIT1 | CLOSING))
}

/// Make the coming close send an RST (the entry is dropped right after).
fn reset(sock: &TcpStream) {
    let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn a_fin_the_peer_acknowledged_is_closed_at_the_next_sweep() {
        let closing = Closing::new(4);
        let (c, mut s) = pair();
        assert!(!closing.wants(false, &c), "an idle, healthy connection closes the usual way");
        closing.keep(c);
        // The peer sees the FIN (EOF) ...
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).unwrap(), 0);
        // ... and its kernel acknowledges it (FIN_WAIT2, no more FIN_WAIT1),
        // perhaps a moment after the read: the entry stays until then.
        let deadline = Instant::now() + Duration::from_secs(5);
        let swept = loop {
            let s = closing.sweep(Duration::from_secs(60));
            if s.kept == 0 || Instant::now() > deadline {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(swept, Swept { confirmed: 1, reset: 0, kept: 0 });
        assert_eq!(closing.len(), 0);
    }

    #[tokio::test]
    async fn a_down_site_keeps_them_and_at_most_the_limit() {
        let closing = Closing::new(2);
        closing.set_suspect(true);
        let pairs: Vec<_> = (0..3).map(|_| pair()).collect();
        for (c, _) in &pairs {
            assert!(closing.wants(false, c), "the site is down: kept");
            closing.keep(c.try_clone().unwrap());
        }
        assert_eq!(closing.len(), 2, "the oldest beyond the limit is let go");
        closing.set_suspect(false);
        assert!(closing.wants(true, &pairs[0].0), "a channel whose heartbeat went unanswered: kept");
        // Loopback acknowledges at once: recovery finds them confirmed.
        let s = closing.recovered();
        assert_eq!((s.confirmed + s.reset, closing.len()), (2, 0));
    }
}
