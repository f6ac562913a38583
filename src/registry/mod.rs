//! The process-wide routes: one [`Entry`] per directory and settings, shared by every service
//! that wears a layer with those settings. The entry's state machine is whole in `entry`; a
//! run of its checks is in `detect`.
//!
//! An entry runs the checks once for all concurrent first calls of a runtime, caches the
//! decision, positive or negative, and changes it only when something happens: a daemon
//! connection ends, a re-probe finds a daemon, or the entry is reset. Services hold a
//! [`Lease`] on their entry; when the last one goes, the entry lingers a moment (a CLI that
//! builds a service per verb keeps its warm connection) and is then released: its connections
//! close and it leaves the map.

mod detect;
mod entry;
mod ids;
mod runtimes;
mod stats;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

pub(crate) use self::entry::{DaemonRoute, Decision, Entry, HANDOFF_TICK};
pub use self::stats::RouteStats;
use crate::config::Settings;
use crate::paths::DirIdentity;
use crate::sync::lock;

type Key = (DirIdentity, Settings);

fn entries() -> MutexGuard<'static, HashMap<Key, Arc<Entry>>> {
    static ENTRIES: OnceLock<Mutex<HashMap<Key, Arc<Entry>>>> = OnceLock::new();
    lock(ENTRIES.get_or_init(Default::default))
}

/// A service's hold on its entry: while one exists, the entry stays in the map.
#[derive(Debug)]
pub(crate) struct Lease {
    entry: Arc<Entry>,
}

impl Lease {
    /// The entry for a directory and settings, created on first use.
    ///
    /// An entry found under the same identity is reused only while the directory it was made
    /// for still has that identity: a deleted directory's inode can be reused by a new one.
    pub(crate) fn take(dir: &Path, settings: &Settings) -> Self {
        let identity = DirIdentity::of(dir);
        let key = (identity.clone(), settings.clone());
        let mut entries = entries();
        let entry = match entries.get(&key) {
            Some(entry) if entry.dir == dir || DirIdentity::of(&entry.dir) == identity => {
                entry.clone()
            }
            _ => {
                let entry = Arc::new(Entry::new(dir, settings.clone()));
                entries.insert(key, entry.clone());
                entry
            }
        };
        // Counted under the map's lock, where a release decides; a new lease also makes every
        // pending release stale, so that the linger runs from the last drop.
        entry.users.fetch_add(1, Ordering::AcqRel);
        entry.leases.fetch_add(1, Ordering::AcqRel);
        Self { entry }
    }

    #[inline]
    pub(crate) fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.entry.users.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let linger = self.entry.settings.linger;
        let release = Release {
            entry: self.entry.clone(),
            leases: self.entry.leases.load(Ordering::Acquire),
        };
        match tokio::runtime::Handle::try_current() {
            // Dropped with its runtime, the linger ends at once: the release runs then.
            Ok(handle) if !linger.is_zero() => {
                handle.spawn(async move {
                    tokio::time::sleep(linger).await;
                    drop(release);
                });
            }
            _ => drop(release),
        }
    }
}

/// Releases an entry when dropped, unless a service took it again meanwhile (even if that one
/// is gone again: its own release counts then).
struct Release {
    entry: Arc<Entry>,
    /// How many leases had been taken when the last one went.
    leases: u64,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut entries = entries();
        let taken_again = self.entry.leases.load(Ordering::Acquire) != self.leases;
        if taken_again || self.entry.users.load(Ordering::Acquire) != 0 {
            return;
        }
        entries.retain(|_, entry| !Arc::ptr_eq(entry, &self.entry));
        drop(entries);
        self.entry.close();
    }
}

/// Resets every entry for this directory, whatever its settings: the next call probes again.
///
/// ```
/// tower_local_daemon::reset("/no/such/repo/.heddle");
/// ```
pub fn reset(state_dir: impl AsRef<Path>) {
    let dir = &crate::paths::absolute(state_dir.as_ref());
    let identity = DirIdentity::of(dir);
    let matching: Vec<Arc<Entry>> = entries()
        .iter()
        .filter(|((id, _), entry)| *id == identity || entry.dir == *dir)
        .map(|(_, entry)| entry.clone())
        .collect();
    for entry in matching {
        entry.reset();
    }
}

#[cfg(test)]
mod tests;
