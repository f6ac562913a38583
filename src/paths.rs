//! Where a daemon's files live for a repository directory, and how to reach a socket whose path
//! is too long for `sun_path`.

use std::fmt;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::protocol::{LOCK_FILE, PIDFILE_FILE, SOCKET_FILE, SOCKETS_DIR};

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
    /// The standard layout under a repository directory such as `.heddle`, made
    /// absolute first ([`std::path::absolute`]: lexically, symlinks kept).
    pub fn new(dir: impl AsRef<Path>) -> Self {
        let sockets_dir = absolute(dir.as_ref()).join(SOCKETS_DIR);
        Self {
            socket: sockets_dir.join(SOCKET_FILE),
            pidfile: sockets_dir.join(PIDFILE_FILE),
            lock: sockets_dir.join(LOCK_FILE),
            sockets_dir,
        }
    }

    /// The daemon's attestation, beside its lock file.
    #[cfg(feature = "client")]
    pub(crate) fn attestation(&self) -> PathBuf {
        self.lock.with_file_name(crate::protocol::ATTESTATION_FILE)
    }

    #[cfg(feature = "client")]
    /// These paths with a socket or pidfile elsewhere. The socket's directory is then the one
    /// the checks require to be private, and the lock file is looked for beside the pidfile.
    pub(crate) fn with_overrides(mut self, socket: Option<&Path>, pidfile: Option<&Path>) -> Self {
        if let Some(socket) = socket {
            self.socket = absolute(socket);
            self.sockets_dir = parent_of(&self.socket);
        }
        if let Some(pidfile) = pidfile {
            self.pidfile = absolute(pidfile);
            self.lock = parent_of(&self.pidfile).join(LOCK_FILE);
        }
        self
    }
}

/// `path` made absolute against the working directory, lexically, as [`std::path::absolute`]
/// does: every directory the crate takes goes through here, once, where it is taken, so that a
/// relative spelling means the same directory in every function and in a daemon started with a
/// working directory of its own. Symlinks are kept (not resolved), for the checks that look at
/// them. A path that cannot be made absolute (empty, or no working directory) stays as it is.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// A file's directory; `.` for a bare file name.
#[cfg(feature = "client")]
fn parent_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The identity of a file or directory: its device and inode, never a path string.
///
/// Its text form, `dev:ino` in decimal, is what a daemon reports for the directory it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileIdentity {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

impl FileIdentity {
    pub(crate) fn of(metadata: &Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }

    /// The identity in an `fstat`'s result.
    pub(crate) fn of_stat(stat: &nix::sys::stat::FileStat) -> Self {
        Self {
            dev: stat.st_dev,
            ino: stat.st_ino,
        }
    }

    /// The identity of what `path` names, following symlinks.
    #[cfg(feature = "client")]
    pub(crate) fn following(path: &Path) -> io::Result<Self> {
        std::fs::metadata(path).map(|m| Self::of(&m))
    }

    /// Parses the `dev:ino` text form, each number as the pidfile's are: no sign, no leading
    /// zero.
    #[cfg(feature = "client")]
    pub(crate) fn parse(text: &str) -> Option<Self> {
        use crate::pidfile::parse_canonical_decimal as number;
        let (dev, ino) = text.split_once(':')?;
        Some(Self {
            dev: number(dev.as_bytes())?,
            ino: number(ino.as_bytes())?,
        })
    }
}

impl fmt::Display for FileIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}

/// What identifies a directory across spellings: its device and inode when it exists.
#[cfg(feature = "client")]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum DirIdentity {
    Inode(FileIdentity),
    /// The directory could not be stat-ed; the path as given stands for it.
    Path(PathBuf),
}

#[cfg(feature = "client")]
impl DirIdentity {
    /// One `stat`, where canonicalising a path costs one per component.
    pub(crate) fn of(dir: &Path) -> Self {
        match FileIdentity::following(dir) {
            Ok(id) => Self::Inode(id),
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

    /// A non-blocking connect to the socket: a Unix socket's `connect` completes in the call
    /// (the kernel queues the connection on the listener's backlog) or fails at once, with
    /// `EAGAIN` when that backlog is full.
    pub(crate) fn connect_now(&self) -> io::Result<std::os::fd::OwnedFd> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        connect(fd.as_raw_fd(), &UnixAddr::new(self.path())?)?;
        Ok(fd)
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
