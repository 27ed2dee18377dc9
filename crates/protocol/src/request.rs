//! Client requests: framing under limits, parsing, and re-encoding for a site.
//!
//! Framing and parsing are separate steps. [`Framer::scan`] looks at a growing
//! buffer and says where the next request ends (at its empty line), enforcing
//! the [`Limits`] while bytes arrive, so an oversized request is refused before
//! it is buffered whole. [`Request::parse`] then turns the framed block into a
//! [`Query`] or a [`CommandRequest`].
//!
//! The proxy acts on five headers: `KeepAlive`, `ResponseHeader`,
//! `OutputFormat`, `AuthUser` and `Cache`. Every other line is passed through
//! to the site byte for byte and in order (filter and stats stacks depend on
//! the order). `KeepAlive`, `ResponseHeader` and `Cache` belong to the
//! client-to-proxy hop and are removed; [`Query::encode_for_site`] writes the
//! proxy's own `ResponseHeader: fixed16` and `KeepAlive: on` directly after the
//! `GET` line, because Icinga 2 stops reading headers at the first bad line.

use bytes::Bytes;
use memchr::memchr;

/// Default for [`Limits::max_request_bytes`]: 4 MiB per request.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;
/// Default for [`Limits::max_header_lines`]: header lines after the first line.
pub const DEFAULT_MAX_HEADER_LINES: usize = 50_000;
/// Default for [`Limits::max_line_bytes`]: 1 MiB per line.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// Bounds on what one client request may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes in one request, from its first line to its empty line.
    pub max_request_bytes: usize,
    /// Header lines in one request (not counting the first line).
    pub max_header_lines: usize,
    /// Bytes in one line, without its line terminator.
    pub max_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_header_lines: DEFAULT_MAX_HEADER_LINES,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        }
    }
}

/// Which of the [`Limits`] a request exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// [`Limits::max_request_bytes`].
    RequestBytes,
    /// [`Limits::max_header_lines`].
    HeaderLines,
    /// [`Limits::max_line_bytes`].
    LineBytes,
}

impl Limit {
    /// The configuration key that sets this limit.
    pub fn config_key(self) -> &'static str {
        match self {
            Limit::RequestBytes => "max_request_bytes",
            Limit::HeaderLines => "max_header_lines",
            Limit::LineBytes => "max_line_bytes",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Limit::RequestBytes | Limit::LineBytes => "bytes",
            Limit::HeaderLines => "header lines",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Limit::RequestBytes => "request",
            Limit::HeaderLines => "request",
            Limit::LineBytes => "request line",
        }
    }
}

/// Why a request was refused. Each variant maps to a Livestatus status code
/// through [`RequestError::status`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request exceeds one of the [`Limits`] (413).
    #[error("{} too large: more than {limit} {} ({})", .which.what(), .which.unit(), .which.config_key())]
    TooLarge {
        /// The limit that was exceeded.
        which: Limit,
        /// Its configured value.
        limit: usize,
    },
    /// The first line is neither `GET <table>` nor `COMMAND ...` (452).
    #[error("invalid request method '{0}' (expected GET or COMMAND)")]
    InvalidMethod(String),
    /// `GET` without a table name (452).
    #[error("invalid GET request, missing table name")]
    MissingTable,
    /// The table name or a header the proxy interprets is not UTF-8 (452).
    #[error("invalid request: {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// A header the proxy interprets has a value it does not understand (400).
    #[error("invalid value '{value}' for header {name} (expected {expected})")]
    BadHeader {
        /// Header name, e.g. `KeepAlive`.
        name: &'static str,
        /// The value the client sent (truncated).
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// The request began but did not end (no empty line) within the time
    /// the proxy allows for receiving one (451).
    #[error("incomplete request: it did not end with an empty line within {waited_ms} ms (client_request_timeout)")]
    Incomplete {
        /// How long the proxy waited for the rest, in milliseconds.
        waited_ms: u64,
    },
}

impl RequestError {
    /// The Livestatus status code for this error, as mk-livestatus uses them.
    pub fn status(&self) -> crate::Status {
        use crate::Status;
        match self {
            RequestError::TooLarge { .. } => Status::PayloadTooLarge,
            RequestError::BadHeader { .. } => Status::BadRequest,
            RequestError::Incomplete { .. } => Status::Incomplete,
            RequestError::InvalidMethod(_) | RequestError::MissingTable | RequestError::NotUtf8(_) => {
                Status::InvalidRequest
            }
        }
    }
}

/// How the client wants to be answered: with or without the fixed16 header,
/// and whether the connection stays open afterwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyStyle {
    /// `ResponseHeader: fixed16` was requested.
    pub fixed16: bool,
    /// `KeepAlive: on` was requested.
    pub keepalive: bool,
}

impl ReplyStyle {
    /// Best-effort reply style of a request that could not be parsed, so that
    /// even the error is answered in the form the client asked for.
    pub fn sniff(block: &[u8]) -> ReplyStyle {
        let mut style = ReplyStyle::default();
        for line in lines(block) {
            style.observe(line);
        }
        style
    }

    fn observe(&mut self, line: &[u8]) {
        if let Some((name, value)) = split_header(line) {
            match name {
                b"ResponseHeader" => self.fixed16 = value == b"fixed16",
                b"KeepAlive" => self.keepalive = value == b"on",
                _ => {}
            }
        }
    }
}

/// Where a complete request lies in the buffer given to [`Framer::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameEnd {
    /// First byte of the request (leading empty lines are skipped).
    pub start: usize,
    /// One past the last byte, including the terminating empty line.
    pub end: usize,
}

/// Finds request boundaries in a byte stream, incrementally.
///
/// Feed it the same growing buffer on every call; it remembers how far it has
/// looked, so each byte is examined once. After a request is returned the
/// caller removes `..end` from the buffer; the framer has already reset itself.
#[derive(Debug, Default, Clone)]
pub struct Framer {
    /// Start of the current request (after skipped empty lines).
    start: usize,
    /// Start of the line not yet terminated by `\n`.
    line_start: usize,
    /// Non-empty lines seen in the current request.
    lines: usize,
}

impl Framer {
    /// A framer at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The reply style of the request being framed in `buf`, as far as it
    /// has arrived (to answer a request that breaks a limit in the form
    /// its client asked for): looked for only then, not on every line.
    pub fn style(&self, buf: &[u8]) -> ReplyStyle {
        ReplyStyle::sniff(buf.get(self.start..).unwrap_or_default())
    }

    /// Look for the end of the next request in `buf`.
    ///
    /// Returns `Ok(None)` while the request is incomplete; an error as soon as
    /// the bytes seen so far break a limit. Empty lines before a request are
    /// skipped (Icinga 2 would drop the connection on them).
    pub fn scan(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<FrameEnd>, RequestError> {
        while let Some(pos) = memchr(b'\n', &buf[self.line_start..]) {
            let nl = self.line_start + pos;
            if pos > limits.max_line_bytes {
                return Err(too_large(Limit::LineBytes, limits.max_line_bytes));
            }
            let line = trim_cr(&buf[self.line_start..nl]);
            self.line_start = nl + 1;
            if line.is_empty() {
                if self.lines == 0 {
                    self.start = self.line_start;
                    continue;
                }
                let frame = FrameEnd { start: self.start, end: nl + 1 };
                self.check_size(frame.end, limits)?;
                *self = Framer::default();
                return Ok(Some(frame));
            }
            self.lines += 1;
            if self.lines > limits.max_header_lines.saturating_add(1) {
                return Err(too_large(Limit::HeaderLines, limits.max_header_lines));
            }
            self.check_size(self.line_start, limits)?;
        }
        if buf.len() - self.line_start > limits.max_line_bytes {
            return Err(too_large(Limit::LineBytes, limits.max_line_bytes));
        }
        self.check_size(buf.len(), limits)?;
        Ok(None)
    }

    /// Bytes at the front of the buffer that belong to no request (empty
    /// lines skipped before it): the caller removes them with
    /// `buf.advance(n)` so that a stream of empty lines cannot grow the
    /// buffer. The framer's positions move with them.
    pub fn take_skipped(&mut self) -> usize {
        let n = self.start;
        self.start = 0;
        self.line_start -= n;
        n
    }

    /// At end of input: the unterminated request in `buf`, if any.
    ///
    /// Classic clients (`echo 'GET hosts' | unixcat`) end the request with EOF
    /// instead of an empty line; like mk-livestatus, such a request is answered.
    pub fn finish(&mut self, buf: &[u8]) -> Option<FrameEnd> {
        let start = self.start;
        *self = Framer::default();
        let rest = buf.get(start..)?;
        rest.iter().any(|b| !b.is_ascii_whitespace()).then_some(FrameEnd { start, end: buf.len() })
    }

    fn check_size(&self, upto: usize, limits: &Limits) -> Result<(), RequestError> {
        if upto - self.start > limits.max_request_bytes {
            return Err(too_large(Limit::RequestBytes, limits.max_request_bytes));
        }
        Ok(())
    }
}

fn too_large(which: Limit, limit: usize) -> RequestError {
    RequestError::TooLarge { which, limit }
}

/// A parsed client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET <table>` with its headers.
    Get(Query),
    /// One or more `COMMAND` lines.
    Command(CommandRequest),
}

/// How a `Cache:` header asks the proxy to treat a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheDirective {
    /// `Cache: reload`: may be answered from the cache until the site's core reloads.
    Reload,
}

/// A `GET` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The table name, as the client wrote it.
    pub table: String,
    /// Header lines forwarded to the site, each ending in `\n`, in client order.
    headers: Bytes,
    /// How the client wants the answer framed.
    pub style: ReplyStyle,
    /// `OutputFormat:` value (also forwarded to the site).
    pub output_format: Option<String>,
    /// `AuthUser:` value (also forwarded to the site).
    pub auth_user: Option<String>,
    /// `Cache:` directive (never forwarded).
    pub cache: Option<CacheDirective>,
    /// Every header line is one the Livestatus cores know, with a value of
    /// the right shape: the query is safe to pipeline. A core may stop
    /// reading a request at a line it does not know (mk-livestatus) or close
    /// the connection on a malformed value (Icinga 2); either spoils the
    /// queries pipelined behind it, so such a query goes alone.
    pub pipelinable: bool,
}

/// A forwarded header line a core takes in stride: a name both
/// Livestatus families (mk-livestatus, Icinga 2) know, and for the headers
/// whose bad values make a core give up on the connection, a value of the
/// right shape (a number; a column and an operator).
fn safe_to_pipeline(name: &[u8], value: &[u8]) -> bool {
    match name {
        b"Limit" | b"Offset" | b"Timelimit" | b"WaitTimeout" | b"Localtime" | b"And" | b"Or" | b"StatsAnd"
        | b"StatsOr" => !value.is_empty() && value.iter().all(u8::is_ascii_digit),
        b"Filter" | b"WaitCondition" => value.split(|b| *b == b' ').filter(|w| !w.is_empty()).count() >= 2,
        b"Sort"
        | b"Negate"
        | b"StatsNegate"
        | b"Stats"
        | b"StatsGroupBy"
        | b"Columns"
        | b"ColumnHeaders"
        | b"AuthUser"
        | b"Separators"
        | b"OutputFormat"
        | b"WaitConditionAnd"
        | b"WaitConditionOr"
        | b"WaitConditionNegate"
        | b"WaitTrigger"
        | b"WaitObject" => true,
        _ => false,
    }
}

/// One or more `COMMAND` lines sent as one request.
///
/// Each command is forwarded to the site with its own empty line, because a
/// second `COMMAND` line before the empty line would be read as a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRequest {
    /// Every `COMMAND ...` line, without its terminator.
    pub commands: Vec<Bytes>,
    /// How the client wants the (empty) answer framed.
    pub style: ReplyStyle,
}

/// What the proxy needs to know of a `GET` it forwards (see
/// [`Request::parse_for_site`]; a [`Query`] holds the same and more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetSummary {
    /// How the client wants the answer framed.
    pub style: ReplyStyle,
    /// `Cache:` directive (never forwarded).
    pub cache: Option<CacheDirective>,
    /// See [`Query::pipelinable`].
    pub pipelinable: bool,
}

/// A request as [`Request::parse_for_site`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForSite {
    /// A `GET`, already written for the site.
    Get(GetSummary),
    /// `COMMAND`s.
    Command(CommandRequest),
}

/// What [`scan_get`] found besides the site's copy: where the values the
/// proxy keeps lie in it.
struct Scanned {
    summary: GetSummary,
    /// Where the forwarded header lines begin in the site's copy.
    headers_at: usize,
    output_format: Option<std::ops::Range<usize>>,
    auth_user: Option<std::ops::Range<usize>>,
}

/// The text the proxy puts after the `GET` line for the site.
const SITE_HEADERS: &[u8] = b"\nResponseHeader: fixed16\nKeepAlive: on\n";

/// Parse a `GET` (its first line split off: `rest` after `GET`, the
/// header lines in `lines`) and write the site's copy into `out` in the
/// same pass: the `GET` line, `ResponseHeader: fixed16` and `KeepAlive:
/// on`, the forwarded header lines, the empty line.
fn scan_get<'a>(
    first: &[u8],
    rest: &[u8],
    lines: impl Iterator<Item = &'a [u8]>,
    lines_len: usize,
    out: &mut Vec<u8>,
) -> Result<Scanned, RequestError> {
    if !(rest.is_empty() || rest.starts_with(b" ")) {
        return Err(invalid_method(first));
    }
    let table = rest.trim_ascii();
    if std::str::from_utf8(table).is_err() {
        return Err(RequestError::NotUtf8("the table name"));
    }
    if table.is_empty() {
        return Err(RequestError::MissingTable);
    }
    // Room for all of it at once: the copy is never longer than the
    // request and the two header lines the proxy adds.
    out.reserve(first.len() + SITE_HEADERS.len() + 2 + lines_len);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(table);
    out.extend_from_slice(SITE_HEADERS);
    let mut scanned = Scanned {
        summary: GetSummary { style: ReplyStyle::default(), cache: None, pipelinable: true },
        headers_at: out.len(),
        output_format: None,
        auth_user: None,
    };
    let q = &mut scanned.summary;
    // The slot for a forwarded value nobody keeps.
    let mut unkept = None;
    for line in lines {
        let kept = match split_header(line) {
            Some((b"KeepAlive", v)) => {
                q.style.keepalive = on_off(v, "KeepAlive", "'on' or 'off'", b"on")?;
                None
            }
            Some((b"ResponseHeader", v)) => {
                q.style.fixed16 = on_off(v, "ResponseHeader", "'fixed16' or 'off'", b"fixed16")?;
                None
            }
            Some((b"Cache", v)) => {
                if v != b"reload" {
                    return Err(bad_header("Cache", v, "'reload'"));
                }
                q.cache = Some(CacheDirective::Reload);
                None
            }
            Some((b"OutputFormat", v)) => {
                utf8_value(v, "the OutputFormat value")?;
                Some((v, &mut scanned.output_format))
            }
            Some((b"AuthUser", v)) => {
                utf8_value(v, "the AuthUser value")?;
                Some((v, &mut scanned.auth_user))
            }
            Some((name, v)) => {
                q.pipelinable &= safe_to_pipeline(name, v);
                Some((v, &mut unkept))
            }
            None => {
                q.pipelinable = false;
                Some((line, &mut unkept))
            }
        };
        if let Some((value, slot)) = kept {
            let at = out.len();
            out.extend_from_slice(line);
            out.push(b'\n');
            // Where the value lies in the copy (a header's last value wins).
            let start = at + (value.as_ptr() as usize - line.as_ptr() as usize);
            *slot = Some(start..start + value.len());
        }
    }
    out.push(b'\n');
    Ok(scanned)
}

impl Request {
    /// Parse a request framed by [`Framer`] (with or without its empty line).
    pub fn parse(block: &[u8]) -> Result<Request, RequestError> {
        let mut it = lines(block);
        let first = it.next().unwrap_or_default();
        if let Some(rest) = first.strip_prefix(b"GET") {
            let mut site = Vec::new();
            let scanned = scan_get(first, rest, it, block.len(), &mut site)?;
            return Ok(Request::Get(Query::from_scanned(site, scanned)));
        }
        Self::parse_other(first, it).map(Request::Command)
    }

    /// Parse a request as [`Request::parse`] does, a `GET` written for the
    /// site into `out` (emptied first) in the same pass: what a session
    /// does with every request, without an allocation once `out` has room.
    /// The bytes are those of [`Query::encode_for_site`].
    pub fn parse_for_site(block: &[u8], out: &mut Vec<u8>) -> Result<ForSite, RequestError> {
        out.clear();
        let mut it = lines(block);
        let first = it.next().unwrap_or_default();
        if let Some(rest) = first.strip_prefix(b"GET") {
            return scan_get(first, rest, it, block.len(), out).map(|s| ForSite::Get(s.summary));
        }
        Self::parse_other(first, it).map(ForSite::Command)
    }

    /// A request that is not a `GET`: `COMMAND`s, or an error.
    fn parse_other<'a>(first: &[u8], it: impl Iterator<Item = &'a [u8]>) -> Result<CommandRequest, RequestError> {
        if first.starts_with(b"COMMAND ") {
            let mut commands = vec![Bytes::copy_from_slice(first)];
            let mut style = ReplyStyle { fixed16: false, keepalive: true };
            for line in it {
                if line.starts_with(b"COMMAND ") {
                    commands.push(Bytes::copy_from_slice(line));
                } else if let Some((b"ResponseHeader", value)) = split_header(line) {
                    style.fixed16 = value == b"fixed16";
                }
            }
            return Ok(CommandRequest { commands, style });
        }
        Err(invalid_method(first))
    }
}

fn invalid_method(line: &[u8]) -> RequestError {
    let word = line.split(|b| *b == b' ').next().unwrap_or_default();
    let word = &word[..word.len().min(40)];
    RequestError::InvalidMethod(String::from_utf8_lossy(word).into_owned())
}

impl Query {
    /// Parse a query from text, e.g. `"GET status\nColumns: program_start\n"`.
    ///
    /// Used for the proxy's own queries (heartbeats, internal clients).
    pub fn from_text(text: &str) -> Result<Query, RequestError> {
        match Request::parse(text.as_bytes())? {
            Request::Get(q) => Ok(q),
            Request::Command(_) => Err(RequestError::InvalidMethod("COMMAND".into())),
        }
    }

    /// The query from its site copy (see [`scan_get`]).
    fn from_scanned(site: Vec<u8>, s: Scanned) -> Query {
        let text = |r: Option<std::ops::Range<usize>>| r.map(|r| String::from_utf8_lossy(&site[r]).into_owned());
        let table = String::from_utf8_lossy(&site[b"GET ".len()..s.headers_at - SITE_HEADERS.len()]).into_owned();
        let (output_format, auth_user) = (text(s.output_format), text(s.auth_user));
        let headers = Bytes::from(site).slice(s.headers_at..);
        Query {
            table,
            // Without the empty line that ends the site's copy.
            headers: headers.slice(..headers.len() - 1),
            style: s.summary.style,
            output_format,
            auth_user,
            cache: s.summary.cache,
            pipelinable: s.summary.pipelinable,
        }
    }

    /// The header lines forwarded to the site, each ending in `\n`.
    pub fn forwarded_headers(&self) -> &[u8] {
        &self.headers
    }

    /// The request as sent to a site: the `GET` line, then
    /// `ResponseHeader: fixed16` and `KeepAlive: on`, then the forwarded
    /// headers, then the empty line.
    pub fn encode_for_site(&self, out: &mut Vec<u8>) {
        out.reserve(self.table.len() + self.headers.len() + 48);
        out.extend_from_slice(b"GET ");
        out.extend_from_slice(self.table.as_bytes());
        out.extend_from_slice(b"\nResponseHeader: fixed16\nKeepAlive: on\n");
        out.extend_from_slice(&self.headers);
        out.push(b'\n');
    }
}

impl CommandRequest {
    /// The commands as sent to a site: each line followed by an empty line.
    pub fn encode_for_site(&self, out: &mut Vec<u8>) {
        for c in &self.commands {
            out.extend_from_slice(c);
            out.extend_from_slice(b"\n\n");
        }
    }
}

fn on_off(v: &[u8], name: &'static str, expected: &'static str, yes: &[u8]) -> Result<bool, RequestError> {
    if v == yes {
        Ok(true)
    } else if v == b"off" {
        Ok(false)
    } else {
        Err(bad_header(name, v, expected))
    }
}

fn bad_header(name: &'static str, value: &[u8], expected: &'static str) -> RequestError {
    let value = &value[..value.len().min(40)];
    RequestError::BadHeader { name, value: String::from_utf8_lossy(value).into_owned(), expected }
}

fn utf8_value(v: &[u8], what: &'static str) -> Result<(), RequestError> {
    std::str::from_utf8(v).map(|_| ()).map_err(|_| RequestError::NotUtf8(what))
}

/// Non-empty lines of a block, without `\r\n` / `\n` terminators.
///
/// Every trailing `\r` goes, not just a terminator's: a line forwarded
/// with one left (`X\r` + `\n`) would reach the next reader as `X`
/// and a line `\r` as an empty line, the end of a request, splitting
/// a query in two on the site's channel (found by fuzzing).
fn lines(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    block.split(|b| *b == b'\n').map(trim_crs).filter(|l| !l.is_empty())
}

fn trim_crs(line: &[u8]) -> &[u8] {
    let end = line.iter().rposition(|b| *b != b'\r').map_or(0, |i| i + 1);
    &line[..end]
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Split `Name: value` (the space after the colon is optional).
fn split_header(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = memchr(b':', line)?;
    Some((&line[..colon], line[colon + 1..].trim_ascii()))
}

#[cfg(test)]
mod tests;
