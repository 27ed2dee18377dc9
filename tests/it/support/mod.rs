//! Test helpers: a proxy in a temporary directory in front of simulated
//! sites, raw Livestatus clients, and condition waits with deadlines.

pub mod netns;
pub mod process;
pub mod realsite;
pub mod tls;

use std::path::PathBuf;
use std::time::Duration;

use livemux::app::App;
use livemux::config::{Config, SiteAddress, SiteConfig, SiteParams};
use livemux::site::{SiteHandle, SiteState};
use livemux_protocol::{FIXED16_LEN, ResponseHeader};
use livemux_simsite::{SimConfig, SimSite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A test that cannot run here: where `CI` is set that is a failure (CI
/// must run every test); elsewhere it says so on stderr, past the test
/// harness's output capture, so the skip shows in every `cargo test` run.
pub fn skip(test: &str, reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run here, and CI is set: {reason}");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// What a loaded 2-core machine may add to a deadline that a test measures
/// on the wall clock (scheduling, loopback, the poll interval of a
/// condition wait). Upper bounds are stated as "the bound the behaviour
/// promises + SCHEDULING_MARGIN", or as "well below the timeout the wrong
/// behaviour would wait for"; exact timer behaviour is tested on tokio's
/// paused clock (`src/site/tests.rs`).
pub const SCHEDULING_MARGIN: Duration = Duration::from_secs(1);

/// Upper bound for any single wait in a test; generous for a loaded 2-core CI box.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Site settings with short timers, so time-driven behaviour shows quickly.
///
/// A fixed pool (`channels_max` = `channels`) without pipelining, unless a
/// test asks for them.
pub fn fast_params() -> SiteParams {
    SiteParams {
        channels: 2,
        channels_max: 2,
        pipeline_depth: 1,
        heartbeat_interval: Duration::from_millis(300),
        heartbeat_timeout: Duration::from_millis(200),
        channel_timeout: Duration::from_secs(3),
        query_timeout: Duration::from_secs(10),
        connect_retry: Duration::from_millis(300),
        connect_timeout: Duration::from_secs(2),
        ..SiteParams::default()
    }
}

/// A simulated site on a free loopback port.
pub async fn sim(name: &str) -> SimSite {
    SimSite::start(SimConfig::tcp(name)).await.expect("start simulated site")
}

/// A configuration with sockets in `<dir>/s` and a fast state file.
pub fn test_config(dir: &std::path::Path, sites: Vec<(&str, String, SiteParams)>) -> Config {
    Config {
        socket_dir: dir.join("s"),
        pid_file: None,
        metrics_listen: None,
        state_file: dir.join("state.json"),
        state_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(5),
        worker_threads: 1,
        cache_budget: 64 << 20,
        cache_max_entry: 1 << 20,
        spool: livemux::config::SpoolConfig { dir: dir.join("spool"), ..Default::default() },
        inventory: None,
        federations: Vec::new(),
        federation_sort_budget: 64 << 20,
        request_memory_budget: 64 << 20,
        request_memory_wait: std::time::Duration::from_secs(1),
        sites: sites
            .into_iter()
            .map(|(name, addr, params)| SiteConfig {
                name: name.into(),
                address: addr.parse::<SiteAddress>().expect("address"),
                params,
                listen: None,
            })
            .collect(),
    }
}

/// A running proxy in a temporary directory.
pub struct Proxy {
    pub app: Option<App>,
    /// Sockets, spool and state file; removed when the proxy is dropped.
    _dir: tempfile::TempDir,
    pub config: Config,
}

impl Proxy {
    /// Start a proxy for `sites`: (name, address, params).
    pub async fn start(sites: Vec<(&str, String, SiteParams)>) -> Proxy {
        let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
        let config = test_config(dir.path(), sites);
        let app = App::start(config.clone()).await.expect("start proxy");
        Proxy { app: Some(app), _dir: dir, config }
    }

    /// A proxy for a complete configuration (sockets and state in `dir`).
    pub async fn start_config(dir: tempfile::TempDir, config: Config) -> Proxy {
        let app = App::start(config.clone()).await.expect("start proxy");
        Proxy { app: Some(app), _dir: dir, config }
    }

    /// Like [`Proxy::start`] with a different spool configuration (its `dir`
    /// is replaced by one in the proxy's temporary directory).
    pub async fn start_with_spool(
        sites: Vec<(&str, String, SiteParams)>,
        spool: livemux::config::SpoolConfig,
    ) -> Proxy {
        let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
        let mut config = test_config(dir.path(), sites);
        config.spool = livemux::config::SpoolConfig { dir: dir.path().join("spool"), ..spool };
        let app = App::start(config.clone()).await.expect("start proxy");
        Proxy { app: Some(app), _dir: dir, config }
    }

    /// One simulated site behind the proxy, with `params`; waits until ready.
    pub async fn with_sim(name: &str, params: SiteParams) -> (Proxy, SimSite) {
        let s = sim(name).await;
        let p = Proxy::start(vec![(name, s.address(), params)]).await;
        p.wait_state(name, SiteState::Ready).await;
        (p, s)
    }

    pub fn socket(&self, site: &str) -> PathBuf {
        self.config.socket_path(site)
    }

    pub fn site(&self, name: &str) -> SiteHandle {
        self.app.as_ref().and_then(|a| a.site(name)).expect("site exists").clone()
    }

    /// Wait (bounded) until the site reaches `state`.
    pub async fn wait_state(&self, site: &str, state: SiteState) {
        let h = self.site(site);
        tokio::time::timeout(PATIENCE, h.wait_for(|s| s.state == state))
            .await
            .unwrap_or_else(|_| panic!("site {site} did not become {state}, is {:?}", h.status()));
    }

    pub async fn client(&self, site: &str) -> UnixStream {
        UnixStream::connect(self.socket(site)).await.expect("connect to proxy socket")
    }

    pub async fn shutdown(mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
    }
}

/// Send `request` (must end with the empty line) and read one fixed16 answer.
pub async fn ask(s: &mut UnixStream, request: &str) -> (u16, String) {
    s.write_all(request.as_bytes()).await.expect("write request");
    read_answer(s).await
}

/// Read one fixed16 answer: (status, body).
pub async fn read_answer<R: tokio::io::AsyncRead + Unpin>(s: &mut R) -> (u16, String) {
    let (code, body) = read_answer_bytes(s).await;
    (code, String::from_utf8(body).expect("utf-8 body"))
}

pub async fn read_answer_bytes<R: tokio::io::AsyncRead + Unpin>(s: &mut R) -> (u16, Vec<u8>) {
    let mut raw = [0u8; FIXED16_LEN];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut raw)).await.expect("answer in time").expect("read header");
    let h = ResponseHeader::decode(&raw).expect("valid header");
    let mut body = vec![0u8; h.length as usize];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut body)).await.expect("body in time").expect("read body");
    (h.status.code(), body)
}

/// One query on a new connection to the proxy's socket for `site`, fixed16.
pub async fn query(p: &Proxy, site: &str, q: &str) -> (u16, String) {
    let mut c = p.client(site).await;
    ask(&mut c, &format!("{q}\nResponseHeader: fixed16\n\n")).await
}

/// Everything until EOF (for answers without fixed16).
pub async fn read_to_eof<R: tokio::io::AsyncRead + Unpin>(s: &mut R) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await.expect("EOF in time").expect("read");
    out
}

/// One request straight to a site over TCP (the request should end with its
/// empty line); everything until EOF.
pub async fn direct_tcp(addr: std::net::SocketAddr, request: &str) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to site");
    s.write_all(request.as_bytes()).await.expect("write request");
    read_to_eof(&mut s).await
}

/// Wait until `cond` holds, checking every 10 ms, at most [`PATIENCE`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until the proxy's snapshot of `site` satisfies `cond`.
pub async fn eventually_snapshot(
    p: &Proxy,
    site: &str,
    what: &str,
    mut cond: impl FnMut(&livemux::site::SiteSnapshot) -> bool,
) -> livemux::site::SiteSnapshot {
    let h = p.site(site);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let snap = h.snapshot(Duration::from_secs(1)).await;
        if let Some(s) = snap.as_ref()
            && cond(s)
        {
            return snap.unwrap_or_else(|| unreachable!());
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}; last snapshot: {snap:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
