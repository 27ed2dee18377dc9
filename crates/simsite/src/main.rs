//! `livemux-simsite`: run a simulated Livestatus site as its own process.
//!
//! Prints one line, `listening <address>`, on stdout once it accepts
//! connections, then serves until SIGINT or SIGTERM. Running as a separate
//! process lets tests stop it with SIGSTOP or measure the proxy alone.

use std::path::PathBuf;

use clap::Parser;
use livemux_simsite::inventory::Layout;
use livemux_simsite::{Listen, SimConfig, SimSite};

#[derive(Parser)]
#[command(version, about = "A simulated Livestatus site with fault knobs")]
struct Args {
    /// tcp://HOST:PORT (port 0 picks one) or unix:///path
    #[arg(long, default_value = "tcp://127.0.0.1:0")]
    listen: String,
    /// Site name (appears in host aliases).
    #[arg(long, default_value = "sim")]
    name: String,
    /// Number of hosts.
    #[arg(long, default_value_t = 100)]
    hosts: usize,
    /// Services per host.
    #[arg(long, default_value_t = 10)]
    services: usize,
    /// A knob, KEY=VALUE (repeatable); the keys are `Knobs::apply`'s: delay_ms,
    /// hang, close_without_answer, close_after_bytes, write_chunk, write_pause_ms,
    /// fault_table, bulk_bytes, rtt_ms, tls_handshake_rtts, max_connections,
    /// command_reply, unframed_reply, mk_headers, close_after_answers.
    #[arg(long = "knob", value_name = "KEY=VALUE")]
    knobs: Vec<String>,
    /// Start this many sites (TCP only, each on its own port, named NAME-0,
    /// NAME-1, ...); one `listening` line each.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Size of each host's generated HW/SW inventory tree, in bytes.
    #[arg(long, default_value_t = 2048)]
    inventory_bytes: usize,
    /// Inventory file layout: current (<host>.json) or legacy (<host>).
    #[arg(long, default_value = "current")]
    inventory_layout: String,
    /// Serve no inventory columns (like Icinga 2 or Naemon).
    #[arg(long)]
    no_inventory: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let listen = if let Some(a) = args.listen.strip_prefix("tcp://") {
        match a.parse() {
            Ok(a) => Listen::Tcp(a),
            Err(e) => return fail(&format!("bad --listen address '{a}': {e}")),
        }
    } else if let Some(p) = args.listen.strip_prefix("unix://") {
        Listen::Unix(PathBuf::from(p))
    } else {
        return fail("--listen must start with tcp:// or unix://");
    };
    let layout = match args.inventory_layout.as_str() {
        "current" => Layout::Current,
        "legacy" => Layout::Legacy,
        other => return fail(&format!("--inventory-layout must be current or legacy, not '{other}'")),
    };
    if args.count > 1 && !matches!(listen, Listen::Tcp(_)) {
        return fail("--count needs a tcp:// address");
    }
    let mut sites = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let name = if args.count > 1 { format!("{}-{i}", args.name) } else { args.name.clone() };
        let cfg = SimConfig { name, hosts: args.hosts, services_per_host: args.services, listen: listen.clone() };
        let site = match SimSite::start(cfg).await {
            Ok(s) => s,
            Err(e) => return fail(&format!("cannot listen on {}: {e}", args.listen)),
        };
        site.with_dataset(|ds| {
            ds.inventory.enabled = !args.no_inventory;
            ds.inventory.layout = layout;
            ds.inventory.tree_bytes = args.inventory_bytes;
        });
        for kv in &args.knobs {
            let Some((k, v)) = kv.split_once('=') else { return fail(&format!("--knob '{kv}' is not KEY=VALUE")) };
            let mut result = Ok(());
            site.set_knobs(|knobs| result = knobs.apply(k, v));
            if let Err(e) = result {
                return fail(&e);
            }
        }
        sites.push(site);
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for site in &sites {
            let _ = writeln!(out, "listening {}", site.address());
        }
        let _ = out.flush();
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => return fail(&format!("cannot install SIGTERM handler: {e}")),
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    for site in &sites {
        site.stop();
    }
    std::process::ExitCode::SUCCESS
}

fn fail(msg: &str) -> std::process::ExitCode {
    eprintln!("livemux-simsite: error: {msg}");
    std::process::ExitCode::from(2)
}
