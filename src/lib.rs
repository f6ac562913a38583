//! Middleware that routes gRPC calls to a repository's local daemon when it is there and
//! healthy, and to an in-process service otherwise.
//!
//! A developer tool (a version control system, a build system, an agent loop) runs a daemon per
//! repository so that each command need not reopen the repository. With this crate a command's
//! verb uses any tonic-generated client over a [`LocalDaemon`] service, and does not know which
//! route served it:
//!
//! ```no_run
//! # mod pb { pub type FooServer<T> = tonic_health::pb::health_server::HealthServer<T>;
//! #          pub type FooClient<T> = tonic_health::pb::health_client::HealthClient<T>; }
//! # use pb::{FooClient, FooServer};
//! # async fn run(in_process_impl: impl tonic_health::pb::health_server::Health) {
//! use tower::ServiceBuilder;
//! use tower_local_daemon::LocalDaemonLayer;
//!
//! let svc = ServiceBuilder::new()
//!     .layer(LocalDaemonLayer::new(".heddle"))
//!     .service(FooServer::new(in_process_impl)); // the in-process fallback
//! let mut client = FooClient::new(svc); // any tonic-generated client
//! # }
//! ```
//!
//! # The checks
//!
//! On the first call the layer runs three checks, cheapest first, and caches the outcome for the
//! process (see [`FallbackReason`] for every way each can fail):
//!
//! 1. **probe** ([`probe`]): `<dir>/sockets` is a private directory of ours; the pidfile
//!    `<dir>/sockets/grpc.pid` names a live process of our effective uid that runs our own
//!    executable and took the lifetime lock; `<dir>/sockets/grpc.sock` is a socket we own.
//!    Syscalls only, microseconds (with [auto-start](LocalDaemonLayer::auto_start) on, a miss
//!    also starts the daemon: a fork and exec).
//! 2. **connect**: a connection to the socket whose kernel-reported peer credentials
//!    (`SO_PEERCRED`) are our uid and the pidfile's pid.
//! 3. **handshake**: HTTP/2 over that one connection, where `grpc.health.v1.Health/Check`
//!    answers SERVING for each required service and reports serving this very directory, under
//!    the same deadline as the connect. A daemon of this crate attests the same in a file
//!    (`grpc.attest`) once it serves: for that very process, the first call skips the round
//!    trip and waits only for the daemon's HTTP/2 SETTINGS
//!    ([`LocalDaemonLayer::require_health_check`] says what that gives up).
//!
//! Then every call goes over the cached connection. When a check fails, calls go to the wrapped
//! in-process service. When the daemon's connection ends, calls go in-process at once; a
//! negative decision is re-probed in the background after an interval, so a long-lived process
//! picks up a daemon started later.
//!
//! # The daemon side
//!
//! [`Daemon`] serves any tonic services on a directory's socket and leaves the files exactly as
//! the probe expects: see its docs.
//!
//! # Trust
//!
//! A daemon is used only when it is *the daemon of this directory, running our executable as
//! our user, and serving now*. The sockets directory must be a private directory of ours (not a
//! symlink), the pidfile and socket must have one link each, the daemon must report serving
//! the very directory (device and inode) the layer was built for, its process must run our
//! executable as our effective uid, and its pid must be the one that took the lifetime lock.
//! The uid is the trust boundary: another process of the same user could pretend, and the
//! directory handshake is a correctness check against shared, linked and moved directories, not
//! authentication. [`LocalDaemonLayer::accept_unverified_directory`] weakens it for daemons that
//! do not report their directory.
//!
//! # Calls the daemon did not answer
//!
//! A request the daemon provably never processed runs in-process, whatever its method; a call
//! of a method declared [idempotent](LocalDaemonLayer::idempotent) whose connection broke
//! before the answer runs again in-process. Anything else that may have run on the daemon fails
//! with `UNAVAILABLE` and is never sent again: see [`ResponseFuture`].
//!
//! # The rooms
//!
//! `ARCHITECTURE.md` in the repository maps the modules, the path of a call, where trust is
//! checked and where the connection lives.
//!
//! # Platforms
//!
//! Linux is what CI proves. The process checks read `/proc`, and the daemon reaches its
//! sockets directory through `/proc/self/fd`; on other Unix platforms the process checks report
//! [`FallbackReason::Unsupported`] and calls run in-process. Auto-start and [`stop`] read
//! `/proc/locks` and `/proc/<pid>` too: elsewhere auto-start finds the lock held and starts
//! nothing, and `stop` cannot see the daemon exit and reports `TimedOut`. Nothing is verified
//! there.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

// Both sides.
mod attestation;
mod lockfile;
mod paths;
mod peer;
mod pidfile;
mod process;
pub mod protocol;
mod spawn_record;
mod tool;

// The client: built with the `client` feature.
#[cfg(feature = "client")]
mod config;
#[cfg(feature = "client")]
mod connect;
#[cfg(feature = "client")]
mod diagnose;
#[cfg(feature = "client")]
mod http2;
#[cfg(feature = "client")]
mod layer;
#[cfg(feature = "client")]
mod lazy;
#[cfg(feature = "client")]
mod lifecycle;
#[cfg(feature = "client")]
mod probe;
#[cfg(feature = "client")]
mod reason;
#[cfg(feature = "client")]
mod registry;
#[cfg(feature = "client")]
mod service;
#[cfg(feature = "client")]
mod sync;

// The daemon.
#[cfg(feature = "daemon")]
#[cfg_attr(docsrs, doc(cfg(feature = "daemon")))]
pub mod daemon;

pub use paths::DaemonPaths;
pub use pidfile::{MAX_PIDFILE_LEN, Pidfile, PidfileError};
// The names both sides agree on live in `protocol`; kept at the root too, for the API of the
// crate's first release.
#[doc(hidden)]
pub use protocol::{
    AUTO_STARTED_ENV, DAEMON_DIR_ENV, DAEMON_LOG_FILE, DEFAULT_MODE_ENV, DIRECTORY_METADATA_KEY,
    INHERITED_FDS_ENV, LOCK_FILE, PIDFILE_FILE, PIDFILE_MARKER, SOCKET_FILE, SOCKETS_DIR,
    SPAWN_LOCK_FILE, SPAWN_RECORD_FILE, VERSION_METADATA_KEY,
};
pub use tool::{InvalidTool, Tool};

#[cfg(feature = "daemon")]
#[cfg_attr(docsrs, doc(cfg(feature = "daemon")))]
pub use daemon::Daemon;

#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use config::{AutoStart, IdentityPolicy, InvalidMode, Mode};
#[cfg(feature = "channel")]
#[cfg_attr(docsrs, doc(cfg(feature = "channel")))]
pub use connect::{
    LocalDaemonChannel, connect_local_daemon_channel, detect_local_daemon_with_connect_probe,
    try_connect_local_daemon_channel, try_detect_local_daemon_with_connect_probe,
};
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use diagnose::{Check, CheckOutcome, Report, diagnose};
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use layer::LocalDaemonLayer;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use lazy::{LazyFallback, LazyFuture};
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use lifecycle::{AutoStartStatus, StopOutcome, auto_start_status, stop};
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use probe::{
    DETECT_CACHE_TTL, LocalDaemonProbe, LocalDaemonStatus, UdsTarget, detect_local_daemon, probe,
};
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use reason::FallbackReason;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use registry::{RouteStats, reset};
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use service::{BoxLocalDaemon, LocalDaemon, ResponseFuture, Route};
