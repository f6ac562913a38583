//! [`BoundDaemon::serve`]: start (health NOT_SERVING, the server, health SERVING, the
//! pidfile), wait for a reason to stop, drain, and remove the files this daemon made.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::Service;

use super::Daemon;
use super::counters::DaemonCounters;
use super::error::DaemonError;
use super::files::SocketsDir;
use super::listener::PeerCheckedIncoming;
use super::lock::LifetimeLock;
use super::log::keep_log_bounded;
use super::shutdown::{SignalListeners, drain, stop_reason};
use super::tracked::Tracked;
use crate::attestation::Attestation;
use crate::paths::{DaemonPaths, FileIdentity};
use crate::pidfile::Pidfile;
use crate::protocol::{ATTESTATION_FILE, PIDFILE_FILE, SOCKET_FILE};

/// A daemon that holds the lock and listens, ready to serve.
#[derive(Debug)]
pub struct BoundDaemon {
    pub(super) daemon: Daemon,
    pub(super) version: Option<HeaderValue>,
    /// The identity of the directory served.
    pub(super) directory: FileIdentity,
    pub(super) sockets: SocketsDir,
    pub(super) lock: LifetimeLock,
    pub(super) listener: UnixListener,
}

/// The files this daemon made, by identity: only those are removed at the end.
#[derive(Debug, Default)]
struct OurFiles {
    socket: Option<FileIdentity>,
    attestation: Option<FileIdentity>,
    pidfile: Option<FileIdentity>,
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

    /// Hosts a tonic service, as [`Daemon::add_service`] does, after the bind: a daemon that
    /// loads its repository before it can build its services binds first, so that it holds the
    /// lifetime lock while it loads. A second daemon then fails at once with
    /// [`DaemonError::AlreadyRunning`] instead of after its own load, and clients with
    /// auto-start see a daemon loading (the lock held, no pidfile yet) and wait for it.
    ///
    /// ```no_run
    /// # async fn run(load: impl FnOnce() -> tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>) -> Result<(), tower_local_daemon::daemon::DaemonError> {
    /// use tower_local_daemon::Daemon;
    ///
    /// let bound = Daemon::new("/repo/.heddle").bind()?; // the lock first
    /// let service = load(); // then the repository, however long it takes
    /// bound.add_service(service).serve(std::future::pending()).await
    /// # }
    /// ```
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
        self.daemon = self.daemon.add_service(service);
        self
    }

    /// Serves until `shutdown` completes, a signal arrives (unless disabled) or the idle timeout
    /// passes; then stops as the [module docs](super) describe and removes its files.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        let Self {
            daemon,
            version,
            directory,
            sockets,
            lock,
            listener,
        } = self;
        let mut files = OurFiles {
            socket: sockets.identity(SOCKET_FILE),
            ..OurFiles::default()
        };

        // Start: health NOT_SERVING, the server running, health SERVING, the attestation, then
        // the pidfile.
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
            directory: HeaderValue::from_str(&directory.to_string())
                .expect("decimal digits and a colon are a valid header value"),
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
        let builder = tonic::transport::Server::builder();
        let builder = match daemon.server {
            Some(settings) => settings(builder),
            None => builder,
        };
        // HTTP/2 only, so that the server sends its SETTINGS as it accepts, before the client's
        // preface: an attested first call waits for them.
        let builder = builder.accept_http1(false);
        let server = builder.serve_with_incoming_shutdown(routes, incoming, async {
            let _ = accepting_stopped.await;
        });
        let mut server = std::pin::pin!(server);
        let signals = SignalListeners::install(daemon.handle_signals);
        set_all(&reporter, &names, ServingStatus::Serving).await;
        // The attestation before the pidfile: a client that sees the pidfile sees it too.
        files.attestation = files.socket.and_then(|socket| {
            write_attestation(
                &sockets,
                daemon.version.as_deref(),
                &daemon.services,
                [directory, socket],
            )
        });
        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let pidfile = Pidfile::new(std::process::id(), started_at);
        match sockets.write_atomically(PIDFILE_FILE, &pidfile.render_with_marker(&daemon.marker)) {
            Ok(id) => files.pidfile = Some(id),
            Err(source) => {
                remove_files(&sockets, &files, lock);
                let path = sockets.display_path(PIDFILE_FILE);
                return Err(DaemonError::io("write the pidfile", &path, source));
            }
        }
        let socket = &daemon.paths.socket;
        tracing::info!(socket = %socket.display(), pid = pidfile.pid, "local daemon serving");

        // Wait for a reason to stop, unless the server ends by itself.
        // Gone: no file by that name, or another one; a `stat` that fails (EIO) proves neither.
        let socket_gone = || {
            sockets
                .try_identity(SOCKET_FILE)
                .is_ok_and(|id| id != files.socket)
        };
        let stop = stop_reason(
            shutdown,
            signals,
            daemon.idle_timeout,
            &daemon.counters,
            socket_gone,
        );
        // Served, whoever calls: a started daemon used only by layers without auto-start must
        // not leave the backoff counting it as a failure.
        let stop = async { tokio::join!(mark_served(&sockets), stop).1 };
        // A log that auto-start gave stays bounded however long the daemon runs.
        let stop = async {
            tokio::select! {
                why = stop => why,
                never = keep_log_bounded(&sockets) => match never {},
            }
        };
        let result = tokio::select! {
            result = &mut server => result.map_err(DaemonError::Serve),
            why = stop => {
                tracing::info!(why, "local daemon stopping");
                // The attestation goes first: a client that probes from now on asks
                // `Health/Check`, and hears NOT_SERVING.
                sockets.remove_if_ours(ATTESTATION_FILE, files.attestation.take());
                // Drain: health NOT_SERVING, carried to Watch subscribers before the listener
                // closes, while the server still accepts (a client that connects meanwhile
                // hears NOT_SERVING, where one left in the backlog would see a reset); then the
                // grace period for in-flight calls.
                set_all(&reporter, &names, ServingStatus::NotServing).await;
                let settle = Duration::from_millis(20);
                match tokio::time::timeout(settle, &mut server).await {
                    Ok(ended) => ended.map_err(DaemonError::Serve),
                    Err(_) => {
                        let _ = stop_accepting.send(());
                        drain(&mut server, daemon.grace_period, &abort_tx)
                            .await
                            .map_err(DaemonError::Serve)
                    }
                }
            }
        };
        remove_files(&sockets, &files, lock);
        result
    }
}

/// Marks the spawn record served, waiting (boundedly) for a spawner that holds the spawn lock:
/// it writes the record for the start it made until it lets go.
async fn mark_served(sockets: &SocketsDir) {
    for _ in 0..200 {
        match sockets.mark_served() {
            Ok(false) => tokio::time::sleep(Duration::from_millis(10)).await,
            Ok(true) => return,
            Err(e) => {
                tracing::warn!(error = %e, "could not mark the spawn record served");
                return;
            }
        }
    }
    tracing::warn!("could not mark the spawn record served: the spawn lock stayed held");
}

async fn set_all(reporter: &HealthReporter, names: &[&str], status: ServingStatus) {
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

/// Writes the daemon's [`Attestation`]; returns the identity of the file written. A daemon that
/// cannot attest (its start unreadable, a version with a line break, too many services) writes
/// none, and its clients ask `Health/Check`.
fn write_attestation(
    sockets: &SocketsDir,
    version: Option<&str>,
    services: &[&str],
    [directory, socket]: [FileIdentity; 2],
) -> Option<FileIdentity> {
    let attestation = Attestation {
        pid: std::process::id(),
        start: crate::process::own_start().ok()?,
        directory,
        socket,
        version: version.map(str::to_owned),
        services: services.iter().map(|s| s.to_string()).collect(),
    };
    let Some(text) = attestation.render() else {
        tracing::warn!("the attestation does not fit its file; clients will ask Health/Check");
        return None;
    };
    sockets
        .write_atomically(ATTESTATION_FILE, &text)
        .inspect_err(|e| {
            let path = sockets.display_path(ATTESTATION_FILE);
            tracing::warn!(path = %path.display(), error = %e, "could not write the attestation");
        })
        .ok()
}

/// Removes the attestation, the pidfile, the socket and the lock file, in that order, while
/// the lock is held.
fn remove_files(sockets: &SocketsDir, files: &OurFiles, lock: LifetimeLock) {
    sockets.remove_if_ours(ATTESTATION_FILE, files.attestation);
    sockets.remove_if_ours(PIDFILE_FILE, files.pidfile);
    sockets.remove_if_ours(SOCKET_FILE, files.socket);
    lock.remove(sockets);
}
