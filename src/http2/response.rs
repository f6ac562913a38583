//! The daemon's answer as the caller sees it: its body ([`DaemonBody`]), and the status codes
//! of what went wrong on the way.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::RecvStream;
use http_body::Frame;
use tonic::{Code, Status};

use super::call::CallEnd;

/// What a stream's failure says of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// The daemon provably never processed it: the stream was above the last stream id of the
    /// daemon's GOAWAY (RFC 9113, 6.8), or reset with `REFUSED_STREAM` (8.7).
    NotProcessed,
    /// The daemon answered by resetting the stream (any other reason): that is its answer.
    Answered,
    /// The connection broke (reset, end of stream, keepalive given up): it may have run.
    Broken,
    /// Anything else (a protocol error h2 found): it may have run.
    Unknown,
}

impl Fate {
    pub(crate) fn of(error: &h2::Error) -> Self {
        if error.is_reset() && error.is_remote() {
            return match error.reason() {
                Some(h2::Reason::REFUSED_STREAM) => Self::NotProcessed,
                _ => Self::Answered,
            };
        }
        // h2 fails a stream with the peer's GOAWAY only when it is above the last stream id.
        if error.is_go_away() && error.is_remote() {
            return Self::NotProcessed;
        }
        if error.is_io() {
            return Self::Broken;
        }
        Self::Unknown
    }
}

/// An error on the daemon route, as the caller sees it: a stream the daemon reset gets the code
/// of its reason; anything else that broke the connection mid-call is `UNAVAILABLE`.
/// `unresponsive`: keepalive gave up on the connection, which the stream sees only as a broken
/// pipe.
pub(crate) fn daemon_status(error: &h2::Error, unresponsive: bool) -> Status {
    let broke = what_broke(error, unresponsive);
    if error.is_reset()
        && error.is_remote()
        && let Some(reason) = error.reason()
    {
        let message = format!("the local daemon reset the stream: {reason}");
        return transport_status(code_of_reset(reason), message, broke);
    }
    let message =
        format!("local daemon connection failed; the call may have run on the daemon: {broke}");
    transport_status(Code::Unavailable, message, broke)
}

/// A status of the daemon route itself, not of the daemon's handler: its source is
/// [`ConnectionBroke`], which says what broke without the call's words.
pub(crate) fn transport_status(code: Code, message: String, broke: String) -> Status {
    let mut status = Status::new(code, message);
    status.set_source(std::sync::Arc::new(ConnectionBroke(broke)));
    status
}

/// What broke on the daemon connection, as the source of the status the route gives: the
/// handshake's health check, which is not a call, reports this rather than the status.
#[derive(Debug)]
pub(crate) struct ConnectionBroke(pub(crate) String);

impl std::fmt::Display for ConnectionBroke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectionBroke {}

/// What broke, for a person: h2's reason without the debug bytes of a GOAWAY (h2's own
/// names, such as `too_many_continuations`, mean nothing to a user), and a connection that
/// keepalive gave up on named as such rather than by the broken pipe its streams see.
pub(crate) fn what_broke(error: &h2::Error, unresponsive: bool) -> String {
    if unresponsive {
        return "the daemon stopped answering (keepalive)".to_owned();
    }
    match (error.reason(), error.get_io()) {
        (Some(reason), _) if error.is_go_away() && error.is_remote() => {
            format!("the daemon closed the connection ({reason})")
        }
        (Some(reason), _) if error.is_go_away() && error.is_library() => {
            format!("the daemon broke the HTTP/2 protocol ({reason})")
        }
        (Some(reason), _) if error.is_reset() && error.is_remote() => {
            format!("the daemon reset the stream ({reason})")
        }
        (Some(reason), _) => format!("HTTP/2 error ({reason})"),
        (None, Some(io)) => format!("the connection broke ({io})"),
        (None, None) => error.to_string(),
    }
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
pub(super) struct DaemonBody {
    recv: RecvStream,
    data_done: bool,
    done: bool,
    end: Option<CallEnd>,
}

impl DaemonBody {
    pub(super) fn new(recv: RecvStream, end: Option<CallEnd>) -> Self {
        Self {
            recv,
            data_done: false,
            done: false,
            end,
        }
    }

    /// Whether keepalive gave up on the connection.
    fn unresponsive(&self) -> bool {
        self.end.as_ref().is_some_and(CallEnd::unresponsive)
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
                    return Poll::Ready(Some(Err(daemon_status(&e, self.unresponsive()))));
                }
                None => self.data_done = true,
            }
        }
        let trailers = std::task::ready!(self.recv.poll_trailers(cx));
        self.done = true;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(daemon_status(&e, self.unresponsive()))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }
}
