//! Configuration: TOML text → [`RawConfig`] (serde, spans kept) → [`Config`]
//! (typed, validated, no `Option` where a default exists).
//!
//! Precedence: a key inside a `[[site]]` table overrides the same key in
//! `[defaults]`, which overrides the built-in default. Every error names the
//! key and the line it is on. Unknown keys, bad durations, duplicate site
//! names and out-of-range values are rejected; nothing is bound or connected
//! before the whole file has been validated.
//!
//! Durations are strings such as `"5s"`, `"250ms"` or `"2m"`.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use livemux_protocol::Limits;
use serde::Deserialize;
use toml::Spanned;

/// Longest UNIX socket path the kernel accepts (`sun_path` is 108 bytes).
const MAX_SOCKET_PATH: usize = 107;

/// A configuration error, with the key and line it concerns.
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

/// A size as written: a number of bytes, or a string with a unit ("64MiB").
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    /// Bytes.
    Bytes(i64),
    /// With a unit: B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB: powers of 1000).
    Text(String),
}

/// Parse a size such as `"512KiB"`, `"64 MiB"`, `"1GB"` or `"4096"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{text}' is not a size; write e.g. \"64MiB\" or 4096"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        u => return Err(format!("'{text}': unknown unit '{u}' (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{text}' is too large"))
}

/// Per-site parameters as written in `[defaults]` or a `[[site]]` table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    name: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    channels: Option<Spanned<i64>>,
    heartbeat_interval: Option<Spanned<String>>,
    heartbeat_timeout: Option<Spanned<String>>,
    channel_timeout: Option<Spanned<String>>,
    query_timeout: Option<Spanned<String>>,
    connect_retry: Option<Spanned<String>>,
    channel_retry: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    client_idle_timeout: Option<Spanned<String>>,
    client_request_timeout: Option<Spanned<String>>,
    max_clients: Option<Spanned<i64>>,
    max_request_bytes: Option<Spanned<RawSize>>,
    max_header_lines: Option<Spanned<i64>>,
    max_line_bytes: Option<Spanned<RawSize>>,
    keepalive_idle: Option<Spanned<String>>,
    keepalive_interval: Option<Spanned<String>>,
    keepalive_count: Option<Spanned<i64>>,
    tcp_user_timeout: Option<Spanned<String>>,
    response_idle_timeout: Option<Spanned<String>>,
    send_stall_grace: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    only_from: Option<Spanned<Vec<Spanned<String>>>>,
    tls: Option<Spanned<RawListenerTls>>,
    ca_file: Option<Spanned<String>>,
    verify: Option<Spanned<bool>>,
    server_name: Option<Spanned<String>>,
    client_cert_file: Option<Spanned<String>>,
    client_key_file: Option<Spanned<String>>,
    tls_handshake_timeout: Option<Spanned<String>>,
    cache: Option<Spanned<bool>>,
    cache_max_age: Option<Spanned<String>>,
    coalesce: Option<Spanned<bool>>,
}

/// `tls = { cert_file = "...", key_file = "..." }` of a TCP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    cert_file: String,
    key_file: String,
}

/// The file as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    socket_dir: Option<Spanned<String>>,
    state_file: Option<Spanned<String>>,
    state_interval: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    worker_threads: Option<Spanned<i64>>,
    spool_dir: Option<Spanned<String>>,
    spool_memory_per_response: Option<Spanned<RawSize>>,
    spool_memory_budget: Option<Spanned<RawSize>>,
    spool_disk_budget: Option<Spanned<RawSize>>,
    cache_budget: Option<Spanned<RawSize>>,
    cache_max_entry: Option<Spanned<RawSize>>,
    defaults: Option<Spanned<RawSite>>,
    site: Option<Vec<Spanned<RawSite>>>,
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

/// Certificate and key of a TLS listener (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// Certificate chain.
    pub cert_file: PathBuf,
    /// Private key.
    pub key_file: PathBuf,
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
    /// Persistent connections kept open to the site (1..=50).
    pub channels: usize,
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
}

impl Default for SiteParams {
    fn default() -> Self {
        SiteParams {
            channels: 5,
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
    /// Bytes of cached answers the daemon keeps (least recently used out first).
    pub cache_budget: usize,
    /// Larger answers are not cached (nor shared in single-flight).
    pub cache_max_entry: usize,
    /// The sites, in file order.
    pub sites: Vec<SiteConfig>,
}

impl Config {
    /// The socket path of a site.
    pub fn socket_path(&self, site: &str) -> PathBuf {
        self.socket_dir.join(site)
    }

    /// Parse and validate configuration text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            line: e.span().map(|s| line_of(text, s.start)),
            key: None,
            message: e.message().trim().to_owned(),
        })?;
        Validator { text }.config(raw)
    }

    /// Read and validate a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            line: None,
            key: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Config::from_toml(&text)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// Turns raw values into typed ones, reporting errors with their lines.
struct Validator<'a> {
    text: &'a str,
}

impl Validator<'_> {
    fn err(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError { line: Some(line_of(self.text, span.start)), key: Some(key.to_owned()), message: message.into() }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let path = |v: Option<Spanned<String>>, key: &str, default: &str| -> Result<PathBuf, ConfigError> {
            match v {
                None => Ok(PathBuf::from(default)),
                Some(s) if s.get_ref().is_empty() => Err(self.err(s.span(), key, "must not be empty")),
                Some(s) => Ok(PathBuf::from(s.into_inner())),
            }
        };
        let socket_dir = path(raw.socket_dir, "socket_dir", "/run/livemux")?;
        let state_file = path(raw.state_file, "state_file", "/var/lib/livemux/state.json")?;
        let state_interval = self.duration(raw.state_interval.as_ref(), "state_interval", Duration::from_secs(5))?;
        let shutdown_grace = self.duration(raw.shutdown_grace.as_ref(), "shutdown_grace", Duration::from_secs(10))?;
        let worker_threads = self.int(raw.worker_threads.as_ref(), "worker_threads", 1, 1..=256)?;
        let d = SpoolConfig::default();
        let spool = SpoolConfig {
            dir: path(raw.spool_dir, "spool_dir", &d.dir.to_string_lossy())?,
            memory_per_response: self.size(
                raw.spool_memory_per_response.as_ref(),
                "spool_memory_per_response",
                d.memory_per_response as u64,
                0..=1 << 40,
            )? as usize,
            memory_budget: self.size(
                raw.spool_memory_budget.as_ref(),
                "spool_memory_budget",
                d.memory_budget as u64,
                0..=1 << 40,
            )? as usize,
            disk_budget: self.size(raw.spool_disk_budget.as_ref(), "spool_disk_budget", d.disk_budget, 0..=1 << 50)?,
        };

        let defaults_raw = raw.defaults.map(|d| (d.span(), d.into_inner())).unwrap_or_default();
        let d = &defaults_raw.1;
        if let Some(v) = &d.only_from {
            return Err(self.err(v.span(), "defaults.only_from", "belongs in a [[site]] table, not in [defaults]"));
        }
        if let Some(v) = &d.tls {
            return Err(self.err(v.span(), "defaults.tls", "belongs in a [[site]] table, not in [defaults]"));
        }
        for (field, what) in [(&d.name, "name"), (&d.address, "address"), (&d.listen, "listen")] {
            if let Some(v) = field {
                return Err(self.err(
                    v.span(),
                    &format!("defaults.{what}"),
                    "belongs in a [[site]] table, not in [defaults]",
                ));
            }
        }
        let defaults = self.params(&defaults_raw.1, &SiteParams::default(), "defaults")?;

        let raw_sites = raw.site.unwrap_or_default();
        if raw_sites.is_empty() {
            return Err(ConfigError {
                line: None,
                key: Some("site".into()),
                message: "no [[site]] is configured".into(),
            });
        }
        let mut sites: Vec<SiteConfig> = Vec::with_capacity(raw_sites.len());
        for (i, s) in raw_sites.into_iter().enumerate() {
            let span = s.span();
            let s = s.into_inner();
            let prefix = format!("site[{}]", i + 1);
            let name =
                s.name.as_ref().ok_or_else(|| self.err(span.clone(), &format!("{prefix}.name"), "is required"))?;
            self.site_name(name, &prefix)?;
            if sites.iter().any(|o| o.name == *name.get_ref()) {
                return Err(self.err(
                    name.span(),
                    &format!("{prefix}.name"),
                    format!("duplicate site name '{}'", name.get_ref()),
                ));
            }
            let sock = socket_dir.join(name.get_ref());
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(self.err(
                    name.span(),
                    &format!("{prefix}.name"),
                    format!(
                        "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter socket_dir",
                        sock.display()
                    ),
                ));
            }
            let address = s
                .address
                .as_ref()
                .ok_or_else(|| self.err(span.clone(), &format!("{prefix}.address"), "is required"))?;
            let parsed: SiteAddress = address
                .get_ref()
                .parse()
                .map_err(|m: String| self.err(address.span(), &format!("{prefix}.address"), m))?;
            let params = self.params(&s, &defaults, &prefix)?;
            if matches!(parsed, SiteAddress::Tls { .. }) && params.tls.verify && params.tls.ca_file.is_none() {
                return Err(self.err(
                    address.span(),
                    &format!("{prefix}.ca_file"),
                    "is required for a tls:// address (or set verify = false to encrypt without verifying)",
                ));
            }
            let listen = self.listen(&s, &prefix, span.clone())?;
            sites.push(SiteConfig { name: name.get_ref().clone(), address: parsed, params, listen });
        }
        let cache_budget = self.size(raw.cache_budget.as_ref(), "cache_budget", 64 << 20, 0..=1 << 40)? as usize;
        let cache_max_entry =
            self.size(raw.cache_max_entry.as_ref(), "cache_max_entry", 1 << 20, 0..=1 << 34)? as usize;
        Ok(Config {
            socket_dir,
            state_file,
            state_interval,
            shutdown_grace,
            worker_threads,
            spool,
            cache_budget,
            cache_max_entry,
            sites,
        })
    }

    fn listen(&self, raw: &RawSite, prefix: &str, site: Range<usize>) -> Result<Option<TcpListen>, ConfigError> {
        let Some(l) = &raw.listen else {
            if let Some(o) = &raw.only_from {
                return Err(self.err(o.span(), &format!("{prefix}.only_from"), "only_from needs listen"));
            }
            if let Some(t) = &raw.tls {
                return Err(self.err(t.span(), &format!("{prefix}.tls"), "tls (for the TCP listener) needs listen"));
            }
            return Ok(None);
        };
        let key = format!("{prefix}.listen");
        let text = l.get_ref();
        let addr: std::net::SocketAddr = text.parse().map_err(|_| {
            self.err(
                l.span(),
                &key,
                format!("'{text}' is not an address:port (e.g. \"127.0.0.1:6560\" or \"[::1]:6560\")"),
            )
        })?;
        let mut only_from = Vec::new();
        for e in raw.only_from.iter().flat_map(|o| o.get_ref()) {
            let t = e.get_ref().trim();
            let net = t
                .parse::<ipnet::IpNet>()
                .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    self.err(
                        e.span(),
                        &format!("{prefix}.only_from"),
                        format!("'{t}' is neither an address nor a network"),
                    )
                })?;
            only_from.push(net);
        }
        if only_from.is_empty() && !addr.ip().is_loopback() {
            let span = raw.only_from.as_ref().map_or(site, |o| o.span());
            return Err(self.err(
                span,
                &format!("{prefix}.only_from"),
                format!("is required (and must not be empty) when listening on the non-loopback address {addr}"),
            ));
        }
        let tls = raw.tls.as_ref().map(|t| ListenerTls {
            cert_file: PathBuf::from(&t.get_ref().cert_file),
            key_file: PathBuf::from(&t.get_ref().key_file),
        });
        Ok(Some(TcpListen { addr, only_from, tls }))
    }

    fn site_name(&self, name: &Spanned<String>, prefix: &str) -> Result<(), ConfigError> {
        let n = name.get_ref();
        let ok = !n.is_empty()
            && n.len() <= 64
            && n.as_bytes()[0].is_ascii_alphanumeric()
            && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(self.err(
                name.span(),
                &format!("{prefix}.name"),
                format!("'{n}' is not a valid site name (letters, digits, '_', '.', '-'; at most 64; starting with a letter or digit)"),
            ))
        }
    }

    fn params(&self, raw: &RawSite, base: &SiteParams, prefix: &str) -> Result<SiteParams, ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let mut p = base.clone();
        p.channels = self.int(raw.channels.as_ref(), &key("channels"), p.channels, 1..=50)?;
        p.heartbeat_interval =
            self.duration(raw.heartbeat_interval.as_ref(), &key("heartbeat_interval"), p.heartbeat_interval)?;
        p.heartbeat_timeout =
            self.duration(raw.heartbeat_timeout.as_ref(), &key("heartbeat_timeout"), p.heartbeat_timeout)?;
        p.channel_timeout = self.duration(raw.channel_timeout.as_ref(), &key("channel_timeout"), p.channel_timeout)?;
        p.query_timeout = self.duration(raw.query_timeout.as_ref(), &key("query_timeout"), p.query_timeout)?;
        p.connect_retry = self.duration(raw.connect_retry.as_ref(), &key("connect_retry"), p.connect_retry)?;
        p.channel_retry = self.duration(raw.channel_retry.as_ref(), &key("channel_retry"), p.channel_retry)?;
        p.connect_timeout = self.duration(raw.connect_timeout.as_ref(), &key("connect_timeout"), p.connect_timeout)?;
        p.client_idle_timeout =
            self.duration(raw.client_idle_timeout.as_ref(), &key("client_idle_timeout"), p.client_idle_timeout)?;
        p.client_request_timeout = self.duration(
            raw.client_request_timeout.as_ref(),
            &key("client_request_timeout"),
            p.client_request_timeout,
        )?;
        p.max_clients = self.int(raw.max_clients.as_ref(), &key("max_clients"), p.max_clients, 1..=1_000_000)?;
        let l = &mut p.limits;
        l.max_request_bytes = self.size(
            raw.max_request_bytes.as_ref(),
            &key("max_request_bytes"),
            l.max_request_bytes as u64,
            1024..=1 << 30,
        )? as usize;
        l.max_header_lines =
            self.int(raw.max_header_lines.as_ref(), &key("max_header_lines"), l.max_header_lines, 1..=10_000_000)?;
        l.max_line_bytes =
            self.size(raw.max_line_bytes.as_ref(), &key("max_line_bytes"), l.max_line_bytes as u64, 64..=1 << 30)?
                as usize;
        let k = &mut p.keepalive;
        // The kernel takes whole seconds, 1..=32767 (TCP_KEEPIDLE, TCP_KEEPINTVL).
        let secs = Duration::from_secs(1)..=Duration::from_secs(32767);
        k.idle = self.duration_in(raw.keepalive_idle.as_ref(), &key("keepalive_idle"), k.idle, &secs, "1s..=32767s")?;
        k.interval = self.duration_in(
            raw.keepalive_interval.as_ref(),
            &key("keepalive_interval"),
            k.interval,
            &secs,
            "1s..=32767s",
        )?;
        k.count = self.int(raw.keepalive_count.as_ref(), &key("keepalive_count"), k.count as usize, 1..=100)? as u32;
        p.tcp_user_timeout =
            self.duration(raw.tcp_user_timeout.as_ref(), &key("tcp_user_timeout"), p.tcp_user_timeout)?;
        p.response_idle_timeout =
            self.duration(raw.response_idle_timeout.as_ref(), &key("response_idle_timeout"), p.response_idle_timeout)?;
        p.send_stall_grace =
            self.duration(raw.send_stall_grace.as_ref(), &key("send_stall_grace"), p.send_stall_grace)?;
        let t = &mut p.tls;
        if let Some(v) = &raw.ca_file {
            t.ca_file = Some(PathBuf::from(v.get_ref()));
        }
        if let Some(v) = &raw.verify {
            t.verify = *v.get_ref();
        }
        if let Some(v) = &raw.server_name {
            t.server_name = Some(v.get_ref().clone());
        }
        match (&raw.client_cert_file, &raw.client_key_file) {
            (Some(c), Some(k)) => t.client_cert = Some((PathBuf::from(c.get_ref()), PathBuf::from(k.get_ref()))),
            (None, None) => {}
            (Some(c), None) => {
                return Err(self.err(c.span(), &key("client_key_file"), "is required with client_cert_file"));
            }
            (None, Some(k)) => {
                return Err(self.err(k.span(), &key("client_cert_file"), "is required with client_key_file"));
            }
        }
        t.handshake_timeout =
            self.duration(raw.tls_handshake_timeout.as_ref(), &key("tls_handshake_timeout"), t.handshake_timeout)?;
        if let Some(v) = &raw.cache {
            p.cache = *v.get_ref();
        }
        if let Some(v) = &raw.coalesce {
            p.coalesce = *v.get_ref();
        }
        if raw.cache_max_age.is_some() {
            p.cache_max_age = Some(self.duration(raw.cache_max_age.as_ref(), &key("cache_max_age"), Duration::ZERO)?);
        }
        if let Some(t) = raw.heartbeat_timeout.as_ref().or(raw.heartbeat_interval.as_ref())
            && p.heartbeat_timeout > p.heartbeat_interval
        {
            return Err(self.err(
                t.span(),
                &key("heartbeat_timeout"),
                format!(
                    "{} is longer than heartbeat_interval ({})",
                    humantime::format_duration(p.heartbeat_timeout),
                    humantime::format_duration(p.heartbeat_interval)
                ),
            ));
        }
        Ok(p)
    }

    fn int(
        &self,
        v: Option<&Spanned<i64>>,
        key: &str,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let n = *v.get_ref();
        match usize::try_from(n) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(self.err(v.span(), key, format!("{n} is out of range {}..={}", range.start(), range.end()))),
        }
    }

    fn size(
        &self,
        v: Option<&Spanned<RawSize>>,
        key: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let n = match v.get_ref() {
            RawSize::Bytes(n) => u64::try_from(*n).map_err(|_| self.err(v.span(), key, format!("{n} is negative")))?,
            RawSize::Text(t) => parse_size(t).map_err(|m| self.err(v.span(), key, m))?,
        };
        if !range.contains(&n) {
            return Err(self.err(
                v.span(),
                key,
                format!("{n} bytes is out of range {}..={}", range.start(), range.end()),
            ));
        }
        Ok(n)
    }

    fn duration(&self, v: Option<&Spanned<String>>, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        let range = Duration::from_millis(1)..=Duration::from_secs(7 * 86400);
        self.duration_in(v, key, default, &range, "1ms..=7d")
    }

    fn duration_in(
        &self,
        v: Option<&Spanned<String>>,
        key: &str,
        default: Duration,
        range: &std::ops::RangeInclusive<Duration>,
        range_text: &str,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let d = humantime::parse_duration(v.get_ref()).map_err(|e| {
            self.err(
                v.span(),
                key,
                format!("'{}' is not a duration ({e}); write e.g. \"5s\" or \"250ms\"", v.get_ref()),
            )
        })?;
        if !range.contains(&d) {
            return Err(self.err(v.span(), key, format!("'{}' is out of range {range_text}", v.get_ref())));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests;
