//! Raw values to typed ones, with every problem in the file collected: each
//! with the key and the line it is on.
//!
//! A getter that finds a problem records it and returns `None`; the caller
//! keeps the default and goes on, so one run reports everything wrong.

use std::ops::{Range, RangeInclusive};
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::raw::{Field, RawConfig, RawInventory, RawSite, Scalar};
use super::units::{parse_duration, parse_size};
use super::{
    Config, ConfigError, InventoryConfig, ListenerTls, MAX_SOCKET_PATH, SiteAddress, SiteConfig, SiteParams,
    SpoolConfig, TcpListen,
};

mod sockets;

/// Durations anywhere: 1 ms to 7 days.
const DURATIONS: RangeInclusive<Duration> = Duration::from_millis(1)..=Duration::from_secs(7 * 86400);
/// TCP keepalive times: the kernel takes whole seconds, 1..=32767
/// (TCP_KEEPIDLE, TCP_KEEPINTVL).
const KEEPALIVE: RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(32767);

pub(super) struct Validator<'a> {
    text: &'a str,
    pub(super) errors: Vec<ConfigError>,
    /// `[defaults]` sets `channels_max` (then it does not follow `channels`).
    defaults_set_channels_max: bool,
}

/// Set each listed field of `$p` from the raw value of the same name, with
/// the getter (and its argument) named after the field.
macro_rules! set {
    ($v:ident, $raw:ident, $p:expr, $prefix:expr; $($field:ident: $get:ident $(($arg:expr))?),* $(,)?) => {
        $(
            let name = key_of($prefix, stringify!($field));
            if let Some(x) = $v.$get(&$raw.$field, &name $(, $arg)?) {
                $p.$field = x;
            }
        )*
    };
}

impl<'a> Validator<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Validator { text, errors: Vec::new(), defaults_set_channels_max: false }
    }

    pub(super) fn line(&self, offset: usize) -> usize {
        self.text.as_bytes()[..offset.min(self.text.len())].iter().filter(|b| **b == b'\n').count() + 1
    }

    pub(super) fn err(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let line = Some(self.line(span.start));
        self.errors.push(ConfigError { line, key: Some(key.to_owned()), message: message.into() });
    }

    fn wrong_type(&mut self, v: &Spanned<Scalar>, key: &str, expected: &str) {
        self.err(v.span(), key, format!("expected {expected}, found {}", v.get_ref().described()));
    }

    // === getters: Some(value), or None after recording the problem ===

    fn text(&mut self, v: &Field, key: &str) -> Option<String> {
        let v = v.as_ref()?;
        match v.get_ref() {
            Scalar::Text(t) => Some(t.clone()),
            _ => {
                self.wrong_type(v, key, "a string");
                None
            }
        }
    }

    fn path(&mut self, v: &Field, key: &str) -> Option<PathBuf> {
        let text = self.text(v, key)?;
        if text.is_empty() {
            self.err(v.as_ref()?.span(), key, "must not be empty");
            return None;
        }
        Some(PathBuf::from(text))
    }

    fn some_path(&mut self, v: &Field, key: &str) -> Option<Option<PathBuf>> {
        self.path(v, key).map(Some)
    }

    fn some_text(&mut self, v: &Field, key: &str) -> Option<Option<String>> {
        self.text(v, key).map(Some)
    }

    fn flag(&mut self, v: &Field, key: &str) -> Option<bool> {
        let v = v.as_ref()?;
        match v.get_ref() {
            Scalar::Bool(b) => Some(*b),
            _ => {
                self.wrong_type(v, key, "true or false");
                None
            }
        }
    }

    fn count(&mut self, v: &Field, key: &str, range: RangeInclusive<usize>) -> Option<usize> {
        let v = v.as_ref()?;
        let Scalar::Int(n) = v.get_ref() else {
            self.wrong_type(v, key, &format!("a whole number in {}..={}", range.start(), range.end()));
            return None;
        };
        match usize::try_from(*n) {
            Ok(n) if range.contains(&n) => Some(n),
            _ => {
                self.err(v.span(), key, format!("{n} is out of range {}..={}", range.start(), range.end()));
                None
            }
        }
    }

    fn size(&mut self, v: &Field, key: &str, range: RangeInclusive<u64>) -> Option<u64> {
        let v = v.as_ref()?;
        let n = match v.get_ref() {
            Scalar::Int(n) => match u64::try_from(*n) {
                Ok(n) => n,
                Err(_) => {
                    self.err(v.span(), key, format!("{n} is negative"));
                    return None;
                }
            },
            Scalar::Text(t) => match parse_size(t) {
                Ok(n) => n,
                Err(m) => {
                    self.err(v.span(), key, m);
                    return None;
                }
            },
            _ => {
                self.wrong_type(v, key, "a size such as \"64MiB\" or a number of bytes");
                return None;
            }
        };
        if !range.contains(&n) {
            self.err(v.span(), key, format!("{n} bytes is out of range {}..={}", range.start(), range.end()));
            return None;
        }
        Some(n)
    }

    fn byte_count(&mut self, v: &Field, key: &str, range: RangeInclusive<u64>) -> Option<usize> {
        self.size(v, key, range).map(|n| n as usize)
    }

    fn duration(&mut self, v: &Field, key: &str) -> Option<Duration> {
        self.duration_in(v, key, (DURATIONS, "1ms..=7d"))
    }

    fn some_duration(&mut self, v: &Field, key: &str) -> Option<Option<Duration>> {
        self.duration(v, key).map(Some)
    }

    fn duration_in(
        &mut self,
        v: &Field,
        key: &str,
        (range, range_text): (RangeInclusive<Duration>, &str),
    ) -> Option<Duration> {
        let v = v.as_ref()?;
        let Scalar::Text(t) = v.get_ref() else {
            self.wrong_type(v, key, "a duration such as \"5s\" or \"250ms\"");
            return None;
        };
        match parse_duration(t) {
            Ok(d) if range.contains(&d) => Some(d),
            Ok(_) => {
                self.err(v.span(), key, format!("'{t}' is out of range {range_text}"));
                None
            }
            Err(m) => {
                self.err(v.span(), key, m);
                None
            }
        }
    }

    // === the file ===

    pub(super) fn config(&mut self, raw: RawConfig) -> Config {
        let mut c = Config::default();
        set!(self, raw, c, "";
            socket_dir: path,
            pid_file: some_path,
            state_file: path,
            state_interval: duration,
            shutdown_grace: duration,
            worker_threads: count(1..=256),
            cache_budget: byte_count(0..=1 << 40),
            cache_max_entry: byte_count(0..=1 << 34),
            request_memory_wait: duration,
        );
        if let Some(text) = self.text(&raw.metrics_listen, "metrics_listen") {
            match text.parse::<std::net::SocketAddr>() {
                Ok(a) => c.metrics_listen = Some(a),
                Err(_) => {
                    let span = raw.metrics_listen.as_ref().map_or(0..0, |v| v.span());
                    self.err(span, "metrics_listen", format!("'{text}' is not an address such as \"127.0.0.1:9464\""));
                }
            }
        }
        let mut spool = SpoolConfig::default();
        let s = &mut spool;
        if let Some(d) = self.path(&raw.spool_dir, "spool_dir") {
            s.dir = d;
        }
        if let Some(n) = self.byte_count(&raw.spool_memory_per_response, "spool_memory_per_response", 0..=1 << 40) {
            s.memory_per_response = n;
        }
        if let Some(n) = self.byte_count(&raw.spool_memory_budget, "spool_memory_budget", 0..=1 << 40) {
            s.memory_budget = n;
        }
        if let Some(n) = self.size(&raw.spool_disk_budget, "spool_disk_budget", 0..=1 << 50) {
            s.disk_budget = n;
        }
        c.spool = spool;
        if let Some(inv) = raw.inventory {
            let span = inv.span();
            c.inventory = self.inventory(&inv.into_inner(), span);
        }

        let defaults = raw.defaults.map(|d| d.into_inner()).unwrap_or_default();
        for (field, what) in [
            (defaults.name.as_ref().map(|v| v.span()), "name"),
            (defaults.address.as_ref().map(|v| v.span()), "address"),
            (defaults.listen.as_ref().map(|v| v.span()), "listen"),
            (defaults.only_from.as_ref().map(|v| v.span()), "only_from"),
            (defaults.tls.as_ref().map(|v| v.span()), "tls"),
        ] {
            if let Some(span) = field {
                self.err(span, &format!("defaults.{what}"), "belongs in a [[site]] table, not in [defaults]");
            }
        }
        let base = self.params(&defaults, &SiteParams::default(), "defaults");

        // No [[site]] is valid: the daemon starts and says what to add
        // (the packaged default configuration has none).
        let raw_sites = raw.site.unwrap_or_default();
        let mut names = Vec::new();
        for (i, s) in raw_sites.into_iter().enumerate() {
            let span = s.span();
            let s = s.into_inner();
            if let Some(site) = self.site(&s, i + 1, span, &base, &c.socket_dir, &mut names) {
                c.sites.push(site);
            }
        }
        if let Some(n) = self.byte_count(&raw.federation_sort_budget, "federation_sort_budget", 0..=1 << 40) {
            c.federation_sort_budget = n;
        }
        if let Some(n) = self.byte_count(&raw.request_memory_budget, "request_memory_budget", 1 << 20..=1 << 40) {
            c.request_memory_budget = n;
        }
        // A request as large as a socket allows must fit in the budget,
        // with the copies made of it while it is answered.
        let sockets = std::iter::once(("[defaults]".to_owned(), &base))
            .chain(c.sites.iter().map(|s| (format!("site '{}'", s.name), &s.params)));
        let largest =
            sockets.reduce(|a, b| if b.1.limits.max_request_bytes > a.1.limits.max_request_bytes { b } else { a });
        if let Some((who, p)) = largest {
            let factor = 1 + super::REQUEST_COPIES;
            let (most, n) = (p.limits.max_request_bytes, c.request_memory_budget);
            if most.saturating_mul(factor) > n {
                let key = "request_memory_budget";
                let message = format!(
                    "{n} bytes is less than {factor} times the max_request_bytes of {who} ({most} bytes): a request \
                     that large, with the copies made of it while it is answered, would never fit"
                );
                match &raw.request_memory_budget {
                    Some(v) => self.err(v.span(), key, message),
                    None => self.errors.push(ConfigError {
                        line: None,
                        key: Some(key.into()),
                        message: format!("{message}; raise it"),
                    }),
                }
            }
        }
        for (i, f) in raw.federation.unwrap_or_default().into_iter().enumerate() {
            let span = f.span();
            if let Some(fed) = self.federation(&f.into_inner(), i + 1, span, &mut names, &c, &base) {
                c.federations.push(fed);
            }
        }
        c
    }

    fn federation(
        &mut self,
        f: &super::raw::RawFederation,
        n: usize,
        span: Range<usize>,
        names: &mut Vec<String>,
        c: &Config,
        base: &SiteParams,
    ) -> Option<super::FederationConfig> {
        let prefix = format!("federation[{n}]");
        let name_key = format!("{prefix}.name");
        let name = match &f.name {
            None => {
                self.err(span.clone(), &name_key, "is required");
                None
            }
            Some(v) => self.site_name(v, &name_key, &c.socket_dir, names),
        };
        let all: Vec<String> = c.sites.iter().map(|s| s.name.clone()).collect();
        let mut sites = Vec::new();
        match &f.sites {
            None => sites = all.clone(),
            Some(list) => {
                for v in list.get_ref() {
                    let key = format!("{prefix}.sites");
                    match v.get_ref() {
                        Scalar::Text(t) if all.contains(t) => sites.push(t.clone()),
                        Scalar::Text(t) => self.err(v.span(), &key, format!("'{t}' is not a configured site")),
                        _ => self.wrong_type(v, &key, "a site name"),
                    }
                }
                if sites.is_empty() && list.get_ref().is_empty() {
                    self.err(list.span(), &format!("{prefix}.sites"), "must name at least one site");
                }
            }
        }
        let mut fail = false;
        if let Some(t) = self.text(&f.on_site_error, &format!("{prefix}.on_site_error")) {
            match t.as_str() {
                "partial" => {}
                "fail" => fail = true,
                _ => {
                    let at = f.on_site_error.as_ref().map_or(span.clone(), |v| v.span());
                    self.err(at, &format!("{prefix}.on_site_error"), format!("'{t}' must be \"partial\" or \"fail\""));
                }
            }
        }
        let mut dialect = super::Dialect::Livestatus;
        if let Some(t) = self.text(&f.dialect, &format!("{prefix}.dialect")) {
            match t.as_str() {
                "livestatus" => {}
                "lmd" => dialect = super::Dialect::Lmd,
                _ => {
                    let at = f.dialect.as_ref().map_or(span.clone(), |v| v.span());
                    self.err(at, &format!("{prefix}.dialect"), format!("'{t}' must be \"livestatus\" or \"lmd\""));
                }
            }
        }
        let mut client = base.clone();
        let raw_commands = Commands {
            commands: &f.commands,
            listen_commands: &f.listen_commands,
            uids: &f.commands_from_uids,
            groups: &f.commands_from_groups,
        };
        self.commands(&mut client.commands, raw_commands, &prefix);
        let as_site = RawSite {
            listen: f.listen.clone(),
            only_from: f.only_from.clone(),
            tls: f.tls.clone(),
            socket_mode: f.socket_mode.clone(),
            socket_group: f.socket_group.clone(),
            allow_world_writable: f.allow_world_writable.clone(),
            ..RawSite::default()
        };
        let socket = self.socket(&as_site, &base.socket, &prefix);
        let listen = self.listen(&as_site, &prefix, span)?;
        Some(super::FederationConfig {
            name: name?,
            sites,
            fail_on_site_error: fail,
            listen,
            dialect,
            client: SiteParams { socket, ..client },
        })
    }

    fn inventory(&mut self, raw: &RawInventory, span: Range<usize>) -> Option<InventoryConfig> {
        let dir = match &raw.dir {
            None => {
                self.err(
                    span.clone(),
                    "inventory.dir",
                    "is required in [inventory] (the central site's inventory directory)",
                );
                None
            }
            Some(_) => self.path(&raw.dir, "inventory.dir"),
        };
        let mut c = InventoryConfig::new(dir.clone().unwrap_or_default());
        let at_least_1s = (Duration::from_secs(1)..=Duration::from_secs(7 * 86400), "1s..=7d");
        if let Some(d) = self.duration_in(&raw.interval, "inventory.interval", at_least_1s.clone()) {
            c.interval = d;
        }
        if let Some(d) = self.duration_in(&raw.full_interval, "inventory.full_interval", at_least_1s) {
            c.full_interval = d;
        }
        if let Some(n) = self.size(&raw.max_file_bytes, "inventory.max_file_bytes", 1024..=1 << 40) {
            c.max_file_bytes = n;
        }
        if c.full_interval < c.interval {
            let at = raw.full_interval.as_ref().or(raw.interval.as_ref()).map_or(span, |v| v.span());
            self.err(at, "inventory.full_interval", "must not be shorter than inventory.interval");
        }
        dir.map(|_| c)
    }

    fn site(
        &mut self,
        s: &RawSite,
        n: usize,
        span: Range<usize>,
        base: &SiteParams,
        socket_dir: &std::path::Path,
        names: &mut Vec<String>,
    ) -> Option<SiteConfig> {
        let prefix = format!("site[{n}]");
        let params = self.params(s, base, &prefix);
        let listen = self.listen(s, &prefix, span.clone());
        let name_key = format!("{prefix}.name");
        let name = match &s.name {
            None => {
                self.err(span.clone(), &name_key, "is required");
                None
            }
            Some(v) => self.site_name(v, &name_key, socket_dir, names),
        };
        let addr_key = format!("{prefix}.address");
        let address = match &s.address {
            None => {
                self.err(span, &addr_key, "is required");
                None
            }
            Some(v) => {
                let text = self.text(&s.address, &addr_key)?;
                match text.parse::<SiteAddress>() {
                    Ok(a) => Some((a, v.span())),
                    Err(m) => {
                        self.err(v.span(), &addr_key, m);
                        None
                    }
                }
            }
        };
        let ((address, addr_span), name, listen) = (address?, name?, listen?);
        if matches!(address, SiteAddress::Tls { .. }) && params.tls.verify && params.tls.ca_file.is_none() {
            self.err(
                addr_span,
                &format!("{prefix}.ca_file"),
                "is required for a tls:// address (or set verify = false to encrypt without verifying)",
            );
        }
        Some(SiteConfig { name, address, params, listen })
    }

    /// A valid, new site name (recorded in `names`) whose socket path fits.
    fn site_name(
        &mut self,
        v: &Spanned<Scalar>,
        key: &str,
        socket_dir: &std::path::Path,
        names: &mut Vec<String>,
    ) -> Option<String> {
        let Scalar::Text(n) = v.get_ref() else {
            self.wrong_type(v, key, "a string");
            return None;
        };
        let ok = !n.is_empty()
            && n.len() <= 64
            && n.as_bytes()[0].is_ascii_alphanumeric()
            && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok {
            self.err(
                v.span(),
                key,
                format!(
                    "'{n}' is not a valid site name (letters, digits, '_', '.', '-'; at most 64; starting with a \
                     letter or digit)"
                ),
            );
            return None;
        }
        if names.contains(n) {
            self.err(v.span(), key, format!("duplicate site name '{n}'"));
            return None;
        }
        names.push(n.clone());
        let sock = socket_dir.join(n);
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            self.err(
                v.span(),
                key,
                format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter socket_dir",
                    sock.display()
                ),
            );
            return None;
        }
        Some(n.clone())
    }

    fn listen(&mut self, raw: &RawSite, prefix: &str, site: Range<usize>) -> Option<Option<TcpListen>> {
        let Some(l) = &raw.listen else {
            if let Some(o) = &raw.only_from {
                self.err(o.span(), &format!("{prefix}.only_from"), "only_from needs listen");
            }
            if let Some(t) = &raw.tls {
                self.err(t.span(), &format!("{prefix}.tls"), "tls (for the TCP listener) needs listen");
            }
            return Some(None);
        };
        let key = format!("{prefix}.listen");
        let text = self.text(&raw.listen, &key)?;
        let addr: std::net::SocketAddr = match text.parse() {
            Ok(a) => a,
            Err(_) => {
                let msg = format!("'{text}' is not an address:port (e.g. \"127.0.0.1:6560\" or \"[::1]:6560\")");
                self.err(l.span(), &key, msg);
                return None;
            }
        };
        let from_key = format!("{prefix}.only_from");
        let mut only_from = Vec::new();
        let mut ok = true;
        for e in raw.only_from.iter().flat_map(|o| o.get_ref()) {
            let Scalar::Text(t) = e.get_ref() else {
                self.wrong_type(e, &from_key, "an address or network as a string");
                ok = false;
                continue;
            };
            let t = t.trim();
            match t.parse::<ipnet::IpNet>().or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)) {
                Ok(net) => only_from.push(net),
                Err(_) => {
                    self.err(e.span(), &from_key, format!("'{t}' is neither an address nor a network"));
                    ok = false;
                }
            }
        }
        if ok && only_from.is_empty() && !addr.ip().is_loopback() {
            let span = raw.only_from.as_ref().map_or(site, |o| o.span());
            self.err(
                span,
                &from_key,
                format!("is required (and must not be empty) when listening on the non-loopback address {addr}"),
            );
            ok = false;
        }
        let tls = match &raw.tls {
            None => None,
            Some(t) => {
                let tls_key = format!("{prefix}.tls");
                let t_span = t.span();
                let t = t.get_ref();
                let cert = self.path(&t.cert_file, &format!("{tls_key}.cert_file"));
                let key_file = self.path(&t.key_file, &format!("{tls_key}.key_file"));
                for (v, what) in [(&t.cert_file, "cert_file"), (&t.key_file, "key_file")] {
                    if v.is_none() {
                        self.err(t_span.clone(), &format!("{tls_key}.{what}"), "is required");
                    }
                }
                let clients = self.client_certificates(t, &tls_key);
                match (cert, key_file, clients) {
                    (Some(cert_file), Some(key_file), Some((client_ca, client_names))) => {
                        Some(ListenerTls { cert_file, key_file, client_ca, client_names })
                    }
                    _ => {
                        ok = false;
                        None
                    }
                }
            }
        };
        ok.then_some(Some(TcpListen { addr, only_from, tls }))
    }

    /// `tls_client_ca` and `tls_client_names` of a listener's `tls = { .. }`.
    fn client_certificates(
        &mut self,
        t: &super::raw::RawListenerTls,
        tls_key: &str,
    ) -> Option<(Option<PathBuf>, Vec<String>)> {
        let ca_key = format!("{tls_key}.tls_client_ca");
        let ca = match &t.tls_client_ca {
            None => None,
            Some(_) => Some(self.path(&t.tls_client_ca, &ca_key)?),
        };
        let names_key = format!("{tls_key}.tls_client_names");
        let Some(list) = &t.tls_client_names else { return Some((ca, Vec::new())) };
        let mut names = Vec::new();
        let mut ok = true;
        for v in list.get_ref() {
            match v.get_ref() {
                Scalar::Text(n) if !n.trim().is_empty() => names.push(n.trim().to_owned()),
                Scalar::Text(_) => {
                    self.err(v.span(), &names_key, "a name must not be empty");
                    ok = false;
                }
                _ => {
                    self.wrong_type(v, &names_key, "a name (a certificate's CN or DNS name) as a string");
                    ok = false;
                }
            }
        }
        if list.get_ref().is_empty() {
            self.err(
                list.span(),
                &names_key,
                "must name at least one name (leave it out to accept every certificate tls_client_ca signed)",
            );
            ok = false;
        }
        if ca.is_none() && t.tls_client_ca.is_none() {
            self.err(
                list.span(),
                &names_key,
                "needs tls_client_ca: the names are checked on client certificates a CA of tls_client_ca signed",
            );
            ok = false;
        }
        ok.then_some((ca, names))
    }

    fn params(&mut self, raw: &RawSite, base: &SiteParams, prefix: &str) -> SiteParams {
        let mut p = base.clone();
        set!(self, raw, p, prefix;
            channels: count(1..=50),
            channels_max: count(1..=200),
            channel_idle_timeout: duration,
            pipeline_depth: count(1..=64),
            heartbeat_interval: duration,
            heartbeat_timeout: duration,
            channel_timeout: duration,
            query_timeout: duration,
            connect_retry: duration,
            channel_retry: duration,
            connect_timeout: duration,
            client_idle_timeout: duration,
            client_request_timeout: duration,
            max_clients: count(1..=1_000_000),
            tcp_user_timeout: duration,
            response_idle_timeout: duration,
            send_stall_grace: duration,
            cache: flag,
            cache_max_age: some_duration,
            coalesce: flag,
            inventory: flag,
            audit_command_arguments: flag,
            slow_query_threshold: some_duration,
            slow_query_log_values: flag,
            fair_share: flag,
        );
        self.commands(&mut p.commands, Commands::of_site(raw), prefix);
        set!(self, raw, p.limits, prefix;
            max_request_bytes: byte_count(1024..=1 << 30),
            max_header_lines: count(1..=10_000_000),
            max_line_bytes: byte_count(64..=1 << 30),
        );
        let k = &mut p.keepalive;
        if let Some(d) = self.duration_in(&raw.keepalive_idle, &format!("{prefix}.keepalive_idle"), keepalive()) {
            k.idle = d;
        }
        if let Some(d) = self.duration_in(&raw.keepalive_interval, &format!("{prefix}.keepalive_interval"), keepalive())
        {
            k.interval = d;
        }
        if let Some(n) = self.count(&raw.keepalive_count, &format!("{prefix}.keepalive_count"), 1..=100) {
            k.count = n as u32;
        }
        let t = &mut p.tls;
        set!(self, raw, t, prefix;
            ca_file: some_path,
            verify: flag,
            server_name: some_text,
        );
        if let Some(d) = self.duration(&raw.tls_handshake_timeout, &format!("{prefix}.tls_handshake_timeout")) {
            p.tls.handshake_timeout = d;
        }
        let cert = self.path(&raw.client_cert_file, &format!("{prefix}.client_cert_file"));
        let key = self.path(&raw.client_key_file, &format!("{prefix}.client_key_file"));
        match (&raw.client_cert_file, &raw.client_key_file, cert, key) {
            (_, _, Some(c), Some(k)) => p.tls.client_cert = Some((c, k)),
            (Some(c), None, ..) => {
                self.err(c.span(), &format!("{prefix}.client_key_file"), "is required with client_cert_file")
            }
            (None, Some(k), ..) => {
                self.err(k.span(), &format!("{prefix}.client_cert_file"), "is required with client_key_file")
            }
            _ => {}
        }
        p.socket = self.socket(raw, &base.socket, prefix);
        // Unless set anywhere, channels_max follows channels up.
        if prefix == "defaults" {
            self.defaults_set_channels_max = raw.channels_max.is_some();
        }
        if raw.channels_max.is_none() && !self.defaults_set_channels_max {
            p.channels_max = p.channels.max(super::DEFAULT_CHANNELS_MAX);
        }
        if let Some(m) = raw.channels_max.as_ref().or(raw.channels.as_ref())
            && p.channels_max < p.channels
        {
            self.err(
                m.span(),
                &key_of(prefix, "channels_max"),
                format!("{} is below channels ({})", p.channels_max, p.channels),
            );
        }
        if let Some(t) = raw.heartbeat_timeout.as_ref().or(raw.heartbeat_interval.as_ref())
            && p.heartbeat_timeout > p.heartbeat_interval
        {
            self.err(
                t.span(),
                &format!("{prefix}.heartbeat_timeout"),
                format!(
                    "{} is longer than heartbeat_interval ({})",
                    humantime::format_duration(p.heartbeat_timeout),
                    humantime::format_duration(p.heartbeat_interval)
                ),
            );
        }
        p
    }
}

/// The command keys of a table as written.
struct Commands<'r> {
    commands: &'r Field,
    listen_commands: &'r Field,
    uids: &'r Option<Spanned<Vec<Spanned<Scalar>>>>,
    groups: &'r Option<Spanned<Vec<Spanned<Scalar>>>>,
}

impl<'r> Commands<'r> {
    fn of_site(raw: &'r RawSite) -> Self {
        Commands {
            commands: &raw.commands,
            listen_commands: &raw.listen_commands,
            uids: &raw.commands_from_uids,
            groups: &raw.commands_from_groups,
        }
    }
}

impl Validator<'_> {
    /// `"allow"` or `"deny"`.
    fn allow(&mut self, v: &Field, key: &str) -> Option<bool> {
        let t = self.text(v, key)?;
        match t.as_str() {
            "allow" => Some(true),
            "deny" => Some(false),
            _ => {
                self.err(v.as_ref()?.span(), key, format!("'{t}' must be \"allow\" or \"deny\""));
                None
            }
        }
    }

    /// Who may send commands: `commands`, `listen_commands` (default: as
    /// `commands`), and the local users and groups, resolved here (an
    /// unknown name is an error with its line).
    fn commands(&mut self, c: &mut super::CommandPolicy, raw: Commands<'_>, prefix: &str) {
        if let Some(a) = self.allow(raw.commands, &key_of(prefix, "commands")) {
            c.allow = a;
            c.listen_allow = a;
        }
        if let Some(a) = self.allow(raw.listen_commands, &key_of(prefix, "listen_commands")) {
            c.listen_allow = a;
        }
        if let Some(list) = raw.uids {
            let key = key_of(prefix, "commands_from_uids");
            c.from_uids = list.get_ref().iter().filter_map(|v| self.local_id(v, &key, Id::User)).collect();
        }
        if let Some(list) = raw.groups {
            let key = key_of(prefix, "commands_from_groups");
            c.from_gids = list.get_ref().iter().filter_map(|v| self.local_id(v, &key, Id::Group)).collect();
        }
    }

    /// A user or group by name or number (a number need not exist).
    fn local_id(&mut self, v: &Spanned<Scalar>, key: &str, what: Id) -> Option<u32> {
        let noun = if what == Id::User { "user" } else { "group" };
        match v.get_ref() {
            Scalar::Int(n) => match u32::try_from(*n) {
                Ok(id) => Some(id),
                Err(_) => {
                    self.err(v.span(), key, format!("{n} is not a {noun} id"));
                    None
                }
            },
            Scalar::Text(name) => {
                let found = match what {
                    Id::User => nix::unistd::User::from_name(name).map(|u| u.map(|u| u.uid.as_raw())),
                    Id::Group => nix::unistd::Group::from_name(name).map(|g| g.map(|g| g.gid.as_raw())),
                };
                match found {
                    Ok(Some(id)) => Some(id),
                    Ok(None) => {
                        self.err(v.span(), key, format!("no {noun} '{name}' on this system"));
                        None
                    }
                    Err(e) => {
                        self.err(v.span(), key, format!("cannot look up {noun} '{name}': {e}"));
                        None
                    }
                }
            }
            _ => {
                self.wrong_type(v, key, &format!("a {noun} name or id"));
                None
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Id {
    User,
    Group,
}

/// `prefix.field`, or `field` at the top level.
fn key_of(prefix: &str, field: &str) -> String {
    if prefix.is_empty() { field.to_owned() } else { format!("{prefix}.{field}") }
}

fn keepalive() -> (RangeInclusive<Duration>, &'static str) {
    (KEEPALIVE, "1s..=32767s")
}
