//! The attempt record, `sockets/spawn.record`: the one place that knows its format, and what
//! it says of a pending start and of the backoff.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::OFlag;

use crate::pidfile::read_bounded;
use crate::process::{self, ProcessStart, exited};
use crate::protocol::SPAWN_RECORD_FILE;

/// The longest backoff between two starts whose daemons never served.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The attempt record, `sockets/spawn.record`: one line of
/// `<last spawn, Unix milliseconds> <failures> <spawns> <pid> [<start ticks> <boot id>]`.
///
/// The started process's start (ticks and boot id, as the lock record has them) came later:
/// a client that reads only the first four fields reads a newer record as before, and a record
/// without them is still read, but never proves a start pending (nothing then waits for it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SpawnRecord {
    pub(crate) last_spawn_ms: u64,
    /// Starts in a row not seen serving since.
    pub(crate) failures: u32,
    pub(crate) spawns: u64,
    pub(crate) pid: u32,
    /// When the started process started, by the kernel's clock.
    pub(crate) start: Option<ProcessStart>,
}

impl SpawnRecord {
    /// Read as defensively as a pidfile (bounded, no symlink followed, never blocking on a
    /// FIFO): `auto_start_status` reads it in any directory it is given.
    pub(crate) fn read(sockets_dir: &Path) -> Option<Self> {
        let (bytes, _) = read_bounded(&sockets_dir.join(SPAWN_RECORD_FILE)).ok()?;
        let text = std::str::from_utf8(&bytes).ok()?;
        let mut fields = text.split_whitespace();
        let mut number = || fields.next()?.parse::<u64>().ok();
        let record = Self {
            last_spawn_ms: number()?,
            failures: u32::try_from(number()?).ok()?,
            spawns: number()?,
            pid: u32::try_from(number()?).ok()?,
            start: None,
        };
        let start = match (number(), fields.next()) {
            (Some(ticks), Some(boot_id)) if !boot_id.is_empty() => Some(ProcessStart {
                ticks,
                boot_id: boot_id.to_owned(),
            }),
            _ => None,
        };
        Some(Self { start, ..record })
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
                write!(
                    file,
                    "{} {} {} {}",
                    self.last_spawn_ms, self.failures, self.spawns, self.pid
                )?;
                match &self.start {
                    Some(start) => writeln!(file, " {} {}", start.ticks, start.boot_id),
                    None => writeln!(file),
                }
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

    /// A started daemon that is still alive and younger than the start timeout is coming: no
    /// other start now.
    pub(super) fn pending(&self, now: SystemTime, start_timeout: Duration) -> bool {
        let young = self
            .last_spawn()
            .is_some_and(|at| now.duration_since(at).unwrap_or_default() < start_timeout);
        young && self.pid != 0 && !exited(self.pid)
    }

    /// A start that is provably pending, for a call to wait for: not seen serving yet, and its
    /// process is the one started (its start ticks and boot id match the record's), younger than
    /// the start timeout by the kernel's clock. A reused pid, a record without the start, or a
    /// step of the wall clock never makes a call wait.
    pub(super) fn proves_pending(&self, start_timeout: Duration) -> bool {
        let Some(recorded) = self.start.as_ref().filter(|_| self.failures > 0) else {
            return false;
        };
        let Ok(info) = process::check_alive(self.pid) else {
            return false;
        };
        info.start().is_ok_and(|start| start == *recorded)
            && process::age(recorded).is_some_and(|age| age < start_timeout)
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
