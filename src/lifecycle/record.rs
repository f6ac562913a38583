//! The attempt record, `sockets/spawn.record`: the one place that knows its format, and what
//! it says of a pending start and of the backoff.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::OFlag;

use crate::pidfile::read_bounded;
use crate::process::exited;
use crate::protocol::SPAWN_RECORD_FILE;

/// The longest backoff between two starts whose daemons never served.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The attempt record, `sockets/spawn.record`: one line of
/// `<last spawn, Unix milliseconds> <failures> <spawns> <pid>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SpawnRecord {
    pub(crate) last_spawn_ms: u64,
    /// Starts in a row not seen serving since.
    pub(crate) failures: u32,
    pub(crate) spawns: u64,
    pub(crate) pid: u32,
}

impl SpawnRecord {
    /// Read as defensively as a pidfile (bounded, no symlink followed, never blocking on a
    /// FIFO): `auto_start_status` reads it in any directory it is given.
    pub(crate) fn read(sockets_dir: &Path) -> Option<Self> {
        let (bytes, _) = read_bounded(&sockets_dir.join(SPAWN_RECORD_FILE)).ok()?;
        let text = std::str::from_utf8(&bytes).ok()?;
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        Some(Self {
            last_spawn_ms: fields.next()?.ok()?,
            failures: u32::try_from(fields.next()?.ok()?).ok()?,
            spawns: fields.next()?.ok()?,
            pid: u32::try_from(fields.next()?.ok()?).ok()?,
        })
    }

    /// Writes the record whole (a temporary file renamed over it), or not at all: a temporary
    /// file is never left behind. Whatever has the temporary file's name (a stale one, a FIFO)
    /// is replaced, in the sockets directory that only we can write.
    pub(super) fn write(&self, sockets_dir: &Path) -> io::Result<()> {
        let path = sockets_dir.join(SPAWN_RECORD_FILE);
        let tmp = sockets_dir.join(format!("{SPAWN_RECORD_FILE}.tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
            .open(&tmp)
            .and_then(|mut file| {
                writeln!(
                    file,
                    "{} {} {} {}",
                    self.last_spawn_ms, self.failures, self.spawns, self.pid
                )
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    pub(crate) fn last_spawn(&self) -> Option<SystemTime> {
        (self.spawns > 0).then(|| UNIX_EPOCH + Duration::from_millis(self.last_spawn_ms))
    }

    /// A started daemon that is still alive and younger than the start timeout is coming.
    pub(super) fn pending(&self, now: SystemTime, start_timeout: Duration) -> bool {
        let young = self
            .last_spawn()
            .is_some_and(|at| now.duration_since(at).unwrap_or_default() < start_timeout);
        young && self.pid != 0 && !exited(self.pid)
    }

    /// After starts that did not serve: 1 s, 2 s, 4 s … up to five minutes after the last.
    pub(crate) fn backoff_until(&self) -> Option<SystemTime> {
        let last = self.last_spawn()?;
        let doublings = self.failures.checked_sub(1)?;
        let backoff = Duration::from_secs(1)
            .checked_mul(1 << doublings.min(16))
            .unwrap_or(MAX_BACKOFF)
            .min(MAX_BACKOFF);
        Some(last + backoff)
    }
}
