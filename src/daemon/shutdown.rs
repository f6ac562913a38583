//! Stopping: what ends serving (the shutdown future, SIGTERM, SIGINT, the idle timeout), and
//! the drain after it (in-flight calls get the grace period, then the rest are aborted).
//!
//! The signal handlers are installed before the pidfile is written, so that no signal between
//! the two kills the daemon without its cleanup. Tokio keeps a signal's handler installed for
//! the rest of the process once it has been installed, also after `serve` returns. A SIGINT
//! that the daemon inherited as ignored (a background job of a shell) stays ignored.

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio::time::Instant;

use super::counters::DaemonCounters;

/// SIGTERM's listener, and SIGINT's unless SIGINT is inherited as ignored.
#[derive(Debug)]
pub(super) struct SignalListeners {
    term: Signal,
    int: Option<Signal>,
}

impl SignalListeners {
    /// Installs the listeners; `None` when `handle` is false or they cannot be installed.
    pub(super) fn install(handle: bool) -> Option<Self> {
        if !handle {
            return None;
        }
        let term = signal(SignalKind::terminate());
        let int = match sigint_ignored() {
            true => Ok(None),
            false => signal(SignalKind::interrupt()).map(Some),
        };
        match (term, int) {
            (Ok(term), Ok(int)) => Some(Self { term, int }),
            _ => {
                tracing::warn!(
                    "could not install signal handlers; only the shutdown future stops the daemon"
                );
                None
            }
        }
    }

    async fn recv(mut self) -> &'static str {
        let int = async {
            match &mut self.int {
                Some(int) => int.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = int => "SIGINT",
        }
    }
}

/// Whether SIGINT is ignored in this process: the `SigIgn` mask of `/proc/self/status`, where
/// signal `n` is bit `n - 1`. No `sigaction` call, so no unsafe code.
#[cfg(target_os = "linux")]
fn sigint_ignored() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (nix::sys::signal::SIGINT as u32 - 1)) != 0)
}

#[cfg(not(target_os = "linux"))]
fn sigint_ignored() -> bool {
    false
}

/// Resolves with the reason to stop.
pub(super) async fn stop_reason(
    shutdown: impl Future<Output = ()>,
    signals: Option<SignalListeners>,
    idle_timeout: Option<Duration>,
    counters: &DaemonCounters,
    socket_gone: impl Fn() -> bool,
) -> &'static str {
    let signals = async {
        match signals {
            Some(signals) => signals.recv().await,
            None => std::future::pending().await,
        }
    };
    let idle = async {
        let Some(idle) = idle_timeout else {
            return std::future::pending().await;
        };
        let tick = (idle / 4).max(Duration::from_millis(10));
        let mut seen = counters.calls();
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            let calls = counters.calls();
            if calls != seen || counters.in_flight() > 0 {
                seen = calls;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= idle {
                return "idle timeout";
            }
        }
    };
    // A daemon whose sockets directory or socket was removed under it can be reached no more.
    let removed = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if socket_gone() {
                return "its socket was removed";
            }
        }
    };
    tokio::select! {
        () = shutdown => "shutdown future",
        why = removed => why,
        why = signals => why,
        why = idle => why,
    }
}

/// Lets the server finish its in-flight calls for `grace`, then aborts the connections that
/// remain and gives the server a second to notice.
pub(super) async fn drain<F, E>(
    server: &mut F,
    grace: Duration,
    abort: &watch::Sender<bool>,
) -> Result<(), E>
where
    F: Future<Output = Result<(), E>> + Unpin,
{
    match tokio::time::timeout(grace, &mut *server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!("grace period over; aborting the remaining connections");
            let _ = abort.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
            Ok(())
        }
    }
}
