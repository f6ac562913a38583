//! The daemon route itself: requests over an h2 client ([`SendRequest`]) on the one checked
//! connection, with what tonic's `Channel` would add (the origin, a user-agent, the caller's
//! own deadline), and what the end of a call's response does.
//!
//! No task stands between the caller and the connection: the caller's task queues the request's
//! head and, when the body is already whole (a unary call's is), all of it, so that the
//! connection's task writes the call in one go ([`Upload`]). Such a request is kept, when
//! asked, until its response head arrives: a stream the daemon never processed, or one whose
//! connection broke, gives it back ([`SendError`]) to run elsewhere. There is no reconnect: a
//! closed connection stays closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use http::header::USER_AGENT;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use http_body::Body as _;
use tonic::body::Body;
use tonic::{Code, Status, TimeoutExpired};
use tower::BoxError;

use super::call::{CallEnd, InFlight};
use super::io::Cork;
use super::response::{DaemonBody, Fate, daemon_status, transport_status, what_broke};
use super::upload::{KeptBody, Started, Upload};

/// The user-agent of a request that names none.
const CRATE_USER_AGENT: &str = concat!("tower-local-daemon/", env!("CARGO_PKG_VERSION"));

/// Sends requests to the daemon over one checked connection.
#[derive(Debug, Clone)]
pub(crate) struct DaemonClient {
    sender: SendRequest<Bytes>,
    in_flight: Arc<InFlight>,
    /// Released by the first request, which takes HTTP/2's preface along.
    cork: Arc<Cork>,
}

/// A request that did not leave this process, and why.
#[derive(Debug)]
pub(crate) struct Unsent {
    pub(crate) request: Box<http::Request<Body>>,
    pub(crate) why: NotSent,
}

/// Why a request did not leave.
#[derive(Debug)]
pub(crate) enum NotSent {
    /// The connection is closed, or going away: the route is over.
    Closed,
    /// h2 found this request invalid (its shape), and says why; the connection goes on.
    Invalid(h2::Error),
}

/// Why a sent request got no response head from the daemon.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The caller's own deadline (`grpc-timeout`) expired.
    TimedOut,
    /// The stream or the connection failed; its [`Fate`] says whether the request may have run.
    Failed {
        error: h2::Error,
        fate: Fate,
        /// Keepalive gave up on the connection.
        unresponsive: bool,
        /// The request, when it was kept: it can still run elsewhere.
        request: Option<Box<KeptRequest>>,
    },
}

/// A request whose body was whole when sent, kept until its response head arrived, with what
/// is left of the caller's deadline.
#[derive(Debug)]
pub(crate) struct KeptRequest {
    head: http::request::Parts,
    body: KeptBody,
    pub(crate) deadline: Option<tokio::time::Instant>,
}

impl KeptRequest {
    /// The request's method, as gRPC names it: the path.
    pub(crate) fn path(&self) -> &str {
        self.head.uri.path()
    }

    pub(crate) fn into_request(self) -> http::Request<Body> {
        http::Request::from_parts(self.head, Body::new(self.body))
    }
}

impl Unsent {
    /// The status of this request where it may not run elsewhere.
    pub(crate) fn status(&self) -> Status {
        match &self.why {
            NotSent::Closed => transport_status(
                Code::Unavailable,
                "the local daemon connection closed before the request was sent; it did not run"
                    .to_owned(),
                "the connection closed".to_owned(),
            ),
            NotSent::Invalid(error) => transport_status(
                Code::Internal,
                format!(
                    "the request could not be sent to the local daemon ({error}); it did not run"
                ),
                format!("the request could not be sent ({error})"),
            ),
        }
    }
}

impl SendError {
    /// The status a caller sees when the request runs nowhere else.
    pub(crate) fn into_status(self) -> Status {
        match self {
            Self::TimedOut => timeout_status(),
            Self::Failed {
                error,
                fate: Fate::NotProcessed,
                ..
            } => {
                let broke = what_broke(&error, false);
                let message =
                    format!("the local daemon did not process the call ({broke}); it did not run");
                transport_status(Code::Unavailable, message, broke)
            }
            Self::Failed {
                error,
                unresponsive,
                ..
            } => daemon_status(&error, unresponsive),
        }
    }
}

/// The status of a call whose own deadline (`grpc-timeout`) expired, as a bare `Channel` gives it.
pub(crate) fn timeout_status() -> Status {
    Status::cancelled(TimeoutExpired(()).to_string())
}

impl DaemonClient {
    pub(crate) fn new(
        sender: SendRequest<Bytes>,
        in_flight: Arc<InFlight>,
        cork: Arc<Cork>,
    ) -> Self {
        Self {
            sender,
            in_flight,
            cork,
        }
    }

    /// `Ready(Err)` once the connection is closed or going away: nothing can be sent any more.
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        self.sender.poll_ready(cx)
    }

    /// Sends `request`, completed as tonic's `Channel` completes it. A request the connection
    /// does not take comes back whole: it never left this process. With `keep`, a request whose
    /// body is whole when sent is kept until its response head arrives.
    pub(crate) fn send(
        &mut self,
        mut request: http::Request<Body>,
        keep: bool,
    ) -> Result<DaemonFuture, Unsent> {
        let Some(claim) = self.in_flight.enter() else {
            // The registry closed this connection: it drains, and takes no new call.
            return Err(Unsent {
                request: Box::new(request),
                why: NotSent::Closed,
            });
        };
        complete_origin(&mut request);
        let headers = request.headers_mut();
        if !headers.contains_key(USER_AGENT) {
            headers.insert(USER_AGENT, HeaderValue::from_static(CRATE_USER_AGENT));
        }
        // h2 takes the head by value and keeps it on failure: it gets a copy, so that the
        // request stays whole until it has left.
        let mut head = http::Request::new(());
        *head.method_mut() = request.method().clone();
        *head.uri_mut() = request.uri().clone();
        *head.headers_mut() = request.headers().clone();
        strip_connection_headers(head.headers_mut());
        let end_of_stream = request.body().is_end_stream();
        self.cork.release();
        let (response, stream) = match self.sender.send_request(head, end_of_stream) {
            Ok(sent) => sent,
            Err(error) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let closed = matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Err(_)));
                tracing::debug!(%error, closed, "the local daemon connection took no request");
                let why = match closed {
                    true => NotSent::Closed,
                    false => NotSent::Invalid(error),
                };
                return Err(Unsent {
                    request: Box::new(request),
                    why,
                });
            }
        };
        let deadline = grpc_timeout(request.headers()).map(|d| Box::pin(tokio::time::sleep(d)));
        let (head, body) = request.into_parts();
        let started = match end_of_stream {
            true => Started::Whole(keep.then(KeptBody::default)),
            false => Upload::new(body, stream, keep).start(),
        };
        let (kept, upload) = match started {
            Started::Whole(kept) => (kept, None),
            Started::Streaming(upload) => (None, Some(upload)),
        };
        // Boxed: the response future stays small, and a call that keeps nothing pays nothing.
        let kept = kept.map(|body| {
            Box::new(KeptRequest {
                head,
                body,
                deadline: deadline.as_ref().map(|d| d.deadline()),
            })
        });
        Ok(DaemonFuture {
            response,
            deadline,
            kept,
            end: Some(CallEnd::new(claim, upload)),
        })
    }
}

/// The headers that HTTP/2 forbids (RFC 9113, 8.2.2), which h2 refuses where hyper's client
/// dropped them: `connection` and those it names, `keep-alive`, `proxy-connection`,
/// `transfer-encoding`, `upgrade`, and a `te` other than `trailers`.
fn strip_connection_headers(headers: &mut http::HeaderMap) {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    let named: Vec<http::HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
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
pub(crate) fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
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

/// A request on its way to the daemon, bounded by the caller's deadline.
pub(crate) struct DaemonFuture {
    response: ResponseFuture,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The request, while it can still run elsewhere.
    kept: Option<Box<KeptRequest>>,
    /// Taken by the response's body when the head arrives.
    end: Option<CallEnd>,
}

impl std::fmt::Debug for DaemonFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonFuture").finish_non_exhaustive()
    }
}

impl DaemonFuture {
    /// Whether the request is kept: it can run elsewhere should the daemon not answer it.
    pub(crate) fn keeps_request(&self) -> bool {
        self.kept.is_some()
    }
}

impl Future for DaemonFuture {
    type Output = Result<http::Response<Body>, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(result) = Pin::new(&mut this.response).poll(cx) {
            return Poll::Ready(match result {
                Ok(response) => {
                    // The response belongs to the caller now: the request goes.
                    this.kept = None;
                    let end = this.end.take();
                    Ok(response.map(|recv| Body::new(DaemonBody::new(recv, end))))
                }
                Err(error) => Err(SendError::Failed {
                    fate: Fate::of(&error),
                    unresponsive: this.end.as_ref().is_some_and(CallEnd::unresponsive),
                    error,
                    request: this.kept.take(),
                }),
            });
        }
        match &mut this.deadline {
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
        DaemonClient::poll_ready(self, cx).map_err(|e| daemon_status(&e, false).into())
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let sent = self.send(request, false);
        Box::pin(async move {
            match sent {
                Ok(sent) => sent.await.map_err(|e| e.into_status().into()),
                Err(unsent) => Err(unsent.status().into()),
            }
        })
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
