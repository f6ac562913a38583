//! The end of a daemon connection, and who ended it: the daemon (or a broken or hung
//! connection), or the runtime that drove it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// The HTTP/2 connection's future with its keepalive, which fires the end signal when the
    /// connection finishes ([`EndCause::Daemon`]), when a ping goes unanswered
    /// ([`EndCause::Unresponsive`]; the connection is then dropped, which closes the socket), or
    /// when it is dropped unfinished ([`EndCause::RuntimeEnded`]).
    pub(crate) struct Watched<F> {
        #[pin]
        connection: F,
        keepalive: Option<Keepalive>,
        end: ConnectionEnd,
    }

    impl<F> PinnedDrop for Watched<F> {
        fn drop(this: Pin<&mut Self>) {
            this.end.fire(EndCause::RuntimeEnded);
        }
    }
}

impl<F> Watched<F> {
    pub(crate) fn new(connection: F, keepalive: Option<Keepalive>, end: ConnectionEnd) -> Self {
        Self {
            connection,
            keepalive,
            end,
        }
    }
}

impl<F: Future<Output = Result<(), h2::Error>>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let cause = match this.connection.poll(cx) {
            Poll::Ready(Ok(())) => EndCause::Daemon,
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "local daemon connection failed");
                EndCause::Daemon
            }
            Poll::Pending => match this.keepalive {
                Some(keepalive) => {
                    std::task::ready!(keepalive.poll_unanswered(cx));
                    tracing::debug!("local daemon did not answer a keepalive ping in time");
                    EndCause::Unresponsive
                }
                None => return Poll::Pending,
            },
        };
        this.end.fire(cause);
        Poll::Ready(())
    }
}

/// HTTP/2 keepalive: a ping every `interval`, also while idle; a ping unanswered for `timeout`
/// means the daemon is gone (or stopped, or its runtime hung).
pub(crate) struct Keepalive {
    ping_pong: h2::PingPong,
    interval: Duration,
    timeout: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    awaiting_pong: bool,
}

impl Keepalive {
    pub(crate) fn new(ping_pong: h2::PingPong, interval: Duration, timeout: Duration) -> Self {
        Self {
            ping_pong,
            interval,
            timeout,
            timer: Box::pin(tokio::time::sleep(interval)),
            awaiting_pong: false,
        }
    }

    /// `Ready` when a ping went unanswered for the timeout. A ping the connection can no longer
    /// send leaves the verdict to the connection's own end.
    fn poll_unanswered(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.awaiting_pong {
                match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        self.rearm(self.interval);
                        continue;
                    }
                    Poll::Ready(Err(_)) => return Poll::Pending,
                    Poll::Pending => {}
                }
                return self.timer.as_mut().poll(cx);
            }
            std::task::ready!(self.timer.as_mut().poll(cx));
            if self.ping_pong.send_ping(h2::Ping::opaque()).is_err() {
                return Poll::Pending;
            }
            self.awaiting_pong = true;
            self.rearm(self.timeout);
        }
    }

    fn rearm(&mut self, after: Duration) {
        self.timer.set(tokio::time::sleep(after));
    }
}
