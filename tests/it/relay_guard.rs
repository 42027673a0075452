//! The relay guard: before serving, and then every `relay_check_interval`,
//! the proxy asks each SMTP listener's backend whether it would take a
//! stranger's outside recipient (EHLO, MAIL FROM:<>, RCPT TO a random
//! `.invalid` address, RSET, QUIT; never DATA). An open backend under
//! `relay_check = "refuse"` stops the proxy from starting, or, found later,
//! turns new connections away with a 421 and `/readyz` to 503 until a check
//! finds it closed again; established sessions go on.

use crate::support::*;
use mail_tls_proxy::server::StartError;
use tokio::io::AsyncWriteExt;

const OPEN: &[u8] = b"250 2.1.5 Ok\r\n";
const CLOSED: &[u8] = b"554 5.7.1 Relay access denied\r\n";
/// The name the probe's EHLO gives.
const HOSTNAME: &str = "proxy.test";
/// What a new client gets while the guard has found the backend open.
const REFUSED: &[u8] = b"421 4.3.2 Service temporarily unavailable, try again later\r\n";

/// A backend whose answer to RCPT TO is `rcpt_reply`.
fn backend_script(rcpt_reply: &[u8]) -> Script {
    Script::new(b"220 fake.example ESMTP\r\n")
        .on(
            b"EHLO",
            b"250-fake.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
        )
        .on(b"MAIL FROM", b"250 2.1.0 Ok\r\n")
        .on(b"RCPT TO", rcpt_reply)
        .on(b"RSET", b"250 2.0.0 Ok\r\n")
        .on(b"NOOP", b"250 2.0.0 Ok\r\n")
        .on(b"DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n")
        .on(b"QUIT", b"221 2.0.0 Bye\r\n")
        .otherwise(b"502 5.5.2 Error: command not recognized\r\n")
}

/// Splits what a probe sent into lines; the RCPT line's address must be a
/// random hex local part at a random hex label under `.invalid`, and is
/// replaced by `<random>` for comparison.
fn probe_lines(received: &[u8]) -> Vec<String> {
    text(received)
        .split_inclusive("\r\n")
        .map(|line| match line.strip_prefix("RCPT TO:<") {
            Some(rest) => {
                let address = rest.strip_suffix(">\r\n").expect("RCPT line ends");
                let (local, domain) = address.split_once('@').expect("an address");
                let label = domain.strip_suffix(".invalid").expect(".invalid domain");
                assert!(
                    local.len() == 16
                        && label.len() == 12
                        && (local.to_string() + label)
                            .bytes()
                            .all(|b| b.is_ascii_hexdigit()),
                    "{line:?}"
                );
                "RCPT TO:<random>\r\n".to_string()
            }
            None => line.to_string(),
        })
        .collect()
}

const DIALOGUE: [&str; 5] = [
    "EHLO proxy.test\r\n",
    "MAIL FROM:<>\r\n",
    "RCPT TO:<random>\r\n",
    "RSET\r\n",
    "QUIT\r\n",
];

fn series(closed: u8, open: u8, unknown: u8) -> Vec<String> {
    let mut expected = vec![
        format!("result=\"closed\"}} {closed}"),
        format!("result=\"open\"}} {open}"),
        format!("result=\"unknown\"}} {unknown}"),
    ];
    expected.sort();
    expected
}

/// The three `mail_tls_proxy_relay_check` series of `listener`, as exported
/// (sorted, without the metric name and the listener label).
async fn relay_metric(proxy: &TestProxy, listener: &str) -> Vec<String> {
    proxy
        .scrape()
        .await
        .series_of("mail_tls_proxy_relay_check", listener)
}

#[tokio::test]
async fn an_open_backend_stops_the_proxy_from_starting_and_the_error_says_how_to_fix_it() {
    let backend = FakeBackend::start(backend_script(OPEN)).await;
    // relay_check is left at the proxy's default (refuse), not the
    // harness's "off".
    let result = TestProxy::try_start_config(TestConfig::new().hostname(HOSTNAME).listeners([
        listener("open-mx", "smtp", "starttls", backend.address).default_relay_check(),
    ]))
    .await;
    let error = match result {
        Ok(_) => panic!("a proxy in front of an open relay started"),
        Err(error) => error,
    };
    assert!(matches!(error, StartError::OpenRelay(_)), "{error:?}");
    let message = error.to_string();
    for part in [
        &format!(
            "listener open-mx: backend {} would relay mail for anyone who connects through this proxy",
            backend.address
        ),
        "client_identity = \"none\") with \"250 2.1.5 Ok\"",
        "client_identity = \"proxy-v2\" with Postfix smtpd_upstream_proxy_protocol = haproxy",
        "client_identity = \"xclient\" with the proxy's address in Postfix smtpd_authorized_xclient_hosts",
        "Postfix mynetworks, Exim relay_from_hosts",
        "relay_check = \"warn\" (log and serve) or relay_check = \"off\"",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    // Even an open backend got no message: RSET and QUIT after RCPT.
    let received = backend.received_when_closed(0).await;
    assert_eq!(probe_lines(&received), DIALOGUE);
    assert_eq!(backend.connections(), 1);
}

#[tokio::test]
async fn a_closed_backend_gets_exactly_ehlo_mail_rcpt_rset_quit_and_the_proxy_serves() {
    let backend = FakeBackend::start(backend_script(CLOSED)).await;
    let proxy = TestProxy::start_config(TestConfig::new().hostname(HOSTNAME).listeners([
        listener("closed-mx", "smtp", "starttls", backend.address).relay_check("refuse"),
    ]))
    .await;
    let received = backend.received_when_closed(0).await;
    assert_eq!(probe_lines(&received), DIALOGUE);
    assert!(!text(&received).contains("DATA"));
    assert_eq!(relay_metric(&proxy, "closed-mx").await, series(1, 0, 0));
    let mut client = proxy.connect("closed-mx").await;
    assert_eq!(
        read_until(&mut client, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
}

#[tokio::test]
async fn an_unreachable_backend_is_unknown_and_the_proxy_starts_anyway() {
    let dead = dead_address();
    let proxy = TestProxy::start_config(
        TestConfig::new()
            .hostname(HOSTNAME)
            .listeners([listener("dead-mx", "smtp", "starttls", &dead).relay_check("refuse")]),
    )
    .await;
    assert_eq!(relay_metric(&proxy, "dead-mx").await, series(0, 0, 1));
}

#[tokio::test]
async fn warn_logs_an_open_backend_and_serves() {
    let backend = FakeBackend::start(backend_script(OPEN)).await;
    let proxy =
        TestProxy::start_config(TestConfig::new().hostname(HOSTNAME).listeners([
            listener("warn-mx", "smtp", "starttls", backend.address).relay_check("warn"),
        ]))
        .await;
    assert_eq!(relay_metric(&proxy, "warn-mx").await, series(0, 1, 0));
    let mut client = proxy.connect("warn-mx").await;
    assert_eq!(
        read_until(&mut client, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
}

#[tokio::test]
async fn the_probe_arrives_as_the_listeners_clients_do() {
    // PROXY v1: the header names the documentation address and the
    // listener's bound address (127.0.0.1 and the port the OS chose).
    let backend = FakeBackend::start(backend_script(CLOSED).with_proxy_header()).await;
    let proxy = TestProxy::start_config(
        TestConfig::new().hostname(HOSTNAME).listeners([listener(
            "pv1-mx",
            "smtp",
            "starttls",
            backend.address,
        )
        .relay_check("refuse")
        .client_identity("proxy-v1")]),
    )
    .await;
    let received = backend.received_when_closed(0).await;
    let mut expected = vec![format!(
        "PROXY TCP4 192.0.2.1 127.0.0.1 50000 {}\r\n",
        proxy.address("pv1-mx").port()
    )];
    expected.extend(DIALOGUE.map(String::from));
    assert_eq!(probe_lines(&received), expected);

    // XCLIENT, offered and accepted: the probe's identity, the new
    // greeting, then the dialogue from its EHLO on.
    let backend = FakeBackend::start(
        backend_script(CLOSED)
            .once(
                b"EHLO",
                b"250-fake.example\r\n250 XCLIENT NAME ADDR PORT DESTADDR DESTPORT\r\n",
            )
            .on(b"XCLIENT", b"220 fake.example ESMTP\r\n"),
    )
    .await;
    let proxy = TestProxy::start_config(
        TestConfig::new().hostname(HOSTNAME).listeners([listener(
            "xclient-mx",
            "smtp",
            "implicit",
            backend.address,
        )
        .relay_check("refuse")
        .client_identity("xclient")]),
    )
    .await;
    let received = backend.received_when_closed(0).await;
    let mut expected = vec![
        "EHLO proxy.test\r\n".to_string(),
        format!(
            "XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.1 PORT=50000 DESTADDR=127.0.0.1 DESTPORT={}\r\n",
            proxy.address("xclient-mx").port()
        ),
    ];
    expected.extend(DIALOGUE.map(String::from));
    assert_eq!(probe_lines(&received), expected);
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_turns_open_is_refused_until_it_closes_again() {
    let backend = FakeBackend::start(backend_script(CLOSED)).await;
    let proxy = TestProxy::start_config(
        TestConfig::new()
            .hostname(HOSTNAME)
            .relay_check_interval(1)
            .listeners([
                listener("flip", "smtp", "starttls", backend.address).relay_check("refuse"),
                listener("flip-tls", "smtp", "implicit", backend.address).relay_check("refuse"),
            ]),
    )
    .await;
    let metrics = proxy.metrics.expect("metrics address");
    // A session established while the backend is closed.
    let mut established = proxy.connect("flip").await;
    assert_eq!(
        read_until(&mut established, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
    readyz_until(metrics, |status, _| status == 200).await;

    // The backend starts trusting everyone: the next check finds it.
    backend.set_script(backend_script(OPEN));
    let (_, body) = readyz_until(metrics, |status, body| {
        status == 503 && body.contains("listener flip:") && body.contains("listener flip-tls:")
    })
    .await;
    let reason = format!(
        "not ready: listener flip: backend {} would relay mail for anyone arriving here (it accepted a stranger's outside recipient with \"250 2.1.5 Ok\"); new connections get a temporary refusal until a relay check finds it closed",
        backend.address
    );
    assert!(body.lines().any(|line| line == reason), "{body}");
    assert_eq!(relay_metric(&proxy, "flip").await, series(0, 1, 0));

    // New clients get the temporary refusal and a clean close, after TLS
    // on the implicit listener.
    let mut refused = proxy.connect("flip").await;
    assert_eq!(read_to_close(&mut refused).await, REFUSED);
    let mut refused = proxy.connect_tls("flip-tls").await;
    assert_eq!(read_to_close(&mut refused).await, REFUSED);

    // The established session goes on.
    assert_eq!(
        exchange(&mut established, b"NOOP\r\n", b"\r\n").await,
        b"250 2.0.0 Ok\r\n"
    );

    // Fixed: the next check passes and new clients reach the backend again.
    backend.set_script(backend_script(CLOSED));
    readyz_until(metrics, |status, _| status == 200).await;
    assert_eq!(relay_metric(&proxy, "flip").await, series(1, 0, 0));
    let mut client = proxy.connect("flip").await;
    assert_eq!(
        read_until(&mut client, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
    let mut client = proxy.connect_tls("flip-tls").await;
    assert_eq!(
        read_until(&mut client, b"\r\n").await,
        b"220 fake.example ESMTP\r\n"
    );
}

#[tokio::test(start_paused = true)]
async fn behind_a_balancer_the_refusal_comes_after_the_header_and_the_handshake() {
    let backend = FakeBackend::start(backend_script(CLOSED)).await;
    let proxy = TestProxy::start_config(
        TestConfig::new()
            .hostname(HOSTNAME)
            .relay_check_interval(1)
            .listeners([listener("flip-lb", "smtp", "implicit", backend.address)
                .relay_check("refuse")
                .accept_proxy_from(&["127.0.0.1"])]),
    )
    .await;
    let metrics = proxy.metrics.expect("metrics address");
    readyz_until(metrics, |status, _| status == 200).await;
    backend.set_script(backend_script(OPEN));
    readyz_until(metrics, |status, body| {
        status == 503 && body.contains("listener flip-lb:")
    })
    .await;

    let mut stream = proxy.connect("flip-lb").await;
    stream
        .write_all(b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 465\r\n")
        .await
        .expect("write header");
    let mut refused = proxy.upgrade(stream).await;
    assert_eq!(read_to_close(&mut refused).await, REFUSED);
    assert_eq!(
        proxy.scrape().await.value(
            "mail_tls_proxy_rejected_connections_total{listener=\"flip-lb\",reason=\"relay_open\"}"
        ),
        1.0
    );
}
