//! Pass-through copying that holds no buffer while a session is idle.
//!
//! Mail sessions spend most of their life idle (an IMAP client in IDLE for
//! hours), so per-session memory is what limits how many a proxy holds.
//! tokio's `copy_bidirectional` keeps two 8 KiB buffers for the whole life of
//! a session; [`copy_bidirectional`] here reads into one scratch buffer per
//! worker thread and writes the bytes on at once. Only what the writer cannot
//! take yet is copied to the session's own heap buffer, which is freed as
//! soon as it has been written. Reads of up to 64 KiB also give TLS full
//! 16 KiB records to send, instead of one record per 8 KiB read, and what a
//! TLS reader has ready (one record per read) is gathered into one write to
//! the backend, so a client uploading a message costs one `sendto` (and one
//! wake-up of the backend) per 64 KiB, not per 16 KiB record; while a
//! writer is congested (a slow client downloading a large message) reads
//! shrink to 16 KiB, so such a session holds little more than rustls' own
//! send buffer.
//!
//! [`ReadAhead`] goes under rustls on the client socket: rustls reads at most
//! 4 KiB per call, so a 16 KiB record took five `recvfrom`s; with read-ahead
//! one read takes up to 32 KiB (two records), and the surplus is kept only
//! until rustls has taken it. (64 KiB reads carried ~15% more SMTP DATA per
//! CPU in bench/compare.sh, but let a client that uploads faster than the
//! backend takes it park up to 60 KiB per session here instead of 28 KiB.)

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::protocol::line::{self, LineBuffer};

use super::Side;

/// The most one copy step reads.
const COPY_SIZE: usize = 64 * 1024;
/// What one copy step reads while the writer is congested: one TLS record.
const CONGESTED_COPY_SIZE: usize = 16 * 1024;
/// One read-ahead: about two full TLS records.
const READ_AHEAD_SIZE: usize = 32 * 1024;

thread_local! {
    static COPY_SCRATCH: RefCell<Option<Box<[u8]>>> = const { RefCell::new(None) };
    static READ_AHEAD_SCRATCH: RefCell<Option<Box<[u8]>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's scratch buffer from `slot` (a fresh one if it
/// is in use further up the stack).
fn with_scratch<R>(
    slot: &'static std::thread::LocalKey<RefCell<Option<Box<[u8]>>>>,
    size: usize,
    f: impl FnOnce(&mut [u8]) -> R,
) -> R {
    let mut scratch = slot
        .with(|cell| cell.borrow_mut().take())
        .unwrap_or_else(|| vec![0u8; size].into_boxed_slice());
    let result = f(&mut scratch);
    slot.with(|cell| *cell.borrow_mut() = Some(scratch));
    result
}

/// One step of pass-through, naming the socket and the direction: what a
/// failed relay reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelayStep {
    ReadingClient,
    WritingBackend,
    ReadingBackend,
    WritingClient,
}

impl RelayStep {
    /// The side whose socket failed.
    pub(crate) fn side(self) -> Side {
        match self {
            RelayStep::ReadingClient | RelayStep::WritingClient => Side::Client,
            RelayStep::ReadingBackend | RelayStep::WritingBackend => Side::Backend,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            RelayStep::ReadingClient => "reading from the client",
            RelayStep::WritingBackend => "writing to the backend",
            RelayStep::ReadingBackend => "reading from the backend",
            RelayStep::WritingClient => "writing to the client",
        }
    }
}

impl std::fmt::Display for RelayStep {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.describe())
    }
}

/// Pass-through failed at `step`.
#[derive(Debug, thiserror::Error)]
#[error("{step} failed: {error}")]
pub(crate) struct RelayError {
    pub(crate) step: RelayStep,
    #[source]
    pub(crate) error: io::Error,
    /// The side whose stream had already ended normally when the step
    /// failed (a client that leaves without close_notify after the
    /// backend's close): that side ended the session.
    pub(crate) after_close_of: Option<Side>,
}

/// How a pass-through that ran to its end went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Relayed {
    pub(crate) to_backend: u64,
    pub(crate) to_client: u64,
    /// The side whose end of stream came first: the one that ended the
    /// session.
    pub(crate) first_closed: Side,
}

/// What failed in one direction of the copy.
#[derive(Debug)]
enum CopyFailure {
    Read(io::Error),
    Write(io::Error),
}

/// Copies `client` to `backend` and `backend` to `client` until both have
/// reached end of file, shutting down each writer when its reader ends
/// (like tokio's `copy_bidirectional`).
///
/// A failure names its step. When writing to the backend fails (the backend
/// closed or reset), what the backend had already sent is still copied to
/// the client, and the client's side is shut down (TLS: close_notify) once
/// the backend's stream ends, before the failure is returned.
pub(crate) async fn copy_bidirectional<C, B>(
    client: &mut C,
    backend: &mut B,
) -> Result<Relayed, RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut to_backend = Direction::default();
    let mut to_client = Direction::default();
    let mut first_closed = None;
    let mut backend_write_failed = None;
    // The first end of stream, either way.
    let note_closes =
        |first_closed: &mut Option<Side>, to_backend: &Direction, to_client: &Direction| {
            if first_closed.is_none() {
                if to_backend.read_done {
                    *first_closed = Some(Side::Client);
                } else if to_client.read_done {
                    *first_closed = Some(Side::Backend);
                }
            }
        };
    poll_fn(|cx| {
        let forward = match backend_write_failed {
            Some(_) => Poll::Ready(0),
            None => match to_backend.poll_copy(cx, &mut *client, &mut *backend) {
                Poll::Ready(Ok(total)) => Poll::Ready(total),
                Poll::Ready(Err(CopyFailure::Read(error))) => {
                    return Poll::Ready(Err(RelayError {
                        step: RelayStep::ReadingClient,
                        error,
                        after_close_of: first_closed,
                    }))
                }
                Poll::Ready(Err(CopyFailure::Write(error))) => {
                    backend_write_failed = Some(error);
                    Poll::Ready(0)
                }
                Poll::Pending => Poll::Pending,
            },
        };
        note_closes(&mut first_closed, &to_backend, &to_client);
        let backward = match to_client.poll_copy(cx, &mut *backend, &mut *client) {
            Poll::Ready(Ok(total)) => Poll::Ready(total),
            Poll::Ready(Err(failure)) => {
                let (step, error) = match (backend_write_failed.take(), failure) {
                    (Some(first), _) => (RelayStep::WritingBackend, first),
                    (None, CopyFailure::Read(error)) => (RelayStep::ReadingBackend, error),
                    (None, CopyFailure::Write(error)) => (RelayStep::WritingClient, error),
                };
                return Poll::Ready(Err(RelayError {
                    step,
                    error,
                    after_close_of: first_closed,
                }));
            }
            Poll::Pending => Poll::Pending,
        };
        note_closes(&mut first_closed, &to_backend, &to_client);
        match (forward, backward) {
            (Poll::Ready(forward), Poll::Ready(backward)) => {
                if let Some(error) = backend_write_failed.take() {
                    return Poll::Ready(Err(RelayError {
                        step: RelayStep::WritingBackend,
                        error,
                        after_close_of: first_closed,
                    }));
                }
                Poll::Ready(Ok(Relayed {
                    to_backend: forward,
                    to_client: backward,
                    first_closed: first_closed.unwrap_or(Side::Client),
                }))
            }
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction of the copy.
#[derive(Default)]
struct Direction {
    /// Bytes read but not yet taken by the writer; empty (unallocated) while
    /// the writer keeps up, which is the usual case.
    pending: Vec<u8>,
    written: usize,
    /// The writer did not take everything at once lately: read less.
    congested: bool,
    need_flush: bool,
    read_done: bool,
    /// A read failed after bytes were gathered: reported once they are
    /// written.
    read_error: Option<io::Error>,
    finished: bool,
    total: u64,
}

impl Direction {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<Result<u64, CopyFailure>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(self.total));
        }
        loop {
            while self.written < self.pending.len() {
                let polled = Pin::new(&mut *writer).poll_write(cx, &self.pending[self.written..]);
                if polled.is_pending() {
                    self.congested = true;
                }
                let written = ready!(polled).map_err(CopyFailure::Write)?;
                if written == 0 {
                    return Poll::Ready(Err(CopyFailure::Write(io::ErrorKind::WriteZero.into())));
                }
                self.written += written;
                self.need_flush = true;
            }
            if !self.pending.is_empty() {
                // Give the memory back: idle sessions hold no buffer.
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.read_done {
                if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(CopyFailure::Write)?;
                    self.need_flush = false;
                }
                ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(CopyFailure::Write)?;
                self.finished = true;
                return Poll::Ready(Ok(self.total));
            }
            if let Some(error) = self.read_error.take() {
                return Poll::Ready(Err(CopyFailure::Read(error)));
            }
            let step = with_scratch(&COPY_SCRATCH, COPY_SIZE, |scratch| {
                let size = if self.congested {
                    CONGESTED_COPY_SIZE
                } else {
                    COPY_SIZE
                };
                // Gather what is ready now (a TLS reader yields one record
                // per read) so the writer gets one large write, not one per
                // record: fewer syscalls, and fewer wake-ups of the peer.
                let mut read = 0;
                while read < size {
                    let mut buffer = ReadBuf::new(&mut scratch[read..size]);
                    match Pin::new(&mut *reader).poll_read(cx, &mut buffer) {
                        Poll::Ready(Ok(())) if buffer.filled().is_empty() => {
                            self.read_done = true;
                            break;
                        }
                        Poll::Ready(Ok(())) => read += buffer.filled().len(),
                        // Bytes already read are written first; the error
                        // comes back with the next read.
                        Poll::Ready(Err(error)) if read > 0 => {
                            self.read_error = Some(error);
                            break;
                        }
                        Poll::Ready(Err(error)) => {
                            return Poll::Ready(Err(CopyFailure::Read(error)))
                        }
                        Poll::Pending if read > 0 => break,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                if read == 0 {
                    return Poll::Ready(Ok(()));
                }
                self.total += read as u64;
                let mut written = 0;
                while written < read {
                    match Pin::new(&mut *writer).poll_write(cx, &scratch[written..read]) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(CopyFailure::Write(
                                io::ErrorKind::WriteZero.into(),
                            )))
                        }
                        Poll::Ready(Ok(n)) => written += n,
                        Poll::Ready(Err(error)) => {
                            return Poll::Ready(Err(CopyFailure::Write(error)))
                        }
                        Poll::Pending => break,
                    }
                }
                if written > 0 {
                    self.need_flush = true;
                }
                if written < read {
                    self.pending = scratch[written..read].to_vec();
                    self.written = 0;
                    self.congested = true;
                } else {
                    self.congested = false;
                }
                Poll::Ready(Ok(()))
            });
            match step {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(failure)) => return Poll::Ready(Err(failure)),
                Poll::Pending => {
                    // Nothing to read now: push out what the writer holds
                    // (a TLS writer buffers records until flushed).
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))
                            .map_err(CopyFailure::Write)?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Reads once (at most one line-buffer chunk) into this thread's scratch
/// buffer and appends what came to `lines`, so a session waiting in
/// inspection holds no read buffer of its own (two 4 KiB reservations
/// before). Cancel-safe: bytes are appended in the poll that reads them.
/// Returns the bytes read; 0 is end of file.
pub(crate) async fn read_lines<R>(reader: &mut R, lines: &mut LineBuffer) -> io::Result<usize>
where
    R: AsyncRead + Unpin + ?Sized,
{
    poll_fn(|cx| {
        with_scratch(&COPY_SCRATCH, COPY_SIZE, |scratch| {
            let mut buffer = ReadBuf::new(&mut scratch[..line::READ_CHUNK]);
            ready!(Pin::new(&mut *reader).poll_read(cx, &mut buffer))?;
            let read = buffer.filled().len();
            lines.append(&scratch[..read]);
            Poll::Ready(Ok(read))
        })
    })
    .await
}

/// A socket read in large gulps: whatever the caller cannot take is kept
/// (on the heap, only until taken) and handed out by the next reads.
pub(crate) struct ReadAhead<S> {
    inner: S,
    surplus: HeldBytes,
}

impl<S> ReadAhead<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self::after(Vec::new(), inner)
    }

    /// Reads `received` first, then the socket. After STARTTLS the bytes the
    /// client sent behind the command are handed to the TLS handshake this
    /// way: a client that pipelines its ClientHello still works, and injected
    /// plaintext only fails the handshake.
    pub(crate) fn after(received: Vec<u8>, inner: S) -> Self {
        Self {
            inner,
            surplus: HeldBytes::new(received),
        }
    }
}

/// Bytes received but not yet read by the caller, handed out in order and
/// freed as soon as the last of them is taken (an idle session holds none).
#[derive(Default)]
struct HeldBytes {
    bytes: Vec<u8>,
    position: usize,
}

impl HeldBytes {
    fn new(bytes: Vec<u8>) -> Self {
        Self { bytes, position: 0 }
    }

    /// Moves as many held bytes as fit into `buf`; false if none are held.
    fn hand_out(&mut self, buf: &mut ReadBuf<'_>) -> bool {
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
    fn capacity(&self) -> usize {
        self.bytes.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.surplus.hand_out(buf) {
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= READ_AHEAD_SIZE {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        with_scratch(&READ_AHEAD_SCRATCH, READ_AHEAD_SIZE, |scratch| {
            let mut gulp = ReadBuf::new(scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut gulp))?;
            let read = gulp.filled().len();
            let take = read.min(buf.remaining());
            buf.put_slice(&scratch[..take]);
            if take < read {
                this.surplus = HeldBytes::new(scratch[take..read].to_vec());
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// One end of a pipe: sends `data` and closes its sending side while
    /// reading everything the other end sends; returns what it read.
    async fn send_and_receive(stream: tokio::io::DuplexStream, data: Vec<u8>) -> Vec<u8> {
        let (mut read, mut write) = tokio::io::split(stream);
        let writer = async {
            write.write_all(&data).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let mut received = Vec::new();
        let reader = read.read_to_end(&mut received);
        let (_, read) = tokio::join!(writer, reader);
        read.unwrap();
        received
    }

    #[tokio::test]
    async fn copies_both_ways_through_a_slow_writer_and_half_closes() {
        // Small pipes: writes are partial and pend, so the pending path runs.
        let (client, mut proxy_client) = tokio::io::duplex(1000);
        let (mut proxy_backend, backend) = tokio::io::duplex(777);
        let relay =
            tokio::spawn(
                async move { copy_bidirectional(&mut proxy_client, &mut proxy_backend).await },
            );
        let up = pattern(300_000);
        let down = pattern(200_000);
        let (up_sent, down_sent) = (up.clone(), down.clone());
        let client_side = tokio::spawn(send_and_receive(client, up_sent));
        let backend_side = tokio::spawn(send_and_receive(backend, down_sent));
        assert_eq!(backend_side.await.unwrap(), up);
        assert_eq!(client_side.await.unwrap(), down);
        let relayed = relay.await.unwrap().unwrap();
        assert_eq!((relayed.to_backend, relayed.to_client), (300_000, 200_000));
    }

    /// Fills every read, `left` times, then has nothing; records how much
    /// room each read offered.
    struct Source {
        offered: Vec<usize>,
        left: usize,
    }

    impl AsyncRead for Source {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.left == 0 {
                return Poll::Pending;
            }
            self.left -= 1;
            self.offered.push(buf.remaining());
            let room = buf.remaining();
            buf.put_slice(&vec![b'x'; room]);
            Poll::Ready(Ok(()))
        }
    }

    /// Takes `budget` bytes, then pushes back until given more.
    #[derive(Default)]
    struct Sink {
        budget: usize,
        taken: usize,
        /// Every write taken, as given.
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let take = buf.len().min(self.budget);
            if take == 0 {
                return Poll::Pending;
            }
            self.budget -= take;
            self.taken += take;
            self.writes.push(buf[..take].to_vec());
            Poll::Ready(Ok(take))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_congested_writer_makes_reads_small_and_a_free_one_large_again() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut source = Source {
            offered: Vec::new(),
            left: 1,
        };
        let mut sink = Sink {
            budget: 1000,
            ..Sink::default()
        };
        let mut direction = Direction::default();
        // A full read; the writer takes 1000 bytes and the rest waits.
        assert!(direction
            .poll_copy(&mut cx, &mut source, &mut sink)
            .is_pending());
        assert_eq!(source.offered, vec![COPY_SIZE]);
        assert_eq!(direction.pending.len(), COPY_SIZE - 1000);
        // Room for what waits and one record more: the read is one record.
        sink.budget = COPY_SIZE - 1000 + CONGESTED_COPY_SIZE;
        source.left = 1;
        assert!(direction
            .poll_copy(&mut cx, &mut source, &mut sink)
            .is_pending());
        assert_eq!(source.offered[1], CONGESTED_COPY_SIZE);
        assert!(direction.pending.is_empty() && direction.pending.capacity() == 0);
        // A writer that keeps up again: full-size reads.
        sink.budget = usize::MAX;
        source.left = 3;
        assert!(direction
            .poll_copy(&mut cx, &mut source, &mut sink)
            .is_pending());
        assert_eq!(&source.offered[2..], &[COPY_SIZE; 3]);
        assert_eq!(
            sink.taken,
            1000 + COPY_SIZE - 1000 + CONGESTED_COPY_SIZE + 3 * COPY_SIZE
        );
    }

    /// Yields its chunks one per read, then either waits or fails.
    struct Chunks {
        chunks: std::collections::VecDeque<Vec<u8>>,
        then_fail: bool,
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.chunks.pop_front() {
                Some(chunk) => {
                    buf.put_slice(&chunk);
                    Poll::Ready(Ok(()))
                }
                None if self.then_fail => Poll::Ready(Err(io::ErrorKind::InvalidData.into())),
                None => Poll::Pending,
            }
        }
    }

    #[test]
    fn records_ready_together_go_out_in_one_write() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut source = Chunks {
            chunks: [
                b"one record ".to_vec(),
                b"and the ".to_vec(),
                b"next".to_vec(),
            ]
            .into(),
            then_fail: false,
        };
        let mut sink = Sink {
            budget: usize::MAX,
            ..Sink::default()
        };
        let mut direction = Direction::default();
        assert!(direction
            .poll_copy(&mut cx, &mut source, &mut sink)
            .is_pending());
        assert_eq!(sink.writes, vec![b"one record and the next".to_vec()]);
        assert_eq!(direction.total, 23);
    }

    #[test]
    fn bytes_read_before_a_read_error_are_written_before_the_error_is_returned() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut source = Chunks {
            chunks: [b"last words".to_vec()].into(),
            then_fail: true,
        };
        let mut sink = Sink {
            budget: usize::MAX,
            ..Sink::default()
        };
        let mut direction = Direction::default();
        let polled = direction.poll_copy(&mut cx, &mut source, &mut sink);
        assert!(
            matches!(&polled, Poll::Ready(Err(CopyFailure::Read(error))) if error.kind() == io::ErrorKind::InvalidData),
            "{polled:?}"
        );
        assert_eq!(sink.writes, vec![b"last words".to_vec()]);
    }

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
    async fn read_ahead_after_received_bytes_yields_them_then_the_stream() {
        let inner: &[u8] = b" world";
        let mut stream = ReadAhead::after(b"hello".to_vec(), inner);
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"hello world");
    }

    #[tokio::test]
    async fn read_ahead_hands_out_every_byte_in_order_in_small_reads() {
        let data = pattern(150_000);
        let mut stream = ReadAhead::new(&data[..]);
        let mut out = Vec::new();
        let mut small = [0u8; 4096];
        loop {
            let read = stream.read(&mut small).await.unwrap();
            if read == 0 {
                break;
            }
            out.extend_from_slice(&small[..read]);
        }
        assert_eq!(out, data);
        assert_eq!(stream.surplus.capacity(), 0);
    }

    /// How a [`Peer`]'s reads end once its chunks are out.
    #[derive(Clone, Copy)]
    enum ReadsEnd {
        Eof,
        Reset,
        Wait,
        /// Pending until the flag is set, then end of stream.
        EofOnceSet(&'static AtomicBool),
        /// Pending until the flag is set, then a reset.
        ResetOnceSet(&'static AtomicBool),
    }

    /// One end of a relay: yields `chunks`, then ends as `then`; takes every
    /// write unless `writes_fail`; records what it was sent and whether it
    /// was shut down.
    struct Peer {
        chunks: std::collections::VecDeque<Vec<u8>>,
        then: ReadsEnd,
        writes_fail: bool,
        received: Vec<u8>,
        shut_down: bool,
    }

    impl Peer {
        fn new(chunks: &[&[u8]], then: ReadsEnd) -> Peer {
            Peer {
                chunks: chunks.iter().map(|chunk| chunk.to_vec()).collect(),
                then,
                writes_fail: false,
                received: Vec::new(),
                shut_down: false,
            }
        }
    }

    impl AsyncRead for Peer {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(chunk) = self.chunks.pop_front() {
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match self.then {
                ReadsEnd::Eof => Poll::Ready(Ok(())),
                ReadsEnd::Reset => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
                ReadsEnd::Wait => Poll::Pending,
                ReadsEnd::EofOnceSet(flag) if flag.load(Ordering::SeqCst) => Poll::Ready(Ok(())),
                ReadsEnd::EofOnceSet(_) => Poll::Pending,
                ReadsEnd::ResetOnceSet(flag) if flag.load(Ordering::SeqCst) => {
                    Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
                }
                ReadsEnd::ResetOnceSet(_) => Poll::Pending,
            }
        }
    }

    impl AsyncWrite for Peer {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.writes_fail {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            self.received.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut_down = true;
            Poll::Ready(Ok(()))
        }
    }

    fn relay_once(client: &mut Peer, backend: &mut Peer) -> Poll<Result<Relayed, RelayError>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut relay = std::pin::pin!(copy_bidirectional(client, backend));
        relay.as_mut().poll(&mut cx)
    }

    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_backend_reset_is_reported_as_reading_from_the_backend_after_its_last_bytes() {
        let mut client = Peer::new(&[b"a LOGOUT\r\n"], ReadsEnd::Wait);
        let mut backend = Peer::new(&[b"* BYE\r\na OK\r\n"], ReadsEnd::Reset);
        let Poll::Ready(Err(error)) = relay_once(&mut client, &mut backend) else {
            panic!("the relay should fail");
        };
        assert_eq!(error.step, RelayStep::ReadingBackend);
        assert_eq!(error.step.side(), Side::Backend);
        assert_eq!(error.after_close_of, None);
        assert_eq!(error.error.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(backend.received, b"a LOGOUT\r\n");
        assert_eq!(client.received, b"* BYE\r\na OK\r\n");
    }

    #[test]
    fn a_failed_write_to_the_backend_still_delivers_what_it_sent_and_ends_the_client() {
        let mut client = Peer::new(&[b"b NOOP\r\n"], ReadsEnd::Wait);
        let mut backend = Peer::new(&[b"* BYE\r\n"], ReadsEnd::Eof);
        backend.writes_fail = true;
        let Poll::Ready(Err(error)) = relay_once(&mut client, &mut backend) else {
            panic!("the relay should fail");
        };
        assert_eq!(error.step, RelayStep::WritingBackend);
        assert_eq!(
            error.to_string(),
            "writing to the backend failed: broken pipe"
        );
        assert_eq!(client.received, b"* BYE\r\n");
        assert!(client.shut_down);
    }

    #[test]
    fn a_client_that_fails_after_the_backends_close_fails_after_it() {
        static LATER: AtomicBool = AtomicBool::new(false);
        let mut client = Peer::new(&[], ReadsEnd::ResetOnceSet(&LATER));
        let mut backend = Peer::new(&[b"* BYE\r\n"], ReadsEnd::Eof);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let error = {
            let mut relay = std::pin::pin!(copy_bidirectional(&mut client, &mut backend));
            assert!(relay.as_mut().poll(&mut cx).is_pending());
            LATER.store(true, Ordering::SeqCst);
            let Poll::Ready(Err(error)) = relay.as_mut().poll(&mut cx) else {
                panic!("the relay should fail");
            };
            error
        };
        assert_eq!(error.step, RelayStep::ReadingClient);
        assert_eq!(error.after_close_of, Some(Side::Backend));
        assert!(client.shut_down);
    }

    #[test]
    fn a_client_reset_is_the_clients() {
        let mut client = Peer::new(&[], ReadsEnd::Reset);
        let mut backend = Peer::new(&[], ReadsEnd::Wait);
        let Poll::Ready(Err(error)) = relay_once(&mut client, &mut backend) else {
            panic!("the relay should fail");
        };
        assert_eq!(error.step, RelayStep::ReadingClient);
        assert_eq!(error.step.side(), Side::Client);
    }

    #[test]
    fn the_side_whose_stream_ends_first_ended_the_session() {
        static CLIENT_LATER: AtomicBool = AtomicBool::new(false);
        static BACKEND_LATER: AtomicBool = AtomicBool::new(false);
        for (client_then, backend_then, later, first) in [
            (
                ReadsEnd::EofOnceSet(&CLIENT_LATER),
                ReadsEnd::Eof,
                &CLIENT_LATER,
                Side::Backend,
            ),
            (
                ReadsEnd::Eof,
                ReadsEnd::EofOnceSet(&BACKEND_LATER),
                &BACKEND_LATER,
                Side::Client,
            ),
        ] {
            let mut client = Peer::new(&[b"x"], client_then);
            let mut backend = Peer::new(&[b"yz"], backend_then);
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let relayed = {
                let mut relay = std::pin::pin!(copy_bidirectional(&mut client, &mut backend));
                assert!(relay.as_mut().poll(&mut cx).is_pending());
                later.store(true, Ordering::SeqCst);
                let Poll::Ready(Ok(relayed)) = relay.as_mut().poll(&mut cx) else {
                    panic!("the relay should end");
                };
                relayed
            };
            assert_eq!(
                relayed,
                Relayed {
                    to_backend: 1,
                    to_client: 2,
                    first_closed: first
                }
            );
            assert!(client.shut_down && backend.shut_down);
        }
    }
}
