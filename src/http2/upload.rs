//! A request body on its way to the daemon ([`Upload`]): sent from the caller's task when it is
//! already whole, else streamed by a task of its own within the stream's flow-control window,
//! until the response side aborts that task: the call is over. A whole body is also kept
//! ([`KeptBody`], its chunks by reference count, no copy), so that the request can still run
//! elsewhere until its response head arrives.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::SendStream;
use http_body::{Body as _, Frame};
use tokio::task::AbortHandle;
use tonic::body::Body;

/// A request body on its way: the chunks the body has given and not yet sent (at most two, so
/// that the first is known to be the last or not), sent as the stream's window allows; the last
/// one goes at once, window or not, since nothing follows it.
pub(super) struct Upload {
    body: Body,
    stream: SendStream<Bytes>,
    chunks: VecDeque<Bytes>,
    /// The body said `Pending` since the front chunk was read: the daemon may wait for it.
    body_waits: bool,
    /// What was sent, while it is kept (from the caller's task only).
    kept: Option<KeptBody>,
}

/// How a body's sending began.
pub(super) enum Started {
    /// Sent whole from the caller's task; kept when asked and it ended as the body did.
    Whole(Option<KeptBody>),
    /// Still streaming, in a task of its own.
    Streaming(AbortHandle),
}

/// A whole request body, as sent: its chunks and its trailers.
#[derive(Debug, Default)]
pub(crate) struct KeptBody {
    chunks: VecDeque<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for KeptBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none()
    }
}

/// How a body's sending ended.
#[derive(PartialEq, Eq)]
enum Sent {
    /// All of it, to its end.
    Whole,
    /// Not all: the body failed, or the stream was reset or closed.
    Cut,
}

impl Upload {
    pub(super) fn new(body: Body, stream: SendStream<Bytes>, keep: bool) -> Self {
        Self {
            body,
            stream,
            chunks: VecDeque::new(),
            body_waits: false,
            kept: keep.then(KeptBody::default),
        }
    }

    /// Sends what the body has now, from the caller's task: a whole body (a unary call's) is
    /// queued with the head, and the connection writes both together. The rest of a body still
    /// streaming goes in a task of its own, which the response side aborts when the call is
    /// over: the stream's last handle goes with it, and h2 resets the stream (`CANCEL`) rather
    /// than leave it open for a body that may never end. Such a body is not kept.
    pub(super) fn start(mut self) -> Started {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(sent) = self.poll_send(&mut cx) {
            let kept = self.kept.take().filter(|_| sent == Sent::Whole);
            return Started::Whole(kept);
        }
        self.kept = None;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to stream it: the stream ends here, and the daemon sees it cancelled.
            self.stream.send_reset(h2::Reason::CANCEL);
            return Started::Whole(None);
        };
        let task = runtime.spawn(std::future::poll_fn(move |cx| self.poll_send(cx).map(drop)));
        Started::Streaming(task.abort_handle())
    }

    /// Sends a chunk, and keeps it while the body is kept.
    fn send_data(&mut self, chunk: Bytes, end_of_stream: bool) -> Result<(), h2::Error> {
        if let Some(kept) = &mut self.kept
            && !chunk.is_empty()
        {
            kept.chunks.push_back(chunk.clone());
        }
        self.stream.send_data(chunk, end_of_stream)
    }

    /// `Ready` once the body is sent, failed, or the daemon reset the stream.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Sent> {
        loop {
            if self.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(Sent::Cut);
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
                            return Poll::Ready(Sent::Cut);
                        }
                        // The stream no longer sends: the daemon reset or finished it.
                        None => return Poll::Ready(Sent::Cut),
                    }
                }
                let Some(chunk) = self.chunks.pop_front() else {
                    continue;
                };
                self.body_waits = false;
                if self.send_data(chunk, false).is_err() {
                    return Poll::Ready(Sent::Cut);
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
                    while let Some(chunk) = self.chunks.pop_front() {
                        if self.send_data(chunk, false).is_err() {
                            return Poll::Ready(Sent::Cut);
                        }
                    }
                    let trailers = frame.into_trailers().unwrap_or_default();
                    if let Some(kept) = &mut self.kept {
                        kept.trailers = Some(trailers.clone());
                    }
                    return Poll::Ready(match self.stream.send_trailers(trailers) {
                        Ok(()) => Sent::Whole,
                        Err(_) => Sent::Cut,
                    });
                }
                None => {
                    let last = self.chunks.pop_front().unwrap_or_default();
                    return Poll::Ready(match self.send_data(last, true) {
                        Ok(()) => Sent::Whole,
                        Err(_) => Sent::Cut,
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "request body failed; the stream is cancelled");
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(Sent::Cut);
                }
            }
        }
    }
}
