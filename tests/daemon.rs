//! The daemon side, with real processes: lock, files, modes, shutdown, peers, health, paths.

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower_local_daemon::daemon::DaemonError;
use tower_local_daemon::{
    Daemon, DaemonPaths, FallbackReason, LocalDaemonStatus, Route, connect_local_daemon_channel,
    probe,
};

/// Not a test: the entry point of this binary when it is re-executed as a daemon or client.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

fn mode_of(path: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn two_daemons_started_together_exactly_one_serves_and_the_loser_names_the_holder() {
    let dir = TestDir::new("lock-race");
    let a = DaemonProcess::spawn(dir.path(), &DaemonOptions::default());
    let b = DaemonProcess::spawn(dir.path(), &DaemonOptions::default());
    let (a_pid, b_pid) = (a.pid(), b.pid());
    wait_until("one daemon serves", || {
        matches!(probe(dir.path()).status, LocalDaemonStatus::Running { .. })
    });
    let LocalDaemonStatus::Running { pid: winner } = probe(dir.path()).status else {
        unreachable!()
    };
    let (winner_process, loser) = if winner == a_pid { (a, b) } else { (b, a) };
    assert!(winner == a_pid || winner == b_pid);
    let (code, stderr) = loser.wait_exit();
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {winner} holds the lock")),
        "the loser's error names the holder: {stderr}"
    );
    // The winner is still the one serving.
    assert_eq!(
        probe(dir.path()).status,
        LocalDaemonStatus::Running { pid: winner }
    );
    drop(winner_process);
}

#[test]
fn sigterm_stops_the_daemon_and_leaves_no_files() {
    let dir = TestDir::new("sigterm");
    let daemon = DaemonProcess::start(dir.path());
    assert_eq!(
        listing(&dir.paths().sockets_dir),
        ["grpc.attest", "grpc.lock", "grpc.pid", "grpc.sock"]
    );
    daemon.signal(Signal::SIGTERM);
    let (code, stderr) = daemon.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        listing(&dir.paths().sockets_dir).is_empty(),
        "{:?}",
        listing(&dir.paths().sockets_dir)
    );
}

#[test]
fn a_stopping_daemon_leaves_alone_the_files_of_a_daemon_that_replaced_its_directory() {
    let dir = TestDir::new("replaced-dir");
    let first = DaemonProcess::start(dir.path());
    // `rm -rf sockets`, and a second daemon makes a new one: the first still holds its own,
    // deleted directory. A new file may even get the inode number of the first's pidfile.
    std::fs::remove_dir_all(dir.paths().sockets_dir).unwrap();
    let second = DaemonProcess::start(dir.path());
    first.signal(Signal::SIGTERM);
    let (code, stderr) = first.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        listing(&dir.paths().sockets_dir),
        ["grpc.attest", "grpc.lock", "grpc.pid", "grpc.sock"]
    );
    assert_eq!(
        probe(dir.path()).status,
        LocalDaemonStatus::Running { pid: second.pid() }
    );
}

/// Whether `signal` is in the hex mask of `field` (`SigIgn`, `SigCgt`) of a process's status.
fn signal_in_mask(pid: u32, field: &str, signal: Signal) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|mask| u64::from_str_radix(mask.trim(), 16).unwrap())
        .unwrap();
    mask & (1 << (signal as u32 - 1)) != 0
}

#[test]
fn sigint_inherited_as_ignored_stays_ignored_and_sigterm_still_stops() {
    let dir = TestDir::new("sigint-ignored");
    let options = DaemonOptions {
        sigint_ignored: true,
        ..DaemonOptions::default()
    };
    let background = DaemonProcess::start_with(dir.path(), options);
    assert!(signal_in_mask(background.pid(), "SigIgn", Signal::SIGINT));
    assert!(!signal_in_mask(background.pid(), "SigCgt", Signal::SIGINT));
    background.signal(Signal::SIGTERM);
    assert_eq!(background.wait_exit().0, Some(0));

    // In the foreground the daemon handles SIGINT.
    let foreground = DaemonProcess::start(dir.path());
    assert!(signal_in_mask(foreground.pid(), "SigCgt", Signal::SIGINT));
    foreground.signal(Signal::SIGINT);
    assert_eq!(foreground.wait_exit().0, Some(0));
}

#[test]
fn crash_leftovers_read_as_stale_and_the_next_daemon_starts_and_serves() {
    let dir = TestDir::new("crash");
    let crashed = DaemonProcess::start(dir.path());
    let crashed_pid = crashed.pid();
    crashed.kill_now();
    assert_eq!(
        probe(dir.path()).status,
        LocalDaemonStatus::Stale {
            pid: crashed_pid,
            reason: FallbackReason::ProcessGone
        }
    );
    let next = DaemonProcess::start(dir.path());
    assert_eq!(
        probe(dir.path()).status,
        LocalDaemonStatus::Running { pid: next.pid() }
    );
}

#[test]
fn socket_and_directory_modes_hold_under_a_zero_umask() {
    let dir = TestDir::new("umask");
    let options = DaemonOptions {
        umask: Some(0),
        ..Default::default()
    };
    let _daemon = DaemonProcess::start_with(dir.path(), options);
    assert_eq!(mode_of(&dir.paths().sockets_dir), 0o700);
    assert_eq!(mode_of(&dir.paths().socket), 0o600);
    assert_eq!(mode_of(&dir.paths().pidfile), 0o600);
    assert_eq!(mode_of(&dir.paths().lock), 0o600);
}

#[tokio::test]
async fn connection_from_another_uid_is_dropped_and_counted() {
    let Some(nobody) = NobodyBinary::new("connection_from_another_uid_is_dropped_and_counted")
    else {
        return;
    };
    let dir = TestDir::new("foreign-peer");
    let daemon = InProcessDaemon::start(dir.path(), Duration::from_secs(5)).await;
    // Loosen the modes as an attacker past the permissions would find them.
    for (path, mode) in [
        (dir.path().to_owned(), 0o755),
        (dir.paths().sockets_dir, 0o755),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let socket = dir.paths().socket;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();

    let mut client = spawn(&mut nobody.command(Role::Connect(socket.clone())));
    let status = tokio::task::spawn_blocking(move || client.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "nobody connected, and the daemon hung up"
    );
    assert_eq!(daemon.counters.refused_peers(), 1);
    assert_eq!(daemon.counters.calls(), 0);

    daemon.stop.send(()).unwrap();
    daemon.serving.await.unwrap().unwrap();
}

#[tokio::test]
async fn watch_stream_opened_before_sigterm_sees_not_serving() {
    let dir = TestDir::new("watch");
    let daemon = DaemonProcess::start(dir.path());
    let channel = connect_local_daemon_channel(dir.path(), Duration::from_secs(5))
        .await
        .expect("the daemon passes every check");
    let mut health = HealthClient::new(channel.channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    daemon.signal(Signal::SIGTERM);
    let next = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("the watch stream hung");
    assert_eq!(
        next.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    assert_eq!(daemon.wait_exit().0, Some(0));
}

#[tokio::test]
async fn health_check_carries_the_version_metadata() {
    let dir = TestDir::new("version-metadata");
    let options = DaemonOptions {
        version: Some("3.1.4".into()),
        ..Default::default()
    };
    let _daemon = DaemonProcess::start_with(dir.path(), options);
    let channel = connect_local_daemon_channel(dir.path(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(channel.version.as_deref(), Some("3.1.4"));
    let response = HealthClient::new(channel.channel)
        .check(HealthCheckRequest {
            service: "echo.v1.Echo".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        response
            .metadata()
            .get(tower_local_daemon::VERSION_METADATA_KEY)
            .unwrap(),
        "3.1.4"
    );
    assert_eq!(response.get_ref().status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn socket_path_longer_than_sun_path_works_on_both_sides() {
    let root = TestDir::new("long");
    let deep = root
        .path()
        .join("a-directory-name-that-is-long-enough".repeat(3))
        .join(".heddle");
    let socket = DaemonPaths::new(&deep).socket;
    assert!(socket.as_os_str().len() > 107, "{}", socket.display());

    let daemon = DaemonProcess::start(&deep);
    assert!(
        std::fs::symlink_metadata(&socket)
            .unwrap()
            .file_type()
            .is_socket()
    );
    let svc = layered(test_layer(&deep));
    let response = echo(&mut EchoClient::new(svc), 1).await.unwrap();
    assert_eq!(
        response.extensions().get::<Route>(),
        Some(&Route::Daemon { pid: daemon.pid() })
    );
}

#[test]
fn idle_daemon_exits_cleanly_by_itself() {
    let dir = TestDir::new("idle");
    let options = DaemonOptions {
        idle: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    let daemon = DaemonProcess::start_with(dir.path(), options);
    let (code, stderr) = daemon.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(listing(&dir.paths().sockets_dir).is_empty());
}

#[test]
fn a_live_socket_of_a_daemon_without_a_lock_is_never_unlinked() {
    let dir = TestDir::new("no-lock-daemon");
    std::fs::create_dir_all(dir.paths().sockets_dir).unwrap();
    let socket = dir.paths().socket;
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();

    let daemon = DaemonProcess::spawn(dir.path(), &DaemonOptions::default());
    let (code, stderr) = daemon.wait_exit();
    assert_eq!(code, Some(3));
    assert!(stderr.contains("still answers"), "{stderr}");
    assert!(socket.exists(), "the live socket is still there");
}

#[tokio::test]
async fn sockets_directory_owned_by_another_user_is_refused() {
    if !root_or_skip("sockets_directory_owned_by_another_user_is_refused") {
        return;
    }
    let dir = TestDir::new("foreign-dir");
    std::fs::create_dir_all(dir.paths().sockets_dir).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&dir.paths().sockets_dir, Some(nobody.uid), Some(nobody.gid)).unwrap();
    let error = Daemon::new(dir.path()).bind().unwrap_err();
    assert!(
        matches!(error, DaemonError::UnsafeDirectory { .. }),
        "{error}"
    );
}

/// A daemon served by this test process, stopped by a shutdown future.
struct InProcessDaemon {
    counters: std::sync::Arc<tower_local_daemon::daemon::DaemonCounters>,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<Result<(), DaemonError>>,
}

impl InProcessDaemon {
    async fn start(dir: &std::path::Path, grace: Duration) -> Self {
        let bound = Daemon::new(dir)
            .handle_signals(false)
            .grace_period(grace)
            .add_service(EchoServer::new(EchoService::new("daemon")))
            .bind()
            .unwrap();
        let counters = bound.counters();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(bound.serve(async {
            let _ = stopped.await;
        }));
        let pidfile = DaemonPaths::new(dir).pidfile;
        wait_until_async("the pidfile appears", || async { pidfile.exists() }).await;
        Self {
            counters,
            stop,
            serving,
        }
    }
}

async fn slow_call_in_flight(
    dir: &std::path::Path,
    daemon: &InProcessDaemon,
    delay_ms: u32,
) -> tokio::task::JoinHandle<Result<tonic::Response<EchoReply>, tonic::Status>> {
    let mut client = EchoClient::new(layered(test_layer(dir)));
    let call = tokio::spawn(async move {
        client
            .echo(EchoRequest {
                message: "slow".into(),
                id: 1,
                delay_ms,
                status_code: 0,
            })
            .await
    });
    wait_until_async("the slow call is in flight", || async {
        daemon.counters.in_flight() == 1
    })
    .await;
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_call_finishes_within_the_grace_period() {
    let dir = TestDir::new("grace");
    let daemon = InProcessDaemon::start(dir.path(), Duration::from_secs(20)).await;
    let call = slow_call_in_flight(dir.path(), &daemon, 300).await;

    daemon.stop.send(()).unwrap();
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.get_ref().served_by, "daemon");
    daemon.serving.await.unwrap().unwrap();
    assert!(listing(&dir.paths().sockets_dir).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_finishes_while_the_calls_after_the_daemons_goaway_run_in_process() {
    let dir = TestDir::new("grace-later-calls");
    let daemon = InProcessDaemon::start(dir.path(), Duration::from_secs(20)).await;
    let call = slow_call_in_flight(dir.path(), &daemon, 3_000).await;

    daemon.stop.send(()).unwrap();
    // The same entry and connection as the slow call: once the daemon's GOAWAY arrives, a call
    // finds the connection closed to new requests, runs in-process, and the route lets go of
    // the connection, which must not take the slow call with it.
    let mut later = EchoClient::new(layered(test_layer(dir.path())));
    let mut in_process = false;
    for id in 0..2_000 {
        let reply = echo(&mut later, id).await.unwrap();
        if reply.get_ref().served_by == "in-process" {
            in_process = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(in_process, "no call after the GOAWAY ran in-process");
    // The case is the one named only while the slow call is still on the connection.
    assert_eq!(
        daemon.counters.in_flight(),
        1,
        "the slow call ended too soon"
    );
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.get_ref().served_by, "daemon");
    daemon.serving.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_longer_than_the_grace_period_is_aborted_and_the_daemon_still_stops() {
    let dir = TestDir::new("grace-over");
    let daemon = InProcessDaemon::start(dir.path(), Duration::from_millis(100)).await;
    let call = slow_call_in_flight(dir.path(), &daemon, 60_000).await;

    daemon.stop.send(()).unwrap();
    daemon.serving.await.unwrap().unwrap();
    assert!(listing(&dir.paths().sockets_dir).is_empty());
    let status = call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

#[test]
fn a_daemon_whose_socket_is_removed_under_it_exits() {
    let dir = TestDir::new("socket-removed");
    let daemon = DaemonProcess::start(dir.path());
    std::fs::remove_file(dir.paths().socket).unwrap();
    // It can be reached no more: it notices within about a second, and stops cleanly.
    let (code, stderr) = daemon.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!dir.paths().pidfile.exists());
}

/// A daemon that loads before it can build its services binds first: it holds the lock while
/// it loads, so a second daemon process fails at once, and then it serves what it loaded.
#[tokio::test]
async fn a_daemon_that_binds_before_it_builds_its_services_holds_the_lock_while_it_loads() {
    let dir = TestDir::new("daemon-bind-first");
    let bound = tower_local_daemon::Daemon::new(dir.path())
        .handle_signals(false)
        .bind()
        .unwrap();
    // "Loading": a second daemon, another process, meets the lock.
    let (code, output) = DaemonProcess::spawn(dir.path(), &DaemonOptions::default()).wait_exit();
    assert_ne!(code, Some(0), "{output}");
    assert!(output.contains("already running"), "{output}");
    // Loaded: the services come after the bind.
    let bound = bound.add_service(EchoServer::new(EchoService::new("daemon")));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(bound.serve(async {
        stopped.await.ok();
    }));
    let pidfile = dir.paths().pidfile;
    wait_until_async("the daemon serves", || {
        let exists = pidfile.exists();
        async move { exists }
    })
    .await;
    let response = echo(&mut EchoClient::new(layered(test_layer(dir.path()))), 1)
        .await
        .unwrap();
    assert_eq!(response.get_ref().served_by, "daemon");
    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
}

/// The settings a tool gives tonic's server (`Daemon::server`) reach the server: here a
/// per-request timeout of 200 ms, which a slow call meets and a quick one does not.
#[tokio::test]
async fn the_server_settings_a_tool_gives_are_applied() {
    let dir = TestDir::new("server-settings");
    let options = DaemonOptions {
        server_timeout: Some(Duration::from_millis(200)),
        ..DaemonOptions::default()
    };
    let _daemon = DaemonProcess::start_with(dir.path(), options);
    let mut client = EchoClient::new(layered(test_layer(dir.path())));
    let quick = echo(&mut client, 1).await.unwrap();
    assert_eq!(quick.get_ref().served_by, "daemon");
    let slow = client
        .echo(EchoRequest {
            message: "slow".into(),
            id: 2,
            delay_ms: 5_000,
            status_code: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(slow.code(), tonic::Code::Cancelled, "{slow:?}");
}
