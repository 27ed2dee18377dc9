//! The configuration reference: every key's type, default, range and what
//! a reload does with it, as data.
//!
//! docs/CONFIGURATION.md's key tables are generated from [`KEYS`]
//! ([`markdown`]), and the tests below hold the data to the code: the keys
//! are the ones the parser accepts, each default written here is the one a
//! missing key gets, each range's ends are accepted and the values just
//! outside refused, and a key said to need a restart (or new channels) is
//! the one the reload reports so.

/// A table of the file, as the reference's sections name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Before any `[table]`.
    Top,
    /// `[defaults]` or a `[[site]]` (see [`KeyDoc::site_only`]).
    Site,
    /// A `[[federation]]`.
    Federation,
    /// `[inventory]`.
    Inventory,
    /// A TCP listener's `tls = { ... }`.
    ListenerTls,
}

impl Table {
    /// Every table, in the reference's order.
    pub const ALL: [Table; 5] = [Table::Top, Table::Site, Table::Federation, Table::Inventory, Table::ListenerTls];

    /// The section heading for its keys.
    pub fn heading(self) -> &'static str {
        match self {
            Table::Top => "At the top of the file",
            Table::Site => "`[defaults]` and `[[site]]`",
            Table::Federation => "`[[federation]]`",
            Table::Inventory => "`[inventory]`",
            Table::ListenerTls => "A listener's `tls = { ... }`",
        }
    }
}

/// What a changed value does on a reload (`SIGHUP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Applies at once.
    Now,
    /// Applies to connections made from then on (clients or channels).
    NewConnections,
    /// The site's channels are replaced: queries in flight finish on the
    /// old ones, new queries use new ones; its cached answers go.
    NewChannels,
    /// The TCP listener is bound anew.
    Rebind,
    /// A new name is a removed table and an added one.
    Identity,
    /// Only a restart applies it (the reload's log line names it).
    Restart,
}

impl Reload {
    fn words(self) -> &'static str {
        match self {
            Reload::Now => "at once",
            Reload::NewConnections => "new connections",
            Reload::NewChannels => "new channels",
            Reload::Rebind => "rebinds",
            Reload::Identity => "remove + add",
            Reload::Restart => "restart",
        }
    }
}

/// One key of the file.
#[derive(Debug, Clone, Copy)]
pub struct KeyDoc {
    /// Where it is written.
    pub table: Table,
    /// Its name.
    pub key: &'static str,
    /// Only in a `[[site]]`, not in `[defaults]`.
    pub site_only: bool,
    /// What is written: `duration`, `size`, `integer`, `boolean`, `string`,
    /// `path`, `address`, `list`, `table`, `mode` (a socket's permissions), `group`.
    pub kind: &'static str,
    /// The value a missing key gets, as TOML (`"5s"`, `5`, `true`); `None`
    /// when it has none (see [`KeyDoc::absent`]).
    pub default: Option<&'static str>,
    /// Without a default: what a missing key means (`required`, `off`).
    pub absent: &'static str,
    /// The accepted range's ends, as TOML; `None` when any value of its
    /// kind is accepted.
    pub range: Option<(&'static str, &'static str)>,
    /// Keys (`key = value`, same table) the range's ends need beside them.
    pub range_with: &'static str,
    /// What a reload does with a new value.
    pub reload: Reload,
    /// What it means, in one line.
    pub what: &'static str,
}

const fn key(table: Table, key: &'static str, kind: &'static str, reload: Reload, what: &'static str) -> KeyDoc {
    KeyDoc { table, key, site_only: false, kind, default: None, absent: "", range: None, range_with: "", reload, what }
}

impl KeyDoc {
    const fn default(self, v: &'static str) -> Self {
        KeyDoc { default: Some(v), ..self }
    }
    const fn absent(self, meaning: &'static str) -> Self {
        KeyDoc { absent: meaning, ..self }
    }
    const fn range(self, lo: &'static str, hi: &'static str) -> Self {
        KeyDoc { range: Some((lo, hi)), ..self }
    }
    const fn range_with(self, with: &'static str) -> Self {
        KeyDoc { range_with: with, ..self }
    }
    const fn site_only(self) -> Self {
        KeyDoc { site_only: true, ..self }
    }
    /// A duration of the usual range, 1 ms to 7 days.
    const fn duration(
        table: Table,
        k: &'static str,
        default: &'static str,
        reload: Reload,
        what: &'static str,
    ) -> Self {
        key(table, k, "duration", reload, what).default(default).range("\"1ms\"", "\"7d\"")
    }
}

use Reload::*;
use Table::*;

/// Every key of the file.
pub const KEYS: &[KeyDoc] = &[
    // At the top.
    key(Top, "socket_dir", "path", Restart, "directory of the per-site sockets: `<socket_dir>/<site name>`")
        .default("\"/run/livemux\""),
    key(Top, "pid_file", "path", Restart, "written once the sockets are bound, removed at exit").absent("none"),
    key(Top, "metrics_listen", "address", Restart, "Prometheus metrics on `http://<this>/metrics`").absent("off"),
    key(Top, "state_file", "path", Restart, "the JSON state file (sites, channels, counters)")
        .default("\"/var/lib/livemux/state.json\""),
    KeyDoc::duration(Top, "state_interval", "\"5s\"", Restart, "how often the state file is rewritten"),
    KeyDoc::duration(Top, "shutdown_grace", "\"10s\"", Now, "how long shutdown waits for answers in progress"),
    key(Top, "worker_threads", "integer", Restart, "runtime threads; raise only when one core is saturated")
        .default("1")
        .range("1", "256"),
    key(Top, "spool_dir", "path", Restart, "files for answers held for slow clients (created 0700)")
        .default("\"/var/lib/livemux/spool\""),
    key(Top, "spool_memory_per_response", "size", Restart, "memory one held answer may use before it spills to a file")
        .default("\"2MiB\"")
        .range("0", "\"1TiB\""),
    key(Top, "spool_memory_budget", "size", Restart, "memory all held answers together may use")
        .default("\"32MiB\"")
        .range("0", "\"1TiB\""),
    key(Top, "spool_disk_budget", "size", Restart, "disk all spool files together may use; 0: no files")
        .default("\"4GiB\"")
        .range("0", "\"1024TiB\""),
    key(
        Top,
        "request_memory_budget",
        "size",
        Now,
        "memory all clients' partly received requests may use (at least 3 × the largest `max_request_bytes`)",
    )
    .default("\"64MiB\"")
    .range("\"1MiB\"", "\"1TiB\"")
    .range_with("[defaults]\nmax_request_bytes = \"1KiB\""),
    KeyDoc::duration(
        Top,
        "request_memory_wait",
        "\"1s\"",
        Now,
        "how long a request waits for room in that budget (then 503)",
    ),
    key(Top, "cache_budget", "size", Restart, "memory for cached answers, all sites (least recently used out first)")
        .default("\"64MiB\"")
        .range("0", "\"1TiB\""),
    key(Top, "cache_max_entry", "size", Restart, "larger answers are not cached")
        .default("\"1MiB\"")
        .range("0", "\"16GiB\""),
    key(
        Top,
        "federation_sort_budget",
        "size",
        Restart,
        "memory a federated `Sort` without `Limit` may use for its rows",
    )
    .default("\"64MiB\"")
    .range("0", "\"1TiB\""),
    key(Top, "defaults", "table", Now, "per-site keys every `[[site]]` starts from").absent("built-in defaults"),
    key(Top, "site", "table", Now, "one per remote site (`[[site]]`)").absent("none: nothing to serve"),
    key(Top, "federation", "table", Now, "one per federated socket (`[[federation]]`)").absent("none"),
    key(Top, "inventory", "table", Restart, "HW/SW inventory sync (`[inventory]`)").absent("off"),
    // [defaults] and [[site]].
    key(Site, "name", "string", Identity, "the site's name and socket file: letters, digits, `_` `.` `-`, at most 64")
        .absent("required")
        .site_only(),
    key(Site, "address", "address", NewChannels, "`tcp://host:port`, `tls://host:port` or `unix:///path`")
        .absent("required")
        .site_only(),
    key(Site, "channels", "integer", Now, "persistent connections kept open while idle").default("5").range("1", "50"),
    key(
        Site,
        "channels_max",
        "integer",
        Now,
        "most channels open while queries wait (at least `channels`; default 10 or `channels` if larger)",
    )
    .default("10")
    .range("1", "200")
    .range_with("channels = 1"),
    KeyDoc::duration(
        Site,
        "channel_idle_timeout",
        "\"60s\"",
        Now,
        "a channel above `channels` idle this long is closed",
    ),
    key(
        Site,
        "pipeline_depth",
        "integer",
        Now,
        "queries in flight per channel once `channels_max` are busy (1: never pipeline)",
    )
    .default("8")
    .range("1", "64"),
    KeyDoc::duration(Site, "heartbeat_interval", "\"5s\"", Now, "how often an idle site is asked whether it is alive")
        .range_with("heartbeat_timeout = \"1ms\""),
    KeyDoc::duration(
        Site,
        "heartbeat_timeout",
        "\"2s\"",
        Now,
        "a heartbeat unanswered this long marks the site dead (at most `heartbeat_interval`)",
    )
    .range_with("heartbeat_interval = \"7d\""),
    KeyDoc::duration(Site, "channel_timeout", "\"3s\"", Now, "how long a query waits for a free channel"),
    KeyDoc::duration(Site, "query_timeout", "\"120s\"", Now, "deadline for answering a query, from its arrival"),
    KeyDoc::duration(Site, "connect_retry", "\"4s\"", Now, "cooling period after a failed connect or heartbeat"),
    KeyDoc::duration(
        Site,
        "channel_retry",
        "\"60s\"",
        Now,
        "when the site serves fewer channels, how often one more is tried",
    ),
    KeyDoc::duration(Site, "connect_timeout", "\"5s\"", Now, "limit for establishing one connection"),
    KeyDoc::duration(Site, "client_idle_timeout", "\"1h\"", Now, "a client connection idle this long is closed"),
    KeyDoc::duration(
        Site,
        "client_request_timeout",
        "\"10s\"",
        Now,
        "once a request has begun, all of it must arrive within this",
    ),
    key(Site, "max_clients", "integer", NewConnections, "client connections per site socket")
        .default("1000")
        .range("1", "1000000"),
    key(Site, "max_request_bytes", "size", Now, "largest request a client may send")
        .default("\"4MiB\"")
        .range("\"1KiB\"", "\"1GiB\""),
    key(Site, "max_header_lines", "integer", Now, "most header lines in one request")
        .default("50000")
        .range("1", "10000000"),
    key(Site, "max_line_bytes", "size", Now, "longest request line").default("\"1MiB\"").range("64", "\"1GiB\""),
    key(
        Site,
        "keepalive_idle",
        "duration",
        NewConnections,
        "TCP keepalive (site connections, TCP clients): first probe after idle",
    )
    .default("\"10s\"")
    .range("\"1s\"", "\"32767s\""),
    key(Site, "keepalive_interval", "duration", NewConnections, "then a probe every interval")
        .default("\"5s\"")
        .range("\"1s\"", "\"32767s\""),
    key(Site, "keepalive_count", "integer", NewConnections, "the peer is gone after this many unanswered probes")
        .default("3")
        .range("1", "100"),
    KeyDoc::duration(
        Site,
        "tcp_user_timeout",
        "\"20s\"",
        NewConnections,
        "site connections: unacknowledged data this long ends them",
    ),
    KeyDoc::duration(
        Site,
        "response_idle_timeout",
        "\"30s\"",
        Now,
        "mid-answer, a site silent this long (while livemux reads) fails the query",
    ),
    KeyDoc::duration(
        Site,
        "send_stall_grace",
        "\"30s\"",
        Now,
        "a TCP client whose kernel acknowledges nothing this long is dropped",
    ),
    key(Site, "listen", "address", Rebind, "a cascading TCP listener for this site (`address:port`)")
        .absent("none")
        .site_only(),
    key(Site, "only_from", "list", Now, "addresses or networks allowed on `listen`; required unless it is loopback")
        .absent("any (loopback listen only)")
        .site_only(),
    key(
        Site,
        "tls",
        "table",
        NewConnections,
        "TLS on `listen`: `{ cert_file, key_file }`, optionally `tls_client_ca`, `tls_client_names`",
    )
    .absent("plain TCP")
    .site_only(),
    key(Site, "ca_file", "path", NewChannels, "`tls://` sites: PEM bundle of trusted CAs (required while `verify`)")
        .absent("none"),
    key(Site, "verify", "boolean", NewChannels, "false: encrypt without verifying the site").default("true"),
    key(Site, "server_name", "string", NewChannels, "require this name in the site's certificate (and send it as SNI)")
        .absent("the address's host"),
    key(Site, "client_cert_file", "path", NewChannels, "client certificate toward the site (with `client_key_file`)")
        .absent("none"),
    key(Site, "client_key_file", "path", NewChannels, "its private key").absent("none"),
    KeyDoc::duration(Site, "tls_handshake_timeout", "\"5s\"", NewChannels, "the TLS handshake, after the TCP connect"),
    key(Site, "cache", "boolean", Now, "answer `Cache: reload` queries from memory").default("true"),
    key(Site, "cache_max_age", "duration", Now, "cached answers older than this are asked again")
        .absent("no limit")
        .range("\"1ms\"", "\"7d\""),
    key(Site, "coalesce", "boolean", Now, "identical uncached GETs in flight at once share one answer")
        .default("false"),
    key(Site, "inventory", "boolean", Now, "sync this site's HW/SW inventory (when `[inventory]` is set)")
        .default("true"),
    key(
        Site,
        "commands",
        "string",
        Now,
        "`\"allow\"` or `\"deny\"`: whether clients of the site's socket may send `COMMAND`s",
    )
    .default("\"allow\""),
    key(Site, "listen_commands", "string", Now, "likewise on its TCP listener").absent("as `commands`"),
    key(
        Site,
        "commands_from_uids",
        "list",
        Now,
        "users (names or uids): only they (and `commands_from_groups`) may send commands, on the UNIX socket only",
    )
    .absent("anyone"),
    key(
        Site,
        "commands_from_groups",
        "list",
        Now,
        "groups (names or gids) whose members may send commands, on the UNIX socket only",
    )
    .absent("anyone"),
    key(
        Site,
        "audit_command_arguments",
        "boolean",
        Now,
        "the command audit logs each command's arguments (else its name only)",
    )
    .default("true"),
    key(
        Site,
        "slow_query_threshold",
        "duration",
        Now,
        "queries answered slower than this are logged (site, time, bytes, client, request)",
    )
    .absent("off")
    .range("\"1ms\"", "\"7d\""),
    key(
        Site,
        "fair_share",
        "boolean",
        Now,
        "queries waiting for a channel are served by client in turn (false: in arrival order)",
    )
    .default("true"),
    key(
        Site,
        "slow_query_log_values",
        "boolean",
        Now,
        "the slow-query log shows header values (`AuthUser`, filters); else names only",
    )
    .default("false"),
    key(
        Site,
        "socket_mode",
        "mode",
        Now,
        "the site socket's permissions: `\"0660\"` (octal digits, as chmod takes them) or `0o660`; \
         a reload changes the socket file in place",
    )
    .default("\"0660\"")
    .range("\"0000\"", "\"0777\"")
    .range_with("allow_world_writable = true"),
    key(
        Site,
        "socket_group",
        "group",
        Now,
        "the site socket's group: a name (looked up at start and by check-config) or a numeric id; \
         a reload changes the socket file in place",
    )
    .absent("livemux's own group"),
    key(
        Site,
        "allow_world_writable",
        "boolean",
        Now,
        "permit a `socket_mode` that lets every local user connect (o+w)",
    )
    .default("false"),
    // [[federation]].
    key(Federation, "name", "string", Identity, "the federated socket's name (`<socket_dir>/<name>`)")
        .absent("required"),
    key(Federation, "sites", "list", Now, "the sites it answers for").absent("every site"),
    key(
        Federation,
        "on_site_error",
        "string",
        Now,
        "`\"partial\"`: rows of the sites that answered; `\"fail\"`: any failed site fails the query",
    )
    .default("\"partial\""),
    key(Federation, "dialect", "string", Now, "`\"lmd\"` (for Thruk): a column a site lacks answers `\"\"` from it")
        .default("\"livestatus\""),
    key(Federation, "commands", "string", Now, "`\"allow\"` or `\"deny\"` `COMMAND`s on the federated socket")
        .absent("as `[defaults]`"),
    key(Federation, "listen_commands", "string", Now, "likewise on its TCP listener").absent("as `commands`"),
    key(Federation, "commands_from_uids", "list", Now, "as for a site").absent("as `[defaults]`"),
    key(Federation, "commands_from_groups", "list", Now, "as for a site").absent("as `[defaults]`"),
    key(Federation, "listen", "address", Rebind, "a TCP listener for the federation").absent("none"),
    key(Federation, "only_from", "list", Now, "addresses or networks allowed on `listen`")
        .absent("any (loopback listen only)"),
    key(
        Federation,
        "tls",
        "table",
        NewConnections,
        "TLS on `listen`: `{ cert_file, key_file }`, optionally `tls_client_ca`, `tls_client_names`",
    )
    .absent("plain TCP"),
    key(
        Federation,
        "socket_mode",
        "mode",
        Now,
        "the federated socket's permissions (as a site's; `[defaults]`' unless set here); a reload changes the \
         socket file in place",
    )
    .default("\"0660\"")
    .range("\"0000\"", "\"0777\"")
    .range_with("allow_world_writable = true"),
    key(
        Federation,
        "socket_group",
        "group",
        Now,
        "the federated socket's group (as a site's); a reload changes the socket file in place",
    )
    .absent("`[defaults]`' (else livemux's own group)"),
    key(Federation, "allow_world_writable", "boolean", Now, "permit a `socket_mode` with o+w").default("false"),
    // [inventory].
    key(Inventory, "dir", "path", Restart, "the central site's inventory directory").absent("required"),
    key(Inventory, "interval", "duration", Restart, "how often each site is asked whether anything changed")
        .default("\"60s\"")
        .range("\"1s\"", "\"7d\"")
        .range_with("full_interval = \"7d\""),
    key(
        Inventory,
        "full_interval",
        "duration",
        Restart,
        "every host is listed this often, whatever the site says (at least `interval`)",
    )
    .default("\"10m\"")
    .range("\"1s\"", "\"7d\"")
    .range_with("interval = \"1s\""),
    key(Inventory, "max_file_bytes", "size", Restart, "a host's file larger than this is skipped")
        .default("\"256MiB\"")
        .range("\"1KiB\"", "\"1TiB\""),
    // tls = { ... }.
    key(ListenerTls, "cert_file", "path", NewConnections, "the listener's certificate chain (PEM)").absent("required"),
    key(ListenerTls, "key_file", "path", NewConnections, "its private key (PEM)").absent("required"),
    key(
        ListenerTls,
        "tls_client_ca",
        "path",
        NewConnections,
        "mutual TLS: clients must present a certificate signed by a CA of this PEM bundle",
    )
    .absent("no client certificate asked for"),
    key(
        ListenerTls,
        "tls_client_names",
        "list",
        NewConnections,
        "with `tls_client_ca`: the client certificate's CN or a DNS name must be one of these",
    )
    .absent("any certificate the CA signed"),
];

/// The keys of `table`, in the reference's order.
pub fn keys_of(table: Table) -> impl Iterator<Item = &'static KeyDoc> {
    KEYS.iter().filter(move |k| k.table == table)
}

/// The key tables of docs/CONFIGURATION.md.
pub fn markdown() -> String {
    let mut out = String::new();
    for table in Table::ALL {
        out.push_str(&format!("\n#### {}\n\n", table.heading()));
        out.push_str("| key | type | default | range | reload | meaning |\n|---|---|---|---|---|---|\n");
        for k in keys_of(table) {
            let default = match k.default {
                Some(v) => format!("`{v}`"),
                None => k.absent.to_owned(),
            };
            let range = k.range.map(|(lo, hi)| format!("`{lo}`..=`{hi}`")).unwrap_or_default();
            let name = if k.site_only { format!("`{}` (site only)", k.key) } else { format!("`{}`", k.key) };
            out.push_str(&format!(
                "| {name} | {} | {default} | {range} | {} | {} |\n",
                k.kind,
                k.reload.words(),
                k.what
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A configuration with `extra` written into `table` (one site, one
    /// federation, an inventory directory), validated.
    fn config_with(table: Table, extra: &str) -> Result<Config, String> {
        let (top, site, fed, inv) = match table {
            Top => (extra, "", "", ""),
            // Room for the largest request a site's range allows.
            Site => ("request_memory_budget = \"4GiB\"", extra, "", ""),
            Federation => ("", "", extra, ""),
            Inventory => ("", "", "", extra),
            ListenerTls => unreachable!("listener tls keys have no default or range"),
        };
        let address = if site.starts_with("address =") { "" } else { "address = \"tcp://127.0.0.1:1\"" };
        let text = format!(
            "{top}\n[inventory]\ndir = \"/inv\"\n{inv}\n[[site]]\nname = \"s\"\n{address}\n\
             {site}\n[[federation]]\nname = \"all\"\n{fed}\n"
        );
        Config::from_toml(&text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_reference_names_every_key_the_parser_accepts_and_no_other() {
        let known = crate::config::known_keys();
        assert_eq!(known.len(), Table::ALL.len());
        for ((said, accepted), table) in known.iter().zip(Table::ALL) {
            let mut ours: Vec<&str> = keys_of(table).map(|k| k.key).collect();
            let mut theirs = accepted.to_vec();
            ours.sort_unstable();
            theirs.sort_unstable();
            assert_eq!(ours, theirs, "keys {said}");
        }
    }

    #[test]
    fn each_default_written_is_the_one_a_missing_key_gets() {
        for table in [Top, Site, Federation, Inventory] {
            let bare = config_with(table, "").expect("the bare configuration is valid");
            for k in keys_of(table) {
                let Some(v) = k.default else { continue };
                let set = config_with(table, &format!("{} = {v}", k.key));
                assert_eq!(set.as_ref(), Ok(&bare), "{} = {v} differs from leaving it out", k.key);
            }
        }
    }

    /// Just outside `v` (TOML) of `kind`, downwards or upwards.
    fn beside(kind: &str, v: &str, up: bool) -> Option<String> {
        let step = |n: u64| if up { n.checked_add(1) } else { n.checked_sub(1) };
        match kind {
            "integer" => step(v.parse().ok()?).map(|n| n.to_string()),
            "size" => {
                let n = match v.strip_prefix('"') {
                    Some(t) => crate::config::units::parse_size(t.trim_end_matches('"')).ok()?,
                    None => v.parse().ok()?,
                };
                step(n).map(|n| n.to_string())
            }
            "duration" => {
                let d = crate::config::units::parse_duration(v.trim_matches('"')).ok()?;
                step(d.as_millis() as u64).map(|ms| format!("\"{ms}ms\""))
            }
            _ => None,
        }
    }

    #[test]
    fn each_range_written_is_the_one_the_validator_keeps() {
        for table in [Top, Site, Federation, Inventory] {
            for k in keys_of(table) {
                let Some((lo, hi)) = k.range else { continue };
                for (end, up) in [(lo, false), (hi, true)] {
                    let at = format!("{} = {end}\n{}", k.key, k.range_with);
                    assert!(config_with(table, &at).is_ok(), "{at}: {:?}", config_with(table, &at));
                    if let Some(out) = beside(k.kind, end, up) {
                        let out = format!("{} = {out}\n{}", k.key, k.range_with);
                        assert!(config_with(table, &out).is_err(), "{out} is accepted, outside {lo}..={hi}");
                    }
                }
            }
        }
    }

    #[test]
    fn keys_said_to_need_a_restart_are_the_ones_a_reload_names() {
        let bare = config_with(Top, "").expect("valid");
        for k in keys_of(Top).filter(|k| k.kind != "table") {
            let value = match (k.key, k.range.map(|(_, hi)| hi)) {
                (_, Some(v)) => v.to_owned(),
                ("metrics_listen", _) => "\"127.0.0.1:1\"".to_owned(),
                (_, None) => "\"/elsewhere\"".to_owned(),
            };
            let changed = config_with(Top, &format!("{} = {value}", k.key)).expect("valid");
            assert_ne!(changed, bare, "{} = {value} changes nothing", k.key);
            let named = crate::config::restart_keys(&bare, &changed);
            assert_eq!(!named.is_empty(), k.reload == Restart, "{}: reload names {named:?}", k.key);
        }
    }

    #[test]
    fn keys_said_to_replace_channels_are_the_ones_that_do() {
        let bare = config_with(Site, "").expect("valid");
        for k in keys_of(Site).filter(|k| !matches!(k.kind, "table" | "list") && k.key != "name") {
            let value = match (k.kind, k.range) {
                ("boolean", _) => format!("{}", k.default != Some("true")),
                (_, Some((lo, _))) if Some(lo) != k.default => lo.to_owned(),
                (_, Some((_, hi))) => hi.to_owned(),
                ("address", _) if k.key == "listen" => "\"127.0.0.1:0\"".to_owned(),
                _ if k.key.ends_with("commands") => "\"deny\"".to_owned(),
                ("address", _) => "\"tcp://127.0.0.1:2\"".to_owned(),
                ("group", _) => "0".to_owned(),
                _ => "\"/elsewhere\"".to_owned(),
            };
            let with = match k.key {
                "client_cert_file" => "client_key_file = \"/k\"",
                "client_key_file" => "client_cert_file = \"/c\"",
                _ => k.range_with,
            };
            let changed = config_with(Site, &format!("{} = {value}\n{with}", k.key))
                .unwrap_or_else(|e| panic!("{} = {value}: {e}", k.key));
            let (old, new) = (&bare.sites[0], &changed.sites[0]);
            assert_ne!(old, new, "{} = {value} changes nothing", k.key);
            assert_eq!(crate::config::replaces_channels(old, new), k.reload == NewChannels, "{}", k.key);
        }
    }
}
