//! The TLS-ALPN-01 responder (RFC 8737) on `tls_alpn_listen`: it reads each
//! ClientHello first and completes the handshake only when the client
//! offers ALPN `acme-tls/1` and names (SNI) a host with a published
//! challenge, serving that challenge's certificate; then it closes. Every
//! other handshake is refused with a fatal alert: nothing is served on
//! the port. At most [`super::RESPONDER_CONNECTIONS`] connections are open
//! at once, each for at most 10 s.

use std::sync::Arc;
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::challenges::PendingChallenges;
use crate::tls::provider;

/// The ALPN protocol id of RFC 8737.
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// How long a client has for its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves TLS-ALPN-01 challenges on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, challenges: Arc<PendingChallenges>) {
    serve_at_most(listener, challenges, super::RESPONDER_CONNECTIONS).await
}

/// [`serve`] with at most `limit` connections open at once: one more is
/// closed at once, unread.
async fn serve_at_most(listener: TcpListener, challenges: Arc<PendingChallenges>, limit: usize) {
    if let Ok(address) = listener.local_addr() {
        info!(%address, "acme: answering TLS-ALPN-01 challenges");
    }
    let open = Arc::new(Semaphore::new(limit));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "acme: TLS-ALPN-01 responder: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            debug!(%peer, limit, "acme: TLS-ALPN-01 responder: too many connections; closed");
            continue;
        };
        let challenges = challenges.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, answer(stream, &challenges)).await {
                Ok(Ok(name)) => debug!(%peer, %name, "acme: TLS-ALPN-01 challenge answered"),
                Ok(Err(reason)) => debug!(%peer, %reason, "acme: TLS-ALPN-01 handshake refused"),
                Err(_) => debug!(%peer, "acme: TLS-ALPN-01 handshake timed out"),
            }
        });
    }
}

/// Completes one challenge handshake, or refuses it; returns the name
/// answered for, or why not.
async fn answer(stream: TcpStream, challenges: &PendingChallenges) -> Result<String, String> {
    let acceptor =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = acceptor
        .await
        .map_err(|error| format!("no valid ClientHello: {error}"))?;
    let hello = start.client_hello();
    let offers_acme = hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|protocol| protocol == ACME_TLS_ALPN));
    let name = hello.server_name().map(str::to_string);
    let certificate = match (&name, offers_acme) {
        (Some(name), true) => challenges.tls_alpn01(name),
        _ => None,
    };
    let refusal = match (&name, offers_acme, &certificate) {
        (_, false, _) => Some("the client does not offer ALPN acme-tls/1".to_string()),
        (None, true, _) => Some("the client names no host (SNI)".to_string()),
        (Some(name), true, None) => Some(format!("no challenge is pending for {name:?}")),
        (Some(_), true, Some(_)) => None,
    };
    let config = server_config(certificate).map_err(|error| error.to_string())?;
    // Refused handshakes go on with a configuration that resolves no
    // certificate: rustls ends them with a fatal alert.
    let mut stream = start
        .into_stream(config)
        .await
        .map_err(|error| refusal.clone().unwrap_or_else(|| error.to_string()))?;
    let _ = stream.shutdown().await;
    match (refusal, name) {
        (None, Some(name)) => Ok(name),
        (Some(refusal), _) => Err(refusal),
        (None, None) => Err("the client names no host (SNI)".into()),
    }
}

/// `acme-tls/1` only, TLS 1.2 or 1.3 (RFC 8737 section 4), serving
/// `certificate` (none: every handshake fails).
fn server_config(
    certificate: Option<Arc<CertifiedKey>>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider::provider())
        .with_protocol_versions(provider::PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ChallengeCertificate(certificate)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct ChallengeCertificate(Option<Arc<CertifiedKey>>);

impl ResolvesServerCert for ChallengeCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::challenges::tls_alpn01_certificate;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    /// Accepts any certificate: the test looks at what was served. Its
    /// handshake signatures are not checked either: the verifier's
    /// certificate parser refuses the challenge certificate's critical
    /// acmeIdentifier extension.
    #[derive(Debug)]
    struct AcceptAnything;

    impl ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    async fn handshake(
        address: std::net::SocketAddr,
        name: &str,
        alpn: &[&[u8]],
    ) -> Result<Vec<u8>, String> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider::provider())
            .with_protocol_versions(provider::PROTOCOL_VERSIONS)
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let stream = TcpStream::connect(address).await.expect("connect");
        let server_name = ServerName::try_from(name.to_string()).expect("name");
        let tls = connector
            .connect(server_name, stream)
            .await
            .map_err(|error| error.to_string())?;
        let (_, connection) = tls.get_ref();
        assert_eq!(connection.alpn_protocol(), Some(ACME_TLS_ALPN));
        Ok(connection.peer_certificates().expect("certificate")[0].to_vec())
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_before_a_handshake() {
        let challenges = PendingChallenges::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(serve_at_most(listener, challenges.clone(), 1));
        let certificate = tls_alpn01_certificate("mail.example.org", &[1; 32]).expect("cert");
        let _published = challenges.publish_tls_alpn01("mail.example.org", certificate);
        // One client that never sends its ClientHello holds the only slot.
        let held = TcpStream::connect(address).await.expect("connect");
        let refused = tokio::time::timeout(
            Duration::from_secs(2),
            handshake(address, "mail.example.org", &[ACME_TLS_ALPN]),
        )
        .await
        .expect("closed at once");
        assert!(refused.is_err(), "{refused:?}");

        drop(held);
        let served = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                if let Ok(served) = handshake(address, "mail.example.org", &[ACME_TLS_ALPN]).await {
                    return served;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("served again");
        assert!(!served.is_empty());
        server.abort();
    }

    #[tokio::test]
    async fn only_acme_tls_handshakes_for_pending_names_complete() {
        let challenges = PendingChallenges::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(serve(listener, challenges.clone()));
        let certificate = tls_alpn01_certificate("mail.example.org", &[1; 32]).expect("cert");
        let expected = certificate.cert[0].to_vec();
        let published = challenges.publish_tls_alpn01("mail.example.org", certificate);

        let served = handshake(address, "mail.example.org", &[ACME_TLS_ALPN])
            .await
            .expect("challenge handshake");
        assert_eq!(served, expected);

        // A normal client (no acme-tls/1) gets an alert, never a certificate.
        let error = handshake(address, "mail.example.org", &[])
            .await
            .expect_err("refused");
        assert!(error.contains("alert"), "{error}");
        let error = handshake(address, "mail.example.org", &[b"imap"])
            .await
            .expect_err("refused");
        assert!(error.contains("alert"), "{error}");
        // A name without a pending challenge is refused too.
        let error = handshake(address, "smtp.example.org", &[ACME_TLS_ALPN])
            .await
            .expect_err("refused");
        assert!(error.contains("alert"), "{error}");

        drop(published);
        let error = handshake(address, "mail.example.org", &[ACME_TLS_ALPN])
            .await
            .expect_err("withdrawn");
        assert!(error.contains("alert"), "{error}");
        server.abort();
    }
}
