//! Request framing and parsing under arbitrary chunking.
//!
//! The stream is framed as a client session frames it (scan after every
//! read, drop skipped empty lines, `finish` at end of input), once per
//! chunking. Asserted: the frames and the final outcome are the same
//! whatever the chunking; every frame keeps the [`Limits`]; the buffer
//! held between reads never exceeds `max_request_bytes`; a parsed request
//! re-encoded for a site frames as exactly the requests it stands for.

use livemux_protocol::request::{DEFAULT_MAX_HEADER_LINES, DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_REQUEST_BYTES};
use livemux_protocol::{Framer, Limits, ReplyStyle, Request};

use super::{Input, chunks};

/// Fuzz target `request_framing`.
pub fn request_framing(data: &[u8]) {
    let input = Input::new(data);
    let limits = limits(input.knob);
    let [whole, chosen, bytewise] = input.chunkings().map(|sizes| frame(input.stream, &sizes, &limits));
    assert_eq!(whole, chosen, "chunking changed the framing");
    assert_eq!(whole, bytewise, "byte-at-a-time reading changed the framing");
    for block in &whole.frames {
        let _ = ReplyStyle::sniff(block);
        if let Ok(request) = Request::parse(block) {
            check_encoding(&request);
        }
    }
}

/// Limits from the knob's bits: 0 keeps the defaults, small values make
/// the limits reachable with short inputs.
fn limits(knob: u8) -> Limits {
    let pick = |shift: u8, options: [usize; 4]| options[usize::from((knob >> shift) & 3)];
    Limits {
        max_request_bytes: pick(0, [DEFAULT_MAX_REQUEST_BYTES, 64, 300, 1024]),
        max_line_bytes: pick(2, [DEFAULT_MAX_LINE_BYTES, 8, 40, 200]),
        max_header_lines: pick(4, [DEFAULT_MAX_HEADER_LINES, 0, 1, 4]),
    }
}

/// What a session makes of a stream: its requests, then how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Framed {
    frames: Vec<Vec<u8>>,
    /// `None`: end of input; else the status code of the refusal. (Which
    /// limit is named may depend on where the stream was cut: a partial
    /// line may break `max_request_bytes` before the whole line breaks
    /// `max_line_bytes`. Both are 413.)
    refused: Option<u16>,
}

fn frame(stream: &[u8], sizes: &[usize], limits: &Limits) -> Framed {
    let mut out = Framed { frames: Vec::new(), refused: None };
    let mut reads = chunks(stream, sizes).into_iter();
    let mut buf: Vec<u8> = Vec::new();
    let mut framer = Framer::new();
    let mut eof = false;
    loop {
        match framer.scan(&buf, limits) {
            Ok(Some(f)) => {
                assert!(f.start <= f.end && f.end <= buf.len(), "frame {f:?} outside the buffer");
                assert!(
                    buf[..f.start].iter().all(|b| matches!(b, b'\r' | b'\n')),
                    "skipped bytes that are not empty lines"
                );
                let block = &buf[f.start..f.end];
                assert!(block.ends_with(b"\n"), "a frame that does not end with its empty line");
                check_limits(block, limits);
                out.frames.push(block.to_vec());
                buf.drain(..f.end);
            }
            Ok(None) if eof => {
                if let Some(f) = framer.finish(&buf) {
                    assert_eq!(f.end, buf.len(), "the last request does not run to the end of input");
                    let block = &buf[f.start..f.end];
                    assert!(block.iter().any(|b| !b.is_ascii_whitespace()));
                    check_limits(block, limits);
                    out.frames.push(block.to_vec());
                }
                return out;
            }
            Ok(None) => {
                let skipped = framer.take_skipped();
                buf.drain(..skipped);
                assert!(
                    buf.len() <= limits.max_request_bytes,
                    "{} bytes held for a request limited to {}",
                    buf.len(),
                    limits.max_request_bytes
                );
                match reads.next() {
                    Some(chunk) => buf.extend_from_slice(chunk),
                    None => eof = true,
                }
            }
            Err(e) => {
                out.refused = Some(e.status().code());
                return out;
            }
        }
    }
}

/// A framed request keeps every limit.
fn check_limits(block: &[u8], limits: &Limits) {
    assert!(block.len() <= limits.max_request_bytes, "a {}-byte request framed under {limits:?}", block.len());
    let mut lines = 0;
    let mut segments = block.split(|b| *b == b'\n').peekable();
    while let Some(line) = segments.next() {
        assert!(line.len() <= limits.max_line_bytes, "a {}-byte line framed under {limits:?}", line.len());
        // The limit counts terminated lines (an unterminated last one
        // ends a request at end of input).
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        lines += usize::from(!line.is_empty() && segments.peek().is_some());
    }
    assert!(lines <= limits.max_header_lines.saturating_add(1), "{lines} lines framed under {limits:?}");
}

/// Limits no re-encoded request comes near.
const UNLIMITED: Limits =
    Limits { max_request_bytes: usize::MAX, max_line_bytes: usize::MAX, max_header_lines: usize::MAX };

/// Frame bytes sent to a site (as a site's reader, or a livemux behind this
/// one, would): the blocks, and whatever is left unterminated.
fn reframe(wire: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut framer = Framer::new();
    let mut rest = wire.to_vec();
    let mut blocks = Vec::new();
    loop {
        match framer.scan(&rest, &UNLIMITED) {
            Ok(Some(f)) => {
                blocks.push(rest[f.start..f.end].to_vec());
                rest.drain(..f.end);
            }
            Ok(None) => return (blocks, rest),
            Err(e) => panic!("re-framing an encoded request failed: {e}"),
        }
    }
}

/// What a site receives for a request is exactly that request: a `GET`
/// is one block whose query is the client's, each `COMMAND` one block.
fn check_encoding(request: &Request) {
    match request {
        Request::Get(q) => {
            assert!(!q.table.is_empty() && q.table.trim_ascii() == q.table, "table {:?}", q.table);
            let mut wire = Vec::new();
            q.encode_for_site(&mut wire);
            let (blocks, rest) = reframe(&wire);
            assert!(rest.is_empty(), "an encoded query leaves {rest:?} unframed");
            assert_eq!(blocks.len(), 1, "an encoded query frames as {} requests: {:?}", blocks.len(), blocks);
            let Ok(Request::Get(site)) = Request::parse(&blocks[0]) else {
                panic!("an encoded query does not parse as a GET: {:?}", String::from_utf8_lossy(&wire))
            };
            assert_eq!(site.table, q.table);
            assert_eq!(site.style, ReplyStyle { fixed16: true, keepalive: true });
            assert_eq!(site.output_format, q.output_format);
            assert_eq!(site.auth_user, q.auth_user);
            assert_eq!(site.cache, None);
            assert_eq!(site.forwarded_headers(), q.forwarded_headers(), "forwarded headers change on the way");
        }
        Request::Command(c) => {
            assert!(!c.commands.is_empty());
            let mut wire = Vec::new();
            c.encode_for_site(&mut wire);
            let (blocks, rest) = reframe(&wire);
            assert!(rest.is_empty(), "encoded commands leave {rest:?} unframed");
            assert_eq!(blocks.len(), c.commands.len(), "{} commands frame as {blocks:?}", c.commands.len());
            for (block, command) in blocks.iter().zip(&c.commands) {
                let Ok(Request::Command(site)) = Request::parse(block) else {
                    panic!("an encoded command does not parse as one: {:?}", String::from_utf8_lossy(block))
                };
                assert_eq!(site.commands.len(), 1);
                assert_eq!(&site.commands[0], command, "a command changes on the way");
            }
        }
    }
}
