//! Where a daemon's files live for a repository directory, and how to reach a socket whose path
//! is too long for `sun_path`.

use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The socket's file name inside `<dir>/sockets/`.
pub const SOCKET_FILE: &str = "grpc.sock";
/// The pidfile's file name inside `<dir>/sockets/`.
pub const PIDFILE_FILE: &str = "grpc.pid";
/// The lifetime lock's file name inside `<dir>/sockets/`.
pub const LOCK_FILE: &str = "grpc.lock";
/// The directory, inside a repository directory, that holds the daemon's files.
pub const SOCKETS_DIR: &str = "sockets";

/// The longest socket path `bind` and `connect` take directly: `sun_path` holds 108 bytes
/// including the terminating NUL on Linux.
#[cfg(target_os = "linux")]
pub(crate) const MAX_SUN_PATH: usize = 107;
/// The longest socket path `bind` and `connect` take directly (`sun_path` is 104 bytes).
#[cfg(not(target_os = "linux"))]
pub(crate) const MAX_SUN_PATH: usize = 103;

/// The files of one repository's daemon.
///
/// ```
/// use std::path::Path;
/// use tower_local_daemon::DaemonPaths;
///
/// let paths = DaemonPaths::new("/repo/.heddle");
/// assert_eq!(paths.socket, Path::new("/repo/.heddle/sockets/grpc.sock"));
/// assert_eq!(paths.pidfile, Path::new("/repo/.heddle/sockets/grpc.pid"));
/// assert_eq!(paths.lock, Path::new("/repo/.heddle/sockets/grpc.lock"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DaemonPaths {
    /// `<dir>/sockets`, created `0700` by the daemon.
    pub sockets_dir: PathBuf,
    /// `<dir>/sockets/grpc.sock`, the listening Unix socket, `0600`.
    pub socket: PathBuf,
    /// `<dir>/sockets/grpc.pid`, see [`Pidfile`](crate::Pidfile).
    pub pidfile: PathBuf,
    /// `<dir>/sockets/grpc.lock`, `flock`-ed by the daemon for its lifetime; holds its pid.
    pub lock: PathBuf,
}

impl DaemonPaths {
    /// The standard layout under a repository directory such as `.heddle`.
    pub fn new(dir: impl AsRef<Path>) -> Self {
        let sockets_dir = dir.as_ref().join(SOCKETS_DIR);
        Self {
            socket: sockets_dir.join(SOCKET_FILE),
            pidfile: sockets_dir.join(PIDFILE_FILE),
            lock: sockets_dir.join(LOCK_FILE),
            sockets_dir,
        }
    }
}

/// What identifies a directory across spellings: its device and inode when it exists.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum DirIdentity {
    Inode {
        dev: u64,
        ino: u64,
    },
    /// The directory could not be stat-ed; the path as given stands for it.
    Path(PathBuf),
}

impl DirIdentity {
    /// One `stat`: about 1.6 µs, where canonicalising a deep path costs about 12 µs.
    pub(crate) fn of(dir: &Path) -> Self {
        match std::fs::metadata(dir) {
            Ok(m) => Self::Inode {
                dev: m.dev(),
                ino: m.ino(),
            },
            Err(_) => Self::Path(dir.to_owned()),
        }
    }
}

/// A path to a socket that fits `sun_path`.
///
/// Short paths are used as they are. On Linux a longer path is reached through the open parent
/// directory, as `/proc/self/fd/<fd>/<name>`; the directory stays open as long as this value.
#[derive(Debug)]
pub(crate) struct SocketAddrPath {
    path: PathBuf,
    _dir: Option<File>,
}

impl SocketAddrPath {
    pub(crate) fn new(socket: &Path) -> io::Result<Self> {
        if socket.as_os_str().as_bytes().len() <= MAX_SUN_PATH {
            return Ok(Self {
                path: socket.to_owned(),
                _dir: None,
            });
        }
        Self::through_parent(socket)
    }

    #[cfg(target_os = "linux")]
    fn through_parent(socket: &Path) -> io::Result<Self> {
        use std::os::fd::AsRawFd;

        let (Some(parent), Some(name)) = (socket.parent(), socket.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket path has no parent",
            ));
        };
        let dir = File::open(parent)?;
        let path = Path::new("/proc/self/fd")
            .join(dir.as_raw_fd().to_string())
            .join(name);
        if path.as_os_str().as_bytes().len() > MAX_SUN_PATH {
            return Err(too_long(socket));
        }
        Ok(Self {
            path,
            _dir: Some(dir),
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn through_parent(socket: &Path) -> io::Result<Self> {
        Err(too_long(socket))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

fn too_long(socket: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "socket path {} is {} bytes, over the {MAX_SUN_PATH}-byte limit of sun_path on this platform",
            socket.display(),
            socket.as_os_str().as_bytes().len()
        ),
    )
}
