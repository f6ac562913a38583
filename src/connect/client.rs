//! The daemon route itself: requests over hyper's HTTP/2 [`SendRequest`] on the one checked
//! connection, with what tonic's `Channel` would add (the origin, a user-agent, the caller's
//! own deadline), and the status codes that say what happened to a call.
//!
//! There is no `Buffer` worker between the caller and the connection, and no reconnect: a
//! request goes straight to the connection's task, and a closed connection stays closed.

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::USER_AGENT;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use http_body::Frame;
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::client::conn::http2::SendRequest;
use pin_project_lite::pin_project;
use tonic::body::Body;
use tonic::{Code, Status, TimeoutExpired};
use tower::BoxError;

use crate::reason::error_chain;

/// The user-agent of a request that names none.
const CRATE_USER_AGENT: &str = concat!("tower-local-daemon/", env!("CARGO_PKG_VERSION"));

type Sent = Pin<
    Box<
        dyn Future<Output = Result<http::Response<Incoming>, TrySendError<http::Request<Body>>>>
            + Send,
    >,
>;

/// Sends requests to the daemon over one checked connection.
#[derive(Debug, Clone)]
pub(crate) struct DaemonClient {
    sender: SendRequest<Body>,
}

/// Why a request got no response from the daemon.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The connection was closed before the request was handed to it: it never left this
    /// process, so it may run elsewhere.
    Unsent(Box<http::Request<Body>>),
    /// The caller's own deadline (`grpc-timeout`) expired.
    TimedOut,
    /// The request was sent, and the stream or the connection failed: it may have run.
    Failed(hyper::Error),
}

impl SendError {
    /// The status of a request that never left this process and may not run elsewhere.
    pub(crate) fn unsent_status() -> Status {
        Status::unavailable(
            "the local daemon connection closed before the request was sent; it did not run",
        )
    }

    /// The status a caller sees.
    pub(crate) fn into_status(self) -> Status {
        match self {
            Self::Unsent(_) => Self::unsent_status(),
            Self::TimedOut => Status::cancelled(TimeoutExpired(()).to_string()),
            Self::Failed(e) => daemon_status(&e),
        }
    }
}

impl DaemonClient {
    pub(crate) fn new(sender: SendRequest<Body>) -> Self {
        Self { sender }
    }

    /// `Ready(Err)` once the connection is closed: nothing can be sent any more.
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.sender.poll_ready(cx)
    }

    /// Sends `request`, completed as tonic's `Channel` completes it.
    pub(crate) fn send(&mut self, mut request: http::Request<Body>) -> DaemonFuture {
        complete_origin(&mut request);
        let headers = request.headers_mut();
        if !headers.contains_key(USER_AGENT) {
            headers.insert(USER_AGENT, HeaderValue::from_static(CRATE_USER_AGENT));
        }
        let deadline = grpc_timeout(request.headers()).map(|d| Box::pin(tokio::time::sleep(d)));
        DaemonFuture {
            sent: Sending::Sent(Box::pin(self.sender.try_send_request(request))),
            deadline,
        }
    }
}

/// The scheme and authority that `AddOrigin` gives a tonic request; the path is the method.
fn complete_origin(request: &mut http::Request<Body>) {
    if request.uri().scheme().is_some() {
        return;
    }
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(Authority::from_static("localhost"));
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// The caller's deadline from its `grpc-timeout` header (up to 8 digits and a unit), as tonic
/// reads it. A malformed value is ignored, as tonic ignores it.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (value, unit) = text.split_at(text.len().checked_sub(1)?);
    if value.is_empty() || value.len() > 8 {
        return None;
    }
    let value: u64 = value.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

pin_project! {
    /// A request on its way to the daemon, bounded by the caller's deadline.
    pub(crate) struct DaemonFuture {
        sent: Sending,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

/// The request's progress: on its way, or an outcome seen early by
/// [`DaemonFuture::unsent_now`].
enum Sending {
    Sent(Sent),
    Seen(Option<Box<Result<http::Response<Incoming>, SendError>>>),
}

impl std::fmt::Debug for DaemonFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonFuture").finish_non_exhaustive()
    }
}

fn outcome(
    result: Result<http::Response<Incoming>, TrySendError<http::Request<Body>>>,
) -> Result<http::Response<Incoming>, SendError> {
    result.map_err(|mut e| match e.take_message() {
        Some(request) => SendError::Unsent(Box::new(request)),
        None => SendError::Failed(e.into_error()),
    })
}

impl DaemonFuture {
    /// Polls once without a task to wake: a request whose connection was already closed comes
    /// back at once, and then this future is done. `None` when it is on its way.
    pub(crate) fn unsent_now(&mut self) -> Option<http::Request<Body>> {
        let Sending::Sent(sent) = &mut self.sent else {
            return None;
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match sent.as_mut().poll(&mut cx) {
            Poll::Pending => None,
            Poll::Ready(result) => match outcome(result) {
                Err(SendError::Unsent(request)) => Some(*request),
                seen => {
                    self.sent = Sending::Seen(Some(Box::new(seen)));
                    None
                }
            },
        }
    }
}

impl Future for DaemonFuture {
    type Output = Result<http::Response<Body>, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let ready = match this.sent {
            Sending::Sent(sent) => match sent.as_mut().poll(cx) {
                Poll::Ready(result) => Some(outcome(result)),
                Poll::Pending => None,
            },
            Sending::Seen(seen) => {
                Some(*seen.take().expect("DaemonFuture polled after completion"))
            }
        };
        if let Some(result) = ready {
            return Poll::Ready(
                result.map(|response| response.map(|body| Body::new(DaemonBody { inner: body }))),
            );
        }
        match this.deadline {
            Some(deadline) => deadline
                .as_mut()
                .poll(cx)
                .map(|()| Err(SendError::TimedOut)),
            None => Poll::Pending,
        }
    }
}

impl tower::Service<http::Request<Body>> for DaemonClient {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        DaemonClient::poll_ready(self, cx).map_err(|e| daemon_status(&e).into())
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let sent = self.send(request);
        Box::pin(async move { sent.await.map_err(|e| e.into_status().into()) })
    }
}

/// An error on the daemon route, as the caller sees it: a stream the daemon reset gets the
/// code of its reason; anything else that broke the connection mid-call is `UNAVAILABLE`.
pub(crate) fn daemon_status(error: &(dyn Error + 'static)) -> Status {
    let mut link = Some(error);
    while let Some(error) = link {
        if let Some(h2) = error.downcast_ref::<h2::Error>()
            && h2.is_reset()
            && h2.is_remote()
            && let Some(reason) = h2.reason()
        {
            return Status::new(
                code_of_reset(reason),
                format!("the local daemon reset the stream: {reason}"),
            );
        }
        link = error.source();
    }
    Status::unavailable(format!(
        "local daemon connection failed; the call may have run on the daemon: {}",
        error_chain(error)
    ))
}

/// The code the gRPC spec gives a stream reset by the server (PROTOCOL-HTTP2.md, "Errors").
/// tonic maps these only under its `server` feature, which a client need not build.
fn code_of_reset(reason: h2::Reason) -> Code {
    match reason {
        h2::Reason::REFUSED_STREAM => Code::Unavailable,
        h2::Reason::CANCEL => Code::Cancelled,
        h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

pin_project! {
    /// The daemon's response body, whose errors get their codes as the head's do.
    struct DaemonBody {
        #[pin]
        inner: Incoming,
    }
}

impl http_body::Body for DaemonBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project()
            .inner
            .poll_frame(cx)
            .map_err(|e| daemon_status(&e))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_as_tonic_reads_them() {
        let parse = |text: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", HeaderValue::from_str(text).unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(parse("123456789S"), None);
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("S"), None);
        assert_eq!(parse(""), None);
    }
}
