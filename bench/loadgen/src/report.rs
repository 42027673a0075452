//! Turns a run's [`Record`]s into the comparison: per figure a table of
//! median [min–max] per proxy and our ratio to each peer, the issue's targets
//! judged from the medians, and SVG bar charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::record::Record;

/// Column order; anything else follows alphabetically.
const PROXIES: &[&str] = &["ours", "haproxy", "stunnel", "direct"];
/// Our proxy's label, and the peers we compare with.
const OURS: &str = "ours";
const PEERS: &[&str] = &["haproxy", "stunnel"];

/// How a metric reads.
struct Metric {
    key: &'static str,
    label: &'static str,
    /// Some(true): higher is better; Some(false): lower is better.
    higher_is_better: Option<bool>,
}

const METRICS: &[Metric] = &[
    Metric {
        key: "sessions_per_s",
        label: "sessions/s",
        higher_is_better: Some(true),
    },
    Metric {
        key: "cpu_us_per_session",
        label: "proxy CPU µs per session",
        higher_is_better: Some(false),
    },
    Metric {
        key: "resumed_pct",
        label: "handshakes resumed %",
        higher_is_better: Some(true),
    },
    Metric {
        key: "tickets_per_session",
        label: "new tickets sent per session",
        higher_is_better: None,
    },
    Metric {
        key: "proxy_cpu_pct",
        label: "proxy CPU %",
        higher_is_better: None,
    },
    Metric {
        key: "client_cpu_pct",
        label: "load generator core %",
        higher_is_better: None,
    },
    Metric {
        key: "errors",
        label: "errors",
        higher_is_better: Some(false),
    },
    Metric {
        key: "p50_us",
        label: "round trip p50 µs",
        higher_is_better: Some(false),
    },
    Metric {
        key: "p99_us",
        label: "round trip p99 µs",
        higher_is_better: Some(false),
    },
    Metric {
        key: "added_p50_us",
        label: "added p50 µs (over direct)",
        higher_is_better: Some(false),
    },
    Metric {
        key: "added_p99_us",
        label: "added p99 µs (over direct)",
        higher_is_better: Some(false),
    },
    Metric {
        key: "cpu_us_per_round_trip",
        label: "proxy CPU µs per round trip",
        higher_is_better: Some(false),
    },
    Metric {
        key: "mb_per_s",
        label: "MB/s",
        higher_is_better: Some(true),
    },
    Metric {
        key: "kib_per_session",
        label: "KiB per idle session",
        higher_is_better: Some(false),
    },
    Metric {
        key: "sessions_held",
        label: "sessions held",
        higher_is_better: Some(true),
    },
];

fn metric_info(key: &str) -> (String, Option<bool>) {
    if let Some(metric) = METRICS.iter().find(|m| m.key == key) {
        return (metric.label.to_string(), metric.higher_is_better);
    }
    if let Some(count) = key.strip_prefix("rss_kib_") {
        return (format!("RSS KiB at {count} sessions"), Some(false));
    }
    (key.to_string(), None)
}

/// Where a metric's row goes: the figure's own measures first, then RSS by
/// session count, then CPU shares and errors (context for the reader).
fn row_order(key: &str) -> (u8, usize, u64) {
    const CONTEXT: &[&str] = &["proxy_cpu_pct", "client_cpu_pct", "errors"];
    if let Some(count) = key.strip_prefix("rss_kib_") {
        return (1, 0, count.parse().unwrap_or(0));
    }
    if let Some(position) = CONTEXT.iter().position(|c| *c == key) {
        return (2, position, 0);
    }
    let position = METRICS.iter().position(|m| m.key == key);
    (0, position.unwrap_or(METRICS.len()), 0)
}

/// Metrics kept in the data but left out of tables.
fn hidden(key: &str) -> bool {
    matches!(key, "samples" | "mean_us")
}

/// Median, min and max of one cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Stats {
    pub fn of(values: &[f64]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        };
        Some(Stats {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            runs: sorted.len(),
        })
    }
}

/// Values grouped as figure → cert → variant → metric → proxy → values.
type Grouped = BTreeMap<
    String,
    BTreeMap<String, BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>>>,
>;

/// The added-latency records: each proxy's p50/p99 minus the direct
/// connection's, per certificate and repetition.
fn with_added_latency(records: &[Record]) -> Vec<Record> {
    let mut all = records.to_vec();
    for record in records {
        if record.figure != "latency" || record.proxy == "direct" {
            continue;
        }
        let Some(metric) = (match record.metric.as_str() {
            "p50_us" => Some("added_p50_us"),
            "p99_us" => Some("added_p99_us"),
            _ => None,
        }) else {
            continue;
        };
        let direct = records.iter().find(|other| {
            other.figure == "latency"
                && other.proxy == "direct"
                && other.metric == record.metric
                && other.variant == record.variant
                && other.rep == record.rep
        });
        if let Some(direct) = direct {
            let mut added = record.clone();
            added.metric = metric.into();
            added.value = record.value - direct.value;
            all.push(added);
        }
    }
    all
}

fn group(records: &[Record]) -> Grouped {
    let mut grouped = Grouped::new();
    for record in records {
        grouped
            .entry(record.figure.clone())
            .or_default()
            .entry(record.cert.clone())
            .or_default()
            .entry(record.variant.clone())
            .or_default()
            .entry(record.metric.clone())
            .or_default()
            .entry(record.proxy.clone())
            .or_default()
            .push(record.value);
    }
    grouped
}

fn proxy_order(present: impl Iterator<Item = String>) -> Vec<String> {
    let mut proxies: Vec<String> = present.collect();
    proxies.sort_by_key(|p| {
        (
            PROXIES
                .iter()
                .position(|known| known == p)
                .unwrap_or(PROXIES.len()),
            p.clone(),
        )
    });
    proxies.dedup();
    proxies
}

/// 2,170 / 463 / 12.3 / 0.82: enough digits to compare, no more.
pub fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        let rounded = value.round() as i64;
        let digits = rounded.abs().to_string();
        let mut grouped = String::new();
        for (index, digit) in digits.chars().enumerate() {
            if index > 0 && (digits.len() - index) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(digit);
        }
        if rounded < 0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn cell(stats: &Stats) -> String {
    if stats.runs == 1 || stats.min == stats.max {
        number(stats.median)
    } else {
        format!(
            "{} [{}–{}]",
            number(stats.median),
            number(stats.min),
            number(stats.max)
        )
    }
}

/// ours / peer, from medians.
fn ratio(ours: Option<&Stats>, peer: Option<&Stats>) -> Option<f64> {
    let (ours, peer) = (ours?, peer?);
    if peer.median == 0.0 {
        return None;
    }
    Some(ours.median / peer.median)
}

fn figure_title(figure: &str) -> &str {
    match figure {
        "implicit" => "Figure 1: full-handshake sessions, implicit TLS",
        "starttls" => "Figure 2: full-handshake sessions, STARTTLS",
        "latency" => "Figure 3: NOOP round trip on an established session",
        "bulk" => "Figure 4: bulk throughput",
        "memory" => "Figure 5: memory per idle TLS session",
        "resumption" => "Figure 6: resumed TLS 1.3 sessions, implicit TLS (IMAP)",
        "fleet" => "Figure 7: a fleet of replicas behind a round-robin load balancer",
        other => other,
    }
}

const FIGURE_ORDER: &[&str] = &[
    "implicit",
    "starttls",
    "latency",
    "bulk",
    "memory",
    "resumption",
    "fleet",
];
const VARIANT_ORDER: &[&str] = &[
    "imap",
    "pop3",
    "smtp",
    "noop",
    "echo-1",
    "echo-8",
    "data-1",
    "data-8",
    "idle-login",
    "idle-greeting",
    "resumed",
    "full",
];

/// Proxies whose resumed runs of figure 6 fell below
/// [`crate::figures::MIN_RESUMED_PCT`] resumed handshakes, with the lowest
/// share seen: those runs do not measure resumption.
fn invalid_resumption(grouped: &Grouped, cert: &str) -> Vec<(String, f64)> {
    let Some(by_proxy) = grouped
        .get("resumption")
        .and_then(|c| c.get(cert))
        .and_then(|v| v.get("resumed"))
        .and_then(|m| m.get("resumed_pct"))
    else {
        return Vec::new();
    };
    proxy_order(by_proxy.keys().cloned())
        .into_iter()
        .filter_map(|proxy| {
            let lowest = by_proxy[&proxy]
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min);
            (lowest < crate::figures::MIN_RESUMED_PCT).then_some((proxy, lowest))
        })
        .collect()
}

/// The rendered report.
pub struct Report {
    pub markdown: String,
    /// (file name, SVG text)
    pub charts: Vec<(String, String)>,
}

/// Renders tables, targets and charts; `chart_dir` is how the Markdown links
/// to the chart files (e.g. `benchmarks/`).
pub fn render(records: &[Record], chart_dir: &str) -> Report {
    let records = with_added_latency(records);
    let grouped = group(&records);
    let mut markdown = String::new();
    let mut figures: Vec<&String> = grouped.keys().collect();
    figures.sort_by_key(|f| {
        FIGURE_ORDER
            .iter()
            .position(|known| known == &f.as_str())
            .unwrap_or(FIGURE_ORDER.len())
    });
    let charts = charts(&grouped);

    markdown.push_str("### Targets\n\n");
    markdown.push_str(&targets(&grouped));
    markdown.push('\n');

    for figure in figures {
        let certs = &grouped[figure];
        let _ = writeln!(markdown, "### {}\n", figure_title(figure));
        for (name, _) in charts
            .iter()
            .filter(|(name, _)| name.starts_with(figure.as_str()))
        {
            let _ = writeln!(markdown, "![{figure}]({chart_dir}{name})\n");
        }
        let proxies = proxy_order(
            certs
                .values()
                .flat_map(|v| v.values())
                .flat_map(|m| m.values())
                .flat_map(|p| p.keys().cloned()),
        );
        let peers: Vec<&str> = PEERS
            .iter()
            .copied()
            .filter(|peer| proxies.iter().any(|p| p == peer))
            .collect();
        let mut header = String::from("| cert | variant | metric |");
        let mut rule = String::from("|---|---|---|");
        for proxy in &proxies {
            let _ = write!(header, " {proxy} |");
            rule.push_str("---:|");
        }
        for peer in &peers {
            let _ = write!(header, " ours / {peer} |");
            rule.push_str("---:|");
        }
        let _ = writeln!(markdown, "{header}\n{rule}");
        for (cert, variants) in certs {
            let mut ordered: Vec<(&String, _)> = variants.iter().collect();
            ordered.sort_by_key(|(variant, _)| {
                VARIANT_ORDER
                    .iter()
                    .position(|known| known == &variant.as_str())
                    .unwrap_or(VARIANT_ORDER.len())
            });
            for (variant, metrics) in ordered {
                let mut keys: Vec<&String> = metrics.keys().filter(|key| !hidden(key)).collect();
                keys.sort_by_key(|key| row_order(key));
                for key in keys {
                    let by_proxy = &metrics[key];
                    let stats: BTreeMap<&str, Stats> = by_proxy
                        .iter()
                        .filter_map(|(proxy, values)| {
                            Stats::of(values).map(|s| (proxy.as_str(), s))
                        })
                        .collect();
                    let (label, direction) = metric_info(key);
                    let arrow = match direction {
                        Some(true) => " ↑",
                        Some(false) => " ↓",
                        None => "",
                    };
                    let _ = write!(markdown, "| {cert} | {variant} | {label}{arrow} |");
                    for proxy in &proxies {
                        match stats.get(proxy.as_str()) {
                            Some(s) => {
                                let _ = write!(markdown, " {} |", cell(s));
                            }
                            None => markdown.push_str(" – |"),
                        }
                    }
                    for peer in &peers {
                        let shown = direction.is_some() && key != "errors";
                        match ratio(stats.get(OURS), stats.get(peer)).filter(|_| shown) {
                            Some(r) => {
                                let _ = write!(markdown, " {r:.2}× |");
                            }
                            None => markdown.push_str(" – |"),
                        }
                    }
                    markdown.push('\n');
                }
            }
        }
        if figure == "resumption" {
            for cert in certs.keys() {
                for (proxy, lowest) in invalid_resumption(&grouped, cert) {
                    let _ = write!(
                        markdown,
                        "\n**Invalid** ({cert}, {proxy}): a resumed run had only {lowest:.1}% of its handshakes resumed (at least {:.0}% needed), so its resumed figures do not measure resumption.\n",
                        crate::figures::MIN_RESUMED_PCT
                    );
                }
            }
        }
        markdown.push('\n');
    }
    Report { markdown, charts }
}

fn median_of(grouped: &Grouped, path: [&str; 5]) -> Option<Stats> {
    let [figure, cert, variant, metric, proxy] = path;
    grouped
        .get(figure)?
        .get(cert)?
        .get(variant)?
        .get(metric)?
        .get(proxy)
        .and_then(|values| Stats::of(values))
}

/// The issue's targets, judged from the ECDSA medians.
fn targets(grouped: &Grouped) -> String {
    let mut rows: Vec<(String, String, Option<bool>)> = Vec::new();
    let m = |figure: &str, variant: &str, metric: &str, proxy: &str| {
        median_of(grouped, [figure, "ecdsa", variant, metric, proxy]).map(|s| s.median)
    };
    let mut check = |what: String, ours: Option<f64>, bound: Option<f64>, le: bool, note: &str| {
        let (shown, verdict) = match (ours, bound) {
            (Some(ours), Some(bound)) => (
                format!("{} vs {}{note}", number(ours), number(bound)),
                Some(if le { ours <= bound } else { ours >= bound }),
            ),
            _ => ("not measured".to_string(), None),
        };
        rows.push((what, shown, verdict));
    };

    let times = |value: Option<f64>, factor: f64| value.map(|v| v * factor);
    let client_bound = m("implicit", "imap", "client_cpu_pct", OURS)
        .filter(|pct| *pct >= 90.0)
        .map(|pct| format!(" (load generator core at {pct:.0}%)"))
        .unwrap_or_default();
    check(
        "implicit: CPU per handshake ≤ 0.5× HAProxy".into(),
        m("implicit", "imap", "cpu_us_per_session", OURS),
        times(m("implicit", "imap", "cpu_us_per_session", "haproxy"), 0.5),
        true,
        " µs",
    );
    check(
        "implicit: sessions/s ≥ 1.5× HAProxy".into(),
        m("implicit", "imap", "sessions_per_s", OURS),
        times(m("implicit", "imap", "sessions_per_s", "haproxy"), 1.5),
        false,
        &client_bound,
    );
    for (protocol, factor) in [("imap", 10.0), ("smtp", 10.0), ("pop3", 2.0)] {
        check(
            format!("STARTTLS {protocol}: sessions/s ≥ {factor}× stunnel"),
            m("starttls", protocol, "sessions_per_s", OURS),
            times(m("starttls", protocol, "sessions_per_s", "stunnel"), factor),
            false,
            "",
        );
    }
    for protocol in ["imap", "pop3", "smtp"] {
        check(
            format!("STARTTLS {protocol}: CPU per session ≤ 1.2× our implicit"),
            m("starttls", protocol, "cpu_us_per_session", OURS),
            times(m("implicit", "imap", "cpu_us_per_session", OURS), 1.2),
            true,
            " µs",
        );
    }
    for metric in ["added_p50_us", "added_p99_us"] {
        let better = PEERS
            .iter()
            .filter_map(|peer| m("latency", "noop", metric, peer))
            .reduce(f64::min);
        check(
            format!(
                "NOOP added round trip {}: ≤ the better of HAProxy and stunnel",
                if metric == "added_p50_us" {
                    "p50"
                } else {
                    "p99"
                }
            ),
            m("latency", "noop", metric, OURS),
            better,
            true,
            " µs",
        );
    }
    for variant in ["echo-1", "echo-8", "data-1", "data-8"] {
        check(
            format!("bulk {variant}: MB/s ≥ 1.5× stunnel"),
            m("bulk", variant, "mb_per_s", OURS),
            times(m("bulk", variant, "mb_per_s", "stunnel"), 1.5),
            false,
            " MB/s",
        );
    }
    // Figure 6: only from runs that resumed.
    let invalid = invalid_resumption(grouped, "ecdsa");
    let invalid_of = |proxies: &[&str]| -> Option<String> {
        let named: Vec<String> = invalid
            .iter()
            .filter(|(proxy, _)| proxies.contains(&proxy.as_str()))
            .map(|(proxy, lowest)| format!("{proxy} resumed {lowest:.1}%"))
            .collect();
        (!named.is_empty()).then(|| named.join(", "))
    };
    let resumed_rate = "resumption: resumed sessions/s ≥ 1.5× HAProxy";
    let resumed_cpu = "resumption: CPU per resumed session ≤ 0.5× our CPU per full handshake";
    check(
        resumed_rate.into(),
        m("resumption", "resumed", "sessions_per_s", OURS),
        times(m("resumption", "resumed", "sessions_per_s", "haproxy"), 1.5),
        false,
        "",
    );
    check(
        resumed_cpu.into(),
        m("resumption", "resumed", "cpu_us_per_session", OURS),
        times(m("resumption", "full", "cpu_us_per_session", OURS), 0.5),
        true,
        " µs",
    );
    let invalid_rows: Vec<(&str, String)> = [
        (resumed_rate, &[OURS, "haproxy"][..]),
        (resumed_cpu, &[OURS][..]),
    ]
    .into_iter()
    .filter_map(|(what, proxies)| invalid_of(proxies).map(|why| (what, why)))
    .collect();
    for variant in ["idle-login", "idle-greeting"] {
        if m("memory", variant, "kib_per_session", OURS).is_some() {
            check(
                format!("memory ({variant}): ≤ 12 KiB per idle TLS session"),
                m("memory", variant, "kib_per_session", OURS),
                Some(12.0),
                true,
                " KiB",
            );
            check(
                format!("memory ({variant}): 10,000 idle TLS sessions held"),
                m("memory", variant, "sessions_held", OURS),
                Some(10_000.0),
                false,
                "",
            );
        }
    }
    let mut text = String::from("| target | ours vs bound | verdict |\n|---|---|---|\n");
    for (what, shown, verdict) in rows {
        let verdict = match (verdict, invalid_rows.iter().find(|(row, _)| *row == what)) {
            (_, Some((_, why))) => format!("**invalid** ({why})"),
            (Some(true), None) => "met".into(),
            (Some(false), None) => "**missed**".into(),
            (None, None) => "–".into(),
        };
        let _ = writeln!(text, "| {what} | {shown} | {verdict} |");
    }
    text
}

/// One group of bars (e.g. "imap") in a chart.
struct Group {
    label: String,
    /// One per series, in series order.
    values: Vec<Option<Stats>>,
}

fn color(proxy: &str) -> &'static str {
    match proxy {
        "ours" => "#1f6fb2",
        "haproxy" => "#e07b39",
        "stunnel" => "#5a9e4b",
        "direct" => "#999999",
        _ => "#7d5ba6",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A round axis maximum and its tick step.
fn axis(max: f64) -> (f64, f64) {
    if max <= 0.0 {
        return (1.0, 0.2);
    }
    let raw = max / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    ((max / step).ceil() * step, step)
}

/// A grouped bar chart: bar = median, whisker = min–max.
fn bar_chart(title: &str, unit: &str, series: &[String], groups: &[Group]) -> String {
    let (width, height) = (760.0, 380.0);
    let (left, right, top, bottom) = (70.0, 20.0, 56.0, 50.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let max = groups
        .iter()
        .flat_map(|g| g.values.iter().flatten())
        .map(|s| s.max)
        .fold(0.0, f64::max);
    let (axis_max, step) = axis(max);
    let y = |value: f64| top + plot_h - plot_h * value / axis_max;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="20" font-size="15" font-weight="bold">{}</text>"#,
        left,
        escape(title)
    );
    let mut tick = 0.0;
    while tick <= axis_max + step / 2.0 {
        let ty = y(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            left + plot_w,
            left - 6.0,
            ty + 4.0,
            number(tick)
        );
        tick += step;
    }
    let _ = writeln!(
        svg,
        r##"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle" fill="#333">{}</text>"##,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        escape(unit)
    );
    // Legend.
    let mut lx = left;
    for name in series {
        let _ = writeln!(
            svg,
            r#"<rect x="{lx:.1}" y="30" width="12" height="12" fill="{}"/><text x="{:.1}" y="40">{}</text>"#,
            color(name),
            lx + 16.0,
            escape(name)
        );
        lx += 24.0 + 8.0 * name.len() as f64;
    }
    let group_w = plot_w / groups.len().max(1) as f64;
    let bar_w = (group_w * 0.8 / series.len().max(1) as f64).min(60.0);
    for (gi, group) in groups.iter().enumerate() {
        let gx = left + gi as f64 * group_w;
        let start = gx + (group_w - bar_w * series.len() as f64) / 2.0;
        for (si, value) in group.values.iter().enumerate() {
            let Some(stats) = value else { continue };
            let bx = start + si as f64 * bar_w;
            let by = y(stats.median);
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"#,
                bx + 2.0,
                bar_w - 4.0,
                (top + plot_h - by).max(0.0),
                color(&series[si])
            );
            let cx = bx + bar_w / 2.0;
            if stats.max > stats.min {
                let _ = writeln!(
                    svg,
                    r##"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="#222"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#222"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#222"/>"##,
                    y(stats.min),
                    y(stats.max),
                    cx - 4.0,
                    y(stats.min),
                    cx + 4.0,
                    y(stats.min),
                    cx - 4.0,
                    y(stats.max),
                    cx + 4.0,
                    y(stats.max)
                );
            }
            let _ = writeln!(
                svg,
                r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#222">{}</text>"##,
                y(stats.max) - 4.0,
                number(stats.median)
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">{}</text>"##,
            gx + group_w / 2.0,
            top + plot_h + 18.0,
            escape(&group.label)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        top + plot_h,
        left + plot_w,
        top + plot_h
    );
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10" fill="#777">bar: median; whisker: min–max</text>"##,
        left + plot_w,
        height - 8.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// (figure, variant, metric, group label) → one chart.
fn chart(
    grouped: &Grouped,
    cert: &str,
    title: &str,
    unit: &str,
    bars: &[(&str, &str, &str, String)],
) -> Option<String> {
    let mut proxies = Vec::new();
    for (figure, variant, metric, _) in bars {
        if let Some(by_proxy) = grouped
            .get(*figure)
            .and_then(|c| c.get(cert))
            .and_then(|v| v.get(*variant))
            .and_then(|m| m.get(*metric))
        {
            proxies.extend(by_proxy.keys().cloned());
        }
    }
    let series: Vec<String> = proxy_order(proxies.into_iter())
        .into_iter()
        .filter(|p| p != "direct")
        .collect();
    if series.is_empty() {
        return None;
    }
    let groups: Vec<Group> = bars
        .iter()
        .map(|(figure, variant, metric, label)| Group {
            label: label.clone(),
            values: series
                .iter()
                .map(|proxy| median_of(grouped, [figure, cert, variant, metric, proxy]))
                .collect(),
        })
        .filter(|g| g.values.iter().any(Option::is_some))
        .collect();
    if groups.is_empty() {
        return None;
    }
    Some(bar_chart(title, unit, &series, &groups))
}

fn charts(grouped: &Grouped) -> Vec<(String, String)> {
    let mut charts = Vec::new();
    let certs: Vec<String> = grouped
        .values()
        .flat_map(|c| c.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for cert in &certs {
        let handshakes = [
            ("implicit", "imap", "IMAP implicit"),
            ("starttls", "imap", "IMAP STARTTLS"),
            ("starttls", "pop3", "POP3 STARTTLS"),
            ("starttls", "smtp", "SMTP STARTTLS"),
        ];
        let bars = |metric: &'static str| -> Vec<(&str, &str, &str, String)> {
            handshakes
                .iter()
                .map(|(f, v, l)| (*f, *v, metric, l.to_string()))
                .collect()
        };
        let key = cert.to_uppercase();
        if let Some(svg) = chart(
            grouped,
            cert,
            &format!("Full-handshake sessions per second ({key}, one proxy core)"),
            "sessions/s (higher is better)",
            &bars("sessions_per_s"),
        ) {
            charts.push((format!("implicit-starttls-sessions-{cert}.svg"), svg));
        }
        if let Some(svg) = chart(
            grouped,
            cert,
            &format!("Proxy CPU time per session ({key})"),
            "µs per session (lower is better)",
            &bars("cpu_us_per_session"),
        ) {
            charts.push((format!("implicit-starttls-cpu-{cert}.svg"), svg));
        }
        let latency = vec![
            ("latency", "noop", "added_p50_us", "added p50".to_string()),
            ("latency", "noop", "added_p99_us", "added p99".to_string()),
        ];
        if let Some(svg) = chart(
            grouped,
            cert,
            &format!("IMAP NOOP round trip added over direct ({key})"),
            "µs (lower is better)",
            &latency,
        ) {
            charts.push((format!("latency-{cert}.svg"), svg));
        }
        let bulk: Vec<(&str, &str, &str, String)> = [
            ("echo-1", "echo, 1 conn (each way)"),
            ("echo-8", "echo, 8 conns (each way)"),
            ("data-1", "SMTP DATA, 1 conn"),
            ("data-8", "SMTP DATA, 8 conns"),
        ]
        .iter()
        .map(|(v, l)| ("bulk", *v, "mb_per_s", l.to_string()))
        .collect();
        if let Some(svg) = chart(
            grouped,
            cert,
            &format!("Bulk throughput ({key})"),
            "MB/s (higher is better)",
            &bulk,
        ) {
            charts.push((format!("bulk-{cert}.svg"), svg));
        }
        let memory: Vec<(&str, &str, &str, String)> = ["idle-login", "idle-greeting"]
            .iter()
            .map(|v| ("memory", *v, "kib_per_session", v.to_string()))
            .collect();
        if let Some(svg) = chart(
            grouped,
            cert,
            &format!("Proxy memory per idle TLS session ({key})"),
            "KiB per session (lower is better)",
            &memory,
        ) {
            charts.push((format!("memory-{cert}.svg"), svg));
        }
        let resumption = |metric: &'static str| -> Vec<(&str, &str, &str, String)> {
            [("resumed", "resumed"), ("full", "full handshake")]
                .iter()
                .map(|(v, l)| ("resumption", *v, metric, l.to_string()))
                .collect()
        };
        if let Some(svg) = chart(
            grouped,
            cert,
            &format!("TLS 1.3 sessions per second, resumed and full ({key}, one core)"),
            "sessions/s (higher is better)",
            &resumption("sessions_per_s"),
        ) {
            charts.push((format!("resumption-sessions-{cert}.svg"), svg));
        }
        if let Some(svg) = chart(
            grouped,
            cert,
            &format!("Proxy CPU time per session, resumed and full ({key})"),
            "µs per session (lower is better)",
            &resumption("cpu_us_per_session"),
        ) {
            charts.push((format!("resumption-cpu-{cert}.svg"), svg));
        }
        let fleet_variants: Vec<String> = grouped
            .get("fleet")
            .and_then(|c| c.get(cert.as_str()))
            .map(|v| v.keys().cloned().collect())
            .unwrap_or_default();
        let fleet: Vec<(&str, &str, &str, String)> = fleet_variants
            .iter()
            .map(|v| ("fleet", v.as_str(), "cpu_us_per_session", v.clone()))
            .collect();
        if let Some(svg) = chart(
            grouped,
            cert,
            &format!("Fleet CPU time per reconnecting session ({key})"),
            "µs per session, all replicas (lower is better)",
            &fleet,
        ) {
            charts.push((format!("fleet-cpu-{cert}.svg"), svg));
        }
    }
    charts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        figure: &str,
        variant: &str,
        metric: &str,
        proxy: &str,
        rep: u32,
        value: f64,
    ) -> Record {
        Record {
            figure: figure.into(),
            variant: variant.into(),
            metric: metric.into(),
            proxy: proxy.into(),
            cert: "ecdsa".into(),
            rep,
            value,
        }
    }

    #[test]
    fn medians_and_ranges() {
        let stats = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((stats.median, stats.min, stats.max), (2.0, 1.0, 3.0));
        assert_eq!(Stats::of(&[1.0, 2.0, 4.0, 10.0]).unwrap().median, 3.0);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(2170.4), "2,170");
        assert_eq!(number(1234567.0), "1,234,567");
        assert_eq!(number(463.2), "463");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(0.823), "0.82");
        assert_eq!(number(-1500.0), "-1,500");
    }

    #[test]
    fn a_report_has_tables_ratios_targets_and_charts() {
        let mut records = Vec::new();
        for rep in 1..=3 {
            let r = rep as f64;
            records.push(record(
                "implicit",
                "imap",
                "sessions_per_s",
                "ours",
                rep,
                4000.0 + r,
            ));
            records.push(record(
                "implicit",
                "imap",
                "sessions_per_s",
                "haproxy",
                rep,
                2000.0 + r,
            ));
            records.push(record(
                "implicit",
                "imap",
                "cpu_us_per_session",
                "ours",
                rep,
                200.0,
            ));
            records.push(record(
                "implicit",
                "imap",
                "cpu_us_per_session",
                "haproxy",
                rep,
                460.0,
            ));
            records.push(record("latency", "noop", "p50_us", "direct", rep, 50.0));
            records.push(record("latency", "noop", "p50_us", "ours", rep, 150.0));
            records.push(record("latency", "noop", "p50_us", "haproxy", rep, 210.0));
        }
        let report = render(&records, "charts/");
        let text = &report.markdown;
        assert!(text.contains("4,002 [4,001–4,003]"), "{text}");
        assert!(text.contains("2.00×"), "{text}");
        assert!(
            text.contains("| implicit: CPU per handshake ≤ 0.5× HAProxy | 200 vs 230 µs | met |"),
            "{text}"
        );
        assert!(
            text.contains("| implicit: sessions/s ≥ 1.5× HAProxy | 4,002 vs 3,003 | met |"),
            "{text}"
        );
        // Added latency: 150 - 50 for ours, 210 - 50 for HAProxy.
        assert!(
            text.contains("| ecdsa | noop | added p50 µs (over direct) ↓ | 100 | 160 | – |"),
            "{text}"
        );
        assert!(report
            .charts
            .iter()
            .any(|(name, svg)| name == "implicit-starttls-sessions-ecdsa.svg"
                && svg.starts_with("<svg")));
        assert!(
            text.contains("](charts/implicit-starttls-sessions-ecdsa.svg)"),
            "{text}"
        );
    }

    #[test]
    fn resumption_targets_and_runs_that_did_not_resume() {
        let mut records = Vec::new();
        for (variant, metric, proxy, value) in [
            ("resumed", "sessions_per_s", "ours", 4000.0),
            ("resumed", "sessions_per_s", "haproxy", 2000.0),
            ("resumed", "resumed_pct", "ours", 100.0),
            ("resumed", "resumed_pct", "haproxy", 66.7),
            ("resumed", "cpu_us_per_session", "ours", 200.0),
            ("full", "cpu_us_per_session", "ours", 250.0),
        ] {
            records.push(record("resumption", variant, metric, proxy, 1, value));
        }
        let text = render(&records, "").markdown;
        assert!(
            text.contains("| resumption: resumed sessions/s ≥ 1.5× HAProxy | 4,000 vs 3,000 | **invalid** (haproxy resumed 66.7%) |"),
            "{text}"
        );
        assert!(
            text.contains("| resumption: CPU per resumed session ≤ 0.5× our CPU per full handshake | 200 vs 125 µs | **missed** |"),
            "{text}"
        );
        assert!(text.contains("**Invalid** (ecdsa, haproxy)"), "{text}");
        assert!(!text.contains("**Invalid** (ecdsa, ours)"), "{text}");
    }

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(axis(2170.0), (2500.0, 500.0));
        assert_eq!(axis(9.0), (10.0, 2.0));
        assert_eq!(axis(0.0), (1.0, 0.2));
    }
}
