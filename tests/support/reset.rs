//! A daemon-side service whose every call the server answers with headers and then resets with
//! an HTTP/2 reason, named by the method: `/test.v1.Reset/REFUSED_STREAM`. For the tests of the
//! status codes a client sees.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tonic::body::Body;
use tonic::server::NamedService;

/// The service; register it on a daemon with `add_service`.
#[derive(Debug, Clone)]
pub struct StreamResetter;

impl NamedService for StreamResetter {
    const NAME: &'static str = "test.v1.Reset";
}

/// The path that asks the daemon to reset the stream with `reason`.
pub fn path(reason: h2::Reason) -> http::uri::PathAndQuery {
    format!("/{}/{}", StreamResetter::NAME, reason_name(reason))
        .parse()
        .unwrap()
}

fn reason_name(reason: h2::Reason) -> &'static str {
    match reason {
        h2::Reason::REFUSED_STREAM => "REFUSED_STREAM",
        h2::Reason::CANCEL => "CANCEL",
        h2::Reason::ENHANCE_YOUR_CALM => "ENHANCE_YOUR_CALM",
        h2::Reason::INADEQUATE_SECURITY => "INADEQUATE_SECURITY",
        _ => "INTERNAL_ERROR",
    }
}

impl tower::Service<http::Request<Body>> for StreamResetter {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        let reason = [
            h2::Reason::REFUSED_STREAM,
            h2::Reason::CANCEL,
            h2::Reason::ENHANCE_YOUR_CALM,
            h2::Reason::INADEQUATE_SECURITY,
        ]
        .into_iter()
        .find(|reason| reason_name(*reason) == method)
        .unwrap_or(h2::Reason::INTERNAL_ERROR);
        let response = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(Body::new(ResetBody(Some(reason))))
            .unwrap();
        std::future::ready(Ok(response))
    }
}

/// A body whose first frame is an error carrying the reason: hyper's server resets the stream
/// with the reason it finds in a body error.
struct ResetBody(Option<h2::Reason>);

impl http_body::Body for ResetBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        Poll::Ready(self.0.take().map(|reason| Err(reason.into())))
    }
}
