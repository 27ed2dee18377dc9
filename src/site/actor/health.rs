//! The actor's side toward the site: connects, a new channel's admission
//! and a used one's verification, heartbeats, and the state they decide
//! (`starting`, `ready`, `down`). Each "on" handler is an event a helper
//! task reported; each "start" spawns the helper that will report it.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;

use super::{AcquireError, Actor, Event, HelperDone, Purpose};
use crate::error::{SiteError, fmt_duration};
use crate::site::SiteState;
use crate::site::channel::Channel;
use crate::site::connector::SiteStream;
use crate::site::heartbeat;
use crate::site::pool::{Grow, Shrink, Use};

impl Actor {
    pub(super) fn on_connected(&mut self, generation: u64, purpose: Purpose, result: Result<SiteStream, SiteError>) {
        if purpose != Purpose::Extra {
            self.desk().pool.connect_finished();
        }
        if generation != self.generation {
            self.ensure_channels();
            return;
        }
        match result {
            Ok(stream) => {
                if std::mem::take(&mut self.fd_exhausted) {
                    tracing::info!("connections to the site can be opened again");
                }
                let ch = self.new_channel(stream);
                if purpose == Purpose::Pool {
                    self.start_admission(ch);
                } else {
                    self.start_heartbeat(ch, purpose);
                }
            }
            Err(e) if out_of_descriptors(&e) => {
                // livemux's own limit, not the site's fault: the site keeps
                // its state; connects are tried again after connect_retry.
                if !self.fd_exhausted {
                    self.fd_exhausted = true;
                    tracing::warn!(error = %e, "no file descriptor left for a connection to the site; it is not \
                        marked down; retrying every {} (logged once until a connect works)",
                        fmt_duration(self.cfg.params.connect_retry));
                }
                let later = Instant::now() + self.cfg.params.connect_retry;
                match purpose {
                    Purpose::Probe => self.retry_at = Some(later),
                    Purpose::Pool => self.local_retry_at = Some(later),
                    Purpose::Extra => {}
                }
            }
            Err(e) => {
                self.last_failed_connect = Some(SystemTime::now());
                if purpose == Purpose::Pool && matches!(e, SiteError::ConnectTimeout { .. }) {
                    // A connect that timed out (a lost SYN, a firewall
                    // limiting new connections) while other channels work:
                    // the pool shrinks to those. A refused connect means
                    // nobody listens any more.
                    self.not_admitted(e);
                } else {
                    self.go_down(e);
                }
            }
        }
    }

    pub(super) fn on_heartbeat(
        &mut self,
        generation: u64,
        id: u64,
        purpose: Purpose,
        channel: Option<Channel>,
        result: Result<i64, SiteError>,
    ) {
        if generation != self.generation {
            // A heartbeat on a channel a reload replaced (or of a pool the
            // site going down emptied): the channel closes here, its entry
            // goes (the schedule was freed for the new channels then).
            self.desk().pool.returned(id);
            self.ensure_channels();
            return;
        }
        self.schedule.finished();
        let at_capacity = self.desk().pool.at_known_capacity();
        match (result, channel) {
            (Ok(program_start), Some(mut ch)) => {
                ch.uses += 1;
                ch.since = SystemTime::now();
                self.heartbeats += 1;
                self.note_program_start(program_start);
                // An extra connection stays only if the pool has room.
                // (`push_idle` takes the channel back from its heartbeat
                // with the idle age it had.)
                let mut d = self.desk();
                if purpose != Purpose::Extra || d.pool.open() < d.pool.limit() {
                    d.pool.push_idle(ch, Instant::now());
                } else {
                    d.pool.returned(ch.id);
                }
                drop(d);
                if purpose == Purpose::Probe {
                    let swept = self.closing.recovered();
                    if swept.reset > 0 {
                        tracing::info!(
                            connections = swept.reset,
                            "reset the connections closed while the site was unreachable that it had not \
                             acknowledged (its threads held by them are free now)"
                        );
                    }
                    self.set_state(SiteState::Ready, "connected and answering heartbeats".into());
                    self.schedule.start(Instant::now());
                    self.ensure_channels();
                }
                self.dispatch();
            }
            (Err(e), _) if purpose == Purpose::Extra && at_capacity && !self.silent_too_long() => {
                // The site has shown it serves no more connections than the
                // busy pool: an extra one going unserved says nothing about
                // its health, until the site has been silent for
                // `response_idle_timeout`. The connection is gone: so is
                // its entry in the pool.
                self.desk().pool.returned(id);
                tracing::debug!(error = %e,
                    "extra-connection heartbeat unanswered while the site serves only the busy pool; not a failure");
            }
            (Err(e), _) => {
                let e = crate::site::connector::explain(&self.cfg.address, e, purpose == Purpose::Probe);
                self.go_down(e);
            }
            (Ok(_), None) => self.go_down(SiteError::ClosedWithoutAnswer),
        }
    }

    pub(super) fn on_admitted(&mut self, generation: u64, channel: Option<Channel>, result: Result<i64, SiteError>) {
        self.desk().pool.admission_finished();
        if generation != self.generation {
            self.ensure_channels();
            return;
        }
        match (result, channel) {
            (Ok(program_start), Some(ch)) => {
                self.note_program_start(program_start);
                let grow = self.desk().pool.admitted(ch, Instant::now());
                match grow {
                    Grow::Same => {}
                    Grow::AllServed => {
                        tracing::info!(channels = self.cfg.params.channels, "site serves all channels again");
                    }
                    // The site may serve more now: try one more at once.
                    Grow::TryOneMore => self.ensure_channels(),
                }
                self.dispatch();
            }
            (Err(e), _) => self.not_admitted(e),
            (Ok(_), None) => self.not_admitted(SiteError::ClosedWithoutAnswer),
        }
    }

    pub(super) fn on_verified(
        &mut self,
        generation: u64,
        id: u64,
        channel: Option<Channel>,
        result: Result<i64, SiteError>,
    ) {
        self.desk().pool.returned(id);
        match (result, channel) {
            (Ok(program_start), Some(ch)) if generation == self.generation && self.state != SiteState::Down => {
                self.note_program_start(program_start);
                self.desk().pool.push_idle(ch, Instant::now());
            }
            (Ok(_), _) => {}
            (Err(e), _) => {
                // Not the site's failure: the channel carried a bad request,
                // and the core dealt with it in its own way.
                tracing::debug!(channel = id, error = %e, "channel closed: not clean after an error answer");
            }
        }
        self.ensure_channels();
        self.dispatch();
    }

    /// A new pool channel could not be connected in time, or did not answer
    /// its admission heartbeat: the pool shrinks to the channels that work,
    /// or, with none, the site is down.
    pub(super) fn not_admitted(&mut self, e: SiteError) {
        let limited = matches!(
            e,
            SiteError::HeartbeatTimeout(_)
                | SiteError::ClosedWithoutAnswer
                | SiteError::Io(_)
                | SiteError::ConnectTimeout { .. }
        );
        let shrink = self.desk().pool.not_admitted(Instant::now(), limited);
        let Shrink::Limited { serving, first } = shrink else {
            let e = crate::site::connector::explain(&self.cfg.address, e, false);
            return self.go_down(e);
        };
        let reason = match &e {
            SiteError::HeartbeatTimeout(t) => format!("got no answer within {}", fmt_duration(*t)),
            SiteError::ClosedWithoutAnswer => "was closed without an answer".to_owned(),
            other => format!("failed ({other})"),
        };
        if first {
            crate::site::events::ChannelsLimited {
                serving,
                wanted: self.cfg.params.channels.max(serving + 1),
                reason: &reason,
                retry: self.cfg.params.channel_retry,
            }
            .emit();
        } else {
            tracing::debug!(serving, %reason, "one more channel is still not served");
        }
        // A retry counted on this channel: it may need another one now.
        self.dispatch();
    }

    /// No byte from the site for `response_idle_timeout`.
    pub(super) fn silent_too_long(&self) -> bool {
        self.activity.last_rx().elapsed() >= self.cfg.params.response_idle_timeout
    }

    pub(super) fn note_program_start(&mut self, ps: i64) {
        if let Some(old) = self.program_start
            && old != ps
        {
            tracing::info!(old, new = ps, "site's core restarted or reloaded (program_start changed)");
        }
        self.program_start = Some(ps);
        self.publish();
    }

    // === connections and heartbeats ===

    /// While ready, keep the pool at its size.
    pub(super) fn ensure_channels(&mut self) {
        if self.state != SiteState::Ready {
            return;
        }
        let wanted = self.desk().pool.connects_wanted();
        for _ in 0..wanted {
            self.start_connect(Purpose::Pool);
        }
    }

    pub(super) fn start_connect(&mut self, purpose: Purpose) {
        if purpose != Purpose::Extra {
            self.desk().pool.connect_started();
        }
        let (tx, generation) = (self.events_tx.clone(), self.generation);
        let attempt = self.connector.connect();
        self.spawn(async move {
            let result = attempt.await;
            let _ = tx.send(Event::Helper(Box::new(HelperDone::Connected { generation, purpose, result })));
        });
    }

    /// Run a helper in the current span, owned by the actor.
    pub(super) fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        use tracing::Instrument;
        self.helpers.spawn(task.instrument(tracing::Span::current()));
    }

    pub(super) fn new_channel(&mut self, stream: SiteStream) -> Channel {
        let id = self.next_id;
        self.next_id += 1;
        Channel::new(id, stream, self.generation, self.activity.clone(), Some(self.closing.clone()))
    }

    /// Check a new pool channel with a heartbeat before lending it.
    pub(super) fn start_admission(&mut self, ch: Channel) {
        self.desk().pool.admission_started();
        let generation = self.generation;
        self.spawn_heartbeat(ch, move |channel, result| HelperDone::Admitted { generation, channel, result });
    }

    /// Prove a channel clean after an error answer: a heartbeat on it must
    /// be answered, else it is closed (see `channel::Return::Verify`).
    pub(super) fn start_verification(&mut self, ch: Channel) {
        let (generation, id) = (self.generation, ch.id);
        self.desk().pool.lent(id, Use::Verify, SystemTime::now());
        self.spawn_heartbeat(ch, move |channel, result| HelperDone::Verified { generation, id, channel, result });
    }

    pub(super) fn start_heartbeat(&mut self, ch: Channel, purpose: Purpose) {
        self.schedule.sent();
        self.desk().pool.lent(ch.id, Use::Heartbeat, SystemTime::now());
        let (generation, id) = (self.generation, ch.id);
        self.spawn_heartbeat(ch, move |channel, result| HelperDone::Heartbeat {
            generation,
            id,
            purpose,
            channel,
            result,
        });
    }

    /// Send a heartbeat on `ch` in a helper task, bounded by
    /// `heartbeat_timeout`; `report` makes the event (the channel comes back
    /// only if it answered).
    pub(super) fn spawn_heartbeat(
        &mut self,
        ch: Channel,
        report: impl FnOnce(Option<Channel>, Result<i64, SiteError>) -> HelperDone + Send + 'static,
    ) {
        let tx = self.events_tx.clone();
        let timeout = self.cfg.params.heartbeat_timeout;
        let rtt = self.heartbeat_rtt_us.clone();
        self.spawn(async move {
            let sent = Instant::now();
            let (channel, result) = match tokio::time::timeout(timeout, heartbeat::exchange(&ch.link)).await {
                Ok(Ok(ps)) => {
                    let us = sent.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
                    rtt.store(us.max(1), std::sync::atomic::Ordering::Relaxed);
                    (Some(ch), Ok(ps))
                }
                Ok(Err(e)) => (None, Err(e)),
                Err(_) => {
                    ch.link.mark_silent();
                    (None, Err(SiteError::HeartbeatTimeout(timeout)))
                }
            };
            let _ = tx.send(Event::Helper(Box::new(report(channel, result))));
        });
    }

    // === state ===

    /// The site failed with `e`: record it and publish the state first, then
    /// answer every waiter and stop the queries in flight, so that all of
    /// them see the cause (a certificate failure is a 495 for them too).
    pub(super) fn go_down(&mut self, e: SiteError) {
        let was = self.state;
        let cause = Arc::new(e);
        self.last_error = Some(cause.clone());
        self.generation += 1;
        // Channels closed from here on may not reach the site (see `closing`).
        self.closing.set_suspect(true);
        let (in_flight, waiters, gone) = {
            let mut d = self.desk();
            d.open = false;
            d.generation = self.generation;
            let (waiters, gone) = d.pool.reset();
            (std::mem::take(&mut d.down), waiters, gone)
        };
        // The site's channels close outside the lock.
        drop(gone);
        self.schedule.stop();
        self.retry_at = Some(Instant::now() + self.cfg.params.connect_retry);
        if was == SiteState::Down {
            tracing::debug!(reason = %cause, "reconnect failed; retrying in {}", fmt_duration(self.cfg.params.connect_retry));
            self.publish();
        } else {
            self.set_state(SiteState::Down, cause.to_string());
        }
        for w in waiters {
            let _ = w.reply.send(Err(AcquireError::Down(cause.clone())));
        }
        in_flight.cancel();
    }

    pub(super) fn set_state(&mut self, to: SiteState, reason: String) {
        let from = self.state;
        if from == to {
            return;
        }
        let was_for = SystemTime::now().duration_since(self.state_since).unwrap_or_default();
        self.state = to;
        self.state_since = SystemTime::now();
        crate::site::events::SiteStateChanged { from, to, reason: &reason, after: was_for }.emit();
        self.metrics.state_changed();
        self.publish();
    }
}

/// A connect failed for lack of descriptors in livemux (EMFILE, ENFILE).
fn out_of_descriptors(e: &SiteError) -> bool {
    matches!(e, SiteError::Connect { source, .. }
        if matches!(source.raw_os_error(), Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE))
}
