//! The process-wide cache of routes: one entry per directory and settings, shared by every
//! service that wears a layer with those settings.
//!
//! An entry runs the checks once for all concurrent first calls (single flight), caches the
//! decision, positive or negative, and changes it only when something happens: the daemon's
//! connection ends, a re-probe finds a daemon, or the entry is reset. Every change bumps the
//! entry's generation, which is the one thing a warm call reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Mode, Settings};
use crate::connect::{ConnectionEnd, EndCause, LocalDaemonChannel, establish};
use crate::paths::{DaemonPaths, DirIdentity};
use crate::probe::{UdsTarget, probe_paths};
use crate::reason::FallbackReason;
use crate::sync::{Waiters, lock};

type Key = (DirIdentity, Settings);

fn entries() -> MutexGuard<'static, HashMap<Key, Arc<Entry>>> {
    static ENTRIES: OnceLock<Mutex<HashMap<Key, Arc<Entry>>>> = OnceLock::new();
    lock(ENTRIES.get_or_init(Default::default))
}

/// The entry for a directory and settings, created on first use.
///
/// An entry found under the same identity is reused only while the directory it was made for
/// still has that identity: a deleted directory's inode can be reused by a new one.
pub(crate) fn entry_for(dir: &Path, settings: &Settings) -> Arc<Entry> {
    let identity = DirIdentity::of(dir);
    let key = (identity.clone(), settings.clone());
    let mut entries = entries();
    if let Some(entry) = entries.get(&key)
        && (entry.dir == dir || DirIdentity::of(&entry.dir) == identity)
    {
        return entry.clone();
    }
    let entry = Arc::new(Entry::new(dir, settings.clone()));
    entries.insert(key, entry.clone());
    entry
}

/// Resets every entry for this directory, whatever its settings: the next call probes again.
///
/// ```
/// tower_local_daemon::reset("/no/such/repo/.heddle");
/// ```
pub fn reset(heddle_dir: impl AsRef<Path>) {
    let dir = heddle_dir.as_ref();
    let identity = DirIdentity::of(dir);
    let matching: Vec<Arc<Entry>> = entries()
        .iter()
        .filter(|((id, _), entry)| *id == identity || entry.dir == dir)
        .map(|(_, entry)| entry.clone())
        .collect();
    for entry in matching {
        entry.reset();
    }
}

/// The one vocabulary of a route: what an entry decided for the calls of its services.
#[derive(Debug, Clone)]
pub(crate) enum Decision {
    /// Calls go to the daemon over this checked connection.
    Daemon(DaemonRoute),
    /// Calls go to the in-process service, for this reason.
    InProcess(FallbackReason),
    /// Mode `require` without a usable daemon: calls fail with `UNAVAILABLE` naming the reason.
    Refused(FallbackReason),
}

/// A checked daemon connection, as the services of an entry use it.
#[derive(Debug, Clone)]
pub(crate) struct DaemonRoute {
    pub(crate) channel: LocalDaemonChannel,
    /// Tells this connection's end signal apart from a later connection's.
    pub(crate) id: ConnectionId,
    /// The connection's end signal: checked again when the decision is installed.
    end: ConnectionEnd,
}

impl Decision {
    /// What [`RouteStats::route`] shows of it.
    fn summary(&self) -> Result<UdsTarget, FallbackReason> {
        match self {
            Self::Daemon(route) => Ok(route.channel.target.clone()),
            Self::InProcess(reason) | Self::Refused(reason) => Err(reason.clone()),
        }
    }
}

/// A detection that callers wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DetectionId(u64);

/// A re-probe in the background, which no caller waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReprobeId(u64);

/// One checked daemon connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionId(u64);

/// A run of the checks: one that callers wait for, or a re-probe in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Waited(DetectionId),
    Reprobe(ReprobeId),
}

#[derive(Debug)]
enum State {
    Unprobed,
    /// Callers wait for this detection's result.
    Detecting {
        id: DetectionId,
        waiters: Waiters,
    },
    /// `reprobe` is a background re-probe in flight.
    Decided {
        decision: Decision,
        reprobe: Option<ReprobeId>,
    },
}

impl State {
    /// The run whose end installs the next decision.
    fn current_run(&self) -> Option<Run> {
        match self {
            Self::Detecting { id, .. } => Some(Run::Waited(*id)),
            Self::Decided { reprobe, .. } => reprobe.map(Run::Reprobe),
            Self::Unprobed => None,
        }
    }
}

/// Hands out each kind of id from its own counter.
#[derive(Debug, Default)]
struct Ids {
    detections: AtomicU64,
    reprobes: AtomicU64,
    connections: AtomicU64,
}

impl Ids {
    fn detection(&self) -> DetectionId {
        DetectionId(self.detections.fetch_add(1, Ordering::Relaxed))
    }
    fn reprobe(&self) -> ReprobeId {
        ReprobeId(self.reprobes.fetch_add(1, Ordering::Relaxed))
    }
    fn connection(&self) -> ConnectionId {
        ConnectionId(self.connections.fetch_add(1, Ordering::Relaxed))
    }
}

/// Installs a run's decision when its task ends, however it ends.
struct FinishDetection {
    entry: Arc<Entry>,
    run: Run,
    decision: Option<Decision>,
}

impl Drop for FinishDetection {
    fn drop(&mut self) {
        let decision = self.decision.take().unwrap_or_else(|| {
            self.entry.negative(FallbackReason::RuntimeUnusable {
                message: "the checks' task stopped before it finished: a runtime without the \
                              time driver (enable it with `enable_all` or `enable_time`), or a \
                              runtime that shut down"
                    .into(),
            })
        });
        let mut state = self.entry.lock();
        if state.current_run() == Some(self.run) {
            self.entry.decide(&mut state, decision);
        }
    }
}

/// The diagnostic counters of one entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteStats {
    /// How many times the checks ran (first detection and re-probes).
    pub probes: u64,
    /// How many channels passed every check.
    pub channels_built: u64,
    /// Calls sent to the daemon.
    pub daemon_calls: u64,
    /// Calls served in-process.
    pub in_process_calls: u64,
    /// Decisions to run in-process, per reason (a decision, not a call).
    pub fallbacks: Vec<(FallbackReason, u64)>,
    /// The current decision: the daemon's target, or the reason calls run in-process; `None`
    /// before the first decision.
    pub route: Option<Result<UdsTarget, FallbackReason>>,
}

/// Kept on cache lines of their own: every call writes one of them, and every warm call reads
/// the entry's generation, which must not share a line with them.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Counters {
    probes: AtomicU64,
    channels_built: AtomicU64,
    daemon_calls: AtomicU64,
    in_process_calls: AtomicU64,
    fallbacks: Mutex<Vec<(FallbackReason, u64)>>,
}

/// One directory's route, shared process-wide.
#[derive(Debug)]
pub(crate) struct Entry {
    dir: PathBuf,
    paths: DaemonPaths,
    settings: Settings,
    /// Bumped under `state`'s lock on every change of decision.
    generation: AtomicU64,
    /// Set by a timer once a negative decision is old enough to be checked again.
    reprobe_due: AtomicBool,
    ids: Ids,
    state: Mutex<State>,
    counters: Counters,
}

impl Entry {
    fn new(dir: &Path, settings: Settings) -> Self {
        Self {
            dir: dir.to_owned(),
            paths: settings.paths(dir),
            settings,
            generation: AtomicU64::new(0),
            reprobe_due: AtomicBool::new(false),
            ids: Ids::default(),
            state: Mutex::new(State::Unprobed),
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
        self.counters.daemon_calls.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_in_process_call(&self) {
        self.counters
            .in_process_calls
            .fetch_add(1, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A negative decision for `reason`: in-process, or refused in mode `require`. The one place
    /// that says what the mode means for a route.
    fn negative(&self, reason: FallbackReason) -> Decision {
        match self.settings.mode {
            Mode::Require => Decision::Refused(reason),
            Mode::Auto | Mode::Off => Decision::InProcess(reason),
        }
    }

    /// The current decision and its generation, starting the checks where none is usable yet.
    /// The slow path of every call: the warm path compares generations and never gets here.
    pub(crate) fn poll_decision(self: &Arc<Self>, cx: &mut Context<'_>) -> Poll<(u64, Decision)> {
        let mut state = self.lock();
        let mut detection = None;
        match &mut *state {
            State::Unprobed if self.settings.mode == Mode::Auto => {
                // The pidfile and process checks are cheap syscalls: run them here, so that the
                // common "no daemon" case decides without a task or a wake-up.
                let start = Instant::now();
                match self.probe() {
                    Ok(target) => {
                        let probed = (target, start.elapsed());
                        detection = Some(self.wait_for_detection(&mut state, Some(probed), cx));
                    }
                    Err(reason) => {
                        let decision = self.negative(reason);
                        self.decide(&mut state, decision);
                    }
                }
            }
            State::Unprobed => detection = Some(self.wait_for_detection(&mut state, None, cx)),
            State::Detecting { waiters, .. } => waiters.register(cx),
            State::Decided {
                decision: Decision::InProcess(_) | Decision::Refused(_),
                reprobe,
            } if reprobe.is_none() && self.reprobe_due.swap(false, Ordering::AcqRel) => {
                if self.settings.mode == Mode::Auto {
                    // In the background: this call and the next ones go on in-process.
                    let id = self.ids.reprobe();
                    *reprobe = Some(id);
                    detection = Some((Run::Reprobe(id), None));
                } else {
                    detection = Some(self.wait_for_detection(&mut state, None, cx));
                }
            }
            State::Decided { .. } => {}
        }
        let ready = match &*state {
            State::Decided { decision, .. } => Some((self.generation(), decision.clone())),
            _ => None,
        };
        drop(state);
        if let Some((id, probed)) = detection {
            self.spawn_detection(id, probed);
        }
        match ready {
            Some(ready) => Poll::Ready(ready),
            None => Poll::Pending,
        }
    }

    fn probe(&self) -> Result<UdsTarget, FallbackReason> {
        self.counters.probes.fetch_add(1, Ordering::Relaxed);
        let probed = probe_paths(&self.paths, &self.settings.identity);
        probed.into_target().inspect_err(|reason| {
            tracing::debug!(dir = %self.dir.display(), %reason, "local daemon probe");
        })
    }

    /// Marks a detection that callers wait for; the caller spawns it once the lock is released.
    fn wait_for_detection(
        &self,
        state: &mut State,
        probed: Option<(UdsTarget, Duration)>,
        cx: &mut Context<'_>,
    ) -> (Run, Option<(UdsTarget, Duration)>) {
        let id = self.ids.detection();
        *state = State::Detecting {
            id,
            waiters: Waiters::of(cx),
        };
        (Run::Waited(id), probed)
    }

    /// Runs the checks on a task of their own, so that a caller that gives up does not cancel
    /// the work every other waiter shares. `probed` is given when the probe already ran. Called
    /// without the state lock: the task's end takes it.
    fn spawn_detection(self: &Arc<Self>, run: Run, probed: Option<(UdsTarget, Duration)>) {
        // Whatever happens to the task (a panic, or its runtime shutting down), whoever waits
        // for this detection gets a decision.
        let mut finish = FinishDetection {
            entry: self.clone(),
            run,
            decision: None,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            finish.decision = Some(self.negative(FallbackReason::RuntimeUnusable {
                message: "no Tokio runtime is running".into(),
            }));
            return;
        };
        runtime.spawn(async move {
            let mut finish = finish;
            finish.decision = Some(finish.entry.detect(probed).await);
        });
    }

    /// The whole chain: probe (unless done), connect, peer check, channel, health. In require
    /// mode it tries again until the deadline, which bounds the whole wait; the decision names
    /// the reason of the last attempt.
    async fn detect(self: &Arc<Self>, mut probed: Option<(UdsTarget, Duration)>) -> Decision {
        let deadline = Instant::now().checked_add(self.settings.deadline);
        loop {
            let attempt = self.attempt(probed.take());
            // An attempt that hangs past the deadline ends there: the deadline is the whole wait.
            let result = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, attempt)
                    .await
                    .unwrap_or(Err(FallbackReason::DeadlineExceeded)),
                None => attempt.await,
            };
            let reason = match result {
                Ok(decision) => return decision,
                Err(reason) => reason,
            };
            let remaining =
                deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
            if self.settings.mode != Mode::Require || remaining == Some(Duration::ZERO) {
                return self.negative(reason);
            }
            let pause = Duration::from_millis(20);
            tokio::time::sleep(remaining.map_or(pause, |remaining| remaining.min(pause))).await;
        }
    }

    /// One run of the chain.
    async fn attempt(
        self: &Arc<Self>,
        probed: Option<(UdsTarget, Duration)>,
    ) -> Result<Decision, FallbackReason> {
        let (target, probe_time) = match probed {
            Some((target, probe_time)) => (target, probe_time),
            None => {
                let probe_start = Instant::now();
                (self.probe()?, probe_start.elapsed())
            }
        };
        let id = self.ids.connection();
        let on_end = self.connection_end(id);
        let established = establish(target, &self.dir, &self.settings, on_end.clone()).await;
        tracing::debug!(
            dir = %self.dir.display(),
            outcome = ?established.result.as_ref().map(|c| c.target.pid),
            probe_us = probe_time.as_micros() as u64,
            connect_us = established.timings.connect.as_micros() as u64,
            handshake_us = established.timings.handshake.as_micros() as u64,
            "local daemon detection"
        );
        established.result.map(|channel| {
            Decision::Daemon(DaemonRoute {
                channel,
                id,
                end: on_end,
            })
        })
    }

    fn connection_end(self: &Arc<Self>, id: ConnectionId) -> ConnectionEnd {
        let entry: Weak<Self> = Arc::downgrade(self);
        ConnectionEnd::new(move |cause| {
            if let Some(entry) = entry.upgrade() {
                entry.connection_lost(id, cause);
            }
        })
    }

    /// The daemon connection `id` ended: calls go in-process from now on.
    pub(crate) fn connection_lost(self: &Arc<Self>, id: ConnectionId, cause: EndCause) {
        let mut state = self.lock();
        if let State::Decided {
            decision: Decision::Daemon(route),
            ..
        } = &*state
            && route.id == id
        {
            match cause {
                EndCause::Daemon => tracing::info!(
                    dir = %self.dir.display(),
                    "local daemon connection ended; calls run in-process"
                ),
                EndCause::Dropped => tracing::debug!(
                    dir = %self.dir.display(),
                    "local daemon connection dropped; calls run in-process"
                ),
            }
            let decision = self.negative(FallbackReason::ConnectionLost);
            self.decide(&mut state, decision);
        }
    }

    /// Installs a decision, wakes whoever waited, and schedules a re-probe if it is negative.
    fn decide(self: &Arc<Self>, state: &mut State, mut decision: Decision) {
        // A connection that ended before this moment found no daemon decision to end, and its
        // signal fires only once: it is checked here, under the same lock `connection_lost`
        // takes after the flag is set.
        if let Decision::Daemon(route) = &decision
            && route.end.has_fired()
        {
            decision = self.negative(FallbackReason::ConnectionLost);
        }
        match &decision {
            Decision::Daemon(_) => {
                self.counters.channels_built.fetch_add(1, Ordering::Relaxed);
            }
            Decision::InProcess(reason) | Decision::Refused(reason) => {
                let mut fallbacks = lock(&self.counters.fallbacks);
                match fallbacks.iter_mut().find(|(r, _)| r == reason) {
                    Some((_, n)) => *n += 1,
                    None => fallbacks.push((reason.clone(), 1)),
                }
                drop(fallbacks);
                self.schedule_reprobe();
            }
        }
        let previous = std::mem::replace(
            state,
            State::Decided {
                decision,
                reprobe: None,
            },
        );
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let State::Detecting { waiters, .. } = previous {
            waiters.wake_all();
        }
    }

    fn schedule_reprobe(self: &Arc<Self>) {
        self.reprobe_due.store(false, Ordering::Release);
        // Sets the flag when the interval has passed, or when the timer's runtime goes away
        // first, so that an entry never stays negative for good. Not when the timer panicked
        // (a runtime without the time driver): a due flag set at once would re-probe forever.
        struct SetOnDrop(Weak<Entry>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                if let Some(entry) = self.0.upgrade()
                    && !std::thread::panicking()
                {
                    entry.reprobe_due.store(true, Ordering::Release);
                }
            }
        }
        let guard = SetOnDrop(Arc::downgrade(self));
        let interval = self.settings.reprobe_interval;
        // Without a runtime nothing can re-probe: the decision stands until `reset`.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                tokio::time::sleep(interval).await;
                drop(guard);
            });
        }
    }

    /// Forgets the decision and the counters: the next call probes again.
    pub(crate) fn reset(self: &Arc<Self>) {
        let mut state = self.lock();
        let previous = std::mem::replace(&mut *state, State::Unprobed);
        self.generation.fetch_add(1, Ordering::AcqRel);
        for counter in [
            &self.counters.probes,
            &self.counters.channels_built,
            &self.counters.daemon_calls,
            &self.counters.in_process_calls,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        lock(&self.counters.fallbacks).clear();
        if let State::Detecting { waiters, .. } = previous {
            waiters.wake_all();
        }
    }

    pub(crate) fn stats(&self) -> RouteStats {
        let route = match &*self.lock() {
            State::Decided { decision, .. } => Some(decision.summary()),
            _ => None,
        };
        RouteStats {
            probes: self.counters.probes.load(Ordering::Relaxed),
            channels_built: self.counters.channels_built.load(Ordering::Relaxed),
            daemon_calls: self.counters.daemon_calls.load(Ordering::Relaxed),
            in_process_calls: self.counters.in_process_calls.load(Ordering::Relaxed),
            fallbacks: lock(&self.counters.fallbacks).clone(),
            route,
        }
    }
}
