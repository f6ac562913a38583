//! `stop`: a daemon is signalled only once verified over a live connection to be this
//! directory's, running as our user; anything else is left alone, and `stop` says why.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use support::*;
use tower_local_daemon::{FallbackReason, LocalDaemonStatus, Pidfile, StopOutcome, probe, stop};

/// Not a test: the entry point of this binary when it is re-executed.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

const TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_running_daemon_is_verified_stopped_and_waited_for() {
    let dir = TestDir::new("stop-running");
    let mut daemon = DaemonProcess::start(dir.path());
    let pid = daemon.pid();
    assert_eq!(
        stop(dir.path(), TIMEOUT).await,
        StopOutcome::Stopped { pid }
    );
    // Waited for: the daemon has exited (a zombie until reaped here) by the time stop returns.
    assert!(
        daemon.child.try_wait().unwrap().is_some(),
        "stop returned first"
    );
    let (code, stderr) = daemon.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        std::fs::read_dir(dir.paths().sockets_dir)
            .unwrap()
            .next()
            .is_none()
    );
    // Nothing runs now, and stop says so; it never starts anything.
    assert_eq!(stop(dir.path(), TIMEOUT).await, StopOutcome::NotRunning);
    assert!(!dir.paths().pidfile.exists());
}

#[tokio::test]
async fn nothing_to_stop_without_a_daemon_or_with_a_stale_pidfile() {
    let dir = TestDir::new("stop-none");
    assert_eq!(stop(dir.path(), TIMEOUT).await, StopOutcome::NotRunning);
    let mut exited = Command::new("true").spawn().unwrap();
    let pid = exited.id();
    exited.wait().unwrap();
    let paths = dir.paths();
    std::fs::create_dir(&paths.sockets_dir).unwrap();
    std::fs::write(&paths.pidfile, Pidfile::new(pid, 1).render()).unwrap();
    assert_eq!(stop(dir.path(), TIMEOUT).await, StopOutcome::NotRunning);
}

#[tokio::test]
async fn a_process_that_reuses_the_pidfiles_pid_is_never_signalled() {
    let dir = TestDir::new("stop-reused");
    let paths = dir.paths();
    std::fs::create_dir(&paths.sockets_dir).unwrap();
    std::fs::set_permissions(&paths.sockets_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A process of ours has the pid now; the socket is someone else's (here: this test's).
    let mut sleeper = spawn(Command::new("sleep").arg("60"));
    std::fs::write(&paths.pidfile, Pidfile::new(sleeper.id(), 1).render()).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&paths.socket).unwrap();
    let outcome = stop(dir.path(), TIMEOUT).await;
    assert!(
        matches!(
            outcome,
            StopOutcome::Refused {
                reason: FallbackReason::PeerPidMismatch { .. }
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(
        sleeper.try_wait().unwrap(),
        None,
        "the sleeper was signalled"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[tokio::test]
async fn the_daemon_of_another_directory_is_refused_and_keeps_running() {
    let a = TestDir::new("stop-a");
    let b = TestDir::new("stop-b");
    let daemon = DaemonProcess::start(a.path());
    std::fs::rename(a.paths().sockets_dir, b.paths().sockets_dir).unwrap();
    let outcome = stop(b.path(), TIMEOUT).await;
    assert!(
        matches!(
            outcome,
            StopOutcome::Refused {
                reason: FallbackReason::DirectoryMismatch { .. }
            }
        ),
        "{outcome:?}"
    );
    std::fs::rename(b.paths().sockets_dir, a.paths().sockets_dir).unwrap();
    assert_eq!(
        probe(a.path()).status,
        LocalDaemonStatus::Running { pid: daemon.pid() }
    );
}

#[tokio::test]
async fn a_daemon_whose_executable_was_replaced_is_still_stopped() {
    let dir = TestDir::new("stop-upgraded");
    let program = dir.path().join("tool");
    copy_of_this_binary(&program);
    let options = DaemonOptions {
        program: Some(program.clone()),
        ..DaemonOptions::default()
    };
    let daemon = DaemonProcess::start_with(dir.path(), options);
    let pid = daemon.pid();
    // An upgrade: a new file renamed over the one the daemon runs.
    let upgrade = dir.path().join("tool.new");
    copy_of_this_binary(&upgrade);
    std::fs::rename(&upgrade, &program).unwrap();
    assert_eq!(
        stop(dir.path(), TIMEOUT).await,
        StopOutcome::Stopped { pid }
    );
    assert_eq!(daemon.wait_exit().0, Some(0));
}
