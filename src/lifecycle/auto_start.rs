//! [`AutoStart`]: the daemon command a layer starts on a miss, as plain data (it is part of the
//! options that key a registry entry), and when auto-start is off.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::record::SpawnRecord;
use crate::paths::DaemonPaths;
use crate::protocol::DAEMON_LOG_FILE;

/// The command that starts a directory's daemon when a call finds none, like
/// [`std::process::Command`]: an absolute program, its arguments, its environment and its
/// working directory (`/` by default).
///
/// The program comes from the code that builds the layer, never from files in the repository:
/// entering a repository never runs its code.
///
/// ```
/// use std::time::Duration;
/// use tower_local_daemon::{AutoStart, LocalDaemonLayer};
///
/// let layer = LocalDaemonLayer::new("/repo/.heddle").auto_start(
///     AutoStart::current_exe(["agent", "serve"]).start_timeout(Duration::from_secs(10)),
/// );
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AutoStart {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) current_dir: PathBuf,
    pub(crate) start_timeout: Duration,
    /// Variables of the command's environment the daemon does not get: the mode's and
    /// auto-start's own switches. Filled in when a layer builds a service.
    pub(crate) env_remove: Vec<String>,
}

impl AutoStart {
    /// Starts `program`, which must be an absolute path.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            current_dir: PathBuf::from("/"),
            start_timeout: Duration::from_secs(10),
            env_remove: Vec::new(),
        }
    }

    /// Starts this executable with `args`, as `/proc/self/exe` names it now: after an upgrade
    /// in place, the new build.
    pub fn current_exe<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Self::new(current_exe_path()).args(args)
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the daemon, beside the command's own environment.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The daemon's working directory (default `/`, so that it holds no directory busy).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = dir.into();
        self
    }

    /// How long a started daemon has to serve (default 10 s). In mode `require` it bounds the
    /// wait of the call that started it; in mode `auto`, calls go in-process meanwhile.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }
}

/// The path this process was started from: after an upgrade in place, the new build.
fn current_exe_path() -> PathBuf {
    crate::process::own_executable_path()
        .unwrap_or_else(|| std::env::current_exe().unwrap_or_default())
}

/// Whether auto-start is on, after the environment: resolved when a layer builds a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AutoStartSwitch {
    /// The variable that turns auto-start off (`0`, `off`, `false`, `no`), or its injected value.
    pub(crate) env: crate::config::ModeOverride,
    /// Whether to start a daemon also under `CI`.
    pub(crate) forced: bool,
}

impl AutoStartSwitch {
    /// The default variable that turns auto-start off.
    pub(crate) const DEFAULT_ENV: &'static str = "HEDDLE_LOCAL_DAEMON_AUTO_START";

    pub(crate) fn new() -> Self {
        Self {
            env: crate::config::ModeOverride::Var(Self::DEFAULT_ENV.to_owned()),
            forced: false,
        }
    }

    /// Whether auto-start stays on: not turned off by its variable, and not under `CI` (a
    /// value other than empty, `0` or `false`) unless forced. Ephemeral CI machines gain
    /// nothing from a daemon.
    pub(crate) fn enabled(&self) -> bool {
        enabled(
            self.env.value().as_deref(),
            std::env::var("CI").ok().as_deref(),
            self.forced,
        )
    }
}

fn enabled(switch: Option<&str>, ci: Option<&str>, forced: bool) -> bool {
    let off = |v: &str| matches!(v.trim(), "0" | "off" | "false" | "no");
    if switch.is_some_and(off) {
        return false;
    }
    let under_ci = ci.is_some_and(|v| !matches!(v.trim(), "" | "0" | "false"));
    forced || !under_ci
}

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
    /// The earliest moment of the next start, while backing off.
    pub backoff_until: Option<SystemTime>,
    /// The daemons' log: their standard output and error.
    pub log: PathBuf,
    /// The log's last lines (at most ten).
    pub log_tail: Vec<String>,
}

/// What auto-start has done for `heddle_dir`; it reads files and changes nothing.
///
/// ```
/// let status = tower_local_daemon::auto_start_status("/no/such/repo/.heddle");
/// assert_eq!(status.spawns, 0);
/// assert!(status.log.ends_with("sockets/daemon.log"));
/// ```
pub fn auto_start_status(heddle_dir: impl AsRef<Path>) -> AutoStartStatus {
    let paths = DaemonPaths::new(heddle_dir);
    let record = SpawnRecord::read(&paths.sockets_dir).unwrap_or_default();
    let log = paths.sockets_dir.join(DAEMON_LOG_FILE);
    AutoStartStatus {
        last_spawn: record.last_spawn(),
        failures: record.failures,
        spawns: record.spawns,
        backoff_until: record.backoff_until(),
        log_tail: log_tail(&log, 10),
        log,
    }
}

/// The last `lines` lines of a log, read from its end.
pub(crate) fn log_tail(log: &Path, lines: usize) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::enabled;

    #[test]
    fn auto_start_is_off_when_switched_off_and_under_ci_unless_forced() {
        assert!(enabled(None, None, false));
        assert!(enabled(Some("1"), Some(""), false));
        assert!(enabled(None, Some("false"), false));
        assert!(!enabled(Some("0"), None, false));
        assert!(!enabled(Some("off"), None, true));
        assert!(!enabled(None, Some("true"), false));
        assert!(enabled(None, Some("true"), true));
    }
}
