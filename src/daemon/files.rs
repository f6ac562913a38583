//! The files of the sockets directory, reached only through one open directory descriptor.
//!
//! The daemon opens `<dir>/sockets` once (`O_DIRECTORY | O_NOFOLLOW`) and checks its owner and
//! mode on that descriptor. Everything after (the lock, the leftover check and removal, the
//! bind, the pidfile's write and rename, the removal at shutdown) names files relative to it.
//! So a `sockets` swapped for a symlink after the check cannot make the daemon lock, delete or
//! bind inside another repository, and a daemon whose directory was removed and re-created
//! under it cannot touch the new directory's files: its descriptor still names the old one.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use super::error::DaemonError;
use crate::paths::{FileIdentity, SocketAddrPath};
use crate::peer::own_uid;
use crate::protocol::{
    ATTESTATION_FILE, PIDFILE_FILE, SOCKET_FILE, SPAWN_LOCK_FILE, SPAWN_RECORD_FILE,
};
use crate::spawn_record::SpawnRecord;

/// The open sockets directory.
#[derive(Debug)]
pub(super) struct SocketsDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl SocketsDir {
    /// Creates `dir` with mode `0700` (and its parents), or opens the one there: a real
    /// directory (not a symlink) owned by our effective uid, then tightened to `0700` through
    /// the descriptor.
    pub(super) fn open(dir: &Path) -> Result<Self, DaemonError> {
        let io_error = |action, source| DaemonError::io(action, dir, source);
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| DaemonError::io("create the directory", parent, e))?;
        }
        match nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(io_error("create the sockets directory", e.into())),
        }
        let unsafe_dir = |problem| DaemonError::UnsafeDirectory {
            path: dir.to_owned(),
            problem,
        };
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
        let fd = nix::fcntl::open(dir, flags, Mode::empty()).map_err(|e| match e {
            nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => {
                unsafe_dir("it is not a directory (a symlink?)")
            }
            e => io_error("open the sockets directory", e.into()),
        })?;
        let stat = nix::sys::stat::fstat(&fd).map_err(|e| io_error("inspect", e.into()))?;
        if stat.st_uid != own_uid() {
            return Err(unsafe_dir("it is owned by another user"));
        }
        // The umask may have narrowed the mode at creation; an old directory may be looser.
        if stat.st_mode & 0o7777 != 0o700 {
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o700))
                .map_err(|e| io_error("set the mode of", e.into()))?;
        }
        Ok(Self {
            path: dir.to_owned(),
            fd,
        })
    }

    /// The path of `name` in this directory, for errors and logs.
    pub(super) fn display_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A path that names `name` in the open directory itself, whatever happens to the
    /// directory's path: `/proc/self/fd/<fd>/<name>` on Linux, short enough for `sun_path`.
    #[cfg(target_os = "linux")]
    pub(super) fn fd_path(&self, name: &str) -> PathBuf {
        use std::os::fd::AsRawFd;
        Path::new("/proc/self/fd")
            .join(self.fd.as_raw_fd().to_string())
            .join(name)
    }

    /// Elsewhere there is no `/proc/self/fd`: the path is the directory's path, so the bind and
    /// the leftover check go by path there (not verified off Linux).
    #[cfg(not(target_os = "linux"))]
    pub(super) fn fd_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Opens (creating `0600`) `name` for reading and writing, never through a symlink.
    pub(super) fn open_file(&self, name: &str, truncate: bool) -> io::Result<File> {
        let mut flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        if truncate {
            flags |= OFlag::O_TRUNC;
        }
        let fd = nix::fcntl::openat(&self.fd, name, flags, Mode::from_bits_truncate(0o600))?;
        Ok(File::from(fd))
    }

    /// Opens (creating `0600`) `name` to append to, never through a symlink, never blocking, and
    /// only a regular file.
    pub(super) fn open_append(&self, name: &str) -> io::Result<File> {
        let flags = OFlag::O_WRONLY
            | OFlag::O_APPEND
            | OFlag::O_CREAT
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC;
        let file = File::from(nix::fcntl::openat(
            &self.fd,
            name,
            flags,
            Mode::from_bits_truncate(0o600),
        )?);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(file)
    }

    /// Renames `from` to `to`, both in this directory.
    pub(super) fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        Ok(nix::fcntl::renameat(&self.fd, from, &self.fd, to)?)
    }

    /// What `name` is, without following a symlink; `None` when there is nothing.
    pub(super) fn stat(&self, name: &str) -> io::Result<Option<FileStat>> {
        match nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat)),
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The identity of the directory that holds the sockets directory: the directory this
    /// daemon serves, as the descriptor sees it (a path could name another by now).
    pub(super) fn parent_identity(&self) -> io::Result<FileIdentity> {
        let stat = nix::sys::stat::fstatat(&self.fd, "..", AtFlags::empty())?;
        Ok(FileIdentity::of_stat(&stat))
    }

    /// Marks in the spawn record, if there is one, that this daemon serves
    /// ([`SpawnRecord::mark_served`]); `Ok(false)` while a spawner holds the spawn lock.
    pub(super) fn mark_served(&self) -> io::Result<bool> {
        if self.stat(SPAWN_RECORD_FILE)?.is_none() {
            return Ok(true);
        }
        let lock = self.open_file(SPAWN_LOCK_FILE, false)?;
        SpawnRecord::mark_served(lock, &self.fd_path(""))
    }

    /// The identity of `name`, if it exists.
    pub(super) fn identity(&self, name: &str) -> Option<FileIdentity> {
        self.try_identity(name).ok().flatten()
    }

    /// [`identity`](Self::identity), telling a failed `stat` from a missing file.
    pub(super) fn try_identity(&self, name: &str) -> io::Result<Option<FileIdentity>> {
        Ok(self.stat(name)?.as_ref().map(FileIdentity::of_stat))
    }

    /// Whether `stat` is a socket's.
    fn is_socket(stat: &FileStat) -> bool {
        SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFSOCK
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        Ok(nix::unistd::unlinkat(
            &self.fd,
            name,
            UnlinkatFlags::NoRemoveDir,
        )?)
    }

    /// Removes `name` if it is still the file this daemon made (`ours`).
    pub(super) fn remove_if_ours(&self, name: &str, ours: Option<FileIdentity>) {
        if ours.is_none() || self.identity(name) != ours {
            return;
        }
        if let Err(e) = self.remove(name) {
            let path = self.display_path(name);
            tracing::warn!(path = %path.display(), error = %e, "could not remove");
        }
    }

    /// Writes `name` atomically: a temporary file beside it, then a rename over it. Returns the
    /// identity of the file written; a file whose identity cannot be read is removed again (the
    /// daemon could not tell it for its own when it stops) and is an error.
    pub(super) fn write_atomically(&self, name: &str, contents: &str) -> io::Result<FileIdentity> {
        let tmp = format!("{name}.tmp.{}", std::process::id());
        let mut renamed = false;
        let result = (|| {
            // A crashed daemon with the same pid may have left the temporary file behind; the
            // directory is the daemon's own (0700), so truncating it is safe.
            let mut file = self.open_file(&tmp, true)?;
            // No `fsync`: the files describe this boot's running daemon. A crash of the daemon
            // or the system keeps the kernel's view whole (the rename is atomic in it); after a
            // power loss a torn file reads as malformed or stale, and the next daemon's start
            // removes it; an `fsync` would cost each start a flush to disk.
            file.write_all(contents.as_bytes())?;
            nix::fcntl::renameat(&self.fd, tmp.as_str(), &self.fd, name)?;
            renamed = true;
            self.try_identity(name)?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "the file was gone once written")
            })
        })();
        // On failure, only what this call made goes: the temporary file, or what it became.
        if result.is_err() {
            let _ = self.remove(if renamed { name } else { &tmp });
        }
        result
    }

    /// Removes a crashed daemon's pidfile, attestation and socket. Called only by the lock
    /// holder. A socket that still answers belongs to a live daemon that takes no lock: it is
    /// left alone.
    pub(super) fn remove_leftovers(&self) -> Result<(), DaemonError> {
        let socket = self.display_path(SOCKET_FILE);
        let stat = self
            .stat(SOCKET_FILE)
            .map_err(|e| DaemonError::io("inspect the socket", &socket, e))?;
        if let Some(stat) = stat {
            if Self::is_socket(&stat) && socket_answers(&self.fd_path(SOCKET_FILE)) {
                return Err(DaemonError::SocketInUse { path: socket });
            }
            self.remove(SOCKET_FILE)
                .map_err(|e| DaemonError::io("remove the leftover socket", &socket, e))?;
            tracing::info!(socket = %socket.display(), "removed a leftover socket");
        }
        for (name, action) in [
            (PIDFILE_FILE, "remove the leftover pidfile"),
            (ATTESTATION_FILE, "remove the leftover attestation"),
        ] {
            let path = self.display_path(name);
            match self.remove(name) {
                Ok(()) => tracing::info!(path = %path.display(), "removed a leftover file"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(DaemonError::io(action, &path, e)),
            }
        }
        Ok(())
    }
}

/// Whether someone listens on the socket: a non-blocking connect, so that a hung daemon with a
/// full backlog cannot block the start (it counts as listening).
fn socket_answers(path: &Path) -> bool {
    let Ok(addr) = SocketAddrPath::new(path) else {
        return false;
    };
    match addr.connect_now() {
        Ok(_) => true,
        Err(e) => matches!(
            nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
            nix::errno::Errno::EAGAIN | nix::errno::Errno::EINPROGRESS
        ),
    }
}
