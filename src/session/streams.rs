//! Stream adapters the session driver needs around its sockets.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream that first yields bytes already received, then reads from the
/// socket. After STARTTLS the bytes the client sent behind the command are
/// handed to the TLS handshake this way: a client that pipelines its
/// ClientHello still works, and injected plaintext only fails the handshake.
pub struct Prefixed<S> {
    prefix: HeldBytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix: HeldBytes::new(prefix),
            inner,
        }
    }
}

/// Bytes received but not yet read by the caller, handed out in order and
/// freed as soon as the last of them is taken (an idle session holds none).
#[derive(Default)]
pub struct HeldBytes {
    bytes: Vec<u8>,
    position: usize,
}

impl HeldBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self { bytes, position: 0 }
    }

    /// Moves as many held bytes as fit into `buf`; false if none are held.
    pub fn hand_out(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.position >= self.bytes.len() {
            return false;
        }
        let rest = &self.bytes[self.position..];
        let take = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..take]);
        self.position += take;
        if self.position == self.bytes.len() {
            *self = Self::default();
        }
        true
    }

    /// Bytes of heap held (for tests of idle memory).
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.prefix.hand_out(buf) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Marks that bytes moved; a watchdog reads and clears it. One relaxed
/// store per read or write keeps the hot path free of clocks and timers.
#[derive(Clone, Default)]
pub struct ActivityFlag(Arc<AtomicBool>);

impl ActivityFlag {
    fn touch(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `limit` (to within a quarter of
    /// it: the flag is checked four times per period).
    pub async fn idle_for(&self, limit: Duration) {
        let tick = limit / 4;
        let mut quiet_ticks = 0;
        loop {
            tokio::time::sleep(tick).await;
            if self.0.swap(false, Ordering::Relaxed) {
                quiet_ticks = 0;
            } else {
                quiet_ticks += 1;
                if quiet_ticks >= 4 {
                    return;
                }
            }
        }
    }
}

/// The backend socket during pass-through, counting the plaintext bytes that
/// cross it (one atomic add per read or write, no per-byte work) and marking
/// activity for the idle watchdog.
pub struct Counted<S> {
    inner: S,
    read: Counter,
    written: Counter,
    activity: ActivityFlag,
}

impl<S> Counted<S> {
    pub fn new(inner: S, read: Counter, written: Counter, activity: ActivityFlag) -> Self {
        Self {
            inner,
            read,
            written,
            activity,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let added = buf.filled().len().saturating_sub(before);
        if added > 0 {
            self.read.increment(added as u64);
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled {
            self.written.increment(written as u64);
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn held_bytes_come_out_in_order_and_their_memory_goes_with_the_last() {
        let mut held = HeldBytes::new(b"abcdefg".to_vec());
        let mut out = Vec::new();
        let mut room = [0u8; 3];
        loop {
            let mut buf = ReadBuf::new(&mut room);
            if !held.hand_out(&mut buf) {
                break;
            }
            out.extend_from_slice(buf.filled());
        }
        assert_eq!(out, b"abcdefg");
        assert_eq!(held.capacity(), 0);
    }

    #[tokio::test]
    async fn prefixed_yields_the_prefix_then_the_stream() {
        let inner: &[u8] = b" world";
        let mut stream = Prefixed::new(b"hello".to_vec(), inner);
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"hello world");
    }
}
