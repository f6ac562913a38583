//! [`LocalDaemon`]: the service that picks the route for each call.

mod future;
mod route;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::body::Body;
use tower::{BoxError, Service};

pub use self::future::{ResponseFuture, Route};
pub(crate) use self::route::Shared;
use self::route::{Cached, poll_route};
use crate::config::Mode;
use crate::registry::{DaemonRoute, Decision, RouteStats};

/// Routes each call to the local daemon or to the in-process service `S`.
///
/// Built by [`LocalDaemonLayer`](crate::LocalDaemonLayer). `S` is any service of tonic's
/// shape whose response body is an [`http_body::Body`] of [`Bytes`]: a generated
/// `FooServer<T>`, [`tonic::service::Routes`], a remote `Channel`, or any of them under
/// tower-http layers that change the body.
///
/// # Routing
///
/// `poll_ready` decides the route: on the first call it runs the checks (shared with every
/// concurrent first call of every clone on the same runtime); later it reads one atomic
/// generation, and on the daemon route checks that the call comes from the runtime whose
/// connection it would use. It then drives the readiness of the chosen route only, and `call`
/// sends the request there. A routing outcome is never a `poll_ready` error: in
/// [`Mode::Require`] a refused call fails in its future with `UNAVAILABLE` naming the reason.
///
/// # Runtimes
///
/// Any tokio runtime can call, and several at once: each runtime that calls gets its own
/// connection to the daemon, checked once for all its concurrent calls, because a connection
/// and its keepalive timers belong to the drivers of the runtime that made it. A runtime that
/// ends takes only its own connection with it; the next runtime connects again.
///
/// # Errors
///
/// On the daemon route the codes tell what happened, as [`ResponseFuture`] documents: the
/// daemon's own status unchanged, the caller's deadline as a bare `Channel` reports it, a stream
/// reset by the code its HTTP/2 reason maps to, and a connection that ends mid-call as
/// `UNAVAILABLE`. A request the daemon provably never processed (its connection closed before
/// the request was handed to it, its stream was above the daemon's GOAWAY, or refused) runs
/// in-process instead, on a clone of `S`, except in [`Mode::Require`]; so does a call of an
/// [idempotent](crate::LocalDaemonLayer::idempotent) method whose connection broke before the
/// answer. Any other request that may have run on the daemon is never sent again.
///
/// # Panics
///
/// `call` panics unless the last `poll_ready` returned `Ready(Ok(()))`, as tower's services do.
pub struct LocalDaemon<S> {
    inner: S,
    shared: Arc<Shared>,
    route: Option<Cached>,
}

impl<S: Clone> Clone for LocalDaemon<S> {
    fn clone(&self) -> Self {
        let route = self.route.clone().map(|cached| Cached {
            // A clone was never made ready.
            ready: false,
            ..cached
        });
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            route,
        }
    }
}

impl<S> fmt::Debug for LocalDaemon<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalDaemon")
            .field("dir", &self.shared.dir)
            .field("settings", &self.shared.settings)
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

/// A [`LocalDaemon`] [boxed](LocalDaemon::boxed): the same type whatever the in-process service
/// is.
pub type BoxLocalDaemon =
    tower::util::BoxCloneSyncService<http::Request<Body>, http::Response<Body>, BoxError>;

impl<S> LocalDaemon<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            shared,
            route: None,
        }
    }

    /// The in-process service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The in-process service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The in-process service, without the layer.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// This service boxed, as a type a struct can name: a [`LazyFallback`](crate::LazyFallback)
    /// over a closure has a type nobody can write, so a client kept in a struct holds a
    /// `FooClient<BoxLocalDaemon>`. The box costs an allocation per call.
    ///
    /// ```
    /// use tonic_health::pb::health_client::HealthClient;
    /// use tonic_health::pb::health_server::HealthServer;
    /// use tower::Layer;
    /// use tower_local_daemon::{BoxLocalDaemon, LazyFallback, LocalDaemonLayer};
    ///
    /// struct Cli {
    ///     health: HealthClient<BoxLocalDaemon>,
    /// }
    ///
    /// let fallback = LazyFallback::new(|| async {
    ///     let (_, health) = tonic_health::server::health_reporter();
    ///     Ok::<_, std::convert::Infallible>(health)
    /// });
    /// let svc = LocalDaemonLayer::new("/repo/.heddle").layer(fallback);
    /// let cli = Cli { health: HealthClient::new(svc.boxed()) };
    /// # let _ = cli.health;
    /// ```
    pub fn boxed(self) -> BoxLocalDaemon
    where
        Self: Service<
                http::Request<Body>,
                Response = http::Response<Body>,
                Error = BoxError,
                Future: Send + 'static,
            > + Clone
            + Send
            + Sync
            + 'static,
    {
        BoxLocalDaemon::new(self)
    }

    /// The mode in force, after the environment override.
    pub fn mode(&self) -> Mode {
        self.shared.settings.mode
    }

    /// The counters and current decision of this service's registry entry, shared by every
    /// service with the same directory and options. `None` in [`Mode::Off`].
    ///
    /// ```
    /// use tower_local_daemon::LocalDaemonLayer;
    /// use tower::Layer;
    ///
    /// let svc = LocalDaemonLayer::new("/no/such/repo/.heddle").layer(());
    /// let stats = svc.stats().unwrap();
    /// assert_eq!(stats.probes, 0);
    /// assert_eq!(stats.route, None);
    /// ```
    pub fn stats(&self) -> Option<RouteStats> {
        let mut stats = self.shared.entry()?.stats();
        let misconfigured = self.shared.misconfigured.iter().cloned();
        stats.misconfigured.splice(0..0, misconfigured);
        Some(stats)
    }

    /// Forgets this service's registry entry's decision, connections and counters: the next
    /// call runs the checks again.
    pub fn reset(&self) {
        if let Some(entry) = self.shared.entry() {
            entry.reset();
        }
    }
}

impl<S, B> Service<http::Request<Body>> for LocalDaemon<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            let Poll::Ready(cached) = poll_route(&self.shared, &mut self.route, cx) else {
                if let Some(cached) = &mut self.route {
                    cached.ready = false;
                }
                return Poll::Pending;
            };
            let readiness = match &mut cached.decision {
                Decision::Daemon(daemon) => match daemon.client.poll_ready(cx) {
                    Poll::Ready(Err(e)) => {
                        // Nothing was sent: the call may still go in-process.
                        tracing::debug!(error = %e, "local daemon connection closed");
                        self.shared.connection_ended(daemon);
                        self.route = None;
                        continue;
                    }
                    poll => poll.map(|_| Ok(())),
                },
                Decision::InProcess => self.inner.poll_ready(cx).map_err(Into::into),
                // The wait and the route after it are the response future's.
                Decision::Unavailable(_) | Decision::AwaitStart => Poll::Ready(Ok(())),
            };
            cached.ready = matches!(readiness, Poll::Ready(Ok(())));
            return readiness;
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let Some(Cached {
            decision,
            ready: ready @ true,
            ..
        }) = &mut self.route
        else {
            panic!("LocalDaemon::call was called before poll_ready returned Ready(Ok)");
        };
        *ready = false;
        match decision {
            Decision::InProcess => {
                if let Some(entry) = self.shared.entry() {
                    entry.count_in_process_call();
                }
                // The mark decided before the inner call, so that its future is built where
                // the unmarked route returns it.
                match self.shared.mark_route {
                    false => ResponseFuture::in_process(self.inner.call(request)),
                    true => ResponseFuture::in_process_marked(self.inner.call(request)),
                }
            }
            Decision::Daemon(daemon) => call_daemon(daemon, &self.shared, &self.inner, request),
            Decision::Unavailable(reason) => ResponseFuture::unavailable(reason),
            Decision::AwaitStart => {
                ResponseFuture::awaiting(self.inner.clone(), request, self.shared.clone())
            }
        }
    }
}

/// A call on the daemon route; out of line, so that the in-process route's `call` stays small.
#[inline(never)]
fn call_daemon<S>(
    daemon: &mut DaemonRoute,
    shared: &Arc<Shared>,
    inner: &S,
    request: http::Request<Body>,
) -> ResponseFuture<S>
where
    S: Service<http::Request<Body>> + Clone,
{
    ResponseFuture::to_daemon(daemon, request, || inner.clone(), shared, None)
}
