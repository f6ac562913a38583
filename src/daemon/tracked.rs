//! The wrapper around the daemon's routes: it reports the daemon's version and directory in
//! every response's metadata and counts calls, for the idle exit.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use http::HeaderValue;
use http_body::Frame;
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower::Service;

use super::counters::DaemonCounters;
use crate::protocol::{DIRECTORY_METADATA_KEY, VERSION_METADATA_KEY};

#[derive(Debug, Clone)]
pub(super) struct Tracked<S> {
    pub(super) inner: S,
    pub(super) version: Option<HeaderValue>,
    pub(super) directory: HeaderValue,
    pub(super) counters: Arc<DaemonCounters>,
}

impl<S, B> Service<http::Request<Body>> for Tracked<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>,
{
    type Response = http::Response<TrackedBody<B>>;
    type Error = Infallible;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        TrackedFuture {
            inner: self.inner.call(request),
            call: Some(CountedCall::new(self.counters.clone())),
            version: self.version.clone(),
            directory: Some(self.directory.clone()),
        }
    }
}

/// Counts a call as in flight until its response body is done or dropped.
#[derive(Debug)]
struct CountedCall(Arc<DaemonCounters>);

impl CountedCall {
    fn new(counters: Arc<DaemonCounters>) -> Self {
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(counters)
    }
}

impl Drop for CountedCall {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    pub(super) struct TrackedFuture<F> {
        #[pin]
        inner: F,
        call: Option<CountedCall>,
        version: Option<HeaderValue>,
        directory: Option<HeaderValue>,
    }
}

impl<F, B> Future for TrackedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, Infallible>>,
{
    type Output = Result<http::Response<TrackedBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        let (mut parts, body) = response.into_parts();
        if let Some(version) = this.version.take() {
            parts.headers.insert(VERSION_METADATA_KEY, version);
        }
        if let Some(directory) = this.directory.take() {
            parts.headers.insert(DIRECTORY_METADATA_KEY, directory);
        }
        let body = TrackedBody {
            inner: body,
            _call: this.call.take(),
        };
        Poll::Ready(Ok(http::Response::from_parts(parts, body)))
    }
}

pin_project! {
    /// A response body that counts its call as in flight until it is done or dropped.
    pub(super) struct TrackedBody<B> {
        #[pin]
        inner: B,
        _call: Option<CountedCall>,
    }
}

impl<B> http_body::Body for TrackedBody<B>
where
    B: http_body::Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
