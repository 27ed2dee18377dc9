//! Configuration: TOML text → raw values (serde, spans kept) → [`Config`]
//! (typed, validated, no `Option` where a default exists).
//!
//! - `raw`: the file as written (every value with its place in the file).
//! - `validate`: raw to typed; every problem collected with key and line.
//! - `units`: sizes and durations as written.
//! - this file: the typed configuration and its defaults.
//!
//! Precedence: a key inside a `[[site]]` table overrides the same key in
//! `[defaults]`, which overrides the built-in default. Unknown keys, values
//! of the wrong type, bad durations and sizes, duplicate site names and
//! out-of-range values are rejected, all of them in one report (a file that
//! is not valid TOML is reported with all its syntax errors instead);
//! nothing is bound or connected before the whole file has been validated.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use livemux_protocol::Limits;

pub use units::{parse_duration, parse_size};

mod raw;
pub(crate) mod units;
mod validate;

/// `channels_max` unless set (or `channels`, when that is larger): half of
/// the 20 connections a Checkmk site's Livestatus serves by default, so the
/// site's other clients keep room.
pub const DEFAULT_CHANNELS_MAX: usize = 10;

/// `pipeline_depth` unless set; see docs/BENCHMARKS.md (scenario 3).
pub const DEFAULT_PIPELINE_DEPTH: usize = 8;

/// Longest UNIX socket path the kernel accepts (`sun_path` is 108 bytes).
const MAX_SOCKET_PATH: usize = 107;

/// Every problem found in a configuration file, in line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// One problem in a configuration, with the key and line it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The key (e.g. `site[2].channels`), when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Where a site's Livestatus is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteAddress {
    /// `tcp://host:port`; the host may be a name, resolved at each connect.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:///path/to/socket`.
    Unix(PathBuf),
    /// `tls://host:port`: TCP with TLS.
    Tls {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
}

impl SiteAddress {
    /// Host and port of a TCP or TLS address.
    pub fn host_port(&self) -> Option<(&str, u16)> {
        match self {
            SiteAddress::Tcp { host, port } | SiteAddress::Tls { host, port } => Some((host, *port)),
            SiteAddress::Unix(_) => None,
        }
    }
}

impl fmt::Display for SiteAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SiteAddress::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            SiteAddress::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            SiteAddress::Unix(p) => write!(f, "unix://{}", p.display()),
            SiteAddress::Tls { host, port } if host.contains(':') => write!(f, "tls://[{host}]:{port}"),
            SiteAddress::Tls { host, port } => write!(f, "tls://{host}:{port}"),
        }
    }
}

impl std::str::FromStr for SiteAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("'{s}': the path after unix:// must be absolute"));
            }
            return Ok(SiteAddress::Unix(PathBuf::from(path)));
        }
        let (hostport, tls) = match (s.strip_prefix("tcp://"), s.strip_prefix("tls://")) {
            (Some(h), _) => (h, false),
            (None, Some(h)) => (h, true),
            (None, None) => return Err(format!("'{s}' must start with tcp://, tls:// or unix://")),
        };
        let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
            let (h, p) = rest.split_once("]:").ok_or_else(|| format!("'{s}': expected tcp://[v6addr]:port"))?;
            (h, p)
        } else {
            hostport.rsplit_once(':').ok_or_else(|| format!("'{s}': missing :port"))?
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("'{s}': missing or invalid host"));
        }
        let port: u16 = port.parse().map_err(|_| format!("'{s}': invalid port '{port}'"))?;
        if port == 0 {
            return Err(format!("'{s}': port 0 is not a valid site port"));
        }
        let host = host.to_owned();
        Ok(if tls { SiteAddress::Tls { host, port } } else { SiteAddress::Tcp { host, port } })
    }
}

/// TCP keepalive: after `idle` without traffic, probe every `interval`;
/// give up after `count` unanswered probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub count: u32,
}

/// A site's cascading TCP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpListen {
    /// Address to bind (port 0 picks a free port).
    pub addr: std::net::SocketAddr,
    /// Sources allowed to connect (exact addresses or networks); empty
    /// means any (only allowed for a loopback address).
    pub only_from: Vec<ipnet::IpNet>,
    /// With TLS, only TLS clients are served.
    pub tls: Option<ListenerTls>,
}

/// Certificate and key of a TLS listener (PEM), and what it asks of its
/// clients' certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// Certificate chain.
    pub cert_file: PathBuf,
    /// Private key.
    pub key_file: PathBuf,
    /// `tls_client_ca`: a client must present a certificate that chains to
    /// a CA of this PEM bundle (mutual TLS); none: no certificate is asked for.
    pub client_ca: Option<PathBuf>,
    /// `tls_client_names`: with `client_ca`, the certificate's subject CN or
    /// one of its DNS names must be one of these (ASCII case ignored);
    /// empty: any certificate the CA signed.
    pub client_names: Vec<String>,
}

impl ListenerTls {
    /// A listener's certificate and key, no client certificates asked for.
    pub fn new(cert_file: PathBuf, key_file: PathBuf) -> Self {
        ListenerTls { cert_file, key_file, client_ca: None, client_names: Vec::new() }
    }
}

/// Mode and group of a UNIX socket livemux binds (a site's, a federation's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwnership {
    /// `socket_mode`: permission bits, at most 0o777.
    pub mode: u32,
    /// `socket_group`: the group id the socket file is given; none: the
    /// group it gets when it is made (livemux's own).
    pub group: Option<u32>,
    /// `allow_world_writable`: a mode that lets every local user connect
    /// (o+w) is meant.
    pub allow_world_writable: bool,
}

/// `socket_mode` unless set: owner and group may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;

impl Default for SocketOwnership {
    fn default() -> Self {
        SocketOwnership { mode: DEFAULT_SOCKET_MODE, group: None, allow_world_writable: false }
    }
}

/// TLS toward a `tls://` site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM bundle of trusted CAs (required when `verify`).
    pub ca_file: Option<PathBuf>,
    /// Verify the site's certificate chain.
    pub verify: bool,
    /// When set: the name sent in SNI and required in the certificate.
    pub server_name: Option<String>,
    /// Client certificate and key (PEM), if the site asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Limit for the TLS handshake, after the TCP connect.
    pub handshake_timeout: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            ca_file: None,
            verify: true,
            server_name: None,
            client_cert: None,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

impl TcpListen {
    /// Whether a client at `ip` may connect.
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.only_from.is_empty() || self.only_from.iter().any(|n| n.contains(&ip))
    }
}

/// Settings of one site, every default applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteParams {
    /// Persistent connections kept open to the site while idle (1..=50).
    pub channels: usize,
    /// Persistent connections open at most: more than `channels` are opened
    /// while queries wait and no channel is idle (`channels..=200`).
    pub channels_max: usize,
    /// A channel above `channels` that is idle this long is closed.
    pub channel_idle_timeout: Duration,
    /// Queries in flight on one channel at most (1 = no pipelining): a `GET`
    /// that finds every channel busy while the pool is at `channels_max`
    /// is written behind the fewest queries on a busy channel.
    pub pipeline_depth: usize,
    /// Time between two heartbeats.
    pub heartbeat_interval: Duration,
    /// A heartbeat must be answered within this time.
    pub heartbeat_timeout: Duration,
    /// How long a query may wait for a free channel.
    pub channel_timeout: Duration,
    /// Deadline for answering a query, from the moment it was received.
    pub query_timeout: Duration,
    /// Cooling period after a failed connect or heartbeat before reconnecting.
    pub connect_retry: Duration,
    /// When the site served fewer channels than `channels`, how often one
    /// more is tried.
    pub channel_retry: Duration,
    /// Limit for establishing one connection to the site.
    pub connect_timeout: Duration,
    /// A client connection that sends no request for this long is closed.
    pub client_idle_timeout: Duration,
    /// Once the first byte of a request has arrived, the whole request must
    /// arrive within this (a client trickling bytes cannot hold a session).
    pub client_request_timeout: Duration,
    /// Concurrent client connections on the site's socket.
    pub max_clients: usize,
    /// Request size limits.
    pub limits: Limits,
    /// TCP keepalive on site connections and TCP clients.
    pub keepalive: Keepalive,
    /// `TCP_USER_TIMEOUT` on site connections: data unacknowledged this long
    /// ends the connection (never set on client sockets: it would also end
    /// paused clients).
    pub tcp_user_timeout: Duration,
    /// Mid-answer, a site that sends nothing for this long while livemux is
    /// reading fails the query (the timer stops while livemux waits for a
    /// slow client).
    pub response_idle_timeout: Duration,
    /// A TCP client whose kernel acknowledges nothing for this long while an
    /// answer is being sent is dead and is dropped.
    pub send_stall_grace: Duration,
    /// TLS toward the site (used by `tls://` addresses).
    pub tls: TlsSettings,
    /// Answer `Cache: reload` queries from the cache (the header is always
    /// removed before a query goes to the site).
    pub cache: bool,
    /// Cached answers older than this are not used (none: until the core
    /// reloads or the site reconnects).
    pub cache_max_age: Option<Duration>,
    /// Identical uncached `GET`s in flight at the same moment share one
    /// answer (cacheable ones always do).
    pub coalesce: bool,
    /// Sync this site's HW/SW inventory (when `[inventory]` is configured).
    pub inventory: bool,
    /// Who may send `COMMAND`s through the site's socket and listener (a
    /// federation's: through its own).
    pub commands: CommandPolicy,
    /// The command audit logs each command's arguments (else its name only).
    pub audit_command_arguments: bool,
    /// Queries answered slower than this are logged (none: off).
    pub slow_query_threshold: Option<Duration>,
    /// The slow-query log shows `AuthUser` and filter values (else their
    /// header names only).
    pub slow_query_log_values: bool,
    /// Queries waiting for a channel are served by client in turn, and a
    /// client with queries on channels leaves one channel for the others
    /// (else: arrival order); see `site/pool.rs`.
    pub fair_share: bool,
    /// Mode and group of the site's UNIX socket.
    pub socket: SocketOwnership,
}

/// Who may send `COMMAND`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandPolicy {
    /// `commands = "allow"` on the UNIX socket.
    pub allow: bool,
    /// `listen_commands`: on the TCP listener (default: as `commands`).
    pub listen_allow: bool,
    /// `commands_from_uids`: if any (or any group) is set, only these local
    /// users may send commands on the UNIX socket, and TCP clients none.
    pub from_uids: Vec<u32>,
    /// `commands_from_groups`: likewise, by group (the process's group or
    /// one its user is a member of).
    pub from_gids: Vec<u32>,
}

impl Default for CommandPolicy {
    fn default() -> Self {
        CommandPolicy { allow: true, listen_allow: true, from_uids: Vec::new(), from_gids: Vec::new() }
    }
}

impl CommandPolicy {
    /// Whether commands are restricted to named local users or groups.
    pub fn restricted_to_local_users(&self) -> bool {
        !self.from_uids.is_empty() || !self.from_gids.is_empty()
    }
}

impl Default for SiteParams {
    fn default() -> Self {
        SiteParams {
            channels: 5,
            channels_max: DEFAULT_CHANNELS_MAX,
            channel_idle_timeout: Duration::from_secs(60),
            pipeline_depth: DEFAULT_PIPELINE_DEPTH,
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(2),
            channel_timeout: Duration::from_secs(3),
            query_timeout: Duration::from_secs(120),
            connect_retry: Duration::from_secs(4),
            channel_retry: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            client_idle_timeout: Duration::from_secs(3600),
            client_request_timeout: Duration::from_secs(10),
            max_clients: 1000,
            limits: Limits::default(),
            keepalive: Keepalive { idle: Duration::from_secs(10), interval: Duration::from_secs(5), count: 3 },
            tcp_user_timeout: Duration::from_secs(20),
            response_idle_timeout: Duration::from_secs(30),
            send_stall_grace: Duration::from_secs(30),
            tls: TlsSettings::default(),
            cache: true,
            cache_max_age: None,
            coalesce: false,
            inventory: true,
            commands: CommandPolicy::default(),
            audit_command_arguments: true,
            slow_query_threshold: None,
            slow_query_log_values: false,
            fair_share: true,
            socket: SocketOwnership::default(),
        }
    }
}

/// One configured site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteConfig {
    /// Name; also the file name of its socket in `socket_dir`.
    pub name: String,
    /// Where its Livestatus is.
    pub address: SiteAddress,
    /// Its settings.
    pub params: SiteParams,
    /// Its cascading TCP listener, if any.
    pub listen: Option<TcpListen>,
}

/// Where and how much of site answers is buffered while clients are slow.
///
/// An answer is read from the site at the site's speed, so its channel is
/// free again as soon as the site has answered. It is kept in memory up to
/// `memory_per_response`, beyond that in a file in `dir`; all answers
/// together stay within `memory_budget` and `disk_budget`. When the budgets
/// are used up, the proxy streams instead: it reads from the site only as
/// fast as the client takes the data (holding the channel meanwhile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Directory for spool files (created 0700; files are unlinked at once).
    pub dir: PathBuf,
    /// Memory one answer may use before it spills to a file.
    pub memory_per_response: usize,
    /// Memory all answers together may use.
    pub memory_budget: usize,
    /// Disk space all spool files together may use; 0 turns files off.
    pub disk_budget: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from("/var/lib/livemux/spool"),
            memory_per_response: 2 << 20,
            memory_budget: 32 << 20,
            disk_budget: 4 << 30,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory holding one socket per site.
    pub socket_dir: PathBuf,
    /// The daemon's pid, written once its sockets are bound (optional).
    pub pid_file: Option<PathBuf>,
    /// Where `GET /metrics` is served (off when absent).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// JSON state file, rewritten every `state_interval`.
    pub state_file: PathBuf,
    /// How often the state file is rewritten.
    pub state_interval: Duration,
    /// How long shutdown waits for responses in progress.
    pub shutdown_grace: Duration,
    /// Threads of the async runtime. One is fastest unless a core is
    /// saturated: cross-thread wake-ups cost more than they save.
    pub worker_threads: usize,
    /// Buffering of answers for slow clients.
    pub spool: SpoolConfig,
    /// Memory all clients' partly received requests may use together
    /// (beyond the first 16 KiB of each; see `client::reader`).
    pub request_memory_budget: usize,
    /// How long a client waits for room in `request_memory_budget` before
    /// it is answered 503.
    pub request_memory_wait: Duration,
    /// Bytes of cached answers the daemon keeps (least recently used out first).
    pub cache_budget: usize,
    /// Larger answers are not cached (nor shared in single-flight).
    pub cache_max_entry: usize,
    /// HW/SW inventory sync (off unless `[inventory]` sets `dir`).
    pub inventory: Option<InventoryConfig>,
    /// Federated sockets: one query answered by many sites.
    pub federations: Vec<FederationConfig>,
    /// Memory a federated `Sort` may use for the rows it orders.
    pub federation_sort_budget: usize,
    /// The sites, in file order.
    pub sites: Vec<SiteConfig>,
}

/// Copies of a request made while it is answered (the parsed query's
/// headers, the text sent to the site), charged with its buffer against
/// `request_memory_budget` (which must hold `1 +` this many times the
/// largest request).
pub const REQUEST_COPIES: usize = 2;

/// A `[[federation]]`: a socket `<socket_dir>/<name>` whose queries go to
/// several sites and whose answers are merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationConfig {
    /// Name; also its socket's file name.
    pub name: String,
    /// The sites it asks, in configuration order.
    pub sites: Vec<String>,
    /// A site that fails makes the whole query fail (else its rows are
    /// missing and the site is named).
    pub fail_on_site_error: bool,
    /// Its cascading TCP listener, if any (as a site's).
    pub listen: Option<TcpListen>,
    /// `dialect`: plain Livestatus, or LMD's where the two differ.
    pub dialect: Dialect,
    /// Its clients' `client_idle_timeout`, `client_request_timeout` and
    /// request limits: those of `[defaults]`; and its socket's ownership
    /// (`socket`): the federation's own `socket_mode`, `socket_group` and
    /// `allow_world_writable`, else those of `[defaults]`.
    pub client: SiteParams,
}

/// A federated socket's `dialect`: where LMD answers differently from a
/// Livestatus core, which of the two the socket follows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dialect {
    /// As a core: a column a site lacks is that site's error.
    #[default]
    Livestatus,
    /// As LMD (for Thruk): a column a site lacks answers `""` from it.
    Lmd,
}

/// `[inventory]`: keep the central site's copy of every remote host's HW/SW
/// inventory tree in sync (see `inventory`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryConfig {
    /// The central site's inventory directory (`var/check_mk/inventory`).
    pub dir: PathBuf,
    /// How often each site is asked whether anything changed.
    pub interval: Duration,
    /// How often every host is listed whatever the site says (removed hosts
    /// do not change the site's probe value).
    pub full_interval: Duration,
    /// A host's file larger than this is skipped (with a log line).
    pub max_file_bytes: u64,
}

impl InventoryConfig {
    /// Defaults for a directory.
    pub fn new(dir: PathBuf) -> Self {
        InventoryConfig {
            dir,
            interval: Duration::from_secs(60),
            full_interval: Duration::from_secs(600),
            max_file_bytes: 256 << 20,
        }
    }
}

impl Config {
    /// The socket path of a site.
    pub fn socket_path(&self, site: &str) -> PathBuf {
        self.socket_dir.join(site)
    }

    /// Parse and validate configuration text; every problem found is
    /// reported, each with its key and line.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        let mut v = validate::Validator::new(text);
        // Syntax errors first, all of them (the parser recovers).
        let (doc, syntax) = toml::de::DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            let mut errors: Vec<_> = syntax
                .iter()
                .map(|e| ConfigError {
                    line: e.span().map(|s| v.line(s.start)),
                    key: None,
                    message: e.message().trim().to_owned(),
                })
                .collect();
            errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
            return Err(ConfigErrors(errors));
        }
        let mut unknown = Vec::new();
        let raw: Result<raw::RawConfig, _> = toml::de::Deserializer::parse(text)
            .and_then(|d| serde_ignored::deserialize(d, |path| unknown.push(keys::of(&path))));
        let raw = raw.map_err(|e| {
            ConfigErrors(vec![ConfigError {
                line: e.span().map(|s| v.line(s.start)),
                key: None,
                message: e.message().trim().to_owned(),
            }])
        })?;
        for path in unknown {
            let span = keys::span(doc.get_ref(), &path).unwrap_or(0..0);
            let (name, key) = (keys::last(&path), keys::render(&path));
            match suggest::hint(&path) {
                Some(hint) => v.err(span, &key, format!("unknown key `{name}`; {hint}")),
                None => v.err(span, &key, format!("unknown key `{name}`")),
            }
        }
        let config = v.config(raw);
        if v.errors.is_empty() {
            Ok(config)
        } else {
            v.errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
            Err(ConfigErrors(v.errors))
        }
    }

    /// Read and validate a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                line: None,
                key: None,
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        Config::from_toml(&text)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket_dir: PathBuf::from("/run/livemux"),
            pid_file: None,
            metrics_listen: None,
            state_file: PathBuf::from("/var/lib/livemux/state.json"),
            state_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            worker_threads: 1,
            spool: SpoolConfig::default(),
            request_memory_budget: 64 << 20,
            request_memory_wait: Duration::from_secs(1),
            cache_budget: 64 << 20,
            cache_max_entry: 1 << 20,
            inventory: None,
            federations: Vec::new(),
            federation_sort_budget: 64 << 20,
            sites: Vec::new(),
        }
    }
}

mod suggest;
pub use suggest::known_keys;
pub mod reference;

/// Global keys that differ between `old` and `new` and only a restart
/// applies (a reload names them and keeps the old values).
pub fn restart_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |differs: bool, key: &'static str| {
        if differs {
            keys.push(key);
        }
    };
    check(old.socket_dir != new.socket_dir, "socket_dir");
    check(old.state_file != new.state_file, "state_file");
    check(old.state_interval != new.state_interval, "state_interval");
    check(old.worker_threads != new.worker_threads, "worker_threads");
    check(old.spool != new.spool, "spool_*");
    check(old.cache_budget != new.cache_budget, "cache_budget");
    check(old.cache_max_entry != new.cache_max_entry, "cache_max_entry");
    check(old.inventory != new.inventory, "inventory");
    check(old.pid_file != new.pid_file, "pid_file");
    check(old.metrics_listen != new.metrics_listen, "metrics_listen");
    check(old.federation_sort_budget != new.federation_sort_budget, "federation_sort_budget");
    keys
}

/// Whether a site changed from `old` to `new` needs new channels: its
/// address or its TLS settings toward the site differ.
pub fn replaces_channels(old: &SiteConfig, new: &SiteConfig) -> bool {
    old.address != new.address || old.params.tls != new.params.tls
}

/// Keys as paths through the file, for unknown keys.
mod keys {
    use std::ops::Range;

    use toml::Spanned;
    use toml::de::{DeTable, DeValue};

    /// One step of a path: a table key or an array index.
    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Step {
        Key(String),
        Index(usize),
    }

    /// The steps of a path serde_ignored reports (without serde's own
    /// wrappers, such as the one that keeps spans).
    pub(super) fn of(path: &serde_ignored::Path<'_>) -> Vec<Step> {
        use serde_ignored::Path;
        let mut steps = Vec::new();
        let mut p = path;
        loop {
            match p {
                Path::Root => break,
                Path::Seq { parent, index } => {
                    steps.push(Step::Index(*index));
                    p = parent;
                }
                Path::Map { parent, key } => {
                    if !key.starts_with("$__") {
                        steps.push(Step::Key(key.clone()));
                    }
                    p = parent;
                }
                Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => p = parent,
            }
        }
        steps.reverse();
        steps
    }

    /// `site[2].chanels` (array positions counted from 1, as people do).
    pub(super) fn render(steps: &[Step]) -> String {
        let mut out = String::new();
        for s in steps {
            match s {
                Step::Key(k) if out.is_empty() => out.push_str(k),
                Step::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Step::Index(i) => out.push_str(&format!("[{}]", i + 1)),
            }
        }
        out
    }

    /// The last key of a path.
    pub(super) fn last(steps: &[Step]) -> String {
        steps.iter().rev().find_map(|s| if let Step::Key(k) = s { Some(k.clone()) } else { None }).unwrap_or_default()
    }

    /// Where the last key of a path is written.
    pub(super) fn span(doc: &DeTable<'_>, steps: &[Step]) -> Option<Range<usize>> {
        let mut table = doc;
        let mut value: Option<&Spanned<DeValue<'_>>> = None;
        let mut key_span = None;
        for s in steps {
            match s {
                Step::Key(k) => {
                    let t = match value.map(|v| v.get_ref()) {
                        None => table,
                        Some(DeValue::Table(t)) => t,
                        _ => return key_span,
                    };
                    let (key, v) = t.iter().find(|(key, _)| key.get_ref() == k)?;
                    key_span = Some(key.span());
                    table = t;
                    value = Some(v);
                }
                Step::Index(i) => match value.map(|v| v.get_ref()) {
                    Some(DeValue::Array(a)) => value = Some(a.get(*i)?),
                    _ => return key_span,
                },
            }
        }
        key_span
    }
}

#[cfg(test)]
mod tests;
