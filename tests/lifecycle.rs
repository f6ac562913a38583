//! `stop`: a daemon is signalled only once verified over a live connection to be this
//! directory's, running as our user; anything else is left alone, and `stop` says why.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use support::*;
use tower_local_daemon::{
    FallbackReason, LocalDaemonStatus, Pidfile, Route, StopOutcome, probe, stop,
};

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

/// The kernel's boot id, as a lock record holds it.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_stale_pidfile_whose_pid_another_process_reuses_is_not_running() {
    let dir = TestDir::new("stop-reused-recorded");
    let paths = dir.paths();
    std::fs::create_dir(&paths.sockets_dir).unwrap();
    std::fs::set_permissions(&paths.sockets_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    // As after a reboot: the daemon's lock record names its pid and its start, and a process
    // of ours that started at another time has the pid now.
    let mut sleeper = spawn(Command::new("sleep").arg("60"));
    let pid = sleeper.id();
    std::fs::write(&paths.pidfile, Pidfile::new(pid, 1).render()).unwrap();
    std::fs::write(&paths.lock, format!("{pid}\n1\n{}\n", boot_id())).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&paths.socket).unwrap();
    assert_eq!(stop(dir.path(), TIMEOUT).await, StopOutcome::NotRunning);
    assert_eq!(
        sleeper.try_wait().unwrap(),
        None,
        "the sleeper was signalled"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_while_the_first_drains_waits_for_the_same_exit() {
    let dir = TestDir::new("stop-twice");
    let daemon = DaemonProcess::start(dir.path());
    let pid = daemon.pid();
    // A call in flight keeps the daemon draining for a while after the first stop.
    let mut client = EchoClient::new(layered(test_layer(dir.path())));
    echo(&mut client, 0).await.unwrap();
    let slow = tokio::spawn(async move {
        let request = EchoRequest {
            message: String::new(),
            id: 1,
            delay_ms: 1_500,
            status_code: 0,
        };
        client.echo(request).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let first = tokio::spawn({
        let dir = dir.path().to_owned();
        async move { stop(&dir, TIMEOUT).await }
    });
    // The first stop is under way once the daemon refuses new connections.
    let socket = dir.paths().socket;
    wait_until_async("the daemon stops listening", || async {
        std::os::unix::net::UnixStream::connect(&socket)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .await;
    assert_eq!(
        stop(dir.path(), TIMEOUT).await,
        StopOutcome::Stopped { pid }
    );
    assert_eq!(first.await.unwrap(), StopOutcome::Stopped { pid });
    let reply = slow.await.unwrap().unwrap();
    assert_eq!(reply.get_ref().served_by, "daemon");
    assert_eq!(daemon.wait_exit().0, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_copied_while_its_daemon_runs_is_not_running_and_starts_its_own() {
    let a = TestDir::new("copy-a");
    let b = TestDir::new("copy-b");
    let daemon = DaemonProcess::start(a.path());
    let copied = Command::new("cp")
        .arg("-a")
        .arg(a.paths().sockets_dir)
        .arg(b.path())
        .status()
        .unwrap();
    assert!(copied.success());
    // B's files name A's live daemon, which holds no lock on B's: nothing runs for B.
    assert_eq!(stop(b.path(), TIMEOUT).await, StopOutcome::NotRunning);
    let svc = layered(
        test_layer(b.path())
            .auto_start(test_auto_start(b.path()))
            .force_auto_start(true),
    );
    // The refused connect there is a miss: the first call starts B's own daemon, waits for
    // it, and goes to it. A's daemon serves on.
    let mut client = EchoClient::new(svc.clone());
    let first = echo(&mut client, 1).await.unwrap();
    let Some(Route::Daemon { pid: b_daemon }) = first.extensions().get::<Route>().copied() else {
        panic!("{:?}", first.extensions().get::<Route>());
    };
    assert!(
        svc.stats()
            .unwrap()
            .fallbacks
            .iter()
            .any(|(reason, _)| *reason == FallbackReason::LockNotHeld { pid: daemon.pid() }),
        "{:?}",
        svc.stats()
    );
    assert_eq!(svc.stats().unwrap().start_waits, 1);
    assert_ne!(b_daemon, daemon.pid());
    assert_eq!(
        probe(a.path()).status,
        LocalDaemonStatus::Running { pid: daemon.pid() }
    );
    assert_eq!(
        stop(b.path(), TIMEOUT).await,
        StopOutcome::Stopped { pid: b_daemon }
    );
}
