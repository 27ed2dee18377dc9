//! Request framing and parsing under arbitrary chunking.
//! The body and what it asserts: `livemux_fuzzing::request_framing`.
//! Run: `cargo +nightly fuzz run request_framing` in fuzz/ (see docs/RELIABILITY.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemux_fuzzing::request_framing(data));
