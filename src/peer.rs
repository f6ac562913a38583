//! Who we are and who is on the other end of a Unix socket: our effective uid, and the
//! kernel-reported credentials of a socket's peer. Both sides use it: the daemon refuses peers of
//! another uid, and the client checks the daemon's.

use tokio::net::UnixStream;

/// Our effective uid: every ownership and credential check compares with it. Read each time, so
/// that a process that changes its effective uid is checked as what it is now.
pub(crate) fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

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
        self.uid == own_uid()
    }
}
