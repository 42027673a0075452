//! A user-space cork for the end of a TLS 1.3 handshake: what the server
//! writes after its last handshake flight (the NewSessionTicket messages) is
//! held and goes out with the session's first write of its own (the
//! greeting, or the reply to the first command after STARTTLS), in one
//! system call and one TCP segment instead of two.
//!
//! The client never waits for tickets: after its Finished it waits for the
//! greeting (implicit TLS) or sends its next command (STARTTLS), and the
//! tickets only matter to its next connection. So holding them costs the
//! client nothing, and saves the proxy a write, a segment and a wake-up of
//! the client on every session (a measurable share of a short session on
//! loopback, where the sender pays for delivery).
//!
//! How the end of the handshake is recognised without reaching into rustls:
//! a TLS 1.3 server's flight after the ServerHello is its only encrypted
//! handshake data (application_data records, content type 23). Once such a
//! flight has been written completely and the client has then sent
//! something (its Finished), everything the server writes before the
//! handshake is declared over is post-handshake: tickets, or an alert if
//! the client's Finished was wrong. The acceptor declares the end
//! ([`Corked::handshake_done`]) or, on a failed handshake, writes out what
//! is held ([`Corked::release`]) so an alert still reaches the client.
//! TLS 1.2 writes no application_data record before its handshake ends, so
//! nothing is ever held there; after the handshake the cork is a plain
//! pass-through.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// TLS record content type of application data (TLS 1.3: every encrypted
/// record, handshake messages included).
const APPLICATION_DATA: u8 = 23;

/// More than a few tickets' worth held means something other than tickets
/// is being written: send it on rather than keep it.
const HOLD_LIMIT: usize = 16 * 1024;

/// A client connection's socket during and after the TLS handshake.
pub(crate) struct Corked<S> {
    inner: S,
    phase: Phase,
    held: Vec<u8>,
    /// Bytes of `held` already written (Releasing).
    held_written: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// During the handshake, before the encrypted flight has gone out.
    Watching(RecordScanner),
    /// The encrypted flight is out; the next bytes from the client end the
    /// handshake.
    FlightSent,
    /// Post-handshake writes are kept in `held`; flushes are deferred.
    Holding,
    /// The handshake is over: `held` goes out ahead of the next write, or
    /// at the next flush or shutdown.
    Releasing,
    /// A plain pass-through.
    Off,
}

impl<S> Corked<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            phase: Phase::Watching(RecordScanner::default()),
            held: Vec::new(),
            held_written: 0,
        }
    }

    /// The handshake succeeded: anything held goes out with the next write.
    pub(crate) fn handshake_done(&mut self) {
        self.phase = if self.held.is_empty() {
            Phase::Off
        } else {
            Phase::Releasing
        };
    }

    /// How many bytes are held (for tests).
    #[cfg(test)]
    pub(crate) fn holds(&self) -> usize {
        self.held.len() - self.held_written
    }
}

impl<S: AsyncWrite + Unpin> Corked<S> {
    /// Writes out whatever is held (a failed handshake's alert) and stops
    /// holding. Best effort: the caller bounds it in time.
    pub(crate) async fn release(&mut self) -> io::Result<()> {
        self.handshake_done();
        std::future::poll_fn(|cx| self.poll_write_held(cx)).await?;
        self.inner.flush().await
    }

    /// Writes the held bytes; Ready(Ok) once none are left (phase Off).
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.phase == Phase::Releasing {
            let rest = &self.held[self.held_written..];
            if rest.is_empty() {
                self.stop_holding();
                break;
            }
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, rest))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held_written += written;
        }
        Poll::Ready(Ok(()))
    }

    fn stop_holding(&mut self) {
        self.phase = Phase::Off;
        self.held = Vec::new();
        self.held_written = 0;
    }

    /// Writes `bufs` with the held bytes in front, in one call where the
    /// socket takes it; returns how many bytes of `bufs` were written.
    fn poll_write_behind_held(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            let rest_len = self.held.len() - self.held_written;
            if rest_len == 0 {
                self.stop_holding();
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            }
            let mut slices = Vec::with_capacity(bufs.len() + 1);
            slices.push(IoSlice::new(&self.held[self.held_written..]));
            slices.extend(bufs.iter().map(|buf| IoSlice::new(buf)));
            let written = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices))?;
            if written == 0 {
                return Poll::Ready(Ok(0));
            }
            if written < rest_len {
                self.held_written += written;
                continue;
            }
            self.stop_holding();
            let from_bufs = written - rest_len;
            if from_bufs > 0 || bufs.iter().all(|buf| buf.is_empty()) {
                return Poll::Ready(Ok(from_bufs));
            }
        }
    }

    fn poll_write_any(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.phase {
            Phase::Off => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
            Phase::Releasing => self.poll_write_behind_held(cx, bufs),
            Phase::Holding => {
                let total: usize = bufs.iter().map(|buf| buf.len()).sum();
                if self.held.len() + total > HOLD_LIMIT {
                    self.phase = Phase::Releasing;
                    return self.poll_write_behind_held(cx, bufs);
                }
                for buf in bufs {
                    self.held.extend_from_slice(buf);
                }
                Poll::Ready(Ok(total))
            }
            Phase::FlightSent => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
            Phase::Watching(mut scanner) => {
                let offered: usize = bufs.iter().map(|buf| buf.len()).sum();
                let written = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
                let mut left = written;
                for buf in bufs {
                    let take = left.min(buf.len());
                    scanner.feed(&buf[..take]);
                    left -= take;
                    if left == 0 {
                        break;
                    }
                }
                // Only a flight written whole, up to a record boundary, is
                // known to be complete: a partial write leaves the rest for
                // a later write, which must not be held.
                self.phase = if scanner.saw_encrypted && scanner.at_boundary() && written == offered
                {
                    Phase::FlightSent
                } else {
                    Phase::Watching(scanner)
                };
                Poll::Ready(Ok(written))
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Corked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if self.phase == Phase::FlightSent && buf.filled().len() > before {
            self.phase = Phase::Holding;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Corked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_any(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_any(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.phase {
            // The point of holding: the handshake's closing flush waits for
            // the session's first write.
            Phase::Holding => Poll::Ready(Ok(())),
            Phase::Releasing => {
                ready!(self.poll_write_held(cx))?;
                Pin::new(&mut self.inner).poll_flush(cx)
            }
            _ => Pin::new(&mut self.inner).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.phase == Phase::Holding {
            self.phase = Phase::Releasing;
        }
        ready!(self.poll_write_held(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Follows the TLS record framing of the bytes written, across writes of
/// any size: content type of each record, and whether the last one is
/// complete.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct RecordScanner {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
    saw_encrypted: bool,
}

impl RecordScanner {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skip = self.body_left.min(bytes.len());
                self.body_left -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            let take = (self.header.len() - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len == self.header.len() {
                if self.header[0] == APPLICATION_DATA {
                    self.saw_encrypted = true;
                }
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header_len = 0;
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn record(content_type: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![content_type, 3, 3];
        bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn the_scanner_follows_records_across_any_split() {
        let mut stream = record(22, b"server hello");
        stream.extend(record(20, &[1]));
        let plain_end = stream.len();
        stream.extend(record(23, &[0xaa; 300]));
        for split in 1..stream.len() {
            let mut scanner = RecordScanner::default();
            for chunk in stream.chunks(split) {
                scanner.feed(chunk);
            }
            assert!(scanner.saw_encrypted, "split {split}");
            assert!(scanner.at_boundary(), "split {split}");
        }
        let mut scanner = RecordScanner::default();
        scanner.feed(&stream[..plain_end]);
        assert!(!scanner.saw_encrypted);
        assert!(scanner.at_boundary());
        scanner.feed(&stream[plain_end..plain_end + 3]);
        assert!(!scanner.at_boundary(), "inside a header");
        scanner.feed(&stream[plain_end + 3..plain_end + 10]);
        assert!(scanner.saw_encrypted);
        assert!(!scanner.at_boundary(), "inside a body");
    }

    /// A socket that takes at most `limit` bytes per write.
    struct Narrow {
        written: Vec<u8>,
        writes: usize,
        limit: usize,
    }

    impl AsyncWrite for Narrow {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let take = buf.len().min(self.limit);
            self.written.extend_from_slice(&buf[..take]);
            self.writes += 1;
            Poll::Ready(Ok(take))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn narrow(limit: usize) -> Corked<Narrow> {
        Corked::new(Narrow {
            written: Vec::new(),
            writes: 0,
            limit,
        })
    }

    #[tokio::test]
    async fn held_bytes_go_out_ahead_of_the_next_write_even_in_small_pieces() {
        let mut corked = narrow(3);
        corked.phase = Phase::Holding;
        corked.write_all(b"tickets").await.expect("held");
        corked
            .flush()
            .await
            .expect("a flush while holding is deferred");
        assert_eq!(corked.inner.writes, 0);
        assert_eq!(corked.holds(), 7);
        corked.handshake_done();
        corked.write_all(b"* OK hi\r\n").await.expect("write");
        assert_eq!(corked.inner.written, b"tickets* OK hi\r\n");
        assert_eq!(corked.phase, Phase::Off);
        assert_eq!(corked.holds(), 0);
    }

    #[tokio::test]
    async fn a_flush_or_a_shutdown_sends_what_is_held() {
        let mut corked = narrow(1024);
        corked.phase = Phase::Holding;
        corked.write_all(b"alert").await.expect("held");
        corked.handshake_done();
        corked.flush().await.expect("flush");
        assert_eq!(corked.inner.written, b"alert");

        let mut corked = narrow(1024);
        corked.phase = Phase::Holding;
        corked.write_all(b"alert").await.expect("held");
        corked.shutdown().await.expect("shutdown");
        assert_eq!(corked.inner.written, b"alert");
    }

    #[tokio::test]
    async fn more_than_tickets_is_not_held() {
        let mut corked = narrow(usize::MAX);
        corked.phase = Phase::Holding;
        corked.write_all(&[7; 1000]).await.expect("held");
        assert_eq!(corked.inner.writes, 0);
        corked.write_all(&[8; HOLD_LIMIT]).await.expect("sent");
        assert_eq!(corked.inner.written.len(), 1000 + HOLD_LIMIT);
        assert_eq!(corked.phase, Phase::Off);
    }

    #[tokio::test]
    async fn a_partly_written_flight_is_never_held() {
        // The flight's first write stops inside a record: the rest is
        // written later and must not be held, even once the client spoke.
        let flight = [record(22, b"hello"), record(23, &[1; 100])].concat();
        let (mut client, server) = tokio::io::duplex(4096);
        let mut corked = Corked::new(server);
        corked.write_all(&flight[..50]).await.expect("first part");
        client.write_all(b"ccs").await.expect("client");
        let mut read = [0; 3];
        corked.read_exact(&mut read).await.expect("read");
        assert!(matches!(corked.phase, Phase::Watching(_)));
        corked.write_all(&flight[50..]).await.expect("rest");
        assert_eq!(corked.phase, Phase::FlightSent);
        let mut received = vec![0; flight.len()];
        client
            .read_exact(&mut received)
            .await
            .expect("whole flight");
        assert_eq!(received, flight);
        client.write_all(b"fin").await.expect("client");
        corked.read_exact(&mut read).await.expect("read");
        assert_eq!(corked.phase, Phase::Holding);
    }
}
