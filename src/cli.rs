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
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
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

/// Turn the command-line form into a request: `\n` escapes become line
/// breaks, a fixed16 header is requested, and the request ends with an empty line.
pub fn build_request(text: &str) -> Vec<u8> {
    let text = text.replace("\\n", "\n");
    let lines: Vec<&str> = text.trim_end_matches(['\n', '\r', ' ']).lines().collect();
    let mut out = String::new();
    let is_command = lines.first().is_some_and(|l| l.starts_with("COMMAND"));
    for (i, l) in lines.iter().enumerate() {
        out.push_str(l);
        out.push('\n');
        if i == 0 && !is_command && !lines.iter().any(|l| l.starts_with("ResponseHeader:")) {
            out.push_str("ResponseHeader: fixed16\n");
        }
    }
    out.push('\n');
    out.into_bytes()
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

/// Send `text` to the socket at `path`; return the body of a 200 answer.
/// A `COMMAND` has no answer; the result is then empty.
pub async fn query(path: &Path, text: &str, timeout: Duration) -> Result<Vec<u8>, QueryCliError> {
    query_target(&Target::Unix(path.to_owned()), text, timeout).await
}

/// Like [`query`], to any [`Target`].
pub async fn query_target(target: &Target, text: &str, timeout: Duration) -> Result<Vec<u8>, QueryCliError> {
    let request = build_request(text);
    let exchange = async {
        let connect_err = |source| QueryCliError::Connect { path: target.to_string(), source };
        let mut s: Box<dyn Stream> = match target {
            Target::Unix(p) => Box::new(UnixStream::connect(p).await.map_err(connect_err)?),
            Target::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a.as_str()).await.map_err(connect_err)?),
        };
        s.write_all(&request).await?;
        if request.starts_with(b"COMMAND") {
            s.shutdown().await?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await?;
            return Ok(Vec::new());
        }
        let mut raw = [0u8; FIXED16_LEN];
        s.read_exact(&mut raw).await?;
        let header = ResponseHeader::decode(&raw)?;
        let mut body = Vec::new();
        (&mut s).take(header.length).read_to_end(&mut body).await?;
        if (body.len() as u64) < header.length {
            return Err(QueryCliError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("answer cut short: {} of {} bytes", body.len(), header.length),
            )));
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
        assert_eq!(
            build_request("GET hosts\\nColumns: name state"),
            b"GET hosts\nResponseHeader: fixed16\nColumns: name state\n\n".to_vec()
        );
        assert_eq!(
            build_request("GET status\nResponseHeader: fixed16\n\n"),
            b"GET status\nResponseHeader: fixed16\n\n".to_vec()
        );
        assert_eq!(build_request("COMMAND [1] X;y"), b"COMMAND [1] X;y\n\n".to_vec());
    }
}
