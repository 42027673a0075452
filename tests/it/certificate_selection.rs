//! Which certificate a handshake gets, through real handshakes: SNI
//! selection over several `[[certificate]]`, strict SNI, full chains, every
//! key algorithm and format, expired certificates, and the generated default.

use crate::support::certs::*;
use crate::support::*;
use rustls::pki_types::CertificateDer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_that_names_the_host_on_every_listener_kind() {
    let dir = TempDir::new("sni");
    let ca = TestCa::new();
    let default = ca.issue(&["localhost", "default.example"]);
    let wildcard = ca.issue(&["*.example.com"]);
    let exact = ca.issue(&["mail.example.com", "MX.Example.Org"]);
    let pairs: Vec<PairPaths> = [
        ("default", &default),
        ("wildcard", &wildcard),
        ("exact", &exact),
    ]
    .iter()
    .map(|(stem, issued)| {
        let paths = PairPaths::in_dir(dir.path(), stem);
        paths.write_in_place(issued);
        paths
    })
    .collect();
    let backends = Backends::start().await;
    let config = TestConfig::new()
        .certificates(&pairs)
        .listeners(backends.listeners(&ALL_KINDS));
    let proxy = TestProxy::start_in(dir.path(), &config).await;
    let connector = accept_any_connector();

    let cases: [(&str, &CertificateDer<'static>); 8] = [
        ("localhost", &default.leaf),
        ("default.example", &default.leaf),
        ("imap.example.com", &wildcard.leaf),
        ("IMAP.EXAMPLE.COM", &wildcard.leaf),
        // The exact name wins over the wildcard listed before it.
        ("mail.example.com", &exact.leaf),
        ("mx.example.org", &exact.leaf),
        // A wildcard covers one label only; unknown names get the first entry.
        ("a.b.example.com", &default.leaf),
        ("unknown.test", &default.leaf),
    ];
    let mut handshakes = 0;
    for kind in ALL_KINDS {
        for (sni, expected) in cases {
            let leaf = served_leaf(&proxy, kind, &connector, sni)
                .await
                .unwrap_or_else(|error| panic!("{} {sni}: {error}", kind.name));
            assert_eq!(&leaf, expected, "{} with SNI {sni}", kind.name);
            handshakes += 1;
        }
        // No SNI at all (an IP address is never sent as SNI): the first entry.
        let leaf = served_leaf(&proxy, kind, &connector, "127.0.0.1")
            .await
            .expect("handshake without SNI");
        assert_eq!(leaf, default.leaf, "{} without SNI", kind.name);
        handshakes += 1;
    }
    assert_eq!(handshakes, 6 * 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_listener_refuses_unknown_names_with_unrecognized_name() {
    let dir = TempDir::new("strict");
    let ca = TestCa::new();
    let default = ca.issue(&["localhost"]);
    let wildcard = ca.issue(&["*.example.com"]);
    let (a, b) = (
        PairPaths::in_dir(dir.path(), "a"),
        PairPaths::in_dir(dir.path(), "b"),
    );
    a.write_in_place(&default);
    b.write_in_place(&wildcard);
    let backends = Backends::start().await;
    let strict_kinds = [
        Kind::named("imaps"),
        Kind::named("smtp-starttls"),
        Kind::named("pop3-starttls"),
    ];
    let lenient_kinds = [Kind::named("smtps")];
    let config = TestConfig::new()
        .certificates([&a, &b])
        .listeners(
            backends
                .listeners(&strict_kinds)
                .into_iter()
                .map(|listener| listener.sni_strict(true)),
        )
        .listeners(backends.listeners(&lenient_kinds));
    let proxy = TestProxy::start_in(dir.path(), &config).await;
    let connector = accept_any_connector();

    for kind in strict_kinds {
        let error = match served_leaf(&proxy, kind, &connector, "unknown.test").await {
            Ok(_) => panic!("{}: an unknown name was served", kind.name),
            Err(error) => error,
        };
        assert!(
            error.contains("UnrecognisedName"),
            "{}: expected the unrecognized_name alert, got {error}",
            kind.name
        );
        let error = served_leaf(&proxy, kind, &connector, "a.b.example.com")
            .await
            .expect_err("two labels under a wildcard are not covered");
        assert!(error.contains("UnrecognisedName"), "{error}");
        // Names a certificate covers, and no SNI, are served as usual.
        assert_eq!(
            served_leaf(&proxy, kind, &connector, "pop.example.com")
                .await
                .expect("covered"),
            wildcard.leaf
        );
        assert_eq!(
            served_leaf(&proxy, kind, &connector, "LOCALHOST")
                .await
                .expect("covered"),
            default.leaf
        );
        assert_eq!(
            served_leaf(&proxy, kind, &connector, "127.0.0.1")
                .await
                .expect("no SNI"),
            default.leaf
        );
    }
    // The listener without sni_strict serves the default instead.
    assert_eq!(
        served_leaf(&proxy, Kind::named("smtps"), &connector, "unknown.test")
            .await
            .expect("lenient"),
        default.leaf
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_chain_is_served_and_verifies_against_the_root_alone() {
    let dir = TempDir::new("chain");
    let ca = TestCa::new();
    let issued = ca.issue(&["localhost"]);
    let pair = PairPaths::in_dir(dir.path(), "chain");
    pair.write_in_place(&issued);
    let backends = Backends::start().await;
    let config = TestConfig::new()
        .certificates([&pair])
        .listeners(backends.listeners(&[Kind::named("imaps"), Kind::named("smtp-starttls")]));
    let proxy = TestProxy::start_in(dir.path(), &config).await;
    // This client trusts only the root: the intermediate must come from
    // the proxy, in order.
    let connector = ca.connector();
    for kind in [Kind::named("imaps"), Kind::named("smtp-starttls")] {
        let mut session = open_session(&proxy, kind, &connector, "localhost")
            .await
            .expect("verified handshake");
        assert_eq!(
            session.chain,
            vec![issued.leaf.clone(), issued.intermediate.clone()]
        );
        session.ping().await.expect("session works");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_algorithm_and_format_is_served() {
    let dir = TempDir::new("formats");
    let ca = TestCa::new();
    // (SNI name, algorithm, key PEM label for the legacy format or "").
    let cases: [(&str, &'static rcgen::SignatureAlgorithm, &str); 7] = [
        ("rsa-pkcs8.test", &rcgen::PKCS_RSA_SHA256, ""),
        ("rsa-pkcs1.test", &rcgen::PKCS_RSA_SHA256, "RSA PRIVATE KEY"),
        ("p256-pkcs8.test", &rcgen::PKCS_ECDSA_P256_SHA256, ""),
        (
            "p256-sec1.test",
            &rcgen::PKCS_ECDSA_P256_SHA256,
            "EC PRIVATE KEY",
        ),
        ("p384-pkcs8.test", &rcgen::PKCS_ECDSA_P384_SHA384, ""),
        (
            "p384-sec1.test",
            &rcgen::PKCS_ECDSA_P384_SHA384,
            "EC PRIVATE KEY",
        ),
        ("ed25519-pkcs8.test", &rcgen::PKCS_ED25519, ""),
    ];
    let mut pairs = Vec::new();
    let mut leaves = Vec::new();
    for (name, algorithm, legacy) in cases {
        let issued = ca.issue_with(&[name], algorithm, None);
        let key_pem = if legacy.is_empty() {
            issued.key_pem.clone()
        } else {
            pem(legacy, &pkcs8_inner(&issued.key_der))
        };
        assert!(
            key_pem.starts_with(&format!(
                "-----BEGIN {}-----",
                if legacy.is_empty() {
                    "PRIVATE KEY"
                } else {
                    legacy
                }
            )),
            "{name}"
        );
        let paths = PairPaths::in_dir(dir.path(), name);
        std::fs::write(&paths.cert, &issued.fullchain_pem).expect("write");
        std::fs::write(&paths.key, key_pem).expect("write");
        pairs.push(paths);
        leaves.push(issued.leaf);
    }
    let backends = Backends::start().await;
    let config = TestConfig::new()
        .certificates(&pairs)
        .listeners(backends.listeners(&[Kind::named("pop3s")]));
    let proxy = TestProxy::start_in(dir.path(), &config).await;
    let connector = ca.connector();
    for ((name, _, _), leaf) in cases.iter().zip(&leaves) {
        let mut session = open_session(&proxy, Kind::named("pop3s"), &connector, name)
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(&session.leaf, leaf, "{name}");
        session.ping().await.expect("session works");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_still_served() {
    let dir = TempDir::new("expired");
    let ca = TestCa::new();
    let expired = ca.issue_with(
        &["localhost"],
        &rcgen::PKCS_ECDSA_P256_SHA256,
        Some((2020, 1, 1)),
    );
    let pair = PairPaths::in_dir(dir.path(), "expired");
    pair.write_in_place(&expired);
    let backends = Backends::start().await;
    let config = TestConfig::new()
        .certificates([&pair])
        .listeners(backends.listeners(&[Kind::named("imaps")]));
    let proxy = TestProxy::start_in(dir.path(), &config).await;
    // Served (refusing would take mail down)...
    let leaf = served_leaf(
        &proxy,
        Kind::named("imaps"),
        &accept_any_connector(),
        "localhost",
    )
    .await
    .expect("served");
    assert_eq!(leaf, expired.leaf);
    // ...and a verifying client refuses it for the right reason.
    let error = served_leaf(&proxy, Kind::named("imaps"), &ca.connector(), "localhost")
        .await
        .expect_err("a verifying client refuses an expired certificate");
    assert!(error.contains("certificate expired"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_a_self_signed_one_for_the_hostname_is_served() {
    let dir = TempDir::new("generated");
    let backends = Backends::start().await;
    let config = TestConfig::new()
        .hostname("mx.example.net")
        .listeners(backends.listeners(&[Kind::named("imaps"), Kind::named("smtp-starttls")]));
    let proxy = TestProxy::start_in(dir.path(), &config).await;
    for kind in [Kind::named("imaps"), Kind::named("smtp-starttls")] {
        let mut session = open_session(&proxy, kind, &accept_any_connector(), "mx.example.net")
            .await
            .expect("handshake");
        assert_eq!(session.chain.len(), 1);
        let (_, leaf) = x509_parser::parse_x509_certificate(&session.leaf).expect("x509");
        assert_eq!(leaf.subject(), leaf.issuer(), "self-signed");
        let san = leaf
            .subject_alternative_name()
            .expect("SAN")
            .expect("present");
        let names: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some(*dns),
                _ => None,
            })
            .collect();
        assert_eq!(names, vec!["mx.example.net", "localhost"]);
        session.ping().await.expect("session works");
    }
}
