//! A site's answer cut into rows as its bytes arrive, without I/O.
//!
//! [`RowSplitter`] finds the rows of a JSON answer (`[[...],[...]]`): a
//! scan of the bytes for the row's brackets (strings skipped with
//! `memchr`), which hands each row on as the bytes the site sent (to be
//! spliced into the client's answer unread) or parsed. A row cut by a read
//! boundary is carried to the next read, up to [`MAX_ROW_BYTES`]; a row
//! inside one read is handed on without a copy.
//!
//! [`CsvSplitter`] does the same for a csv answer with livemux's default
//! separators: rows end at the dataset separator, which no value holds.

use memchr::{memchr_iter, memchr2, memrchr};
use serde_json::Value;

/// Largest single row a site may send.
pub const MAX_ROW_BYTES: usize = 64 << 20;

/// Cuts a JSON array of rows (`[[...],[...]]`) into rows as bytes arrive.
#[derive(Debug, Default)]
pub struct RowSplitter {
    started: bool,
    done: bool,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// The part of the open row that came in earlier reads.
    carry: Vec<u8>,
}

impl RowSplitter {
    /// Feed bytes; each complete row goes to `emit` parsed.
    pub fn feed(&mut self, bytes: &[u8], mut emit: impl FnMut(Vec<Value>)) -> Result<(), String> {
        self.feed_raw(bytes, |raw| {
            let row: Vec<Value> = serde_json::from_slice(raw).map_err(|e| format!("a row is not valid JSON: {e}"))?;
            emit(row);
            Ok(())
        })
    }

    /// Feed bytes; each complete row goes to `emit` as the site sent it
    /// (`[` to its `]`), checked for its brackets and strings only.
    pub fn feed_raw(&mut self, bytes: &[u8], mut emit: impl FnMut(&[u8]) -> Result<(), String>) -> Result<(), String> {
        // Where the open row began in `bytes` (None: in an earlier read,
        // held in `carry`).
        let mut start: Option<usize> = None;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if self.done {
                if !b.is_ascii_whitespace() {
                    return Err("data after the end of the answer".into());
                }
                i += 1;
                continue;
            }
            if !self.started {
                match b {
                    b'[' => self.started = true,
                    b if b.is_ascii_whitespace() => {}
                    _ => return Err("the answer is not a JSON list".into()),
                }
                i += 1;
                continue;
            }
            if self.depth == 0 {
                match b {
                    b'[' => {
                        self.depth = 1;
                        start = Some(i);
                    }
                    b']' => self.done = true,
                    b',' => {}
                    b if b.is_ascii_whitespace() => {}
                    _ => return Err("a row is not a JSON list".into()),
                }
                i += 1;
                continue;
            }
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    i += 1;
                    continue;
                }
                // Skip to the string's next quote or backslash at once.
                match memchr2(b'"', b'\\', &bytes[i..]) {
                    Some(at) => {
                        i += at;
                        if bytes[i] == b'"' {
                            self.in_string = false;
                        } else {
                            self.escape = true;
                        }
                        i += 1;
                    }
                    None => i = bytes.len(),
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' => self.depth += 1,
                b']' | b'}' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let row = match start.take() {
                            Some(s) => &bytes[s..=i],
                            None => {
                                self.carry.extend_from_slice(&bytes[..=i]);
                                &self.carry[..]
                            }
                        };
                        if row.len() > MAX_ROW_BYTES {
                            return Err(format!("a row is larger than {MAX_ROW_BYTES} bytes"));
                        }
                        emit(row)?;
                        self.carry.clear();
                    }
                }
                _ => {}
            }
            i += 1;
        }
        if self.depth > 0 {
            let from = start.unwrap_or(0);
            if self.carry.len() + (bytes.len() - from) > MAX_ROW_BYTES {
                return Err(format!("a row is larger than {MAX_ROW_BYTES} bytes"));
            }
            self.carry.extend_from_slice(&bytes[from..]);
        }
        Ok(())
    }

    /// The answer ended: was it complete?
    pub fn finish(&self) -> Result<(), String> {
        if self.done || (!self.started && self.carry.is_empty()) { Ok(()) } else { Err("the answer ends early".into()) }
    }
}

/// Cuts a csv answer into whole rows as bytes arrive (rows end at `\n`).
#[derive(Debug, Default)]
pub struct CsvSplitter {
    /// The part of the open row that came in earlier reads.
    carry: Vec<u8>,
}

impl CsvSplitter {
    /// Feed bytes; the complete rows in them (each with its `\n`) go to
    /// `emit` at once, with the end of each row in that slice.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        ends: &mut Vec<u32>,
        mut emit: impl FnMut(&[u8], &[u32]),
    ) -> Result<(), String> {
        let Some(last) = memrchr(b'\n', bytes) else {
            if self.carry.len() + bytes.len() > MAX_ROW_BYTES {
                return Err(format!("a row is larger than {MAX_ROW_BYTES} bytes"));
            }
            self.carry.extend_from_slice(bytes);
            return Ok(());
        };
        let (whole, rest) = bytes.split_at(last + 1);
        ends.clear();
        if self.carry.is_empty() {
            ends.extend(memchr_iter(b'\n', whole).map(|at| at as u32 + 1));
            emit(whole, ends);
        } else {
            self.carry.extend_from_slice(whole);
            ends.extend(memchr_iter(b'\n', &self.carry).map(|at| at as u32 + 1));
            emit(&self.carry, ends);
            self.carry.clear();
        }
        if rest.len() > MAX_ROW_BYTES {
            return Err(format!("a row is larger than {MAX_ROW_BYTES} bytes"));
        }
        self.carry.extend_from_slice(rest);
        Ok(())
    }

    /// The answer ended: a last row without its `\n` gets one (so that the
    /// next site's rows do not join it).
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8], &[u32])) {
        if !self.carry.is_empty() {
            self.carry.push(b'\n');
            emit(&self.carry, &[self.carry.len() as u32]);
            self.carry.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way of cutting `answer` into two reads gives the same rows.
    fn rows_cut_anywhere(answer: &[u8]) -> Vec<Vec<u8>> {
        let mut whole = Vec::new();
        let mut s = RowSplitter::default();
        s.feed_raw(answer, |r| {
            whole.push(r.to_vec());
            Ok(())
        })
        .unwrap();
        s.finish().unwrap();
        for cut in 0..=answer.len() {
            let mut got = Vec::new();
            let mut s = RowSplitter::default();
            for part in [&answer[..cut], &answer[cut..]] {
                s.feed_raw(part, |r| {
                    got.push(r.to_vec());
                    Ok(())
                })
                .unwrap();
            }
            s.finish().unwrap();
            assert_eq!(got, whole, "cut at {cut}");
        }
        whole
    }

    #[test]
    fn json_rows_come_as_sent_wherever_the_reads_are_cut() {
        let answer = br#"[["a\"]",1,[2,3]],
["b\\",{"k":"]"}, "x"] ,[]]
"#;
        let rows = rows_cut_anywhere(answer);
        let rows: Vec<&str> = rows.iter().map(|r| std::str::from_utf8(r).unwrap()).collect();
        assert_eq!(rows, [r#"["a\"]",1,[2,3]]"#, r#"["b\\",{"k":"]"}, "x"]"#, "[]"]);
    }

    #[test]
    fn bad_json_answers_are_named() {
        let err = |a: &[u8]| {
            let mut s = RowSplitter::default();
            s.feed_raw(a, |_| Ok(())).and_then(|()| s.finish()).unwrap_err()
        };
        assert_eq!(err(b"{}"), "the answer is not a JSON list");
        assert_eq!(err(b"[1]"), "a row is not a JSON list");
        assert_eq!(err(b"[[1]] x"), "data after the end of the answer");
        assert_eq!(err(b"[[1],[2"), "the answer ends early");
        let mut s = RowSplitter::default();
        assert!(s.feed(b"[[1,]]", |_| {}).unwrap_err().starts_with("a row is not valid JSON"));
    }

    #[test]
    fn csv_rows_are_whole_and_a_last_row_gets_its_newline() {
        let answer = b"a;1\nbb;2\nccc;3";
        for cut in 0..=answer.len() {
            let (mut out, mut count) = (Vec::new(), 0);
            let mut s = CsvSplitter::default();
            let mut ends = Vec::new();
            for part in [&answer[..cut], &answer[cut..]] {
                s.feed(part, &mut ends, |rows, e| {
                    assert_eq!(e.last().map(|&x| x as usize), Some(rows.len()), "ends mark each row");
                    count += e.len();
                    out.extend_from_slice(rows);
                })
                .unwrap();
            }
            s.finish(|rows, e| {
                count += e.len();
                out.extend_from_slice(rows);
            });
            assert_eq!((out.as_slice(), count), (&b"a;1\nbb;2\nccc;3\n"[..], 3), "cut at {cut}");
        }
    }
}
