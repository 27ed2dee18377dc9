//! The liveproxyd.mk reader on arbitrary input: it must return a value or
//! an error, never panic, loop or exhaust the stack (nesting is bounded).
//! Run: `cargo +nightly fuzz run liveproxyd_literal` in fuzz/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = livemux::liveproxyd::literal::parse(text);
    }
});
