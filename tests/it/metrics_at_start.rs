//! A freshly started proxy, before any client, already
//! exports every series the shipped dashboard (deploy/grafana) and alerts
//! (deploy/prometheus) read, for every listener, with every label value
//! their expressions name: a panel or alert on a series the proxy does not
//! export from start-up fails here.

use std::collections::BTreeSet;
use std::path::Path;

use crate::support::*;

/// One use of a metric in a dashboard or alert expression: its name and the
/// labels it must equal (`result="open"`; matchers on dashboard variables
/// such as `listener=~"$listener"` select nothing fixed and are left out).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesUse {
    name: String,
    equal: Vec<(String, String)>,
}

/// Every `mail_tls_proxy_` series named in `text`, with the labels each use
/// must equal. Dashboard JSON escapes the quotes inside its expressions; the
/// caller unescapes them first.
fn series_used_in(text: &str) -> BTreeSet<SeriesUse> {
    const PREFIX: &str = "mail_tls_proxy_";
    let mut uses = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        let after = &rest[at..];
        let name_length = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_length];
        let mut equal = Vec::new();
        if let Some(labels) = after[name_length..].strip_prefix('{') {
            let labels = &labels[..labels.find('}').unwrap_or(labels.len())];
            for matcher in labels.split(',') {
                let Some((label, value)) = matcher.split_once('=') else {
                    continue;
                };
                // `=~`, `!=`, `!~` select no fixed value.
                if label.ends_with('!') || value.starts_with('~') {
                    continue;
                }
                let value = value.trim().trim_matches('"');
                if !value.starts_with('$') {
                    equal.push((label.trim().to_string(), value.to_string()));
                }
            }
        }
        uses.insert(SeriesUse {
            name: name.to_string(),
            equal,
        });
        rest = &after[name_length..];
    }
    uses
}

fn read_deploy_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The series the dashboard and the alerts use.
fn series_used_by_dashboard_and_alerts() -> BTreeSet<SeriesUse> {
    let dashboard = read_deploy_file("deploy/grafana/mail-tls-proxy.json").replace("\\\"", "\"");
    let alerts = read_deploy_file("deploy/prometheus/alerts.yaml");
    let mut uses = series_used_in(&dashboard);
    uses.extend(series_used_in(&alerts));
    uses
}

/// The scraped series: name and labels, value dropped.
fn exported_series(scrape: &Scrape) -> Vec<(String, Vec<(String, String)>)> {
    scrape
        .0
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let series = line.rsplit_once(' ')?.0;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter_map(|pair| pair.split_once("=\""))
                .map(|(label, value)| (label.to_string(), value.trim_end_matches('"').to_string()))
                .collect();
            Some((name.to_string(), labels))
        })
        .collect()
}

#[test]
fn the_expression_reader_finds_names_and_fixed_labels() {
    let uses = series_used_in(
        "2 * max by (listener) (mail_tls_proxy_relay_check{instance=~\"$instance\",result=\"open\"}) \
         + increase(mail_tls_proxy_config_reloads_total{result=\"error\"}[15m]) \
         / label_values(mail_tls_proxy_connections_total, instance)",
    );
    let found: Vec<(String, Vec<(String, String)>)> = uses
        .into_iter()
        .map(|each| (each.name, each.equal))
        .collect();
    let pair = |label: &str, value: &str| (label.to_string(), value.to_string());
    assert_eq!(
        found,
        [
            (
                "mail_tls_proxy_config_reloads_total".to_string(),
                vec![pair("result", "error")]
            ),
            ("mail_tls_proxy_connections_total".to_string(), vec![]),
            (
                "mail_tls_proxy_relay_check".to_string(),
                vec![pair("result", "open")]
            ),
        ]
    );
}

#[tokio::test]
async fn every_series_the_dashboard_and_alerts_use_exists_before_any_traffic() {
    let smtp = FakeBackend::start(Script::smtp()).await;
    let imap = FakeBackend::start(Script::imap()).await;
    let dead = dead_address();
    let names = ["start-smtp", "start-imaps", "start-pop3"];
    let proxy = TestProxy::start([
        // A guarded SMTP listener: its relay check series exist from the
        // check at start-up.
        listener(names[0], "smtp", "starttls", smtp.address).relay_check("warn"),
        listener(names[1], "imap", "implicit", imap.address),
        listener(names[2], "pop3", "starttls", &dead),
    ])
    .await;
    for name in names {
        claim_listener_name(name);
    }

    // The checks from start-up set backend_up.
    let scrape = poll_until(async || {
        let scrape = proxy.scrape().await;
        let checked = names
            .iter()
            .filter(|name| {
                scrape.contains(&format!("mail_tls_proxy_backend_up{{listener=\"{name}\"}}"))
            })
            .count();
        if checked == names.len() {
            Ok(scrape)
        } else {
            Err(format!(
                "backend_up for {checked} of {} listeners:\n{}",
                names.len(),
                scrape.0
            ))
        }
    })
    .await;
    let exported = exported_series(&scrape);

    let uses = series_used_by_dashboard_and_alerts();
    assert!(uses.len() >= 15, "{uses:?}");
    let mut missing = Vec::new();
    for used in &uses {
        let matches = |listener: Option<&str>| {
            exported.iter().any(|(name, labels)| {
                let has =
                    |label: &str, value: &str| labels.iter().any(|(l, v)| l == label && v == value);
                *name == used.name
                    && listener.is_none_or(|listener| has("listener", listener))
                    && used.equal.iter().all(|(label, value)| has(label, value))
            })
        };
        // A per-listener family must exist for each listener it applies to
        // (the relay check only for guarded SMTP listeners).
        let per_listener = exported.iter().any(|(name, labels)| {
            *name == used.name && labels.iter().any(|(label, _)| label == "listener")
        });
        let listeners: &[&str] = match (per_listener, used.name.as_str()) {
            (true, "mail_tls_proxy_relay_check") => &names[..1],
            (true, _) => &names,
            (false, _) => &[],
        };
        if listeners.is_empty() && !matches(None) {
            missing.push(format!("{used:?}"));
        }
        for listener in listeners {
            if !matches(Some(listener)) {
                missing.push(format!("{used:?} for listener {listener}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "missing from a fresh scrape: {missing:#?}\n{}",
        scrape.0
    );

    // The build and the process are there too.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        scrape.value(&format!(
            "mail_tls_proxy_build_info{{version=\"{version}\"}}"
        )),
        1.0
    );
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            exported.iter().any(|(exported, _)| exported == name),
            "{name} in\n{}",
            scrape.0
        );
    }
    assert!(scrape.value("process_resident_memory_bytes") > 0.0);
    assert!(scrape.value("process_open_fds") > 0.0);
    // Nothing happened yet: every listener counter is still zero.
    for name in names {
        for series in [
            format!("mail_tls_proxy_timeouts_total{{listener=\"{name}\",phase=\"idle\"}}"),
            format!("mail_tls_proxy_rejected_connections_total{{listener=\"{name}\",reason=\"relay_open\"}}"),
            format!("mail_tls_proxy_tls_handshake_errors_total{{listener=\"{name}\",reason=\"protocol_version\"}}"),
        ] {
            assert_eq!(scrape.value(&series), 0.0, "{series}");
        }
    }
    let relay_check = scrape.series_of("mail_tls_proxy_relay_check", names[0]);
    assert_eq!(relay_check.len(), 3, "{relay_check:?}");
    assert_eq!(imap.health_checks().len(), 1);
}
