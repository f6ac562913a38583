//! The helpers that the registry's detections and [`LazyFallback`]'s builds share: a lock that
//! outlives a panic, the tasks waiting for a shared piece of work, and a future whose panic is
//! its outcome rather than its task's end.
//!
//! [`LazyFallback`]: crate::LazyFallback

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use pin_project_lite::pin_project;

/// Logs `text` as a warning once per process: a CLI may build its layer, or meet the same
/// misconfiguration, more than once, and one line is enough to be seen.
pub(crate) fn warn_once(text: &str) {
    static WARNED: std::sync::OnceLock<Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    if lock(WARNED.get_or_init(Default::default)).insert(text.to_owned()) {
        tracing::warn!("{text}");
    }
}

/// Locks `mutex`, taking over its state when a panicking holder poisoned it: every state this
/// crate guards is valid between its statements, and a poisoned lock must not turn one panic
/// into a panic on every later call.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tasks that wait for one shared piece of work; each is woken once when it ends. Dropped,
/// they are woken too: a waiter is never forgotten.
#[derive(Debug, Default)]
pub(crate) struct Waiters(Vec<Waker>);

impl Drop for Waiters {
    fn drop(&mut self) {
        self.0.drain(..).for_each(Waker::wake);
    }
}

impl Waiters {
    /// Waiters holding the task of `cx`.
    pub(crate) fn of(cx: &Context<'_>) -> Self {
        Self(vec![cx.waker().clone()])
    }

    /// Adds the task of `cx`, unless it already waits.
    pub(crate) fn register(&mut self, cx: &Context<'_>) {
        if !self.0.iter().any(|w| w.will_wake(cx.waker())) {
            self.0.push(cx.waker().clone());
        }
    }

    /// Wakes every waiter.
    pub(crate) fn wake_all(self) {
        drop(self);
    }
}

pin_project! {
    /// A future that resolves to `Err(panic)` if polling it panics. The work shared by many
    /// callers runs in one, so that its guard can tell its own panic (a failure) from its
    /// task being dropped with a runtime that shuts down (an interruption).
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Panic>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(Panic(payload))),
        }
    }
}

/// A caught panic's payload.
pub(crate) struct Panic(Box<dyn Any + Send>);

impl Panic {
    /// The panic's message, when it has one.
    pub(crate) fn message(&self) -> Option<&str> {
        match self.0.downcast_ref::<&'static str>() {
            Some(message) => Some(message),
            None => self.0.downcast_ref::<String>().map(String::as_str),
        }
    }
}
