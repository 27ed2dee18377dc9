//! The sync's queries: sent through the site's pool like any client's, each
//! on a channel of its own (nothing is pipelined behind a large answer), the
//! answer read at the site's speed in bounded chunks.

use bytes::{Bytes, BytesMut};
use livemux_protocol::python::{Event, FeedError, RowParser, Sink};
use livemux_protocol::{Query, Status};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::SyncError;
use crate::site::{Lease, SiteHandle, send_query};

/// Bytes asked of the channel per read.
const READ_CHUNK: usize = 64 * 1024;
/// An error answer's text (or the probe's answer) is read up to this size.
pub const ERROR_BODY_LIMIT: u64 = 64 * 1024;
/// A listing's answer (names and timestamps) is read whole up to this size.
pub const LISTING_LIMIT: u64 = 64 << 20;
/// Longest string (a host name) in an answer.
pub const MAX_STRING: usize = 4096;

/// An answer being read: its body in chunks.
pub struct Reading {
    prefix: Option<Bytes>,
    lease: Option<Lease>,
    remaining: u64,
    idle: std::time::Duration,
    deadline: Instant,
    site: SiteHandle,
}

impl Reading {
    /// The body's length.
    pub fn len(&self) -> u64 {
        self.remaining + self.prefix.as_ref().map_or(0, |p| p.len() as u64)
    }

    /// The next part of the body; `None` once it is complete (the channel
    /// is then back in the pool).
    pub async fn next(&mut self) -> Result<Option<Bytes>, SyncError> {
        if let Some(p) = self.prefix.take().filter(|p| !p.is_empty()) {
            return Ok(Some(p));
        }
        let Some(lease) = self.lease.as_mut() else { return Ok(None) };
        if self.remaining == 0 {
            if let Some(l) = self.lease.take() {
                l.release();
            }
            return Ok(None);
        }
        let want = (self.remaining as usize).min(READ_CHUNK);
        let mut buf = BytesMut::zeroed(want);
        let read = tokio::time::timeout_at(self.deadline.min(Instant::now() + self.idle), lease.read(&mut buf));
        let n = match read.await {
            Ok(Ok(0)) => return Err(self.lost("the site closed the channel mid-answer")),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(self.lost(&format!("reading the answer failed: {e}"))),
            Err(_) => return Err(self.lost("the answer stalled (response_idle_timeout or query_timeout)")),
        };
        buf.truncate(n);
        self.remaining -= n as u64;
        Ok(Some(buf.freeze()))
    }

    fn lost(&mut self, why: &str) -> SyncError {
        if let Some(l) = self.lease.take() {
            l.discard(why.to_owned());
        }
        SyncError::Answer { site: self.site.name().to_owned(), message: why.to_owned() }
    }

    /// The whole body, up to `limit` bytes.
    pub async fn read_all(mut self, limit: u64) -> Result<Vec<u8>, SyncError> {
        if self.len() > limit {
            let why = format!("the answer is larger than {limit} bytes");
            return Err(self.lost(&why));
        }
        let mut all = Vec::with_capacity(self.len() as usize);
        while let Some(chunk) = self.next().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }
}

/// Send `text` (a `GET` in the proxy's own words) and wait for the header.
/// A core's error answer is [`SyncError::Refused`] with its words.
pub async fn send(site: &SiteHandle, text: &str) -> Result<Reading, SyncError> {
    let query = Query::from_text(text).map_err(|e| SyncError::Answer {
        site: site.name().to_owned(),
        message: format!("livemux built a bad query: {e}"),
    })?;
    let mut wire = Vec::new();
    query.encode_for_site(&mut wire);
    let deadline = Instant::now() + site.params().query_timeout;
    // Not pipelinable: the query gets a channel of its own, so no client's
    // query waits behind an inventory answer.
    let resp = send_query(site, &wire, false, deadline).await.map_err(SyncError::from_query)?;
    let status = resp.header.status;
    let body = resp.header.length;
    let (prefix, lease) = resp.into_prefix();
    let reading = Reading {
        remaining: body.saturating_sub(prefix.len() as u64),
        prefix: Some(prefix),
        lease: Some(lease),
        idle: site.params().response_idle_timeout,
        deadline,
        site: site.clone(),
    };
    if status == Status::Ok {
        return Ok(reading);
    }
    let text = reading.read_all(ERROR_BODY_LIMIT).await.unwrap_or_default();
    let first = String::from_utf8_lossy(&text);
    let message = first.lines().next().unwrap_or_default().trim().chars().take(300).collect();
    Err(SyncError::Refused { site: site.name().to_owned(), status: status.code(), message })
}

/// Rows of scalars (integers and strings), as a listing or the probe gives.
#[derive(Default)]
struct Scalars {
    rows: Vec<Vec<Scalar>>,
}

/// A value of a small answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scalar {
    /// An integer.
    Int(i64),
    /// A string.
    Str(String),
    /// Anything else (a blob, a float, `None`).
    Other,
}

impl Sink for Scalars {
    type Error = std::convert::Infallible;
    fn event(&mut self, e: Event<'_>) -> Result<(), Self::Error> {
        let value = match e {
            Event::RowStart => {
                self.rows.push(Vec::new());
                return Ok(());
            }
            Event::Int(n) => Scalar::Int(n),
            Event::Str(s) => Scalar::Str(s.to_owned()),
            Event::Null | Event::Float(_) | Event::BlobEnd => Scalar::Other,
            Event::BlobStart | Event::BlobChunk(_) | Event::RowEnd => return Ok(()),
        };
        if let Some(row) = self.rows.last_mut() {
            row.push(value);
        }
        Ok(())
    }
}

/// Parse a small python3 answer into rows of scalars.
pub fn scalar_rows(site: &str, body: &[u8]) -> Result<Vec<Vec<Scalar>>, SyncError> {
    let mut p = RowParser::new(MAX_STRING);
    let mut rows = Scalars::default();
    let parsed = match p.feed(body, &mut rows) {
        Ok(()) => p.finish(),
        Err(FeedError::Syntax(e)) => Err(e),
        Err(FeedError::Sink(never)) => match never {},
    };
    parsed.map_err(|e| SyncError::Parse { site: site.to_owned(), source: e })?;
    Ok(rows.rows)
}
