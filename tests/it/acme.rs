//! ACME certificates without an ACME server: an entry is served by a
//! self-signed placeholder for its names until its first issuance, a pair
//! already in the state directory is served at start-up without an order,
//! `tlsa` prints the DANE records of the served keys, `check` says what is
//! issued until when and what failed last, and `acme renew` leaves a
//! request for the running proxy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mail_tls_proxy::config::Config;
use mail_tls_proxy::server::Proxy;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::support::*;

/// A configuration with one implicit IMAP listener in front of `backend`,
/// an `[acme]` table whose directory nobody answers, and `certificates`
/// (TOML `[[certificate]]` tables) after it.
fn acme_config(dir: &Path, backend: &str, directory: &str, certificates: &str) -> String {
    format!(
        r#"hostname = "proxy.test"

[acme]
directory = "{directory}"
contact = "mailto:postmaster@example.org"
state_dir = {state:?}
challenge = "http-01"
http_listen = "127.0.0.1:0"

{certificates}

[[listener]]
name = "acme-imaps"
protocol = "imap"
tls = "implicit"
listen = "127.0.0.1:0"
backend = "{backend}"
"#,
        state = dir.join("state").display().to_string(),
    )
}

/// Writes [`acme_config`] to `dir/config.toml`; returns its path.
fn write_config(dir: &TempDir, backend: &str, directory: &str, certificates: &str) -> PathBuf {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        acme_config(dir.path(), backend, directory, certificates),
    )
    .expect("write");
    config
}

/// A URL of a port nothing listens on.
fn dead_directory() -> String {
    format!("https://{}/directory", free_address())
}

async fn leaf_for(address: SocketAddr, sni: &str) -> CertificateDer<'static> {
    let stream = TcpStream::connect(address).await.expect("connect");
    let name = ServerName::try_from(sni.to_string()).expect("name");
    let tls = crate::support::certs::accept_any_connector()
        .connect(name, stream)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certificate")[0].clone()
}

fn dns_names(der: &[u8]) -> Vec<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).expect("X.509");
    let mut names = Vec::new();
    if let Ok(Some(san)) = certificate.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_string());
            }
        }
    }
    names
}

fn is_self_signed(der: &[u8]) -> bool {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).expect("X.509");
    certificate.issuer() == certificate.subject()
}

/// Writes `pair` where the proxy keeps the entry `first_name`'s pair.
fn place_pair(dir: &Path, first_name: &str, cert_pem: &str, key_pem: &str) {
    let folder = dir.join("state/certificates").join(first_name);
    std::fs::create_dir_all(&folder).expect("folder");
    std::fs::write(folder.join("fullchain.pem"), cert_pem).expect("write");
    std::fs::write(folder.join("privkey.pem"), key_pem).expect("write");
}

async fn start(config_path: &Path) -> (tokio::task::JoinHandle<()>, SocketAddr) {
    let config = Config::load(config_path).expect("config");
    let proxy = Proxy::bind(&config).await.expect("bind");
    let address = proxy.listener_addresses()["acme-imaps"];
    let running = tokio::spawn(proxy.run(std::future::pending()));
    (running, address)
}

#[tokio::test]
async fn before_the_first_issuance_a_placeholder_serves_the_acme_names() {
    let dir = TempDir::new("acme-placeholder");
    let imap = FakeBackend::start(Script::imap()).await;
    let config = write_config(
        &dir,
        &imap.address.to_string(),
        &dead_directory(),
        "[[certificate]]\nacme = [\"mail.placeholder.test\", \"smtp.placeholder.test\"]\n",
    );
    let (running, address) = start(&config).await;
    for sni in ["mail.placeholder.test", "smtp.placeholder.test"] {
        let leaf = leaf_for(address, sni).await;
        assert_eq!(
            dns_names(&leaf),
            ["mail.placeholder.test", "smtp.placeholder.test"]
        );
        assert!(is_self_signed(&leaf));
    }
    running.abort();
}

#[tokio::test]
async fn a_pair_in_the_state_directory_is_served_at_start_without_an_order() {
    let dir = TempDir::new("acme-stored");
    let imap = FakeBackend::start(Script::imap()).await;
    let names = vec![
        "mail.stored.test".to_string(),
        "smtp.stored.test".to_string(),
    ];
    let pair = mail_tls_proxy::tls::generate_pair(&names).expect("pair");
    place_pair(
        dir.path(),
        "mail.stored.test",
        &pair.cert_pem,
        &pair.key_pem,
    );
    // The directory is a socket that counts what reaches it: a stored pair
    // valid for centuries needs no order, so nothing but (at most) a look at
    // the CA's renewal window may arrive, and no order may fail.
    let config = write_config(
        &dir,
        &imap.address.to_string(),
        &dead_directory(),
        "[[certificate]]\nacme = [\"mail.stored.test\", \"smtp.stored.test\"]\nreuse_key = true\n",
    );
    let (running, address) = start(&config).await;
    for sni in ["mail.stored.test", "smtp.stored.test"] {
        assert_eq!(leaf_for(address, sni).await, pair.cert_der);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state_file = dir.join("state/certificates/mail.stored.test/state.json");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).expect("state.json")).expect("JSON");
    assert_eq!(state["last_error"], serde_json::Value::Null, "{state}");
    assert!(state["next_renewal"].as_i64().expect("next renewal") > 4_000_000_000);
    assert_eq!(leaf_for(address, "mail.stored.test").await, pair.cert_der);
    running.abort();
}

#[test]
fn tlsa_prints_one_3_1_1_record_per_name_and_smtp_port() {
    let dir = TempDir::new("acme-tlsa");
    let names = vec!["mx.tlsa.test".to_string(), "smtp.tlsa.test".to_string()];
    let pair = mail_tls_proxy::tls::generate_pair(&names).expect("pair");
    std::fs::write(dir.join("fullchain.pem"), &pair.cert_pem).expect("write");
    std::fs::write(dir.join("privkey.pem"), &pair.key_pem).expect("write");
    // The expected digest, computed here: SHA-256 of the leaf's
    // SubjectPublicKeyInfo.
    let (_, leaf) = x509_parser::parse_x509_certificate(&pair.cert_der).expect("X.509");
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        leaf.tbs_certificate.subject_pki.raw,
    );
    let hex: String = digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let smtp = |name: &str, port: u16| {
        format!(
            "\n[[listener]]\nname = \"{name}\"\nprotocol = \"smtp\"\ntls = \"starttls\"\nlisten = \"0.0.0.0:{port}\"\nbackend = \"127.0.0.1:2525\"\n"
        )
    };
    let config = dir.join("config.toml");
    let mut text = acme_config(
        dir.path(),
        "127.0.0.1:143",
        &dead_directory(),
        "[[certificate]]\ncert = \"fullchain.pem\"\nkey = \"privkey.pem\"\n\n[[certificate]]\nacme = [\"new.tlsa.test\"]\n",
    );
    text.push_str(&smtp("mx", 25));
    text.push_str(&smtp("submission", 587));
    std::fs::write(&config, text).expect("write");
    let (ok, stdout, stderr) = run_binary(&["tlsa", "-c", config.to_str().expect("path")], None);
    assert!(ok, "{stderr}");
    let expected = [
        format!("_25._tcp.mx.tlsa.test. IN TLSA 3 1 1 {hex}"),
        format!("_587._tcp.mx.tlsa.test. IN TLSA 3 1 1 {hex}"),
        format!("_25._tcp.smtp.tlsa.test. IN TLSA 3 1 1 {hex}"),
        format!("_587._tcp.smtp.tlsa.test. IN TLSA 3 1 1 {hex}"),
        "; new.tlsa.test: no certificate issued yet (a placeholder is served): no record"
            .to_string(),
    ];
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{stdout}");
}

#[test]
fn check_reports_each_acme_certificate_and_acme_renew_leaves_a_request() {
    let dir = TempDir::new("acme-check");
    let names = vec!["mail.check.test".to_string()];
    let pair = mail_tls_proxy::tls::generate_pair(&names).expect("pair");
    place_pair(dir.path(), "mail.check.test", &pair.cert_pem, &pair.key_pem);
    std::fs::write(
        dir.join("state/certificates/mail.check.test/state.json"),
        r#"{"names":["mail.check.test"],"next_renewal":4000000000,"last_error":"rate limited","last_error_at":1700000000,"next_retry":1700000060}"#,
    )
    .expect("write");
    let config = write_config(&dir, "127.0.0.1:143", "https://acme.invalid/directory", "[[certificate]]\nacme = [\"mail.check.test\"]\n\n[[certificate]]\nacme = [\"new.check.test\", \"other.check.test\"]\nkey_type = \"rsa-2048\"\n");
    let config_arg = config.to_str().expect("path");
    let (ok, stdout, stderr) = run_binary(&["check", "-c", config_arg], None);
    assert!(ok, "{stderr}\n{stdout}");
    let state_dir = dir.join("state");
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("acme"))
        .collect();
    assert_eq!(
        lines,
        [
            format!(
                "acme: https://acme.invalid/directory (http-01 challenge on 127.0.0.1:0), state in {}",
                state_dir.display()
            )
            .as_str(),
            "acme certificate mail.check.test (mail.check.test; ecdsa-p256): issued until 4096-01-01 00:00:00 UTC, next renewal at 2096-10-02 07:06:40 UTC, last error at 2023-11-14 22:13:20 UTC: rate limited (next retry at 2023-11-14 22:14:20 UTC)",
            "acme certificate new.check.test (new.check.test, other.check.test; rsa-2048): not issued yet (a self-signed placeholder is served until the first issuance), last error: none",
        ],
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "certificate 2: acme, no certificate issued yet: a self-signed placeholder is served"
        ),
        "{stdout}"
    );

    let (ok, stdout, stderr) = run_binary(
        &[
            "acme",
            "renew",
            "-c",
            config_arg,
            "--name",
            "other.check.test",
        ],
        None,
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("renewal of new.check.test requested"),
        "{stdout}"
    );
    assert!(state_dir.join("renew-requests/new.check.test").exists());
    let (ok, _, stderr) = run_binary(
        &[
            "acme",
            "renew",
            "-c",
            config_arg,
            "--name",
            "unknown.check.test",
        ],
        None,
    );
    assert!(!ok);
    assert!(
        stderr.contains("no acme certificate names \"unknown.check.test\""),
        "{stderr}"
    );
}
