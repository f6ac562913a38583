//! Every reason a check can give, each from a fixture that passes every earlier stage, so that
//! the stage under test is the one that rejects it. Fixtures that need another user run the
//! probing side as `nobody` (CI runs as root, and root's `kill` never sees EPERM).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::*;
use tower_local_daemon::{
    DaemonPaths, FallbackReason, IdentityPolicy, LocalDaemonStatus, Pidfile, PidfileError, probe,
    try_connect_local_daemon_channel, try_detect_local_daemon_with_connect_probe,
};

/// Not a test: the entry point of this binary when it is re-executed.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A repository directory with a `sockets/` directory, readable by everyone so that `nobody`
/// can probe it.
struct Fixture {
    dir: TestDir,
}

impl Fixture {
    /// The sockets directory is ours and `0755`: it passes the directory stage, and `nobody`
    /// can read it.
    fn new(name: &str) -> Self {
        let dir = TestDir::new(name);
        let paths = DaemonPaths::new(dir.path());
        std::fs::create_dir_all(&paths.sockets_dir).unwrap();
        for path in [dir.path(), &paths.sockets_dir] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self { dir }
    }

    fn paths(&self) -> DaemonPaths {
        DaemonPaths::new(self.dir.path())
    }

    fn pidfile(&self) -> PathBuf {
        self.paths().pidfile
    }

    fn socket(&self) -> PathBuf {
        self.paths().socket
    }

    /// For probes run as `nobody`: the directory stage passes for them.
    fn give_sockets_dir_to_nobody(&self) {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        nix::unistd::chown(&self.paths().sockets_dir, Some(nobody.uid), None).unwrap();
    }

    fn write_pidfile(&self, pid: u32, started_at: u64) {
        std::fs::write(self.pidfile(), Pidfile::new(pid, started_at).render()).unwrap();
        std::fs::set_permissions(self.pidfile(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// A pidfile that names this very process: alive, our uid, our executable, started before
    /// now. It passes every process check.
    fn write_own_pidfile(&self) {
        self.write_pidfile(std::process::id(), now());
    }

    /// Every file under `sockets/` with its type, size, mode and modification time.
    fn snapshot(&self) -> Vec<(PathBuf, String)> {
        use std::os::unix::fs::MetadataExt;
        let mut files: Vec<_> = std::fs::read_dir(self.paths().sockets_dir)
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                let m = std::fs::symlink_metadata(&path).unwrap();
                let facts = format!(
                    "{:?} {} {:o} {} {}",
                    m.file_type(),
                    m.len(),
                    m.mode(),
                    m.mtime(),
                    m.mtime_nsec()
                );
                (path, facts)
            })
            .collect();
        files.sort();
        files
    }

    /// The probe's status; the probe changes nothing on disk.
    fn status(&self) -> LocalDaemonStatus {
        let before = self.snapshot();
        let status = probe(self.dir.path()).status;
        assert_eq!(self.snapshot(), before, "the probe changed the directory");
        status
    }

    fn stale(&self, pid: u32, reason: FallbackReason) -> LocalDaemonStatus {
        LocalDaemonStatus::Stale { pid, reason }
    }

    /// Probe, connect and handshake; they change nothing on disk.
    async fn connect(&self, timeout: Duration) -> Result<(), FallbackReason> {
        let before = self.snapshot();
        let result = try_connect_local_daemon_channel(self.dir.path(), timeout)
            .await
            .map(drop);
        assert_eq!(self.snapshot(), before, "the checks changed the directory");
        result
    }
}

fn absent(reason: FallbackReason) -> LocalDaemonStatus {
    LocalDaemonStatus::Absent { reason }
}

// ---- Stage 1: the pidfile ----

#[test]
fn no_pidfile() {
    let f = Fixture::new("r-no-pidfile");
    assert_eq!(f.status(), absent(FallbackReason::NoPidfile));
}

#[test]
fn malformed_pidfiles_each_give_their_reason() {
    use PidfileError::*;
    let now = now();
    let m = FallbackReason::MalformedPidfile;
    let marker = |found: &str| FallbackReason::MarkerMismatch {
        expected: "heddle-agent".into(),
        found: found.into(),
    };
    let cases: Vec<(Vec<u8>, FallbackReason)> = vec![
        (b"".to_vec(), m(MissingFinalNewline)),
        (b"\n\n\n".to_vec(), m(InvalidPid)),
        (b"1\r\nheddle-agent\r\n1\r\n".to_vec(), m(InvalidPid)),
        (b" 42 \nheddle-agent\n1\n".to_vec(), m(InvalidPid)),
        (b"0\nheddle-agent\n1\n".to_vec(), m(InvalidPid)),
        (b"-5\nheddle-agent\n1\n".to_vec(), m(InvalidPid)),
        (b"2147483648\nheddle-agent\n1\n".to_vec(), m(InvalidPid)),
        (b"007\nheddle-agent\n1\n".to_vec(), m(InvalidPid)),
        (b"+7\nheddle-agent\n1\n".to_vec(), m(InvalidPid)),
        (b"7\nheddle-daemon\n1\n".to_vec(), marker("heddle-daemon")),
        (
            b"7\nheddle-agent\n1\nextra\n".to_vec(),
            m(LineCount { found: 4 }),
        ),
        (
            format!("7\nheddle-agent\n{now}").into_bytes(),
            m(MissingFinalNewline),
        ),
        (b"7\0\nheddle-agent\n1\n".to_vec(), m(InvalidPid)),
        // Not a marker any tool can have: a corrupt pidfile, not another tool's.
        (b"7\nheddle-\xffagent\n1\n".to_vec(), m(InvalidMarker)),
        (b"7\nfoo bar\nxyz\n".to_vec(), m(InvalidMarker)),
        (vec![b'7'; 10 * 1024 * 1024], m(TooLong)),
        (b"4242\n".to_vec(), m(LineCount { found: 1 })),
    ];
    for (bytes, expected) in cases {
        let f = Fixture::new("r-malformed");
        std::fs::write(f.pidfile(), &bytes).unwrap();
        assert_eq!(
            f.status(),
            absent(expected),
            "{:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
        );
    }
}

#[test]
fn pid_one_is_rejected_at_the_process_stage() {
    let f = Fixture::new("r-pid-one");
    f.write_pidfile(1, now());
    // Init is root's: another user is told so. To root it runs another executable, and in a
    // sandbox even root may not read its /proc entry.
    let status = f.status();
    let foreign = !nix::unistd::geteuid().is_root();
    assert!(
        (foreign && status == f.stale(1, FallbackReason::ForeignProcess { uid: 0 }))
            || status == f.stale(1, FallbackReason::ExecutableMismatch)
            || matches!(
                &status,
                LocalDaemonStatus::Stale {
                    pid: 1,
                    reason: FallbackReason::ProcessUnreadable { .. }
                }
            ),
        "{status:?}"
    );
}

#[test]
fn pidfile_that_is_a_fifo_a_directory_or_a_symlink_is_unreadable_without_blocking() {
    let f = Fixture::new("r-fifo");
    nix::unistd::mkfifo(
        &f.pidfile(),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    assert_eq!(
        f.status(),
        absent(FallbackReason::UnreadablePidfile { error: None })
    );

    let f = Fixture::new("r-pid-dir");
    std::fs::create_dir(f.pidfile()).unwrap();
    assert_eq!(
        f.status(),
        absent(FallbackReason::UnreadablePidfile { error: None })
    );

    for target in ["/dev/zero", "/dev/urandom"] {
        let f = Fixture::new("r-pid-symlink");
        std::os::unix::fs::symlink(target, f.pidfile()).unwrap();
        assert_eq!(
            f.status(),
            absent(FallbackReason::UnreadablePidfile { error: None })
        );
    }
}

#[test]
fn pidfile_without_read_permission_probed_as_nobody() {
    let Some(nobody) = NobodyBinary::new("pidfile_without_read_permission_probed_as_nobody") else {
        return;
    };
    let f = Fixture::new("r-pid-perm");
    f.give_sockets_dir_to_nobody();
    f.write_own_pidfile();
    std::fs::set_permissions(f.pidfile(), std::fs::Permissions::from_mode(0o000)).unwrap();
    assert_eq!(
        nobody.probe(f.dir.path()),
        format!(
            "{:?}",
            absent(FallbackReason::UnreadablePidfile {
                error: Some(std::io::ErrorKind::PermissionDenied)
            })
        )
    );
}

/// A directory on the way that `nobody` may not enter is named, with the permission, rather
/// than reported as an unreadable pidfile.
#[test]
fn a_directory_nobody_may_not_enter_is_named_with_the_permission() {
    let Some(nobody) =
        NobodyBinary::new("a_directory_nobody_may_not_enter_is_named_with_the_permission")
    else {
        return;
    };
    let f = Fixture::new("r-dir-perm");
    f.write_own_pidfile();
    std::fs::set_permissions(f.dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let reason = FallbackReason::UnsearchableDirectory {
        path: f.dir.path().to_owned(),
    };
    assert_eq!(
        nobody.probe(f.dir.path()),
        format!("{:?}", absent(reason.clone()))
    );
    assert_eq!(
        reason.to_string(),
        format!(
            "this user may not enter {}: it lacks search (x) permission for them",
            f.dir.path().display()
        )
    );
    assert!(reason.remedy().contains("search permission"));
    assert!(!reason.remedy().contains("pidfile"));
}

// ---- Stage 1: the process ----

#[test]
fn process_gone() {
    let f = Fixture::new("r-gone");
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    f.write_pidfile(pid, now());
    assert_eq!(f.status(), f.stale(pid, FallbackReason::ProcessGone));
}

#[test]
fn zombie_process_is_gone() {
    let f = Fixture::new("r-zombie");
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = child.id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    wait_until("the child is a zombie", || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|s| s.contains("State:\tZ"))
    });
    f.write_pidfile(pid, now());
    assert_eq!(f.status(), f.stale(pid, FallbackReason::ProcessGone));
    child.wait().unwrap();
}

#[test]
fn process_of_another_uid_probed_as_nobody_is_foreign_not_dead() {
    let Some(nobody) =
        NobodyBinary::new("process_of_another_uid_probed_as_nobody_is_foreign_not_dead")
    else {
        return;
    };
    let f = Fixture::new("r-foreign-process");
    f.give_sockets_dir_to_nobody();
    f.write_own_pidfile(); // this root process: `kill(pid, 0)` gives nobody EPERM
    assert_eq!(
        nobody.probe(f.dir.path()),
        format!(
            "{:?}",
            f.stale(
                std::process::id(),
                FallbackReason::ForeignProcess { uid: 0 }
            )
        )
    );
}

#[test]
fn process_of_another_uid_hidden_by_hidepid_is_unreadable_not_gone() {
    let Some(nobody) =
        NobodyBinary::new("process_of_another_uid_hidden_by_hidepid_is_unreadable_not_gone")
    else {
        return;
    };
    let f = Fixture::new("r-hidepid");
    f.give_sockets_dir_to_nobody();
    f.write_own_pidfile(); // alive, root's: under hidepid=2 nobody cannot see its /proc entry
    assert_eq!(
        nobody.probe_with_hidepid(f.dir.path()),
        format!(
            "{:?}",
            f.stale(
                std::process::id(),
                FallbackReason::ProcessUnreadable {
                    error: std::io::ErrorKind::PermissionDenied
                }
            )
        )
    );
}

#[test]
fn daemon_of_another_uid_is_foreign() {
    let Some(nobody_bin) = NobodyBinary::new("daemon_of_another_uid_is_foreign") else {
        return;
    };
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let dir = TestDir::new("r-nobody-daemon");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut daemon = spawn(
        nobody_bin
            .command(Role::Daemon(dir.path().to_owned()))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let paths = DaemonPaths::new(dir.path());
    wait_until("the nobody daemon writes its pidfile", || {
        paths.pidfile.exists()
    });
    // The sockets directory the nobody daemon made is its own, which the directory stage
    // refuses; given to us, the process stage is the one under test.
    nix::unistd::chown(
        &paths.sockets_dir,
        Some(nix::unistd::Uid::from_raw(0)),
        None,
    )
    .unwrap();
    let pid = daemon.id();
    assert_eq!(
        probe(dir.path()).status,
        LocalDaemonStatus::Stale {
            pid,
            reason: FallbackReason::ForeignProcess {
                uid: nobody.uid.as_raw()
            }
        }
    );
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

#[test]
fn live_unrelated_process_is_another_executable() {
    let f = Fixture::new("r-unrelated");
    let mut sleep = Command::new("sleep").arg("60").spawn().unwrap();
    f.write_pidfile(sleep.id(), now() + 1);
    assert_eq!(
        f.status(),
        f.stale(sleep.id(), FallbackReason::ExecutableMismatch)
    );
    sleep.kill().unwrap();
    sleep.wait().unwrap();
}

#[tokio::test]
async fn daemon_whose_executable_name_is_not_utf8_is_used() {
    use std::os::unix::ffi::OsStrExt;
    let f = Fixture::new("r-non-utf8");
    // The kernel keeps the first 15 bytes of the name as `comm`, raw.
    let name = std::ffi::OsStr::from_bytes(b"d\xe6mon-\xff\xfe");
    let program = f.dir.path().join(name);
    copy_of_this_binary(&program);
    let options = DaemonOptions {
        program: Some(program.clone()),
        ..DaemonOptions::default()
    };
    let daemon = DaemonProcess::start_with(f.dir.path(), options);
    let svc = layered(test_layer(f.dir.path()).identity(IdentityPolicy::Executable(program)));
    let response = echo(&mut EchoClient::new(svc), 1).await.unwrap();
    assert_eq!(response.get_ref().pid, daemon.pid());
}

#[test]
fn client_whose_own_executable_was_replaced_on_disk_still_knows_itself() {
    let f = Fixture::new("r-client-upgraded");
    let program = f.dir.path().join("tool");
    copy_of_this_binary(&program);
    let daemon = DaemonProcess::start_with(
        f.dir.path(),
        DaemonOptions {
            program: Some(program.clone()),
            ..DaemonOptions::default()
        },
    );
    // A client of the same build, started before an upgrade replaces the file it runs.
    let mut client = spawn(
        reexec(&program, Role::Call(f.dir.path().to_owned()))
            .env(CALL_WAIT_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let upgrade = f.dir.path().join("tool.new");
    copy_of_this_binary(&upgrade);
    std::fs::rename(&upgrade, &program).unwrap();
    // Now `current_exe()` of both ends in " (deleted)"; their executable is still one file.
    writeln!(client.stdin.take().unwrap(), "go").unwrap();
    let output = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let route = stdout
        .lines()
        .find_map(|l| l.split_once(CALL_OUTPUT_PREFIX).map(|(_, route)| route))
        .unwrap_or_else(|| panic!("no route in {stdout}"));
    assert_eq!(
        route,
        format!(
            "{:?}",
            Some(tower_local_daemon::Route::Daemon { pid: daemon.pid() })
        )
    );
}

#[tokio::test]
async fn executable_replaced_on_disk_after_the_daemon_started() {
    let f = Fixture::new("r-replaced");
    let bin = f.dir.path().join("daemon-binary");
    std::fs::copy("/bin/sleep", &bin).unwrap();
    let mut daemon = spawn(Command::new(&bin).arg("60"));
    f.write_pidfile(daemon.id(), now() + 1);
    // An upgrade: a new file renamed over the path the daemon was started from.
    let new = f.dir.path().join("daemon-binary.new");
    std::fs::copy("/bin/sleep", &new).unwrap();
    std::fs::rename(&new, &bin).unwrap();

    let svc = layered(test_layer(f.dir.path()).identity(IdentityPolicy::Executable(bin)));
    let response = echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    assert_eq!(response.get_ref().served_by, "in-process");
    assert_eq!(
        svc.stats().unwrap().route,
        Some(Err(FallbackReason::ExecutableReplaced))
    );
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

#[test]
fn forged_lock_record_of_another_start_or_boot_is_pid_reuse() {
    let f = Fixture::new("r-reused");
    let daemon = DaemonProcess::start(f.dir.path());
    let pid = daemon.pid();
    let lock = DaemonPaths::new(f.dir.path()).lock;
    let record = std::fs::read_to_string(&lock).unwrap();
    let lines: Vec<&str> = record.lines().collect();
    let [recorded_pid, ticks, boot_id] = lines[..] else {
        panic!("the lock record is not three lines: {record:?}");
    };
    assert_eq!(recorded_pid, pid.to_string());
    let forgeries = [
        format!("{pid}\n{}\n{boot_id}\n", ticks.parse::<u64>().unwrap() + 1),
        format!("{pid}\n{ticks}\n00000000-0000-0000-0000-000000000000\n"),
    ];
    for forged in forgeries {
        std::fs::write(&lock, &forged).unwrap();
        let status = probe(f.dir.path()).status;
        assert!(
            matches!(
                &status,
                LocalDaemonStatus::Stale { pid: p, reason: FallbackReason::PidReused { pid: r, .. } }
                    if *p == pid && *r == pid
            ),
            "{forged:?} gave {status:?}"
        );
    }
    std::fs::write(&lock, record).unwrap();
    assert_eq!(
        probe(f.dir.path()).status,
        LocalDaemonStatus::Running { pid }
    );
}

#[test]
fn daemon_whose_pidfile_time_is_ten_minutes_in_the_past_is_still_running() {
    let f = Fixture::new("r-clock-step");
    let daemon = DaemonProcess::start(f.dir.path());
    // As after a forward clock step: the pidfile's wall-clock time is now far behind.
    f.write_pidfile(daemon.pid(), now() - 600);
    assert_eq!(f.status(), LocalDaemonStatus::Running { pid: daemon.pid() });
}

#[test]
fn daemon_that_wrote_its_pidfile_seconds_after_it_started_is_still_running() {
    let f = Fixture::new("r-late-pidfile");
    let daemon = DaemonProcess::start(f.dir.path());
    f.write_pidfile(daemon.pid(), now() + 30);
    assert_eq!(f.status(), LocalDaemonStatus::Running { pid: daemon.pid() });
}

// ---- Stage 1: the socket file ----

#[test]
fn no_socket() {
    let f = Fixture::new("r-no-socket");
    f.write_own_pidfile();
    assert_eq!(
        f.status(),
        f.stale(std::process::id(), FallbackReason::NoSocket)
    );
}

#[test]
fn socket_path_that_is_a_regular_file_a_directory_or_a_symlink_is_not_a_socket() {
    let real = Fixture::new("r-real-socket");
    let _listener = std::os::unix::net::UnixListener::bind(real.socket()).unwrap();

    let f = Fixture::new("r-socket-file");
    f.write_own_pidfile();
    std::fs::write(f.socket(), "").unwrap();
    assert_eq!(
        f.status(),
        f.stale(std::process::id(), FallbackReason::NotASocket)
    );

    let f = Fixture::new("r-socket-dir");
    f.write_own_pidfile();
    std::fs::create_dir(f.socket()).unwrap();
    assert_eq!(
        f.status(),
        f.stale(std::process::id(), FallbackReason::NotASocket)
    );

    let f = Fixture::new("r-socket-symlink");
    f.write_own_pidfile();
    std::os::unix::fs::symlink(real.socket(), f.socket()).unwrap();
    assert_eq!(
        f.status(),
        f.stale(std::process::id(), FallbackReason::NotASocket)
    );
}

#[test]
fn socket_owned_by_another_uid() {
    if !root_or_skip("socket_owned_by_another_uid") {
        return;
    }
    let f = Fixture::new("r-socket-owner");
    f.write_own_pidfile();
    let _listener = std::os::unix::net::UnixListener::bind(f.socket()).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&f.socket(), Some(nobody.uid), None).unwrap();
    assert_eq!(
        f.status(),
        f.stale(
            std::process::id(),
            FallbackReason::ForeignSocket {
                uid: nobody.uid.as_raw()
            }
        )
    );
}

// ---- Stage 2: connect and peer credentials ----

#[tokio::test]
async fn socket_nobody_listens_on_is_refused() {
    let f = Fixture::new("r-refused");
    f.write_own_pidfile();
    drop(std::os::unix::net::UnixListener::bind(f.socket()).unwrap());
    assert_eq!(
        f.connect(Duration::from_secs(5)).await,
        Err(FallbackReason::ConnectionRefused)
    );
}

#[tokio::test]
async fn full_backlog_is_busy() {
    let f = Fixture::new("r-busy");
    f.write_own_pidfile();
    let listener = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let addr = nix::sys::socket::UnixAddr::new(&f.socket()).unwrap();
    use std::os::fd::AsRawFd;
    nix::sys::socket::bind(listener.as_raw_fd(), &addr).unwrap();
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(0).unwrap()).unwrap();
    // Fill the backlog with connections nobody accepts.
    let mut held = Vec::new();
    loop {
        match tokio::net::UnixStream::connect(f.socket()).await {
            Ok(stream) => held.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(held.len() < 1000, "the backlog never filled");
    }
    assert_eq!(
        try_detect_local_daemon_with_connect_probe(f.dir.path(), Duration::from_secs(5)).await,
        Err(FallbackReason::Busy)
    );
}

#[tokio::test]
async fn socket_listened_on_by_another_process_than_the_pidfile_names_is_a_peer_pid_mismatch() {
    let real = Fixture::new("r-peer-pid-daemon");
    let daemon = DaemonProcess::start(real.dir.path());
    let f = Fixture::new("r-peer-pid");
    f.write_pidfile(daemon.pid(), now() + 1); // a live process of our executable and uid
    let _listener = std::os::unix::net::UnixListener::bind(f.socket()).unwrap(); // ours
    assert_eq!(
        f.connect(Duration::from_secs(5)).await,
        Err(FallbackReason::PeerPidMismatch {
            expected: daemon.pid(),
            actual: Some(std::process::id() as i32)
        })
    );
}

#[tokio::test]
async fn socket_listened_on_by_another_uid_is_a_peer_uid_mismatch() {
    let Some(nobody_bin) =
        NobodyBinary::new("socket_listened_on_by_another_uid_is_a_peer_uid_mismatch")
    else {
        return;
    };
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let f = Fixture::new("r-peer-uid");
    f.write_own_pidfile();
    let sockets = DaemonPaths::new(f.dir.path()).sockets_dir;
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut listener = spawn(
        nobody_bin
            .command(Role::Listen(f.socket()))
            .stdout(Stdio::piped()),
    );
    // libtest prints its own lines first.
    let mut stdout = BufReader::new(listener.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "the listener exited"
        );
    }
    // The file and directory are root's and private again, so the directory and socket-owner
    // checks pass; the peer is still nobody.
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o755)).unwrap();
    nix::unistd::chown(&f.socket(), Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    assert_eq!(
        f.connect(Duration::from_secs(5)).await,
        Err(FallbackReason::PeerUidMismatch {
            expected: 0,
            actual: nobody.uid.as_raw()
        })
    );
    listener.kill().unwrap();
    listener.wait().unwrap();
}

// ---- Stage 3: the handshake ----

/// A listener in this process (so the peer pid is the pidfile's) that answers each connection
/// with `reply` and then keeps it open.
fn listen_and_answer(f: &Fixture, reply: &'static [u8]) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(f.socket()).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(4) {
            let mut stream = stream.unwrap();
            let _ = stream.write_all(reply);
            held.push(stream);
        }
    })
}

#[tokio::test]
async fn listener_that_speaks_garbage_fails_the_handshake() {
    let f = Fixture::new("r-garbage");
    f.write_own_pidfile();
    let _server = listen_and_answer(&f, b"SSH-2.0-OpenSSH_9.2\r\nthis is not HTTP/2 at all\r\n");
    let result = f.connect(Duration::from_secs(5)).await;
    assert!(
        matches!(result, Err(FallbackReason::HandshakeFailed { .. })),
        "{result:?}"
    );
    let text = result.unwrap_err().to_string();
    assert!(!text.contains("may have run"), "{text}");
}

/// A listener that opens HTTP/2 and at once goes away with a protocol error whose debug data
/// is h2's own name for it: the reason says the daemon closed the connection, in words.
#[tokio::test]
async fn a_daemon_that_goes_away_in_the_handshake_is_told_without_h2_internals() {
    let f = Fixture::new("r-goaway");
    f.write_own_pidfile();
    const DEBUG: &[u8] = b"too_many_continuations";
    let mut frames = vec![0, 0, 0, 4, 0, 0, 0, 0, 0]; // SETTINGS, empty
    frames.extend_from_slice(&[0, 0, 8 + DEBUG.len() as u8, 7, 0, 0, 0, 0, 0]); // GOAWAY
    frames.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]); // last stream 0, PROTOCOL_ERROR
    frames.extend_from_slice(DEBUG);
    let _server = listen_and_answer(&f, frames.leak());
    // Through the layer's own HTTP/2 client, whichever comes first, the request or the GOAWAY.
    let svc = layered(test_layer(f.dir.path()));
    echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    let Some(Err(reason)) = svc.stats().unwrap().route else {
        panic!("no reason");
    };
    assert_eq!(
        reason,
        FallbackReason::HandshakeFailed {
            message: "the daemon closed the connection (unspecific protocol error detected)".into()
        }
    );
    // Through tonic's `Channel` (the one-call functions), which may try to dial again.
    let reason = f.connect(Duration::from_secs(5)).await.unwrap_err();
    let text = reason.to_string();
    for unwanted in ["may have run", "b\"", "too_many_continuations", "answered"] {
        assert!(!text.contains(unwanted), "{text}");
    }
}

#[tokio::test]
async fn listener_that_accepts_and_never_speaks_hits_the_deadline() {
    let f = Fixture::new("r-silent");
    f.write_own_pidfile();
    let _server = listen_and_answer(&f, b"");
    assert_eq!(
        f.connect(Duration::from_millis(300)).await,
        Err(FallbackReason::DeadlineExceeded)
    );
}

/// A tonic server in this process on the fixture's socket, with the given routes.
async fn serve_in_process(f: &Fixture, routes: tonic::service::Routes) {
    let listener = tokio::net::UnixListener::bind(f.socket()).unwrap();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(incoming),
    );
}

#[tokio::test]
async fn health_not_serving_is_refused() {
    let f = Fixture::new("r-not-serving");
    f.write_own_pidfile();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    serve_in_process(&f, tonic::service::Routes::new(health)).await;
    assert_eq!(
        f.connect(Duration::from_secs(5)).await,
        Err(FallbackReason::NotServing {
            service: String::new()
        })
    );
    // An empty list of required services still checks the whole server.
    let svc = layered(test_layer(f.dir.path()).required_services(Vec::<String>::new()));
    echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    assert_eq!(
        svc.stats().unwrap().route,
        Some(Err(FallbackReason::NotServing {
            service: String::new()
        }))
    );
}

/// A health service that answers SERVING after `delay`.
#[derive(Clone)]
struct SlowHealth(Duration);

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for SlowHealth {
    async fn check(
        &self,
        _: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        tokio::time::sleep(self.0).await;
        Ok(tonic::Response::new(
            tonic_health::pb::HealthCheckResponse {
                status: tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            },
        ))
    }

    type WatchStream =
        tokio_stream::Empty<Result<tonic_health::pb::HealthCheckResponse, tonic::Status>>;

    async fn watch(
        &self,
        _: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Ok(tonic::Response::new(tokio_stream::empty()))
    }
}

#[tokio::test]
async fn health_that_answers_after_the_deadline_hits_the_deadline() {
    let f = Fixture::new("r-slow-health");
    f.write_own_pidfile();
    let slow =
        tonic_health::pb::health_server::HealthServer::new(SlowHealth(Duration::from_secs(5)));
    serve_in_process(&f, tonic::service::Routes::new(slow)).await;
    assert_eq!(
        f.connect(Duration::from_millis(300)).await,
        Err(FallbackReason::DeadlineExceeded)
    );
}

#[tokio::test]
async fn daemon_without_health_service_is_refused_unless_accepted() {
    let f = Fixture::new("r-no-health");
    f.write_own_pidfile();
    let echo_only = tonic::service::Routes::new(EchoServer::new(EchoService::new("daemon")));
    serve_in_process(&f, echo_only).await;
    assert_eq!(
        f.connect(Duration::from_secs(5)).await,
        Err(FallbackReason::HealthUnimplemented)
    );

    // Such a daemon (heddle 0.10.4 is one) does not say which directory it serves either:
    // accepting a missing health service does not accept that.
    let svc = layered(test_layer(f.dir.path()).accept_unimplemented_health(true));
    let response = echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    assert_eq!(response.get_ref().served_by, "in-process");
    assert_eq!(
        svc.stats().unwrap().route,
        Some(Err(FallbackReason::DirectoryUnreported))
    );

    let svc = layered(
        test_layer(f.dir.path())
            .accept_unimplemented_health(true)
            .accept_unverified_directory(true),
    );
    let response = echo(&mut EchoClient::new(svc), 1).await.unwrap();
    assert_eq!(response.get_ref().served_by, "daemon");
}

#[tokio::test]
async fn daemon_that_does_not_report_its_directory_is_refused_unless_accepted() {
    let f = Fixture::new("r-no-directory");
    f.write_own_pidfile();
    // A plain tonic server: healthy, but it says nothing of the directory it serves.
    let (_reporter, health) = tonic_health::server::health_reporter();
    let routes = tonic::service::Routes::new(health)
        .add_service(EchoServer::new(EchoService::new("daemon")));
    serve_in_process(&f, routes).await;
    assert_eq!(
        f.connect(Duration::from_secs(5)).await,
        Err(FallbackReason::DirectoryUnreported)
    );
    let svc = layered(test_layer(f.dir.path()).accept_unverified_directory(true));
    let response = echo(&mut EchoClient::new(svc), 1).await.unwrap();
    assert_eq!(response.get_ref().served_by, "daemon");
}

/// The directory a daemon reports is read by the pidfile's rule for numbers: a `+` sign (which
/// Rust's integer parser would take) makes it another directory, not this one.
#[tokio::test]
async fn a_directory_reported_with_a_sign_is_not_this_directory() {
    use std::os::unix::fs::MetadataExt;
    let f = Fixture::new("r-signed-directory");
    f.write_own_pidfile();
    let m = std::fs::metadata(f.dir.path()).unwrap();
    let signed = format!("+{}:+{}", m.dev(), m.ino());
    let header = http::HeaderValue::from_str(&signed).unwrap();
    let report = tower::util::MapResponseLayer::new(move |mut r: http::Response<_>| {
        r.headers_mut()
            .insert(tower_local_daemon::DIRECTORY_METADATA_KEY, header.clone());
        r
    });
    let listener = tokio::net::UnixListener::bind(f.socket()).unwrap();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(report)
            .add_routes(tonic::service::Routes::new(health))
            .serve_with_incoming(incoming),
    );
    assert_eq!(
        f.connect(Duration::from_secs(5)).await,
        Err(FallbackReason::DirectoryMismatch {
            pid: std::process::id(),
            expected: format!("{}:{}", m.dev(), m.ino()),
            served: signed,
        })
    );
}
