//! Whole-configuration reload on SIGHUP, with the real binary, under load.
//!
//! While one client per listener kind (SMTP, IMAP, POP3; implicit TLS and
//! STARTTLS) opens sessions back to back, the configuration is rewritten and
//! reloaded 20 times: a listener is added, then removed again, one
//! listener's backend is changed and changed back, and one rewrite is
//! broken. Checked exactly:
//! - not one connection on the unchanged listeners fails or is refused;
//! - sessions opened before the first reload keep working to the end;
//! - each change shows in the next new session: an added listener serves,
//!   a removed one refuses connections and says goodbye to its session still
//!   in inspection (sessions in pass-through get `shutdown_grace`: see the
//!   second test), a changed backend greets from then on;
//! - the broken file is refused (counted as an error) and the previous
//!   configuration goes on serving, unchanged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::support::certs::*;
use crate::support::*;

const RELOADS: usize = 20;
/// The reload (counted from 0) whose file is broken.
const BROKEN_RELOAD: usize = 10;
const RELOADS_OK: &str = "mail_tls_proxy_config_reloads_total{result=\"ok\"}";
const RELOADS_ERROR: &str = "mail_tls_proxy_config_reloads_total{result=\"error\"}";

/// The greeting of the second IMAP backend, which the `changing`
/// listener is pointed at and back.
const OTHER_GREETING: &[u8] = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] the other backend\r\n";
const FIRST_GREETING: &[u8] = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake ready\r\n";

/// What a load client saw.
#[derive(Default)]
struct Tally {
    sessions: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_add_remove_and_change_listeners_without_failing_a_connection() {
    let dir = TempDir::new("config-reload");
    let ca = TestCa::new();
    let connector = ca.connector();
    let pair = PairPaths::in_dir(dir.path(), "mail");
    pair.write_in_place(&ca.issue(&["localhost"]));
    let backends = Backends::start().await;
    let other_imap = FakeBackend::start(Script {
        greeting: OTHER_GREETING.to_vec(),
        ..Script::imap()
    })
    .await;
    let config = |changing_backend: SocketAddr, extra: Option<&str>| {
        let mut config = TestConfig::new()
            .certificate(&pair)
            .certificate_poll_interval(3600)
            .readiness_interval(3600)
            .shutdown_grace(5)
            .metrics()
            .listeners(backends.listeners(&ALL_KINDS))
            .listener(listener("changing", "imap", "implicit", changing_backend));
        if let Some(name) = extra {
            config = config.listener(listener(name, "pop3", "starttls", backends.pop3.address));
        }
        config
    };
    let path = config(backends.imap.address, None).write_in(dir.path());
    let proxy = ProxyProcess::spawn(&path);
    let metrics = proxy.address(&["serving /metrics"]).await;
    let mut addresses = Vec::new();
    for kind in ALL_KINDS {
        let address = proxy
            .address(&["listening", &format!("listener={} ", kind.name)])
            .await;
        addresses.push((kind, address));
    }
    let changing = proxy.address(&["listening", "listener=changing "]).await;
    assert_eq!(greeting_at(changing, &connector).await, FIRST_GREETING);

    // Sessions that must outlive every reload.
    let mut established = Vec::new();
    for (kind, address) in &addresses {
        let mut session = open_session(address, *kind, &connector, "localhost")
            .await
            .unwrap_or_else(|error| panic!("{}: {error}", kind.name));
        session.ping().await.expect("works");
        established.push(session);
    }

    // Load: one client per unchanged listener, sessions back to back.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for (kind, address) in addresses.clone() {
        let (connector, stop, tally) = (connector.clone(), stop.clone(), tally.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let outcome = match open_session(&address, kind, &connector, "localhost").await {
                    Ok(mut session) => session.ping().await,
                    Err(error) => Err(error),
                };
                match outcome {
                    Ok(()) => {
                        tally.sessions.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(error) => tally
                        .failures
                        .lock()
                        .expect("lock")
                        .push(format!("{}: {error}", kind.name)),
                }
            }
        }));
    }

    let mut ok_reloads = 0.0;
    let mut changing_backend = backends.imap.address;
    let mut extra: Option<(String, SocketAddr, tokio::net::TcpStream)> = None;
    for round in 0..RELOADS {
        if round == BROKEN_RELOAD {
            // A valid file but for one value.
            let broken = config(changing_backend, None).to_toml().replacen(
                "listen = \"127.0.0.1:0\"",
                "listen = \"nowhere\"",
                1,
            );
            std::fs::write(&path, broken).expect("write a broken configuration");
            proxy.signal("HUP");
            wait_for_metric(metrics, RELOADS_ERROR, 1.0).await;
            proxy
                .wait_for_log(&["configuration reload refused", "listen", "nowhere"])
                .await;
            // Still the previous configuration, unchanged.
            let expected = if changing_backend == other_imap.address {
                OTHER_GREETING
            } else {
                FIRST_GREETING
            };
            assert_eq!(greeting_at(changing, &connector).await, expected);
            continue;
        }
        // Rounds cycle: add a listener, change a backend, remove the
        // listener, change the backend back.
        let step = round % 4;
        let extra_name = match step {
            0 => Some(format!("extra-{round:02}")),
            1 => extra.as_ref().map(|(name, _, _)| name.clone()),
            _ => None,
        };
        if step == 1 || step == 3 {
            changing_backend = if changing_backend == backends.imap.address {
                other_imap.address
            } else {
                backends.imap.address
            };
        }
        config(changing_backend, extra_name.as_deref()).write_in(dir.path());
        proxy.signal("HUP");
        ok_reloads += 1.0;
        wait_for_metric(metrics, RELOADS_OK, ok_reloads).await;

        match step {
            0 => {
                let name = extra_name.expect("named");
                let address = proxy
                    .address(&["listening", &format!("listener={name} ")])
                    .await;
                let mut session = open_session(
                    &address,
                    Kind::named("pop3-starttls"),
                    &connector,
                    "localhost",
                )
                .await
                .unwrap_or_else(|error| panic!("{name}: {error}"));
                session.ping().await.expect("the added listener serves");
                // A client that has only been greeted: still in inspection.
                let mut waiting = tokio::net::TcpStream::connect(address)
                    .await
                    .expect("connect");
                assert_eq!(
                    text(&read_until(&mut waiting, b"\r\n").await),
                    "+OK fake POP3 ready\r\n"
                );
                extra = Some((name, address, waiting));
            }
            2 => {
                let (name, address, mut waiting) = extra.take().expect("added before");
                // Still in inspection: the protocol's goodbye, then the close.
                assert_eq!(
                    text(&read_to_close(&mut waiting).await),
                    "-ERR [SYS/TEMP] Server shutting down\r\n",
                    "{name}"
                );
                poll_until(
                    async || match tokio::net::TcpStream::connect(address).await {
                        Err(_) => Ok(()),
                        Ok(_) => Err(format!("{name} at {address} still accepts")),
                    },
                )
                .await;
                // Its gauges no longer claim a state: no alert fires on them.
                let scrape = Scrape::fetch(metrics).await;
                let series = format!("mail_tls_proxy_backend_up{{listener=\"{name}\"}}");
                assert!(scrape.value(&series).is_nan(), "{series}");
            }
            _ => {
                let expected = if changing_backend == other_imap.address {
                    OTHER_GREETING
                } else {
                    FIRST_GREETING
                };
                assert_eq!(greeting_at(changing, &connector).await, expected);
            }
        }
    }

    stop.store(true, Ordering::Release);
    for client in clients {
        client.await.expect("client task");
    }
    let failures = tally.failures.lock().expect("lock").clone();
    assert!(failures.is_empty(), "failed sessions: {failures:#?}");
    let sessions = tally.sessions.load(Ordering::Acquire);
    assert!(
        sessions >= ALL_KINDS.len() * RELOADS,
        "only {sessions} sessions during {RELOADS} reloads"
    );
    for session in &mut established {
        session
            .ping()
            .await
            .unwrap_or_else(|error| panic!("established before the reloads: {error}"));
    }
    assert_eq!(metric(metrics, RELOADS_OK).await, (RELOADS - 1) as f64);
    assert_eq!(metric(metrics, RELOADS_ERROR).await, 1.0);
}

/// The greeting a fresh implicit-TLS IMAP session at `address` gets.
async fn greeting_at(address: SocketAddr, connector: &tokio_rustls::TlsConnector) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    read_until(&mut tls, b"\r\n").await
}

/// A listener removed by a reload stops accepting, but its sessions in
/// pass-through go on for `shutdown_grace` and are closed after it.
#[tokio::test]
async fn a_removed_listeners_sessions_go_on_for_the_grace_period_then_close() {
    let dir = TempDir::new("config-reload-drain");
    let ca = TestCa::new();
    let connector = ca.connector();
    let pair = PairPaths::in_dir(dir.path(), "mail");
    pair.write_in_place(&ca.issue(&["localhost"]));
    let backends = Backends::start().await;
    let config = |with_removed: bool| {
        let kinds: &[Kind] = if with_removed {
            &[Kind::named("imaps"), Kind::named("pop3s")]
        } else {
            &[Kind::named("imaps")]
        };
        TestConfig::new()
            .certificate(&pair)
            .shutdown_grace(2)
            .metrics()
            .listeners(backends.listeners(kinds))
    };
    let path = config(true).write_in(dir.path());
    let proxy = ProxyProcess::spawn(&path);
    let metrics = proxy.address(&["serving /metrics"]).await;
    let pop3s = proxy.address(&["listening", "listener=pop3s "]).await;
    // Implicit TLS POP3 is handed to pass-through at once.
    let mut session = open_session(&pop3s, Kind::named("pop3s"), &connector, "localhost")
        .await
        .expect("session");
    session.ping().await.expect("works");

    config(false).write_in(dir.path());
    proxy.signal("HUP");
    wait_for_metric(metrics, RELOADS_OK, 1.0).await;
    let removed_at = tokio::time::Instant::now();
    proxy
        .wait_for_log(&["configuration reloaded", "removed=pop3s"])
        .await;
    assert!(
        tokio::net::TcpStream::connect(pop3s).await.is_err(),
        "the removed listener still accepts"
    );
    session.ping().await.expect("goes on after the reload");
    assert_eq!(text(&read_to_close(&mut session.stream).await), "");
    let closed_after = removed_at.elapsed();
    assert!(
        closed_after >= std::time::Duration::from_millis(1500)
            && closed_after < std::time::Duration::from_secs(5),
        "closed {closed_after:?} after the reload, grace is 2 s"
    );
}

/// With `reload_on_change = true` a change of the file's content reloads it
/// without a signal; a refused file is not tried again until it changes.
/// Without it, only SIGHUP reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_on_change_follows_the_file_without_a_signal() {
    let dir = TempDir::new("config-reload-on-change");
    let ca = TestCa::new();
    let connector = ca.connector();
    let pair = PairPaths::in_dir(dir.path(), "mail");
    pair.write_in_place(&ca.issue(&["localhost"]));
    let first = FakeBackend::start(Script::imap()).await;
    let other = FakeBackend::start(Script {
        greeting: OTHER_GREETING.to_vec(),
        ..Script::imap()
    })
    .await;
    let config = |backend: SocketAddr, on_change: bool| {
        TestConfig::new()
            .certificate(&pair)
            .reload_on_change(on_change)
            .metrics()
            .listener(listener("follows", "imap", "implicit", backend))
    };
    let path = config(first.address, false).write_in(dir.path());
    let proxy = ProxyProcess::spawn(&path);
    let metrics = proxy.address(&["serving /metrics"]).await;
    let address = proxy.address(&["listening", "listener=follows "]).await;
    assert_eq!(greeting_at(address, &connector).await, FIRST_GREETING);

    // Off: a changed file waits for SIGHUP.
    config(other.address, true).write_in(dir.path());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(metric(metrics, RELOADS_OK).await, 0.0);
    assert_eq!(greeting_at(address, &connector).await, FIRST_GREETING);
    proxy.signal("HUP");
    wait_for_metric(metrics, RELOADS_OK, 1.0).await;
    assert_eq!(greeting_at(address, &connector).await, OTHER_GREETING);

    // On: the next change reloads by itself.
    config(first.address, true).write_in(dir.path());
    wait_for_metric(metrics, RELOADS_OK, 2.0).await;
    proxy
        .wait_for_log(&["configuration file changed: reloading the configuration"])
        .await;
    assert_eq!(greeting_at(address, &connector).await, FIRST_GREETING);

    // A broken file is refused once, not every poll.
    std::fs::write(&path, "hostname = \n").expect("write a broken file");
    wait_for_metric(metrics, RELOADS_ERROR, 1.0).await;
    tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
    assert_eq!(metric(metrics, RELOADS_ERROR).await, 1.0);
    assert_eq!(greeting_at(address, &connector).await, FIRST_GREETING);

    // Fixed: applied.
    config(other.address, true).write_in(dir.path());
    wait_for_metric(metrics, RELOADS_OK, 3.0).await;
    assert_eq!(greeting_at(address, &connector).await, OTHER_GREETING);
}

/// The certificate series follow what is served: a refused reload adds no
/// series for the certificates it only read, and a certificate an applied
/// reload removed has its expiry turned NaN (no expiry alert on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_series_follow_the_certificates_served() {
    let dir = TempDir::new("config-reload-certificates");
    let ca = TestCa::new();
    let (main, other, third) = (
        PairPaths::in_dir(dir.path(), "main"),
        PairPaths::in_dir(dir.path(), "other"),
        PairPaths::in_dir(dir.path(), "third"),
    );
    main.write_in_place(&ca.issue(&["localhost"]));
    other.write_in_place(&ca.issue(&["other.example"]));
    third.write_in_place(&ca.issue(&["third.example"]));
    let backends = Backends::start().await;
    let config = |pairs: &[&PairPaths]| {
        TestConfig::new()
            .certificates(pairs.iter().copied())
            .metrics()
            .listeners(backends.listeners(&[Kind::named("imaps")]))
    };
    let path = config(&[&main, &other]).write_in(dir.path());
    let proxy = ProxyProcess::spawn(&path);
    let metrics = proxy.address(&["serving /metrics"]).await;
    let expiry = |name: &str| {
        format!("mail_tls_proxy_certificate_expiry_timestamp_seconds{{certificate=\"{name}\"}}")
    };
    let scrape = Scrape::fetch(metrics).await;
    assert!(scrape.value(&expiry("localhost")) > 0.0);
    assert!(scrape.value(&expiry("other.example")) > 0.0);

    // Refused after the certificates were read (the new address is taken):
    // nothing of it shows.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_address = taken.local_addr().expect("address");
    // The listener's address (the last `listen`; the first is the metrics
    // endpoint's).
    let mut refused = config(&[&main, &other, &third]).to_toml();
    let at = refused
        .rfind("listen = \"127.0.0.1:0\"")
        .expect("a listener");
    refused.replace_range(
        at..at + "listen = \"127.0.0.1:0\"".len(),
        &format!("listen = \"{taken_address}\""),
    );
    std::fs::write(&path, refused).expect("write");
    proxy.signal("HUP");
    wait_for_metric(metrics, RELOADS_ERROR, 1.0).await;
    assert!(!Scrape::fetch(metrics)
        .await
        .contains("certificate=\"third.example\""));

    // Applied without `other`: its expiry is no longer a date.
    config(&[&main]).write_in(dir.path());
    proxy.signal("HUP");
    wait_for_metric(metrics, RELOADS_OK, 1.0).await;
    let scrape = Scrape::fetch(metrics).await;
    assert!(scrape.value(&expiry("other.example")).is_nan());
    assert!(scrape.value(&expiry("localhost")) > 0.0);
}
