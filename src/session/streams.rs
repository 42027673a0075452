//! Stream adapters the session driver needs around its sockets.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Marks that bytes moved; a watchdog reads and clears it. One relaxed
/// store per read or write keeps the hot path free of clocks and timers.
#[derive(Clone, Default)]
pub(crate) struct ActivityFlag(Arc<AtomicBool>);

impl ActivityFlag {
    fn touch(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `limit` (to within a quarter of
    /// it: the flag is checked four times per period).
    pub(crate) async fn idle_for(&self, limit: Duration) {
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
pub(crate) struct Counted<S> {
    inner: S,
    read: Counter,
    written: Counter,
    activity: ActivityFlag,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, read: Counter, written: Counter, activity: ActivityFlag) -> Self {
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
