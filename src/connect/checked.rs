//! The second check: a connection to the socket whose kernel-reported peer is our uid and the
//! pidfile's pid.

use std::io;

use tokio::net::UnixStream;

use crate::paths::SocketAddrPath;
use crate::peer::{PeerCredentials, own_uid};
use crate::probe::UdsTarget;
use crate::reason::FallbackReason;

/// Connects to the target's socket and checks the kernel-reported peer credentials.
pub(crate) async fn connect_checked(target: &UdsTarget) -> Result<UnixStream, FallbackReason> {
    let addr = SocketAddrPath::new(&target.socket_path).map_err(connect_reason)?;
    // Without waiting for the runtime's I/O driver: tokio's `UnixStream::connect` would wait
    // one turn of it to learn that the socket is writable.
    let stream = addr
        .connect_now()
        .and_then(|fd| UnixStream::from_std(std::os::unix::net::UnixStream::from(fd)))
        .map_err(connect_reason)?;
    let peer = PeerCredentials::of(&stream).map_err(connect_reason)?;
    if !peer.is_own_uid() {
        return Err(FallbackReason::PeerUidMismatch {
            expected: own_uid(),
            actual: peer.uid,
        });
    }
    if peer.pid != Some(target.pid as i32) {
        return Err(FallbackReason::PeerPidMismatch {
            expected: target.pid,
            actual: peer.pid,
        });
    }
    Ok(stream)
}

fn connect_reason(e: io::Error) -> FallbackReason {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => FallbackReason::ConnectionRefused,
        // A non-blocking connect to a Unix socket whose backlog is full says EAGAIN.
        io::ErrorKind::WouldBlock => FallbackReason::Busy,
        error => FallbackReason::ConnectFailed { error },
    }
}
