//! Rotation under load: while clients complete handshakes continuously on
//! all six listener kinds (SMTP, IMAP, POP3; implicit TLS and STARTTLS), the
//! certificate is rotated 50 times, alternately overwritten in place (key,
//! then certificate, non-atomically) and renamed over. Checked exactly:
//! - every handshake succeeds and verifies against the test root, and
//!   serves one of the issued certificates;
//! - each client never sees an older certificate after a newer one, and no
//!   handshake that starts after a rotation was confirmed gets an older one;
//! - after each rotation a fresh handshake sees the new certificate within
//!   2 seconds;
//! - sessions opened before the first rotation keep working throughout and
//!   keep the certificate they were made with;
//! - the proxy counts exactly one successful reload per rotation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::certs::*;
use crate::support::*;
use tokio::time::Instant;

const ROTATIONS: usize = 50;
const SESSIONS_PER_KIND: usize = 2;

/// One handshake a load client made: when it started, which certificate.
struct Seen {
    started: Instant,
    index: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_rotations_under_continuous_handshakes_on_all_listener_kinds() {
    let dir = TempDir::new("rotation-load");
    let ca = TestCa::new();
    let connector = ca.connector();
    // Every certificate, issued up front: index 0 is served at start.
    let issued: Arc<Vec<Issued>> =
        Arc::new((0..=ROTATIONS).map(|_| ca.issue(&["localhost"])).collect());
    let pair = PairPaths::in_dir(dir.path(), "mail");
    pair.write_in_place(&issued[0]);
    let backends = Backends::start().await;
    let config = TestConfig::new()
        .certificate_poll_interval(3600)
        .certificate(&pair)
        .listeners(backends.listeners(&ALL_KINDS));
    let proxy = Arc::new(TestProxy::start_in(dir.path(), &config).await);
    let index_of = {
        let issued = issued.clone();
        move |leaf: &rustls::pki_types::CertificateDer<'static>| {
            issued
                .iter()
                .position(|candidate| &candidate.leaf == leaf)
                .expect("the proxy served a certificate that was never issued")
        }
    };

    // Sessions that must outlive every rotation.
    let mut sessions = Vec::new();
    for kind in ALL_KINDS {
        for _ in 0..SESSIONS_PER_KIND {
            let mut session = open_session(&proxy, kind, &connector, "localhost")
                .await
                .unwrap_or_else(|error| panic!("{}: {error}", kind.name));
            assert_eq!(index_of(&session.leaf), 0);
            session.ping().await.expect("works");
            sessions.push(session);
        }
    }

    // `confirmed[i]`: when a fresh handshake first got certificate i.
    let confirmed: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(vec![Instant::now()]));

    // Load: one client per listener kind, handshaking back to back.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for kind in ALL_KINDS {
        let (proxy, connector, stop, index_of) = (
            proxy.clone(),
            connector.clone(),
            stop.clone(),
            index_of.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut seen: Vec<Seen> = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let started = Instant::now();
                let mut session = open_session(&proxy, kind, &connector, "localhost")
                    .await
                    .unwrap_or_else(|error| {
                        panic!(
                            "{}: handshake {} failed: {error}",
                            kind.name,
                            seen.len() + 1
                        )
                    });
                session
                    .ping()
                    .await
                    .unwrap_or_else(|error| panic!("{}: {error}", kind.name));
                let index = index_of(&session.leaf);
                if let Some(last) = seen.last() {
                    assert!(
                        index >= last.index,
                        "{}: certificate {index} served after {}",
                        kind.name,
                        last.index
                    );
                }
                seen.push(Seen { started, index });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (kind, seen)
        }));
    }

    // Rotations.
    let mut latencies = Vec::with_capacity(ROTATIONS);
    let test_started = Instant::now();
    for rotation in 1..=ROTATIONS {
        let next = &issued[rotation];
        if rotation % 2 == 1 {
            pair.write_in_place(next);
        } else {
            pair.write_by_rename(next);
        }
        let probe = ALL_KINDS[rotation % ALL_KINDS.len()];
        let latency = wait_until_served(&proxy, &[probe], &connector, &next.leaf, WITHIN).await;
        confirmed.lock().expect("lock").push(Instant::now());
        latencies.push(latency);
        if rotation % 10 == 0 {
            for session in &mut sessions {
                session.ping().await.unwrap_or_else(|error| {
                    panic!("{} after {rotation} rotations: {error}", session.kind.name)
                });
            }
        }
    }
    stop.store(true, Ordering::Release);

    let confirmed = confirmed.lock().expect("lock").clone();
    let mut handshakes = 0;
    let mut per_kind = Vec::new();
    for client in clients {
        let (kind, seen) = client.await.expect("a load client failed");
        // A handshake that started after rotation i was confirmed cannot
        // have been given anything older.
        for handshake in &seen {
            let newest_confirmed = confirmed
                .iter()
                .rposition(|at| *at <= handshake.started)
                .expect("started after the start");
            assert!(
                handshake.index >= newest_confirmed,
                "{}: got certificate {} after certificate {newest_confirmed} was confirmed",
                kind.name,
                handshake.index
            );
        }
        let distinct = {
            let mut indexes: Vec<usize> = seen.iter().map(|s| s.index).collect();
            indexes.dedup();
            indexes.len()
        };
        assert!(
            distinct > 1,
            "{}: handshakes did not span rotations",
            kind.name
        );
        handshakes += seen.len();
        per_kind.push(format!("{}={}", kind.name, seen.len()));
    }
    for session in &mut sessions {
        session
            .ping()
            .await
            .unwrap_or_else(|error| panic!("{} at the end: {error}", session.kind.name));
        assert_eq!(
            index_of(&session.leaf),
            0,
            "a session keeps its certificate"
        );
    }
    // After the last rotation, every listener kind serves the last one.
    wait_until_served(
        &proxy,
        &ALL_KINDS,
        &connector,
        &issued[ROTATIONS].leaf,
        WITHIN,
    )
    .await;
    assert_eq!(proxy.reloads.ok(), ROTATIONS as u64);

    let slowest = latencies.iter().max().expect("rotations");
    let average = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    println!(
        "rotation under load: {ROTATIONS} rotations in {:.1?}; {handshakes} load handshakes, all ok ({}); \
         {} sessions opened before the first rotation kept working ({} pings each); \
         new certificate seen after {average:.0?} on average, {slowest:.0?} at most; \
         reloads ok={} error={} (failed reloads are half-written states, refused)",
        test_started.elapsed(),
        per_kind.join(" "),
        sessions.len(),
        ROTATIONS / 10 + 2,
        proxy.reloads.ok(),
        proxy.reloads.errors(),
    );
    assert!(handshakes >= ROTATIONS, "too little load: {handshakes}");
    assert!(*slowest < WITHIN);
}
