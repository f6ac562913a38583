//! What the kernel says about a process: alive or gone, which uid, which executable, when started.
//!
//! Linux reads `/proc`. Other platforms report [`ProcessError::Unsupported`] until they get their
//! own implementation (`proc_pidinfo` on macOS); the probe then treats the daemon as unusable.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::OnceLock;

/// The identity of an executable file: device and inode, never a path string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileId {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

impl FileId {
    pub(crate) fn of(path: &Path) -> io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Why a process is not one we can use, as far as the kernel tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcessError {
    /// No such process (ESRCH).
    Gone,
    /// Killed and not yet reaped: `kill(pid, 0)` still succeeds.
    Zombie,
    /// The process's information could not be read.
    Unreadable(io::ErrorKind),
    /// This platform has no implementation.
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    Unsupported,
}

/// The facts the probe checks, read in order of cost.
#[derive(Debug)]
pub(crate) struct ProcessInfo {
    pub(crate) pid: u32,
}

/// Our own executable's identity, resolved once per process.
pub(crate) fn own_executable() -> Result<FileId, io::ErrorKind> {
    static OWN: OnceLock<Result<FileId, io::ErrorKind>> = OnceLock::new();
    *OWN.get_or_init(|| {
        let path = std::env::current_exe().map_err(|e| e.kind())?;
        FileId::of(&path).map_err(|e| e.kind())
    })
}

#[cfg(target_os = "linux")]
mod imp {
    use super::*;
    use nix::errno::Errno;
    use nix::sys::signal::kill;
    use nix::unistd::Pid;

    /// Alive in the sense of `kill(pid, 0)`: EPERM means alive and someone else's.
    pub(crate) fn check_alive(pid: u32) -> Result<ProcessInfo, ProcessError> {
        match kill(Pid::from_raw(pid as i32), None) {
            Ok(()) | Err(Errno::EPERM) => Ok(ProcessInfo { pid }),
            Err(Errno::ESRCH) => Err(ProcessError::Gone),
            Err(e) => Err(ProcessError::Unreadable(io::Error::from(e).kind())),
        }
    }

    impl ProcessInfo {
        /// The effective uid, from `/proc/<pid>/status`; a zombie is reported as such.
        pub(crate) fn effective_uid(&self) -> Result<u32, ProcessError> {
            let status = read_proc(self.pid, "status")?;
            let mut uid = None;
            for line in status.lines() {
                if let Some(state) = line.strip_prefix("State:") {
                    let state = state.trim_start();
                    if state.starts_with('Z') || state.starts_with('X') {
                        return Err(ProcessError::Zombie);
                    }
                } else if let Some(uids) = line.strip_prefix("Uid:") {
                    // Real, effective, saved, filesystem.
                    uid = uids.split_whitespace().nth(1).and_then(|u| u.parse().ok());
                }
            }
            uid.ok_or(ProcessError::Unreadable(io::ErrorKind::InvalidData))
        }

        /// The executable's identity.
        pub(crate) fn executable(&self) -> Result<FileId, ProcessError> {
            let link = format!("/proc/{}/exe", self.pid);
            FileId::of(Path::new(&link)).map_err(|e| match e.kind() {
                // A zombie has no executable any more.
                io::ErrorKind::NotFound => ProcessError::Zombie,
                kind => ProcessError::Unreadable(kind),
            })
        }

        /// Whether the executable was deleted or replaced on disk since the process started.
        pub(crate) fn executable_deleted(&self) -> bool {
            std::fs::read_link(format!("/proc/{}/exe", self.pid)).is_ok_and(|target| {
                target
                    .as_os_str()
                    .as_encoded_bytes()
                    .ends_with(b" (deleted)")
            })
        }

        /// When the process started, in Unix seconds (rounded down).
        pub(crate) fn started_at(&self) -> Result<u64, ProcessError> {
            let stat = read_proc(self.pid, "stat")?;
            // The command name may hold spaces and parentheses: fields resume after the last ')'.
            let after_comm = stat
                .rfind(')')
                .map(|i| &stat[i + 1..])
                .ok_or(ProcessError::Unreadable(io::ErrorKind::InvalidData))?;
            // Field 22 overall is the start time in clock ticks since boot; field 3 is the first
            // after the command name.
            let ticks: u64 = after_comm
                .split_whitespace()
                .nth(22 - 3)
                .and_then(|t| t.parse().ok())
                .ok_or(ProcessError::Unreadable(io::ErrorKind::InvalidData))?;
            let (boot_time, ticks_per_second) = boot_clock()?;
            Ok((boot_time + ticks as f64 / ticks_per_second as f64).max(0.0) as u64)
        }
    }

    fn read_proc(pid: u32, file: &str) -> Result<String, ProcessError> {
        std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ProcessError::Gone,
            kind => ProcessError::Unreadable(kind),
        })
    }

    /// The boot time in Unix seconds (two vDSO clock reads: `/proc/stat` is far larger), and
    /// the clock ticks per second.
    fn boot_clock() -> Result<(f64, u64), ProcessError> {
        use nix::time::{ClockId, clock_gettime};
        static TICKS: OnceLock<Option<u64>> = OnceLock::new();
        let unreadable = ProcessError::Unreadable(io::ErrorKind::InvalidData);
        let ticks = TICKS
            .get_or_init(|| {
                let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
                u64::try_from(ticks).ok().filter(|&t| t > 0)
            })
            .ok_or(unreadable)?;
        let seconds = |clock| {
            clock_gettime(clock)
                .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
                .map_err(|_| unreadable)
        };
        let boot_time = seconds(ClockId::CLOCK_REALTIME)? - seconds(ClockId::CLOCK_BOOTTIME)?;
        Ok((boot_time, ticks))
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::*;

    pub(crate) fn check_alive(_pid: u32) -> Result<ProcessInfo, ProcessError> {
        Err(ProcessError::Unsupported)
    }

    impl ProcessInfo {
        pub(crate) fn effective_uid(&self) -> Result<u32, ProcessError> {
            Err(ProcessError::Unsupported)
        }
        pub(crate) fn executable(&self) -> Result<FileId, ProcessError> {
            Err(ProcessError::Unsupported)
        }
        pub(crate) fn executable_deleted(&self) -> bool {
            false
        }
        pub(crate) fn started_at(&self) -> Result<u64, ProcessError> {
            Err(ProcessError::Unsupported)
        }
    }
}

pub(crate) use imp::check_alive;
