//! A federated `GET`: planning the client's request, cutting each site's
//! JSON answer into rows as it arrives, merging and rendering.
//!
//! The input's stream is `\0`-separated: the client's request, then up to
//! three sites' answers (each cut in the input's chunk sizes). Asserted:
//! a refusal has a Livestatus error code; the query sent to the sites is
//! one well-formed request; the rows cut from an answer, and its verdict,
//! are the same whatever the chunking; the merged answer, in the JSON
//! formats, is valid JSON with the rows the plan allows, and the same
//! whether the rows were parsed or spliced through unread.

use serde_json::Value;

use livemux::federation::RowSplitter;
use livemux::federation::merge::Merger;
use livemux::federation::plan::{self, Format, Pass, RowSite};
use livemux_protocol::{Framer, Limits, Query, Request};

use super::{Input, chunks, parts};

const SITES: [&str; 3] = ["alpha", "beta", "gamma"];

/// Fuzz target `federation_answer`.
pub fn federation_answer(data: &[u8]) {
    let input = Input::new(data);
    let p = parts(input.stream, 1 + SITES.len());
    let request = String::from_utf8_lossy(p[0]);
    let answers: Vec<Result<Vec<Vec<Value>>, String>> = p[1..]
        .iter()
        .map(|answer| {
            let [whole, chosen, bytewise] = input.chunkings().map(|sizes| split(&chunks(answer, &sizes)));
            assert_eq!(whole, chosen, "chunking changed the rows");
            assert_eq!(whole, bytewise, "byte-at-a-time reading changed the rows");
            whole
        })
        .collect();
    let plan = match plan::plan(&request) {
        Ok(plan) => plan,
        Err(refused) => {
            assert!(matches!(refused.status, 400 | 452), "refused with {}", refused.status);
            assert!(!refused.message.is_empty());
            return;
        }
    };
    for site in SITES {
        if let Some(q) = plan.query_for(site) {
            check_site_query(&q, if plan.pass == Pass::Csv { "csv" } else { "json" });
        }
    }
    let mut out = Vec::new();
    let raw: Vec<&[u8]> = p[1..].to_vec();
    let [_, sizes, _] = input.chunkings();
    merge(&plan, &answers, &raw, &sizes, &mut out);
    if matches!(plan.format, Format::Json | Format::WrappedJson) {
        let parsed: Result<Value, _> = serde_json::from_slice(&out);
        assert!(parsed.is_ok(), "{:?} answer is not JSON: {}", plan.format, String::from_utf8_lossy(&out));
    }
}

/// The rows of one site's answer, or why it was refused.
fn split(chunks: &[&[u8]]) -> Result<Vec<Vec<Value>>, String> {
    let mut splitter = RowSplitter::default();
    let mut rows = Vec::new();
    for chunk in chunks {
        splitter.feed(chunk, |row| rows.push(row))?;
    }
    splitter.finish()?;
    Ok(rows)
}

/// The site query is one request that parses as a `GET` asking for
/// `format` (JSON, or csv when the rows are spliced as csv).
fn check_site_query(text: &str, format: &str) {
    let q = match Query::from_text(text) {
        Ok(q) => q,
        Err(e) => panic!("the site query does not parse ({e}): {text:?}"),
    };
    assert_eq!(q.output_format.as_deref(), Some(format), "the site query: {text:?}");
    let mut wire = Vec::new();
    q.encode_for_site(&mut wire);
    let limits = Limits { max_request_bytes: usize::MAX, max_line_bytes: usize::MAX, max_header_lines: usize::MAX };
    let mut framer = Framer::new();
    match framer.scan(&wire, &limits) {
        Ok(Some(f)) => {
            assert_eq!(f.end, wire.len(), "the site query frames as more than one request: {wire:?}");
            assert!(matches!(Request::parse(&wire[f.start..f.end]), Ok(Request::Get(_))));
        }
        other => panic!("the site query does not frame ({other:?}): {wire:?}"),
    }
}

/// Merge the sites' rows as the federated socket does (its [`Merger`],
/// one batch per site); with [`Pass::Json`], also spliced unread, and with
/// [`Pass::Top`] read key first, which must give the same answer.
fn merge(
    plan: &plan::Plan,
    answers: &[Result<Vec<Vec<Value>>, String>],
    raw: &[&[u8]],
    sizes: &[usize],
    out: &mut Vec<u8>,
) {
    let mut merger = Merger::start(plan, usize::MAX, out);
    let mut spliced = Vec::new();
    let mut splicer = Merger::start(plan, usize::MAX, &mut spliced);
    let mut failed = Vec::new();
    for (i, ((site, answer), bytes)) in SITES.iter().zip(answers).zip(raw).enumerate() {
        if plan.sites.as_ref().is_some_and(|set| !set.contains(*site)) || plan.query_for(site).is_none() {
            continue;
        }
        let rows = match answer {
            Ok(rows) => rows,
            Err(why) => {
                failed.push((site.to_string(), why.clone()));
                continue;
            }
        };
        let site_of = RowSite { name: site, ..RowSite::default() };
        assert!(merger.rows(site_of, rows.clone(), 0, out).is_ok(), "no budget to exceed");
        if plan.pass == Pass::Top {
            // The answer parsed: read key first, in the input's chunks.
            for piece in chunks(bytes, sizes) {
                assert_eq!(splicer.top(i, site_of, piece), Ok(()), "no budget to exceed");
            }
            assert_eq!(splicer.top_end(i), Ok(()), "an answer that parsed is whole");
        }
        if plan.pass == Pass::Json {
            let (mut joined, mut ends) = (Vec::new(), Vec::new());
            let mut splitter = RowSplitter::default();
            let cut = splitter.feed_raw(bytes, |row| {
                joined.extend_from_slice(b",\n");
                joined.extend_from_slice(row);
                ends.push(joined.len() as u32);
                Ok(())
            });
            assert!(cut.is_ok(), "a row cut from an answer that parsed is not cut raw: {cut:?}");
            splicer.raw(&joined, &ends, &mut spliced);
        }
    }
    merger.finish(&failed, out);
    splicer.finish(&failed, &mut spliced);
    if plan.pass == Pass::Top {
        assert_eq!(
            String::from_utf8_lossy(out),
            String::from_utf8_lossy(&spliced),
            "a sorted page read key first differs from one read whole"
        );
    }
    if plan.pass == Pass::Json {
        let (a, b): (Result<Value, _>, Result<Value, _>) =
            (serde_json::from_slice(out), serde_json::from_slice(&spliced));
        assert!(
            matches!((&a, &b), (Ok(a), Ok(b)) if a == b),
            "spliced and parsed answers differ: {} / {}",
            String::from_utf8_lossy(out),
            String::from_utf8_lossy(&spliced)
        );
    }
    if let (Some(l), true) = (plan.limit, plan.stats.is_empty() && matches!(plan.format, Format::Json)) {
        let rows = serde_json::from_slice::<Vec<Value>>(out).map_or(0, |v| v.len());
        assert!(rows <= l + usize::from(plan.headers), "more rows than the Limit");
    }
}
