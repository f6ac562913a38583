//! What the attempt record ([`SpawnRecord`]) says of a pending start and of the backoff.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::process::{self, exited};
use crate::spawn_record::SpawnRecord;

/// The longest backoff between two starts whose daemons never served.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

impl SpawnRecord {
    pub(crate) fn last_spawn(&self) -> Option<SystemTime> {
        (self.spawns > 0).then(|| UNIX_EPOCH + Duration::from_millis(self.last_spawn_ms))
    }

    /// A started daemon that is still alive and younger than the start timeout is coming: no
    /// other start now.
    pub(super) fn pending(&self, now: SystemTime, start_timeout: Duration) -> bool {
        let young = self
            .last_spawn()
            .is_some_and(|at| now.duration_since(at).unwrap_or_default() < start_timeout);
        young && self.pid != 0 && !exited(self.pid)
    }

    /// A start that is provably pending, for a call to wait for: not seen serving yet, and its
    /// process is the one started (its start ticks and boot id match the record's), younger than
    /// the start timeout by the kernel's clock. A reused pid, a record without the start, or a
    /// step of the wall clock never makes a call wait.
    pub(super) fn proves_pending(&self, start_timeout: Duration) -> bool {
        self.started_alive()
            && self
                .start
                .as_ref()
                .and_then(process::age)
                .is_some_and(|age| age < start_timeout)
    }

    /// The started process, not seen serving, is alive and provably the one started: its start
    /// ticks and boot id are the recorded ones (a reused pid never is), and it is no zombie.
    pub(super) fn started_alive(&self) -> bool {
        let Some(recorded) = self.start.as_ref().filter(|_| self.failures > 0) else {
            return false;
        };
        !exited(self.pid)
            && process::check_alive(self.pid)
                .and_then(|info| info.start())
                .is_ok_and(|start| start == *recorded)
    }

    /// After starts that did not serve: 1 s, 2 s, 4 s … up to five minutes after the last.
    pub(crate) fn backoff_until(&self) -> Option<SystemTime> {
        let last = self.last_spawn()?;
        let doublings = self.failures.checked_sub(1)?;
        let backoff = Duration::from_secs(1)
            .checked_mul(1 << doublings.min(16))
            .unwrap_or(MAX_BACKOFF)
            .min(MAX_BACKOFF);
        Some(last + backoff)
    }
}
