//! "Why is my daemon not used?": every check in order, with its outcome, its timing and what
//! to do about a failure. The library side of a tool's `status` verb.

mod report;

use std::path::Path;

use crate::config::{IdentityPolicy, Mode, Settings};
use crate::connect::{Proof, connect_checked, handshake, trusted_attestation, within};
use crate::http2::ConnectionEnd;
use crate::lifecycle::auto_start_status_of;
use crate::paths::{DaemonPaths, FileIdentity};
use crate::probe::{Passed, probe_observed};
use crate::reason::FallbackReason;

use self::report::Checks;
pub use self::report::{Check, CheckOutcome, Report};

/// [`Report`] for `state_dir` with the default options.
pub async fn diagnose(state_dir: impl AsRef<Path>) -> Report {
    run(
        &crate::paths::absolute(state_dir.as_ref()),
        &Settings::default(),
    )
    .await
}

/// The checks, then what auto-start did here, when it ever started a daemon.
pub(crate) async fn run(dir: &Path, settings: &Settings) -> Report {
    let mut report = run_checks(dir, settings).await;
    let started = auto_start_status_of(&settings.paths(dir));
    report.auto_start = Some(started).filter(|s| s.spawns > 0);
    report
}

async fn run_checks(dir: &Path, settings: &Settings) -> Report {
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
    let attestation = trusted_attestation(&paths, target.pid, settings);
    let shaken = within(deadline, async {
        let end = ConnectionEnd::ignored();
        let shaken = handshake(stream, target.pid, attestation.as_ref(), dir, settings, end);
        let shaken = shaken.await?;
        // The report keeps nothing: the connection closes.
        shaken.task.abort();
        Ok((shaken.proof, shaken.version))
    })
    .await;
    let served = match FileIdentity::following(dir) {
        Ok(id) if !settings.accept_unverified_directory => format!("serves this directory ({id})"),
        _ => "serves this directory, or does not say (accepted by option)".to_owned(),
    };
    let detail = match &shaken {
        Ok((proof, version)) => {
            let proof = match proof {
                Proof::Attestation => "attested by its process, HTTP/2 SETTINGS received",
                Proof::HealthCheck => "Health/Check SERVING",
            };
            let version = match version {
                Some(version) => format!("version {version}"),
                None => "no version reported".to_owned(),
            };
            format!("{proof}; {served}; {version}")
        }
        Err(reason) => reason.to_string(),
    };
    checks.record(detail, shaken.as_ref().map(|_| ()));
    checks.finish()
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
