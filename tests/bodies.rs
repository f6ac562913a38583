//! Request bodies that stream (client-streaming calls) over the daemon route arrive whole: a
//! body larger than every HTTP/2 window goes as the daemon reads it, and a body the caller is
//! still producing goes as it comes. Each against a real daemon, whose sink service answers
//! with the number of bytes it read.

mod support;

use std::path::Path;
use std::time::Duration;

use prost::Message;
use support::*;
use tonic::client::Grpc;
use tower_local_daemon::Route;

/// Not a test: the entry point of this binary when it is re-executed.
#[test]
#[ignore = "the entry point of this binary re-executed as a daemon, not a test"]
fn daemon_entry_point() {
    run_daemon_if_asked();
}

fn message(size: usize) -> EchoRequest {
    EchoRequest {
        message: "x".repeat(size),
        ..Default::default()
    }
}

/// The bytes a message takes in a gRPC body: its 5-byte prefix and its encoding.
fn framed_len(message: &EchoRequest) -> usize {
    5 + message.encoded_len()
}

/// A daemon for a new directory, and the layered service with its route decided.
async fn on_daemon(name: &str) -> (TestDir, DaemonProcess, Layered) {
    let dir = TestDir::new(name);
    let daemon = DaemonProcess::start(dir.path());
    let svc = layered(test_layer(dir.path()));
    echo(&mut EchoClient::new(svc.clone()), 0).await.unwrap();
    (dir, daemon, svc)
}

/// A client-streaming call of `messages` to the daemon's sink, through the layer, which writes
/// its progress to `outcome` when given; returns the byte count the daemon read and the route.
async fn sink<S>(svc: Layered, messages: S, outcome: Option<&Path>) -> (usize, Option<Route>)
where
    S: tokio_stream::Stream<Item = EchoRequest> + Send + 'static,
{
    let mut grpc = Grpc::new(svc);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let mut request = tonic::Request::new(messages);
    if let Some(outcome) = outcome {
        request.metadata_mut().insert(
            support::sink::OUTCOME_FILE_HEADER,
            outcome.to_str().unwrap().parse().unwrap(),
        );
    }
    let call = grpc.client_streaming(request, support::sink::path(), codec);
    let response = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("a streaming call hung for 20 s")
        .unwrap();
    let route = response.extensions().get::<Route>().copied();
    (response.get_ref().message.parse().unwrap(), route)
}

/// The bytes the daemon's sink has read so far, from its last `read N` line.
fn bytes_read(outcome: &Path) -> usize {
    let text = std::fs::read_to_string(outcome).unwrap_or_default();
    text.lines()
        .filter_map(|line| line.strip_prefix("read "))
        .next_back()
        .map_or(0, |n| n.parse().unwrap())
}

async fn body_larger_than_every_window_arrives_whole() {
    let (_dir, daemon, svc) = on_daemon("b-large").await;
    // 12 MiB: more than every window the daemon gives the upload (its stream's and its
    // connection's, 1 MiB each as tonic's server sets them).
    let messages: Vec<_> = (0..192).map(|_| message(64 * 1024)).collect();
    let expected: usize = messages.iter().map(framed_len).sum();
    let (read, route) = sink(svc, tokio_stream::iter(messages), None).await;
    assert_eq!(read, expected);
    assert_eq!(route, Some(Route::Daemon { pid: daemon.pid() }));
}

#[tokio::test]
async fn a_body_larger_than_every_window_arrives_whole() {
    body_larger_than_every_window_arrives_whole().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_larger_than_every_window_arrives_whole_from_a_multi_thread_runtime() {
    body_larger_than_every_window_arrives_whole().await;
}

#[tokio::test]
async fn a_body_the_caller_is_still_producing_arrives_as_it_comes() {
    let (dir, daemon, svc) = on_daemon("b-slow").await;
    let outcome = dir.path().join("sink-outcome");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let sizes = [10, 0, 70_000, 3, 1_000_000, 5];
    let expected: usize = sizes.iter().map(|&size| framed_len(&message(size))).sum();
    let progress = outcome.clone();
    tokio::spawn(async move {
        let mut sent = 0;
        for size in sizes {
            let message = message(size);
            sent += framed_len(&message);
            tx.send(message).await.unwrap();
            // The body is pending until the daemon has read what was sent: a route that held
            // it back would never get there (and the call would end short or hang).
            wait_until_async("the daemon reads each message as it is sent", || async {
                bytes_read(&progress) == sent
            })
            .await;
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let (read, route) = sink(svc, stream, Some(&outcome)).await;
    assert_eq!(read, expected);
    assert_eq!(route, Some(Route::Daemon { pid: daemon.pid() }));
}

#[tokio::test]
async fn a_body_still_streaming_when_the_caller_gives_up_is_reset_at_the_daemon() {
    let (dir, _daemon, svc) = on_daemon("b-abandoned").await;
    let outcome = dir.path().join("sink-outcome");
    // A body that never ends: its sender stays alive. The caller gives up on the call (it drops
    // it; no `grpc-timeout` goes to the daemon, which would end the call by itself).
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(message(10)).await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        support::sink::OUTCOME_FILE_HEADER,
        outcome.to_str().unwrap().parse().unwrap(),
    );
    let mut grpc = Grpc::new(svc);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let mut call = Box::pin(grpc.client_streaming(request, support::sink::path(), codec));
    let read = || std::fs::read_to_string(&outcome).unwrap_or_default();
    tokio::select! {
        _ = &mut call => panic!("the call ended though its body never did"),
        () = wait_until_async("the daemon's handler runs", || async { read().starts_with("started\n") }) => {}
    }
    drop(call);
    // The daemon's handler sees the stream reset, though the body's sender is still alive.
    wait_until_async("the daemon sees the abandoned body reset", || async {
        read().starts_with("started\n") && read().ends_with("reset\n")
    })
    .await;
    drop(tx);
}

#[tokio::test]
async fn connection_headers_are_left_out_as_http2_requires() {
    let dir = TestDir::new("b-connection-headers");
    let daemon = DaemonProcess::start(dir.path());
    let svc = layered(test_layer(dir.path()));
    let mut client = EchoClient::new(svc.clone());
    let mut request = tonic::Request::new(message(5));
    for (key, value) in [
        ("connection", "keep-alive, x-hop"),
        ("keep-alive", "timeout=5"),
        ("x-hop", "1"),
        ("proxy-connection", "keep-alive"),
        ("upgrade", "h2c"),
    ] {
        request.metadata_mut().insert(key, value.parse().unwrap());
    }
    let reply = client.echo(request).await.unwrap();
    assert_eq!(reply.get_ref().served_by, "daemon");
    assert_eq!(
        reply.extensions().get::<Route>(),
        Some(&Route::Daemon { pid: daemon.pid() })
    );
    // The route still stands: nothing took those headers for a closed connection.
    assert_eq!(svc.stats().unwrap().fallbacks, Vec::new());
}

#[tokio::test]
async fn an_empty_body_arrives_as_one() {
    let (_dir, daemon, svc) = on_daemon("b-empty").await;
    let (read, route) = sink(svc, tokio_stream::iter(Vec::new()), None).await;
    assert_eq!(read, 0);
    assert_eq!(route, Some(Route::Daemon { pid: daemon.pid() }));
}
