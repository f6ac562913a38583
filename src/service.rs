//! [`LocalDaemon`]: the service that picks the route for each call.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::transport::Channel;
use tower::{BoxError, Service};

use crate::FallbackReason;
use crate::config::{Mode, Settings};
use crate::connect::EndCause;
use crate::future::ResponseFuture;
use crate::registry::{self, Decision, Entry, RouteStats};

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

/// A route this clone has cached, valid while the entry's generation is unchanged.
#[derive(Debug, Clone)]
struct CachedRoute {
    generation: u64,
    route: CachedKind,
}

#[derive(Debug, Clone)]
enum CachedKind {
    Daemon {
        channel: Channel,
        pid: u32,
        id: u64,
    },
    InProcess,
    /// Require mode without a usable daemon.
    Refused(FallbackReason),
}

/// What `poll_ready` made ready, for `call` to use.
#[derive(Debug)]
enum Readied {
    Daemon { pid: u32 },
    InProcess,
    Refused(FallbackReason),
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
/// On the daemon route every transport error, including a stream reset mid-body, reaches the
/// caller as `UNAVAILABLE`. Such a request is never re-sent in-process: it may have run on the
/// daemon. A request is routed in-process instead only when the daemon channel fails its
/// readiness, before the request is handed to it. A request already handed to the channel when
/// its connection turns out to be closing fails with `UNAVAILABLE` (at most one per caller per
/// daemon death), and the route goes in-process at once.
pub struct LocalDaemon<S> {
    inner: S,
    shared: Arc<Shared>,
    cached: Option<CachedRoute>,
    readied: Option<Readied>,
}

impl<S: Clone> Clone for LocalDaemon<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            cached: self.cached.clone(),
            // A clone's channel handle was never made ready.
            readied: None,
        }
    }
}

impl<S> fmt::Debug for LocalDaemon<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalDaemon")
            .field("dir", &self.shared.dir)
            .field("settings", &self.shared.settings)
            .field("cached", &self.cached)
            .finish_non_exhaustive()
    }
}

impl<S> LocalDaemon<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            shared,
            cached: None,
            readied: None,
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

    /// The route for the next call: the warm path is one atomic load and a comparison.
    fn poll_route(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(entry) = self.shared.entry() else {
            // Mode off: in-process for good.
            self.cached.get_or_insert(CachedRoute {
                generation: 0,
                route: CachedKind::InProcess,
            });
            return Poll::Ready(());
        };
        if let Some(cached) = &self.cached {
            let fresh = cached.generation == entry.generation()
                && !(matches!(cached.route, CachedKind::InProcess | CachedKind::Refused(_))
                    && entry.reprobe_due());
            if fresh {
                return Poll::Ready(());
            }
        }
        let (generation, decision) = std::task::ready!(entry.poll_decision(cx));
        let route = match decision {
            Decision::Daemon { channel, id, .. } => CachedKind::Daemon {
                pid: channel.target.pid,
                channel: channel.channel,
                id,
            },
            Decision::InProcess(reason) if self.shared.settings.mode == Mode::Require => {
                CachedKind::Refused(reason)
            }
            Decision::InProcess(_) => CachedKind::InProcess,
        };
        self.cached = Some(CachedRoute { generation, route });
        Poll::Ready(())
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
            std::task::ready!(self.poll_route(cx));
            let cached = self.cached.as_mut().expect("poll_route caches a route");
            self.readied = Some(match &mut cached.route {
                CachedKind::Daemon { channel, pid, id } => match channel.poll_ready(cx) {
                    Poll::Ready(Ok(())) => Readied::Daemon { pid: *pid },
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        // Nothing was sent: the call may still go in-process.
                        tracing::debug!(error = %e, "local daemon channel failed its readiness");
                        let id = *id;
                        self.cached = None;
                        if let Some(entry) = self.shared.entry() {
                            entry.connection_lost(id, EndCause::Daemon);
                        }
                        continue;
                    }
                },
                CachedKind::InProcess => {
                    std::task::ready!(self.inner.poll_ready(cx)).map_err(Into::into)?;
                    Readied::InProcess
                }
                CachedKind::Refused(reason) => Readied::Refused(reason.clone()),
            });
            return Poll::Ready(Ok(()));
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let readied = self
            .readied
            .take()
            .expect("LocalDaemon::call was called before poll_ready returned Ready(Ok)");
        let entry = self.shared.entry();
        match readied {
            Readied::Daemon { pid } => {
                let Some(CachedRoute {
                    route: CachedKind::Daemon { channel, .. },
                    ..
                }) = &mut self.cached
                else {
                    unreachable!("a readied daemon route keeps its cached channel until call");
                };
                if let Some(entry) = entry {
                    entry.count_daemon_call();
                }
                ResponseFuture::daemon(channel.call(request), pid)
            }
            Readied::InProcess => {
                if let Some(entry) = entry {
                    entry.count_in_process_call();
                }
                ResponseFuture::in_process(self.inner.call(request))
            }
            Readied::Refused(reason) => ResponseFuture::refused(reason),
        }
    }
}
