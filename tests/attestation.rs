//! The attested first call: a daemon's `grpc.attest` stands in for `Health/Check`, for the
//! process that wrote it and only while it serves.
//!
//! Two kinds of fixture. A tonic server in this process that hosts no health service, beside an
//! attestation written by hand in the documented format: its answers show which way the client
//! went (asked, it would say `HealthUnimplemented`). And real daemons in another process, which
//! write their own attestation, paused, stopping, or with it removed.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;
use tower_local_daemon::protocol::{ATTESTATION_FILE, LOCK_FILE};
use tower_local_daemon::{DaemonPaths, FallbackReason, Pidfile, diagnose};

/// The echo service's name, as its health and its attestation name it.
const ECHO: &str = <EchoServer<EchoService> as tonic::server::NamedService>::NAME;

/// Not a test: the entry point of this binary when it is re-executed.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

/// This process's start, as the attestation states it: field 22 of `/proc/self/stat` and the
/// boot id.
fn own_start() -> String {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 1..];
    let ticks = after_name.split_whitespace().nth(19).unwrap();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    format!("{ticks} {}", boot_id.trim())
}

fn identity(path: &Path) -> String {
    let metadata = std::fs::metadata(path).unwrap();
    format!("{}:{}", metadata.dev(), metadata.ino())
}

/// `dir`'s socket, listened on by this process, which its pidfile and lock record name: a
/// daemon's files as the probe wants them, for a listener the test drives.
fn listen_as_daemon(dir: &Path) -> tokio::net::UnixListener {
    let paths = DaemonPaths::new(dir);
    std::fs::create_dir_all(&paths.sockets_dir).unwrap();
    let listener = tokio::net::UnixListener::bind(&paths.socket).unwrap();
    let pidfile = Pidfile::new(std::process::id(), 1).render();
    std::fs::write(&paths.pidfile, pidfile).unwrap();
    // The lock record, as a daemon writes it under its lock: pid, start ticks, boot id, one a
    // line. An attestation is trusted only for the process it names.
    let record = format!(
        "{}\n{}\n",
        std::process::id(),
        own_start().replace(' ', "\n")
    );
    std::fs::write(&paths.lock, record).unwrap();
    listener
}

/// A daemon in this process: the echo service alone (no health service) on `dir`'s socket.
async fn echo_only_daemon(dir: &Path) {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listen_as_daemon(dir));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService::new("daemon")))
            .serve_with_incoming(incoming),
    );
}

/// The attestation of this process for `dir`, with `edit` applied to its text.
fn attest(dir: &Path, edit: impl FnOnce(String) -> String) {
    let paths = DaemonPaths::new(dir);
    let text = format!(
        "tower-local-daemon attestation 1\npid {}\nstart {}\ndirectory {}\nsocket {}\n\
         version 1.0\nservice {ECHO}\n",
        std::process::id(),
        own_start(),
        identity(dir),
        identity(&paths.socket),
    );
    std::fs::write(paths.sockets_dir.join(ATTESTATION_FILE), edit(text)).unwrap();
}

/// The route one call through a fresh layer took, with its reason. The layer's entry goes with
/// its service: the next call through an equal layer checks again.
async fn first_call(
    layer: tower_local_daemon::LocalDaemonLayer,
) -> (String, Option<Result<u32, FallbackReason>>) {
    let svc = layered(layer.linger(Duration::ZERO));
    let reply = echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    let route = svc
        .stats()
        .unwrap()
        .route
        .map(|r| r.map(|target| target.pid));
    (reply.into_inner().served_by, route)
}

#[tokio::test]
async fn an_attested_daemon_is_used_without_health_check_and_asked_only_when_required() {
    let dir = TestDir::new("att-used");
    echo_only_daemon(dir.path()).await;
    attest(dir.path(), |text| text);
    let layer = test_layer(dir.path()).required_version("1.0");
    let (served_by, route) = first_call(layer).await;
    assert_eq!(served_by, "daemon");
    assert_eq!(route, Some(Ok(std::process::id())));

    // Required, `Health/Check` is asked, and this daemon has none.
    let layer = test_layer(dir.path()).require_health_check(true);
    assert_eq!(
        first_call(layer).await,
        (
            "in-process".to_owned(),
            Some(Err(FallbackReason::HealthUnimplemented))
        )
    );
    let report = diagnose(dir.path()).await;
    assert!(
        format!("{report}").contains("attested by its process, HTTP/2 SETTINGS received"),
        "{report}"
    );
}

#[tokio::test]
async fn an_attestation_is_checked_as_health_check_answers_are() {
    let dir = TestDir::new("att-checked");
    echo_only_daemon(dir.path()).await;
    let pid = std::process::id();

    attest(dir.path(), |text| {
        text.replace(
            &format!("directory {}", identity(dir.path())),
            "directory 1:1",
        )
    });
    let (served_by, route) = first_call(test_layer(dir.path())).await;
    assert_eq!(served_by, "in-process");
    assert_eq!(
        route,
        Some(Err(FallbackReason::DirectoryMismatch {
            pid,
            expected: identity(dir.path()),
            served: "1:1".into(),
        }))
    );

    attest(dir.path(), |text| text);
    let layer = test_layer(dir.path()).required_version("2.0");
    assert_eq!(
        first_call(layer).await,
        (
            "in-process".to_owned(),
            Some(Err(FallbackReason::VersionMismatch {
                expected: "2.0".into(),
                actual: Some("1.0".into()),
            }))
        )
    );
    attest(dir.path(), |text| text.replace("version 1.0\n", ""));
    let layer = test_layer(dir.path()).required_version("1.0");
    assert_eq!(
        first_call(layer).await.1,
        Some(Err(FallbackReason::VersionMismatch {
            expected: "1.0".into(),
            actual: None,
        }))
    );

    attest(dir.path(), |text| text);
    let layer = test_layer(dir.path()).required_services([ECHO, "kv.Kv"]);
    assert_eq!(
        first_call(layer).await,
        (
            "in-process".to_owned(),
            Some(Err(FallbackReason::ServiceNotHosted {
                service: "kv.Kv".into()
            }))
        )
    );
    let layer = test_layer(dir.path()).required_services(["", ECHO]);
    assert_eq!(first_call(layer).await.0, "daemon");
}

#[tokio::test]
async fn an_attestation_of_another_process_socket_or_format_is_not_trusted() {
    let dir = TestDir::new("att-untrusted");
    echo_only_daemon(dir.path()).await;
    let paths = DaemonPaths::new(dir.path());
    let start = own_start();
    let (ticks, boot_id) = start.split_once(' ').unwrap();
    let other_start = format!("{} {boot_id}", ticks.parse::<u64>().unwrap() + 1);
    let edits: Vec<Box<dyn Fn(String) -> String>> = vec![
        // A daemon killed before it could remove it, whose pid this process reuses.
        Box::new(move |text: String| text.replace(&start, &other_start)),
        Box::new(|text: String| text.replace(&format!("pid {}", std::process::id()), "pid 1")),
        Box::new(|text: String| text.replace("\nsocket ", "\nsocket 9")),
        Box::new(|text: String| text.replace(" attestation 1\n", " attestation 2\n")),
        Box::new(|text: String| text.replace("\npid ", "\npid 0")),
        Box::new(|text: String| format!("{text}{}\n", "x ".repeat(9000))),
    ];
    for edit in edits {
        attest(dir.path(), edit);
        // Asked instead, this daemon answers that it has no health service.
        assert_eq!(
            first_call(test_layer(dir.path())).await,
            (
                "in-process".to_owned(),
                Some(Err(FallbackReason::HealthUnimplemented))
            ),
            "{}",
            std::fs::read_to_string(paths.sockets_dir.join(ATTESTATION_FILE)).unwrap()
        );
    }

    // Nor is one beside a lock record of another process.
    attest(dir.path(), |text| text);
    let record = std::fs::read_to_string(&paths.lock).unwrap();
    let other = record.replacen(&std::process::id().to_string(), "1", 1);
    std::fs::write(&paths.lock, other).unwrap();
    assert_eq!(
        first_call(test_layer(dir.path())).await.1,
        Some(Err(FallbackReason::HealthUnimplemented))
    );
    std::fs::write(&paths.lock, record).unwrap();

    // A second link, or a symlink, is no attestation either.
    attest(dir.path(), |text| text);
    let attestation = paths.sockets_dir.join(ATTESTATION_FILE);
    let link = dir.path().join("second-link");
    std::fs::hard_link(&attestation, &link).unwrap();
    assert_eq!(
        first_call(test_layer(dir.path())).await.1,
        Some(Err(FallbackReason::HealthUnimplemented))
    );
    std::fs::remove_file(&attestation).unwrap();
    std::os::unix::fs::symlink(&link, &attestation).unwrap();
    assert_eq!(
        first_call(test_layer(dir.path())).await.1,
        Some(Err(FallbackReason::HealthUnimplemented))
    );
}

/// An attested listener that sends `bytes` and closes, or stays open: what the first call says.
async fn attested_listener_sending(
    name: &str,
    bytes: &'static [u8],
    close: bool,
) -> FallbackReason {
    let dir = TestDir::new(name);
    let listener = listen_as_daemon(dir.path());
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, bytes)
            .await
            .unwrap();
        if !close {
            std::future::pending::<()>().await;
        }
    });
    attest(dir.path(), |text| text);
    let layer = test_layer(dir.path()).deadline(Duration::from_millis(300));
    let (served_by, route) = first_call(layer).await;
    server.abort();
    assert_eq!(served_by, "in-process");
    route.unwrap().unwrap_err()
}

#[tokio::test]
async fn an_attested_listener_that_sends_no_settings_frame_is_refused() {
    let handshake_failed = |message: &str| FallbackReason::HandshakeFailed {
        message: message.to_owned(),
    };
    assert_eq!(
        attested_listener_sending("att-short", b"\0\0\x12\x04", true).await,
        handshake_failed("the daemon closed the connection within its first frame")
    );
    assert_eq!(
        attested_listener_sending("att-garbage", b"HTTP/1.1 400 Bad Request\r\n", true).await,
        handshake_failed("the daemon's first bytes are not an HTTP/2 SETTINGS frame")
    );
    assert_eq!(
        attested_listener_sending("att-closed", b"", true).await,
        handshake_failed("the daemon closed the connection before its HTTP/2 SETTINGS")
    );
    // Part of a frame, and then nothing: the deadline, without spinning on the bytes seen.
    assert_eq!(
        attested_listener_sending("att-part", b"\0\0", false).await,
        FallbackReason::DeadlineExceeded
    );
}

/// The daemon begins to stop after the client read its attestation, before its SETTINGS come:
/// the client sees it withdrawn and asks `Health/Check` on the same connection (this daemon has
/// none, which shows it asked).
#[tokio::test]
async fn an_attestation_withdrawn_before_the_settings_arrive_is_not_trusted() {
    use tokio_stream::StreamExt;
    let dir = TestDir::new("att-withdrawn");
    let paths = DaemonPaths::new(dir.path());
    let listener = listen_as_daemon(dir.path());
    let attestation = paths.sockets_dir.join(ATTESTATION_FILE);
    let withdrawn = attestation.clone();
    // Each connection is accepted late, and the attestation removed before the server speaks.
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).then(move |conn| {
        let withdrawn = withdrawn.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = std::fs::remove_file(&withdrawn);
            conn
        }
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService::new("daemon")))
            .serve_with_incoming(incoming),
    );
    attest(dir.path(), |text| text);
    assert_eq!(
        first_call(test_layer(dir.path())).await,
        (
            "in-process".to_owned(),
            Some(Err(FallbackReason::HealthUnimplemented))
        )
    );
    assert!(!attestation.exists());
}

/// A daemon that accepts and never speaks: the connect passes, no SETTINGS come, and the
/// deadline ends the wait with nothing sent.
#[tokio::test]
async fn an_attested_daemon_that_never_sends_its_settings_hits_the_deadline() {
    let dir = TestDir::new("att-silent");
    let listener = listen_as_daemon(dir.path());
    let accepted = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut read = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut read).await;
        read
    });
    attest(dir.path(), |text| text);
    let layer = test_layer(dir.path()).deadline(Duration::from_millis(300));
    assert_eq!(
        first_call(layer).await,
        (
            "in-process".to_owned(),
            Some(Err(FallbackReason::DeadlineExceeded))
        )
    );
    // The connection closed at the deadline, and the daemon read nothing from it, not even
    // HTTP/2's preface.
    let read = tokio::time::timeout(Duration::from_secs(20), accepted)
        .await
        .expect("the connection was closed")
        .unwrap();
    assert!(read.is_empty(), "{read:?}");
}

#[test]
fn a_daemon_attests_itself_and_keeps_the_lock_record_older_clients_read() {
    let dir = TestDir::new("att-real");
    let daemon = DaemonProcess::start(dir.path());
    let paths = dir.paths();
    let text = std::fs::read_to_string(paths.sockets_dir.join(ATTESTATION_FILE)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "tower-local-daemon attestation 1");
    assert_eq!(lines[1], format!("pid {}", daemon.pid()));
    assert_eq!(lines[3], format!("directory {}", identity(dir.path())));
    assert_eq!(lines[4], format!("socket {}", identity(&paths.socket)));
    assert!(
        lines.contains(&format!("service {ECHO}").as_str()),
        "{text}"
    );
    // The lock record is still three lines, as clients before the attestation parse it.
    let record = std::fs::read_to_string(paths.sockets_dir.join(LOCK_FILE)).unwrap();
    assert_eq!(record.lines().count(), 3, "{record:?}");
    assert_eq!(
        record.lines().next(),
        Some(daemon.pid().to_string().as_str())
    );
    assert_eq!(
        &lines[2]["start ".len()..],
        record.lines().skip(1).collect::<Vec<_>>().join(" ")
    );
}

#[tokio::test]
async fn a_real_daemon_is_reached_attested_asked_and_with_its_attestation_removed() {
    let dir = TestDir::new("att-routes");
    let daemon = DaemonProcess::start(dir.path());
    let pid = daemon.pid();
    let attested = format!("{}", diagnose(dir.path()).await);
    assert!(attested.contains("attested by its process"), "{attested}");
    assert_eq!(first_call(test_layer(dir.path())).await.1, Some(Ok(pid)));
    // A client that asks, as one before the attestation did.
    let layer = test_layer(dir.path()).require_health_check(true);
    assert_eq!(first_call(layer).await.1, Some(Ok(pid)));
    // A daemon that writes none (an older one, another implementation): asked.
    std::fs::remove_file(dir.paths().sockets_dir.join(ATTESTATION_FILE)).unwrap();
    assert_eq!(first_call(test_layer(dir.path())).await.1, Some(Ok(pid)));
    let asked = format!("{}", diagnose(dir.path()).await);
    assert!(asked.contains("Health/Check SERVING"), "{asked}");
}

/// Paused after it attested itself: its kernel still completes the connect, but no SETTINGS
/// come; the call runs in-process, once, and the daemon never sees it.
#[tokio::test]
async fn a_paused_attested_daemon_hits_the_deadline_and_never_runs_the_call() {
    let dir = TestDir::new("att-paused");
    let log = dir.path().join("calls.log");
    let options = DaemonOptions {
        log: Some(log.clone()),
        ..DaemonOptions::default()
    };
    let daemon = DaemonProcess::start_with(dir.path(), options);
    assert!(dir.paths().sockets_dir.join(ATTESTATION_FILE).exists());
    daemon.pause().await;
    let layer = test_layer(dir.path()).deadline(Duration::from_millis(300));
    let result = first_call(layer).await;
    daemon.signal(Signal::SIGCONT);
    assert_eq!(
        result,
        (
            "in-process".to_owned(),
            Some(Err(FallbackReason::DeadlineExceeded))
        )
    );
    // Resumed, the daemon serves; the first call never reached it.
    assert_eq!(first_call(test_layer(dir.path())).await.0, "daemon");
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(calls.lines().count(), 1, "{calls}");
}

/// A daemon that begins to stop removes its attestation first: a client that probes it then
/// asks, and hears what a client that always asks hears.
#[tokio::test]
async fn a_stopping_daemon_is_asked_and_refused_as_before() {
    let dir = TestDir::new("att-stopping");
    let options = DaemonOptions {
        grace: Some(Duration::from_secs(20)),
        ..DaemonOptions::default()
    };
    let daemon = DaemonProcess::start_with(dir.path(), options);
    // A slow call keeps the daemon draining. Its layer differs from the ones below (its
    // deadline), so that they do not share its entry; a first call makes its connection.
    let svc = layered(test_layer(dir.path()).deadline(Duration::from_secs(6)));
    let mut client = EchoClient::new(svc);
    assert_eq!(
        echo(&mut client, 0).await.unwrap().get_ref().served_by,
        "daemon"
    );
    let slow = tokio::spawn(async move {
        client
            .echo(EchoRequest {
                message: "slow".into(),
                id: 1,
                delay_ms: 2_000,
                status_code: 0,
            })
            .await
    });
    let attestation = dir.paths().sockets_dir.join(ATTESTATION_FILE);
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.signal(Signal::SIGTERM);
    wait_until_async("the daemon withdraws its attestation", || async {
        !attestation.exists()
    })
    .await;
    for layer in [
        test_layer(dir.path()),
        test_layer(dir.path()).require_health_check(true),
    ] {
        let (served_by, route) = first_call(layer).await;
        assert_eq!(served_by, "in-process");
        // NOT_SERVING while the listener is open, refused once it closed; a connect at the very
        // moment it closes finds its backlog reset.
        assert!(
            matches!(
                &route,
                Some(Err(FallbackReason::NotServing { .. }))
                    | Some(Err(FallbackReason::ConnectionRefused))
                    | Some(Err(FallbackReason::HandshakeFailed { .. }))
            ),
            "{route:?}"
        );
    }
    assert_eq!(
        slow.await.unwrap().unwrap().into_inner().served_by,
        "daemon"
    );
    let (code, stderr) = daemon.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
}
