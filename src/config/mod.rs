//! The options a layer is built with: which daemon is acceptable, how the route behaves, the
//! daemon command auto-start runs ([`AutoStart`], plain data that keys a registry entry like
//! the rest). The environment variables that override the mode and auto-start are read in
//! [`env`].

mod env;

pub(crate) use self::env::{AutoStartSwitch, EnvOverride};

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::paths::DaemonPaths;
use crate::protocol::PIDFILE_MARKER;
use crate::tool::Tool;

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
/// assert_eq!("OFF".parse::<Mode>(), Ok(Mode::Off));
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
            "invalid local daemon mode {:?}: expected auto, off or require (or, from the environment, a switch word: 1, on, true, yes, 0, false, no)",
            self.0
        )
    }
}

impl std::error::Error for InvalidMode {}

impl FromStr for Mode {
    type Err = InvalidMode;

    /// `auto`, `off` or `require`, in any case, around any whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let word = s.trim();
        [Self::Auto, Self::Off, Self::Require]
            .into_iter()
            .find(|mode| word.eq_ignore_ascii_case(&mode.to_string()))
            .ok_or_else(|| InvalidMode(word.to_owned()))
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
    /// Ask `Health/Check` on every new connection, even of a daemon that attests itself.
    pub(crate) require_health_check: bool,
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
            require_health_check: false,
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
    /// The default settings with `tool`'s pidfile marker and daemon program: what a tool-aware
    /// free function checks.
    pub(crate) fn for_tool(tool: &Tool) -> Self {
        Self {
            marker: tool.marker().to_owned(),
            identity: tool.identity(),
            ..Self::default()
        }
    }

    /// The files the checks look at for `dir`: the standard layout, with the overrides applied.
    pub(crate) fn paths(&self, dir: &Path) -> DaemonPaths {
        DaemonPaths::new(dir)
            .with_overrides(self.socket_path.as_deref(), self.pidfile_path.as_deref())
    }
}

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
    /// How long calls wait for a daemon being started: `None` for none, `Some(None)` for the
    /// start timeout.
    pub(crate) handoff: Option<Option<Duration>>,
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
            handoff: Some(None),
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

    /// Starts the executable `name` that sits beside this one (in the directory of
    /// `/proc/self/exe`): a tool whose daemon is a separate binary installed with its CLI, such
    /// as `kvd` beside `kv`. A layer with no [identity](crate::LocalDaemonLayer::identity) of
    /// its own then accepts only a daemon running that executable.
    ///
    /// ```
    /// use tower_local_daemon::AutoStart;
    ///
    /// let kvd = AutoStart::sibling("kvd").arg("serve");
    /// # let _ = kvd;
    /// ```
    pub fn sibling(name: impl AsRef<Path>) -> Self {
        Self::new(current_exe_path().with_file_name(name.as_ref()))
    }

    /// Whether the program is this executable (as [`current_exe`](Self::current_exe) makes it).
    pub(crate) fn runs_this_executable(&self) -> bool {
        self.program == current_exe_path()
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
    /// wait of the call that started it; in mode `auto`, it is the default hand-off bound.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// How long, at most, calls in mode `auto` wait for a daemon being started (default: the
    /// start timeout), from the moment a call starts it or finds its start under way.
    ///
    /// A call that starts a daemon, or finds a start pending (another command holds the spawn
    /// lock, or the daemon it started is alive, provably the same process, and has not served
    /// yet), waits for that daemon in its response future, and then goes to it: so that a
    /// daemon that loads the repository never misses a write an in-process call made
    /// meanwhile. A call's own deadline (`grpc-timeout`) cuts the wait short. Past the bound,
    /// calls run in-process again: a daemon slower to start than the bound brings back two
    /// writers, in-process and the daemon (see the README's "Two routes, one repository").
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_local_daemon::AutoStart;
    ///
    /// let auto = AutoStart::current_exe(["agent", "serve"]).handoff_timeout(Duration::from_secs(3));
    /// # let _ = auto;
    /// ```
    pub fn handoff_timeout(mut self, bound: Duration) -> Self {
        self.handoff = Some(Some(bound));
        self
    }

    /// Calls never wait for a daemon being started: the call that starts it runs in-process,
    /// and so do the calls until it serves. For a tool whose daemon caches nothing that an
    /// in-process call could change.
    pub fn no_handoff(mut self) -> Self {
        self.handoff = None;
        self
    }

    /// The hand-off bound, if calls wait at all.
    pub(crate) fn handoff(&self) -> Option<Duration> {
        self.handoff
            .map(|bound| bound.unwrap_or(self.start_timeout))
    }
}

/// The path this process was started from: after an upgrade in place, the new build.
fn current_exe_path() -> PathBuf {
    crate::process::own_executable_path()
        .unwrap_or_else(|| std::env::current_exe().unwrap_or_default())
}

/// Which gRPC methods (by path, such as `/grpc.health.v1.Health/Check`) are safe to run twice,
/// in any order, even at once: a layer option of the service, not of the registry entry.
#[derive(Clone)]
pub(crate) struct Idempotent(Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl Idempotent {
    pub(crate) fn new(accepts: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(accepts))
    }

    pub(crate) fn accepts(&self, path: &str) -> bool {
        (self.0)(path)
    }
}

impl fmt::Debug for Idempotent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Idempotent(..)")
    }
}
