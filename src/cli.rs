//! `livemux query`: send one request to a Livestatus socket and print the answer.
//!
//! The request text may contain `\n` (backslash, n) for line breaks, so it
//! fits in one shell argument. `ResponseHeader: fixed16` is added when the
//! request does not ask for it, so the status code is known: the body goes to
//! stdout, and a non-200 answer becomes an error with its text.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use livemux_protocol::{FIXED16_LEN, ResponseHeader, Status};

/// A connection `livemux query` can use.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Why `livemux query` failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryCliError {
    /// Could not connect.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The answer could not be read in time.
    #[error("no complete answer within {}", crate::error::fmt_duration(*.0))]
    Timeout(Duration),
    /// Nothing to send.
    #[error("empty query (write e.g. 'GET status')")]
    Empty,
    /// The server closed the connection before a complete response header.
    #[error("the server closed the connection without an answer ({got} bytes of the response header)")]
    Closed {
        /// Header bytes received.
        got: usize,
    },
    /// The server closed the connection in the middle of the answer.
    #[error("the answer was cut short: {got} of {expected} bytes, then the server closed the connection")]
    Cut {
        /// Body bytes received.
        got: u64,
        /// Body bytes announced.
        expected: u64,
    },
    /// The answer did not start with a fixed16 header.
    #[error("invalid answer: {0}")]
    BadHeader(#[from] livemux_protocol::HeaderError),
    /// The server answered with an error status.
    #[error("{status}: {message}")]
    Status {
        /// The status code.
        status: Status,
        /// The error text.
        message: String,
    },
}

/// Where the query text came from: a command-line argument may use `\n`
/// (backslash, n) for line breaks; text from stdin is taken as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A shell argument: `\n` stands for a line break.
    Argument,
    /// Standard input: no escapes.
    Stdin,
}

/// Turn the query text into a request: leading empty lines and trailing
/// whitespace go, `ResponseHeader: fixed16` is added after the first line
/// (also for a `COMMAND`: livemux and Icinga 2 then confirm it), and the
/// request ends with an empty line. `None` for an empty query.
pub fn build_request(text: &str, source: Source) -> Option<Vec<u8>> {
    let text = match source {
        Source::Argument => text.replace("\\n", "\n"),
        Source::Stdin => text.to_owned(),
    };
    let lines: Vec<&str> = text.trim().lines().map(|l| l.trim_end_matches('\r')).collect();
    if lines.is_empty() {
        return None;
    }
    let mut out = String::new();
    let asks_fixed16 = lines.iter().any(|l| l.starts_with("ResponseHeader:"));
    for (i, l) in lines.iter().enumerate() {
        out.push_str(l);
        out.push('\n');
        if i == 0 && !asks_fixed16 {
            out.push_str("ResponseHeader: fixed16\n");
        }
    }
    out.push('\n');
    Some(out.into_bytes())
}

/// Where `livemux query` connects.
#[derive(Debug, Clone)]
pub enum Target {
    /// A UNIX socket (a site's socket in `socket_dir`).
    Unix(std::path::PathBuf),
    /// A TCP address (a cascading listener, or a site itself).
    Tcp(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "{}", p.display()),
            Target::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Send `text` (in the command-line form) to the socket at `path`; return
/// the body of a 200 answer.
pub async fn query(path: &Path, text: &str, timeout: Duration) -> Result<Vec<u8>, QueryCliError> {
    query_target(&Target::Unix(path.to_owned()), text, Source::Argument, timeout).await
}

/// Like [`query`], to any [`Target`], with text from `source`.
///
/// The write side is closed after the request, so a server that does not
/// answer (a core never answers a `COMMAND`) ends the exchange at once: for
/// a `COMMAND` that is success, for a query an error.
pub async fn query_target(
    target: &Target,
    text: &str,
    source: Source,
    timeout: Duration,
) -> Result<Vec<u8>, QueryCliError> {
    let request = build_request(text, source).ok_or(QueryCliError::Empty)?;
    let is_command = request.starts_with(b"COMMAND");
    let exchange = async {
        let connect_err = |source| QueryCliError::Connect { path: target.to_string(), source };
        let mut s: Box<dyn Stream> = match target {
            Target::Unix(p) => Box::new(UnixStream::connect(p).await.map_err(connect_err)?),
            Target::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a.as_str()).await.map_err(connect_err)?),
        };
        s.write_all(&request).await?;
        s.shutdown().await?;
        let mut raw = Vec::with_capacity(FIXED16_LEN);
        (&mut s).take(FIXED16_LEN as u64).read_to_end(&mut raw).await?;
        match raw.len() {
            0 if is_command => return Ok(Vec::new()),
            FIXED16_LEN => {}
            n => return Err(QueryCliError::Closed { got: n }),
        }
        let mut head = [0u8; FIXED16_LEN];
        head.copy_from_slice(&raw);
        let header = ResponseHeader::decode(&head)?;
        let mut body = Vec::new();
        (&mut s).take(header.length).read_to_end(&mut body).await?;
        if (body.len() as u64) < header.length {
            return Err(QueryCliError::Cut { got: body.len() as u64, expected: header.length });
        }
        if header.status != Status::Ok {
            let message = String::from_utf8_lossy(&body).trim_end().to_owned();
            return Err(QueryCliError::Status { status: header.status, message });
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| QueryCliError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_fixed16() {
        let arg = |t| build_request(t, Source::Argument);
        assert_eq!(
            arg("GET hosts\\nColumns: name state"),
            Some(b"GET hosts\nResponseHeader: fixed16\nColumns: name state\n\n".to_vec())
        );
        assert_eq!(
            arg("GET status\nResponseHeader: fixed16\n\n"),
            Some(b"GET status\nResponseHeader: fixed16\n\n".to_vec())
        );
        assert_eq!(arg("COMMAND [1] X;y"), Some(b"COMMAND [1] X;y\nResponseHeader: fixed16\n\n".to_vec()));
        // Leading empty lines and CRLF are tidied; nothing left is no query.
        assert_eq!(arg("\n\nGET status\r\n"), Some(b"GET status\nResponseHeader: fixed16\n\n".to_vec()));
        assert_eq!(arg(""), None);
        assert_eq!(arg("\\n\\n"), None);
        // From stdin, a literal backslash-n stays (a regular expression, say).
        assert_eq!(
            build_request("GET hosts\nFilter: name ~ a\\nb\n", Source::Stdin),
            Some(b"GET hosts\nResponseHeader: fixed16\nFilter: name ~ a\\nb\n\n".to_vec())
        );
    }
}
