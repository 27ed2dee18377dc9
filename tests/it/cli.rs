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
    assert_eq!(lines[0], format!("livemux: {file}: line 2: defaults.chanels: unknown key `chanels`"));
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
            "socket_dir = \"{d}/s\"\nstate_file = \"{d}/state.json\"\nstate_interval = \"100ms\"\n\
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
            "socket_dir = \"{0}/s\"\nstate_file = \"{0}/st.json\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n",
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
            "socket_dir = \"{0}/s2\"\nstate_file = \"/proc/livemux-state.json\"\n[[site]]\nname = \"a\"\naddress = \"tcp://h:1\"\n",
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
