//! [`ResponseFuture`]: marks the route on each response and maps the daemon route's transport
//! errors, in the head or mid-body, to `UNAVAILABLE`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Frame;
use pin_project_lite::pin_project;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::channel::ResponseFuture as ChannelFuture;
use tower::BoxError;

use crate::connect::error_chain;
use crate::{FallbackReason, Route};

pin_project! {
    /// The response future of [`LocalDaemon`](crate::LocalDaemon).
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
                    Err(e) => Err(unavailable(&*BoxError::from(e)).into()),
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

/// A transport error on the daemon route, as the caller sees it.
fn unavailable(error: &(dyn std::error::Error + 'static)) -> Status {
    Status::unavailable(format!(
        "local daemon connection failed: {}",
        error_chain(error)
    ))
}

pin_project! {
    /// The daemon's response body, whose transport errors become `UNAVAILABLE`.
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
            .map_err(|status| unavailable(&status))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
