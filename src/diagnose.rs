//! "Why is my daemon not used?": every check in order, with its outcome, its timing and what
//! to do about a failure. The library side of a tool's `status` verb.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::{IdentityPolicy, Mode, Settings};
use crate::connect::{ConnectionEnd, connect_checked, handshake};
use crate::probe::{UdsTarget, check_process, check_socket, read_pidfile};
use crate::{DaemonPaths, FallbackReason};

/// How one check went.
#[derive(Debug, Clone, PartialEq, Eq)]
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
pub struct Check {
    /// The check's name: `mode`, `pidfile`, `process`, `socket`, `connect` or `handshake`.
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
/// assert_eq!(report.checks[1].outcome, CheckOutcome::Failed(FallbackReason::NoPidfile));
/// println!("{report}");
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The checks, in the order the client runs them.
    pub checks: Vec<Check>,
}

impl Report {
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

struct Checks {
    checks: Vec<Check>,
    failed: bool,
}

impl Checks {
    /// Runs `check` unless an earlier one failed; it returns the detail and the result.
    async fn run<T>(
        &mut self,
        name: &'static str,
        check: impl AsyncFnOnce() -> (String, Result<T, FallbackReason>),
    ) -> Option<T> {
        if self.failed {
            self.checks.push(Check {
                name,
                outcome: CheckOutcome::Skipped,
                detail: "not checked".into(),
                elapsed: Duration::ZERO,
            });
            return None;
        }
        let start = Instant::now();
        let (detail, result) = check().await;
        let elapsed = start.elapsed();
        let (outcome, value) = match result {
            Ok(value) => (CheckOutcome::Passed, Some(value)),
            Err(reason) => {
                self.failed = true;
                (CheckOutcome::Failed(reason), None)
            }
        };
        self.checks.push(Check {
            name,
            outcome,
            detail,
            elapsed,
        });
        value
    }
}

pub(crate) async fn run(dir: &Path, settings: &Settings) -> Report {
    let paths = DaemonPaths::new(dir);
    let socket = settings.socket_path.clone().unwrap_or(paths.socket);
    let pid_path = settings.pidfile_path.clone().unwrap_or(paths.pidfile);
    let mut checks = Checks {
        checks: Vec::new(),
        failed: false,
    };

    checks
        .run("mode", async || match settings.mode {
            Mode::Off => ("mode off".into(), Err(FallbackReason::Disabled)),
            mode => (format!("mode {mode}"), Ok(())),
        })
        .await;
    let pidfile = checks
        .run("pidfile", async || match read_pidfile(&pid_path) {
            Ok(p) => (
                format!(
                    "{} names pid {}, started at {}",
                    pid_path.display(),
                    p.pid,
                    p.started_at
                ),
                Ok(p),
            ),
            Err(reason) => (format!("{}: {reason}", pid_path.display()), Err(reason)),
        })
        .await;
    checks
        .run("process", async || {
            let pidfile = pidfile.expect("runs only after the pidfile check passed");
            let result = check_process(&pidfile, &settings.identity);
            let detail = match &result {
                Ok(()) => format!(
                    "pid {} runs the expected executable as our uid",
                    pidfile.pid
                ),
                Err(FallbackReason::ExecutableMismatch) => format!(
                    "pidfile names pid {}, which runs `{}`, not {}",
                    pidfile.pid,
                    process_name(pidfile.pid),
                    match &settings.identity {
                        IdentityPolicy::SameExecutable => "this executable".to_owned(),
                        IdentityPolicy::Executable(path) => format!("{}", path.display()),
                    }
                ),
                Err(reason) => format!("pid {}: {reason}", pidfile.pid),
            };
            (detail, result)
        })
        .await;
    checks
        .run("socket", async || {
            let result = check_socket(&socket);
            let detail = match &result {
                Ok(()) => format!("{} is a socket of ours", socket.display()),
                Err(reason) => format!("{}: {reason}", socket.display()),
            };
            (detail, result)
        })
        .await;

    // Connect and handshake share one deadline, as in the client.
    let deadline = tokio::time::Instant::now() + settings.deadline;
    let stream = checks
        .run("connect", async || {
            let target = UdsTarget {
                socket_path: socket.clone(),
                pid: pidfile
                    .expect("runs only after the pidfile check passed")
                    .pid,
            };
            let result = tokio::time::timeout_at(deadline, connect_checked(&target))
                .await
                .unwrap_or(Err(FallbackReason::DeadlineExceeded));
            let detail = match &result {
                Ok(_) => format!("connected; the peer is pid {} with our uid", target.pid),
                Err(reason) => reason.to_string(),
            };
            (detail, result)
        })
        .await;
    checks
        .run("handshake", async || {
            let stream = stream.expect("runs only after the connect check passed");
            let result = tokio::time::timeout_at(
                deadline,
                handshake(stream, settings, ConnectionEnd::ignored()),
            )
            .await
            .unwrap_or(Err(FallbackReason::DeadlineExceeded));
            let detail = match &result {
                Ok((_, Some(version))) => {
                    format!("Health/Check SERVING; the daemon is version {version}")
                }
                Ok((_, None)) => "Health/Check SERVING; the daemon reports no version".to_owned(),
                Err(reason) => reason.to_string(),
            };
            (detail, result)
        })
        .await;
    Report {
        checks: checks.checks,
    }
}

/// The process's command name, for a person to read.
fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|name| name.trim_end().to_owned())
        .unwrap_or_else(|_| "an unknown program".to_owned())
}
