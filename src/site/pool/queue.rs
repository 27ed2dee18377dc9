//! The queries waiting for a channel, in the order they are served.
//!
//! With fair share (`fair_share = true`, the default) clients take turns:
//! each waiting query gets a round, its client's next (one after that
//! client's last query still waiting or just served, and never before the
//! round being served now), and queries are served by round, in arrival
//! order within one. A client with 60 queries waiting holds rounds r to
//! r+59; another client's query that arrives then gets round r and is
//! served after at most one query of the first. Within one client the
//! order stays first come, first served. Without fair share every query
//! has round 0: arrival order.
//!
//! A client is a number the caller chooses (one local process, or one
//! remote address); the queue keeps a next round per client that has
//! queries waiting or was served in the current round, and forgets the
//! rest.

use std::collections::{HashMap, VecDeque};

use super::{Waiting, Want};

/// A waiting query and its round.
pub(crate) struct Queued<W> {
    pub(crate) w: W,
    round: u64,
}

impl<W: Waiting> Waiting for Queued<W> {
    fn wants(&self) -> Want {
        self.w.wants()
    }
    fn gone(&self) -> bool {
        self.w.gone()
    }
    fn client(&self) -> u64 {
        self.w.client()
    }
}

/// Waiting queries, fair or first come first served.
pub(crate) struct Queue<W> {
    items: VecDeque<Queued<W>>,
    fair: bool,
    /// The round of the query served last.
    round: u64,
    /// Each client's next round (clients with a round ahead of `round`).
    next: HashMap<u64, u64>,
}

impl<W: Waiting> Queue<W> {
    pub(crate) fn new(fair: bool) -> Self {
        Queue { items: VecDeque::new(), fair, round: 0, next: HashMap::new() }
    }

    /// Turn fair share on or off (a reload); the queries waiting keep
    /// their places.
    pub(crate) fn set_fair(&mut self, fair: bool) {
        self.fair = fair;
    }

    /// A query starts waiting: behind its client's earlier ones, and
    /// behind every query of the round it gets.
    pub(crate) fn push(&mut self, w: W) {
        if !self.fair {
            let round = self.items.back().map_or(self.round, |q| q.round);
            self.items.push_back(Queued { w, round });
            return;
        }
        let client = w.client();
        let round = self.next.get(&client).map_or(self.round, |r| (*r).max(self.round));
        self.next.insert(client, round + 1);
        let at = self.items.partition_point(|q| q.round <= round);
        self.items.insert(at, Queued { w, round });
        // Clients whose turn has passed need no entry.
        if self.next.len() > 2 * self.items.len() + 16 {
            let now = self.round;
            self.next.retain(|_, r| *r > now);
        }
    }

    /// The query at `i` is served: the round moves on to its.
    pub(crate) fn serve(&mut self, i: usize) -> Option<W> {
        let q = self.items.remove(i)?;
        self.round = self.round.max(q.round);
        Some(q.w)
    }

    /// The query at `i` stopped waiting.
    pub(crate) fn drop_at(&mut self, i: usize) {
        self.items.remove(i);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(crate) fn get(&self, i: usize) -> Option<&Queued<W>> {
        self.items.get(i)
    }

    /// In the order they are served.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Queued<W>> {
        self.items.iter()
    }

    /// Forget the queries that stopped waiting.
    pub(crate) fn retain_waiting(&mut self) {
        self.items.retain(|q| !q.w.gone());
    }

    /// Every waiting query, in order (the site went down, or shutdown).
    pub(crate) fn take(&mut self) -> VecDeque<W> {
        self.next.clear();
        std::mem::take(&mut self.items).into_iter().map(|q| q.w).collect()
    }
}
