//! A call's hold on its connection: the calls in flight on a connection ([`InFlight`]), one
//! call's claim ([`CallClaim`]), and what the end of a call's response does ([`CallEnd`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::task::AbortHandle;

use crate::sync::lock;

/// The calls in flight on one connection, and whether the registry asked it to close.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    calls: AtomicUsize,
    pub(super) closing: AtomicBool,
    /// Keepalive gave up on the connection: its streams see only a broken pipe.
    pub(super) unresponsive: AtomicBool,
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
    pub(super) fn wake(&self) {
        if let Some(waker) = lock(&self.waker).as_ref() {
            waker.wake_by_ref();
        }
    }

    /// `Ready` once a close was asked for and no call is left. The task's waker is kept before
    /// the flags are read, so that a close or the last call's end always finds it; `kept` is the
    /// task's own note of the waker it left, so that the lock is taken only when it changes.
    pub(super) fn poll_drained(&self, cx: &mut Context<'_>, kept: &mut Option<Waker>) -> Poll<()> {
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

/// What the end of a call's response does, whenever it comes (the whole body read, the caller
/// gone, the deadline passed): it releases the call's claim on the connection, and ends its
/// upload should the request body still be streaming.
pub(super) struct CallEnd {
    claim: CallClaim,
    upload: Option<AbortHandle>,
}

impl CallEnd {
    pub(super) fn new(claim: CallClaim, upload: Option<AbortHandle>) -> Self {
        Self { claim, upload }
    }

    /// Whether keepalive gave up on the call's connection.
    pub(super) fn unresponsive(&self) -> bool {
        self.claim.0.unresponsive.load(Ordering::SeqCst)
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        if let Some(upload) = &self.upload {
            upload.abort();
        }
    }
}
