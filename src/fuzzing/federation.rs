//! A federated `GET`: planning the client's request, cutting each site's
//! JSON answer into rows as it arrives, merging and rendering.
//!
//! The input's stream is `\0`-separated: the client's request, then up to
//! three sites' answers (each cut in the input's chunk sizes). Asserted:
//! a refusal has a Livestatus error code; the query sent to the sites is
//! one well-formed request; the rows cut from an answer, and its verdict,
//! are the same whatever the chunking; the merged answer, in the JSON
//! formats, is valid JSON with the rows the plan allows.

use serde_json::Value;

use crate::federation::RowSplitter;
use crate::federation::plan::{self, Format, Renderer, StatsMerge};
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
            check_site_query(&q);
        }
    }
    let mut out = Vec::new();
    merge(&plan, &answers, &mut out);
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

/// The site query is one request that parses as a `GET` asking for JSON.
fn check_site_query(text: &str) {
    let q = match Query::from_text(text) {
        Ok(q) => q,
        Err(e) => panic!("the site query does not parse ({e}): {text:?}"),
    };
    assert_eq!(q.output_format.as_deref(), Some("json"), "the site query: {text:?}");
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

/// Merge the sites' rows as the federated socket does (`answer` in
/// `federation`): stats per group, or sort with offset and limit, or
/// plain rows with offset and limit; then render.
fn merge(plan: &plan::Plan, answers: &[Result<Vec<Vec<Value>>, String>], out: &mut Vec<u8>) {
    let header = plan.headers.then(|| plan.header_names(0));
    let mut renderer = Renderer::start(plan, header.as_deref(), out);
    let mut stats = StatsMerge::default();
    let mut sorted = Vec::new();
    let mut failed = Vec::new();
    let (mut skipped, mut given, mut total) = (0usize, 0usize, 0usize);
    for (site, answer) in SITES.iter().zip(answers) {
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
        for row in rows {
            total += 1;
            if !plan.stats.is_empty() {
                stats.add(plan, site, row.clone());
            } else if !plan.sort.is_empty() {
                sorted.push(plan.client_row(site, row.clone()));
            } else if skipped < plan.offset {
                skipped += 1;
            } else if plan.limit.is_none_or(|l| given < l) {
                given += 1;
                renderer.row(&plan.client_row(site, row.clone()), out);
            }
        }
    }
    let mut rows = plan::held_rows(plan, stats, sorted);
    for row in &mut rows {
        if plan.stats.is_empty() && !plan.columns.is_empty() {
            row.truncate(plan.visible);
        }
        renderer.row(row, out);
    }
    if plan.limit.is_some() && plan.stats.is_empty() {
        assert!(given + rows.len() <= plan.limit.unwrap_or(usize::MAX), "more rows than the Limit");
    }
    renderer.finish(&failed, total.max(given), out);
}
