//! The ids of an entry's runs and connections, each kind its own type from its own counter:
//! a detection's end is never taken for a re-probe's, nor one connection's for another's.

use std::sync::atomic::{AtomicU64, Ordering};

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
