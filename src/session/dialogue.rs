//! The inspection loop's I/O: reads from both sides into the session core
//! ([`super::core`]), writes what it asks, logs what it observed (policy
//! refusals at DEBUG, with the command word only), and waits where it says.
//! Every decision is the core's.

use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::protocol::{ClientIdentity, Inspector, Notice};

use super::access::{AccessRecord, EndedBy};
use super::core::{Action, CoreSettings, Ending, Failure, Observation, SessionCore};
use super::{relay, ListenerContext, SessionError, MAX_BACKEND_LINE, MAX_CLIENT_LINE};

/// How an inspection phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inspected {
    /// Upgrade the client connection now.
    StartTls,
    /// Copy bytes without parsing from now on.
    Passthrough,
    /// The dialogue is over: a peer closed, the machine said so (after the
    /// client's QUIT or LOGOUT: the client's end), or the proxy said
    /// goodbye because it is shutting down.
    Closed(EndedBy),
}

pub(crate) struct Dialogue<'a> {
    context: &'a ListenerContext,
    record: &'a AccessRecord,
    core: SessionCore,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl<'a> Dialogue<'a> {
    pub(crate) fn new(
        context: &'a ListenerContext,
        record: &'a AccessRecord,
        inspector: Box<dyn Inspector>,
    ) -> Self {
        let settings = CoreSettings {
            protocol: context.protocol,
            client_identity: context.client_identity,
            max_inspected_commands: context.max_inspected_commands,
            idle_timeout: context.idle_timeout,
            max_client_line: MAX_CLIENT_LINE,
            max_backend_line: MAX_BACKEND_LINE,
        };
        Self {
            context,
            record,
            core: SessionCore::new(settings, inspector, now()),
            shutdown: context.shutdown.clone(),
        }
    }

    /// Runs until the core ends the phase: TLS, pass-through or a close.
    pub(crate) async fn run<C>(
        &mut self,
        client: &mut C,
        backend: &mut TcpStream,
    ) -> Result<Inspected, SessionError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        // Set when the backend's connection failed: reported once the
        // client has had the protocol's answer.
        let mut backend_error = None;
        // Which peer's end of stream ended the dialogue, if one did.
        let mut closed_by = None;
        loop {
            if *self.shutdown.borrow() {
                self.core.shutdown_requested();
            }
            match self.core.poll(now()) {
                Action::Write => self.write(client, backend).await?,
                Action::End(ending) => {
                    return match (ending, backend_error) {
                        (_, Some(error)) => Err(SessionError::Backend(error)),
                        (Ending::StartTls, None) => Ok(Inspected::StartTls),
                        (Ending::Passthrough, None) => Ok(Inspected::Passthrough),
                        (Ending::Closed, None) => Ok(Inspected::Closed(closed_by.unwrap_or(
                            if *self.shutdown.borrow() {
                                EndedBy::Proxy
                            } else {
                                EndedBy::Client
                            },
                        ))),
                        (Ending::Failed(failure), None) => Err(self.error_of(failure)),
                    }
                }
                Action::Wait {
                    read_client,
                    deadline,
                } => {
                    let (client_lines, backend_lines) = self.core.input_buffers();
                    tokio::select! {
                        read = relay::read_lines(backend, backend_lines) => match read {
                            Ok(0) => {
                                closed_by = Some(EndedBy::Backend);
                                self.core.backend_closed();
                            }
                            Ok(_) => {}
                            Err(error) => {
                                backend_error = Some(error);
                                self.core.backend_closed();
                            }
                        },
                        read = relay::read_lines(client, client_lines), if read_client => match read {
                            Ok(0) => {
                                closed_by = Some(EndedBy::Client);
                                self.core.client_closed();
                            }
                            Ok(_) => {}
                            Err(error) => return Err(SessionError::Client(error)),
                        },
                        changed = self.shutdown.changed() => {
                            // The proxy itself is gone when the sender is.
                            if changed.is_err() {
                                self.core.shutdown_requested();
                            }
                        }
                        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                            self.core.idle_timeout();
                        }
                    }
                }
            }
        }
    }

    fn error_of(&self, failure: Failure) -> SessionError {
        match failure {
            Failure::ClientLineTooLong(max) => SessionError::ClientLineTooLong(max),
            Failure::BackendLineTooLong(max) => SessionError::BackendLineTooLong(max),
            Failure::TooManyCommands(max) => SessionError::TooManyCommands(max),
            Failure::IdleTimeout(after) => SessionError::IdleTimeout(after),
            Failure::ClientProxyHeader => SessionError::ClientProxyHeader,
            Failure::ProxyHeaderRejected { evidence } => SessionError::ProxyHeaderRejected {
                backend: self.context.backend.clone(),
                version: match self.context.client_identity {
                    ClientIdentity::ProxyV1 => "v1",
                    _ => "v2",
                },
                evidence,
            },
        }
    }

    /// Logs and counts what the core observed, then writes what it asked:
    /// backend first, then the client.
    async fn write<C>(
        &mut self,
        client: &mut C,
        backend: &mut TcpStream,
    ) -> Result<(), SessionError>
    where
        C: AsyncWrite + Unpin,
    {
        for observation in self.core.take_observations() {
            observe(self.context, self.record, observation);
        }
        let to_backend = self.core.to_backend();
        if !to_backend.is_empty() {
            backend
                .write_all(to_backend)
                .await
                .map_err(SessionError::Backend)?;
            self.context
                .metrics
                .bytes_to_backend
                .increment(to_backend.len() as u64);
            self.record.bytes.add_to_backend(to_backend.len() as u64);
        }
        let to_client = self.core.to_client();
        if !to_client.is_empty() {
            client
                .write_all(to_client)
                .await
                .map_err(SessionError::Client)?;
            client.flush().await.map_err(SessionError::Client)?;
            self.context
                .metrics
                .bytes_to_client
                .increment(to_client.len() as u64);
            self.record.bytes.add_to_client(to_client.len() as u64);
        }
        self.core.written();
        Ok(())
    }

    /// The client's bytes after the upgrade command (the handshake's start).
    pub(crate) fn take_client_pending(&mut self) -> Vec<u8> {
        self.core.take_client_pending()
    }

    /// Drops the backend's unread bytes; returns how many.
    pub(crate) fn discard_backend_pending(&mut self) -> usize {
        self.core.discard_backend_pending()
    }

    pub(crate) fn tls_established(&mut self) {
        self.core.tls_established(now());
    }

    /// The unconsumed bytes of (client, backend), for pass-through.
    pub(crate) fn into_pending(self) -> (Vec<u8>, Vec<u8>) {
        self.core.into_pending()
    }
}

/// Logs or counts one observation; a backend without working XCLIENT is a
/// warning once per listener (every session would repeat it). A refused
/// command is logged by its command word only: its arguments may be
/// credentials.
fn observe(context: &ListenerContext, record: &AccessRecord, observation: Observation) {
    let first_warning = || {
        !context
            .identity_warning_logged
            .swap(true, Ordering::Relaxed)
    };
    match observation {
        Observation::PolicyRefusal(command) => {
            context.metrics.policy_refusal(command);
            record.policy_refusal(command);
            debug!(command, "command refused by the listener's policy");
        }
        Observation::DroppedBackendLine { bytes } => warn!(
            bytes,
            "backend spoke after STARTTLS before the client did; dropped the line"
        ),
        Observation::Notice(Notice::XclientAccepted) => debug!("backend accepted XCLIENT"),
        Observation::Notice(Notice::XclientNotOffered) if first_warning() => warn!(
            backend = %context.backend,
            "backend does not offer XCLIENT to this proxy: sessions go on without it and the \
             backend sees the proxy's address (Postfix: list the proxy's address in \
             smtpd_authorized_xclient_hosts); logged once per listener"
        ),
        Observation::Notice(Notice::XclientRefused(code)) if first_warning() => warn!(
            backend = %context.backend,
            code,
            "backend refused XCLIENT: sessions go on without it and the backend sees the \
             proxy's address; logged once per listener"
        ),
        Observation::Notice(Notice::XclientNotOffered) => debug!("backend does not offer XCLIENT"),
        Observation::Notice(Notice::XclientRefused(code)) => {
            debug!(code, "backend refused XCLIENT")
        }
    }
}
