//! Soak and load through the layer against real daemon processes that crash, stop, pause and
//! restart. Nothing may hang, no request may run twice, and every failure must be an
//! `UNAVAILABLE` from the daemon route.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::*;
use tower_local_daemon::Route;

/// Not a test: the entry point of this binary when it is re-executed as a daemon.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

/// A small deterministic generator, so that a failing run can be repeated from its seed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn read_ids(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().expect("whole lines only"))
        .collect()
}

#[derive(Default)]
struct Outcomes {
    ok: Vec<u64>,
    failed: Vec<(u64, tonic::Status)>,
    daemon_calls: u64,
    in_process_calls: u64,
    longest: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_kills_stops_and_restarts_runs_nothing_twice() {
    const TASKS: u64 = 8;
    const MIN_CALLS: u64 = 20_000;
    const MIN_FAULTS: u64 = 20;
    let deadline = Duration::from_millis(500);
    let (ping, ping_timeout) = (Duration::from_millis(200), Duration::from_millis(300));
    // A hang is twice the deadline plus the keepalive bound, with slack for a busy machine.
    let hang = 2 * deadline + ping + ping_timeout + Duration::from_secs(5);

    let dir = TestDir::new("soak");
    let logs = TestDir::new("soak-logs");
    let daemon_log = logs.path().join("daemon.log");
    let in_process_log = logs.path().join("in-process.log");
    let options = DaemonOptions {
        log: Some(daemon_log.clone()),
        grace: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    let mut daemon = Some(DaemonProcess::start_with(dir.path(), options.clone()));

    let in_process = EchoService::new("in-process").with_log(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&in_process_log)
            .unwrap(),
    );
    let svc = tower::ServiceBuilder::new()
        .layer(
            test_layer(dir.path())
                .deadline(deadline)
                .keepalive(ping, ping_timeout)
                .reprobe_interval(Duration::from_millis(50)),
        )
        .service(EchoServer::new(in_process));

    let next_id = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (svc, next_id, stop) = (svc.clone(), next_id.clone(), stop.clone());
            tokio::spawn(async move {
                let mut client = EchoClient::new(svc);
                let mut out = Outcomes::default();
                let mut calls = 0;
                while calls < MIN_CALLS / TASKS || !stop.load(Ordering::Acquire) {
                    calls += 1;
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let request = EchoRequest {
                        message: String::new(),
                        id,
                        delay_ms: 0,
                        status_code: 0,
                    };
                    let start = Instant::now();
                    let result = tokio::time::timeout(hang, client.echo(request))
                        .await
                        .unwrap_or_else(|_| panic!("call {id} hung for {hang:?}"));
                    out.longest = out.longest.max(start.elapsed());
                    match result {
                        Ok(response) => {
                            match response.extensions().get::<Route>() {
                                Some(Route::Daemon { .. }) => out.daemon_calls += 1,
                                _ => out.in_process_calls += 1,
                            }
                            out.ok.push(id);
                        }
                        Err(status) => out.failed.push((id, status)),
                    }
                    // An in-process call never waits on the runtime: yield, so that the timers,
                    // the re-probes and the fault driver get to run on these two cores.
                    tokio::task::yield_now().await;
                }
                out
            })
        })
        .collect();

    // The faults, at random moments.
    let seed = std::process::id() as u64;
    let mut rng = Lcg(seed);
    let mut faults = 0;
    while faults < MIN_FAULTS {
        tokio::time::sleep(Duration::from_millis(30 + rng.below(150))).await;
        let current = daemon.take().expect("a daemon runs between faults");
        match rng.below(3) {
            0 => current.kill_now(),
            1 => {
                current.signal(Signal::SIGTERM);
                current.wait_exit();
            }
            _ => {
                current.signal(Signal::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(100 + rng.below(700))).await;
                current.signal(Signal::SIGCONT);
                daemon = Some(current);
                faults += 1;
                continue;
            }
        }
        faults += 1;
        tokio::time::sleep(Duration::from_millis(rng.below(100))).await;
        let dir = dir.path().to_owned();
        let options = options.clone();
        daemon = Some(
            tokio::task::spawn_blocking(move || DaemonProcess::start_with(&dir, options))
                .await
                .unwrap(),
        );
    }
    // Once the daemon is back, the route returns to it.
    let daemon_pid = daemon.as_ref().unwrap().pid();
    wait_until_async("calls return to the daemon route", || async {
        svc.stats()
            .unwrap()
            .route
            .is_some_and(|r| r.is_ok_and(|t| t.pid == daemon_pid))
    })
    .await;
    let daemon_calls_before = svc.stats().unwrap().daemon_calls;
    wait_until_async("calls are served by the daemon again", || async {
        svc.stats().unwrap().daemon_calls > daemon_calls_before + 100
    })
    .await;
    stop.store(true, Ordering::Release);

    let mut all = Outcomes::default();
    for task in tasks {
        let out = task.await.unwrap();
        all.ok.extend(out.ok);
        all.failed.extend(out.failed);
        all.daemon_calls += out.daemon_calls;
        all.in_process_calls += out.in_process_calls;
        all.longest = all.longest.max(out.longest);
    }
    drop(daemon); // flushes nothing: every line was written before its reply

    let mut executed: HashMap<u64, u32> = HashMap::new();
    for id in read_ids(&daemon_log)
        .into_iter()
        .chain(read_ids(&in_process_log))
    {
        *executed.entry(id).or_default() += 1;
    }
    let total = all.ok.len() + all.failed.len();
    println!(
        "soak (seed {seed}): {total} calls, {} on the daemon route, {} in-process, {} failed, \
         {faults} fault events, longest call {:?}",
        all.daemon_calls,
        all.in_process_calls,
        all.failed.len(),
        all.longest
    );
    assert!(total as u64 >= MIN_CALLS);
    let twice: Vec<_> = executed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "requests executed twice: {twice:?}");
    for id in &all.ok {
        assert_eq!(
            executed.get(id),
            Some(&1),
            "call {id} returned OK but ran {:?} times",
            executed.get(id)
        );
    }
    assert!(
        all.failed.len() as u64 <= TASKS * faults,
        "{} failures for {faults} faults and {TASKS} tasks",
        all.failed.len()
    );
    for (id, status) in &all.failed {
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "call {id}: {status:?}"
        );
        assert!(
            status
                .message()
                .starts_with("local daemon connection failed"),
            "call {id} failed off the daemon route: {status:?}"
        );
    }
}
