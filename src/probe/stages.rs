//! Each stage of the probe, on its own: the sockets directory, the pidfile, the process it
//! names, the socket. [`probe_observed`](super::probe_observed) runs them in order.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::IdentityPolicy;
use crate::lockfile::LockRecord;
use crate::paths::FileIdentity;
use crate::peer::own_uid;
use crate::pidfile::{Pidfile, ReadError};
use crate::process::{self, ProcessError};
use crate::reason::FallbackReason;

/// The directory stage: the socket's directory is a real directory (not a symlink), ours, and
/// not writable by group or others. A missing directory means no daemon ever ran here.
pub(crate) fn check_sockets_dir(dir: &Path) -> Result<(), FallbackReason> {
    let metadata = std::fs::symlink_metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => FallbackReason::NoPidfile,
        std::io::ErrorKind::PermissionDenied => match unsearchable(dir) {
            Some(path) => FallbackReason::UnsearchableDirectory { path },
            None => FallbackReason::UnreadablePidfile {
                error: Some(std::io::ErrorKind::PermissionDenied),
            },
        },
        error => FallbackReason::UnreadablePidfile { error: Some(error) },
    })?;
    if metadata.file_type().is_symlink() {
        return Err(FallbackReason::SymlinkedSocketsDir);
    }
    if !metadata.is_dir() {
        return Err(FallbackReason::SocketsDirNotADirectory);
    }
    if metadata.uid() != own_uid() {
        return Err(FallbackReason::ForeignSocketsDir {
            uid: metadata.uid(),
        });
    }
    let mode = metadata.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(FallbackReason::OpenSocketsDir { mode });
    }
    Ok(())
}

/// The first directory on the way to `path` (from `/` down) that this user may not enter:
/// `stat` of its `.` needs search permission on it.
fn unsearchable(path: &Path) -> Option<PathBuf> {
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    ancestors.into_iter().find_map(|dir| {
        let denied = std::fs::metadata(dir.join("."))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied);
        denied.then(|| dir.to_owned())
    })
}

/// The pidfile stage.
pub(crate) fn read_pidfile(pid_path: &Path, marker: &str) -> Result<Pidfile, FallbackReason> {
    Pidfile::read(pid_path, marker).map_err(|e| match e {
        ReadError::Missing => FallbackReason::NoPidfile,
        ReadError::Malformed(e) => FallbackReason::MalformedPidfile(e),
        ReadError::WrongMarker { found } => FallbackReason::MarkerMismatch {
            expected: marker.to_owned(),
            found,
        },
        ReadError::NotRegularFile => FallbackReason::UnreadablePidfile { error: None },
        ReadError::Io(kind) => FallbackReason::UnreadablePidfile { error: Some(kind) },
        ReadError::Linked { links } => FallbackReason::LinkedPidfile { links },
    })
}

/// The process stage: alive, our uid, the expected executable, and the process that took the
/// lifetime lock when the lock file records one.
///
/// The pidfile's own start time is wall-clock seconds, and is never compared: a clock step
/// (NTP, a restored VM, `date -s`) after the daemon started would make a healthy daemon look
/// reused for good. A daemon of this crate records its start in ticks and boot id instead; a
/// daemon that records nothing (heddle's own) is proven by the connect's peer check, which a
/// process that merely reuses the pid cannot pass, since it does not listen on this socket.
pub(super) fn check_process(
    pid: u32,
    lock_path: &Path,
    identity: &IdentityPolicy,
) -> Result<(), FallbackReason> {
    let info = process::check_alive(pid).map_err(process_reason)?;
    let uid = info.effective_uid().map_err(process_reason)?;
    if uid != own_uid() {
        return Err(FallbackReason::ForeignProcess { uid });
    }
    let exe = info.executable().map_err(process_reason)?;
    let expected = match identity {
        IdentityPolicy::SameExecutable => process::own_executable(),
        IdentityPolicy::Executable(path) => FileIdentity::following(path).map_err(|e| e.kind()),
    };
    if expected != Ok(exe) {
        return Err(if info.executable_deleted() {
            FallbackReason::ExecutableReplaced
        } else {
            FallbackReason::ExecutableMismatch
        });
    }
    if let Some(record) = LockRecord::read(lock_path).filter(|r| r.pid == pid) {
        let actual = info.start().map_err(process_reason)?;
        if actual != record.start {
            return Err(FallbackReason::PidReused {
                pid,
                recorded: record.start.to_string(),
                actual: actual.to_string(),
            });
        }
    }
    Ok(())
}

fn process_reason(e: ProcessError) -> FallbackReason {
    match e {
        ProcessError::Gone => FallbackReason::ProcessGone,
        ProcessError::Unreadable(error) => FallbackReason::ProcessUnreadable { error },
        ProcessError::Unsupported => FallbackReason::Unsupported,
    }
}

/// The socket stage: a socket (not a symlink) owned by our effective uid, with one link.
pub(super) fn check_socket(socket_path: &Path) -> Result<(), FallbackReason> {
    let metadata = std::fs::symlink_metadata(socket_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => FallbackReason::NoSocket,
        error => FallbackReason::ConnectFailed { error },
    })?;
    if !metadata.file_type().is_socket() {
        return Err(FallbackReason::NotASocket);
    }
    if metadata.uid() != own_uid() {
        return Err(FallbackReason::ForeignSocket {
            uid: metadata.uid(),
        });
    }
    if metadata.nlink() != 1 {
        return Err(FallbackReason::LinkedSocket {
            links: metadata.nlink(),
        });
    }
    Ok(())
}
