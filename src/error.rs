//! Errors, classified by who failed.
//!
//! [`SiteError`] is what went wrong on the proxy→site hop (connect, I/O,
//! protocol, heartbeat). [`QueryError`] is what a client's query ends with
//! when it is not answered by the site; it picks the status code of the error
//! response ([`QueryError::status`]), a stable label for logs and metrics
//! ([`QueryError::kind`]) and the side to blame ([`QueryError::side`]).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use livemux_protocol::{HeaderError, Status};

/// Which party an error is attributed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The local client (bad request, went away).
    Client,
    /// The remote site (down, slow, broken answer).
    Site,
    /// The proxy itself (capacity, shutdown).
    Proxy,
}

/// A failure on the proxy→site hop.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// The connection could not be established.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The address tried.
        address: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Connecting took longer than `connect_timeout`.
    #[error("connect to {address} timed out after {}", fmt_duration(*after))]
    ConnectTimeout {
        /// The address tried.
        address: String,
        /// The configured limit.
        after: Duration,
    },
    /// The site closed the channel without sending a byte of the answer
    /// (Icinga 2 does this for some malformed queries).
    #[error("the site closed the connection without answering")]
    ClosedWithoutAnswer,
    /// The site closed the channel in the middle of an answer.
    #[error("the site closed the connection after {got} of {expected} bytes of the answer")]
    Truncated {
        /// Bytes received (header and body).
        got: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// The answer did not start with a valid fixed16 header.
    #[error("invalid response from the site: {0}")]
    BadHeader(#[from] HeaderError),
    /// The core answered with a line of text instead of the fixed16 header
    /// it was asked for: it rejected the request before reading its headers
    /// (mk-livestatus: `Invalid request method`), or a `COMMAND`.
    #[error("the site answered without a response header: {status}: {message}")]
    Unframed {
        /// The status the text carries, or 452.
        status: Status,
        /// The core's message.
        message: String,
    },
    /// A read or write on the channel failed.
    #[error("connection to the site failed: {0}")]
    Io(#[from] io::Error),
    /// The site's TLS certificate could not be verified.
    #[error("certificate of {address} could not be verified: {detail}")]
    Certificate {
        /// The site's address.
        address: String,
        /// Which certificate and why.
        detail: String,
    },
    /// TLS with the site failed otherwise.
    #[error("TLS with {address} failed: {detail}")]
    Tls {
        /// The site's address.
        address: String,
        /// What happened.
        detail: String,
    },
    /// The TLS handshake did not finish in time.
    #[error("TLS handshake with {address} did not finish within {} (does the site speak TLS on this port?)", fmt_duration(*after))]
    TlsTimeout {
        /// The site's address.
        address: String,
        /// `tls_handshake_timeout`.
        after: Duration,
    },
    /// A plaintext (tcp://) address answered with TLS.
    #[error("the site answered with TLS; use a tls:// address")]
    TlsOnPlain,
    /// Mid-answer, the site sent nothing for `response_idle_timeout`.
    #[error("the site sent nothing for {} in the middle of the answer", fmt_duration(*.0))]
    ResponseIdle(Duration),
    /// The query's channel was given up before it received a byte of its
    /// answer (it was pipelined behind another answer that failed).
    #[error("the channel it was sent on could not be used ({0})")]
    ChannelLost(&'static str),
    /// A heartbeat was not answered in time.
    #[error("heartbeat not answered within {}", fmt_duration(*.0))]
    HeartbeatTimeout(Duration),
    /// A heartbeat was answered with an error or an unreadable body.
    #[error("heartbeat failed: {0}")]
    HeartbeatAnswer(String),
}

/// Why a client's query was not answered by the site.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The site is known to be down; answered at once.
    #[error("site '{site}' is down: {cause}")]
    SiteDown {
        /// Site name.
        site: String,
        /// The failure that took it down (a certificate that could not be
        /// verified answers 495).
        cause: Arc<SiteError>,
    },
    /// The site went down while the query was being answered.
    #[error("site '{site}' went down while the query was running")]
    WentDown {
        /// Site name.
        site: String,
    },
    /// The site has not completed its first connection yet.
    #[error("site '{site}' is not connected yet (no channel within {})", fmt_duration(*waited))]
    NotConnected {
        /// Site name.
        site: String,
        /// How long the query waited.
        waited: Duration,
    },
    /// Every channel stayed busy for `channel_timeout`.
    #[error("no channel to site '{site}' became free within {}", fmt_duration(*waited))]
    NoFreeChannel {
        /// Site name.
        site: String,
        /// How long the query waited.
        waited: Duration,
    },
    /// The query was not answered within `query_timeout`.
    #[error("query to site '{site}' not answered within {}", fmt_duration(*after))]
    Timeout {
        /// Site name.
        site: String,
        /// The configured deadline.
        after: Duration,
    },
    /// The site rejected the request with an error it sent without the
    /// fixed16 header ([`SiteError::Unframed`]); the client gets the core's
    /// words with the status they carry.
    #[error("{message}")]
    Refused {
        /// Site name.
        site: String,
        /// The status.
        status: Status,
        /// The core's message.
        message: String,
    },
    /// The site failed while answering.
    #[error("site '{site}': {source}")]
    Site {
        /// Site name.
        site: String,
        /// What failed.
        #[source]
        source: SiteError,
    },
    /// The proxy is shutting down.
    #[error("livemux is shutting down")]
    ShuttingDown,
    /// The proxy lost part of the answer it was holding for the client.
    #[error("livemux failed to hold the answer: {0}")]
    Spool(String),
}

impl QueryError {
    /// Status code of the error response.
    pub fn status(&self) -> Status {
        match self {
            QueryError::SiteDown { cause, .. } if matches!(**cause, SiteError::Certificate { .. }) => {
                Status::CertificateError
            }
            QueryError::Site { source: SiteError::Certificate { .. }, .. } => Status::CertificateError,
            QueryError::SiteDown { .. } | QueryError::WentDown { .. } | QueryError::Site { .. } => {
                Status::SiteUnavailable
            }
            QueryError::NotConnected { .. } | QueryError::NoFreeChannel { .. } | QueryError::ShuttingDown => {
                Status::Busy
            }
            QueryError::Timeout { .. } => Status::Timeout,
            QueryError::Spool(_) => Status::Internal,
            QueryError::Refused { status, .. } => *status,
        }
    }

    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            QueryError::SiteDown { .. } => "site_down",
            QueryError::WentDown { .. } => "site_went_down",
            QueryError::NotConnected { .. } => "not_connected",
            QueryError::NoFreeChannel { .. } => "no_free_channel",
            QueryError::Timeout { .. } => "query_timeout",
            QueryError::Site { .. } => "site_failed",
            QueryError::ShuttingDown => "shutting_down",
            QueryError::Spool(_) => "spool_failed",
            QueryError::Refused { .. } => "refused_by_site",
        }
    }

    /// Who is to blame.
    pub fn side(&self) -> Side {
        match self {
            QueryError::SiteDown { .. }
            | QueryError::WentDown { .. }
            | QueryError::NotConnected { .. }
            | QueryError::Timeout { .. }
            | QueryError::Site { .. } => Side::Site,
            QueryError::NoFreeChannel { .. } | QueryError::ShuttingDown | QueryError::Spool(_) => Side::Proxy,
            QueryError::Refused { .. } => Side::Client,
        }
    }
}

impl QueryError {
    /// The error for a query whose answer failed with `source` on `site`:
    /// an unframed answer is the core refusing the request, anything else
    /// a failure of the site.
    pub fn from_site(site: &str, source: SiteError) -> QueryError {
        match source {
            SiteError::Unframed { status, message } => QueryError::Refused { site: site.to_owned(), status, message },
            source => QueryError::Site { site: site.to_owned(), source },
        }
    }
}

/// Durations in messages: `3s`, `250ms`, `2m 30s`.
pub fn fmt_duration(d: Duration) -> humantime::FormattedDuration {
    let d = if d >= Duration::from_secs(1) {
        Duration::from_millis(d.as_millis() as u64)
    } else {
        Duration::from_micros(d.as_micros() as u64 / 1000 * 1000)
    };
    humantime::format_duration(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_site_and_the_cause() {
        let e = QueryError::SiteDown {
            site: "berlin".into(),
            cause: Arc::new(SiteError::HeartbeatTimeout(Duration::from_secs(2))),
        };
        assert_eq!(e.to_string(), "site 'berlin' is down: heartbeat not answered within 2s");
        assert_eq!(e.status(), Status::SiteUnavailable);
        let cause = Arc::new(SiteError::Certificate { address: "tls://x:1".into(), detail: "expired".into() });
        assert_eq!(QueryError::SiteDown { site: "b".into(), cause }.status(), Status::CertificateError);
        let e = QueryError::NoFreeChannel { site: "b".into(), waited: Duration::from_millis(3000) };
        assert_eq!(e.to_string(), "no channel to site 'b' became free within 3s");
        assert_eq!(e.status().code(), 503);
        let e = QueryError::Timeout { site: "b".into(), after: Duration::from_millis(250) };
        assert_eq!(e.to_string(), "query to site 'b' not answered within 250ms");
        assert_eq!(e.status().code(), 504);
    }
}
