//! HW/SW inventory as a Checkmk site serves it: `status.mk_inventory_last`
//! and the hosts' `mk_inventory_last`, `mk_inventory`, `mk_inventory_gz`.
//!
//! Every host has a generated tree (deterministic from its name, a marker
//! and a size) unless a test replaced or removed it. Two layouts, as on a
//! real site: the current one (`<host>.json`, and `<host>.json.gz` holding
//! `{"meta": ..., "raw_tree": ...}`) and the legacy one (`<host>`, a Python
//! literal, and `<host>.gz`). [`Tree::file_names`] says what a site would
//! store, so tests can compare a synced directory with it.

use std::collections::HashMap;
use std::io::Write;

/// Which files a site keeps a host's tree in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `<host>.json` + `<host>.json.gz` (Checkmk 2.3 and later).
    #[default]
    Current,
    /// `<host>` (a Python literal) + `<host>.gz`.
    Legacy,
}

/// One host's inventory as the site holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// The tree file's mtime (`mk_inventory_last`).
    pub mtime: i64,
    /// The tree file (`mk_inventory`).
    pub plain: Vec<u8>,
    /// The gzipped file (`mk_inventory_gz`; may be empty).
    pub gz: Vec<u8>,
    /// The layout the files are in.
    pub layout: Layout,
}

impl Tree {
    /// The names a site stores this tree under for `host`: (plain, gz).
    pub fn file_names(&self, host: &str) -> (String, String) {
        match self.layout {
            Layout::Current => (format!("{host}.json"), format!("{host}.json.gz")),
            Layout::Legacy => (host.to_owned(), format!("{host}.gz")),
        }
    }
}

/// The site's inventory: generated trees plus what tests changed.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// The columns exist (a Checkmk core); off, they are unknown columns
    /// (like Icinga 2 or Naemon).
    pub enabled: bool,
    /// Layout of generated trees.
    pub layout: Layout,
    /// Approximate size of a generated tree file.
    pub tree_bytes: usize,
    /// mtime of `inventory/.last` (`status.mk_inventory_last`).
    pub last: i64,
    /// Generated trees have mtime `base_mtime + i % 60`.
    pub base_mtime: i64,
    /// Trees replaced (`Some`) or removed (`None`) by tests.
    changed: HashMap<usize, Option<Tree>>,
}

impl Default for Inventory {
    fn default() -> Self {
        let base_mtime = 1_700_000_000;
        Inventory {
            enabled: true,
            layout: Layout::Current,
            tree_bytes: 2048,
            last: base_mtime + 59,
            base_mtime,
            changed: HashMap::new(),
        }
    }
}

impl Inventory {
    /// Host `i`'s tree, if it has one.
    pub fn tree(&self, i: usize, name: &str) -> Option<Tree> {
        match self.changed.get(&i) {
            Some(t) => t.clone(),
            None => Some(generate(name, self.layout, self.tree_bytes, "v0", self.base_mtime + (i % 60) as i64)),
        }
    }

    /// Host `i`'s `mk_inventory_last` (0: no tree).
    pub fn mtime(&self, i: usize) -> i64 {
        match self.changed.get(&i) {
            Some(t) => t.as_ref().map_or(0, |t| t.mtime),
            None => self.base_mtime + (i % 60) as i64,
        }
    }

    /// Host `i`'s tree file (`gz`: its gzipped file); empty without a tree.
    pub fn blob(&self, i: usize, name: &str, gz: bool) -> Vec<u8> {
        match self.changed.get(&i) {
            Some(Some(t)) if gz => t.gz.clone(),
            Some(Some(t)) => t.plain.clone(),
            Some(None) => Vec::new(),
            None => {
                let (plain, archived) = texts(name, self.layout, self.tree_bytes, "v0");
                if gz { gzip(archived.as_bytes()) } else { plain.into_bytes() }
            }
        }
    }

    /// Replace host `i`'s tree (`None`: remove it) as a site's inventory
    /// run would: `.last` is touched with the tree's mtime (or `now`).
    pub fn set(&mut self, i: usize, tree: Option<Tree>, now: i64) {
        self.last = self.last.max(tree.as_ref().map_or(now, |t| t.mtime));
        self.changed.insert(i, tree);
    }

    /// Set a tree without touching `.last` (as a site's remote sync would).
    pub fn set_quietly(&mut self, i: usize, tree: Option<Tree>) {
        self.changed.insert(i, tree);
    }
}

/// A tree for `host` of about `bytes` bytes; `marker` tells versions apart.
pub fn generate(host: &str, layout: Layout, bytes: usize, marker: &str, mtime: i64) -> Tree {
    let (plain, archived) = texts(host, layout, bytes, marker);
    Tree { mtime, plain: plain.into_bytes(), gz: gzip(archived.as_bytes()), layout }
}

/// The tree file and the text its `.gz` holds.
fn texts(host: &str, layout: Layout, bytes: usize, marker: &str) -> (String, String) {
    match layout {
        Layout::Current => {
            let body = tree_text(host, marker, bytes, '"', "true");
            let plain = format!("{body}\n");
            let archived =
                format!("{{\"meta\": {{\"version\": \"1\", \"do_archive\": true}}, \"raw_tree\": {body}}}\n");
            (plain, archived)
        }
        Layout::Legacy => {
            let body = tree_text(host, marker, bytes, '\'', "True");
            let plain = format!("{body}\n");
            // The legacy .gz holds the tree's keys next to its meta keys.
            let inner = body.strip_prefix('{').unwrap_or(&body);
            let archived = format!("{{'meta_version': '0', 'meta_do_archive': True, {inner}\n");
            (plain, archived)
        }
    }
}

/// The tree as JSON (`q = '"'`) or a Python literal (`q = '\''`): some
/// attributes, then a package table padded to about `bytes`.
fn tree_text(host: &str, marker: &str, bytes: usize, q: char, yes: &str) -> String {
    let mut rows = String::new();
    let mut n = 0;
    while rows.len() < bytes || n == 0 {
        if n > 0 {
            rows.push_str(", ");
        }
        rows.push_str(&format!(
            "{{{q}name{q}: {q}pkg-{n:05}{q}, {q}version{q}: {q}1.{}.{n}{q}, {q}summary{q}: {q}package {n} \\\\ of {host} {marker}{q}, {q}installed{q}: {yes}}}",
            n % 7
        ));
        n += 1;
    }
    format!(
        "{{{q}Attributes{q}: {{{q}Pairs{q}: {{{q}host{q}: {q}{host}{q}, {q}marker{q}: {q}{marker}{q}}}}}, \
         {q}Nodes{q}: {{{q}software{q}: {{{q}Attributes{q}: {{}}, {q}Nodes{q}: {{}}, \
         {q}Table{q}: {{{q}KeyColumns{q}: [{q}name{q}], {q}Rows{q}: [{rows}]}}}}}}, {q}Table{q}: {{}}}}"
    )
}

/// gzip at the fastest level (the content only has to be valid gzip).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_trees_have_the_requested_size_and_parse() {
        let t = generate("host-0001", Layout::Current, 10_000, "v1", 5);
        assert!(t.plain.len() >= 10_000 && t.plain.len() < 11_000, "{}", t.plain.len());
        let v: serde_json::Value = serde_json::from_slice(&t.plain).expect("current layout is JSON");
        assert_eq!(v["Attributes"]["Pairs"]["marker"], "v1");
        let mut d = flate2::read::GzDecoder::new(&t.gz[..]);
        let mut s = String::new();
        std::io::Read::read_to_string(&mut d, &mut s).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["raw_tree"]["Attributes"]["Pairs"]["host"], "host-0001");
        let legacy = generate("host-0001", Layout::Legacy, 100, "v1", 5);
        assert!(serde_json::from_slice::<serde_json::Value>(&legacy.plain).is_err());
        assert!(legacy.plain.starts_with(b"{'Attributes'"));
        assert_eq!(legacy.file_names("h"), ("h".to_owned(), "h.gz".to_owned()));
        assert_eq!(t.file_names("h"), ("h.json".to_owned(), "h.json.gz".to_owned()));
    }
}
