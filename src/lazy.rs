//! [`LazyFallback`]: an in-process service built on the first call that needs it.
//!
//! In a real CLI, building the in-process service is the expensive part: it opens the
//! repository. Wrapping an already built `FooServer` pays that even when the daemon serves every
//! call. Under a [`LocalDaemon`](crate::LocalDaemon), the in-process service is polled only when
//! a call routes in-process, so a `LazyFallback` there costs nothing on the daemon route.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tonic::Status;
use tower::{BoxError, Service};

use crate::sync::{CatchUnwind, Waiters, lock};

/// A service built by an async factory on the first call that reaches it, then shared by every
/// clone.
///
/// The build runs once for all concurrent callers, on a task of its own. A build error fails
/// the calls that waited for that build with `UNAVAILABLE` naming the error, and the next call
/// builds again. A finished build is shared by the whole process, whichever runtime calls; a
/// build whose runtime shut down before it finished is started again by the next call, on that
/// call's runtime. So the built service must not hold resources bound to one runtime (a
/// `Channel` made on it, a task spawned on it).
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_local_daemon::{LazyFallback, LocalDaemonLayer};
/// # type FooServer = tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;
/// # async fn open_repository() -> Result<FooServer, std::io::Error> {
/// #     use tonic_health::server::{HealthReporter, HealthService};
/// #     Ok(FooServer::new(HealthService::from_health_reporter(HealthReporter::new())))
/// # }
///
/// let svc = ServiceBuilder::new()
///     .layer(LocalDaemonLayer::new(".heddle"))
///     .service(LazyFallback::new(|| async {
///         // Runs only if a call goes in-process.
///         open_repository().await
///     }));
/// # let _ = svc;
/// ```
pub struct LazyFallback<F, S> {
    shared: Arc<Shared<F, S>>,
    local: Local<S>,
}

struct Shared<F, S> {
    factory: F,
    state: Mutex<Build<S>>,
    next_build: AtomicU64,
}

enum Build<S> {
    NotStarted,
    Building { id: u64, waiters: Waiters },
    Failed { id: u64, message: String },
    Built(S),
}

/// What this clone has.
enum Local<S> {
    Empty,
    /// This clone's call waits for build `id`.
    Waiting(u64),
    /// The build this clone waited for failed: the next call fails with this.
    Failed(Status),
    Ready(S),
}

impl<F, S: Clone> Clone for LazyFallback<F, S> {
    fn clone(&self) -> Self {
        let local = match &self.local {
            Local::Ready(service) => Local::Ready(service.clone()),
            _ => Local::Empty,
        };
        Self {
            shared: self.shared.clone(),
            local,
        }
    }
}

impl<F, S> fmt::Debug for LazyFallback<F, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &*self.shared.lock() {
            Build::NotStarted => "not started",
            Build::Building { .. } => "building",
            Build::Failed { .. } => "failed",
            Build::Built(_) => "built",
        };
        f.debug_struct("LazyFallback")
            .field("state", &state)
            .finish()
    }
}

impl<F, S> Shared<F, S> {
    fn lock(&self) -> MutexGuard<'_, Build<S>> {
        lock(&self.state)
    }
}

impl<F, Fut, S, E> LazyFallback<F, S>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<S, E>> + Send + 'static,
    S: Clone + Send + 'static,
    E: fmt::Display,
{
    /// A service that `factory` builds on the first call that reaches it.
    pub fn new(factory: F) -> Self {
        Self {
            shared: Arc::new(Shared {
                factory,
                state: Mutex::new(Build::NotStarted),
                next_build: AtomicU64::new(0),
            }),
            local: Local::Empty,
        }
    }

    /// Whether the service has been built.
    pub fn is_built(&self) -> bool {
        matches!(*self.shared.lock(), Build::Built(_))
    }

    /// Moves this clone on: `Ready(())` once it has a service or a failure for its call.
    fn poll_build(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if matches!(self.local, Local::Ready(_) | Local::Failed(_)) {
            return Poll::Ready(());
        }
        let mut state = self.shared.lock();
        let id = match &mut *state {
            Build::Built(service) => {
                self.local = Local::Ready(service.clone());
                return Poll::Ready(());
            }
            Build::Failed { id, message } if matches!(self.local, Local::Waiting(w) if w == *id) => {
                self.local = Local::Failed(Status::unavailable(format!(
                    "building the in-process service failed: {message}"
                )));
                return Poll::Ready(());
            }
            Build::Building { id, waiters } => {
                self.local = Local::Waiting(*id);
                waiters.register(cx);
                return Poll::Pending;
            }
            // A call after a failed or interrupted build builds again.
            Build::Failed { .. } | Build::NotStarted => {
                self.shared.next_build.fetch_add(1, Ordering::Relaxed)
            }
        };
        *state = Build::Building {
            id,
            waiters: Waiters::of(cx),
        };
        drop(state);
        self.local = Local::Waiting(id);
        // Whatever happens to the build (an error, a panic, its runtime shutting down, no
        // runtime at all), the guard ends it and wakes whoever waits.
        let mut finish = FinishBuild {
            shared: self.shared.clone(),
            id,
            built: None,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let shared = finish.shared.clone();
                    let built = CatchUnwind::new(async move { (shared.factory)().await }).await;
                    finish.built = Some(match built {
                        Ok(built) => built.map_err(|e| e.to_string()),
                        Err(_) => Err("the build panicked".into()),
                    });
                    drop(finish);
                });
            }
            Err(_) => {
                finish.built = Some(Err("no Tokio runtime is running".into()));
                drop(finish);
            }
        }
        Poll::Pending
    }
}

/// Ends build `id` when its task ends, however it ends.
struct FinishBuild<F, S> {
    shared: Arc<Shared<F, S>>,
    id: u64,
    built: Option<Result<S, String>>,
}

impl<F, S> Drop for FinishBuild<F, S> {
    fn drop(&mut self) {
        let end = match self.built.take() {
            Some(Ok(service)) => Build::Built(service),
            Some(Err(message)) => Build::Failed {
                id: self.id,
                message,
            },
            // Its runtime shut down (the build's own panics are caught in its task): not the
            // build's fault. The next call builds again, on its own runtime.
            None => Build::NotStarted,
        };
        let mut state = self.shared.lock();
        if matches!(&*state, Build::Building { id, .. } if *id == self.id)
            && let Build::Building { waiters, .. } = std::mem::replace(&mut *state, end)
        {
            drop(state);
            waiters.wake_all();
        }
    }
}

impl<F, Fut, S, E, Request> Service<Request> for LazyFallback<F, S>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<S, E>> + Send + 'static,
    S: Service<Request> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    E: fmt::Display,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = LazyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        std::task::ready!(self.poll_build(cx));
        match &mut self.local {
            Local::Ready(service) => service.poll_ready(cx).map_err(Into::into),
            // A build failure fails the call, not readiness: clients report a readiness error
            // as "Service was not ready".
            _ => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match std::mem::replace(&mut self.local, Local::Empty) {
            Local::Ready(mut service) => {
                let future = service.call(request);
                self.local = Local::Ready(service);
                LazyFuture::call(future)
            }
            Local::Failed(status) => LazyFuture::failed(status),
            Local::Empty | Local::Waiting(_) => {
                panic!("LazyFallback::call was called before poll_ready returned Ready(Ok)")
            }
        }
    }
}

pin_project! {
    /// The response future of [`LazyFallback`].
    pub struct LazyFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Call { #[pin] future: F },
        Failed { status: Option<Status> },
    }
}

impl<F> LazyFuture<F> {
    fn call(future: F) -> Self {
        Self {
            kind: Kind::Call { future },
        }
    }

    fn failed(status: Status) -> Self {
        Self {
            kind: Kind::Failed {
                status: Some(status),
            },
        }
    }
}

impl<F> fmt::Debug for LazyFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Call { .. } => f.write_str("LazyFuture::Call"),
            Kind::Failed { status } => f.debug_tuple("LazyFuture::Failed").field(status).finish(),
        }
    }
}

impl<F, T, E> Future for LazyFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Call { future } => future.poll(cx).map_err(Into::into),
            KindProj::Failed { status } => Poll::Ready(Err(status
                .take()
                .expect("LazyFuture polled after completion")
                .into())),
        }
    }
}
