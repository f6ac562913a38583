//! The daemon's socket: bound `0600` from the moment it exists, listened on by the serving
//! process itself, and accepting only peers of the daemon's own uid.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::sys::stat::Mode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tonic::transport::server::{Connected, UdsConnectInfo};

use super::counters::DaemonCounters;
use crate::paths::SocketAddrPath;
use crate::peer::PeerCredentials;

/// Creates, binds and listens on the socket at `path`. The socket is `fchmod`-ed to `0600`
/// before `bind`, so the file is never more open than that, whatever the umask, and the process
/// umask is left alone.
pub(super) fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o600))?;
    let addr_path = SocketAddrPath::new(path)?;
    let addr = UnixAddr::new(addr_path.path())?;
    nix::sys::socket::bind(fd.as_raw_fd(), &addr)?;
    nix::sys::socket::listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
}

/// Accepted connections whose peer runs as the daemon's effective uid; others are dropped
/// before tonic sees them.
pub(super) struct PeerCheckedIncoming {
    pub(super) listener: UnixListener,
    pub(super) counters: Arc<DaemonCounters>,
    pub(super) abort: watch::Receiver<bool>,
    /// After an accept error (EMFILE, ENOMEM) the next accept waits a moment: tonic retries at
    /// once, and the error would repeat in a busy loop.
    pub(super) backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tokio_stream::Stream for PeerCheckedIncoming {
    type Item = io::Result<ServedStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(backoff) = &mut self.backoff {
            std::task::ready!(backoff.as_mut().poll(cx));
            self.backoff = None;
        }
        loop {
            let (stream, _) = match std::task::ready!(self.listener.poll_accept(cx)) {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                    self.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
                    return Poll::Ready(Some(Err(e)));
                }
            };
            match PeerCredentials::of(&stream) {
                Ok(peer) if peer.is_own_uid() => {
                    return Poll::Ready(Some(Ok(ServedStream::new(stream, self.abort.clone()))));
                }
                Ok(peer) => {
                    self.counters.refused_peers.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        uid = peer.uid,
                        pid = ?peer.pid,
                        "refused a connection from another user"
                    );
                }
                Err(e) => {
                    self.counters.refused_peers.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "refused a connection whose peer is unknown");
                }
            }
        }
    }
}

/// An accepted connection that the daemon can abort when the grace period runs out: tonic's own
/// graceful shutdown waits for connections without a limit.
pub(super) struct ServedStream {
    inner: UnixStream,
    aborted: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
}

impl ServedStream {
    fn new(inner: UnixStream, mut abort: watch::Receiver<bool>) -> Self {
        Self {
            inner,
            aborted: Box::pin(async move {
                let _ = abort.wait_for(|aborted| *aborted).await;
            }),
        }
    }

    fn check_abort(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.aborted.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the daemon's shutdown grace period ran out",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl Connected for ServedStream {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for ServedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_abort(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_abort(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_abort(cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
