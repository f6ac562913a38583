//! One directory's route: an entry's state machine, whole.
//!
//! An entry holds a *verdict* for the whole process (not probed yet; a daemon target; or no
//! usable daemon since a moment) and, for each tokio runtime that calls, that runtime's own
//! [`Slot`]: its checks in flight, or its connection to the daemon. A connection and its
//! keepalive timers belong to the drivers of the runtime that made them, so a call never waits
//! on a connection that only another runtime would drive; the probe's result is shared, and
//! each runtime's checks run once for all its concurrent calls. Every change bumps the
//! generation, the one thing a warm call reads.
//!
//! The states change only here, under the entry's lock, on these events:
//! - a call asks for a decision ([`Entry::poll_decision`]): it gets this runtime's connection,
//!   runs the inline probe, routes by the negative verdict (and starts its re-probe when due),
//!   or starts this runtime's checks;
//! - a run of the checks ends ([`Entry::run_ended`]): its connection is installed, or the
//!   verdict turns negative;
//! - a connection ends ([`Entry::connection_ended`]): one that *finishes* (the daemon sent
//!   GOAWAY or closed it, it broke, or keepalive gave up on it) ends the daemon route for
//!   everyone at once; one dropped unfinished, because its runtime shut down, ends only that
//!   runtime's slot, and the next runtime connects again;
//! - a reset, or the release of the entry.
//!
//! The checks themselves run outside the lock, in `detect`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

use super::ids::{ConnectionId, DetectionId, Ids, ReprobeId, Run};
use super::runtimes;
use super::stats::{Counters, RouteStats};
use crate::config::{Mode, Settings};
use crate::connect::{DaemonConnection, Proof};
use crate::http2::{ConnectionTask, DaemonClient, EndCause};
use crate::lifecycle::{SpawnedChild, record_served};
use crate::paths::DaemonPaths;
use crate::probe::UdsTarget;
use crate::reason::FallbackReason;
use crate::sync::{Waiters, lock, warn_once};

/// One directory's route, shared process-wide.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(super) dir: PathBuf,
    pub(super) paths: DaemonPaths,
    /// Where the daemon makes its files (`<dir>/sockets`), whatever `paths` this client
    /// probes: what auto-start spawns, locks and records against.
    pub(super) daemon_paths: DaemonPaths,
    pub(super) settings: Settings,
    /// Bumped under `state`'s lock on every change.
    generation: AtomicU64,
    /// When a negative verdict is old enough to be checked again, in nanoseconds since
    /// `created` (`u64::MAX`: not while the verdict stands). A warm call compares the clock
    /// with it; the slow path compares the time itself.
    reprobe_at: AtomicU64,
    created: Instant,
    /// How many services use the entry; at zero it is released after the linger.
    pub(super) users: AtomicUsize,
    /// How many leases were ever taken: tells a release that the entry was taken again.
    pub(super) leases: AtomicU64,
    pub(super) ids: Ids,
    state: Mutex<State>,
    pub(super) counters: Counters,
}

/// The decision a call of a given runtime gets: the one vocabulary of a route.
#[derive(Debug, Clone)]
pub(crate) enum Decision {
    /// Calls go to the daemon over this runtime's checked connection.
    Daemon(DaemonRoute),
    /// Calls go to the in-process service (the entry's stats say why).
    InProcess,
    /// Mode `require` without a usable daemon: calls fail with `UNAVAILABLE` naming the reason.
    Unavailable(FallbackReason),
    /// A daemon is being started (here or by another process): calls wait for it, within the
    /// hand-off bound and their own deadline, in their response future.
    AwaitStart,
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

/// What a run of the checks found: a connection that passed every check, or why none did.
pub(super) type Outcome = Result<(ConnectionId, DaemonConnection), FallbackReason>;

/// How a run of the checks ended.
#[derive(Debug)]
pub(super) enum RunEnd {
    Finished(Outcome),
    /// Its task was dropped unfinished: its runtime shut down. Not the daemon's fault.
    Interrupted,
    /// Its task panicked: with the reason's text when the runtime lacks a driver.
    Panicked(Option<&'static str>),
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
        /// The task that drives the connection and its keepalive; closed, it goes once the
        /// calls in flight on it are done (a response its caller keeps open keeps it).
        task: ConnectionTask,
    },
}

impl Slot {
    /// Lets go of the slot: a connection closes, the calls waiting for checks are woken.
    fn close(self) {
        match self {
            Slot::Connecting { waiters, .. } => waiters.wake_all(),
            Slot::Connected { task, .. } => task.close(),
        }
    }
}

/// A re-probe on a task of the runtime that made the call that found it due.
#[derive(Debug)]
struct Reprobe {
    id: ReprobeId,
    runtime: tokio::runtime::Id,
    started: Instant,
    /// Calls that wait for it: a stalled one's calls of that runtime, and calls that wait for a
    /// daemon being started. See [`Entry::negative_route`].
    waiters: Waiters,
}

#[derive(Debug)]
pub(super) struct State {
    verdict: Verdict,
    /// A background re-probe in flight.
    reprobe: Option<Reprobe>,
    /// The first calls that wait while another call of the process probes, outside the lock.
    probing: Option<Waiters>,
    /// A daemon this process started on a miss, and when: until it serves (or the start
    /// timeout passes), re-probes come more often.
    pub(super) spawned: Option<(SpawnedChild, Instant)>,
    /// Until when calls wait for a daemon being started (the hand-off bound): set when this
    /// process starts one or finds a start pending, cleared when one serves or the start fails.
    pub(super) handoff: Option<Instant>,
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

/// A decision made, or a call left waiting for one.
type Decided = Poll<(u64, Decision)>;

/// What the inline probe leaves a call with.
enum Probed<'a> {
    Decided(Decided),
    /// Go on, under the same lock, with the target the probe found (none: not probed here, or
    /// an upgraded daemon that the checks' task restarts).
    Next(MutexGuard<'a, State>, Option<UdsTarget>),
    /// The verdict or this runtime's slot changed while the probe ran: decide again.
    Changed,
}

/// What a negative verdict leaves a call with.
enum Negative {
    /// The verdict is not negative, or mode `require` is due for checks a call waits for.
    No,
    Decided(Decided),
    /// Routed by the verdict, with a re-probe to start on this runtime.
    Reprobe(Handle, ReprobeId, Decided),
}

impl Entry {
    pub(super) fn new(dir: &Path, settings: Settings) -> Self {
        Self {
            dir: dir.to_owned(),
            paths: settings.paths(dir),
            daemon_paths: DaemonPaths::new(dir),
            settings,
            generation: AtomicU64::new(0),
            reprobe_at: AtomicU64::new(u64::MAX),
            created: Instant::now(),
            users: AtomicUsize::new(0),
            leases: AtomicU64::new(0),
            ids: Ids::default(),
            state: Mutex::new(State {
                verdict: Verdict::Unprobed,
                reprobe: None,
                probing: None,
                spawned: None,
                handoff: None,
                runtimes: Vec::new(),
            }),
            counters: Counters::default(),
        }
    }

    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a negative verdict may be old enough to be checked again.
    #[inline]
    pub(crate) fn reprobe_due(&self) -> bool {
        self.nanos(Instant::now()) >= self.reprobe_at.load(Ordering::Relaxed)
    }

    fn nanos(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.created).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX - 1)
    }

    /// The negative verdict given `since` is due to be checked again after the interval.
    fn schedule_reprobe(&self, state: &State, since: Instant) {
        let due = since + self.reprobe_interval(state);
        self.reprobe_at.store(self.nanos(due), Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn count_daemon_call(&self) {
        self.counters.daemon_calls.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn count_in_process_call(&self) {
        self.counters
            .in_process_calls
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_start_wait(&self) {
        self.counters.start_waits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_start_wait_gave_up(&self) {
        self.counters
            .start_waits_given_up
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A request the daemon never processed (never sent, above its GOAWAY's last stream, or
    /// refused) runs in-process.
    pub(crate) fn count_reroute(&self) {
        self.counters
            .in_process_calls
            .fetch_add(1, Ordering::Relaxed);
        self.counters.rerouted_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// An idempotent request whose connection broke before its answer runs again in-process:
    /// counted, and traced in a decision span of its own.
    pub(crate) fn count_rerun(&self, path: &str) {
        self.counters
            .in_process_calls
            .fetch_add(1, Ordering::Relaxed);
        self.counters.rerun_calls.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "local_daemon_decision",
            dir = %self.dir.display(),
            route = "in-process (re-run)",
            reason = FallbackReason::ConnectionLost.code(),
        );
        span.in_scope(|| {
            tracing::debug!(
                method = path,
                "the daemon connection broke before an answer; the idempotent call runs again in-process"
            );
        });
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets the decision, the connections, a daemon started here and the counters: the next
    /// call probes again.
    pub(crate) fn reset(&self) {
        let mut state = self.lock();
        state.close_all();
        state.verdict = Verdict::Unprobed;
        state.spawned = None;
        state.handoff = None;
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

    /// A negative decision for `reason`: in-process (or, while a daemon is being started, a
    /// wait for it), or refused in mode `require`. The one place that says what the mode means
    /// for a route.
    fn negative(&self, state: &State, reason: FallbackReason) -> Decision {
        match self.settings.mode {
            Mode::Require => Decision::Unavailable(reason),
            Mode::Auto if self.start_pending(state) => Decision::AwaitStart,
            Mode::Auto | Mode::Off => Decision::InProcess,
        }
    }

    /// The decision now, for a runtime without a connection of its own.
    fn current(&self, state: &State) -> Decision {
        match &state.verdict {
            Verdict::Negative { reason, .. } => self.negative(state, reason.clone()),
            _ => self.negative(state, FallbackReason::ConnectionLost),
        }
    }

    /// Whether calls wait for a daemon being started: mode `auto`, within the hand-off bound,
    /// and the daemon started here (if this process started it) has not exited.
    fn start_pending(&self, state: &State) -> bool {
        self.settings.mode == Mode::Auto
            && state.handoff.is_some_and(|until| Instant::now() < until)
            && state
                .spawned
                .as_ref()
                .is_none_or(|(child, _)| child.exit.get().is_none())
    }

    /// Ends a hand-off that is over: its bound passed, or the daemon started here exited. The
    /// calls then run in-process, by the reason it says.
    fn end_handoff(self: &Arc<Self>, state: &mut State) {
        let Some(until) = state.handoff else {
            return;
        };
        let child = state.spawned.as_ref().map(|(child, _)| child);
        let exited = child.is_some_and(|child| child.exit.get().is_some());
        let message = match child.and_then(|child| child.failed_start(&self.daemon_paths)) {
            Some(failure) => failure,
            None => {
                // One that exited lost the race to a daemon that holds the lock: the calls go
                // on waiting, for that one.
                if exited {
                    state.spawned = None;
                }
                if Instant::now() < until {
                    return;
                }
                "the daemon being started did not serve within the hand-off bound; calls run in-process until it does".to_owned()
            }
        };
        state.handoff = None;
        self.set_negative(state, FallbackReason::AutoStartFailed { message });
    }

    /// `decision` with the generation it holds for, read under the lock (once the lock is let
    /// go, an ending run can bump it, and a newer generation would keep a stale decision).
    fn decided(&self, _state: &State, decision: Decision) -> Decided {
        Poll::Ready((self.generation(), decision))
    }

    // ---- A call asks for a decision ----

    /// The decision for a call of the current runtime, and its generation, starting the checks
    /// where none is usable yet. The slow path of every call: the warm path compares
    /// generations and never gets here.
    pub(crate) fn poll_decision(self: &Arc<Self>, cx: &mut Context<'_>) -> Decided {
        let runtime = Handle::try_current().ok();
        let runtime = runtime.as_ref();
        let (mut state, probed) = loop {
            let mut state = self.lock();
            if let Some(decided) = self.own_connection(&mut state, runtime, cx) {
                return decided;
            }
            match self.inline_probe(state, runtime, cx) {
                Probed::Decided(decided) => return decided,
                Probed::Next(state, probed) => break (state, probed),
                Probed::Changed => {}
            }
        };
        match self.negative_route(&mut state, runtime, cx) {
            Negative::No => {}
            Negative::Decided(decided) => return decided,
            Negative::Reprobe(handle, id, decided) => {
                // Not under the lock: a closing runtime drops the task, whose guard takes it.
                drop(state);
                self.spawn_run(&handle, Run::Reprobe(id), None);
                return decided;
            }
        }
        self.start_detection(state, runtime, probed, cx)
    }

    /// Step 1: this runtime's connection, or its checks in flight (the call waits for them).
    fn own_connection(
        &self,
        state: &mut State,
        runtime: Option<&Handle>,
        cx: &mut Context<'_>,
    ) -> Option<Decided> {
        match state.slot(runtime?.id())? {
            Slot::Connected { route, .. } => {
                let decision = Decision::Daemon(route.clone());
                Some(self.decided(state, decision))
            }
            Slot::Connecting { waiters, .. } => {
                waiters.register(cx);
                Some(Poll::Pending)
            }
        }
    }

    /// Step 2: the first probe of the process, on the calling thread. It is cheap syscalls (and,
    /// with auto-start on, a miss starts the daemon: a fork and exec), so the common "no daemon"
    /// case decides without a task or a wake-up; outside the lock, so that a slow filesystem
    /// holds up this call only, while the other first calls wait for it.
    fn inline_probe<'a>(
        self: &'a Arc<Self>,
        mut state: MutexGuard<'a, State>,
        runtime: Option<&Handle>,
        cx: &mut Context<'_>,
    ) -> Probed<'a> {
        if !matches!(state.verdict, Verdict::Unprobed) || self.settings.mode != Mode::Auto {
            return Probed::Next(state, None);
        }
        if let Some(waiters) = &mut state.probing {
            waiters.register(cx);
            return Probed::Decided(Poll::Pending);
        }
        state.probing = Some(Waiters::default());
        drop(state);
        let result = {
            // Should the probe panic, the first calls waiting for it are not left waiting.
            let _unprobing = Unprobing(self);
            self.probe_or_start()
        };
        let mut state = self.lock();
        // Woken when this call's decision is made, whichever way: the guard is held till then.
        let _probing = state.probing.take();
        let changed = !matches!(state.verdict, Verdict::Unprobed)
            || runtime.is_some_and(|h| state.slot(h.id()).is_some());
        if changed {
            return Probed::Changed;
        }
        match result {
            Ok(target) => Probed::Next(state, Some(target)),
            // An upgraded daemon with auto-start on: the checks' task restarts it, and this
            // call waits for the old one to stop (then runs in-process).
            Err(FallbackReason::ExecutableReplaced) if self.settings.auto_start.is_some() => {
                Probed::Next(state, None)
            }
            Err(reason) => {
                self.set_negative(&mut state, reason);
                // A daemon started by this probe may have exited already: its failure is the
                // reason, not the miss that started it.
                self.end_handoff(&mut state);
                let decision = self.current(&state);
                Probed::Decided(self.decided(&state, decision))
            }
        }
    }

    /// Step 3: a negative verdict routes the call, and when its interval has passed, starts a
    /// re-probe in the background (mode `auto`) or lets the call wait for new checks (mode
    /// `require`, which has no other route).
    fn negative_route(
        self: &Arc<Self>,
        state: &mut State,
        runtime: Option<&Handle>,
        cx: &mut Context<'_>,
    ) -> Negative {
        if !matches!(state.verdict, Verdict::Negative { .. }) {
            return Negative::No;
        }
        self.end_handoff(state);
        let Verdict::Negative { reason, since } = &state.verdict else {
            return Negative::No;
        };
        let decision = self.negative(state, reason.clone());
        let since = *since;
        if let Some(reprobe) = &mut state.reprobe {
            // A re-probe that has run longer than the deadline is not being driven: its
            // runtime only runs tasks while a call of it waits (a one-thread runtime whose
            // calls never yield, or one that idles). A call of that runtime then waits for it,
            // which lets it run; another runtime starts its own.
            let stalled = reprobe.started.elapsed() > self.settings.deadline;
            let here = runtime.is_some_and(|h| h.id() == reprobe.runtime);
            if stalled && here {
                reprobe.waiters.register(cx);
                return Negative::Decided(Poll::Pending);
            }
            if !stalled || runtime.is_none() {
                // A call that waits for a daemon being started is woken as soon as the
                // re-probe ends, not at its next tick: the daemon may be serving.
                if matches!(decision, Decision::AwaitStart) {
                    reprobe.waiters.register(cx);
                }
                return Negative::Decided(self.decided(state, decision));
            }
            // Given up for one on this runtime: its waiting calls go on in-process.
            if let Some(stalled) = state.reprobe.take() {
                stalled.waiters.wake_all();
            }
        }
        if since.elapsed() < self.reprobe_interval(state) {
            self.schedule_reprobe(state, since);
            return Negative::Decided(self.decided(state, decision));
        }
        self.reprobe_at.store(u64::MAX, Ordering::Relaxed);
        if self.settings.mode != Mode::Auto {
            return Negative::No;
        }
        // In the background: this call and the next ones go on by the verdict (one that waits
        // for a daemon being started is woken when the re-probe ends).
        let awaits_start = matches!(decision, Decision::AwaitStart);
        let decided = self.decided(state, decision);
        let Some(handle) = runtime.filter(|h| runtimes::unusable(h).is_none()) else {
            return Negative::Decided(decided);
        };
        let id = self.ids.reprobe();
        state.reprobe = Some(Reprobe {
            id,
            runtime: handle.id(),
            started: Instant::now(),
            waiters: match awaits_start {
                true => Waiters::of(cx),
                false => Waiters::default(),
            },
        });
        Negative::Reprobe(handle.clone(), id, decided)
    }

    /// Step 4: this runtime's checks, on a task of the runtime; its calls wait for them.
    fn start_detection(
        self: &Arc<Self>,
        mut state: MutexGuard<'_, State>,
        runtime: Option<&Handle>,
        probed: Option<UdsTarget>,
        cx: &mut Context<'_>,
    ) -> Decided {
        let Some(handle) = runtime.filter(|h| runtimes::unusable(h).is_none()) else {
            return self.unusable_runtime(&mut state, runtime);
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
        self.spawn_run(handle, Run::Waited(id), probed);
        Poll::Pending
    }

    /// No runtime, or one learnt to lack a driver, cannot run the checks: this caller's
    /// problem, so another runtime's healthy connection stays.
    fn unusable_runtime(self: &Arc<Self>, state: &mut State, runtime: Option<&Handle>) -> Decided {
        let message = match runtime {
            None => "no Tokio runtime is running",
            Some(handle) => runtimes::unusable(handle).unwrap_or("the runtime is unusable"),
        };
        let reason = FallbackReason::RuntimeUnusable {
            message: message.into(),
        };
        let connected = state
            .runtimes
            .iter()
            .any(|(_, slot)| matches!(slot, Slot::Connected { .. }));
        if !connected {
            self.set_negative(state, reason.clone());
        }
        let decision = match connected {
            true => self.negative(state, reason),
            false => self.current(state),
        };
        self.decided(state, decision)
    }

    // ---- A run of the checks ends ----

    /// A run of the checks ended: its outcome is installed, unless a newer run or a reset
    /// superseded it.
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
            if let RunEnd::Finished(Ok((_, connection))) = end {
                connection.task.abort();
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
                self.reprobe_at.store(0, Ordering::Relaxed);
                self.bump();
            }
            RunEnd::Panicked(unusable) => {
                let reason = FallbackReason::RuntimeUnusable {
                    message: unusable.unwrap_or("the checks' task panicked").into(),
                };
                self.set_negative(&mut state, reason);
            }
        }
        drop(state);
        if let Some(waiters) = waiters {
            waiters.wake_all();
        }
    }

    /// Installs the outcome of a runtime's checks (its slot already taken out).
    fn install(self: &Arc<Self>, state: &mut State, runtime: tokio::runtime::Id, outcome: Outcome) {
        let (id, connection) = match outcome {
            // A connection that ended before this moment found nothing to end, and its signal
            // fires only once: it is checked here, under the lock `connection_ended` takes.
            Ok((_, connection)) if connection.end.has_fired() => {
                connection.task.abort();
                return self.set_negative(state, FallbackReason::ConnectionLost);
            }
            Ok(checked) => checked,
            Err(reason) => {
                return self.set_negative(state, reason);
            }
        };
        self.counters
            .connections_built
            .fetch_add(1, Ordering::Relaxed);
        let route = DaemonRoute {
            client: connection.client,
            pid: connection.target.pid,
            id,
            runtime,
        };
        self.trace_decision("daemon", None);
        let newly_served = !matches!(state.verdict, Verdict::Target(_));
        if self.settings.auto_start.is_some() && newly_served {
            state.spawned = None;
            state.handoff = None;
            // Only for a daemon that may have been started on a miss, once per verdict (not
            // per runtime), and not one that attested itself: a daemon of this crate marks its
            // record itself. A file write, so not under this lock: on a task of its own.
            let paths = self.daemon_paths.clone();
            if let (Ok(handle), Proof::HealthCheck) = (Handle::try_current(), connection.proof) {
                handle.spawn_blocking(move || record_served(&paths));
            }
        }
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

    /// No usable daemon, for every runtime: connections close, and a re-probe is scheduled.
    fn set_negative(self: &Arc<Self>, state: &mut State, reason: FallbackReason) {
        // A miss does not replace the failure of the start it followed: a re-probe that began
        // while the daemon was coming can end after the call that saw the daemon exit.
        let reason = match &state.verdict {
            Verdict::Negative {
                reason: failed @ FallbackReason::AutoStartFailed { .. },
                ..
            } if reason.is_loading() && state.spawned.is_some() => failed.clone(),
            _ => reason,
        };
        self.counters.count_fallback(&reason);
        warn_misconfiguration_once(&reason);
        let route = match self.settings.mode {
            Mode::Require => "refused",
            _ => "in-process",
        };
        self.trace_decision(route, Some(&reason));
        state.close_all();
        let since = Instant::now();
        state.verdict = Verdict::Negative { reason, since };
        self.schedule_reprobe(state, since);
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

    // ---- A connection ends ----

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
            EndCause::Daemon | EndCause::Unresponsive => {
                tracing::info!(
                    dir = %self.dir.display(),
                    ?cause,
                    "local daemon connection ended; calls run in-process"
                );
                self.set_negative(&mut state, FallbackReason::ConnectionLost);
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

    // ---- Re-probe timing ----

    /// How long a negative decision stands: a few milliseconds while calls wait for a daemon
    /// being started, shorter than usual while one started here is coming.
    fn reprobe_interval(&self, state: &State) -> Duration {
        if self.start_pending(state) {
            return self.settings.reprobe_interval.min(HANDOFF_TICK);
        }
        let coming = |(child, at): &(SpawnedChild, Instant)| {
            child.exit.get().is_none()
                && self
                    .settings
                    .auto_start
                    .as_ref()
                    .is_some_and(|auto| at.elapsed() < auto.start_timeout)
        };
        match state.spawned.as_ref().is_some_and(coming) {
            true => self
                .settings
                .reprobe_interval
                .min(Duration::from_millis(50)),
            false => self.settings.reprobe_interval,
        }
    }
}

/// How often a daemon being started is looked for while calls wait for it: a daemon serves a
/// few milliseconds after its exec, and a look while it loads is a `stat` and a failed `open`
/// (a few microseconds each millisecond). A waiting call is also woken when a look ends.
pub(crate) const HANDOFF_TICK: Duration = Duration::from_millis(1);

/// Clears the probing flag if the inline probe panics, so the first calls waiting for it are
/// not left waiting (they are woken when their waiters drop).
struct Unprobing<'a>(&'a Entry);

impl Drop for Unprobing<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            drop(self.0.lock().probing.take());
        }
    }
}

/// Logs a configuration error (a wrong pidfile marker) once per process: with no subscriber's
/// `debug` on, it would otherwise look like a daemon that is not there. `RouteStats` and the
/// `diagnose` report show it too.
fn warn_misconfiguration_once(reason: &FallbackReason) {
    if reason.is_misconfiguration() {
        warn_once(&format!(
            "local daemon misconfigured: {reason}: {}",
            reason.remedy()
        ));
    }
}
