//! The desk: a site's pool, shared by its actor and the queries, so that
//! the common query needs no message to the actor.
//!
//! The [`Pool`] holds the site's channels and waiting queries. The actor
//! owns every decision that involves I/O or time (connects, heartbeats,
//! admissions, closing, going down); the one thing a query may do itself,
//! under the desk's lock, is the everyday exchange:
//!
//! - **take** the most recently used idle channel, when the desk is open,
//!   nobody is waiting for a channel, and the channel shows no sign of
//!   having died; or, for a `GET` while every channel is busy and the pool
//!   is at its limit, a place behind others on the busy channel the pool's
//!   rules pick (what the actor would give a waiting query)
//!   ([`Desk::take_idle`]);
//! - **give back** a channel that a query left clean, when the desk is
//!   open, nobody is waiting and the channel belongs to the current
//!   generation: idle again if no query is pipelined behind, else still
//!   theirs ([`Desk::give_back`]).
//!
//! Everything else (a query that finds no channel it may take while the
//! pool could still grow, a retry that needs a fresh one, a channel that
//! comes back after an error answer, closed or of an older generation, any
//! return while queries wait) goes to the actor as before, through its
//! request queue or its inbox.
//!
//! The actor keeps the desk *open* only while it has nothing to claim: the
//! site is ready, no heartbeat waits for a channel, and the daemon is not
//! stopping. A heartbeat that falls due while every channel is busy closes
//! the desk, so the next channel given back reaches the actor and the
//! heartbeat. Two things the actor used to learn from every return it
//! learns otherwise: a channel given back here is watched for its death
//! with the actor's waker (a readable idle channel wakes the actor, as
//! before), and a give-back that brings the pool's next timer (an idle
//! extra channel to close) before the actor's own timer wakes the actor.
//!
//! The lock is held for a few bookkeeping steps only, never across an
//! await or while sending a reply or a report (a lease given back from a
//! failed reply takes the lock itself).

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::SystemTime;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Asker;
use super::actor::{Event, Waiter};
use super::channel::{Channel, Lease, looks_alive};
use super::inbox::Outbox;
use super::pool::{Pool, UNCOUNTED, Want};

/// A site's pool, shared by its actor and the queries.
pub(crate) struct Desk {
    state: Mutex<DeskState>,
    /// The actor's inbox: what the desk does not settle goes there.
    outbox: Outbox,
}

/// What the desk's lock guards.
pub(crate) struct DeskState {
    /// The channels and the queries waiting for one.
    pub(crate) pool: Pool<Channel, Waiter>,
    /// Queries may take and give back channels here (see the module).
    pub(crate) open: bool,
    /// The site's generation: channels of older ones go back to the actor.
    pub(crate) generation: u64,
    /// Cancelled when the site goes down: every lease holds the token of
    /// the generation it was lent in.
    pub(crate) down: CancellationToken,
    /// Wakes the actor's task (its select loop stores it on every turn).
    actor: Option<Waker>,
    /// When the actor's timer fires next (as it last computed it).
    pub(crate) timer: Option<Instant>,
}

impl DeskState {
    /// Remember the actor's waker (its task's, from its select loop).
    pub(crate) fn set_actor(&mut self, waker: &Waker) {
        if !self.actor.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.actor = Some(waker.clone());
        }
    }

    fn wake_actor(&self) {
        if let Some(w) = &self.actor {
            w.wake_by_ref();
        }
    }
}

impl Desk {
    pub(crate) fn new(pool: Pool<Channel, Waiter>, outbox: Outbox) -> Arc<Desk> {
        Arc::new(Desk {
            state: Mutex::new(DeskState {
                pool,
                open: false,
                generation: 0,
                down: CancellationToken::new(),
                actor: None,
                timer: None,
            }),
            outbox,
        })
    }

    /// The desk's state (short critical sections only; see the module).
    pub(crate) fn lock(&self) -> MutexGuard<'_, DeskState> {
        // Every step under the lock leaves the pool consistent, so a panic
        // elsewhere (there is none) could not leave it half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Report to the actor; false if it is gone.
    pub(crate) fn report(&self, ev: Event) -> bool {
        self.outbox.send(ev).is_ok()
    }

    /// Lend the most recently used idle channel for `want` without asking
    /// the actor, if the desk is open, nobody waits, and the channel looks
    /// alive; `None` sends the query to the actor.
    pub(crate) fn take_idle(self: &Arc<Desk>, want: Want, asker: &Asker<'_>) -> Option<Lease> {
        if want == Want::Fresh {
            return None;
        }
        let mut st = self.lock();
        if !st.open || st.pool.has_waiters() {
            return None;
        }
        let (id, client) = match st.pool.lend_idle(want, SystemTime::now(), looks_alive) {
            Some(id) => (id, UNCOUNTED),
            // Every channel busy and the pool at its limit: a place behind
            // others, as the actor would give a waiting GET (the client
            // named now: the fair share counts it).
            None if want == Want::Get && st.pool.idle_count() == 0 => {
                let client = asker.key();
                (st.pool.lend_pipelined(|c: &Channel| c.link.poisoned().is_none(), client)?, client)
            }
            None => return None,
        };
        let down = st.down.clone();
        let ch = st.pool.channel_mut(id)?;
        Some(Lease::new(ch, self.clone(), down, client))
    }

    /// Take back a channel a query left clean, if the desk is open, nobody
    /// waits and it belongs to the current generation (idle again, or still
    /// the pipelined queries' behind it); false sends it to the actor.
    pub(crate) fn give_back(&self, id: u64, client: u64) -> bool {
        let mut st = self.lock();
        if !st.open || st.pool.has_waiters() {
            return false;
        }
        let generation = st.generation;
        let Some(idle) = st.pool.give_back_clean(id, Instant::now(), |c| c.generation == generation, client) else {
            return false;
        };
        // An idle channel is watched for its death with the actor's waker,
        // as the actor's own loop would: a readable idle channel wakes the
        // actor. (One still carrying pipelined queries is theirs.)
        let st = &mut *st;
        let died = match (&st.actor, st.pool.last_idle_mut()) {
            (Some(w), Some(ch)) if idle => ch.link.poll_idle_event(&mut Context::from_waker(w)).is_ready(),
            _ => false,
        };
        // An idle channel above the floor now has an expiry the actor's
        // timer may not cover.
        let sooner = st.pool.next_deadline().is_some_and(|t| st.timer.is_none_or(|armed| t < armed));
        if died || sooner {
            st.wake_actor();
        }
        true
    }
}
