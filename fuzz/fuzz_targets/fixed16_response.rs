//! The fixed16 header and the start of a site's answer under arbitrary chunking.
//! The body and what it asserts: `livemux_fuzzing::fixed16_response`.
//! Run: `cargo +nightly fuzz run fixed16_response` in fuzz/ (see docs/RELIABILITY.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemux_fuzzing::fixed16_response(data));
