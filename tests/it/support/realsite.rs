//! Real Livestatus servers for tests: Icinga 2 (`scripts/icinga-site.sh`)
//! and Naemon with naemon-livestatus (`scripts/naemon-site.sh`), with the
//! same objects and states, so a test can expect the same data from both.
//!
//! Each site runs under a guardian shell (the script's `run`) whose stdin
//! is a pipe from the test process: when the test process ends, however it
//! ends, the pipe closes and the guardian stops the site. Ports are found by
//! binding port 0; if the port is taken again before the core binds it, the
//! start is retried.
//!
//! Real-peer tests must run in CI. If a core cannot be started they fail,
//! unless `LIVEMUX_SKIP_REAL_PEERS=1` is set and `CI` is not, in which case
//! they print a SKIPPED line and pass (for machines without root or apt).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// Which Livestatus server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Core {
    /// Icinga 2 from Debian, its `livestatus` feature (a reimplementation).
    Icinga,
    /// Naemon 1.5 with naemon-livestatus 1.5, built from `third_party/naemon`
    /// (the mk-livestatus family).
    Naemon,
}

impl Core {
    /// The site script.
    pub fn script(self) -> PathBuf {
        let name = match self {
            Core::Icinga => "scripts/icinga-site.sh",
            Core::Naemon => "scripts/naemon-site.sh",
        };
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Core::Icinga => "Icinga 2",
            Core::Naemon => "Naemon",
        }
    }
}

/// A running site.
pub struct RealSite {
    pub core: Core,
    /// Livestatus TCP port on 127.0.0.1.
    pub port: u16,
    /// Site directory (its UNIX socket is `live` in it).
    pub dir: tempfile::TempDir,
    pub hosts: usize,
    pub services: usize,
    guard: Option<Child>,
}

impl RealSite {
    /// Start a site of `hosts` × `services`, or `None` if real peers are
    /// explicitly skipped and the core cannot run here.
    pub fn start(core: Core, hosts: usize, services: usize) -> Option<RealSite> {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("lmrs").tempdir_in("/tmp").expect("tempdir");
            let port = free_port();
            let mut child = Command::new(core.script())
                .args(["run", "--dir"])
                .arg(dir.path())
                .args(["--port", &port.to_string(), "--hosts", &hosts.to_string(), "--services", &services.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run the site script");
            let mut line = String::new();
            let stdout = child.stdout.take().expect("piped stdout");
            BufReader::new(stdout).read_line(&mut line).ok();
            if line.starts_with("ready ") {
                return Some(RealSite { core, port, dir, hosts, services, guard: Some(child) });
            }
            let out = child.wait_with_output().expect("guardian output");
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            if !last.contains("could not bind") {
                break;
            }
        }
        let name = core.name();
        if std::env::var("LIVEMUX_SKIP_REAL_PEERS").as_deref() == Ok("1") {
            super::skip(
                &format!("a test with a {name} site"),
                &format!("{name} could not be started and LIVEMUX_SKIP_REAL_PEERS=1: {last}"),
            );
            return None;
        }
        panic!(
            "cannot start a {name} site (real-peer tests must run, always where CI is set; elsewhere \
             LIVEMUX_SKIP_REAL_PEERS=1 skips them on a machine without it):\n{last}"
        );
    }

    pub fn tcp_address(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    pub fn unix_path(&self) -> PathBuf {
        self.dir.path().join("live")
    }

    pub fn unix_address(&self) -> String {
        format!("unix://{}", self.unix_path().display())
    }

    fn run_script(&self, args: &[&str]) {
        let script = self.core.script();
        let out = Command::new(&script)
            .arg(args[0])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&args[1..])
            .output()
            .expect("run the site script");
        assert!(out.status.success(), "{} {args:?} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    }

    /// Stop the core (its port closes).
    pub fn stop(&self) {
        self.run_script(&["stop"]);
    }

    /// Start it again after [`RealSite::stop`], on the same port.
    pub fn restart(&self) {
        self.run_script(&[
            "start",
            "--port",
            &self.port.to_string(),
            "--hosts",
            &self.hosts.to_string(),
            "--services",
            &self.services.to_string(),
        ]);
    }

    /// Reload the core (SIGHUP), as `systemctl reload` does; its
    /// `program_start` changes.
    pub fn reload(&self) {
        self.run_script(&["reload"]);
    }

    /// Send a signal (`STOP`, `CONT`, ...) to every process of the site.
    pub fn signal(&self, sig: &str) {
        self.run_script(&["signal", "--sig", sig]);
    }
}

impl Drop for RealSite {
    fn drop(&mut self) {
        // Closing the guardian's stdin makes it stop the site; make sure a
        // stopped core can be terminated.
        let _ = Command::new(self.core.script())
            .args(["signal", "--dir"])
            .arg(self.dir.path())
            .args(["--sig", "CONT"])
            .output();
        if let Some(mut g) = self.guard.take() {
            drop(g.stdin.take());
            let _ = g.wait();
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}
