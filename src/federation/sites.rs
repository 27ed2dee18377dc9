//! LMD's virtual `sites` table (also `backends`) on a federated socket:
//! one row per site of the federation, from livemux's own live state
//! (Thruk's site list, `check_federation_peers` and "LMD Statistics" read
//! it). Columns a client asks for that the table lacks answer `""`, as in
//! LMD.
//!
//! Values: `key`, `name`, `peer_key` and `peer_name` are the site's name;
//! `addr` its address; `status` LMD's code (0 up, 2 down, 4 pending while
//! livemux makes its first connection); `last_error` why it is down (empty
//! when up); `last_update` now for a ready site (livemux's answers are live,
//! not a copy), else when it went down; `last_online` now when ready, else
//! when it went down; `response_time` the last heartbeat's round trip in
//! seconds; `bytes_send` and `bytes_received` what livemux wrote to clients
//! and read from the site for its answers; `queries` the requests of its
//! clients; `idling` 0; `section`, `parent` empty; the `federation_*` columns
//! empty lists; `lmd_version` livemux's name and version.

use serde_json::Value;

use crate::site::{SiteHandle, SiteState};

/// The table's columns, in LMD's order.
pub const COLUMNS: [&str; 27] = [
    "peer_key",
    "peer_name",
    "key",
    "name",
    "addr",
    "status",
    "bytes_send",
    "bytes_received",
    "queries",
    "last_error",
    "last_update",
    "last_online",
    "response_time",
    "idling",
    "last_query",
    "section",
    "parent",
    "lmd_version",
    "flags",
    "configtool",
    "thruk",
    "federation_key",
    "federation_name",
    "federation_addr",
    "federation_type",
    "federation_version",
    "localtime",
];

/// Whether `table` is the virtual sites table.
pub fn is_sites(table: &str) -> bool {
    matches!(table, "sites" | "backends")
}

/// One site's row, every column of [`COLUMNS`] by name.
pub async fn row(site: &SiteHandle) -> Vec<(&'static str, Value)> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let snap = site.snapshot(std::time::Duration::from_secs(1)).await;
    let status = site.status();
    let since = snap
        .as_ref()
        .and_then(|s| humantime::parse_rfc3339(&s.since).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let ready = status.state == SiteState::Ready;
    let code = match status.state {
        SiteState::Ready => 0,
        SiteState::Down => 2,
        SiteState::Starting => 4,
    };
    let last_error = match (ready, &status.last_error) {
        (false, Some(e)) => e.to_string(),
        _ => String::new(),
    };
    let at = if ready { now.as_secs() } else { since };
    let (from_site, to_clients) = site.metrics().bytes_so_far();
    let rtt = snap.as_ref().and_then(|s| s.heartbeat_rtt_ms).map_or(0.0, |ms| ms / 1000.0);
    let name = Value::from(site.name());
    let none = || Value::Array(Vec::new());
    vec![
        ("peer_key", name.clone()),
        ("peer_name", name.clone()),
        ("key", name.clone()),
        ("name", name),
        ("addr", Value::from(site.address())),
        ("status", Value::from(code)),
        ("bytes_send", Value::from(to_clients)),
        ("bytes_received", Value::from(from_site)),
        ("queries", Value::from(snap.as_ref().map_or(0, |s| s.queries))),
        ("last_error", Value::from(last_error)),
        ("last_update", Value::from(at)),
        ("last_online", Value::from(at)),
        ("response_time", Value::from(rtt)),
        ("idling", Value::from(0)),
        ("last_query", Value::from(if ready { now.as_secs() } else { 0 })),
        ("section", Value::from("")),
        ("parent", Value::from("")),
        ("lmd_version", Value::from(concat!("livemux ", env!("CARGO_PKG_VERSION")))),
        ("flags", none()),
        ("configtool", Value::Object(serde_json::Map::new())),
        ("thruk", Value::Object(serde_json::Map::new())),
        ("federation_key", none()),
        ("federation_name", none()),
        ("federation_addr", none()),
        ("federation_type", none()),
        ("federation_version", none()),
        ("localtime", Value::from(now.as_secs_f64())),
    ]
}

/// Whether a filter line (`column op value`) holds for a row: numbers
/// compare as numbers, the rest as strings (with the string operators).
pub fn holds(line: &str, row: &[(&'static str, Value)]) -> bool {
    let mut w = line.splitn(3, ' ');
    let (col, op, arg) = (w.next().unwrap_or(""), w.next().unwrap_or(""), w.next().unwrap_or(""));
    let value = row.iter().find(|(c, _)| *c == col).map(|(_, v)| v);
    match value {
        Some(Value::Number(n)) => {
            let (x, y) = (n.as_f64().unwrap_or(0.0), arg.trim().parse::<f64>().unwrap_or(0.0));
            match op {
                "=" => x == y,
                "!=" => x != y,
                "<" => x < y,
                "<=" => x <= y,
                ">" => x > y,
                ">=" => x >= y,
                _ => false,
            }
        }
        Some(Value::Array(items)) => {
            // A list: `>=` contains, `<` does not; `=`/`!=` with nothing test emptiness.
            let has = items.iter().any(|i| i.as_str() == Some(arg));
            match op {
                ">=" => has,
                "<" | "!>=" => !has,
                "=" => arg.is_empty() && items.is_empty(),
                "!=" => !(arg.is_empty() && items.is_empty()),
                _ => false,
            }
        }
        other => {
            let text = match other {
                Some(Value::String(s)) => s.as_str(),
                _ => "",
            };
            super::plan::sitefilter::StrOp::parse(op)
                .and_then(|op| super::plan::sitefilter::StrTest::new(op, arg).ok())
                .is_some_and(|t| t.matches(text))
        }
    }
}
