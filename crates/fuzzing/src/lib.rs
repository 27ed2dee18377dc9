//! Fuzz target bodies, shared by the cargo-fuzz targets in `fuzz/` (nightly,
//! coverage-guided) and the stable test that replays their corpora
//! (`tests/it/fuzz_corpus.rs`), so both run exactly the same checks. Test
//! code: a crate of its own, outside the daemon's library, which it drives
//! through its public interface.
//!
//! Each body takes arbitrary bytes and either returns or panics; a panic is
//! a finding. Besides "no panic", each one asserts what must hold of the
//! parser it drives: the same outcome whatever the chunking of a stream, a
//! framed request within its limits, a decoded value that survives being
//! encoded again. [`TARGETS`] lists them by the name of their fuzz target
//! and corpus directory (`fuzz/corpus/<name>/`).
//!
//! The streamed targets read their input as [`Input`]: a knob byte (limits
//! and the like), a count byte, that many chunk sizes, then the stream.

mod config;
mod federation;
mod fixed16;
mod liveproxyd;
mod python3;
mod request;

pub use config::config_toml;
pub use federation::federation_answer;
pub use fixed16::fixed16_response;
pub use liveproxyd::{liveproxyd_import, liveproxyd_literal};
pub use python3::python3_rows;
pub use request::request_framing;

/// A target's body: arbitrary bytes in, a panic for a finding.
pub type Body = fn(&[u8]);

/// Every target: (fuzz target and corpus name, body).
pub const TARGETS: &[(&str, Body)] = &[
    ("request_framing", request_framing),
    ("fixed16_response", fixed16_response),
    ("config_toml", config_toml),
    ("federation_answer", federation_answer),
    ("liveproxyd_literal", liveproxyd_literal),
    ("liveproxyd_import", liveproxyd_import),
    ("python3_rows", python3_rows),
];

/// A streamed target's input: `knob`, `n`, `n` chunk sizes, the stream.
/// Inputs shorter than two bytes are a stream alone.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Selects limits or options; each target reads its own bits.
    pub knob: u8,
    /// Chunk sizes (each byte `b` is a chunk of `b + 1` bytes), cycled.
    pub sizes: &'a [u8],
    /// The stream itself.
    pub stream: &'a [u8],
}

impl<'a> Input<'a> {
    /// Split fuzzer bytes into knob, chunk sizes and stream.
    pub fn new(data: &'a [u8]) -> Self {
        match data {
            [knob, n, rest @ ..] => {
                let n = usize::from(*n % 8).min(rest.len());
                let (sizes, stream) = rest.split_at(n);
                Input { knob: *knob, sizes, stream }
            }
            _ => Input { knob: 0, sizes: &[], stream: data },
        }
    }

    /// The chunkings each streamed target compares: the whole stream at
    /// once, the fuzzer's chunk sizes, and one byte at a time.
    pub fn chunkings(&self) -> [Vec<usize>; 3] {
        let chosen =
            if self.sizes.is_empty() { vec![7] } else { self.sizes.iter().map(|b| usize::from(*b) + 1).collect() };
        [vec![self.stream.len().max(1)], chosen, vec![1]]
    }
}

/// Cut `stream` into chunks of the given sizes (cycled; never empty chunks).
pub fn chunks<'a>(stream: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes.get(i % sizes.len().max(1)).copied().unwrap_or(1).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        out.push(chunk);
        rest = tail;
        i += 1;
    }
    out
}

/// The input with its `\0`-separated parts (for targets that take several
/// texts): at most `max` parts, the last one taking the rest.
pub fn parts(stream: &[u8], max: usize) -> Vec<&[u8]> {
    stream.splitn(max.max(1), |b| *b == 0).collect()
}
