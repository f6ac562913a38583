//! The daemon connection's socket as h2 sees it: a write that finds the daemon gone does not
//! hide what the daemon sent before it went.
//!
//! A daemon that finishes its last stream after GOAWAY closes its socket at once. The bytes it
//! wrote last (a response, its trailers) are then in our receive buffer, unread. If h2 writes
//! before it reads them (a keepalive ping, a window update), the write fails with `EPIPE`, h2
//! fails the whole connection with that error, and a response that had fully arrived is lost
//! as "broken pipe". So once a write finds the peer gone, writes are accepted and dropped: the
//! peer reads nothing more anyway. Reads go on to the end of what the daemon sent, and the end
//! of the stream then ends the connection, failing any stream still open as before. A peer
//! that stops reading but never closes is found by keepalive, whose pings go unanswered.
//!
//! And a new connection's first bytes wait for its first request ([`Corked`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pin_project! {
    /// An I/O whose writes, once one found the peer gone, are dropped instead of failing.
    #[derive(Debug)]
    pub(crate) struct ReadToTheEnd<T> {
        #[pin]
        inner: T,
        peer_gone: bool,
    }
}

impl<T> ReadToTheEnd<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self {
            inner,
            peer_gone: false,
        }
    }
}

/// Whether a write's error says that the peer closed its end.
fn says_peer_gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

impl<T: AsyncRead> AsyncRead for ReadToTheEnd<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

/// `result` of a write, or, when it found the peer gone, the write dropped (`dropped`) and
/// `peer_gone` set.
fn settle<R>(peer_gone: &mut bool, result: Poll<io::Result<R>>, dropped: R) -> Poll<io::Result<R>> {
    match result {
        Poll::Ready(Err(e)) if says_peer_gone(&e) => {
            tracing::debug!(error = %e, "the local daemon closed its end; reading what it sent");
            *peer_gone = true;
            Poll::Ready(Ok(dropped))
        }
        other => other,
    }
}

impl<T: AsyncWrite> AsyncWrite for ReadToTheEnd<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        if *this.peer_gone {
            return Poll::Ready(Ok(buf.len()));
        }
        settle(this.peer_gone, this.inner.poll_write(cx, buf), buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let len = bufs.iter().map(|b| b.len()).sum();
        if *this.peer_gone {
            return Poll::Ready(Ok(len));
        }
        settle(
            this.peer_gone,
            this.inner.poll_write_vectored(cx, bufs),
            len,
        )
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.peer_gone {
            return Poll::Ready(Ok(()));
        }
        settle(this.peer_gone, this.inner.poll_flush(cx), ())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.peer_gone {
            return Poll::Ready(Ok(()));
        }
        settle(this.peer_gone, this.inner.poll_shutdown(cx), ())
    }
}

/// Holds a new connection's first bytes (HTTP/2's preface and SETTINGS) back until the first
/// request joins them, so that the daemon wakes once for all of them; released by the first
/// request, or by the first keepalive ping of a connection that no request used.
#[derive(Debug)]
pub(crate) struct Cork(AtomicBool);

impl Cork {
    /// A cork that holds (`held`), or one already released.
    pub(crate) fn new(held: bool) -> Arc<Self> {
        Arc::new(Self(AtomicBool::new(held)))
    }

    /// Releases it; a read, and no write, once it is released (every call asks).
    pub(crate) fn release(&self) {
        if self.held() {
            self.0.store(false, Ordering::Release);
        }
    }

    fn held(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

pin_project! {
    /// An I/O whose flushes do nothing while its [`Cork`] holds: what was written stays in the
    /// buffered writer below.
    #[derive(Debug)]
    pub(crate) struct Corked<T> {
        #[pin]
        inner: T,
        cork: Arc<Cork>,
    }
}

impl<T> Corked<T> {
    pub(crate) fn new(inner: T, cork: Arc<Cork>) -> Self {
        Self { inner, cork }
    }
}

impl<T: AsyncRead> AsyncRead for Corked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Corked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        match this.cork.held() {
            true => Poll::Ready(Ok(())),
            false => this.inner.poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn what_the_peer_sent_before_it_closed_is_read_after_a_write_fails() {
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut theirs = theirs;
        theirs.write_all(b"the last response").await.unwrap();
        drop(theirs);

        let mut ours = ReadToTheEnd::new(ours);
        // The raw socket says EPIPE here; the adapter drops the write.
        ours.write_all(b"a keepalive ping").await.unwrap();
        ours.flush().await.unwrap();
        let mut read = Vec::new();
        ours.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, b"the last response");
        assert!(ours.peer_gone);
    }

    #[tokio::test]
    async fn a_corked_write_waits_for_the_release_and_goes_out_with_the_next() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let cork = Cork::new(true);
        let mut ours = Corked::new(tokio::io::BufWriter::new(ours), cork.clone());
        ours.write_all(b"preface ").await.unwrap();
        ours.flush().await.unwrap();
        let mut read = [0; 8];
        assert!(
            theirs.try_read(&mut read).is_err(),
            "nothing left while corked"
        );
        cork.release();
        ours.write_all(b"request").await.unwrap();
        ours.flush().await.unwrap();
        let mut read = [0; 15];
        theirs.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"preface request");
    }

    #[tokio::test]
    async fn a_write_to_a_peer_that_is_there_is_written() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut ours = ReadToTheEnd::new(ours);
        ours.write_all(b"ping").await.unwrap();
        let mut read = [0; 4];
        theirs.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"ping");
        assert!(!ours.peer_gone);
    }
}
