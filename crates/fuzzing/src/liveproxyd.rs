//! The liveproxyd.mk reader and the importer on top of it.
//!
//! `liveproxyd_literal`: the Python literal reader returns statements or an
//! error naming a line and column inside the text, never panics, loops or
//! exhausts the stack (nesting is bounded).
//!
//! `liveproxyd_import`: the input is a liveproxyd.mk text, optionally
//! followed by `\0` and a global.mk text. Whatever the files hold, the
//! importer's output must be valid TOML (it quotes everything taken from
//! the files), and livemux's loader must be able to read it.

use std::path::{Path, PathBuf};

use livemux::config::Config;
use livemux::liveproxyd::literal::{self, ParseError};
use livemux::liveproxyd::{ImportError, Options, import_statements};

use super::parts;

/// Fuzz target `liveproxyd_literal`.
pub fn liveproxyd_literal(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(ParseError { line, column, what }) = literal::parse(text) {
        let lines = text.split('\n').count();
        assert!((1..=lines).contains(&line), "line {line} of {lines}: {what}");
        assert!(column >= 1, "column {column}: {what}");
        assert!(!what.is_empty());
    }
}

/// Fuzz target `liveproxyd_import`.
pub fn liveproxyd_import(data: &[u8]) {
    let p = parts(data, 2);
    let Ok(file) = std::str::from_utf8(p[0]) else { return };
    let global = match p.get(1).map(|g| std::str::from_utf8(g)) {
        Some(Ok(g)) => Some(g),
        Some(Err(_)) => return,
        None => None,
    };
    let Ok(statements) = literal::parse(file) else { return };
    // Without a site root, and with one (whose files do not exist).
    for omd_root in [None, Some(PathBuf::from("/nonexistent/omd/sites/central"))] {
        let opts = Options {
            file: PathBuf::from("/nonexistent/etc/check_mk/liveproxyd.mk"),
            global: global.map(|_| PathBuf::from("/nonexistent/global.mk")),
            socket_dir: None,
            omd_root,
        };
        let read_global = |path: &Path| {
            literal::parse(global.unwrap_or_default())
                .map_err(|source| ImportError::Parse { path: path.to_owned(), source })
        };
        let Ok(imported) = import_statements(&opts, &statements, read_global) else { continue };
        if let Err(e) = imported.toml.parse::<toml::Table>() {
            panic!("the import is not TOML ({e}):\n{}", imported.toml);
        }
        let _ = Config::from_toml(&imported.toml);
    }
}
