//! The second and third checks: connect to the socket and check the peer's credentials, then
//! open a tonic `Channel` over that one connection and ask `grpc.health.v1.Health/Check`.
//!
//! The channel's connector hands over the single connection that passed the peer check, and
//! refuses every redial: tonic's `Channel` would otherwise reconnect to whatever listens on the
//! path next, with no checks. A daemon that restarts is found by the registry's re-probe, which
//! runs the whole chain again.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::Settings;
use crate::paths::{DaemonPaths, FileIdentity, SocketAddrPath};
use crate::peer::{PeerCredentials, own_uid};
use crate::probe::{UdsTarget, probe_paths};
use crate::protocol::{DIRECTORY_METADATA_KEY, VERSION_METADATA_KEY};
use crate::reason::{FallbackReason, error_chain};

/// A checked connection to a directory's daemon: the target that passed the probe, and a tonic
/// [`Channel`] over the one connection that passed the peer check and the health handshake.
///
/// The channel never redials: once its connection ends, its calls fail with `UNAVAILABLE`, and
/// a new channel needs the checks again.
#[derive(Debug, Clone)]
pub struct LocalDaemonChannel {
    /// The daemon's socket and pid.
    pub target: UdsTarget,
    /// The channel over the checked connection.
    pub channel: Channel,
    /// The version the daemon reported in [`VERSION_METADATA_KEY`], if any.
    pub version: Option<String>,
}

/// Probes `heddle_dir`'s daemon, connects, and checks the peer credentials: the peer's uid is our
/// effective uid and its pid is the pidfile's. `None` when any check fails; see
/// [`try_detect_local_daemon_with_connect_probe`] for the reason.
///
/// No request is sent, so the daemon does not get to say which directory it serves: only
/// [`connect_local_daemon_channel`] and the layer check that.
pub async fn detect_local_daemon_with_connect_probe(
    heddle_dir: impl AsRef<Path>,
    timeout: Duration,
) -> Option<UdsTarget> {
    try_detect_local_daemon_with_connect_probe(heddle_dir, timeout)
        .await
        .ok()
}

/// [`detect_local_daemon_with_connect_probe`], with the reason a check failed.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use tower_local_daemon::{try_detect_local_daemon_with_connect_probe, FallbackReason};
///
/// let dir = std::env::temp_dir().join("tower-local-daemon-doc-connect-probe");
/// let result = try_detect_local_daemon_with_connect_probe(&dir, Duration::from_millis(200)).await;
/// assert_eq!(result, Err(FallbackReason::NoPidfile));
/// # }
/// ```
pub async fn try_detect_local_daemon_with_connect_probe(
    heddle_dir: impl AsRef<Path>,
    timeout: Duration,
) -> Result<UdsTarget, FallbackReason> {
    let paths = DaemonPaths::new(heddle_dir);
    let target = probe_paths(&paths, &Settings::default().identity).into_target()?;
    tokio::time::timeout(timeout, connect_checked(&target))
        .await
        .map_err(|_| FallbackReason::DeadlineExceeded)??;
    Ok(target)
}

/// Probes, connects, checks the peer, opens a channel and asks `Health/Check` for `""`, all
/// under one deadline. `None` when any check fails; see [`try_connect_local_daemon_channel`].
pub async fn connect_local_daemon_channel(
    heddle_dir: impl AsRef<Path>,
    timeout: Duration,
) -> Option<LocalDaemonChannel> {
    try_connect_local_daemon_channel(heddle_dir, timeout)
        .await
        .ok()
}

/// [`connect_local_daemon_channel`], with the reason a check failed. Not cached: the layer is
/// the cached form.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use tower_local_daemon::{try_connect_local_daemon_channel, FallbackReason};
///
/// let dir = std::env::temp_dir().join("tower-local-daemon-doc-connect-channel");
/// let result = try_connect_local_daemon_channel(&dir, Duration::from_millis(200)).await;
/// assert_eq!(result.unwrap_err(), FallbackReason::NoPidfile);
/// # }
/// ```
pub async fn try_connect_local_daemon_channel(
    heddle_dir: impl AsRef<Path>,
    timeout: Duration,
) -> Result<LocalDaemonChannel, FallbackReason> {
    let dir = heddle_dir.as_ref();
    let settings = Settings {
        deadline: timeout,
        ..Settings::default()
    };
    let target = probe_paths(&DaemonPaths::new(dir), &settings.identity).into_target()?;
    establish(target, dir, &settings, ConnectionEnd::ignored())
        .await
        .result
}

/// Where the time of [`establish`] went.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HandshakeTimings {
    pub(crate) connect: Duration,
    pub(crate) handshake: Duration,
}

/// The outcome of [`establish`], with its timings even when it failed.
#[derive(Debug)]
pub(crate) struct Established {
    pub(crate) result: Result<LocalDaemonChannel, FallbackReason>,
    pub(crate) timings: HandshakeTimings,
}

/// Connect, peer check, channel and health handshake under the one deadline of `settings`; the
/// daemon must serve `dir`. `on_end` fires once when the connection ends (EOF, an error, or the
/// connection dropped).
pub(crate) async fn establish(
    target: UdsTarget,
    dir: &Path,
    settings: &Settings,
    on_end: ConnectionEnd,
) -> Established {
    let start = Instant::now();
    let connect_done = Mutex::new(None::<Instant>);

    let attempt = async {
        let stream = connect_checked(&target).await?;
        *connect_done.lock().unwrap() = Some(Instant::now());
        let (channel, version) = handshake(stream, dir, settings, on_end).await?;
        Ok(LocalDaemonChannel {
            target: target.clone(),
            channel,
            version,
        })
    };
    let result = match tokio::time::timeout(settings.deadline, attempt).await {
        Ok(result) => result,
        Err(_) => Err(FallbackReason::DeadlineExceeded),
    };
    let end = Instant::now();
    let connected = connect_done.lock().unwrap().unwrap_or(end);
    Established {
        result,
        timings: HandshakeTimings {
            connect: connected - start,
            handshake: end - connected,
        },
    }
}

/// Opens a channel over a checked connection and asks `Health/Check` for every required
/// service; checks that the daemon serves `dir`; returns the channel and the daemon's version.
pub(crate) async fn handshake(
    stream: UnixStream,
    dir: &Path,
    settings: &Settings,
    on_end: ConnectionEnd,
) -> Result<(Channel, Option<String>), FallbackReason> {
    let channel = channel_over(stream, settings, on_end).await?;
    let version = check_health(&channel, dir, settings).await?;
    Ok((channel, version))
}

/// Connects to the target's socket and checks the kernel-reported peer credentials.
pub(crate) async fn connect_checked(target: &UdsTarget) -> Result<UnixStream, FallbackReason> {
    let addr = SocketAddrPath::new(&target.socket_path).map_err(connect_reason)?;
    let stream = UnixStream::connect(addr.path())
        .await
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

async fn channel_over(
    stream: UnixStream,
    settings: &Settings,
    on_end: ConnectionEnd,
) -> Result<Channel, FallbackReason> {
    let connector = OneShotConnector {
        stream: Arc::new(Mutex::new(Some(WatchedStream {
            inner: stream,
            on_end: on_end.clone(),
        }))),
        on_end,
    };
    // The URI only gives the `:authority`; the connector decides where bytes go.
    Endpoint::from_static("http://localhost")
        .http2_keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| FallbackReason::HandshakeFailed {
            message: error_chain(&e),
        })
}

/// Asks `Health/Check` for every required service (the whole server when none is named);
/// checks the directory the daemon reports; returns the daemon's version.
async fn check_health(
    channel: &Channel,
    dir: &Path,
    settings: &Settings,
) -> Result<Option<String>, FallbackReason> {
    let mut client = HealthClient::new(channel.clone());
    let mut version = None;
    let mut served = None;
    let whole_server = [String::new()];
    let services = match settings.required_services.as_slice() {
        [] => &whole_server[..],
        named => named,
    };
    for service in services {
        let request = HealthCheckRequest {
            service: service.clone(),
        };
        match client.check(request).await {
            Ok(response) => {
                if response.get_ref().status != ServingStatus::Serving as i32 {
                    return Err(FallbackReason::NotServing {
                        service: service.clone(),
                    });
                }
                let text = |key| {
                    let value = response.metadata().get(key)?;
                    Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
                };
                version = text(VERSION_METADATA_KEY);
                served = text(DIRECTORY_METADATA_KEY);
            }
            Err(status) => match status.code() {
                tonic::Code::NotFound => {
                    return Err(FallbackReason::ServiceNotHosted {
                        service: service.clone(),
                    });
                }
                tonic::Code::Unimplemented if settings.accept_unimplemented_health => {}
                tonic::Code::Unimplemented => return Err(FallbackReason::HealthUnimplemented),
                _ => {
                    return Err(FallbackReason::HandshakeFailed {
                        message: status.to_string(),
                    });
                }
            },
        }
    }
    if let Some(expected) = &settings.required_version
        && version.as_ref() != Some(expected)
    {
        return Err(FallbackReason::VersionMismatch {
            expected: expected.clone(),
            actual: version,
        });
    }
    check_directory(served.as_deref(), dir, settings.accept_unverified_directory)?;
    Ok(version)
}

/// The daemon must serve `dir`: the identity it reports is the one `dir` has now. A renamed
/// directory keeps its inode, so a rename is no mismatch; a shared, linked or moved sockets
/// directory is.
fn check_directory(
    served: Option<&str>,
    dir: &Path,
    accept_unreported: bool,
) -> Result<(), FallbackReason> {
    let Some(served) = served else {
        return match accept_unreported {
            true => Ok(()),
            false => Err(FallbackReason::DirectoryUnreported),
        };
    };
    let expected = FileIdentity::following(dir);
    match (&expected, FileIdentity::parse(served)) {
        (Ok(expected), Some(served)) if *expected == served => Ok(()),
        _ => Err(FallbackReason::DirectoryMismatch {
            expected: match expected {
                Ok(id) => id.to_string(),
                Err(e) => format!("unreadable: {e}"),
            },
            served: served.to_owned(),
        }),
    }
}

/// How a daemon connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndCause {
    /// The daemon closed it, or an I/O error broke it.
    Daemon,
    /// This process dropped it: keepalive gave up, or the runtime shut down.
    Dropped,
}

/// Called once when a daemon connection ends.
#[derive(Clone)]
pub(crate) struct ConnectionEnd {
    fired: Arc<AtomicBool>,
    callback: Arc<dyn Fn(EndCause) + Send + Sync>,
}

impl std::fmt::Debug for ConnectionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionEnd")
            .field("fired", &self.has_fired())
            .finish()
    }
}

impl ConnectionEnd {
    pub(crate) fn new(callback: impl Fn(EndCause) + Send + Sync + 'static) -> Self {
        Self {
            fired: Arc::new(AtomicBool::new(false)),
            callback: Arc::new(callback),
        }
    }

    pub(crate) fn ignored() -> Self {
        Self::new(|_| {})
    }

    pub(crate) fn has_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    fn fire(&self, cause: EndCause) {
        if !self.fired.swap(true, Ordering::AcqRel) {
            (self.callback)(cause);
        }
    }
}

/// Hands the one checked connection to the channel, and refuses to dial again.
///
/// A second dial means the connection can take no more requests (the daemon sent GOAWAY, or
/// the connection broke): that ends the route at once, before the socket closes, so that later
/// calls go in-process instead of failing one after another until it does.
#[derive(Clone)]
struct OneShotConnector {
    stream: Arc<Mutex<Option<WatchedStream>>>,
    on_end: ConnectionEnd,
}

impl tower::Service<Uri> for OneShotConnector {
    type Response = TokioIo<WatchedStream>;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<Self::Response>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        std::future::ready(match self.stream.lock().unwrap().take() {
            Some(stream) => Ok(TokioIo::new(stream)),
            None => {
                self.on_end.fire(EndCause::Daemon);
                Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the local daemon connection ended; a new one must pass the checks again",
                ))
            }
        })
    }
}

/// The daemon connection, which reports its own end: EOF, an I/O error, or being dropped (the
/// HTTP/2 connection task ended, for example because keepalive gave up or the runtime stopped).
struct WatchedStream {
    inner: UnixStream,
    on_end: ConnectionEnd,
}

impl WatchedStream {
    fn watch<T>(&self, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(_)) = &poll {
            self.on_end.fire(EndCause::Daemon);
        }
        poll
    }
}

impl Drop for WatchedStream {
    fn drop(&mut self) {
        self.on_end.fire(EndCause::Dropped);
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(())))
            && buf.filled().len() == before
            && buf.remaining() > 0
        {
            self.on_end.fire(EndCause::Daemon); // EOF
        }
        self.watch(poll)
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
