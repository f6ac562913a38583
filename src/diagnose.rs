//! "Why is my daemon not used?": every check in order, with its outcome, its timing and what
//! to do about a failure. The library side of a tool's `status` verb.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::{IdentityPolicy, Mode, Settings};
use crate::connect::{ConnectionEnd, connect_checked, handshake};
use crate::paths::{DaemonPaths, FileIdentity};
use crate::probe::{Passed, probe_observed};
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
        Self { checks }
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
            true => write!(f, "a client with these options uses the daemon"),
            false => write!(f, "a client with these options runs in-process"),
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

/// [`Report`] for `heddle_dir` with the default options.
pub async fn diagnose(heddle_dir: impl AsRef<Path>) -> Report {
    run(heddle_dir.as_ref(), &Settings::default()).await
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
struct Checks {
    checks: Vec<Check>,
    last: Instant,
}

impl Checks {
    fn new() -> Self {
        Self {
            checks: Vec::new(),
            last: Instant::now(),
        }
    }

    /// Records the next check; `Some(())` when it passed.
    fn record(&mut self, detail: String, result: Result<(), &FallbackReason>) -> Option<()> {
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
    fn start(&mut self) {
        self.last = Instant::now();
    }

    fn finish(mut self) -> Report {
        for name in &CHECKS[self.checks.len()..] {
            self.checks.push(Check {
                name,
                outcome: CheckOutcome::Skipped,
                detail: "not checked".into(),
                elapsed: Duration::ZERO,
            });
        }
        Report {
            checks: self.checks,
        }
    }
}

pub(crate) async fn run(dir: &Path, settings: &Settings) -> Report {
    let mut checks = Checks::new();
    let mode = match settings.mode {
        Mode::Off => Err(FallbackReason::Disabled),
        _ => Ok(()),
    };
    if checks
        .record(format!("mode {}", settings.mode), mode.as_ref().map(|_| ()))
        .is_none()
    {
        return checks.finish();
    }

    let paths = settings.paths(dir);
    checks.start();
    let mut pid = None;
    let probed = probe_observed(&paths, settings, |result| {
        if let Ok(Passed::Pidfile(pidfile)) = &result {
            pid = Some(pidfile.pid);
        }
        let detail = probe_detail(&paths, settings, pid, &result);
        checks.record(detail, result.map(|_| ()));
    });
    let Ok(target) = probed.into_target() else {
        return checks.finish();
    };

    // Connect and handshake share one deadline, as in the client.
    let deadline = tokio::time::Instant::now().checked_add(settings.deadline);
    checks.start();
    let connected = within(deadline, connect_checked(&target)).await;
    let detail = match &connected {
        Ok(_) => format!("connected; the peer is pid {} with our uid", target.pid),
        Err(reason) => reason.to_string(),
    };
    checks.record(detail, connected.as_ref().map(|_| ()));
    let Ok(stream) = connected else {
        return checks.finish();
    };
    checks.start();
    let shaken = within(deadline, async {
        let (_, version, task) = handshake(stream, dir, settings, ConnectionEnd::ignored()).await?;
        // The report keeps nothing: the connection closes.
        task.abort();
        Ok(version)
    })
    .await;
    let served = match FileIdentity::following(dir) {
        Ok(id) if !settings.accept_unverified_directory => format!("serves this directory ({id})"),
        _ => "serves this directory, or does not say (accepted by option)".to_owned(),
    };
    let detail = match &shaken {
        Ok(Some(version)) => format!("Health/Check SERVING; {served}; version {version}"),
        Ok(None) => format!("Health/Check SERVING; {served}; no version reported"),
        Err(reason) => reason.to_string(),
    };
    checks.record(detail, shaken.as_ref().map(|_| ()));
    checks.finish()
}

/// `future`, failing with [`FallbackReason::DeadlineExceeded`] at `deadline` (none: never).
async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    future: impl Future<Output = Result<T, FallbackReason>>,
) -> Result<T, FallbackReason> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future)
            .await
            .unwrap_or(Err(FallbackReason::DeadlineExceeded)),
        None => future.await,
    }
}

/// What a probe stage found, for a person; `pid` is the pidfile's, once read.
fn probe_detail(
    paths: &DaemonPaths,
    settings: &Settings,
    pid: Option<u32>,
    result: &Result<Passed<'_>, &FallbackReason>,
) -> String {
    match result {
        Ok(Passed::Directory) => format!(
            "{} is a private directory of ours",
            paths.sockets_dir.display()
        ),
        Ok(Passed::Pidfile(p)) => format!(
            "{} names pid {}, started at {}",
            paths.pidfile.display(),
            p.pid,
            p.started_at
        ),
        Ok(Passed::Process(pid)) => {
            format!("pid {pid} runs the expected executable as our uid")
        }
        Ok(Passed::Socket) => format!("{} is a socket of ours", paths.socket.display()),
        Err(FallbackReason::ExecutableMismatch) => {
            let pid = pid.unwrap_or_default();
            format!(
                "pidfile names pid {pid}, which runs `{}`, not {}",
                process_name(pid),
                match &settings.identity {
                    IdentityPolicy::SameExecutable => "this executable".to_owned(),
                    IdentityPolicy::Executable(path) => format!("{}", path.display()),
                }
            )
        }
        Err(reason) => reason.to_string(),
    }
}

/// The process's command name, for a person to read.
fn process_name(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/comm"))
        .map(|name| String::from_utf8_lossy(name.trim_ascii_end()).into_owned())
        .unwrap_or_else(|_| "an unknown program".to_owned())
}
