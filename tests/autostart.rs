//! Auto-start: a daemon started on a miss, by one process under any race, detached from the
//! command, backing off while it fails; never where the directory is not ours. Real processes.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::*;
use tower_local_daemon::{
    AutoStart, DAEMON_LOG_FILE, FallbackReason, LocalDaemonStatus, Mode, Route, StopOutcome,
    auto_start_status, probe, reset, stop,
};

/// Not a test: the entry point of this binary when it is re-executed.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

/// A call process (this binary re-executed) that starts the daemon on a miss.
fn call_process(dir: &std::path::Path) -> std::process::Command {
    let mut command = reexec(
        &std::env::current_exe().unwrap(),
        Role::Call(dir.to_owned()),
    );
    command
        .env(CALL_AUTO_START_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    command
}

/// How many daemons were started: each writes one line to the log as it starts.
fn daemon_starts(dir: &TestDir) -> usize {
    let log = dir.paths().sockets_dir.join(DAEMON_LOG_FILE);
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("daemon starting"))
        .count()
}

#[tokio::test]
async fn sixteen_commands_at_once_start_exactly_one_daemon() {
    let dir = TestDir::new("auto-sixteen");
    let children: Vec<_> = (0..16)
        .map(|_| spawn(&mut call_process(dir.path())))
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "a call failed");
    }
    wait_until("the started daemon serves", || {
        matches!(probe(dir.path()).status, LocalDaemonStatus::Running { .. })
    });
    assert_eq!(auto_start_status(dir.path()).spawns, 1);
    // Later calls all use the one daemon.
    let svc = layered(test_layer(dir.path()));
    let response = echo(&mut EchoClient::new(svc), 1).await.unwrap();
    assert!(matches!(
        response.extensions().get::<Route>(),
        Some(Route::Daemon { .. })
    ));
    assert!(matches!(
        stop(dir.path(), Duration::from_secs(10)).await,
        StopOutcome::Stopped { .. }
    ));
    // Counted last: a daemon that lost the race writes its start line a little later.
    assert_eq!(daemon_starts(&dir), 1, "spawns, not survivors");
}

#[tokio::test]
async fn a_command_whose_output_is_captured_ends_while_its_daemon_lives_on() {
    let dir = TestDir::new("auto-capture");
    // As `$(cmd 2>&1)` does: the capture ends when every writer of the pipes is gone.
    let child = spawn(call_process(dir.path()).stderr(Stdio::piped()));
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()).unwrap());
    let output = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("the capture never ended: the daemon holds the command's stdout or stderr")
        .unwrap();
    assert!(output.status.success());
    wait_until("the started daemon serves", || {
        matches!(probe(dir.path()).status, LocalDaemonStatus::Running { .. })
    });
    assert!(matches!(
        stop(dir.path(), Duration::from_secs(10)).await,
        StopOutcome::Stopped { .. }
    ));
}

/// A daemon command that fails at once, saying so on stderr.
fn broken() -> AutoStart {
    AutoStart::new("/bin/sh").args(["-c", "echo the daemon is broken >&2; exit 1"])
}

#[tokio::test]
async fn a_daemon_that_fails_at_once_is_started_a_handful_of_times_not_per_command() {
    let dir = TestDir::new("auto-crash-loop");
    let layer = test_layer(dir.path())
        .auto_start(broken())
        .force_auto_start(true);
    for id in 0..50 {
        // Fifty commands over five seconds, each a fresh first call.
        reset(dir.path());
        let response = echo(&mut EchoClient::new(layered(layer.clone())), id)
            .await
            .unwrap();
        assert_eq!(response.get_ref().served_by, "in-process");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = auto_start_status(dir.path());
    assert!((1..=5).contains(&status.spawns), "{status:?}");
    assert!(status.failures >= 1, "{status:?}");
    assert!(
        status
            .log_tail
            .iter()
            .any(|l| l.contains("the daemon is broken")),
        "{status:?}"
    );
}

#[tokio::test]
async fn in_require_mode_a_daemon_that_exits_fails_the_call_naming_its_log() {
    let dir = TestDir::new("auto-require");
    let svc = layered(
        test_layer(dir.path())
            .mode(Mode::Require)
            .auto_start(broken())
            .force_auto_start(true),
    );
    let status = echo(&mut EchoClient::new(svc.clone()), 1)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("exited"), "{}", status.message());
    assert!(
        status.message().contains(DAEMON_LOG_FILE),
        "{}",
        status.message()
    );
    assert!(matches!(
        svc.stats().unwrap().route,
        Some(Err(FallbackReason::AutoStartFailed { .. }))
    ));
}

#[tokio::test]
async fn nothing_is_started_in_mode_off_when_switched_off_or_where_the_directory_is_not_ours() {
    let dir = TestDir::new("auto-off");
    let auto = || test_auto_start(dir.path());
    let layers = [
        test_layer(dir.path())
            .mode(Mode::Off)
            .auto_start(auto())
            .force_auto_start(true),
        test_layer(dir.path())
            .auto_start(auto())
            .auto_start_env_value(Some("0"))
            .force_auto_start(true),
    ];
    for layer in layers {
        echo(&mut EchoClient::new(layered(layer)), 1).await.unwrap();
    }
    assert_eq!(auto_start_status(dir.path()).spawns, 0);

    // A sockets directory that is a symlink to another repository's.
    let other = TestDir::new("auto-other");
    std::fs::create_dir(other.paths().sockets_dir).unwrap();
    std::os::unix::fs::symlink(other.paths().sockets_dir, dir.paths().sockets_dir).unwrap();
    let layer = test_layer(dir.path())
        .auto_start(auto())
        .force_auto_start(true);
    echo(&mut EchoClient::new(layered(layer)), 2).await.unwrap();
    assert_eq!(auto_start_status(other.path()).spawns, 0);
}

#[tokio::test]
async fn an_upgraded_daemon_is_stopped_and_a_new_one_started_by_a_client_of_the_new_build() {
    let dir = TestDir::new("auto-upgrade");
    let new_pid = upgrade(&dir, None).await;
    assert_eq!(
        stop(dir.path(), Duration::from_secs(10)).await,
        StopOutcome::Stopped { pid: new_pid }
    );
}

#[tokio::test]
async fn a_tool_with_its_own_pidfile_marker_restarts_its_upgraded_daemon_too() {
    let dir = TestDir::new("auto-upgrade-marker");
    let new_pid = upgrade(&dir, Some("other-tool")).await;
    // `stop` reads heddle's marker: the new daemon's pidfile is not one it stops.
    assert_eq!(
        stop(dir.path(), Duration::from_secs(1)).await,
        StopOutcome::Refused {
            reason: FallbackReason::MarkerMismatch {
                expected: "heddle-agent".into(),
                found: "other-tool".into(),
            }
        }
    );
    // The layer's `stop` reads the tool's own marker.
    let layer = test_layer(dir.path())
        .pidfile_marker("other-tool")
        .identity(tower_local_daemon::IdentityPolicy::Executable(
            dir.path().join("tool"),
        ));
    assert_eq!(
        layer.stop(Duration::from_secs(10)).await,
        StopOutcome::Stopped { pid: new_pid }
    );
}

/// A daemon of a copy of this binary (`tool`, with the pidfile `marker` when given) is
/// upgraded: the same bytes under a new inode are renamed over its executable. A command of the
/// new build then calls with auto-start: it finds the daemon's executable replaced, stops it,
/// starts a new one, and runs in-process meanwhile. Returns the new daemon's pid, once it serves.
async fn upgrade(dir: &TestDir, marker: Option<&str>) -> u32 {
    let tool = dir.path().join("tool");
    copy_of_this_binary(&tool);
    let old = DaemonProcess::start_with(
        dir.path(),
        DaemonOptions {
            program: Some(tool.clone()),
            marker: marker.map(str::to_owned),
            ..DaemonOptions::default()
        },
    );
    let new_build = dir.path().join("tool.new");
    copy_of_this_binary(&new_build);
    std::fs::rename(&new_build, &tool).unwrap();

    let mut command = reexec(&tool, Role::Call(dir.path().to_owned()));
    command
        .env(CALL_AUTO_START_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if let Some(marker) = marker {
        command.env(DAEMON_MARKER_ENV, marker);
    }
    let output = spawn(&mut command).wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    // The command of the new build waited for the daemon it started in the old one's place, and
    // its call went there: never to the old daemon, never in-process.
    let old_pid = old.pid();
    let served = stdout
        .split("Some(Daemon { pid: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|pid| pid.parse::<u32>().ok());
    assert!(
        served.is_some_and(|pid| pid != old_pid),
        "the call went elsewhere: {stdout}"
    );

    let (code, stderr) = old.wait_exit();
    assert_eq!(code, Some(0), "the old daemon exits cleanly: {stderr}");
    // The new daemon, of the new build, serves; the old one's files are gone with it.
    let mut layer =
        test_layer(dir.path()).identity(tower_local_daemon::IdentityPolicy::Executable(tool));
    if let Some(marker) = marker {
        layer = layer.pidfile_marker(marker);
    }
    let svc = layered(layer);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let new_pid = loop {
        assert!(std::time::Instant::now() < deadline, "no new daemon served");
        let response = echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
        if let Some(Route::Daemon { pid }) = response.extensions().get::<Route>() {
            break *pid;
        }
        svc.reset();
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(new_pid, old_pid);
    assert_eq!(served, Some(new_pid));
    new_pid
}

#[tokio::test]
async fn a_started_daemon_holds_no_descriptor_the_command_inherited() {
    use std::os::fd::AsRawFd;
    let dir = TestDir::new("auto-fds");
    // A pipe without close-on-exec, as a make jobserver's: every child of this test inherits it.
    let (read, _write) = nix::unistd::pipe().unwrap();
    let inode = std::fs::read_link(format!("/proc/self/fd/{}", read.as_raw_fd())).unwrap();
    let output = spawn(&mut call_process(dir.path()))
        .wait_with_output()
        .unwrap();
    assert!(output.status.success());
    wait_until("the started daemon serves", || {
        matches!(probe(dir.path()).status, LocalDaemonStatus::Running { .. })
    });
    let LocalDaemonStatus::Running { pid } = probe(dir.path()).status else {
        unreachable!("checked just above")
    };
    let held: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .collect();
    assert!(
        !held.contains(&inode),
        "the daemon holds {inode:?}: {held:?}"
    );
    assert!(matches!(
        stop(dir.path(), Duration::from_secs(10)).await,
        StopOutcome::Stopped { .. }
    ));
}

#[tokio::test]
async fn nothing_is_started_for_a_directory_of_another_user() {
    if !root_or_skip("nothing_is_started_for_a_directory_of_another_user") {
        return;
    }
    let dir = TestDir::new("auto-foreign");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(dir.path(), Some(nobody.uid), None).unwrap();
    let layer = test_layer(dir.path())
        .auto_start(test_auto_start(dir.path()))
        .force_auto_start(true);
    let response = echo(&mut EchoClient::new(layered(layer)), 1).await.unwrap();
    assert_eq!(response.get_ref().served_by, "in-process");
    // Not even the sockets directory is made: under `sudo`, it would lock the user out.
    assert!(!dir.paths().sockets_dir.exists());
}

/// A state directory reached through a symlink that another user planted in a shared
/// directory is never started in; one's own link in such a directory is refused too (anyone
/// could have replaced it); one's own link in a private directory is followed.
#[tokio::test]
async fn a_symlink_another_user_planted_on_the_path_starts_nothing() {
    if !root_or_skip("a_symlink_another_user_planted_on_the_path_starts_nothing") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("auto-planted-link");
    let shared = dir.path().join("shared");
    let private = dir.path().join("private");
    std::fs::create_dir_all(private.join("repo")).unwrap();
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let link = shared.join(".heddle");
    std::os::unix::fs::symlink(private.join("repo"), &link).unwrap();
    let first_reason = |owner: Option<nix::unistd::Uid>| {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &link,
            owner,
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        // A new decision: the registry entry of the same settings keeps the last one a while.
        reset(&link);
        let svc = layered(
            test_layer(&link)
                .auto_start(test_auto_start(&link))
                .force_auto_start(true),
        );
        async move {
            let response = echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
            assert_eq!(response.get_ref().served_by, "in-process");
            svc.stats().unwrap().route.unwrap().unwrap_err()
        }
    };
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let reason = first_reason(Some(nobody.uid)).await;
    let FallbackReason::AutoStartFailed { message } = &reason else {
        panic!("{reason:?}");
    };
    let expected = format!(
        "the symlink {} on the path belongs to another user",
        link.display()
    );
    assert!(message.starts_with(&expected), "{message}");
    assert!(message.contains("nothing was started"), "{message}");
    assert!(!private.join("repo/sockets").exists(), "followed the link");

    let reason = first_reason(Some(nix::unistd::Uid::current())).await;
    let FallbackReason::AutoStartFailed { message } = &reason else {
        panic!("{reason:?}");
    };
    assert!(
        message.contains("which another user can change"),
        "{message}"
    );
    assert!(!private.join("repo/sockets").exists(), "followed the link");

    // A private directory: the link is a spelling of one's own directory, and is followed.
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    reset(&link);
    let svc = layered(
        test_layer(&link)
            .auto_start(test_auto_start(&link))
            .force_auto_start(true),
    );
    let response = echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    assert_eq!(response.get_ref().served_by, "daemon");
    let pid = svc.stats().unwrap().route.unwrap().unwrap().pid;
    let stopped = stop(&link, Duration::from_secs(10)).await;
    assert_eq!(stopped, StopOutcome::Stopped { pid });
}

/// A started daemon keeps its log bounded while it runs: past the cap, the log is moved aside
/// and the daemon writes to a new one.
#[tokio::test]
async fn a_started_daemon_moves_its_log_aside_while_it_runs() {
    let dir = TestDir::new("auto-log-bounded");
    let svc = layered(
        test_layer(dir.path())
            .auto_start(test_auto_start(dir.path()))
            .force_auto_start(true),
    );
    let response = echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    assert_eq!(response.get_ref().served_by, "daemon");
    let pid = svc.stats().unwrap().route.unwrap().unwrap().pid;
    let log = dir.paths().sockets_dir.join(DAEMON_LOG_FILE);
    let old = dir.paths().sockets_dir.join("daemon.log.1");
    // Two MiB more on the file the daemon writes its stderr to.
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut file, &vec![b'.'; 2 << 20]).unwrap();
    drop(file);
    // The daemon looks every 2 s.
    for _ in 0..300 {
        if old.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(old.exists(), "the log was not moved aside");
    let stopped = stop(dir.path(), Duration::from_secs(10)).await;
    assert_eq!(stopped, StopOutcome::Stopped { pid });
    // `stop` returns once the daemon has removed its files; its last line follows.
    let mut fresh = String::new();
    for _ in 0..200 {
        fresh = std::fs::read_to_string(&log).unwrap();
        if fresh.contains("daemon stopped") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fresh, format!("daemon stopped, pid {pid}\n"));
    let moved = std::fs::read_to_string(&old).unwrap();
    let started = format!("daemon starting, pid {pid}");
    assert!(moved.contains(&started), "{}", &moved[..200]);
    assert!(moved.len() > 2 << 20);
}

/// The reason a layer with auto-start records for its first call, which must run in-process.
async fn first_call_reason(dir: &TestDir, auto: AutoStart) -> FallbackReason {
    let svc = layered(
        test_layer(dir.path())
            .auto_start(auto)
            .force_auto_start(true),
    );
    let response = echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    assert_eq!(response.get_ref().served_by, "in-process");
    svc.stats().unwrap().route.unwrap().unwrap_err()
}

/// The names in the sockets directory.
fn sockets_listing(dir: &TestDir) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.paths().sockets_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_planted_log_never_hangs_a_command_and_starts_nothing() {
    for planted in ["fifo", "symlink", "directory"] {
        let dir = TestDir::new(&format!("auto-planted-log-{planted}"));
        let paths = dir.paths();
        std::fs::create_dir(&paths.sockets_dir).unwrap();
        let log = paths.sockets_dir.join(DAEMON_LOG_FILE);
        match planted {
            "fifo" => nix::unistd::mkfifo(&log, nix::sys::stat::Mode::S_IRWXU).unwrap(),
            "symlink" => std::os::unix::fs::symlink(dir.path().join("elsewhere"), &log).unwrap(),
            _ => std::fs::create_dir(&log).unwrap(),
        }
        // Bounded by `echo`'s 20 s: an open that blocks on the FIFO would hang here.
        let reason = first_call_reason(&dir, test_auto_start(dir.path())).await;
        let FallbackReason::AutoStartFailed { message } = &reason else {
            panic!("{planted}: {reason:?}");
        };
        assert!(message.contains(DAEMON_LOG_FILE), "{planted}: {message}");
        assert!(
            message.contains("nothing was started"),
            "{planted}: {message}"
        );
        // Nothing started, nothing counted, nothing left behind.
        assert_eq!(auto_start_status(dir.path()).spawns, 0, "{planted}");
        assert_eq!(
            probe(dir.path()).status,
            LocalDaemonStatus::Absent {
                reason: FallbackReason::NoPidfile
            },
            "{planted}"
        );
        assert!(
            !dir.path().join("elsewhere").exists(),
            "{planted}: followed the symlink"
        );
    }
}

#[tokio::test]
async fn a_spawn_record_that_cannot_be_written_starts_nothing_and_leaves_nothing() {
    let dir = TestDir::new("auto-record-dir");
    let paths = dir.paths();
    std::fs::create_dir(&paths.sockets_dir).unwrap();
    std::fs::create_dir(paths.sockets_dir.join("spawn.record")).unwrap();
    for _ in 0..5 {
        reset(dir.path());
        let reason = first_call_reason(&dir, test_auto_start(dir.path())).await;
        let FallbackReason::AutoStartFailed { message } = &reason else {
            panic!("{reason:?}");
        };
        assert!(message.contains("spawn record"), "{message}");
    }
    assert_eq!(daemon_starts(&dir), 0);
    assert_eq!(
        sockets_listing(&dir),
        ["daemon.log", "spawn.lock", "spawn.record"],
        "a temporary file was left behind"
    );
}

#[tokio::test]
async fn a_fifo_planted_at_the_records_temporary_name_does_not_hang_the_start() {
    let dir = TestDir::new("auto-record-tmp-fifo");
    let paths = dir.paths();
    std::fs::create_dir(&paths.sockets_dir).unwrap();
    let tmp = paths
        .sockets_dir
        .join(format!("spawn.record.tmp.{}", std::process::id()));
    nix::unistd::mkfifo(&tmp, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let svc = layered(
        test_layer(dir.path())
            .auto_start(test_auto_start(dir.path()))
            .force_auto_start(true),
    );
    echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    wait_until_async("the started daemon serves", || async {
        matches!(probe(dir.path()).status, LocalDaemonStatus::Running { .. })
    })
    .await;
    assert_eq!(auto_start_status(dir.path()).spawns, 1);
    assert!(!tmp.exists(), "the temporary name is left behind");
    assert!(matches!(
        stop(dir.path(), Duration::from_secs(10)).await,
        StopOutcome::Stopped { .. }
    ));
}

#[tokio::test]
async fn a_started_daemon_marks_itself_served_whoever_calls_it() {
    let dir = TestDir::new("auto-self-served");
    {
        // The starting call does not wait, and no layer with auto-start sees the daemon serve.
        let layer = test_layer(dir.path())
            .auto_start(test_auto_start(dir.path()).no_handoff())
            .force_auto_start(true);
        let response = echo(&mut EchoClient::new(layered(layer)), 1).await.unwrap();
        assert_eq!(response.get_ref().served_by, "in-process");
    }
    wait_until("the started daemon serves", || {
        matches!(probe(dir.path()).status, LocalDaemonStatus::Running { .. })
    });
    wait_until("the daemon marks its start served", || {
        auto_start_status(dir.path()).failures == 0
    });
    assert!(matches!(
        stop(dir.path(), Duration::from_secs(10)).await,
        StopOutcome::Stopped { .. }
    ));
    // No backoff: the next call with auto-start starts a daemon at once and goes to it.
    let layer = test_layer(dir.path())
        .auto_start(test_auto_start(dir.path()))
        .force_auto_start(true);
    let response = echo(&mut EchoClient::new(layered(layer)), 2).await.unwrap();
    assert!(
        matches!(
            response.extensions().get::<Route>(),
            Some(Route::Daemon { .. })
        ),
        "{:?}",
        auto_start_status(dir.path())
    );
    assert_eq!(auto_start_status(dir.path()).spawns, 2);
    assert!(matches!(
        stop(dir.path(), Duration::from_secs(10)).await,
        StopOutcome::Stopped { .. }
    ));
}

/// A daemon command that hangs before it binds, writing its pid to `pids` first.
fn hanging(dir: &TestDir) -> AutoStart {
    let pids = dir.path().join("pids");
    AutoStart::new("/bin/sh")
        .args([
            "-c".into(),
            format!("echo $$ >> {}; exec sleep 600", pids.display()),
        ])
        .start_timeout(Duration::from_millis(300))
}

/// The pids `hanging` commands wrote that are alive (not gone, not zombies).
fn hanging_alive(dir: &TestDir) -> Vec<u32> {
    std::fs::read_to_string(dir.path().join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                !stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        })
        .collect()
}

#[tokio::test]
async fn a_command_that_never_takes_the_lock_is_stopped_and_at_most_one_is_alive() {
    let dir = TestDir::new("auto-hanging");
    let layer = test_layer(dir.path())
        .auto_start(hanging(&dir).no_handoff())
        .force_auto_start(true);
    let mut stopped = 0;
    for id in 0..12 {
        reset(dir.path());
        let svc = layered(layer.clone());
        let response = echo(&mut EchoClient::new(svc.clone()), id).await.unwrap();
        assert_eq!(response.get_ref().served_by, "in-process");
        stopped += svc.stats().unwrap().stalled_starts_stopped;
        let alive = hanging_alive(&dir);
        assert!(alive.len() <= 1, "alive: {alive:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let status = auto_start_status(dir.path());
    assert!(status.stopped >= 1, "{status:?}");
    assert_eq!(status.stopped, stopped, "{status:?}");
    // The last one, if any, is stopped by the next start after its timeout.
    for pid in hanging_alive(&dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// `stop` with no daemon serving stops a started command that hangs before it takes the lock:
/// nothing started for the directory is left alive.
#[tokio::test]
async fn stop_stops_a_started_command_that_never_took_the_lock() {
    let dir = TestDir::new("auto-hanging-stop");
    let svc = layered(
        test_layer(dir.path())
            .auto_start(hanging(&dir).no_handoff())
            .force_auto_start(true),
    );
    let response = echo(&mut EchoClient::new(svc), 1).await.unwrap();
    assert_eq!(response.get_ref().served_by, "in-process");
    let mut alive = hanging_alive(&dir);
    for _ in 0..500 {
        if !alive.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        alive = hanging_alive(&dir);
    }
    let [pid] = alive[..] else {
        panic!("alive: {alive:?}");
    };
    let stopped = stop(dir.path(), Duration::from_secs(10)).await;
    assert_eq!(stopped, StopOutcome::Stopped { pid });
    assert_eq!(hanging_alive(&dir), Vec::<u32>::new());
    assert_eq!(auto_start_status(dir.path()).stopped, 1);
    let again = stop(dir.path(), Duration::from_secs(10)).await;
    assert_eq!(again, StopOutcome::NotRunning);
}

#[tokio::test]
async fn in_require_mode_a_command_that_hangs_is_stopped_when_the_start_timeout_passes() {
    let dir = TestDir::new("auto-hanging-require");
    let svc = layered(
        test_layer(dir.path())
            .mode(Mode::Require)
            .auto_start(hanging(&dir))
            .force_auto_start(true),
    );
    let error = echo(&mut EchoClient::new(svc.clone()), 1)
        .await
        .unwrap_err();
    assert!(error.message().contains("was stopped"), "{error:?}");
    assert!(error.message().contains(DAEMON_LOG_FILE), "{error:?}");
    assert_eq!(svc.stats().unwrap().stalled_starts_stopped, 1);
    assert_eq!(hanging_alive(&dir), Vec::<u32>::new());
    assert_eq!(auto_start_status(dir.path()).stopped, 1);
    // A `status` verb sees it without a subscriber: the report counts and explains it.
    let report = test_layer(dir.path()).diagnose().await;
    assert_eq!(report.auto_start.as_ref().unwrap().stopped, 1);
    let text = report.to_string();
    assert!(
        text.contains("auto-start: 1 started, the last ")
            && text.contains("; 1 stopped for never taking the directory's lock"),
        "{text}"
    );
}
