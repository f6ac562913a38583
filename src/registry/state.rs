//! What an entry holds: the process-wide verdict, each runtime's connection, the re-probe in
//! flight and the timers armed for it.

use tokio::time::Instant;

use super::decision::DaemonRoute;
use super::ids::{DetectionId, ReprobeId};
use crate::connect::ConnectionTask;
use crate::lifecycle::SpawnedChild;
use crate::probe::UdsTarget;
use crate::reason::FallbackReason;
use crate::sync::Waiters;

/// What the whole process knows of the daemon.
#[derive(Debug)]
pub(super) enum Verdict {
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
pub(super) enum Slot {
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
    pub(super) fn close(self) {
        match self {
            Slot::Connecting { waiters, .. } => waiters.wake_all(),
            Slot::Connected { task, .. } => task.close(),
        }
    }
}

/// A re-probe on a task of the runtime that made the call that found it due.
#[derive(Debug)]
pub(super) struct Reprobe {
    pub(super) id: ReprobeId,
    pub(super) runtime: tokio::runtime::Id,
    pub(super) started: Instant,
    /// Calls of that runtime that wait for it: see [`Entry::poll_decision`].
    pub(super) waiters: Waiters,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) verdict: Verdict,
    /// A background re-probe in flight.
    pub(super) reprobe: Option<Reprobe>,
    /// The runtimes with a timer armed for the negative verdict's re-probe.
    pub(super) timers: Vec<tokio::runtime::Id>,
    /// The first calls that wait while another call of the process probes, outside the lock.
    pub(super) probing: Option<Waiters>,
    /// A daemon this process started on a miss, and when: until it serves (or the start
    /// timeout passes), re-probes come more often.
    pub(super) spawned: Option<(SpawnedChild, Instant)>,
    pub(super) runtimes: Vec<(tokio::runtime::Id, Slot)>,
}

impl State {
    pub(super) fn slot(&mut self, runtime: tokio::runtime::Id) -> Option<&mut Slot> {
        self.runtimes
            .iter_mut()
            .find(|(id, _)| *id == runtime)
            .map(|(_, slot)| slot)
    }

    pub(super) fn take_slot(&mut self, runtime: tokio::runtime::Id) -> Option<Slot> {
        let index = self.runtimes.iter().position(|(id, _)| *id == runtime)?;
        Some(self.runtimes.swap_remove(index).1)
    }

    pub(super) fn close_all(&mut self) {
        for (_, slot) in self.runtimes.drain(..) {
            slot.close();
        }
        if let Some(reprobe) = self.reprobe.take() {
            reprobe.waiters.wake_all();
        }
    }
}
