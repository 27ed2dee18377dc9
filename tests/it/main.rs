//! livemux's integration tests, one test binary (the shared `support`
//! module is compiled once). Each module is one subject:
//!
//! - `proxy`, `clients`, `heartbeat`, `pool`: the proxy in front of
//!   simulated sites (framing, errors, limits, heartbeats, the channel pool);
//! - `pipeline`: elastic pools and pipelined channels;
//! - `desk`: channels taken and given back without the site's actor;
//! - `cache`: `Cache: reload` and single-flight;
//! - `federation`: federated sockets over simulated sites;
//! - `inventory`: HW/SW inventory sync against simulated sites;
//! - `metrics`: the Prometheus endpoint, the dashboard and alerts;
//! - `backpressure`: slow, pausing and vanishing clients, sites failing
//!   mid-answer, peak memory for 1 GiB answers;
//! - `deadpeers`: dead peers in private network namespaces (root);
//! - `tls`: TLS toward sites (stunnel) and on the listener;
//! - `realpeers`: real Icinga 2 and Naemon sites, Monitoring::Livestatus,
//!   and Thruk's requests (`tests/thruk/corpus.txt`) through a federation;
//! - `reload`: configuration reload in the running daemon;
//! - `sockets`: the UNIX sockets' mode and group (root);
//! - `cli`: the `livemux` binary (SIGHUP, pid file, systemd notify, status);
//! - `fuzz_corpus`: the fuzz targets' corpora, replayed on stable;
//! - `hotpath`: system calls and heap allocations per query, counted
//!   against budgets (the guard on livemux's own cost per query).
//!
//! Run one subject with `cargo test --test it proxy::`.

mod support;

mod access;
mod backpressure;
mod cache;
mod cli;
mod clients;
mod deadpeers;
mod desk;
mod docs;
mod federation;
mod fuzz_corpus;
mod heartbeat;
mod hotpath;
mod inventory;
mod layers;
mod metrics;
mod pipeline;
mod pool;
mod proxy;
mod realpeers;
mod reload;
mod sockets;
mod tls;
