//! Any tokio runtime can call through one layer: several at once, one per verb, an idle one
//! beside a busy one, one that panics. Each against a real daemon process, with bounded waits.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;
use tokio::runtime::Runtime;
use tower::ServiceBuilder;
use tower_local_daemon::{LazyFallback, Route};

/// Not a test: the entry point of this binary when it is re-executed.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One call on `runtime`: the route that served it.
fn route_of(runtime: &Runtime, svc: &Layered, id: u64) -> Option<Route> {
    runtime.block_on(async {
        let response = echo(&mut EchoClient::new(svc.clone()), id).await.unwrap();
        response.extensions().get::<Route>().copied()
    })
}

#[test]
fn a_second_runtime_calls_while_the_first_one_idles() {
    let dir = TestDir::new("rt-idle");
    let daemon = DaemonProcess::start(dir.path());
    let daemon_route = Some(Route::Daemon { pid: daemon.pid() });
    let svc = layered(test_layer(dir.path()));
    let first = current_thread();
    assert_eq!(route_of(&first, &svc, 0), daemon_route);
    // `first` stays alive and is never driven again: a request queued on its connection would
    // wait for ever.
    let second = current_thread();
    for id in 1..=5 {
        assert_eq!(route_of(&second, &svc, id), daemon_route);
    }
    drop(first);
}

#[test]
fn forty_verbs_each_on_its_own_runtime_use_the_daemon() {
    let dir = TestDir::new("rt-per-verb");
    let daemon = DaemonProcess::start(dir.path());
    let layer = test_layer(dir.path());
    let on_daemon = (0..40)
        .filter(|&verb| {
            // As a CLI does: a runtime and a service per verb, both dropped after it.
            let runtime = current_thread();
            let svc = layered(layer.clone());
            route_of(&runtime, &svc, verb) == Some(Route::Daemon { pid: daemon.pid() })
        })
        .count();
    assert_eq!(on_daemon, 40, "{on_daemon} of 40 verbs used the daemon");
}

#[test]
fn a_runtime_dropped_while_a_panic_unwinds_leaves_the_entry_usable() {
    let dir = TestDir::new("rt-panic");
    let svc = layered(test_layer(dir.path()));
    // No daemon yet: the decision is negative, and its re-probe is armed on a runtime that
    // then goes away in the middle of a panic.
    let first = svc.clone();
    let panicked = std::thread::spawn(move || {
        let runtime = current_thread();
        assert_eq!(route_of(&runtime, &first, 0), Some(Route::InProcess));
        panic!("the verb failed; its runtime is dropped while this unwinds");
    })
    .join();
    assert!(panicked.is_err());
    let daemon = DaemonProcess::start(dir.path());
    let runtime = current_thread();
    let deadline = Instant::now() + Duration::from_secs(20);
    while route_of(&runtime, &svc, 1) != Some(Route::Daemon { pid: daemon.pid() }) {
        assert!(Instant::now() < deadline, "the daemon was never picked up");
        std::thread::sleep(Duration::from_millis(20));
    }

    // And after a daemon call, the same again: the next runtime's first call uses the daemon.
    let second = svc.clone();
    let panicked = std::thread::spawn(move || {
        let runtime = current_thread();
        route_of(&runtime, &second, 2);
        panic!("the verb failed after a daemon call");
    })
    .join();
    assert!(panicked.is_err());
    assert_eq!(
        route_of(&current_thread(), &svc, 3),
        Some(Route::Daemon { pid: daemon.pid() })
    );
}

#[test]
fn four_runtimes_sharing_a_directory_lose_no_call_when_another_runtime_ends() {
    let dir = TestDir::new("rt-parallel");
    let daemon = DaemonProcess::start(dir.path());
    let layer = test_layer(dir.path());
    let errors = AtomicUsize::new(0);
    let on_daemon = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for worker in 0..4u64 {
            let (layer, errors, on_daemon) = (&layer, &errors, &on_daemon);
            scope.spawn(move || {
                // As parallel `#[tokio::test]`s do: a runtime and a service each.
                let runtime = current_thread();
                let mut client = EchoClient::new(layered(layer.clone()));
                runtime.block_on(async {
                    for call in 0..1_000 {
                        match echo(&mut client, worker * 10_000 + call).await {
                            Ok(response) if response.get_ref().served_by == "daemon" => {
                                on_daemon.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            });
        }
        // Meanwhile another runtime calls, and ends.
        let layer = &layer;
        scope.spawn(move || {
            for round in 0..5 {
                let runtime = current_thread();
                let svc = layered(layer.clone());
                route_of(&runtime, &svc, 100_000 + round);
                drop(runtime);
            }
        });
    });
    assert_eq!(errors.load(Ordering::Relaxed), 0);
    assert_eq!(on_daemon.load(Ordering::Relaxed), 4_000);
    drop(daemon);
}

#[test]
fn a_lazy_fallback_build_cut_short_by_its_runtime_is_built_again_on_the_next() {
    let builds = Arc::new(AtomicUsize::new(0));
    let counted = builds.clone();
    let fallback = LazyFallback::new(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, std::convert::Infallible>(EchoServer::new(EchoService::new("in-process")))
        }
    });
    let dir = TestDir::new("rt-lazy");
    let svc = ServiceBuilder::new()
        .layer(test_layer(dir.path()))
        .service(fallback);
    let first = current_thread();
    first.block_on(async {
        // The call gives up before the build ends; the build goes on until its runtime ends.
        let mut client = EchoClient::new(svc.clone());
        let call = client.echo(EchoRequest::default());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), call)
                .await
                .is_err()
        );
    });
    drop(first);
    let second = current_thread();
    let reply = second.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(20),
            EchoClient::new(svc.clone()).echo(EchoRequest::default()),
        )
        .await
        .expect("the call hung")
        .unwrap()
    });
    assert_eq!(reply.get_ref().served_by, "in-process");
    assert_eq!(builds.load(Ordering::Relaxed), 2);
    // The finished build is the whole process's: a third runtime does not build.
    current_thread().block_on(async {
        EchoClient::new(svc.clone())
            .echo(EchoRequest::default())
            .await
            .unwrap();
    });
    assert_eq!(builds.load(Ordering::Relaxed), 2);
}

#[test]
fn released_entries_close_their_connections_and_end_their_tasks() {
    let dir = TestDir::new("rt-release");
    let _daemon = DaemonProcess::start(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tasks = || runtime.handle().metrics().num_alive_tasks();
    // A first entry, released, so that lazily made process-wide state exists before counting.
    let warm = layered(test_layer(dir.path()).linger(Duration::ZERO));
    route_of(&runtime, &warm, 0);
    drop(warm);
    wait_until("the first entry's tasks end", || tasks() == 0);
    let (fds, alive) = (open_fds(), tasks());
    for i in 1..=100u64 {
        // Each with its own options, so each is an entry of its own.
        let layer = test_layer(dir.path())
            .linger(Duration::ZERO)
            .reprobe_interval(Duration::from_millis(100 + i));
        let svc = layered(layer);
        assert!(matches!(
            route_of(&runtime, &svc, i),
            Some(Route::Daemon { .. })
        ));
    }
    wait_until("every connection of the released entries closes", || {
        open_fds() <= fds
    });
    wait_until("no task of theirs is left", || tasks() <= alive);
}

#[test]
fn a_service_rebuilt_per_verb_on_one_runtime_keeps_its_warm_connection() {
    let dir = TestDir::new("rt-linger");
    let _daemon = DaemonProcess::start(dir.path());
    let runtime = current_thread();
    let layer = test_layer(dir.path()).linger(Duration::from_secs(30));
    for verb in 0..5 {
        let svc = layered(layer.clone());
        assert!(matches!(
            route_of(&runtime, &svc, verb),
            Some(Route::Daemon { .. })
        ));
        let stats = svc.stats().unwrap();
        assert_eq!(
            (stats.probes, stats.connections_built),
            (1, 1),
            "verb {verb}"
        );
    }
}

#[test]
fn a_tight_loop_of_in_process_calls_still_picks_up_a_daemon_started_later() {
    let dir = TestDir::new("rt-coop");
    let svc = layered(test_layer(dir.path()).reprobe_interval(Duration::from_millis(50)));
    let runtime = current_thread();
    assert_eq!(route_of(&runtime, &svc, 0), Some(Route::InProcess));
    let starter = {
        let dir = dir.path().to_owned();
        std::thread::spawn(move || DaemonProcess::start(&dir))
    };
    // The loop never yields by itself: only the in-process calls' cooperative budget lets the
    // background re-probe run on this one-thread runtime.
    let picked_up = runtime.block_on(async {
        let mut client = EchoClient::new(svc.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let response = client.echo(EchoRequest::default()).await.unwrap();
            if response.get_ref().served_by == "daemon" {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    });
    let daemon = starter.join().unwrap();
    assert!(picked_up, "the daemon was never picked up");
    assert_eq!(
        svc.stats().unwrap().route.map(|r| r.map(|t| t.pid)),
        Some(Ok(daemon.pid()))
    );
}
