//! A run of the checks, outside the entry's lock: on a task of the calling runtime, so that a
//! call that gives up does not stop the work the other calls wait for, with a guard that
//! reports how the run ended however its task ends. The probe (which, with auto-start on,
//! starts a daemon on a miss), the connect and handshake, the restart of an upgraded daemon,
//! and, in mode `require`, the attempts until the deadline.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

use super::entry::{Entry, Outcome, RunEnd};
use super::ids::{ConnectionId, Run};
use super::runtimes;
use crate::config::{AutoStart, Mode};
use crate::connect::{establish, within};
use crate::http2::ConnectionEnd;
use crate::lifecycle::{SpawnOutcome, StopOutcome, maybe_spawn, stop_own_stalled, stop_with};
use crate::lockfile::{lock_held, record_names};
use crate::paths::DaemonPaths;
use crate::pidfile::Pidfile;
use crate::probe::{UdsTarget, probe_paths};
use crate::process;
use crate::reason::FallbackReason;
use crate::sync::CatchUnwind;

/// Reports a run's end to its entry when the run's task ends, however it ends: finished,
/// panicked, or dropped unfinished with its runtime ([`RunEnd::Interrupted`], until the task
/// says otherwise).
struct FinishRun {
    entry: Weak<Entry>,
    run: Run,
    runtime: tokio::runtime::Id,
    end: RunEnd,
}

impl Drop for FinishRun {
    fn drop(&mut self) {
        let end = std::mem::replace(&mut self.end, RunEnd::Interrupted);
        if let Some(entry) = self.entry.upgrade() {
            entry.run_ended(self.run, self.runtime, end);
        }
    }
}

impl Entry {
    /// Runs the checks on a task of `handle`'s runtime; its guard reports how the run ended.
    /// Never called under the entry's lock: a closing runtime drops the task at once, and the
    /// guard takes the lock.
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
            end: RunEnd::Interrupted,
        };
        let entry = self.clone();
        handle.spawn(async move {
            let checks = entry.detect(probed, finish.runtime);
            finish.end = match CatchUnwind::new(checks).await {
                Ok(outcome) => RunEnd::Finished(outcome),
                Err(panic) => RunEnd::Panicked(runtimes::learn(finish.runtime, &panic)),
            };
            drop(finish);
        });
    }

    /// The probe alone.
    pub(super) fn probe(&self) -> Result<UdsTarget, FallbackReason> {
        self.counters.probes.fetch_add(1, Ordering::Relaxed);
        let probed = probe_paths(&self.paths, &self.settings);
        probed.into_target().inspect_err(|reason| {
            tracing::debug!(dir = %self.dir.display(), %reason, "local daemon probe");
        })
    }

    /// The probe; when it finds no daemon and auto-start is on, a daemon is started (by the
    /// lifetime lock's rule, see `lifecycle`), and the calls go on by the probe's reason. Takes
    /// the entry's lock to note a started daemon: never called under it.
    pub(super) fn probe_or_start(&self) -> Result<UdsTarget, FallbackReason> {
        match self.probe() {
            Ok(target) => Ok(target),
            Err(reason) => Err(self.start_on_miss(reason)),
        }
    }

    /// With auto-start on, a miss for `reason` starts a daemon (by the lifetime lock's rule,
    /// see `lifecycle`); returns the reason the calls go on by.
    fn start_on_miss(&self, reason: FallbackReason) -> FallbackReason {
        let Some(auto) = &self.settings.auto_start else {
            return reason;
        };
        // An upgraded daemon is restarted by a run of the checks, which can wait for it to stop.
        if reason == FallbackReason::ExecutableReplaced {
            return reason;
        }
        // Calls wait for a start under way, within the hand-off bound from the moment it is
        // first seen; a start that fails ends the wait.
        let handoff = auto
            .handoff()
            .and_then(|bound| Instant::now().checked_add(bound));
        let stopped = |_| self.count_stalled_stop();
        match maybe_spawn(&self.daemon_paths, auto, stopped) {
            SpawnOutcome::Spawned(child) => {
                let mut state = self.lock();
                state.spawned = Some((child, Instant::now()));
                state.handoff = state.handoff.or(handoff);
            }
            SpawnOutcome::Pending(why) => {
                tracing::debug!(dir = %self.dir.display(), why, "a daemon is being started");
                let mut state = self.lock();
                state.handoff = state.handoff.or(handoff);
            }
            // A daemon that holds its lock and has not written its pidfile yet is loading.
            SpawnOutcome::Locked if reason.is_loading() => {
                tracing::debug!(dir = %self.dir.display(), "a daemon holds its lock and is loading");
                let mut state = self.lock();
                state.handoff = state.handoff.or(handoff);
            }
            SpawnOutcome::Locked => {
                tracing::debug!(dir = %self.dir.display(), "a daemon holds the lifetime lock");
            }
            SpawnOutcome::Failed(message) => {
                self.lock().handoff = None;
                return FallbackReason::AutoStartFailed { message };
            }
            SpawnOutcome::CannotStart(why) => {
                tracing::debug!(dir = %self.dir.display(), why, "no daemon started");
                self.lock().handoff = None;
            }
            SpawnOutcome::NotNow(why) => {
                tracing::debug!(dir = %self.dir.display(), why, "no daemon started");
            }
        }
        reason
    }

    /// The checks for one runtime: probe (unless the caller just did), connect, peer check,
    /// HTTP/2, health. Each runtime probes again: a daemon may have restarted since another
    /// runtime's checks, and the probe costs microseconds. In mode `require` they try again
    /// until the deadline, which bounds the whole wait; the outcome is the last attempt's.
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
            let reason = match within(deadline, attempt).await {
                Ok(checked) => return Ok(checked),
                Err(reason) => reason,
            };
            if self.settings.mode != Mode::Require {
                return Err(reason);
            }
            // A daemon started here that exited fails the wait at once, naming its log.
            if let Some(message) = self.spawn_failure() {
                return Err(FallbackReason::AutoStartFailed { message });
            }
            // Nor does the wait go on after a definitive rejection: it is the reason to report,
            // where the last of many attempts would be a timeout's.
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if remaining == Some(Duration::ZERO) {
                // A command started here that never took the lock is stopped, and named.
                return Err(match self.stop_own_stalled() {
                    Some(message) => FallbackReason::AutoStartFailed { message },
                    None => reason,
                });
            }
            if reason.is_definitive() {
                return Err(reason);
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
        let id = self.ids.connection();
        let end = self.connection_end(id, runtime);
        let pid = target.pid;
        let paths = Some(&self.paths);
        match establish(target, paths, &self.dir, &self.settings, end).await {
            Ok(connection) => Ok((id, connection)),
            // A copy of another directory's files, whose daemon holds no lock here: a miss.
            Err(FallbackReason::ConnectionRefused)
                if record_names(&self.paths.lock, pid) == Some(true)
                    && !lock_held(&self.paths.lock) =>
            {
                Err(self.start_on_miss(FallbackReason::LockNotHeld { pid }))
            }
            Err(reason) => Err(reason),
        }
    }

    /// The signal the connection `id` of `runtime` gives its entry when it ends.
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

    /// A daemon whose executable was replaced on disk (an upgrade) is stopped the way
    /// [`stop`](crate::stop) does it, and a new one started. Only on that reason: two different
    /// installed versions must not stop each other's daemons in turn.
    async fn restart(&self, auto: &AutoStart) {
        if !runs_program(&self.paths, &self.settings.marker, &auto.program) {
            tracing::debug!(dir = %self.dir.display(), "the daemon runs another installation");
            return;
        }
        let stopped = stop_with(&self.dir, &self.paths, &self.settings, auto.start_timeout).await;
        tracing::info!(dir = %self.dir.display(), ?stopped, "restarting an upgraded local daemon");
        if let StopOutcome::Stopped { .. } = stopped {
            let _ = self.probe_or_start();
        }
    }

    /// Stops the command started here if it never took the lifetime lock; the message says so.
    fn stop_own_stalled(&self) -> Option<String> {
        let auto = self.settings.auto_start.as_ref()?;
        let child = self.lock().spawned.as_ref()?.0.clone();
        stop_own_stalled(&self.daemon_paths, &child, auto.start_timeout, |_| {
            self.count_stalled_stop()
        })
    }

    fn count_stalled_stop(&self) {
        self.counters
            .stalled_starts_stopped
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Why a daemon started here is not coming, if it exited already
    /// ([`SpawnedChild::failed_start`]).
    fn spawn_failure(&self) -> Option<String> {
        // The log is read after the entry's lock is let go.
        let child = self.lock().spawned.as_ref()?.0.clone();
        child.failed_start(&self.daemon_paths)
    }
}

/// Whether the pidfile's process runs (an older build at) `program`'s path: `/proc/<pid>/exe`
/// names the path, with ` (deleted)` once the file was replaced. Another installation's daemon
/// is never restarted by this one.
/// The pidfile is read as the probe reads it: bounded, and never blocking on a FIFO.
fn runs_program(paths: &DaemonPaths, marker: &str, program: &std::path::Path) -> bool {
    let Ok(Pidfile { pid, .. }) = Pidfile::read(&paths.pidfile, marker) else {
        return false;
    };
    // The kernel names the file the daemon was started from, symlinks resolved.
    let program = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_owned());
    process::executable_path(pid).is_some_and(|(path, _)| path == program)
}
