//! A minimal, fast plaintext mail backend, so the figures measure the proxy
//! and not a real mail server.
//!
//! - IMAP: greeting with capabilities, CAPABILITY, NOOP, LOGIN (always OK),
//!   ID, LOGOUT; anything else gets `BAD`.
//! - POP3: greeting, CAPA, NOOP, USER/PASS (always OK), QUIT.
//! - SMTP: greeting, EHLO/HELO, NOOP, RSET, MAIL, RCPT, DATA (a sink that
//!   only looks for the `<CRLF>.<CRLF>` terminator), QUIT.
//! - Echo: an IMAP-style greeting line (so it can sit behind a mail
//!   listener), then every byte received is sent back.
//!
//! Replies to pipelined commands are written together; nothing is logged.

use std::io;
use std::net::SocketAddr;

use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Which server a port plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Imap,
    Pop3,
    Smtp,
    Echo,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Imap => "imap",
            Service::Pop3 => "pop3",
            Service::Smtp => "smtp",
            Service::Echo => "echo",
        }
    }
}

pub const IMAP_CAPABILITIES: &str = "IMAP4rev1 LITERAL+ SASL-IR ID IDLE";
/// The echo port's first line.
pub const ECHO_GREETING: &[u8] = b"* OK echo ready\r\n";

/// Binds `address` for `service`.
pub async fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Accepts connections forever, one task each.
pub async fn serve(listener: TcpListener, service: Service) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = handle(stream, service).await;
                });
            }
            Err(_) => {
                // Out of descriptors or similar: back off, keep serving.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, service: Service) -> io::Result<()> {
    match service {
        Service::Echo => echo(stream).await,
        Service::Imap => {
            let greeting = format!("* OK [CAPABILITY {IMAP_CAPABILITIES}] bench backend ready\r\n");
            stream.write_all(greeting.as_bytes()).await?;
            lines(stream, Imap).await
        }
        Service::Pop3 => {
            stream.write_all(b"+OK bench backend ready\r\n").await?;
            lines(stream, Pop3).await
        }
        Service::Smtp => {
            stream
                .write_all(b"220 bench.localhost ESMTP bench backend ready\r\n")
                .await?;
            lines(stream, Smtp::default()).await
        }
    }
}

async fn echo(mut stream: TcpStream) -> io::Result<()> {
    stream.write_all(ECHO_GREETING).await?;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        stream.write_all(&buffer[..read]).await?;
    }
}

/// What a line protocol does with its input.
trait LineService {
    /// Consumes a prefix of `input`, appending replies to `out`; returns how
    /// many bytes it consumed and whether to close after writing `out`.
    fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool);
    /// True while bulk data is expected (a larger read buffer pays off).
    fn bulk(&self) -> bool {
        false
    }
}

async fn lines(mut stream: TcpStream, mut service: impl LineService) -> io::Result<()> {
    let mut input: Vec<u8> = Vec::with_capacity(1024);
    let mut out: Vec<u8> = Vec::with_capacity(256);
    loop {
        let want = if service.bulk() { 256 * 1024 } else { 1024 };
        if input.capacity() - input.len() < want / 2 {
            input.reserve(want);
        }
        let read = stream.read_buf(&mut input).await?;
        if read == 0 {
            return Ok(());
        }
        let (consumed, close) = service.process(&input, &mut out);
        input.drain(..consumed);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if close {
            let _ = stream.shutdown().await;
            return Ok(());
        }
        if input.len() > 64 * 1024 {
            // A line this long is not a command.
            return Ok(());
        }
        if !service.bulk() && input.capacity() > 64 * 1024 && input.is_empty() {
            input = Vec::with_capacity(1024);
        }
    }
}

/// Calls `each` for every complete line (without CRLF) in `input`; stops when
/// it returns `Stop`. Returns the bytes consumed and whether to close.
fn for_each_line(input: &[u8], mut each: impl FnMut(&[u8], usize) -> Step) -> (usize, bool) {
    let mut consumed = 0;
    while let Some(end) = memchr::memchr(b'\n', &input[consumed..]) {
        let line_end = consumed + end + 1;
        let mut line = &input[consumed..consumed + end];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let step = each(line, line_end);
        consumed = line_end;
        match step {
            Step::Next => {}
            Step::Close => return (consumed, true),
            Step::Pause => return (consumed, false),
        }
    }
    (consumed, false)
}

enum Step {
    Next,
    Close,
    /// Stop taking lines (the service changes how it reads).
    Pause,
}

fn split_word(line: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b' ', line) {
        Some(space) => (&line[..space], &line[space + 1..]),
        None => (line, &[]),
    }
}

struct Imap;

impl LineService for Imap {
    fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        for_each_line(input, |line, _| {
            let (tag, rest) = split_word(line);
            let (command, _) = split_word(rest);
            let reply = |out: &mut Vec<u8>, text: &str| {
                out.extend_from_slice(tag);
                out.push(b' ');
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            };
            if command.eq_ignore_ascii_case(b"NOOP") {
                reply(out, "OK NOOP completed");
            } else if command.eq_ignore_ascii_case(b"CAPABILITY") {
                out.extend_from_slice(b"* CAPABILITY ");
                out.extend_from_slice(IMAP_CAPABILITIES.as_bytes());
                out.extend_from_slice(b"\r\n");
                reply(out, "OK CAPABILITY completed");
            } else if command.eq_ignore_ascii_case(b"LOGIN") {
                reply(out, "OK [CAPABILITY IMAP4rev1 IDLE] Logged in");
            } else if command.eq_ignore_ascii_case(b"ID") {
                out.extend_from_slice(b"* ID NIL\r\n");
                reply(out, "OK ID completed");
            } else if command.eq_ignore_ascii_case(b"LOGOUT") {
                out.extend_from_slice(b"* BYE Logging out\r\n");
                reply(out, "OK Logout completed");
                return Step::Close;
            } else {
                reply(out, "BAD Unknown command");
            }
            Step::Next
        })
    }
}

struct Pop3;

impl LineService for Pop3 {
    fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        for_each_line(input, |line, _| {
            let (command, _) = split_word(line);
            if command.eq_ignore_ascii_case(b"CAPA") {
                out.extend_from_slice(
                    b"+OK Capability list follows\r\nUSER\r\nPIPELINING\r\nUIDL\r\nTOP\r\n.\r\n",
                );
            } else if command.eq_ignore_ascii_case(b"NOOP")
                || command.eq_ignore_ascii_case(b"USER")
                || command.eq_ignore_ascii_case(b"PASS")
            {
                out.extend_from_slice(b"+OK\r\n");
            } else if command.eq_ignore_ascii_case(b"QUIT") {
                out.extend_from_slice(b"+OK Bye\r\n");
                return Step::Close;
            } else {
                out.extend_from_slice(b"-ERR Unknown command\r\n");
            }
            Step::Next
        })
    }
}

/// The end of a message's data.
const DATA_END: &[u8] = b"\r\n.\r\n";

#[derive(Default)]
struct Smtp {
    /// Inside DATA: the last bytes seen (at most 4), to find a terminator
    /// split across reads.
    data_tail: Option<Vec<u8>>,
}

impl Smtp {
    /// Consumes message data; returns how much and whether the message ended.
    fn sink(&mut self, input: &[u8]) -> (usize, bool) {
        let tail = self.data_tail.as_mut().expect("in DATA");
        match find_data_end(tail, input) {
            Some(end) => {
                self.data_tail = None;
                (end, true)
            }
            None => {
                tail.extend_from_slice(&input[input.len().saturating_sub(4)..]);
                let keep = tail.len().saturating_sub(4);
                tail.drain(..keep);
                (input.len(), false)
            }
        }
    }
}

/// Where the data terminator ends in `chunk`, given the `tail` of the data
/// before it.
pub fn find_data_end(tail: &[u8], chunk: &[u8]) -> Option<usize> {
    // A terminator straddling the previous read and this one.
    let head = &chunk[..chunk.len().min(4)];
    let mut joined = [0u8; 8];
    joined[..tail.len()].copy_from_slice(tail);
    joined[tail.len()..tail.len() + head.len()].copy_from_slice(head);
    let joined = &joined[..tail.len() + head.len()];
    if let Some(at) = memmem::find(joined, DATA_END) {
        return Some(at + DATA_END.len() - tail.len());
    }
    memmem::find(chunk, DATA_END).map(|at| at + DATA_END.len())
}

impl LineService for Smtp {
    fn bulk(&self) -> bool {
        self.data_tail.is_some()
    }

    fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        let mut consumed = 0;
        loop {
            if self.data_tail.is_some() {
                let (used, ended) = self.sink(&input[consumed..]);
                consumed += used;
                if !ended {
                    return (consumed, false);
                }
                out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
            }
            let mut entered_data = false;
            let (used, close) = for_each_line(&input[consumed..], |line, _| {
                let (command, _) = split_word(line);
                if command.eq_ignore_ascii_case(b"EHLO") {
                    out.extend_from_slice(
                        b"250-bench.localhost\r\n250-PIPELINING\r\n250-SIZE 0\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n",
                    );
                } else if command.eq_ignore_ascii_case(b"HELO") {
                    out.extend_from_slice(b"250 bench.localhost\r\n");
                } else if command.eq_ignore_ascii_case(b"MAIL")
                    || command.eq_ignore_ascii_case(b"RCPT")
                    || command.eq_ignore_ascii_case(b"RSET")
                    || command.eq_ignore_ascii_case(b"NOOP")
                {
                    out.extend_from_slice(b"250 2.0.0 Ok\r\n");
                } else if command.eq_ignore_ascii_case(b"DATA") {
                    out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                    entered_data = true;
                    return Step::Pause;
                } else if command.eq_ignore_ascii_case(b"QUIT") {
                    out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                    return Step::Close;
                } else {
                    out.extend_from_slice(b"502 5.5.2 Unknown command\r\n");
                }
                Step::Next
            });
            consumed += used;
            if close {
                return (consumed, true);
            }
            if !entered_data {
                return (consumed, false);
            }
            // The DATA line's own CRLF starts the terminator search, so an
            // empty message (".\r\n" at once) ends at once.
            self.data_tail = Some(b"\r\n".to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_end_is_found_within_and_across_reads() {
        assert_eq!(find_data_end(b"\r\n", b".\r\nQUIT\r\n"), Some(3));
        assert_eq!(find_data_end(b"ab", b"cd\r\n.\r\nQUIT"), Some(7));
        assert_eq!(find_data_end(b"x\r\n.", b"\r\nQUIT"), Some(2));
        assert_eq!(find_data_end(b"xy\r\n", b".\r\n"), Some(3));
        assert_eq!(find_data_end(b"\r\n", b"..\r\n"), None);
        assert_eq!(find_data_end(b"", b"abc"), None);
    }

    #[test]
    fn smtp_sinks_pipelined_data_and_answers_after_it() {
        let mut smtp = Smtp::default();
        let mut out = Vec::new();
        let input = b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nline\r\n.\r\nQUIT\r\n";
        let (used, close) = smtp.process(input, &mut out);
        assert!(close);
        assert_eq!(used, input.len());
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.ends_with(
                "354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn smtp_data_split_over_many_reads() {
        let mut smtp = Smtp::default();
        let mut out = Vec::new();
        let (used, _) = smtp.process(b"DATA\r\n", &mut out);
        assert_eq!(used, 6);
        let message = b"hello\r\nworld\r\n.\r\nNOOP\r\n";
        let mut pending: Vec<u8> = Vec::new();
        for byte in message {
            pending.push(*byte);
            let (used, _) = smtp.process(&pending, &mut out);
            pending.drain(..used);
        }
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.ends_with("250 2.0.0 Ok: queued\r\n250 2.0.0 Ok\r\n"),
            "{text}"
        );
    }
}
