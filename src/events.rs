//! Observable events of the client side: each is a struct that writes its
//! own log line, so a call site reads `QueryFailed { .. }.emit()` and every
//! occurrence of an event looks the same in the log. (A site's own events,
//! such as its state changes, are in `site::events`.)
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

use crate::error::QueryError;

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

/// The command audit: one line per `COMMAND` forwarded or refused.
pub struct CommandAudit<'a> {
    /// The site or sites it went (or would have gone) to.
    pub sites: &'a str,
    /// Who sent it (`unix#3 uid=33 gid=33 pid=4242`, an address).
    pub client: &'a dyn std::fmt::Display,
    /// The command line without `COMMAND `: `[<time>] NAME;args...`.
    pub line: &'a [u8],
    /// Log the arguments too (`audit_command_arguments`).
    pub arguments: bool,
    /// `forwarded`, or why not.
    pub outcome: &'a str,
}

impl CommandAudit<'_> {
    /// The command's name: after the timestamp, up to the first `;`.
    pub fn name(line: &[u8]) -> &[u8] {
        let rest = match line.iter().position(|b| *b == b']') {
            Some(i) if line.first() == Some(&b'[') => &line[i + 1..],
            _ => line,
        };
        let rest = rest.trim_ascii_start();
        &rest[..rest.iter().position(|b| *b == b';').unwrap_or(rest.len())]
    }

    /// Write the log line (target `livemux::audit`, info).
    pub fn emit(self) {
        let name = String::from_utf8_lossy(Self::name(self.line));
        let (sites, client, outcome) = (self.sites, self.client, self.outcome);
        if self.arguments {
            let line = String::from_utf8_lossy(self.line);
            tracing::info!(target: "livemux::audit", sites, client = %client, command = %name, outcome,
                "COMMAND {name} from {client} to {sites}: {outcome}; {line}");
        } else {
            tracing::info!(target: "livemux::audit", sites, client = %client, command = %name, outcome,
                "COMMAND {name} from {client} to {sites}: {outcome}");
        }
    }
}

/// A query answered slower than `slow_query_threshold`.
pub struct SlowQuery<'a> {
    /// The site (or federation) that answered.
    pub site: &'a str,
    /// From the request's arrival to the answer's last byte.
    pub took: std::time::Duration,
    /// Bytes of the answer sent.
    pub bytes: u64,
    /// Who asked.
    pub client: &'a dyn std::fmt::Display,
    /// The request's first line (`GET services`).
    pub first_line: &'a str,
    /// Its headers: names only, or whole lines with `slow_query_log_values`.
    pub headers: &'a str,
}

impl SlowQuery<'_> {
    /// Write the log line (target `livemux::slow`, info).
    pub fn emit(self) {
        let took = crate::error::fmt_duration(self.took);
        let (site, bytes, client, first, headers) = (self.site, self.bytes, self.client, self.first_line, self.headers);
        tracing::info!(target: "livemux::slow", site, took_ms = self.took.as_millis() as u64, bytes, client = %client,
            "slow query: {first} took {took}, {bytes} bytes, for {client} ({headers})");
    }
}

/// The request's first line and its headers for the slow-query log: each
/// header's name, or with `values` the whole line (so `AuthUser` and
/// filter values appear only with `slow_query_log_values`).
pub fn describe_request(request: &[u8], values: bool) -> (String, String) {
    let text = String::from_utf8_lossy(request);
    let mut lines = text.lines().filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("").to_owned();
    let headers: Vec<String> = lines
        .map(|l| {
            let name = l.split(':').next().unwrap_or(l).trim();
            if values { l.trim().to_owned() } else { name.to_owned() }
        })
        .collect();
    (first, headers.join(", "))
}
