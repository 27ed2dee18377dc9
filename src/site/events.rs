//! A site's observable events: each is a struct that writes its own log
//! line (see `crate::events` for the client side's), emitted inside the
//! site actor's span (`site{site=..}`), so they carry no site of their own.
//!
//! Levels: a site going down is `warn`, its other state changes `info`; a
//! site serving fewer channels than asked for is `warn`.

use std::time::Duration;

use super::SiteState;
use crate::error::fmt_duration;

/// A site changed state.
pub struct SiteStateChanged<'a> {
    /// Previous state.
    pub from: SiteState,
    /// New state.
    pub to: SiteState,
    /// Why.
    pub reason: &'a str,
    /// Time spent in the previous state.
    pub after: Duration,
}

impl SiteStateChanged<'_> {
    /// Write the log line.
    pub fn emit(self) {
        let after = fmt_duration(self.after);
        match self.to {
            SiteState::Down => {
                tracing::warn!(from = %self.from, reason = self.reason, "site is down (was {} for {after}): {}", self.from, self.reason)
            }
            SiteState::Ready => {
                tracing::info!(from = %self.from, "site is ready (was {} for {after}): {}", self.from, self.reason)
            }
            SiteState::Starting => tracing::info!("site is starting"),
        }
    }
}

/// A new channel was not served: the site serves fewer concurrent
/// connections than `channels` asks for (Icinga 2 serves 2 × its CPU cores;
/// xinetd closes connections over its `instances`).
pub struct ChannelsLimited<'a> {
    /// Channels the site does serve.
    pub serving: usize,
    /// Channels the pool was growing to: `channels`, or one more than it
    /// served when it grew beyond that toward `channels_max` for waiting
    /// queries.
    pub wanted: usize,
    /// What happened to the new channel.
    pub reason: &'a str,
    /// When livemux tries one more channel again.
    pub retry: Duration,
}

impl ChannelsLimited<'_> {
    /// Write the log line.
    pub fn emit(self) {
        tracing::warn!(
            serving = self.serving,
            wanted = self.wanted,
            "site serves only {} of {} channels: a new channel {}; using {} and trying one more every {} \
             (lower `channels`, or raise the site's connection limit)",
            self.serving,
            self.wanted,
            self.reason,
            self.serving,
            fmt_duration(self.retry)
        )
    }
}
