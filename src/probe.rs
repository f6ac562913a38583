//! The first check: what the files on disk and the kernel say, with syscalls only.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::IdentityPolicy;
use crate::paths::DirIdentity;
use crate::pidfile::{Pidfile, ReadError};
use crate::process::{self, FileId, ProcessError};
use crate::{DaemonPaths, FallbackReason};

/// Where a daemon that passed the probe listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UdsTarget {
    /// The Unix socket to connect to.
    pub socket_path: PathBuf,
    /// The daemon's pid, from its pidfile; the socket's peer must be this process.
    pub pid: u32,
}

/// What the probe concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalDaemonStatus {
    /// The pidfile names a live process of ours, and its socket is in place.
    Running {
        /// The daemon's pid.
        pid: u32,
    },
    /// The pidfile names a process, and it is not usable.
    Stale {
        /// The pid the pidfile names.
        pid: u32,
        /// Why it is not usable.
        reason: FallbackReason,
    },
    /// Nothing usable on disk: no pidfile, or one that is not a pidfile.
    Absent {
        /// Why.
        reason: FallbackReason,
    },
}

impl LocalDaemonStatus {
    /// The reason the daemon is not usable, or `None` when it is running.
    ///
    /// ```
    /// use tower_local_daemon::{FallbackReason, LocalDaemonStatus};
    ///
    /// let stale = LocalDaemonStatus::Stale { pid: 7, reason: FallbackReason::ProcessGone };
    /// assert_eq!(stale.reason(), Some(&FallbackReason::ProcessGone));
    /// assert_eq!(LocalDaemonStatus::Running { pid: 7 }.reason(), None);
    /// ```
    pub fn reason(&self) -> Option<&FallbackReason> {
        match self {
            Self::Running { .. } => None,
            Self::Stale { reason, .. } | Self::Absent { reason } => Some(reason),
        }
    }
}

/// The result of [`probe`]: the paths it looked at and what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDaemonProbe {
    /// The socket path checked.
    pub socket_path: PathBuf,
    /// The pidfile path read.
    pub pid_path: PathBuf,
    /// What the probe concluded.
    pub status: LocalDaemonStatus,
}

impl LocalDaemonProbe {
    /// The target to connect to, or the reason there is none.
    pub(crate) fn into_target(self) -> Result<UdsTarget, FallbackReason> {
        match self.status {
            LocalDaemonStatus::Running { pid } => Ok(UdsTarget {
                socket_path: self.socket_path,
                pid,
            }),
            LocalDaemonStatus::Stale { reason, .. } | LocalDaemonStatus::Absent { reason } => {
                Err(reason)
            }
        }
    }

    /// The target to connect to, when the daemon is running.
    ///
    /// ```
    /// let found = tower_local_daemon::probe("/no/such/repo/.heddle");
    /// assert_eq!(found.target(), None);
    /// assert!(found.socket_path.ends_with("sockets/grpc.sock"));
    /// ```
    pub fn target(&self) -> Option<UdsTarget> {
        self.clone().into_target().ok()
    }
}

/// Probes a repository directory's daemon files: synchronous, syscalls only, never cached.
///
/// The checks, in order: the pidfile parses; the process it names is alive (ESRCH and zombies
/// are gone; EPERM is alive and someone else's); runs as our effective uid; runs our own
/// executable (device and inode); started no later than the pidfile says (plus a second of
/// slack), else its pid was reused; the socket path is a socket (not a symlink) owned by our
/// effective uid. [`FallbackReason`] has the table of which reason gives which status.
///
/// ```
/// use tower_local_daemon::{probe, FallbackReason, LocalDaemonStatus};
///
/// let dir = std::env::temp_dir().join("tower-local-daemon-doc-probe-nothing-here");
/// let found = probe(&dir);
/// assert_eq!(found.status, LocalDaemonStatus::Absent { reason: FallbackReason::NoPidfile });
/// ```
pub fn probe(heddle_dir: impl AsRef<Path>) -> LocalDaemonProbe {
    let paths = DaemonPaths::new(heddle_dir);
    probe_files(
        &paths.socket,
        &paths.pidfile,
        &IdentityPolicy::SameExecutable,
    )
}

/// [`probe`], cached per directory for [`DETECT_CACHE_TTL`]: the target when the daemon is
/// running, `None` otherwise.
///
/// The cache is keyed by the directory's identity (device and inode), so two spellings of one
/// directory share it. Use [`probe`] to know why a daemon was not found.
///
/// ```
/// let dir = std::env::temp_dir().join("tower-local-daemon-doc-detect");
/// assert_eq!(tower_local_daemon::detect_local_daemon(&dir), None);
/// ```
pub fn detect_local_daemon(heddle_dir: impl AsRef<Path>) -> Option<UdsTarget> {
    type Cache = HashMap<DirIdentity, (Instant, Option<UdsTarget>)>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let dir = heddle_dir.as_ref();
    let key = DirIdentity::of(dir);
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((at, target)) = cache.get(&key)
        && at.elapsed() < DETECT_CACHE_TTL
    {
        return target.clone();
    }
    let target = probe(dir).target();
    cache.insert(key, (Instant::now(), target.clone()));
    target
}

/// How long [`detect_local_daemon`] keeps a result.
pub const DETECT_CACHE_TTL: Duration = Duration::from_secs(1);

/// [`probe`] with explicit paths and identity policy.
pub(crate) fn probe_files(
    socket_path: &Path,
    pid_path: &Path,
    identity: &IdentityPolicy,
) -> LocalDaemonProbe {
    LocalDaemonProbe {
        socket_path: socket_path.to_owned(),
        pid_path: pid_path.to_owned(),
        status: status_of(socket_path, pid_path, identity),
    }
}

fn status_of(socket_path: &Path, pid_path: &Path, identity: &IdentityPolicy) -> LocalDaemonStatus {
    let pidfile = match read_pidfile(pid_path) {
        Ok(pidfile) => pidfile,
        Err(reason) => return LocalDaemonStatus::Absent { reason },
    };
    let pid = pidfile.pid;
    match check_process(&pidfile, identity).and_then(|()| check_socket(socket_path)) {
        Ok(()) => LocalDaemonStatus::Running { pid },
        Err(reason) => LocalDaemonStatus::Stale { pid, reason },
    }
}

/// The pidfile stage.
pub(crate) fn read_pidfile(pid_path: &Path) -> Result<Pidfile, FallbackReason> {
    Pidfile::read(pid_path).map_err(|e| match e {
        ReadError::Missing => FallbackReason::NoPidfile,
        ReadError::Malformed(e) => FallbackReason::MalformedPidfile(e),
        ReadError::NotRegularFile => FallbackReason::UnreadablePidfile { error: None },
        ReadError::Io(kind) => FallbackReason::UnreadablePidfile { error: Some(kind) },
    })
}

/// The process stage: alive, our uid, the expected executable, not a reused pid.
pub(crate) fn check_process(
    pidfile: &Pidfile,
    identity: &IdentityPolicy,
) -> Result<(), FallbackReason> {
    let info = process::check_alive(pidfile.pid).map_err(process_reason)?;
    let uid = info.effective_uid().map_err(process_reason)?;
    if uid != nix::unistd::geteuid().as_raw() {
        return Err(FallbackReason::ForeignProcess { uid });
    }
    let exe = info.executable().map_err(process_reason)?;
    let expected = match identity {
        IdentityPolicy::SameExecutable => process::own_executable(),
        IdentityPolicy::Executable(path) => FileId::of(path).map_err(|e| e.kind()),
    };
    if expected != Ok(exe) {
        return Err(if info.executable_deleted() {
            FallbackReason::ExecutableReplaced
        } else {
            FallbackReason::ExecutableMismatch
        });
    }
    // A daemon writes its pidfile after it starts, so only a start *after* the pidfile's time is
    // evidence of reuse. One second of slack covers the rounding of both clocks.
    let process_started_at = info.started_at().map_err(process_reason)?;
    if process_started_at > pidfile.started_at.saturating_add(1) {
        return Err(FallbackReason::PidReused {
            process_started_at,
            pidfile_started_at: pidfile.started_at,
        });
    }
    Ok(())
}

fn process_reason(e: ProcessError) -> FallbackReason {
    match e {
        ProcessError::Gone | ProcessError::Zombie => FallbackReason::ProcessGone,
        ProcessError::Unreadable(error) => FallbackReason::ProcessUnreadable { error },
        ProcessError::Unsupported => FallbackReason::Unsupported,
    }
}

/// The socket stage: a socket (not a symlink) owned by our effective uid.
pub(crate) fn check_socket(socket_path: &Path) -> Result<(), FallbackReason> {
    let metadata = std::fs::symlink_metadata(socket_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => FallbackReason::NoSocket,
        error => FallbackReason::ConnectFailed { error },
    })?;
    if !metadata.file_type().is_socket() {
        return Err(FallbackReason::NotASocket);
    }
    if metadata.uid() != nix::unistd::geteuid().as_raw() {
        return Err(FallbackReason::ForeignSocket {
            uid: metadata.uid(),
        });
    }
    Ok(())
}
