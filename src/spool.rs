//! Spooling: holding a site's answer so its channel is free before a slow
//! client has read it.
//!
//! A [`Spool`] is the queue between the two halves of a relay: the reader
//! half pushes what arrives from the site, the writer half takes it out at
//! the client's pace. The queue is a sequence of segments, each either in
//! memory or a range of an unlinked temporary file in `spool_dir`. A chunk
//! goes to memory while this answer holds less than `memory_per_response`
//! there and the daemon-wide memory budget allows, otherwise to the file
//! within the disk budget; so a client that keeps up never touches the disk,
//! and one that falls behind sends the overflow there. All spools together
//! stay within the daemon-wide [`SpoolBudget`].
//!
//! When neither memory nor disk may take more, the reader waits for the
//! writer to make room: that is streaming with back-pressure toward the site.
//! Even then each spool may hold one chunk outside the budget (the streaming
//! window), so every response always makes progress, and a waiting reader is
//! always woken by the writer taking data out (never stopped for good, the
//! failure of lighttpd #2796).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::Notify;

use crate::config::SpoolConfig;
use crate::error::QueryError;

/// Bytes read from a spool file per step.
pub const FILE_READ_CHUNK: usize = 256 * 1024;

/// After a spool file failed (disk full, permissions), files are not tried
/// again for this long; answers stream meanwhile.
pub const FILE_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// The daemon-wide limits on spooled data and what is in use now.
#[derive(Debug)]
pub struct SpoolBudget {
    cfg: SpoolConfig,
    mem_used: AtomicUsize,
    disk_used: AtomicU64,
    /// Answers that spilled to disk, and that had to stream for lack of room.
    spilled: AtomicU64,
    streamed: AtomicU64,
    /// When spool files last failed (none are tried for `FILE_RETRY_AFTER`).
    file_failed_at: Mutex<Option<tokio::time::Instant>>,
    /// The failure was logged (once per outage).
    file_failure_logged: AtomicBool,
}

/// What the state file shows of the spool.
#[derive(Debug, Clone, Serialize)]
pub struct SpoolUsage {
    /// Bytes of answers held in memory now.
    pub memory_used: usize,
    /// `spool_memory_budget`.
    pub memory_budget: usize,
    /// Bytes of answers held in spool files now.
    pub disk_used: u64,
    /// `spool_disk_budget`.
    pub disk_budget: u64,
    /// Answers that spilled to a file so far.
    pub responses_spilled: u64,
    /// Answers that had to stream (budgets used up) so far.
    pub responses_streamed: u64,
}

impl SpoolBudget {
    /// A budget for `cfg`.
    pub fn new(cfg: SpoolConfig) -> Arc<SpoolBudget> {
        Arc::new(SpoolBudget {
            cfg,
            mem_used: AtomicUsize::new(0),
            disk_used: AtomicU64::new(0),
            spilled: AtomicU64::new(0),
            streamed: AtomicU64::new(0),
            file_failed_at: Mutex::new(None),
            file_failure_logged: AtomicBool::new(false),
        })
    }

    /// Current use.
    /// `spool_memory_per_response`: answers up to this size are held
    /// whole before the client gets their first byte (see `relay`).
    pub fn memory_per_response(&self) -> usize {
        self.cfg.memory_per_response
    }

    /// The figures for the state file and the metrics.
    pub fn usage(&self) -> SpoolUsage {
        SpoolUsage {
            memory_used: self.mem_used.load(Ordering::Relaxed),
            memory_budget: self.cfg.memory_budget,
            disk_used: self.disk_used.load(Ordering::Relaxed),
            disk_budget: self.cfg.disk_budget,
            responses_spilled: self.spilled.load(Ordering::Relaxed),
            responses_streamed: self.streamed.load(Ordering::Relaxed),
        }
    }

    fn reserve_mem(&self, n: usize) -> bool {
        self.mem_used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.cfg.memory_budget)
            })
            .is_ok()
    }

    fn release_mem(&self, n: usize) {
        self.mem_used.fetch_sub(n, Ordering::AcqRel);
    }

    fn files_usable(&self) -> bool {
        let mut failed = self.file_failed_at.lock().unwrap_or_else(|e| e.into_inner());
        match *failed {
            Some(t) if t.elapsed() < FILE_RETRY_AFTER => false,
            Some(_) => {
                *failed = None;
                self.file_failure_logged.store(false, Ordering::Relaxed);
                true
            }
            None => true,
        }
    }

    fn reserve_disk(&self, n: u64) -> bool {
        self.cfg.disk_budget > 0
            && self.files_usable()
            && self
                .disk_used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                    u.checked_add(n).filter(|t| *t <= self.cfg.disk_budget)
                })
                .is_ok()
    }

    fn release_disk(&self, n: u64) {
        self.disk_used.fetch_sub(n, Ordering::AcqRel);
    }

    fn file_failed(&self, error: &std::io::Error) {
        *self.file_failed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now());
        if !self.file_failure_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(dir = %self.cfg.dir.display(), %error,
                "cannot use spool files; answers beyond the memory budget are streamed for the next {}",
                crate::error::fmt_duration(FILE_RETRY_AFTER));
        }
    }
}

/// Why a push failed: the writer half is gone (the client left).
#[derive(Debug)]
pub struct WriterGone;

/// What the writer half gets next.
#[derive(Debug)]
pub enum Next {
    /// The next bytes of the answer.
    Data(Bytes),
    /// The answer is complete (`Ok`) or ended with an error.
    End(Result<(), QueryError>),
}

enum Segment {
    /// Bytes in memory; `budgeted` if counted against the memory budget
    /// (the streaming window is not).
    Mem { bytes: Bytes, budgeted: bool },
    /// A range of the spool file.
    File { offset: u64, len: u64 },
}

#[derive(Default)]
struct State {
    /// The answer's bytes not yet taken out, in order.
    queue: VecDeque<Segment>,
    /// Bytes of `Mem` segments in the queue.
    mem_bytes: usize,
    /// The spool file, its length, and how many `File` segments still refer to it.
    file: Option<Arc<File>>,
    file_len: u64,
    file_segments: usize,
    /// Disk budget held for the current file.
    disk_reserved: u64,
    /// A file write is in flight (the file must stay).
    writing: bool,
    end: Option<Result<(), QueryError>>,
    writer_gone: bool,
    /// The reader waits for room: the spool is as full as it may get.
    reader_waiting: bool,
    spilled: bool,
    streamed: bool,
}

/// The queue between the reader and the writer half of one relay.
pub struct Spool {
    budget: Arc<SpoolBudget>,
    state: Mutex<State>,
    /// Signalled when data, the end, or a waiting reader appears.
    data: Notify,
    /// Signalled when room appears or the writer leaves.
    room: Notify,
}

enum Place {
    File(Arc<File>, u64),
    NewFile,
    Wait,
}

impl Spool {
    /// An empty spool under `budget`.
    pub fn new(budget: Arc<SpoolBudget>) -> Spool {
        Spool { budget, state: Mutex::new(State::default()), data: Notify::new(), room: Notify::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Only this module takes the lock, never across an await; poisoning
        // needs a panic in here, and the state stays consistent regardless.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add the next bytes of the answer; waits while there is no room.
    pub async fn push(&self, chunk: Bytes) -> Result<(), WriterGone> {
        self.push_with(chunk, || {}).await
    }

    /// [`Spool::push`], calling `stalls` once if the reader has to wait for
    /// the client (the budgets are used up: the answer streams).
    pub async fn push_with(&self, chunk: Bytes, stalls: impl FnOnce()) -> Result<(), WriterGone> {
        let mut stalls = Some(stalls);
        let n = chunk.len();
        loop {
            let place = {
                let mut st = self.lock();
                if st.writer_gone {
                    return Err(WriterGone);
                }
                let budgeted = st.mem_bytes + n <= self.budget.cfg.memory_per_response && self.budget.reserve_mem(n);
                if budgeted || st.mem_bytes == 0 {
                    st.mem_bytes += n;
                    st.queue.push_back(Segment::Mem { bytes: chunk, budgeted });
                    drop(st);
                    self.data.notify_one();
                    return Ok(());
                }
                if !st.writing && self.budget.reserve_disk(n as u64) {
                    st.writing = true;
                    st.disk_reserved += n as u64;
                    match &st.file {
                        Some(f) => Place::File(f.clone(), st.file_len),
                        None => Place::NewFile,
                    }
                } else {
                    st.reader_waiting = true;
                    if !st.streamed {
                        st.streamed = true;
                        self.budget.streamed.fetch_add(1, Ordering::Relaxed);
                    }
                    Place::Wait
                }
            };
            let (offset, written) = match place {
                Place::Wait => {
                    if let Some(f) = stalls.take() {
                        f();
                    }
                    self.data.notify_one();
                    self.room.notified().await;
                    self.lock().reader_waiting = false;
                    continue;
                }
                Place::File(file, offset) => (offset, self.write_file(file, offset, chunk.clone()).await),
                Place::NewFile => {
                    let dir = self.budget.cfg.dir.clone();
                    let created = match tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir)).await {
                        Ok(r) => r,
                        Err(e) => Err(std::io::Error::other(e)),
                    };
                    match created {
                        Ok(f) => {
                            let f = Arc::new(f);
                            self.lock().file = Some(f.clone());
                            (0, self.write_file(f, 0, chunk.clone()).await)
                        }
                        Err(e) => (0, Err(e)),
                    }
                }
            };
            let mut st = self.lock();
            st.writing = false;
            match written {
                Ok(()) => {
                    st.queue.push_back(Segment::File { offset, len: n as u64 });
                    st.file_len = offset + n as u64;
                    st.file_segments += 1;
                    if !st.spilled {
                        st.spilled = true;
                        self.budget.spilled.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(st);
                    self.data.notify_one();
                    return Ok(());
                }
                Err(e) => {
                    // What is in the file stays readable; this chunk goes to
                    // memory or waits for room.
                    st.disk_reserved -= n as u64;
                    self.budget.release_disk(n as u64);
                    self.budget.file_failed(&e);
                }
            }
        }
    }

    async fn write_file(&self, file: Arc<File>, offset: u64, chunk: Bytes) -> std::io::Result<()> {
        tokio::task::spawn_blocking(move || file.write_all_at(&chunk, offset))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    /// The answer is complete, or failed; the writer learns it after the data.
    pub fn finish(&self, end: Result<(), QueryError>) {
        self.lock().end = Some(end);
        self.data.notify_one();
    }

    /// The writer half is gone: drop what is held and let the reader know.
    pub fn close(&self) {
        let mut st = self.lock();
        st.writer_gone = true;
        self.release(&mut st);
        drop(st);
        self.room.notify_one();
    }

    fn release(&self, st: &mut State) {
        for seg in st.queue.drain(..) {
            if let Segment::Mem { bytes, budgeted: true } = seg {
                self.budget.release_mem(bytes.len());
            }
        }
        st.mem_bytes = 0;
        st.file_segments = 0;
        self.drop_file_if_unused(st);
    }

    /// Close the spool file (giving its space back) once nothing refers to it.
    /// Also gives back disk budget reserved for a file that was never
    /// created (the push was cancelled while creating it).
    fn drop_file_if_unused(&self, st: &mut State) {
        if st.file_segments == 0 && !st.writing {
            st.file = None;
            st.file_len = 0;
            self.budget.release_disk(st.disk_reserved);
            st.disk_reserved = 0;
        }
    }

    /// Wait until sending can start without risking an answer that looks
    /// complete but is not: the whole answer is here, or the spool is full
    /// (then the client has to take part of it before the rest can come).
    pub async fn wait_complete_or_full(&self) {
        loop {
            {
                let st = self.lock();
                if st.end.is_some() || st.reader_waiting {
                    return;
                }
            }
            self.data.notified().await;
        }
    }

    /// If the answer has ended with an error, take that error; the data
    /// before it is not worth sending to a client that cannot tell a short
    /// answer from a complete one.
    pub fn take_failure(&self) -> Option<QueryError> {
        let mut st = self.lock();
        match st.end.take() {
            Some(Err(e)) => Some(e),
            other => {
                st.end = other;
                None
            }
        }
    }

    /// The next bytes for the client, or the end.
    pub async fn next(&self) -> Next {
        loop {
            let read = {
                let mut st = self.lock();
                match st.queue.pop_front() {
                    Some(Segment::Mem { bytes, budgeted }) => {
                        st.mem_bytes -= bytes.len();
                        if budgeted {
                            self.budget.release_mem(bytes.len());
                        }
                        drop(st);
                        self.room.notify_one();
                        return Next::Data(bytes);
                    }
                    Some(Segment::File { offset, len }) => {
                        let take = len.min(FILE_READ_CHUNK as u64);
                        if take < len {
                            st.queue.push_front(Segment::File { offset: offset + take, len: len - take });
                        }
                        let Some(f) = st.file.clone() else {
                            return Next::End(Err(QueryError::Spool("the spool file is gone".into())));
                        };
                        Some((f, offset, take as usize, take == len))
                    }
                    None => match st.end.take() {
                        Some(end) => return Next::End(end),
                        None => None,
                    },
                }
            };
            let Some((file, offset, len, last)) = read else {
                self.data.notified().await;
                continue;
            };
            let got = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset)?;
                Ok::<_, std::io::Error>((buf, punch_hole(&file, offset, len)))
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let punched = matches!(got, Ok((_, true)));
            if last || punched {
                let mut st = self.lock();
                if punched {
                    // What the client has taken no longer occupies the disk.
                    let n = (len as u64).min(st.disk_reserved);
                    st.disk_reserved -= n;
                    self.budget.release_disk(n);
                }
                if last {
                    st.file_segments -= 1;
                    self.drop_file_if_unused(&mut st);
                }
                drop(st);
                self.room.notify_one();
            }
            let got = got.map(|(buf, _)| buf);
            return match got {
                Ok(buf) => Next::Data(Bytes::from(buf)),
                Err(e) => Next::End(Err(QueryError::Spool(format!("cannot read the spool file: {e}")))),
            };
        }
    }
}

/// Free the disk blocks of a range already sent (the file keeps its size, so
/// later offsets stay valid). False where the file system cannot: then the
/// range stays counted until the file is closed.
fn punch_hole(file: &File, offset: u64, len: usize) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::fcntl::{FallocateFlags, fallocate};
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return false };
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        fallocate(file, mode, offset, len).is_ok()
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = (file, offset, len);
        false
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let mut st = std::mem::take(&mut *self.lock());
        st.writing = false;
        self.release(&mut st);
    }
}

#[cfg(test)]
mod tests;
