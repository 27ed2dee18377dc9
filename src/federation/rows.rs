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

use std::ops::Range;

use memchr::{memchr_iter, memchr2, memrchr};
use serde_json::Value;

/// Largest single row a site may send.
pub const MAX_ROW_BYTES: usize = 64 << 20;

/// The bytes a row's scan stops at outside strings.
const STRUCTURAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'[' as usize] = true;
    t[b']' as usize] = true;
    t[b'{' as usize] = true;
    t[b'}' as usize] = true;
    t
};

/// [`STRUCTURAL`], and the comma between columns.
const STRUCTURAL_OR_COMMA: [bool; 256] = {
    let mut t = STRUCTURAL;
    t[b',' as usize] = true;
    t
};

/// Where a scan is in the answer (copied to locals while scanning).
#[derive(Debug, Default, Clone, Copy)]
struct ScanState {
    started: bool,
    done: bool,
    depth: usize,
    in_string: bool,
    escape: bool,
}

/// Cuts a JSON array of rows (`[[...],[...]]`) into rows as bytes arrive.
#[derive(Debug, Default)]
pub struct RowSplitter {
    st: ScanState,
    /// The part of the open row that came in earlier reads.
    carry: Vec<u8>,
    /// Where the open row's columns end (its top-level commas).
    commas: Vec<u32>,
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
        self.scan::<false, String>(bytes, |row, _| emit(row))
    }

    /// [`RowSplitter::feed_raw`], with the positions in the row of the
    /// commas between its columns (see [`columns`]).
    pub fn feed_cols<E: From<String>>(
        &mut self,
        bytes: &[u8],
        emit: impl FnMut(&[u8], &[u32]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.scan::<true, E>(bytes, emit)
    }

    fn scan<const COLS: bool, E: From<String>>(
        &mut self,
        bytes: &[u8],
        mut emit: impl FnMut(&[u8], &[u32]) -> Result<(), E>,
    ) -> Result<(), E> {
        let stops = if COLS { &STRUCTURAL_OR_COMMA } else { &STRUCTURAL };
        let mut st = self.st;
        // Where the open row began in `bytes` (None: in an earlier read,
        // held in `carry`).
        let mut start: Option<usize> = None;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if st.done {
                if !b.is_ascii_whitespace() {
                    return Err(E::from("data after the end of the answer".to_owned()));
                }
                i += 1;
                continue;
            }
            if !st.started {
                match b {
                    b'[' => st.started = true,
                    b if b.is_ascii_whitespace() => {}
                    _ => return Err(E::from("the answer is not a JSON list".to_owned())),
                }
                i += 1;
                continue;
            }
            if st.depth == 0 {
                match b {
                    b'[' => {
                        st.depth = 1;
                        start = Some(i);
                        self.commas.clear();
                    }
                    b']' => st.done = true,
                    b',' => {}
                    b if b.is_ascii_whitespace() => {}
                    _ => return Err(E::from("a row is not a JSON list".to_owned())),
                }
                i += 1;
                continue;
            }
            if st.in_string {
                if st.escape {
                    st.escape = false;
                    i += 1;
                    continue;
                }
                // Skip to the string's next quote or backslash at once.
                match memchr2(b'"', b'\\', &bytes[i..]) {
                    Some(at) => {
                        i += at;
                        if bytes[i] == b'"' {
                            st.in_string = false;
                        } else {
                            st.escape = true;
                        }
                        i += 1;
                    }
                    None => i = bytes.len(),
                }
                continue;
            }
            if !stops[b as usize] {
                // Numbers, literals (commas): on to the next stop.
                i += bytes[i..].iter().position(|&b| stops[b as usize]).unwrap_or(bytes.len() - i);
                continue;
            }
            match b {
                b'"' => st.in_string = true,
                b',' if COLS && st.depth == 1 => {
                    let at = match start {
                        Some(s) => i - s,
                        None => self.carry.len() + i,
                    };
                    self.commas.push(at as u32);
                }
                b'[' | b'{' => st.depth += 1,
                b']' | b'}' => {
                    st.depth -= 1;
                    if st.depth == 0 {
                        let row = match start.take() {
                            Some(s) => &bytes[s..=i],
                            None => {
                                self.carry.extend_from_slice(&bytes[..=i]);
                                &self.carry[..]
                            }
                        };
                        if row.len() > MAX_ROW_BYTES {
                            return Err(E::from(format!("a row is larger than {MAX_ROW_BYTES} bytes")));
                        }
                        emit(row, &self.commas)?;
                        self.carry.clear();
                    }
                }
                _ => {}
            }
            i += 1;
        }
        self.st = st;
        if st.depth > 0 {
            let from = start.unwrap_or(0);
            if self.carry.len() + (bytes.len() - from) > MAX_ROW_BYTES {
                return Err(E::from(format!("a row is larger than {MAX_ROW_BYTES} bytes")));
            }
            self.carry.extend_from_slice(&bytes[from..]);
        }
        Ok(())
    }

    /// The answer ended: was it complete?
    pub fn finish(&self) -> Result<(), String> {
        if self.st.done || (!self.st.started && self.carry.is_empty()) {
            Ok(())
        } else {
            Err("the answer ends early".into())
        }
    }
}

/// The columns of one JSON row (`[a, "b", [c]]`): where the bytes of
/// each value are in `row`, trimmed, cut at the `commas`
/// [`RowSplitter::feed_cols`] found; not checked beyond brackets and
/// strings (a row whose columns are needed whole is parsed).
pub fn columns(row: &[u8], commas: &[u32], out: &mut Vec<Range<usize>>) {
    out.clear();
    if row.len() < 2 {
        return;
    }
    let trim = |mut r: Range<usize>| {
        while r.start < r.end && row[r.start].is_ascii_whitespace() {
            r.start += 1;
        }
        while r.end > r.start && row[r.end - 1].is_ascii_whitespace() {
            r.end -= 1;
        }
        r
    };
    let end = row.len() - 1;
    let mut from = 1;
    for &c in commas {
        let c = (c as usize).clamp(from, end);
        out.push(trim(from..c));
        from = c + 1;
    }
    let last = trim(from.min(end)..end);
    if !last.is_empty() || !out.is_empty() {
        out.push(last);
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
    fn a_row_s_columns_are_its_values_as_sent_wherever_the_reads_are_cut() {
        let answer = br#"[[ "a,\"b" , 1.5,[1,[2,"]"]],{"k":","},"\\",null ],[],[7]]"#;
        let want: [&[&str]; 3] =
            [&[r#""a,\"b""#, "1.5", r#"[1,[2,"]"]]"#, r#"{"k":","}"#, r#""\\""#, "null"], &[], &["7"]];
        for cut in 0..=answer.len() {
            let mut got: Vec<Vec<String>> = Vec::new();
            let mut s = RowSplitter::default();
            for part in [&answer[..cut], &answer[cut..]] {
                s.feed_cols(part, |row, commas| {
                    let mut cols = Vec::new();
                    columns(row, commas, &mut cols);
                    got.push(cols.into_iter().map(|c| String::from_utf8_lossy(&row[c]).into_owned()).collect());
                    Ok::<(), String>(())
                })
                .unwrap();
            }
            s.finish().unwrap();
            assert_eq!(got, want.map(|r| r.iter().map(|c| c.to_string()).collect::<Vec<_>>()), "cut at {cut}");
        }
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
