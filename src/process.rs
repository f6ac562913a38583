//! What the kernel says about a process: alive or gone, which uid, which executable, and when it
//! started (in clock ticks since the boot it belongs to, never by the wall clock).
//!
//! Linux reads `/proc`, as bytes: a command name is whatever bytes the executable's name had.
//! Other platforms report [`ProcessError::Unsupported`] until they get their own implementation
//! (`proc_pidinfo` on macOS); the probe then treats the daemon as unusable.

use std::fmt;
use std::io;
use std::sync::OnceLock;

#[cfg(feature = "client")]
use crate::paths::FileIdentity;

/// When a process started: its start time in clock ticks since boot, and the kernel's
/// `boot_id` of that boot. Two values are the same process start exactly when both match; no
/// wall clock is involved, so a clock step changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ProcessStart {
    pub(crate) ticks: u64,
    pub(crate) boot_id: String,
}

impl fmt::Display for ProcessStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tick {} of boot {}", self.ticks, self.boot_id)
    }
}

/// Why a process is not one we can use, as far as the kernel tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcessError {
    /// No such process (ESRCH), or one that has exited and waits to be reaped (a zombie: `kill`
    /// still finds it, its `/proc` entry has no executable any more).
    #[cfg(feature = "client")]
    Gone,
    /// The process's information could not be read (for example under `hidepid`).
    Unreadable(io::ErrorKind),
    /// This platform has no implementation.
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    Unsupported,
}

/// A process that `kill(pid, 0)` found alive; its facts are read in order of cost.
#[cfg(feature = "client")]
#[derive(Debug)]
pub(crate) struct ProcessInfo {
    pub(crate) pid: u32,
    /// `kill(pid, 0)` said EPERM: alive, and someone else's. Its `/proc` entry may then be
    /// hidden from us (`hidepid`), which is not the same as gone.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    foreign: bool,
}

/// Our own executable's identity, resolved once per process.
#[cfg(feature = "client")]
pub(crate) fn own_executable() -> Result<FileIdentity, io::ErrorKind> {
    static OWN: OnceLock<Result<FileIdentity, io::ErrorKind>> = OnceLock::new();
    *OWN.get_or_init(imp::own_executable)
}

#[cfg(target_os = "linux")]
mod imp {
    use super::*;
    use std::path::Path;
    #[cfg(feature = "client")]
    use {
        nix::errno::Errno, nix::sys::signal::kill, nix::unistd::Pid,
        std::os::unix::fs::MetadataExt, std::path::PathBuf,
    };

    /// `/proc/self/exe` names the file we run even after it was replaced or deleted on disk,
    /// where `current_exe()` would give a path ending in ` (deleted)`.
    #[cfg(feature = "client")]
    pub(super) fn own_executable() -> Result<FileIdentity, io::ErrorKind> {
        FileIdentity::following(Path::new("/proc/self/exe")).map_err(|e| e.kind())
    }

    /// Alive in the sense of `kill(pid, 0)`: EPERM means alive and someone else's.
    #[cfg(feature = "client")]
    pub(crate) fn check_alive(pid: u32) -> Result<ProcessInfo, ProcessError> {
        match kill(Pid::from_raw(pid as i32), None) {
            Ok(()) => Ok(ProcessInfo {
                pid,
                foreign: false,
            }),
            Err(Errno::EPERM) => Ok(ProcessInfo { pid, foreign: true }),
            Err(Errno::ESRCH) => Err(ProcessError::Gone),
            Err(e) => Err(ProcessError::Unreadable(io::Error::from(e).kind())),
        }
    }

    #[cfg(feature = "client")]
    impl ProcessInfo {
        /// The effective uid: the owner of `/proc/<pid>` (one `stat`, as procps reads it,
        /// where `status` is a file the kernel composes line by line). Linux owns a process's
        /// files by root while it is not dumpable, but not that directory; an owner other than
        /// ours is still confirmed from `/proc/<pid>/status`, which says the uid whatever the
        /// kernel does with ownership.
        pub(crate) fn effective_uid(&self) -> Result<u32, ProcessError> {
            let dir = format!("/proc/{}", self.pid);
            let owner = std::fs::metadata(&dir)
                .map_err(|e| self.missing(e.kind()))?
                .uid();
            if owner == crate::peer::own_uid() {
                return Ok(owner);
            }
            let status = self.read("status")?;
            status
                .split(|&b| b == b'\n')
                .find_map(|line| line.strip_prefix(b"Uid:"))
                .and_then(|uids| {
                    // Real, effective, saved, filesystem.
                    uids.split(u8::is_ascii_whitespace)
                        .filter(|field| !field.is_empty())
                        .nth(1)
                        .and_then(parse_decimal)
                })
                .map(|uid| uid as u32)
                .ok_or(ProcessError::Unreadable(io::ErrorKind::InvalidData))
        }

        /// Whether the process has exited and waits to be reaped (state `Z` or `X`).
        pub(crate) fn zombie(&self) -> Result<bool, ProcessError> {
            let stat = self.read("stat")?;
            Ok(matches!(stat_field(&stat, 3)?, b"Z" | b"X"))
        }

        /// The executable's identity.
        pub(crate) fn executable(&self) -> Result<FileIdentity, ProcessError> {
            let link = format!("/proc/{}/exe", self.pid);
            // A zombie has no executable any more: gone.
            FileIdentity::following(Path::new(&link)).map_err(|e| self.missing(e.kind()))
        }

        /// Whether the executable was deleted or replaced on disk since the process started.
        pub(crate) fn executable_deleted(&self) -> bool {
            executable_path(self.pid).is_some_and(|(_, deleted)| deleted)
        }

        /// When the process started.
        pub(crate) fn start(&self) -> Result<ProcessStart, ProcessError> {
            let ticks = start_ticks(&self.read("stat")?)?;
            Ok(ProcessStart {
                ticks,
                boot_id: boot_id()?,
            })
        }

        fn read(&self, file: &str) -> Result<Vec<u8>, ProcessError> {
            read_proc(Path::new(&format!("/proc/{}/{file}", self.pid)))
                .map_err(|e| self.missing(e.kind()))
        }

        /// A `/proc` entry of this process that could not be read: gone, if it is ours.
        fn missing(&self, kind: io::ErrorKind) -> ProcessError {
            match kind {
                io::ErrorKind::NotFound if !self.foreign => ProcessError::Gone,
                kind => self.unreadable(kind),
            }
        }

        /// A process that `kill` found alive and someone else's, whose `/proc` entry we cannot
        /// see, is hidden from us (`hidepid=2`), not gone.
        fn unreadable(&self, kind: io::ErrorKind) -> ProcessError {
            match kind {
                io::ErrorKind::NotFound => {
                    ProcessError::Unreadable(io::ErrorKind::PermissionDenied)
                }
                kind => ProcessError::Unreadable(kind),
            }
        }
    }

    /// The path a process was started from, as `/proc/<pid>/exe` names it, and whether that
    /// file was deleted or replaced since (the kernel then appends ` (deleted)`, left out here).
    #[cfg(feature = "client")]
    pub(crate) fn executable_path(pid: u32) -> Option<(PathBuf, bool)> {
        exe_link(&pid.to_string())
    }

    /// The path this process was started from, which holds the new build after an upgrade in
    /// place (where `current_exe()` would end in ` (deleted)`).
    #[cfg(feature = "client")]
    pub(crate) fn own_executable_path() -> Option<PathBuf> {
        exe_link("self").map(|(path, _)| path)
    }

    #[cfg(feature = "client")]
    fn exe_link(process: &str) -> Option<(PathBuf, bool)> {
        use std::os::unix::ffi::OsStrExt;
        let link = std::fs::read_link(format!("/proc/{process}/exe")).ok()?;
        match link.as_os_str().as_bytes().strip_suffix(b" (deleted)") {
            Some(kept) => Some((PathBuf::from(std::ffi::OsStr::from_bytes(kept)), true)),
            None => Some((link, false)),
        }
    }

    /// A `/proc` file, whole. The kernel composes it on the first `read`, and reports no size:
    /// one buffer large enough for `stat` and `status` takes it in one `read` (and one more that
    /// says the end). Read through `take`: a `File`'s own `read_to_end` first asks the file its
    /// size and position, two calls that tell nothing here.
    fn read_proc(path: &Path) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut contents = Vec::with_capacity(4096);
        std::fs::File::open(path)?
            .take(u64::MAX)
            .read_to_end(&mut contents)?;
        Ok(contents)
    }

    /// How long ago a process started, by the kernel's boot clock (`CLOCK_BOOTTIME`, the clock
    /// of the start ticks): no wall clock is read, so a clock step changes nothing.
    #[cfg(feature = "client")]
    pub(crate) fn age(start: &ProcessStart) -> Option<std::time::Duration> {
        use nix::time::{ClockId, clock_gettime};
        use nix::unistd::{SysconfVar, sysconf};
        let per_second = u64::try_from(sysconf(SysconfVar::CLK_TCK).ok()??).ok()?;
        let now = std::time::Duration::from(clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?);
        let started = std::time::Duration::from_millis(start.ticks.checked_mul(1000)? / per_second);
        now.checked_sub(started)
    }

    /// This process's own start, for the daemon's lock record.
    #[cfg(feature = "daemon")]
    pub(crate) fn own_start() -> Result<ProcessStart, ProcessError> {
        let stat = read_proc(Path::new("/proc/self/stat"))
            .map_err(|e| ProcessError::Unreadable(e.kind()))?;
        Ok(ProcessStart {
            ticks: start_ticks(&stat)?,
            boot_id: boot_id()?,
        })
    }

    /// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks since boot.
    fn start_ticks(stat: &[u8]) -> Result<u64, ProcessError> {
        parse_decimal(stat_field(stat, 22)?)
            .ok_or(ProcessError::Unreadable(io::ErrorKind::InvalidData))
    }

    /// Field `n` (from 3, the state) of `/proc/<pid>/stat`. The command name (field 2) may hold
    /// any bytes, spaces and parentheses included: fields resume after the last `)`.
    fn stat_field(stat: &[u8], n: usize) -> Result<&[u8], ProcessError> {
        let invalid = ProcessError::Unreadable(io::ErrorKind::InvalidData);
        let close = stat.iter().rposition(|&b| b == b')').ok_or(invalid)?;
        stat[close + 1..]
            .split(u8::is_ascii_whitespace)
            .filter(|field| !field.is_empty())
            .nth(n.checked_sub(3).ok_or(invalid)?)
            .ok_or(invalid)
    }

    /// The kernel's id of the current boot, read once.
    fn boot_id() -> Result<String, ProcessError> {
        static BOOT_ID: OnceLock<Result<String, io::ErrorKind>> = OnceLock::new();
        BOOT_ID
            .get_or_init(|| {
                let id = read_proc(Path::new("/proc/sys/kernel/random/boot_id"))
                    .map_err(|e| e.kind())?;
                let id = String::from_utf8(id).map_err(|_| io::ErrorKind::InvalidData)?;
                Ok(id.trim().to_owned())
            })
            .clone()
            .map_err(ProcessError::Unreadable)
    }

    fn parse_decimal(digits: &[u8]) -> Option<u64> {
        std::str::from_utf8(digits).ok()?.parse().ok()
    }

    #[cfg(all(test, feature = "client", feature = "daemon"))]
    mod tests {
        use super::*;

        #[test]
        fn start_ticks_are_read_after_a_command_name_of_any_bytes() {
            let stat =
                b"42 (a) b\xff\xfe)) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 19 20\n";
            assert_eq!(start_ticks(stat), Ok(777));
        }

        #[test]
        fn an_unreaped_child_is_a_zombie_and_is_ours() {
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let info = check_alive(child.id()).unwrap();
            // Not reaped until `wait`: alive to `kill`, a zombie to `/proc`.
            while !info.zombie().unwrap() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(info.effective_uid(), Ok(crate::peer::own_uid()));
            assert_eq!(info.executable(), Err(ProcessError::Gone));
            child.wait().unwrap();
            assert_eq!(check_alive(child.id()).err(), Some(ProcessError::Gone));
            let me = check_alive(std::process::id()).unwrap();
            assert_eq!(me.zombie(), Ok(false));
        }

        #[test]
        fn own_start_names_this_boot() {
            let start = own_start().unwrap();
            assert_eq!(start.boot_id, boot_id().unwrap());
            let me = check_alive(std::process::id()).unwrap();
            assert_eq!(me.start().unwrap(), start);
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::*;

    #[cfg(feature = "client")]
    pub(super) fn own_executable() -> Result<FileIdentity, io::ErrorKind> {
        let path = std::env::current_exe().map_err(|e| e.kind())?;
        FileIdentity::following(&path).map_err(|e| e.kind())
    }

    #[cfg(feature = "client")]
    pub(crate) fn check_alive(_pid: u32) -> Result<ProcessInfo, ProcessError> {
        Err(ProcessError::Unsupported)
    }

    #[cfg(feature = "client")]
    pub(crate) fn executable_path(_pid: u32) -> Option<(std::path::PathBuf, bool)> {
        None
    }

    #[cfg(feature = "client")]
    pub(crate) fn own_executable_path() -> Option<std::path::PathBuf> {
        None
    }

    #[cfg(feature = "daemon")]
    pub(crate) fn own_start() -> Result<ProcessStart, ProcessError> {
        Err(ProcessError::Unsupported)
    }

    #[cfg(feature = "client")]
    pub(crate) fn age(_start: &ProcessStart) -> Option<std::time::Duration> {
        None
    }

    #[cfg(feature = "client")]
    impl ProcessInfo {
        pub(crate) fn effective_uid(&self) -> Result<u32, ProcessError> {
            Err(ProcessError::Unsupported)
        }
        pub(crate) fn zombie(&self) -> Result<bool, ProcessError> {
            Err(ProcessError::Unsupported)
        }
        pub(crate) fn executable(&self) -> Result<FileIdentity, ProcessError> {
            Err(ProcessError::Unsupported)
        }
        pub(crate) fn executable_deleted(&self) -> bool {
            false
        }
        pub(crate) fn start(&self) -> Result<ProcessStart, ProcessError> {
            Err(ProcessError::Unsupported)
        }
    }
}

#[cfg(feature = "client")]
pub(crate) use imp::{age, check_alive, executable_path, own_executable_path};

/// Whether `pid` is gone or a zombie.
#[cfg(feature = "client")]
pub(crate) fn exited(pid: u32) -> bool {
    match check_alive(pid) {
        Err(ProcessError::Gone) => true,
        Err(_) => false,
        Ok(info) => matches!(info.zombie(), Ok(true) | Err(ProcessError::Gone)),
    }
}
#[cfg(feature = "daemon")]
pub(crate) use imp::own_start;
