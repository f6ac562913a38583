//! The HTTP/2 route against `h2::server` over an in-memory duplex pipe, under tokio's paused
//! time: flow control, trailers, resets, GOAWAY, keepalive, and a connection that closes with
//! a response already buffered. They assert what the client sees, and when; not which of its
//! failures the layer later treats as "may have run".

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::server::{Connection, SendResponse};
use http_body::{Body as _, Frame};
use tokio::io::DuplexStream;
use tonic::Code;
use tonic::body::Body;

use super::client::SendError;
use super::response::{Fate, daemon_status};
use super::{ConnectionEnd, ConnectionTask, DaemonClient, EndCause, NotSent, open};

type Server = Connection<DuplexStream, Bytes>;

/// The keepalive the tests run with: a ping every second, answered within two.
const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(2);

fn keepalive() -> (Duration, Duration) {
    (INTERVAL, TIMEOUT)
}

/// What ended the client's connection, once it has.
#[derive(Clone, Default)]
struct Ended(Arc<Mutex<Option<EndCause>>>);

impl Ended {
    fn signal(&self) -> ConnectionEnd {
        let ended = self.0.clone();
        ConnectionEnd::new(move |cause| *ended.lock().unwrap() = Some(cause))
    }

    fn cause(&self) -> Option<EndCause> {
        *self.0.lock().unwrap()
    }
}

/// A client over one end of a duplex pipe and an h2 server over the other, both past their
/// handshake. The server is driven only where a test polls it.
async fn pair(server: h2::server::Builder) -> (DaemonClient, ConnectionTask, Ended, Server) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let ended = Ended::default();
    let (client, task) = open(ours, keepalive(), ended.signal(), false)
        .await
        .unwrap();
    let server = server.handshake(theirs).await.unwrap();
    (client, task, ended, server)
}

/// Accepts the next stream, driving the server until one comes.
async fn accept(server: &mut Server) -> (http::Request<h2::RecvStream>, SendResponse<Bytes>) {
    server.accept().await.unwrap().unwrap()
}

/// Drives the server in the background for the rest of the test.
fn drive(mut server: Server) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while let Some(Ok(_)) = server.accept().await {} })
}

/// Polls the server once, so that what it has queued is written, without waiting for anything.
fn poll_once(server: &mut Server) {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let _ = Pin::new(server).poll_closed(&mut cx);
}

/// A whole body, known to be complete: a unary call's.
struct Whole(Option<Bytes>);

impl http_body::Body for Whole {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Poll::Ready(self.0.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

/// A body still streaming: its chunks come from a channel.
struct Streaming(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Streaming {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

fn request(
    body: impl http_body::Body<Data = Bytes, Error = tonic::Status> + Send + 'static,
) -> http::Request<Body> {
    http::Request::builder()
        .method("POST")
        .uri("/test.Test/Call")
        .header("content-type", "application/grpc")
        .body(Body::new(body))
        .unwrap()
}

fn unary(payload: &'static [u8]) -> http::Request<Body> {
    request(Whole(Some(Bytes::from_static(payload))))
}

/// Reads a request body to its end, releasing its window as it goes.
async fn read_all(recv: &mut h2::RecvStream) -> Bytes {
    let mut all = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        recv.flow_control().release_capacity(chunk.len()).unwrap();
        all.extend_from_slice(&chunk);
    }
    all.freeze()
}

/// Answers a stream with `body` and, when given, trailers.
fn respond(respond: &mut SendResponse<Bytes>, body: Bytes, trailers: Option<http::HeaderMap>) {
    let mut send = respond
        .send_response(http::Response::new(()), false)
        .unwrap();
    send.send_data(body, trailers.is_none()).unwrap();
    if let Some(trailers) = trailers {
        send.send_trailers(trailers).unwrap();
    }
}

fn grpc_ok() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers
}

/// The response's data and trailers, read to the end through the client's body.
async fn collect(
    response: http::Response<Body>,
) -> Result<(Bytes, Option<http::HeaderMap>), tonic::Status> {
    let mut body = response.into_body();
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame?;
        match frame.into_data() {
            Ok(chunk) => data.extend_from_slice(&chunk),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    assert!(body.is_end_stream());
    Ok((data.freeze(), trailers))
}

#[tokio::test(start_paused = true)]
async fn a_request_body_larger_than_the_window_arrives_whole() {
    // The daemon's stream window is 1 KiB: the body goes as the daemon reads it.
    let mut builder = h2::server::Builder::new();
    builder.initial_window_size(1024);
    let (mut client, _task, _ended, mut server) = pair(builder).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // A body still streaming when sent is never kept.
    let call = client.send(request(Streaming(rx)), true).unwrap();
    assert!(!call.keeps_request());
    let sent = tokio::spawn(async move {
        for i in 0..64u8 {
            tx.send(Bytes::from(vec![i; 1000])).await.unwrap();
        }
    });
    let (mut req, mut answer) = accept(&mut server).await;
    let server = drive(server);
    let got = read_all(req.body_mut()).await;
    sent.await.unwrap();
    assert_eq!(got.len(), 64_000);
    assert!(
        got.chunks(1000)
            .enumerate()
            .all(|(i, c)| c.iter().all(|b| *b == i as u8))
    );
    respond(&mut answer, Bytes::from_static(b"done"), Some(grpc_ok()));
    let (data, _) = collect(call.await.unwrap()).await.unwrap();
    assert_eq!(&data[..], b"done");
    server.abort();
}

#[tokio::test(start_paused = true)]
async fn a_response_larger_than_the_window_arrives_whole_as_it_is_read() {
    // The client's stream window is 2 MiB: 5 MiB arrive only if reading releases it.
    let (mut client, _task, _ended, mut server) = pair(h2::server::Builder::new()).await;
    let call = client.send(unary(b"big please"), false).unwrap();
    let (_req, mut answer) = accept(&mut server).await;
    let server = drive(server);
    let total = 5 * 1024 * 1024;
    let sender = tokio::spawn(async move {
        let mut send = answer
            .send_response(http::Response::new(()), false)
            .unwrap();
        let mut left = total;
        while left > 0 {
            let n = left.min(64 * 1024);
            send.reserve_capacity(n);
            let got = std::future::poll_fn(|cx| send.poll_capacity(cx))
                .await
                .unwrap()
                .unwrap();
            send.send_data(Bytes::from(vec![7; got]), false).unwrap();
            left -= got;
        }
        send.send_trailers(grpc_ok()).unwrap();
    });
    let (data, trailers) = collect(call.await.unwrap()).await.unwrap();
    sender.await.unwrap();
    assert_eq!(data.len(), total);
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    server.abort();
}

#[tokio::test(start_paused = true)]
async fn trailers_end_the_body_and_a_response_without_them_ends_at_its_data() {
    let (mut client, _task, _ended, mut server) = pair(h2::server::Builder::new()).await;
    let with = client.send(unary(b"one"), false).unwrap();
    let without = client.send(unary(b"two"), false).unwrap();
    let (_a, mut first) = accept(&mut server).await;
    let (_b, mut second) = accept(&mut server).await;
    let server = drive(server);
    respond(&mut first, Bytes::from_static(b"with"), Some(grpc_ok()));
    respond(&mut second, Bytes::from_static(b"without"), None);

    let (data, trailers) = collect(with.await.unwrap()).await.unwrap();
    assert_eq!(&data[..], b"with");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    let (data, trailers) = collect(without.await.unwrap()).await.unwrap();
    assert_eq!(&data[..], b"without");
    assert_eq!(trailers, None);
    server.abort();
}

#[tokio::test(start_paused = true)]
async fn each_reset_reason_gets_the_code_the_grpc_spec_gives_it() {
    let cases = [
        (h2::Reason::REFUSED_STREAM, Code::Unavailable),
        (h2::Reason::CANCEL, Code::Cancelled),
        (h2::Reason::ENHANCE_YOUR_CALM, Code::ResourceExhausted),
        (h2::Reason::INADEQUATE_SECURITY, Code::PermissionDenied),
        (h2::Reason::INTERNAL_ERROR, Code::Internal),
        (h2::Reason::PROTOCOL_ERROR, Code::Internal),
    ];
    let (mut client, _task, ended, mut server) = pair(h2::server::Builder::new()).await;
    for (reason, code) in cases {
        // Before the head: the response future fails.
        let call = client.send(unary(b"reset me"), false).unwrap();
        let (_req, mut answer) = accept(&mut server).await;
        answer.send_reset(reason);
        poll_once(&mut server);
        let Err(SendError::Failed { error, fate, .. }) = call.await else {
            panic!("{reason:?}: the call did not fail");
        };
        assert!(error.is_reset() && error.is_remote(), "{error:?}");
        let expected = match reason {
            h2::Reason::REFUSED_STREAM => Fate::NotProcessed,
            _ => Fate::Answered,
        };
        assert_eq!(fate, expected, "{reason:?}");
        assert_eq!(daemon_status(&error, false).code(), code, "{reason:?}");

        // After the head: the body fails with the same code.
        let call = client.send(unary(b"reset me later"), false).unwrap();
        let (_req, mut answer) = accept(&mut server).await;
        let mut send = answer
            .send_response(http::Response::new(()), false)
            .unwrap();
        poll_once(&mut server);
        let response = call.await.unwrap();
        send.send_reset(reason);
        poll_once(&mut server);
        let status = collect(response).await.unwrap_err();
        assert_eq!(status.code(), code, "{reason:?} after the head: {status:?}");
    }
    // A stream's reset leaves the connection serving.
    assert_eq!(ended.cause(), None);
}

#[tokio::test(start_paused = true)]
async fn goaway_lets_streams_in_flight_finish_and_refuses_new_ones_unsent() {
    let (mut client, task, ended, mut server) = pair(h2::server::Builder::new()).await;
    let in_flight = client.send(unary(b"slow"), false).unwrap();
    let (_req, mut answer) = accept(&mut server).await;
    server.graceful_shutdown();
    // The daemon's GOAWAY reaches the client, which stops sending.
    let mut server = tokio::spawn(async move {
        std::future::poll_fn(|cx| server.poll_closed(cx))
            .await
            .unwrap();
    });
    std::future::poll_fn(|cx| match client.poll_ready(cx) {
        Poll::Ready(Err(_)) => Poll::Ready(()),
        _ => {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await;
    let unsent = client.send(unary(b"too late"), false).unwrap_err();
    assert!(matches!(unsent.why, NotSent::Closed), "{:?}", unsent.why);
    assert_eq!(unsent.status().code(), Code::Unavailable);
    // The request comes back whole: it can run elsewhere.
    assert_eq!(unsent.request.uri().path(), "/test.Test/Call");

    respond(
        &mut answer,
        Bytes::from_static(b"finished"),
        Some(grpc_ok()),
    );
    let (data, _) = collect(in_flight.await.unwrap()).await.unwrap();
    assert_eq!(&data[..], b"finished");
    (&mut server).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ended.cause(), Some(EndCause::Daemon));
    drop(task);
}

#[tokio::test(start_paused = true)]
async fn a_stream_above_the_goaways_last_stream_id_fails_as_never_processed() {
    let (mut client, _task, _ended, mut server) = pair(h2::server::Builder::new()).await;
    let processed = client.send(unary(b"first"), false).unwrap();
    let (_req, mut answer) = accept(&mut server).await;
    respond(
        &mut answer,
        Bytes::from_static(b"first done"),
        Some(grpc_ok()),
    );
    poll_once(&mut server);
    // The second request is on its way when the daemon goes away at once: its GOAWAY names
    // the first stream as the last it processed.
    let refused = client.send(unary(b"second"), true).unwrap();
    assert!(refused.keeps_request());
    server.abrupt_shutdown(h2::Reason::NO_ERROR);
    let server = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| server.poll_closed(cx)).await;
    });
    let (data, _) = collect(processed.await.unwrap()).await.unwrap();
    assert_eq!(&data[..], b"first done");
    let Err(SendError::Failed {
        error,
        fate,
        request,
        ..
    }) = refused.await
    else {
        panic!("the second stream did not fail");
    };
    assert!(error.is_go_away() && error.is_remote(), "{error:?}");
    assert_eq!(error.reason(), Some(h2::Reason::NO_ERROR));
    assert_eq!(fate, Fate::NotProcessed);
    // The request comes back whole, body and all, to run elsewhere.
    let request = request.expect("the request was kept").into_request();
    assert_eq!(request.uri().path(), "/test.Test/Call");
    let body = collect(http::Response::new(request.into_body()))
        .await
        .unwrap();
    assert_eq!(&body.0[..], b"second");
    server.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn keepalive_ends_a_connection_whose_daemon_stopped_answering() {
    let (mut client, _task, ended, mut server) = pair(h2::server::Builder::new()).await;
    let call = client.send(unary(b"hang"), true).unwrap();
    let (_req, _answer) = accept(&mut server).await;
    // The daemon is not driven from here on: it answers no ping.
    tokio::time::sleep(INTERVAL).await;
    assert_eq!(ended.cause(), None, "ended before a ping went unanswered");
    tokio::time::sleep(TIMEOUT + Duration::from_millis(10)).await;
    assert_eq!(ended.cause(), Some(EndCause::Unresponsive));
    let Err(failed) = call.await else {
        panic!("the call did not fail");
    };
    let SendError::Failed {
        error,
        fate,
        request,
        unresponsive,
    } = &failed
    else {
        panic!("{failed:?}");
    };
    // A break: the request may have run, and comes back for an idempotent method's re-run.
    assert_eq!(*fate, Fate::Broken, "{error:?}");
    assert!(request.is_some());
    assert!(*unresponsive);
    // Its stream saw a broken pipe; the caller is told why the connection broke.
    let status = failed.into_status();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().ends_with(
            "the call may have run on the daemon: the daemon stopped answering (keepalive)"
        ),
        "{status:?}"
    );
    drop(server);
}

#[tokio::test(start_paused = true)]
async fn keepalive_keeps_a_quiet_connection_whose_daemon_answers() {
    let (_client, _task, ended, server) = pair(h2::server::Builder::new()).await;
    let server = drive(server);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(ended.cause(), None);
    server.abort();
}

#[tokio::test(start_paused = true)]
async fn a_corked_connection_sends_nothing_until_its_first_request_or_ping() {
    // Released by a request: HTTP/2's preface leaves with it.
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (mut client, _task) = open(ours, keepalive(), ConnectionEnd::ignored(), true)
        .await
        .unwrap();
    let handshake = tokio::spawn(h2::server::Builder::new().handshake::<_, Bytes>(theirs));
    tokio::time::sleep(INTERVAL / 2).await;
    assert!(
        !handshake.is_finished(),
        "the preface left before the request"
    );
    let call = client.send(unary(b"first"), true).unwrap();
    let mut server = handshake.await.unwrap().unwrap();
    let (_request, mut answer) = accept(&mut server).await;
    answer.send_response(http::Response::new(()), true).unwrap();
    let _served = drive(server);
    assert!(call.await.is_ok());

    // Released by the first keepalive ping, with no request: the ping is answered, and the
    // connection is not taken for an unresponsive one.
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let ended = Ended::default();
    let (_client, _task) = open(ours, keepalive(), ended.signal(), true).await.unwrap();
    let handshake = tokio::spawn(h2::server::Builder::new().handshake::<_, Bytes>(theirs));
    tokio::time::sleep(INTERVAL / 2).await;
    assert!(
        !handshake.is_finished(),
        "the preface left before the first ping"
    );
    let server = tokio::time::timeout(INTERVAL, handshake)
        .await
        .expect("the first ping released nothing")
        .unwrap()
        .unwrap();
    let _served = drive(server);
    tokio::time::sleep(INTERVAL + TIMEOUT * 3).await;
    assert_eq!(ended.cause(), None);
}

/// An I/O whose reads wait while held, as a socket's do when the runtime has not yet seen
/// the readiness of bytes that have arrived: writes go on meanwhile.
struct Held<T> {
    inner: T,
    held: Arc<Mutex<(bool, Option<std::task::Waker>)>>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Held<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        {
            let mut held = self.held.lock().unwrap();
            if held.0 {
                held.1 = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Held<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test(start_paused = true)]
async fn a_response_that_arrived_before_the_daemon_closed_is_read_though_a_write_fails() {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let held = Arc::new(Mutex::new((false, None::<std::task::Waker>)));
    let ours = Held {
        inner: ours,
        held: held.clone(),
    };
    let ended = Ended::default();
    let (mut client, _task) = open(ours, keepalive(), ended.signal(), false)
        .await
        .unwrap();
    let mut server: Server = h2::server::handshake(theirs).await.unwrap();
    let call = client.send(unary(b"last call"), false).unwrap();
    let (_req, mut answer) = accept(&mut server).await;

    // The daemon answers and closes; the client has not seen the bytes yet when its keepalive
    // ping is due, and writes the ping to a closed pipe.
    held.lock().unwrap().0 = true;
    respond(&mut answer, Bytes::from_static(b"answer"), Some(grpc_ok()));
    poll_once(&mut server);
    drop(answer);
    drop(server);
    tokio::time::sleep(INTERVAL + Duration::from_millis(1)).await;
    assert_eq!(ended.cause(), None, "the failed write ended the connection");

    // Then the bytes are seen: the whole response, then the end of the connection.
    let waker = {
        let mut held = held.lock().unwrap();
        held.0 = false;
        held.1.take()
    };
    waker.unwrap().wake();
    let (data, trailers) = collect(call.await.unwrap()).await.unwrap();
    assert_eq!(&data[..], b"answer");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(ended.cause(), Some(EndCause::Daemon));
}
