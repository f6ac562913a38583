//! A daemon-side service that reads a request's whole body and answers with how many bytes it
//! read, in an `EchoReply` whose message is the count: for the tests of request bodies that
//! stream (client-streaming calls) over the daemon route. A request naming a file in its
//! [`OUTCOME_FILE_HEADER`] gets lines appended there: `started` when its handler runs, `read N`
//! as the bytes read so far grow, and one when its call ends: `complete N`, or `reset` when the
//! client reset the stream first (the body fails, or the server drops the handler).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body as _, Frame};
use prost::Message;
use tonic::body::Body;
use tonic::server::NamedService;

use super::echo::EchoReply;

/// The service; register it on a daemon with `add_service`.
#[derive(Debug, Clone)]
pub struct BodySink;

impl NamedService for BodySink {
    const NAME: &'static str = "test.v1.Sink";
}

/// The request header naming the file where the sink writes how a body ended.
pub const OUTCOME_FILE_HEADER: &str = "sink-outcome-file";

/// The path of its one method.
pub fn path() -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_static("/test.v1.Sink/Sink")
}

impl tower::Service<http::Request<Body>> for BodySink {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let mut outcome = Outcome(
            request
                .headers()
                .get(OUTCOME_FILE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(std::path::PathBuf::from),
        );
        outcome.note("started");
        Box::pin(async move {
            let mut body = request.into_body();
            let mut read = 0usize;
            while let Some(frame) =
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            {
                match frame.map(Frame::into_data) {
                    Ok(data) => {
                        read += data.map_or(0, |d| d.len());
                        outcome.note(&format!("read {read}"));
                    }
                    // Reset: the outcome says so as it drops.
                    Err(_) => return Ok(http::Response::new(Body::empty())),
                }
            }
            outcome.write(&format!("complete {read}"));
            let reply = EchoReply {
                message: read.to_string(),
                served_by: "daemon".into(),
                ..Default::default()
            };
            let mut message = BytesMut::new();
            message.put_u8(0);
            message.put_u32(reply.encoded_len() as u32);
            reply.encode(&mut message).unwrap();
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let frames = VecDeque::from([Frame::data(message.freeze()), Frame::trailers(trailers)]);
            Ok(http::Response::builder()
                .header("content-type", "application/grpc")
                .body(Body::new(Frames(frames)))
                .unwrap())
        })
    }
}

/// Where a call's outcome goes: `reset`, unless it completed first.
struct Outcome(Option<std::path::PathBuf>);

impl Outcome {
    /// Appends `line`, and the call goes on.
    fn note(&self, line: &str) {
        use std::io::Write;
        if let Some(file) = &self.0 {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .unwrap();
            writeln!(file, "{line}").unwrap();
        }
    }

    /// Appends how the call ended: nothing more is written.
    fn write(&mut self, line: &str) {
        self.note(line);
        self.0 = None;
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.write("reset");
    }
}

/// A body of frames given in advance.
struct Frames(VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}
