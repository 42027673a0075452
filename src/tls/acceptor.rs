//! One listener's TLS acceptor: the rustls server configuration plus the
//! listener's SNI policy and session-ticket count.
//!
//! The ClientHello is read first. With `sni_strict`, if its SNI names a host
//! no certificate covers, the proxy answers with a fatal `unrecognized_name`
//! alert (RFC 6066) and ends the handshake; without it (and for a
//! ClientHello without SNI) such a client gets the default certificate. A
//! client offering a session ticket is sent one new ticket, others two.
//! The stream comes back corked: the tickets go out with the session's
//! first write.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::server::Accepted;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::server::TlsStream;
use tokio_rustls::StartHandshake;

use super::client_hello::offers_pre_shared_key;
use super::cork::Corked;
use super::resolver::CertificateStore;
use crate::metrics::HandshakeFailure;

/// A plaintext TLS record: fatal alert, unrecognized_name (112).
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// How long a failed handshake's alert may take to write.
const ALERT_WRITE_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The handshake was refused: strict SNI, and no certificate names the host.
/// Carried inside the [`io::Error`] that [`Acceptor::accept`] returns.
#[derive(Debug, thiserror::Error)]
#[error("unrecognized_name: no certificate names {name:?} (sni_strict)")]
pub(crate) struct UnrecognizedName {
    pub(crate) name: String,
}

impl UnrecognizedName {
    /// Whether a handshake error is this refusal.
    pub(crate) fn is(error: &io::Error) -> bool {
        error
            .get_ref()
            .is_some_and(|inner| inner.is::<UnrecognizedName>())
    }
}

/// Why a handshake that [`Acceptor::accept`] returned as `error` failed
/// (the `reason` label of the handshake errors metric).
///
/// Only typed errors are looked at, never message text. rustls reports a
/// resolver that finds no certificate as `Error::General` with text alone;
/// that cannot happen here: [`CertificateStore`] always resolves (its set is
/// never empty: no SNI match gets the default), and strict SNI refuses
/// before rustls with the typed [`UnrecognizedName`]. Such an error would
/// count as `other`.
pub(crate) fn handshake_failure(error: &io::Error) -> HandshakeFailure {
    use rustls::PeerIncompatible;
    if error.kind() == io::ErrorKind::UnexpectedEof {
        return HandshakeFailure::Eof;
    }
    if UnrecognizedName::is(error) {
        return HandshakeFailure::UnrecognizedName;
    }
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        // TLS 1.0/1.1 clients send no signature_algorithms extension (it
        // came with TLS 1.2), which rustls checks before the version itself.
        Some(rustls::Error::PeerIncompatible(
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::SignatureAlgorithmsExtensionRequired,
        )) => HandshakeFailure::ProtocolVersion,
        Some(rustls::Error::PeerIncompatible(_)) => HandshakeFailure::Incompatible,
        Some(rustls::Error::NoApplicationProtocol) => HandshakeFailure::NoApplicationProtocol,
        Some(rustls::Error::InvalidMessage(_)) => HandshakeFailure::InvalidMessage,
        Some(_) => HandshakeFailure::Other,
        None => HandshakeFailure::Io,
    }
}

/// Accepts TLS for one listener.
#[derive(Clone)]
pub(crate) struct Acceptor {
    /// For a client that does not offer a session ticket.
    full: Arc<ServerConfig>,
    /// The same, sending one new ticket instead of two: for a client that
    /// offers one (see [`super::client_hello`]).
    resuming: Arc<ServerConfig>,
    store: Arc<CertificateStore>,
    sni_strict: bool,
}

impl Acceptor {
    /// `config` must resolve certificates from `store`.
    pub(crate) fn new(
        config: Arc<ServerConfig>,
        store: Arc<CertificateStore>,
        sni_strict: bool,
    ) -> Self {
        let mut resuming = (*config).clone();
        resuming.send_tls13_tickets = resuming.send_tls13_tickets.min(1);
        Self {
            full: config,
            resuming: Arc::new(resuming),
            store,
            sni_strict,
        }
    }

    /// Runs the server side of a TLS handshake over `io`.
    ///
    /// The stream comes back corked (see [`Corked`]): TLS 1.3 session
    /// tickets go out with the session's first write. A failed handshake
    /// still sends its alert.
    pub(crate) async fn accept<IO>(&self, io: IO) -> io::Result<TlsStream<Corked<IO>>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut io = Corked::new(io);
        let (accepted, resuming) = read_client_hello(&mut io).await?;
        if self.sni_strict {
            if let Some(name) = accepted.client_hello().server_name() {
                if !self.store.current().covers(name) {
                    let refusal = UnrecognizedName {
                        name: name.to_string(),
                    };
                    // Best effort: the client may already be gone.
                    let _ = io.write_all(&UNRECOGNIZED_NAME_ALERT).await;
                    let _ = io.flush().await;
                    return Err(io::Error::new(io::ErrorKind::InvalidData, refusal));
                }
            }
        }
        let config = if resuming { &self.resuming } else { &self.full };
        let accept = StartHandshake::from_parts(accepted, io).into_stream(config.clone());
        match accept.into_fallible().await {
            Ok(mut stream) => {
                stream.get_mut().0.handshake_done();
                Ok(stream)
            }
            Err((error, mut io)) => {
                // Best effort, like any alert: the client may be gone.
                let _ = tokio::time::timeout(ALERT_WRITE_LIMIT, io.release()).await;
                Err(error)
            }
        }
    }
}

/// Reads exactly as much of `io` as the ClientHello takes (rustls buffers
/// anything after it for the handshake that follows); also whether the
/// client offers a session ticket.
async fn read_client_hello<IO>(io: &mut IO) -> io::Result<(Accepted, bool)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut acceptor = rustls::server::Acceptor::default();
    let mut received = Vec::new();
    let outcome = poll_fn(|cx| loop {
        let mut reader = SyncReader {
            io: &mut *io,
            cx,
            received: &mut received,
        };
        match acceptor.read_tls(&mut reader) {
            Ok(0) => return Poll::Ready(Err(io::Error::from(io::ErrorKind::UnexpectedEof))),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(error) => return Poll::Ready(Err(error)),
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Poll::Ready(Ok(Ok(accepted))),
            Ok(None) => continue,
            Err(failed) => return Poll::Ready(Ok(Err(failed))),
        }
    })
    .await?;
    match outcome {
        Ok(accepted) => Ok((accepted, offers_pre_shared_key(&received))),
        Err((error, mut alert)) => {
            let mut bytes = Vec::new();
            let _ = alert.write_all(&mut bytes);
            let _ = io.write_all(&bytes).await;
            let _ = io.flush().await;
            Err(io::Error::new(io::ErrorKind::InvalidData, error))
        }
    }
}

/// Adapts a non-blocking async reader to [`io::Read`] inside a poll, keeping
/// a copy of what it read.
struct SyncReader<'a, 'b, IO> {
    io: &'a mut IO,
    cx: &'a mut Context<'b>,
    received: &'a mut Vec<u8>,
}

impl<IO: AsyncRead + Unpin> io::Read for SyncReader<'_, '_, IO> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                self.received.extend_from_slice(buf.filled());
                Ok(buf.filled().len())
            }
            Poll::Ready(Err(error)) => Err(error),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsVersion;
    use crate::protocol::Protocol;
    use crate::tls::certs::parse_certified_key;
    use crate::tls::generate::generate_pair;
    use crate::tls::resolver::CertificateSet;
    use rustls::pki_types::{CertificateDer, ServerName};

    fn store(names: &[&[&str]]) -> (Arc<CertificateStore>, Vec<CertificateDer<'static>>) {
        let mut entries = Vec::new();
        let mut ders = Vec::new();
        for (index, names) in names.iter().enumerate() {
            let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
            let pair = generate_pair(&names).expect("generate");
            let files = crate::config::CertificateFiles {
                cert: format!("{index}.crt").into(),
                key: format!("{index}.key").into(),
            };
            let loaded = parse_certified_key(
                &files,
                pair.cert_pem.as_bytes(),
                pair.key_pem.as_bytes(),
                &crate::tls::provider::provider(),
            )
            .expect("load");
            entries.push(Arc::new(loaded));
            ders.push(pair.cert_der);
        }
        let set = CertificateSet::new(entries).expect("not empty");
        (Arc::new(CertificateStore::new(set)), ders)
    }

    /// A client that accepts any certificate and reports what was served.
    #[derive(Debug)]
    struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// Handshakes `acceptor` with a client asking for `sni` (an IP address
    /// sends no SNI); the served leaf, or the client's error.
    async fn handshake(
        acceptor: &Acceptor,
        sni: &str,
    ) -> (Result<CertificateDer<'static>, String>, Option<String>) {
        let connector = connector(rustls::DEFAULT_VERSIONS);
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from(sni.to_string()).expect("name");
        let (client, server) = tokio::join!(
            connector.connect(name, client_io),
            acceptor.accept(server_io)
        );
        let served = client
            .map(|stream| stream.get_ref().1.peer_certificates().expect("certs")[0].clone())
            .map_err(|error| error.to_string());
        (served, server.err().map(|error| error.to_string()))
    }

    /// A client of `versions` that accepts any certificate.
    fn connector(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        let provider = crate::tls::provider::provider();
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    fn acceptor(store: &Arc<CertificateStore>, strict: bool) -> Acceptor {
        let ticketer =
            crate::tls::SessionTicketer::new(std::time::Duration::from_secs(60)).expect("ticketer");
        let config = crate::tls::server_config(
            store.clone(),
            TlsVersion::Tls12,
            Protocol::Imap,
            ticketer,
            crate::tls::session_id_cache(),
        )
        .expect("config");
        Acceptor::new(config, store.clone(), strict)
    }

    #[tokio::test]
    async fn strict_sni_refuses_unknown_names_with_unrecognized_name() {
        let (store, ders) = store(&[&["default.example"], &["*.example.com"]]);
        let strict = acceptor(&store, true);
        let (served, server) = handshake(&strict, "mail.example.com").await;
        assert_eq!(served.expect("served"), ders[1]);
        assert_eq!(server, None);
        let (served, _) = handshake(&strict, "default.example").await;
        assert_eq!(served.expect("served"), ders[0]);
        // No SNI (an IP address): the default, even when strict.
        let (served, _) = handshake(&strict, "127.0.0.1").await;
        assert_eq!(served.expect("served"), ders[0]);

        let (served, server) = handshake(&strict, "a.b.example.com").await;
        let client_error = served.expect_err("refused");
        assert!(
            client_error.contains("UnrecognisedName"),
            "client saw: {client_error}"
        );
        let server_error = server.expect("server error");
        assert!(server_error.contains("unrecognized_name"), "{server_error}");
    }

    #[tokio::test]
    async fn without_strict_an_unknown_name_gets_the_default() {
        let (store, ders) = store(&[&["default.example"], &["*.example.com"]]);
        let lenient = acceptor(&store, false);
        let (served, server) = handshake(&lenient, "unknown.test").await;
        assert_eq!(served.expect("served"), ders[0]);
        assert_eq!(server, None);
        let (served, _) = handshake(&lenient, "IMAP.example.COM").await;
        assert_eq!(served.expect("served"), ders[1]);
    }

    #[tokio::test]
    async fn a_garbage_client_hello_is_an_error_not_a_hang() {
        let (store, _) = store(&[&["default.example"]]);
        let strict = acceptor(&store, true);
        let (mut client, server_io) = tokio::io::duplex(1024);
        let accept = tokio::spawn(async move { strict.accept(server_io).await.err() });
        tokio::io::AsyncWriteExt::write_all(&mut client, b"EHLO not tls\r\n\r\n\r\n")
            .await
            .expect("write");
        let error = accept.await.expect("join").expect("an error");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    }

    /// A socket that records the size of each write, takes at most `limit`
    /// bytes per write, and (when `tamper`) flips the last byte of every
    /// write after the first.
    struct Recorded<S> {
        inner: S,
        writes: Arc<std::sync::Mutex<Vec<usize>>>,
        limit: usize,
        tamper: bool,
    }

    impl<S> Recorded<S> {
        fn new(inner: S) -> (Self, Arc<std::sync::Mutex<Vec<usize>>>) {
            let writes = Arc::default();
            let recorded = Self {
                inner,
                writes: Arc::clone(&writes),
                limit: usize::MAX,
                tamper: false,
            };
            (recorded, writes)
        }

        fn write_count(writes: &std::sync::Mutex<Vec<usize>>) -> usize {
            writes.lock().expect("writes").len()
        }
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Recorded<S> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        /// One write of everything offered, like `writev` on a socket.
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut bytes: Vec<u8> = bufs.iter().flat_map(|buf| buf.iter().copied()).collect();
            bytes.truncate(self.limit);
            if self.tamper && Self::write_count(&self.writes) > 0 {
                if let Some(last) = bytes.last_mut() {
                    *last ^= 1;
                }
            }
            let written = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes))?;
            self.writes.lock().expect("writes").push(written);
            Poll::Ready(Ok(written))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    const GREETING: &[u8] = b"* OK [CAPABILITY IMAP4rev1] ready\r\n";

    /// The server sends the greeting; what the client reads of it.
    async fn greet<S, C>(server: &mut S, client: &mut C) -> Vec<u8>
    where
        S: AsyncWrite + Unpin,
        C: AsyncRead + Unpin,
    {
        server.write_all(GREETING).await.expect("greeting");
        server.flush().await.expect("flush");
        let mut greeting = vec![0; GREETING.len()];
        tokio::io::AsyncReadExt::read_exact(client, &mut greeting)
            .await
            .expect("read");
        greeting
    }

    /// Handshakes over a socket that takes at most `limit` bytes per write,
    /// then the server sends the greeting. The server's writes, the greeting
    /// as the client read it and the tickets the client holds by then.
    async fn greeted(
        versions: &[&'static rustls::SupportedProtocolVersion],
        limit: usize,
    ) -> (Vec<usize>, usize, Vec<u8>, u32) {
        let (store, _) = store(&[&["mail.example"]]);
        let acceptor = acceptor(&store, false);
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (mut server_io, writes) = Recorded::new(server_io);
        server_io.limit = limit;
        let name = ServerName::try_from("mail.example").expect("name");
        let (client, server) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::join!(
                connector(versions).connect(name, client_io),
                acceptor.accept(server_io)
            )
        })
        .await
        .expect("no hang");
        let (mut client, mut server) = (client.expect("client"), server.expect("server"));
        let held = server.get_ref().0.holds();
        let greeting = greet(&mut server, &mut client).await;
        let tickets = client.get_ref().1.tls13_tickets_received();
        let writes = writes.lock().expect("writes").clone();
        (writes, held, greeting, tickets)
    }

    #[tokio::test]
    async fn tls13_session_tickets_go_out_with_the_first_write() {
        let (writes, held, greeting, tickets) =
            greeted(&[&rustls::version::TLS13], usize::MAX).await;
        assert!(held > 0, "the tickets are held after the handshake");
        assert_eq!(
            writes.len(),
            2,
            "the server's flight, then tickets and greeting in one write: {writes:?}"
        );
        assert!(writes[1] > held + GREETING.len(), "{writes:?}, {held} held");
        assert_eq!(greeting, GREETING);
        assert_eq!(tickets, 2);
    }

    #[tokio::test]
    async fn tls12_holds_nothing() {
        let (writes, held, greeting, tickets) =
            greeted(&[&rustls::version::TLS12], usize::MAX).await;
        assert_eq!(held, 0);
        assert_eq!(
            writes.len(),
            3,
            "two handshake flights, then the greeting: {writes:?}"
        );
        assert_eq!(greeting, GREETING);
        assert_eq!(tickets, 0);
    }

    #[tokio::test]
    async fn a_socket_taking_a_few_bytes_at_a_time_still_completes() {
        for versions in [&[&rustls::version::TLS13], &[&rustls::version::TLS12]] {
            let (writes, _, greeting, _) = greeted(versions, 100).await;
            assert!(writes.len() > 5, "{writes:?}");
            assert_eq!(greeting, GREETING);
        }
    }

    #[tokio::test]
    async fn a_resumed_session_gets_one_new_ticket_a_full_handshake_two() {
        let (store, _) = store(&[&["mail.example"]]);
        let acceptor = acceptor(&store, false);
        // One client configuration: its session store keeps the tickets.
        let connector = connector(&[&rustls::version::TLS13]);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (client_io, server_io) = tokio::io::duplex(64 * 1024);
            let name = ServerName::try_from("mail.example").expect("name");
            let (client, server) = tokio::join!(
                connector.connect(name, client_io),
                acceptor.accept(server_io)
            );
            let (mut client, mut server) = (client.expect("client"), server.expect("server"));
            assert_eq!(greet(&mut server, &mut client).await, GREETING);
            let resumed =
                server.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            seen.push((resumed, client.get_ref().1.tls13_tickets_received()));
        }
        assert_eq!(seen, [(false, 2), (true, 1), (true, 1)]);
    }

    #[tokio::test]
    async fn a_bad_client_finished_still_gets_the_alert() {
        let (store, _) = store(&[&["mail.example"]]);
        let acceptor = acceptor(&store, false);
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (mut client_io, _) = Recorded::new(client_io);
        client_io.tamper = true;
        let name = ServerName::try_from("mail.example").expect("name");
        let (client, server) = tokio::join!(
            connector(&[&rustls::version::TLS13]).connect(name, client_io),
            acceptor.accept(server_io)
        );
        let server_error = server.err().expect("the server refuses the Finished");
        assert_eq!(
            server_error.kind(),
            io::ErrorKind::InvalidData,
            "{server_error}"
        );
        let mut client = client.expect("the client's side of the handshake is done");
        let mut byte = [0; 1];
        let client_error = tokio::io::AsyncReadExt::read(&mut client, &mut byte)
            .await
            .expect_err("an alert");
        assert!(
            client_error.to_string().contains("BadRecordMac"),
            "client saw: {client_error}"
        );
    }

    #[test]
    fn handshake_failures_are_told_apart_by_type() {
        use rustls::{InvalidMessage, PeerIncompatible};
        let tls = |error: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, error);
        let cases = [
            (
                io::Error::from(io::ErrorKind::UnexpectedEof),
                HandshakeFailure::Eof,
            ),
            (
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    UnrecognizedName {
                        name: "other.example".into(),
                    },
                ),
                HandshakeFailure::UnrecognizedName,
            ),
            (
                tls(rustls::Error::PeerIncompatible(
                    PeerIncompatible::SignatureAlgorithmsExtensionRequired,
                )),
                HandshakeFailure::ProtocolVersion,
            ),
            (
                tls(rustls::Error::PeerIncompatible(
                    PeerIncompatible::NoCipherSuitesInCommon,
                )),
                HandshakeFailure::Incompatible,
            ),
            (
                tls(rustls::Error::NoApplicationProtocol),
                HandshakeFailure::NoApplicationProtocol,
            ),
            (
                tls(rustls::Error::InvalidMessage(
                    InvalidMessage::InvalidContentType,
                )),
                HandshakeFailure::InvalidMessage,
            ),
            (
                tls(rustls::Error::General("anything".into())),
                HandshakeFailure::Other,
            ),
            (
                io::Error::from(io::ErrorKind::ConnectionReset),
                HandshakeFailure::Io,
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(handshake_failure(&error), expected, "{error}");
        }
    }
}
