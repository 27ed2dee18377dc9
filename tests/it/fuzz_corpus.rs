//! The fuzz corpora (`fuzz/corpus/<target>/`), replayed on stable: every
//! input of every target through the same body the fuzzer runs
//! (`crates/fuzzing`), so a finding kept in a corpus stays fixed without
//! a nightly toolchain. A target without a corpus, or with an empty one,
//! fails: the replay cannot pass by finding nothing.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

#[test]
fn every_corpus_input_passes_its_target() {
    let mut total = 0;
    for (target, body) in livemux_fuzzing::TARGETS {
        let dir = corpus(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("no corpus {}: {e}", dir.display()));
        let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        files.sort();
        assert!(!files.is_empty(), "the corpus {} is empty", dir.display());
        for file in &files {
            let data = std::fs::read(file).unwrap();
            // A panic names the input that caused it.
            let outcome = std::panic::catch_unwind(|| body(&data));
            assert!(
                outcome.is_ok(),
                "{target}: {} fails (replay: cargo +nightly fuzz run {target} {})",
                file.display(),
                file.display()
            );
        }
        total += files.len();
    }
    assert!(total > 0);
}

#[test]
fn every_fuzz_target_has_a_binary() {
    // The list in livemux_fuzzing and the targets in fuzz/ agree.
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml")).unwrap();
    for (target, _) in livemux_fuzzing::TARGETS {
        assert!(manifest.contains(&format!("name = \"{target}\"")), "fuzz/Cargo.toml has no target {target}");
    }
    let bins = manifest.matches("[[bin]]").count();
    assert_eq!(bins, livemux_fuzzing::TARGETS.len(), "fuzz/Cargo.toml has targets livemux_fuzzing does not list");
}
