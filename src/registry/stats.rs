//! [`RouteStats`] and the counters behind them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::probe::UdsTarget;
use crate::reason::FallbackReason;
use crate::sync::lock;

/// The diagnostic counters of one entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteStats {
    /// How many times the checks ran (first detection, re-probes, and a connection for each
    /// further runtime).
    pub probes: u64,
    /// How many connections passed every check.
    pub connections_built: u64,
    /// The same count as [`connections_built`](Self::connections_built), by its old name: it
    /// counts connections, not channels.
    #[deprecated(since = "0.1.1", note = "use `connections_built`")]
    pub channels_built: u64,
    /// Calls sent to the daemon.
    pub daemon_calls: u64,
    /// Calls served in-process, those below included.
    pub in_process_calls: u64,
    /// Calls the daemon never processed that then ran in-process: the connection closed before
    /// the request was handed to it, or the daemon's GOAWAY or `REFUSED_STREAM` said it did
    /// not take the stream.
    pub rerouted_calls: u64,
    /// Calls of an [idempotent](crate::LocalDaemonLayer::idempotent) method that ran again
    /// in-process after their daemon connection broke before the answer.
    pub rerun_calls: u64,
    /// Calls that waited for a daemon being started (by this process or another one) rather
    /// than run in-process beside it; see [`AutoStart::handoff_timeout`](crate::AutoStart::handoff_timeout).
    pub start_waits: u64,
    /// Of those, the calls that ran in-process after all (the start failed, or the hand-off
    /// bound passed) or met their own deadline first.
    pub start_waits_given_up: u64,
    /// Started daemon commands this process stopped because they had not taken the directory's
    /// lifetime lock within the start timeout (SIGTERM, then SIGKILL, to their process group,
    /// once verified as the command started). [`AutoStartStatus::stopped`](crate::AutoStartStatus::stopped)
    /// counts them across processes.
    pub stalled_starts_stopped: u64,
    /// Decisions to run in-process, per reason (a decision, not a call).
    pub fallbacks: Vec<(FallbackReason, u64)>,
    /// The current decision: the daemon's target, or the reason calls run in-process; `None`
    /// before the first decision.
    pub route: Option<Result<UdsTarget, FallbackReason>>,
    /// Configuration errors, for a person, each with the expected and the found value: values
    /// of the mode's or auto-start's variable that were not understood, and a current
    /// decision whose reason [is one](FallbackReason::is_misconfiguration) (a pidfile marker
    /// that is not the one expected). Each is also logged once per process as a warning.
    pub misconfigured: Vec<String>,
}

/// The counters of one entry.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) probes: AtomicU64,
    pub(super) connections_built: AtomicU64,
    pub(super) daemon_calls: AtomicU64,
    pub(super) in_process_calls: AtomicU64,
    pub(super) rerouted_calls: AtomicU64,
    pub(super) rerun_calls: AtomicU64,
    pub(super) start_waits: AtomicU64,
    pub(super) start_waits_given_up: AtomicU64,
    pub(super) stalled_starts_stopped: AtomicU64,
    fallbacks: Mutex<Vec<(FallbackReason, u64)>>,
}

impl Counters {
    pub(super) fn count_fallback(&self, reason: &FallbackReason) {
        let mut fallbacks = lock(&self.fallbacks);
        match fallbacks.iter_mut().find(|(r, _)| r == reason) {
            Some((_, n)) => *n += 1,
            None => fallbacks.push((reason.clone(), 1)),
        }
    }

    pub(super) fn clear(&self) {
        self.probes.store(0, Ordering::Relaxed);
        self.connections_built.store(0, Ordering::Relaxed);
        self.daemon_calls.store(0, Ordering::Relaxed);
        self.in_process_calls.store(0, Ordering::Relaxed);
        self.rerouted_calls.store(0, Ordering::Relaxed);
        self.rerun_calls.store(0, Ordering::Relaxed);
        self.start_waits.store(0, Ordering::Relaxed);
        self.start_waits_given_up.store(0, Ordering::Relaxed);
        self.stalled_starts_stopped.store(0, Ordering::Relaxed);
        lock(&self.fallbacks).clear();
    }

    pub(super) fn snapshot(&self, route: Option<Result<UdsTarget, FallbackReason>>) -> RouteStats {
        let connections_built = self.connections_built.load(Ordering::Relaxed);
        #[allow(deprecated)] // the old name is kept in step with the new
        RouteStats {
            probes: self.probes.load(Ordering::Relaxed),
            connections_built,
            channels_built: connections_built,
            daemon_calls: self.daemon_calls.load(Ordering::Relaxed),
            in_process_calls: self.in_process_calls.load(Ordering::Relaxed),
            rerouted_calls: self.rerouted_calls.load(Ordering::Relaxed),
            rerun_calls: self.rerun_calls.load(Ordering::Relaxed),
            start_waits: self.start_waits.load(Ordering::Relaxed),
            start_waits_given_up: self.start_waits_given_up.load(Ordering::Relaxed),
            stalled_starts_stopped: self.stalled_starts_stopped.load(Ordering::Relaxed),
            fallbacks: lock(&self.fallbacks).clone(),
            misconfigured: match &route {
                Some(Err(reason)) if reason.is_misconfiguration() => {
                    vec![format!("{reason}: {}", reason.remedy())]
                }
                _ => Vec::new(),
            },
            route,
        }
    }
}
