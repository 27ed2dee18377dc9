//! The `livemux` command: parse arguments, set up logging, call the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use livemux::config::Config;

/// `livemux --help` and the DESCRIPTION of livemux(1).
const LONG_ABOUT: &str = "A Livestatus proxy daemon. The central site's Livestatus clients talk to one \
local UNIX socket per remote site (<socket_dir>/<site name>); livemux hands each query to one of a few \
persistent connections to that site, watches every site with heartbeats, and answers at once with an \
error for a site that is down.

The package's configuration is /etc/livemux/livemux.toml, run by the systemd unit livemux.service \
(`systemctl reload livemux` re-reads it); every key is in /usr/share/doc/livemux/CONFIGURATION.md, \
running it in /usr/share/doc/livemux/OPERATIONS.md.";

#[derive(Parser)]
// The version, the commit built from and the features compiled in (build.rs).
#[command(version = env!("LIVEMUX_VERSION"), about = "A Livestatus proxy daemon", long_about = LONG_ABOUT)]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `livemux=debug` (default: $LIVEMUX_LOG or info).
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in the foreground (logs go to stderr).
    Run {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Make the running daemon re-read its configuration (SIGHUP to the
    /// process named by the configuration's pid_file).
    Reload {
        /// Configuration file (its pid_file names the daemon).
        #[arg(long)]
        config: PathBuf,
    },
    /// Show every site's state from the state file (exit 0: all ready,
    /// 1: a site is not, 2: no running daemon).
    Status {
        /// Configuration file (names the state file).
        #[arg(long, required_unless_present = "state_file", conflicts_with = "state_file")]
        config: Option<PathBuf>,
        /// The state file itself.
        #[arg(long)]
        state_file: Option<PathBuf>,
        /// Print the state file's JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print a livemux configuration made from Checkmk's liveproxyd.mk
    /// (warnings go to stderr).
    ImportLiveproxyd {
        /// The liveproxyd.mk (`<site>/etc/check_mk/liveproxyd.mk`).
        file: PathBuf,
        /// Checkmk's liveproxyd global settings
        /// (`<site>/etc/check_mk/liveproxyd.d/wato/global.mk`), for the default parameters.
        #[arg(long)]
        global: Option<PathBuf>,
        /// Where livemux puts its sockets (default: the site's tmp/run/liveproxy).
        #[arg(long)]
        socket_dir: Option<PathBuf>,
        /// The central site's root (default: derived from FILE's path).
        #[arg(long)]
        omd_root: Option<PathBuf>,
    },
    /// Validate a configuration file (exit 0, or 1 with the error).
    CheckConfig {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Start three simulated sites and the proxy in front of them.
    #[cfg(feature = "demo")]
    Demo {
        /// Directory for sockets and state (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, ...).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page livemux(1), or write it and one page per command
    /// (livemux-run(1), ...) into a directory.
    Man {
        /// Write the pages into this directory instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Send one query to a Livestatus socket and print the answer.
    Query {
        /// The socket, e.g. /run/livemux/berlin.
        #[arg(long, required_unless_present = "tcp", conflicts_with = "tcp")]
        socket: Option<PathBuf>,
        /// A TCP address instead, e.g. 127.0.0.1:6560 (a cascading listener).
        #[arg(long)]
        tcp: Option<String>,
        /// The query; `\n` separates lines. Read from stdin when absent.
        query: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value = "130s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    // `run` sizes the runtime from its configuration; everything else needs one thread.
    let (command, threads) = match cli.command {
        Command::Run { config: path } => match Config::load(&path) {
            Ok(c) => {
                let threads = c.worker_threads;
                (Job::Run(path, Box::new(c)), threads)
            }
            Err(e) => return config_failed(&path, &e),
        },
        Command::Status { config, state_file, json } => return status(config, state_file, json),
        Command::ImportLiveproxyd { file, global, socket_dir, omd_root } => {
            let opts = livemux::liveproxyd::Options { file, global, socket_dir, omd_root };
            return match livemux::liveproxyd::import(&opts) {
                Ok(imported) => {
                    for w in &imported.warnings {
                        eprintln!("livemux: warning: {w}");
                    }
                    use std::io::Write;
                    let _ = std::io::stdout().lock().write_all(imported.toml.as_bytes());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format_args!("{e}")),
            };
        }
        Command::Reload { config } => {
            return match Config::load(&config) {
                Ok(c) => match livemux::daemon::signal_reload(&c) {
                    Ok(pid) => {
                        println!("sent SIGHUP to livemux (pid {pid}); see its log for the outcome");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(format_args!("{e}")),
                },
                Err(e) => config_failed(&config, &e),
            };
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "livemux", &mut script);
            return write_stdout(&script);
        }
        Command::Man { dir: None } => {
            let mut page = Vec::new();
            return match man_page(man_cli()).render(&mut page) {
                Ok(()) => write_stdout(&page),
                Err(e) => fail(format_args!("cannot render the man page: {e}")),
            };
        }
        Command::Man { dir: Some(dir) } => {
            let cli = man_cli();
            let commands = cli.get_subcommands().filter(|c| !c.is_hide_set()).cloned().collect::<Vec<_>>();
            let written = std::fs::create_dir_all(&dir).and_then(|()| {
                std::iter::once(cli).chain(commands).try_for_each(|c| man_page(c).generate_to(&dir).map(drop))
            });
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format_args!("cannot write the man pages into {}: {e}", dir.display())),
            };
        }
        other => (Job::Other(other), 1),
    };
    // One worker thread: tokio's single-threaded scheduler, which does the
    // same work without the work-stealing scheduler's bookkeeping (no other
    // worker to steal from or wake); more: the multi-threaded one.
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(format_args!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async {
        match command {
            Job::Run(path, config) => run(path, *config).await,
            Job::Other(Command::CheckConfig { config }) => match Config::load(&config) {
                Ok(c) => match livemux::app::check(&c) {
                    Ok(()) if c.sites.is_empty() => {
                        println!("{}: OK (no [[site]]: the daemon starts and serves nothing)", config.display());
                        ExitCode::SUCCESS
                    }
                    Ok(()) => {
                        println!("{}: OK ({} sites)", config.display(), c.sites.len());
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(format_args!("{}: {e}", config.display())),
                },
                Err(e) => config_failed(&config, &e),
            },
            #[cfg(feature = "demo")]
            Job::Other(Command::Demo { dir }) => match livemux::demo::run(dir, stop_signal(install_signals())).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format_args!("demo failed: {e}")),
            },
            Job::Other(Command::Query { socket, tcp, query, timeout }) => {
                let target = match (socket, tcp) {
                    (Some(p), _) => livemux::cli::Target::Unix(p),
                    (None, Some(a)) => livemux::cli::Target::Tcp(a),
                    (None, None) => return fail(format_args!("query needs --socket or --tcp")),
                };
                query_command(target, query, timeout).await
            }
            Job::Other(
                Command::Run { .. }
                | Command::Reload { .. }
                | Command::Status { .. }
                | Command::ImportLiveproxyd { .. }
                | Command::Completions { .. }
                | Command::Man { .. },
            ) => ExitCode::FAILURE,
        }
    })
}

/// What `main` runs once the runtime exists.
enum Job {
    Run(PathBuf, Box<Config>),
    Other(Command),
}

async fn run(path: PathBuf, config: Config) -> ExitCode {
    raise_open_files_limit();
    match livemux::daemon::run(path, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format_args!("cannot start: {e}")),
    }
}

/// Every client and channel is a file descriptor: use all the process may
/// have (the soft limit is often 1024 while the hard limit is much higher).
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}

/// SIGTERM and SIGHUP handlers.
#[cfg(feature = "demo")]
type Signals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

#[cfg(feature = "demo")]
fn install_signals() -> Option<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::hangup())) {
        (Ok(term), Ok(hup)) => Some((term, hup)),
        _ => None,
    }
}

/// Completes on SIGINT or SIGTERM (the demo); SIGHUP is logged and
/// otherwise ignored, so it cannot kill the demo.
#[cfg(feature = "demo")]
async fn stop_signal(signals: Option<Signals>) {
    let Some((mut term, mut hup)) = signals else {
        tracing::warn!("cannot install signal handlers; stop with Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = hup.recv() => tracing::warn!("SIGHUP received: the demo has no configuration file to reload"),
        }
    }
}

fn status(config: Option<PathBuf>, state_file: Option<PathBuf>, json: bool) -> ExitCode {
    let path = match (state_file, config) {
        (Some(p), _) => p,
        (None, Some(c)) => match Config::load(&c) {
            Ok(cfg) => cfg.state_file,
            Err(e) => return config_failed(&c, &e),
        },
        (None, None) => return fail(format_args!("status needs --config or --state-file")),
    };
    let now = std::time::SystemTime::now();
    let v = match livemux::status::read(&path, now) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("livemux: {e}");
            return ExitCode::from(livemux::status::Verdict::NoDaemon(e).code());
        }
    };
    let text = if json {
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
    } else {
        livemux::status::render(&v, now)
    };
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    ExitCode::from(livemux::status::verdict(&v).code())
}

async fn query_command(target: livemux::cli::Target, query: Option<String>, timeout: Duration) -> ExitCode {
    use livemux::cli::Source;
    let (text, source) = match query {
        Some(q) => (q, Source::Argument),
        None => match std::io::read_to_string(std::io::stdin()) {
            Ok(t) => (t, Source::Stdin),
            Err(e) => return fail(format_args!("cannot read the query from stdin: {e}")),
        },
    };
    match livemux::cli::query_target(&target, &text, source, timeout).await {
        Ok(body) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            if out.write_all(&body).and_then(|()| out.flush()).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(format_args!("{e}")),
    }
}

fn init_logging(level: Option<&str>) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter =
        level.map(str::to_owned).or_else(|| std::env::var("LIVEMUX_LOG").ok()).unwrap_or_else(|| "info".to_owned());
    let fmt = tracing_subscriber::fmt().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
    // Levels per target ("info", "livemux::site=debug,info") are a static
    // filter; `EnvFilter` is only for directives about spans and fields,
    // since it looks every span up on every enter and exit (a few per cent
    // of the CPU a query costs).
    match filter.parse::<tracing_subscriber::filter::Targets>() {
        Ok(targets) => fmt.finish().with(targets).init(),
        Err(_) => {
            let env = tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            fmt.with_env_filter(env).init()
        }
    }
}

/// Every problem in a configuration file, one line each, as compilers do.
fn config_failed(path: &std::path::Path, errors: &livemux::config::ConfigErrors) -> ExitCode {
    for e in &errors.0 {
        eprintln!("livemux: {}: {e}", path.display());
    }
    ExitCode::FAILURE
}

/// The command line as the man pages show it: built (so each command is
/// named livemux-run and so on, as clap_mangen's `generate_to` does), and
/// without the `help` command.
fn man_cli() -> clap::Command {
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    cli
}

/// The page of `cmd` (livemux(1), livemux-run(1), ...), footed "livemux <version>".
fn man_page(cmd: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(cmd).source(format!("livemux {}", env!("CARGO_PKG_VERSION"))).manual("livemux manual")
}

/// Write `bytes` to stdout; a closed stdout (`| head`) is a failure, not a panic.
fn write_stdout(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn fail(msg: std::fmt::Arguments<'_>) -> ExitCode {
    eprintln!("livemux: {msg}");
    ExitCode::FAILURE
}
