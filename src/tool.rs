//! [`Tool`]: what a tool's daemon and its clients must agree on, in one value that both sides
//! are given.

use std::fmt;
use std::path::PathBuf;

use crate::protocol::{DEFAULT_AUTO_START_ENV, DEFAULT_MODE_ENV, PIDFILE_MARKER};

/// What a tool's daemon and its clients must agree on: the pidfile marker both sides write and
/// read, and the names of the environment variables that override the mode and turn
/// auto-start off. Derived from the tool's name, so that a tool is configured in one place:
///
/// | setting | `Tool::new("kv")` | [`Tool::heddle()`] (the default) |
/// |---|---|---|
/// | pidfile marker | `kv` | `heddle-agent` |
/// | mode variable | `KV_LOCAL_DAEMON` | `HEDDLE_LOCAL_DAEMON` |
/// | auto-start switch | `KV_LOCAL_DAEMON_AUTO_START` | `HEDDLE_LOCAL_DAEMON_AUTO_START` |
///
/// Give the same value to [`Daemon::tool`](crate::Daemon::tool) on the daemon's side, and to
/// [`LocalDaemonLayer::tool`](crate::LocalDaemonLayer::tool) and the tool-aware forms of the
/// free functions (`Tool::stop`, `Tool::diagnose`, `Tool::probe`, …) on the client's. Each
/// setting can still be overridden; among `tool`, `pidfile_marker`, `mode_env_var` and
/// `auto_start_env_var` on one builder, the call made last wins.
///
/// ```
/// use tower_local_daemon::Tool;
///
/// let kv = Tool::new("kv")?;
/// assert_eq!(kv.marker(), "kv");
/// assert_eq!(kv.mode_env_var(), "KV_LOCAL_DAEMON");
/// assert_eq!(kv.auto_start_env_var(), "KV_LOCAL_DAEMON_AUTO_START");
/// assert!(Tool::new("my tool").is_err());
/// # Ok::<(), tower_local_daemon::InvalidTool>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tool {
    marker: String,
    mode_env_var: String,
    auto_start_env_var: String,
    /// The daemon's executable, when it is not the client's own.
    daemon_program: Option<PathBuf>,
}

/// A tool setting that cannot be used: a marker that is not 1 to 64 visible ASCII characters,
/// or an environment variable name that is not `[A-Z0-9_]` (not starting with a digit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTool {
    setting: &'static str,
    value: String,
    expected: &'static str,
    /// The tool name it was derived from, if it was.
    name: Option<String>,
}

impl fmt::Display for InvalidTool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = &self.name {
            write!(f, "invalid tool name {name:?}: ")?;
        }
        write!(
            f,
            "its {} would be {:?}; expected {}",
            self.setting, self.value, self.expected
        )
    }
}

impl std::error::Error for InvalidTool {}

impl Tool {
    /// The settings of the tool `name`: the marker is `name`, and the variables are its name in
    /// uppercase (`-` and `.` as `_`) followed by `_LOCAL_DAEMON` and `_LOCAL_DAEMON_AUTO_START`.
    pub fn new(name: &str) -> Result<Self, InvalidTool> {
        let prefix: String = name
            .chars()
            .map(|c| match c {
                '-' | '.' => '_',
                c => c.to_ascii_uppercase(),
            })
            .collect();
        let derived = || -> Result<Self, InvalidTool> {
            Self::heddle()
                .with_marker(name)?
                .with_mode_env_var(format!("{prefix}_LOCAL_DAEMON"))?
                .with_auto_start_env_var(format!("{prefix}_LOCAL_DAEMON_AUTO_START"))
        };
        derived().map_err(|e| InvalidTool {
            name: Some(name.to_owned()),
            ..e
        })
    }

    /// heddle's settings, the default of every builder and free function: the marker
    /// `heddle-agent` and the variables `HEDDLE_LOCAL_DAEMON` and
    /// `HEDDLE_LOCAL_DAEMON_AUTO_START`.
    pub fn heddle() -> Self {
        Self {
            marker: PIDFILE_MARKER.to_owned(),
            mode_env_var: DEFAULT_MODE_ENV.to_owned(),
            auto_start_env_var: DEFAULT_AUTO_START_ENV.to_owned(),
            daemon_program: None,
        }
    }

    /// With a daemon that is this executable (default: the client's own executable, as a CLI
    /// whose `agent serve` verb is the daemon). A client then accepts only a daemon running
    /// it: the layer's identity, and that of the tool-aware free functions.
    pub fn with_daemon_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.daemon_program = Some(program.into());
        self
    }

    /// With a daemon that is the executable `name` beside the running one, as `kvd` beside
    /// `kv` ([`with_daemon_program`](Self::with_daemon_program)). Start it with
    /// `AutoStart::sibling`.
    #[cfg(feature = "client")]
    #[cfg_attr(docsrs, doc(cfg(feature = "client")))]
    pub fn with_sibling_daemon(self, name: &str) -> Self {
        let own = crate::process::own_executable_path()
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_default();
        self.with_daemon_program(own.with_file_name(name))
    }

    /// The daemon's executable, when it is not the client's own.
    pub fn daemon_program(&self) -> Option<&std::path::Path> {
        self.daemon_program.as_deref()
    }

    /// Which executable an acceptable daemon runs: the daemon program, or the client's own.
    #[cfg(feature = "client")]
    pub(crate) fn identity(&self) -> crate::config::IdentityPolicy {
        use crate::config::IdentityPolicy;
        match &self.daemon_program {
            Some(program) => IdentityPolicy::Executable(program.clone()),
            None => IdentityPolicy::SameExecutable,
        }
    }

    /// With this pidfile marker (the pidfile's second line) instead.
    pub fn with_marker(mut self, marker: impl Into<String>) -> Result<Self, InvalidTool> {
        self.marker = check_marker(marker.into())?;
        Ok(self)
    }

    /// With this variable overriding the mode instead.
    pub fn with_mode_env_var(mut self, name: impl Into<String>) -> Result<Self, InvalidTool> {
        self.mode_env_var = check_env_name("mode variable", name.into())?;
        Ok(self)
    }

    /// With this variable turning auto-start off instead.
    pub fn with_auto_start_env_var(mut self, name: impl Into<String>) -> Result<Self, InvalidTool> {
        self.auto_start_env_var = check_env_name("auto-start variable", name.into())?;
        Ok(self)
    }

    /// The pidfile marker.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// The variable that overrides the mode.
    pub fn mode_env_var(&self) -> &str {
        &self.mode_env_var
    }

    /// The variable that turns auto-start off.
    pub fn auto_start_env_var(&self) -> &str {
        &self.auto_start_env_var
    }
}

impl Default for Tool {
    fn default() -> Self {
        Self::heddle()
    }
}

/// The one rule for a pidfile marker, on both sides: 1 to 64 visible ASCII characters, so that
/// a pidfile stays far below its read bound.
pub(crate) fn valid_marker(marker: &str) -> bool {
    marker.bytes().all(|b| b.is_ascii_graphic()) && (1..=64).contains(&marker.len())
}

fn check_marker(marker: String) -> Result<String, InvalidTool> {
    match valid_marker(&marker) {
        true => Ok(marker),
        false => Err(InvalidTool {
            setting: "pidfile marker",
            value: marker,
            expected: "1 to 64 visible ASCII characters (no space)",
            name: None,
        }),
    }
}

fn check_env_name(setting: &'static str, name: String) -> Result<String, InvalidTool> {
    let allowed = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_';
    let valid =
        name.bytes().all(allowed) && name.bytes().next().is_some_and(|b| !b.is_ascii_digit());
    match valid {
        true => Ok(name),
        false => Err(InvalidTool {
            setting,
            value: name,
            expected: "uppercase ASCII letters, digits and `_`, not starting with a digit",
            name: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_derived_and_checked() {
        let tool = Tool::new("my-tool.v2").unwrap();
        assert_eq!(tool.marker(), "my-tool.v2");
        assert_eq!(tool.mode_env_var(), "MY_TOOL_V2_LOCAL_DAEMON");
        assert_eq!(Tool::default(), Tool::heddle());
        assert_eq!(Tool::heddle().marker(), "heddle-agent");
        for bad in ["", "my tool", "ünïcode", "a\nb"] {
            assert!(Tool::new(bad).is_err(), "{bad:?}");
        }
        assert!(
            Tool::new("9lives").is_err(),
            "a variable may not start with a digit"
        );
        let error = Tool::heddle().with_mode_env_var("lower").unwrap_err();
        assert_eq!(
            error.to_string(),
            "its mode variable would be \"lower\"; expected uppercase ASCII letters, digits and `_`, not starting with a digit"
        );
        let error = Tool::new("a+b").unwrap_err().to_string();
        assert!(
            error.starts_with(
                "invalid tool name \"a+b\": its mode variable would be \"A+B_LOCAL_DAEMON\""
            ),
            "{error}"
        );
        assert!(Tool::heddle().with_marker("x".repeat(65)).is_err());
    }
}
