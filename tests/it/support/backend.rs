//! Plaintext backends on 127.0.0.1 that record every byte they receive:
//! [`FakeBackend`] follows a [`Script`]; [`InjectingBackend`] also sends
//! lines nobody asked for, on the test's signal.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::{eventually, text, DeadAddress, STEP, V2_SIGNATURE};

/// What a fake backend answers: the first rule whose prefix matches the
/// start of a received line (ASCII case-insensitive) sends its reply.
#[derive(Clone)]
pub struct Script {
    pub greeting: Vec<u8>,
    pub rules: Vec<(Vec<u8>, Vec<u8>)>,
    /// Rules that answer only the first matching line (checked before `rules`).
    pub once: Vec<(Vec<u8>, Vec<u8>)>,
    /// Reply to lines no rule matches.
    pub fallback: Vec<u8>,
    /// Read a PROXY protocol header (v1 or v2) before greeting, as a
    /// backend configured for it does; it is recorded with the rest.
    pub proxy_header: bool,
}

impl Script {
    pub fn new(greeting: &[u8]) -> Self {
        Self {
            greeting: greeting.to_vec(),
            rules: Vec::new(),
            once: Vec::new(),
            fallback: Vec::new(),
            proxy_header: false,
        }
    }

    /// Expects a PROXY protocol header before the greeting.
    pub fn with_proxy_header(mut self) -> Self {
        self.proxy_header = true;
        self
    }

    pub fn on(mut self, prefix: &[u8], reply: &[u8]) -> Self {
        self.rules.push((prefix.to_vec(), reply.to_vec()));
        self
    }

    pub fn once(mut self, prefix: &[u8], reply: &[u8]) -> Self {
        self.once.push((prefix.to_vec(), reply.to_vec()));
        self
    }

    pub fn otherwise(mut self, reply: &[u8]) -> Self {
        self.fallback = reply.to_vec();
        self
    }

    pub fn smtp() -> Self {
        Script::new(b"220 fake.example ESMTP\r\n")
            .on(
                b"EHLO",
                b"250-fake.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n",
            )
            .on(b"HELO", b"250 fake.example\r\n")
            .on(b"NOOP", b"250 2.0.0 Ok\r\n")
            .on(b"MAIL FROM", b"250 2.1.0 Ok\r\n")
            .on(b"RCPT TO", b"250 2.1.5 Ok\r\n")
            .on(b"DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n")
            .on(b"QUIT", b"221 2.0.0 Bye\r\n")
            .otherwise(b"502 5.5.2 Error: command not recognized\r\n")
    }

    pub fn imap() -> Self {
        Script::new(b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] fake ready\r\n")
            .on(
                b"a CAPABILITY",
                b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\na OK Capability completed.\r\n",
            )
            .on(
                b"b CAPABILITY",
                b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\nb OK Capability completed.\r\n",
            )
            .on(b"n NOOP", b"n OK NOOP completed.\r\n")
            .on(
                b"l LOGIN",
                b"l OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
            )
            .on(
                b"z LOGOUT",
                b"* BYE Logging out\r\nz OK Logout completed.\r\n",
            )
            .otherwise(b"* BAD unknown\r\n")
    }

    pub fn pop3() -> Self {
        Script::new(b"+OK fake POP3 ready\r\n")
            .on(b"CAPA", b"+OK\r\nTOP\r\nSTLS\r\nUSER\r\n.\r\n")
            .on(b"USER", b"+OK\r\n")
            .on(b"PASS", b"+OK Logged in.\r\n")
            .on(b"STAT", b"+OK 0 0\r\n")
            .on(b"QUIT", b"+OK Logging out.\r\n")
            .otherwise(b"-ERR Unknown command\r\n")
    }
}

/// What each connection to a fake backend received, in accept order.
type Recordings = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;

/// A plaintext backend on 127.0.0.1 that follows a [`Script`] and records
/// everything each connection sent it.
pub struct FakeBackend {
    pub address: SocketAddr,
    /// What new connections get (see [`FakeBackend::set_script`]).
    script: Arc<Mutex<Script>>,
    received: Recordings,
    /// Per connection, in accept order: set once its script has ended (the
    /// proxy closed the connection, or the script itself ended it).
    ended: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl FakeBackend {
    pub async fn start(script: Script) -> FakeBackend {
        Self::serve(
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind backend"),
            script,
        )
    }

    /// A backend that comes up on `dead`'s address (one a proxy already
    /// names).
    pub fn revive(dead: DeadAddress, script: Script) -> FakeBackend {
        Self::serve(dead.socket.listen(1024).expect("listen"), script)
    }

    fn serve(socket: TcpListener, script: Script) -> FakeBackend {
        let address = socket.local_addr().expect("backend address");
        let received: Recordings = Arc::default();
        let ended: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let connections = received.clone();
        let endings = ended.clone();
        let script = Arc::new(Mutex::new(script));
        let current = script.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = socket.accept().await {
                let record = Arc::new(Mutex::new(Vec::new()));
                let done = Arc::new(AtomicBool::new(false));
                endings.lock().expect("lock").push(done.clone());
                connections.lock().expect("lock").push(record.clone());
                let script = current.lock().expect("lock").clone();
                tokio::spawn(async move {
                    serve_script(stream, script, record).await;
                    done.store(true, Ordering::SeqCst);
                });
            }
        });
        FakeBackend {
            address,
            script,
            received,
            ended,
        }
    }

    /// Connections from now on follow `script` (a backend reconfigured
    /// while the proxy runs); open ones keep theirs.
    pub fn set_script(&self, script: Script) {
        *self.script.lock().expect("lock") = script;
    }

    /// Waits until connection `index` has ended (for a proxy session: the
    /// proxy closed its backend side) and returns everything it received.
    /// A barrier for "the backend never got X": nothing can arrive later.
    pub async fn received_when_closed(&self, index: usize) -> Vec<u8> {
        eventually(
            || {
                self.ended
                    .lock()
                    .expect("lock")
                    .get(index)
                    .is_some_and(|done| done.load(Ordering::SeqCst))
            },
            || {
                format!(
                    "backend connection {index} was not closed; received so far {:?}",
                    self.received_so_far(index)
                )
            },
        )
        .await;
        self.received(index)
    }

    /// What connection `index` received so far, for failure messages.
    fn received_so_far(&self, index: usize) -> String {
        if self.connections() > index {
            text(&self.received(index))
        } else {
            "(not connected)".to_string()
        }
    }

    /// How many connections reached the backend.
    pub fn connections(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    /// Everything connection `index` sent to the backend so far.
    pub fn received(&self, index: usize) -> Vec<u8> {
        let connections = self.received.lock().expect("lock");
        let bytes = connections[index].lock().expect("lock").clone();
        bytes
    }

    /// Waits until connection `index` has received exactly `expected`.
    pub async fn assert_received(&self, index: usize, expected: &[u8]) {
        eventually(
            || self.connections() > index && self.received(index) == expected,
            || {
                format!(
                    "backend connection {index} received {:?}, expected {:?}",
                    self.received_so_far(index),
                    text(expected)
                )
            },
        )
        .await;
    }
}

async fn serve_script(mut stream: TcpStream, mut script: Script, record: Arc<Mutex<Vec<u8>>>) {
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    if script.proxy_header {
        // Version 2: 16 fixed bytes, then the length they announce;
        // version 1: one CRLF-terminated line.
        let header_length = |bytes: &[u8]| {
            if bytes.len() >= 16 && bytes.starts_with(V2_SIGNATURE) {
                Some(16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]])))
            } else if bytes.starts_with(b"PROXY ") {
                find_subslice(bytes, b"\r\n").map(|end| end + 2)
            } else {
                None
            }
        };
        loop {
            if let Some(length) = header_length(&pending) {
                if pending.len() >= length {
                    pending.drain(..length);
                    break;
                }
            }
            let read = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            record
                .lock()
                .expect("lock")
                .extend_from_slice(&chunk[..read]);
            pending.extend_from_slice(&chunk[..read]);
        }
    }
    if stream.write_all(&script.greeting).await.is_err() {
        return;
    }
    loop {
        let read = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        record
            .lock()
            .expect("lock")
            .extend_from_slice(&chunk[..read]);
        pending.extend_from_slice(&chunk[..read]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let matches = |(prefix, _): &(Vec<u8>, Vec<u8>)| {
                line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
            };
            let reply = match script.once.iter().position(matches) {
                Some(index) => script.once.remove(index).1,
                None => script
                    .rules
                    .iter()
                    .find(|rule| matches(rule))
                    .map(|(_, reply)| reply.clone())
                    .unwrap_or_else(|| script.fallback.clone()),
            };
            if stream.write_all(&reply).await.is_err() {
                return;
            }
            if reply.starts_with(b"354") {
                // SMTP DATA: the body runs to a line holding a single dot.
                loop {
                    let body_end = if pending.starts_with(b".\r\n") {
                        Some(3)
                    } else {
                        find_subslice(&pending, b"\r\n.\r\n").map(|at| at + 5)
                    };
                    if let Some(consumed) = body_end {
                        pending.drain(..consumed);
                        break;
                    }
                    let read = match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => read,
                    };
                    record
                        .lock()
                        .expect("lock")
                        .extend_from_slice(&chunk[..read]);
                    pending.extend_from_slice(&chunk[..read]);
                }
                if stream.write_all(b"250 2.0.0 Ok: queued\r\n").await.is_err() {
                    return;
                }
            }
            // Closed after QUIT and after an IMAP LOGOUT of any tag, as
            // real servers do.
            let upper = line.to_ascii_uppercase();
            let logout = upper
                .split(|&b| b == b' ')
                .nth(1)
                .is_some_and(|command| command.starts_with(b"LOGOUT"));
            if upper.starts_with(b"QUIT") || logout {
                return;
            }
        }
    }
}

fn find_subslice(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A hand-made backend for one connection: greets, answers every line with
/// `answer`, and on the test's signal sends `injected` unasked (then reports
/// that it has written it).
pub struct InjectingBackend {
    pub address: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    inject: Option<oneshot::Sender<()>>,
    injected: Option<oneshot::Receiver<()>>,
}

impl InjectingBackend {
    pub async fn start(
        greeting: &'static [u8],
        answer: fn(&[u8]) -> Vec<u8>,
        injected_line: &'static [u8],
    ) -> Self {
        let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = socket.local_addr().expect("address");
        let received: Arc<Mutex<Vec<u8>>> = Arc::default();
        let record = received.clone();
        let (inject, mut inject_now) = oneshot::channel::<()>();
        let (done, injected) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let Ok((mut stream, _)) = socket.accept().await else {
                return;
            };
            // Written means sent: no Nagle delay holding the injected line
            // back until after the handshake.
            stream.set_nodelay(true).expect("nodelay");
            if stream.write_all(greeting).await.is_err() {
                return;
            }
            let mut done = Some(done);
            let mut pending = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                tokio::select! {
                    read = stream.read(&mut chunk) => {
                        let read = match read {
                            Ok(0) | Err(_) => return,
                            Ok(read) => read,
                        };
                        record.lock().expect("lock").extend_from_slice(&chunk[..read]);
                        pending.extend_from_slice(&chunk[..read]);
                        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = pending.drain(..=end).collect();
                            if stream.write_all(&answer(&line)).await.is_err() {
                                return;
                            }
                        }
                    }
                    signal = &mut inject_now, if done.is_some() => {
                        if signal.is_ok() && stream.write_all(injected_line).await.is_ok() {
                            stream.flush().await.expect("flush");
                        }
                        let _ = done.take().expect("once").send(());
                    }
                }
            }
        });
        Self {
            address,
            received,
            inject: Some(inject),
            injected: Some(injected),
        }
    }

    /// Makes the backend send its unsolicited bytes now; returns once they
    /// are written (on loopback: in the proxy's receive buffer).
    pub async fn inject(&mut self) {
        self.inject
            .take()
            .expect("inject once")
            .send(())
            .expect("backend running");
        tokio::time::timeout(STEP, self.injected.take().expect("once"))
            .await
            .expect("injected in time")
            .expect("backend running");
    }

    /// Waits until the connection has received exactly `expected`.
    pub async fn assert_received(&self, expected: &[u8]) {
        eventually(
            || *self.received.lock().expect("lock") == expected,
            || {
                format!(
                    "backend received {:?}, expected {:?}",
                    text(&self.received.lock().expect("lock")),
                    text(expected)
                )
            },
        )
        .await;
    }
}

/// An SMTP backend's answers: EHLO without STARTTLS, NOOP.
pub fn smtp_answer(line: &[u8]) -> Vec<u8> {
    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"EHLO") {
        b"250-fake.example\r\n250 8BITMIME\r\n".to_vec()
    } else if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"NOOP") {
        b"250 2.0.0 Ok\r\n".to_vec()
    } else {
        b"502 5.5.2 Error: command not recognized\r\n".to_vec()
    }
}

/// An IMAP backend's answers: CAPABILITY without STARTTLS, NOOP, any tag.
pub fn imap_answer(line: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(line);
    let mut words = text.split_whitespace();
    let tag = words.next().unwrap_or("*").to_string();
    match words.next().map(str::to_ascii_uppercase).as_deref() {
        Some("CAPABILITY") => {
            format!("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n{tag} OK Capability completed.\r\n")
        }
        Some("NOOP") => format!("{tag} OK NOOP completed.\r\n"),
        _ => format!("{tag} BAD unknown\r\n"),
    }
    .into_bytes()
}

/// A POP3 backend's answers: CAPA without STLS, NOOP.
pub fn pop3_answer(line: &[u8]) -> Vec<u8> {
    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"CAPA") {
        b"+OK\r\nTOP\r\nUSER\r\n.\r\n".to_vec()
    } else if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"NOOP") {
        b"+OK\r\n".to_vec()
    } else {
        b"-ERR Unknown command\r\n".to_vec()
    }
}
