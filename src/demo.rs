//! `livemux demo`: three simulated sites and the proxy in front of them.
//!
//! Everything lives in a temporary directory that is removed on exit. The
//! sites listen on loopback TCP ports chosen by the kernel; the proxy's
//! sockets are in `<dir>/sockets`. Runs until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use livemux_simsite::{Listen, SimConfig, SimSite};

use crate::app::App;
use crate::config::{Config, SiteConfig, SiteParams};

/// The demo's sites: name, hosts, services per host.
const SITES: [(&str, usize, usize); 3] = [("berlin", 200, 10), ("paris", 50, 20), ("tokyo", 1000, 5)];

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Filesystem or network setup failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The proxy did not start.
    #[error(transparent)]
    Start(#[from] crate::app::StartError),
}

/// Run the demo until `stop` completes.
pub async fn run(dir: Option<PathBuf>, stop: impl std::future::Future<Output = ()>) -> Result<(), DemoError> {
    let tmp;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            tmp = tempfile::Builder::new().prefix("livemux-demo-").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let mut sims = Vec::new();
    let mut sites = Vec::new();
    for (name, hosts, services) in SITES {
        let listen = Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)));
        let sim = SimSite::start(SimConfig { name: name.into(), hosts, services_per_host: services, listen }).await?;
        // Each site's own host names (berlin-0001, ...), as in a real
        // installation: one central inventory directory holds them all.
        sim.with_dataset(|ds| ds.host_prefix = format!("{name}-"));
        let address = sim.address().parse().map_err(std::io::Error::other)?;
        sites.push(SiteConfig { name: name.into(), address, params: SiteParams::default(), listen: None });
        sims.push(sim);
    }
    let config = Config {
        socket_dir: dir.join("sockets"),
        pid_file: None,
        metrics_listen: None,
        state_file: dir.join("state.json"),
        state_interval: std::time::Duration::from_secs(5),
        shutdown_grace: std::time::Duration::from_secs(5),
        worker_threads: 1,
        cache_budget: 64 << 20,
        cache_max_entry: 1 << 20,
        spool: crate::config::SpoolConfig { dir: dir.join("spool"), ..Default::default() },
        // The simulated sites serve inventory trees; sync them every 10 s.
        inventory: Some(crate::config::InventoryConfig {
            interval: std::time::Duration::from_secs(10),
            ..crate::config::InventoryConfig::new(dir.join("inventory"))
        }),
        // One socket for all three sites: queries answered by every site.
        federations: vec![crate::config::FederationConfig {
            name: "all".into(),
            sites: SITES.iter().map(|(n, _, _)| (*n).to_owned()).collect(),
            fail_on_site_error: false,
            listen: None,
            dialect: crate::config::Dialect::Livestatus,
            client: SiteParams::default(),
        }],
        federation_sort_budget: 64 << 20,
        request_memory_budget: 64 << 20,
        request_memory_wait: std::time::Duration::from_secs(1),
        sites,
    };
    let app = App::start(config.clone()).await?;
    let exe = std::env::current_exe().map_or_else(|_| "livemux".to_owned(), |p| p.display().to_string());
    let sock = |n: &str| config.socket_path(n).display().to_string();
    println!("livemux demo: {} simulated sites behind livemux", SITES.len());
    for (s, sim) in config.sites.iter().zip(&sims) {
        println!("  site {:<7} simulated at {:<22} proxy socket {}", s.name, sim.address(), sock(&s.name));
    }
    println!("  state file {}", config.state_file.display());
    if let Some(inv) = &config.inventory {
        println!("  HW/SW inventory synced into {}", inv.dir.display());
    }
    println!();
    println!("Try:");
    println!("  {exe} query --socket {} 'GET hosts\\nColumns: name state plugin_output\\nLimit: 5'", sock("berlin"));
    println!("  {exe} query --socket {} 'GET status\\nColumns: program_version num_hosts num_services'", sock("tokyo"));
    println!(
        "  {exe} query --socket {} 'GET services\\nStats: state = 0\\nStats: state = 1\\nStats: state = 2\\nStats: state = 3'",
        sock("paris")
    );
    println!("  printf 'GET hosts\\nColumns: name\\nLimit: 3\\n\\n' | socat - UNIX-CONNECT:{}", sock("berlin"));
    println!();
    println!("Press Ctrl-C to stop.");
    stop.await;
    app.shutdown().await;
    drop(sims);
    Ok(())
}
