//! The second and third checks: a connection to the socket whose peer is the pidfile's process
//! of our uid ([`checked`]), then HTTP/2 over that one connection with the directory, version
//! and service checks ([`handshake`]): of the daemon's attestation once its SETTINGS arrive, or
//! of `grpc.health.v1.Health/Check`'s answer. They leave behind the daemon route's client
//! ([`crate::http2`]). [`upstream`] keeps heddle's
//! one-call functions.
//!
//! A connection never redials: once it ends, a new one must pass every check again, which the
//! registry's re-probe does.

mod checked;
mod handshake;
#[cfg(feature = "channel")]
mod upstream;

pub(crate) use self::checked::connect_checked;
pub(crate) use self::handshake::{
    DaemonConnection, Proof, establish, handshake, trusted_attestation, within,
};
#[cfg(feature = "channel")]
pub use self::upstream::{
    LocalDaemonChannel, connect_local_daemon_channel, detect_local_daemon_with_connect_probe,
    try_connect_local_daemon_channel, try_detect_local_daemon_with_connect_probe,
};
