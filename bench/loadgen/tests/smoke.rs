//! A short, untimed run of every benchmark figure against an in-process
//! mail-tls-proxy and the fast backend, so the harness cannot rot. Nothing
//! here judges speed: only that each figure completes without errors and the
//! report renders. (bench/compare.sh does the measured comparison.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mail_tls_bench::backend::{self, Service};
use mail_tls_bench::client::{self, Mode, Protocol};
use mail_tls_bench::figures::{self, Bulk, Context, Handshakes, IdleState, ResumptionRun, Window};
use mail_tls_bench::record::{Labels, Record};
use mail_tls_bench::report;
use mail_tls_proxy::config::Config;
use mail_tls_proxy::server::Proxy;
use mail_tls_proxy::tls::generate_pair;

const WINDOW: Window = Window {
    warmup: Duration::from_millis(100),
    measure: Duration::from_millis(700),
};

async fn start_backend() -> HashMap<Service, SocketAddr> {
    let mut addresses = HashMap::new();
    for service in [Service::Imap, Service::Pop3, Service::Smtp, Service::Echo] {
        let listener = backend::bind("127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind backend");
        addresses.insert(service, listener.local_addr().unwrap());
        tokio::spawn(backend::serve(listener, service));
    }
    addresses
}

struct Started {
    listeners: HashMap<String, SocketAddr>,
    cert: PathBuf,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_proxy(backends: &HashMap<Service, SocketAddr>) -> Started {
    let dir = std::env::temp_dir().join(format!("mail-tls-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pair = generate_pair(&["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), &pair.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &pair.key_pem).unwrap();
    let mut text = String::from(
        "hostname = \"localhost\"\nmax_connections = 20000\n[[certificate]]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n",
    );
    let listeners = [
        ("imaps", "imap", "implicit", Service::Imap),
        ("smtps", "smtp", "implicit", Service::Smtp),
        ("echo", "imap", "implicit", Service::Echo),
        ("imap", "imap", "starttls", Service::Imap),
        ("pop3", "pop3", "starttls", Service::Pop3),
        ("submission", "smtp", "starttls", Service::Smtp),
    ];
    for (name, protocol, tls, service) in listeners {
        // The benchmark's SMTP backend is a sink that accepts every
        // recipient: the relay guard would rightly refuse to front it.
        let relay_check = if protocol == "smtp" {
            "relay_check = \"off\"\n"
        } else {
            ""
        };
        text.push_str(&format!(
            "\n[[listener]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\ntls = \"{tls}\"\nlisten = \"127.0.0.1:0\"\nbackend = \"{}\"\nmax_connections_per_ip = 20000\n{relay_check}",
            backends[&service]
        ));
    }
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).expect("config");
    let proxy = Proxy::bind(&config).await.expect("bind proxy");
    let addresses = proxy.listener_addresses();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));
    Started {
        listeners: addresses,
        cert: dir.join("cert.pem"),
        _stop: stop,
    }
}

fn value(records: &[Record], metric: &str) -> f64 {
    records
        .iter()
        .find(|r| r.metric == metric)
        .unwrap_or_else(|| panic!("no {metric} in {records:?}"))
        .value
}

fn no_errors(records: &[Record]) {
    for record in records.iter().filter(|r| r.metric == "errors") {
        assert_eq!(record.value, 0.0, "errors in {records:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_figure_runs_and_the_report_renders() {
    let backends = start_backend().await;
    let proxy = start_proxy(&backends).await;
    let at = |name: &str| proxy.listeners[name];
    let context = Context {
        connector: client::connector(Some(&proxy.cert)).expect("connector"),
        labels: Labels {
            proxy: "ours".into(),
            cert: "ecdsa".into(),
            rep: 1,
        },
        proxy_pid: Some(std::process::id()),
        backend_pid: None,
        replica_pids: Vec::new(),
    };
    let timeout = Duration::from_secs(10);
    let mut all = Vec::new();

    let implicit = figures::sessions(
        &context,
        at("imaps"),
        Mode::Implicit,
        Protocol::Imap,
        8,
        WINDOW,
        timeout,
    )
    .await
    .expect("implicit sessions");
    no_errors(&implicit);
    assert!(value(&implicit, "sessions_per_s") > 0.0);
    all.extend(implicit);

    for (listener, protocol) in [
        ("imap", Protocol::Imap),
        ("pop3", Protocol::Pop3),
        ("submission", Protocol::Smtp),
    ] {
        let records = figures::sessions(
            &context,
            at(listener),
            Mode::Starttls,
            protocol,
            8,
            WINDOW,
            timeout,
        )
        .await
        .expect("starttls sessions");
        no_errors(&records);
        assert!(value(&records, "sessions_per_s") > 0.0, "{listener}");
        all.extend(records);
    }

    let direct = Context {
        labels: Labels {
            proxy: "direct".into(),
            ..context.labels.clone()
        },
        ..context.clone()
    };
    let limit = Duration::from_secs(5);
    all.extend(
        figures::latency(&direct, backends[&Service::Imap], Mode::Plain, 300, limit)
            .await
            .expect("direct latency"),
    );
    let through = figures::latency(&context, at("imaps"), Mode::Implicit, 300, limit)
        .await
        .expect("latency");
    assert_eq!(value(&through, "samples"), 300.0);
    all.extend(through);

    for (kind, listener, connections) in [
        (Bulk::Echo, "echo", 1),
        (Bulk::Echo, "echo", 8),
        (Bulk::Data, "smtps", 1),
        (Bulk::Data, "smtps", 8),
    ] {
        let records = figures::bulk(
            &context,
            at(listener),
            Mode::Implicit,
            kind,
            connections,
            WINDOW,
        )
        .await
        .expect("bulk");
        no_errors(&records);
        assert!(value(&records, "mb_per_s") > 0.0, "{kind:?} {connections}");
        all.extend(records);
    }
    // The echo and the sink also work without a proxy (the baseline).
    let plain = figures::bulk(
        &direct,
        backends[&Service::Echo],
        Mode::Plain,
        Bulk::Echo,
        1,
        WINDOW,
    )
    .await
    .expect("plain echo");
    assert!(value(&plain, "mb_per_s") > 0.0);

    for state in [IdleState::Login, IdleState::Greeting] {
        let records = figures::idle(
            &context,
            at("imaps"),
            &[50, 200],
            state,
            32,
            Duration::from_millis(50),
            Duration::from_secs(30),
        )
        .await
        .expect("idle sessions");
        no_errors(&records);
        assert_eq!(value(&records, "sessions_held"), 200.0);
        value(&records, "kib_per_session");
        all.extend(records);
    }

    // Figure 6: every measured connection resumes from the ticket its slot
    // was given; the full-handshake comparison resumes none.
    for handshakes in [Handshakes::Resumed, Handshakes::Full] {
        let run = ResumptionRun {
            handshakes,
            protocol: Protocol::Imap,
            concurrency: 4,
            expect_cert: Some(proxy.cert.clone()),
            figure: "resumption".into(),
            variant: handshakes.name().into(),
            min_resumed_pct: figures::MIN_RESUMED_PCT,
            pool_rate: 200.0,
        };
        let records = figures::resumption(&context, at("imaps"), &run, WINDOW, timeout)
            .await
            .expect("resumption");
        no_errors(&records);
        assert!(value(&records, "sessions_per_s") > 0.0, "{records:?}");
        match handshakes {
            Handshakes::Resumed => {
                assert_eq!(value(&records, "resumed_pct"), 100.0, "{records:?}");
                // One new ticket per resumed session (a client offering a
                // ticket gets one, as with OpenSSL), give or take the few
                // sessions in flight at the edges of the measured window.
                let tickets = value(&records, "tickets_per_session");
                assert!((0.9..1.1).contains(&tickets), "{records:?}");
            }
            Handshakes::Full => assert_eq!(value(&records, "resumed_pct"), 0.0),
        }
        all.extend(records);
    }

    // The records survive their text form, and the report has every figure.
    let text: String = all.iter().map(|r| format!("{r}\n")).collect();
    let parsed = Record::parse_all(&text).expect("parse");
    assert_eq!(parsed.len(), all.len());
    let rendered = report::render(&parsed, "");
    for title in [
        "Figure 1", "Figure 2", "Figure 3", "Figure 4", "Figure 5", "Figure 6", "Targets",
    ] {
        assert!(
            rendered.markdown.contains(title),
            "{title} missing:\n{}",
            rendered.markdown
        );
    }
    assert!(rendered.markdown.contains("added p50"));
    assert!(
        rendered
            .markdown
            .contains("| resumption: CPU per resumed session ≤ 0.5× our CPU per full handshake |"),
        "{}",
        rendered.markdown
    );
    assert!(!rendered.markdown.contains("**Invalid**"));
    assert!(
        rendered.charts.len() >= 4,
        "{:?}",
        rendered.charts.iter().map(|c| &c.0).collect::<Vec<_>>()
    );
}
