//! The transitions of an entry: a run's outcome installed, a negative verdict for every
//! runtime, and the end of a connection, each traced in a span of its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::runtime::Handle;
use tokio::time::Instant;

use super::decision::DaemonRoute;
use super::detect::{Checked, Outcome};
use super::entry::Entry;
use super::ids::ConnectionId;
use super::state::{Slot, State, Verdict};
use crate::config::Mode;
use crate::connect::EndCause;
use crate::lifecycle::record_served;
use crate::reason::FallbackReason;

impl Entry {
    /// Installs the outcome of a runtime's checks (its slot already taken out).
    pub(super) fn install(
        self: &Arc<Self>,
        state: &mut State,
        runtime: tokio::runtime::Id,
        outcome: Outcome,
    ) {
        let checked = match outcome {
            // A connection that ended before this moment found nothing to end, and its signal
            // fires only once: it is checked here, under the lock `connection_ended` takes.
            Ok(checked) if checked.end.has_fired() => {
                checked.connection.task.abort();
                Err(FallbackReason::ConnectionLost)
            }
            outcome => outcome,
        };
        match checked {
            Ok(Checked { connection, id, .. }) => {
                self.counters.channels_built.fetch_add(1, Ordering::Relaxed);
                let route = DaemonRoute {
                    client: connection.client,
                    pid: connection.target.pid,
                    id,
                    runtime,
                };
                self.trace_decision("daemon", None);
                let newly_served = !matches!(state.verdict, Verdict::Target(_));
                if self.settings.auto_start.is_some() && newly_served {
                    state.spawned = None;
                    // Only for a daemon that may have been started on a miss, once per verdict
                    // (not per runtime); a file write, so not under this lock: on a task of its
                    // own.
                    let paths = self.daemon_paths.clone();
                    if let Ok(handle) = Handle::try_current() {
                        handle.spawn_blocking(move || record_served(&paths));
                    }
                }
                state.verdict = Verdict::Target(connection.target);
                state.runtimes.push((
                    runtime,
                    Slot::Connected {
                        route,
                        task: connection.task,
                    },
                ));
                self.bump();
            }
            Err(reason) => {
                let handle = Handle::try_current().ok();
                self.set_negative(state, reason, handle.as_ref());
            }
        }
    }

    /// No usable daemon, for every runtime: connections close, and a re-probe is scheduled.
    pub(super) fn set_negative(
        self: &Arc<Self>,
        state: &mut State,
        reason: FallbackReason,
        runtime: Option<&Handle>,
    ) {
        self.counters.count_fallback(&reason);
        let route = match self.settings.mode {
            Mode::Require => "refused",
            _ => "in-process",
        };
        self.trace_decision(route, Some(&reason));
        state.close_all();
        state.verdict = Verdict::Negative {
            reason,
            since: Instant::now(),
        };
        state.timers.clear();
        self.reprobe_due.store(false, Ordering::Relaxed);
        self.arm_timer(state, runtime);
        self.bump();
    }

    /// Each decision in a span of its own, whose fields name the route and the reason's stable
    /// code, for logs and for subscribers that count.
    pub(super) fn trace_decision(&self, route: &'static str, reason: Option<&FallbackReason>) {
        let span = tracing::info_span!(
            "local_daemon_decision",
            dir = %self.dir.display(),
            route,
            reason = reason.map(FallbackReason::code),
        );
        span.in_scope(|| match reason {
            Some(reason) => tracing::debug!(%reason, "calls run {route}"),
            None => tracing::debug!("calls go to the daemon"),
        });
    }

    /// The daemon connection `id` of `runtime` ended.
    pub(crate) fn connection_ended(
        self: &Arc<Self>,
        id: ConnectionId,
        runtime: tokio::runtime::Id,
        cause: EndCause,
    ) {
        let mut state = self.lock();
        let ours = matches!(
            state.slot(runtime),
            Some(Slot::Connected { route, .. }) if route.id == id
        );
        if !ours {
            return;
        }
        match cause {
            EndCause::Daemon | EndCause::Unresponsive => {
                tracing::info!(
                    dir = %self.dir.display(),
                    ?cause,
                    "local daemon connection ended; calls run in-process"
                );
                let handle = Handle::try_current().ok();
                self.set_negative(&mut state, FallbackReason::ConnectionLost, handle.as_ref());
            }
            EndCause::RuntimeEnded => {
                tracing::debug!(
                    dir = %self.dir.display(),
                    "the runtime of a local daemon connection ended; the next runtime connects again"
                );
                state.take_slot(runtime);
                self.bump();
            }
        }
    }
}
