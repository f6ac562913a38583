//! HTTP/2 keepalive on the daemon connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::io::Cork;

/// HTTP/2 keepalive: a ping every `interval`, also while idle; a ping unanswered for `timeout`
/// means the daemon is gone (or stopped, or its runtime hung).
pub(crate) struct Keepalive {
    ping_pong: h2::PingPong,
    interval: Duration,
    timeout: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    awaiting_pong: bool,
    /// Released by the first ping, which must leave even if no request ever did.
    cork: Arc<Cork>,
}

impl Keepalive {
    pub(crate) fn new(
        ping_pong: h2::PingPong,
        interval: Duration,
        timeout: Duration,
        cork: Arc<Cork>,
    ) -> Self {
        Self {
            ping_pong,
            interval,
            timeout,
            timer: Box::pin(tokio::time::sleep(interval)),
            awaiting_pong: false,
            cork,
        }
    }

    /// `Ready` when a ping went unanswered for the timeout. A ping the connection can no longer
    /// send leaves the verdict to the connection's own end.
    pub(super) fn poll_unanswered(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.awaiting_pong {
                match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        self.rearm(self.interval);
                        continue;
                    }
                    Poll::Ready(Err(_)) => return Poll::Pending,
                    Poll::Pending => {}
                }
                return self.timer.as_mut().poll(cx);
            }
            std::task::ready!(self.timer.as_mut().poll(cx));
            self.cork.release();
            if self.ping_pong.send_ping(h2::Ping::opaque()).is_err() {
                return Poll::Pending;
            }
            self.awaiting_pong = true;
            self.rearm(self.timeout);
        }
    }

    fn rearm(&mut self, after: Duration) {
        self.timer.set(tokio::time::sleep(after));
    }
}
