//! The liveproxyd.mk importer (literal to TOML).
//! The body and what it asserts: `livemux_fuzzing::liveproxyd_import`.
//! Run: `cargo +nightly fuzz run liveproxyd_import` in fuzz/ (see docs/RELIABILITY.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemux_fuzzing::liveproxyd_import(data));
