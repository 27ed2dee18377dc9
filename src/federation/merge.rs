//! The sites' rows merged into the client's answer, without I/O: what
//! the federated socket's merger does with each batch of rows as it comes
//! (the fuzz target drives the same code).
//!
//! Plain rows are rendered as they come, with `Offset` and `Limit`
//! counted over the union; rows spliced through unread ([`Pass::Json`],
//! [`Pass::Csv`]) are cut at their row ends for the same counts. `Stats`
//! rows merge per group key. `Sort` holds rows until every site answered;
//! with a `Limit`, only the `Offset + Limit` first in order are kept (the
//! rest dropped as they lose), so a sorted page over a large union holds a
//! page's rows, not the union's.

use serde_json::Value;

use super::plan::{self, Pass, Plan, Renderer, RowSite, StatsMerge};
use super::rows::{RowSplitter, columns};

/// A `Sort` would hold more rows than the budget allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget;

/// Why rows read by the merger ([`Pass::Top`]) were not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopError {
    /// See [`OverBudget`].
    OverBudget,
    /// The site's answer is not valid JSON: the site fails.
    Site(String),
}

impl From<String> for TopError {
    fn from(why: String) -> Self {
        TopError::Site(why)
    }
}

/// One federated answer being merged.
pub struct Merger<'p> {
    plan: &'p Plan,
    renderer: Renderer,
    stats: StatsMerge,
    /// Rows held for `Sort` (client rows, hidden sort columns included).
    sorted: Vec<Vec<Value>>,
    /// `federation_sort_budget`: bytes of rows `Sort` may hold.
    sort_budget: usize,
    /// Rows a sorted `Limit` keeps (`Offset + Limit`).
    keep: Option<usize>,
    /// With `keep` rows held in order: the last one's sort key, which a
    /// row must beat to be held ([`Pass::Top`]).
    worst: Option<Vec<Value>>,
    /// Each site's answer being cut into rows ([`Pass::Top`]).
    splitters: Vec<RowSplitter>,
    /// Bytes and count of all the rows seen, for a held row's size.
    seen_bytes: usize,
    /// Rows skipped for `Offset`, given within `Limit`, and matching.
    skipped: usize,
    given: usize,
    total: usize,
}

impl<'p> Merger<'p> {
    /// A merger for `plan`; `out` gets the answer's opening.
    pub fn start(plan: &'p Plan, sort_budget: usize, out: &mut Vec<u8>) -> Self {
        let header = plan.headers.then(|| plan.header_names(0));
        let keep = plan.limit.filter(|_| !plan.sort.is_empty()).map(|l| plan.offset.saturating_add(l));
        Merger {
            plan,
            renderer: Renderer::start(plan, header.as_deref(), out),
            stats: StatsMerge::default(),
            sorted: Vec::new(),
            sort_budget,
            keep,
            worst: None,
            splitters: Vec::new(),
            seen_bytes: 0,
            skipped: 0,
            given: 0,
            total: 0,
        }
    }

    /// Parsed rows of one site ([`Pass::Parse`]), `raw_len` the bytes they
    /// came in.
    pub fn rows(
        &mut self,
        site: RowSite<'_>,
        rows: Vec<Vec<Value>>,
        raw_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), OverBudget> {
        let plan = self.plan;
        self.total += rows.len();
        self.seen_bytes += raw_len;
        if !plan.stats.is_empty() {
            for row in rows {
                self.stats.add(plan, site.name, row);
            }
        } else if !plan.sort.is_empty() {
            self.sorted.extend(rows.into_iter().map(|row| plan.client_row_of(site, row)));
            self.trim()?;
        } else {
            for row in rows {
                if self.skipped < plan.offset {
                    self.skipped += 1;
                } else if plan.limit.is_none_or(|l| self.given < l) {
                    self.given += 1;
                    self.renderer.row(&plan.client_row_of(site, row), out);
                }
            }
        }
        Ok(())
    }

    /// Held rows past twice a sorted `Limit`'s page are sorted and cut to
    /// the page; and the held rows must fit the budget.
    fn trim(&mut self) -> Result<(), OverBudget> {
        if let Some(keep) = self.keep
            && self.sorted.len() >= keep.saturating_mul(2).max(32)
        {
            // Stable: of equal rows, those that came first stay first, as
            // in one sort of them all.
            plan::sort(self.plan, &mut self.sorted);
            self.sorted.truncate(keep);
            self.worst = keep.checked_sub(1).and_then(|last| self.sorted.get(last)).map(|r| self.plan.key_of_row(r));
        }
        // What the held rows take, about: their share of the bytes seen,
        // and a row's own overhead.
        let per_row = self.seen_bytes / self.total.max(1) + 64;
        if self.sorted.len().saturating_mul(per_row) > self.sort_budget {
            return Err(OverBudget);
        }
        Ok(())
    }

    /// A read of site `i`'s answer, for a sorted page ([`Pass::Top`]): its
    /// rows are cut here, and a row's sort keys are read first, the rest of
    /// it only when it may be on the page.
    pub fn top(&mut self, i: usize, site: RowSite<'_>, bytes: &[u8]) -> Result<(), TopError> {
        if self.splitters.len() <= i {
            self.splitters.resize_with(i + 1, RowSplitter::default);
        }
        let mut splitter = std::mem::take(&mut self.splitters[i]);
        let mut cols = Vec::new();
        let result = splitter.feed_cols(bytes, |row, commas| {
            columns(row, commas, &mut cols);
            self.top_row(site, row, &cols)
        });
        self.splitters[i] = splitter;
        result
    }

    /// Site `i`'s answer ended: was it whole ([`Pass::Top`])?
    pub fn top_end(&self, i: usize) -> Result<(), String> {
        self.splitters.get(i).map_or(Ok(()), RowSplitter::finish)
    }

    fn top_row(&mut self, site: RowSite<'_>, raw: &[u8], cols: &[std::ops::Range<usize>]) -> Result<(), TopError> {
        let plan = self.plan;
        self.total += 1;
        self.seen_bytes += raw.len();
        if self.keep == Some(0) {
            return Ok(());
        }
        if let Some(worst) = &self.worst {
            // Not before the page's last row: after it (of equal rows, the
            // first to come stays first).
            if !plan.sorts_before(site, raw, cols, worst)? {
                return Ok(());
            }
        }
        let row = serde_json::from_slice::<Vec<Value>>(raw)
            .map_err(|e| TopError::Site(format!("a row is not valid JSON: {e}")))?;
        self.sorted.push(plan.client_row_of(site, row));
        self.trim().map_err(|OverBudget| TopError::OverBudget)
    }

    /// Rows as a site sent them ([`Pass::Json`], [`Pass::Csv`]): `ends`
    /// marks the end of each in `bytes`.
    pub fn raw(&mut self, bytes: &[u8], ends: &[u32], out: &mut Vec<u8>) {
        debug_assert!(matches!(self.plan.pass, Pass::Json | Pass::Csv));
        let n = ends.len();
        self.total += n;
        let skip = self.plan.offset.saturating_sub(self.skipped).min(n);
        self.skipped += skip;
        let take = self.plan.limit.map_or(n, |l| l.saturating_sub(self.given)).min(n - skip);
        if take > 0 {
            let from = if skip == 0 { 0 } else { ends[skip - 1] as usize };
            let to = (ends[skip + take - 1] as usize).min(bytes.len());
            self.renderer.spliced(&bytes[from.min(to)..to], take, out);
            self.given += take;
        }
    }

    /// Every site is done: the held rows in order, and the answer's end
    /// (`failed`: site → why, for `wrapped_json`).
    pub fn finish(self, failed: &[(String, String)], out: &mut Vec<u8>) {
        let plan = self.plan;
        let mut renderer = self.renderer;
        let sorting = plan.stats.is_empty() && !plan.sort.is_empty();
        let mut rows = plan::held_rows(plan, self.stats, self.sorted);
        for row in &mut rows {
            // Columns asked only to sort by are not shown.
            if plan.stats.is_empty() && !plan.columns.is_empty() {
                row.truncate(plan.visible);
            }
            renderer.row(row, out);
        }
        // Every matching row, before Offset and Limit (Stats: every group).
        let total = match (plan.stats.is_empty(), sorting) {
            (false, _) => rows.len(),
            _ => self.total.max(self.given),
        };
        renderer.finish(failed, total, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_of(n: usize, site: &str) -> Vec<Vec<Value>> {
        (0..n).map(|i| vec![Value::from(format!("{site}-{:03}", (i * 37) % n)), Value::from(i % 3)]).collect()
    }

    /// A sorted page is the same whether rows are held whole or kept to a
    /// page as they come, and whatever the batches.
    #[test]
    fn a_sorted_limited_page_keeps_only_a_page_and_equals_a_full_sort() {
        for (offset, limit) in [(0, 1), (0, 10), (5, 10), (2990, 20), (0, 5000)] {
            let q = format!(
                "GET hosts\nColumns: name state\nSort: state desc\nSort: name asc\nOffset: {offset}\nLimit: {limit}\n\
                 OutputFormat: wrapped_json\n"
            );
            let p = plan::plan(&q).unwrap();
            let all: Vec<Vec<Value>> = ["a", "b", "c"].iter().flat_map(|s| rows_of(1000, s)).collect();
            let mut want = all.clone();
            plan::sort(&p, &mut want);
            let want: Vec<Vec<Value>> = want.into_iter().skip(offset).take(limit).collect();
            for batch in [1, 7, 333, 3000] {
                let mut out = Vec::new();
                let mut m = Merger::start(&p, usize::MAX, &mut out);
                for rows in all.chunks(batch) {
                    m.rows(RowSite { name: "x", ..RowSite::default() }, rows.to_vec(), 20 * rows.len(), &mut out)
                        .unwrap();
                    assert!(m.sorted.len() <= (2 * (offset + limit)).max(32) + batch, "held rows stay a page");
                }
                m.finish(&[], &mut out);
                let v: Value = serde_json::from_slice(&out).unwrap();
                assert_eq!(v["total_count"], 3000, "offset {offset} limit {limit} batch {batch}");
                assert_eq!(v["data"], serde_json::json!(want), "offset {offset} limit {limit} batch {batch}");
            }
        }
    }

    /// Rows read key first ([`Pass::Top`]) give the page a full sort gives,
    /// with the site column and a computed column among the keys.
    #[test]
    fn a_page_read_key_first_equals_a_full_sort() {
        for (offset, limit) in [(0, 1), (0, 100), (7, 50), (2990, 20), (0, 5000)] {
            let q = format!(
                "GET hosts\nColumns: name state_order peer_name\nSort: state_order desc\nSort: peer_name asc\n\
                 Sort: name desc\nOffset: {offset}\nLimit: {limit}\nOutputFormat: json\n"
            );
            let p = plan::plan(&q).unwrap();
            assert_eq!(p.pass, Pass::Top);
            let sites = [("c", rows_of(1000, "c")), ("a", rows_of(1000, "a")), ("b", rows_of(1000, "b"))];
            let mut want = Vec::new();
            let mut m = Merger::start(&p, usize::MAX, &mut want);
            for (name, rows) in &sites {
                m.rows(RowSite { name, ..RowSite::default() }, rows.clone(), 0, &mut want).unwrap();
            }
            m.finish(&[], &mut want);
            for cut in [1, 64, 1000, 100_000] {
                let mut got = Vec::new();
                let mut m = Merger::start(&p, usize::MAX, &mut got);
                for (i, (name, rows)) in sites.iter().enumerate() {
                    let answer = serde_json::to_vec(rows).unwrap();
                    for piece in answer.chunks(cut) {
                        m.top(i, RowSite { name, ..RowSite::default() }, piece).unwrap();
                    }
                    m.top_end(i).unwrap();
                }
                m.finish(&[], &mut got);
                assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want), "{q} reads of {cut}");
            }
        }
        let p = plan::plan("GET hosts\nColumns: name\nSort: name\nLimit: 5\n").unwrap();
        let mut out = Vec::new();
        let mut m = Merger::start(&p, usize::MAX, &mut out);
        let bad = m.top(0, RowSite::default(), b"[[\"a\",]]");
        assert!(matches!(bad, Err(TopError::Site(why)) if why.starts_with("a row is not valid JSON")));
        assert_eq!(m.top(1, RowSite::default(), b"[[\"a\"]"), Ok(()));
        assert_eq!(m.top_end(1), Err("the answer ends early".to_owned()));
    }

    #[test]
    fn a_sort_without_limit_over_the_budget_is_refused() {
        let p = plan::plan("GET hosts\nColumns: name state\nSort: name\n").unwrap();
        let mut out = Vec::new();
        let mut m = Merger::start(&p, 100_000, &mut out);
        let r = m.rows(RowSite::default(), rows_of(2000, "a"), 40_000, &mut out);
        assert_eq!(r, Err(OverBudget), "2,000 rows of about 84 bytes are over 100,000 bytes");
        // With a Limit the same rows stay within it.
        let p = plan::plan("GET hosts\nColumns: name state\nSort: name\nLimit: 10\n").unwrap();
        let mut m = Merger::start(&p, 100_000, &mut out);
        for _ in 0..100 {
            assert_eq!(m.rows(RowSite::default(), rows_of(100, "a"), 2000, &mut out), Ok(()));
        }
    }

    /// Spliced rows get the same Offset and Limit as parsed ones.
    #[test]
    fn spliced_rows_are_paged_like_parsed_rows() {
        for (offset, limit) in [(0, None), (3, None), (0, Some(4)), (5, Some(3)), (20, Some(3))] {
            let mut q = "GET hosts\nColumns: name state\nOutputFormat: json\n".to_owned();
            if offset > 0 {
                q.push_str(&format!("Offset: {offset}\n"));
            }
            if let Some(l) = limit {
                q.push_str(&format!("Limit: {l}\n"));
            }
            let p = plan::plan(&q).unwrap();
            assert_eq!(p.pass, Pass::Json);
            let sites = [rows_of(4, "a"), rows_of(0, "b"), rows_of(7, "c")];
            let (mut parsed, mut spliced) = (Vec::new(), Vec::new());
            let mut m = Merger::start(&p, usize::MAX, &mut parsed);
            for rows in &sites {
                m.rows(RowSite::default(), rows.clone(), 0, &mut parsed).unwrap();
            }
            m.finish(&[], &mut parsed);
            let mut m = Merger::start(&p, usize::MAX, &mut spliced);
            for rows in &sites {
                let (mut bytes, mut ends) = (Vec::new(), Vec::new());
                for r in rows {
                    bytes.extend_from_slice(b",\n");
                    bytes.extend_from_slice(serde_json::to_string(r).unwrap().as_bytes());
                    ends.push(bytes.len() as u32);
                }
                m.raw(&bytes, &ends, &mut spliced);
            }
            m.finish(&[], &mut spliced);
            assert_eq!(String::from_utf8(spliced).unwrap(), String::from_utf8(parsed).unwrap(), "{q}");
        }
    }
}
