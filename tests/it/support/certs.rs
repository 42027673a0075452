//! Helpers for the certificate tests: a test CA (root, intermediate, leaves
//! issued at run time; nothing is read from the repository), writing pairs
//! the ways operators and tools do (in place, by rename, as a Kubernetes
//! Secret volume), backends and listeners of all six kinds for
//! [`TestProxy::start_in`], and handshakes on every listener kind that
//! report the leaf the proxy served.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{
    client_config, listener, roots, try_exchange, try_read_until, FakeBackend, ListenerSpec,
    PairPaths, Script, TestProxy, STEP,
};

/// How soon new handshakes must see a rotated certificate.
pub const WITHIN: Duration = Duration::from_secs(2);

/// A root CA and an intermediate CA that issues leaves.
pub struct TestCa {
    pub root: CertificateDer<'static>,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf issued by [`TestCa`]: `fullchain_pem` is leaf then intermediate.
#[derive(Clone)]
pub struct Issued {
    pub leaf: CertificateDer<'static>,
    pub intermediate: CertificateDer<'static>,
    pub fullchain_pem: String,
    pub key_pem: String,
    /// The key as PKCS#8 DER.
    pub key_der: Vec<u8>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl TestCa {
    pub fn new() -> TestCa {
        let root = CertifiedIssuer::self_signed(
            ca_params("mail-tls-proxy test root"),
            KeyPair::generate().expect("key"),
        )
        .expect("root");
        let intermediate = CertifiedIssuer::signed_by(
            ca_params("mail-tls-proxy test intermediate"),
            KeyPair::generate().expect("key"),
            &root,
        )
        .expect("intermediate");
        TestCa {
            root: root.der().clone(),
            intermediate,
        }
    }

    /// A leaf for `names` with an ECDSA P-256 key.
    pub fn issue(&self, names: &[&str]) -> Issued {
        self.issue_with(names, &rcgen::PKCS_ECDSA_P256_SHA256, None)
    }

    /// A leaf for `names` with a key of `algorithm`, valid from 2000 until
    /// `not_after` (default: rcgen's 1975 to 4096).
    pub fn issue_with(
        &self,
        names: &[&str],
        algorithm: &'static rcgen::SignatureAlgorithm,
        not_after: Option<(i32, u8, u8)>,
    ) -> Issued {
        let key = KeyPair::generate_for(algorithm).expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        if let Some((year, month, day)) = not_after {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(year, month, day);
        }
        let leaf = params.signed_by(&key, &self.intermediate).expect("sign");
        Issued {
            leaf: leaf.der().clone(),
            intermediate: self.intermediate.der().clone(),
            fullchain_pem: format!("{}{}", leaf.pem(), self.intermediate.pem()),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    /// A client that trusts this CA's root only, and never resumes (every
    /// handshake shows the certificate served now).
    pub fn connector(&self) -> TlsConnector {
        let mut config = client_config(roots(&self.root), rustls::DEFAULT_VERSIONS);
        config.resumption = rustls::client::Resumption::disabled();
        TlsConnector::from(Arc::new(config))
    }
}

/// A client that accepts any certificate (expired, self-signed) so a test
/// can look at exactly what was served. Signatures are still checked.
pub fn accept_any_connector() -> TlsConnector {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

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

impl PairPaths {
    pub fn in_dir(dir: &Path, stem: &str) -> PairPaths {
        PairPaths {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        }
    }

    /// A pair in `dir` whose key does not belong to its certificate (two
    /// certificates of `ca`, the first one's chain and the second one's
    /// key).
    pub fn mismatched_in(dir: &Path, stem: &str, ca: &TestCa) -> PairPaths {
        let (one, two) = (ca.issue(&["localhost"]), ca.issue(&["localhost"]));
        let pair = PairPaths::in_dir(dir, stem);
        std::fs::write(&pair.cert, &one.fullchain_pem).expect("write");
        std::fs::write(&pair.key, &two.key_pem).expect("write");
        pair
    }

    /// Overwrites both files in place, key first, one after the other (what
    /// `cp` or a naive script does).
    pub fn write_in_place(&self, issued: &Issued) {
        std::fs::write(&self.key, &issued.key_pem).expect("write key");
        std::fs::write(&self.cert, &issued.fullchain_pem).expect("write cert");
    }

    /// Writes each file beside its final name and renames it over (what
    /// certbot-style tools and editors do): key first, then certificate.
    pub fn write_by_rename(&self, issued: &Issued) {
        for (path, content) in [
            (&self.key, issued.key_pem.as_str()),
            (&self.cert, issued.fullchain_pem.as_str()),
        ] {
            let temporary = path.with_extension("tmp");
            std::fs::write(&temporary, content).expect("write temporary");
            std::fs::rename(&temporary, path).expect("rename over");
        }
    }
}

/// A Kubernetes Secret volume: `tls.crt` and `tls.key` are symlinks into
/// `..data`, itself a symlink to a timestamped folder; an update writes a new
/// folder and renames a new `..data` symlink over the old one.
pub struct SecretVolume {
    pub dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    pub fn create(dir: &Path, issued: &Issued) -> SecretVolume {
        let mut volume = SecretVolume {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        let first = volume.write_generation(issued);
        std::os::unix::fs::symlink(&first, dir.join("..data")).expect("..data");
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).expect("link");
        }
        volume
    }

    pub fn paths(&self) -> PairPaths {
        PairPaths {
            cert: self.dir.join("tls.crt"),
            key: self.dir.join("tls.key"),
        }
    }

    fn write_generation(&mut self, issued: &Issued) -> String {
        self.generation += 1;
        let name = format!(
            "..2026_01_01_00_00_{:02}.{}",
            self.generation,
            1000 + self.generation
        );
        let folder = self.dir.join(&name);
        std::fs::create_dir(&folder).expect("generation folder");
        std::fs::write(folder.join("tls.crt"), &issued.fullchain_pem).expect("write");
        std::fs::write(folder.join("tls.key"), &issued.key_pem).expect("write");
        name
    }

    /// What the kubelet does on a Secret update.
    pub fn update(&mut self, issued: &Issued) {
        let old = std::fs::read_link(self.dir.join("..data")).expect("read ..data");
        let new = self.write_generation(issued);
        let temporary = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&new, &temporary).expect("..data_tmp");
        std::fs::rename(&temporary, self.dir.join("..data")).expect("swap ..data");
        std::fs::remove_dir_all(self.dir.join(old)).expect("remove old generation");
    }
}

/// One kind of listener: protocol and TLS mode, and its name in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub name: &'static str,
    pub protocol: &'static str,
    pub tls: &'static str,
}

/// All six: three protocols, implicit TLS and STARTTLS.
pub const ALL_KINDS: [Kind; 6] = [
    Kind {
        name: "smtps",
        protocol: "smtp",
        tls: "implicit",
    },
    Kind {
        name: "smtp-starttls",
        protocol: "smtp",
        tls: "starttls",
    },
    Kind {
        name: "imaps",
        protocol: "imap",
        tls: "implicit",
    },
    Kind {
        name: "imap-starttls",
        protocol: "imap",
        tls: "starttls",
    },
    Kind {
        name: "pop3s",
        protocol: "pop3",
        tls: "implicit",
    },
    Kind {
        name: "pop3-starttls",
        protocol: "pop3",
        tls: "starttls",
    },
];

impl Kind {
    /// The kind in [`ALL_KINDS`] called `name`.
    pub fn named(name: &str) -> Kind {
        *ALL_KINDS
            .iter()
            .find(|kind| kind.name == name)
            .expect("known kind")
    }
}

/// Fake SMTP, IMAP and POP3 backends.
pub struct Backends {
    pub smtp: FakeBackend,
    pub imap: FakeBackend,
    pub pop3: FakeBackend,
}

impl Backends {
    pub async fn start() -> Backends {
        Backends {
            smtp: FakeBackend::start(Script::smtp()).await,
            imap: FakeBackend::start(Script::imap()).await,
            pop3: FakeBackend::start(Script::pop3()).await,
        }
    }

    pub fn address(&self, protocol: &str) -> SocketAddr {
        match protocol {
            "smtp" => self.smtp.address,
            "imap" => self.imap.address,
            _ => self.pop3.address,
        }
    }

    /// A listener for each of `kinds` in front of its protocol's backend,
    /// named after the kind.
    pub fn listeners(&self, kinds: &[Kind]) -> Vec<ListenerSpec> {
        kinds
            .iter()
            .map(|kind| {
                listener(
                    kind.name,
                    kind.protocol,
                    kind.tls,
                    self.address(kind.protocol),
                )
            })
            .collect()
    }
}

/// A TLS session with the proxy, ready for commands.
pub struct Session {
    pub kind: Kind,
    pub stream: TlsStream<TcpStream>,
    /// The leaf the proxy served for this session.
    pub leaf: CertificateDer<'static>,
    /// The whole chain the proxy served.
    pub chain: Vec<CertificateDer<'static>>,
}

/// Where a proxy's listeners are: an in-process [`TestProxy`], or the
/// address of the one listener a test uses (e.g. of a proxy process).
pub trait Listeners {
    fn address_of(&self, kind: Kind) -> SocketAddr;
}

impl Listeners for TestProxy {
    fn address_of(&self, kind: Kind) -> SocketAddr {
        self.address(kind.name)
    }
}

impl<T: Listeners> Listeners for Arc<T> {
    fn address_of(&self, kind: Kind) -> SocketAddr {
        (**self).address_of(kind)
    }
}

impl Listeners for SocketAddr {
    fn address_of(&self, _: Kind) -> SocketAddr {
        *self
    }
}

/// Connects to `kind`'s listener, upgrades (STARTTLS/STLS when needed),
/// completes the TLS handshake asking for `sni`, and finishes the
/// protocol's opening so the session takes commands. Any failure is an
/// `Err` describing it (the client's TLS error included).
pub async fn open_session(
    proxy: &impl Listeners,
    kind: Kind,
    connector: &TlsConnector,
    sni: &str,
) -> Result<Session, String> {
    let address = proxy.address_of(kind);
    let mut tcp = tokio::time::timeout(STEP, TcpStream::connect(address))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|error| format!("connect: {error}"))?;
    if kind.tls == "starttls" {
        try_read_until(&mut tcp, b"\r\n").await?;
        match kind.protocol {
            "smtp" => {
                try_exchange(&mut tcp, b"EHLO client\r\n", b"250 STARTTLS\r\n").await?;
                try_exchange(&mut tcp, b"STARTTLS\r\n", b"\r\n").await?;
            }
            "imap" => {
                try_exchange(&mut tcp, b"s STARTTLS\r\n", b"\r\n").await?;
            }
            _ => {
                try_exchange(&mut tcp, b"STLS\r\n", b"\r\n").await?;
            }
        }
    }
    let name = ServerName::try_from(sni.to_string()).map_err(|error| error.to_string())?;
    let mut stream = tokio::time::timeout(STEP, connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|error| format!("TLS handshake: {error}"))?;
    let chain: Vec<CertificateDer<'static>> = stream
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no server certificate")?
        .iter()
        .map(|certificate| certificate.clone().into_owned())
        .collect();
    if kind.tls == "implicit" {
        try_read_until(&mut stream, b"\r\n").await?;
    }
    if kind.protocol == "smtp" {
        try_exchange(&mut stream, b"EHLO client\r\n", b"250 8BITMIME\r\n").await?;
    }
    Ok(Session {
        kind,
        stream,
        leaf: chain[0].clone(),
        chain,
    })
}

impl Session {
    /// One command and its exact reply: proves the session still works.
    pub async fn ping(&mut self) -> Result<(), String> {
        let (command, reply): (&[u8], &[u8]) = match self.kind.protocol {
            "smtp" => (b"NOOP\r\n", b"250 2.0.0 Ok\r\n"),
            "imap" => (b"n NOOP\r\n", b"n OK NOOP completed.\r\n"),
            _ => (b"STAT\r\n", b"+OK 0 0\r\n"),
        };
        let got = try_exchange(&mut self.stream, command, b"\r\n").await?;
        if got == reply {
            Ok(())
        } else {
            Err(format!(
                "{}: {:?} got {:?}",
                self.kind.name,
                String::from_utf8_lossy(command),
                String::from_utf8_lossy(&got)
            ))
        }
    }
}

/// The leaf a fresh handshake on `kind` gets for `sni`.
pub async fn served_leaf(
    proxy: &impl Listeners,
    kind: Kind,
    connector: &TlsConnector,
    sni: &str,
) -> Result<CertificateDer<'static>, String> {
    open_session(proxy, kind, connector, sni)
        .await
        .map(|session| session.leaf)
}

/// Handshakes on every kind in `kinds`, one after another, until each serves
/// `expected`; fails if that takes longer than `limit` or if any handshake
/// fails. Returns how long it took.
pub async fn wait_until_served(
    proxy: &impl Listeners,
    kinds: &[Kind],
    connector: &TlsConnector,
    expected: &CertificateDer<'static>,
    limit: Duration,
) -> Duration {
    let started = tokio::time::Instant::now();
    for kind in kinds {
        loop {
            let leaf = served_leaf(proxy, *kind, connector, "localhost")
                .await
                .unwrap_or_else(|error| panic!("{}: {error}", kind.name));
            if &leaf == expected {
                break;
            }
            assert!(
                started.elapsed() < limit,
                "{}: the new certificate was not served within {limit:?}",
                kind.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    started.elapsed()
}

/// The content of the privateKey OCTET STRING of a PKCS#8 PrivateKeyInfo:
/// for RSA the PKCS#1 RSAPrivateKey, for ECDSA the SEC1 ECPrivateKey.
pub fn pkcs8_inner(pkcs8: &[u8]) -> Vec<u8> {
    fn header(der: &[u8]) -> (u8, usize, usize) {
        let first = der[1] as usize;
        if first < 0x80 {
            (der[0], 2, first)
        } else {
            let count = first & 0x7f;
            let length = der[2..2 + count]
                .iter()
                .fold(0usize, |length, byte| length << 8 | *byte as usize);
            (der[0], 2 + count, length)
        }
    }
    let (_, start, _) = header(pkcs8);
    let mut rest = &pkcs8[start..];
    for _ in 0..2 {
        let (_, head, length) = header(rest);
        rest = &rest[head + length..];
    }
    let (tag, head, length) = header(rest);
    assert_eq!(tag, 0x04, "privateKey is an OCTET STRING");
    rest[head..head + length].to_vec()
}

/// DER as PEM with `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut base64 = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            base64.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in base64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
