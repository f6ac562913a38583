//! The lifetime lock: `<dir>/sockets/grpc.lock`, `flock`-ed by the daemon for as long as it
//! runs, holding its pid. Only the holder may remove leftovers or serve.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};

use super::DaemonError;

/// An exclusive `flock` on the lock file, released when dropped.
#[derive(Debug)]
pub(crate) struct LifetimeLock {
    path: PathBuf,
    /// The locked file's device and inode.
    id: (u64, u64),
    _file: Flock<File>,
}

impl LifetimeLock {
    /// Takes the lock without waiting, or says which pid holds it.
    pub(crate) fn acquire(path: &Path) -> Result<Self, DaemonError> {
        let io_error = |source| DaemonError::io("take the lifetime lock", path)(source);
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
                .open(path)
                .map_err(io_error)?;
            let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => locked,
                Err((file, Errno::EWOULDBLOCK)) => {
                    return Err(DaemonError::AlreadyRunning {
                        pid: read_holder(file),
                    });
                }
                Err((_, errno)) => return Err(io_error(errno.into())),
            };
            // A holder that was shutting down may have unlinked the file we opened before we
            // locked it: the lock is ours only if the path still names the locked file.
            let ours = locked.metadata().map_err(io_error)?;
            match std::fs::symlink_metadata(path) {
                Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => {}
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(e)),
            }
            locked.set_len(0).map_err(io_error)?;
            locked.rewind().map_err(io_error)?;
            writeln!(locked, "{}", std::process::id()).map_err(io_error)?;
            return Ok(Self {
                path: path.to_owned(),
                id: (ours.dev(), ours.ino()),
                _file: locked,
            });
        }
    }

    /// Unlinks the lock file, if the path still names it, while the lock is still held; the
    /// lock goes with `self`.
    pub(crate) fn remove(self) {
        super::remove_if_ours(&self.path, Some(self.id))
    }
}

/// The pid in a lock file held by someone else. The holder writes it right after locking, so
/// an empty file is read again for a moment.
fn read_holder(mut file: File) -> Option<u32> {
    for _ in 0..20 {
        let mut text = String::new();
        if file.rewind().is_ok()
            && file.read_to_string(&mut text).is_ok()
            && let Ok(pid) = text.trim().parse()
        {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}
