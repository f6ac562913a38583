//! [`ResponseFuture`] and [`Route`]: the future of a call on either route, which marks the
//! route on the response when asked to.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use pin_project_lite::pin_project;
use tonic::Status;
use tonic::body::Body;
use tower::util::Oneshot;
use tower::{BoxError, Service};

use crate::http2::{DaemonFuture, Unsent};
use crate::reason::FallbackReason;

/// Which route served a response: found in the response's extensions when the layer was
/// built with [`mark_route`](crate::LocalDaemonLayer::mark_route).
///
/// ```
/// use tower_local_daemon::Route;
///
/// # let response = tonic::Response::new(());
/// match response.extensions().get::<Route>() {
///     Some(Route::Daemon { pid }) => println!("served by daemon {pid}"),
///     Some(Route::InProcess) => println!("served in-process"),
///     Some(route) => println!("served by {route:?}"),
///     None => println!("not marked"),
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Route {
    /// The daemon with this pid served the call.
    Daemon {
        /// The daemon's pid.
        pid: u32,
    },
    /// The in-process service served the call.
    InProcess,
}

type Request = http::Request<Body>;

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
    /// | the connection ended or broke mid-call (EOF, reset, the daemon killed) | `UNAVAILABLE`: the call may have run on the daemon |
    /// | the connection closed before the request was handed to it | the call runs in-process (in mode `require`: `UNAVAILABLE`, "it did not run") |
    ///
    /// A call whose request body is still streaming when its response (or the response's body)
    /// is dropped is over: its stream is reset with `CANCEL`, and the rest of the body is not
    /// sent.
    pub struct ResponseFuture<S: Service<Request>> {
        #[pin]
        kind: Kind<S>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S: Service<Request>> {
        Daemon {
            #[pin]
            future: DaemonFuture,
            pid: u32,
            mark: bool,
        },
        // Unmarked, the common case, with no field beside the future: the future then keeps
        // the size of the one it wraps (its niche holds the tag), and moving it costs no more.
        InProcess { #[pin] future: S::Future },
        // Marked (`mark_route`, a diagnostic): boxed, so that the mark costs an allocation
        // rather than every unmarked call a larger future.
        InProcessMarked { future: Pin<Box<S::Future>> },
        // Rare, and large (a whole request): boxed, so that the common routes stay small.
        Rerouted { oneshot: Pin<Box<Oneshot<S, Request>>>, mark: bool },
        Failed { status: Option<Box<Status>> },
    }
}

impl<S: Service<Request>> ResponseFuture<S> {
    pub(crate) fn daemon(future: DaemonFuture, pid: u32, mark: bool) -> Self {
        Self {
            kind: Kind::Daemon { future, pid, mark },
        }
    }

    pub(crate) fn in_process(future: S::Future) -> Self {
        Self {
            kind: Kind::InProcess { future },
        }
    }

    pub(crate) fn in_process_marked(future: S::Future) -> Self {
        Self {
            kind: Kind::InProcessMarked {
                future: Box::pin(future),
            },
        }
    }

    pub(crate) fn rerouted(service: S, request: Request, mark: bool) -> Self {
        Self {
            kind: Kind::Rerouted {
                oneshot: Box::pin(Oneshot::new(service, request)),
                mark,
            },
        }
    }

    /// A call that did not run (its connection did not take it), where mode `require`
    /// forbids the in-process route.
    pub(crate) fn unsent(unsent: &Unsent) -> Self {
        Self::failed(unsent.status())
    }

    pub(crate) fn unavailable(reason: &FallbackReason) -> Self {
        Self::failed(Status::unavailable(format!(
            "local daemon required (mode require) but not usable: {reason}; {}",
            reason.remedy()
        )))
    }

    fn failed(status: Status) -> Self {
        Self {
            kind: Kind::Failed {
                status: Some(Box::new(status)),
            },
        }
    }
}

impl<S: Service<Request>> fmt::Debug for ResponseFuture<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = match &self.kind {
            Kind::Daemon { .. } => "daemon",
            Kind::InProcess { .. } | Kind::InProcessMarked { .. } | Kind::Rerouted { .. } => {
                "in-process"
            }
            Kind::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("route", &route)
            .finish()
    }
}

/// Polls an in-process future. Such futures may finish without ever yielding: each poll spends
/// tokio's cooperative budget, so that a tight loop of them lets the runtime's other tasks (a
/// re-probe, timers) run.
fn poll_in_process<F, B, E>(
    future: Pin<&mut F>,
    cx: &mut Context<'_>,
    mark: bool,
) -> Poll<Result<http::Response<Body>, BoxError>>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
    let result = std::task::ready!(future.poll(cx));
    coop.made_progress();
    Poll::Ready(
        result
            .map(|response| in_process(response, mark))
            .map_err(Into::into),
    )
}

/// The in-process response, with the tonic body and, when asked, the route's mark.
fn in_process<B>(response: http::Response<B>, mark: bool) -> http::Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut response = response.map(into_body);
    if mark {
        response.extensions_mut().insert(Route::InProcess);
    }
    response
}

/// The body as tonic's [`Body`]: as it is when it already is one (a generated server's), without
/// the checks [`Body::new`] makes first; the type test is resolved at compile time.
fn into_body<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut slot = Some(body);
    if let Some(body) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Body>>() {
        return body.take().unwrap_or_default();
    }
    slot.map(Body::new).unwrap_or_default()
}

impl<S, B> Future for ResponseFuture<S>
where
    S: Service<Request, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::InProcess { future } => poll_in_process(future, cx, false),
            KindProj::Daemon { future, pid, mark } => {
                let result = std::task::ready!(future.poll(cx));
                Poll::Ready(match result {
                    Ok(mut response) => {
                        if *mark {
                            response
                                .extensions_mut()
                                .insert(Route::Daemon { pid: *pid });
                        }
                        Ok(response)
                    }
                    Err(e) => Err(e.into_status().into()),
                })
            }
            KindProj::InProcessMarked { future } => poll_in_process(future.as_mut(), cx, true),
            KindProj::Rerouted { oneshot, mark } => poll_in_process(oneshot.as_mut(), cx, *mark),
            KindProj::Failed { status } => {
                let status = status
                    .take()
                    .expect("ResponseFuture polled after completion");
                Poll::Ready(Err(status))
            }
        }
    }
}
