//! The kernel-reported credentials of the process on the other end of a Unix socket, checked by
//! the client against the daemon it expects and by the daemon against its own uid.

use tokio::net::UnixStream;

use crate::FallbackReason;
use crate::probe::UdsTarget;

/// The peer's uid and, where the platform reports it, pid (`SO_PEERCRED` on Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerCredentials {
    pub(crate) uid: u32,
    pub(crate) pid: Option<i32>,
}

impl PeerCredentials {
    pub(crate) fn of(stream: &UnixStream) -> std::io::Result<Self> {
        let cred = stream.peer_cred()?;
        Ok(Self {
            uid: cred.uid(),
            pid: cred.pid(),
        })
    }

    /// Whether the peer runs as our effective uid.
    pub(crate) fn is_own_uid(&self) -> bool {
        self.uid == nix::unistd::geteuid().as_raw()
    }

    /// The client's check: the peer is our uid and the pidfile's process.
    pub(crate) fn check_daemon(&self, target: &UdsTarget) -> Result<(), FallbackReason> {
        if !self.is_own_uid() {
            return Err(FallbackReason::PeerUidMismatch {
                expected: nix::unistd::geteuid().as_raw(),
                actual: self.uid,
            });
        }
        if self.pid != Some(target.pid as i32) {
            return Err(FallbackReason::PeerPidMismatch {
                expected: target.pid,
                actual: self.pid,
            });
        }
        Ok(())
    }
}
