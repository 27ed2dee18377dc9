//! The `livemux` binary as a child process: its log lines, signals, memory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::PATIENCE;

pub const BIN: &str = env!("CARGO_BIN_EXE_livemux");

/// Lines of a child's stream, collected by a thread.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Lines {
    pub fn new(stream: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx, seen: Vec::new() }
    }

    /// Wait for a line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line containing {needle:?}; seen:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// A line containing `needle`, among those seen already or still to come.
    pub fn find(&mut self, needle: &str) -> String {
        match self.seen.iter().find(|l| l.contains(needle)) {
            Some(l) => l.clone(),
            None => self.wait_for(needle),
        }
    }

    /// Everything received so far.
    pub fn drain(&mut self) -> &[String] {
        while let Ok(l) = self.rx.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }
}

/// A child process killed (and reaped) when dropped, so a failing test
/// leaves no daemon behind holding its output pipes.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn interrupt(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("signal");
}

pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        assert!(tokio::time::Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `livemux run` with a config written into `dir`; waits until every site is ready.
pub struct ProxyProcess {
    pub child: Child,
    pub log: Lines,
    pub dir: PathBuf,
}

impl ProxyProcess {
    /// `extra` is TOML for the top level (before `[defaults]`), `sites` the
    /// `[[site]]` tables (name, address, extra lines).
    pub fn start(dir: &Path, extra: &str, defaults: &str, sites: &[(&str, String)]) -> ProxyProcess {
        let sites: Vec<(&str, String, &str)> = sites.iter().map(|(n, a)| (*n, a.clone(), "")).collect();
        Self::start_with_sites(dir, extra, defaults, &sites)
    }

    /// Like [`ProxyProcess::start`], with extra TOML lines per site.
    pub fn start_with_sites(dir: &Path, extra: &str, defaults: &str, sites: &[(&str, String, &str)]) -> ProxyProcess {
        let mut text = format!(
            "socket_dir = \"{d}/s\"\nstate_file = \"{d}/state.json\"\nstate_interval = \"100ms\"\nspool_dir = \"{d}/spool\"\n{extra}\n[defaults]\n{defaults}\n",
            d = dir.display()
        );
        for (name, addr, more) in sites {
            text.push_str(&format!("[[site]]\nname = \"{name}\"\naddress = \"{addr}\"\n{more}\n"));
        }
        Self::start_text(dir, &text, sites.len())
    }

    /// `livemux run` with `text` as its whole configuration (written into
    /// `dir`); waits until `sites` sites are ready.
    pub fn start_text(dir: &Path, text: &str, sites: usize) -> ProxyProcess {
        let config = dir.join("livemux.toml");
        std::fs::write(&config, text).expect("write config");
        let mut child = Command::new(BIN)
            .args(["run", "--config", config.to_str().expect("utf-8 path")])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start livemux");
        let mut log = Lines::new(child.stderr.take().expect("stderr"));
        for _ in 0..sites {
            log.wait_for("site is ready");
        }
        ProxyProcess { child, log, dir: dir.to_owned() }
    }

    pub fn socket(&self, site: &str) -> PathBuf {
        self.dir.join("s").join(site)
    }

    /// Peak resident memory (VmHWM) in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("proc status");
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
        let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmHWM value");
        kib * 1024
    }

    /// The current state file.
    pub fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.join("state.json")).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    pub fn stop(mut self) -> Vec<String> {
        interrupt(&self.child, nix::sys::signal::Signal::SIGTERM);
        let st = wait_exit(&mut self.child);
        assert!(st.success(), "livemux exited with {st:?}");
        self.log.drain().to_vec()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
