//! Reading an `OutputFormat: python3` answer as it streams in.
//!
//! The only format in which a core renders blob columns (a host's HW/SW
//! inventory file) without loss: `[` + rows joined by `,\n` + `]\n`, each row
//! `[` + values joined by `,` + `]`. A value is an integer or float, `None`,
//! a string `"..."` or a byte string `b"..."`.
//!
//! Checkmk's renderer writes a byte outside 32..=127, `"` and `\` of a blob as
//! `\xNN` (lower-case hex) and every other byte as itself; strings the same,
//! with `\uNNNN` / `\UNNNNNNNN` for characters. Older renderers wrote blobs
//! without the `b` prefix, `\u00NN` for bytes, or octal `\NNN`, and strings
//! as `u"..."`: all of these are read, with either quote.
//!
//! [`RowParser`] is a push parser: it is fed the answer in chunks of any size
//! (cut anywhere, inside an escape too) and reports what it finds to a
//! [`Sink`], a blob as a run of chunks, so an answer of any size is read in
//! constant memory. A string longer than the parser's limit is an error;
//! nested lists (no inventory column has them) are refused.

use std::fmt;

use memchr::memchr2;

/// What the parser found, in answer order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event<'a> {
    /// A row begins.
    RowStart,
    /// An integer value.
    Int(i64),
    /// A floating-point value.
    Float(f64),
    /// `None` (also `True`/`False` are reported as `Int(1)`/`Int(0)`).
    Null,
    /// A string value, decoded.
    Str(&'a str),
    /// A byte string begins.
    BlobStart,
    /// Decoded bytes of the current byte string (never empty).
    BlobChunk(&'a [u8]),
    /// The byte string ends.
    BlobEnd,
    /// The row ends.
    RowEnd,
}

/// Where the parser's findings go. An error stops the parse and is handed
/// back by [`RowParser::feed`].
pub trait Sink {
    /// The sink's own failure (a full disk, say).
    type Error;
    /// One finding.
    fn event(&mut self, event: Event<'_>) -> Result<(), Self::Error>;
}

/// The answer is not a well-formed python3 answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed python3 answer at byte {offset}: {what}")]
pub struct SyntaxError {
    /// Bytes of the answer before the fault.
    pub offset: u64,
    /// What was wrong.
    pub what: &'static str,
}

/// Why [`RowParser::feed`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum FeedError<E> {
    /// The answer is malformed; the parser is of no further use.
    Syntax(SyntaxError),
    /// The sink failed.
    Sink(E),
}

impl<E: fmt::Display> fmt::Display for FeedError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeedError::Syntax(e) => e.fmt(f),
            FeedError::Sink(e) => e.fmt(f),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the outer `[`.
    Start,
    /// After the outer `[` or a row's `,`: a row or (at first) the end.
    RowOrEnd { first: bool },
    /// Inside a row, where a value (or, first, the row's end) may come.
    Value { first: bool },
    /// Inside a row, after a value.
    AfterValue,
    /// After a row: `,` or the outer `]`.
    AfterRow,
    /// Saw `b` or `u`, the quote must follow.
    Prefix { blob: bool },
    /// Inside a string (`blob: false`) or byte string, up to `quote`.
    Quoted { blob: bool, quote: u8 },
    /// A number or a word (`None`, `True`, `False`) in progress.
    Bare,
    /// After the outer `]`: only white space may follow.
    Done,
}

/// The parser (see the module documentation).
#[derive(Debug)]
pub struct RowParser {
    state: State,
    /// Bytes consumed so far (for error positions).
    offset: u64,
    /// The string, number or word in progress.
    text: Vec<u8>,
    /// An escape in progress (after the backslash).
    escape: Vec<u8>,
    in_escape: bool,
    max_string: usize,
    /// Decoded blob bytes waiting to be handed to the sink.
    chunk: Vec<u8>,
}

/// Decoded blob bytes are handed on in chunks of at most this size.
const CHUNK: usize = 16 * 1024;

impl RowParser {
    /// A parser whose strings (not byte strings) may be `max_string` bytes
    /// long at most.
    pub fn new(max_string: usize) -> Self {
        RowParser {
            state: State::Start,
            offset: 0,
            text: Vec::new(),
            escape: Vec::new(),
            in_escape: false,
            max_string,
            chunk: Vec::new(),
        }
    }

    /// True once the whole answer (up to its closing `]`) was read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Read the next part of the answer.
    pub fn feed<S: Sink>(&mut self, input: &[u8], sink: &mut S) -> Result<(), FeedError<S::Error>> {
        let mut i = 0;
        while i < input.len() {
            let used = self.step(&input[i..], sink)?;
            i += used;
            self.offset += used as u64;
        }
        // Hand on what a blob decoded so far: the sink sees every byte of a
        // chunk before the next one is asked for.
        self.flush_chunk(sink)
    }

    /// The answer ended (the site's body is complete): anything short of the
    /// closing `]` is an error.
    pub fn finish(&self) -> Result<(), SyntaxError> {
        if self.state == State::Done { Ok(()) } else { Err(self.error("the answer ends early")) }
    }

    fn error(&self, what: &'static str) -> SyntaxError {
        SyntaxError { offset: self.offset, what }
    }

    fn syntax<E>(&self, what: &'static str) -> FeedError<E> {
        FeedError::Syntax(self.error(what))
    }

    fn flush_chunk<S: Sink>(&mut self, sink: &mut S) -> Result<(), FeedError<S::Error>> {
        if !self.chunk.is_empty() {
            sink.event(Event::BlobChunk(&self.chunk)).map_err(FeedError::Sink)?;
            self.chunk.clear();
        }
        Ok(())
    }

    /// Consume a prefix of `input` (at least one byte); returns its length.
    fn step<S: Sink>(&mut self, input: &[u8], sink: &mut S) -> Result<usize, FeedError<S::Error>> {
        let b = input[0];
        let emit = |sink: &mut S, e: Event<'_>| sink.event(e).map_err(FeedError::Sink);
        match self.state {
            State::Quoted { blob, quote } => return self.quoted(input, blob, quote, sink),
            State::Bare => {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.') {
                    if self.text.len() >= 64 {
                        return Err(self.syntax("a number or word is too long"));
                    }
                    self.text.push(b);
                    return Ok(1);
                }
                self.end_bare(sink)?;
                self.state = State::AfterValue;
                return self.step(input, sink);
            }
            _ => {}
        }
        if b.is_ascii_whitespace() && !matches!(self.state, State::Prefix { .. }) {
            return Ok(1);
        }
        match (self.state, b) {
            (State::Start, b'[') => self.state = State::RowOrEnd { first: true },
            (State::RowOrEnd { .. }, b'[') => {
                emit(sink, Event::RowStart)?;
                self.state = State::Value { first: true };
            }
            (State::RowOrEnd { first: true }, b']') => self.state = State::Done,
            (State::AfterRow, b',') => self.state = State::RowOrEnd { first: false },
            (State::AfterRow, b']') => self.state = State::Done,
            (State::Value { first: true }, b']') | (State::AfterValue, b']') => {
                emit(sink, Event::RowEnd)?;
                self.state = State::AfterRow;
            }
            (State::AfterValue, b',') => self.state = State::Value { first: false },
            (State::Value { .. }, b'"' | b'\'') => {
                self.text.clear();
                self.state = State::Quoted { blob: false, quote: b };
            }
            (State::Value { .. }, b'b' | b'u') => self.state = State::Prefix { blob: b == b'b' },
            (State::Value { .. }, b'[') => return Err(self.syntax("nested lists are not supported")),
            (State::Value { .. }, _) if b.is_ascii_alphanumeric() || b == b'-' => {
                self.text.clear();
                self.text.push(b);
                self.state = State::Bare;
            }
            (State::Prefix { blob }, b'"' | b'\'') => {
                self.text.clear();
                if blob {
                    emit(sink, Event::BlobStart)?;
                }
                self.state = State::Quoted { blob, quote: b };
            }
            (State::Prefix { .. }, _) => return Err(self.syntax("a string prefix without a quote")),
            (State::Start, _) => return Err(self.syntax("the answer does not start with '['")),
            (State::Done, _) => return Err(self.syntax("data after the end of the answer")),
            _ => return Err(self.syntax("unexpected character")),
        }
        Ok(1)
    }

    fn end_bare<S: Sink>(&mut self, sink: &mut S) -> Result<(), FeedError<S::Error>> {
        let event = match self.text.as_slice() {
            b"None" => Event::Null,
            b"True" => Event::Int(1),
            b"False" => Event::Int(0),
            t => {
                let t = std::str::from_utf8(t).map_err(|_| self.syntax("a malformed number"))?;
                if let Ok(n) = t.parse::<i64>() {
                    Event::Int(n)
                } else if let Ok(x) = t.parse::<f64>() {
                    Event::Float(x)
                } else {
                    return Err(self.syntax("a malformed number or word"));
                }
            }
        };
        sink.event(event).map_err(FeedError::Sink)
    }

    fn quoted<S: Sink>(
        &mut self,
        input: &[u8],
        blob: bool,
        quote: u8,
        sink: &mut S,
    ) -> Result<usize, FeedError<S::Error>> {
        if self.in_escape {
            return self.escape_byte(input[0], blob, sink).map(|()| 1);
        }
        // A run of plain bytes up to the next backslash or quote.
        let run = memchr2(b'\\', quote, input).unwrap_or(input.len());
        if run > 0 {
            self.push_bytes(&input[..run], blob, sink)?;
            return Ok(run);
        }
        if input[0] == b'\\' {
            self.in_escape = true;
            self.escape.clear();
            return Ok(1);
        }
        // The closing quote.
        if blob {
            self.flush_chunk(sink)?;
            sink.event(Event::BlobEnd).map_err(FeedError::Sink)?;
        } else {
            let s = std::str::from_utf8(&self.text).map_err(|_| self.syntax("a string that is not UTF-8"))?;
            sink.event(Event::Str(s)).map_err(FeedError::Sink)?;
            self.text.clear();
        }
        self.state = State::AfterValue;
        Ok(1)
    }

    fn push_bytes<S: Sink>(&mut self, bytes: &[u8], blob: bool, sink: &mut S) -> Result<(), FeedError<S::Error>> {
        if blob {
            self.chunk.extend_from_slice(bytes);
            if self.chunk.len() >= CHUNK {
                self.flush_chunk(sink)?;
            }
        } else {
            if self.text.len() + bytes.len() > self.max_string {
                return Err(self.syntax("a string longer than the limit"));
            }
            self.text.extend_from_slice(bytes);
        }
        Ok(())
    }

    /// One byte of an escape; decodes it once complete.
    fn escape_byte<S: Sink>(&mut self, b: u8, blob: bool, sink: &mut S) -> Result<(), FeedError<S::Error>> {
        let simple = |c: u8| -> Option<u8> {
            Some(match c {
                b'\\' => b'\\',
                b'"' => b'"',
                b'\'' => b'\'',
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'a' => 7,
                b'b' => 8,
                b'f' => 12,
                b'v' => 11,
                _ => return None,
            })
        };
        if self.escape.is_empty() {
            if let Some(c) = simple(b) {
                self.in_escape = false;
                return self.push_bytes(&[c], blob, sink);
            }
            if !matches!(b, b'x' | b'u' | b'U' | b'0'..=b'7') {
                return Err(self.syntax("an unknown escape"));
            }
            self.escape.push(b);
            return Ok(());
        }
        let kind = self.escape[0];
        if kind.is_ascii_digit() {
            // Octal: up to three digits; a non-digit ends it early.
            if (b'0'..=b'7').contains(&b) && self.escape.len() < 3 {
                self.escape.push(b);
                if self.escape.len() == 3 {
                    return self.finish_escape(blob, sink);
                }
                return Ok(());
            }
            self.finish_escape(blob, sink)?;
            // The byte is not part of the escape: read it as content.
            return self.reread(b, blob, sink);
        }
        if !b.is_ascii_hexdigit() {
            return Err(self.syntax("a malformed hex escape"));
        }
        self.escape.push(b);
        let want = match kind {
            b'x' => 2,
            b'u' => 4,
            _ => 8,
        };
        if self.escape.len() == want + 1 { self.finish_escape(blob, sink) } else { Ok(()) }
    }

    /// A byte that followed a short octal escape, read as string content.
    fn reread<S: Sink>(&mut self, b: u8, blob: bool, sink: &mut S) -> Result<(), FeedError<S::Error>> {
        let State::Quoted { quote, .. } = self.state else { return Ok(()) };
        if b == b'\\' {
            self.in_escape = true;
            self.escape.clear();
            Ok(())
        } else if b == quote {
            // Close the string exactly as `quoted` would.
            self.quoted(&[b], blob, quote, sink).map(|_| ())
        } else {
            self.push_bytes(&[b], blob, sink)
        }
    }

    fn finish_escape<S: Sink>(&mut self, blob: bool, sink: &mut S) -> Result<(), FeedError<S::Error>> {
        self.in_escape = false;
        let kind = self.escape[0];
        let digits = if kind.is_ascii_digit() { &self.escape[..] } else { &self.escape[1..] };
        let radix = if kind.is_ascii_digit() { 8 } else { 16 };
        let value = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| u32::from_str_radix(d, radix).ok())
            .ok_or_else(|| self.syntax("a malformed escape"))?;
        if blob {
            let byte = u8::try_from(value).map_err(|_| self.syntax("a character escape in a byte string"))?;
            return self.push_bytes(&[byte], true, sink);
        }
        let c = char::from_u32(value).ok_or_else(|| self.syntax("an escape that is no character"))?;
        let mut buf = [0u8; 4];
        let encoded = c.encode_utf8(&mut buf).as_bytes().to_vec();
        self.push_bytes(&encoded, false, sink)
    }
}

/// Render bytes as Checkmk's python3 renderer does: `b"` + each byte, those
/// outside 32..=127 and `"` and `\` as `\xNN`, + `"`. For the simulated
/// site and tests.
pub fn render_blob(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() + 3);
    out.extend_from_slice(b"b\"");
    for &b in bytes {
        if (32..=127).contains(&b) && b != b'"' && b != b'\\' {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'\\', b'x', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
    out.push(b'"');
}

/// Render a string as Checkmk's python3 renderer does: characters outside
/// 32..=127, `"` and `\` as `\uNNNN` (or `\UNNNNNNNN` beyond U+FFFF).
pub fn render_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        let n = c as u32;
        if (32..=127).contains(&n) && c != '"' && c != '\\' {
            out.push(n as u8);
        } else if n <= 0xFFFF {
            out.extend_from_slice(format!("\\u{n:04x}").as_bytes());
        } else {
            out.extend_from_slice(format!("\\U{n:08x}").as_bytes());
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests;
