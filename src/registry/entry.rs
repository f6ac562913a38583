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
//! Here: the entry's data, its generation and counters, reset and close. The decision a call
//! gets (the slow path of every call) is in `decision`; the types of the state in `state`; the
//! transitions (an outcome installed, a negative verdict, a connection's end) in `decide`;
//! running the checks and re-probing in `detect`; starting a daemon on a miss in `auto_start`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::ids::Ids;
use super::state::{State, Verdict};
use super::stats::{Counters, RouteStats};
use crate::config::Settings;
use crate::paths::DaemonPaths;
use crate::sync::lock;

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
