//! The configuration loader: TOML text to a validated [`Config`].
//!
//! Asserted besides "no panic": a refusal names at least one problem, each
//! with a message and, where it has a line, a line of the text, in line
//! order; an accepted configuration has unique site names, limits within
//! their documented ranges, and federations of known sites.

use livemux::config::Config;

/// Fuzz target `config_toml`.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = text.lines().count() + 1;
    match Config::from_toml(text) {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a refusal without a reason");
            let mut last = 0;
            for e in &errors.0 {
                assert!(!e.message.is_empty(), "an error without a message: {e:?}");
                if let Some(line) = e.line {
                    assert!((1..=lines).contains(&line), "line {line} of a {lines}-line text: {e}");
                    assert!(line >= last, "errors out of line order: {errors}");
                    last = line;
                }
            }
        }
        Ok(config) => {
            let mut names = std::collections::HashSet::new();
            for site in &config.sites {
                assert!(names.insert(site.name.as_str()), "site name {:?} accepted twice", site.name);
                let l = site.params.limits;
                assert!((1024..=1 << 30).contains(&l.max_request_bytes), "{l:?}");
                assert!((64..=1 << 30).contains(&l.max_line_bytes), "{l:?}");
                assert!((1..=10_000_000).contains(&l.max_header_lines), "{l:?}");
            }
            for fed in &config.federations {
                assert!(!names.contains(fed.name.as_str()), "federation {:?} named like a site", fed.name);
                for s in &fed.sites {
                    assert!(names.contains(s.as_str()), "federation {:?} with unknown site {s:?}", fed.name);
                }
            }
        }
    }
}
