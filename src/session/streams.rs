//! Stream adapters the session driver needs around its sockets, and the
//! session's own byte tally.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// One session's plaintext bytes each way, for its access-log line: what
/// the proxy wrote to the backend and to the client, in inspection and
/// pass-through alike (the same bytes the listener's byte counters count).
#[derive(Debug, Default)]
pub(crate) struct ByteTally {
    to_backend: AtomicU64,
    to_client: AtomicU64,
}

impl ByteTally {
    pub(crate) fn add_to_backend(&self, bytes: u64) {
        self.to_backend.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_to_client(&self, bytes: u64) {
        self.to_client.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn to_backend(&self) -> u64 {
        self.to_backend.load(Ordering::Relaxed)
    }

    pub(crate) fn to_client(&self) -> u64 {
        self.to_client.load(Ordering::Relaxed)
    }
}

/// The backend socket during pass-through, counting the plaintext bytes that
/// cross it (one atomic add per read or write for the listener, one for the
/// session, no per-byte work) and marking activity for the idle watchdog.
pub(crate) struct Counted<'t, S> {
    inner: S,
    read: Counter,
    written: Counter,
    session: &'t ByteTally,
    activity: ActivityFlag,
}

impl<'t, S> Counted<'t, S> {
    pub(crate) fn new(
        inner: S,
        (read, written): (Counter, Counter),
        session: &'t ByteTally,
        activity: ActivityFlag,
    ) -> Self {
        Self {
            inner,
            read,
            written,
            session,
            activity,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
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
            self.session.add_to_client(added as u64);
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled {
            self.written.increment(written as u64);
            self.session.add_to_backend(written as u64);
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
