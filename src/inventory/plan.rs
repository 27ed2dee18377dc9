//! What one sync does, decided on plain values: no I/O, no clock.
//!
//! # When to list the hosts
//!
//! A site touches `inventory/.last` whenever it saves a host's tree, so the
//! probe (`status.mk_inventory_last`, whole seconds) changes when anything
//! changed, except for a save later in the same second as the save the
//! probe last showed. liveproxyd once compared such timestamps against the
//! second its sync started or ended and missed exactly those saves. livemux
//! compares no clocks: a probe value counts as seen only once a listing ran
//! after an *earlier* probe had already returned that value. That earlier
//! probe ran at or after the value's second on the site, and the listing at
//! least one interval later, so every save of that second was done before
//! the listing started. A change thus costs two listings (names and
//! timestamps, cheap); trees are compared per host and fetched once.
//!
//! # Which hosts to fetch
//!
//! A host is fetched when its timestamp differs from the one livemux wrote,
//! or when it was written with a timestamp that was still the site's
//! current second (`unconfirmed`): a second save in that second keeps the
//! timestamp, so such a host is fetched again by the next listing.
//! Hosts livemux wrote that the site no longer lists, or lists with
//! timestamp 0, are removed. Host names come from the remote site and
//! become file names: unsafe ones are never written.

use std::collections::{BTreeMap, HashSet};

/// What livemux wrote for one host (the manifest's entry).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Written {
    /// The site's `mk_inventory_last` of the tree written.
    pub mtime: i64,
    /// File names in the inventory directory.
    pub files: Vec<String>,
    /// Written while `mtime` may still have been the site's current second.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unconfirmed: bool,
}

/// The probe's memory between syncs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// The value the previous probe returned (none after a failed sync).
    last: Option<i64>,
    /// A value a listing has fully covered.
    covered: Option<i64>,
}

impl Probe {
    /// Whether a sync that read `value` lists the hosts (`full`: the full
    /// listing is due anyway).
    pub fn wants_listing(&self, value: i64, full: bool) -> bool {
        full || self.covered != Some(value)
    }

    /// True if a listing now covers `value` (an earlier probe saw it).
    pub fn confirming(&self, value: i64) -> bool {
        self.last == Some(value)
    }

    /// The sync that read `value` finished (`listed`: with a listing).
    pub fn done(&mut self, value: i64, listed: bool) {
        if listed && self.confirming(value) {
            self.covered = Some(value);
        }
        self.last = Some(value);
    }

    /// The sync failed part way: nothing it read counts.
    pub fn failed(&mut self) {
        self.last = None;
    }
}

/// Why a listed host is not synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Its name is not a safe file name.
    BadName(&'static str),
    /// Another site's host of the same name was written first.
    Conflict(String),
}

/// The listing's consequences.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Hosts to fetch (name, listed timestamp), in listing order.
    pub fetch: Vec<(String, i64)>,
    /// Hosts whose files go.
    pub remove: Vec<String>,
    /// Hosts left alone, and why.
    pub skipped: Vec<(String, Skip)>,
}

/// Longest host name written: a file name is at most 255 bytes, and the
/// longest suffix is `.json.gz`.
const MAX_NAME: usize = 255 - 8;

/// Whether `name` is safe as a file name in the inventory directory.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("an empty name")
    } else if name.starts_with('.') {
        Err("a name starting with '.'")
    } else if name.contains('/') {
        Err("a name containing '/'")
    } else if name.contains('\0') {
        Err("a name containing a NUL byte")
    } else if name.contains("..") {
        Err("a name containing '..'")
    } else if name.contains(['\n', '\r']) {
        Err("a name containing a line break")
    } else if name.len() > MAX_NAME {
        Err("a name longer than 247 bytes")
    } else {
        Ok(())
    }
}

/// Compare a listing (name, `mk_inventory_last`) with what was written;
/// `owner` names the other site that holds a host name, if any.
pub fn plan(
    listing: &[(String, i64)],
    written: &BTreeMap<String, Written>,
    owner: impl Fn(&str) -> Option<String>,
) -> Plan {
    let mut p = Plan::default();
    let mut listed = HashSet::with_capacity(listing.len());
    for (name, mtime) in listing {
        if *mtime <= 0 {
            continue;
        }
        listed.insert(name.as_str());
        if let Err(why) = check_name(name) {
            p.skipped.push((name.clone(), Skip::BadName(why)));
            continue;
        }
        if let Some(other) = owner(name) {
            p.skipped.push((name.clone(), Skip::Conflict(other)));
            continue;
        }
        match written.get(name) {
            Some(w) if w.mtime == *mtime && !w.unconfirmed => {}
            _ => p.fetch.push((name.clone(), *mtime)),
        }
    }
    p.remove = written.keys().filter(|n| !listed.contains(n.as_str())).cloned().collect();
    p
}

/// Whether a tree with timestamp `mtime`, fetched by a sync whose probe read
/// `probe`, may still change within its second.
pub fn unconfirmed(mtime: i64, probe: i64, confirming: bool) -> bool {
    mtime >= probe && !confirming
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(mtime: i64, unconfirmed: bool) -> Written {
        Written { mtime, files: vec![], unconfirmed }
    }

    #[test]
    fn a_change_is_listed_until_a_listing_after_an_earlier_probe_covers_it() {
        let mut p = Probe::default();
        // First sync: nothing known.
        assert!(p.wants_listing(100, false));
        assert!(!p.confirming(100));
        p.done(100, true);
        // Same value again: listed once more, now confirming.
        assert!(p.wants_listing(100, false));
        assert!(p.confirming(100));
        p.done(100, true);
        // Covered: no listing unless the full one is due.
        assert!(!p.wants_listing(100, false));
        assert!(p.wants_listing(100, true));
        p.done(100, false);
        // A later save.
        assert!(p.wants_listing(101, false));
        assert!(!p.confirming(101));
        p.done(101, true);
        assert!(p.wants_listing(101, false));
    }

    #[test]
    fn a_save_in_the_same_second_as_the_listing_is_not_missed() {
        // The site saves host a at second 100 (probe 100), livemux lists
        // and fetches a during second 100, then the site saves a again in
        // second 100: the probe still says 100 and a's timestamp is 100.
        let mut probe = Probe::default();
        let mut written = BTreeMap::new();
        assert!(probe.wants_listing(100, false));
        let confirming = probe.confirming(100);
        let plan1 = plan(&[("a".into(), 100)], &written, |_| None);
        assert_eq!(plan1.fetch, vec![("a".to_owned(), 100)]);
        written.insert("a".to_owned(), w(100, unconfirmed(100, 100, confirming)));
        probe.done(100, true);
        // Next sync: same probe value, same timestamp, yet both are read again.
        assert!(probe.wants_listing(100, false), "the probe value of the listing's second is not trusted");
        let plan2 = plan(&[("a".into(), 100)], &written, |_| None);
        assert_eq!(plan2.fetch, vec![("a".to_owned(), 100)], "a host written in its own second is fetched again");
        let confirming = probe.confirming(100);
        assert!(confirming);
        written.insert("a".to_owned(), w(100, unconfirmed(100, 100, confirming)));
        probe.done(100, true);
        // Now it is settled.
        assert!(!probe.wants_listing(100, false));
        assert_eq!(plan(&[("a".into(), 100)], &written, |_| None), Plan::default());
    }

    #[test]
    fn a_failed_sync_does_not_count_as_an_earlier_probe() {
        let mut p = Probe::default();
        p.done(100, true);
        p.failed();
        assert!(!p.confirming(100));
        p.done(100, true);
        assert!(p.wants_listing(100, false));
    }

    #[test]
    fn changed_hosts_are_fetched_and_vanished_ones_removed() {
        let written: BTreeMap<String, Written> = [
            ("same".to_owned(), w(10, false)),
            ("older".to_owned(), w(10, false)),
            ("newer".to_owned(), w(30, false)),
            ("gone".to_owned(), w(10, false)),
            ("zeroed".to_owned(), w(10, false)),
        ]
        .into();
        let listing =
            [("same".into(), 10), ("older".into(), 20), ("newer".into(), 20), ("zeroed".into(), 0), ("new".into(), 5)];
        let p = plan(&listing, &written, |_| None);
        assert_eq!(p.fetch, vec![("older".into(), 20), ("newer".into(), 20), ("new".into(), 5)]);
        assert_eq!(p.remove, vec!["gone".to_owned(), "zeroed".to_owned()]);
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn unsafe_names_and_other_sites_hosts_are_skipped() {
        let listing: Vec<(String, i64)> =
            ["../etc", "a/b", ".hidden", "nul\0x", "x..y", "", "line\nbreak", "taken", "fine"]
                .iter()
                .map(|n| ((*n).to_owned(), 7))
                .collect();
        let p = plan(&listing, &BTreeMap::new(), |n| (n == "taken").then(|| "other".to_owned()));
        assert_eq!(p.fetch, vec![("fine".into(), 7)]);
        let reasons: Vec<_> = p.skipped.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
        assert_eq!(
            reasons,
            vec![
                ("../etc", Skip::BadName("a name starting with '.'")),
                ("a/b", Skip::BadName("a name containing '/'")),
                (".hidden", Skip::BadName("a name starting with '.'")),
                ("nul\0x", Skip::BadName("a name containing a NUL byte")),
                ("x..y", Skip::BadName("a name containing '..'")),
                ("", Skip::BadName("an empty name")),
                ("line\nbreak", Skip::BadName("a name containing a line break")),
                ("taken", Skip::Conflict("other".into())),
            ]
        );
        assert!(check_name(&"h".repeat(247)).is_ok());
        assert!(check_name(&"h".repeat(248)).is_err());
    }
}
