//! The benchmark's load generator: one figure per subcommand against one
//! target, printing result records (see `mail_tls_bench::record`) on stdout
//! and a human summary on stderr; `report` turns a file of records into the
//! comparison.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use mail_tls_bench::client::{self, Mode, Protocol};
use mail_tls_bench::figures::{self, Bulk, Context, IdleState, Window};
use mail_tls_bench::record::{Labels, Record};
use mail_tls_bench::report;

#[derive(Parser)]
#[command(
    name = "bench-loadgen",
    about = "Load generator for the mail TLS proxy benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The measured window of a run.
#[derive(ClapArgs, Clone)]
struct WindowArgs {
    /// Seconds of warm-up (not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
}

impl WindowArgs {
    fn measured(&self) -> Window {
        Window {
            warmup: seconds(self.warmup),
            measure: seconds(self.duration),
        }
    }
}

#[derive(ClapArgs, Clone)]
struct Common {
    /// host:port to load.
    #[arg(long)]
    target: SocketAddr,
    /// The proxy under test, for its CPU time and RSS.
    #[arg(long)]
    proxy_pid: Option<u32>,
    /// The backend (it shares the load generator's core).
    #[arg(long)]
    backend_pid: Option<u32>,
    /// More processes whose CPU counts as the proxy's (comma-separated):
    /// the other replicas of a fleet.
    #[arg(long, value_delimiter = ',')]
    replica_pids: Vec<u32>,
    /// PEM certificate the target must present (checked byte for byte).
    #[arg(long)]
    expect_cert: Option<PathBuf>,
    #[command(flatten)]
    labels: Labels,
}

#[derive(Subcommand)]
enum Command {
    /// Figures 1 and 2: full-handshake sessions per second.
    Sessions {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "implicit")]
        mode: Mode,
        #[arg(long, value_enum, default_value = "imap")]
        protocol: Protocol,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[command(flatten)]
        window: WindowArgs,
    },
    /// Figures 6 and 7: short implicit-TLS sessions (handshake, greeting,
    /// close), each resuming the slot's previous session or all full.
    Resumption {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "resumed")]
        handshakes: figures::Handshakes,
        #[arg(long, value_enum, default_value = "imap")]
        protocol: Protocol,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[command(flatten)]
        window: WindowArgs,
        /// The records' figure name.
        #[arg(long, default_value = "resumption")]
        figure: String,
        /// The records' variant (default: the handshake kind).
        #[arg(long)]
        variant: Option<String>,
        /// A resumed run below this share of resumed handshakes is invalid
        /// (0 for a fleet whose replicas do not share ticket keys).
        #[arg(long, default_value_t = figures::MIN_RESUMED_PCT)]
        min_resumed_pct: f64,
        /// Sessions/s the ticket pools are sized for, for a server that
        /// sends no new ticket on a resumed session.
        #[arg(long, default_value_t = figures::POOL_RATE)]
        pool_rate: f64,
    },
    /// Figure 3: IMAP NOOP round trips on one established session.
    Latency {
        #[command(flatten)]
        common: Common,
        /// implicit (through a proxy) or plain (the backend directly).
        #[arg(long, value_enum, default_value = "implicit")]
        mode: Mode,
        #[arg(long, default_value_t = 20_000)]
        samples: usize,
        /// Upper bound in seconds.
        #[arg(long, default_value_t = 20.0)]
        duration: f64,
    },
    /// Figure 4: bulk throughput (echo each way, or SMTP DATA one way).
    Bulk {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "implicit")]
        mode: Mode,
        #[arg(long, value_enum)]
        kind: Bulk,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[command(flatten)]
        window: WindowArgs,
    },
    /// Figure 5: the proxy's RSS at 0 and each count of idle TLS sessions.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Comma-separated session counts, ascending.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        counts: Vec<usize>,
        #[arg(long, value_enum, default_value = "login")]
        state: IdleState,
        /// Sessions opened at once.
        #[arg(long, default_value_t = 64)]
        open_concurrency: usize,
        /// Seconds to wait before reading the RSS at each count.
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
        /// Upper bound in seconds for opening all sessions.
        #[arg(long, default_value_t = 120.0)]
        duration: f64,
    },
    /// Renders a results file as Markdown tables and SVG charts.
    Report {
        /// The records (as printed by the other subcommands).
        #[arg(long)]
        results: PathBuf,
        /// Where to write report.md and the charts.
        #[arg(long)]
        out: PathBuf,
        /// How report.md links to the charts (a path prefix).
        #[arg(long, default_value = "")]
        chart_prefix: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::Report {
        results,
        out,
        chart_prefix,
    } = &cli.command
    {
        return write_report(results, out, chart_prefix);
    }
    mail_tls_bench::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let records = runtime.block_on(run(cli.command))?;
    for record in records {
        println!("{record}");
    }
    Ok(())
}

fn context(common: &Common) -> Result<Context> {
    Ok(Context {
        connector: client::connector(common.expect_cert.as_deref())?,
        labels: common.labels.clone(),
        proxy_pid: common.proxy_pid,
        backend_pid: common.backend_pid,
        replica_pids: common.replica_pids.clone(),
    })
}

fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value)
}

async fn run(command: Command) -> Result<Vec<Record>> {
    match command {
        Command::Sessions {
            common,
            mode,
            protocol,
            concurrency,
            window,
        } => {
            figures::sessions(
                &context(&common)?,
                common.target,
                mode,
                protocol,
                concurrency,
                window.measured(),
                Duration::from_secs(10),
            )
            .await
        }
        Command::Resumption {
            common,
            handshakes,
            protocol,
            concurrency,
            window,
            figure,
            variant,
            min_resumed_pct,
            pool_rate,
        } => {
            let run = figures::ResumptionRun {
                handshakes,
                protocol,
                concurrency,
                expect_cert: common.expect_cert.clone(),
                figure,
                variant: variant.unwrap_or_else(|| handshakes.name().to_string()),
                min_resumed_pct,
                pool_rate,
            };
            figures::resumption(
                &context(&common)?,
                common.target,
                &run,
                window.measured(),
                Duration::from_secs(10),
            )
            .await
        }
        Command::Latency {
            common,
            mode,
            samples,
            duration,
        } => {
            figures::latency(
                &context(&common)?,
                common.target,
                mode,
                samples,
                seconds(duration),
            )
            .await
        }
        Command::Bulk {
            common,
            mode,
            kind,
            connections,
            window,
        } => {
            figures::bulk(
                &context(&common)?,
                common.target,
                mode,
                kind,
                connections,
                window.measured(),
            )
            .await
        }
        Command::Idle {
            common,
            counts,
            state,
            open_concurrency,
            settle,
            duration,
        } => {
            figures::idle(
                &context(&common)?,
                common.target,
                &counts,
                state,
                open_concurrency,
                seconds(settle),
                seconds(duration),
            )
            .await
        }
        Command::Report { .. } => unreachable!("handled before the runtime starts"),
    }
}

fn write_report(results: &PathBuf, out: &PathBuf, chart_prefix: &str) -> Result<()> {
    let text = std::fs::read_to_string(results)
        .with_context(|| format!("cannot read {}", results.display()))?;
    let records = Record::parse_all(&text).with_context(|| results.display().to_string())?;
    let rendered = report::render(&records, chart_prefix);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("report.md"), &rendered.markdown)?;
    for (name, svg) in &rendered.charts {
        std::fs::write(out.join(name), svg)?;
    }
    print!("{}", rendered.markdown);
    Ok(())
}
