//! The upstream one-call functions, under heddle's names: probe and connect, or probe, connect
//! and handshake into a tonic [`Channel`] for callers who want one. The layer does not use
//! them; it keeps its connections in the registry.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::checked::connect_checked;
use super::handshake::{broken_connection, check_health, within};
use crate::config::Settings;
use crate::paths::DaemonPaths;
use crate::probe::{UdsTarget, probe_paths};
use crate::reason::FallbackReason;
use crate::sync::lock;
use crate::tool::Tool;

/// A checked connection to a directory's daemon: the target that passed the probe, and a tonic
/// [`Channel`] over the one connection that passed the peer check and the health handshake.
///
/// The channel never redials: once its connection ends, its calls fail with `UNAVAILABLE`, and
/// a new channel needs the checks again.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LocalDaemonChannel {
    /// The daemon's socket and pid.
    pub target: UdsTarget,
    /// The channel over the checked connection.
    pub channel: Channel,
    /// The version the daemon reported in [`VERSION_METADATA_KEY`](crate::protocol::VERSION_METADATA_KEY), if any.
    pub version: Option<String>,
}

/// Probes `state_dir`'s daemon, connects, and checks the peer credentials: the peer's uid is our
/// effective uid and its pid is the pidfile's. `None` when any check fails; see
/// [`try_detect_local_daemon_with_connect_probe`] for the reason.
///
/// No request is sent, so the daemon does not get to say which directory it serves: only
/// [`connect_local_daemon_channel`] and the layer check that.
pub async fn detect_local_daemon_with_connect_probe(
    state_dir: impl AsRef<Path>,
    timeout: Duration,
) -> Option<UdsTarget> {
    try_detect_local_daemon_with_connect_probe(state_dir, timeout)
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
    state_dir: impl AsRef<Path>,
    timeout: Duration,
) -> Result<UdsTarget, FallbackReason> {
    Tool::heddle()
        .try_detect_with_connect_probe(state_dir, timeout)
        .await
}

/// Probes, connects, checks the peer, opens a channel and asks `Health/Check` for `""`, all
/// under one deadline. `None` when any check fails; see [`try_connect_local_daemon_channel`].
pub async fn connect_local_daemon_channel(
    state_dir: impl AsRef<Path>,
    timeout: Duration,
) -> Option<LocalDaemonChannel> {
    try_connect_local_daemon_channel(state_dir, timeout)
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
    state_dir: impl AsRef<Path>,
    timeout: Duration,
) -> Result<LocalDaemonChannel, FallbackReason> {
    Tool::heddle().try_connect_channel(state_dir, timeout).await
}

/// The tool-aware forms of the one-call functions: with the tool's pidfile marker, never
/// heddle's.
impl Tool {
    /// [`try_detect_local_daemon_with_connect_probe`] for this tool's daemon of `state_dir`.
    pub async fn try_detect_with_connect_probe(
        &self,
        state_dir: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<UdsTarget, FallbackReason> {
        let paths = DaemonPaths::new(state_dir);
        let target = probe_paths(&paths, &Settings::for_tool(self)).into_target()?;
        tokio::time::timeout(timeout, connect_checked(&target))
            .await
            .map_err(|_| FallbackReason::DeadlineExceeded)??;
        Ok(target)
    }

    /// [`try_connect_local_daemon_channel`] for this tool's daemon of `state_dir`.
    pub async fn try_connect_channel(
        &self,
        state_dir: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<LocalDaemonChannel, FallbackReason> {
        connect_channel(self, &crate::paths::absolute(state_dir.as_ref()), timeout).await
    }
}

async fn connect_channel(
    tool: &Tool,
    dir: &Path,
    timeout: Duration,
) -> Result<LocalDaemonChannel, FallbackReason> {
    let settings = Settings {
        deadline: timeout,
        ..Settings::for_tool(tool)
    };
    let target = probe_paths(&DaemonPaths::new(dir), &settings).into_target()?;
    let attempt = async {
        let stream = connect_checked(&target).await?;
        let channel = channel_over(stream, &settings).await?;
        let version = check_health(channel.clone(), target.pid, dir, &settings).await?;
        Ok(LocalDaemonChannel {
            target: target.clone(),
            channel,
            version,
        })
    };
    within(tokio::time::Instant::now().checked_add(timeout), attempt).await
}

/// A tonic `Channel` over the checked connection, with the layer's keepalive.
async fn channel_over(stream: UnixStream, settings: &Settings) -> Result<Channel, FallbackReason> {
    let connector = OneShotConnector {
        stream: Arc::new(Mutex::new(Some(stream))),
    };
    // The URI only gives the `:authority`; the connector decides where bytes go.
    Endpoint::from_static("http://localhost")
        .http2_keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| FallbackReason::HandshakeFailed {
            message: broken_connection(&e).unwrap_or_else(|| error_chain(&e)),
        })
}

/// Hands the one checked connection to the channel, and refuses to dial again: tonic's
/// `Channel` would otherwise reconnect to whatever listens on the path next, with no checks.
#[derive(Clone)]
struct OneShotConnector {
    stream: Arc<Mutex<Option<UnixStream>>>,
}

impl tower::Service<Uri> for OneShotConnector {
    type Response = TokioIo<UnixStream>;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<Self::Response>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        std::future::ready(match lock(&self.stream).take() {
            Some(stream) => Ok(TokioIo::new(stream)),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the local daemon connection ended; a new one must pass the checks again",
            )),
        })
    }
}

/// An error and its sources, joined for a person to read.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        message.push_str(": ");
        message.push_str(&e.to_string());
        source = e.source();
    }
    message
}
