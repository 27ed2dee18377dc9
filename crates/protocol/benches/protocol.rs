//! Micro-benchmarks of the hot protocol paths: framing and parsing a GUI
//! query, re-encoding it for a site, and the fixed16 header.
//!
//! `cargo bench -p livemux-protocol`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use livemux_protocol::{Framer, Limits, Request, ResponseHeader, Status};

/// What the Checkmk GUI sends for a service view: about 20 columns, a few
/// filters, its own headers.
const GUI_QUERY: &[u8] = b"GET services\n\
Columns: host_name description state state_type plugin_output perf_data has_been_checked \
last_check last_state_change acknowledged scheduled_downtime_depth host_state host_has_been_checked \
notifications_enabled active_checks_enabled accept_passive_checks is_flapping in_notification_period \
custom_variable_names custom_variable_values comments_with_extra_info\n\
Filter: state > 0\n\
Filter: scheduled_downtime_depth = 0\n\
Filter: host_scheduled_downtime_depth = 0\n\
And: 3\n\
AuthUser: cmkadmin\n\
Localtime: 1732200000\n\
OutputFormat: json\n\
KeepAlive: on\n\
ResponseHeader: fixed16\n\
\n";

fn protocol(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Bytes(GUI_QUERY.len() as u64));
    g.bench_function("frame_gui_query", |b| {
        b.iter(|| {
            let mut f = Framer::new();
            black_box(f.scan(black_box(GUI_QUERY), &limits).ok().flatten())
        })
    });
    g.bench_function("parse_gui_query", |b| b.iter(|| black_box(Request::parse(black_box(GUI_QUERY)).ok())));
    let Ok(Request::Get(q)) = Request::parse(GUI_QUERY) else { panic!("the benchmark query must parse") };
    let mut out = Vec::with_capacity(1024);
    g.bench_function("encode_for_site", |b| {
        b.iter(|| {
            out.clear();
            q.encode_for_site(&mut out);
            black_box(out.len())
        })
    });
    let pipelined: Vec<u8> = GUI_QUERY.repeat(10);
    g.throughput(Throughput::Bytes(pipelined.len() as u64));
    g.bench_function("frame_10_pipelined", |b| {
        b.iter(|| {
            let mut f = Framer::new();
            let mut rest: &[u8] = &pipelined;
            let mut n = 0;
            while let Ok(Some(end)) = f.scan(rest, &limits) {
                rest = &rest[end.end..];
                n += 1;
            }
            black_box(n)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("fixed16");
    let h = ResponseHeader::new(Status::Ok, 20_675_234);
    g.bench_function("encode", |b| b.iter(|| black_box(black_box(h).encode())));
    let raw = h.encode();
    g.bench_function("decode", |b| b.iter(|| black_box(ResponseHeader::decode(black_box(&raw)).ok())));
    g.finish();
}

criterion_group!(benches, protocol);
criterion_main!(benches);
