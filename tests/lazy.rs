//! The lazily built fallback: built only when a call runs in-process, once for all clones, and
//! built again after a failed build.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use support::*;
use tokio_test::task::spawn;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::ServiceBuilder;
use tower_local_daemon::{LazyFallback, Route};

/// Not a test: the entry point of this binary when it is re-executed as a daemon.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

type Built =
    std::pin::Pin<Box<dyn Future<Output = Result<EchoServer<EchoService>, String>> + Send>>;

/// A fallback whose builds are counted; the first `fail_first` builds fail.
fn counted_fallback(
    builds: Arc<AtomicU32>,
    fail_first: u32,
) -> LazyFallback<impl Fn() -> Built + Send + Sync + 'static, EchoServer<EchoService>> {
    LazyFallback::new(move || {
        let builds = builds.clone();
        Box::pin(async move {
            let n = builds.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if n < fail_first {
                Err("the repository is locked".to_owned())
            } else {
                Ok(EchoServer::new(EchoService::new("in-process")))
            }
        }) as Built
    })
}

fn request(id: u64) -> EchoRequest {
    EchoRequest {
        message: String::new(),
        id,
        delay_ms: 0,
        status_code: 0,
    }
}

#[tokio::test]
async fn fallback_is_never_built_while_the_daemon_serves() {
    let dir = TestDir::new("lazy-daemon");
    let daemon = DaemonProcess::start(dir.path());
    let builds = Arc::new(AtomicU32::new(0));
    let fallback = counted_fallback(builds.clone(), 0);
    let svc = ServiceBuilder::new()
        .layer(test_layer(dir.path()))
        .service(fallback.clone());
    let mut client = EchoClient::new(svc);
    for id in 0..5 {
        let response = client.echo(request(id)).await.unwrap();
        assert_eq!(
            response.extensions().get::<Route>(),
            Some(&Route::Daemon { pid: daemon.pid() })
        );
    }
    assert_eq!(builds.load(Ordering::SeqCst), 0);
    assert!(!fallback.is_built());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_in_process_calls_share_one_build() {
    let dir = TestDir::new("lazy-shared");
    let builds = Arc::new(AtomicU32::new(0));
    let svc = ServiceBuilder::new()
        .layer(test_layer(dir.path()))
        .service(counted_fallback(builds.clone(), 0));
    let calls: Vec<_> = (0..50)
        .map(|id| {
            let mut client = EchoClient::new(svc.clone());
            tokio::spawn(async move { client.echo(request(id)).await })
        })
        .collect();
    for call in calls {
        assert_eq!(
            call.await.unwrap().unwrap().get_ref().served_by,
            "in-process"
        );
    }
    assert_eq!(builds.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn failed_build_fails_that_call_and_the_next_call_builds_again() {
    let dir = TestDir::new("lazy-retry");
    let builds = Arc::new(AtomicU32::new(0));
    let svc = ServiceBuilder::new()
        .layer(test_layer(dir.path()))
        .service(counted_fallback(builds.clone(), 1));
    let mut client = EchoClient::new(svc);
    let status = client.echo(request(1)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("the repository is locked"),
        "{status:?}"
    );
    let response = client.echo(request(2)).await.unwrap();
    assert_eq!(response.get_ref().served_by, "in-process");
    assert_eq!(builds.load(Ordering::SeqCst), 2);
}

// ---- Deterministic: paused time, no daemon ----

type Doubler = tower::util::ServiceFn<fn(u32) -> std::future::Ready<Result<u32, std::io::Error>>>;

fn double(n: u32) -> std::future::Ready<Result<u32, std::io::Error>> {
    std::future::ready(Ok(n * 2))
}

/// A fallback whose build takes a second of (paused) time; `builds` counts the builds.
fn slow_fallback(
    builds: Arc<AtomicU32>,
) -> impl tower::Service<u32, Response = u32, Error = tower::BoxError> + Clone {
    tower_local_daemon::LazyFallback::new(move || {
        let builds = builds.clone();
        async move {
            builds.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, std::io::Error>(tower::service_fn(double as fn(_) -> _) as Doubler)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn every_waiting_clone_is_woken_by_the_one_build() {
    let builds = Arc::new(AtomicU32::new(0));
    let fallback = slow_fallback(builds.clone());
    let mut clones: Vec<_> = (0..3).map(|_| spawn(fallback.clone())).collect();
    for clone in &mut clones {
        assert_pending!(
            clone.enter(|cx, mut svc| tower::Service::poll_ready(svc.as_mut().get_mut(), cx))
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for clone in &mut clones {
        assert!(clone.is_woken());
        assert_ready_ok!(
            clone.enter(|cx, mut svc| tower::Service::poll_ready(svc.as_mut().get_mut(), cx))
        );
        let doubled = clone.enter(|_, mut svc| tower::Service::call(svc.as_mut().get_mut(), 21));
        assert_eq!(doubled.await.unwrap(), 42);
    }
    assert_eq!(builds.load(Ordering::Relaxed), 1);
}
