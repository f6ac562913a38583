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
        let path = sockets_dir.join(SPAWN_RECORD_FILE);
        let (bytes, _) = read_bounded(&path, crate::pidfile::MAX_PIDFILE_LEN).ok()?;
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
                // One write: `write!` to a file writes each piece with a system call of its own.
                let start = match &self.start {
                    Some(start) => format!("{} {}", start.ticks, start.boot_id),
                    None => "- -".to_owned(),
                };
                let line = format!(
                    "{} {} {} {} {start} {}\n",
                    self.last_spawn_ms, self.failures, self.spawns, self.pid, self.stopped
                );
                file.write_all(line.as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// last spawn, failures, spawns, pid, and the start (ticks, boot id).
    type OldRecord = (u64, u32, u64, u32, Option<(u64, String)>);

    /// How the previous release read the record: four numbers, then the start if present.
    fn read_as_before(text: &str) -> Option<OldRecord> {
        let mut fields = text.split_whitespace();
        let mut number = || fields.next()?.parse::<u64>().ok();
        let head = (
            number()?,
            u32::try_from(number()?).ok()?,
            number()?,
            u32::try_from(number()?).ok()?,
        );
        let start = match (number(), fields.next()) {
            (Some(ticks), Some(boot_id)) if !boot_id.is_empty() => Some((ticks, boot_id.into())),
            _ => None,
        };
        Some((head.0, head.1, head.2, head.3, start))
    }

    fn written(record: &SpawnRecord) -> String {
        let dir =
            std::env::temp_dir().join(format!("tld-record-{}-{}", std::process::id(), record.pid));
        std::fs::create_dir_all(&dir).unwrap();
        record.write(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join(SPAWN_RECORD_FILE)).unwrap();
        assert_eq!(SpawnRecord::read(&dir).as_ref(), Some(record));
        std::fs::remove_dir_all(&dir).unwrap();
        text
    }

    #[test]
    fn an_older_client_reads_a_newer_record_and_drops_no_check() {
        let with_start = SpawnRecord {
            last_spawn_ms: 1_700_000_000_000,
            failures: 2,
            spawns: 5,
            pid: 4242,
            start: Some(ProcessStart {
                ticks: 99,
                boot_id: "b00t".into(),
            }),
            stopped: 3,
        };
        let old = read_as_before(&written(&with_start)).unwrap();
        assert_eq!(
            old,
            (1_700_000_000_000, 2, 5, 4242, Some((99, "b00t".into())))
        );
        // No start known: the older client reads none (it then never waits, as before).
        let without = SpawnRecord {
            start: None,
            pid: 4243,
            ..with_start
        };
        assert_eq!(read_as_before(&written(&without)).unwrap().4, None);
    }

    #[test]
    fn a_newer_client_reads_an_older_record() {
        let dir = std::env::temp_dir().join(format!("tld-record-old-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (text, start) in [
            ("1700000000000 1 1 77\n", None),
            (
                "1700000000000 1 1 77 12 boot\n",
                Some(ProcessStart {
                    ticks: 12,
                    boot_id: "boot".into(),
                }),
            ),
        ] {
            std::fs::write(dir.join(SPAWN_RECORD_FILE), text).unwrap();
            let record = SpawnRecord::read(&dir).unwrap();
            assert_eq!((record.pid, record.failures, record.stopped), (77, 1, 0));
            assert_eq!(record.start, start);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
