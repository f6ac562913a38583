//! HTTP/2 opened over a daemon socket ([`open`]); the end of the connection, and who ended it: the daemon (or a broken or hung
//! connection), or the runtime that drove it; and the registry's handle that closes it once the
//! calls in flight on it have finished.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::AbortHandle;

use super::call::InFlight;
use super::client::DaemonClient;
use super::io::{Cork, Corked, ReadToTheEnd};
use super::keepalive::Keepalive;

/// The HTTP/2 settings hyper's client gives tonic's `Channel`: windows, send buffer, the
/// response header list's bound, and the streams sent before the daemon's own limit is known.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;
const MAX_FRAME: u32 = 16 * 1024;

/// HTTP/2 over `io`, with the settings above and a keepalive ping every `keepalive_interval`
/// that must be answered within `keepalive_timeout`: the connection's task is spawned on the
/// current runtime. Returns the client that sends calls over it, and the registry's handle on
/// the task. `on_end` fires once when the connection ends. With `corked`, nothing is written
/// until the first request (or keepalive ping), which then leaves with HTTP/2's preface.
pub(crate) async fn open<T>(
    io: T,
    (keepalive_interval, keepalive_timeout): (Duration, Duration),
    on_end: ConnectionEnd,
    corked: bool,
) -> Result<(DaemonClient, ConnectionTask), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cork = Cork::new(corked);
    let io = Corked::new(
        tokio::io::BufWriter::new(ReadToTheEnd::new(io)),
        cork.clone(),
    );
    let (sender, mut connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .max_frame_size(MAX_FRAME)
        // h2 writes its preface without a flush: buffered, it joins the first frames (our
        // SETTINGS and the first request) in one write, and the daemon wakes once for them.
        .handshake::<_, Bytes>(io)
        .await?;
    let keepalive = connection.ping_pong().map(|ping_pong| {
        Keepalive::new(
            ping_pong,
            keepalive_interval,
            keepalive_timeout,
            cork.clone(),
        )
    });
    let in_flight = Arc::new(InFlight::default());
    let watched = Watched::new(connection, keepalive, in_flight.clone(), on_end);
    let task = ConnectionTask::new(tokio::spawn(watched).abort_handle(), in_flight.clone());
    Ok((DaemonClient::new(sender, in_flight, cork), task))
}

/// How a daemon connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndCause {
    /// The connection finished: the daemon sent GOAWAY or closed it, or an I/O error broke it.
    /// The daemon is gone for this process.
    Daemon,
    /// Keepalive gave up: the daemon did not answer a ping in time. Like [`Daemon`](Self::Daemon)
    /// it ends the route for every runtime; a runtime that was not driven for longer than the
    /// keepalive timeout looks the same, and the next re-probe corrects that.
    Unresponsive,
    /// The runtime that drove the connection shut down before it finished. The daemon may be
    /// fine: the next runtime connects again.
    RuntimeEnded,
}

/// Called once when a daemon connection ends.
#[derive(Clone)]
pub(crate) struct ConnectionEnd {
    fired: Arc<AtomicBool>,
    callback: Arc<dyn Fn(EndCause) + Send + Sync>,
}

impl std::fmt::Debug for ConnectionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionEnd")
            .field("fired", &self.has_fired())
            .finish()
    }
}

impl ConnectionEnd {
    pub(crate) fn new(callback: impl Fn(EndCause) + Send + Sync + 'static) -> Self {
        Self {
            fired: Arc::new(AtomicBool::new(false)),
            callback: Arc::new(callback),
        }
    }

    pub(crate) fn ignored() -> Self {
        Self::new(|_| {})
    }

    pub(crate) fn has_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Marks the end as told without telling it.
    fn silence(&self) {
        self.fired.store(true, Ordering::Release);
    }

    pub(crate) fn fire(&self, cause: EndCause) {
        if !self.fired.swap(true, Ordering::AcqRel) {
            (self.callback)(cause);
        }
    }
}

/// The registry's handle on a connection's task.
#[derive(Debug)]
pub(crate) struct ConnectionTask {
    abort: AbortHandle,
    in_flight: Arc<InFlight>,
}

impl ConnectionTask {
    fn new(abort: AbortHandle, in_flight: Arc<InFlight>) -> Self {
        Self { abort, in_flight }
    }

    /// Closes the connection once the calls already sent on it are done: a daemon that is
    /// stopping finishes them within its grace period, and a response still streaming to its
    /// caller goes on. A call that comes after the close is not sent (it runs in-process). A
    /// response the caller keeps and never finishes keeps the connection open until it drops it,
    /// or the daemon goes away, or keepalive finds it hung.
    pub(crate) fn close(&self) {
        self.in_flight.closing.store(true, Ordering::SeqCst);
        self.in_flight.wake();
    }

    /// Closes the connection now: for one that no call has used.
    pub(crate) fn abort(&self) {
        self.abort.abort();
    }
}

pin_project! {
    /// The HTTP/2 connection's future with its keepalive, which fires the end signal when the
    /// connection finishes ([`EndCause::Daemon`]), when a ping goes unanswered
    /// ([`EndCause::Unresponsive`]; the connection is then dropped, which closes the socket), or
    /// when it is dropped unfinished ([`EndCause::RuntimeEnded`]). Asked to close, it ends
    /// quietly when its last call in flight is done.
    struct Watched<F> {
        #[pin]
        connection: F,
        keepalive: Option<Keepalive>,
        in_flight: Arc<InFlight>,
        // The waker this task left with `in_flight`.
        kept_waker: Option<Waker>,
        end: ConnectionEnd,
    }

    impl<F> PinnedDrop for Watched<F> {
        fn drop(this: Pin<&mut Self>) {
            this.end.fire(EndCause::RuntimeEnded);
        }
    }
}

impl<F> Watched<F> {
    fn new(
        connection: F,
        keepalive: Option<Keepalive>,
        in_flight: Arc<InFlight>,
        end: ConnectionEnd,
    ) -> Self {
        Self {
            connection,
            keepalive,
            in_flight,
            kept_waker: None,
            end,
        }
    }
}

impl<F: Future<Output = Result<(), h2::Error>>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let cause = match this.connection.poll(cx) {
            Poll::Ready(Ok(())) => EndCause::Daemon,
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "local daemon connection failed");
                EndCause::Daemon
            }
            Poll::Pending => {
                if let Some(keepalive) = this.keepalive
                    && keepalive.poll_unanswered(cx).is_ready()
                {
                    tracing::debug!("local daemon did not answer a keepalive ping in time");
                    // Before the connection drops, so that its streams' errors say why.
                    this.in_flight.unresponsive.store(true, Ordering::SeqCst);
                    EndCause::Unresponsive
                } else {
                    std::task::ready!(this.in_flight.poll_drained(cx, this.kept_waker));
                    // Closed by the registry, which let go of it first: no news to tell.
                    this.end.silence();
                    return Poll::Ready(());
                }
            }
        };
        this.end.fire(cause);
        Poll::Ready(())
    }
}
