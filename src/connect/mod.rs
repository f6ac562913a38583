//! The second and third checks, and the daemon route they leave behind: a connection to the
//! socket whose peer is the pidfile's process of our uid ([`checked`]), HTTP/2 over that one
//! connection with `grpc.health.v1.Health/Check` and the directory and version checks
//! ([`handshake`]), the h2 client that sends the layer's calls over it ([`client`]), their
//! request bodies on the way ([`upload`]) and their answers ([`response`]), and the
//! connection's task: its keepalive, the signal of its end, and its close once the calls in
//! flight on it are done ([`end`]); the socket under it reads to the end of what the daemon
//! sent, also after a write found it gone ([`io`]). [`upstream`] keeps heddle's one-call functions.
//!
//! A connection never redials: once it ends, a new one must pass every check again, which the
//! registry's re-probe does.

mod checked;
mod client;
mod end;
mod handshake;
mod io;
mod response;
mod upload;
mod upstream;

pub(crate) use self::checked::connect_checked;
pub(crate) use self::client::{DaemonClient, DaemonFuture, NotSent, Unsent};
pub(crate) use self::end::{ConnectionEnd, ConnectionTask, EndCause};
pub(crate) use self::handshake::{DaemonConnection, establish, handshake, within};
pub use self::upstream::{
    LocalDaemonChannel, connect_local_daemon_channel, detect_local_daemon_with_connect_probe,
    try_connect_local_daemon_channel, try_detect_local_daemon_with_connect_probe,
};
