//! Observable events: each is a struct that writes its own log line (and,
//! later, its metric), so a call site reads `SiteStateChanged { .. }.emit()`
//! and every occurrence of an event looks the same in the log.
//!
//! Every event is emitted inside a span that names its site (`site{site=..}`
//! in the site's actor, `client{site=.. peer=..}` in a client session,
//! `listen{site=.. on=..}` in a listener), so the events carry no site of
//! their own.
//!
//! Levels: site state changes are `warn` (down) or `info`; a client's
//! malformed request or a client leaving mid-response is `info` (it is the
//! client's business, not an alarm); per-query failures caused by a site that
//! is already known to be down are `debug` (the state change said it once).

use std::time::Duration;

use crate::error::{QueryError, fmt_duration};
use crate::site::SiteState;

/// A site changed state.
pub struct SiteStateChanged<'a> {
    /// Previous state.
    pub from: SiteState,
    /// New state.
    pub to: SiteState,
    /// Why.
    pub reason: &'a str,
    /// Time spent in the previous state.
    pub after: Duration,
}

impl SiteStateChanged<'_> {
    /// Write the log line.
    pub fn emit(self) {
        let after = fmt_duration(self.after);
        match self.to {
            SiteState::Down => {
                tracing::warn!(from = %self.from, reason = self.reason, "site is down (was {} for {after}): {}", self.from, self.reason)
            }
            SiteState::Ready => {
                tracing::info!(from = %self.from, "site is ready (was {} for {after}): {}", self.from, self.reason)
            }
            SiteState::Starting => tracing::info!("site is starting"),
        }
    }
}

/// A new channel was not served: the site serves fewer concurrent
/// connections than `channels` asks for (Icinga 2 serves 2 × its CPU cores;
/// xinetd closes connections over its `instances`).
pub struct ChannelsLimited<'a> {
    /// Channels the site does serve.
    pub serving: usize,
    /// Channels the pool was growing to: `channels`, or one more than it
    /// served when it grew beyond that toward `channels_max` for waiting
    /// queries.
    pub wanted: usize,
    /// What happened to the new channel.
    pub reason: &'a str,
    /// When livemux tries one more channel again.
    pub retry: Duration,
}

impl ChannelsLimited<'_> {
    /// Write the log line.
    pub fn emit(self) {
        tracing::warn!(
            serving = self.serving,
            wanted = self.wanted,
            "site serves only {} of {} channels: a new channel {}; using {} and trying one more every {} \
             (lower `channels`, or raise the site's connection limit)",
            self.serving,
            self.wanted,
            self.reason,
            self.serving,
            fmt_duration(self.retry)
        )
    }
}

/// A client's query ended with an error response from the proxy.
pub struct QueryFailed<'a> {
    /// The error sent to the client.
    pub error: &'a QueryError,
}

impl QueryFailed<'_> {
    /// Write the log line.
    pub fn emit(self) {
        let (kind, error) = (self.error.kind(), self.error);
        match error {
            QueryError::SiteDown { .. } | QueryError::WentDown { .. } | QueryError::ShuttingDown => {
                tracing::debug!(kind, "query answered with an error: {error}")
            }
            QueryError::NotConnected { .. } => tracing::info!(kind, "query answered with an error: {error}"),
            QueryError::Refused { status, .. } => {
                tracing::info!(kind, "the site refused the query with an unframed error ({status}): {error}")
            }
            _ => tracing::warn!(kind, "query answered with an error: {error}"),
        }
    }
}

/// A client sent a request the proxy refused.
pub struct RequestRejected<'a> {
    /// The status code of the error answer.
    pub status: livemux_protocol::Status,
    /// Why.
    pub error: &'a dyn std::fmt::Display,
}

impl RequestRejected<'_> {
    /// Write the log line.
    pub fn emit(self) {
        tracing::info!(status = %self.status, "client request rejected: {}", self.error);
    }
}

/// A client went away while its response was being sent.
pub struct ClientClosedMidResponse {
    /// Bytes of the response sent.
    pub sent: u64,
    /// Bytes of the response in total.
    pub total: u64,
}

impl ClientClosedMidResponse {
    /// Write the log line.
    pub fn emit(self) {
        tracing::info!(
            sent = self.sent,
            total = self.total,
            "client closed connection while sending response ({} of {} bytes sent)",
            self.sent,
            self.total
        );
    }
}

/// A response was cut off after part of it had been sent.
pub struct ResponseCut<'a> {
    /// Bytes of the response sent.
    pub sent: u64,
    /// Bytes of the response in total.
    pub total: u64,
    /// Why.
    pub error: &'a QueryError,
}

impl ResponseCut<'_> {
    /// Write the log line.
    pub fn emit(self) {
        tracing::warn!(
            sent = self.sent,
            total = self.total,
            kind = self.error.kind(),
            "response cut after {} of {} bytes, closing the client connection: {}",
            self.sent,
            self.total,
            self.error
        );
    }
}

/// A `COMMAND` could not be forwarded.
pub struct CommandFailed<'a> {
    /// Number of commands in the request.
    pub commands: usize,
    /// Why.
    pub error: &'a QueryError,
}

impl CommandFailed<'_> {
    /// Write the log line.
    pub fn emit(self) {
        let (commands, kind, error) = (self.commands, self.error.kind(), self.error);
        match error {
            QueryError::Refused { .. } => tracing::info!(commands, kind, "COMMAND rejected by the site: {error}"),
            _ => tracing::warn!(commands, kind, "COMMAND not forwarded: {error}"),
        }
    }
}

/// A TCP client was dropped because its host stopped answering.
pub struct ClientReaped<'a> {
    /// The client's address.
    pub peer: &'a str,
    /// The signal that decided it.
    pub reason: &'a str,
    /// Bytes stuck in the send queue.
    pub stuck: u32,
}

impl ClientReaped<'_> {
    /// Write the log line.
    pub fn emit(self) {
        tracing::warn!(
            peer = self.peer,
            stuck = self.stuck,
            "dropped unresponsive TCP client {}: {} ({} bytes stuck)",
            self.peer,
            self.reason,
            self.stuck
        );
    }
}

/// A TCP client from a source outside `only_from` was turned away.
pub struct ClientRefused {
    /// The client's address.
    pub peer: std::net::SocketAddr,
}

impl ClientRefused {
    /// Write the log line.
    pub fn emit(self) {
        tracing::warn!(peer = %self.peer, "refused TCP client {}: not in only_from", self.peer);
    }
}
