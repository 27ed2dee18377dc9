//! Real Icinga 2 sites for tests, run by `scripts/icinga-site.sh run`.
//!
//! Each site runs under a guardian shell whose stdin is a pipe from the test
//! process: when the test process ends, however it ends, the pipe closes and
//! the guardian stops the site. Ports are found by binding port 0; if the
//! port is taken again before Icinga binds it, the start is retried.
//!
//! Real-peer tests must run in CI. If Icinga 2 cannot be started they fail,
//! unless `LIVEMUX_SKIP_REAL_PEERS=1` is set, in which case they say so and
//! pass (for machines without root or apt).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The site script.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/icinga-site.sh")
}

/// A running Icinga 2 site.
pub struct IcingaSite {
    /// Livestatus TCP port on 127.0.0.1.
    pub port: u16,
    /// Site directory (its UNIX socket is `live` in it).
    pub dir: tempfile::TempDir,
    pub hosts: usize,
    pub services: usize,
    guard: Option<Child>,
}

impl IcingaSite {
    /// Start a site of `hosts` × `services`, or `None` if real peers are
    /// explicitly skipped and Icinga 2 cannot run here.
    pub fn start(hosts: usize, services: usize) -> Option<IcingaSite> {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("lmic").tempdir_in("/tmp").expect("tempdir");
            let port = free_port();
            let mut child = Command::new(script())
                .args(["run", "--dir"])
                .arg(dir.path())
                .args(["--port", &port.to_string(), "--hosts", &hosts.to_string(), "--services", &services.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run scripts/icinga-site.sh");
            let mut line = String::new();
            let stdout = child.stdout.take().expect("piped stdout");
            BufReader::new(stdout).read_line(&mut line).ok();
            if line.starts_with("ready ") {
                return Some(IcingaSite { port, dir, hosts, services, guard: Some(child) });
            }
            let out = child.wait_with_output().expect("guardian output");
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            if !last.contains("could not bind") {
                break;
            }
        }
        if std::env::var("LIVEMUX_SKIP_REAL_PEERS").as_deref() == Ok("1") {
            eprintln!("SKIPPED: Icinga 2 could not be started and LIVEMUX_SKIP_REAL_PEERS=1:\n{last}");
            return None;
        }
        panic!(
            "cannot start an Icinga 2 site (real-peer tests must run; set LIVEMUX_SKIP_REAL_PEERS=1 to skip them on \
             a machine without Icinga 2):\n{last}"
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
        let out = Command::new(script())
            .arg(args[0])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&args[1..])
            .output()
            .expect("run scripts/icinga-site.sh");
        assert!(out.status.success(), "icinga-site.sh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Stop the core (its port closes).
    pub fn stop(&self) {
        self.run_script(&["stop"]);
    }

    /// Start it again after [`IcingaSite::stop`], on the same port.
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

    /// Reload the core (SIGHUP to its umbrella process), as `systemctl
    /// reload` does; its `program_start` changes.
    pub fn reload(&self) {
        self.run_script(&["reload"]);
    }

    /// Send a signal (`STOP`, `CONT`, ...) to every process of the site.
    pub fn signal(&self, sig: &str) {
        self.run_script(&["signal", "--sig", sig]);
    }
}

impl Drop for IcingaSite {
    fn drop(&mut self) {
        // Closing the guardian's stdin makes it stop the site; make sure a
        // stopped core can be terminated.
        let _ = Command::new(script()).args(["signal", "--dir"]).arg(self.dir.path()).args(["--sig", "CONT"]).output();
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
