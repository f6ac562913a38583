//! The end of a daemon connection, and who ended it: the daemon (or a broken or hung
//! connection), or the runtime that drove it; and the registry's handle that closes it once the
//! calls in flight on it have finished.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::task::AbortHandle;

use crate::sync::lock;

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

    /// Marks the end as told without telling it.
    fn silence(&self) {
        self.fired.store(true, Ordering::Release);
    }

    pub(crate) fn fire(&self, cause: EndCause) {
        if !self.fired.swap(true, Ordering::AcqRel) {
            (self.callback)(cause);
        }
    }
}

/// The calls in flight on one connection, and whether the registry asked it to close.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    calls: AtomicUsize,
    closing: AtomicBool,
    /// The connection's task, while it waits for the last call of a close.
    waker: Mutex<Option<Waker>>,
}

impl InFlight {
    /// A call's claim on the connection, held until its response is done with; `None` once
    /// the connection is closing, when the call must not be sent. Taken before the request is
    /// queued: either the call sees the close, or the connection sees the call and waits for it
    /// (`SeqCst` on both sides, here and in [`poll_drained`](Self::poll_drained)).
    pub(crate) fn enter(self: &Arc<Self>) -> Option<CallClaim> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let claim = CallClaim(self.clone());
        (!self.closing.load(Ordering::SeqCst)).then_some(claim)
    }

    /// Wakes the connection's task, whose waker stays for the next time.
    fn wake(&self) {
        if let Some(waker) = lock(&self.waker).as_ref() {
            waker.wake_by_ref();
        }
    }

    /// `Ready` once a close was asked for and no call is left. The task's waker is kept before
    /// the flags are read, so that a close or the last call's end always finds it; `kept` is the
    /// task's own note of the waker it left, so that the lock is taken only when it changes.
    fn poll_drained(&self, cx: &mut Context<'_>, kept: &mut Option<Waker>) -> Poll<()> {
        if !kept.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *lock(&self.waker) = Some(cx.waker().clone());
            *kept = Some(cx.waker().clone());
        }
        if self.closing.load(Ordering::SeqCst) && self.calls.load(Ordering::SeqCst) == 0 {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// A call's claim on its connection: a connection asked to close waits for it.
#[derive(Debug)]
pub(crate) struct CallClaim(Arc<InFlight>);

impl Drop for CallClaim {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.closing.load(Ordering::SeqCst)
        {
            self.0.wake();
        }
    }
}

/// The registry's handle on a connection's task.
#[derive(Debug)]
pub(crate) struct ConnectionTask {
    abort: AbortHandle,
    in_flight: Arc<InFlight>,
}

impl ConnectionTask {
    pub(crate) fn new(abort: AbortHandle, in_flight: Arc<InFlight>) -> Self {
        Self { abort, in_flight }
    }

    /// Closes the connection once the calls already sent on it are done: a daemon that is
    /// stopping finishes them within its grace period, and a response still streaming to its
    /// caller goes on. A call that comes after the close is not sent (it runs in-process). A
    /// response the caller keeps and never finishes keeps the connection open until it drops it,
    /// or the daemon goes away, or keepalive finds it hung.
    pub(crate) fn close(&self) {
        self.in_flight.closing.store(true, Ordering::SeqCst);
        self.in_flight.wake();
    }

    /// Closes the connection now: for one that no call has used.
    pub(crate) fn abort(&self) {
        self.abort.abort();
    }
}

pin_project! {
    /// The HTTP/2 connection's future with its keepalive, which fires the end signal when the
    /// connection finishes ([`EndCause::Daemon`]), when a ping goes unanswered
    /// ([`EndCause::Unresponsive`]; the connection is then dropped, which closes the socket), or
    /// when it is dropped unfinished ([`EndCause::RuntimeEnded`]). Asked to close, it ends
    /// quietly when its last call in flight is done.
    pub(crate) struct Watched<F> {
        #[pin]
        connection: F,
        keepalive: Option<Keepalive>,
        in_flight: Arc<InFlight>,
        // The waker this task left with `in_flight`.
        kept_waker: Option<Waker>,
        end: ConnectionEnd,
    }

    impl<F> PinnedDrop for Watched<F> {
        fn drop(this: Pin<&mut Self>) {
            this.end.fire(EndCause::RuntimeEnded);
        }
    }
}

impl<F> Watched<F> {
    pub(crate) fn new(
        connection: F,
        keepalive: Option<Keepalive>,
        in_flight: Arc<InFlight>,
        end: ConnectionEnd,
    ) -> Self {
        Self {
            connection,
            keepalive,
            in_flight,
            kept_waker: None,
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
            Poll::Pending => {
                if let Some(keepalive) = this.keepalive
                    && keepalive.poll_unanswered(cx).is_ready()
                {
                    tracing::debug!("local daemon did not answer a keepalive ping in time");
                    EndCause::Unresponsive
                } else {
                    std::task::ready!(this.in_flight.poll_drained(cx, this.kept_waker));
                    // Closed by the registry, which let go of it first: no news to tell.
                    this.end.silence();
                    return Poll::Ready(());
                }
            }
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
