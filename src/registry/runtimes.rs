//! Which Tokio runtimes can run the checks. The checks need the runtime's I/O and time
//! drivers, and Tokio has no way to ask whether a runtime has them (tokio-rs/tokio#8361):
//! creating a socket or a timer without its driver panics. So the crate never tries one to
//! find out. A runtime without a driver is learnt when a task of the crate's on it panics with
//! Tokio's message for it (that panic goes through the panic hook, as any task's does, once
//! per runtime), and no later task of the crate's is spawned on it: its calls run in-process
//! with [`FallbackReason::RuntimeUnusable`](crate::FallbackReason::RuntimeUnusable).

use std::sync::Mutex;

use tokio::runtime::{Handle, Id};

use crate::sync::{Panic, lock};

/// Runtimes learnt to lack a driver, with the reason's text. Bounded: a process that builds
/// many misconfigured runtimes forgets the oldest, and learns it again by one more panic.
static UNUSABLE: Mutex<Vec<(Id, &'static str)>> = Mutex::new(Vec::new());

const REMEMBERED: usize = 64;

/// Why `handle`'s runtime cannot run the checks, if that has been learnt.
pub(super) fn unusable(handle: &Handle) -> Option<&'static str> {
    let id = handle.id();
    lock(&UNUSABLE)
        .iter()
        .find(|(runtime, _)| *runtime == id)
        .map(|(_, message)| *message)
}

/// Learns from a panic of a crate task on `runtime`: the reason's text when it was Tokio's
/// panic for a missing driver, and `None` for any other panic.
pub(super) fn learn(runtime: Id, panic: &Panic) -> Option<&'static str> {
    let message = panic.message()?;
    let reason = if message.contains("timers are disabled") {
        "the runtime has no time driver: build it with `enable_all()` (or `enable_time()`)"
    } else if message.contains("IO is disabled") {
        "the runtime has no I/O driver: build it with `enable_all()` (or `enable_io()`)"
    } else {
        return None;
    };
    let mut unusable = lock(&UNUSABLE);
    if !unusable.iter().any(|(id, _)| *id == runtime) {
        if unusable.len() >= REMEMBERED {
            unusable.remove(0);
        }
        unusable.push((runtime, reason));
    }
    Some(reason)
}
