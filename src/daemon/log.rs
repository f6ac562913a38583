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

/// Moves the log aside when stderr is this directory's `daemon.log` and it has passed the cap;
/// stdout follows when it is the same file.
fn rotate_if_over(sockets: &SocketsDir) -> io::Result<()> {
    let Some(log) = sockets.stat(DAEMON_LOG_FILE)? else {
        return Ok(());
    };
    let is_log =
        |stat: &nix::sys::stat::FileStat| (stat.st_dev, stat.st_ino) == (log.st_dev, log.st_ino);
    let stderr = nix::sys::stat::fstat(std::io::stderr())?;
    if !is_log(&stderr) || u64::try_from(stderr.st_size).unwrap_or(0) <= DAEMON_LOG_CAP {
        return Ok(());
    }
    let stdout_too = nix::sys::stat::fstat(std::io::stdout()).is_ok_and(|s| is_log(&s));
    sockets.rename(DAEMON_LOG_FILE, DAEMON_LOG_OLD_FILE)?;
    let fresh = match sockets.open_append(DAEMON_LOG_FILE) {
        Ok(fresh) => fresh,
        Err(e) => {
            // Back where it was: the next look tries again, rather than the old log growing.
            let _ = sockets.rename(DAEMON_LOG_OLD_FILE, DAEMON_LOG_FILE);
            return Err(e);
        }
    };
    if stdout_too {
        nix::unistd::dup2_stdout(&fresh)?;
    }
    nix::unistd::dup2_stderr(&fresh)?;
    Ok(())
}
