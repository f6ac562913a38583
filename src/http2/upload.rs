//! A request body on its way to the daemon ([`Upload`]): sent from the caller's task when it is
//! already whole, else streamed by a task of its own within the stream's flow-control window,
//! until the response side aborts that task: the call is over.

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
}

impl Upload {
    pub(super) fn new(body: Body, stream: SendStream<Bytes>) -> Self {
        Self {
            body,
            stream,
            chunks: VecDeque::new(),
            body_waits: false,
        }
    }

    /// Sends what the body has now, from the caller's task: a whole body (a unary call's) is
    /// queued with the head, and the connection writes both together. The rest of a body still
    /// streaming goes in a task of its own, which the response side aborts when the call is
    /// over: the stream's last handle goes with it, and h2 resets the stream (`CANCEL`) rather
    /// than leave it open for a body that may never end.
    pub(super) fn start(mut self) -> Option<AbortHandle> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.poll_send(&mut cx).is_ready() {
            return None;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to stream it: the stream ends here, and the daemon sees it cancelled.
            self.stream.send_reset(h2::Reason::CANCEL);
            return None;
        };
        let task = runtime.spawn(std::future::poll_fn(move |cx| self.poll_send(cx)));
        Some(task.abort_handle())
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
