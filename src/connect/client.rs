//! The daemon route itself: requests over an h2 client ([`SendRequest`]) on the one checked
//! connection, with what tonic's `Channel` would add (the origin, a user-agent, the caller's
//! own deadline), and the status codes that say what happened to a call.
//!
//! No task stands between the caller and the connection: the caller's task queues the request's
//! head and, when the body is already whole (a unary call's is), all of it, so that the
//! connection's task writes the call in one go. A body still streaming goes on in a task of its
//! own, within the stream's flow-control window. There is no reconnect: a closed connection
//! stays closed.

use std::collections::VecDeque;
use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use http::header::USER_AGENT;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use http_body::{Body as _, Frame};
use tonic::body::Body;
use tonic::{Code, Status, TimeoutExpired};
use tower::BoxError;

use super::end::{CallClaim, InFlight};
use crate::reason::error_chain;
use crate::sync::lock;

/// The user-agent of a request that names none.
const CRATE_USER_AGENT: &str = concat!("tower-local-daemon/", env!("CARGO_PKG_VERSION"));

/// Sends requests to the daemon over one checked connection.
#[derive(Debug, Clone)]
pub(crate) struct DaemonClient {
    sender: SendRequest<Bytes>,
    in_flight: Arc<InFlight>,
}

/// A request that did not leave this process, and whether that is because the connection is
/// closed (or going away) rather than the request's own shape.
#[derive(Debug)]
pub(crate) struct Unsent {
    pub(crate) request: Box<http::Request<Body>>,
    pub(crate) error: h2::Error,
    pub(crate) connection_closed: bool,
}

/// Why a sent request got no response from the daemon.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The caller's own deadline (`grpc-timeout`) expired.
    TimedOut,
    /// The stream or the connection failed: the request may have run.
    Failed(h2::Error),
}

impl Unsent {
    /// The status of this request where it may not run elsewhere.
    pub(crate) fn status(&self) -> Status {
        match self.connection_closed {
            true => Status::unavailable(
                "the local daemon connection closed before the request was sent; it did not run",
            ),
            false => Status::internal(format!(
                "the request could not be sent to the local daemon ({}); it did not run",
                self.error
            )),
        }
    }
}

impl SendError {
    /// The status a caller sees.
    pub(crate) fn into_status(self) -> Status {
        match self {
            Self::TimedOut => Status::cancelled(TimeoutExpired(()).to_string()),
            Self::Failed(e) => daemon_status(&e),
        }
    }
}

impl DaemonClient {
    pub(crate) fn new(sender: SendRequest<Bytes>, in_flight: Arc<InFlight>) -> Self {
        Self { sender, in_flight }
    }

    /// `Ready(Err)` once the connection is closed or going away: nothing can be sent any more.
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        self.sender.poll_ready(cx)
    }

    /// Sends `request`, completed as tonic's `Channel` completes it. A request the connection
    /// does not take comes back whole: it never left this process.
    pub(crate) fn send(&mut self, mut request: http::Request<Body>) -> Result<DaemonFuture, Unsent> {
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
        let (response, stream) = match self.sender.send_request(head, end_of_stream) {
            Ok(sent) => sent,
            Err(error) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let connection_closed = matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Err(_)));
                tracing::debug!(%error, connection_closed, "the local daemon connection took no request");
                return Err(Unsent {
                    request: Box::new(request),
                    error,
                    connection_closed,
                });
            }
        };
        let deadline = grpc_timeout(request.headers()).map(|d| Box::pin(tokio::time::sleep(d)));
        let upload = match end_of_stream {
            true => None,
            false => Upload::new(request.into_body(), stream).start(),
        };
        Ok(DaemonFuture {
            response,
            deadline,
            end: Some(CallEnd {
                _claim: self.in_flight.enter(),
                upload,
            }),
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

/// A request on its way to the daemon, bounded by the caller's deadline.
pub(crate) struct DaemonFuture {
    response: ResponseFuture,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Taken by the response's body when the head arrives.
    end: Option<CallEnd>,
}

impl std::fmt::Debug for DaemonFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonFuture").finish_non_exhaustive()
    }
}

impl Future for DaemonFuture {
    type Output = Result<http::Response<Body>, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(result) = Pin::new(&mut this.response).poll(cx) {
            return Poll::Ready(match result {
                Ok(response) => {
                    let end = this.end.take();
                    Ok(response.map(|recv| Body::new(DaemonBody::new(recv, end))))
                }
                Err(e) => Err(SendError::Failed(e)),
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

/// What the end of a call's response does, whenever it comes (the whole body read, the caller
/// gone, the deadline passed): it releases the call's claim on the connection, and ends its
/// upload should the request body still be streaming.
struct CallEnd {
    _claim: CallClaim,
    upload: Option<Arc<Abandon>>,
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        if let Some(upload) = &self.upload {
            upload.abandon();
        }
    }
}

/// The response side's word to a request body still streaming in its own task: the call is
/// over, and the stream is reset rather than left open for a body that may never end.
#[derive(Default)]
struct Abandon {
    over: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Abandon {
    fn abandon(&self) {
        self.over.store(true, Ordering::Release);
        if let Some(waker) = lock(&self.waker).take() {
            waker.wake();
        }
    }

    fn is_over(&self, cx: &mut Context<'_>) -> bool {
        *lock(&self.waker) = Some(cx.waker().clone());
        self.over.load(Ordering::Acquire)
    }
}

/// A request body on its way: the chunks the body has given and not yet sent (at most two, so
/// that the first is known to be the last or not), sent as the stream's window allows; the last
/// one goes at once, window or not, since nothing follows it.
struct Upload {
    body: Body,
    stream: SendStream<Bytes>,
    chunks: VecDeque<Bytes>,
    /// The body said `Pending` since the front chunk was read: the daemon may wait for it.
    body_waits: bool,
}

impl Upload {
    fn new(body: Body, stream: SendStream<Bytes>) -> Self {
        Self {
            body,
            stream,
            chunks: VecDeque::new(),
            body_waits: false,
        }
    }

    /// Sends what the body has now, from the caller's task: a whole body (a unary call's) is
    /// queued with the head, and the connection writes both together. The rest of a body still
    /// streaming goes in a task of its own, until the response side says the call is over.
    fn start(mut self) -> Option<Arc<Abandon>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.poll_send(&mut cx).is_ready() {
            return None;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to stream it: the stream ends here, and the daemon sees it cancelled.
            self.stream.send_reset(h2::Reason::CANCEL);
            return None;
        };
        let abandon = Arc::new(Abandon::default());
        let over = abandon.clone();
        drop(runtime.spawn(std::future::poll_fn(move |cx| {
            if over.is_over(cx) {
                self.stream.send_reset(h2::Reason::CANCEL);
                return Poll::Ready(());
            }
            self.poll_send(cx)
        })));
        Some(abandon)
    }

    /// `Ready` once the body is sent, failed, or the daemon reset the stream.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if self.chunks.len() > 1 || (self.body_waits && !self.chunks.is_empty()) {
                // The front chunk is not known to be the last: it waits for window.
                let len = self.chunks.front().map_or(0, Bytes::len);
                self.stream.reserve_capacity(len);
                if self.stream.capacity() == 0 {
                    match std::task::ready!(self.stream.poll_capacity(cx)) {
                        Some(Ok(_)) => continue,
                        Some(Err(_)) => {
                            self.stream.send_reset(h2::Reason::CANCEL);
                            return Poll::Ready(());
                        }
                        // The stream no longer sends: the daemon reset or finished it.
                        None => return Poll::Ready(()),
                    }
                }
                let Some(chunk) = self.chunks.pop_front() else {
                    continue;
                };
                self.body_waits = false;
                if self.stream.send_data(chunk, false).is_err() {
                    return Poll::Ready(());
                }
                continue;
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending if self.chunks.is_empty() => return Poll::Pending,
                Poll::Pending => {
                    self.body_waits = true;
                    continue;
                }
                Poll::Ready(frame) => frame,
            };
            match frame.map(|frame| frame.map(Frame::into_data)) {
                Some(Ok(Ok(chunk))) => {
                    if !chunk.is_empty() {
                        self.body_waits = false;
                        self.chunks.push_back(chunk);
                    }
                }
                Some(Ok(Err(frame))) => {
                    // Trailers end the body: what is left goes now, then them.
                    for chunk in self.chunks.drain(..) {
                        if self.stream.send_data(chunk, false).is_err() {
                            return Poll::Ready(());
                        }
                    }
                    let trailers = frame.into_trailers().unwrap_or_default();
                    let _ = self.stream.send_trailers(trailers);
                    return Poll::Ready(());
                }
                None => {
                    let last = self.chunks.pop_front().unwrap_or_default();
                    let _ = self.stream.send_data(last, true);
                    return Poll::Ready(());
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "request body failed; the stream is cancelled");
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
            }
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
        Box::pin(async move {
            match sent {
                Ok(sent) => sent.await.map_err(|e| e.into_status().into()),
                Err(unsent) => Err(unsent.status().into()),
            }
        })
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

/// The daemon's response body: its data (whose window is released as it is read), then its
/// trailers; errors get their codes as the head's do.
struct DaemonBody {
    recv: RecvStream,
    data_done: bool,
    done: bool,
    _end: Option<CallEnd>,
}

impl DaemonBody {
    fn new(recv: RecvStream, end: Option<CallEnd>) -> Self {
        Self {
            recv,
            data_done: false,
            done: false,
            _end: end,
        }
    }
}

impl http_body::Body for DaemonBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(daemon_status(&e))));
                }
                None => self.data_done = true,
            }
        }
        let trailers = std::task::ready!(self.recv.poll_trailers(cx));
        self.done = true;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(daemon_status(&e))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
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
