//! The site actor's inbox: what its helper tasks and leases report.
//!
//! A queue that holds only what is queued. tokio's mpsc channels keep their
//! messages in blocks of 32 and keep emptied blocks for reuse, about 6 KiB
//! per site for the actor's events, most of a quiet site's memory; a
//! daemon with 10,000 sites would hold 60 MiB of empty blocks. Reports are
//! few at a time (a lease returning, a connect or heartbeat finishing), so
//! a mutex-guarded `VecDeque` and a [`Notify`] do the job.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::actor::Event;

/// A queue longer than this at some moment gives its memory back once empty.
const KEEP_CAPACITY: usize = 16;

struct Shared {
    queue: Mutex<VecDeque<Event>>,
    /// Wakes the actor; a notification sent while it is not waiting is kept.
    arrived: Notify,
    /// The actor is gone: reports are refused (and dropped by the sender).
    closed: AtomicBool,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Event>> {
        // Held only to push or pop; a panic in between is impossible, and
        // the queue stays consistent regardless.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending side: helpers and leases hold a clone.
#[derive(Clone)]
pub(crate) struct Outbox {
    shared: Arc<Shared>,
}

/// The actor's side.
pub(crate) struct Inbox {
    shared: Arc<Shared>,
}

/// A new, empty inbox and its sending side.
pub(crate) fn inbox() -> (Outbox, Inbox) {
    let shared =
        Arc::new(Shared { queue: Mutex::new(VecDeque::new()), arrived: Notify::new(), closed: AtomicBool::new(false) });
    (Outbox { shared: shared.clone() }, Inbox { shared })
}

impl Outbox {
    /// Report `ev`; if the actor is gone, it comes back (to be dropped).
    pub(crate) fn send(&self, ev: Event) -> Result<(), Event> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(ev);
        }
        self.shared.queue().push_back(ev);
        self.shared.arrived.notify_one();
        Ok(())
    }
}

impl Inbox {
    /// The next report, in the order they were sent. Cancel-safe: a report
    /// is taken out only when it is returned.
    pub(crate) async fn recv(&mut self) -> Event {
        loop {
            if let Some(ev) = self.try_recv() {
                return ev;
            }
            self.shared.arrived.notified().await;
        }
    }

    fn try_recv(&mut self) -> Option<Event> {
        let mut q = self.shared.queue();
        let ev = q.pop_front();
        if q.is_empty() && q.capacity() > KEEP_CAPACITY {
            *q = VecDeque::new();
        }
        ev
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        // What is still queued (channels among it) is dropped with the actor.
        let rest = std::mem::take(&mut *self.shared.queue());
        drop(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::channel::Return;

    fn returned(id: u64) -> Event {
        Event::Returned { id, how: Return::Reuse, reason: None, client: 0 }
    }

    fn id(ev: Event) -> u64 {
        match ev {
            Event::Returned { id, .. } => id,
            Event::Helper(_) => u64::MAX,
        }
    }

    #[tokio::test]
    async fn reports_arrive_in_order_and_a_closed_inbox_refuses_them() {
        let (tx, mut rx) = inbox();
        for i in 0..40 {
            assert!(tx.send(returned(i)).is_ok());
        }
        for i in 0..40 {
            assert_eq!(id(rx.recv().await), i);
        }
        assert_eq!(rx.shared.queue().capacity(), 0, "an emptied long queue gives its memory back");
        // A report sent while the actor waits wakes it.
        let waiter = tokio::spawn(async move { id(rx.recv().await) });
        tokio::task::yield_now().await;
        assert!(tx.send(returned(7)).is_ok());
        assert_eq!(waiter.await.expect("task"), 7);
        // The inbox was dropped with the task: reports come back.
        assert!(tx.send(returned(8)).is_err());
    }

    #[tokio::test]
    async fn a_cancelled_wait_loses_nothing() {
        let (tx, mut rx) = inbox();
        {
            let wait = rx.recv();
            tokio::pin!(wait);
            assert!(futures_poll_once(wait.as_mut()).await.is_none());
        }
        assert!(tx.send(returned(1)).is_ok());
        assert_eq!(id(rx.recv().await), 1);
    }

    /// Poll a future once.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}
