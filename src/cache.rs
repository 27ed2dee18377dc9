//! The query cache (`Cache: reload`) and single-flight.
//!
//! The GUI marks queries whose answers only change when the remote core
//! reloads (site status, group lists, commands, labels) with `Cache: reload`.
//! Such a query is answered from memory when an entry exists; otherwise it is
//! sent to the site (without that header) and a 200 answer is stored.
//!
//! - **Key**: the site and the query exactly as livemux sends it to the
//!   site. That includes `AuthUser`, `OutputFormat` and every other header
//!   that changes the answer, in order, and none of the client-to-proxy
//!   headers (`KeepAlive`, `ResponseHeader`, `Cache`), which do not.
//! - **Freshness**: every entry carries the site's generation (bumped each
//!   time the site goes down, so a reconnect counts) and `program_start` (read
//!   by every heartbeat) as they were *before* the query was sent. A lookup
//!   compares them with the site's current status; on any difference all of
//!   the site's entries are dropped before anything is served. An answer
//!   computed just before a reload is therefore never served after it.
//!   `cache_max_age` optionally bounds an entry's age.
//! - **Bounds**: one byte budget for the daemon (`cache_budget`), least
//!   recently used entries evicted first; answers larger than
//!   `cache_max_entry` are not stored.
//! - **Single-flight**: while a cacheable query is in flight, identical ones
//!   wait for its answer instead of each taking a channel. With `coalesce`,
//!   identical uncached `GET`s in flight at the same moment share an answer
//!   the same way (never `COMMAND`s, which are not looked up here at all).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use lru::LruCache;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use livemux_protocol::{FIXED16_LEN, Status};

/// Bytes counted per entry beyond key and body (bookkeeping).
const ENTRY_OVERHEAD: usize = 128;

/// A cached query: the site and the query as sent to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    site: Arc<str>,
    wire: Bytes,
}

impl Key {
    /// The key of `wire` (the encoded query) at `site`.
    pub fn new(site: &str, wire: &[u8]) -> Key {
        Key { site: Arc::from(site), wire: Bytes::copy_from_slice(wire) }
    }
}

/// What an entry is valid for: the site's state when its query was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// The site's generation (bumped when it goes down).
    pub generation: u64,
    /// The core's start time.
    pub program_start: Option<i64>,
}

/// A complete answer: stored if it is a 200, shared with identical
/// queries in flight in any case.
#[derive(Debug)]
pub struct Entry {
    /// The site's fixed16 header.
    pub raw_header: [u8; FIXED16_LEN],
    /// Its status.
    pub status: Status,
    /// The body.
    pub body: Bytes,
    tag: Tag,
    stored: Instant,
}

impl Entry {
    /// An answer to store, tagged with the site's state before the query.
    pub fn new(raw_header: [u8; FIXED16_LEN], status: Status, body: Bytes, tag: Tag) -> Entry {
        Entry { raw_header, status, body, tag, stored: Instant::now() }
    }

    fn cost(&self, key: &Key) -> usize {
        key.wire.len() + self.body.len() + FIXED16_LEN + ENTRY_OVERHEAD
    }
}

/// Counters of one site's cache, for the state file.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries held.
    pub entries: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Cacheable queries answered from the cache.
    pub hits: u64,
    /// Cacheable queries sent to the site.
    pub misses: u64,
    /// Entries evicted for the byte budget.
    pub evictions: u64,
    /// Queries that waited for an identical one in flight.
    pub coalesced: u64,
    /// Times all entries were dropped (core reloaded, site reconnected).
    pub invalidations: u64,
}

/// How a query in flight ended, for those waiting on it.
#[derive(Debug, Clone)]
enum Flight {
    Pending,
    /// `Some`: the answer; `None`: no shareable answer (error, too large).
    Done(Option<Arc<Entry>>),
}

/// What to do with a query.
pub enum Lookup {
    /// Answer from the cache.
    Hit(Arc<Entry>),
    /// An identical query is in flight: wait for its answer.
    Wait(Waiting),
    /// Send the query; report the answer through the [`Leader`].
    Lead(Leader),
}

/// Waiting for an identical query in flight.
pub struct Waiting(watch::Receiver<Flight>);

impl Waiting {
    /// Its answer; `None` if it produced nothing to share (then send the
    /// query yourself).
    pub async fn answer(mut self) -> Option<Arc<Entry>> {
        match self.0.wait_for(|f| matches!(f, Flight::Done(_))).await {
            Ok(f) => match &*f {
                Flight::Done(e) => e.clone(),
                Flight::Pending => None,
            },
            Err(_) => None,
        }
    }
}

/// The daemon's cache.
pub struct Cache {
    budget: usize,
    max_entry: usize,
    /// Bytes of answers being collected by leaders, also bounded by
    /// `budget`: many large answers in flight at once cannot add up.
    collecting: AtomicUsize,
    /// Short critical sections only (no await while held).
    inner: Mutex<Inner>,
}

struct Inner {
    lru: LruCache<Key, Arc<Entry>>,
    bytes: usize,
    stats: HashMap<Arc<str>, CacheStats>,
    inflight: HashMap<Key, InFlight>,
    /// Numbers flights, so a leader touches only its own.
    next_flight: u64,
}

/// A query in flight that identical ones may wait for.
struct InFlight {
    /// The site's state it was sent under: a query under another state
    /// (after a reload) does not take its answer.
    tag: Tag,
    id: u64,
    tx: watch::Sender<Flight>,
}

impl Cache {
    /// A cache of at most `budget` bytes; answers over `max_entry` are not stored.
    pub fn new(budget: usize, max_entry: usize) -> Arc<Cache> {
        let inner = Inner {
            lru: LruCache::unbounded(),
            bytes: 0,
            stats: HashMap::new(),
            inflight: HashMap::new(),
            next_flight: 0,
        };
        Arc::new(Cache { budget, max_entry, collecting: AtomicUsize::new(0), inner: Mutex::new(inner) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Look `key` up. `tag` is the site's current state; `store` is false
    /// for an uncached query that only takes part in single-flight.
    pub fn lookup(self: &Arc<Self>, key: Key, tag: Tag, max_age: Option<Duration>, store: bool) -> Lookup {
        let mut inner = self.lock();
        if store && let Some(e) = inner.lru.get(&key).cloned() {
            if e.tag != tag {
                inner.invalidate(&key.site, tag);
            } else if max_age.is_some_and(|a| e.stored.elapsed() > a) {
                inner.remove(&key);
            } else {
                inner.stats.entry(key.site.clone()).or_default().hits += 1;
                return Lookup::Hit(e);
            }
        }
        if let Some(f) = inner.inflight.get(&key)
            && f.tag == tag
        {
            let rx = f.tx.subscribe();
            inner.stats.entry(key.site.clone()).or_default().coalesced += 1;
            return Lookup::Wait(Waiting(rx));
        }
        if store {
            inner.stats.entry(key.site.clone()).or_default().misses += 1;
        }
        // A flight sent before the site reloaded is replaced: its waiters
        // (woken by the dropped sender) ask again and join this one.
        let (tx, _) = watch::channel(Flight::Pending);
        let id = inner.next_flight;
        inner.next_flight += 1;
        inner.inflight.insert(key.clone(), InFlight { tag, id, tx });
        Lookup::Lead(Leader { cache: self.clone(), key: Some(key), flight: id, store, reserved: 0 })
    }

    /// Counters of `site`.
    pub fn stats(&self, site: &str) -> CacheStats {
        self.lock().stats.get(site).copied().unwrap_or_default()
    }
}

impl Inner {
    /// Remove flight `id` of `key`, if it is still the one in flight.
    fn take_flight(&mut self, key: &Key, id: u64) -> Option<InFlight> {
        if self.inflight.get(key)?.id != id {
            return None;
        }
        self.inflight.remove(key)
    }

    /// Drop every entry of `site` (its tag is no longer `tag`).
    fn invalidate(&mut self, site: &Arc<str>, tag: Tag) {
        let stale: Vec<Key> =
            self.lru.iter().filter(|(k, e)| k.site == *site && e.tag != tag).map(|(k, _)| k.clone()).collect();
        for k in &stale {
            self.remove(k);
        }
        self.stats.entry(site.clone()).or_default().invalidations += 1;
        tracing::info!(
            site = &**site,
            dropped = stale.len(),
            "cached answers dropped: the site's core reloaded or it reconnected"
        );
    }

    fn remove(&mut self, key: &Key) {
        if let Some(e) = self.lru.pop(key) {
            let cost = e.cost(key);
            self.bytes -= cost;
            let s = self.stats.entry(key.site.clone()).or_default();
            s.entries -= 1;
            s.bytes -= cost as u64;
        }
    }

    fn insert(&mut self, key: Key, entry: Arc<Entry>, budget: usize) {
        self.remove(&key);
        let cost = entry.cost(&key);
        while self.bytes + cost > budget {
            let Some((k, e)) = self.lru.pop_lru() else { break };
            let c = e.cost(&k);
            self.bytes -= c;
            let s = self.stats.entry(k.site.clone()).or_default();
            s.entries -= 1;
            s.bytes -= c as u64;
            s.evictions += 1;
        }
        if self.bytes + cost <= budget {
            self.bytes += cost;
            let s = self.stats.entry(key.site.clone()).or_default();
            s.entries += 1;
            s.bytes += cost as u64;
            self.lru.put(key, entry);
        }
    }
}

/// A copy of an answer's body, collected while it is relayed, for the
/// cache and for identical queries waiting on this one.
///
/// The [`Leader`] is told as soon as the site's side of the answer is
/// complete, not when a (possibly slow) client has taken it all: waiting
/// queries never wait for another client. An answer larger than the
/// cache's per-entry limit is not collected; dropping the capture then
/// releases the waiters to ask the site themselves.
pub struct Capture {
    /// `None` once given up: the answers in flight would exceed the cache
    /// budget (the waiters were released at that moment).
    leader: Option<Leader>,
    tag: Tag,
    parts: Vec<Bytes>,
}

impl Capture {
    /// Collect the answer for `leader`; `tag` is the site's state before
    /// the query was sent.
    pub fn new(leader: Leader, tag: Tag) -> Capture {
        Capture { leader: Some(leader), tag, parts: Vec::new() }
    }

    /// An answer of `length` bytes can be collected.
    pub(crate) fn accepts(&self, length: u64) -> bool {
        self.leader.as_ref().is_some_and(|l| length <= l.max_entry() as u64)
    }

    /// Another part of the body.
    pub(crate) fn push(&mut self, chunk: &Bytes) {
        let Some(leader) = self.leader.as_mut() else { return };
        if leader.reserve(chunk.len()) {
            self.parts.push(chunk.clone());
        } else if let Some(l) = self.leader.take() {
            self.parts = Vec::new();
            l.finish(None);
        }
    }

    /// The site's side of the answer is complete: share (and store) it.
    pub(crate) fn finish(self, raw_header: [u8; FIXED16_LEN], status: Status) {
        let Some(leader) = self.leader else { return };
        let mut body = BytesMut::with_capacity(self.parts.iter().map(Bytes::len).sum());
        for p in &self.parts {
            body.extend_from_slice(p);
        }
        leader.finish(Some(Entry::new(raw_header, status, body.freeze(), self.tag)));
    }
}

/// What the cache makes of a query.
pub enum Plan {
    /// Answer from this entry.
    Hit(Arc<Entry>),
    /// Send it to the site, collecting the answer for identical queries
    /// (and the cache) through this capture.
    Lead(Capture),
    /// Send it to the site; nothing to share.
    Alone,
    /// The query's deadline passed while it waited for an identical one.
    TimedOut,
}

impl Cache {
    /// Decide what to do with a query: answer it from the cache, wait (up
    /// to `deadline`) for an identical one in flight, or send it to the
    /// site. A leader that shares nothing (an error, an answer too large)
    /// sends its waiters on their own way; after two such leaders a query
    /// stops waiting and goes to the site by itself. `tag` is the site's
    /// state before the query; `store` is false for an uncached query that
    /// only takes part in single-flight.
    pub async fn plan(
        self: &Arc<Self>,
        key: Key,
        tag: Tag,
        max_age: Option<Duration>,
        store: bool,
        deadline: tokio::time::Instant,
    ) -> Plan {
        for _ in 0..2 {
            match self.lookup(key.clone(), tag, max_age, store) {
                Lookup::Hit(entry) => return Plan::Hit(entry),
                Lookup::Lead(leader) => return Plan::Lead(Capture::new(leader, tag)),
                Lookup::Wait(waiting) => match tokio::time::timeout_at(deadline, waiting.answer()).await {
                    Ok(Some(entry)) => return Plan::Hit(entry),
                    Ok(None) => continue,
                    Err(_) => return Plan::TimedOut,
                },
            }
        }
        Plan::Alone
    }
}

/// The query that others with the same key wait for.
pub struct Leader {
    cache: Arc<Cache>,
    key: Option<Key>,
    /// Its flight's number.
    flight: u64,
    store: bool,
    /// Bytes of `collecting` held by this leader.
    reserved: usize,
}

impl Leader {
    /// Account for `n` more bytes of the answer being collected; false if
    /// that would take answers in flight past the cache budget (then the
    /// answer is not collected).
    pub fn reserve(&mut self, n: usize) -> bool {
        let budget = self.cache.budget;
        let ok = self
            .cache
            .collecting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_add(n).filter(|t| *t <= budget))
            .is_ok();
        if ok {
            self.reserved += n;
        }
        ok
    }

    /// The largest answer that is stored or shared.
    pub fn max_entry(&self) -> usize {
        self.cache.max_entry
    }

    /// The query ended: `Some` complete answer to share (and store, if it
    /// is a 200 and the query cacheable), `None` if there is nothing to share.
    pub fn finish(mut self, entry: Option<Entry>) {
        self.unreserve();
        let Some(key) = self.key.take() else { return };
        let entry = entry.filter(|e| e.body.len() <= self.cache.max_entry).map(Arc::new);
        let mut inner = self.cache.lock();
        // Replaced by a query sent after a reload: this answer is older
        // than that one's, so it is neither stored nor shared.
        let Some(f) = inner.take_flight(&key, self.flight) else { return };
        if let (true, Some(e)) = (self.store, &entry)
            && e.status == Status::Ok
        {
            inner.insert(key.clone(), e.clone(), self.cache.budget);
        }
        f.tx.send_replace(Flight::Done(entry));
    }
}

impl Leader {
    fn unreserve(&mut self) {
        self.cache.collecting.fetch_sub(std::mem::take(&mut self.reserved), Ordering::Relaxed);
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.unreserve();
        if let Some(key) = self.key.take() {
            let mut inner = self.cache.lock();
            if let Some(f) = inner.take_flight(&key, self.flight) {
                f.tx.send_replace(Flight::Done(None));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Tag = Tag { generation: 0, program_start: Some(1) };

    fn answer(body: &[u8]) -> Entry {
        Entry::new(*b"200          10\n", Status::Ok, Bytes::copy_from_slice(body), T)
    }

    fn lead(l: Lookup) -> Leader {
        match l {
            Lookup::Lead(l) => l,
            _ => panic!("expected to lead"),
        }
    }

    #[test]
    fn miss_then_hit_and_a_new_program_start_drops_everything() {
        let c = Cache::new(1 << 20, 1 << 16);
        let k = Key::new("s", b"GET status\n\n");
        lead(c.lookup(k.clone(), T, None, true)).finish(Some(answer(b"hello")));
        assert!(matches!(c.lookup(k.clone(), T, None, true), Lookup::Hit(e) if &e.body[..] == b"hello"));
        let s = c.stats("s");
        assert_eq!((s.hits, s.misses, s.entries), (1, 1, 1));
        let reloaded = Tag { program_start: Some(2), ..T };
        let _in_flight = lead(c.lookup(k.clone(), reloaded, None, true));
        let s = c.stats("s");
        assert_eq!((s.entries, s.bytes, s.invalidations), (0, 0, 1));
        assert!(matches!(c.lookup(k.clone(), reloaded, None, true), Lookup::Wait(_)), "same state: wait");
    }

    #[tokio::test]
    async fn a_query_after_a_reload_never_takes_an_answer_from_before_it() {
        let c = Cache::new(1 << 20, 1 << 16);
        let k = Key::new("s", b"q");
        let before = lead(c.lookup(k.clone(), T, None, true));
        let Lookup::Wait(early) = c.lookup(k.clone(), T, None, true) else { panic!("should wait") };
        let reloaded = Tag { program_start: Some(2), ..T };
        let after = lead(c.lookup(k.clone(), reloaded, None, true));
        assert!(early.answer().await.is_none(), "the replaced flight's waiters ask again");
        let Lookup::Wait(late) = c.lookup(k.clone(), reloaded, None, true) else { panic!("should wait") };
        before.finish(Some(answer(b"old")));
        assert_eq!(c.stats("s").entries, 0, "the old answer is not stored");
        after.finish(Some(Entry::new(*b"200           4\n", Status::Ok, Bytes::from_static(b"new\n"), reloaded)));
        assert_eq!(&late.answer().await.unwrap().body[..], b"new\n");
        assert!(matches!(c.lookup(k, reloaded, None, true), Lookup::Hit(e) if &e.body[..] == b"new\n"));
    }

    #[test]
    fn keys_separate_sites_and_queries() {
        let c = Cache::new(1 << 20, 1 << 16);
        lead(c.lookup(Key::new("a", b"q"), T, None, true)).finish(Some(answer(b"a")));
        assert!(matches!(c.lookup(Key::new("b", b"q"), T, None, true), Lookup::Lead(_)));
        assert!(matches!(c.lookup(Key::new("a", b"q2"), T, None, true), Lookup::Lead(_)));
    }

    #[test]
    fn the_byte_budget_evicts_the_least_recently_used() {
        let body = vec![b'x'; 1000];
        let c = Cache::new(3 * (1000 + 1 + FIXED16_LEN + ENTRY_OVERHEAD), 1 << 16);
        for q in [b"1", b"2", b"3"] {
            lead(c.lookup(Key::new("s", q), T, None, true)).finish(Some(answer(&body)));
        }
        assert!(matches!(c.lookup(Key::new("s", b"1"), T, None, true), Lookup::Hit(_)), "1 is now recent");
        lead(c.lookup(Key::new("s", b"4"), T, None, true)).finish(Some(answer(&body)));
        let s = c.stats("s");
        assert_eq!((s.entries, s.evictions), (3, 1));
        assert!(matches!(c.lookup(Key::new("s", b"2"), T, None, true), Lookup::Lead(_)), "2 was evicted");
        assert!(s.bytes <= (3 * (1000 + 1 + FIXED16_LEN + ENTRY_OVERHEAD)) as u64);
    }

    #[test]
    fn large_answers_and_errors_are_not_stored() {
        let c = Cache::new(1 << 20, 10);
        lead(c.lookup(Key::new("s", b"big"), T, None, true)).finish(Some(answer(&[0u8; 11])));
        lead(c.lookup(Key::new("s", b"err"), T, None, true)).finish(None);
        let err = Entry::new(*b"404          10\n", Status::NotFound, Bytes::from_static(b"no table\n"), T);
        lead(c.lookup(Key::new("s", b"404"), T, None, true)).finish(Some(err));
        assert_eq!(c.stats("s").entries, 0);
    }

    #[tokio::test]
    async fn waiters_get_the_leaders_answer_or_go_themselves() {
        let c = Cache::new(1 << 20, 1 << 16);
        let k = Key::new("s", b"q");
        let l = lead(c.lookup(k.clone(), T, None, false));
        let Lookup::Wait(w) = c.lookup(k.clone(), T, None, false) else { panic!("should wait") };
        l.finish(Some(answer(b"shared")));
        assert_eq!(&w.answer().await.unwrap().body[..], b"shared");
        assert_eq!(c.stats("s").entries, 0, "uncached: shared, not stored");
        let l = lead(c.lookup(k.clone(), T, None, false));
        let Lookup::Wait(w) = c.lookup(k, T, None, false) else { panic!("should wait") };
        drop(l);
        assert!(w.answer().await.is_none(), "an abandoned leader releases its waiters");
    }

    #[test]
    fn answers_being_collected_are_bounded_by_the_budget() {
        let c = Cache::new(100, 1 << 16);
        let mut a = lead(c.lookup(Key::new("s", b"a"), T, None, true));
        let mut b = lead(c.lookup(Key::new("s", b"b"), T, None, true));
        assert!(a.reserve(60));
        assert!(!b.reserve(60), "60 + 60 > 100");
        drop(a);
        assert!(b.reserve(60), "a's bytes were given back");
    }

    #[test]
    fn max_age_expires_entries() {
        let c = Cache::new(1 << 20, 1 << 16);
        let k = Key::new("s", b"q");
        lead(c.lookup(k.clone(), T, None, true)).finish(Some(answer(b"a")));
        assert!(matches!(c.lookup(k.clone(), T, Some(Duration::from_secs(60)), true), Lookup::Hit(_)));
        assert!(matches!(c.lookup(k, T, Some(Duration::ZERO), true), Lookup::Lead(_)));
    }
}
