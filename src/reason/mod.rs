//! Why the daemon route was not taken: one typed reason for every check that can reject.

mod advice;

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::pidfile::PidfileError;

/// Why a directory's daemon is not used, and calls go to the in-process service.
///
/// Each check rejects with its own variant, so a caller, a test or a `status` verb can tell
/// exactly which check failed. [`Display`](fmt::Display) says what happened;
/// [`remedy`](Self::remedy) says what to do about it.
///
/// # Which reason gives which [`LocalDaemonStatus`](crate::LocalDaemonStatus)
///
/// | stage | reason | status from [`probe`](crate::probe) |
/// |---|---|---|
/// | directory | [`UnsearchableDirectory`](Self::UnsearchableDirectory) (this user may not enter it) | `Absent` |
/// | directory | [`SymlinkedSocketsDir`](Self::SymlinkedSocketsDir) | `Absent` |
/// | directory | [`SocketsDirNotADirectory`](Self::SocketsDirNotADirectory) | `Absent` |
/// | directory | [`ForeignSocketsDir`](Self::ForeignSocketsDir) (owned by another uid) | `Absent` |
/// | directory | [`OpenSocketsDir`](Self::OpenSocketsDir) (writable by group or others) | `Absent` |
/// | pidfile | [`NoPidfile`](Self::NoPidfile) (no pidfile, or no sockets directory) | `Absent` |
/// | pidfile | [`MalformedPidfile`](Self::MalformedPidfile) | `Absent` |
/// | pidfile | [`MarkerMismatch`](Self::MarkerMismatch) (a configuration error) | `Absent` |
/// | pidfile | [`UnreadablePidfile`](Self::UnreadablePidfile) | `Absent` |
/// | pidfile | [`LinkedPidfile`](Self::LinkedPidfile) (more than one hard link) | `Absent` |
/// | process | [`ProcessGone`](Self::ProcessGone) (ESRCH or a zombie) | `Stale` |
/// | process | [`ProcessUnreadable`](Self::ProcessUnreadable) | `Stale` |
/// | process | [`ForeignProcess`](Self::ForeignProcess) (another uid) | `Stale` |
/// | process | [`ExecutableMismatch`](Self::ExecutableMismatch) | `Stale` |
/// | process | [`ExecutableReplaced`](Self::ExecutableReplaced) | `Stale` |
/// | process | [`PidReused`](Self::PidReused) | `Stale` |
/// | socket | [`NoSocket`](Self::NoSocket) | `Stale` |
/// | socket | [`NotASocket`](Self::NotASocket) (a symlink, a regular file, a directory) | `Stale` |
/// | socket | [`ForeignSocket`](Self::ForeignSocket) (owned by another uid) | `Stale` |
/// | socket | [`LinkedSocket`](Self::LinkedSocket) (more than one hard link) | `Absent` |
///
/// The probe never returns the reasons of the later stages (connect, peer credentials,
/// handshake, the route itself); those come from
/// [`try_connect_local_daemon_channel`](crate::try_connect_local_daemon_channel) and the layer.
///
/// ```
/// use tower_local_daemon::FallbackReason;
///
/// let reason = FallbackReason::NoPidfile;
/// assert_eq!(reason.to_string(), "no pidfile: no daemon is running for this directory");
/// assert!(reason.remedy().contains("start"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FallbackReason {
    // Stage 1: the sockets directory.
    /// A directory on the way to the daemon's files may not be entered by this user: it lacks
    /// search (`x`) permission for them.
    UnsearchableDirectory {
        /// The first directory on the path that this user may not enter.
        path: PathBuf,
    },
    /// The sockets directory is a symbolic link: it would share another directory's daemon.
    SymlinkedSocketsDir,
    /// The sockets directory is not a directory.
    SocketsDirNotADirectory,
    /// The sockets directory belongs to another user.
    ForeignSocketsDir {
        /// The directory's owner.
        uid: u32,
    },
    /// The sockets directory is writable by group or others, who could replace its files.
    OpenSocketsDir {
        /// The directory's permission bits.
        mode: u32,
    },

    // Stage 1: the pidfile.
    /// There is no pidfile.
    NoPidfile,
    /// The pidfile's bytes are not in the pidfile format.
    MalformedPidfile(PidfileError),
    /// The pidfile is in the format, and its marker (second line) is not the one this client
    /// expects: a daemon of another tool, or a daemon and its clients configured with
    /// different markers (see [`Tool`](crate::Tool)). A configuration error: logged once per
    /// process as a warning.
    MarkerMismatch {
        /// The marker this client expects.
        expected: String,
        /// The marker the pidfile has.
        found: String,
    },
    /// The pidfile could not be read: not a regular file (a symlink, FIFO or directory), or an
    /// I/O error such as permission denied.
    UnreadablePidfile {
        /// `None` when the path is not a regular file; else the I/O error's kind.
        error: Option<io::ErrorKind>,
    },
    /// The pidfile has more than one hard link: it may be another directory's pidfile.
    LinkedPidfile {
        /// Its link count.
        links: u64,
    },

    // Stage 1: the process the pidfile names.
    /// The process is gone: no such process, or a zombie.
    ProcessGone,
    /// The process exists but its uid or executable could not be read.
    ProcessUnreadable {
        /// The I/O error's kind.
        error: io::ErrorKind,
    },
    /// The process runs as another user.
    ForeignProcess {
        /// The process's effective uid.
        uid: u32,
    },
    /// The process runs another executable than the one the identity policy expects.
    ExecutableMismatch,
    /// The process runs an executable that was deleted or replaced on disk after it started.
    ExecutableReplaced,
    /// The process that has the pid now is not the daemon that took the lifetime lock: the
    /// pid was reused. Told by the start ticks and boot id in the lock file, never by a clock.
    PidReused {
        /// The pid.
        pid: u32,
        /// The start the daemon recorded in its lock file.
        recorded: String,
        /// The start of the process that has the pid now.
        actual: String,
    },

    // Stage 1: the socket file.
    /// There is no socket file.
    NoSocket,
    /// The socket path is not a socket: a symlink, a regular file or a directory.
    NotASocket,
    /// The socket file belongs to another user.
    ForeignSocket {
        /// The socket file's owner.
        uid: u32,
    },
    /// The socket has more than one hard link: it may be another directory's socket.
    LinkedSocket {
        /// Its link count.
        links: u64,
    },

    // Stage 2: connect and peer credentials.
    /// Nobody listens on the socket (ECONNREFUSED).
    ConnectionRefused,
    /// Nobody listens on the socket, and this directory's lifetime lock is free although its
    /// lock record names the pidfile's process: the directory's files were copied from another
    /// directory while its daemon ran (`cp -a`). No daemon runs for this directory: a miss,
    /// on which auto-start starts its own.
    LockNotHeld {
        /// The pid the copied pidfile names: another directory's daemon.
        pid: u32,
    },
    /// The daemon's listen backlog is full.
    Busy,
    /// Connecting failed with another I/O error.
    ConnectFailed {
        /// The I/O error's kind.
        error: io::ErrorKind,
    },
    /// The process on the other end of the socket runs as another user.
    PeerUidMismatch {
        /// Our effective uid.
        expected: u32,
        /// The peer's uid, as the kernel reports it.
        actual: u32,
    },
    /// The process on the other end of the socket is not the one the pidfile names.
    PeerPidMismatch {
        /// The pidfile's pid.
        expected: u32,
        /// The peer's pid, as the kernel reports it.
        actual: Option<i32>,
    },

    // Stage 3: the handshake.
    /// The HTTP/2 or gRPC handshake failed: the socket does not speak gRPC.
    HandshakeFailed {
        /// What the transport said.
        message: String,
    },
    /// Connect plus handshake did not finish within the deadline.
    DeadlineExceeded,
    /// `Health/Check` answered NOT_SERVING (or SERVICE_UNKNOWN or UNKNOWN) for a required name.
    NotServing {
        /// The service name checked (`""` is the whole server).
        service: String,
    },
    /// The daemon does not host a required service (`Health/Check` answered NOT_FOUND, or its
    /// attestation does not list it).
    ServiceNotHosted {
        /// The service name checked.
        service: String,
    },
    /// The daemon has no health service (UNIMPLEMENTED) and the layer does not accept that.
    HealthUnimplemented,
    /// The daemon reports another version than the one required.
    VersionMismatch {
        /// The required version.
        expected: String,
        /// The daemon's version, if it reported one.
        actual: Option<String>,
    },
    /// The daemon serves another directory than the one the layer was built for: its sockets
    /// directory was shared, linked or moved.
    DirectoryMismatch {
        /// The daemon's pid: `stop` refuses a daemon of another directory, so the remedy names
        /// it.
        pid: u32,
        /// The identity (`dev:ino`) of the layer's directory, or why it could not be read.
        expected: String,
        /// The identity the daemon reports serving.
        served: String,
    },
    /// The daemon does not report which directory it serves, and the layer does not
    /// [accept that](crate::LocalDaemonLayer::accept_unverified_directory).
    DirectoryUnreported,

    // Auto-start.
    /// The layer started a daemon on a miss and it did not come: the command could not be
    /// started, or the daemon exited before serving.
    AutoStartFailed {
        /// What happened, with the daemon's log path and last lines when it exited.
        message: String,
    },

    // After the handshake.
    /// The connection to the daemon ended; calls go in-process until a re-probe succeeds.
    ConnectionLost,
    /// The mode is `off`.
    Disabled,
    /// The platform has no implementation of a check.
    Unsupported,
    /// The checks could not run on the caller's runtime: none is running, or it lacks the
    /// I/O or time driver (learnt from Tokio's panic in the crate's first task on it, since
    /// Tokio has no way to ask), or the checks' task panicked.
    RuntimeUnusable {
        /// What went wrong.
        message: String,
    },
}

impl fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FallbackReason::*;
        match self {
            UnsearchableDirectory { path } => write!(
                f,
                "this user may not enter {}: it lacks search (x) permission for them",
                path.display()
            ),
            SymlinkedSocketsDir => f.write_str("the sockets directory is a symbolic link"),
            SocketsDirNotADirectory => f.write_str("the sockets path is not a directory"),
            ForeignSocketsDir { uid } => {
                write!(
                    f,
                    "the sockets directory belongs to another user (uid {uid})"
                )
            }
            OpenSocketsDir { mode } => write!(
                f,
                "the sockets directory is writable by group or others (mode {mode:03o})"
            ),
            LinkedPidfile { links } => write!(f, "the pidfile has {links} hard links, not 1"),
            LinkedSocket { links } => write!(f, "the socket has {links} hard links, not 1"),
            NoPidfile => f.write_str("no pidfile: no daemon is running for this directory"),
            MalformedPidfile(e) => write!(f, "malformed pidfile: {e}"),
            MarkerMismatch { expected, found } => write!(
                f,
                "the pidfile's marker is {found:?}, and this client expects {expected:?}"
            ),
            UnreadablePidfile { error: None } => {
                f.write_str("the pidfile is not a regular file (a symlink, FIFO or directory)")
            }
            UnreadablePidfile { error: Some(e) } => write!(f, "the pidfile cannot be read: {e}"),
            ProcessGone => f.write_str("the pidfile names a process that is gone"),
            ProcessUnreadable { error } => {
                write!(f, "the pidfile's process cannot be inspected: {error}")
            }
            ForeignProcess { uid } => {
                write!(f, "the pidfile names a process of another user (uid {uid})")
            }
            ExecutableMismatch => {
                f.write_str("the pidfile names a process that runs another executable")
            }
            ExecutableReplaced => f.write_str(
                "the daemon runs an executable that was replaced on disk after it started",
            ),
            PidReused {
                pid,
                recorded,
                actual,
            } => write!(
                f,
                "pid {pid} was reused: the daemon recorded its start as {recorded}, the process now has {actual}"
            ),
            NoSocket => f.write_str("no socket file"),
            NotASocket => f.write_str("the socket path is not a socket"),
            ForeignSocket { uid } => write!(f, "the socket belongs to another user (uid {uid})"),
            ConnectionRefused => f.write_str("connection refused: nobody listens on the socket"),
            LockNotHeld { pid } => write!(
                f,
                "nobody listens on the socket, and pid {pid}, which the pidfile names, holds no lock on this directory: its files were copied from another directory"
            ),
            Busy => f.write_str("the daemon's listen backlog is full"),
            ConnectFailed { error } => write!(f, "connecting to the socket failed: {error}"),
            PeerUidMismatch { expected, actual } => {
                write!(f, "the socket's peer runs as uid {actual}, not {expected}")
            }
            PeerPidMismatch { expected, actual } => match actual {
                Some(actual) => write!(f, "the socket's peer is pid {actual}, not {expected}"),
                None => write!(f, "the socket's peer pid is unknown, not {expected}"),
            },
            HandshakeFailed { message } => write!(f, "the gRPC handshake failed: {message}"),
            DeadlineExceeded => f.write_str("connect and handshake exceeded the deadline"),
            NotServing { service } => write!(f, "health of {service:?} is not SERVING"),
            ServiceNotHosted { service } => write!(f, "the daemon does not host {service:?}"),
            HealthUnimplemented => f.write_str("the daemon has no health service"),
            VersionMismatch { expected, actual } => match actual {
                Some(actual) => write!(f, "the daemon is version {actual}, not {expected}"),
                None => write!(f, "the daemon reports no version; {expected} is required"),
            },
            DirectoryMismatch {
                pid,
                expected,
                served,
            } => write!(
                f,
                "the daemon (pid {pid}) serves directory {served}, not this directory ({expected})"
            ),
            DirectoryUnreported => {
                f.write_str("the daemon does not report which directory it serves")
            }
            ConnectionLost => f.write_str("the connection to the daemon ended"),
            AutoStartFailed { message } => write!(f, "auto-start failed: {message}"),
            Disabled => f.write_str("the local daemon is disabled (mode off)"),
            Unsupported => f.write_str("this platform has no implementation of the checks"),
            RuntimeUnusable { message } => write!(f, "the checks could not run: {message}"),
        }
    }
}

impl std::error::Error for FallbackReason {}
