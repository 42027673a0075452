//! The benchmark's plaintext backend: IMAP, POP3, SMTP (with a DATA sink) and
//! an echo port, on one thread, until SIGTERM or SIGINT.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Parser;
use mail_tls_bench::backend::{self, Service};

#[derive(Parser)]
#[command(
    name = "bench-backend",
    about = "Minimal fast plaintext mail backend for benchmarks"
)]
struct Args {
    #[arg(long)]
    imap: Option<SocketAddr>,
    #[arg(long)]
    pop3: Option<SocketAddr>,
    #[arg(long)]
    smtp: Option<SocketAddr>,
    /// Greets with one line, then echoes every byte.
    #[arg(long)]
    echo: Option<SocketAddr>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    mail_tls_bench::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let services = [
            (args.imap, Service::Imap),
            (args.pop3, Service::Pop3),
            (args.smtp, Service::Smtp),
            (args.echo, Service::Echo),
        ];
        for (address, service) in services {
            let Some(address) = address else { continue };
            let listener = backend::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} ({})", service.name()))?;
            eprintln!("bench-backend: {} on {address}", service.name());
            tokio::spawn(backend::serve(listener, service));
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(())
    })
}
