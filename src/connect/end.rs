//! The end of a daemon connection, and who ended it: the daemon (or a broken or hung
//! connection), or the runtime that drove it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

/// How a daemon connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndCause {
    /// The connection finished: the daemon sent GOAWAY or closed it, or an I/O error broke it.
    /// The daemon is gone for this process.
    Daemon,
    /// Keepalive gave up: the daemon did not answer a ping in time. Like [`Daemon`](Self::Daemon)
    /// it ends the route for every runtime; a runtime that was not driven for longer than the
    /// keepalive timeout looks the same, and the next re-probe corrects that.
    Unresponsive,
    /// The runtime that drove the connection shut down before it finished. The daemon may be
    /// fine: the next runtime connects again.
    RuntimeEnded,
}

/// Called once when a daemon connection ends.
#[derive(Clone)]
pub(crate) struct ConnectionEnd {
    fired: Arc<AtomicBool>,
    callback: Arc<dyn Fn(EndCause) + Send + Sync>,
}

impl std::fmt::Debug for ConnectionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionEnd")
            .field("fired", &self.has_fired())
            .finish()
    }
}

impl ConnectionEnd {
    pub(crate) fn new(callback: impl Fn(EndCause) + Send + Sync + 'static) -> Self {
        Self {
            fired: Arc::new(AtomicBool::new(false)),
            callback: Arc::new(callback),
        }
    }

    pub(crate) fn ignored() -> Self {
        Self::new(|_| {})
    }

    pub(crate) fn has_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    pub(crate) fn fire(&self, cause: EndCause) {
        if !self.fired.swap(true, Ordering::AcqRel) {
            (self.callback)(cause);
        }
    }
}

pin_project! {
    /// The HTTP/2 connection's future, which fires its end signal when it finishes
    /// ([`EndCause::Daemon`]) or is dropped unfinished ([`EndCause::RuntimeEnded`]).
    pub(crate) struct Watched<F> {
        #[pin]
        connection: F,
        end: ConnectionEnd,
    }

    impl<F> PinnedDrop for Watched<F> {
        fn drop(this: Pin<&mut Self>) {
            this.end.fire(EndCause::RuntimeEnded);
        }
    }
}

impl<F> Watched<F> {
    pub(crate) fn new(connection: F, end: ConnectionEnd) -> Self {
        Self { connection, end }
    }
}

impl<F: Future<Output = Result<(), hyper::Error>>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let cause = match std::task::ready!(this.connection.poll(cx)) {
            Ok(()) => EndCause::Daemon,
            Err(e) if e.is_timeout() => EndCause::Unresponsive,
            Err(e) => {
                tracing::debug!(error = %e, "local daemon connection failed");
                EndCause::Daemon
            }
        };
        this.end.fire(cause);
        Poll::Ready(())
    }
}
