//! The `mail-tls-proxy` command line: parse, set up logging, hand over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mail_tls_proxy::config::Config;
use mail_tls_proxy::server::{self, Proxy};
use mail_tls_proxy::tls::certs::generate_pair;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "mail-tls-proxy",
    version,
    about = "TLS front door for plaintext SMTP, IMAP and POP3 servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The configuration file (TOML).
        #[arg(long, env = "MAIL_TLS_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Load and validate the configuration and every certificate, print what
    /// would be served, and exit (non-zero on any error).
    Check {
        #[arg(long, env = "MAIL_TLS_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Certificate helpers for development and tests.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Write a self-signed ECDSA P-256 pair (fullchain.pem, privkey.pem) to DIR.
    SelfSigned {
        /// A DNS name for the certificate; repeat for more.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// The folder to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Cert {
            command: CertCommand::SelfSigned { names, out },
        } => write_self_signed(&names, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mail-tls-proxy: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter =
        EnvFilter::try_from_env("MAIL_TLS_PROXY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let proxy = Proxy::bind(&config).await?;
        proxy.run(shutdown_signal()).await;
        Ok(())
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let certificate = server::load_certificate(&config)?;
    println!("configuration {}: OK", path.display());
    match &certificate.files {
        Some(files) => println!(
            "certificate: {} (chain of {}), key {}",
            files.cert.display(),
            certificate.certified_key.cert.len(),
            files.key.display()
        ),
        None => println!(
            "certificate: none configured; a self-signed one for {:?} is generated at start-up (clients will not trust it)",
            config.hostname
        ),
    }
    for listener in &config.listeners {
        println!(
            "listener {}: {} with {} TLS on {} -> backend {}",
            listener.name, listener.protocol, listener.tls, listener.listen, listener.backend
        );
    }
    match config.metrics_listen {
        Some(address) => println!("metrics: http://{address}/metrics, /healthz, /readyz"),
        None => println!("metrics: not served (no [metrics] listen)"),
    }
    Ok(())
}

fn write_self_signed(names: &[String], out: &Path) -> anyhow::Result<()> {
    let pair = generate_pair(names)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cert = out.join("fullchain.pem");
    let key = out.join("privkey.pem");
    std::fs::write(&cert, pair.cert_pem)
        .with_context(|| format!("cannot write {}", cert.display()))?;
    write_private(&key, pair.key_pem.as_bytes())?;
    println!("wrote {} and {}", cert.display(), key.display());
    Ok(())
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}
