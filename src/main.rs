//! The `mail-tls-proxy` command line: parse, set up logging, hand over to the library.
//!
//! Exit status: 0 on success; 78 (`EX_CONFIG` of sysexits.h) when `run` or
//! `check` fails because of the configuration (the file, or a certificate
//! file it names), which a restart cannot cure; 1 for every other failure
//! (a port in use, an open relay behind a listener, a failed health check).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use mail_tls_proxy::config::{Config, ConfigError};
use mail_tls_proxy::logging::{self, LogFormat};
use mail_tls_proxy::server::{self, Proxy, StartError};
use mail_tls_proxy::systemd::SystemdNotifier;
use mail_tls_proxy::tls::{generate_pair, CertificateError, TicketKeyError};
use tracing_subscriber::EnvFilter;

/// The configuration file read when neither `--config` nor
/// `MAIL_TLS_PROXY_CONFIG` names one.
const DEFAULT_CONFIG: &str = "/etc/mail-tls-proxy/config.toml";

/// `EX_CONFIG`: the configuration is at fault (systemd's unit does not
/// restart on it: `RestartPreventExitStatus=78`).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "mail-tls-proxy",
    version,
    about = "TLS front door for plaintext SMTP, IMAP and POP3 servers"
)]
struct Cli {
    /// Log lines as text, or as one JSON object per line (timestamp, level,
    /// message, listener, peer, connection_id, ...). The filter comes from
    /// MAIL_TLS_PROXY_LOG (default: info).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "MAIL_TLS_PROXY_LOG_FORMAT"
    )]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy. Under systemd (Type=notify) it reports readiness,
    /// reloads and stopping, and feeds the watchdog.
    Run {
        #[command(flatten)]
        file: ConfigFile,
    },
    /// Load and validate the configuration and every certificate, ask every
    /// SMTP backend whether it would relay for anyone arriving through the
    /// proxy, print what would be served, and exit (78 on a configuration
    /// error, 1 on any other, such as an open relay under
    /// relay_check = "refuse").
    Check {
        #[command(flatten)]
        file: ConfigFile,
    },
    /// GET the admin endpoint's /readyz (or --url) and exit 0 on status 200,
    /// else 1 with the reason: a health check that needs no curl.
    Healthcheck {
        /// The URL to GET. Default: /readyz on the configuration's
        /// [metrics] listen address (0.0.0.0 and [::] are asked on
        /// loopback).
        #[arg(long, env = "MAIL_TLS_PROXY_HEALTHCHECK_URL")]
        url: Option<String>,
        #[command(flatten)]
        file: ConfigFile,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Certificate helpers for development and tests.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Session ticket keys shared by a fleet of proxies ([tls] ticket_keys).
    Tickets {
        #[command(subcommand)]
        command: TicketsCommand,
    },
    /// Certificates from the [acme] CA.
    Acme {
        #[command(subcommand)]
        command: AcmeCommand,
    },
    /// Print the DANE TLSA records of the served keys: one line
    /// `_PORT._tcp.NAME. IN TLSA 3 1 1 HEX` (SHA-256 of the public key) per
    /// certificate, DNS name and SMTP listener port; `;` lines are comments.
    Tlsa {
        #[command(flatten)]
        file: ConfigFile,
    },
    /// Write the manual pages (man/) and the bash, zsh and fish completions
    /// (completions/) made from this command line into OUT, for packaging.
    #[command(hide = true)]
    GenerateAssets {
        /// The folder to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Where the configuration file is.
#[derive(Args)]
struct ConfigFile {
    /// The configuration file (TOML) [default: /etc/mail-tls-proxy/config.toml]
    #[arg(short, long, env = "MAIL_TLS_PROXY_CONFIG")]
    config: Option<PathBuf>,
}

impl ConfigFile {
    /// The file named on the command line or in the environment, else the
    /// default.
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
    }

    /// Reads and validates the file; the error says when it was the default
    /// that was tried.
    fn load(&self) -> anyhow::Result<(PathBuf, Config)> {
        let path = self.path();
        let loaded = Config::load(&path);
        let config = match self.config {
            Some(_) => loaded?,
            None => loaded.with_context(|| {
                format!("no --config (-c) or MAIL_TLS_PROXY_CONFIG given, so the default {DEFAULT_CONFIG} was read")
            })?,
        };
        Ok((path, config))
    }
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

#[derive(Subcommand)]
enum AcmeCommand {
    /// Ask the running proxy (the instance holding state_dir/lock) to renew
    /// now: leaves state_dir/renew-requests/<first name>, which it picks up
    /// and removes within a second or so.
    Renew {
        #[command(flatten)]
        file: ConfigFile,
        /// Renew only the certificate that lists this name (default: every
        /// acme certificate).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum TicketsCommand {
    /// Append a fresh random key to a ticket key file (creating it, mode
    /// 0600, if missing) and drop the oldest keys beyond --keep. The file is
    /// replaced atomically (a new file renamed over it, keeping its mode
    /// and owner); proxies following it pick the keys up on their own.
    Rotate {
        /// The key file ([tls] ticket_keys).
        #[arg(long)]
        file: PathBuf,
        /// Keys to keep, the new one included: it seals new tickets, the
        /// others still open the tickets they sealed.
        #[arg(long, default_value_t = mail_tls_proxy::tls::tickets::DEFAULT_KEEP, value_parser = clap::value_parser!(u16).range(1..))]
        keep: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // A health check answers 0 or 1 and nothing else (container runtimes
    // reserve other codes); `run` and `check` tell configuration errors apart.
    let tells_config_errors = matches!(cli.command, Command::Run { .. } | Command::Check { .. });
    let result = match cli.command {
        Command::Run { file } => run(&file),
        Command::Check { file } => check(&file),
        Command::Healthcheck { url, file, timeout } => healthcheck(url, &file, timeout),
        Command::Cert {
            command: CertCommand::SelfSigned { names, out },
        } => write_self_signed(&names, &out),
        Command::Tickets {
            command: TicketsCommand::Rotate { file, keep },
        } => rotate_ticket_keys(&file, usize::from(keep)),
        Command::Acme {
            command: AcmeCommand::Renew { file, name },
        } => request_acme_renewal(&file, name.as_deref()),
        Command::Tlsa { file } => print_tlsa(&file),
        Command::GenerateAssets { out } => generate_assets(&out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mail-tls-proxy: {error:#}");
            if tells_config_errors && is_configuration_error(&error) {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Whether the configuration is at fault: the file cannot be read or is
/// invalid, or a certificate or key file it names cannot be read, parsed or
/// paired, or its session ticket key file cannot be read or is invalid. Fixing the files is the only cure, so a service manager should
/// not restart into the same error. Failing to bind a port, an open relay
/// behind a listener, or failing to generate a key are not: they can pass
/// on their own.
fn is_configuration_error(error: &anyhow::Error) -> bool {
    let certificate_files =
        |error: &CertificateError| !matches!(error, CertificateError::Generate { .. });
    error.chain().any(|cause| {
        cause.is::<ConfigError>()
            || cause
                .downcast_ref::<TicketKeyError>()
                .is_some_and(TicketKeyError::is_file_error)
            || matches!(
                cause.downcast_ref::<StartError>(),
                Some(StartError::TicketKeys(error)) if error.is_file_error()
            )
            || cause
                .downcast_ref::<CertificateError>()
                .is_some_and(certificate_files)
            || matches!(
                cause.downcast_ref::<StartError>(),
                Some(StartError::Certificate(error)) if certificate_files(error)
            )
    })
}

fn init_logging(format: LogFormatArg) {
    let filter =
        EnvFilter::try_from_env("MAIL_TLS_PROXY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    };
    logging::init(format, filter);
}

/// GETs `url`, or the configuration's own `/readyz` when no URL is given.
fn healthcheck(url: Option<String>, file: &ConfigFile, timeout: u64) -> anyhow::Result<()> {
    let url = match url {
        Some(url) => url,
        None => {
            let (path, config) = file.load()?;
            let listen = config.metrics_listen.with_context(|| {
                format!(
                    "{}: no [metrics] listen, so there is no /readyz to ask (configure one, or give --url)",
                    path.display()
                )
            })?;
            mail_tls_proxy::healthcheck::readyz_url(listen)
        }
    };
    let url = url.as_str();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match runtime.block_on(mail_tls_proxy::healthcheck::get(
        url,
        std::time::Duration::from_secs(timeout.max(1)),
    )) {
        Ok(body) => {
            println!("{url}: {body}");
            Ok(())
        }
        Err(reason) => Err(anyhow::anyhow!("{url}: {reason}")),
    }
}

fn run(file: &ConfigFile) -> anyhow::Result<()> {
    let (path, config) = file.load()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Handlers first: a signal that arrives once the ports are open must
        // start a drain, never kill the process outright.
        let mut signals = ShutdownSignals::new().context("cannot listen for SIGTERM and SIGINT")?;
        let systemd = SystemdNotifier::new();
        // Fed from the start: binding and the relay checks take a moment.
        // The task runs on this runtime, so a wedged runtime starves it.
        let _watchdog = systemd.spawn_watchdog();
        let proxy = Proxy::bind(&config)
            .await?
            .reload_from(path)
            .supervised_by(Arc::new(systemd));
        let (first_signal, first_signal_received) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            signals.next().await;
            let _ = first_signal.send(());
            signals.next().await;
            tracing::warn!("second signal: exiting at once without draining");
            std::process::exit(1);
        });
        proxy
            .run(async move {
                let _ = first_signal_received.await;
            })
            .await;
        Ok(())
    })
}

/// SIGTERM and SIGINT, as one stream of shutdown requests.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => tracing::info!("SIGTERM received"),
            _ = self.interrupt.recv() => tracing::info!("SIGINT received"),
        }
    }
}

fn check(file: &ConfigFile) -> anyhow::Result<()> {
    let (path, config) = file.load()?;
    let certificates = server::load_certificates(&config)?;
    let ticket_keys = server::load_ticket_keys(&config)?;
    println!("configuration {}: OK", path.display());
    print_certificates(&config, &certificates.certificates());
    for line in mail_tls_proxy::acme::operator::status_lines(&config) {
        println!("{line}");
    }
    let lifetime = config.tls.ticket_lifetime.as_secs();
    match ticket_keys {
        Some(keys) => println!(
            "session tickets: {} keys from {} (newest {} seals new tickets), good for {lifetime} s",
            keys.len(),
            keys.path().display(),
            keys.newest_name()
        ),
        None => println!(
            "session tickets: keys of this process only (no [tls] ticket_keys: other replicas cannot resume its sessions), good for {lifetime} s"
        ),
    }
    for listener in &config.listeners {
        println!(
            "listener {}: {} with {} TLS on {} -> backend {}",
            listener.name, listener.protocol, listener.tls, listener.listen, listener.backend
        );
        if let Some(requirement) = listener
            .client_identity
            .backend_requirement(listener.protocol)
        {
            println!(
                "warning: listener {}: client_identity = \"{}\": the backend must be configured to expect it: {requirement}",
                listener.name, listener.client_identity
            );
        }
    }
    match config.metrics_listen {
        Some(address) => println!("metrics: http://{address}/metrics, /healthz, /readyz"),
        None => println!("metrics: not served (no [metrics] listen)"),
    }
    check_relays(&config)
}

/// The relay guard's start-up checks, one line per SMTP listener; an open
/// backend under `relay_check = "refuse"` is the error `run` would stop with.
fn check_relays(config: &Config) -> anyhow::Result<()> {
    use mail_tls_proxy::config::RelayCheck;
    use mail_tls_proxy::relay_guard::{self, Verdict};
    let targets = relay_guard::targets(config);
    let findings = if targets.is_empty() {
        Vec::new()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(relay_guard::check_all(targets))
    };
    let mut refusal = None;
    for listener in &config.listeners {
        if !listener.protocol.relays_mail() {
            continue;
        }
        let name = &listener.name;
        let Some(finding) = findings
            .iter()
            .find(|finding| &finding.target.listener == name)
        else {
            println!("relay check: listener {name}: off (relay_check = \"off\")");
            continue;
        };
        let verdict = &finding.verdict;
        match (verdict, finding.refusal()) {
            (Verdict::Open { .. }, Some(open)) => {
                println!("relay check: listener {name}: {verdict}");
                refusal.get_or_insert(open);
            }
            (Verdict::Open { .. }, None) => println!(
                "warning: relay check: listener {name}: {verdict}; relay_check = \"{}\": served anyway",
                RelayCheck::Warn.as_str()
            ),
            (Verdict::Unknown { .. }, _) => println!(
                "warning: relay check: listener {name}: {verdict}; the proxy starts anyway and asks again"
            ),
            (Verdict::Closed { .. }, _) => println!("relay check: listener {name}: {verdict}"),
        }
    }
    match refusal {
        Some(open) => Err(open.into()),
        None => Ok(()),
    }
}

/// One block per certificate: what it is for, until when, from where.
fn print_certificates(
    config: &Config,
    certificates: &[std::sync::Arc<mail_tls_proxy::tls::LoadedCertificate>],
) {
    use mail_tls_proxy::time::{format_unix_time, unix_now};
    use mail_tls_proxy::tls::Expiry;
    let now = unix_now();
    for (index, certificate) in certificates.iter().enumerate() {
        let role = if index == 0 { " (default)" } else { "" };
        match &certificate.files {
            Some(files) => println!(
                "certificate {}{role}: {} (chain of {}), key {}",
                index + 1,
                files.cert.display(),
                certificate.certified_key.cert.len(),
                files.key.display()
            ),
            None if config.acme.is_some() => println!(
                "certificate {}{role}: acme, no certificate issued yet: a self-signed placeholder is served (clients will not trust it)",
                index + 1
            ),
            None => println!(
                "certificate: none configured; a self-signed one for {:?} is generated at start-up (clients will not trust it)",
                config.hostname
            ),
        }
        let names = if certificate.names.is_empty() {
            "(no DNS names: served only as the default)".to_string()
        } else {
            certificate.names.join(", ")
        };
        println!("  names: {names}");
        let state = match certificate.expiry(now) {
            Expiry::Valid { days_left } => format!("valid, {days_left} days left"),
            Expiry::ExpiresSoon { days_left } => {
                format!("EXPIRES SOON: {days_left} days left, renew it")
            }
            Expiry::Expired { days_ago } => {
                format!("EXPIRED {days_ago} days ago: served anyway, but clients will refuse it")
            }
            Expiry::NotYetValid { days_until } => format!("NOT VALID YET for {days_until} days"),
        };
        println!(
            "  not after: {} ({state})",
            format_unix_time(certificate.not_after)
        );
    }
    let strict: Vec<&str> = config
        .listeners
        .iter()
        .filter(|listener| listener.sni_strict)
        .map(|listener| listener.name.as_str())
        .collect();
    if !strict.is_empty() {
        println!(
            "sni_strict: {} refuse handshakes for names no certificate covers",
            strict.join(", ")
        );
    }
}

/// `acme renew`: leaves a renewal request for the running proxy.
fn request_acme_renewal(file: &ConfigFile, name: Option<&str>) -> anyhow::Result<()> {
    let (path, config) = file.load()?;
    let requested = mail_tls_proxy::acme::operator::request_renewal(&config, name)
        .with_context(|| format!("{}", path.display()))?;
    for (certificate, request) in requested {
        println!(
            "renewal of {certificate} requested ({}): the running proxy that holds the issuance lock picks it up within a second or so",
            request.display()
        );
    }
    Ok(())
}

/// `tlsa`: the DANE records of what the configuration serves now.
fn print_tlsa(file: &ConfigFile) -> anyhow::Result<()> {
    let (_, config) = file.load()?;
    for line in mail_tls_proxy::acme::tlsa::tlsa_for_config(&config)? {
        println!("{line}");
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

/// `tickets rotate`: one line saying what the key file holds now.
fn rotate_ticket_keys(file: &Path, keep: usize) -> anyhow::Result<()> {
    let rotation = mail_tls_proxy::tls::tickets::rotate_key_file(file, keep)?;
    println!(
        "{}: {} new key {} seals new tickets; {} keys in the file, {} oldest dropped",
        rotation.path.display(),
        if rotation.created {
            "created;"
        } else {
            "rotated;"
        },
        rotation.newest_name,
        rotation.keys,
        rotation.dropped
    );
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

/// Writes one manual page for the command and one per visible subcommand
/// into `out/man/`, and the bash, zsh and fish completions into
/// `out/completions/`. Both are made from the command-line definition itself,
/// so they always describe the options this binary accepts.
fn generate_assets(out: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let man_dir = out.join("man");
    let completions_dir = out.join("completions");
    for dir in [&man_dir, &completions_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Built once, so each subcommand knows its full name (mail-tls-proxy-run).
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    write_manual_pages(&command, &man_dir)
        .with_context(|| format!("cannot write the manual pages into {}", man_dir.display()))?;
    let bin_name = env!("CARGO_BIN_NAME");
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut command = visible_command_line();
        clap_complete::generate_to(shell, &mut command, bin_name, &completions_dir)
            .with_context(|| format!("cannot write the {shell} completions"))?;
    }
    println!(
        "wrote manual pages to {} and shell completions to {}",
        man_dir.display(),
        completions_dir.display()
    );
    Ok(())
}

/// `command`'s manual page and those of its visible subcommands, each
/// footed with the product's name and version.
fn write_manual_pages(command: &clap::Command, dir: &Path) -> std::io::Result<()> {
    for subcommand in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        write_manual_pages(subcommand, dir)?;
    }
    clap_mangen::Man::new(command.clone())
        .source(concat!("mail-tls-proxy ", env!("CARGO_PKG_VERSION")))
        .manual("mail-tls-proxy manual")
        .generate_to(dir)
        .map(drop)
}

/// The command line as its users see it: the completion scripts would offer
/// hidden subcommands too (the manual pages leave them out by themselves).
fn visible_command_line() -> clap::Command {
    use clap::CommandFactory;
    let full = Cli::command();
    clap::Command::new(env!("CARGO_BIN_NAME"))
        .version(env!("CARGO_PKG_VERSION"))
        .about(full.get_about().cloned().unwrap_or_default())
        .args(full.get_arguments().cloned())
        .subcommands(
            full.get_subcommands()
                .filter(|subcommand| !subcommand.is_hide_set())
                .cloned(),
        )
}
