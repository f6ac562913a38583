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
//! 1. **probe** ([`probe`]): the pidfile `<dir>/sockets/grpc.pid` names a live process of our
//!    effective uid that runs our own executable and started before the pidfile was written,
//!    and `<dir>/sockets/grpc.sock` is a socket we own. Syscalls only, microseconds.
//! 2. **connect**: a connection to the socket whose kernel-reported peer credentials
//!    (`SO_PEERCRED`) are our uid and the pidfile's pid.
//! 3. **handshake**: a tonic `Channel` over that one connection answers
//!    `grpc.health.v1.Health/Check` SERVING for each required service, under the same deadline
//!    as the connect.
//!
//! Then every call goes over the cached channel. When a check fails, calls go to the wrapped
//! in-process service. When the daemon's connection ends, calls go in-process at once; a
//! negative decision is re-probed in the background after an interval, so a long-lived process
//! picks up a daemon started later.
//!
//! # The daemon side
//!
//! [`Daemon`] serves any tonic services on a directory's socket and leaves the files exactly as
//! the probe expects: see its docs.
//!
//! # Platforms
//!
//! Linux is what CI proves. The process checks read `/proc`, and long socket paths are reached
//! through `/proc/self/fd`; on other Unix platforms the process checks report
//! [`FallbackReason::Unsupported`] and calls run in-process.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod config;
mod connect;
pub mod daemon;
mod diagnose;
mod future;
mod layer;
mod lazy;
mod paths;
mod peer;
mod pidfile;
mod probe;
mod process;
mod reason;
mod registry;
mod service;

pub use config::{DEFAULT_MODE_ENV, IdentityPolicy, InvalidMode, Mode};
pub use connect::{
    LocalDaemonChannel, VERSION_METADATA_KEY, connect_local_daemon_channel,
    detect_local_daemon_with_connect_probe, try_connect_local_daemon_channel,
    try_detect_local_daemon_with_connect_probe,
};
pub use daemon::Daemon;
pub use diagnose::{Check, CheckOutcome, Report, diagnose};
pub use future::ResponseFuture;
pub use layer::LocalDaemonLayer;
pub use lazy::{LazyFallback, LazyFuture};
pub use paths::{DaemonPaths, LOCK_FILE, PIDFILE_FILE, SOCKET_FILE, SOCKETS_DIR};
pub use pidfile::{MAX_PIDFILE_LEN, PIDFILE_MARKER, Pidfile, PidfileError};
pub use probe::{
    DETECT_CACHE_TTL, LocalDaemonProbe, LocalDaemonStatus, UdsTarget, detect_local_daemon, probe,
};
pub use reason::FallbackReason;
pub use registry::{RouteStats, reset};
pub use service::{LocalDaemon, Route};
