//! The reference cannot drift from the code: every configuration key the
//! parser accepts is in docs/CONFIGURATION.md's examples and every key
//! there is accepted; every CLI subcommand and flag is in the docs. (The
//! metrics reference is checked against a scrape in `metrics.rs`.)

use std::collections::BTreeSet;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_livemux");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// README and every page of docs/.
fn all_docs() -> String {
    let mut text = read("README.md");
    for entry in std::fs::read_dir(format!("{ROOT}/docs")).expect("docs") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            text.push_str(&std::fs::read_to_string(&path).expect("doc"));
        }
    }
    text
}

/// The keys written in a text's ```toml blocks (`key = value`, also inside
/// an inline table), comments left out.
fn toml_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for block in text.split("```toml\n").skip(1) {
        let block = block.split("```").next().unwrap_or("");
        for line in block.lines() {
            let code = line.split(" #").next().unwrap_or("");
            let code = if code.trim_start().starts_with('#') { "" } else { code };
            let parts: Vec<&str> = code.split('=').collect();
            for left in &parts[..parts.len().saturating_sub(1)] {
                let name: String = left
                    .trim_end()
                    .chars()
                    .rev()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect();
                if !name.is_empty() {
                    keys.insert(name);
                }
            }
        }
    }
    keys
}

#[test]
fn the_configuration_reference_has_every_key_the_parser_accepts_and_no_other() {
    let doc = read("docs/CONFIGURATION.md");
    let written = toml_keys(&doc);
    let known: BTreeSet<String> =
        livemux::config::known_keys().iter().flat_map(|(_, keys)| keys.iter().map(|k| (*k).to_owned())).collect();
    // Tables written as `[inventory]`, `[[site]]`, `[defaults]`, `[[federation]]` are keys too.
    let missing: Vec<String> = livemux::config::known_keys()
        .iter()
        .flat_map(|(table, keys)| keys.iter().map(move |k| (*table, *k)))
        .filter(|(_, k)| {
            !written.contains(*k) && !doc.contains(&format!("[{k}]")) && !doc.contains(&format!("[[{k}]]"))
        })
        .map(|(t, k)| format!("`{k}` ({t})"))
        .collect();
    assert!(missing.is_empty(), "keys the parser accepts that docs/CONFIGURATION.md's examples lack: {missing:?}");
    let unknown: Vec<&String> = written.difference(&known).collect();
    assert!(unknown.is_empty(), "keys in docs/CONFIGURATION.md's examples the parser refuses: {unknown:?}");
}

/// A command's `--help`: its subcommands and its long flags.
fn help(args: &[&str]) -> (Vec<String>, Vec<String>) {
    let out = Command::new(BIN).args(args).arg("--help").output().expect("run livemux --help");
    assert!(out.status.success(), "{args:?} --help: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let section = |name: &str| -> Vec<String> {
        text.split(&format!("\n{name}:\n")).nth(1).map_or(Vec::new(), |s| {
            s.split("\n\n").next().unwrap_or("").lines().map(str::trim).map(str::to_owned).collect()
        })
    };
    let commands = section("Commands")
        .iter()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    let flags = section("Options")
        .iter()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("--")).map(|w| w.trim_end_matches(',').to_owned()))
        .filter(|f| f != "--help" && f != "--version")
        .collect();
    (commands, flags)
}

#[test]
fn every_cli_subcommand_and_flag_is_in_the_docs() {
    let docs = all_docs();
    let (commands, top_flags) = help(&[]);
    assert!(commands.len() >= 7, "{commands:?}");
    let mut missing = Vec::new();
    for f in top_flags {
        if !docs.contains(&f) {
            missing.push(f);
        }
    }
    for c in &commands {
        if !docs.contains(&format!("livemux {c}")) {
            missing.push(format!("livemux {c}"));
        }
        for f in help(&[c]).1 {
            if !docs.contains(&f) {
                missing.push(format!("livemux {c} {f}"));
            }
        }
    }
    assert!(missing.is_empty(), "not in README.md or docs/: {missing:?}");
}

#[test]
fn the_toml_key_reader_reads_keys_not_comments() {
    let text =
        "```toml\nname = \"a\"            # x = 1\ntls = { cert_file = \"c\", key_file = \"k\" }\n# y = 2\n```\n";
    assert_eq!(toml_keys(text), ["cert_file", "key_file", "name", "tls"].map(str::to_owned).into());
}

const KEYS_BEGIN: &str = "<!-- key tables: generated from src/config/reference.rs; tests/it/docs.rs checks them -->\n";
const KEYS_END: &str = "<!-- end of key tables -->\n";

/// docs/CONFIGURATION.md's key tables are `livemux::config::reference`'s
/// (whose defaults, ranges and reload behaviour are tested against the
/// validator). `LIVEMUX_WRITE_DOCS=1` writes them in place.
#[test]
fn the_configuration_key_tables_are_the_ones_the_code_generates() {
    let path = format!("{ROOT}/docs/CONFIGURATION.md");
    let doc = read("docs/CONFIGURATION.md");
    let (Some(begin), Some(end)) = (doc.find(KEYS_BEGIN), doc.find(KEYS_END)) else {
        panic!("docs/CONFIGURATION.md lacks the markers {KEYS_BEGIN:?} and {KEYS_END:?}");
    };
    let written = &doc[begin + KEYS_BEGIN.len()..end];
    let generated = livemux::config::reference::markdown();
    if written != generated && std::env::var_os("LIVEMUX_WRITE_DOCS").is_some() {
        let fresh = format!("{}{KEYS_BEGIN}{generated}{}", &doc[..begin], &doc[end..]);
        std::fs::write(&path, fresh).expect("write docs/CONFIGURATION.md");
        return;
    }
    assert!(
        written == generated,
        "docs/CONFIGURATION.md's key tables differ from src/config/reference.rs; rerun with LIVEMUX_WRITE_DOCS=1 \
         to write them"
    );
}
