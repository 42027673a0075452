//! The certificate features of the real `mail-tls-proxy` binary: reload on
//! SIGHUP and by polling (with the exact reload and expiry metrics), `check`
//! printing names and Not After, start-up refusing a broken pair, and
//! `cert self-signed`.
//!
//! Files are symlinks from the folder the configuration names into another
//! folder, and the targets are changed in place: the directory watch sees
//! nothing, so whatever reloads them is SIGHUP or the poll.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::certs::*;
use crate::support::*;
use rustls::pki_types::CertificateDer;

/// `served/tls.crt -> real/tls.crt` and the same for the key, so that
/// writing into `real/` changes nothing in the watched folder `served/`.
struct LinkedPair {
    real: PairPaths,
    served: PairPaths,
}

fn linked_pair(dir: &TempDir, issued: &Issued) -> LinkedPair {
    let (real_dir, served_dir) = (dir.join("real"), dir.join("served"));
    std::fs::create_dir_all(&real_dir).expect("mkdir");
    std::fs::create_dir_all(&served_dir).expect("mkdir");
    let real = PairPaths::in_dir(&real_dir, "tls");
    let served = PairPaths::in_dir(&served_dir, "tls");
    real.write_in_place(issued);
    std::os::unix::fs::symlink(&real.cert, &served.cert).expect("link");
    std::os::unix::fs::symlink(&real.key, &served.key).expect("link");
    LinkedPair { real, served }
}

/// The proxy in front of `backend` with one IMAPS listener and `pair`,
/// polling every `poll` seconds.
fn reloading_config(pair: &PairPaths, poll: u64, backend: SocketAddr) -> TestConfig {
    TestConfig::new()
        .certificate_poll_interval(poll)
        .certificate(pair)
        .metrics()
        .listener(listener("imaps", "imap", "implicit", backend))
}

/// A configuration that `check` and `run` load without contacting anyone.
fn imaps_only() -> TestConfig {
    TestConfig::new().listener(listener("imaps", "imap", "implicit", "127.0.0.1:143"))
}

fn not_after(leaf: &CertificateDer<'_>) -> i64 {
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf).expect("x509");
    certificate.validity().not_after.timestamp()
}

async fn served(address: SocketAddr, ca: &TestCa) -> CertificateDer<'static> {
    served_leaf(&address, Kind::named("imaps"), &ca.connector(), "localhost")
        .await
        .expect("handshake")
}

async fn wait_until_served_at(
    address: SocketAddr,
    ca: &TestCa,
    expected: &CertificateDer<'static>,
) {
    wait_until_served(
        &address,
        &[Kind::named("imaps")],
        &ca.connector(),
        expected,
        STEP,
    )
    .await;
}

const OK: &str = "mail_tls_proxy_certificate_reloads_total{result=\"ok\"}";
const ERROR: &str = "mail_tls_proxy_certificate_reloads_total{result=\"error\"}";
const EXPIRY: &str =
    "mail_tls_proxy_certificate_expiry_timestamp_seconds{certificate=\"localhost\"}";
const LAST_RELOAD: &str = "mail_tls_proxy_certificate_reload_timestamp_seconds";

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_the_metrics_say_so() {
    let dir = TempDir::new("sighup");
    let ca = TestCa::new();
    let issue = |year| {
        ca.issue_with(
            &["localhost"],
            &rcgen::PKCS_ECDSA_P256_SHA256,
            Some((year, 5, 17)),
        )
    };
    let (first, second, third) = (issue(2031), issue(2032), issue(2033));
    let pair = linked_pair(&dir, &first);
    let backends = Backends::start().await;
    let config = reloading_config(&pair.served, 3600, backends.imap.address).write_in(dir.path());
    let before_start = unix_now();
    let proxy = ProxyProcess::spawn(&config);
    let imaps = proxy.address(&["listening", "listener=imaps"]).await;
    let metrics = proxy.address(&["serving /metrics"]).await;
    proxy
        .wait_for_log(&[
            "certificate loaded",
            "names=localhost",
            "not_after=2031-05-17 00:00:00 UTC",
        ])
        .await;

    assert_eq!(served(imaps, &ca).await, first.leaf);
    assert_eq!(metric(metrics, OK).await, 0.0);
    assert_eq!(metric(metrics, ERROR).await, 0.0);
    assert_eq!(metric(metrics, EXPIRY).await, not_after(&first.leaf) as f64);
    assert!(metric(metrics, LAST_RELOAD).await >= before_start);

    // Changed behind a symlink: the watch cannot see it, the poll is an hour
    // away. Give a wrongly triggered reload ample time to show itself.
    pair.real.write_in_place(&second);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(served(imaps, &ca).await, first.leaf);
    assert_eq!(metric(metrics, OK).await, 0.0);

    let before_reload = unix_now();
    proxy.signal("HUP");
    wait_until_served_at(imaps, &ca, &second.leaf).await;
    wait_for_metric(metrics, OK, 1.0).await;
    assert_eq!(metric(metrics, ERROR).await, 0.0);
    assert_eq!(
        metric(metrics, EXPIRY).await,
        not_after(&second.leaf) as f64
    );
    assert!(metric(metrics, LAST_RELOAD).await >= before_reload);
    proxy.wait_for_log(&["SIGHUP received"]).await;

    // A broken pair on SIGHUP: refused, counted, the old one stays.
    std::fs::write(&pair.real.key, "not a key").expect("write");
    proxy.signal("HUP");
    wait_for_metric(metrics, ERROR, 1.0).await;
    assert_eq!(served(imaps, &ca).await, second.leaf);
    assert_eq!(metric(metrics, OK).await, 1.0);
    assert_eq!(
        metric(metrics, EXPIRY).await,
        not_after(&second.leaf) as f64
    );
    // SIGHUP reloads the whole configuration: refused as a whole, naming
    // the file and the reason.
    let line = proxy.wait_for_log(&["configuration reload refused"]).await;
    assert!(
        line.contains("tls.key") && line.contains("no PEM private key"),
        "{line}"
    );

    // Fixed, SIGHUP again: served.
    pair.real.write_in_place(&third);
    proxy.signal("HUP");
    wait_until_served_at(imaps, &ca, &third.leaf).await;
    wait_for_metric(metrics, OK, 2.0).await;
    assert_eq!(metric(metrics, ERROR).await, 1.0);
    assert_eq!(metric(metrics, EXPIRY).await, not_after(&third.leaf) as f64);
    // SIGHUP never stops the process.
    let mut proxy = proxy;
    assert!(proxy.is_running(), "the proxy is still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_reloads_what_no_event_announced() {
    let dir = TempDir::new("poll");
    let ca = TestCa::new();
    let (first, second) = (ca.issue(&["localhost"]), ca.issue(&["localhost"]));
    let pair = linked_pair(&dir, &first);
    let backends = Backends::start().await;
    let config = reloading_config(&pair.served, 1, backends.imap.address).write_in(dir.path());
    let proxy = ProxyProcess::spawn(&config);
    let imaps = proxy.address(&["listening", "listener=imaps"]).await;
    let metrics = proxy.address(&["serving /metrics"]).await;
    assert_eq!(served(imaps, &ca).await, first.leaf);

    pair.real.write_by_rename(&second);
    wait_until_served_at(imaps, &ca, &second.leaf).await;
    wait_for_metric(metrics, OK, 1.0).await;
    proxy
        .wait_for_log(&["certificate reloaded", "trigger=poll"])
        .await;
}

#[test]
fn check_prints_every_certificate_with_names_and_not_after() {
    let dir = TempDir::new("check");
    let ca = TestCa::new();
    let default = ca.issue_with(
        &["mail.example.org", "*.example.org"],
        &rcgen::PKCS_ECDSA_P256_SHA256,
        Some((2031, 5, 17)),
    );
    let expired = ca.issue_with(
        &["old.example.net"],
        &rcgen::PKCS_ECDSA_P256_SHA256,
        Some((2020, 1, 2)),
    );
    let (a, b) = (
        PairPaths::in_dir(dir.path(), "a"),
        PairPaths::in_dir(dir.path(), "b"),
    );
    a.write_in_place(&default);
    b.write_by_rename(&expired);
    let config = TestConfig::new()
        .certificates([&a, &b])
        .listener(listener("imaps", "imap", "implicit", "127.0.0.1:143").sni_strict(true))
        .write_in(dir.path());
    let (ok, stdout, stderr) = run_binary(&["check"], Some(&config));
    assert!(ok, "{stdout}{stderr}");
    for expected in [
        format!(
            "certificate 1 (default): {} (chain of 2), key {}",
            a.cert.display(),
            a.key.display()
        ),
        "  names: mail.example.org, *.example.org".to_string(),
        "  not after: 2031-05-17 00:00:00 UTC (valid".to_string(),
        format!(
            "certificate 2: {} (chain of 2), key {}",
            b.cert.display(),
            b.key.display()
        ),
        "  names: old.example.net".to_string(),
        "  not after: 2020-01-02 00:00:00 UTC (EXPIRED".to_string(),
        "sni_strict: imaps refuse handshakes for names no certificate covers".to_string(),
    ] {
        assert!(
            stdout.contains(&expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(stderr.contains("CERTIFICATE EXPIRED"), "{stderr}");
}

#[test]
fn check_and_run_refuse_a_broken_pair_naming_the_file_and_the_reason() {
    let dir = TempDir::new("refuse");
    let pair = PairPaths::mismatched_in(dir.path(), "mail", &TestCa::new());
    let config = imaps_only().certificate(&pair).write_in(dir.path());
    let expected = format!(
        "{}: the private key does not belong to the certificate in {}",
        pair.key.display(),
        pair.cert.display()
    );
    for command in ["check", "run"] {
        let (ok, stdout, stderr) = run_binary(&[command], Some(&config));
        assert!(!ok, "{command} must fail: {stdout}{stderr}");
        assert!(stderr.contains(&expected), "{command}: {stderr}");
    }
    std::fs::write(&pair.cert, "").expect("write");
    let (ok, _, stderr) = run_binary(&["check"], Some(&config));
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{}: no PEM certificate found",
            pair.cert.display()
        )),
        "{stderr}"
    );
}

#[test]
fn check_without_certificates_describes_the_generated_default() {
    let dir = TempDir::new("check-default");
    let config = imaps_only().hostname("mx.example.net").write_in(dir.path());
    let (ok, stdout, stderr) = run_binary(&["check"], Some(&config));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("certificate: none configured; a self-signed one for \"mx.example.net\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("  names: mx.example.net, localhost"),
        "{stdout}"
    );
    assert!(stderr.contains("clients will not trust"), "{stderr}");
}

#[test]
fn cert_self_signed_writes_a_pair_the_proxy_loads() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("self-signed");
    let out = dir.join("dev");
    let (ok, stdout, stderr) = run_binary(
        &[
            "cert",
            "self-signed",
            "--name",
            "mail.example.test",
            "--name",
            "*.example.test",
            "--out",
            out.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("fullchain.pem"), "{stdout}");
    let files = mail_tls_proxy::config::CertificateFiles {
        cert: out.join("fullchain.pem"),
        key: out.join("privkey.pem"),
    };
    let mode = std::fs::metadata(&files.key)
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is private");
    let reloader = mail_tls_proxy::tls::Reloader::load(&[files], "unused").expect("loads");
    assert_eq!(
        reloader.certificates()[0].names,
        vec!["mail.example.test", "*.example.test"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_right_after_start_up_never_ends_the_process() {
    let dir = TempDir::new("early-hup");
    // No [[certificate]]: the generated default, nothing to reload.
    let config = imaps_only().hostname("localhost").write_in(dir.path());
    let mut proxy = ProxyProcess::spawn(&config);
    // The handler is in place before the first listener is announced.
    proxy.wait_for_log(&["listening", "listener=imaps"]).await;
    proxy.signal("HUP");
    proxy
        .wait_for_log(&["configuration reloaded", "unchanged=imaps"])
        .await;
    assert!(proxy.is_running(), "the proxy is still running");
}
