//! [`LocalDaemon`]: the service that picks the route for each call.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tonic::body::Body;
use tower::{BoxError, Service};

use crate::config::{Mode, Settings};
use crate::connect::EndCause;
use crate::future::ResponseFuture;
use crate::reason::FallbackReason;
use crate::registry::{self, Decision, Entry, RouteStats};

/// What all clones of one layered service share.
#[derive(Debug)]
pub(crate) struct Shared {
    dir: PathBuf,
    settings: Settings,
    entry: OnceLock<Arc<Entry>>,
}

impl Shared {
    pub(crate) fn new(dir: PathBuf, settings: Settings) -> Self {
        Self {
            dir,
            settings,
            entry: OnceLock::new(),
        }
    }

    /// The registry entry, looked up once (one `stat` and a map lookup) for all clones.
    fn entry(&self) -> Option<&Arc<Entry>> {
        if self.settings.mode == Mode::Off {
            return None;
        }
        Some(
            self.entry
                .get_or_init(|| registry::entry_for(&self.dir, &self.settings)),
        )
    }
}

/// The decision this clone routes by, valid while the entry's generation is unchanged, and
/// whether `poll_ready` made its route ready for one `call`.
#[derive(Debug, Clone)]
struct Cached {
    generation: u64,
    decision: Decision,
    ready: bool,
}

/// Routes each call to the local daemon or to the in-process service `S`.
///
/// Built by [`LocalDaemonLayer`](crate::LocalDaemonLayer). `S` is any service of tonic's
/// shape: a generated `FooServer<T>`, [`tonic::service::Routes`], or a remote `Channel`.
///
/// # Routing
///
/// `poll_ready` decides the route: on the first call it runs the checks (shared with every
/// concurrent first call of every clone); later it reads one atomic generation. It then drives
/// the readiness of the chosen route only, and `call` sends the request there. A routing outcome
/// is never a `poll_ready` error: in [`Mode::Require`] a refused call fails in its future with
/// `UNAVAILABLE` naming the reason.
///
/// # Errors
///
/// On the daemon route the codes tell what happened, as [`ResponseFuture`] documents: the
/// daemon's own status unchanged, the caller's deadline as a bare `Channel` reports it, a stream
/// reset by the code its HTTP/2 reason maps to, and a connection that ends mid-call as
/// `UNAVAILABLE`. Such a request is never re-sent in-process: it may have run on the daemon. A
/// request is routed in-process instead only when the daemon channel fails its readiness,
/// before the request is handed to it. A request already handed to the channel when its
/// connection turns out to be closing fails with `UNAVAILABLE` (at most one per caller per
/// daemon death), and the route goes in-process at once.
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
            // A clone's channel handle was never made ready.
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
        self.shared.entry().map(|e| e.stats())
    }

    /// Forgets this service's registry entry's decision and counters: the next call runs the
    /// checks again.
    pub fn reset(&self) {
        if let Some(entry) = self.shared.entry() {
            entry.reset();
        }
    }
}

/// The route for the next call: the warm path is one atomic load and a comparison. A new
/// decision replaces the cached one, readiness included.
fn poll_route<'a>(
    shared: &Shared,
    route: &'a mut Option<Cached>,
    cx: &mut Context<'_>,
) -> Poll<&'a mut Cached> {
    let Some(entry) = shared.entry() else {
        // Mode off: in-process for good.
        return Poll::Ready(route.get_or_insert(Cached {
            generation: 0,
            decision: Decision::InProcess(FallbackReason::Disabled),
            ready: false,
        }));
    };
    let fresh = route.as_ref().is_some_and(|cached| {
        cached.generation == entry.generation()
            && !(matches!(
                cached.decision,
                Decision::InProcess(_) | Decision::Refused(_)
            ) && entry.reprobe_due())
    });
    if !fresh {
        let (generation, decision) = std::task::ready!(entry.poll_decision(cx));
        *route = Some(Cached {
            generation,
            decision,
            ready: false,
        });
    }
    match route {
        Some(cached) => Poll::Ready(cached),
        None => Poll::Pending,
    }
}

impl<S> Service<http::Request<Body>> for LocalDaemon<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            let Poll::Ready(cached) = poll_route(&self.shared, &mut self.route, cx) else {
                if let Some(cached) = &mut self.route {
                    cached.ready = false;
                }
                return Poll::Pending;
            };
            let readiness = match &mut cached.decision {
                Decision::Daemon(daemon) => match daemon.channel.channel.poll_ready(cx) {
                    Poll::Ready(Err(e)) => {
                        // Nothing was sent: the call may still go in-process.
                        tracing::debug!(error = %e, "local daemon channel failed its readiness");
                        let id = daemon.id;
                        self.route = None;
                        if let Some(entry) = self.shared.entry() {
                            entry.connection_lost(id, EndCause::Daemon);
                        }
                        continue;
                    }
                    poll => poll.map(|_| Ok(())),
                },
                Decision::InProcess(_) => self.inner.poll_ready(cx).map_err(Into::into),
                Decision::Refused(_) => Poll::Ready(Ok(())),
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
        let entry = self.shared.entry();
        match decision {
            Decision::Daemon(daemon) => {
                if let Some(entry) = entry {
                    entry.count_daemon_call();
                }
                let pid = daemon.channel.target.pid;
                ResponseFuture::daemon(daemon.channel.channel.call(request), pid)
            }
            Decision::InProcess(_) => {
                if let Some(entry) = entry {
                    entry.count_in_process_call();
                }
                ResponseFuture::in_process(self.inner.call(request))
            }
            Decision::Refused(reason) => ResponseFuture::refused(reason.clone()),
        }
    }
}
