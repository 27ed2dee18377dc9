//! The local side: one UNIX socket per site (and optionally a cascading TCP
//! listener), one session per connection.
//!
//! - [`listener`]: binding the socket (mode 0660, stale file replaced, a live
//!   one refused), the accept loop, the `max_clients` bound.
//! - [`session`]: one client connection: read a request, answer it, repeat
//!   while `KeepAlive: on`.
//!
//! The send-stall watchdog for TCP clients is [`crate::watchdog`]: the relay
//! uses it while it writes, so it sits below both.

pub mod listener;
pub mod session;
