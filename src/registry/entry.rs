//! One directory's route: an entry's state machine.
//!
//! An entry holds a *verdict* for the whole process (not probed yet; a daemon target; or no
//! usable daemon since a moment) and, for each tokio runtime that calls, that runtime's own
//! connection to the daemon. A connection and its keepalive timers belong to the drivers of
//! the runtime that made them, so a call never waits on a connection that only another
//! runtime would drive; the probe's result is shared, and each runtime's checks run once for
//! all its concurrent calls. Every change bumps the generation, the one thing a warm call reads.
//!
//! A connection that *finishes* (the daemon sent GOAWAY or closed it, it broke, or keepalive
//! gave up on it) ends the daemon route for everyone at once. One dropped unfinished, because
//! its runtime shut down, ends only that runtime's connection: the next runtime connects again.
//!
//! The types of the state are in `state`; the transitions (an outcome installed, a negative
//! verdict, a connection's end) in `decide`; running the checks and re-probing in `detect`;
//! starting a daemon on a miss in `auto_start`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::runtime::Handle;
use tokio::time::Instant;

use super::detect::time_driver_available;
use super::ids::{ConnectionId, Ids, Run};
use super::state::{Reprobe, Slot, State, Verdict};
use super::stats::{Counters, RouteStats};
use crate::config::{Mode, Settings};
use crate::connect::DaemonClient;
use crate::paths::DaemonPaths;
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
    /// Set once a negative verdict may be old enough to be checked again; the slow path
    /// compares the time itself.
    pub(super) reprobe_due: AtomicBool,
    /// How many services use the entry; at zero it is released after the linger.
    pub(super) users: AtomicUsize,
    /// How many leases were ever taken: tells a release that the entry was taken again.
    pub(super) leases: AtomicU64,
    pub(super) ids: Ids,
    state: Mutex<State>,
    pub(super) counters: Counters,
}

impl Entry {
    pub(super) fn new(dir: &Path, settings: Settings) -> Self {
        Self {
            dir: dir.to_owned(),
            paths: settings.paths(dir),
            daemon_paths: DaemonPaths::new(dir),
            settings,
            generation: AtomicU64::new(0),
            reprobe_due: AtomicBool::new(false),
            users: AtomicUsize::new(0),
            leases: AtomicU64::new(0),
            ids: Ids::default(),
            state: Mutex::new(State {
                verdict: Verdict::Unprobed,
                reprobe: None,
                timers: Vec::new(),
                probing: None,
                spawned: None,
                runtimes: Vec::new(),
            }),
            counters: Counters::default(),
        }
    }

    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    #[inline]
    pub(crate) fn reprobe_due(&self) -> bool {
        self.reprobe_due.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn count_daemon_call(&self) {
        self.counters.daemon_calls.add_one();
    }

    #[inline]
    pub(crate) fn count_in_process_call(&self) {
        self.counters.in_process_calls.add_one();
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(super) fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A negative decision for `reason`: in-process, or refused in mode `require`. The one place
    /// that says what the mode means for a route.
    pub(super) fn negative(&self, reason: FallbackReason) -> Decision {
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
        if matches!(state.verdict, Verdict::Unprobed) && self.settings.mode == Mode::Auto {
            // The probe is cheap syscalls: run it here, so that the common "no daemon" case
            // decides without a task or a wake-up; outside the lock, so that a slow filesystem
            // holds up this call only, while the other first calls wait for it.
            if let Some(waiters) = &mut state.probing {
                waiters.register(cx);
                return Poll::Pending;
            }
            state.probing = Some(Waiters::default());
            drop(state);
            // Should the probe panic, the first calls waiting for it are not left waiting.
            struct Unprobing<'a>(&'a Entry);
            impl Drop for Unprobing<'_> {
                fn drop(&mut self) {
                    if std::thread::panicking() {
                        drop(self.0.lock().probing.take());
                    }
                }
            }
            let unprobing = Unprobing(self);
            let result = self.probe_or_start();
            drop(unprobing);
            state = self.lock();
            // Woken when this decision is made, whichever way.
            let _probing = state.probing.take();
            let changed = !matches!(state.verdict, Verdict::Unprobed)
                || runtime
                    .as_ref()
                    .is_some_and(|h| state.slot(h.id()).is_some());
            if changed {
                drop(state);
                return self.poll_decision(cx);
            }
            match result {
                Ok(target) => probed = Some(target),
                // An upgraded daemon with auto-start on: the checks' task restarts it, and this
                // call waits for the old one to stop (then runs in-process).
                Err(FallbackReason::ExecutableReplaced) if self.settings.auto_start.is_some() => {}
                Err(reason) => {
                    self.set_negative(&mut state, reason, runtime.as_ref());
                    return Poll::Ready((self.generation(), self.current(&state)));
                }
            }
        }
        if let Verdict::Negative { reason, since } = &state.verdict {
            {
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
                    // Given up for one on this runtime: its waiting calls go on in-process.
                    if let Some(stalled) = state.reprobe.take() {
                        stalled.waiters.wake_all();
                    }
                }
                if since.elapsed() < self.reprobe_interval(&state) {
                    self.arm_timer(&mut state, runtime.as_ref());
                    return Poll::Ready((self.generation(), decision));
                }
                self.reprobe_due.store(false, Ordering::Relaxed);
                if self.settings.mode == Mode::Auto {
                    // In the background: this call and the next ones go on in-process.
                    let generation = self.generation();
                    if let Some(handle) = runtime.filter(time_driver_available) {
                        let id = self.ids.reprobe();
                        state.reprobe = Some(Reprobe {
                            id,
                            runtime: handle.id(),
                            started: Instant::now(),
                            waiters: Waiters::default(),
                        });
                        // Not under the lock: a closing runtime drops the task, and its guard
                        // takes the lock.
                        drop(state);
                        self.spawn_run(&handle, Run::Reprobe(id), None);
                    }
                    return Poll::Ready((generation, decision));
                }
            }
        }
        // This runtime's calls wait for its checks, which run on a task of the runtime.
        let Some(handle) = runtime.clone().filter(time_driver_available) else {
            let message = match runtime {
                None => "no Tokio runtime is running",
                Some(_) => {
                    "the runtime has no time driver (enable it with `enable_all` or `enable_time`)"
                }
            };
            let reason = FallbackReason::RuntimeUnusable {
                message: message.into(),
            };
            // This caller's problem: another runtime's healthy connection stays.
            let connected = state
                .runtimes
                .iter()
                .any(|(_, slot)| matches!(slot, Slot::Connected { .. }));
            if connected {
                return Poll::Ready((self.generation(), self.negative(reason)));
            }
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

    /// The decision now, for a runtime without a connection of its own.
    pub(super) fn current(&self, state: &State) -> Decision {
        match &state.verdict {
            Verdict::Negative { reason, .. } => self.negative(reason.clone()),
            _ => self.negative(FallbackReason::ConnectionLost),
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
