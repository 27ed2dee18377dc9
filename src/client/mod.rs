//! The local side: one UNIX socket per site (and optionally a cascading TCP
//! listener), one session per connection.
//!
//! - [`listener`]: binding the socket (`socket_mode`, `socket_group`; stale
//!   file replaced, a live one refused), the accept loop, the `max_clients`
//!   bound.
//! - [`session`]: one client connection: read a request, answer it, repeat
//!   while `KeepAlive: on`.
//! - [`peer`]: who a client is (`SO_PEERCRED` on UNIX sockets, the address
//!   on TCP), for log lines, the command audit and the fair share.
//! - [`reader`]: receiving requests, every buffer within the daemon-wide
//!   `request_memory_budget` (federated sockets use it too).
//!
//! The send-stall watchdog for TCP clients is [`crate::watchdog`]: the relay
//! uses it while it writes, so it sits below both.

pub mod listener;
pub mod peer;
pub mod reader;
pub mod session;

use std::sync::Arc;

/// What all client sessions of the daemon share.
#[derive(Clone)]
pub struct Shared {
    /// The budget of answers held for slow clients.
    pub spool: Arc<crate::spool::SpoolBudget>,
    /// The budget of requests being received.
    pub requests: Arc<reader::RequestBudget>,
    /// The query cache.
    pub cache: Arc<crate::cache::Cache>,
}
