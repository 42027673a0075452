//! The inspection loop: reads lines from both sides, feeds them to the
//! protocol machine, writes what it answers, and stops when it asks for TLS,
//! pass-through or a close.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::line::LineBuffer;
use crate::protocol::{BackendFailure, Goodbye, Inspector, Next, Output};

use super::{ListenerContext, SessionError, MAX_BACKEND_LINE, MAX_CLIENT_LINE};

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
                let next = match self.backend_lines.next_line() {
                    Ok(Some(line)) => {
                        deadline = tokio::time::Instant::now() + self.idle_timeout;
                        self.inspector.backend_line(line, &mut self.out)
                    }
                    Ok(None) => break,
                    Err(too_long) => {
                        self.inspector
                            .backend_failed(BackendFailure::LineTooLong, &mut self.out);
                        self.flush_to_client(client).await?;
                        return Err(SessionError::BackendLineTooLong(too_long.max));
                    }
                };
                self.flush(client, backend).await?;
                if let Some(ended) = ended(next) {
                    return Ok(ended);
                }
            }

            // One client command at a time: the rest stays buffered until the
            // machine has its reply, so nothing behind STARTTLS is ever parsed.
            if self.skip_client_bytes > 0 {
                self.skip_client_bytes = self.client_lines.skip(self.skip_client_bytes);
            }
            if self.inspector.wants_client_line() && self.skip_client_bytes == 0 {
                let next = match self.client_lines.next_line() {
                    Ok(Some(line)) => {
                        deadline = tokio::time::Instant::now() + self.idle_timeout;
                        self.commands += 1;
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

            if *self.shutdown.borrow() {
                self.inspector.goodbye(Goodbye::ShuttingDown, &mut self.out);
                self.flush_to_client(client).await?;
                return Ok(Inspected::Closed);
            }
            let read_client = self.inspector.wants_client_line() || self.skip_client_bytes > 0;
            tokio::select! {
                read = backend.read_buf(self.backend_lines.read_target()) => match read {
                    Ok(0) => {
                        self.inspector.backend_failed(BackendFailure::Closed, &mut self.out);
                        self.flush_to_client(client).await?;
                        return Ok(Inspected::Closed);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        self.inspector.backend_failed(BackendFailure::Closed, &mut self.out);
                        self.flush_to_client(client).await?;
                        return Err(SessionError::Backend(error));
                    }
                },
                read = client.read_buf(self.client_lines.read_target()), if read_client => match read {
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
