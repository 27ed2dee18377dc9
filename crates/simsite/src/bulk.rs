//! The body of `GET bulk`: deterministic bytes of any length.
//!
//! The body is a sequence of 32-byte lines: the line number as 16 hex digits,
//! ` bulk-data-pad.` and `\n`. Any byte can be computed from its offset, so a
//! reader can check a multi-gigabyte response for exactness without keeping
//! it, and the site can generate it without allocating it.

/// Length of one line of the bulk body.
pub const LINE: u64 = 32;
const TAIL: &[u8; 16] = b" bulk-data-pad.\n";
const HEX: &[u8; 16] = b"0123456789abcdef";

fn line(n: u64) -> [u8; LINE as usize] {
    let mut out = [0u8; LINE as usize];
    for (i, b) in out[..16].iter_mut().enumerate() {
        *b = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    out[16..].copy_from_slice(TAIL);
    out
}

/// Fill `out` with the bulk body starting at byte `offset`.
pub fn fill(mut offset: u64, out: &mut [u8]) {
    let mut i = 0;
    while i < out.len() {
        let l = line(offset / LINE);
        let col = (offset % LINE) as usize;
        let n = (LINE as usize - col).min(out.len() - i);
        out[i..i + n].copy_from_slice(&l[col..col + n]);
        i += n;
        offset += n as u64;
    }
}

/// Checks a bulk body as it streams past.
#[derive(Debug, Default)]
pub struct Checker {
    offset: u64,
    scratch: Vec<u8>,
    /// Offset of the first wrong byte, if any.
    pub first_error: Option<u64>,
}

impl Checker {
    /// A checker at offset 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Check the next bytes of the body.
    pub fn update(&mut self, chunk: &[u8]) {
        if self.first_error.is_none() {
            self.scratch.resize(chunk.len(), 0);
            fill(self.offset, &mut self.scratch);
            if let Some(p) = chunk.iter().zip(&self.scratch).position(|(a, b)| a != b) {
                self.first_error = Some(self.offset + p as u64);
            }
        }
        self.offset += chunk.len() as u64;
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.offset
    }

    /// True if nothing was seen yet.
    pub fn is_empty(&self) -> bool {
        self.offset == 0
    }

    /// True if exactly `expected` correct bytes were seen.
    pub fn is_complete(&self, expected: u64) -> bool {
        self.first_error.is_none() && self.offset == expected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_offsets() {
        let mut b = [0u8; 70];
        fill(0, &mut b);
        assert_eq!(&b[..32], b"0000000000000000 bulk-data-pad.\n");
        assert_eq!(&b[32..64], b"0000000000000001 bulk-data-pad.\n");
        let mut c = [0u8; 10];
        fill(60, &mut c);
        assert_eq!(&c[..], &b[60..70]);
    }

    #[test]
    fn checker_finds_the_first_wrong_byte() {
        let mut body = vec![0u8; 1000];
        fill(0, &mut body);
        let mut ok = Checker::new();
        for part in body.chunks(77) {
            ok.update(part);
        }
        assert!(ok.is_complete(1000));
        body[500] ^= 1;
        let mut bad = Checker::new();
        bad.update(&body);
        assert_eq!(bad.first_error, Some(500));
        assert!(!bad.is_complete(1000));
    }
}
