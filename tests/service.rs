//! The service's readiness contract, driven by hand: tower-test's mock as the in-process
//! service, no daemon, no sleeps.

use std::time::Duration;

use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service};
use tower_test::mock;

use tower_local_daemon::{LocalDaemon, LocalDaemonLayer};

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

/// A layered mock in a directory with no daemon: every call routes in-process, to the mock.
/// Each test names its own directory: tests that share an entry run concurrently, and a first
/// call then waits for another test's probe.
fn layered(
    name: &str,
) -> (
    LocalDaemon<mock::Mock<Request, Response>>,
    mock::Handle<Request, Response>,
) {
    let (service, handle) = mock::pair();
    let dir = std::env::temp_dir().join(format!("tld-unit-service-{name}"));
    let layer = LocalDaemonLayer::new(dir)
        .mode_env_value(None)
        .reprobe_interval(Duration::from_secs(3600));
    (layer.layer(service), handle)
}

#[tokio::test]
async fn a_call_goes_to_the_in_process_service_made_ready() {
    let (svc, mut handle) = layered("made-ready");
    let mut svc = tokio_test::task::spawn(svc);
    handle.allow(1);
    assert_ready_ok!(svc.enter(|cx, mut svc| svc.as_mut().get_mut().poll_ready(cx)));
    let response = svc.enter(|_, mut svc| svc.as_mut().get_mut().call(Request::default()));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::default());
    assert!(response.await.is_ok());
}

/// An in-process service whose readiness the test switches.
#[derive(Clone)]
struct Switched(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Service<Request> for Switched {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Response, std::convert::Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            true => std::task::Poll::Ready(Ok(())),
            false => std::task::Poll::Pending,
        }
    }

    fn call(&mut self, _: Request) -> Self::Future {
        std::future::ready(Ok(Response::default()))
    }
}

#[tokio::test]
#[should_panic(expected = "called before poll_ready returned Ready(Ok)")]
async fn readiness_lost_before_the_call_is_not_used_by_it() {
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let dir = std::env::temp_dir().join("tld-unit-service-readiness-lost");
    let svc = LocalDaemonLayer::new(dir)
        .mode_env_value(None)
        .layer(Switched(ready.clone()));
    let mut svc = tokio_test::task::spawn(svc);
    assert_ready_ok!(svc.enter(|cx, mut svc| svc.as_mut().get_mut().poll_ready(cx)));
    // The in-process service stops being ready: the readied state goes with it.
    ready.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_pending!(svc.enter(|cx, mut svc| svc.as_mut().get_mut().poll_ready(cx)));
    drop(svc.enter(|_, mut svc| svc.as_mut().get_mut().call(Request::default())));
}

#[tokio::test]
#[should_panic(expected = "called before poll_ready returned Ready(Ok)")]
async fn a_clone_that_was_never_made_ready_cannot_call() {
    let (svc, mut handle) = layered("clone-never-ready");
    let mut svc = tokio_test::task::spawn(svc);
    handle.allow(1);
    assert_ready_ok!(svc.enter(|cx, mut svc| svc.as_mut().get_mut().poll_ready(cx)));
    let mut clone = svc.enter(|_, svc| std::pin::Pin::get_ref(svc.as_ref()).clone());
    drop(clone.call(Request::default()));
}
