//! All six listener kinds (3 protocols x 2 TLS modes) in one proxy process,
//! used at the same time.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_listener_kinds_serve_concurrently_in_one_process() {
    let smtp = FakeBackend::start(Script::smtp()).await;
    let imap = FakeBackend::start(Script::imap()).await;
    let pop3 = FakeBackend::start(Script::pop3()).await;
    let proxy = std::sync::Arc::new(
        TestProxy::start([
            listener("smtp-starttls", "smtp", "starttls", smtp.address),
            listener("smtps", "smtp", "implicit", smtp.address),
            listener("imap-starttls", "imap", "starttls", imap.address),
            listener("imaps", "imap", "implicit", imap.address),
            listener("pop3-starttls", "pop3", "starttls", pop3.address),
            listener("pop3s", "pop3", "implicit", pop3.address),
        ])
        .await,
    );

    let mut tasks = Vec::new();
    for round in 0..5 {
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = p.connect("smtp-starttls").await;
            read_until(&mut c, b"\r\n").await;
            exchange(&mut c, b"EHLO c\r\n", b"250 STARTTLS\r\n").await;
            exchange(&mut c, b"STARTTLS\r\n", b"\r\n").await;
            let mut t = p.upgrade(c).await;
            let r = exchange(&mut t, b"EHLO c\r\n", b"250 8BITMIME\r\n").await;
            assert!(!text(&r).contains("STARTTLS"), "round {round}");
            assert_eq!(
                exchange(&mut t, b"QUIT\r\n", b"\r\n").await,
                b"221 2.0.0 Bye\r\n"
            );
        }));
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = p.connect_tls("smtps").await;
            read_until(&mut t, b"\r\n").await;
            let r = exchange(&mut t, b"EHLO c\r\n", b"250 8BITMIME\r\n").await;
            assert_eq!(
                text(&r),
                "250-fake.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
            );
        }));
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = p.connect("imap-starttls").await;
            read_until(&mut c, b"\r\n").await;
            exchange(&mut c, b"s STARTTLS\r\n", b"\r\n").await;
            let mut t = p.upgrade(c).await;
            let r = exchange(
                &mut t,
                b"a CAPABILITY\r\n",
                b"a OK Capability completed.\r\n",
            )
            .await;
            assert_eq!(
                text(&r),
                "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na OK Capability completed.\r\n"
            );
        }));
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = p.connect_tls("imaps").await;
            read_until(&mut t, b"\r\n").await;
            let r = exchange(&mut t, b"n NOOP\r\n", b"\r\n").await;
            assert_eq!(r, b"n OK NOOP completed.\r\n");
        }));
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = p.connect("pop3-starttls").await;
            read_until(&mut c, b"\r\n").await;
            exchange(&mut c, b"STLS\r\n", b"\r\n").await;
            let mut t = p.upgrade(c).await;
            let r = exchange(&mut t, b"CAPA\r\n", b"\r\n.\r\n").await;
            assert_eq!(text(&r), "+OK\r\nTOP\r\nUSER\r\n.\r\n");
        }));
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = p.connect_tls("pop3s").await;
            read_until(&mut t, b"\r\n").await;
            let r = exchange(&mut t, b"QUIT\r\n", b"\r\n").await;
            assert_eq!(r, b"+OK Logging out.\r\n");
        }));
    }
    for task in tasks {
        task.await.expect("session task succeeded");
    }
    assert_eq!(smtp.connections(), 10);
    assert_eq!(imap.connections(), 10);
    assert_eq!(pop3.connections(), 10);
}
