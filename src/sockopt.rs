//! Socket options, in one place: TCP's, and a UNIX peer's credentials.
//!
//! Every TCP socket livemux has gets `TCP_NODELAY` (a query or an answer
//! chunk goes out at once) and keepalive with the site's `keepalive_idle`,
//! `keepalive_interval` and `keepalive_count`, so a peer that vanished while
//! the connection was idle is noticed by the kernel. Site connections also
//! get `TCP_USER_TIMEOUT` (livemux sends them only small queries; data they
//! leave unacknowledged that long means they are gone). Client sockets never
//! get it: the kernel applies it to a closed receive window too, which would
//! end paused but healthy clients.
//!
//! Options the operating system lacks are skipped: keepalive interval and
//! count and the user timeout exist on Linux (and some BSDs); elsewhere only
//! keepalive itself is set.

use std::io;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::{Keepalive, SiteParams};

fn keepalive(k: &Keepalive) -> TcpKeepalive {
    let ka = TcpKeepalive::new().with_time(k.idle);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd", target_os = "netbsd"))]
    let ka = ka.with_interval(k.interval).with_retries(k.count);
    ka
}

/// Options for an accepted TCP client.
pub fn tune_client(s: &TcpStream, k: &Keepalive) -> io::Result<()> {
    s.set_nodelay(true)?;
    SockRef::from(s).set_tcp_keepalive(&keepalive(k))
}

/// Options for a connection to a site.
pub fn tune_site(s: &TcpStream, p: &SiteParams) -> io::Result<()> {
    s.set_nodelay(true)?;
    let sock = SockRef::from(s);
    sock.set_tcp_keepalive(&keepalive(&p.keepalive))?;
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    sock.set_tcp_user_timeout(Some(p.tcp_user_timeout))?;
    Ok(())
}

/// A UNIX socket peer's credentials as the kernel recorded them at connect
/// (`SO_PEERCRED`): uid, gid, pid.
pub fn peer_cred(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<(u32, u32, i32)> {
    let c = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok((c.uid(), c.gid(), c.pid()))
}

/// One local process as the pool's fair share counts clients.
pub fn share_key(uid: u32, pid: i32) -> u64 {
    (u64::from(uid) << 32) | u64::from(pid as u32)
}
