//! One batch of hosts' inventory trees: the `python3` answer parsed as it
//! streams (on the blocking pool) and each host's tree written to its
//! temporary file, then put in place ([`BatchJob`], [`BatchSink`]).

use super::*;

/// What a batch did.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub(super) written: u64,
    pub(super) bytes: u64,
    pub(super) skipped: Vec<(String, String)>,
    /// Hosts another site wrote first: (host, that site).
    pub(super) conflicts: Vec<(String, String)>,
}

/// The blocking side of a batch: parse the answer, write the files.
pub(super) struct BatchJob {
    pub(super) store: Arc<Mutex<SiteStore>>,
    pub(super) wanted: HashSet<String>,
    pub(super) probe: i64,
    pub(super) confirming: bool,
    pub(super) limit: u64,
    pub(super) dir: PathBuf,
    pub(super) site: String,
}

impl BatchJob {
    pub(super) fn run(self, mut rx: mpsc::Receiver<Bytes>) -> Result<Batch, SyncError> {
        let store = self.store.clone();
        let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
        let mut sink = BatchSink { job: &self, store: &mut store, row: Row::default(), batch: Batch::default() };
        let mut parser = RowParser::new(fetch::MAX_STRING);
        let mut outcome = Ok(());
        while let Some(chunk) = rx.blocking_recv() {
            if let Err(e) = parser.feed(&chunk, &mut sink) {
                outcome = Err(match e {
                    FeedError::Syntax(source) => SyncError::Parse { site: self.site.clone(), source },
                    FeedError::Sink(e) => SyncError::Store(e),
                });
                break;
            }
        }
        drop(rx);
        if outcome.is_ok() {
            outcome = parser.finish().map_err(|source| SyncError::Parse { site: self.site.clone(), source });
        }
        let batch = std::mem::take(&mut sink.batch);
        // What was written is recorded whatever happened after it.
        store.save()?;
        outcome.map(|()| batch)
    }
}

/// The row being read.
#[derive(Default)]
struct Row {
    field: usize,
    name: Option<String>,
    mtime: i64,
    files: Option<store::HostFiles>,
    gz: bool,
    bad: Option<&'static str>,
}

struct BatchSink<'a> {
    job: &'a BatchJob,
    store: &'a mut SiteStore,
    row: Row,
    batch: Batch,
}

impl Sink for BatchSink<'_> {
    type Error = StoreError;

    fn event(&mut self, e: Event<'_>) -> Result<(), StoreError> {
        let r = &mut self.row;
        match (r.field, e) {
            (_, Event::RowStart) => self.row = Row::default(),
            (0, Event::Str(name)) => {
                if !self.job.wanted.contains(name) {
                    r.bad = Some("the site sent a host that was not asked for");
                }
                r.name = Some(name.to_owned());
                r.field += 1;
            }
            (1, Event::Int(t)) => {
                r.mtime = t;
                r.field += 1;
            }
            (2 | 3, Event::BlobStart) => {
                r.gz = r.field == 3;
                if r.files.is_none() && r.bad.is_none() {
                    r.files = Some(self.store.begin()?);
                }
            }
            (2 | 3, Event::BlobChunk(bytes)) => {
                if let (Some(f), None) = (r.files.as_mut(), r.bad) {
                    f.write(r.gz, bytes, self.job.limit, &self.job.dir)?;
                }
            }
            (2 | 3, Event::BlobEnd) => r.field += 1,
            (4, Event::RowEnd) => return self.end_row(),
            (_, Event::RowEnd) => {
                r.bad = r.bad.or(Some("a row that does not parse"));
                return self.end_row();
            }
            (_, Event::BlobChunk(_)) => {}
            _ => {
                r.bad = r.bad.or(Some("a row that does not parse"));
                r.field += 1;
            }
        }
        Ok(())
    }
}

impl BatchSink<'_> {
    fn end_row(&mut self) -> Result<(), StoreError> {
        let row = std::mem::take(&mut self.row);
        let name = row.name.unwrap_or_else(|| "?".to_owned());
        let skip = |b: &mut Batch, why: &str| b.skipped.push((name.clone(), why.to_owned()));
        if let Some(why) = row.bad {
            skip(&mut self.batch, why);
            return Ok(());
        }
        if row.mtime <= 0 {
            // Gone since the listing: the next listing removes it.
            return Ok(());
        }
        let Some(files) = row.files else {
            skip(&mut self.batch, "a row that does not parse");
            return Ok(());
        };
        let unconfirmed = plan::unconfirmed(row.mtime, self.job.probe, self.job.confirming);
        match self.store.commit(&name, row.mtime, files, unconfirmed)? {
            store::Committed::Written(n) => {
                self.batch.written += 1;
                self.batch.bytes += n;
            }
            store::Committed::Skipped(why) => skip(&mut self.batch, &why),
            store::Committed::Conflict(other) => self.batch.conflicts.push((name, other)),
        }
        Ok(())
    }
}
