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
    /// What was taken from the body, while it is kept (from the caller's task only).
    kept: Option<KeptBody>,
    /// How far the body was read.
    read: Read,
}

/// How far a request body was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Open,
    /// To its end (its last chunk, or its trailers).
    Ended,
    /// It failed.
    Failed,
}

/// How a body's sending began.
pub(super) enum Started {
    /// Read to its end from the caller's task (and sent, unless the stream was cut first); kept
    /// when asked.
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

impl Upload {
    pub(super) fn new(body: Body, stream: SendStream<Bytes>, keep: bool) -> Self {
        Self {
            body,
            stream,
            chunks: VecDeque::new(),
            body_waits: false,
            kept: keep.then(KeptBody::default),
            read: Read::Open,
        }
    }

    /// Sends what the body has now, from the caller's task: a whole body (a unary call's) is
    /// queued with the head, and the connection writes both together. The rest of a body still
    /// streaming goes in a task of its own, which the response side aborts when the call is
    /// over: the stream's last handle goes with it, and h2 resets the stream (`CANCEL`) rather
    /// than leave it open for a body that may never end. Such a body is not kept.
    pub(super) fn start(mut self) -> Started {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.poll_send(&mut cx).is_ready() {
            return Started::Whole(self.keep_rest(&mut cx));
        }
        self.kept = None;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to stream it: the stream ends here, and the daemon sees it cancelled.
            self.stream.send_reset(h2::Reason::CANCEL);
            return Started::Whole(None);
        };
        let task = runtime.spawn(std::future::poll_fn(move |cx| self.poll_send(cx)));
        Started::Streaming(task.abort_handle())
    }

    /// The whole body, when it is kept: what was sent, what was not (the stream was cut before
    /// all of it went, as when the daemon went away meanwhile), and the rest of the body if it
    /// is there now. `None` for a body that failed or is still streaming.
    fn keep_rest(&mut self, cx: &mut Context<'_>) -> Option<KeptBody> {
        let mut kept = self.kept.take()?;
        kept.chunks.extend(self.chunks.drain(..));
        while self.read == Read::Open {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(chunk) if chunk.is_empty() => {}
                    Ok(chunk) => kept.chunks.push_back(chunk),
                    Err(frame) => {
                        kept.trailers = frame.into_trailers().ok();
                        self.read = Read::Ended;
                    }
                },
                Poll::Ready(None) => self.read = Read::Ended,
                Poll::Ready(Some(Err(_))) | Poll::Pending => return None,
            }
        }
        (self.read == Read::Ended).then_some(kept)
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
                if self.send_data(chunk, false).is_err() {
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
                    self.read = Read::Ended;
                    let trailers = frame.into_trailers().unwrap_or_default();
                    if let Some(kept) = &mut self.kept {
                        kept.trailers = Some(trailers.clone());
                    }
                    while let Some(chunk) = self.chunks.pop_front() {
                        if self.send_data(chunk, false).is_err() {
                            return Poll::Ready(());
                        }
                    }
                    let _ = self.stream.send_trailers(trailers);
                    return Poll::Ready(());
                }
                None => {
                    self.read = Read::Ended;
                    let last = self.chunks.pop_front().unwrap_or_default();
                    let _ = self.send_data(last, true);
                    return Poll::Ready(());
                }
                Some(Err(e)) => {
                    self.read = Read::Failed;
                    tracing::debug!(error = %e, "request body failed; the stream is cancelled");
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
            }
        }
    }
}
