//! The decision a call gets from its entry ([`Decision`]), and the slow path that finds it
//! ([`Entry::poll_decision`]): a connection of the calling runtime, the checks started or
//! joined, or a negative verdict (re-probed when due).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::runtime::Handle;
use tokio::time::Instant;

use super::detect::time_driver_available;
use super::entry::Entry;
use super::ids::{ConnectionId, Run};
use super::state::{Reprobe, Slot, State, Verdict};
use crate::config::Mode;
use crate::connect::DaemonClient;
use crate::reason::FallbackReason;
use crate::sync::Waiters;

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

impl Entry {
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
            // The probe is cheap syscalls (and, with auto-start on, a miss starts the daemon:
            // a fork and exec): run it here, so that the common "no daemon" case decides
            // without a task or a wake-up; outside the lock, so that a slow filesystem holds up
            // this call only, while the other first calls wait for it.
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
}
