//! [`ResponseFuture`] and [`Route`]: the future of a call on either route, which marks the
//! route on the response when asked to.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use pin_project_lite::pin_project;
use tonic::Status;
use tonic::body::Body;
use tower::util::Oneshot;
use tower::{BoxError, Service};

use super::route::Shared;
use crate::config::Mode;
use crate::http2::{
    DaemonFuture, Fate, KeptRequest, NotSent, SendError, Unsent, grpc_timeout, timeout_status,
};
use crate::reason::FallbackReason;
use crate::registry::{DaemonRoute, Decision, HANDOFF_TICK};

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
    /// The connection to the daemon with this pid broke before the daemon answered, and the
    /// call, whose method is [idempotent](crate::LocalDaemonLayer::idempotent), ran again
    /// in-process. It may also have run on the daemon.
    Rerun {
        /// The daemon's pid.
        pid: u32,
    },
}

impl std::fmt::Display for Route {
    /// The route for a person: `daemon (pid 7)`, `in-process`, or `in-process again, after the
    /// connection to the daemon (pid 7) broke`.
    ///
    /// ```
    /// use tower_local_daemon::Route;
    ///
    /// assert_eq!(Route::Daemon { pid: 7 }.to_string(), "daemon (pid 7)");
    /// assert_eq!(Route::InProcess.to_string(), "in-process");
    /// ```
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Daemon { pid } => write!(f, "daemon (pid {pid})"),
            Self::InProcess => f.write_str("in-process"),
            Self::Rerun { pid } => write!(
                f,
                "in-process again, after the connection to the daemon (pid {pid}) broke"
            ),
        }
    }
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
    /// | the connection ended or broke mid-call (EOF, reset, the daemon killed, keepalive given up) | `UNAVAILABLE`: the call may have run on the daemon; a call of an [idempotent](crate::LocalDaemonLayer::idempotent) method whose request body was whole runs again in-process, if the break came before the response head |
    /// | the daemon never processed the call: the connection closed before the request was handed to it, the stream was above the last stream id of the daemon's GOAWAY, or reset with `REFUSED_STREAM` | the call runs in-process, whatever its method (in mode `require`, or with a request body still streaming when sent: `UNAVAILABLE`, "it did not run") |
    ///
    /// A call that runs again in-process after it was sent is bounded by what remains of its
    /// own deadline (`grpc-timeout`): past it, it fails with `CANCELLED` "Timeout expired".
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
            // With a kept request: what runs it in-process should the daemon not answer it.
            again: Option<Box<Again<S>>>,
        },
        // Unmarked, the common case, with no field beside the future: the future then keeps
        // the size of the one it wraps (its niche holds the tag), and moving it costs no more.
        InProcess { #[pin] future: S::Future },
        // Marked (`mark_route`, a diagnostic): boxed, so that the mark costs an allocation
        // rather than every unmarked call a larger future.
        InProcessMarked { future: Pin<Box<S::Future>> },
        // Rare, and large (a whole request): boxed, so that the common routes stay small. The
        // mark is the route to note, if any; a request that was sent keeps its deadline.
        Rerouted {
            oneshot: Pin<Box<Oneshot<S, Request>>>,
            mark: Option<Route>,
            deadline: Option<Pin<Box<tokio::time::Sleep>>>,
        },
        Failed { status: Option<Box<Status>> },
        // Waiting for a daemon being started; boxed, as it holds the whole request.
        AwaitingDaemon { wait: Box<AwaitDaemon<S>> },
    }
}

/// What runs a kept request in-process: a clone of the in-process service, and the options
/// that say when (the mode, the idempotent methods) and where to count it.
pub(crate) struct Again<S> {
    pub(crate) service: S,
    pub(crate) shared: Arc<Shared>,
}

/// A call waiting for a daemon being started: it asks its registry entry for the route every
/// few milliseconds (a re-probe each time it is due) until the daemon's connection is there,
/// the entry gives up the wait, or the call's own deadline passes.
pub(crate) struct AwaitDaemon<S> {
    request: Option<Request>,
    service: Option<S>,
    shared: Arc<Shared>,
    /// The call's own deadline (`grpc-timeout`), if it has one.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    tick: Pin<Box<tokio::time::Sleep>>,
}

impl<S: Service<Request>> ResponseFuture<S> {
    /// A call that waits for a daemon being started, then goes to it (or in-process).
    pub(crate) fn awaiting(service: S, request: Request, shared: Arc<Shared>) -> Self {
        let deadline = grpc_timeout(request.headers()).map(|d| Box::pin(tokio::time::sleep(d)));
        shared.count_start_wait();
        Self {
            kind: Kind::AwaitingDaemon {
                wait: Box::new(AwaitDaemon {
                    request: Some(request),
                    service: Some(service),
                    shared,
                    deadline,
                    tick: Box::pin(tokio::time::sleep(HANDOFF_TICK)),
                }),
            },
        }
    }

    /// A call sent to the daemon over `route`, kept (but in mode `require`) to run in-process
    /// on `service()` (called at most once) should the daemon not answer it. A request the connection does
    /// not take runs in-process at once (in mode `require`: fails, "it did not run"), within
    /// `deadline` when it has one left.
    pub(crate) fn to_daemon(
        route: &mut DaemonRoute,
        request: Request,
        service: impl FnOnce() -> S,
        shared: &Arc<Shared>,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    ) -> Self {
        // Mode `require` has no in-process route: nothing to keep a request for.
        let keep = shared.mode() != Mode::Require;
        let unsent = match route.client.send(request, keep) {
            Ok(future) => {
                shared.count_daemon_call();
                let again = future.keeps_request().then(|| {
                    Box::new(Again {
                        service: service(),
                        shared: shared.clone(),
                    })
                });
                let (pid, mark) = (route.pid, shared.mark_route);
                return Self {
                    kind: Kind::Daemon {
                        future,
                        pid,
                        mark,
                        again,
                    },
                };
            }
            Err(unsent) => unsent,
        };
        // It did not leave. A connection that took no request closed, or the daemon is going
        // away; a request refused for its own shape says nothing of the connection.
        if matches!(unsent.why, NotSent::Closed) {
            shared.connection_ended(route);
        }
        if shared.mode() == Mode::Require {
            return Self::unsent(&unsent);
        }
        shared.count_reroute();
        Self {
            kind: Kind::Rerouted {
                oneshot: Box::pin(Oneshot::new(service(), *unsent.request)),
                mark: shared.mark_route.then_some(Route::InProcess),
                deadline,
            },
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
            Kind::AwaitingDaemon { .. } => "awaiting the daemon",
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
    mark: Option<Route>,
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
fn in_process<B>(response: http::Response<B>, mark: Option<Route>) -> http::Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut response = response.map(Body::new);
    if let Some(route) = mark {
        response.extensions_mut().insert(route);
    }
    response
}

impl<S, B> Future for ResponseFuture<S>
where
    S: Service<Request, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.as_mut().project().kind;
        let rerun = match kind.as_mut().project() {
            KindProj::InProcess { future } => return poll_in_process(future, cx, None),
            KindProj::Daemon {
                future,
                pid,
                mark,
                again,
            } => match std::task::ready!(future.poll(cx)) {
                Ok(mut response) => {
                    if *mark {
                        response
                            .extensions_mut()
                            .insert(Route::Daemon { pid: *pid });
                    }
                    return Poll::Ready(Ok(response));
                }
                Err(error) => match run_again(error, *pid, *mark, again.take()) {
                    Ok(rerun) => rerun,
                    Err(status) => return Poll::Ready(Err(status.into())),
                },
            },
            KindProj::InProcessMarked { future } => {
                return poll_in_process(future.as_mut(), cx, Some(Route::InProcess));
            }
            KindProj::Rerouted {
                oneshot,
                mark,
                deadline,
            } => {
                if let Some(deadline) = deadline
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(timeout_status().into()));
                }
                return poll_in_process(oneshot.as_mut(), cx, *mark);
            }
            KindProj::Failed { status } => {
                let status = status
                    .take()
                    .expect("ResponseFuture polled after completion");
                return Poll::Ready(Err(status));
            }
            KindProj::AwaitingDaemon { wait } => match std::task::ready!(wait.poll_route(cx)) {
                Ok(next) => next,
                Err(status) => return Poll::Ready(Err(status.into())),
            },
        };
        kind.set(rerun);
        self.poll(cx)
    }
}

/// The route of a request the daemon did not answer: in-process again when it was kept and
/// either the daemon provably never processed it (any method), or the connection broke
/// before the answer and its method is idempotent; otherwise the status of what happened.
fn run_again<S: Service<Request>>(
    error: SendError,
    pid: u32,
    mark: bool,
    again: Option<Box<Again<S>>>,
) -> Result<Kind<S>, Status> {
    let (fate, request, again) = match (error, again) {
        (
            SendError::Failed {
                fate,
                request: Some(request),
                ..
            },
            Some(again),
        ) if again_allowed(fate, &request, &again.shared) => (fate, request, again),
        (error, _) => return Err(error.into_status()),
    };
    let Again { service, shared } = *again;
    let mark = match fate {
        Fate::NotProcessed => {
            shared.count_reroute();
            mark.then_some(Route::InProcess)
        }
        _ => {
            shared.count_rerun(request.path());
            mark.then_some(Route::Rerun { pid })
        }
    };
    let deadline = request
        .deadline
        .map(|at| Box::pin(tokio::time::sleep_until(at)));
    Ok(Kind::Rerouted {
        oneshot: Box::pin(Oneshot::new(service, (*request).into_request())),
        mark,
        deadline,
    })
}

impl<S: Service<Request>> AwaitDaemon<S> {
    /// The route once the wait is over: the daemon's, or in-process; or the call's own
    /// deadline's status.
    fn poll_route(&mut self, cx: &mut Context<'_>) -> Poll<Result<Kind<S>, Status>> {
        if let Some(deadline) = &mut self.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.shared.count_start_wait_gave_up();
            return Poll::Ready(Err(timeout_status()));
        }
        let mark = self.shared.mark_route;
        loop {
            let decision = match self.shared.entry() {
                Some(entry) => std::task::ready!(entry.poll_decision(cx)).1,
                None => Decision::InProcess,
            };
            match decision {
                Decision::Daemon(mut route) => {
                    let request = self.request.take().expect("polled after completion");
                    let service = self.service.take().expect("polled after completion");
                    let future = ResponseFuture::to_daemon(
                        &mut route,
                        request,
                        || service,
                        &self.shared,
                        self.deadline.take(),
                    );
                    return Poll::Ready(Ok(future.kind));
                }
                Decision::AwaitStart => {
                    let next = tokio::time::Instant::now() + HANDOFF_TICK;
                    self.tick.as_mut().reset(next);
                    if self.tick.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                Decision::InProcess | Decision::Unavailable(_) => {
                    // The start failed, or the hand-off bound passed: in-process after all.
                    self.shared.count_start_wait_gave_up();
                    let request = self.request.take().expect("polled after completion");
                    let service = self.service.take().expect("polled after completion");
                    self.shared.count_in_process_call();
                    return Poll::Ready(Ok(Kind::Rerouted {
                        oneshot: Box::pin(Oneshot::new(service, request)),
                        mark: mark.then_some(Route::InProcess),
                        deadline: self.deadline.take(),
                    }));
                }
            }
        }
    }
}

/// Whether a kept request may run in-process after what happened to it on the daemon.
fn again_allowed(fate: Fate, request: &KeptRequest, shared: &Shared) -> bool {
    match fate {
        Fate::NotProcessed => true,
        Fate::Broken => shared.idempotent(request.path()),
        Fate::Answered | Fate::Unknown => false,
    }
}
