//! The attempt record, `sockets/spawn.record`: the one place that knows its format. A client
//! that starts daemons writes it (`lifecycle`), and a daemon built with this crate marks in it
//! that it serves, so that a daemon counts as served whoever saw it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg, OFlag};

use crate::pidfile::read_bounded;
use crate::process::ProcessStart;
use crate::protocol::SPAWN_RECORD_FILE;

/// The attempt record, `sockets/spawn.record`: one line of
/// `<last spawn, Unix milliseconds> <failures> <spawns> <pid> [<start ticks> <boot id>
/// [<stopped>]]`, where a start not known is written `- -`.
///
/// Fields were added at the end, each read as absent when missing: a client that reads only the
/// first four fields reads a newer record as before, and a newer client reads an older record.
/// The started process's start (ticks and boot id, as the lock record has them) is what proves
/// a start pending; a record without it never makes a call wait, and its process is never
/// signalled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SpawnRecord {
    pub(crate) last_spawn_ms: u64,
    /// Starts in a row not seen serving since.
    pub(crate) failures: u32,
    pub(crate) spawns: u64,
    pub(crate) pid: u32,
    /// When the started process started, by the kernel's clock.
    pub(crate) start: Option<ProcessStart>,
    /// Started commands stopped because they never took the lifetime lock.
    pub(crate) stopped: u64,
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
            stopped: 0,
        };
        let ticks = number();
        let start = match (ticks, fields.next()) {
            (Some(ticks), Some(boot_id)) if boot_id != "-" => Some(ProcessStart {
                ticks,
                boot_id: boot_id.to_owned(),
            }),
            _ => None,
        };
        let stopped = fields.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        Some(Self {
            start,
            stopped,
            ..record
        })
    }

    /// Writes the record whole (a temporary file renamed over it), or not at all: a temporary
    /// file is never left behind. Whatever has the temporary file's name (a stale one, a FIFO)
    /// is replaced, in the sockets directory that only we can write.
    pub(crate) fn write(&self, sockets_dir: &Path) -> io::Result<()> {
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
                    Some(start) => write!(file, " {} {}", start.ticks, start.boot_id)?,
                    None => write!(file, " - -")?,
                }
                writeln!(file, " {}", self.stopped)
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// Marks that a daemon serves: the backoff starts again from nothing. Under the spawn lock
    /// (`lock`, the open `spawn.lock`), which a spawner holds from before its start until its
    /// last write of the record: a mark made after it is never overwritten by a record written
    /// for the start. `Ok(false)` when a spawner holds the lock now. Writes only when there is
    /// something to reset.
    pub(crate) fn mark_served(lock: File, sockets_dir: &Path) -> io::Result<bool> {
        let Ok(_lock) = Flock::lock(lock, FlockArg::LockExclusiveNonblock) else {
            return Ok(false);
        };
        if let Some(record) = Self::read(sockets_dir).filter(|r| r.failures > 0) {
            Self {
                failures: 0,
                ..record
            }
            .write(sockets_dir)?;
        }
        Ok(true)
    }
}
