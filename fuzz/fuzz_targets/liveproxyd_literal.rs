//! The liveproxyd.mk Python literal reader.
//! The body and what it asserts: `livemux_fuzzing::liveproxyd_literal`.
//! Run: `cargo +nightly fuzz run liveproxyd_literal` in fuzz/ (see docs/RELIABILITY.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemux_fuzzing::liveproxyd_literal(data));
