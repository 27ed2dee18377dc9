//! The module layers of ARCHITECTURE.md hold in `src/`: every top-level
//! module is in exactly one layer, imports (`crate::module` paths outside
//! comments and test code) go to its own layer or below, and they form no
//! cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The layers as ARCHITECTURE.md lists them: module → layer number.
fn declared() -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let section = text.split("\n## Layers\n").nth(1).expect("a Layers section").split("\n## ").next().unwrap_or("");
    let mut layers = BTreeMap::new();
    for line in section.lines() {
        let Some((n, rest)) = line.split_once(". ") else { continue };
        let Ok(n) = n.parse::<usize>() else { continue };
        let (_, modules) = rest.split_once(": ").expect("`N. name: modules`");
        for m in modules.split(", ") {
            assert!(layers.insert(m.trim().to_owned(), n).is_none(), "{m} is in two layers");
        }
    }
    layers
}

/// Every `.rs` file under `dir`, test files left out.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().is_some_and(|n| n != "tests.rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file imports (`crate::name`, `crate::{a, b}`).
fn imports(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    let code: String = code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let mut found = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    for part in code.split("crate::").skip(1) {
        let names: Vec<String> = match part.strip_prefix('{') {
            Some(group) => group.split('}').next().unwrap_or("").split(',').map(|s| ident(s.trim())).collect(),
            None => vec![ident(part)],
        };
        found.extend(names.into_iter().filter(|n| modules.contains(n)));
    }
    found
}

#[test]
fn modules_import_only_their_layer_and_below_without_a_cycle() {
    let layers = declared();
    let src = Path::new(ROOT).join("src");
    let mut modules = BTreeSet::new();
    for entry in std::fs::read_dir(&src).expect("src") {
        let path = entry.expect("entry").path();
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_owned();
        if name != "main" && name != "lib" {
            modules.insert(name);
        }
    }
    let undeclared: Vec<&String> = modules.iter().filter(|m| !layers.contains_key(*m)).collect();
    assert!(undeclared.is_empty(), "modules missing from ARCHITECTURE.md's layers: {undeclared:?}");
    let gone: Vec<&String> = layers.keys().filter(|m| !modules.contains(*m)).collect();
    assert!(gone.is_empty(), "ARCHITECTURE.md's layers name modules src/ lacks: {gone:?}");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for m in &modules {
        let (file, dir) = (src.join(format!("{m}.rs")), src.join(m));
        let mut list = Vec::new();
        if file.exists() {
            list.push(file);
        }
        if dir.is_dir() {
            files(&dir, &mut list);
        }
        for f in list {
            let text = std::fs::read_to_string(&f).expect("source");
            for to in imports(&text, &modules) {
                if &to == m {
                    continue;
                }
                if layers[&to] > layers[m] {
                    upward.push(format!("{} (layer {}) imports {to} (layer {})", f.display(), layers[m], layers[&to]));
                }
                edges.entry(m.clone()).or_default().insert(to);
            }
        }
    }
    assert!(upward.is_empty(), "imports of a higher layer:\n{}", upward.join("\n"));
    // No cycle: take away modules that import nothing left, until none is left.
    let mut left: BTreeSet<String> = modules.clone();
    loop {
        let free: Vec<String> = left
            .iter()
            .filter(|m| edges.get(*m).is_none_or(|to| to.iter().all(|t| !left.contains(t))))
            .cloned()
            .collect();
        if free.is_empty() {
            break;
        }
        for m in free {
            left.remove(&m);
        }
    }
    assert!(left.is_empty(), "the imports of these modules form a cycle: {left:?}");
}

#[test]
fn the_import_reader_sees_paths_and_groups_but_not_comments_or_tests() {
    let modules: BTreeSet<String> = ["site", "config", "events"].map(str::to_owned).into();
    let text = "use crate::site::SiteState;\nuse crate::{config, events::X};\n// crate::metrics\n\
                #[cfg(test)]\nmod tests { use crate::app; }";
    assert_eq!(imports(text, &modules), modules);
    assert!(imports("/// see [`crate::site`]\nfn f() {}", &modules).is_empty());
}
