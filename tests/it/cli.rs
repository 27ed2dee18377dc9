//! The `livemux` binary: check-config, query, run (logs, signals), demo.

use livemux::site::SiteState;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::process::*;
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_livemux");

fn livemux(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run livemux")
}

#[test]
fn check_config_accepts_good_files_and_names_key_and_line_of_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "socket_dir = \"/tmp/x\"\n[[site]]\nname = \"a\"\naddress = \"tcp://127.0.0.1:6557\"\n")
        .unwrap();
    let out = livemux(&["check-config", "--config", good.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}: OK (1 sites)\n", good.display()));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[defaults]\nchannels = 5\nquery_timeout = \"soon\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n",
    )
    .unwrap();
    let out = livemux(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3: defaults.query_timeout: 'soon' is not a duration"), "{err}");

    // Every problem at once, one line each, each naming file, line and key.
    std::fs::write(
        &bad,
        "[defaults]\nchanels = 5\nquery_timeout = \"soon\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n",
    )
    .unwrap();
    let out = livemux(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    let file = bad.display();
    assert_eq!(lines.len(), 2, "{err}");
    assert_eq!(
        lines[0],
        format!("livemux: {file}: line 2: defaults.chanels: unknown key `chanels`; did you mean `channels`?")
    );
    assert!(lines[1].starts_with(&format!("livemux: {file}: line 3: defaults.query_timeout: 'soon'")), "{err}");

    let out = livemux(&["check-config", "--config", "/nonexistent/livemux.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/livemux.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_prints_the_body_and_fails_with_the_error_text() {
    let (p, site) = Proxy::with_sim("s1", fast_params()).await;
    let sock = p.socket("s1").display().to_string();
    let out =
        tokio::task::block_in_place(|| livemux(&["query", "--socket", &sock, "GET hosts\\nColumns: name\\nLimit: 2"]));
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "host-0000\nhost-0001\n");

    let out = tokio::task::block_in_place(|| livemux(&["query", "--socket", &sock, "GET nosuchtable"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "livemux: 404: Table 'nosuchtable' does not exist.\n");

    // From stdin.
    let out = tokio::task::block_in_place(|| {
        let mut child = Command::new(BIN)
            .args(["query", "--socket", &sock])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"GET status\nColumns: num_hosts\n").unwrap();
        child.wait_with_output().unwrap()
    });
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "100\n");

    // Leading empty lines are no trouble; an empty query is refused at once.
    let out =
        tokio::task::block_in_place(|| livemux(&["query", "--socket", &sock, "\\nGET status\\nColumns: num_hosts"]));
    assert_eq!((out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()), (Some(0), "100\n"));
    let out = tokio::task::block_in_place(|| livemux(&["query", "--socket", &sock, ""]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "livemux: empty query (write e.g. 'GET status')\n");

    // A COMMAND: exit 0 once livemux took it; exit 1 with the reason when
    // the site is down and it could not be forwarded.
    let out = tokio::task::block_in_place(|| livemux(&["query", "--socket", &sock, "COMMAND [1] NOP;x"]));
    assert_eq!((out.status.code(), out.stdout.len()), (Some(0), 0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(site.stats().commands, 1);
    site.stop();
    p.wait_state("s1", SiteState::Down).await;
    let out = tokio::task::block_in_place(|| livemux(&["query", "--socket", &sock, "COMMAND [2] NOP;y"]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("livemux: 502: site 's1' is down: "), "{err}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_logs_one_line_per_state_change_and_none_per_query_and_stops_cleanly() {
    let s = sim("s1").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let config = dir.path().join("livemux.toml");
    std::fs::write(
        &config,
        format!(
            "socket_dir = \"{d}/s\"\nstate_file = \"{d}/state.json\"\nstate_interval = \"100ms\"\nspool_dir = \"{d}/spool\"\n\
             [defaults]\nheartbeat_interval = \"300ms\"\nheartbeat_timeout = \"200ms\"\nconnect_retry = \"300ms\"\n\
             [[site]]\nname = \"s1\"\naddress = \"{a}\"\n",
            d = dir.path().display(),
            a = s.address()
        ),
    )
    .unwrap();
    let mut child = Reaped(
        Command::new(BIN).args(["run", "--config", config.to_str().unwrap()]).stderr(Stdio::piped()).spawn().unwrap(),
    );
    let mut log = Lines::new(child.0.stderr.take().unwrap());
    tokio::task::block_in_place(|| log.wait_for("site is ready"));
    let sock = dir.path().join("s/s1");
    for _ in 0..50 {
        let mut c = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let (code, _) = ask(&mut c, "GET hosts\nColumns: name\nLimit: 1\nResponseHeader: fixed16\n\n").await;
        assert_eq!(code, 200);
    }
    s.stop();
    let down = tokio::task::block_in_place(|| log.wait_for("site is down"));
    // One warning naming the site and the first failure the stopping site
    // showed (a refused connect, or a connection it still accepted and
    // closed or reset).
    assert!(down.contains("WARN") && down.contains("s1") && down.contains("site is down (was ready for "), "{down}");
    s.restart().await.unwrap();
    tokio::task::block_in_place(|| log.wait_for("site is ready (was down"));

    interrupt(&child.0, nix::sys::signal::Signal::SIGTERM);
    let status = tokio::task::block_in_place(|| wait_exit(&mut child.0));
    assert!(status.success(), "{status:?}");
    let lines = log.drain().to_vec();
    let changes = lines.iter().filter(|l| l.contains("site is down") || l.contains("site is ready")).count();
    assert_eq!(changes, 3, "ready, down, ready:\n{}", lines.join("\n"));
    assert!(lines.len() < 15, "no line per query at the default level:\n{}", lines.join("\n"));
    assert!(!sock.exists(), "socket removed on exit");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("state.json")).unwrap()).unwrap();
    assert_eq!(state["sites"][0]["name"], "s1");
    // The last state file is written while the site can still describe itself.
    assert_eq!(state["sites"][0]["state"], "ready", "{state}");
    assert!(state["sites"][0]["heartbeats_received"].as_u64().unwrap() >= 1, "{state}");
}

/// `livemux --version` names the version, the commit it was built from
/// (in a git checkout) and the features compiled in.
#[test]
fn version_names_the_commit_and_the_features() {
    let out = livemux(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let features = if cfg!(feature = "demo") { "features: demo)" } else { "features: none)" };
    assert!(text.starts_with(&format!("livemux {} (", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(text.trim_end().ends_with(features), "{text}");
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success() && std::env::var_os("LIVEMUX_GIT_COMMIT").is_none());
    if let Some(head) = head {
        let commit = String::from_utf8_lossy(&head.stdout).trim().to_owned();
        assert!(text.contains(&format!("(commit {commit}; ")), "{text}");
    }
}

/// `livemux man` and `livemux completions` come from the same definitions
/// the binary parses with: a page for every command, and bash completes
/// a command's name (zsh and fish: scripts/package-test.sh).
#[test]
fn man_pages_and_completions_cover_every_command() {
    let help = String::from_utf8_lossy(&livemux(&["--help"]).stdout).into_owned();
    let commands: Vec<&str> = help
        .split("\nCommands:\n")
        .nth(1)
        .and_then(|s| s.split("\n\n").next())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.contains(&"run") && commands.contains(&"man"), "{help}");

    let page = livemux(&["man"]);
    assert!(page.status.success());
    assert!(String::from_utf8_lossy(&page.stdout).contains("\n.TH livemux 1 "), "not a roff page");
    let dir = tempfile::tempdir().unwrap();
    let out = livemux(&["man", "--dir", dir.path().join("man1").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut pages: Vec<String> = std::fs::read_dir(dir.path().join("man1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    let mut want: Vec<String> = commands.iter().map(|c| format!("livemux-{c}.1")).collect();
    want.push("livemux.1".to_owned());
    want.sort();
    assert_eq!(pages, want);

    let script = dir.path().join("livemux.bash");
    let out = livemux(&["completions", "bash"]);
    assert!(out.status.success());
    std::fs::write(&script, &out.stdout).unwrap();
    let completed = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && COMP_WORDS=(livemux che) COMP_CWORD=1 && _livemux livemux che livemux && echo \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .expect("bash");
    assert_eq!(String::from_utf8_lossy(&completed.stdout), "check-config\n");
}

#[test]
fn run_refuses_a_bad_config_and_a_socket_in_use() {
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\nchannels = 99\n").unwrap();
    let out = livemux(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 4: site[1].channels: 99 is out of range 1..=50"));

    std::fs::create_dir_all(dir.path().join("s")).unwrap();
    let _busy = std::os::unix::net::UnixListener::bind(dir.path().join("s/a")).unwrap();
    std::fs::write(
        &config,
        format!(
            "socket_dir = \"{0}/s\"\nstate_file = \"{0}/st.json\"\nspool_dir = \"{0}/spool\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = livemux(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in use by another running process"));

    // A state file that cannot be written is an error at start-up, not a
    // warning every few seconds (/proc takes no new files, even from root).
    std::fs::write(
        &config,
        format!(
            "socket_dir = \"{0}/s2\"\nstate_file = \"/proc/livemux-state.json\"\nspool_dir = \"{0}/spool\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = livemux(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot start: cannot write the state file in /proc: "), "{err}");
    assert!(!dir.path().join("s2/a").exists(), "no socket left behind");
}

#[cfg(feature = "demo")]
#[test]
fn demo_serves_three_sites_until_interrupted() {
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let mut child = Reaped(
        Command::new(BIN)
            .args(["demo", "--dir", dir.path().to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut out = Lines::new(child.0.stdout.take().unwrap());
    out.wait_for("Press Ctrl-C to stop.");
    let text = out.drain().join("\n");
    for site in ["berlin", "paris", "tokyo"] {
        assert!(text.contains(&format!("site {site}")), "{text}");
    }
    // The printed commands work.
    let sock = dir.path().join("sockets/tokyo");
    let q = Command::new(BIN)
        .args(["query", "--socket", sock.to_str().unwrap(), "GET status\\nColumns: num_hosts num_services"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&q.stdout), "1000;5000\n");
    interrupt(&child.0, nix::sys::signal::Signal::SIGINT);
    assert!(wait_exit(&mut child.0).success());
    assert!(!sock.exists());
}

/// A configuration for `livemux run` in `dir` with one site per address.
fn run_config(dir: &std::path::Path, top: &str, sites: &[(&str, String)], defaults: &str) -> std::path::PathBuf {
    let mut text = format!(
        "socket_dir = \"{d}/s\"\nstate_file = \"{d}/state.json\"\nstate_interval = \"100ms\"\npid_file = \"{d}/livemux.pid\"\nspool_dir = \"{d}/spool\"\n{top}\n[defaults]\nheartbeat_interval = \"300ms\"\nheartbeat_timeout = \"200ms\"\nconnect_retry = \"300ms\"\n{defaults}\n",
        d = dir.display()
    );
    for (name, addr) in sites {
        text.push_str(&format!("[[site]]\nname = \"{name}\"\naddress = \"{addr}\"\n"));
    }
    let path = dir.join("livemux.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn spawn_run(config: &std::path::Path, env: &[(&str, String)]) -> (Reaped, Lines) {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config", config.to_str().expect("utf-8")]).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start livemux");
    let log = Lines::new(child.stderr.take().expect("stderr"));
    (Reaped(child), log)
}

/// Datagrams from the daemon to its "service manager".
struct NotifySocket {
    sock: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &std::path::Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(PATIENCE)).expect("timeout");
        NotifySocket { sock, path, seen: Vec::new() }
    }

    /// The next message containing `needle` (STATUS= and WATCHDOG= ones
    /// in between are kept in `seen`).
    fn wait_for(&mut self, needle: &str) -> String {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self
                .sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {needle:?} message ({e}); seen {:?}", self.seen));
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push(msg.clone());
            if msg.lines().any(|l| l == needle || l.starts_with(needle)) {
                return msg;
            }
        }
    }
}

#[test]
fn the_daemon_speaks_systemds_notify_protocol_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(sim("nt"));
    let config = run_config(dir.path(), "", &[("nt", s.address())], "");
    let mut notify = NotifySocket::bind(dir.path());
    let env = [("NOTIFY_SOCKET", notify.path.display().to_string()), ("WATCHDOG_USEC", "200000".to_owned())];
    let (child, mut log) = spawn_run(&config, &env);
    let ready = notify.wait_for("READY=1");
    assert!(ready.contains("STATUS=1 sites:"), "{ready}");
    // Sockets are bound before READY: a client connects at once.
    assert!(dir.path().join("s/nt").exists());
    notify.wait_for("WATCHDOG=1");
    // The pid file names the daemon.
    let pid = std::fs::read_to_string(dir.path().join("livemux.pid")).expect("pid file");
    assert_eq!(pid.trim(), child.0.id().to_string());

    interrupt(&child.0, nix::sys::signal::Signal::SIGHUP);
    let reloading = notify.wait_for("RELOADING=1");
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading}");
    notify.wait_for("READY=1");
    log.wait_for(
        "configuration reloaded: added: none; removed: none; changed in place: none; new channels: none; kept: 1",
    );

    let mut child = child;
    interrupt(&child.0, nix::sys::signal::Signal::SIGTERM);
    notify.wait_for("STOPPING=1");
    assert!(wait_exit(&mut child.0).success());
    assert!(!dir.path().join("livemux.pid").exists(), "the pid file goes at exit");
    let order: Vec<&str> = notify
        .seen
        .iter()
        .filter_map(|m| ["READY=1", "RELOADING=1", "STOPPING=1"].into_iter().find(|k| m.lines().any(|l| l == *k)))
        .collect();
    assert_eq!(order, ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]);
}

/// The package's default configuration, dist/livemux.toml, has no
/// `[[site]]`: check-config accepts it, the daemon starts, tells systemd it
/// is ready, says it has nothing to serve and what to add, and serves a
/// site once one is added and the file reloaded.
#[test]
fn with_the_packaged_configuration_the_daemon_starts_says_what_to_add_and_serves_a_site_added_later() {
    const DIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/livemux.toml");
    let ok = |path: &str| format!("{path}: OK (no [[site]]: the daemon starts and serves nothing)\n");
    let out = livemux(&["check-config", "--config", DIST]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), ok(DIST), "{}", String::from_utf8_lossy(&out.stderr));

    // The same file with this test's directories in place of /run and /var/lib.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("livemux.toml");
    let d = dir.path().display();
    let text = format!(
        "socket_dir = \"{d}/s\"\nstate_file = \"{d}/state.json\"\nspool_dir = \"{d}/spool\"\npid_file = \"{d}/livemux.pid\"\n{}",
        std::fs::read_to_string(DIST).unwrap()
    );
    std::fs::write(&config, text).unwrap();
    let cfg = config.to_str().unwrap();
    let out = livemux(&["check-config", "--config", cfg]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), ok(cfg), "{}", String::from_utf8_lossy(&out.stderr));

    let mut notify = NotifySocket::bind(dir.path());
    let (child, mut log) = spawn_run(&config, &[("NOTIFY_SOCKET", notify.path.display().to_string())]);
    let idle = log.wait_for("nothing to serve");
    assert!(idle.contains("WARN") && idle.contains("add a [[site]] table") && idle.contains(cfg), "{idle}");
    let ready = notify.wait_for("READY=1");
    assert!(ready.contains("STATUS=0 sites:"), "{ready}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(sim("later"));
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}[[site]]\nname = \"later\"\naddress = \"{}\"\n", s.address())).unwrap();
    let out = livemux(&["reload", "--config", cfg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    log.wait_for("configuration reloaded: added: later");
    log.find("site is ready");
    let socket = dir.path().join("s/later");
    let out = livemux(&["query", "--socket", socket.to_str().unwrap(), "GET status\\nColumns: num_hosts"]);
    assert_eq!((out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()), (Some(0), "100\n"));

    let mut child = child;
    interrupt(&child.0, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut child.0).success());
}

#[test]
fn a_reload_with_an_invalid_file_keeps_the_daemon_serving_on_the_old_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, b) = rt.block_on(async { (sim("ia").await, sim("ib").await) });
    let config = run_config(dir.path(), "", &[("ia", a.address())], "");
    let (child, mut log) = spawn_run(&config, &[]);
    log.wait_for("site is ready");
    let good = std::fs::read_to_string(&config).unwrap();

    // Invalid: every problem named with key and line; the old site serves on.
    std::fs::write(
        &config,
        good.replace("heartbeat_interval = \"300ms\"", "heartbeat_interval = \"soon\"\nchanels = 3"),
    )
    .unwrap();
    let out = livemux(&["reload", "--config", config.to_str().unwrap()]);
    // `reload` itself reads the file to find the pid file, and refuses it.
    assert_eq!(out.status.code(), Some(1));
    interrupt(&child.0, nix::sys::signal::Signal::SIGHUP);
    log.wait_for("configuration not reloaded, still running on the previous one");
    let line = log.wait_for("defaults.heartbeat_interval");
    assert!(line.contains("line 8"), "{line}");
    log.wait_for("defaults.chanels: unknown key");
    let socket = dir.path().join("s/ia");
    let (code, body) = rt.block_on(async {
        let mut c = tokio::net::UnixStream::connect(&socket).await.expect("connect");
        ask(&mut c, "GET status\nColumns: num_hosts\nResponseHeader: fixed16\n\n").await
    });
    assert_eq!((code, body.as_str()), (200, "100\n"));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let state = loop {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("state.json")).unwrap_or_default())
                .unwrap_or_default();
        if v["reloads"]["failed"] == 1 {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "the failed reload is not in the state file: {v}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let last = &state["reloads"]["last"];
    assert_eq!(last["ok"], false);
    assert!(last["message"].as_str().unwrap_or_default().contains("defaults.chanels: unknown key"), "{last}");

    // A valid file adding a site, through `livemux reload`.
    let with_b = format!("{good}[[site]]\nname = \"ib\"\naddress = \"{}\"\n", b.address());
    std::fs::write(&config, with_b).unwrap();
    let out = livemux(&["reload", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    log.wait_for("configuration reloaded: added: ib; removed: none");
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(mut c) = tokio::net::UnixStream::connect(dir.path().join("s/ib")).await {
                let (code, _) = ask(&mut c, "GET status\nColumns: num_hosts\nResponseHeader: fixed16\n\n").await;
                if code == 200 {
                    break;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "added site not served");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    let mut child = child;
    interrupt(&child.0, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut child.0).success());
}

/// `livemux status --config cfg` until it exits with `code` (at most
/// [`PATIENCE`]); its last output.
fn status_until(cfg: &str, code: i32) -> std::process::Output {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let out = livemux(&["status", "--config", cfg]);
        if out.status.code() == Some(code) || tokio::time::Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_second_daemon_is_refused_by_the_pid_file_and_status_tells_ready_down_and_stale() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(sim("st"));
    let config = run_config(dir.path(), "", &[("st", s.address())], "");
    let (child, mut log) = spawn_run(&config, &[]);
    log.wait_for("site is ready");
    let cfg = config.to_str().unwrap();

    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let second = other.join("livemux.toml");
    std::fs::write(&second, std::fs::read_to_string(&config).unwrap().replace("/s\"", "/s2\"")).unwrap();
    let out = livemux(&["run", "--config", second.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("names process {}, which is running", child.0.id())), "{err}");

    // Running, every site ready: exit 0 and a table.
    let out = status_until(cfg, 0);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    assert!(table.starts_with("SITE  STATE  FOR"), "{table}");
    assert!(table.lines().nth(1).is_some_and(|l| l.starts_with("st    ready")), "{table}");
    let json = livemux(&["status", "--state-file", dir.path().join("state.json").to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(v["sites"][0]["name"], "st");

    // The site stops: exit 1, with its error.
    s.stop();
    log.wait_for("site is down");
    let out = status_until(cfg, 1);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("st    down"));

    // The daemon stops: its last state file goes stale (3 × 100 ms).
    let mut child = child;
    interrupt(&child.0, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut child.0).success());
    let out = status_until(cfg, 2);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is stale"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = livemux(&["reload", "--config", cfg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running livemux"));
}

#[test]
fn the_shipped_systemd_unit_verifies() {
    const TEST: &str = "cli::the_shipped_systemd_unit_verifies";
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        return skip(TEST, "systemd-analyze is not installed (scripts/install-test-deps.sh installs it)");
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/livemux.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/livemux run --config"), "{unit}");
    // Verified with this build's binary in place of /usr/bin/livemux.
    let path = dir.path().join("livemux.service");
    std::fs::write(&path, unit.replace("/usr/bin/livemux", BIN)).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("livemux.service")).collect();
    assert!(out.status.success() && ours.is_empty(), "{err}");
}

/// `livemux import-liveproxyd` on the corpus in tests/fixtures/liveproxyd:
/// each output equals the expected TOML (`LIVEMUX_BLESS=1` rewrites them)
/// and passes `check-config`; warnings name site and key; a malformed file
/// is an error with line and column.
#[test]
fn import_liveproxyd_turns_every_form_into_a_configuration_check_config_accepts() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/liveproxyd");
    // A central site: <root>/etc/check_mk/liveproxyd.mk, and its trust store.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("central");
    std::fs::create_dir_all(root.join("etc/check_mk/liveproxyd.d/wato")).unwrap();
    std::fs::create_dir_all(root.join("var/ssl")).unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).unwrap();
    std::fs::write(root.join("var/ssl/ca-certificates.crt"), ca.cert.pem()).unwrap();
    let own_ca = dir.path().join("own-ca.pem");
    std::fs::write(&own_ca, ca.cert.pem()).unwrap();
    let root_s = root.display().to_string();
    let cases: [(&str, &[&str]); 4] = [("gui", &[]), ("legacy", &[]), ("gui", &["--global", "GLOBAL"]), ("odd", &[])];
    for (case, extra) in cases {
        let text = std::fs::read_to_string(fixtures.join(format!("{case}.mk"))).unwrap();
        let input = root.join("etc/check_mk/liveproxyd.mk");
        std::fs::write(&input, text.replace("@CA@", &own_ca.display().to_string())).unwrap();
        let global = root.join("etc/check_mk/liveproxyd.d/wato/global.mk");
        std::fs::copy(fixtures.join("global.mk"), &global).unwrap();
        let mut args = vec!["import-liveproxyd", input.to_str().unwrap()];
        for a in extra {
            args.push(if *a == "GLOBAL" { global.to_str().unwrap() } else { a });
        }
        let out = livemux(&args);
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        let name = if extra.is_empty() { case.to_owned() } else { format!("{case}-global") };
        // Paths of this run shown as placeholders, so the expected files are stable.
        let shown = |s: &[u8]| {
            String::from_utf8_lossy(s).replace(&root_s, "@ROOT@").replace(&own_ca.display().to_string(), "@CA@")
        };
        let (toml, warnings) = (shown(&out.stdout), shown(&out.stderr));
        let expected = fixtures.join(format!("{name}.toml"));
        let expected_warnings = fixtures.join(format!("{name}.warnings"));
        if std::env::var_os("LIVEMUX_BLESS").is_some() {
            std::fs::write(&expected, &toml).unwrap();
            std::fs::write(&expected_warnings, &warnings).unwrap();
        }
        assert_eq!(toml, std::fs::read_to_string(&expected).unwrap_or_default(), "{name}: TOML differs");
        assert_eq!(
            warnings,
            std::fs::read_to_string(&expected_warnings).unwrap_or_default(),
            "{name}: warnings differ"
        );
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, &out.stdout).unwrap();
        let check = livemux(&["check-config", "--config", cfg.to_str().unwrap()]);
        assert!(check.status.success(), "{name}: check-config: {}", String::from_utf8_lossy(&check.stderr));
    }
    let out = livemux(&["import-liveproxyd", fixtures.join("malformed.mk").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("malformed.mk: line 3, column 111: `os` is not a literal (nothing is evaluated)"), "{err}");
    let out = livemux(&["import-liveproxyd", fixtures.join("global.mk").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no `sites = {...}` or `sites.update({...})`"));
}

#[test]
fn out_of_descriptors_the_listener_backs_off_logs_once_serves_its_clients_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(sim("fd"));
    let config = run_config(dir.path(), "", &[("fd", s.address())], "channels = 2\nchannels_max = 2\n");
    // A small descriptor limit, soft and hard (livemux raises soft to hard).
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config", config.to_str().unwrap()]).stderr(Stdio::piped());
    unsafe {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 48, 48)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = Reaped(cmd.spawn().expect("start livemux"));
    let mut log = Lines::new(child.0.stderr.take().expect("stderr"));
    log.wait_for("site is ready");
    let socket = dir.path().join("s/fd");
    let q = "GET status\nColumns: num_hosts\nKeepAlive: on\nResponseHeader: fixed16\n\n";
    rt.block_on(async {
        let mut first = tokio::net::UnixStream::connect(&socket).await.expect("first client");
        assert_eq!(ask(&mut first, q).await, (200, "100\n".to_owned()));
        // Far more clients than descriptors: the kernel queues them, livemux
        // cannot accept them all.
        let mut crowd = Vec::new();
        for _ in 0..80 {
            if let Ok(c) = tokio::net::UnixStream::connect(&socket).await {
                crowd.push(c);
            }
        }
        log.wait_for("accept failed");
        // The client already served is served on.
        assert_eq!(ask(&mut first, q).await, (200, "100\n".to_owned()));
        assert_eq!(ask(&mut first, q).await, (200, "100\n".to_owned()));
        // Descriptors free up: new clients are accepted again.
        drop(crowd);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(mut c) = tokio::net::UnixStream::connect(&socket).await
                && let Ok(Ok(answer)) = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                    use tokio::io::AsyncWriteExt;
                    c.write_all(q.as_bytes()).await?;
                    Ok::<_, std::io::Error>(read_answer(&mut c).await)
                })
                .await
                && answer == (200, "100\n".to_owned())
            {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no new client was served after descriptors freed up");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // Clients keep coming; once accepting has worked for a while the
        // episode is over, and said so once.
        while !log.drain().iter().any(|l| l.contains("accepting clients again")) {
            assert!(tokio::time::Instant::now() < deadline, "the episode never ended");
            let mut c = tokio::net::UnixStream::connect(&socket).await.expect("connect");
            assert_eq!(ask(&mut c, q).await, (200, "100\n".to_owned()));
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    interrupt(&child.0, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut child.0).success());
    let lines = log.drain();
    let failures = lines.iter().filter(|l| l.contains("accept failed")).count();
    assert_eq!(failures, 1, "one line per episode: {lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("panicked")));
    assert!(!lines.iter().any(|l| l.contains("site is down")), "the site was never blamed");
}

#[test]
fn start_up_refusals_on_a_read_only_file_system() {
    const TEST: &str = "cli::start_up_refusals_on_a_read_only_file_system";
    if !nix::unistd::geteuid().is_root() {
        return skip(TEST, "mounting a read-only tmpfs needs root");
    }
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    if let Err(e) = mount(Some("tmpfs"), &ro, Some("tmpfs"), MsFlags::MS_RDONLY, Some("size=64k")) {
        return skip(TEST, &format!("cannot mount a read-only tmpfs: {e}"));
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = umount2(&self.0, MntFlags::MNT_DETACH);
        }
    }
    let _guard = Unmount(ro.clone());
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "socket_dir = \"{}\"\nstate_file = \"{1}/st.json\"\nspool_dir = \"{1}/spool\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n",
            ro.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let out = livemux(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("cannot start: cannot bind") && err.contains("Read-only file system"), "{err}");
}

/// Issue 18: a thousand clients, each sending a 4 MiB request slowly.
/// Their buffers alone could claim 4 GiB; with the default
/// `request_memory_budget` of 64 MiB livemux's peak RSS stays under
/// budget + 64 MiB, and every client gets its answer or a 503 naming the
/// budget, nothing else.
#[test]
fn a_thousand_clients_sending_4_mib_requests_slowly_stay_within_the_request_budget() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CLIENTS: usize = 1000;
    const MIB: usize = 1 << 20;
    // The test's own descriptors: a thousand clients.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(hard >= 2 * CLIENTS as u64 + 100, "the hard limit of open files ({hard}) is too low for this test");
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let s = rt.block_on(sim("rb"));
    let config = run_config(
        dir.path(),
        "request_memory_budget = \"64MiB\"\nrequest_memory_wait = \"1s\"\n",
        &[("rb", s.address())],
        "max_clients = 2000\nclient_request_timeout = \"60s\"\n",
    );
    let (mut child, mut log) = spawn_run(&config, &[]);
    log.wait_for("site is ready");
    let socket = dir.path().join("s/rb");
    // A 4 MiB request: a query with padding headers (which cores ignore).
    let mut request = b"GET status\nColumns: program_version\nResponseHeader: fixed16\n".to_vec();
    let pad = format!("X-Padding: {}\n", "p".repeat(1000));
    while request.len() + pad.len() < 4 * MIB - 1 {
        request.extend_from_slice(pad.as_bytes());
    }
    request.push(b'\n');
    let request = bytes::Bytes::from(request);
    // How each client's request ended: the answer, or what went wrong.
    type End = Result<(u16, Vec<u8>), String>;
    let ends: Vec<End> = rt.block_on(async {
        let mut probe = tokio::net::UnixStream::connect(&socket).await.expect("connect");
        let (code, version) =
            ask(&mut probe, "GET status\nColumns: program_version\nResponseHeader: fixed16\n\n").await;
        assert_eq!(code, 200);
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let (socket, request) = (socket.clone(), request.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = match tokio::net::UnixStream::connect(&socket).await {
                    Ok(c) => c,
                    Err(e) => return Err(format!("connect: {e}")),
                };
                // Slowly: 64 KiB, then a pause. livemux closes the
                // connection of a client it refuses: the write fails then.
                for chunk in request.chunks(64 * 1024) {
                    if c.write_all(chunk).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                let mut head = [0u8; livemux_protocol::FIXED16_LEN];
                let read = async {
                    c.read_exact(&mut head).await?;
                    let h = livemux_protocol::ResponseHeader::decode(&head)
                        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
                    let mut body = vec![0u8; h.length as usize];
                    c.read_exact(&mut body).await?;
                    Ok::<_, std::io::Error>((h.status.code(), body))
                };
                match tokio::time::timeout(std::time::Duration::from_secs(120), read).await {
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(e)) => Err(format!("read: {e}")),
                    Err(_) => Err("no answer within 120 s".into()),
                }
            }));
        }
        let mut ends = Vec::new();
        for t in tasks {
            ends.push(t.await.expect("client task"));
        }
        ends.retain(|e| !matches!(e, Ok((200, body)) if *body == version.as_bytes()));
        let answered = CLIENTS - ends.len();
        assert!(answered > 0, "no client got its answer");
        ends
    });
    let refused = ends
        .iter()
        .filter(|e| {
            matches!(e, Ok((503, body))
                if String::from_utf8_lossy(body).contains("bytes of request_memory_budget; waited"))
        })
        .count();
    let others: Vec<&End> = ends
        .iter()
        .filter(|e| !matches!(e, Ok((503, b)) if String::from_utf8_lossy(b).contains("request_memory_budget")))
        .collect();
    assert!(others.is_empty(), "neither the answer nor a 503 naming the budget: {:?}", &others[..others.len().min(5)]);
    assert!(refused > 0, "the budget was never full: the test did not test it");
    // Peak RSS of the daemon.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).expect("daemon status");
    let hwm_kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmHWM");
    eprintln!(
        "{} of {CLIENTS} answered, {refused} refused (503); peak RSS {} MiB",
        CLIENTS - ends.len(),
        hwm_kib / 1024
    );
    assert!(hwm_kib * 1024 < 128 * MIB, "peak RSS {} MiB is over budget + 64 MiB", hwm_kib / 1024);
    let lines = log.drain();
    assert!(lines.iter().any(|l| l.contains("request memory budget is in use")), "the budget's log line");
    assert!(!lines.iter().any(|l| l.contains("panicked")));
    interrupt(&child.0, nix::sys::signal::Signal::SIGTERM);
    assert!(wait_exit(&mut child.0).success());
}
