//! A real TLS client whose ClientHello the test places on the wire itself:
//! pipelined behind a STARTTLS command, or after injected plaintext.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{text, TestProxy, STEP};

/// How long a reply may take before an exact-bytes assertion gives up.
pub const REPLY_WAIT: Duration = Duration::from_secs(2);

/// Reads exactly `expected.len()` bytes (TLS records may follow at once, so
/// not one byte more) and asserts they are `expected`.
pub async fn expect_exactly<S: AsyncRead + Unpin>(stream: &mut S, expected: &[u8]) {
    let mut got = vec![0u8; expected.len()];
    let mut filled = 0;
    let _ = tokio::time::timeout(REPLY_WAIT, async {
        while filled < got.len() {
            match stream.read(&mut got[filled..]).await {
                Ok(0) | Err(_) => break,
                Ok(read) => filled += read,
            }
        }
    })
    .await;
    got.truncate(filled);
    assert_eq!(text(&got), text(expected));
}

/// A real TLS client run against the proxy over `tcp`, with its traffic
/// relayed and recorded.
pub struct Relayed {
    pub handshake: std::io::Result<TlsStream<DuplexStream>>,
    /// Every byte the proxy sent after the plaintext reply.
    from_proxy: Arc<Mutex<Vec<u8>>>,
    /// Ends when the proxy closes the connection.
    proxy_closed: tokio::task::JoinHandle<()>,
}

impl Relayed {
    /// Waits for the proxy to close, then returns everything it sent after
    /// the plaintext reply.
    pub async fn until_closed(self) -> Vec<u8> {
        drop(self.handshake);
        tokio::time::timeout(STEP, self.proxy_closed)
            .await
            .expect("the proxy closes the connection")
            .expect("relay task");
        let bytes = self.from_proxy.lock().expect("lock").clone();
        bytes
    }
}

impl TestProxy {
    /// Runs a TLS client against this proxy over `tcp`. Its ClientHello goes
    /// out in one write right behind `before`; the proxy's plaintext answer
    /// must be exactly `reply`; then the rest of the handshake is relayed.
    pub async fn handshake_behind(
        &self,
        mut tcp: TcpStream,
        before: &[u8],
        reply: &[u8],
    ) -> Relayed {
        let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
        let connector = self.connector().clone();
        let handshake = tokio::spawn(async move {
            connector
                .connect(ServerName::try_from("localhost").expect("name"), theirs)
                .await
        });
        let mut hello = vec![0u8; 64 * 1024];
        let read = tokio::time::timeout(STEP, ours.read(&mut hello))
            .await
            .expect("ClientHello in time")
            .expect("ClientHello");
        hello.truncate(read);

        if before.is_empty() {
            // The reply (if any) came before; the ClientHello is a write of its
            // own. The proxy may already have given up: ignore write errors.
            expect_exactly(&mut tcp, reply).await;
            let _ = tcp.write_all(&hello).await;
        } else {
            let first_write = [before, &hello].concat();
            tcp.write_all(&first_write).await.expect("write");
            expect_exactly(&mut tcp, reply).await;
        }

        let from_proxy: Arc<Mutex<Vec<u8>>> = Arc::default();
        let log = from_proxy.clone();
        let (mut tcp_read, mut tcp_write) = tcp.into_split();
        let (mut ours_read, mut ours_write) = tokio::io::split(ours);
        let proxy_closed = tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            loop {
                match tcp_read.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => {
                        log.lock().expect("lock").extend_from_slice(&chunk[..read]);
                        if ours_write.write_all(&chunk[..read]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = ours_write.shutdown().await;
        });
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut ours_read, &mut tcp_write).await;
            let _ = tcp_write.shutdown().await;
        });
        let handshake = tokio::time::timeout(STEP, handshake)
            .await
            .expect("handshake ends in time")
            .expect("handshake task");
        Relayed {
            handshake,
            from_proxy,
            proxy_closed,
        }
    }
}
