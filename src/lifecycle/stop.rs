//! [`stop`]: signals only a daemon verified over a live connection to be this directory's,
//! running as our user, and waits for it to exit.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::spawn::stop_started;
use crate::config::Settings;
use crate::connect::establish;
use crate::http2::ConnectionEnd;
use crate::lockfile::{LockedFile, lock_held, record_names};
use crate::paths::DaemonPaths;
use crate::probe::{UdsTarget, check_sockets_dir, read_pidfile};
use crate::process::exited;
use crate::reason::FallbackReason;

/// What [`stop`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopOutcome {
    /// No daemon runs for the directory: no pidfile, or its process is gone.
    NotRunning,
    /// The daemon was verified, sent SIGTERM, and exited: its lifetime lock is released. Or no
    /// daemon served, and a command auto-start started, which had not taken the lifetime lock
    /// (hung, or not yet bound), was verified as that command and stopped.
    Stopped {
        /// The daemon's pid.
        pid: u32,
    },
    /// What the pidfile names is not provably this directory's daemon of our user, so
    /// nothing was signalled.
    Refused {
        /// Why.
        reason: FallbackReason,
    },
    /// The daemon was verified and sent SIGTERM, and had not exited when the time ran out (its
    /// grace period for in-flight calls may be longer).
    TimedOut {
        /// The daemon's pid.
        pid: u32,
    },
}

impl std::fmt::Display for StopOutcome {
    /// What happened, for a `stop` verb to print: a refusal says what to do.
    ///
    /// ```
    /// use tower_local_daemon::StopOutcome;
    ///
    /// assert_eq!(StopOutcome::Stopped { pid: 7 }.to_string(), "stopped the daemon (pid 7)");
    /// ```
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotRunning => f.write_str("no daemon runs for this directory"),
            Self::Stopped { pid } => write!(f, "stopped the daemon (pid {pid})"),
            Self::Refused { reason } => write!(
                f,
                "refused to stop what the pidfile names: {reason}; what to do: {}",
                reason.remedy()
            ),
            Self::TimedOut { pid } => write!(
                f,
                "sent SIGTERM to the daemon (pid {pid}); it had not exited when the time ran out (its grace period for calls in flight may be longer)"
            ),
        }
    }
}

/// Stops `state_dir`'s daemon, and waits up to `timeout` for it to exit. It never starts
/// anything. It reads the default files (heddle's pidfile marker under `<dir>/sockets/`); a tool
/// with its own marker or paths uses [`LocalDaemonLayer::stop`](crate::LocalDaemonLayer::stop).
///
/// The daemon is signalled only once it is verified over a live connection: the socket's peer
/// (`SO_PEERCRED`) is the pidfile's pid and our effective uid, and it answers
/// `Health/Check` reporting this very directory. That holds for a daemon whose executable was
/// replaced on disk (an upgrade), and it never signals a process that merely reuses a stale
/// pid, such as another of our own commands: it does not listen on this socket.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use tower_local_daemon::{StopOutcome, stop};
///
/// let dir = std::env::temp_dir().join("tower-local-daemon-doc-stop");
/// assert_eq!(stop(&dir, Duration::from_secs(5)).await, StopOutcome::NotRunning);
/// # }
/// ```
pub async fn stop(state_dir: impl AsRef<Path>, timeout: Duration) -> StopOutcome {
    let dir = &crate::paths::absolute(state_dir.as_ref());
    stop_with(dir, &DaemonPaths::new(dir), &Settings::default(), timeout).await
}

/// [`stop`] for a daemon a layer knows: its paths, and its settings' pidfile marker and checks.
pub(crate) async fn stop_with(
    dir: &Path,
    paths: &DaemonPaths,
    settings: &Settings,
    timeout: Duration,
) -> StopOutcome {
    let deadline = Instant::now().checked_add(timeout);
    // The lock this daemon holds: a daemon started after it holds another file's.
    let lock = LockedFile::of(&paths.lock);
    let pid = match verify(dir, paths, settings, timeout).await {
        Verified::Serving(pid) => {
            if kill(Pid::from_raw(pid as i32), Signal::SIGTERM).is_err() {
                // It exited between the check and the signal.
                return StopOutcome::Stopped { pid };
            }
            pid
        }
        // Another stop came first: this one waits for the same exit, and signals nothing.
        Verified::Stopping(pid) => pid,
        // No daemon serves; a command auto-start started may still be alive, hung before
        // it took the lock: it is stopped too, so that nothing started for the directory lives.
        Verified::NotRunning => {
            let paths = paths.clone();
            let stopped = tokio::task::spawn_blocking(move || stop_started(&paths)).await;
            return match stopped.ok().flatten() {
                None => StopOutcome::NotRunning,
                Some(Ok(pid)) => StopOutcome::Stopped { pid },
                Some(Err(message)) => StopOutcome::Refused {
                    reason: FallbackReason::AutoStartFailed { message },
                },
            };
        }
        Verified::Refused(reason) => return StopOutcome::Refused { reason },
    };
    while !exited(pid) || lock.is_some_and(|lock| lock.held()) {
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return StopOutcome::TimedOut { pid };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    StopOutcome::Stopped { pid }
}

/// What the pidfile names, once checked.
enum Verified {
    /// This directory's daemon, verified over a live connection.
    Serving(u32),
    /// This directory's daemon, already stopping: it closed its listener, and still holds the
    /// lock its record says it took.
    Stopping(u32),
    /// No pidfile; its process is gone, or reuses the pid; or the files are a copy of another
    /// directory's, whose daemon holds no lock here.
    NotRunning,
    /// Not provably this directory's daemon.
    Refused(FallbackReason),
}

async fn verify(
    dir: &Path,
    paths: &DaemonPaths,
    settings: &Settings,
    timeout: Duration,
) -> Verified {
    match check_sockets_dir(&paths.sockets_dir) {
        Ok(()) => {}
        Err(FallbackReason::NoPidfile) => return Verified::NotRunning,
        Err(reason) => return Verified::Refused(reason),
    }
    let settings = Settings {
        deadline: timeout,
        ..settings.clone()
    };
    let pid = match read_pidfile(&paths.pidfile, &settings.marker) {
        Ok(pidfile) => pidfile.pid,
        Err(FallbackReason::NoPidfile) => return Verified::NotRunning,
        Err(reason) => return Verified::Refused(reason),
    };
    // Gone, or another process with its pid: the lock record's start says so.
    if exited(pid) || record_names(&paths.lock, pid) == Some(false) {
        return Verified::NotRunning;
    }
    let target = UdsTarget::new(&paths.socket, pid);
    // Asked, never attested: a signal goes only to a daemon that answers now.
    match establish(target, None, dir, &settings, ConnectionEnd::ignored()).await {
        Ok(connection) => {
            connection.task.abort();
            Verified::Serving(pid)
        }
        Err(FallbackReason::ConnectionRefused) if record_names(&paths.lock, pid) == Some(true) => {
            match lock_held(&paths.lock) {
                true => Verified::Stopping(pid),
                false => Verified::NotRunning,
            }
        }
        Err(reason) => Verified::Refused(reason),
    }
}
