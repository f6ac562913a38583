//! The third check: HTTP/2 over the checked connection, then `grpc.health.v1.Health/Check`
//! for every required service, the directory the daemon serves and its version; or, for a
//! daemon that attests itself, the same checks of its [`Attestation`] once its HTTP/2
//! SETTINGS frame has arrived, and no round trip of its own.

use std::future::Future;
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use tokio::net::UnixStream;
use tonic::body::Body;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::BoxError;

use super::checked::connect_checked;
use crate::attestation::{Attestation, Attested};
use crate::config::Settings;
use crate::http2::{
    ConnectionBroke, ConnectionEnd, ConnectionTask, DaemonClient, open, what_broke,
};
use crate::paths::{DaemonPaths, FileIdentity};
use crate::probe::UdsTarget;
use crate::protocol::{DIRECTORY_METADATA_KEY, VERSION_METADATA_KEY};
use crate::reason::FallbackReason;

/// What proved a daemon serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proof {
    /// Its attestation, for its process, and its HTTP/2 SETTINGS frame.
    Attestation,
    /// `Health/Check` over the connection.
    HealthCheck,
}

/// A daemon connection that passed every check.
#[derive(Debug)]
pub(crate) struct DaemonConnection {
    pub(crate) target: UdsTarget,
    pub(crate) client: DaemonClient,
    /// The version the daemon reported, if any.
    pub(crate) version: Option<String>,
    pub(crate) proof: Proof,
    /// The task that drives the connection.
    pub(crate) task: ConnectionTask,
    /// Fires once when the connection ends.
    pub(crate) end: ConnectionEnd,
}

/// Connect, peer check, HTTP/2 and the handshake under the one deadline of `settings`; the
/// daemon must serve `dir`. Among `paths` (none: always ask `Health/Check`) the daemon's
/// attestation is looked for once the connect is under way, while the daemon wakes to accept
/// it ([`trusted_attestation`]). `on_end` fires once when the connection ends.
pub(crate) async fn establish(
    target: UdsTarget,
    paths: Option<&DaemonPaths>,
    dir: &Path,
    settings: &Settings,
    on_end: ConnectionEnd,
) -> Result<DaemonConnection, FallbackReason> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now().checked_add(settings.deadline);
    let connected = within(deadline, connect_checked(&target)).await;
    let connected_at = Instant::now();
    // The handshake's future (HTTP/2's and the health client's) is boxed, so that the futures
    // that hold it stay small: every poll frame above a large future copies it, and a one-shot
    // process faults in each page of stack those frames reach, a few microseconds each in a VM.
    let result = match connected {
        Ok(stream) => {
            let end = on_end.clone();
            let pid = target.pid;
            let attested = paths.and_then(|paths| trusted_attestation(paths, pid, settings));
            let shaken = handshake(stream, pid, attested.as_ref(), dir, settings, on_end);
            within(deadline, Box::pin(shaken))
                .await
                .map(|shaken| DaemonConnection {
                    target,
                    client: shaken.client,
                    version: shaken.version,
                    proof: shaken.proof,
                    task: shaken.task,
                    end,
                })
        }
        Err(reason) => Err(reason),
    };
    tracing::debug!(
        dir = %dir.display(),
        outcome = ?result.as_ref().map(|c| (c.target.pid, &c.version, c.proof)),
        connect_us = (connected_at - start).as_micros() as u64,
        handshake_us = connected_at.elapsed().as_micros() as u64,
        "local daemon connection checks"
    );
    result
}

/// `future`, failing with [`FallbackReason::DeadlineExceeded`] at `deadline` (none: never).
pub(crate) async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    future: impl Future<Output = Result<T, FallbackReason>>,
) -> Result<T, FallbackReason> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future)
            .await
            .unwrap_or(Err(FallbackReason::DeadlineExceeded)),
        None => future.await,
    }
}

/// The attestation of the daemon `pid` among `paths`, unless `settings` require
/// `Health/Check`: the one rule for the layer and `diagnose`.
pub(crate) fn trusted_attestation(
    paths: &DaemonPaths,
    pid: u32,
    settings: &Settings,
) -> Option<Attested> {
    match settings.require_health_check {
        true => None,
        false => Attested::read(paths, pid),
    }
}

/// What a handshake leaves: the route's client, the daemon's version, the connection's task.
#[derive(Debug)]
pub(crate) struct Shaken {
    pub(crate) client: DaemonClient,
    pub(crate) version: Option<String>,
    pub(crate) proof: Proof,
    pub(crate) task: ConnectionTask,
}

/// The handshake over a checked connection to the daemon `pid`. With its attestation: the
/// daemon's SETTINGS frame, then the attestation's checks, unless the daemon withdrew it
/// meanwhile (it is stopping). Otherwise: HTTP/2, then `Health/Check`. The connection's task is
/// spawned on the current runtime; a failed handshake aborts it.
pub(crate) async fn handshake(
    stream: UnixStream,
    pid: u32,
    attested: Option<&Attested>,
    dir: &Path,
    settings: &Settings,
    on_end: ConnectionEnd,
) -> Result<Shaken, FallbackReason> {
    let keepalive = (settings.keepalive_interval, settings.keepalive_timeout);
    let handshake_failed = |e: h2::Error| FallbackReason::HandshakeFailed {
        message: what_broke(&e, false),
    };
    if attested.is_some() {
        settings_frame_arrived(&stream).await?;
    }
    // A daemon that began to stop after the attestation was read is asked, and says so.
    if let Some(attested) = attested.filter(|a| !a.withdrawn()) {
        let version = check_attestation(&attested.attestation, dir, settings)?;
        // The call joins HTTP/2's preface: the daemon wakes once for both.
        let (client, task) = open(stream, keepalive, on_end, true)
            .await
            .map_err(handshake_failed)?;
        let proof = Proof::Attestation;
        return Ok(Shaken {
            client,
            version,
            proof,
            task,
        });
    }
    let (client, task) = open(stream, keepalive, on_end, false)
        .await
        .map_err(handshake_failed)?;
    match check_health(client.clone(), pid, dir, settings).await {
        Ok(version) => Ok(Shaken {
            client,
            version,
            proof: Proof::HealthCheck,
            task,
        }),
        Err(reason) => {
            task.abort();
            Err(reason)
        }
    }
}

/// Waits for the daemon's first bytes on the connection, and checks that they begin an HTTP/2
/// SETTINGS frame (type 4, not an ACK, on stream 0), without reading them: h2 reads them next.
/// A server sends its SETTINGS as soon as it accepts, so their arrival proves the daemon's
/// accept loop runs; a paused or wedged daemon sends none, and the caller's deadline ends the
/// wait before any call was written.
async fn settings_frame_arrived(stream: &UnixStream) -> Result<(), FallbackReason> {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    const FRAME_HEADER: usize = 9;
    const SETTINGS: u8 = 0x4;
    let failed = |message: String| FallbackReason::HandshakeFailed { message };
    let broken = |e: std::io::Error| failed(format!("the connection failed ({e})"));
    let mut header = [0u8; FRAME_HEADER];
    loop {
        let ready = stream.ready(Interest::READABLE).await.map_err(broken)?;
        let peeked = stream.try_io(Interest::READABLE, || {
            let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
            recv(stream.as_raw_fd(), &mut header, flags).map_err(std::io::Error::from)
        });
        match peeked {
            Ok(0) => {
                return Err(failed(
                    "the daemon closed the connection before its HTTP/2 SETTINGS".to_owned(),
                ));
            }
            Ok(n) if n < FRAME_HEADER => {
                if ready.is_read_closed() {
                    return Err(failed(
                        "the daemon closed the connection within its first frame".to_owned(),
                    ));
                }
                // Part of a frame: wait for more bytes, not for the ones already seen.
                let _ = stream.try_io(Interest::READABLE, || {
                    Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                });
            }
            Ok(_) => {
                let (kind, flags, stream_id) = (header[3], header[4], &header[5..]);
                return match kind == SETTINGS && flags & 0x1 == 0 && stream_id == [0; 4] {
                    true => Ok(()),
                    false => Err(failed(
                        "the daemon's first bytes are not an HTTP/2 SETTINGS frame".to_owned(),
                    )),
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(broken(e)),
        }
    }
}

/// The checks `Health/Check`'s answer gets, of what `attestation` says instead, in the same
/// order with the same reasons: every required service hosted (the whole server, `""`, is the
/// attestation itself), the version, the directory. Returns the daemon's version.
fn check_attestation(
    attestation: &Attestation,
    dir: &Path,
    settings: &Settings,
) -> Result<Option<String>, FallbackReason> {
    let missing = settings
        .required_services
        .iter()
        .find(|s| !s.is_empty() && !attestation.services.contains(s));
    if let Some(service) = missing {
        return Err(FallbackReason::ServiceNotHosted {
            service: service.clone(),
        });
    }
    let served = attestation.directory.to_string();
    check_answer(
        attestation.version.clone(),
        Some(&served),
        attestation.pid,
        dir,
        settings,
    )
}

/// Asks `Health/Check` for every required service (the whole server when none is named) over
/// `transport`; checks the directory the daemon (`pid`) reports; returns the daemon's version.
pub(crate) async fn check_health<T>(
    transport: T,
    pid: u32,
    dir: &Path,
    settings: &Settings,
) -> Result<Option<String>, FallbackReason>
where
    T: tonic::client::GrpcService<Body>,
    T::Error: Into<BoxError>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    let mut client = HealthClient::new(transport);
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
                        message: health_failure(&status),
                    });
                }
            },
        }
    }
    check_answer(version, served.as_deref(), pid, dir, settings)
}

/// The daemon `pid`'s answer, however it came: its version must be the required one, and the
/// directory it serves (`served`) must be `dir`. Returns the version.
fn check_answer(
    version: Option<String>,
    served: Option<&str>,
    pid: u32,
    dir: &Path,
    settings: &Settings,
) -> Result<Option<String>, FallbackReason> {
    if let Some(expected) = &settings.required_version
        && version.as_ref() != Some(expected)
    {
        return Err(FallbackReason::VersionMismatch {
            expected: expected.clone(),
            actual: version,
        });
    }
    check_directory(served, pid, dir, settings.accept_unverified_directory)?;
    Ok(version)
}

/// Why `Health/Check` got no answer, in a check's words: what broke on the connection (a check
/// is not a call, so never "the call may have run"), else the status the daemon answered.
fn health_failure(status: &tonic::Status) -> String {
    // The daemon's own answer has no source; a failure on the way has one.
    match (broken_connection(status), std::error::Error::source(status)) {
        (Some(broke), _) => broke,
        (None, Some(_)) => format!("the connection failed ({})", status.message()),
        (None, None) => format!(
            "Health/Check answered {:?}: {}",
            status.code(),
            status.message()
        ),
    }
}

/// What broke on the connection, when `error` (or one of its sources) says: the daemon route's
/// own [`ConnectionBroke`], or an h2 error of tonic's `Channel`, told without h2's internal
/// names.
pub(crate) fn broken_connection(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(broke) = e.downcast_ref::<ConnectionBroke>() {
            return Some(broke.to_string());
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return Some(what_broke(h2, false));
        }
        next = e.source();
    }
    None
}

/// The daemon must serve `dir`: the identity it reports is the one `dir` has now. A renamed
/// directory keeps its inode, so a rename is no mismatch; a shared, linked or moved sockets
/// directory is.
fn check_directory(
    served: Option<&str>,
    pid: u32,
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
            pid,
            expected: match expected {
                Ok(id) => id.to_string(),
                Err(e) => format!("unreadable: {e}"),
            },
            served: served.to_owned(),
        }),
    }
}
