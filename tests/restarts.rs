//! Restarts the verb never sees, against real daemon processes: a graceful stop fails no call
//! (streams the daemon never processed run in-process), and a call of an idempotent method
//! whose connection breaks before its answer runs again in-process, while every other call
//! still runs at most once.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;
use tonic::Code;
use tower::ServiceBuilder;
use tower_local_daemon::{LocalDaemonLayer, Route};

/// Not a test: the entry point of this binary when it is re-executed as a daemon.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

const ECHO: &str = "/echo.v1.Echo/Echo";

/// Every request id a log holds, with how many times it ran there.
fn executed(logs: &[&Path]) -> HashMap<u64, u32> {
    let mut runs = HashMap::new();
    for log in logs {
        for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
            *runs
                .entry(line.parse().expect("whole lines only"))
                .or_default() += 1;
        }
    }
    runs
}

/// A layered service whose in-process echo service logs every request id to `log`.
fn logged(layer: LocalDaemonLayer, log: &Path) -> Layered {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    ServiceBuilder::new().layer(layer).service(EchoServer::new(
        EchoService::new("in-process").with_log(file),
    ))
}

/// A layer for the chaos runs: quick re-probes, and keepalive generous enough that a busy
/// machine never looks like a hung daemon.
fn chaos_layer(dir: &Path) -> LocalDaemonLayer {
    test_layer(dir)
        .reprobe_interval(Duration::from_millis(20))
        .keepalive(Duration::from_secs(5), Duration::from_secs(10))
}

/// Two threads that spin until dropped: the load a busy CI machine puts beside the test.
struct Spinners(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);

impl Spinners {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self(stop, threads)
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for thread in self.1.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What a caller's calls came to.
#[derive(Default)]
struct Tally {
    ok: Vec<u64>,
    failed: Vec<(u64, tonic::Status)>,
    daemon: u64,
    in_process: u64,
    rerun: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.ok.extend(other.ok);
        self.failed.extend(other.failed);
        self.daemon += other.daemon;
        self.in_process += other.in_process;
        self.rerun += other.rerun;
    }
}

/// `callers` tasks that call `svc` until `stop`, each pausing `pace` between calls so that a
/// route's share of the calls is its share of the time.
fn callers(
    svc: &Layered,
    callers: usize,
    next_id: &Arc<AtomicU64>,
    stop: &Arc<AtomicBool>,
    pace: Duration,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    (0..callers)
        .map(|_| {
            let (svc, next_id, stop) = (svc.clone(), next_id.clone(), stop.clone());
            tokio::spawn(async move {
                let mut client = EchoClient::new(svc);
                let mut tally = Tally::default();
                while !stop.load(Ordering::Acquire) {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    match echo(&mut client, id).await {
                        Ok(response) => {
                            match response.extensions().get::<Route>() {
                                Some(Route::Daemon { .. }) => tally.daemon += 1,
                                Some(Route::Rerun { .. }) => tally.rerun += 1,
                                _ => tally.in_process += 1,
                            }
                            tally.ok.push(id);
                        }
                        Err(status) => tally.failed.push((id, status)),
                    }
                    tokio::time::sleep(pace).await;
                }
                tally
            })
        })
        .collect()
}

async fn start_daemon(dir: &Path, options: &DaemonOptions) -> DaemonProcess {
    let (dir, options) = (dir.to_owned(), options.clone());
    tokio::task::spawn_blocking(move || DaemonProcess::start_with(&dir, options))
        .await
        .unwrap()
}

/// Waits until `svc`'s calls go to the daemon `pid` again.
async fn back_on_the_daemon(svc: &Layered, pid: u32) {
    wait_until_async("calls go to the restarted daemon", || async {
        svc.stats()
            .unwrap()
            .route
            .is_some_and(|r| r.is_ok_and(|t| t.pid == pid))
    })
    .await;
}

fn logs_dir(name: &str) -> (TestDir, PathBuf, PathBuf, PathBuf) {
    let logs = TestDir::new(name);
    let daemon = logs.path().join("daemon.log");
    let first = logs.path().join("in-process-1.log");
    let second = logs.path().join("in-process-2.log");
    (logs, daemon, first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_graceful_restarts_under_eight_callers_fail_no_call() {
    const CYCLES: usize = 30;
    let dir = TestDir::new("graceful-restarts");
    let (_logs, daemon_log, in_process_log, _) = logs_dir("graceful-restarts-logs");
    let options = DaemonOptions {
        log: Some(daemon_log.clone()),
        ..Default::default()
    };
    let mut daemon = start_daemon(dir.path(), &options).await;
    let svc = logged(chaos_layer(dir.path()), &in_process_log);
    let _spinners = Spinners::start();
    let (next_id, stop) = (
        Arc::new(AtomicU64::new(1)),
        Arc::new(AtomicBool::new(false)),
    );
    let tasks = callers(&svc, 8, &next_id, &stop, Duration::from_micros(200));

    for cycle in 0..CYCLES {
        back_on_the_daemon(&svc, daemon.pid()).await;
        tokio::time::sleep(Duration::from_millis(20 + (cycle as u64 * 7) % 60)).await;
        daemon.signal(Signal::SIGTERM);
        let (code, stderr) = tokio::task::spawn_blocking(move || daemon.wait_exit())
            .await
            .unwrap();
        assert_eq!(code, Some(0), "{stderr}");
        daemon = start_daemon(dir.path(), &options).await;
    }
    back_on_the_daemon(&svc, daemon.pid()).await;
    stop.store(true, Ordering::Release);
    let mut all = Tally::default();
    for task in tasks {
        all.add(task.await.unwrap());
    }
    let stats = svc.stats().unwrap();
    println!(
        "{CYCLES} SIGTERM restarts: {} calls, {} on the daemon, {} in-process ({} rerouted \
         after the daemon did not take them), {} failed",
        all.ok.len() + all.failed.len(),
        all.daemon,
        all.in_process,
        stats.rerouted_calls,
        all.failed.len()
    );
    assert!(all.failed.is_empty(), "failed calls: {:?}", all.failed);
    assert!(all.daemon > 0 && all.in_process > 0);
    let runs = executed(&[&daemon_log, &in_process_log]);
    for id in &all.ok {
        assert_eq!(
            runs.get(id),
            Some(&1),
            "call {id} ran {:?} times",
            runs.get(id)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_calls_survive_fifteen_kills_and_other_calls_never_run_twice() {
    const KILLS: usize = 15;
    let dir = TestDir::new("kills");
    let (_logs, daemon_log, idempotent_log, other_log) = logs_dir("kills-logs");
    let options = DaemonOptions {
        log: Some(daemon_log.clone()),
        ..Default::default()
    };
    let mut daemon = start_daemon(dir.path(), &options).await;
    let idempotent = logged(
        chaos_layer(dir.path()).idempotent_methods([ECHO]),
        &idempotent_log,
    );
    let other = logged(chaos_layer(dir.path()), &other_log);
    let pace = Duration::from_millis(1);
    let (next_id, stop) = (
        Arc::new(AtomicU64::new(1)),
        Arc::new(AtomicBool::new(false)),
    );
    let idempotent_tasks = callers(&idempotent, 8, &next_id, &stop, pace);
    let other_tasks = callers(&other, 8, &next_id, &stop, pace);

    for kill in 0..KILLS {
        back_on_the_daemon(&idempotent, daemon.pid()).await;
        tokio::time::sleep(Duration::from_millis(300 + (kill as u64 * 37) % 200)).await;
        daemon.kill_now();
        daemon = start_daemon(dir.path(), &options).await;
    }
    back_on_the_daemon(&idempotent, daemon.pid()).await;
    stop.store(true, Ordering::Release);
    let (mut reads, mut writes) = (Tally::default(), Tally::default());
    for task in idempotent_tasks {
        reads.add(task.await.unwrap());
    }
    for task in other_tasks {
        writes.add(task.await.unwrap());
    }
    drop(daemon);
    let stats = idempotent.stats().unwrap();
    let total = reads.ok.len() + reads.failed.len();
    println!(
        "{KILLS} SIGKILLs, idempotent: {total} calls, {} on the daemon, {} in-process, {} run \
         again in-process, {} failed; other: {} calls, {} failed; entry: {} re-runs, {} reroutes",
        reads.daemon,
        reads.in_process,
        reads.rerun,
        reads.failed.len(),
        writes.ok.len() + writes.failed.len(),
        writes.failed.len(),
        stats.rerun_calls,
        stats.rerouted_calls,
    );
    assert!(
        reads.failed.is_empty(),
        "idempotent calls failed: {:?}",
        reads.failed
    );
    assert!(
        reads.daemon * 10 >= total as u64 * 3,
        "{} of {total} idempotent calls on the daemon",
        reads.daemon
    );
    assert_eq!(reads.rerun, stats.rerun_calls);

    // The other calls ran at most once, and each one that returned OK ran exactly once.
    let runs = executed(&[&daemon_log, &other_log]);
    let twice: Vec<_> = writes
        .ok
        .iter()
        .chain(writes.failed.iter().map(|(id, _)| id))
        .filter(|id| runs.get(id).is_some_and(|n| *n > 1))
        .collect();
    assert!(twice.is_empty(), "calls that ran twice: {twice:?}");
    for id in &writes.ok {
        assert_eq!(
            runs.get(id),
            Some(&1),
            "call {id} ran {:?} times",
            runs.get(id)
        );
    }
    for (id, status) in &writes.failed {
        assert_eq!(status.code(), Code::Unavailable, "call {id}: {status:?}");
        assert!(
            status.message().contains("may have run on the daemon"),
            "call {id}: {status:?}"
        );
    }
}

/// A daemon and a layer whose every method is idempotent, with the first call's route decided.
async fn all_idempotent(name: &str) -> (TestDir, DaemonProcess, Layered) {
    let dir = TestDir::new(name);
    let daemon = start_daemon(dir.path(), &DaemonOptions::default()).await;
    let svc = layered(test_layer(dir.path()).idempotent(|_| true));
    let first = echo(&mut EchoClient::new(svc.clone()), 0).await.unwrap();
    assert_eq!(
        first.extensions().get::<Route>(),
        Some(&Route::Daemon { pid: daemon.pid() })
    );
    (dir, daemon, svc)
}

#[tokio::test]
async fn a_status_from_the_daemons_handler_is_an_answer_and_does_not_run_again() {
    let (_dir, _daemon, svc) = all_idempotent("rerun-status").await;
    let request = EchoRequest {
        message: String::new(),
        id: 1,
        delay_ms: 0,
        status_code: Code::Unavailable as i32,
    };
    let status = EchoClient::new(svc.clone())
        .echo(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "the request asked for this status");
    assert_eq!(svc.stats().unwrap().rerun_calls, 0);
    assert_eq!(svc.stats().unwrap().in_process_calls, 0);
}

#[tokio::test]
async fn a_streaming_upload_does_not_run_again_when_its_daemon_dies() {
    let (dir, daemon, svc) = all_idempotent("rerun-upload").await;
    let outcome = dir.path().join("sink-outcome");
    let mut grpc = tonic::client::Grpc::new(svc.clone());
    grpc.ready().await.unwrap();
    // One message, then a body that never ends: the upload streams in a task of its own.
    let first = EchoRequest {
        message: "x".repeat(100),
        id: 1,
        delay_ms: 0,
        status_code: 0,
    };
    let messages = tokio_stream::StreamExt::chain(
        tokio_stream::iter([first]),
        tokio_stream::pending::<EchoRequest>(),
    );
    let mut request = tonic::Request::new(messages);
    request.metadata_mut().insert(
        sink::OUTCOME_FILE_HEADER,
        outcome.to_str().unwrap().parse().unwrap(),
    );
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let call =
        tokio::spawn(async move { grpc.client_streaming(request, sink::path(), codec).await });
    wait_until_async("the daemon reads the upload", || async {
        std::fs::read_to_string(&outcome).is_ok_and(|o| o.contains("read"))
    })
    .await;
    daemon.kill_now();
    let status = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the upload hung")
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("may have run"), "{status:?}");
    assert_eq!(svc.stats().unwrap().rerun_calls, 0);
}

#[tokio::test]
async fn a_break_after_the_response_head_does_not_run_again() {
    let (_dir, daemon, svc) = all_idempotent("rerun-after-head").await;
    let mut client = EchoClient::new(svc.clone());
    let request = CountRequest {
        count: 1_000,
        interval_ms: 20,
    };
    let mut stream = client.count(request).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    daemon.kill_now();
    let error = loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("the stream hung")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended cleanly after its daemon was killed"),
            Err(status) => break status,
        }
    };
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    assert_eq!(svc.stats().unwrap().rerun_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_daemon_given_up_by_keepalive_runs_the_call_in_process_and_may_run_it_too() {
    let dir = TestDir::new("rerun-paused");
    let (_logs, daemon_log, in_process_log, _) = logs_dir("rerun-paused-logs");
    let options = DaemonOptions {
        log: Some(daemon_log.clone()),
        ..Default::default()
    };
    let daemon = start_daemon(dir.path(), &options).await;
    let layer = test_layer(dir.path())
        .idempotent_methods([ECHO])
        .keepalive(Duration::from_millis(200), Duration::from_millis(300));
    let svc = logged(layer, &in_process_log);
    let mut client = EchoClient::new(svc.clone());
    echo(&mut client, 1).await.unwrap();

    daemon.pause().await;
    let mut request = tonic::Request::new(EchoRequest {
        message: String::new(),
        id: 2,
        delay_ms: 0,
        status_code: 0,
    });
    request.set_timeout(Duration::from_secs(10));
    let response = tokio::time::timeout(Duration::from_secs(20), client.echo(request))
        .await
        .expect("the call hung")
        .unwrap();
    assert_eq!(
        response.extensions().get::<Route>(),
        Some(&Route::Rerun { pid: daemon.pid() })
    );
    assert_eq!(svc.stats().unwrap().rerun_calls, 1);
    assert_eq!(executed(&[&in_process_log]).get(&2), Some(&1));

    // The paused daemon still has the request in its socket. Woken, it reads it and may run
    // it too (the server cancels a call whose connection is gone only when it sees that
    // first): that is why only a method safe to run twice, in any order, may be run again.
    daemon.signal(Signal::SIGCONT);
    let mut id = 3;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let response = echo(&mut client, id).await.unwrap();
        if response.extensions().get::<Route>() == Some(&Route::Daemon { pid: daemon.pid() }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "calls never returned to the daemon"
        );
        id += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ran = executed(&[&daemon_log]).get(&2).copied().unwrap_or(0);
    println!("the woken daemon ran the request {ran} time(s) after its in-process re-run");
    assert!(ran <= 1);
}

#[tokio::test]
async fn a_request_that_exceeds_its_deadline_in_the_rerun_is_cancelled_as_over_a_bare_channel() {
    let dir = TestDir::new("rerun-deadline");
    let daemon = start_daemon(dir.path(), &DaemonOptions::default()).await;
    let layer = test_layer(dir.path())
        .idempotent_methods([ECHO])
        .keepalive(Duration::from_millis(200), Duration::from_millis(300));
    let svc = layered(layer);
    let mut client = EchoClient::new(svc.clone());
    echo(&mut client, 1).await.unwrap();
    daemon.pause().await;
    // Keepalive gives up within 500 ms; the in-process run then takes longer than what is
    // left of the call's 3 s.
    let mut request = tonic::Request::new(EchoRequest {
        message: String::new(),
        id: 2,
        delay_ms: 10_000,
        status_code: 0,
    });
    request.set_timeout(Duration::from_secs(3));
    let status = tokio::time::timeout(Duration::from_secs(20), client.echo(request))
        .await
        .expect("the call hung")
        .unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert_eq!(status.message(), "Timeout expired");
    assert_eq!(svc.stats().unwrap().rerun_calls, 1);
    daemon.signal(Signal::SIGCONT);
}
