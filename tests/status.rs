//! The status code a call over the daemon route ends with says what happened: the daemon's own
//! status, the caller's deadline, a stream reset, or a connection that ended. Each against a
//! real daemon, beside a bare `Channel` where it gives a code for the same case.

mod support;

use std::time::Duration;

use support::*;
use tonic::Code;
use tonic::client::Grpc;
use tower_local_daemon::{Mode, Route};

/// Not a test: the entry point of this binary when it is re-executed.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

fn request(status_code: Code, delay_ms: u32) -> EchoRequest {
    EchoRequest {
        message: "status".into(),
        id: 1,
        delay_ms,
        status_code: status_code as i32,
    }
}

/// A call with its own deadline (`grpc-timeout`).
fn with_deadline(request: EchoRequest, deadline: Duration) -> tonic::Request<EchoRequest> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(deadline);
    request
}

#[tokio::test]
async fn the_daemons_own_status_reaches_the_caller_unchanged() {
    let dir = TestDir::new("s-own-status");
    let _daemon = DaemonProcess::start(dir.path());
    let mut layered = EchoClient::new(layered(test_layer(dir.path())));
    let mut bare = EchoClient::new(bare_channel(dir.path()).await);
    for code in [
        Code::NotFound,
        Code::Unavailable,
        Code::Internal,
        Code::Aborted,
    ] {
        let through_layer = layered.echo(request(code, 0)).await.unwrap_err();
        let through_channel = bare.echo(request(code, 0)).await.unwrap_err();
        assert_eq!(through_layer.code(), code);
        assert_eq!(through_layer.code(), through_channel.code());
        assert_eq!(through_layer.message(), through_channel.message());
    }
}

#[tokio::test]
async fn the_callers_deadline_is_cancelled_as_over_a_bare_channel() {
    let dir = TestDir::new("s-deadline");
    let _daemon = DaemonProcess::start(dir.path());
    let mut layered = EchoClient::new(layered(test_layer(dir.path())));
    // The route is decided first, so that the deadline is the call's alone.
    echo(&mut layered, 0).await.unwrap();
    let mut bare = EchoClient::new(bare_channel(dir.path()).await);
    let slow = || with_deadline(request(Code::Ok, 5_000), Duration::from_millis(50));
    let through_layer = layered.echo(slow()).await.unwrap_err();
    let through_channel = bare.echo(slow()).await.unwrap_err();
    assert_eq!(
        through_channel.code(),
        Code::Cancelled,
        "{through_channel:?}"
    );
    assert_eq!(
        through_layer.code(),
        through_channel.code(),
        "{through_layer:?}"
    );
    assert_eq!(through_layer.message(), through_channel.message());
}

/// A call the daemon answers by resetting its stream with `reason`, over `transport`.
async fn reset_call<T>(transport: T, reason: h2::Reason) -> tonic::Status
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tower::BoxError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<tower::BoxError> + Send,
{
    let mut grpc = Grpc::new(transport);
    assert!(grpc.ready().await.is_ok(), "the transport is not ready");
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let request = tonic::Request::new(request(Code::Ok, 0));
    grpc.unary(request, reset::path(reason), codec)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn a_stream_reset_by_the_daemon_gets_the_code_of_its_reason() {
    let dir = TestDir::new("s-reset");
    let daemon = DaemonProcess::start(dir.path());
    let svc = layered(test_layer(dir.path()));
    echo(&mut EchoClient::new(svc.clone()), 0).await.unwrap();
    let channel = bare_channel(dir.path()).await;
    let cases = [
        (h2::Reason::REFUSED_STREAM, Code::Unavailable),
        (h2::Reason::CANCEL, Code::Cancelled),
        (h2::Reason::ENHANCE_YOUR_CALM, Code::ResourceExhausted),
        (h2::Reason::INADEQUATE_SECURITY, Code::PermissionDenied),
        (h2::Reason::INTERNAL_ERROR, Code::Internal),
    ];
    let require = layered(test_layer(dir.path()).mode(Mode::Require));
    for (reason, code) in cases {
        let through_channel = reset_call(channel.clone(), reason).await;
        assert_eq!(
            through_channel.code(),
            code,
            "{reason:?}: {through_channel:?}"
        );
        let through_required = reset_call(require.clone(), reason).await;
        assert_eq!(
            through_required.code(),
            code,
            "{reason:?}: {through_required:?}"
        );
        let rerouted = svc.stats().unwrap().rerouted_calls;
        let through_layer = reset_call(svc.clone(), reason).await;
        if reason == h2::Reason::REFUSED_STREAM {
            // The daemon says it did not process the stream: the call runs in-process, whose
            // echo service has no such method; in mode `require` it fails, saying it did not
            // run.
            assert_eq!(
                through_layer.code(),
                Code::Unimplemented,
                "{through_layer:?}"
            );
            assert_eq!(svc.stats().unwrap().rerouted_calls, rerouted + 1);
            assert!(
                through_required.message().ends_with("it did not run"),
                "{through_required:?}"
            );
            continue;
        }
        assert_eq!(through_layer.code(), code, "{reason:?}: {through_layer:?}");
        assert_eq!(svc.stats().unwrap().rerouted_calls, rerouted);
    }
    // A reset stream is not a lost connection: the daemon still serves the next call.
    let response = echo(&mut EchoClient::new(svc), 2).await.unwrap();
    assert_eq!(
        response.extensions().get::<Route>(),
        Some(&Route::Daemon { pid: daemon.pid() })
    );
}

#[tokio::test]
async fn a_daemon_killed_mid_call_is_unavailable_and_may_have_run() {
    let dir = TestDir::new("s-killed");
    let daemon = DaemonProcess::start(dir.path());
    let mut layered = EchoClient::new(layered(test_layer(dir.path())));
    echo(&mut layered, 0).await.unwrap();
    let call = tokio::spawn(async move { layered.echo(request(Code::Ok, 10_000)).await });
    // Whether the request reached the daemon before the kill or not, it was handed to the
    // daemon's connection: it is never re-sent in-process, and the caller cannot know.
    tokio::task::yield_now().await;
    daemon.kill_now();
    let status = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call hung")
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("may have run on the daemon"),
        "{}",
        status.message()
    );
}
