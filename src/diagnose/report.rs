//! The [`Report`] and its [`Check`]s: what `diagnose` found, each check's outcome and time,
//! written as the checks end and printed doctor-style.

use std::fmt;
use std::time::{Duration, Instant};

use crate::lifecycle::AutoStartStatus;
use crate::reason::FallbackReason;

/// How one check went.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckOutcome {
    /// The check passed.
    Passed,
    /// The check failed for this reason.
    Failed(FallbackReason),
    /// An earlier check failed, so this one did not run.
    Skipped,
}

/// One check of a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Check {
    /// The check's name: `mode`, `directory`, `pidfile`, `process`, `socket`, `connect` or
    /// `handshake`, in that order.
    pub name: &'static str,
    /// How it went.
    pub outcome: CheckOutcome,
    /// What it found, for a person.
    pub detail: String,
    /// How long it took.
    pub elapsed: Duration,
}

/// Every check a client with given options runs, in order. Its [`Display`](fmt::Display) is a
/// doctor-style report with a remedy for the failed check.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower_local_daemon::{CheckOutcome, FallbackReason, LocalDaemonLayer};
///
/// let dir = std::env::temp_dir().join("tower-local-daemon-doc-diagnose");
/// let report = LocalDaemonLayer::new(&dir).mode_env_value(None).diagnose().await;
/// assert!(!report.usable());
/// assert_eq!(report.checks[1].name, "directory");
/// assert_eq!(report.checks[1].outcome, CheckOutcome::Failed(FallbackReason::NoPidfile));
/// println!("{report}");
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The checks, in the order the client runs them.
    pub checks: Vec<Check>,
    /// What auto-start did for the directory, when it ever started a daemon there: the
    /// starts, the ones stopped for never taking the lock, the backoff, the log's last lines.
    pub auto_start: Option<AutoStartStatus>,
    /// Configuration errors, each with the expected and the found value: values of the mode's
    /// or auto-start's variable that were not understood. (A wrong pidfile marker is the
    /// pidfile check's reason.)
    pub misconfigured: Vec<String>,
}

impl Check {
    /// A check, for a report built by hand (a test, a mock of a `status` verb).
    pub fn new(
        name: &'static str,
        outcome: CheckOutcome,
        detail: impl Into<String>,
        elapsed: Duration,
    ) -> Self {
        Self {
            name,
            outcome,
            detail: detail.into(),
            elapsed,
        }
    }
}

impl Report {
    /// A report of these checks, for one built by hand.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_local_daemon::{Check, CheckOutcome, FallbackReason, Report};
    ///
    /// let report = Report::new(vec![Check::new(
    ///     "pidfile",
    ///     CheckOutcome::Failed(FallbackReason::NoPidfile),
    ///     "no pidfile",
    ///     Duration::ZERO,
    /// )]);
    /// assert_eq!(report.reason(), Some(&FallbackReason::NoPidfile));
    /// ```
    pub fn new(checks: Vec<Check>) -> Self {
        Self {
            checks,
            auto_start: None,
            misconfigured: Vec::new(),
        }
    }

    /// Whether a client with these options would use the daemon.
    pub fn usable(&self) -> bool {
        self.checks
            .iter()
            .all(|c| c.outcome == CheckOutcome::Passed)
    }

    /// The reason of the first failed check.
    pub fn reason(&self) -> Option<&FallbackReason> {
        self.checks.iter().find_map(|c| match &c.outcome {
            CheckOutcome::Failed(reason) => Some(reason),
            _ => None,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for misconfigured in &self.misconfigured {
            writeln!(f, "[WARN] misconfigured: {misconfigured}")?;
        }
        for check in &self.checks {
            let mark = match check.outcome {
                CheckOutcome::Passed => "ok  ",
                CheckOutcome::Failed(_) => "FAIL",
                CheckOutcome::Skipped => "skip",
            };
            write!(
                f,
                "[{mark}] {:<9} {:>9}",
                check.name,
                format_elapsed(check.elapsed)
            )?;
            writeln!(f, "  {}", check.detail)?;
            if let CheckOutcome::Failed(reason) = &check.outcome {
                writeln!(f, "       what to do: {}", reason.remedy())?;
            }
        }
        match self.usable() {
            true => write!(f, "a client with these options uses the daemon")?,
            false => write!(f, "a client with these options runs in-process")?,
        }
        match &self.auto_start {
            Some(auto_start) => write!(f, "\n{auto_start}"),
            None => Ok(()),
        }
    }
}

fn format_elapsed(elapsed: Duration) -> String {
    if elapsed < Duration::from_millis(1) {
        format!("{} µs", elapsed.as_micros())
    } else {
        format!("{:.1} ms", elapsed.as_secs_f64() * 1000.0)
    }
}

/// The checks' names, in the order the client runs them.
const CHECKS: [&str; 7] = [
    "mode",
    "directory",
    "pidfile",
    "process",
    "socket",
    "connect",
    "handshake",
];

/// The report as it is written: each check's outcome as it ends, then the rest as skipped.
pub(super) struct Checks {
    checks: Vec<Check>,
    last: Instant,
}

impl Checks {
    pub(super) fn new() -> Self {
        Self {
            checks: Vec::new(),
            last: Instant::now(),
        }
    }

    /// Records the next check; `Some(())` when it passed.
    pub(super) fn record(
        &mut self,
        detail: String,
        result: Result<(), &FallbackReason>,
    ) -> Option<()> {
        let now = Instant::now();
        self.checks.push(Check {
            name: CHECKS[self.checks.len()],
            outcome: match result {
                Ok(()) => CheckOutcome::Passed,
                Err(reason) => CheckOutcome::Failed(reason.clone()),
            },
            detail,
            elapsed: now - self.last,
        });
        self.last = now;
        result.ok()
    }

    /// Starts timing the next check.
    pub(super) fn start(&mut self) {
        self.last = Instant::now();
    }

    pub(super) fn finish(mut self) -> Report {
        for name in &CHECKS[self.checks.len()..] {
            self.checks.push(Check {
                name,
                outcome: CheckOutcome::Skipped,
                detail: "not checked".into(),
                elapsed: Duration::ZERO,
            });
        }
        Report::new(self.checks)
    }
}
