//! `livemux-load`: drive Livestatus endpoints and report rate and latency.
//!
//! Modes:
//! - **clients** (default): N clients send the same query in a loop for a
//!   fixed time, on one keep-alive connection each or (`--connect-per-query`)
//!   on a new connection per query. Client `i` uses target `i mod targets`.
//! - **fan-out** (`--fanout`): each request is what a GUI worker does for a
//!   page: connect to every target at once, send the query to all, read the
//!   answers one after another, disconnect.
//! - **idle** (`--idle N`): open N connections across the targets, hold them
//!   for the duration, then check that each is still open.
//!
//! Every answer is checked: a fixed16 header, status 200, a complete body
//! (read through a fixed buffer, never stored). Output: one human-readable
//! line and one JSON line.
//!
//! Targets: `unix:/path`, `tcp:host:port`, or `tls:host:port` (TLS, the
//! chain verified against `--ca-file` for the name `--server-name`).

use std::time::Duration;

use clap::Parser;
use hdrhistogram::Histogram;
use livemux_protocol::{FIXED16_LEN, ResponseHeader, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

#[derive(Parser, Clone)]
#[command(about = "Drive Livestatus endpoints and report rate and latency percentiles")]
struct Args {
    /// unix:/path/to/socket or tcp:host:port (repeatable).
    #[arg(long, required_unless_present = "targets_file")]
    target: Vec<String>,
    /// A file with one target per line.
    #[arg(long)]
    targets_file: Option<std::path::PathBuf>,
    /// The query; `\n` separates lines. fixed16 (and KeepAlive) are added.
    #[arg(long, default_value = "GET status\\nColumns: program_version")]
    query: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Measuring time.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured time before.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// A new connection per query instead of one keep-alive connection per client.
    #[arg(long)]
    connect_per_query: bool,
    /// Each request goes to every target (connect, send all, read all, close).
    #[arg(long)]
    fanout: bool,
    /// Hold this many idle connections instead of sending queries.
    #[arg(long)]
    idle: Option<usize>,
    /// Re-arm TCP_QUICKACK before reads (what a well-behaved TCP client does).
    #[arg(long)]
    quickack: bool,
    /// Slow reader: pause after every this many body bytes ...
    #[arg(long)]
    pause_every: Option<u64>,
    /// ... for this long.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pause: Duration,
    /// Give up connecting after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Time error answers and failed connects like answers (to measure how
    /// fast a client learns that a site is down).
    #[arg(long)]
    accept_errors: bool,
    /// CA bundle for `tls:` targets.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// Name the certificate of `tls:` targets must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// A full TLS handshake on every connection (as a GUI worker's client
    /// without session reuse does), instead of resuming sessions.
    #[arg(long)]
    no_resumption: bool,
    /// Each client sends a query this often (an interactive user), instead
    /// of the next one as soon as an answer is in.
    #[arg(long, value_parser = humantime::parse_duration)]
    every: Option<Duration>,
    /// A label for the output.
    #[arg(long, default_value = "")]
    label: String,
}

enum Conn {
    Unix(UnixStream),
    Tcp(QuickAckTcp),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// TLS client settings shared by every connection (and so its session cache).
#[derive(Clone)]
struct Tls {
    config: std::sync::Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

impl Tls {
    fn new(args: &Args) -> Result<Tls, String> {
        use rustls::pki_types::pem::PemObject;
        let ca = args.ca_file.as_ref().ok_or("tls: targets need --ca-file")?;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
            roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        if args.no_resumption {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let name = rustls::pki_types::ServerName::try_from(args.server_name.clone()).map_err(|e| e.to_string())?;
        Ok(Tls { config: std::sync::Arc::new(config), name })
    }
}

/// A TCP stream that may re-arm `TCP_QUICKACK` before every read.
struct QuickAckTcp {
    stream: TcpStream,
    quickack: bool,
}

impl AsyncRead for QuickAckTcp {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.quickack {
            let _ = socket2::SockRef::from(&this.stream).set_tcp_quickack(true);
        }
        std::pin::Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuickAckTcp {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Conn {
    async fn open(target: &str, quickack: bool, timeout: Duration, tls: Option<&Tls>) -> std::io::Result<Conn> {
        let connect = async {
            if let Some(a) = target.strip_prefix("tls:") {
                let tls = tls.ok_or_else(|| std::io::Error::other("tls: targets need --ca-file"))?;
                let stream = TcpStream::connect(a).await?;
                stream.set_nodelay(true)?;
                let c = tokio_rustls::TlsConnector::from(tls.config.clone()).connect(tls.name.clone(), stream).await?;
                return Ok(Conn::Tls(Box::new(c)));
            }
            if let Some(p) = target.strip_prefix("unix:") {
                Ok(Conn::Unix(UnixStream::connect(p).await?))
            } else if let Some(a) = target.strip_prefix("tcp:") {
                let stream = TcpStream::connect(a).await?;
                stream.set_nodelay(true)?;
                Ok(Conn::Tcp(QuickAckTcp { stream, quickack }))
            } else {
                Err(std::io::Error::other(format!("bad target '{target}': use unix:PATH or tcp:HOST:PORT")))
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))
    }

    async fn send(&mut self, req: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.write_all(req).await,
            Conn::Tcp(s) => s.write_all(req).await,
            Conn::Tls(s) => {
                s.write_all(req).await?;
                s.flush().await
            }
        }
    }

    async fn receive(
        &mut self,
        buf: &mut [u8],
        slow: Option<(u64, Duration)>,
        accept_errors: bool,
    ) -> std::io::Result<u64> {
        match self {
            Conn::Unix(s) => receive(s, buf, slow, accept_errors).await,
            Conn::Tcp(s) => receive(s, buf, slow, accept_errors).await,
            Conn::Tls(s) => receive(s.as_mut(), buf, slow, accept_errors).await,
        }
    }

    /// True if the peer has not closed the connection (nothing to read now).
    fn is_open(&self) -> bool {
        let mut b = [0u8; 1];
        let r = match self {
            Conn::Unix(s) => s.try_read(&mut b),
            Conn::Tcp(s) => s.stream.try_read(&mut b),
            Conn::Tls(s) => s.get_ref().0.try_read(&mut b),
        };
        matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Read one answer; the body goes through `buf` and is dropped. Returns its length.
async fn receive<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
    slow: Option<(u64, Duration)>,
    accept_errors: bool,
) -> std::io::Result<u64> {
    let mut raw = [0u8; FIXED16_LEN];
    s.read_exact(&mut raw).await?;
    let h = ResponseHeader::decode(&raw).map_err(std::io::Error::other)?;
    let mut left = h.length;
    let mut first = Vec::new();
    let mut since_pause = 0u64;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = s.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if h.status != Status::Ok && first.len() < 200 {
            first.extend_from_slice(&buf[..n.min(200)]);
        }
        left -= n as u64;
        if let Some((every, pause)) = slow {
            since_pause += n as u64;
            if since_pause >= every {
                since_pause = 0;
                tokio::time::sleep(pause).await;
            }
        }
    }
    if h.status != Status::Ok && !accept_errors {
        return Err(std::io::Error::other(format!("status {}: {}", h.status, String::from_utf8_lossy(&first).trim())));
    }
    Ok(h.length)
}

struct Outcome {
    hist: Histogram<u64>,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Outcome {
    fn new() -> Outcome {
        Outcome { hist: Histogram::new(3).expect("histogram"), bytes: 0, errors: 0, first_error: None }
    }

    /// A failed attempt: with `--accept-errors` it is timed like an answer
    /// (the time until the client knew), otherwise it is an error.
    fn failed(&mut self, args: &Args, t0: Instant, start: Instant, e: String) {
        if args.accept_errors {
            if t0 >= start {
                let _ = self.hist.record(t0.elapsed().as_micros() as u64);
            }
        } else {
            self.note(t0 >= start, e);
        }
    }

    fn note(&mut self, counted: bool, e: String) {
        if counted {
            self.errors += 1;
            self.first_error.get_or_insert(e);
        }
    }
}

fn request(args: &Args) -> Vec<u8> {
    let mut text = args.query.replace("\\n", "\n").trim_end().to_owned();
    text.push_str("\nResponseHeader: fixed16\n");
    if !args.connect_per_query && !args.fanout {
        text.push_str("KeepAlive: on\n");
    }
    text.push('\n');
    text.into_bytes()
}

/// One client sending queries to one target.
async fn client(args: Args, target: String, tls: Option<Tls>, start: Instant, end: Instant) -> Outcome {
    let req = request(&args);
    let slow = args.pause_every.map(|e| (e, args.pause));
    let mut out = Outcome::new();
    let mut conn: Option<Conn> = None;
    let mut buf = vec![0u8; 256 * 1024];
    let mut next = Instant::now();
    loop {
        if let Some(every) = args.every {
            tokio::time::sleep_until(next).await;
            next += every;
        }
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        if conn.is_none() {
            match Conn::open(&target, args.quickack, args.connect_timeout, tls.as_ref()).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    out.failed(&args, t0, start, e.to_string());
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let r = match c.send(&req).await {
            Ok(()) => c.receive(&mut buf, slow, args.accept_errors).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(len) => {
                if t0 >= start {
                    let _ = out.hist.record(t0.elapsed().as_micros() as u64);
                    out.bytes += len;
                }
                if args.connect_per_query {
                    conn = None;
                }
            }
            Err(e) => {
                out.failed(&args, t0, start, e.to_string());
                conn = None;
            }
        }
    }
    out
}

/// One GUI worker: every request connects to all targets, sends, reads all.
async fn fanout_client(args: Args, targets: Vec<String>, tls: Option<Tls>, start: Instant, end: Instant) -> Outcome {
    let req = request(&args);
    let mut out = Outcome::new();
    let mut buf = vec![0u8; 256 * 1024];
    while Instant::now() < end {
        let t0 = Instant::now();
        let mut opening = tokio::task::JoinSet::new();
        for t in &targets {
            let (t, q, to, tls) = (t.clone(), args.quickack, args.connect_timeout, tls.clone());
            opening.spawn(async move { Conn::open(&t, q, to, tls.as_ref()).await });
        }
        let mut conns = Vec::with_capacity(targets.len());
        let mut failed = None;
        while let Some(r) = opening.join_next().await {
            match r {
                Ok(Ok(c)) => conns.push(c),
                Ok(Err(e)) => failed = Some(e.to_string()),
                Err(e) => failed = Some(e.to_string()),
            }
        }
        let mut result: Result<u64, String> = failed.map_or(Ok(0), Err);
        if result.is_ok() {
            for c in &mut conns {
                if let Err(e) = c.send(&req).await {
                    result = Err(e.to_string());
                }
            }
        }
        if result.is_ok() {
            for c in &mut conns {
                match c.receive(&mut buf, None, args.accept_errors).await {
                    Ok(n) => result = result.map(|b| b + n),
                    Err(e) => {
                        result = Err(e.to_string());
                        break;
                    }
                }
            }
        }
        match result {
            Ok(bytes) if t0 >= start => {
                let _ = out.hist.record(t0.elapsed().as_micros() as u64);
                out.bytes += bytes;
            }
            Ok(_) => {}
            Err(e) => out.note(t0 >= start, e),
        }
    }
    out
}

/// Hold `n` idle connections for the duration; count those still open.
async fn idle(args: &Args, targets: &[String], n: usize, tls: Option<&Tls>) -> (usize, usize, Option<String>) {
    let mut conns = Vec::with_capacity(n);
    let mut first_error = None;
    for i in 0..n {
        match Conn::open(&targets[i % targets.len()], false, args.connect_timeout, tls).await {
            Ok(c) => conns.push(c),
            Err(e) => {
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let opened = conns.len();
    println!("holding {opened} idle connections");
    tokio::time::sleep(args.duration).await;
    let open = conns.iter().filter(|c| c.is_open()).count();
    (opened, open, first_error)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut targets = args.target.clone();
    if let Some(f) = &args.targets_file {
        match std::fs::read_to_string(f) {
            Ok(text) => targets.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned)),
            Err(e) => {
                eprintln!("livemux-load: cannot read {}: {e}", f.display());
                std::process::exit(2);
            }
        }
    }
    if targets.is_empty() {
        eprintln!("livemux-load: no targets");
        std::process::exit(2);
    }
    use std::io::Write;
    let tls = if targets.iter().any(|t| t.starts_with("tls:")) {
        match Tls::new(&args) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("livemux-load: {e}");
                std::process::exit(2);
            }
        }
    } else {
        None
    };
    if let Some(n) = args.idle {
        let (opened, open, first_error) = idle(&args, &targets, n, tls.as_ref()).await;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{:<28} idle connections: opened={opened} still open={open}", args.label);
        let _ = writeln!(
            out,
            "{}",
            serde_json::json!({"label": args.label, "idle": n, "opened": opened, "open": open, "first_error": first_error})
        );
        std::process::exit(if open == n { 0 } else { 1 });
    }
    let start = Instant::now() + args.warmup;
    let end = start + args.duration;
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| {
            if args.fanout {
                tokio::spawn(fanout_client(args.clone(), targets.clone(), tls.clone(), start, end))
            } else {
                tokio::spawn(client(args.clone(), targets[i % targets.len()].clone(), tls.clone(), start, end))
            }
        })
        .collect();
    let mut hist: Histogram<u64> = Histogram::new(3).expect("histogram");
    let (mut errors, mut first_error, mut bytes) = (0, None, 0u64);
    for t in tasks {
        let o = t.await.expect("client task");
        hist.add(&o.hist).expect("merge histograms");
        errors += o.errors;
        bytes += o.bytes;
        first_error = first_error.or(o.first_error);
    }
    // Requests that started in the window are counted whole, even if they
    // ended after it; measure against the time until the last one ended.
    let secs = (Instant::now().max(end) - start).as_secs_f64();
    let rate = hist.len() as f64 / secs;
    let (p50, p99) = (hist.value_at_quantile(0.5), hist.value_at_quantile(0.99));
    let mode = if args.fanout {
        format!("fanout={}", targets.len())
    } else if args.connect_per_query {
        "conn/query".to_owned()
    } else {
        "keepalive".to_owned()
    };
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head -1`) is not an error worth a panic.
    let _ = writeln!(
        out,
        "{:<28} clients={:<3} {:<10} rate={:>9.0}/s MB/s={:>8.1} p50={:>7}us p99={:>7}us errors={}",
        args.label,
        args.clients,
        mode,
        rate,
        bytes as f64 / secs / 1e6,
        p50,
        p99,
        errors
    );
    let _ = writeln!(
        out,
        "{}",
        serde_json::json!({
            "label": args.label, "targets": targets.len(), "clients": args.clients, "mode": mode,
            "requests": hist.len(), "seconds": secs, "rate": rate, "bytes": bytes,
            "mb_per_s": bytes as f64 / secs / 1e6, "p50_us": p50, "p99_us": p99, "max_us": hist.max(),
            "errors": errors, "first_error": first_error,
        })
    );
    if errors > 0 {
        std::process::exit(1);
    }
}
