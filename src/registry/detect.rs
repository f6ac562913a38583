//! Running the checks: on a task of the calling runtime, so that a call that gives up does not
//! stop the work the other calls wait for; a guard that ends every run, however its task ends;
//! and the timer that makes a negative decision due for a re-probe.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

use super::entry::Entry;
use super::ids::{ConnectionId, Run};
use super::state::{Slot, State};
use crate::config::Mode;
use crate::connect::{ConnectionEnd, DaemonConnection, establish, within};
use crate::probe::{UdsTarget, probe_paths};
use crate::reason::FallbackReason;
use crate::sync::{CatchUnwind, lock};

/// A connection that passed every check, with its id and its end signal.
#[derive(Debug)]
pub(super) struct Checked {
    pub(super) connection: DaemonConnection,
    pub(super) id: ConnectionId,
    pub(super) end: ConnectionEnd,
}

/// What a run of the checks ends with.
pub(super) type Outcome = Result<Checked, FallbackReason>;

/// How a run ended.
#[derive(Debug)]
pub(super) enum RunEnd {
    Finished(Outcome),
    /// Its task was dropped unfinished: its runtime shut down. Not the daemon's fault.
    Interrupted,
    /// Its task panicked.
    Panicked,
}

/// Ends a run when its task ends, however it ends.
pub(super) struct FinishRun {
    pub(super) entry: Weak<Entry>,
    pub(super) run: Run,
    pub(super) runtime: tokio::runtime::Id,
    /// The checks' outcome, or `Err` when they panicked; `None` while they run.
    pub(super) outcome: Option<Result<Outcome, ()>>,
}

impl Drop for FinishRun {
    fn drop(&mut self) {
        // Dropped without an outcome: the task's runtime shut down (perhaps while a panic
        // unwound elsewhere). The checks' own panics are caught in the task.
        let end = match self.outcome.take() {
            Some(Ok(outcome)) => RunEnd::Finished(outcome),
            Some(Err(())) => RunEnd::Panicked,
            None => RunEnd::Interrupted,
        };
        if let Some(entry) = self.entry.upgrade() {
            entry.run_ended(self.run, self.runtime, end);
        }
    }
}

/// Whether the current runtime (`handle`'s) has a time driver: the checks' deadline needs one.
/// Tokio has no way to ask, and creating a timer without it panics, so the answer is learnt
/// once per runtime by catching that panic (tokio prints its message once). Under
/// `panic = "abort"` that panic ends the process, as any timer of the runtime would.
pub(super) fn time_driver_available(handle: &Handle) -> bool {
    static KNOWN: Mutex<Vec<(tokio::runtime::Id, bool)>> = Mutex::new(Vec::new());
    let id = handle.id();
    if let Some((_, known)) = lock(&KNOWN).iter().find(|(runtime, _)| *runtime == id) {
        return *known;
    }
    let available = std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO))).is_ok();
    let mut known = lock(&KNOWN);
    if known.len() >= 64 {
        known.clear();
    }
    known.push((id, available));
    available
}

impl Entry {
    /// Runs the checks on a task of `handle`'s runtime, so that a call that gives up does not
    /// stop the work the others wait for; its guard reports how the run ended.
    pub(super) fn spawn_run(
        self: &Arc<Self>,
        handle: &Handle,
        run: Run,
        probed: Option<UdsTarget>,
    ) {
        let mut finish = FinishRun {
            entry: Arc::downgrade(self),
            run,
            runtime: handle.id(),
            outcome: None,
        };
        let entry = self.clone();
        handle.spawn(async move {
            let checks = entry.detect(probed, finish.runtime);
            finish.outcome = Some(CatchUnwind::new(checks).await);
            drop(finish);
        });
    }

    pub(super) fn probe(&self) -> Result<UdsTarget, FallbackReason> {
        self.counters.probes.fetch_add(1, Ordering::Relaxed);
        let probed = probe_paths(&self.paths, &self.settings);
        probed.into_target().inspect_err(|reason| {
            tracing::debug!(dir = %self.dir.display(), %reason, "local daemon probe");
        })
    }

    /// The checks for one runtime: probe (unless the caller just did), connect, peer check,
    /// HTTP/2, health. Each runtime probes again: a daemon may have restarted since another
    /// runtime's checks, and the probe costs microseconds. In require mode they try again until the deadline, which bounds the
    /// whole wait; the outcome is the last attempt's.
    async fn detect(
        self: Arc<Self>,
        mut target: Option<UdsTarget>,
        runtime: tokio::runtime::Id,
    ) -> Outcome {
        // A daemon started on a miss has its start timeout to serve, which then bounds the wait.
        let wait = match &self.settings.auto_start {
            Some(auto) => self.settings.deadline.max(auto.start_timeout),
            None => self.settings.deadline,
        };
        let deadline = Instant::now().checked_add(wait);
        loop {
            let attempt = self.attempt(target.take(), runtime);
            // An attempt that hangs past the deadline ends there.
            let result = within(deadline, attempt).await;
            let reason = match result {
                Ok(checked) => return Ok(checked),
                Err(reason) => reason,
            };
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if self.settings.mode != Mode::Require || remaining == Some(Duration::ZERO) {
                return Err(reason);
            }
            // A started daemon that exited fails the wait at once, naming its log.
            if let Some(message) = self.spawn_failure() {
                return Err(FallbackReason::AutoStartFailed { message });
            }
            let pause = Duration::from_millis(20);
            tokio::time::sleep(remaining.map_or(pause, |r| r.min(pause))).await;
        }
    }

    /// One run of the chain.
    async fn attempt(
        self: &Arc<Self>,
        target: Option<UdsTarget>,
        runtime: tokio::runtime::Id,
    ) -> Outcome {
        let probe_start = Instant::now();
        let target = match (target, &self.settings.auto_start) {
            (Some(target), _) => target,
            (None, Some(auto)) => match self.probe_or_start() {
                Err(FallbackReason::ExecutableReplaced) => {
                    // Boxed: the rare restart (a stop over its own connection) would otherwise
                    // grow every run's future.
                    Box::pin(self.restart(auto)).await;
                    return Err(FallbackReason::ExecutableReplaced);
                }
                probed => probed?,
            },
            (None, None) => self.probe()?,
        };
        let probe_time = probe_start.elapsed();
        let id = self.ids.connection();
        let end = self.connection_end(id, runtime);
        let established = establish(target, &self.dir, &self.settings, end.clone()).await;
        tracing::debug!(
            dir = %self.dir.display(),
            outcome = ?established.result.as_ref().map(|c| (c.target.pid, &c.version)),
            probe_us = probe_time.as_micros() as u64,
            connect_us = established.timings.connect.as_micros() as u64,
            handshake_us = established.timings.handshake.as_micros() as u64,
            "local daemon detection"
        );
        established.result.map(|connection| Checked {
            connection,
            id,
            end,
        })
    }

    fn connection_end(
        self: &Arc<Self>,
        id: ConnectionId,
        runtime: tokio::runtime::Id,
    ) -> ConnectionEnd {
        let entry: Weak<Self> = Arc::downgrade(self);
        ConnectionEnd::new(move |cause| {
            if let Some(entry) = entry.upgrade() {
                entry.connection_ended(id, runtime, cause);
            }
        })
    }

    /// Sets the due flag once the interval has passed, by a timer on the calling runtime: each
    /// runtime that routes by the negative verdict arms one, so an idle runtime cannot hold
    /// back the others. The timer's guard also sets the flag if its runtime goes away first;
    /// the slow path then compares the time itself. Without a runtime with timers the flag is
    /// set at once, and the slow path does all the waiting.
    pub(super) fn arm_timer(self: &Arc<Self>, state: &mut State, runtime: Option<&Handle>) {
        let Some(handle) = runtime else {
            self.reprobe_due.store(true, Ordering::Relaxed);
            return;
        };
        if state.timers.contains(&handle.id()) {
            return;
        }
        state.timers.push(handle.id());
        if !time_driver_available(handle) {
            self.reprobe_due.store(true, Ordering::Relaxed);
            return;
        }
        struct SetOnDrop(Weak<Entry>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                if let Some(entry) = self.0.upgrade() {
                    entry.reprobe_due.store(true, Ordering::Relaxed);
                }
            }
        }
        let guard = SetOnDrop(Arc::downgrade(self));
        let interval = self.reprobe_interval(state);
        handle.spawn(async move {
            tokio::time::sleep(interval).await;
            drop(guard);
        });
    }

    /// A run of the checks ended.
    pub(super) fn run_ended(self: &Arc<Self>, run: Run, runtime: tokio::runtime::Id, end: RunEnd) {
        let mut state = self.lock();
        let current = match run {
            Run::Waited(id) => {
                matches!(state.slot(runtime), Some(Slot::Connecting { id: i, .. }) if *i == id)
            }
            Run::Reprobe(id) => state.reprobe.as_ref().is_some_and(|r| r.id == id),
        };
        if !current {
            // Superseded (a reset, a newer run): its connection is not wanted.
            if let RunEnd::Finished(Ok(checked)) = end {
                checked.connection.task.abort();
            }
            return;
        }
        let waiters = match (run, state.take_slot(runtime)) {
            (Run::Reprobe(_), slot) => {
                if let Some(slot) = slot {
                    slot.close();
                }
                state.reprobe.take().map(|r| r.waiters)
            }
            (Run::Waited(_), Some(Slot::Connecting { waiters, .. })) => Some(waiters),
            (Run::Waited(_), other) => {
                if let Some(slot) = other {
                    slot.close();
                }
                None
            }
        };
        match end {
            RunEnd::Finished(outcome) => self.install(&mut state, runtime, outcome),
            // The runtime went away: not the daemon's doing. The next call tries again.
            RunEnd::Interrupted => {
                self.reprobe_due.store(true, Ordering::Relaxed);
                self.bump();
            }
            RunEnd::Panicked => {
                let reason = FallbackReason::RuntimeUnusable {
                    message: "the checks' task panicked".into(),
                };
                let handle = Handle::try_current().ok();
                self.set_negative(&mut state, reason, handle.as_ref());
            }
        }
        drop(state);
        if let Some(waiters) = waiters {
            waiters.wake_all();
        }
    }
}
