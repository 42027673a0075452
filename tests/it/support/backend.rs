//! Plaintext backends on 127.0.0.1 that record every byte they receive:
//! [`FakeBackend`] follows a [`Script`]; [`InjectingBackend`] also sends
//! lines nobody asked for, on the test's signal.
//!
//! The proxy checks every listener's backend in the background from
//! start-up (connect, read the greeting, say `QUIT` or `r1 LOGOUT`, after
//! the PROXY protocol's health-check header where the listener sends one).
//! Both backends recognise those checks by their opening and keep them
//! apart from the sessions a test drives: [`FakeBackend::connections`] and
//! [`FakeBackend::received`] count sessions only, and
//! [`FakeBackend::health_checks`] lists the checks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

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

/// The proxy's PROXY protocol v2 health-check header (command LOCAL, no
/// addresses).
const V2_LOCAL: &[u8] = b"\x20\x00\x00\x00";

/// Whether `received` opens the way the proxy's backend readiness check
/// does: an optional health-check PROXY header (`PROXY UNKNOWN`, or v2
/// `LOCAL`), then `QUIT` or `r1 LOGOUT` as the first line. `None` while too
/// few bytes arrived to tell.
fn health_check_opening(received: &[u8]) -> Option<bool> {
    let rest = if let Some(rest) = received.strip_prefix(b"PROXY UNKNOWN\r\n".as_slice()) {
        rest
    } else if received.starts_with(V2_SIGNATURE) {
        match received[V2_SIGNATURE.len()..].strip_prefix(V2_LOCAL) {
            Some(rest) => rest,
            None if received.len() < V2_SIGNATURE.len() + V2_LOCAL.len() => return None,
            None => return Some(false),
        }
    } else if b"PROXY UNKNOWN\r\n".starts_with(received) || V2_SIGNATURE.starts_with(received) {
        return None;
    } else {
        received
    };
    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
        let could_be = [b"QUIT\r\n".as_slice(), b"r1 LOGOUT\r\n"]
            .iter()
            .any(|goodbye| goodbye.starts_with(rest));
        return if could_be { None } else { Some(false) };
    };
    let line = &rest[..=end];
    Some(line == b"QUIT\r\n" || line == b"r1 LOGOUT\r\n")
}

/// Whether `received` opens as only the proxy's readiness check does: with
/// the PROXY protocol's health-check header, or with the check's IMAP tag.
/// A bare `QUIT` may also be a session's.
fn unmistakable_health_check(received: &[u8]) -> bool {
    received.starts_with(b"PROXY UNKNOWN\r\n")
        || received.starts_with(&[V2_SIGNATURE, V2_LOCAL].concat())
        || received.starts_with(b"r1 LOGOUT\r\n")
}

/// Every fake backend's "sessions have begun" flag, by address: the harness
/// sets it once a proxy naming that backend finished its start-up checks.
static SESSIONS_BEGUN: Mutex<Vec<(SocketAddr, Weak<AtomicBool>)>> = Mutex::new(Vec::new());

/// The proxy's start-up checks of the backends at `addresses` are over: a
/// bare `QUIT` opening a later connection is a session's (see
/// [`unmistakable_health_check`]).
pub fn start_up_checks_done<'a>(addresses: impl IntoIterator<Item = &'a str>) {
    let registered = SESSIONS_BEGUN.lock().expect("lock");
    for address in addresses {
        for (backend, begun) in registered.iter() {
            if backend.to_string() == address {
                if let Some(begun) = begun.upgrade() {
                    begun.store(true, Ordering::SeqCst);
                }
            }
        }
    }
}

/// One connection to a [`FakeBackend`].
struct Connection {
    received: Arc<Mutex<Vec<u8>>>,
    /// Set once its script has ended (the proxy closed the connection, or
    /// the script itself ended it).
    ended: Arc<AtomicBool>,
    /// Set once it opened as the proxy's readiness check.
    health_check: Arc<AtomicBool>,
}

/// A plaintext backend on 127.0.0.1 that follows a [`Script`] and records
/// everything each connection sent it.
pub struct FakeBackend {
    pub address: SocketAddr,
    /// What new connections get (see [`FakeBackend::set_script`]).
    script: Arc<Mutex<Script>>,
    /// Every connection, in accept order.
    accepted: Arc<Mutex<Vec<Connection>>>,
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
        let accepted: Arc<Mutex<Vec<Connection>>> = Arc::default();
        let connections = accepted.clone();
        let script = Arc::new(Mutex::new(script));
        let current = script.clone();
        let sessions_begun = Arc::new(AtomicBool::new(false));
        {
            let mut registered = SESSIONS_BEGUN.lock().expect("lock");
            registered.retain(|(_, begun)| begun.strong_count() > 0);
            registered.push((address, Arc::downgrade(&sessions_begun)));
        }
        // The accept loop owns the flag (the registry holds it weakly).
        let begun = sessions_begun;
        tokio::spawn(async move {
            while let Ok((stream, _)) = socket.accept().await {
                let bare_quit_is_a_check = !begun.load(Ordering::SeqCst);
                let connection = Connection {
                    received: Arc::default(),
                    ended: Arc::default(),
                    health_check: Arc::default(),
                };
                let record = connection.received.clone();
                let done = connection.ended.clone();
                let health_check = connection.health_check.clone();
                connections.lock().expect("lock").push(connection);
                let script = current.lock().expect("lock").clone();
                tokio::spawn(async move {
                    serve_script(stream, script, record, health_check, bare_quit_is_a_check).await;
                    done.store(true, Ordering::SeqCst);
                });
            }
        });
        FakeBackend {
            address,
            script,
            accepted,
        }
    }

    /// The sessions' connections (the proxy's readiness checks left out),
    /// in accept order.
    fn sessions<T>(&self, each: impl Fn(&Connection) -> T) -> Vec<T> {
        self.accepted
            .lock()
            .expect("lock")
            .iter()
            .filter(|connection| !connection.health_check.load(Ordering::SeqCst))
            .map(each)
            .collect()
    }

    /// What each of the proxy's readiness checks sent, in accept order.
    pub fn health_checks(&self) -> Vec<Vec<u8>> {
        self.accepted
            .lock()
            .expect("lock")
            .iter()
            .filter(|connection| connection.health_check.load(Ordering::SeqCst))
            .map(|connection| connection.received.lock().expect("lock").clone())
            .collect()
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
                self.sessions(|connection| connection.ended.load(Ordering::SeqCst))
                    .get(index)
                    .copied()
                    .unwrap_or(false)
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

    /// How many session connections reached the backend (the proxy's
    /// readiness checks not counted).
    pub fn connections(&self) -> usize {
        self.sessions(|_| ()).len()
    }

    /// Everything session connection `index` sent to the backend so far.
    pub fn received(&self, index: usize) -> Vec<u8> {
        self.sessions(|connection| connection.received.lock().expect("lock").clone())
            .swap_remove(index)
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

/// Reads what the connection sends next into its recording and into the
/// bytes not handled yet; false once the connection closed or failed.
async fn read_more(
    stream: &mut TcpStream,
    chunk: &mut [u8],
    record: &Mutex<Vec<u8>>,
    pending: &mut Vec<u8>,
) -> bool {
    match stream.read(chunk).await {
        Ok(0) | Err(_) => false,
        Ok(read) => {
            record
                .lock()
                .expect("lock")
                .extend_from_slice(&chunk[..read]);
            pending.extend_from_slice(&chunk[..read]);
            true
        }
    }
}

async fn serve_script(
    mut stream: TcpStream,
    mut script: Script,
    record: Arc<Mutex<Vec<u8>>>,
    health_check: Arc<AtomicBool>,
    bare_quit_is_a_check: bool,
) {
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    // Classified as soon as the opening tells.
    let mut undecided = true;
    let mut classify = |record: &Mutex<Vec<u8>>| {
        if undecided {
            let received = record.lock().expect("lock");
            if let Some(verdict) = health_check_opening(&received) {
                let verdict =
                    verdict && (bare_quit_is_a_check || unmistakable_health_check(&received));
                health_check.store(verdict, Ordering::SeqCst);
                undecided = false;
            }
        }
    };
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
            if !read_more(&mut stream, &mut chunk, &record, &mut pending).await {
                return;
            }
            classify(&record);
        }
    }
    if stream.write_all(&script.greeting).await.is_err() {
        return;
    }
    loop {
        if !read_more(&mut stream, &mut chunk, &record, &mut pending).await {
            return;
        }
        classify(&record);
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
                    if !read_more(&mut stream, &mut chunk, &record, &mut pending).await {
                        return;
                    }
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

/// What a connection sends first: until [`health_check_opening`] can tell,
/// or nothing more comes for 200 ms (a session whose client is still quiet).
/// `None` if the connection closed first.
async fn read_opening(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut opening = Vec::new();
    let mut chunk = [0u8; 512];
    while health_check_opening(&opening).is_none() {
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(read)) => opening.extend_from_slice(&chunk[..read]),
            Err(_) => break,
        }
    }
    Some(opening)
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
            // The proxy's readiness checks are greeted and let go; the first
            // other connection is the session.
            let (mut stream, mut pending) = loop {
                let Ok((mut stream, _)) = socket.accept().await else {
                    return;
                };
                // Written means sent: no Nagle delay holding the injected
                // line back until after the handshake.
                stream.set_nodelay(true).expect("nodelay");
                if stream.write_all(greeting).await.is_err() {
                    continue;
                }
                match read_opening(&mut stream).await {
                    Some(opening) if health_check_opening(&opening) != Some(true) => {
                        break (stream, opening)
                    }
                    _ => continue,
                }
            };
            record.lock().expect("lock").extend_from_slice(&pending);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if stream.write_all(&answer(&line)).await.is_err() {
                    return;
                }
            }
            let mut done = Some(done);
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
