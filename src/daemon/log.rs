//! A started daemon's log, bounded for the daemon's whole life and not only across starts.
//!
//! Auto-start gives a daemon `sockets/daemon.log` as its stdout and stderr, and moves it aside
//! when a start finds it over [`DAEMON_LOG_CAP`]. A daemon that runs for hours (a verbose
//! subscriber, a noisy service) would still grow it without bound. So while it serves, the
//! daemon looks every [`CHECK_EVERY`]: when its stderr is still that file and has passed the cap,
//! it moves it to `daemon.log.1` (replacing the older one) and puts a new `daemon.log` on its
//! stdout and stderr. A daemon started any other way (a terminal, a service manager's journal)
//! writes where it was told, and this leaves it alone.

use std::convert::Infallible;
use std::io;
use std::time::Duration;

use super::files::SocketsDir;
use crate::protocol::{DAEMON_LOG_CAP, DAEMON_LOG_FILE, DAEMON_LOG_OLD_FILE};

/// How often the log's size is looked at: two `fstat`s each time.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Keeps the log bounded while the daemon serves; never ends.
pub(super) async fn keep_log_bounded(sockets: &SocketsDir) -> Infallible {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tick.tick().await;
        if let Err(e) = rotate_if_over(sockets)
            && !std::mem::replace(&mut warned, true)
        {
            tracing::warn!(error = %e, "could not move the daemon's log aside");
        }
    }
}

/// Moves the log aside when stderr is this directory's `daemon.log` and it has passed the cap.
fn rotate_if_over(sockets: &SocketsDir) -> io::Result<()> {
    let Some(log) = sockets.stat(DAEMON_LOG_FILE)? else {
        return Ok(());
    };
    let stderr = nix::sys::stat::fstat(std::io::stderr())?;
    let same = (stderr.st_dev, stderr.st_ino) == (log.st_dev, log.st_ino);
    if !same || u64::try_from(stderr.st_size).unwrap_or(0) <= DAEMON_LOG_CAP {
        return Ok(());
    }
    sockets.rename(DAEMON_LOG_FILE, DAEMON_LOG_OLD_FILE)?;
    let fresh = sockets.open_append(DAEMON_LOG_FILE)?;
    nix::unistd::dup2_stdout(&fresh)?;
    nix::unistd::dup2_stderr(&fresh)?;
    Ok(())
}
