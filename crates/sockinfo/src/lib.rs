//! What the kernel knows about a TCP socket's peer.
//!
//! The send-stall watchdog tells a dead peer from a slow or paused one by
//! what the kernel sees: whether sent bytes are still being acknowledged,
//! when the last ACK arrived, whether zero-window probes are answered. No
//! well-kept crate exposes `TCP_INFO` or `SIOCOUTQ`, so this crate does, and
//! it is the only place in livemux with `unsafe` code: two system calls on a
//! borrowed descriptor, each with its reasoning beside it.
//!
//! `TCP_INFO` is read as raw bytes and decoded at the offsets of the kernel's
//! `struct tcp_info` (an append-only ABI); fields beyond the length the kernel
//! returned are `None`. On systems other than Linux both calls return
//! `ErrorKind::Unsupported`, and callers treat that as "no information".

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The fields of `struct tcp_info` the watchdog uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfo {
    /// TCP state (1 = ESTABLISHED).
    pub state: u8,
    /// Retransmissions of the current segment.
    pub retransmits: u8,
    /// Unanswered zero-window probes (or keepalive probes).
    pub probes: u8,
    /// Exponential backoff of the retransmission timer.
    pub backoff: u8,
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// Milliseconds since the last ACK from the peer.
    pub last_ack_recv_ms: u32,
    /// Bytes the peer has acknowledged in total (Linux ≥ 4.1).
    pub bytes_acked: Option<u64>,
    /// Bytes queued but not yet sent (Linux ≥ 4.6).
    pub notsent_bytes: Option<u32>,
    /// The peer's advertised receive window (Linux ≥ 5.19).
    pub snd_wnd: Option<u32>,
}

/// `TCP_ESTABLISHED` in `tcp_info.tcpi_state`.
pub const TCP_ESTABLISHED: u8 = 1;
/// `TCP_CLOSE_WAIT` in `tcp_info.tcpi_state`: the peer sent its FIN (it
/// half-closed after its request) and may still read.
pub const TCP_CLOSE_WAIT: u8 = 8;

/// Size of the buffer handed to the kernel; larger than any `tcp_info` yet.
const TCP_INFO_BUF: usize = 512;

fn u32_at(b: &[u8], off: usize, len: usize) -> Option<u32> {
    (off + 4 <= len).then(|| u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]))
}

fn u64_at(b: &[u8], off: usize, len: usize) -> Option<u64> {
    (off + 8 <= len).then(|| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[off..off + 8]);
        u64::from_ne_bytes(a)
    })
}

/// Decode the raw bytes of `struct tcp_info` (the first `len` are valid).
pub fn decode(raw: &[u8], len: usize) -> io::Result<TcpInfo> {
    let len = len.min(raw.len());
    if len < 60 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("tcp_info too short: {len} bytes")));
    }
    Ok(TcpInfo {
        state: raw[0],
        retransmits: raw[2],
        probes: raw[3],
        backoff: raw[4],
        unacked: u32_at(raw, 24, len).unwrap_or(0),
        last_ack_recv_ms: u32_at(raw, 56, len).unwrap_or(0),
        bytes_acked: u64_at(raw, 120, len),
        notsent_bytes: u32_at(raw, 144, len),
        snd_wnd: u32_at(raw, 228, len),
    })
}

/// Read `TCP_INFO` of a TCP socket.
#[cfg(target_os = "linux")]
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    let mut raw = [0u8; TCP_INFO_BUF];
    let mut len = TCP_INFO_BUF as libc::socklen_t;
    // SAFETY: `fd` is a valid open descriptor for the lifetime of the
    // borrow; `raw` is a writable buffer of `len` bytes and `len` points to
    // its size, which the kernel lowers to the bytes it wrote. getsockopt
    // writes nothing beyond `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            raw.as_mut_ptr().cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    decode(&raw, len as usize)
}

/// Read `TCP_INFO` of a TCP socket (unsupported here).
#[cfg(not(target_os = "linux"))]
pub fn tcp_info(_fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Bytes in the socket's send queue: for TCP, sent but not acknowledged
/// plus not yet sent (`SIOCOUTQ`).
#[cfg(target_os = "linux")]
pub fn send_queue(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: `fd` is a valid open descriptor for the lifetime of the
    // borrow; SIOCOUTQ (= TIOCOUTQ) writes one c_int through the pointer,
    // which points to a live, aligned c_int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::try_from(n).unwrap_or(0))
}

/// Bytes in the socket's send queue (unsupported here).
#[cfg(not(target_os = "linux"))]
pub fn send_queue(_fd: BorrowedFd<'_>) -> io::Result<u32> {
    Err(io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn decodes_fields_at_their_offsets() {
        let mut raw = [0u8; 240];
        raw[0] = 1;
        raw[2] = 3;
        raw[3] = 4;
        raw[4] = 5;
        raw[24..28].copy_from_slice(&7u32.to_ne_bytes());
        raw[56..60].copy_from_slice(&1234u32.to_ne_bytes());
        raw[120..128].copy_from_slice(&99u64.to_ne_bytes());
        raw[144..148].copy_from_slice(&11u32.to_ne_bytes());
        raw[228..232].copy_from_slice(&65535u32.to_ne_bytes());
        let i = decode(&raw, 240).unwrap();
        assert_eq!((i.state, i.retransmits, i.probes, i.backoff, i.unacked), (1, 3, 4, 5, 7));
        assert_eq!(i.last_ack_recv_ms, 1234);
        assert_eq!((i.bytes_acked, i.notsent_bytes, i.snd_wnd), (Some(99), Some(11), Some(65535)));
        // An older kernel's shorter struct: later fields are absent.
        let old = decode(&raw, 104).unwrap();
        assert_eq!((old.bytes_acked, old.notsent_bytes, old.snd_wnd), (None, None, None));
        assert!(decode(&raw, 20).is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_a_live_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(&[7u8; 1000]).unwrap();
        let mut buf = [0u8; 1000];
        s.read_exact(&mut buf).unwrap();
        let info = tcp_info(c.as_fd()).unwrap();
        assert_eq!(info.state, TCP_ESTABLISHED);
        assert_eq!(info.bytes_acked, Some(1001), "1000 bytes plus the SYN");
        assert_eq!(send_queue(c.as_fd()).unwrap(), 0);
    }
}
