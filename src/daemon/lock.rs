//! The lifetime lock: `<dir>/sockets/grpc.lock`, `flock`-ed by the daemon for as long as it
//! runs, holding its [`LockRecord`]. Only the holder may remove leftovers or serve.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::error::DaemonError;
use super::files::SocketsDir;
use crate::lockfile::LockRecord;
use crate::paths::FileIdentity;
use crate::process;
use crate::protocol::LOCK_FILE;

/// An exclusive `flock` on the lock file, released when dropped.
#[derive(Debug)]
pub(super) struct LifetimeLock {
    /// The locked file's identity.
    id: FileIdentity,
    _file: Flock<File>,
}

impl LifetimeLock {
    /// Takes the lock without waiting, or says which pid holds it.
    pub(super) fn acquire(dir: &SocketsDir) -> Result<Self, DaemonError> {
        let io_error = |source| {
            DaemonError::io(
                "take the lifetime lock",
                &dir.display_path(LOCK_FILE),
                source,
            )
        };
        loop {
            let file = dir.open_file(LOCK_FILE, false).map_err(io_error)?;
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
            // locked it: the lock is ours only if the name still names the locked file.
            let ours = FileIdentity::of(&locked.metadata().map_err(io_error)?);
            if dir.identity(LOCK_FILE) != Some(ours) {
                continue;
            }
            locked.set_len(0).map_err(io_error)?;
            locked.rewind().map_err(io_error)?;
            locked.write_all(record().as_bytes()).map_err(io_error)?;
            return Ok(Self {
                id: ours,
                _file: locked,
            });
        }
    }

    /// Unlinks the lock file, if the name still names it, while the lock is still held; the
    /// lock goes with `self`.
    pub(super) fn remove(self, dir: &SocketsDir) {
        dir.remove_if_ours(LOCK_FILE, Some(self.id))
    }
}

/// What the holder writes: its pid and, where the kernel tells it, its start, so that a client
/// tells a reused pid apart without a clock.
fn record() -> String {
    let pid = std::process::id();
    match process::own_start() {
        Ok(start) => LockRecord { pid, start }.render(),
        Err(_) => format!("{pid}\n"),
    }
}

/// The pid in a lock file held by someone else. The holder writes it right after locking, so
/// an empty file is read again for a moment.
fn read_holder(mut file: File) -> Option<u32> {
    for _ in 0..20 {
        let mut bytes = Vec::new();
        if file.rewind().is_ok()
            && file.read_to_end(&mut bytes).is_ok()
            && let Some(pid) = LockRecord::holder_pid(&bytes)
        {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}
