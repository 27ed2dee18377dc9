//! The configuration loader (TOML to validated config).
//! The body and what it asserts: `livemux_fuzzing::config_toml`.
//! Run: `cargo +nightly fuzz run config_toml` in fuzz/ (see docs/RELIABILITY.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemux_fuzzing::config_toml(data));
