//! The inspection loop: reads lines from both sides, feeds them to the
//! protocol machine, writes what it answers, and stops when it asks for TLS,
//! pass-through or a close.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use tracing::{debug, warn};

use crate::protocol::line::LineBuffer;
use crate::protocol::proxy_header::{self, ClientHeader};
use crate::protocol::{
    self, BackendFailure, ClientIdentity, Goodbye, Inspector, Next, Notice, Output, Refusal,
};

use super::{relay, ListenerContext, SessionError, MAX_BACKEND_LINE, MAX_CLIENT_LINE};

/// How an inspection phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inspected {
    /// Upgrade the client connection now.
    StartTls,
    /// Copy bytes without parsing from now on.
    Passthrough,
    /// The dialogue is over (a peer closed, or the machine said so).
    Closed,
}

pub struct Dialogue<'a> {
    context: &'a ListenerContext,
    inspector: Box<dyn Inspector>,
    client_lines: LineBuffer,
    backend_lines: LineBuffer,
    out: Output,
    idle_timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Client lines read so far, against the listener's cap.
    commands: usize,
    /// Client bytes still to discard (a refused literal's body).
    skip_client_bytes: u64,
    /// The client has not sent a line yet (its first bytes are checked for
    /// a PROXY header; a backend error before it means a refused header).
    client_silent: bool,
    /// The backend has not sent a line yet.
    backend_silent: bool,
    /// Set by a STARTTLS upgrade until the client's first command after it.
    /// The server never speaks first after STARTTLS in any of the three
    /// protocols, so whatever the backend sends meanwhile can only be an
    /// unsolicited or injected line, and is dropped rather than delivered
    /// inside TLS.
    drop_backend_until_client_speaks: bool,
}

impl<'a> Dialogue<'a> {
    pub fn new(context: &'a ListenerContext, inspector: Box<dyn Inspector>) -> Self {
        Self {
            context,
            inspector,
            client_lines: LineBuffer::new(MAX_CLIENT_LINE),
            backend_lines: LineBuffer::new(MAX_BACKEND_LINE),
            out: Output::default(),
            idle_timeout: context.idle_timeout,
            shutdown: context.shutdown.clone(),
            commands: 0,
            skip_client_bytes: 0,
            client_silent: true,
            backend_silent: true,
            drop_backend_until_client_speaks: false,
        }
    }

    /// Whether this connection started with a PROXY header the backend may
    /// not have expected, and nothing since tells otherwise.
    fn header_unconfirmed(&self) -> bool {
        self.context.client_identity.sends_proxy_header() && self.client_silent
    }

    fn header_rejected(&self, evidence: String) -> SessionError {
        SessionError::ProxyHeaderRejected {
            backend: self.context.backend.clone(),
            version: match self.context.client_identity {
                ClientIdentity::ProxyV1 => "v1",
                _ => "v2",
            },
            evidence,
        }
    }

    /// Runs until the machine asks for TLS, pass-through or a close.
    pub async fn run<C>(
        &mut self,
        client: &mut C,
        backend: &mut TcpStream,
    ) -> Result<Inspected, SessionError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        // Silence is measured in complete lines, not bytes: a client that
        // trickles one byte at a time (slowloris) is cut off like a silent one.
        let mut deadline = tokio::time::Instant::now() + self.idle_timeout;
        loop {
            // Backend lines are always taken: replies, and unsolicited lines
            // the machine decides about.
            loop {
                let header_unconfirmed = self.header_unconfirmed();
                let next = match self.backend_lines.next_line() {
                    Ok(Some(line)) if self.drop_backend_until_client_speaks => {
                        warn!(
                            bytes = line.len(),
                            "backend spoke after STARTTLS before the client did; dropped the line"
                        );
                        continue;
                    }
                    Ok(Some(line)) => {
                        deadline = tokio::time::Instant::now() + self.idle_timeout;
                        self.backend_silent = false;
                        // A backend that did not expect the PROXY header
                        // answers its bytes with errors right after its
                        // greeting, before the client has said anything.
                        if header_unconfirmed
                            && self.inspector.wants_client_line()
                            && protocol::is_error_reply(self.context.protocol, line)
                        {
                            let evidence = format!(
                                "it answered {:?} before the client's first command",
                                String::from_utf8_lossy(protocol::trim_eol(line))
                            );
                            // What earlier lines produced goes out first, as
                            // it would have line by line.
                            self.flush(client, backend).await?;
                            let error = self.header_rejected(evidence);
                            self.out.clear();
                            self.out
                                .to_client
                                .extend_from_slice(protocol::refusal_reply(
                                    self.context.protocol,
                                    Refusal::BackendUnavailable,
                                ));
                            self.flush_to_client(client).await?;
                            return Err(error);
                        }
                        self.inspector.backend_line(line, &mut self.out)
                    }
                    Ok(None) => {
                        self.flush(client, backend).await?;
                        break;
                    }
                    Err(too_long) => {
                        self.flush(client, backend).await?;
                        self.inspector
                            .backend_failed(BackendFailure::LineTooLong, &mut self.out);
                        self.flush_to_client(client).await?;
                        return Err(SessionError::BackendLineTooLong(too_long.max));
                    }
                };
                // The lines of one reply (EHLO, CAPABILITY) that arrived
                // together go out in one write (one TLS record, one packet)
                // instead of one each: flushed when the buffered lines are
                // used up, when the phase ends, or when there is a notice.
                let ended = ended(next);
                if ended.is_some() || self.out.notice.is_some() {
                    self.flush(client, backend).await?;
                }
                if let Some(ended) = ended {
                    return Ok(ended);
                }
            }

            // One client command at a time: the rest stays buffered until the
            // machine has its reply, so nothing behind STARTTLS is ever parsed.
            if self.skip_client_bytes > 0 {
                self.skip_client_bytes = self.client_lines.skip(self.skip_client_bytes);
            }
            // A message body or BDAT chunk: raw bytes, no line cap.
            if self.inspector.wants_client_bytes() && self.skip_client_bytes == 0 {
                let pending = self.client_lines.pending();
                if !pending.is_empty() {
                    let taken = self.inspector.client_bytes(pending, &mut self.out);
                    if taken > 0 {
                        self.client_lines.skip(taken as u64);
                        deadline = tokio::time::Instant::now() + self.idle_timeout;
                        self.flush(client, backend).await?;
                        continue;
                    }
                }
            }
            // Only a trusted proxy may send a PROXY header, and clients are
            // not that: one is refused before anything reaches the backend.
            let mut undecided = false;
            if self.client_silent
                && self.context.client_identity != ClientIdentity::None
                && self.inspector.wants_client_line()
            {
                match proxy_header::client_header(self.client_lines.pending()) {
                    ClientHeader::Present => {
                        self.context.metrics.policy_refusal("PROXY");
                        self.out
                            .to_client
                            .extend_from_slice(protocol::refusal_reply(
                                self.context.protocol,
                                Refusal::ClientProxyHeader,
                            ));
                        self.flush_to_client(client).await?;
                        return Err(SessionError::ClientProxyHeader);
                    }
                    ClientHeader::Undecided => undecided = true,
                    ClientHeader::Absent => {}
                }
            }
            if self.inspector.wants_client_line() && self.skip_client_bytes == 0 && !undecided {
                let next = match self.client_lines.next_line() {
                    Ok(Some(line)) => {
                        deadline = tokio::time::Instant::now() + self.idle_timeout;
                        self.client_silent = false;
                        self.drop_backend_until_client_speaks = false;
                        // A relaying machine reads commands for the whole
                        // session; the cap is for the inspection phase.
                        if !self.inspector.relaying() {
                            self.commands += 1;
                        }
                        if self.commands > self.context.max_inspected_commands {
                            return self
                                .say_goodbye(
                                    client,
                                    Goodbye::TooManyCommands,
                                    SessionError::TooManyCommands(
                                        self.context.max_inspected_commands,
                                    ),
                                )
                                .await;
                        }
                        Some(self.inspector.client_line(line, &mut self.out))
                    }
                    Ok(None) => None,
                    Err(too_long) => {
                        return self
                            .say_goodbye(
                                client,
                                Goodbye::LineTooLong,
                                SessionError::ClientLineTooLong(too_long.max),
                            )
                            .await;
                    }
                };
                if let Some(next) = next {
                    if let Some(command) = self.out.refused {
                        self.context.metrics.policy_refusal(command);
                    }
                    self.skip_client_bytes = self.out.skip_client_bytes;
                    self.flush(client, backend).await?;
                    if let Some(ended) = ended(next) {
                        return Ok(ended);
                    }
                    continue;
                }
            }

            // A relaying machine in the middle of a command (a message body,
            // a reply on its way) finishes it first, as pass-through does.
            let mid_command = self.inspector.relaying() && !self.inspector.wants_client_line();
            if *self.shutdown.borrow() && !mid_command {
                self.inspector.goodbye(Goodbye::ShuttingDown, &mut self.out);
                self.flush_to_client(client).await?;
                return Ok(Inspected::Closed);
            }
            let read_client = self.inspector.wants_client_line()
                || self.inspector.wants_client_bytes()
                || self.skip_client_bytes > 0;
            // Waiting holds no read buffers: lines are read into a buffer
            // shared by the thread and kept only while incomplete.
            self.backend_lines.release_if_empty();
            self.client_lines.release_if_empty();
            tokio::select! {
                read = relay::read_lines(backend, &mut self.backend_lines) => match read {
                    Ok(0) => {
                        self.inspector.backend_failed(BackendFailure::Closed, &mut self.out);
                        self.flush_to_client(client).await?;
                        // Closed without a word right after the header: it
                        // was refused (malformed for it, or the proxy's
                        // address is not trusted to send one).
                        if self.header_unconfirmed() && self.backend_silent {
                            return Err(self.header_rejected(
                                "it closed the connection without a greeting".into(),
                            ));
                        }
                        return Ok(Inspected::Closed);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        self.inspector.backend_failed(BackendFailure::Closed, &mut self.out);
                        self.flush_to_client(client).await?;
                        return Err(SessionError::Backend(error));
                    }
                },
                read = relay::read_lines(client, &mut self.client_lines), if read_client => match read {
                    Ok(0) => return Ok(Inspected::Closed),
                    Ok(_) => {}
                    Err(error) => return Err(SessionError::Client(error)),
                },
                _ = self.shutdown.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return self
                        .say_goodbye(client, Goodbye::IdleTimeout, SessionError::IdleTimeout(self.idle_timeout))
                        .await;
                }
            }
        }
    }

    /// Ends the session with the protocol's goodbye for `reason`.
    async fn say_goodbye<C>(
        &mut self,
        client: &mut C,
        reason: Goodbye,
        error: SessionError,
    ) -> Result<Inspected, SessionError>
    where
        C: AsyncWrite + Unpin,
    {
        self.inspector.goodbye(reason, &mut self.out);
        self.flush_to_client(client).await?;
        Err(error)
    }

    /// Writes what the machine produced: backend first, then the client.
    async fn flush<C>(
        &mut self,
        client: &mut C,
        backend: &mut TcpStream,
    ) -> Result<(), SessionError>
    where
        C: AsyncWrite + Unpin,
    {
        if !self.out.to_backend.is_empty() {
            backend
                .write_all(&self.out.to_backend)
                .await
                .map_err(SessionError::Backend)?;
            self.context
                .metrics
                .bytes_to_backend
                .increment(self.out.to_backend.len() as u64);
            self.out.to_backend.clear();
        }
        self.flush_to_client(client).await
    }

    async fn flush_to_client<C>(&mut self, client: &mut C) -> Result<(), SessionError>
    where
        C: AsyncWrite + Unpin,
    {
        if let Some(notice) = self.out.notice.take() {
            self.log_notice(notice);
        }
        if !self.out.to_client.is_empty() {
            client
                .write_all(&self.out.to_client)
                .await
                .map_err(SessionError::Client)?;
            client.flush().await.map_err(SessionError::Client)?;
            self.context
                .metrics
                .bytes_to_client
                .increment(self.out.to_client.len() as u64);
        }
        self.out.clear();
        Ok(())
    }

    /// Logs what the machine noticed; a backend without working XCLIENT is
    /// a warning once per listener (every session would repeat it).
    fn log_notice(&self, notice: Notice) {
        let first_warning = || {
            !self
                .context
                .identity_warning_logged
                .swap(true, Ordering::Relaxed)
        };
        match notice {
            Notice::XclientAccepted => debug!("backend accepted XCLIENT"),
            Notice::XclientNotOffered if first_warning() => warn!(
                backend = %self.context.backend,
                "backend does not offer XCLIENT to this proxy: sessions go on without it and the \
                 backend sees the proxy's address (Postfix: list the proxy's address in \
                 smtpd_authorized_xclient_hosts); logged once per listener"
            ),
            Notice::XclientRefused(code) if first_warning() => warn!(
                backend = %self.context.backend,
                code,
                "backend refused XCLIENT: sessions go on without it and the backend sees the \
                 proxy's address; logged once per listener"
            ),
            Notice::XclientNotOffered => debug!("backend does not offer XCLIENT"),
            Notice::XclientRefused(code) => debug!(code, "backend refused XCLIENT"),
        }
    }

    /// The client's bytes after the upgrade command (the handshake's start).
    pub fn take_client_pending(&mut self) -> Vec<u8> {
        self.client_lines.take_pending()
    }

    /// Drops the backend's unread bytes; returns how many.
    pub fn discard_backend_pending(&mut self) -> usize {
        self.backend_lines.discard_pending()
    }

    pub fn tls_established(&mut self) {
        self.inspector.tls_established();
        self.drop_backend_until_client_speaks = true;
    }

    /// The unconsumed bytes of (client, backend), for pass-through.
    pub fn into_pending(mut self) -> (Vec<u8>, Vec<u8>) {
        (
            self.client_lines.take_pending(),
            self.backend_lines.take_pending(),
        )
    }
}

fn ended(next: Next) -> Option<Inspected> {
    match next {
        Next::Continue => None,
        Next::StartTls => Some(Inspected::StartTls),
        Next::Passthrough => Some(Inspected::Passthrough),
        Next::Close => Some(Inspected::Closed),
    }
}
