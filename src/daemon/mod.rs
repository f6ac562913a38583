//! The daemon side: serve tonic services on a repository directory's socket, with the files
//! exactly as the client's probe expects them.
//!
//! ```no_run
//! # async fn run(my_service: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>) -> Result<(), tower_local_daemon::daemon::DaemonError> {
//! use tower_local_daemon::Daemon;
//!
//! // In the tool's `agent serve` verb:
//! Daemon::new(".heddle")
//!     .version(env!("CARGO_PKG_VERSION"))
//!     .add_service(my_service)
//!     .serve(std::future::pending()) // or a shutdown future of the tool's own
//!     .await
//! # }
//! ```
//!
//! # What it leaves on disk
//!
//! | file | content | when |
//! |---|---|---|
//! | `<dir>/sockets/` | directory, mode `0700`, owned by the daemon's effective uid | created at start |
//! | `<dir>/sockets/grpc.lock` | the holder's pid, its start ticks and the boot id, one a line; `flock`-ed for the daemon's life | at start |
//! | `<dir>/sockets/grpc.sock` | the listening socket, mode `0600` from the moment it exists | after the lock |
//! | `<dir>/sockets/grpc.attest` | the daemon's attestation: its pid and start, the directory it serves, its version and services (format below) | once serving, before the pidfile |
//! | `<dir>/sockets/grpc.pid` | the [`Pidfile`](crate::Pidfile), written atomically | once serving |
//! | `<dir>/sockets/spawn.record` | the failures in a row set to 0, when a record of starts exists | once serving |
//!
//! The start, in order: close the descriptors auto-start names in [`INHERITED_FDS_ENV`], take
//! the lock (or fail with [`DaemonError::AlreadyRunning`] naming the holder), remove leftovers
//! of a crashed daemon (never a socket someone still answers on), bind and listen, register
//! `grpc.health.v1` with `""` and every hosted service as NOT_SERVING, start serving, mark them
//! SERVING, write the attestation, then write the pidfile. A client that sees the pidfile can
//! connect.
//!
//! The stop, on SIGTERM, SIGINT, the shutdown future, the idle timeout, or its socket gone
//! (removed, or replaced by another daemon's): the attestation is removed, health goes
//! NOT_SERVING (Watch subscribers see it), the listener closes, in-flight calls get the grace
//! period, remaining connections are aborted, then the pidfile, socket and lock file are
//! removed while the lock is still held. A daemon killed with SIGKILL leaves files that the
//! probe reports as stale, and the next daemon's start removes them.
//!
//! Everything inside `sockets/` is done through one descriptor of that directory, opened once
//! without following a symlink: see the [`files`](self#the-sockets-directory) section below.
//!
//! # Version and directory
//!
//! Every response, `Health/Check` included, carries the daemon's version in the metadata key
//! [`VERSION_METADATA_KEY`](crate::protocol::VERSION_METADATA_KEY) (`local-daemon-version`), and the
//! identity of the directory it serves, decimal `<device>:<inode>`, in
//! [`DIRECTORY_METADATA_KEY`](crate::protocol::DIRECTORY_METADATA_KEY) (`local-daemon-directory`). A
//! client compares the latter with the directory it was built for.
//!
//! # The attestation
//!
//! `grpc.attest` says in a file what `Health/Check` says over the connection: that this
//! process (its pid and start) serves, which directory (device and inode), at which version and
//! with which services. A client trusts it for the process that wrote it (its pid and start are
//! those of the lock record, which the probe checks against the kernel, and its socket is the
//! one in place), and its first call then needs no `Health/Check` round trip; only the
//! daemon's HTTP/2 SETTINGS frame, which proves that the daemon answers. The format:
//!
//! ```text
//! tower-local-daemon attestation 1
//! pid <pid>
//! start <start ticks> <boot id>
//! directory <device>:<inode>
//! socket <device>:<inode>
//! version <version>
//! service <name>
//! ```
//!
//! One `key value` a line, each ending in `\n`. The first line names the format; `pid`,
//! `start` (field 22 of `/proc/<pid>/stat` and `/proc/sys/kernel/random/boot_id`), `directory`
//! (the directory served) and `socket` (the listening socket) come once each, `version` at
//! most once, `service` once for each hosted service (the health service's own name is not
//! one, as `Health/Check` does not know it); a client skips keys it does not know. A daemon of
//! another implementation may write it too: under its lifetime lock, after it serves and before
//! its pidfile, removed first when it begins to stop, and only if its server sends its HTTP/2
//! SETTINGS as it accepts a connection, without waiting for the client's preface. See [`LocalDaemonLayer::require_health_check`](crate::LocalDaemonLayer::require_health_check)
//! for what a client gives up by trusting it.
//!
//! # The sockets directory
//!
//! The daemon opens `<dir>/sockets` once (`O_DIRECTORY | O_NOFOLLOW`), checks its owner and
//! mode on that descriptor, and then locks, removes leftovers, binds, writes the pidfile and
//! removes its files at shutdown relative to it. A `sockets` swapped for a symlink after the
//! check, or removed and re-created by another daemon, is never touched.
//!
//! # Signals
//!
//! SIGTERM and SIGINT stop the daemon unless [`Daemon::handle_signals`] is off. A SIGINT that
//! the process inherited as ignored (a background job) stays ignored. Tokio's handlers stay
//! installed after `serve` returns.
//!
//! # Peers
//!
//! Every accepted connection whose peer (`SO_PEERCRED`) runs as another uid than the daemon's
//! effective uid is dropped before tonic sees it, with a warning and a count in
//! [`DaemonCounters::refused_peers`]. The `0700` directory keeps other users out; this check is
//! what refuses root and anyone who gets past the modes.

mod counters;
mod error;
mod files;
mod listener;
mod lock;
mod log;
mod serve;
mod shutdown;
mod tracked;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tower::Service;

pub use self::counters::DaemonCounters;
pub use self::error::DaemonError;
use self::files::SocketsDir;
use self::listener::bind_private;
use self::lock::LifetimeLock;
pub use self::serve::BoundDaemon;
use crate::paths::DaemonPaths;
use crate::protocol::{
    AUTO_STARTED_ENV, DAEMON_DIR_ENV, INHERITED_FDS_ENV, PIDFILE_MARKER, SOCKET_FILE,
};

/// How long an auto-started daemon stays up without calls, unless it sets its own.
const AUTO_STARTED_IDLE: Duration = Duration::from_secs(4 * 3600);

/// A daemon for one repository directory: its options and the services it hosts.
///
/// See the [module docs](self) for what it does on disk and when. Here a daemon and a client in
/// one process (the same executable, so the identity check passes):
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
/// use tower_local_daemon::{Daemon, LocalDaemonLayer, Route};
///
/// let dir = std::env::temp_dir().join(format!("tld-doc-daemon-{}", std::process::id()));
/// let bound = Daemon::new(&dir).version("1.0.0").handle_signals(false).bind().unwrap();
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let serving = tokio::spawn(bound.serve(async { stopped.await.ok(); }));
/// # while !dir.join("sockets/grpc.pid").exists() { tokio::task::yield_now().await; }
///
/// // The health service is always hosted: a client of it over the layer reaches the daemon.
/// let fallback = tonic_health::server::health_reporter().1;
/// let svc = tower::ServiceBuilder::new()
///     .layer(LocalDaemonLayer::new(&dir).mode_env_value(None).mark_route(true).required_version("1.0.0"))
///     .service(fallback);
/// let request = HealthCheckRequest { service: String::new() };
/// let response = HealthClient::new(svc).check(request).await.unwrap();
/// assert_eq!(response.extensions().get::<Route>(), Some(&Route::Daemon { pid: std::process::id() }));
///
/// stop.send(()).unwrap();
/// serving.await.unwrap().unwrap();
/// assert!(!dir.join("sockets/grpc.sock").exists());
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # }
/// ```
pub struct Daemon {
    dir: PathBuf,
    paths: DaemonPaths,
    routes: Option<Routes>,
    services: Vec<&'static str>,
    version: Option<String>,
    marker: String,
    grace_period: Duration,
    idle_timeout: Option<Duration>,
    handle_signals: bool,
    counters: Arc<DaemonCounters>,
    /// The tool's settings of tonic's server, applied when it is built.
    server: Option<ServerSettings>,
}

/// A tool's settings of tonic's [`Server`](tonic::transport::Server) builder.
type ServerSettings =
    Box<dyn FnOnce(tonic::transport::Server) -> tonic::transport::Server + Send + Sync>;

impl fmt::Debug for Daemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Daemon")
            .field("paths", &self.paths)
            .field("services", &self.services)
            .field("version", &self.version)
            .field("grace_period", &self.grace_period)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// A daemon for `state_dir`, with files under `<state_dir>/sockets/`. A relative
    /// `state_dir` is made absolute against the working directory now. A daemon started on a
    /// miss refuses, as it binds, any directory but the one it was started for
    /// ([`DAEMON_DIR_ENV`]).
    ///
    /// Defaults: no version, a 5 s grace period, SIGTERM and SIGINT handled, and no idle exit,
    /// except for a daemon started on a miss (its environment has
    /// [`AUTO_STARTED_ENV`]), which exits after 4 hours without calls.
    /// Any daemon exits when its socket or sockets directory is removed under it.
    pub fn new(state_dir: impl AsRef<Path>) -> Self {
        let dir = crate::paths::absolute(state_dir.as_ref());
        Self {
            paths: DaemonPaths::new(&dir),
            dir,
            routes: None,
            services: Vec::new(),
            version: None,
            marker: PIDFILE_MARKER.to_owned(),
            grace_period: Duration::from_secs(5),
            // Started on a miss, a daemon exits when idle: else every repository ever touched
            // keeps one.
            idle_timeout: std::env::var_os(AUTO_STARTED_ENV).map(|_| AUTO_STARTED_IDLE),
            handle_signals: true,
            counters: Arc::default(),
            server: None,
        }
    }

    /// Applies a tool's settings to tonic's server builder, before the daemon serves: limits
    /// (`concurrency_limit_per_connection`, `timeout`, `load_shed`), HTTP/2 settings, message
    /// sizes. Settings that the daemon itself owns are set after these: the listener, HTTP/2
    /// only (`accept_http1(false)`, so that its SETTINGS go out as it accepts), the routes
    /// (health, the version and directory metadata) and the graceful shutdown. A tower
    /// layer around a service goes on that service before [`add_service`](Self::add_service)
    /// (tonic's `InterceptedService`, or any layer whose service still names itself).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_local_daemon::Daemon;
    ///
    /// let daemon = Daemon::new("/repo/.heddle").server(|server| {
    ///     server
    ///         .concurrency_limit_per_connection(64)
    ///         .timeout(Duration::from_secs(30))
    /// });
    /// # let _ = daemon;
    /// ```
    pub fn server(
        mut self,
        settings: impl FnOnce(tonic::transport::Server) -> tonic::transport::Server
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.server = Some(Box::new(settings));
        self
    }

    /// Hosts a tonic service, such as a generated `FooServer<T>`. Its name is registered with
    /// the health service.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.services.push(S::NAME);
        self.routes = Some(match self.routes.take() {
            Some(routes) => routes.add_service(service),
            None => Routes::new(service),
        });
        self
    }

    /// The version reported in [`VERSION_METADATA_KEY`](crate::protocol::VERSION_METADATA_KEY), for
    /// clients that [require](crate::LocalDaemonLayer::required_version) one.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// How long in-flight calls may run after the daemon stops accepting (default 5 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace_period = grace;
        self
    }

    /// Stops the daemon cleanly after this long with no call in flight and none received. Off
    /// by default, except in a daemon that auto-start started (its environment has
    /// [`AUTO_STARTED_ENV`]): 4 hours, unless set here.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }

    /// Whether SIGTERM and SIGINT stop the daemon (default true). A SIGINT inherited as ignored
    /// stays ignored.
    pub fn handle_signals(mut self, handle: bool) -> Self {
        self.handle_signals = handle;
        self
    }

    /// Takes `tool`'s pidfile marker (default [`Tool::heddle`](crate::Tool::heddle)'s): give its
    /// clients the same value ([`LocalDaemonLayer::tool`](crate::LocalDaemonLayer::tool)). The
    /// call made last among this and [`pidfile_marker`](Self::pidfile_marker) wins.
    ///
    /// ```
    /// use tower_local_daemon::{Daemon, Tool};
    ///
    /// let daemon = Daemon::new("/repo/.kv").tool(&Tool::new("kv")?);
    /// # let _ = daemon;
    /// # Ok::<(), tower_local_daemon::InvalidTool>(())
    /// ```
    pub fn tool(self, tool: &crate::tool::Tool) -> Self {
        self.pidfile_marker(tool.marker())
    }

    /// The second line of the pidfile (default `heddle-agent`), for a tool that is not heddle;
    /// its clients name the same with
    /// [`LocalDaemonLayer::pidfile_marker`](crate::LocalDaemonLayer::pidfile_marker). One line
    /// of visible ASCII.
    pub fn pidfile_marker(mut self, marker: impl Into<String>) -> Self {
        self.marker = marker.into();
        self
    }

    /// Takes the lock, removes leftovers and listens; nothing is served until
    /// [`BoundDaemon::serve`]. Must be called inside a Tokio runtime with I/O enabled.
    pub fn bind(self) -> Result<BoundDaemon, DaemonError> {
        let version = self
            .version
            .as_deref()
            .map(|v| HeaderValue::from_str(v).map_err(|_| DaemonError::InvalidVersion(v.into())))
            .transpose()?;
        if !crate::tool::valid_marker(&self.marker) {
            return Err(DaemonError::InvalidMarker(self.marker));
        }
        started_for(&self.dir)?;
        close_inherited_descriptors();
        let sockets = SocketsDir::open(&self.paths.sockets_dir)?;
        let directory = sockets
            .parent_identity()
            .map_err(|e| DaemonError::io("inspect the directory", &self.dir, e))?;
        let lock = LifetimeLock::acquire(&sockets)?;
        sockets.remove_leftovers()?;
        let listener = bind_private(&sockets.fd_path(SOCKET_FILE))
            .map_err(|e| DaemonError::io("bind the socket", &self.paths.socket, e))?;
        Ok(BoundDaemon {
            daemon: self,
            version,
            directory,
            sockets,
            lock,
            listener,
        })
    }

    /// [`bind`](Self::bind), then [`serve`](BoundDaemon::serve) until `shutdown` completes,
    /// a signal arrives, or the idle timeout passes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        self.bind()?.serve(shutdown).await
    }
}

/// A daemon started on a miss (the leader of the process group auto-start made) serves the
/// directory it was started for ([`DAEMON_DIR_ENV`]), or none: a relative directory in its arguments names another one from its working directory.
/// Two spellings of one directory (a symlink) are the same directory.
fn started_for(dir: &Path) -> Result<(), DaemonError> {
    let Some(started_for) = std::env::var_os(DAEMON_DIR_ENV).map(PathBuf::from) else {
        return Ok(());
    };
    // The started command leads its own process group; a process it starts in turn inherits
    // the variable, but not the leadership, and is not bound by it.
    if nix::unistd::getpgid(None) != Ok(nix::unistd::getpid()) {
        return Ok(());
    }
    let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => crate::paths::FileIdentity::of(&a) == crate::paths::FileIdentity::of(&b),
        _ => false,
    };
    if started_for == dir || same(&started_for, dir) {
        return Ok(());
    }
    Err(DaemonError::WrongDirectory {
        started_for,
        given: dir.to_owned(),
    })
}

/// Closes the descriptors that the command which started this daemon on a miss inherited
/// without close-on-exec, as its [`INHERITED_FDS_ENV`] names them (`fd:device:inode`): a daemon
/// that held a make jobserver's pipe would keep a build waiting. Each is closed only while its
/// number still names that file.
fn close_inherited_descriptors() {
    use std::os::unix::fs::MetadataExt;
    let Some(list) = std::env::var_os(INHERITED_FDS_ENV) else {
        return;
    };
    for entry in list.to_string_lossy().split(',') {
        let mut fields = entry.split(':').map(str::parse::<u64>);
        let (Some(Ok(fd)), Some(Ok(dev)), Some(Ok(ino))) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let same = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .is_ok_and(|m| m.dev() == dev && m.ino() == ino);
        if fd > 2 && same {
            // A raw number is its own `IntoRawFd`: no `unsafe` needed to close it.
            let _ = nix::unistd::close(fd as std::os::fd::RawFd);
        }
    }
}
