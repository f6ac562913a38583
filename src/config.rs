//! The options a layer is built with: which daemon is acceptable and how the route behaves.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::lifecycle::AutoStart;
use crate::paths::DaemonPaths;
use crate::protocol::PIDFILE_MARKER;

/// Which executable an acceptable daemon runs.
///
/// ```
/// use tower_local_daemon::IdentityPolicy;
///
/// assert_eq!(IdentityPolicy::default(), IdentityPolicy::SameExecutable);
/// let separate = IdentityPolicy::Executable("/usr/libexec/heddle-daemon".into());
/// # let _ = separate;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdentityPolicy {
    /// The daemon runs the same executable file (device and inode) as this process: the usual
    /// case of a CLI whose `agent serve` verb is the daemon.
    #[default]
    SameExecutable,
    /// The daemon runs this executable file, for tools whose daemon is a separate binary.
    Executable(PathBuf),
}

/// Whether the layer uses a daemon.
///
/// ```
/// use tower_local_daemon::Mode;
///
/// assert_eq!("require".parse::<Mode>(), Ok(Mode::Require));
/// assert!("sometimes".parse::<Mode>().is_err());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// Use the daemon when it passes every check; otherwise run in-process.
    #[default]
    Auto,
    /// Never look for a daemon; always run in-process.
    Off,
    /// Always use the daemon; nothing runs in-process. The first call, and the first call after
    /// each re-probe interval, waits for a daemon up to the deadline; a call with no usable
    /// daemon fails with `UNAVAILABLE` naming the reason. Between re-probes, calls fail at once
    /// with the last reason.
    Require,
}

/// A mode string that is none of `auto`, `off` and `require`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidMode(pub String);

impl fmt::Display for InvalidMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid local daemon mode {:?}: expected auto, off or require",
            self.0
        )
    }
}

impl std::error::Error for InvalidMode {}

impl FromStr for Mode {
    type Err = InvalidMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            "require" => Ok(Self::Require),
            other => Err(InvalidMode(other.to_owned())),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Off => "off",
            Self::Require => "require",
        })
    }
}

/// The default environment variable that overrides the mode.
pub const DEFAULT_MODE_ENV: &str = "HEDDLE_LOCAL_DAEMON";

/// Where an environment override (the mode's, auto-start's switch) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ModeOverride {
    /// Read this environment variable when the layer builds a service.
    Var(String),
    /// A value given as if it were the variable's (tests inject it this way).
    Value(Option<String>),
}

impl ModeOverride {
    /// The variable's value, or the injected one.
    pub(crate) fn value(&self) -> Option<String> {
        match self {
            Self::Var(name) => std::env::var(name).ok(),
            Self::Value(value) => value.clone(),
        }
    }

    /// The variable's name, when it is read from the environment.
    pub(crate) fn var(&self) -> Option<&str> {
        match self {
            Self::Var(name) => Some(name),
            Self::Value(_) => None,
        }
    }

    /// The mode after the override: the environment beats the builder, and an invalid value is
    /// logged and ignored.
    pub(crate) fn apply(&self, builder_mode: Mode) -> Mode {
        let value = self.value();
        match value.as_deref().map(str::parse::<Mode>) {
            None => builder_mode,
            Some(Ok(mode)) => mode,
            Some(Err(e)) => {
                tracing::warn!(source = ?self, "{e}; using {builder_mode}");
                builder_mode
            }
        }
    }
}

/// Everything that decides whether a daemon is acceptable and how its route behaves. Two layers
/// with equal settings for the same directory share one registry entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Settings {
    pub(crate) socket_path: Option<PathBuf>,
    pub(crate) pidfile_path: Option<PathBuf>,
    pub(crate) identity: IdentityPolicy,
    pub(crate) marker: String,
    pub(crate) required_services: Vec<String>,
    pub(crate) accept_unimplemented_health: bool,
    pub(crate) accept_unverified_directory: bool,
    pub(crate) required_version: Option<String>,
    pub(crate) mode: Mode,
    pub(crate) deadline: Duration,
    pub(crate) reprobe_interval: Duration,
    pub(crate) keepalive_interval: Duration,
    pub(crate) keepalive_timeout: Duration,
    pub(crate) linger: Duration,
    /// On, once resolved: the builder set it and the environment does not turn it off.
    pub(crate) auto_start: Option<AutoStart>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            socket_path: None,
            pidfile_path: None,
            identity: IdentityPolicy::SameExecutable,
            marker: PIDFILE_MARKER.to_owned(),
            required_services: vec![String::new()],
            accept_unimplemented_health: false,
            accept_unverified_directory: false,
            required_version: None,
            mode: Mode::Auto,
            deadline: Duration::from_millis(500),
            reprobe_interval: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(2),
            linger: Duration::from_secs(5),
            auto_start: None,
        }
    }
}

impl Settings {
    /// The files the checks look at for `dir`: the standard layout, with the overrides applied.
    pub(crate) fn paths(&self, dir: &Path) -> DaemonPaths {
        DaemonPaths::new(dir)
            .with_overrides(self.socket_path.as_deref(), self.pidfile_path.as_deref())
    }
}
