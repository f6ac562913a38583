//! One directory's route: an entry's state machine.
//!
//! An entry holds a *verdict* for the whole process (not probed yet; a daemon target; or no
//! usable daemon since a moment) and, for each tokio runtime that calls, that runtime's own
//! connection to the daemon. A connection and its keepalive timers belong to the drivers of
//! the runtime that made them, so a call never waits on a connection that only another
//! runtime would drive; the probe's result is shared, and each runtime's checks run once for
//! all its concurrent calls. Every change bumps the generation, the one thing a warm call reads.
//!
//! A connection that *finishes* (the daemon closed it or sent GOAWAY, it broke, or keepalive
//! gave up) ends the daemon route for everyone at once. A connection dropped unfinished, because
//! its runtime shut down, ends only that runtime's connection: the next runtime connects again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::detect::{
    Checked, ConnectionId, DetectionId, FinishRun, Ids, Outcome, ReprobeId, Run, RunEnd,
    time_driver_available,
};
use super::stats::{Counters, RouteStats};
use crate::config::{Mode, Settings};
use crate::connect::{ConnectionEnd, DaemonClient, EndCause, establish};
use crate::paths::DaemonPaths;
use crate::probe::{UdsTarget, probe_paths};
use crate::reason::FallbackReason;
use crate::sync::{Waiters, lock};

/// The one vocabulary of a route: what a call of a given runtime does.
#[derive(Debug, Clone)]
pub(crate) enum Decision {
    /// Calls go to the daemon over this runtime's checked connection.
    Daemon(DaemonRoute),
    /// Calls go to the in-process service (the entry's stats say why).
    InProcess,
    /// Mode `require` without a usable daemon: calls fail with `UNAVAILABLE` naming the reason.
    Refused(FallbackReason),
}

/// A checked daemon connection, as the services of one runtime use it.
#[derive(Debug, Clone)]
pub(crate) struct DaemonRoute {
    pub(crate) client: DaemonClient,
    pub(crate) pid: u32,
    pub(crate) id: ConnectionId,
    /// The runtime whose drivers run the connection: only its calls use it.
    pub(crate) runtime: tokio::runtime::Id,
}

/// What the whole process knows of the daemon.
#[derive(Debug)]
enum Verdict {
    Unprobed,
    /// The probe found this daemon; each runtime connects to it on its first call.
    Target(UdsTarget),
    /// No usable daemon, for this reason, since `since`.
    Negative {
        reason: FallbackReason,
        since: Instant,
    },
}

/// One runtime's connection.
#[derive(Debug)]
enum Slot {
    /// The checks run on a task of the runtime; its calls wait for them.
    Connecting { id: DetectionId, waiters: Waiters },
    Connected {
        route: DaemonRoute,
        /// The task that dispatches requests: aborting it ends the connection once its
        /// in-flight streams are done.
        task: AbortHandle,
    },
}

impl Slot {
    /// Lets go of the slot: a connection closes, the calls waiting for checks are woken.
    fn close(self) {
        match self {
            Slot::Connecting { waiters, .. } => waiters.wake_all(),
            Slot::Connected { task, .. } => task.abort(),
        }
    }
}

/// A re-probe on a task of the runtime that made the call that found it due.
#[derive(Debug)]
struct Reprobe {
    id: ReprobeId,
    runtime: tokio::runtime::Id,
    started: Instant,
    /// Calls of that runtime that wait for it: see [`Entry::poll_decision`].
    waiters: Waiters,
}

#[derive(Debug)]
struct State {
    verdict: Verdict,
    /// A background re-probe in flight.
    reprobe: Option<Reprobe>,
    /// The runtimes with a timer armed for the negative verdict's re-probe.
    timers: Vec<tokio::runtime::Id>,
    runtimes: Vec<(tokio::runtime::Id, Slot)>,
}

impl State {
    fn slot(&mut self, runtime: tokio::runtime::Id) -> Option<&mut Slot> {
        self.runtimes
            .iter_mut()
            .find(|(id, _)| *id == runtime)
            .map(|(_, slot)| slot)
    }

    fn take_slot(&mut self, runtime: tokio::runtime::Id) -> Option<Slot> {
        let index = self.runtimes.iter().position(|(id, _)| *id == runtime)?;
        Some(self.runtimes.swap_remove(index).1)
    }

    fn close_all(&mut self) {
        for (_, slot) in self.runtimes.drain(..) {
            slot.close();
        }
        if let Some(reprobe) = self.reprobe.take() {
            reprobe.waiters.wake_all();
        }
    }
}

/// One directory's route, shared process-wide.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(super) dir: PathBuf,
    paths: DaemonPaths,
    pub(super) settings: Settings,
    /// Bumped under `state`'s lock on every change.
    generation: AtomicU64,
    /// Set once a negative verdict may be old enough to be checked again; the slow path
    /// compares the time itself.
    reprobe_due: AtomicBool,
    /// How many services use the entry; at zero it is released after the linger.
    pub(super) users: AtomicUsize,
    ids: Ids,
    state: Mutex<State>,
    counters: Counters,
}

impl Entry {
    pub(super) fn new(dir: &Path, settings: Settings) -> Self {
        Self {
            dir: dir.to_owned(),
            paths: settings.paths(dir),
            settings,
            generation: AtomicU64::new(0),
            reprobe_due: AtomicBool::new(false),
            users: AtomicUsize::new(0),
            ids: Ids::default(),
            state: Mutex::new(State {
                verdict: Verdict::Unprobed,
                reprobe: None,
                timers: Vec::new(),
                runtimes: Vec::new(),
            }),
            counters: Counters::default(),
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn reprobe_due(&self) -> bool {
        self.reprobe_due.load(Ordering::Relaxed)
    }

    pub(crate) fn count_daemon_call(&self) {
        self.counters.daemon_calls.add_one();
    }

    pub(crate) fn count_in_process_call(&self) {
        self.counters.in_process_calls.add_one();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A negative decision for `reason`: in-process, or refused in mode `require`. The one place
    /// that says what the mode means for a route.
    fn negative(&self, reason: FallbackReason) -> Decision {
        match self.settings.mode {
            Mode::Require => Decision::Refused(reason),
            Mode::Auto | Mode::Off => Decision::InProcess,
        }
    }

    /// The decision for a call of the current runtime, and its generation, starting the checks
    /// where none is usable yet. The slow path of every call: the warm path compares
    /// generations and never gets here.
    pub(crate) fn poll_decision(self: &Arc<Self>, cx: &mut Context<'_>) -> Poll<(u64, Decision)> {
        let runtime = Handle::try_current().ok();
        let mut state = self.lock();
        if let Some(handle) = &runtime {
            match state.slot(handle.id()) {
                Some(Slot::Connected { route, .. }) => {
                    return Poll::Ready((self.generation(), Decision::Daemon(route.clone())));
                }
                Some(Slot::Connecting { waiters, .. }) => {
                    waiters.register(cx);
                    return Poll::Pending;
                }
                None => {}
            }
        }
        let mut probed = None;
        match &state.verdict {
            Verdict::Negative { reason, since } => {
                let decision = self.negative(reason.clone());
                let since = *since;
                if let Some(reprobe) = &mut state.reprobe {
                    // A re-probe that has run longer than the deadline is not being driven: its
                    // runtime only runs tasks while a call of it waits (a one-thread runtime
                    // whose calls never yield, or one that idles). A call of that runtime then
                    // waits for it, which lets it run; another runtime starts its own.
                    let stalled = reprobe.started.elapsed() > self.settings.deadline;
                    let here = runtime.as_ref().is_some_and(|h| h.id() == reprobe.runtime);
                    if stalled && here {
                        reprobe.waiters.register(cx);
                        return Poll::Pending;
                    }
                    if !stalled || runtime.is_none() {
                        return Poll::Ready((self.generation(), decision));
                    }
                    state.reprobe = None;
                }
                if since.elapsed() < self.settings.reprobe_interval {
                    self.arm_timer(&mut state, runtime.as_ref());
                    return Poll::Ready((self.generation(), decision));
                }
                self.reprobe_due.store(false, Ordering::Relaxed);
                if self.settings.mode == Mode::Auto {
                    // In the background: this call and the next ones go on in-process.
                    if let Some(handle) = runtime.as_ref().filter(|_| time_driver_available()) {
                        let id = self.ids.reprobe();
                        state.reprobe = Some(Reprobe {
                            id,
                            runtime: handle.id(),
                            started: Instant::now(),
                            waiters: Waiters::default(),
                        });
                        self.spawn_run(handle, Run::Reprobe(id), None);
                    }
                    return Poll::Ready((self.generation(), decision));
                }
            }
            Verdict::Unprobed if self.settings.mode == Mode::Auto => {
                // The probe is cheap syscalls: run it here, so that the common "no daemon" case
                // decides without a task or a wake-up.
                match self.probe() {
                    Ok(target) => probed = Some(target),
                    Err(reason) => {
                        self.set_negative(&mut state, reason, runtime.as_ref());
                        return Poll::Ready((self.generation(), self.current(&state)));
                    }
                }
            }
            Verdict::Unprobed | Verdict::Target(_) => {}
        }
        // This runtime's calls wait for its checks, which run on a task of the runtime.
        let Some(handle) = runtime.clone().filter(|_| time_driver_available()) else {
            let message = match runtime {
                None => "no Tokio runtime is running",
                Some(_) => {
                    "the runtime has no time driver (enable it with `enable_all` or `enable_time`)"
                }
            };
            let reason = FallbackReason::RuntimeUnusable {
                message: message.into(),
            };
            self.set_negative(&mut state, reason, runtime.as_ref());
            return Poll::Ready((self.generation(), self.current(&state)));
        };
        let id = self.ids.detection();
        state.runtimes.push((
            handle.id(),
            Slot::Connecting {
                id,
                waiters: Waiters::of(cx),
            },
        ));
        drop(state);
        self.spawn_run(&handle, Run::Waited(id), probed);
        Poll::Pending
    }

    /// Runs the checks on a task of `handle`'s runtime, so that a call that gives up does not
    /// stop the work the others wait for; its guard reports how the run ended.
    fn spawn_run(self: &Arc<Self>, handle: &Handle, run: Run, probed: Option<UdsTarget>) {
        let mut finish = FinishRun {
            entry: Arc::downgrade(self),
            run,
            runtime: handle.id(),
            outcome: None,
        };
        let entry = self.clone();
        handle.spawn(async move {
            finish.outcome = Some(entry.detect(probed, finish.runtime).await);
            drop(finish);
        });
    }

    /// The decision now, for a runtime without a connection of its own.
    fn current(&self, state: &State) -> Decision {
        match &state.verdict {
            Verdict::Negative { reason, .. } => self.negative(reason.clone()),
            _ => self.negative(FallbackReason::ConnectionLost),
        }
    }

    fn probe(&self) -> Result<UdsTarget, FallbackReason> {
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
        let deadline = Instant::now().checked_add(self.settings.deadline);
        loop {
            let attempt = self.attempt(target.take(), runtime);
            // An attempt that hangs past the deadline ends there.
            let result = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, attempt)
                    .await
                    .unwrap_or(Err(FallbackReason::DeadlineExceeded)),
                None => attempt.await,
            };
            let reason = match result {
                Ok(checked) => return Ok(checked),
                Err(reason) => reason,
            };
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if self.settings.mode != Mode::Require || remaining == Some(Duration::ZERO) {
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
        let probe_start = Instant::now();
        let target = match target {
            Some(target) => target,
            None => self.probe()?,
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

    /// Installs the outcome of a runtime's checks (its slot already taken out).
    fn install(self: &Arc<Self>, state: &mut State, runtime: tokio::runtime::Id, outcome: Outcome) {
        let checked = match outcome {
            // A connection that ended before this moment found nothing to end, and its signal
            // fires only once: it is checked here, under the lock `connection_ended` takes.
            Ok(checked) if checked.end.has_fired() => {
                checked.connection.task.abort();
                Err(FallbackReason::ConnectionLost)
            }
            outcome => outcome,
        };
        match checked {
            Ok(Checked { connection, id, .. }) => {
                self.counters.channels_built.fetch_add(1, Ordering::Relaxed);
                let route = DaemonRoute {
                    client: connection.client,
                    pid: connection.target.pid,
                    id,
                    runtime,
                };
                self.trace_decision("daemon", None);
                state.verdict = Verdict::Target(connection.target);
                state.runtimes.push((
                    runtime,
                    Slot::Connected {
                        route,
                        task: connection.task,
                    },
                ));
                self.bump();
            }
            Err(reason) => {
                let handle = Handle::try_current().ok();
                self.set_negative(state, reason, handle.as_ref());
            }
        }
    }

    /// No usable daemon, for every runtime: connections close, and a re-probe is scheduled.
    fn set_negative(
        self: &Arc<Self>,
        state: &mut State,
        reason: FallbackReason,
        runtime: Option<&Handle>,
    ) {
        self.counters.count_fallback(&reason);
        let route = match self.settings.mode {
            Mode::Require => "refused",
            _ => "in-process",
        };
        self.trace_decision(route, Some(&reason));
        state.close_all();
        state.verdict = Verdict::Negative {
            reason,
            since: Instant::now(),
        };
        state.timers.clear();
        self.reprobe_due.store(false, Ordering::Relaxed);
        self.arm_timer(state, runtime);
        self.bump();
    }

    /// Each decision in a span of its own, whose fields name the route and the reason's stable
    /// code, for logs and for subscribers that count.
    fn trace_decision(&self, route: &'static str, reason: Option<&FallbackReason>) {
        let span = tracing::info_span!(
            "local_daemon_decision",
            dir = %self.dir.display(),
            route,
            reason = reason.map(FallbackReason::code),
        );
        span.in_scope(|| match reason {
            Some(reason) => tracing::debug!(%reason, "calls run {route}"),
            None => tracing::debug!("calls go to the daemon"),
        });
    }

    /// Sets the due flag once the interval has passed, by a timer on the calling runtime: each
    /// runtime that routes by the negative verdict arms one, so an idle runtime cannot hold
    /// back the others. The timer's guard also sets the flag if its runtime goes away first;
    /// the slow path then compares the time itself. Without a runtime with timers the flag is
    /// set at once, and the slow path does all the waiting.
    fn arm_timer(self: &Arc<Self>, state: &mut State, runtime: Option<&Handle>) {
        let Some(handle) = runtime else {
            self.reprobe_due.store(true, Ordering::Relaxed);
            return;
        };
        if state.timers.contains(&handle.id()) {
            return;
        }
        state.timers.push(handle.id());
        if !time_driver_available() {
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
        let interval = self.settings.reprobe_interval;
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

    /// The daemon connection `id` of `runtime` ended.
    pub(crate) fn connection_ended(
        self: &Arc<Self>,
        id: ConnectionId,
        runtime: tokio::runtime::Id,
        cause: EndCause,
    ) {
        let mut state = self.lock();
        let ours = matches!(
            state.slot(runtime),
            Some(Slot::Connected { route, .. }) if route.id == id
        );
        if !ours {
            return;
        }
        match cause {
            EndCause::Daemon => {
                tracing::info!(
                    dir = %self.dir.display(),
                    "local daemon connection ended; calls run in-process"
                );
                let handle = Handle::try_current().ok();
                self.set_negative(&mut state, FallbackReason::ConnectionLost, handle.as_ref());
            }
            EndCause::Unresponsive => {
                // Only this runtime's connection: its next call checks again, within the
                // deadline, and a daemon that is really hung is then refused for everyone.
                tracing::info!(
                    dir = %self.dir.display(),
                    "local daemon did not answer keepalive; the next call checks again"
                );
                if let Some(slot) = state.take_slot(runtime) {
                    slot.close();
                }
                self.bump();
            }
            EndCause::RuntimeEnded => {
                tracing::debug!(
                    dir = %self.dir.display(),
                    "the runtime of a local daemon connection ended; the next runtime connects again"
                );
                state.take_slot(runtime);
                self.bump();
            }
        }
    }

    /// Forgets the decision, the connections and the counters: the next call probes again.
    pub(crate) fn reset(&self) {
        let mut state = self.lock();
        state.close_all();
        state.verdict = Verdict::Unprobed;
        state.timers.clear();
        self.counters.clear();
        self.bump();
    }

    /// Closes the connections: the entry is no longer used.
    pub(super) fn close(&self) {
        let mut state = self.lock();
        state.close_all();
        state.verdict = Verdict::Unprobed;
        self.bump();
    }

    pub(crate) fn stats(&self) -> RouteStats {
        let route = match &self.lock().verdict {
            Verdict::Unprobed => None,
            Verdict::Target(target) => Some(Ok(target.clone())),
            Verdict::Negative { reason, .. } => Some(Err(reason.clone())),
        };
        self.counters.snapshot(route)
    }
}
