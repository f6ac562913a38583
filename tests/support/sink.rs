//! A daemon-side service that reads a request's whole body and answers with how many bytes it
//! read, in an `EchoReply` whose message is the count: for the tests of request bodies that
//! stream (client-streaming calls) over the daemon route.

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
        Box::pin(async move {
            let mut body = request.into_body();
            let mut read = 0usize;
            while let Some(frame) =
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            {
                if let Ok(data) = frame.map(Frame::into_data) {
                    read += data.map_or(0, |d| d.len());
                }
            }
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
