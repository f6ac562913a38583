//! [`ResponseFuture`] and [`Route`]: marks the route on each response, and gives the daemon
//! route's errors, in the head or mid-body, the status code that says what happened.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Frame;
use pin_project_lite::pin_project;
use tonic::body::Body;
use tonic::transport::channel::ResponseFuture as ChannelFuture;
use tonic::{Code, Status, TimeoutExpired};
use tower::BoxError;

use crate::reason::{FallbackReason, error_chain};

/// Which route served a response: found in the response's extensions.
///
/// ```
/// use tower_local_daemon::Route;
///
/// # let response = tonic::Response::new(());
/// match response.extensions().get::<Route>() {
///     Some(Route::Daemon { pid }) => println!("served by daemon {pid}"),
///     Some(Route::InProcess) => println!("served in-process"),
///     None => println!("not routed by a LocalDaemon"),
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// The daemon with this pid served the call.
    Daemon {
        /// The daemon's pid.
        pid: u32,
    },
    /// The in-process service served the call.
    InProcess,
}

pin_project! {
    /// The response future of [`LocalDaemon`](crate::LocalDaemon).
    ///
    /// # Status codes on the daemon route
    ///
    /// | what happened | code |
    /// |---|---|
    /// | the daemon answered with a status | that status, unchanged |
    /// | the caller's own deadline (`grpc-timeout`) expired | `CANCELLED` "Timeout expired", as over a bare `Channel` |
    /// | the daemon reset the stream (HTTP/2 `RST_STREAM`) | the code gRPC maps its reason to: `REFUSED_STREAM` is `UNAVAILABLE`, `CANCEL` is `CANCELLED`, `ENHANCE_YOUR_CALM` is `RESOURCE_EXHAUSTED`, `INADEQUATE_SECURITY` is `PERMISSION_DENIED`, the others `INTERNAL` |
    /// | the connection ended or broke mid-call (EOF, reset, GOAWAY, the daemon killed) | `UNAVAILABLE`: the call may have run on the daemon |
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Daemon { #[pin] future: ChannelFuture, pid: u32 },
        InProcess { #[pin] future: F },
        Refused { reason: Option<FallbackReason> },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn daemon(future: ChannelFuture, pid: u32) -> Self {
        Self {
            kind: Kind::Daemon { future, pid },
        }
    }

    pub(crate) fn in_process(future: F) -> Self {
        Self {
            kind: Kind::InProcess { future },
        }
    }

    pub(crate) fn refused(reason: FallbackReason) -> Self {
        Self {
            kind: Kind::Refused {
                reason: Some(reason),
            },
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = match &self.kind {
            Kind::Daemon { .. } => "daemon",
            Kind::InProcess { .. } => "in-process",
            Kind::Refused { .. } => "refused",
        };
        f.debug_struct("ResponseFuture")
            .field("route", &route)
            .finish()
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Daemon { future, pid } => {
                let result = std::task::ready!(future.poll(cx));
                Poll::Ready(match result {
                    Ok(response) => {
                        let mut response =
                            response.map(|body| Body::new(DaemonBody { inner: body }));
                        response
                            .extensions_mut()
                            .insert(Route::Daemon { pid: *pid });
                        Ok(response)
                    }
                    Err(e) => Err(daemon_status(&*BoxError::from(e)).into()),
                })
            }
            KindProj::InProcess { future } => {
                let result = std::task::ready!(future.poll(cx));
                Poll::Ready(result.map_err(Into::into).map(|mut response| {
                    response.extensions_mut().insert(Route::InProcess);
                    response
                }))
            }
            KindProj::Refused { reason } => {
                let reason = reason
                    .take()
                    .expect("ResponseFuture polled after completion");
                Poll::Ready(Err(Status::unavailable(format!(
                    "local daemon required (mode require) but not usable: {reason}; {}",
                    reason.remedy()
                ))
                .into()))
            }
        }
    }
}

/// An error on the daemon route, as the caller sees it.
fn daemon_status(error: &(dyn Error + 'static)) -> Status {
    let mut link = Some(error);
    while let Some(error) = link {
        if error.is::<TimeoutExpired>() {
            return Status::cancelled(error.to_string());
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>()
            && h2.is_reset()
            && h2.is_remote()
            && let Some(reason) = h2.reason()
        {
            return Status::new(
                code_of_reset(reason),
                format!("the local daemon reset the stream: {reason}"),
            );
        }
        link = error.source();
    }
    Status::unavailable(format!(
        "local daemon connection failed; the call may have run on the daemon: {}",
        error_chain(error)
    ))
}

/// The code the gRPC spec gives a stream reset by the server (PROTOCOL-HTTP2.md, "Errors").
/// tonic maps these only under its `server` feature, which a client need not build.
fn code_of_reset(reason: h2::Reason) -> Code {
    match reason {
        h2::Reason::REFUSED_STREAM => Code::Unavailable,
        h2::Reason::CANCEL => Code::Cancelled,
        h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

pin_project! {
    /// The daemon's response body, whose errors get their codes as the head's do.
    struct DaemonBody {
        #[pin]
        inner: Body,
    }
}

impl http_body::Body for DaemonBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project()
            .inner
            .poll_frame(cx)
            .map_err(|status| daemon_status(&status))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
