//! What a mistyped or misplaced key was meant to be: the keys each table
//! accepts, read from the raw structs themselves (so the list cannot drift
//! from what the parser takes), a near spelling in the same table, or the
//! table where a key of that name belongs.

use serde::Deserialize;
use serde::de::{self, Visitor};

use super::keys::Step;
use super::raw::{RawConfig, RawFederation, RawInventory, RawListenerTls, RawSite};

/// The field names a struct's `Deserialize` asks for.
fn fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut got = None;
    let _ = T::deserialize(FieldNames(&mut got));
    got.unwrap_or_default()
}

/// A table of the file, as a message names it, and its keys.
struct Table {
    said: &'static str,
    keys: &'static [&'static str],
}

fn tables() -> [Table; 5] {
    [
        Table { said: "at the top of the file, before any [table]", keys: fields::<RawConfig>() },
        Table { said: "in [defaults] or a [[site]] table", keys: fields::<RawSite>() },
        Table { said: "in a [[federation]] table", keys: fields::<RawFederation>() },
        Table { said: "in [inventory]", keys: fields::<RawInventory>() },
        Table { said: "in a listener's `tls = { ... }`", keys: fields::<RawListenerTls>() },
    ]
}

/// The table an unknown key at `path` was written in (an index into
/// [`tables`]).
fn table_of(path: &[Step]) -> usize {
    let keys: Vec<&str> =
        path.iter().filter_map(|s| if let Step::Key(k) = s { Some(k.as_str()) } else { None }).collect();
    match keys.as_slice() {
        [.., "tls", _] => 4,
        ["defaults" | "site", _] => 1,
        ["federation", _] => 2,
        ["inventory", _] => 3,
        _ => 0,
    }
}

/// A hint for an unknown key at `path` (its last step): where a key of
/// that name belongs, or the known key of its table it is closest to.
pub(super) fn hint(path: &[Step]) -> Option<String> {
    let Some(Step::Key(key)) = path.last() else { return None };
    let tables = tables();
    let here = table_of(path);
    if let Some(t) = tables.iter().enumerate().find(|(i, t)| *i != here && t.keys.contains(&key.as_str())) {
        return Some(format!("`{key}` belongs {}", t.1.said));
    }
    // At most one edit in a short key, two in a longer one.
    let most = if key.len() < 6 { 1 } else { 2 };
    tables[here]
        .keys
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k), *k))
        .filter(|(d, _)| *d <= most)
        .min()
        .map(|(_, k)| format!("did you mean `{k}`?"))
}

/// Every table's keys, as a message names the table (what the parser
/// accepts: the configuration reference is checked against it).
pub fn known_keys() -> Vec<(&'static str, &'static [&'static str])> {
    tables().into_iter().map(|t| (t.said, t.keys)).collect()
}

/// A deserializer that records the field names `deserialize_struct` is
/// given, and deserializes nothing.
struct FieldNames<'a>(&'a mut Option<&'static [&'static str]>);

/// Its only answer.
#[derive(Debug)]
struct Recorded;

impl std::fmt::Display for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field names recorded")
    }
}

impl std::error::Error for Recorded {}

impl de::Error for Recorded {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Recorded
    }
}

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = Recorded;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Recorded> {
        Err(Recorded)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Recorded> {
        *self.0 = Some(fields);
        Err(Recorded)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(keys: &[&str]) -> Vec<Step> {
        keys.iter()
            .map(|k| match k.parse::<usize>() {
                Ok(i) => Step::Index(i),
                Err(_) => Step::Key((*k).to_owned()),
            })
            .collect()
    }

    #[test]
    fn every_table_s_keys_come_from_its_struct() {
        let t = tables();
        assert!(t[0].keys.contains(&"socket_dir") && t[0].keys.contains(&"federation_sort_budget"));
        assert!(t[1].keys.contains(&"channel_timeout") && t[1].keys.contains(&"inventory"));
        assert!(t[2].keys.contains(&"dialect") && t[3].keys.contains(&"full_interval"));
        assert_eq!(t[4].keys, ["cert_file", "key_file", "tls_client_ca", "tls_client_names"]);
    }

    #[test]
    fn a_near_spelling_or_the_right_table_is_named() {
        assert_eq!(hint(&path(&["defaults", "chanels"])).as_deref(), Some("did you mean `channels`?"));
        assert_eq!(hint(&path(&["site", "0", "chanel_timeout"])).as_deref(), Some("did you mean `channel_timeout`?"));
        assert_eq!(hint(&path(&["site", "0", "tls", "cert_fil"])).as_deref(), Some("did you mean `cert_file`?"));
        assert_eq!(hint(&path(&["statefile"])).as_deref(), Some("did you mean `state_file`?"));
        assert_eq!(
            hint(&path(&["site", "1", "socket_dir"])).as_deref(),
            Some("`socket_dir` belongs at the top of the file, before any [table]")
        );
        assert_eq!(hint(&path(&["channels"])).as_deref(), Some("`channels` belongs in [defaults] or a [[site]] table"));
        assert_eq!(
            hint(&path(&["defaults", "on_site_error"])).as_deref(),
            Some("`on_site_error` belongs in a [[federation]] table")
        );
        assert_eq!(
            hint(&path(&["federation", "0", "full_interval"])).as_deref(),
            Some("`full_interval` belongs in [inventory]")
        );
        assert_eq!(hint(&path(&["defaults", "frobnicate"])), None, "nothing near: no guess");
    }
}
