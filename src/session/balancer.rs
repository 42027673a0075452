//! The PROXY protocol header a trusted load balancer sends before anything
//! else: read from the accepted socket, exactly, before TLS or the backend.
//!
//! The header is read without taking a byte of what the client sent behind
//! it (a TLS ClientHello, an early command): the socket is peeked, the
//! parser ([`crate::protocol::proxy_header::parse`]) says how long the header
//! is, and only that much is consumed. Bytes the parser calls incomplete all
//! belong to the header, so they are consumed as they come and a peek never
//! returns the same bytes twice.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::protocol::proxy_header::parse::{self, HeaderError, Parsed, Received};

/// Why a trusted source's connection carried no usable header.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BalancerHeaderError {
    #[error("{0}")]
    Invalid(HeaderError),
    /// Closed before sending a byte: a balancer's plain TCP health check.
    #[error("connection closed before sending anything")]
    ClosedSilent,
    #[error("connection closed before a complete PROXY header")]
    Closed,
    #[error("reading the PROXY header failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one PROXY protocol header from `stream`, leaving every byte after
/// it unread. The caller bounds the time it may take.
pub(crate) async fn read_header(stream: &mut TcpStream) -> Result<Received, BalancerHeaderError> {
    // Only trusted sources get here; the buffer lives for the read alone.
    // `buffer[..held]` is what has been consumed, all of it header; a peek
    // shows what follows it.
    let mut buffer = vec![0u8; parse::MAX_HEADER];
    let mut held = 0;
    loop {
        if held == buffer.len() {
            // The parser refuses anything longer before this; kept as a
            // bound of its own.
            return Err(BalancerHeaderError::Invalid(HeaderError::V2TooLong(held)));
        }
        let peeked = stream.peek(&mut buffer[held..]).await?;
        if peeked == 0 {
            return Err(if held == 0 {
                BalancerHeaderError::ClosedSilent
            } else {
                BalancerHeaderError::Closed
            });
        }
        match parse::parse(&buffer[..held + peeked]) {
            Ok(Parsed::Complete {
                header: received,
                length,
            }) => {
                stream.read_exact(&mut buffer[held..length]).await?;
                return Ok(received);
            }
            Ok(Parsed::Incomplete) => {
                // The same bytes again, now consumed.
                stream.read_exact(&mut buffer[held..held + peeked]).await?;
                held += peeked;
            }
            Err(error) => return Err(BalancerHeaderError::Invalid(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn the_header_is_consumed_and_what_follows_is_left() {
        let (mut balancer, mut accepted) = pair().await;
        balancer
            .write_all(b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 25\r\nEHLO x\r\n")
            .await
            .expect("write");
        let received = read_header(&mut accepted).await.expect("header");
        assert_eq!(
            received,
            Received::Proxied {
                source: "203.0.113.9:40000".parse().expect("address"),
                destination: "192.0.2.1:25".parse().expect("address"),
            }
        );
        let mut rest = [0u8; 8];
        accepted.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"EHLO x\r\n");
    }

    #[tokio::test]
    async fn a_header_trickling_in_byte_by_byte_is_read_whole() {
        let (mut balancer, mut accepted) = pair().await;
        let mut bytes = crate::protocol::proxy_header::v2(
            "[2001:db8::7]:1234".parse().expect("address"),
            "[2001:db8::1]:993".parse().expect("address"),
            None,
        );
        bytes.extend_from_slice(b"\x16\x03\x01");
        let writer = tokio::spawn(async move {
            for byte in bytes {
                balancer.write_all(&[byte]).await.expect("write");
                balancer.flush().await.expect("flush");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            balancer
        });
        let received = read_header(&mut accepted).await.expect("header");
        assert_eq!(
            received,
            Received::Proxied {
                source: "[2001:db8::7]:1234".parse().expect("address"),
                destination: "[2001:db8::1]:993".parse().expect("address"),
            }
        );
        let _balancer = writer.await.expect("writer");
        let mut rest = [0u8; 3];
        accepted.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"\x16\x03\x01");
    }

    #[tokio::test]
    async fn garbage_and_early_close_are_errors() {
        let (mut balancer, mut accepted) = pair().await;
        balancer.write_all(b"EHLO x\r\n").await.expect("write");
        assert!(matches!(
            read_header(&mut accepted).await,
            Err(BalancerHeaderError::Invalid(HeaderError::NotAHeader))
        ));

        let (mut balancer, mut accepted) = pair().await;
        balancer.write_all(b"PROXY TCP4 1.2").await.expect("write");
        drop(balancer);
        assert!(matches!(
            read_header(&mut accepted).await,
            Err(BalancerHeaderError::Closed)
        ));

        let (balancer, mut accepted) = pair().await;
        drop(balancer);
        assert!(matches!(
            read_header(&mut accepted).await,
            Err(BalancerHeaderError::ClosedSilent)
        ));
    }
}
