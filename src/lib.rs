//! livemux: a Livestatus proxy daemon.
//!
//! GUI workers connect to one local UNIX socket per remote site; livemux
//! hands each query to one of a few persistent connections ("channels") to
//! that site, knows from heartbeats whether the site is up, and answers
//! queries for a down site at once with an error instead of a connect timeout.
//!
//! # Layout
//! - [`config`]: TOML → validated [`config::Config`].
//! - [`app`]: bind, spawn, run, reload, drain.
//! - [`daemon`]: `livemux run` around it: pid file, systemd notify, signals.
//! - [`site`]: one actor per remote site (channels, heartbeat, state) and the
//!   [`site::SiteHandle`] every client of a site uses.
//! - [`client`]: the per-site UNIX sockets and client sessions.
//! - [`relay`]: moving a site's answer to a client under one deadline.
//! - [`deadline`]: a deadline that keeps its timer (one per session).
//! - [`watchdog`]: the send-stall watchdog for TCP clients.
//! - [`cache`]: `Cache: reload` answers and single-flight.
//! - [`spool`]: holding answers for slow clients, within memory and disk budgets.
//! - [`sockopt`]: TCP socket options (nodelay, keepalive, user timeout).
//! - [`tls`]: TLS toward sites and on cascading listeners (rustls).
//! - [`federation`]: federated sockets (one query, many sites, merged).
//! - [`inventory`]: HW/SW inventory files kept in sync with every site.
//! - [`liveproxyd`]: `livemux import-liveproxyd` (Checkmk's liveproxyd.mk to TOML).
//! - [`metrics`]: Prometheus metrics on `metrics_listen`.
//! - [`state`]: the JSON state file; [`status`]: `livemux status`, its reader.
//! - [`events`]: one struct per observable event (log line).
//! - [`error`]: error types, classified by who failed.
//! - [`cli`], `demo`: the `query` and `demo` commands (`demo`, with the
//!   simulated site it runs, only with the default feature `demo`).
//!
//! The wire format lives in the sans-I/O crate [`livemux_protocol`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod counters;
pub mod daemon;
pub mod deadline;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
pub mod events;
pub mod federation;
pub mod inventory;
pub mod liveproxyd;
pub mod metrics;
pub mod relay;
pub mod site;
pub mod sockopt;
pub mod spool;
pub mod state;
pub mod status;
pub mod tls;
pub mod watchdog;

pub use livemux_protocol as protocol;
