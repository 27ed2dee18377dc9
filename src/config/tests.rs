//! Config parsing and validation tests: every rejection names key and line.

use super::*;

const GOOD: &str = r#"
socket_dir = "/tmp/lm"
state_file = "/tmp/lm/state.json"
[defaults]
channels = 3
heartbeat_interval = "2s"
[[site]]
name = "berlin"
address = "tcp://10.1.2.3:6557"
[[site]]
name = "paris"
address = "unix:///omd/sites/paris/tmp/run/live"
channels = 7
query_timeout = "30s"
"#;

/// The first problem found (most tests have one).
fn error(text: &str) -> ConfigError {
    let all = Config::from_toml(text).expect_err("config should be rejected");
    all.0.into_iter().next().expect("at least one error")
}

#[test]
fn defaults_and_overrides() {
    let c = Config::from_toml(GOOD).unwrap();
    assert_eq!(c.socket_dir, PathBuf::from("/tmp/lm"));
    assert_eq!(c.state_interval, Duration::from_secs(5));
    assert_eq!(c.sites.len(), 2);
    let berlin = &c.sites[0];
    assert_eq!(berlin.address, SiteAddress::Tcp { host: "10.1.2.3".into(), port: 6557 });
    assert_eq!(berlin.params.channels, 3);
    assert_eq!(berlin.params.heartbeat_interval, Duration::from_secs(2));
    assert_eq!(berlin.params.heartbeat_timeout, Duration::from_secs(2));
    assert_eq!(berlin.params.channel_timeout, Duration::from_secs(3));
    assert_eq!(berlin.params.query_timeout, Duration::from_secs(120));
    assert_eq!(berlin.params.connect_retry, Duration::from_secs(4));
    let paris = &c.sites[1];
    assert_eq!(paris.address, SiteAddress::Unix("/omd/sites/paris/tmp/run/live".into()));
    assert_eq!(paris.params.channels, 7);
    assert_eq!(paris.params.query_timeout, Duration::from_secs(30));
    assert_eq!(c.socket_path("paris"), PathBuf::from("/tmp/lm/paris"));
}

#[test]
fn built_in_defaults_match_the_reference_proxy() {
    let c = Config::from_toml("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n").unwrap();
    let p = &c.sites[0].params;
    assert_eq!(p.channels, 5);
    assert_eq!(p.heartbeat_interval, Duration::from_secs(5));
    assert_eq!(p.heartbeat_timeout, Duration::from_secs(2));
    assert_eq!(p.channel_timeout, Duration::from_secs(3));
    assert_eq!(p.query_timeout, Duration::from_secs(120));
    assert_eq!(p.connect_retry, Duration::from_secs(4));
    assert_eq!(c.socket_dir, PathBuf::from("/run/livemux"));
    assert_eq!(c.state_file, PathBuf::from("/var/lib/livemux/state.json"));
}

#[test]
fn unknown_key_names_key_and_line() {
    let e = error("[defaults]\nchannels = 2\nchanels = 3\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n");
    assert_eq!(e.line, Some(3));
    assert_eq!(e.key.as_deref(), Some("defaults.chanels"));
    assert_eq!(e.message, "unknown key `chanels`; did you mean `channels`?");
}

#[test]
fn bad_duration_names_key_and_line() {
    let e = error("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nheartbeat_timeout = \"2 parsecs\"\n");
    assert_eq!(e.line, Some(4));
    assert_eq!(e.key.as_deref(), Some("site[1].heartbeat_timeout"));
    assert!(e.to_string().starts_with("line 4: site[1].heartbeat_timeout: '2 parsecs' is not a duration"), "{e}");
}

#[test]
fn duplicate_names_are_rejected() {
    let e = error("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:2\"\n");
    assert_eq!(e.line, Some(5));
    assert_eq!(e.message, "duplicate site name 'a'");
}

#[test]
fn out_of_range_values_are_rejected() {
    let e = error("[defaults]\nchannels = 51\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n");
    assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("defaults.channels")));
    assert_eq!(e.message, "51 is out of range 1..=50");
    let e = error("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nchannels = 0\n");
    assert_eq!((e.line, e.key.as_deref()), (Some(4), Some("site[1].channels")));
    let e = error(
        "[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nheartbeat_interval = \"1s\"\nheartbeat_timeout = \"3s\"\n",
    );
    assert_eq!(e.key.as_deref(), Some("site[1].heartbeat_timeout"));
    assert!(e.message.contains("longer than heartbeat_interval"), "{e}");
    let e = error("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nquery_timeout = \"0s\"\n");
    assert!(e.message.contains("out of range"), "{e}");
}

#[test]
fn addresses_and_names_are_checked() {
    for (addr, want) in [
        ("http://h:1", "must start with tcp://, tls:// or unix://"),
        ("tcp://h", "missing :port"),
        ("tcp://h:99999", "invalid port"),
        ("tcp://:5", "missing or invalid host"),
        ("unix://relative/x", "must be absolute"),
    ] {
        let e = error(&format!("[[site]]\nname = \"a\"\naddress = \"{addr}\"\n"));
        assert_eq!(e.line, Some(3), "{addr}");
        assert!(e.message.contains(want), "{addr}: {e}");
    }
    let v6: SiteAddress = "tcp://[::1]:6557".parse().unwrap();
    assert_eq!(v6, SiteAddress::Tcp { host: "::1".into(), port: 6557 });
    assert_eq!(v6.to_string(), "tcp://[::1]:6557");
    let e = error("[[site]]\nname = \"../etc\"\naddress = \"tcp://h:1\"\n");
    assert!(e.message.contains("not a valid site name"), "{e}");
    let e = error("[[site]]\naddress = \"tcp://h:1\"\n");
    assert_eq!(e.key.as_deref(), Some("site[1].name"));
    // No site at all is a valid (idle) configuration.
    assert!(Config::from_toml("socket_dir = \"/tmp\"\n").is_ok_and(|c| c.sites.is_empty()));
    let e = error("[defaults]\nname = \"x\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n");
    assert_eq!(e.line, Some(2));
}

#[test]
fn socket_path_length_is_checked() {
    let dir = "/".to_string() + &"d".repeat(100);
    let e = error(&format!("socket_dir = \"{dir}\"\n[[site]]\nname = \"abcdefghij\"\naddress = \"tcp://h:1\"\n"));
    assert!(e.message.contains("longer than 107 bytes"), "{e}");
}

#[test]
fn syntax_errors_have_lines() {
    let e = error("[[site]]\nname = \"a\nother = 1\n");
    assert_eq!(e.line, Some(2));
}

#[test]
fn sizes_take_units_or_plain_bytes() {
    let c = Config::from_toml(
        "spool_dir = \"/var/spool/lm\"\nspool_memory_per_response = \"1MiB\"\nspool_memory_budget = 0\n\
         spool_disk_budget = \"10GiB\"\n[defaults]\nmax_request_bytes = \"64KiB\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n",
    )
    .unwrap();
    assert_eq!(c.spool.dir, PathBuf::from("/var/spool/lm"));
    assert_eq!(c.spool.memory_per_response, 1 << 20);
    assert_eq!(c.spool.memory_budget, 0);
    assert_eq!(c.spool.disk_budget, 10 << 30);
    assert_eq!(c.sites[0].params.limits.max_request_bytes, 64 << 10);
    let e = error("spool_disk_budget = \"huge\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n");
    assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("spool_disk_budget")));
}

#[test]
fn spool_defaults() {
    let c = Config::from_toml("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n").unwrap();
    assert_eq!(c.spool, SpoolConfig::default());
    assert_eq!(c.spool.memory_per_response, 2 << 20);
    assert_eq!(c.spool.memory_budget, 32 << 20);
    assert_eq!(c.spool.disk_budget, 4 << 30);
}

#[test]
fn tcp_listener_and_only_from() {
    let c = Config::from_toml(
        "[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nlisten = \"0.0.0.0:6560\"\nonly_from = [\"127.0.0.1\", \"10.0.0.0/8\", \"::1\"]\n",
    )
    .unwrap();
    let l = c.sites[0].listen.clone().unwrap();
    assert_eq!(l.addr, "0.0.0.0:6560".parse().unwrap());
    assert!(l.allows("127.0.0.1".parse().unwrap()));
    assert!(l.allows("10.1.2.3".parse().unwrap()));
    assert!(l.allows("::ffff:10.9.9.9".parse().unwrap()), "IPv4-mapped addresses count as IPv4");
    assert!(l.allows("::1".parse().unwrap()));
    assert!(!l.allows("192.168.1.1".parse().unwrap()));
    // Loopback without only_from: anyone local.
    let c = Config::from_toml("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nlisten = \"[::1]:0\"\n").unwrap();
    assert!(c.sites[0].listen.as_ref().unwrap().only_from.is_empty());
    let e = error("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nlisten = \"0.0.0.0:6560\"\n");
    assert_eq!(e.key.as_deref(), Some("site[1].only_from"));
    assert!(e.message.contains("is required"), "{e}");
    let e =
        error("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nlisten = \"0.0.0.0:1\"\nonly_from = [\"nonsense\"]\n");
    assert_eq!((e.line, e.key.as_deref()), (Some(5), Some("site[1].only_from")));
    let e = error("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nlisten = \"localhost\"\n");
    assert_eq!(e.key.as_deref(), Some("site[1].listen"));
    let e = error("[defaults]\nlisten = \"127.0.0.1:1\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n");
    assert_eq!(e.key.as_deref(), Some("defaults.listen"));
}

#[test]
fn keepalive_and_peer_timeouts() {
    let c = Config::from_toml(
        "[defaults]\nkeepalive_idle = \"1s\"\nkeepalive_interval = \"2s\"\nkeepalive_count = 2\n\
         send_stall_grace = \"2s\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\ntcp_user_timeout = \"3s\"\n",
    )
    .unwrap();
    let p = &c.sites[0].params;
    assert_eq!(p.keepalive, Keepalive { idle: Duration::from_secs(1), interval: Duration::from_secs(2), count: 2 });
    assert_eq!(p.send_stall_grace, Duration::from_secs(2));
    assert_eq!(p.tcp_user_timeout, Duration::from_secs(3));
    let d = SiteParams::default();
    assert_eq!(d.keepalive, Keepalive { idle: Duration::from_secs(10), interval: Duration::from_secs(5), count: 3 });
    assert_eq!(d.send_stall_grace, Duration::from_secs(30));
    assert_eq!(d.client_request_timeout, Duration::from_secs(10));
    // The kernel takes keepalive times in whole seconds up to 32767.
    for bad in ["keepalive_idle = \"500ms\"", "keepalive_interval = \"12h\""] {
        let e = error(&format!("[defaults]\n{bad}\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n"));
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("out of range 1s..=32767s"), "{e}");
    }
}

#[test]
fn tls_sites_and_listeners() {
    let c = Config::from_toml(
        "[defaults]\nca_file = \"/etc/livemux/ca.pem\"\n[[site]]\nname = \"a\"\naddress = \"tls://h:6557\"\n\
         client_cert_file = \"/c.pem\"\nclient_key_file = \"/c.key\"\ntls_handshake_timeout = \"2s\"\n\
         [[site]]\nname = \"b\"\naddress = \"tls://h:6558\"\nverify = false\nserver_name = \"site-b\"\n\
         listen = \"127.0.0.1:6560\"\ntls = { cert_file = \"/l.pem\", key_file = \"/l.key\" }\n",
    )
    .unwrap();
    let a = &c.sites[0];
    assert_eq!(a.address, SiteAddress::Tls { host: "h".into(), port: 6557 });
    assert_eq!(a.address.to_string(), "tls://h:6557");
    assert_eq!(a.params.tls.ca_file, Some(PathBuf::from("/etc/livemux/ca.pem")));
    assert!(a.params.tls.verify);
    assert_eq!(a.params.tls.client_cert, Some((PathBuf::from("/c.pem"), PathBuf::from("/c.key"))));
    assert_eq!(a.params.tls.handshake_timeout, Duration::from_secs(2));
    let b = &c.sites[1];
    assert!(!b.params.tls.verify);
    assert_eq!(b.params.tls.server_name.as_deref(), Some("site-b"));
    let l = b.listen.as_ref().unwrap().tls.clone().unwrap();
    assert_eq!((l.cert_file, l.key_file), (PathBuf::from("/l.pem"), PathBuf::from("/l.key")));
    let e = error("[[site]]\nname = \"a\"\naddress = \"tls://h:1\"\n");
    assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("site[1].ca_file")));
    let e = error("[[site]]\nname = \"a\"\naddress = \"tls://h:1\"\nverify = false\nclient_cert_file = \"/c\"\n");
    assert_eq!(e.key.as_deref(), Some("site[1].client_key_file"));
    let e = error("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\ntls = { cert_file = \"/a\", key_file = \"/b\" }\n");
    assert_eq!(e.key.as_deref(), Some("site[1].tls"));
    let e =
        error("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nlisten = \"127.0.0.1:1\"\ntls = { cert = \"/a\" }\n");
    assert_eq!((e.line, e.key.as_deref()), (Some(5), Some("site[1].tls.cert")));
    assert_eq!(e.message, "unknown key `cert`");
}

#[test]
fn cache_settings() {
    let c = Config::from_toml(
        "cache_budget = \"8MiB\"\ncache_max_entry = \"64KiB\"\n[defaults]\ncache_max_age = \"10m\"\n\
         [[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n[[site]]\nname = \"b\"\naddress = \"tcp://h:2\"\n\
         cache = false\ncoalesce = true\n",
    )
    .unwrap();
    assert_eq!((c.cache_budget, c.cache_max_entry), (8 << 20, 64 << 10));
    assert!(c.sites[0].params.cache && !c.sites[0].params.coalesce);
    assert_eq!(c.sites[0].params.cache_max_age, Some(Duration::from_secs(600)));
    assert!(!c.sites[1].params.cache && c.sites[1].params.coalesce);
    let d = Config::from_toml("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n").unwrap();
    assert_eq!((d.cache_budget, d.cache_max_entry), (64 << 20, 1 << 20));
    assert!(d.sites[0].params.cache);
    assert_eq!(d.sites[0].params.cache_max_age, None);
    assert_eq!(d.sites[0].params.channel_retry, Duration::from_secs(60));
    let r = Config::from_toml("[defaults]\nchannel_retry = \"30s\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n")
        .unwrap();
    assert_eq!(r.sites[0].params.channel_retry, Duration::from_secs(30));
}

#[test]
fn every_problem_in_a_file_is_reported_at_once_in_line_order() {
    let text = "socket_dir = 5\n\
                [defaults]\n\
                chanels = 3\n\
                query_timeout = \"soon\"\n\
                max_request_bytes = \"4m\"\n\
                [[site]]\n\
                name = \"a\"\n\
                address = \"tcp://h\"\n\
                channels = \"five\"\n\
                [[site]]\n\
                name = \"a\"\n\
                address = \"tcp://h:2\"\n\
                verify = \"yes\"\n";
    let errors = Config::from_toml(text).expect_err("rejected").0;
    let got: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        got,
        [
            "line 1: socket_dir: expected a string, found the number 5",
            "line 3: defaults.chanels: unknown key `chanels`; did you mean `channels`?",
            "line 4: defaults.query_timeout: 'soon' is not a duration (expected number at 0); write e.g. \"5s\" or \"250ms\"",
            "line 5: defaults.max_request_bytes: '4m': 'm' could mean either; write 4MiB (powers of 1024) or 4MB (powers of 1000)",
            "line 8: site[1].address: 'tcp://h': missing :port",
            "line 9: site[1].channels: expected a whole number in 1..=50, found the string \"five\"",
            "line 11: site[2].name: duplicate site name 'a'",
            "line 13: site[2].verify: expected true or false, found the string \"yes\"",
        ]
    );
    // And the whole report, one problem per line.
    assert_eq!(ConfigErrors(errors).to_string().lines().count(), 8);
}

#[test]
fn every_syntax_error_is_reported_with_its_line() {
    let errors = Config::from_toml("a = \n[[site]]\nname = \"x\"\nb = = 2\n").expect_err("rejected").0;
    let mut lines: Vec<_> = errors.iter().map(|e| e.line).collect();
    lines.dedup();
    assert_eq!(lines, [Some(1), Some(4)], "both bad lines, in order: {errors:?}");
}

#[test]
fn an_elastic_pool_and_pipelining_have_keys_and_checks() {
    let c = Config::from_toml(
        "[defaults]\nchannel_idle_timeout = \"30s\"\npipeline_depth = 6\n[[site]]\nname = \"a\"\n\
         address = \"tcp://h:1\"\n[[site]]\nname = \"b\"\naddress = \"tcp://h:2\"\nchannels = 15\n\
         [[site]]\nname = \"c\"\naddress = \"tcp://h:3\"\nchannels = 2\nchannels_max = 4\npipeline_depth = 1\n",
    )
    .unwrap();
    let p: Vec<_> =
        c.sites.iter().map(|s| (s.params.channels, s.params.channels_max, s.params.pipeline_depth)).collect();
    assert_eq!(p, [(5, 10, 6), (15, 15, 6), (2, 4, 1)], "channels_max follows a larger channels unless set");
    assert_eq!(c.sites[0].params.channel_idle_timeout, Duration::from_secs(30));
    let d = SiteParams::default();
    assert_eq!((d.channels_max, d.channel_idle_timeout, d.pipeline_depth), (10, Duration::from_secs(60), 8));
    let e = error("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nchannels = 8\nchannels_max = 6\n");
    assert_eq!((e.line, e.key.as_deref()), (Some(5), Some("site[1].channels_max")));
    assert_eq!(e.message, "6 is below channels (8)");
    let e = error("[defaults]\nchannels_max = 6\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nchannels = 8\n");
    assert_eq!(e.key.as_deref(), Some("site[1].channels_max"), "set in [defaults]: it does not follow");
    let e = error("[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\npipeline_depth = 0\n");
    assert_eq!(e.message, "0 is out of range 1..=64");
}

#[test]
fn inventory_sync_is_off_unless_configured_and_checked_when_it_is() {
    assert_eq!(Config::from_toml(GOOD).unwrap().inventory, None);
    let on = format!(
        "{GOOD}inventory = false\n[inventory]\ndir = \"/omd/sites/central/var/check_mk/inventory\"\ninterval = \"30s\"\n"
    );
    let c = Config::from_toml(&on).unwrap();
    let inv = c.inventory.expect("configured");
    assert_eq!(inv.dir, PathBuf::from("/omd/sites/central/var/check_mk/inventory"));
    assert_eq!(inv.interval, Duration::from_secs(30));
    assert_eq!(inv.full_interval, Duration::from_secs(600));
    assert_eq!(inv.max_file_bytes, 256 << 20);
    assert!(c.sites[0].params.inventory, "on by default");
    assert!(!c.sites[1].params.inventory, "paris opts out");

    // Line numbers after GOOD's last line.
    let at = |n: usize| Some(GOOD.lines().count() + n);
    let e = error(&format!("{GOOD}[inventory]\ninterval = \"30s\"\n"));
    assert_eq!((e.line, e.key.as_deref()), (at(1), Some("inventory.dir")));
    assert!(e.message.contains("is required"), "{e}");
    let e = error(&format!("{GOOD}[inventory]\ndir = \"/x\"\ninterval = \"5m\"\nfull_interval = \"1m\"\n"));
    assert_eq!((e.line, e.key.as_deref()), (at(4), Some("inventory.full_interval")));
    let e = error(&format!("{GOOD}[inventory]\ndir = \"/x\"\ninterval = \"10ms\"\n"));
    assert_eq!((e.line, e.key.as_deref()), (at(3), Some("inventory.interval")));
    let e = error(&format!("{GOOD}[inventory]\ndir = \"/x\"\nintervall = \"1m\"\n"));
    assert_eq!((e.line, e.key.as_deref()), (at(3), Some("inventory.intervall")));
    let e = error(&format!("{GOOD}inventory = \"yes\"\n"));
    assert_eq!(e.key.as_deref(), Some("site[2].inventory"));
}

#[test]
fn federations_name_known_sites_and_no_site_s_name() {
    let c = Config::from_toml(&format!("{GOOD}[[federation]]\nname = \"all\"\n[[federation]]\nname = \"eu\"\nsites = [\"paris\"]\non_site_error = \"fail\"\ndialect = \"lmd\"\n")).unwrap();
    assert_eq!((c.federations[0].dialect, c.federations[1].dialect), (Dialect::Livestatus, Dialect::Lmd));
    assert_eq!(c.federations[0].sites, vec!["berlin".to_owned(), "paris".to_owned()], "default: every site");
    assert!(!c.federations[0].fail_on_site_error);
    assert_eq!(c.federations[0].client.heartbeat_interval, Duration::from_secs(2), "[defaults] apply to its clients");
    assert_eq!((c.federations[1].sites.clone(), c.federations[1].fail_on_site_error), (vec!["paris".to_owned()], true));
    let e = error(&format!("{GOOD}[[federation]]\nname = \"x\"\nsites = [\"rome\"]\n"));
    assert_eq!(e.key.as_deref(), Some("federation[1].sites"));
    assert!(e.message.contains("'rome' is not a configured site"), "{e}");
    let e = error(&format!("{GOOD}[[federation]]\nname = \"paris\"\n"));
    assert_eq!(e.key.as_deref(), Some("federation[1].name"));
    let e = error(&format!("{GOOD}[[federation]]\nname = \"x\"\non_site_error = \"maybe\"\n"));
    assert_eq!(e.key.as_deref(), Some("federation[1].on_site_error"));
    let e = error(&format!("{GOOD}[[federation]]\nname = \"x\"\ndialect = \"thruk\"\n"));
    assert_eq!(e.key.as_deref(), Some("federation[1].dialect"));
    assert!(e.message.contains("must be \"livestatus\" or \"lmd\""), "{e}");
}

#[test]
fn request_memory_budget_must_hold_the_largest_request_and_its_copies() {
    const SITE: &str = "[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n";
    let c = Config::from_toml(SITE).unwrap();
    assert_eq!((c.request_memory_budget, c.request_memory_wait), (64 << 20, Duration::from_secs(1)));
    let c = Config::from_toml(&format!("request_memory_budget = \"12MiB\"\nrequest_memory_wait = \"250ms\"\n{SITE}"))
        .unwrap();
    assert_eq!((c.request_memory_budget, c.request_memory_wait), (12 << 20, Duration::from_millis(250)));
    // 4 MiB requests (the default) need 12 MiB.
    let e = error(&format!("request_memory_budget = \"8MiB\"\n{SITE}"));
    assert_eq!((e.line, e.key.as_deref()), (Some(1), Some("request_memory_budget")));
    assert!(e.message.contains("less than 3 times the max_request_bytes of [defaults] (4194304 bytes)"), "{e}");
    // The default budget against a site allowing larger requests: no line.
    let e = error(&format!("{SITE}max_request_bytes = \"32MiB\"\n"));
    assert_eq!((e.line, e.key.as_deref()), (None, Some("request_memory_budget")));
    assert!(e.message.contains("max_request_bytes of site 'a' (33554432 bytes)"), "{e}");
    assert!(e.message.ends_with("raise it"), "{e}");
}

/// A site `a` with `extra` lines, after `[defaults]` with `defaults`.
fn site_with(defaults: &str, extra: &str) -> String {
    format!("[defaults]\n{defaults}\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n{extra}\n")
}

#[test]
fn socket_mode_is_octal_digits_or_an_octal_number_and_never_ambiguous() {
    let mode = |extra: &str| Config::from_toml(&site_with("", extra)).map(|c| c.sites[0].params.socket.mode);
    assert_eq!(mode(""), Ok(0o660), "the default");
    assert_eq!(mode("socket_mode = \"0640\""), Ok(0o640));
    assert_eq!(mode("socket_mode = \"600\""), Ok(0o600));
    assert_eq!(mode("socket_mode = 0o620"), Ok(0o620));
    let e = error(&site_with("", "socket_mode = 660"));
    assert_eq!((e.line, e.key.as_deref()), (Some(6), Some("site[1].socket_mode")));
    assert_eq!(
        e.message,
        "the decimal number 660 is ambiguous as a mode (660 is not 0o660): write it as a string of octal digits such \
         as \"0660\" (as chmod takes it) or as a TOML octal number such as 0o660"
    );
    assert!(error(&site_with("", "socket_mode = \"0680\"")).message.starts_with("\"0680\" is not a mode"));
    assert!(error(&site_with("", "socket_mode = \"rw-rw----\"")).message.starts_with("\"rw-rw----\" is not a mode"));
    assert!(error(&site_with("", "socket_mode = \"4660\"")).message.contains("special bits"));
    assert!(error(&site_with("", "socket_mode = 0o1660")).message.contains("go up to 0o777"));
    assert!(error(&site_with("", "socket_mode = 0x1b0")).message.contains("ambiguous"));
}

#[test]
fn a_world_writable_socket_must_be_allowed_in_so_many_words() {
    let e = error(&site_with("", "socket_mode = \"0666\""));
    assert_eq!((e.line, e.key.as_deref()), (Some(6), Some("site[1].socket_mode")));
    assert!(e.message.starts_with("\"0666\" lets every local user connect to the socket"), "{}", e.message);
    assert!(e.message.contains("allow_world_writable = true"), "{}", e.message);
    let c = Config::from_toml(&site_with("", "socket_mode = \"0666\"\nallow_world_writable = true")).unwrap();
    assert_eq!(c.sites[0].params.socket.mode, 0o666);
    // Read (o+r) alone lets nobody connect: no objection.
    assert!(Config::from_toml(&site_with("", "socket_mode = \"0664\"")).is_ok());
    // Allowed in [defaults], withdrawn in the site: the site's line is named.
    let e = error(&site_with("socket_mode = \"0666\"\nallow_world_writable = true", "allow_world_writable = false"));
    assert_eq!((e.line, e.key.as_deref()), (Some(7), Some("site[1].allow_world_writable")));
    assert!(e.message.starts_with("socket_mode \"0666\" (from [defaults]) lets every local user"), "{}", e.message);
    // [defaults] refused once, not again for every site (nor for a site's
    // own mode that was refused for its syntax).
    let all = Config::from_toml(&site_with("socket_mode = \"0666\"", "")).unwrap_err();
    assert_eq!(all.0.len(), 1, "{all}");
    assert_eq!(all.0[0].key.as_deref(), Some("defaults.socket_mode"));
    let all = Config::from_toml(&site_with("socket_mode = \"0666\"", "socket_mode = 660")).unwrap_err();
    assert_eq!(all.0.len(), 2, "{all}");
    assert!(all.0[1].message.starts_with("the decimal number 660"), "{all}");
}

#[test]
fn socket_group_is_a_known_name_or_a_number() {
    let group = |extra: &str| Config::from_toml(&site_with("", extra)).map(|c| c.sites[0].params.socket.group);
    assert_eq!(group(""), Ok(None), "the default: livemux's own group");
    assert_eq!(group("socket_group = 4242"), Ok(Some(4242)), "a number is used as it is");
    assert_eq!(group("socket_group = \"4242\""), Ok(Some(4242)));
    assert_eq!(group("socket_group = \"root\""), Ok(Some(0)), "root is group 0 everywhere");
    let e = error(&site_with("", "socket_group = \"no-such-group-lmx\""));
    assert_eq!((e.line, e.key.as_deref()), (Some(6), Some("site[1].socket_group")));
    assert_eq!(
        e.message,
        "there is no group 'no-such-group-lmx' on this machine (`getent group no-such-group-lmx` finds none)"
    );
    assert!(error(&site_with("", "socket_group = -1")).message.contains("is not a group id"));
    assert!(error(&site_with("", "socket_group = true")).message.starts_with("expected a group name"));
}

#[test]
fn federations_take_the_socket_settings_of_defaults_unless_they_have_their_own() {
    let text = format!(
        "{}[[federation]]\nname = \"all\"\n[[federation]]\nname = \"mine\"\nsocket_mode = 0o600\n\
         socket_group = 7\n",
        site_with("socket_mode = \"0640\"\nsocket_group = 5", "")
    );
    let c = Config::from_toml(&text).unwrap();
    let all = c.federations[0].client.socket;
    assert_eq!((all.mode, all.group), (0o640, Some(5)));
    let mine = c.federations[1].client.socket;
    assert_eq!((mine.mode, mine.group), (0o600, Some(7)));
    let e = error(&format!("{}[[federation]]\nname = \"all\"\nsocket_mode = \"0602\"\n", site_with("", "")));
    assert_eq!((e.line, e.key.as_deref()), (Some(9), Some("federation[1].socket_mode")));
}

#[test]
fn listener_client_certificates_need_a_ca_and_names_if_any() {
    let listen = |tls: &str| site_with("", &format!("listen = \"127.0.0.1:1\"\ntls = {{ {tls} }}"));
    let c = Config::from_toml(&listen(
        "cert_file = \"/l.pem\", key_file = \"/l.key\", tls_client_ca = \"/ca.pem\", tls_client_names = [\"thruk\", \
         \"nagvis\"]",
    ))
    .unwrap();
    let t = c.sites[0].listen.as_ref().unwrap().tls.clone().unwrap();
    assert_eq!(t.client_ca, Some(PathBuf::from("/ca.pem")));
    assert_eq!(t.client_names, ["thruk", "nagvis"]);
    let plain = Config::from_toml(&listen("cert_file = \"/l.pem\", key_file = \"/l.key\"")).unwrap();
    let t = plain.sites[0].listen.as_ref().unwrap().tls.clone().unwrap();
    assert_eq!((t.client_ca, t.client_names.len()), (None, 0), "no client certificate asked for");
    let e = error(&listen("cert_file = \"/l.pem\", key_file = \"/l.key\", tls_client_names = [\"thruk\"]"));
    assert_eq!((e.line, e.key.as_deref()), (Some(7), Some("site[1].tls.tls_client_names")));
    assert!(e.message.starts_with("needs tls_client_ca"), "{}", e.message);
    let e = error(&listen(
        "cert_file = \"/l.pem\", key_file = \"/l.key\", tls_client_ca = \"/ca.pem\", tls_client_names = []",
    ));
    assert!(e.message.starts_with("must name at least one name"), "{}", e.message);
    let e = error(&listen("cert_file = \"/l.pem\", key_file = \"/l.key\", tls_client_ca = \"\""));
    assert_eq!((e.key.as_deref(), e.message.as_str()), (Some("site[1].tls.tls_client_ca"), "must not be empty"));
}
