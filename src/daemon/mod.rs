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
//! | `<dir>/sockets/grpc.lock` | the holder's pid and a newline; `flock`-ed for the daemon's life | at start |
//! | `<dir>/sockets/grpc.sock` | the listening socket, mode `0600` from the moment it exists | after the lock |
//! | `<dir>/sockets/grpc.pid` | the [`Pidfile`], written atomically | once serving |
//!
//! The start, in order: take the lock (or fail with [`DaemonError::AlreadyRunning`] naming the
//! holder), remove leftovers of a crashed daemon (never a socket someone still answers on),
//! bind and listen, register `grpc.health.v1` with `""` and every hosted service as
//! NOT_SERVING, start serving, mark them SERVING, then write the pidfile. A client that sees
//! the pidfile can connect.
//!
//! The stop, on SIGTERM, SIGINT, the shutdown future or the idle timeout: health goes
//! NOT_SERVING (Watch subscribers see it), the listener closes, in-flight calls get the grace
//! period, remaining connections are aborted, then the pidfile, socket and lock file are
//! removed while the lock is still held. A daemon killed with SIGKILL leaves files that the
//! probe reports as stale, and the next daemon's start removes them.
//!
//! # Version
//!
//! Every response, `Health/Check` included, carries the daemon's version in the metadata key
//! [`VERSION_METADATA_KEY`](crate::VERSION_METADATA_KEY) (`local-daemon-version`).
//!
//! # Peers
//!
//! Every accepted connection whose peer (`SO_PEERCRED`) runs as another uid than the daemon's
//! effective uid is dropped before tonic sees it, with a warning and a count in
//! [`DaemonCounters::refused_peers`]. The `0700` directory keeps other users out; this check is
//! what refuses root and anyone who gets past the modes.

mod listener;
mod lock;
mod tracked;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::Service;

use self::listener::{PeerCheckedIncoming, bind_private};
use self::lock::LifetimeLock;
use self::tracked::Tracked;
use crate::paths::SocketAddrPath;
use crate::{DaemonPaths, Pidfile};

/// Why a daemon could not start or serve.
#[derive(Debug)]
#[non_exhaustive]
pub enum DaemonError {
    /// Another daemon holds the directory's lifetime lock.
    AlreadyRunning {
        /// The holder's pid, as it wrote it in the lock file.
        pid: Option<u32>,
    },
    /// A process that took no lock (an older daemon) still answers on the socket.
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The sockets directory is not a directory owned by the daemon's effective uid.
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// An I/O error while doing `action` on `path`.
    Io {
        /// What the daemon was doing.
        action: &'static str,
        /// The file it was doing it to.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The version is not a valid metadata value.
    InvalidVersion(String),
    /// The gRPC server failed.
    Serve(tonic::transport::Error),
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyRunning { pid: Some(pid) } => write!(
                f,
                "a daemon is already running for this directory (pid {pid} holds the lock); stop it first"
            ),
            Self::AlreadyRunning { pid: None } => f.write_str(
                "a daemon is already running for this directory (it holds the lock); stop it first",
            ),
            Self::SocketInUse { path } => write!(
                f,
                "a process that holds no lock still answers on {}; stop it first",
                path.display()
            ),
            Self::UnsafeDirectory { path, problem } => {
                write!(f, "refusing to use {}: {problem}", path.display())
            }
            Self::Io {
                action,
                path,
                source,
            } => write!(f, "failed to {action} at {}: {source}", path.display()),
            Self::InvalidVersion(v) => write!(f, "version {v:?} is not a valid metadata value"),
            Self::Serve(e) => write!(f, "the gRPC server failed: {e}"),
        }
    }
}

impl DaemonError {
    /// Maps an I/O error met while doing `action` on `path`.
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

impl std::error::Error for DaemonError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Serve(e) => Some(e),
            _ => None,
        }
    }
}

/// Counters of a running daemon, shared with whoever holds [`BoundDaemon::counters`].
#[derive(Debug, Default)]
pub struct DaemonCounters {
    refused_peers: AtomicU64,
    calls: AtomicU64,
    in_flight: AtomicU64,
}

impl DaemonCounters {
    /// Connections dropped because their peer runs as another uid (or is unknown).
    pub fn refused_peers(&self) -> u64 {
        self.refused_peers.load(Ordering::Relaxed)
    }

    /// Calls received, health checks included.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Calls whose response has not finished.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

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
///     .layer(LocalDaemonLayer::new(&dir).mode_env_value(None).required_version("1.0.0"))
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
    paths: DaemonPaths,
    routes: Option<Routes>,
    services: Vec<&'static str>,
    version: Option<String>,
    grace_period: Duration,
    idle_timeout: Option<Duration>,
    handle_signals: bool,
    counters: Arc<DaemonCounters>,
}

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
    /// A daemon for `heddle_dir`, with files under `<heddle_dir>/sockets/`.
    ///
    /// Defaults: no version, a 5 s grace period, no idle exit, SIGTERM and SIGINT handled.
    pub fn new(heddle_dir: impl AsRef<Path>) -> Self {
        Self {
            paths: DaemonPaths::new(heddle_dir),
            routes: None,
            services: Vec::new(),
            version: None,
            grace_period: Duration::from_secs(5),
            idle_timeout: None,
            handle_signals: true,
            counters: Arc::default(),
        }
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

    /// The version reported in [`VERSION_METADATA_KEY`](crate::VERSION_METADATA_KEY), for
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

    /// Stops the daemon cleanly after this long with no call in flight and none received.
    /// Off by default.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }

    /// Whether SIGTERM and SIGINT stop the daemon (default true).
    pub fn handle_signals(mut self, handle: bool) -> Self {
        self.handle_signals = handle;
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
        prepare_sockets_dir(&self.paths.sockets_dir)?;
        let lock = LifetimeLock::acquire(&self.paths.lock)?;
        remove_leftovers(&self.paths)?;
        let listener = bind_private(&self.paths.socket)
            .map_err(DaemonError::io("bind the socket", &self.paths.socket))?;
        Ok(BoundDaemon {
            daemon: self,
            version,
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

/// A daemon that holds the lock and listens, ready to serve.
#[derive(Debug)]
pub struct BoundDaemon {
    daemon: Daemon,
    version: Option<HeaderValue>,
    lock: LifetimeLock,
    listener: UnixListener,
}

impl BoundDaemon {
    /// The daemon's counters, readable while it serves.
    pub fn counters(&self) -> Arc<DaemonCounters> {
        self.daemon.counters.clone()
    }

    /// The daemon's files.
    pub fn paths(&self) -> &DaemonPaths {
        &self.daemon.paths
    }

    /// Serves until `shutdown` completes, a signal arrives (unless disabled) or the idle timeout
    /// passes; then stops as the [module docs](self) describe and removes its files.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        let Self {
            daemon,
            version,
            lock,
            listener,
        } = self;
        let paths = daemon.paths.clone();
        let socket_id = file_id(&paths.socket);
        let (reporter, health) = tonic_health::server::health_reporter();
        let names: Vec<&'static str> = std::iter::once("")
            .chain(daemon.services.iter().copied())
            .collect();
        set_all(&reporter, &names, ServingStatus::NotServing).await;

        let routes = match daemon.routes {
            Some(routes) => routes.add_service(health),
            None => Routes::new(health),
        };
        let routes = Tracked {
            inner: routes.prepare(),
            version,
            counters: daemon.counters.clone(),
        };

        let (abort_tx, abort_rx) = watch::channel(false);
        let incoming = PeerCheckedIncoming {
            listener,
            counters: daemon.counters.clone(),
            abort: abort_rx,
            backoff: None,
        };
        let (stop_accepting, accepting_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder().serve_with_incoming_shutdown(
            routes,
            incoming,
            async {
                let _ = accepting_stopped.await;
            },
        );
        let mut server = std::pin::pin!(server);

        let signals = listen_for_signals(daemon.handle_signals);
        set_all(&reporter, &names, ServingStatus::Serving).await;
        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let pidfile = Pidfile {
            pid: std::process::id(),
            started_at,
        };
        let mut files = OurFiles {
            socket: socket_id,
            pidfile: None,
        };
        if let Err(source) = pidfile.write_atomic(&paths.pidfile) {
            remove_files(&paths, &files, lock);
            return Err(DaemonError::io("write the pidfile", &paths.pidfile)(source));
        }
        files.pidfile = file_id(&paths.pidfile);
        tracing::info!(socket = %paths.socket.display(), pid = pidfile.pid, "local daemon serving");

        let stop = stop_signal(shutdown, signals, daemon.idle_timeout, &daemon.counters);
        let served_to_end = tokio::select! {
            result = &mut server => Some(result),
            why = stop => {
                tracing::info!(why, "local daemon stopping");
                None
            }
        };
        let result = match served_to_end {
            Some(result) => result.map_err(DaemonError::Serve),
            None => {
                set_all(&reporter, &names, ServingStatus::NotServing).await;
                // Let Watch subscribers' connections carry the change before the listener closes.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = stop_accepting.send(());
                let grace = tokio::time::timeout(daemon.grace_period, &mut server).await;
                match grace {
                    Ok(result) => result.map_err(DaemonError::Serve),
                    Err(_) => {
                        tracing::warn!("grace period over; aborting the remaining connections");
                        let _ = abort_tx.send(true);
                        let _ = tokio::time::timeout(Duration::from_secs(1), &mut server).await;
                        Ok(())
                    }
                }
            }
        };
        remove_files(&paths, &files, lock);
        result
    }
}

async fn set_all(reporter: &HealthReporter, names: &[&str], status: ServingStatus) {
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

/// Resolves with the reason to stop.
/// SIGTERM and SIGINT listeners, installed before the pidfile is written so that no signal
/// between the two kills the daemon without its cleanup.
type SignalListeners = Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>;

fn listen_for_signals(handle_signals: bool) -> SignalListeners {
    use tokio::signal::unix::{SignalKind, signal};
    if !handle_signals {
        return None;
    }
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => Some((term, int)),
        _ => {
            tracing::warn!(
                "could not install signal handlers; only the shutdown future stops the daemon"
            );
            None
        }
    }
}

async fn stop_signal(
    shutdown: impl Future<Output = ()>,
    signals: SignalListeners,
    idle_timeout: Option<Duration>,
    counters: &DaemonCounters,
) -> &'static str {
    let signals = async {
        match signals {
            Some((mut term, mut int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            None => std::future::pending().await,
        }
    };
    let idle = async {
        let Some(idle) = idle_timeout else {
            return std::future::pending().await;
        };
        let tick = (idle / 4).max(Duration::from_millis(10));
        let mut seen = counters.calls();
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            let calls = counters.calls();
            if calls != seen || counters.in_flight() > 0 {
                seen = calls;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= idle {
                return "idle timeout";
            }
        }
    };
    tokio::select! {
        () = shutdown => "shutdown future",
        why = signals => why,
        why = idle => why,
    }
}

/// Creates `<dir>/sockets` with mode `0700`, or checks the one there: a real directory (not a
/// symlink) owned by our effective uid, then tightened to `0700`.
fn prepare_sockets_dir(dir: &Path) -> Result<(), DaemonError> {
    let io_error = |action, source| DaemonError::io(action, dir)(source);
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_error("create the directory", e))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error("create the sockets directory", e)),
    }
    let metadata = std::fs::symlink_metadata(dir).map_err(|e| io_error("inspect", e))?;
    let unsafe_dir = |problem| DaemonError::UnsafeDirectory {
        path: dir.to_owned(),
        problem,
    };
    if !metadata.file_type().is_dir() {
        return Err(unsafe_dir("it is not a directory (a symlink?)"));
    }
    if metadata.uid() != nix::unistd::geteuid().as_raw() {
        return Err(unsafe_dir("it is owned by another user"));
    }
    // The umask may have narrowed the mode at creation; an old directory may be looser.
    if metadata.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_error("set the mode of", e))?;
    }
    Ok(())
}

/// Removes a crashed daemon's pidfile and socket. Called only by the lock holder. A socket that
/// still answers belongs to a live daemon that takes no lock: it is left alone.
fn remove_leftovers(paths: &DaemonPaths) -> Result<(), DaemonError> {
    match std::fs::symlink_metadata(&paths.socket) {
        Ok(metadata) => {
            if metadata.file_type().is_socket() && socket_answers(&paths.socket) {
                return Err(DaemonError::SocketInUse {
                    path: paths.socket.clone(),
                });
            }
            std::fs::remove_file(&paths.socket)
                .map_err(DaemonError::io("remove the leftover socket", &paths.socket))?;
            tracing::info!(socket = %paths.socket.display(), "removed a leftover socket");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DaemonError::io("inspect the socket", &paths.socket)(source));
        }
    }
    match std::fs::remove_file(&paths.pidfile) {
        Ok(()) => tracing::info!(pidfile = %paths.pidfile.display(), "removed a leftover pidfile"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DaemonError::io(
                "remove the leftover pidfile",
                &paths.pidfile,
            )(source));
        }
    }
    Ok(())
}

/// Whether someone listens on the socket: a non-blocking connect, so that a hung daemon with a
/// full backlog cannot block the start (it counts as listening).
fn socket_answers(path: &Path) -> bool {
    use nix::errno::Errno;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use std::os::fd::AsRawFd;
    let Ok(addr) = SocketAddrPath::new(path) else {
        return false;
    };
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    ) else {
        return false;
    };
    let Ok(addr) = UnixAddr::new(addr.path()) else {
        return false;
    };
    matches!(
        connect(fd.as_raw_fd(), &addr),
        Ok(()) | Err(Errno::EAGAIN | Errno::EINPROGRESS)
    )
}

/// A file's device and inode, without following a symlink.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes `path` if it is still the file this daemon made: should `sockets/` have been
/// removed and another daemon started meanwhile, its files are left alone.
fn remove_if_ours(path: &Path, ours: Option<(u64, u64)>) {
    if ours.is_none() || file_id(path) != ours {
        return;
    }
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove");
    }
}

/// The identities of the files this daemon made.
#[derive(Debug, Default)]
struct OurFiles {
    socket: Option<(u64, u64)>,
    pidfile: Option<(u64, u64)>,
}

/// Removes the pidfile, the socket and the lock file, in that order, while the lock is held.
fn remove_files(paths: &DaemonPaths, files: &OurFiles, lock: LifetimeLock) {
    remove_if_ours(&paths.pidfile, files.pidfile);
    remove_if_ours(&paths.socket, files.socket);
    lock.remove();
}
