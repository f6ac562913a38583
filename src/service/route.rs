//! The route a clone calls by: what all clones share ([`Shared`]: the directory, the
//! settings and the lease on the registry entry), the decision a clone has cached, and the
//! warm path that checks it is still good.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use crate::config::{Mode, Settings};
use crate::registry::{Decision, Entry, Lease};

/// What all clones of one layered service share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) settings: Settings,
    pub(super) mark_route: bool,
    lease: OnceLock<Lease>,
}

impl Shared {
    pub(crate) fn new(dir: PathBuf, settings: Settings, mark_route: bool) -> Self {
        Self {
            dir,
            settings,
            mark_route,
            lease: OnceLock::new(),
        }
    }

    /// The registry entry, looked up once (one `stat` and a map lookup) for all clones.
    pub(super) fn entry(&self) -> Option<&Arc<Entry>> {
        if self.settings.mode == Mode::Off {
            return None;
        }
        Some(
            self.lease
                .get_or_init(|| Lease::take(&self.dir, &self.settings))
                .entry(),
        )
    }
}

/// The decision this clone routes by, valid while the entry's generation is unchanged, and
/// whether `poll_ready` made its route ready for one `call`.
#[derive(Debug, Clone)]
pub(super) struct Cached {
    pub(super) generation: u64,
    pub(super) decision: Decision,
    /// On the daemon route: the last task seen to call from the route's runtime. A task never
    /// changes runtime, and its id is a thread-local read, where the runtime's handle is two
    /// atomic operations on a line every worker shares. Outside a task (a future driven by
    /// `block_on` itself) there is no id, and each warm daemon call reads the handle.
    pub(super) task: Option<tokio::task::Id>,
    /// Calls routed by a negative decision since the slow path last looked at the clock.
    pub(super) unchecked: u8,
    pub(super) ready: bool,
}

impl Cached {
    fn new(generation: u64, decision: Decision) -> Self {
        Self {
            generation,
            decision,
            task: tokio::task::try_id(),
            unchecked: 0,
            ready: false,
        }
    }
}

/// How many calls a negative decision routes before the slow path looks at the clock itself,
/// in case the timer that sets the due flag runs on a runtime that is not being driven.
const CLOCK_CHECK_EVERY: u8 = 64;

/// The route for the next call: the warm path is one atomic load and a comparison (on the
/// daemon route, also a thread-local read, or the runtime's handle outside a task). A new
/// decision replaces the cached one, readiness included.
pub(super) fn poll_route<'a>(
    shared: &Shared,
    route: &'a mut Option<Cached>,
    cx: &mut Context<'_>,
) -> Poll<&'a mut Cached> {
    let Some(entry) = shared.entry() else {
        // Mode off: in-process for good.
        return Poll::Ready(route.get_or_insert_with(|| Cached::new(0, Decision::InProcess)));
    };
    let fresh = match route {
        Some(cached) if cached.generation == entry.generation() => match &cached.decision {
            Decision::Daemon(daemon) => same_runtime(&mut cached.task, daemon.runtime),
            Decision::InProcess | Decision::Refused(_) => {
                cached.unchecked += 1;
                !entry.reprobe_due() && cached.unchecked < CLOCK_CHECK_EVERY
            }
        },
        _ => false,
    };
    if !fresh {
        let (generation, decision) = std::task::ready!(entry.poll_decision(cx));
        *route = Some(Cached::new(generation, decision));
    }
    route.as_mut().map_or(Poll::Pending, Poll::Ready)
}

/// Whether this call comes from `runtime`: the task that last did, or the runtime's handle.
/// Tokio takes task ids from one process-wide counter, so an id is never another task's.
fn same_runtime(task: &mut Option<tokio::task::Id>, runtime: tokio::runtime::Id) -> bool {
    let current = tokio::task::try_id();
    if current.is_some() && current == *task {
        return true;
    }
    let same = tokio::runtime::Handle::try_current().is_ok_and(|h| h.id() == runtime);
    if same {
        *task = current;
    }
    same
}
