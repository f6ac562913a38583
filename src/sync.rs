//! The two synchronisation helpers that the registry's detections and [`LazyFallback`]'s builds
//! share: a lock that outlives a panic, and the tasks waiting for a shared piece of work.
//!
//! [`LazyFallback`]: crate::LazyFallback

use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Waker};

/// Locks `mutex`, taking over its state when a panicking holder poisoned it: every state this
/// crate guards is valid between its statements, and a poisoned lock must not turn one panic
/// into a panic on every later call.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tasks that wait for one shared piece of work; each is woken once when it ends.
#[derive(Debug, Default)]
pub(crate) struct Waiters(Vec<Waker>);

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
        self.0.into_iter().for_each(Waker::wake);
    }
}
