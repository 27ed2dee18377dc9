//! A deadline that keeps its timer: one timer per session instead of one
//! per wait.
//!
//! `tokio::time::timeout_at` makes a new timer for every wait, and a wait
//! that has to sleep registers it in the runtime's timer wheel and takes it
//! out again when it ends: two trips through the wheel's lock per wait, and
//! a query waits several times. A [`Deadline`] holds one `Sleep` for its
//! owner's life and moves it: to a later instant in place (an atomic update
//! of the registered timer; the wheel finds the new instant when the old
//! one comes round), to an earlier one through the wheel. A session moves
//! its query deadline to `arrival + query_timeout` for every request, a
//! later instant each time, so its queries cost the wheel nothing in the
//! common case.

use std::future::Future;
use std::pin::Pin;

use tokio::time::{Instant, Sleep};

/// The deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// An instant and the one timer that waits for it.
#[derive(Debug)]
pub struct Deadline {
    at: Instant,
    sleep: Pin<Box<Sleep>>,
}

impl Deadline {
    /// A deadline at `at`.
    pub fn new(at: Instant) -> Deadline {
        Deadline { at, sleep: Box::pin(tokio::time::sleep_until(at)) }
    }

    /// When it is.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// Move it to `at` (later is cheap; see the module).
    pub fn set(&mut self, at: Instant) {
        if at != self.at {
            self.at = at;
            self.sleep.as_mut().reset(at);
        }
    }

    /// Completes once the deadline has passed.
    pub fn expired(&mut self) -> &mut Pin<Box<Sleep>> {
        &mut self.sleep
    }

    /// Run `f` until the deadline: its output, or [`Elapsed`]. Like
    /// `timeout_at`, `f` is polled first, so an answer that is ready wins.
    pub async fn run<F: Future>(&mut self, f: F) -> Result<F::Output, Elapsed> {
        tokio::select! {
            biased;
            r = f => Ok(r),
            _ = &mut self.sleep => Err(Elapsed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_later_or_earlier_fires_at_its_new_instant() {
        let t0 = Instant::now();
        let mut d = Deadline::new(t0 + Duration::from_secs(10));
        // Registered by a wait that ends first.
        assert_eq!(d.run(async { 1 }).await, Ok(1));
        assert_eq!(d.run(tokio::time::sleep(Duration::from_secs(1))).await, Ok(()));
        // Later: the old instant passes without firing.
        d.set(t0 + Duration::from_secs(30));
        assert_eq!(d.run(tokio::time::sleep(Duration::from_secs(20))).await, Ok(()));
        assert_eq!(Instant::now(), t0 + Duration::from_secs(21));
        assert_eq!(d.run(std::future::pending::<()>()).await, Err(Elapsed));
        assert_eq!(Instant::now(), t0 + Duration::from_secs(30), "fires at the instant it was moved to");
        // Earlier than where it is: through the wheel, exact as well.
        d.set(t0 + Duration::from_secs(60));
        d.set(t0 + Duration::from_secs(40));
        assert_eq!(d.run(std::future::pending::<()>()).await, Err(Elapsed));
        assert_eq!(Instant::now(), t0 + Duration::from_secs(40));
        assert_eq!(d.at(), t0 + Duration::from_secs(40));
    }
}
