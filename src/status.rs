//! `livemux status`: the state file as a table a person reads at a glance,
//! and an exit code a script can use: 0 every site ready, 1 a site is not,
//! 2 no daemon (the state file is missing, unreadable, or older than three
//! `state_interval`s).
//!
//! It reads the file, not the daemon: it works while the daemon is busy and
//! needs no socket of its own. Fields it does not know are ignored and
//! missing ones shown as `-`, so it reads files of older and newer versions.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// What `status` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every site is ready.
    AllReady,
    /// At least one site is not.
    NotAllReady,
    /// No running daemon wrote this file recently (the reason).
    NoDaemon(String),
}

impl Verdict {
    /// The process exit code.
    pub fn code(&self) -> u8 {
        match self {
            Verdict::AllReady => 0,
            Verdict::NotAllReady => 1,
            Verdict::NoDaemon(_) => 2,
        }
    }
}

/// Read the state file: its JSON, or why there is no daemon.
pub fn read(path: &Path, now: SystemTime) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read state file {}: {e} (is livemux running?)", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("state file {} is not valid JSON: {e}", path.display()))?;
    let interval = Duration::from_millis(v["state_interval_ms"].as_u64().unwrap_or(5000));
    let written = v["written_at"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
        .ok_or_else(|| format!("state file {} has no written_at", path.display()))?;
    let age = now.duration_since(written).unwrap_or_default();
    if age > 3 * interval {
        return Err(format!(
            "state file {} is stale: written {} ago, rewritten every {} while livemux runs (is it running?)",
            path.display(),
            short(age),
            short(interval)
        ));
    }
    Ok(v)
}

/// The verdict for a state file's content.
pub fn verdict(v: &Value) -> Verdict {
    let sites = v["sites"].as_array().map(Vec::as_slice).unwrap_or_default();
    if sites.iter().all(|s| s["state"] == "ready") { Verdict::AllReady } else { Verdict::NotAllReady }
}

/// A duration as a person says it: `42s`, `3m 12s`, `2h 5m`, `3d 4h`.
fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

fn since(v: &Value, now: SystemTime) -> String {
    v.as_str()
        .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
        .map_or_else(|| "-".to_owned(), |t| short(now.duration_since(t).unwrap_or_default()))
}

fn num(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// The table: one row per site, then the daemon's reload and spool lines.
pub fn render(v: &Value, now: SystemTime) -> String {
    let header = [
        "SITE",
        "STATE",
        "FOR",
        "CHANNELS",
        "WAITING",
        "QUERIES",
        "ERRORS",
        "HEARTBEAT",
        "CACHE HITS",
        "INVENTORY",
        "LAST ERROR",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for s in v["sites"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let channels = s["channels"].as_array().map(Vec::as_slice).unwrap_or_default();
        let busy = channels.iter().filter(|c| c["state"] != "idle").count();
        let hits = s["cache"]["hits"].as_u64().unwrap_or(0);
        let misses = s["cache"]["misses"].as_u64().unwrap_or(0);
        let cache = if hits + misses == 0 {
            "-".to_owned()
        } else {
            format!("{:.0}%", hits as f64 * 100.0 / (hits + misses) as f64)
        };
        let inventory = match s["inventory"]["state"].as_str() {
            None => "-".to_owned(),
            Some(state) => match s["inventory"]["last_sync"].as_str() {
                Some(_) => format!("{state}, synced {} ago", since(&s["inventory"]["last_sync"], now)),
                None => state.to_owned(),
            },
        };
        let heartbeat = s["heartbeat_rtt_ms"].as_f64().map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"));
        let last_error = s["last_error"].as_str().unwrap_or("-").to_owned();
        rows.push(vec![
            s["name"].as_str().unwrap_or("?").to_owned(),
            s["state"].as_str().unwrap_or("?").to_owned(),
            since(&s["since"], now),
            format!("{}/{}/{}", channels.len(), busy, num(&s["channels_max"])),
            num(&s["clients_waiting"]),
            num(&s["queries"]),
            num(&s["errors"]),
            heartbeat,
            cache,
            inventory,
            last_error,
        ]);
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let last = cells.len() - 1;
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                let _ = write!(out, "{c}");
            } else {
                let _ = write!(out, "{c:<w$}  ");
            }
        }
        out.push('\n');
    };
    line(&mut out, &header.map(str::to_owned));
    for r in &rows {
        line(&mut out, r);
    }
    let ready = rows.iter().filter(|r| r[1] == "ready").count();
    let _ = writeln!(
        out,
        "\n{ready} of {} sites ready; pid {}; state written {} ago. CHANNELS: open/busy/max.",
        rows.len(),
        num(&v["pid"]),
        since(&v["written_at"], now)
    );
    let r = &v["reloads"];
    if let Some(last) = r["last"].as_object() {
        let _ = writeln!(
            out,
            "Reloads: {} applied, {} failed; last {} ago: {}",
            num(&r["ok"]),
            num(&r["failed"]),
            since(&last["at"], now),
            last["message"].as_str().unwrap_or("-").lines().next().unwrap_or("-")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(written: &str, sites: Value) -> Value {
        serde_json::json!({
            "version": 1, "pid": 42, "written_at": written, "state_interval_ms": 1000,
            "reloads": { "ok": 1, "failed": 1, "last": { "at": written, "ok": false,
                         "message": "cfg: line 3: site[1].channels: 0 is out of range 1..=50" } },
            "sites": sites,
        })
    }

    #[test]
    fn a_table_with_one_row_per_site_and_the_verdict() {
        let now = humantime::parse_rfc3339("2026-12-01T10:00:00Z").unwrap();
        let v = state(
            "2026-12-01T09:59:59.500Z",
            serde_json::json!([
                { "name": "berlin", "state": "ready", "since": "2026-12-01T08:00:00Z",
                  "channels": [{"state": "idle"}, {"state": "busy"}], "channels_max": 10,
                  "clients_waiting": 0, "queries": 1200, "errors": 3, "heartbeat_rtt_ms": 0.42,
                  "cache": {"hits": 3, "misses": 1},
                  "inventory": {"state": "idle", "last_sync": "2026-12-01T09:59:00Z"} },
                { "name": "paris", "state": "down", "since": "2026-12-01T09:58:30Z", "channels": [],
                  "channels_max": 10, "last_error": "connection refused" }
            ]),
        );
        let text = render(&v, now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SITE    STATE  FOR     CHANNELS  WAITING  QUERIES"), "{text}");
        assert!(lines[1].starts_with("berlin  ready  2h 0m   2/1/10    0        1200     3       0.4 ms"), "{text}");
        assert!(lines[1].contains("75%") && lines[1].contains("idle, synced 1m 0s ago"), "{text}");
        assert!(lines[2].starts_with("paris   down   1m 30s  0/0/10    -") && lines[2].ends_with("connection refused"));
        assert!(text.contains("1 of 2 sites ready; pid 42; state written 0s ago"), "{text}");
        assert!(text.contains("Reloads: 1 applied, 1 failed; last 0s ago: cfg: line 3"), "{text}");
        assert_eq!(verdict(&v), Verdict::NotAllReady);
        assert_eq!(verdict(&state("x", serde_json::json!([{ "state": "ready" }]))), Verdict::AllReady);
    }

    #[test]
    fn a_stale_or_missing_file_means_no_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let now = humantime::parse_rfc3339("2026-12-01T10:00:00Z").unwrap();
        assert!(read(&path, now).unwrap_err().contains("cannot read state file"));
        std::fs::write(&path, state("2026-12-01T09:59:56Z", serde_json::json!([])).to_string()).unwrap();
        let e = read(&path, now).unwrap_err();
        assert!(e.contains("is stale: written 4s ago, rewritten every 1s"), "{e}");
        std::fs::write(&path, state("2026-12-01T09:59:58Z", serde_json::json!([])).to_string()).unwrap();
        assert!(read(&path, now).is_ok());
        std::fs::write(&path, "{").unwrap();
        assert!(read(&path, now).unwrap_err().contains("not valid JSON"));
    }
}
