//! The heartbeat: a protocol-level query that proves the site's core answers.
//!
//! `GET status` with `Columns: program_start` is cheap on every core and
//! returns the core's start time, which changes when the core restarts or
//! reloads its configuration (what invalidates cached answers).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::exchange::read_response_start;
use crate::error::SiteError;
use livemux_protocol::Status;

/// The heartbeat as sent to the site.
pub(crate) const QUERY: &[u8] = b"GET status\nResponseHeader: fixed16\nKeepAlive: on\nColumns: program_start\n\n";

/// A heartbeat answer is a number; anything longer is not a heartbeat answer.
const MAX_BODY: u64 = 4096;

/// Send a heartbeat on `stream` and return the site's `program_start`.
pub(crate) async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<i64, SiteError> {
    stream.write_all(QUERY).await?;
    stream.flush().await?;
    // The caller bounds the whole exchange (`heartbeat_timeout`).
    let unbounded = std::time::Duration::MAX;
    let start = read_response_start(stream, MAX_BODY as usize, unbounded).await.map_err(|f| f.error)?;
    let (header, prefix) = (start.header, start.prefix);
    if start.surplus {
        return Err(SiteError::HeartbeatAnswer("the site sent more bytes than its answer".into()));
    }
    if header.length > MAX_BODY {
        return Err(SiteError::HeartbeatAnswer(format!("answer of {} bytes is not a heartbeat answer", header.length)));
    }
    let mut body = vec![0u8; header.length as usize];
    body[..prefix.len()].copy_from_slice(&prefix);
    stream.read_exact(&mut body[prefix.len()..]).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            SiteError::Truncated { got: 16 + prefix.len() as u64, expected: 16 + header.length }
        }
        _ => SiteError::Io(e),
    })?;
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    if header.status != Status::Ok {
        let first = text.lines().next().unwrap_or_default();
        return Err(SiteError::HeartbeatAnswer(format!("the site answered {}: {first}", header.status)));
    }
    text.trim_matches(|c| c == '[' || c == ']' || c == '\n')
        .trim()
        .parse::<i64>()
        .map_err(|_| SiteError::HeartbeatAnswer(format!("program_start is not a number: {text:?}")))
}
