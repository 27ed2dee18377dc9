//! `livemux import-liveproxyd`: Checkmk's `etc/check_mk/liveproxyd.mk`
//! (written by the GUI's site management) as a livemux configuration.
//!
//! The file holds, per remote site with a proxy, its `socket` (where its
//! Livestatus is), optionally `tcp` (liveproxyd's cascading listener) and,
//! when the site has its own proxy parameters, those parameters flat in the
//! same dict; sites without them use `liveproxyd_default_connection_params`
//! of the global settings (`--global`), else Checkmk's defaults. Facts and
//! their sources: `docs/liveproxyd-import.md`.
//!
//! The output is TOML text that `livemux check-config` accepts, with
//! comments where livemux's defaults differ from liveproxyd's; problems that
//! do not stop the import (an unknown key, an unusable site) are warnings.

pub mod literal;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use literal::{ParseError, Py, Statement};

/// Checkmk's proxy defaults (`liveproxyd_default_connection_params`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyParams {
    /// `channels`
    pub channels: i64,
    /// `heartbeat`: (interval, timeout), seconds.
    pub heartbeat: (f64, f64),
    /// `channel_timeout`, seconds.
    pub channel_timeout: f64,
    /// `query_timeout`, seconds.
    pub query_timeout: f64,
    /// `connect_retry`, seconds.
    pub connect_retry: f64,
    /// `cache`
    pub cache: bool,
    /// `connect_timeout` (Checkmk 1.6), seconds.
    pub connect_timeout: Option<f64>,
}

impl Default for ProxyParams {
    fn default() -> Self {
        ProxyParams {
            channels: 5,
            heartbeat: (5.0, 2.0),
            channel_timeout: 3.0,
            query_timeout: 120.0,
            connect_retry: 4.0,
            cache: true,
            connect_timeout: None,
        }
    }
}

const PARAM_KEYS: [&str; 7] =
    ["channels", "heartbeat", "channel_timeout", "query_timeout", "connect_retry", "cache", "connect_timeout"];

/// The import failed: the input is not a liveproxyd.mk.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// It could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a Python literal file.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and what.
        source: ParseError,
    },
    /// It has no `sites`.
    #[error("{path}: no `sites = {{...}}` or `sites.update({{...}})` in it")]
    NoSites {
        /// The file.
        path: PathBuf,
    },
}

/// Inputs of an import.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The liveproxyd.mk.
    pub file: PathBuf,
    /// `etc/check_mk/liveproxyd.d/wato/global.mk`, for the default parameters.
    pub global: Option<PathBuf>,
    /// Where livemux puts its sockets (else the site's `tmp/run/liveproxy`).
    pub socket_dir: Option<PathBuf>,
    /// The central site's root (else derived from `file`'s path).
    pub omd_root: Option<PathBuf>,
}

/// The configuration text and the warnings.
#[derive(Debug, Clone, Default)]
pub struct Imported {
    /// TOML.
    pub toml: String,
    /// One line each.
    pub warnings: Vec<String>,
}

fn read(path: &Path) -> Result<Vec<Statement>, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read { path: path.to_owned(), source })?;
    literal::parse(&text).map_err(|source| ImportError::Parse { path: path.to_owned(), source })
}

/// The dict a sequence of statements builds under `name`.
fn collect(statements: &[Statement], name: &str) -> Option<Vec<(Py, Py)>> {
    let mut out: Option<Vec<(Py, Py)>> = None;
    let set = |k: Py, v: Py, out: &mut Option<Vec<(Py, Py)>>| {
        let d = out.get_or_insert_with(Vec::new);
        d.retain(|(old, _)| *old != k);
        d.push((k, v));
    };
    for s in statements {
        match s {
            Statement::Assign(n, Py::Dict(kv)) if n == name => out = Some(kv.clone()),
            Statement::Update(n, Py::Dict(kv)) if n == name => {
                for (k, v) in kv {
                    set(k.clone(), v.clone(), &mut out);
                }
            }
            Statement::SetItem(n, k, v) if n == name => set(k.clone(), v.clone(), &mut out),
            _ => {}
        }
    }
    out
}

/// The OMD root of a site from its `etc/check_mk/liveproxyd.mk` path.
fn root_of(file: &Path) -> Option<PathBuf> {
    let dir = file.canonicalize().ok().unwrap_or_else(|| file.to_owned());
    let check_mk = dir.parent()?;
    let etc = check_mk.parent()?;
    (check_mk.file_name()? == "check_mk" && etc.file_name()? == "etc").then(|| etc.parent().map(Path::to_owned))?
}

/// Read parameters from a dict; unknown keys are left to the caller.
fn params(d: &Py, base: &ProxyParams, warn: &mut impl FnMut(String), who: &str) -> ProxyParams {
    let mut p = base.clone();
    let secs = |k: &str, warn: &mut dyn FnMut(String)| {
        let v = d.get(k)?;
        let x = v.as_f64().filter(|x| *x > 0.0);
        if x.is_none() {
            warn(format!("{who}: `{k}` = {v} is not a positive number of seconds; using the default"));
        }
        x
    };
    if let Some(v) = d.get("channels") {
        match v {
            Py::Int(n) if (1..=50).contains(n) => p.channels = *n,
            other => warn(format!("{who}: `channels` = {other} is not a number in 1..=50; using {}", p.channels)),
        }
    }
    if let Some(v) = d.get("heartbeat") {
        match v.items() {
            Some([i, t]) if i.as_f64().is_some_and(|x| x > 0.0) && t.as_f64().is_some_and(|x| x > 0.0) => {
                p.heartbeat = (i.as_f64().unwrap_or(5.0), t.as_f64().unwrap_or(2.0));
            }
            _ => warn(format!("{who}: `heartbeat` = {v} is not (interval, timeout); using the default")),
        }
    }
    let mut w = |m: String| warn(m);
    if let Some(x) = secs("channel_timeout", &mut w) {
        p.channel_timeout = x;
    }
    if let Some(x) = secs("query_timeout", &mut w) {
        p.query_timeout = x;
    }
    if let Some(x) = secs("connect_retry", &mut w) {
        p.connect_retry = x;
    }
    if let Some(x) = secs("connect_timeout", &mut w) {
        p.connect_timeout = Some(x);
    }
    if let Some(v) = d.get("cache") {
        match v {
            Py::Bool(b) => p.cache = *b,
            other => w(format!("{who}: `cache` = {other} is not True or False; using {}", p.cache)),
        }
    }
    p
}

/// A duration for the TOML: whole seconds, or milliseconds.
fn dur(secs: f64) -> String {
    let ms = (secs * 1000.0).round().max(1.0) as u64;
    if ms.is_multiple_of(1000) { format!("\"{}s\"", ms / 1000) } else { format!("\"{ms}ms\"") }
}

/// A TOML string.
fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Where a site's Livestatus is, in livemux's notation, with TLS lines.
struct Target {
    address: String,
    tls_lines: Vec<String>,
}

fn host_port(v: &Py) -> Option<(String, i64)> {
    match v.items()? {
        [h, Py::Int(p)] if (1..=65535).contains(p) => Some((h.as_str()?.to_owned(), *p)),
        _ => None,
    }
}

fn tcp_address(host: &str, port: i64, v6: bool) -> String {
    if v6 || host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

fn target(socket: &Py, root: Option<&Path>, who: &str, warn: &mut impl FnMut(String)) -> Option<Target> {
    let plain = |address: String| Some(Target { address, tls_lines: Vec::new() });
    // Pre-1.6: a bare path, "tcp:host:port", or (host, port).
    if let Some(s) = socket.as_str() {
        if let Some(rest) = s.strip_prefix("tcp:") {
            return plain(format!("tcp://{rest}"));
        }
        return plain(format!("unix://{}", s.strip_prefix("unix:").unwrap_or(s)));
    }
    if let Some((h, p)) = host_port(socket) {
        return plain(format!("tcp://{}", tcp_address(&h, p, false)));
    }
    let items = socket.items()?;
    let (kind, spec) = match items {
        [k, spec] => (k.as_str()?, spec),
        _ => return None,
    };
    match kind {
        "local" => match root {
            Some(r) => plain(format!("unix://{}", r.join("tmp/run/live").display())),
            None => {
                warn(format!("{who}: ('local', None) is the central site's own Livestatus; give --omd-root"));
                None
            }
        },
        "unix" => plain(format!("unix://{}", spec.get("path")?.as_str()?)),
        "tcp" | "tcp6" => {
            let (h, p) = host_port(spec.get("address")?)?;
            let hp = tcp_address(&h, p, kind == "tcp6");
            let tls = spec.get("tls").and_then(Py::items);
            match tls {
                None | Some([_]) => plain(format!("tcp://{hp}")),
                Some([mode, _]) if mode.as_str() == Some("plain_text") => plain(format!("tcp://{hp}")),
                Some([mode, opts]) if mode.as_str() == Some("encrypted") => {
                    let verify = !matches!(opts.get("verify"), Some(Py::Bool(false)));
                    let mut lines = Vec::new();
                    if !verify {
                        lines.push("verify = false                       # Checkmk: 'verify': False".to_owned());
                    } else if let Some(ca) = opts.get("ca_file_path").and_then(Py::as_str) {
                        lines.push(format!("ca_file = {}", q(ca)));
                    } else if let Some(r) = root {
                        let ca = r.join("var/ssl/ca-certificates.crt");
                        lines.push(format!("ca_file = {}   # the site's trust store", q(&ca.display().to_string())));
                    } else {
                        warn(format!(
                            "{who}: encrypted with verify but no ca_file_path: set ca_file to the site's \
                             var/ssl/ca-certificates.crt (give --omd-root)"
                        ));
                        return None;
                    }
                    Some(Target { address: format!("tls://{hp}"), tls_lines: lines })
                }
                Some(other) => {
                    warn(format!("{who}: unknown tls setting {}", Py::Tuple(other.to_vec())));
                    None
                }
            }
        }
        "proxy" => {
            // Very old GUIs: ('proxy', {'socket': ..., 'params': ..., 'tcp': ...}).
            target(spec.get("socket")?, root, who, warn)
        }
        other => {
            warn(format!("{who}: unknown socket type '{other}'"));
            None
        }
    }
}

/// Whether a site name is one livemux takes (it names the socket file).
fn good_name(n: &str) -> bool {
    !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) && !n.starts_with('.')
}

/// Write one parameter block: only what differs from `base` (or all with `all`).
fn param_lines(p: &ProxyParams, base: &ProxyParams, all: bool, out: &mut String) {
    if all || p.channels != base.channels {
        let _ = writeln!(out, "channels = {}", p.channels);
    }
    if all || p.heartbeat != base.heartbeat {
        let (i, t) = (p.heartbeat.0, p.heartbeat.1.min(p.heartbeat.0));
        let _ = writeln!(out, "heartbeat_interval = {}\nheartbeat_timeout = {}", dur(i), dur(t));
    }
    if all || p.channel_timeout != base.channel_timeout {
        let _ = writeln!(out, "channel_timeout = {}", dur(p.channel_timeout));
    }
    if all || p.query_timeout != base.query_timeout {
        let _ = writeln!(out, "query_timeout = {}", dur(p.query_timeout));
    }
    if all || p.connect_retry != base.connect_retry {
        let _ = writeln!(out, "connect_retry = {}", dur(p.connect_retry));
    }
    if (all || p.connect_timeout != base.connect_timeout)
        && let Some(c) = p.connect_timeout
    {
        let _ = writeln!(out, "connect_timeout = {}", dur(c));
    }
    if all || p.cache != base.cache {
        let _ = writeln!(out, "cache = {}", p.cache);
    }
}

/// Convert: read the files, write the TOML.
pub fn import(opts: &Options) -> Result<Imported, ImportError> {
    let statements = read(&opts.file)?;
    import_statements(opts, &statements, read)
}

/// Convert the statements read from `opts.file`; `read_global` reads
/// `opts.global`. (The fuzz target hands in parsed text instead of files.)
#[doc(hidden)]
pub fn import_statements(
    opts: &Options,
    statements: &[Statement],
    read_global: impl Fn(&Path) -> Result<Vec<Statement>, ImportError>,
) -> Result<Imported, ImportError> {
    let sites = collect(statements, "sites").ok_or_else(|| ImportError::NoSites { path: opts.file.clone() })?;
    let mut warnings = Vec::new();
    let mut warn = |m: String| warnings.push(m);
    let mut base = ProxyParams::default();
    let mut base_from = "Checkmk's defaults".to_owned();
    if let Some(g) = &opts.global {
        let st = read_global(g)?;
        match collect(&st, "liveproxyd_default_connection_params") {
            Some(kv) => {
                let d = Py::Dict(kv);
                base = params(&d, &base, &mut warn, "liveproxyd_default_connection_params");
                if let Py::Dict(kv) = &d {
                    for (k, _) in kv {
                        let k = k.as_str().unwrap_or("?");
                        if !PARAM_KEYS.contains(&k) {
                            warn(format!("liveproxyd_default_connection_params: unknown key `{k}` ignored"));
                        }
                    }
                }
                base_from = format!("liveproxyd_default_connection_params in {}", g.display());
            }
            None => warn(format!("{}: no liveproxyd_default_connection_params; using Checkmk's defaults", g.display())),
        }
    }
    let root = opts.omd_root.clone().or_else(|| root_of(&opts.file));
    let site_id = root.as_deref().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());

    let mut out = String::new();
    let _ = writeln!(out, "# livemux configuration imported from {}", opts.file.display());
    let _ = writeln!(out, "# by `livemux import-liveproxyd`. Check it with `livemux check-config --config FILE`.");
    let _ = writeln!(out);
    let (socket_dir, note) = match (&opts.socket_dir, &root) {
        (Some(d), _) => (d.clone(), "given with --socket-dir"),
        (None, Some(r)) => {
            (r.join("tmp/run/liveproxy"), "where Checkmk's GUI connects to liveproxyd: stop liveproxyd first")
        }
        (None, None) => {
            (PathBuf::from("/run/livemux"), "livemux's default; Checkmk's GUI expects <site>/tmp/run/liveproxy")
        }
    };
    let _ = writeln!(out, "# One socket per site, <socket_dir>/<site> ({note}).");
    let _ = writeln!(out, "socket_dir = {}", q(&socket_dir.display().to_string()));
    if let Some(r) = &root {
        let _ = writeln!(
            out,
            "# liveproxyd keeps var/log/liveproxyd.state; livemux's state file is JSON (`livemux status`)."
        );
        let _ = writeln!(out, "state_file = {}", q(&r.join("var/log/livemux.state.json").display().to_string()));
        let _ = writeln!(out, "spool_dir = {}", q(&r.join("tmp/livemux/spool").display().to_string()));
        let _ = writeln!(out, "# The GUI reloads liveproxyd with SIGHUP to tmp/run/liveproxyd.pid.");
        let _ = writeln!(out, "pid_file = {}", q(&r.join("tmp/run/livemux.pid").display().to_string()));
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "[defaults]");
    let _ = writeln!(out, "# From {base_from}.");
    let _ = writeln!(
        out,
        "# liveproxyd keeps exactly `channels` per site; livemux keeps them open while idle and opens up to\n\
         # channels_max (default 10, or channels if larger) while queries wait (docs/CONFIGURATION.md, \"Sizing the pool\")."
    );
    param_lines(&base, &base, true, &mut out);

    let mut names = std::collections::HashSet::new();
    for (k, v) in &sites {
        let Some(name) = k.as_str() else {
            warn(format!("a site key {k} is not a string; skipped"));
            continue;
        };
        let who = format!("site '{name}'");
        if !good_name(name) {
            warn(format!("{who}: the name cannot name a socket file (letters, digits, '_', '.', '-'); skipped"));
            continue;
        }
        if !names.insert(name.to_owned()) {
            continue;
        }
        let Py::Dict(kv) = v else {
            warn(format!("{who}: not a dict; skipped"));
            continue;
        };
        for (key, _) in kv {
            let key = key.as_str().unwrap_or("?");
            if !PARAM_KEYS.contains(&key) && key != "socket" && key != "tcp" {
                warn(format!("{who}: unknown key `{key}` ignored"));
            }
        }
        let Some(socket) = v.get("socket") else {
            warn(format!("{who}: no `socket`; skipped"));
            continue;
        };
        let mut w = |m: String| warn(m);
        let Some(t) = target(socket, root.as_deref(), &who, &mut w) else {
            w(format!("{who}: socket {socket} is not understood; skipped"));
            continue;
        };
        let own = kv.iter().any(|(k, _)| k.as_str().is_some_and(|k| PARAM_KEYS.contains(&k)));
        let p = if own { params(v, &base, &mut w, &who) } else { base.clone() };
        let _ = writeln!(out, "\n[[site]]\nname = {}\naddress = {}", q(name), q(&t.address));
        for l in &t.tls_lines {
            let _ = writeln!(out, "{l}");
        }
        if own {
            param_lines(&p, &base, false, &mut out);
        }
        if let Some(tcp) = v.get("tcp") {
            listener(tcp, root.as_deref(), site_id.as_deref(), &who, &mut w, &mut out);
        }
    }
    Ok(Imported { toml: out, warnings })
}

/// liveproxyd's cascading listener `{'port', 'only_from', 'tls'}`.
fn listener(
    tcp: &Py,
    root: Option<&Path>,
    site_id: Option<&str>,
    who: &str,
    warn: &mut impl FnMut(String),
    out: &mut String,
) {
    let Some(Py::Int(port)) = tcp.get("port").filter(|p| matches!(p, Py::Int(1..=65535))) else {
        warn(format!("{who}: `tcp` without a port: no cascading listener"));
        return;
    };
    let mut only_from = Vec::new();
    for a in tcp.get("only_from").and_then(Py::items).unwrap_or_default() {
        match a.as_str() {
            // Checkmk's "any IPv4 address".
            Some("0.0.0.0") => only_from.push("0.0.0.0/0".to_owned()),
            Some("::") => only_from.push("::/0".to_owned()),
            Some(s) if s.parse::<std::net::IpAddr>().is_ok() || s.parse::<ipnet::IpNet>().is_ok() => {
                only_from.push(s.to_owned())
            }
            _ => warn(format!("{who}: only_from entry {a} is not an address or network; left out")),
        }
    }
    if only_from.is_empty() {
        // liveproxyd without only_from accepts anyone.
        only_from = vec!["0.0.0.0/0".to_owned(), "::/0".to_owned()];
    }
    let list: Vec<String> = only_from.iter().map(|a| q(a)).collect();
    let tls = matches!(tcp.get("tls"), Some(Py::Bool(true)));
    let cert = match (root, site_id) {
        (Some(r), Some(id)) => Some(r.join(format!("etc/ssl/sites/{id}.pem"))),
        _ => None,
    };
    let lines = format!("listen = \"[::]:{port}\"\nonly_from = [{}]\n", list.join(", "));
    match (tls, cert) {
        (false, _) => out.push_str(&lines),
        (true, Some(c)) if c.exists() => {
            let c = q(&c.display().to_string());
            out.push_str(&lines);
            let _ = writeln!(out, "tls = {{ cert_file = {c}, key_file = {c} }}   # the site certificate");
        }
        (true, cert) => {
            let shown = cert.map_or_else(|| "<site>/etc/ssl/sites/<site>.pem".to_owned(), |c| c.display().to_string());
            warn(format!(
                "{who}: the cascading listener is encrypted, and {shown} was not found: \
                 the listener is left commented out in the output"
            ));
            let _ = writeln!(out, "# An encrypted cascading listener (liveproxyd 'tls': True) needs a certificate:");
            for l in lines.lines() {
                let _ = writeln!(out, "# {l}");
            }
            let _ = writeln!(out, "# tls = {{ cert_file = \"{shown}\", key_file = \"{shown}\" }}");
        }
    }
}
