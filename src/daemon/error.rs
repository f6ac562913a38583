//! [`DaemonError`]: why a daemon could not start or serve.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Why a daemon could not start or serve.
///
/// Its message says what failed and where; the cause, when there is one (an I/O error, the
/// server's error), is its [`source`](std::error::Error::source), so that an error chain
/// prints it once.
///
/// ```
/// use std::error::Error;
/// use tower_local_daemon::daemon::DaemonError;
///
/// let file = std::env::temp_dir().join("tower-local-daemon-doc-daemon-error");
/// std::fs::write(&file, "not a directory").unwrap();
/// let error = tower_local_daemon::Daemon::new(&file).bind().unwrap_err();
/// assert!(matches!(error, DaemonError::Io { .. }));
/// assert_eq!(error.to_string(), format!("failed to create the directory at {}", file.display()));
/// assert!(error.source().is_some());
/// # std::fs::remove_file(&file).unwrap();
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum DaemonError {
    /// Another daemon holds the directory's lifetime lock.
    AlreadyRunning {
        /// The holder's pid, as it wrote it in the lock file.
        pid: Option<u32>,
    },
    /// A process that took no lock (an older daemon) still answers on the socket.
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The sockets directory is not a directory owned by the daemon's effective uid.
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// An I/O error while doing `action` on `path`.
    Io {
        /// What the daemon was doing.
        action: &'static str,
        /// The file it was doing it to.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The daemon was started on a miss for one directory and given another: a relative
    /// directory in its arguments, resolved against its working directory.
    WrongDirectory {
        /// The directory it was started for, from [`DAEMON_DIR_ENV`](crate::protocol::DAEMON_DIR_ENV).
        started_for: PathBuf,
        /// The directory it was given, made absolute.
        given: PathBuf,
    },
    /// The version is not a valid metadata value.
    InvalidVersion(String),
    /// The pidfile marker is not one line of visible ASCII.
    InvalidMarker(String),
    /// The gRPC server failed.
    Serve(tonic::transport::Error),
}

impl DaemonError {
    /// An I/O error met while doing `action` on `path`.
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyRunning { pid: Some(pid) } => write!(
                f,
                "a daemon is already running for this directory (pid {pid} holds the lock); stop it first"
            ),
            Self::AlreadyRunning { pid: None } => f.write_str(
                "a daemon is already running for this directory (it holds the lock); stop it first",
            ),
            Self::SocketInUse { path } => write!(
                f,
                "a process that holds no lock still answers on {}; stop it first",
                path.display()
            ),
            Self::UnsafeDirectory { path, problem } => {
                write!(f, "refusing to use {}: {problem}", path.display())
            }
            // The cause is the source: an error chain prints it once.
            Self::Io { action, path, .. } => write!(f, "failed to {action} at {}", path.display()),
            Self::WrongDirectory { started_for, given } => write!(
                f,
                "refusing to serve {}: this daemon was started for {}; a relative directory is resolved against the daemon's working directory, so pass the directory as an absolute path in the auto-start arguments",
                given.display(),
                started_for.display()
            ),
            Self::InvalidVersion(v) => write!(f, "version {v:?} is not a valid metadata value"),
            Self::InvalidMarker(m) => {
                write!(f, "pidfile marker {m:?} is not one line of visible ASCII")
            }
            Self::Serve(_) => f.write_str("the gRPC server failed"),
        }
    }
}

impl std::error::Error for DaemonError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Serve(e) => Some(e),
            _ => None,
        }
    }
}
