//! The `OutputFormat: python3` reader (the inventory sync's blob decoder)
//! under arbitrary chunking.
//!
//! Asserted: the values read (a blob's chunks joined) and the error, if
//! any, are the same whatever the chunking; blob chunks are never empty;
//! events come in a well-formed order; and an answer that was read,
//! rendered again as Checkmk renders it, reads back to the same values.

use livemux_protocol::python::{Event, FeedError, RowParser, Sink, render_blob, render_str};

use super::{Input, chunks};

/// Fuzz target `python3_rows`.
pub fn python3_rows(data: &[u8]) {
    let input = Input::new(data);
    let max_string = [4096, 0, 8, 100][usize::from(input.knob & 3)];
    let [whole, chosen, bytewise] = input.chunkings().map(|sizes| read(&chunks(input.stream, &sizes), max_string));
    assert_eq!(whole, chosen, "chunking changed what was read");
    assert_eq!(whole, bytewise, "byte-at-a-time reading changed what was read");
    if let Ok(rows) = &whole {
        let text = render(rows);
        let again = read(&[&text], max_string);
        assert_eq!(again.as_ref(), Ok(rows), "rendered again, {:?} reads differently", String::from_utf8_lossy(&text));
    }
}

/// A value as read.
#[derive(Debug, Clone)]
enum V {
    Int(i64),
    Float(f64),
    Null,
    Str(String),
    Blob(Vec<u8>),
}

impl PartialEq for V {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (V::Int(a), V::Int(b)) => a == b,
            // NaN reads as NaN: equal here.
            (V::Float(a), V::Float(b)) => a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            (V::Null, V::Null) => true,
            (V::Str(a), V::Str(b)) => a == b,
            (V::Blob(a), V::Blob(b)) => a == b,
            _ => false,
        }
    }
}

/// The rows, or the error's text. (The error's byte offset is not
/// compared: a run of plain bytes is taken at once, so a string that
/// grows past the limit is reported at the start of the run read with it.)
type Outcome = Result<Vec<Vec<V>>, &'static str>;

#[derive(Default)]
struct Rows {
    rows: Vec<Vec<V>>,
    in_row: bool,
    blob: Option<Vec<u8>>,
}

impl Sink for Rows {
    type Error = std::convert::Infallible;
    fn event(&mut self, e: Event<'_>) -> Result<(), Self::Error> {
        if let Some(blob) = &mut self.blob {
            match e {
                Event::BlobChunk(c) => {
                    assert!(!c.is_empty(), "an empty blob chunk");
                    blob.extend_from_slice(c);
                }
                Event::BlobEnd => {
                    let blob = V::Blob(std::mem::take(blob));
                    self.blob = None;
                    self.push(blob);
                }
                other => panic!("{other:?} inside a blob"),
            }
            return Ok(());
        }
        match e {
            Event::RowStart => {
                assert!(!self.in_row, "a row inside a row");
                self.in_row = true;
                self.rows.push(Vec::new());
            }
            Event::RowEnd => {
                assert!(self.in_row, "a row's end outside a row");
                self.in_row = false;
            }
            Event::BlobStart => self.blob = Some(Vec::new()),
            Event::Int(n) => self.push(V::Int(n)),
            Event::Float(x) => self.push(V::Float(x)),
            Event::Null => self.push(V::Null),
            Event::Str(s) => self.push(V::Str(s.to_owned())),
            other => panic!("{other:?} outside a blob"),
        }
        Ok(())
    }
}

impl Rows {
    fn push(&mut self, v: V) {
        assert!(self.in_row, "a value outside a row");
        if let Some(row) = self.rows.last_mut() {
            row.push(v);
        }
    }
}

fn read(chunks: &[&[u8]], max_string: usize) -> Outcome {
    let mut parser = RowParser::new(max_string);
    let mut rows = Rows::default();
    for chunk in chunks {
        match parser.feed(chunk, &mut rows) {
            Ok(()) => {}
            Err(FeedError::Syntax(e)) => return Err(e.what),
            Err(FeedError::Sink(never)) => match never {},
        }
    }
    parser.finish().map_err(|e| e.what)?;
    assert!(!rows.in_row && rows.blob.is_none(), "a complete answer with an open row or blob");
    Ok(rows.rows)
}

/// The rows as Checkmk's python3 renderer writes them.
fn render(rows: &[Vec<V>]) -> Vec<u8> {
    let mut out = b"[".to_vec();
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b",\n");
        }
        out.push(b'[');
        for (j, v) in row.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            match v {
                V::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
                V::Float(x) => out.extend_from_slice(format!("{x:?}").as_bytes()),
                V::Null => out.extend_from_slice(b"None"),
                V::Str(s) => render_str(s, &mut out),
                V::Blob(b) => render_blob(b, &mut out),
            }
        }
        out.push(b']');
    }
    out.extend_from_slice(b"]\n");
    out
}
