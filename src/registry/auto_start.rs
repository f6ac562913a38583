//! Auto-start in the registry: the probe that starts a daemon on a miss, the restart of an
//! upgraded daemon, the quicker re-probes while a started daemon is coming, and the failure of
//! one that exited.

use std::time::Duration;

use tokio::time::Instant;

use super::entry::Entry;
use super::state::State;
use crate::lifecycle::{
    AutoStart, SpawnOutcome, SpawnedChild, StopOutcome, lock_held, maybe_spawn, stop_with,
};
use crate::paths::DaemonPaths;
use crate::pidfile::Pidfile;
use crate::probe::UdsTarget;
use crate::process;
use crate::reason::FallbackReason;

impl Entry {
    /// The probe; when it finds no daemon and auto-start is on, a daemon is started (by the
    /// lifetime lock's rule, see `lifecycle`), and the calls go on by the probe's reason.
    pub(super) fn probe_or_start(&self) -> Result<UdsTarget, FallbackReason> {
        let reason = match self.probe() {
            Ok(target) => return Ok(target),
            Err(reason) => reason,
        };
        let Some(auto) = &self.settings.auto_start else {
            return Err(reason);
        };
        // An upgraded daemon is restarted by a re-probe, which can wait for it to stop.
        if reason == FallbackReason::ExecutableReplaced {
            return Err(reason);
        }
        match maybe_spawn(&self.daemon_paths, auto) {
            SpawnOutcome::Spawned(child) => self.lock().spawned = Some((child, Instant::now())),
            SpawnOutcome::Failed(message) => {
                return Err(FallbackReason::AutoStartFailed { message });
            }
            SpawnOutcome::NotNow(why) | SpawnOutcome::Refused(why) => {
                tracing::debug!(dir = %self.dir.display(), why, "no daemon started");
            }
        }
        Err(reason)
    }

    /// A daemon whose executable was replaced on disk (an upgrade) is stopped the way
    /// [`stop`](crate::stop) does it, and a new one started. Only on that reason: two different
    /// installed versions must not stop each other's daemons in turn.
    pub(super) async fn restart(&self, auto: &AutoStart) {
        if !runs_program(&self.paths, &self.settings.marker, &auto.program) {
            tracing::debug!(dir = %self.dir.display(), "the daemon runs another installation");
            return;
        }
        let stopped = stop_with(&self.dir, &self.paths, &self.settings, auto.start_timeout).await;
        tracing::info!(dir = %self.dir.display(), ?stopped, "restarting an upgraded local daemon");
        if let StopOutcome::Stopped { .. } = stopped {
            let _ = self.probe_or_start();
        }
    }

    /// How long a negative decision stands: shorter while a daemon started here is coming.
    pub(super) fn reprobe_interval(&self, state: &State) -> Duration {
        let coming = |(child, at): &(SpawnedChild, Instant)| {
            child.exit.get().is_none()
                && self
                    .settings
                    .auto_start
                    .as_ref()
                    .is_some_and(|auto| at.elapsed() < auto.start_timeout)
        };
        match state.spawned.as_ref().is_some_and(coming) {
            true => self
                .settings
                .reprobe_interval
                .min(Duration::from_millis(50)),
            false => self.settings.reprobe_interval,
        }
    }

    /// Why a daemon started here is not coming, if it exited already. One that exited because
    /// another daemon holds the lock lost a race (`AlreadyRunning`): that one is coming.
    pub(super) fn spawn_failure(&self) -> Option<String> {
        // The log is read after the entry's lock is let go.
        let child = self.lock().spawned.as_ref()?.0.clone();
        let failure = child.failure()?;
        (!lock_held(&self.daemon_paths.lock)).then_some(failure)
    }
}

/// Whether the pidfile's process runs (an older build at) `program`'s path: `/proc/<pid>/exe`
/// names the path, with ` (deleted)` once the file was replaced. Another installation's daemon
/// is never restarted by this one.
/// The pidfile is read as the probe reads it: bounded, and never blocking on a FIFO.
fn runs_program(paths: &DaemonPaths, marker: &str, program: &std::path::Path) -> bool {
    let Ok(Pidfile { pid, .. }) = Pidfile::read(&paths.pidfile, marker) else {
        return false;
    };
    // The kernel names the file the daemon was started from, symlinks resolved.
    let program = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_owned());
    process::executable_path(pid).is_some_and(|(path, _)| path == program)
}
