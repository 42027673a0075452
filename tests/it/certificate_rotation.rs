//! Certificate rotation without restart, each case through real handshakes:
//! in-place overwrite, atomic rename, a Kubernetes `..data` symlink swap,
//! non-atomic key-then-certificate writes, a broken replacement, several
//! certificates at once, and sessions that outlive a rotation.
//!
//! The proxies here poll only once an hour, so every reload seen is the
//! directory watch at work.

use std::time::Duration;

use crate::support::certs::*;
use crate::support::*;

/// A proxy serving `paths` on all six listener kinds.
async fn proxy_for(dir: &TempDir, paths: &[&PairPaths]) -> (TestProxy, Backends) {
    let backends = Backends::start().await;
    let config = TestConfig::new()
        .certificate_poll_interval(3600)
        .certificates(paths.iter().copied())
        .listeners(backends.listeners(&ALL_KINDS));
    (TestProxy::start_in(dir.path(), &config).await, backends)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_overwrite_is_served_to_new_handshakes() {
    let dir = TempDir::new("in-place");
    let ca = TestCa::new();
    let connector = ca.connector();
    let pair = PairPaths::in_dir(dir.path(), "mail");
    let first = ca.issue(&["localhost"]);
    pair.write_in_place(&first);
    let (proxy, _backends) = proxy_for(&dir, &[&pair]).await;
    wait_until_served(&proxy, &ALL_KINDS, &connector, &first.leaf, WITHIN).await;

    for _ in 0..3 {
        let next = ca.issue(&["localhost"]);
        pair.write_in_place(&next);
        wait_until_served(&proxy, &ALL_KINDS, &connector, &next.leaf, WITHIN).await;
    }
    assert_eq!(proxy.reloads.ok(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atomic_rename_over_the_files_is_served_to_new_handshakes() {
    let dir = TempDir::new("rename");
    let ca = TestCa::new();
    let connector = ca.connector();
    let pair = PairPaths::in_dir(dir.path(), "mail");
    pair.write_in_place(&ca.issue(&["localhost"]));
    let (proxy, _backends) = proxy_for(&dir, &[&pair]).await;

    for _ in 0..3 {
        let next = ca.issue(&["localhost"]);
        pair.write_by_rename(&next);
        wait_until_served(&proxy, &ALL_KINDS, &connector, &next.leaf, WITHIN).await;
    }
    assert_eq!(proxy.reloads.ok(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_secret_volume_update_is_served_to_new_handshakes() {
    let dir = TempDir::new("secret-volume");
    let ca = TestCa::new();
    let connector = ca.connector();
    let first = ca.issue(&["localhost"]);
    let mut volume = SecretVolume::create(dir.path(), &first);
    let paths = volume.paths();
    let (proxy, _backends) = proxy_for(&dir, &[&paths]).await;
    wait_until_served(&proxy, &ALL_KINDS, &connector, &first.leaf, WITHIN).await;

    for _ in 0..3 {
        let next = ca.issue(&["localhost"]);
        volume.update(&next);
        // Only `..data` changed in the watched folder; the files the config
        // names are the same symlinks as before.
        wait_until_served(&proxy, &ALL_KINDS, &connector, &next.leaf, WITHIN).await;
    }
    assert_eq!(proxy.reloads.ok(), 3);
    assert_eq!(proxy.reloads.errors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_written_before_its_certificate_never_serves_a_mismatch() {
    let dir = TempDir::new("key-first");
    let ca = TestCa::new();
    let connector = ca.connector();
    let pair = PairPaths::in_dir(dir.path(), "mail");
    let mut old = ca.issue(&["localhost"]);
    pair.write_in_place(&old);
    let (proxy, _backends) = proxy_for(&dir, &[&pair]).await;

    for round in 1..=2 {
        let new = ca.issue(&["localhost"]);
        // The key alone: new key + old certificate is a mismatch. The proxy
        // notices (a failed reload) and keeps serving the old pair.
        std::fs::write(&pair.key, &new.key_pem).expect("write key");
        proxy.wait_for_reload_errors(round).await;
        for kind in ALL_KINDS {
            let leaf = served_leaf(&proxy, kind, &connector, "localhost")
                .await
                .unwrap_or_else(|error| panic!("{}: {error}", kind.name));
            assert_eq!(
                leaf, old.leaf,
                "{}: the old pair is still served",
                kind.name
            );
        }
        // Then the certificate: both in place, the new pair is served.
        std::fs::write(&pair.cert, &new.fullchain_pem).expect("write cert");
        wait_until_served(&proxy, &ALL_KINDS, &connector, &new.leaf, WITHIN).await;
        // One good pair per round; a failed reload at least per round (more
        // if the proxy happened to read a file mid-write, also refused).
        assert_eq!(proxy.reloads.ok(), round);
        assert!(proxy.reloads.errors() >= round);
        old = new;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_replacement_keeps_the_old_certificate_until_a_good_one_arrives() {
    let dir = TempDir::new("broken");
    let ca = TestCa::new();
    let connector = ca.connector();
    let pair = PairPaths::in_dir(dir.path(), "mail");
    let old = ca.issue(&["localhost"]);
    pair.write_in_place(&old);
    let (proxy, _backends) = proxy_for(&dir, &[&pair]).await;
    let next = ca.issue(&["localhost"]);

    type Breakage<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let breakages: [Breakage; 4] = [
        (
            "a truncated certificate",
            Box::new(|| {
                let half = &next.fullchain_pem[..next.fullchain_pem.len() / 2];
                std::fs::write(&pair.cert, half).expect("write");
            }),
        ),
        (
            "an empty certificate",
            Box::new(|| std::fs::write(&pair.cert, "").expect("write")),
        ),
        (
            "a garbage key",
            Box::new(|| {
                std::fs::write(&pair.cert, &old.fullchain_pem).expect("write");
                std::fs::write(
                    &pair.key,
                    "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                )
                .expect("write");
            }),
        ),
        (
            "a certificate whose key is elsewhere",
            Box::new(|| {
                std::fs::write(&pair.key, &old.key_pem).expect("write");
                std::fs::write(&pair.cert, &next.fullchain_pem).expect("write");
            }),
        ),
    ];
    for (round, (what, breakage)) in breakages.iter().enumerate() {
        breakage();
        proxy.wait_for_reload_errors(round as u64 + 1).await;
        for kind in ALL_KINDS {
            let leaf = served_leaf(&proxy, kind, &connector, "localhost")
                .await
                .unwrap_or_else(|error| panic!("{what}: {}: {error}", kind.name));
            assert_eq!(
                leaf, old.leaf,
                "{what}: {} still gets the old pair",
                kind.name
            );
        }
    }
    assert_eq!(proxy.reloads.ok(), 0);
    // The fix: the next change is tried again and served.
    std::fs::write(&pair.key, &next.key_pem).expect("write");
    wait_until_served(&proxy, &ALL_KINDS, &connector, &next.leaf, WITHIN).await;
    assert_eq!(proxy.reloads.ok(), 1);
    assert!(proxy.reloads.errors() >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_certificates_rotate_independently_and_keep_their_names() {
    let dir = TempDir::new("several");
    let ca = TestCa::new();
    let connector = ca.connector();
    let (a, b) = (
        PairPaths::in_dir(dir.path(), "a"),
        PairPaths::in_dir(dir.path(), "b"),
    );
    let a_first = ca.issue(&["localhost"]);
    let b_first = ca.issue(&["mail.example.com"]);
    a.write_in_place(&a_first);
    b.write_in_place(&b_first);
    let (proxy, _backends) = proxy_for(&dir, &[&a, &b]).await;
    let imaps = Kind::named("imaps");

    let b_next = ca.issue(&["mail.example.com"]);
    b.write_by_rename(&b_next);
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let leaf = served_leaf(&proxy, imaps, &connector, "mail.example.com")
            .await
            .expect("handshake");
        if leaf == b_next.leaf {
            break;
        }
        assert_eq!(leaf, b_first.leaf);
        assert!(tokio::time::Instant::now() < deadline, "not served in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The other certificate is untouched.
    assert_eq!(
        served_leaf(&proxy, imaps, &connector, "localhost")
            .await
            .expect("handshake"),
        a_first.leaf
    );
    // A broken `a` does not hold back a good `b`.
    let b_third = ca.issue(&["mail.example.com"]);
    std::fs::write(&a.cert, "garbage").expect("write");
    b.write_by_rename(&b_third);
    let deadline = tokio::time::Instant::now() + WITHIN;
    while served_leaf(&proxy, imaps, &connector, "mail.example.com")
        .await
        .expect("handshake")
        != b_third.leaf
    {
        assert!(tokio::time::Instant::now() < deadline, "not served in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        served_leaf(&proxy, imaps, &connector, "localhost")
            .await
            .expect("handshake"),
        a_first.leaf
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_established_before_a_rotation_keep_working() {
    let dir = TempDir::new("sessions");
    let ca = TestCa::new();
    let connector = ca.connector();
    let pair = PairPaths::in_dir(dir.path(), "mail");
    let old = ca.issue(&["localhost"]);
    pair.write_in_place(&old);
    let (proxy, _backends) = proxy_for(&dir, &[&pair]).await;

    let mut sessions = Vec::new();
    for kind in ALL_KINDS {
        let mut session = open_session(&proxy, kind, &connector, "localhost")
            .await
            .expect("session");
        session.ping().await.expect("works before");
        sessions.push(session);
    }
    let new = ca.issue(&["localhost"]);
    pair.write_by_rename(&new);
    wait_until_served(&proxy, &ALL_KINDS, &connector, &new.leaf, WITHIN).await;
    for session in &mut sessions {
        assert_eq!(session.leaf, old.leaf);
        session
            .ping()
            .await
            .unwrap_or_else(|error| panic!("{}: {error}", session.kind.name));
    }
}
