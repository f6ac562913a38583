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
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use http::header::USER_AGENT;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use http_body::{Body as _, Frame};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tonic::{Code, Status, TimeoutExpired};
use tower::BoxError;

use crate::reason::error_chain;

/// The user-agent of a request that names none.
const CRATE_USER_AGENT: &str = concat!("tower-local-daemon/", env!("CARGO_PKG_VERSION"));

/// Sends requests to the daemon over one checked connection.
#[derive(Debug, Clone)]
pub(crate) struct DaemonClient {
    sender: SendRequest<Bytes>,
}

/// Why a sent request got no response from the daemon.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The caller's own deadline (`grpc-timeout`) expired.
    TimedOut,
    /// The stream or the connection failed: the request may have run.
    Failed(h2::Error),
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
            Self::TimedOut => Status::cancelled(TimeoutExpired(()).to_string()),
            Self::Failed(e) => daemon_status(&e),
        }
    }
}

impl DaemonClient {
    pub(crate) fn new(sender: SendRequest<Bytes>) -> Self {
        Self { sender }
    }

    /// `Ready(Err)` once the connection is closed or going away: nothing can be sent any more.
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        self.sender.poll_ready(cx)
    }

    /// Sends `request`, completed as tonic's `Channel` completes it. A request the connection
    /// no longer takes (it closed, or the daemon said GOAWAY) comes back whole: it never left
    /// this process.
    pub(crate) fn send(
        &mut self,
        mut request: http::Request<Body>,
    ) -> Result<DaemonFuture, Box<http::Request<Body>>> {
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
        let end_of_stream = request.body().is_end_stream();
        let (response, stream) = match self.sender.send_request(head, end_of_stream) {
            Ok(sent) => sent,
            Err(e) => {
                tracing::debug!(error = %e, "local daemon connection took no new request");
                return Err(Box::new(request));
            }
        };
        let deadline = grpc_timeout(request.headers()).map(|d| Box::pin(tokio::time::sleep(d)));
        if !end_of_stream {
            Upload::new(request.into_body(), stream).start();
        }
        Ok(DaemonFuture { response, deadline })
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
        response: ResponseFuture,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl std::fmt::Debug for DaemonFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonFuture").finish_non_exhaustive()
    }
}

impl Future for DaemonFuture {
    type Output = Result<http::Response<Body>, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = Pin::new(this.response).poll(cx) {
            return Poll::Ready(match result {
                Ok(response) => Ok(response.map(|recv| Body::new(DaemonBody::new(recv)))),
                Err(e) => Err(SendError::Failed(e)),
            });
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
    /// streaming goes in a task of its own.
    fn start(mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.poll_send(&mut cx).is_ready() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(std::future::poll_fn(move |cx| self.poll_send(cx)))),
            // No runtime to stream it: the stream ends here, and the daemon sees it cancelled.
            Err(_) => self.stream.send_reset(h2::Reason::CANCEL),
        }
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
                        Some(Err(_)) | None => return Poll::Ready(()),
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
                Err(_) => Err(SendError::unsent_status().into()),
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
}

impl DaemonBody {
    fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
            done: false,
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
