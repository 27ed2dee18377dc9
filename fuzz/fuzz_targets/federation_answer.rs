//! Federated queries: planning, cutting site answers into rows, merging.
//! The body and what it asserts: `livemux_fuzzing::federation_answer`.
//! Run: `cargo +nightly fuzz run federation_answer` in fuzz/ (see docs/RELIABILITY.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemux_fuzzing::federation_answer(data));
