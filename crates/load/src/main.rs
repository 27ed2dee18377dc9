//! `livemux-load`: drive a Livestatus endpoint and report rate and latency.
//!
//! N clients send the same query in a loop for a fixed time, either on one
//! keep-alive connection each or on a new connection per query (as a GUI
//! worker without persistent connections does). Every answer is checked: a
//! fixed16 header, status 200, and a complete body; anything else counts as an
//! error. Output: one human-readable line and one JSON line.
//!
//! Targets: `unix:/path` or `tcp:host:port`.

use std::time::Duration;

use clap::Parser;
use hdrhistogram::Histogram;
use livemux_protocol::{FIXED16_LEN, ResponseHeader, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

#[derive(Parser, Clone)]
#[command(about = "Drive a Livestatus endpoint and report rate and latency percentiles")]
struct Args {
    /// unix:/path/to/socket or tcp:host:port
    #[arg(long)]
    target: String,
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
    /// Re-arm TCP_QUICKACK before reads (what a well-behaved TCP client does).
    #[arg(long)]
    quickack: bool,
    /// A label for the output.
    #[arg(long, default_value = "")]
    label: String,
}

enum Conn {
    Unix(UnixStream),
    Tcp(QuickAckTcp),
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
    async fn open(target: &str, quickack: bool) -> std::io::Result<Conn> {
        if let Some(p) = target.strip_prefix("unix:") {
            Ok(Conn::Unix(UnixStream::connect(p).await?))
        } else if let Some(a) = target.strip_prefix("tcp:") {
            let stream = TcpStream::connect(a).await?;
            stream.set_nodelay(true)?;
            Ok(Conn::Tcp(QuickAckTcp { stream, quickack }))
        } else {
            Err(std::io::Error::other(format!("bad target '{target}': use unix:PATH or tcp:HOST:PORT")))
        }
    }

    async fn exchange(&mut self, req: &[u8], buf: &mut [u8]) -> std::io::Result<u64> {
        match self {
            Conn::Unix(s) => exchange(s, req, buf).await,
            Conn::Tcp(s) => exchange(s, req, buf).await,
        }
    }
}

/// One query; the body is read through `buf` and dropped (only its length
/// and status matter). Returns the body length.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, req: &[u8], buf: &mut [u8]) -> std::io::Result<u64> {
    s.write_all(req).await?;
    let mut raw = [0u8; FIXED16_LEN];
    s.read_exact(&mut raw).await?;
    let h = ResponseHeader::decode(&raw).map_err(std::io::Error::other)?;
    let mut left = h.length;
    let mut first = Vec::new();
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
    }
    if h.status != Status::Ok {
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

async fn client(args: Args, start: Instant, end: Instant) -> Outcome {
    let mut text = args.query.replace("\\n", "\n").trim_end().to_owned();
    text.push_str("\nResponseHeader: fixed16\n");
    if !args.connect_per_query {
        text.push_str("KeepAlive: on\n");
    }
    text.push('\n');
    let req = text.into_bytes();
    let mut out = Outcome { hist: Histogram::new(3).expect("histogram"), bytes: 0, errors: 0, first_error: None };
    let mut conn: Option<Conn> = None;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        if conn.is_none() {
            match Conn::open(&args.target, args.quickack).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    note(&mut out, t0 >= start, e.to_string());
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let r = c.exchange(&req, &mut buf).await;
        let t1 = Instant::now();
        match r {
            Ok(len) => {
                if t0 >= start {
                    let _ = out.hist.record((t1 - t0).as_micros() as u64);
                    out.bytes += len;
                }
                if args.connect_per_query {
                    conn = None;
                }
            }
            Err(e) => {
                note(&mut out, t0 >= start, e.to_string());
                conn = None;
            }
        }
    }
    out
}

fn note(out: &mut Outcome, counted: bool, e: String) {
    if counted {
        out.errors += 1;
        out.first_error.get_or_insert(e);
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let start = Instant::now() + args.warmup;
    let end = start + args.duration;
    let tasks: Vec<_> = (0..args.clients).map(|_| tokio::spawn(client(args.clone(), start, end))).collect();
    let mut hist: Histogram<u64> = Histogram::new(3).expect("histogram");
    let (mut errors, mut first_error, mut bytes) = (0, None, 0u64);
    for t in tasks {
        let o = t.await.expect("client task");
        hist.add(&o.hist).expect("merge histograms");
        bytes += o.bytes;
        errors += o.errors;
        first_error = first_error.or(o.first_error);
    }
    // Queries that started in the window are counted whole, even if they
    // ended after it; measure against the time until the last one ended.
    let secs = (Instant::now().max(end) - start).as_secs_f64();
    let rate = hist.len() as f64 / secs;
    let (p50, p99) = (hist.value_at_quantile(0.5), hist.value_at_quantile(0.99));
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head -1`) is not an error worth a panic.
    let _ = writeln!(
        out,
        "{:<28} clients={:<3} {} queries/s={:>9.0} MB/s={:>8.1} p50={:>7}us p99={:>7}us errors={}",
        args.label,
        args.clients,
        if args.connect_per_query { "conn/query" } else { "keepalive " },
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
            "label": args.label, "target": args.target, "clients": args.clients,
            "connect_per_query": args.connect_per_query, "queries": hist.len(), "seconds": secs,
            "rate": rate, "bytes": bytes, "mb_per_s": bytes as f64 / secs / 1e6, "p50_us": p50, "p99_us": p99, "max_us": hist.max(), "errors": errors,
            "first_error": first_error,
        })
    );
    if errors > 0 {
        std::process::exit(1);
    }
}
