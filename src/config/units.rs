//! Sizes and durations as written in the configuration.
//!
//! Durations are humantime strings: `"250ms"`, `"5s"`, `"2m"`, `"1h 30m"`.
//!
//! Sizes are a number of bytes (`4096`) or a number with a unit, and the
//! unit says which powers it means, so nobody has to guess: `KiB`, `MiB`,
//! `GiB`, `TiB` are powers of 1024, `KB`, `MB`, `GB`, `TB` powers of 1000
//! (case does not matter, a space may separate number and unit). A bare
//! `k`, `m`, `g` or `t` is refused: it is exactly the ambiguity the rule
//! removes.

use std::time::Duration;

/// A moment as RFC 3339 with milliseconds (UTC), as the state file, the
/// metrics and the logs write it.
pub fn timestamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parse a size such as `"512KiB"`, `"64 MiB"`, `"1GB"` or `"4096"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{text}' is not a size; write e.g. \"64MiB\" or 4096"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        u @ ("k" | "m" | "g" | "t") => {
            let up = u.to_ascii_uppercase();
            return Err(format!(
                "'{text}': '{u}' could mean either; write {n}{up}iB (powers of 1024) or {n}{up}B (powers of 1000)"
            ));
        }
        u => return Err(format!("'{text}': unknown unit '{u}' (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{text}' is too large"))
}

/// Parse a duration such as `"5s"` or `"250ms"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("'{text}' is not a duration ({e}); write e.g. \"5s\" or \"250ms\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_say_which_powers_they_mean() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64 mib"), Ok(64 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("2kb"), Ok(2_000));
        assert_eq!(parse_size("2KiB"), Ok(2_048));
        assert_eq!(
            parse_size("1m"),
            Err("'1m': 'm' could mean either; write 1MiB (powers of 1024) or 1MB (powers of 1000)".into())
        );
        assert!(parse_size("12 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("lots").unwrap_err().contains("is not a size"));
        assert!(parse_size("99999999TiB").unwrap_err().contains("too large"));
    }

    #[test]
    fn durations_are_humantime() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").unwrap_err().starts_with("'soon' is not a duration"));
    }
}
