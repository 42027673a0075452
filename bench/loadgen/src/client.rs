//! The client side: one TLS configuration for every proxy, and the mail
//! dialogue steps each figure is made of.
//!
//! Every proxy is offered exactly the same thing: TLS 1.3 only,
//! TLS13_AES_256_GCM_SHA384, X25519 key exchange, and SNI `localhost`; no
//! session resumption (every handshake is a full one) except from a
//! [`resuming_connector`], which keeps the TLS 1.3 tickets it is given in a
//! [`TicketPool`] and offers the newest on its next connection.
//!
//! The client checks cheaply: the server's certificate must be byte-for-byte
//! the expected one (when given), and the handshake signature is verified on
//! one handshake in [`SIGNATURE_SAMPLE`] (and always on the first), so the
//! load generator's own core does not become the bottleneck of the handshake
//! figures while a proxy that signed wrongly would still fail the run.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// One handshake in this many has its signature verified.
pub const SIGNATURE_SAMPLE: u64 = 16;

/// The mail protocol a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Imap,
    Pop3,
    Smtp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
            Protocol::Smtp => "smtp",
        }
    }
}

/// How TLS starts on a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// TLS first (993, 995, 465).
    Implicit,
    /// Plaintext greeting, then STARTTLS/STLS.
    Starttls,
    /// No TLS at all: the backend directly, for baselines.
    Plain,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Implicit => "implicit",
            Mode::Starttls => "starttls",
            Mode::Plain => "plain",
        }
    }
}

/// Builds the TLS connector every figure uses. `expected` is the PEM file of
/// the certificate the proxies serve (checked byte for byte when given).
pub fn connector(expected: Option<&std::path::Path>) -> Result<TlsConnector> {
    Ok(TlsConnector::from(Arc::new(client_config(expected)?)))
}

/// Two connectors around one ticket pool, both with the same offer as
/// [`connector`]: the first resumes, offering a ticket from `pool` on every
/// connection (newest first, each used once, as RFC 8446 recommends for
/// TLS 1.3 clients and rustls does); the second offers no ticket (every handshake a
/// full one) and puts the tickets it is given into `pool` (how a pool is
/// filled). They share one configuration's verifier: rustls resumes only a
/// session made with the same one. One pair per connection slot, so slots
/// do not take each other's tickets.
pub fn resuming_connectors(
    expected: Option<&std::path::Path>,
    pool: Arc<TicketPool>,
) -> Result<(TlsConnector, TlsConnector)> {
    let mut resuming = client_config(expected)?;
    let mut filling = resuming.clone();
    filling.resumption = rustls::client::Resumption::store(Arc::new(Filler(pool.clone())));
    resuming.resumption = rustls::client::Resumption::store(pool);
    Ok((
        TlsConnector::from(Arc::new(resuming)),
        TlsConnector::from(Arc::new(filling)),
    ))
}

/// A client's TLS 1.3 session tickets, for one server: what the server sent
/// is kept (the oldest dropped beyond `capacity`), the newest is offered
/// next and then forgotten. It also counts the tickets received, so a run
/// can tell how many a server issues per session.
#[derive(Debug)]
pub struct TicketPool {
    tickets: Mutex<VecDeque<rustls::client::Tls13ClientSessionValue>>,
    kx_hint: Mutex<Option<rustls::NamedGroup>>,
    capacity: usize,
    received: AtomicU64,
}

impl TicketPool {
    pub fn new(capacity: usize) -> Arc<TicketPool> {
        Arc::new(TicketPool {
            tickets: Mutex::new(VecDeque::new()),
            kx_hint: Mutex::new(None),
            capacity: capacity.max(1),
            received: AtomicU64::new(0),
        })
    }

    /// Tickets held now.
    pub fn len(&self) -> usize {
        self.tickets.lock().map_or(0, |tickets| tickets.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tickets received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl rustls::client::ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, _: ServerName<'static>, group: rustls::NamedGroup) {
        if let Ok(mut hint) = self.kx_hint.lock() {
            *hint = Some(group);
        }
    }

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.kx_hint.lock().ok().and_then(|hint| *hint)
    }

    // TLS 1.3 only: no TLS 1.2 sessions.
    fn set_tls12_session(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        _: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.received.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut tickets) = self.tickets.lock() {
            if tickets.len() >= self.capacity {
                tickets.pop_front();
            }
            tickets.push_back(value);
        }
    }

    fn take_tls13_ticket(
        &self,
        _: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.tickets
            .lock()
            .ok()
            .and_then(|mut tickets| tickets.pop_back())
    }
}

/// Takes tickets into a pool, never offers one.
#[derive(Debug)]
struct Filler(Arc<TicketPool>);

impl rustls::client::ClientSessionStore for Filler {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.0.set_kx_hint(name, group);
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.0.kx_hint(name)
    }

    fn set_tls12_session(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.0.insert_tls13_ticket(name, value);
    }

    fn take_tls13_ticket(
        &self,
        _: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        None
    }
}

/// Whether the handshake of `stream` resumed a session from a ticket.
pub fn resumed(stream: &TlsStream<TcpStream>) -> bool {
    stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

fn client_config(expected: Option<&std::path::Path>) -> Result<rustls::ClientConfig> {
    let expected = match expected {
        Some(path) => Some(
            CertificateDer::pem_file_iter(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .next()
                .ok_or_else(|| anyhow!("{}: no certificate", path.display()))?
                .with_context(|| format!("{}: bad PEM", path.display()))?,
        ),
        None => None,
    };
    let provider = Arc::new(CryptoProvider {
        cipher_suites: vec![aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384],
        kx_groups: vec![aws_lc_rs::kx_group::X25519],
        ..aws_lc_rs::default_provider()
    });
    let verifier = Arc::new(SampledVerifier {
        expected,
        provider: provider.clone(),
        handshakes: AtomicU64::new(0),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

struct SampledVerifier {
    expected: Option<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
    handshakes: AtomicU64,
}

impl fmt::Debug for SampledVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SampledVerifier")
    }
}

impl ServerCertVerifier for SampledVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.expected {
            Some(expected) if expected.as_ref() != end_entity.as_ref() => Err(
                rustls::Error::General("not the certificate the benchmark configured".into()),
            ),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.handshakes.fetch_add(1, Ordering::Relaxed) % SIGNATURE_SAMPLE == 0 {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        } else {
            Ok(HandshakeSignatureValid::assertion())
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A connected TCP socket with Nagle off (every proxy sets it too).
pub async fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub async fn tls_handshake(
    connector: &TlsConnector,
    tcp: TcpStream,
) -> io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from("localhost").expect("valid name");
    connector.connect(name, tcp).await
}

/// A stream with a line reader in front of it.
pub struct Lines<S> {
    pub stream: S,
    buffer: Vec<u8>,
    start: usize,
}

const MAX_LINE: usize = 64 * 1024;

impl<S: AsyncRead + AsyncWrite + Unpin> Lines<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buffer: Vec::with_capacity(512),
            start: 0,
        }
    }

    /// The next line, CRLF included.
    pub async fn line(&mut self) -> Result<&[u8]> {
        loop {
            if let Some(end) = memchr::memchr(b'\n', &self.buffer[self.start..]) {
                let line = self.start..self.start + end + 1;
                self.start = line.end;
                return Ok(&self.buffer[line]);
            }
            if self.start > 0 {
                self.buffer.drain(..self.start);
                self.start = 0;
            }
            if self.buffer.len() >= MAX_LINE {
                bail!("line longer than {MAX_LINE} bytes");
            }
            self.buffer.reserve(512);
            let read = self.stream.read_buf(&mut self.buffer).await?;
            if read == 0 {
                bail!("connection closed by the server");
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads an IMAP reply up to the line tagged `tag`; fails unless it is OK.
    pub async fn imap_tagged(&mut self, tag: &str) -> Result<()> {
        loop {
            let line = self.line().await?;
            if line.starts_with(tag.as_bytes()) && line.get(tag.len()) == Some(&b' ') {
                let status = &line[tag.len() + 1..];
                if status.starts_with(b"OK") {
                    return Ok(());
                }
                bail!("IMAP: {}", String::from_utf8_lossy(line).trim_end());
            }
        }
    }

    /// Reads the IMAP greeting.
    pub async fn imap_greeting(&mut self) -> Result<()> {
        let line = self.line().await?;
        if line.starts_with(b"* OK") {
            return Ok(());
        }
        bail!(
            "IMAP greeting: {}",
            String::from_utf8_lossy(line).trim_end()
        );
    }

    /// Reads an SMTP reply (all its lines); fails unless its code is `code`.
    pub async fn smtp_reply(&mut self, code: &str) -> Result<()> {
        loop {
            let line = self.line().await?;
            if line.len() < 4 || !line.starts_with(code.as_bytes()) {
                bail!(
                    "SMTP: expected {code}, got {}",
                    String::from_utf8_lossy(line).trim_end()
                );
            }
            if line[3] == b' ' || line[3] == b'\r' {
                return Ok(());
            }
        }
    }

    /// Reads a POP3 single-line reply; fails unless it is +OK.
    pub async fn pop3_ok(&mut self) -> Result<()> {
        let line = self.line().await?;
        if line.starts_with(b"+OK") {
            return Ok(());
        }
        bail!("POP3: {}", String::from_utf8_lossy(line).trim_end());
    }

    /// Reads a POP3 multi-line reply up to its "." line.
    pub async fn pop3_multiline(&mut self) -> Result<()> {
        self.pop3_ok().await?;
        loop {
            if self.line().await? == b".\r\n" {
                return Ok(());
            }
        }
    }

    /// The stream, once nothing is buffered (before a TLS handshake).
    pub fn into_stream(self) -> Result<S> {
        if self.start != self.buffer.len() {
            bail!("the server sent data after the STARTTLS reply, before TLS");
        }
        Ok(self.stream)
    }

    /// Bytes read but not yet taken as lines.
    pub fn buffered(&self) -> &[u8] {
        &self.buffer[self.start..]
    }
}

/// Reads the greeting of `protocol`.
pub async fn greeting<S: AsyncRead + AsyncWrite + Unpin>(
    lines: &mut Lines<S>,
    protocol: Protocol,
) -> Result<()> {
    match protocol {
        Protocol::Imap => lines.imap_greeting().await,
        Protocol::Pop3 => lines.pop3_ok().await,
        Protocol::Smtp => lines.smtp_reply("220").await,
    }
}

/// Sends the protocol's capability command and reads the answer: the one
/// command of a handshake session.
pub async fn capability<S: AsyncRead + AsyncWrite + Unpin>(
    lines: &mut Lines<S>,
    protocol: Protocol,
) -> Result<()> {
    match protocol {
        Protocol::Imap => {
            lines.send(b"c CAPABILITY\r\n").await?;
            lines.imap_tagged("c").await
        }
        Protocol::Pop3 => {
            lines.send(b"CAPA\r\n").await?;
            lines.pop3_multiline().await
        }
        Protocol::Smtp => {
            lines.send(b"EHLO bench.client\r\n").await?;
            lines.smtp_reply("250").await
        }
    }
}

/// A session's TLS stream after the handshake, with its line reader.
pub type TlsLines = Lines<TlsStream<TcpStream>>;

/// Connects and gets to a TLS session whose greeting has been read (implicit
/// TLS), or whose STARTTLS upgrade is done (STARTTLS; SMTP has sent EHLO
/// before STARTTLS as RFC 3207 asks).
pub async fn open_tls(
    connector: &TlsConnector,
    target: SocketAddr,
    mode: Mode,
    protocol: Protocol,
) -> Result<TlsLines> {
    let tcp = connect(target).await?;
    match mode {
        Mode::Implicit => {
            let tls = tls_handshake(connector, tcp).await?;
            let mut lines = Lines::new(tls);
            greeting(&mut lines, protocol).await?;
            Ok(lines)
        }
        Mode::Starttls => {
            let mut plain = Lines::new(tcp);
            greeting(&mut plain, protocol).await?;
            match protocol {
                Protocol::Imap => {
                    plain.send(b"s STARTTLS\r\n").await?;
                    plain.imap_tagged("s").await?;
                }
                Protocol::Pop3 => {
                    plain.send(b"STLS\r\n").await?;
                    plain.pop3_ok().await?;
                }
                Protocol::Smtp => {
                    plain.send(b"EHLO bench.client\r\n").await?;
                    plain.smtp_reply("250").await?;
                    plain.send(b"STARTTLS\r\n").await?;
                    plain.smtp_reply("220").await?;
                }
            }
            let tls = tls_handshake(connector, plain.into_stream()?).await?;
            Ok(Lines::new(tls))
        }
        Mode::Plain => bail!("open_tls needs a TLS mode"),
    }
}

/// One full session: connect, handshake (implicit or STARTTLS), greeting, the
/// capability command, and a clean close (close_notify, then wait for the
/// server to close).
pub async fn one_session(
    connector: &TlsConnector,
    target: SocketAddr,
    mode: Mode,
    protocol: Protocol,
) -> Result<()> {
    let mut lines = open_tls(connector, target, mode, protocol).await?;
    capability(&mut lines, protocol).await?;
    close_tls(lines.stream).await;
    Ok(())
}

/// Sends close_notify and FIN, then reads until the server closes.
pub async fn close_tls(mut stream: TlsStream<TcpStream>) {
    let _ = stream.shutdown().await;
    let mut scratch = [0u8; 512];
    loop {
        match stream.read(&mut scratch).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}
