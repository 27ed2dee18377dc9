//! Who a client is: on a UNIX socket the process's credentials as the
//! kernel recorded them at connect (`SO_PEERCRED`: uid, gid, pid), on TCP
//! its address. Log lines about a client, the command audit and the
//! slow-query log name it; [`may_command`] decides by it.

use std::net::SocketAddr;

/// A UNIX client's credentials, from the kernel (not from the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cred {
    /// Effective user id at connect.
    pub uid: u32,
    /// Effective group id at connect.
    pub gid: u32,
    /// Process id at connect (0 when the kernel gave none).
    pub pid: i32,
}

impl Cred {
    /// A UNIX client's credentials (`SO_PEERCRED`), if the kernel gives them.
    pub fn of(stream: &tokio::net::UnixStream) -> Option<Cred> {
        match stream.peer_cred() {
            Ok(c) => Some(Cred { uid: c.uid(), gid: c.gid(), pid: c.pid().unwrap_or(0) }),
            Err(e) => {
                tracing::debug!(error = %e, "no credentials for a UNIX client (SO_PEERCRED)");
                None
            }
        }
    }
}

/// Who a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A UNIX socket client: numbered per socket, with its credentials
    /// when the kernel gave them.
    Unix {
        /// The connection's number on its socket.
        n: u64,
        /// `SO_PEERCRED`.
        cred: Option<Cred>,
    },
    /// A TCP client.
    Tcp(SocketAddr),
}

impl Peer {
    /// A client of a UNIX socket, its credentials read from the kernel.
    pub fn of_unix(stream: &tokio::net::UnixStream, n: u64) -> Peer {
        Peer::Unix { n, cred: Cred::of(stream) }
    }

    /// The client's credentials (UNIX sockets).
    pub fn cred(&self) -> Option<Cred> {
        match self {
            Peer::Unix { cred, .. } => *cred,
            Peer::Tcp(_) => None,
        }
    }

    /// The client as the pool's fair share counts it: one local process
    /// (uid and pid), or one remote address (every port of it).
    pub fn share_key(&self) -> u64 {
        match self {
            Peer::Unix { cred: Some(c), .. } => crate::sockopt::share_key(c.uid, c.pid),
            // Without credentials each connection is its own client.
            Peer::Unix { n, cred: None } => (1 << 63) | n,
            Peer::Tcp(a) => {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                a.ip().to_canonical().hash(&mut h);
                h.finish() | (1 << 62)
            }
        }
    }
}

/// Whether `peer` may send `COMMAND`s under `policy`; `Err` says why not.
pub fn may_command(policy: &crate::config::CommandPolicy, peer: &Peer) -> Result<(), String> {
    let cred = match peer {
        Peer::Tcp(_) if !policy.listen_allow => return Err("commands are denied on this listener".into()),
        Peer::Tcp(_) if policy.restricted_to_local_users() => {
            return Err("commands are allowed only from the local users of commands_from_uids/groups".into());
        }
        Peer::Tcp(_) => return Ok(()),
        Peer::Unix { .. } if !policy.allow => return Err("commands are denied on this socket".into()),
        Peer::Unix { .. } if !policy.restricted_to_local_users() => return Ok(()),
        Peer::Unix { cred: None, .. } => return Err("the client's credentials are unknown".into()),
        Peer::Unix { cred: Some(c), .. } => *c,
    };
    if policy.from_uids.contains(&cred.uid) || policy.from_gids.contains(&cred.gid) {
        return Ok(());
    }
    if !policy.from_gids.is_empty() && member_of_any(cred, &policy.from_gids) {
        return Ok(());
    }
    Err(format!("uid {} (gid {}) is not in commands_from_uids or commands_from_groups", cred.uid, cred.gid))
}

/// Whether the user `cred.uid` is a member of one of `gids` (its
/// supplementary groups, as the group database says now).
fn member_of_any(cred: Cred, gids: &[u32]) -> bool {
    use nix::unistd::{Gid, Uid, User, getgrouplist};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(cred.uid)) else { return false };
    let Ok(name) = std::ffi::CString::new(user.name) else { return false };
    getgrouplist(&name, Gid::from_raw(cred.gid)).is_ok_and(|groups| groups.iter().any(|g| gids.contains(&g.as_raw())))
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Unix { n, cred: Some(c) } => write!(f, "unix#{n} uid={} gid={} pid={}", c.uid, c.gid, c.pid),
            Peer::Unix { n, cred: None } => write!(f, "unix#{n}"),
            Peer::Tcp(a) => write!(f, "{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_client_is_named_by_its_credentials() {
        let p = Peer::Unix { n: 17, cred: Some(Cred { uid: 33, gid: 33, pid: 4242 }) };
        assert_eq!(p.to_string(), "unix#17 uid=33 gid=33 pid=4242");
        assert_eq!(Peer::Unix { n: 3, cred: None }.to_string(), "unix#3");
    }

    #[test]
    fn one_process_or_one_address_is_one_client_for_the_fair_share() {
        let cred = Some(Cred { uid: 33, gid: 33, pid: 4242 });
        let (a, b) = (Peer::Unix { n: 1, cred }, Peer::Unix { n: 2, cred });
        assert_eq!(a.share_key(), b.share_key());
        let other = Peer::Unix { n: 3, cred: Some(Cred { uid: 33, gid: 33, pid: 4243 }) };
        assert_ne!(a.share_key(), other.share_key());
        let (t1, t2): (SocketAddr, SocketAddr) = ("10.0.0.1:40000".parse().unwrap(), "10.0.0.1:40001".parse().unwrap());
        assert_eq!(Peer::Tcp(t1).share_key(), Peer::Tcp(t2).share_key());
        assert_ne!(Peer::Tcp(t1).share_key(), Peer::Tcp("10.0.0.2:40000".parse().unwrap()).share_key());
        assert_ne!(Peer::Unix { n: 1, cred: None }.share_key(), Peer::Unix { n: 2, cred: None }.share_key());
    }
}
