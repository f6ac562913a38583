//! The route a clone calls by: what all clones share ([`Shared`]: the directory, the
//! settings and the lease on the registry entry), the decision a clone has cached, and the
//! warm path that checks it is still good.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use crate::config::{Idempotent, Mode, Settings};
use crate::http2::EndCause;
use crate::registry::{DaemonRoute, Decision, Entry, Lease};

/// What all clones of one layered service share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) settings: Settings,
    pub(crate) mark_route: bool,
    /// The values of the environment the layer did not understand.
    pub(crate) misconfigured: Vec<String>,
    /// The methods safe to run again in-process after a broken connection.
    idempotent: Option<Idempotent>,
    lease: OnceLock<Lease>,
}

impl Shared {
    pub(crate) fn new(
        dir: PathBuf,
        settings: Settings,
        misconfigured: Vec<String>,
        mark_route: bool,
        idempotent: Option<Idempotent>,
    ) -> Self {
        Self {
            dir,
            settings,
            misconfigured,
            mark_route,
            idempotent,
            lease: OnceLock::new(),
        }
    }

    /// The mode in force, after the environment override.
    pub(crate) fn mode(&self) -> Mode {
        self.settings.mode
    }

    /// Whether the method at `path` may run again in-process after its connection broke.
    pub(crate) fn idempotent(&self, path: &str) -> bool {
        self.idempotent.as_ref().is_some_and(|i| i.accepts(path))
    }

    /// A request the daemon never processed runs in-process.
    pub(crate) fn count_reroute(&self) {
        if let Some(entry) = self.entry() {
            entry.count_reroute();
        }
    }

    /// An idempotent request whose connection broke runs again in-process.
    pub(crate) fn count_rerun(&self, path: &str) {
        if let Some(entry) = self.entry() {
            entry.count_rerun(path);
        }
    }

    pub(crate) fn count_daemon_call(&self) {
        if let Some(entry) = self.entry() {
            entry.count_daemon_call();
        }
    }

    pub(crate) fn count_in_process_call(&self) {
        if let Some(entry) = self.entry() {
            entry.count_in_process_call();
        }
    }

    /// A call waits for a daemon being started.
    pub(crate) fn count_start_wait(&self) {
        if let Some(entry) = self.entry() {
            entry.count_start_wait();
        }
    }

    /// A call that waited for a daemon being started runs in-process, or hit its deadline.
    pub(crate) fn count_start_wait_gave_up(&self) {
        if let Some(entry) = self.entry() {
            entry.count_start_wait_gave_up();
        }
    }

    /// The connection of `route` took no request: it is closed, or going away.
    pub(crate) fn connection_ended(&self, route: &DaemonRoute) {
        if let Some(entry) = self.entry() {
            entry.connection_ended(route.id, route.runtime, EndCause::Daemon);
        }
    }

    /// The registry entry, looked up once (one `stat` and a map lookup) for all clones.
    #[inline]
    pub(crate) fn entry(&self) -> Option<&Arc<Entry>> {
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
    pub(super) ready: bool,
}

impl Cached {
    fn new(generation: u64, decision: Decision) -> Self {
        Self {
            generation,
            decision,
            task: tokio::task::try_id(),
            ready: false,
        }
    }
}

/// The route for the next call: the warm path is one atomic load and a comparison (on the
/// daemon route, also a thread-local read, or the runtime's handle outside a task). A new
/// decision replaces the cached one, readiness included.
#[inline(always)]
pub(super) fn poll_route<'a>(
    shared: &Shared,
    route: &'a mut Option<Cached>,
    cx: &mut Context<'_>,
) -> Poll<&'a mut Cached> {
    let Some(entry) = shared.entry() else {
        // Mode off: in-process for good.
        return Poll::Ready(route.get_or_insert_with(|| Cached::new(0, Decision::InProcess)));
    };
    if route.as_mut().is_some_and(|cached| cached.fresh(entry)) {
        return route.as_mut().map_or(Poll::Pending, Poll::Ready);
    }
    poll_new_route(entry, route, cx)
}

/// The slow path: a decision from the entry, which may start the checks.
#[cold]
#[inline(never)]
fn poll_new_route<'a>(
    entry: &Arc<Entry>,
    route: &'a mut Option<Cached>,
    cx: &mut Context<'_>,
) -> Poll<&'a mut Cached> {
    let (generation, decision) = std::task::ready!(entry.poll_decision(cx));
    Poll::Ready(route.insert(Cached::new(generation, decision)))
}

impl Cached {
    /// Whether this decision still holds for a call now.
    #[inline]
    fn fresh(&mut self, entry: &Entry) -> bool {
        if self.generation != entry.generation() {
            return false;
        }
        match &self.decision {
            Decision::Daemon(daemon) => {
                let current = tokio::task::try_id();
                (current.is_some() && current == self.task)
                    || same_runtime(&mut self.task, current, daemon.runtime)
            }
            Decision::InProcess | Decision::Unavailable(_) | Decision::AwaitStart => {
                !entry.reprobe_due()
            }
        }
    }
}

/// Whether this call, from a task other than the one last seen (or from none), comes from
/// `runtime`: the runtime's handle says. Tokio takes task ids from one process-wide counter,
/// so an id is never another task's.
#[cold]
fn same_runtime(
    task: &mut Option<tokio::task::Id>,
    current: Option<tokio::task::Id>,
    runtime: tokio::runtime::Id,
) -> bool {
    let same = tokio::runtime::Handle::try_current().is_ok_and(|h| h.id() == runtime);
    if same {
        *task = current;
    }
    same
}
