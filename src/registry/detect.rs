//! Running the checks: on a task of the calling runtime, so that a call that gives up does not
//! stop the work the other calls wait for, and a guard that ends every run, however its task
//! ends.

use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::connect::{ConnectionEnd, DaemonConnection};
use crate::reason::FallbackReason;

use super::entry::Entry;

/// A connection that passed every check, with its id and its end signal.
#[derive(Debug)]
pub(super) struct Checked {
    pub(super) connection: DaemonConnection,
    pub(super) id: ConnectionId,
    pub(super) end: ConnectionEnd,
}

/// What a run of the checks ends with.
pub(super) type Outcome = Result<Checked, FallbackReason>;

/// A detection that the calls of one runtime wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DetectionId(u64);

/// A re-probe in the background, which no call waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ReprobeId(u64);

/// One checked daemon connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionId(u64);

/// A run of the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Run {
    Waited(DetectionId),
    Reprobe(ReprobeId),
}

/// Hands out each kind of id from its own counter.
#[derive(Debug, Default)]
pub(super) struct Ids {
    detections: AtomicU64,
    reprobes: AtomicU64,
    connections: AtomicU64,
}

impl Ids {
    pub(super) fn detection(&self) -> DetectionId {
        DetectionId(self.detections.fetch_add(1, Ordering::Relaxed))
    }
    pub(super) fn reprobe(&self) -> ReprobeId {
        ReprobeId(self.reprobes.fetch_add(1, Ordering::Relaxed))
    }
    pub(super) fn connection(&self) -> ConnectionId {
        ConnectionId(self.connections.fetch_add(1, Ordering::Relaxed))
    }
}

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
    pub(super) outcome: Option<Outcome>,
}

impl Drop for FinishRun {
    fn drop(&mut self) {
        let end = match self.outcome.take() {
            Some(outcome) => RunEnd::Finished(outcome),
            None if std::thread::panicking() => RunEnd::Panicked,
            None => RunEnd::Interrupted,
        };
        if let Some(entry) = self.entry.upgrade() {
            entry.run_ended(self.run, self.runtime, end);
        }
    }
}

/// Whether the current runtime has a time driver: the checks' deadline needs one. Creating a
/// timer on a runtime without it panics inside tokio, which prints its own message.
pub(super) fn time_driver_available() -> bool {
    std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO))).is_ok()
}
