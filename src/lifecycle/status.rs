//! What auto-start has done for a directory, for a tool's `status` verb: the spawn record and
//! the daemons' log.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::paths::DaemonPaths;
use crate::protocol::DAEMON_LOG_FILE;
use crate::spawn_record::SpawnRecord;

/// What the last start on a miss left behind, for a tool's `status` verb.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AutoStartStatus {
    /// When a daemon was last started on a miss, if ever.
    pub last_spawn: Option<SystemTime>,
    /// How many starts in a row have not been seen serving: the backoff grows with them.
    pub failures: u32,
    /// How many daemons were ever started on a miss for this directory.
    pub spawns: u64,
    /// How many of those were stopped because they never took the directory's lifetime lock
    /// within the start timeout (a command that hangs before it binds).
    pub stopped: u64,
    /// The earliest moment of the next start, while backing off.
    pub backoff_until: Option<SystemTime>,
    /// The daemons' log: their standard output and error.
    pub log: PathBuf,
    /// The log's last lines (at most ten).
    pub log_tail: Vec<String>,
}

impl std::fmt::Display for AutoStartStatus {
    /// Lines for a `status` verb: the starts, the backoff, the log and its last lines.
    ///
    /// ```
    /// let status = tower_local_daemon::auto_start_status("/no/such/repo/.heddle");
    /// assert_eq!(status.to_string(), "auto-start: no daemon was started here");
    /// ```
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(at) = self.last_spawn else {
            return f.write_str("auto-start: no daemon was started here");
        };
        let ago = at.elapsed().unwrap_or_default();
        write!(
            f,
            "auto-start: {} started, the last {:.1?} ago; {} in a row not seen serving",
            self.spawns, ago, self.failures
        )?;
        if self.stopped > 0 {
            write!(
                f,
                "; {} stopped for never taking the directory's lock",
                self.stopped
            )?;
        }
        let now = SystemTime::now();
        if let Some(left) = self.backoff_until.and_then(|u| u.duration_since(now).ok()) {
            write!(f, "\nauto-start: backing off for {left:.1?} more")?;
        }
        write!(f, "\nauto-start: log {}", self.log.display())?;
        for line in &self.log_tail {
            write!(f, "\n   | {line}")?;
        }
        Ok(())
    }
}

/// What auto-start has done for `state_dir`; it reads files and changes nothing.
///
/// ```
/// let status = tower_local_daemon::auto_start_status("/no/such/repo/.heddle");
/// assert_eq!(status.spawns, 0);
/// assert!(status.log.ends_with("sockets/daemon.log"));
/// ```
pub fn auto_start_status(state_dir: impl AsRef<Path>) -> AutoStartStatus {
    status_of(&DaemonPaths::new(state_dir))
}

/// [`auto_start_status`] of resolved paths.
pub(crate) fn status_of(paths: &DaemonPaths) -> AutoStartStatus {
    let record = SpawnRecord::read(&paths.sockets_dir).unwrap_or_default();
    let log = paths.sockets_dir.join(DAEMON_LOG_FILE);
    AutoStartStatus {
        last_spawn: record.last_spawn(),
        failures: record.failures,
        spawns: record.spawns,
        stopped: record.stopped,
        backoff_until: record.backoff_until(),
        log_tail: log_tail(&log, 10),
        log,
    }
}

/// The last `lines` lines of a log, read from its end.
pub(super) fn log_tail(log: &Path, lines: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok((mut file, metadata)) = crate::pidfile::open_regular(log) else {
        return Vec::new();
    };
    let _ = file.seek(SeekFrom::Start(metadata.len().saturating_sub(8 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}
