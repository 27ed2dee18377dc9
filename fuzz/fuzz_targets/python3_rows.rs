//! The python3 answer reader (the inventory blob decoder) under arbitrary chunking.
//! The body and what it asserts: `livemux_fuzzing::python3_rows`.
//! Run: `cargo +nightly fuzz run python3_rows` in fuzz/ (see docs/RELIABILITY.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemux_fuzzing::python3_rows(data));
