//! The layer against a real daemon in another process, through a tonic-generated client.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;
use tower_local_daemon::{
    AutoStart, FallbackReason, IdentityPolicy, Mode, Pidfile, Route, StopOutcome, Tool,
};

/// Not a test: the entry point of this binary when it is re-executed as a daemon.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

fn served_by(response: &tonic::Response<EchoReply>) -> (&str, Option<Route>) {
    (
        response.get_ref().served_by.as_str(),
        response.extensions().get::<Route>().copied(),
    )
}

#[tokio::test]
async fn running_daemon_serves_calls_and_in_process_does_not() {
    let dir = TestDir::new("daemon-route");
    let daemon = DaemonProcess::start(dir.path());
    let svc = layered(test_layer(dir.path()));
    let mut client = EchoClient::new(svc.clone());

    for id in 0..3 {
        let response = echo(&mut client, id).await.unwrap();
        assert_eq!(
            served_by(&response),
            ("daemon", Some(Route::Daemon { pid: daemon.pid() }))
        );
        assert_eq!(response.get_ref().pid, daemon.pid());
    }
    let stats = svc.stats().unwrap();
    assert_eq!((stats.daemon_calls, stats.in_process_calls), (3, 0));
    assert_eq!((stats.probes, stats.connections_built), (1, 1));
}

#[tokio::test]
async fn no_daemon_serves_in_process_with_no_pidfile_reason() {
    let dir = TestDir::new("no-daemon");
    let svc = layered(test_layer(dir.path()));
    let mut client = EchoClient::new(svc.clone());

    let response = echo(&mut client, 1).await.unwrap();
    assert_eq!(served_by(&response), ("in-process", Some(Route::InProcess)));
    let stats = svc.stats().unwrap();
    assert_eq!(stats.route, Some(Err(FallbackReason::NoPidfile)));
    assert_eq!(stats.fallbacks, vec![(FallbackReason::NoPidfile, 1)]);
    assert_eq!(stats.in_process_calls, 1);
}

#[tokio::test]
async fn stale_pidfile_of_an_exited_process_serves_in_process_as_process_gone() {
    let dir = TestDir::new("stale");
    let mut exited = std::process::Command::new("true").spawn().unwrap();
    let pid = exited.id();
    exited.wait().unwrap();
    std::fs::create_dir_all(dir.paths().sockets_dir).unwrap();
    let pidfile = Pidfile::new(pid, 1);
    std::fs::write(dir.paths().pidfile, pidfile.render()).unwrap();

    let svc = layered(test_layer(dir.path()));
    let response = echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    assert_eq!(served_by(&response), ("in-process", Some(Route::InProcess)));
    assert_eq!(
        svc.stats().unwrap().route,
        Some(Err(FallbackReason::ProcessGone))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_first_calls_share_one_probe_and_one_channel() {
    let dir = TestDir::new("single-flight");
    let daemon = DaemonProcess::start(dir.path());
    let svc = layered(test_layer(dir.path()));

    let calls: Vec<_> = (0..100)
        .map(|id| {
            let mut client = EchoClient::new(svc.clone());
            tokio::spawn(async move { echo(&mut client, id).await })
        })
        .collect();
    for call in calls {
        let response = call.await.unwrap().unwrap();
        assert_eq!(response.get_ref().pid, daemon.pid());
    }
    let stats = svc.stats().unwrap();
    assert_eq!((stats.probes, stats.connections_built), (1, 1));
    assert_eq!(stats.daemon_calls, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_first_calls_without_daemon_share_one_probe() {
    let dir = TestDir::new("single-flight-absent");
    let svc = layered(test_layer(dir.path()).reprobe_interval(Duration::from_secs(3600)));

    let calls: Vec<_> = (0..100)
        .map(|id| {
            let mut client = EchoClient::new(svc.clone());
            tokio::spawn(async move { echo(&mut client, id).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let stats = svc.stats().unwrap();
    assert_eq!(stats.probes, 1);
    assert_eq!(stats.in_process_calls, 100);
}

#[tokio::test]
async fn two_spellings_of_one_directory_share_one_entry() {
    let dir = TestDir::new("spellings");
    let a = layered(test_layer(dir.path()));
    let b = layered(test_layer(&dir.path().join(".")));
    echo(&mut EchoClient::new(a.clone()), 1).await.unwrap();
    echo(&mut EchoClient::new(b.clone()), 2).await.unwrap();
    assert_eq!(a.stats().unwrap().probes, 1);
    assert_eq!(a.stats(), b.stats());
}

#[tokio::test]
async fn killed_daemon_sends_later_calls_in_process_without_hanging() {
    let dir = TestDir::new("killed");
    let daemon = DaemonProcess::start(dir.path());
    let svc = layered(test_layer(dir.path()).reprobe_interval(Duration::from_secs(3600)));
    let mut client = EchoClient::new(svc.clone());
    assert_eq!(
        echo(&mut client, 1).await.unwrap().get_ref().served_by,
        "daemon"
    );

    daemon.kill_now();
    wait_until_async("the route is invalidated", || async {
        svc.stats().unwrap().route == Some(Err(FallbackReason::ConnectionLost))
    })
    .await;
    for id in 2..6 {
        let response = echo(&mut client, id).await.unwrap();
        assert_eq!(served_by(&response), ("in-process", Some(Route::InProcess)));
    }
    let stats = svc.stats().unwrap();
    assert_eq!((stats.daemon_calls, stats.in_process_calls), (1, 4));
}

#[tokio::test]
async fn restarted_daemon_is_picked_up_after_the_reprobe_interval() {
    let dir = TestDir::new("restarted");
    let first = DaemonProcess::start(dir.path());
    let svc = layered(test_layer(dir.path()));
    let mut client = EchoClient::new(svc.clone());
    assert_eq!(
        echo(&mut client, 1).await.unwrap().get_ref().pid,
        first.pid()
    );

    first.kill_now();
    wait_until_async("the route is invalidated", || async {
        svc.stats().unwrap().route == Some(Err(FallbackReason::ConnectionLost))
    })
    .await;
    let second = DaemonProcess::start(dir.path());
    let second_pid = second.pid();
    let mut id = 10;
    wait_until_async("calls reach the new daemon", || {
        id += 1;
        let mut client = client.clone();
        async move { echo(&mut client, id).await.unwrap().get_ref().pid == second_pid }
    })
    .await;
    assert_eq!(svc.stats().unwrap().connections_built, 2);
}

#[tokio::test]
async fn stream_whose_daemon_dies_mid_body_ends_with_unavailable() {
    let dir = TestDir::new("mid-stream");
    let daemon = DaemonProcess::start(dir.path());
    let svc = layered(test_layer(dir.path()));
    let mut client = EchoClient::new(svc);

    let request = CountRequest {
        count: 1000,
        interval_ms: 5,
    };
    let mut stream = client.count(request).await.unwrap().into_inner();
    for _ in 0..2 {
        let reply = stream.message().await.unwrap().unwrap();
        assert_eq!(reply.served_by, "daemon");
    }
    daemon.kill_now();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("the stream hung")
        {
            Ok(Some(_)) => continue, // replies already in flight
            Ok(None) => panic!("the stream ended cleanly although the daemon died"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn hung_daemon_is_noticed_by_keepalive_and_calls_go_in_process() {
    let dir = TestDir::new("hung");
    let daemon = DaemonProcess::start(dir.path());
    let svc = layered(
        test_layer(dir.path())
            .deadline(Duration::from_millis(500))
            .reprobe_interval(Duration::from_secs(3600))
            .keepalive(Duration::from_millis(200), Duration::from_millis(300)),
    );
    let mut client = EchoClient::new(svc.clone());
    assert_eq!(
        echo(&mut client, 1).await.unwrap().get_ref().served_by,
        "daemon"
    );

    daemon.pause().await;
    // Keepalive gives the connection up: the daemon's end, for every runtime. A call sent before
    // that fails with the connection (it may have run).
    let mut failed = 0;
    let response = loop {
        match echo(&mut client, 2).await {
            Ok(response) => break response,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                failed += 1;
                assert!(failed <= 1, "more than one call failed: {status:?}");
            }
        }
    };
    assert_eq!(served_by(&response), ("in-process", Some(Route::InProcess)));
    assert_eq!(
        svc.stats().unwrap().route,
        Some(Err(FallbackReason::ConnectionLost))
    );
}

#[tokio::test]
async fn require_mode_without_daemon_fails_with_unavailable_naming_the_reason() {
    let dir = TestDir::new("require");
    let svc = layered(
        test_layer(dir.path())
            .mode(Mode::Require)
            .deadline(Duration::from_millis(100)),
    );
    let status = echo(&mut EchoClient::new(svc.clone()), 1)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("no pidfile"),
        "{}",
        status.message()
    );
    assert_eq!(svc.stats().unwrap().in_process_calls, 0);
}

#[tokio::test]
async fn require_mode_uses_a_running_daemon() {
    let dir = TestDir::new("require-ok");
    let daemon = DaemonProcess::start(dir.path());
    let svc = layered(test_layer(dir.path()).mode(Mode::Require));
    let response = echo(&mut EchoClient::new(svc), 1).await.unwrap();
    assert_eq!(response.get_ref().pid, daemon.pid());
}

#[tokio::test]
async fn environment_value_beats_the_builder_and_an_invalid_one_is_ignored() {
    let dir = TestDir::new("env");
    let daemon = DaemonProcess::start(dir.path());

    let off = layered(test_layer(dir.path()).mode_env_value(Some("off")));
    assert_eq!(off.mode(), Mode::Off);
    let response = echo(&mut EchoClient::new(off.clone()), 1).await.unwrap();
    assert_eq!(served_by(&response), ("in-process", Some(Route::InProcess)));
    assert!(off.stats().is_none(), "mode off never touches the registry");

    let invalid = layered(test_layer(dir.path()).mode_env_value(Some("sometimes")));
    assert_eq!(invalid.mode(), Mode::Auto);
    let response = echo(&mut EchoClient::new(invalid), 2).await.unwrap();
    assert_eq!(response.get_ref().pid, daemon.pid());
}

#[tokio::test]
async fn version_mismatch_is_refused_and_a_match_accepted() {
    let dir = TestDir::new("version");
    let options = DaemonOptions {
        version: Some("1.0.0".into()),
        ..Default::default()
    };
    let daemon = DaemonProcess::start_with(dir.path(), options);

    let wrong = layered(test_layer(dir.path()).required_version("2.0.0"));
    let response = echo(&mut EchoClient::new(wrong.clone()), 1).await.unwrap();
    assert_eq!(response.get_ref().served_by, "in-process");
    assert_eq!(
        wrong.stats().unwrap().route,
        Some(Err(FallbackReason::VersionMismatch {
            expected: "2.0.0".into(),
            actual: Some("1.0.0".into()),
        }))
    );

    let right = layered(test_layer(dir.path()).required_version("1.0.0"));
    let response = echo(&mut EchoClient::new(right), 2).await.unwrap();
    assert_eq!(response.get_ref().pid, daemon.pid());
}

#[tokio::test]
async fn required_service_the_daemon_does_not_host_is_refused() {
    let dir = TestDir::new("not-hosted");
    let _daemon = DaemonProcess::start(dir.path());
    let svc = layered(test_layer(dir.path()).required_services(["echo.v1.Echo", "foo.v1.Foo"]));
    let response = echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
    assert_eq!(response.get_ref().served_by, "in-process");
    assert_eq!(
        svc.stats().unwrap().route,
        Some(Err(FallbackReason::ServiceNotHosted {
            service: "foo.v1.Foo".into()
        }))
    );
}

#[tokio::test]
async fn reset_forgets_the_decision_and_the_next_call_probes_again() {
    let dir = TestDir::new("reset");
    let svc = layered(test_layer(dir.path()).reprobe_interval(Duration::from_secs(3600)));
    let mut client = EchoClient::new(svc.clone());
    echo(&mut client, 1).await.unwrap();
    let daemon = DaemonProcess::start(dir.path());
    svc.reset();
    assert_eq!(svc.stats().unwrap().probes, 0);
    let response = echo(&mut client, 2).await.unwrap();
    assert_eq!(response.get_ref().pid, daemon.pid());
    assert_eq!(svc.stats().unwrap().probes, 1);
}

/// Counts the panics whose message contains `needle`, from now on, passing every panic on to
/// the hook that was installed before.
fn count_panics(needle: &'static str) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains(needle) {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    count
}

/// A runtime without a driver the checks need: its calls run in-process with a reason that
/// names the driver, and the crate's task panics once on it (through the panic hook, as
/// Tokio's panics do), never once per call.
fn runtime_without_a_driver(runtime: tokio::runtime::Runtime, driver: &str, needle: &'static str) {
    let dir = TestDir::new("no-driver");
    let _daemon = DaemonProcess::start(dir.path());
    let panics = count_panics(needle);
    let svc = layered(test_layer(dir.path()).reprobe_interval(Duration::from_millis(1)));
    for id in 0..5 {
        let response = runtime
            .block_on(EchoClient::new(svc.clone()).echo(EchoRequest {
                message: String::new(),
                id,
                delay_ms: 0,
                status_code: 0,
            }))
            .unwrap();
        assert_eq!(response.get_ref().served_by, "in-process");
        std::thread::sleep(Duration::from_millis(2));
    }
    let Some(Err(FallbackReason::RuntimeUnusable { message })) = svc.stats().unwrap().route else {
        panic!("{:?}", svc.stats());
    };
    assert!(message.contains(driver), "{message}");
    assert_eq!(panics.load(Ordering::SeqCst), 1);
}

#[test]
fn runtime_without_time_driver_runs_in_process_with_a_reason_that_says_so() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    runtime_without_a_driver(runtime, "time driver", "timers are disabled");
}

#[test]
fn runtime_without_io_driver_runs_in_process_with_a_reason_that_says_so() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime_without_a_driver(runtime, "I/O driver", "IO is disabled");
}

#[tokio::test(start_paused = true)]
async fn require_mode_waits_no_longer_than_the_deadline_even_when_an_attempt_hangs() {
    let dir = TestDir::new("require-bound");
    let paths = dir.paths();
    std::fs::create_dir(&paths.sockets_dir).unwrap();
    let pidfile = Pidfile::new(std::process::id(), 0);
    std::fs::write(&paths.pidfile, pidfile.render()).unwrap();
    // Halfway through the wait a listener appears that never answers: the attempt that
    // connects to it hangs, and must end at the deadline, not a deadline after its start.
    let socket = paths.socket.clone();
    let listener = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        std::os::unix::net::UnixListener::bind(socket).unwrap()
    });
    let deadline = Duration::from_secs(1);
    let svc = layered(
        test_layer(dir.path())
            .mode(Mode::Require)
            .deadline(deadline),
    );
    let start = tokio::time::Instant::now();
    let status = EchoClient::new(svc)
        .echo(EchoRequest::default())
        .await
        .unwrap_err();
    let waited = start.elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("exceeded the deadline"),
        "{}",
        status.message()
    );
    // Paused time: the clock moves only by the timers the layer sets, so this is exact.
    assert!(
        waited <= deadline,
        "waited {waited:?} for a {deadline:?} deadline"
    );
    drop(listener.await.unwrap());
}

#[tokio::test]
#[should_panic(expected = "called before poll_ready returned Ready(Ok)")]
async fn call_after_a_poll_ready_that_did_not_return_ready_panics_as_tower_services_do() {
    use std::task::Context;
    use tower::Service;

    let dir = TestDir::new("unready-call");
    let _daemon = DaemonProcess::start(dir.path());
    let mut svc = layered(test_layer(dir.path()));
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    // The route changes: the next readiness waits for the checks to run again.
    svc.reset();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_pending());
    drop(svc.call(http::Request::new(tonic::body::Body::empty())));
}

#[tokio::test]
async fn an_endless_deadline_and_an_empty_service_list_work() {
    let dir = TestDir::new("endless");
    let daemon = DaemonProcess::start(dir.path());
    let layer = test_layer(dir.path())
        .deadline(Duration::MAX)
        .required_services(Vec::<String>::new());
    let report = layer.diagnose().await;
    assert!(report.usable(), "{report}");
    let response = echo(&mut EchoClient::new(layered(layer)), 1).await.unwrap();
    assert_eq!(
        response.extensions().get::<Route>(),
        Some(&Route::Daemon { pid: daemon.pid() })
    );
}

/// A tool is configured in one place on each side: the daemon is given `Tool::new("kv")` (in
/// the test binary's daemon), the client the same value. A client left with heddle's marker
/// says so loudly: both markers in its reason, its stats and its report. The tool-aware forms
/// of the free functions use the tool's marker, never heddle's.
#[tokio::test]
async fn a_tool_is_configured_in_one_place_and_a_client_with_another_marker_says_so() {
    let dir = TestDir::new("marker");
    let kv = Tool::new("kv").unwrap();
    let options = DaemonOptions {
        marker: Some("kv".into()),
        ..DaemonOptions::default()
    };
    let daemon = DaemonProcess::start_with(dir.path(), options);
    let svc = layered(test_layer(dir.path()).tool(&kv));
    let response = echo(&mut EchoClient::new(svc), 1).await.unwrap();
    assert_eq!(
        served_by(&response),
        ("daemon", Some(Route::Daemon { pid: daemon.pid() }))
    );

    // A client left with heddle's marker: the reason, the stats and the report name both.
    let svc = layered(test_layer(dir.path()));
    echo(&mut EchoClient::new(svc.clone()), 2).await.unwrap();
    let mismatch = FallbackReason::MarkerMismatch {
        expected: "heddle-agent".into(),
        found: "kv".into(),
    };
    let stats = svc.stats().unwrap();
    assert_eq!(stats.route, Some(Err(mismatch.clone())));
    let [misconfigured] = &stats.misconfigured[..] else {
        panic!("{:?}", stats.misconfigured);
    };
    assert!(
        misconfigured.starts_with(
            "the pidfile's marker is \"kv\", and this client expects \"heddle-agent\": if the daemon is this tool's, give it and its clients the same `Tool`"
        ),
        "{misconfigured}"
    );
    let report = test_layer(dir.path()).diagnose().await;
    assert_eq!(report.reason(), Some(&mismatch));
    assert!(report.to_string().contains("the same `Tool`"), "{report}");

    // An environment value nobody understands is in the stats and the report too.
    let confused = test_layer(dir.path())
        .tool(&kv)
        .mode_env_value(Some("Sometimes"));
    let svc = layered(confused.clone());
    echo(&mut EchoClient::new(svc.clone()), 3).await.unwrap();
    let stats = svc.stats().unwrap();
    assert_eq!(stats.route.unwrap().unwrap().pid, daemon.pid());
    let expected = "the injected value=\"Sometimes\" is not understood";
    assert!(
        stats.misconfigured[0].starts_with(expected),
        "{:?}",
        stats.misconfigured
    );
    let report = confused.diagnose().await.to_string();
    assert!(
        report.starts_with(&format!("[WARN] misconfigured: {expected}")),
        "{report}"
    );

    // The free functions read heddle's files; the tool's forms read the tool's.
    assert_eq!(
        kv.probe(dir.path()).status,
        tower_local_daemon::LocalDaemonStatus::Running { pid: daemon.pid() }
    );
    assert_eq!(kv.detect(dir.path()).map(|t| t.pid), Some(daemon.pid()));
    let refused = tower_local_daemon::stop(dir.path(), Duration::from_secs(10)).await;
    assert_eq!(refused, StopOutcome::Refused { reason: mismatch });
    let stopped = kv.stop(dir.path(), Duration::from_secs(10)).await;
    assert_eq!(stopped, StopOutcome::Stopped { pid: daemon.pid() });
}

/// A tool whose daemon is another executable names it once, in its `Tool`: the layer and the
/// tool-aware functions then accept that daemon, and refuse one running the client's own.
#[tokio::test]
async fn a_tool_whose_daemon_is_another_executable_accepts_that_one_only() {
    let dir = TestDir::new("tool-daemon-program");
    let kvd = dir.path().join("kvd");
    copy_of_this_binary(&kvd);
    let options = DaemonOptions {
        program: Some(kvd.clone()),
        marker: Some("kv".into()),
        ..DaemonOptions::default()
    };
    let daemon = DaemonProcess::start_with(dir.path(), options);
    let kv = Tool::new("kv").unwrap().with_daemon_program(&kvd);
    let running = tower_local_daemon::LocalDaemonStatus::Running { pid: daemon.pid() };
    assert_eq!(kv.probe(dir.path()).status, running);
    let report = kv.diagnose(dir.path()).await;
    assert!(report.usable(), "{report}");
    let svc = layered(test_layer(dir.path()).tool(&kv));
    let response = echo(&mut EchoClient::new(svc), 1).await.unwrap();
    assert_eq!(
        served_by(&response),
        ("daemon", Some(Route::Daemon { pid: daemon.pid() }))
    );
    // Without the daemon's program, the client's own executable is expected.
    let same = Tool::new("kv").unwrap();
    assert_eq!(
        same.probe(dir.path()).status.reason(),
        Some(&FallbackReason::ExecutableMismatch)
    );
    let stopped = kv.stop(dir.path(), Duration::from_secs(10)).await;
    assert_eq!(stopped, StopOutcome::Stopped { pid: daemon.pid() });
}

/// A daemon that is a separate program: with auto-start of that program and no identity of its
/// own, a layer accepts only a daemon running it, also when auto-start is switched off, so the
/// identity never changes with the environment.
#[tokio::test]
async fn the_identity_is_the_auto_start_program_unless_one_is_given() {
    let dir = TestDir::new("identity-from-program");
    let daemon = DaemonProcess::start(dir.path());
    let other = AutoStart::sibling("kvd").arg("serve");
    for switch in [None, Some("0")] {
        tower_local_daemon::reset(dir.path());
        let layer = test_layer(dir.path())
            .auto_start(other.clone())
            .auto_start_env_value(switch);
        let svc = layered(layer.clone());
        echo(&mut EchoClient::new(svc.clone()), 1).await.unwrap();
        assert_eq!(
            svc.stats().unwrap().route,
            Some(Err(FallbackReason::ExecutableMismatch)),
            "{switch:?}"
        );
        // An identity given explicitly wins.
        let svc = layered(layer.identity(IdentityPolicy::SameExecutable));
        let response = echo(&mut EchoClient::new(svc), 2).await.unwrap();
        assert_eq!(
            served_by(&response),
            ("daemon", Some(Route::Daemon { pid: daemon.pid() }))
        );
    }
}

/// The daemon process's open connections: its socket descriptors beyond the listener's.
fn daemon_sockets(daemon: &DaemonProcess) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

#[tokio::test]
async fn an_idle_connection_closes_when_its_route_is_reset_not_at_its_next_ping() {
    let dir = TestDir::new("l-idle-close");
    let daemon = DaemonProcess::start(dir.path());
    let before = daemon_sockets(&daemon);
    // No ping for an hour: only the close itself can wake the idle connection's task.
    let hour = Duration::from_secs(3600);
    let svc = layered(test_layer(dir.path()).keepalive(hour, hour));
    // A client that keeps its route (and so a handle on the connection) while idle.
    let mut client = EchoClient::new(svc.clone());
    echo(&mut client, 0).await.unwrap();
    wait_until_async("the daemon holds the connection", || async {
        daemon_sockets(&daemon) == before + 1
    })
    .await;
    svc.reset();
    wait_until_async("the daemon sees the connection closed", || async {
        daemon_sockets(&daemon) == before
    })
    .await;
    // Its next call finds the route reset, checks again, and goes over a new connection.
    let reply = echo(&mut client, 1).await.unwrap();
    assert_eq!(reply.get_ref().served_by, "daemon");
    wait_until_async("the daemon holds the new connection", || async {
        daemon_sockets(&daemon) == before + 1
    })
    .await;
}

/// The reason of a call that failed in mode `require`, and the reason the entry records.
async fn required_failure(layer: tower_local_daemon::LocalDaemonLayer) -> (String, FallbackReason) {
    let svc = layered(layer.mode(Mode::Require));
    let status = echo(&mut EchoClient::new(svc.clone()), 1)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let reason = svc.stats().unwrap().route.unwrap().unwrap_err();
    (status.message().to_owned(), reason)
}

#[tokio::test]
async fn require_mode_reports_a_definitive_rejection_not_the_deadline() {
    // A daemon whose sockets directory was moved into another repository: it serves that one.
    let a = TestDir::new("require-moved-a");
    let b = TestDir::new("require-moved-b");
    let _daemon = DaemonProcess::start(a.path());
    std::fs::rename(a.paths().sockets_dir, b.paths().sockets_dir).unwrap();
    let (message, reason) = required_failure(test_layer(b.path())).await;
    assert!(
        matches!(reason, FallbackReason::DirectoryMismatch { .. }),
        "{reason:?}"
    );
    assert!(message.contains("serves another directory"), "{message}");
    std::fs::rename(b.paths().sockets_dir, a.paths().sockets_dir).unwrap();

    // A listener of ours (this process, which the pidfile names) that speaks garbage.
    let dir = TestDir::new("require-garbage");
    let paths = dir.paths();
    std::fs::create_dir(&paths.sockets_dir).unwrap();
    std::fs::write(&paths.pidfile, Pidfile::new(std::process::id(), 0).render()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&paths.socket).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let _ = std::io::Write::write_all(&mut stream, b"this is not HTTP/2 at all\r\n\r\n");
            held.push(stream);
        }
    });
    let (message, reason) = required_failure(test_layer(dir.path())).await;
    assert!(
        matches!(reason, FallbackReason::HandshakeFailed { .. }),
        "{reason:?}: {message}"
    );
}

#[tokio::test]
async fn require_mode_fails_a_start_that_cannot_happen_at_once_naming_why() {
    // A program that does not exist.
    let dir = TestDir::new("require-missing-program");
    let layer = test_layer(dir.path())
        .auto_start(tower_local_daemon::AutoStart::new("/no/such/daemon"))
        .force_auto_start(true);
    let (message, reason) = required_failure(layer).await;
    assert!(
        matches!(reason, FallbackReason::AutoStartFailed { .. }),
        "{reason:?}"
    );
    assert!(message.contains("/no/such/daemon"), "{message}");

    // A start while starts back off: the first start's daemon exited at once.
    let dir = TestDir::new("require-backoff");
    let broken = tower_local_daemon::AutoStart::new("/bin/sh")
        .args(["-c", "echo the daemon is broken >&2; exit 1"]);
    let layer = test_layer(dir.path())
        .auto_start(broken)
        .force_auto_start(true);
    let (message, _) = required_failure(layer.clone()).await;
    assert!(message.contains("exited"), "{message}");
    tower_local_daemon::reset(dir.path());
    let (message, reason) = required_failure(layer).await;
    assert!(
        matches!(reason, FallbackReason::AutoStartFailed { .. }),
        "{reason:?}"
    );
    assert!(message.contains("backing off"), "{message}");
    assert!(message.contains("the daemon is broken"), "{message}");
}
