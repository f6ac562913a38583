//! The lifetime lock file: the one place that knows its record's format, and how a client sees
//! whether someone holds it ([`lock_held`], from `/proc/locks`, never by taking it).
//!
//! A daemon built with this crate `flock`s `<dir>/sockets/grpc.lock` for its lifetime and writes
//! into it who holds it:
//!
//! ```text
//! <pid>\n<start ticks>\n<boot id>\n
//! ```
//!
//! The start is the holder's start time in clock ticks since boot (field 22 of
//! `/proc/<pid>/stat`) and the kernel's `boot_id`. A client whose pidfile names the same pid
//! compares them exactly with what the kernel says about that pid: a reused pid is told apart
//! without any wall clock. Daemons of other implementations (heddle's own) write no record; the
//! connect's peer check is then what proves the pid.

#[cfg(feature = "client")]
use std::path::Path;

#[cfg(feature = "client")]
use crate::pidfile::read_bounded;
use crate::process::ProcessStart;

/// Who holds the lifetime lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LockRecord {
    pub(crate) pid: u32,
    pub(crate) start: ProcessStart,
}

impl LockRecord {
    #[cfg(feature = "daemon")]
    pub(crate) fn render(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.pid, self.start.ticks, self.start.boot_id
        )
    }

    #[cfg(feature = "client")]
    /// Parses a record; `None` for anything else, an empty file (a holder between its lock and
    /// its write) included.
    pub(crate) fn parse(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.strip_suffix('\n')?.split('\n');
        let (Some(pid), Some(ticks), Some(boot_id), None) =
            (lines.next(), lines.next(), lines.next(), lines.next())
        else {
            return None;
        };
        if boot_id.is_empty() || !boot_id.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        Some(Self {
            pid: pid.parse().ok()?,
            start: ProcessStart {
                ticks: ticks.parse().ok()?,
                boot_id: boot_id.to_owned(),
            },
        })
    }

    /// Reads the record at `path`, as defensively as a pidfile; `None` when there is none.
    #[cfg(feature = "client")]
    pub(crate) fn read(path: &Path) -> Option<Self> {
        read_bounded(path, crate::pidfile::MAX_PIDFILE_LEN)
            .ok()
            .and_then(|(bytes, _)| Self::parse(&bytes))
    }

    /// The pid in a lock file, whatever the rest says: for naming the holder in an error.
    #[cfg(feature = "daemon")]
    pub(crate) fn holder_pid(bytes: &[u8]) -> Option<u32> {
        let text = std::str::from_utf8(bytes).ok()?;
        text.split('\n').next()?.trim().parse().ok()
    }
}

#[cfg(all(test, feature = "client", feature = "daemon"))]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_garbage_is_none() {
        let record = LockRecord {
            pid: 42,
            start: ProcessStart {
                ticks: 12345,
                boot_id: "0f1e-aa".into(),
            },
        };
        assert_eq!(LockRecord::parse(record.render().as_bytes()), Some(record));
        for bytes in [
            &b""[..],
            b"42\n",
            b"42\n1\n\n",
            b"42\nx\nb\n",
            b"42\n1\nb\nextra\n",
        ] {
            assert_eq!(LockRecord::parse(bytes), None, "{bytes:?}");
        }
        assert_eq!(LockRecord::holder_pid(b"42\n"), Some(42));
    }
}

/// Whether the lock record at `lock` names `pid`, and `pid`'s process started when the record
/// says: `Some(true)` for the daemon that took this lock, `Some(false)` for another process
/// that reuses its pid (after a reboot, the usual case), `None` without a record for `pid` (a
/// daemon that writes none, such as heddle's own) or a process to compare.
#[cfg(feature = "client")]
pub(crate) fn record_names(lock: &Path, pid: u32) -> Option<bool> {
    let record = LockRecord::read(lock).filter(|r| r.pid == pid)?;
    let start = crate::process::check_alive(pid).ok()?.start().ok()?;
    Some(start == record.start)
}

/// Whether someone holds a `flock` on the lock file. Nothing here touches the lock: a
/// try-lock would race a starting daemon's own.
#[cfg(feature = "client")]
pub(crate) fn lock_held(lock: &Path) -> bool {
    LockedFile::of(lock).is_some_and(|lock| lock.held())
}

/// A lock file, by device and inode.
#[cfg(feature = "client")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct LockedFile {
    major: u64,
    minor: u64,
    ino: u64,
}

#[cfg(feature = "client")]
impl LockedFile {
    pub(crate) fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::symlink_metadata(path).ok()?;
        Some(Self {
            major: nix::sys::stat::major(metadata.dev()),
            minor: nix::sys::stat::minor(metadata.dev()),
            ino: metadata.ino(),
        })
    }

    /// `/proc/locks` names each lock's `major:minor:inode` (the device in hex). Unreadable, the
    /// lock counts as held: nothing is started, and `stop` waits.
    pub(crate) fn held(&self) -> bool {
        let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
            return true;
        };
        let file = format!("{:02x}:{:02x}:{}", self.major, self.minor, self.ino);
        locks.lines().any(|line| {
            let mut fields = line.split_whitespace();
            fields.nth(1) == Some("FLOCK") && fields.nth(3) == Some(file.as_str())
        })
    }
}
