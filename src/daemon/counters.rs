//! [`DaemonCounters`]: what a running daemon counts, for its owner and for the idle exit.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of a running daemon, shared with whoever holds
/// [`BoundDaemon::counters`](super::BoundDaemon::counters).
#[derive(Debug, Default)]
pub struct DaemonCounters {
    pub(super) refused_peers: AtomicU64,
    pub(super) calls: AtomicU64,
    pub(super) in_flight: AtomicU64,
}

impl DaemonCounters {
    /// Connections dropped because their peer runs as another uid (or is unknown).
    pub fn refused_peers(&self) -> u64 {
        self.refused_peers.load(Ordering::Relaxed)
    }

    /// Calls received, health checks included.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Calls whose response has not finished.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}
