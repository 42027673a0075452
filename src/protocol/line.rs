//! A bounded byte line buffer: the framing every inspection machine relies on.
//!
//! Mail lines are bytes (8-bit, not UTF-8), end in CRLF or, from sloppy peers,
//! a bare LF, and arrive split or batched arbitrarily by TCP. The buffer keeps
//! what has been received, hands out one complete line at a time, and refuses
//! to hold a line longer than its cap, so no peer can make it grow without
//! bound. It never touches a socket: the driver reads into
//! [`LineBuffer::read_target`].

/// The client sent or the backend sent a line longer than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line longer than {max} bytes")]
pub struct LineTooLong {
    pub max: usize,
}

/// Receives bytes and yields complete lines of at most `max_line` bytes
/// (terminator included).
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Start of the bytes not yet handed out.
    start: usize,
    /// Bytes before this offset are known to hold no LF.
    scanned: usize,
    max_line: usize,
}

/// How much room to offer a single read.
pub const READ_CHUNK: usize = 4096;

impl LineBuffer {
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max_line: max_line.max(1),
        }
    }

    /// The next complete line, terminator included; `Ok(None)` when more bytes
    /// are needed.
    pub fn next_line(&mut self) -> Result<Option<&[u8]>, LineTooLong> {
        let unscanned = &self.buf[self.scanned..];
        match unscanned.iter().position(|&b| b == b'\n') {
            Some(offset) => {
                let end = self.scanned + offset + 1;
                if end - self.start > self.max_line {
                    return Err(LineTooLong { max: self.max_line });
                }
                let line_start = self.start;
                self.start = end;
                self.scanned = end;
                Ok(Some(&self.buf[line_start..end]))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() - self.start > self.max_line {
                    return Err(LineTooLong { max: self.max_line });
                }
                Ok(None)
            }
        }
    }

    /// The vector a read appends to. Consumed bytes are dropped first and
    /// room for one read chunk is reserved, never more than the cap allows
    /// to accumulate plus that chunk.
    pub fn read_target(&mut self) -> &mut Vec<u8> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.reserve(READ_CHUNK);
        &mut self.buf
    }

    /// Appends bytes (for callers and tests that do not read in place).
    pub fn extend(&mut self, bytes: &[u8]) {
        self.read_target().extend_from_slice(bytes);
    }

    /// Appends bytes read elsewhere (into a buffer shared by all sessions),
    /// reserving nothing beyond them.
    pub fn append(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Frees the allocation once every byte has been handed out, so a
    /// session waiting for its next line holds no buffer.
    pub fn release_if_empty(&mut self) {
        if self.start == self.buf.len() && self.buf.capacity() > 0 {
            self.buf = Vec::new();
            self.start = 0;
            self.scanned = 0;
        }
    }

    /// Discards up to `count` received bytes that are not lines (an IMAP
    /// literal's body); returns how many are still to come.
    pub fn skip(&mut self, count: u64) -> u64 {
        let available = (self.buf.len() - self.start) as u64;
        let skipped = available.min(count);
        // `skipped` fits in usize: it is at most `available`.
        self.start += skipped as usize;
        self.scanned = self.scanned.max(self.start);
        count - skipped
    }

    /// Bytes received but not handed out as lines.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Takes the bytes not handed out as lines, leaving the buffer empty.
    pub fn take_pending(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.start);
        self.buf.clear();
        self.start = 0;
        self.scanned = 0;
        rest
    }

    /// Drops everything not yet handed out.
    pub fn discard_pending(&mut self) -> usize {
        let dropped = self.buf.len() - self.start;
        self.buf.clear();
        self.start = 0;
        self.scanned = 0;
        dropped
    }

    /// Whether the buffer has no unconsumed byte.
    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    /// Whether a read may add more bytes: false once the partial line has
    /// reached the cap (the next `next_line` reports it).
    pub fn has_room(&self) -> bool {
        self.buf.len() - self.start <= self.max_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_bytes_make_lines_and_an_emptied_buffer_gives_its_memory_back() {
        let mut buffer = LineBuffer::new(100);
        buffer.append(b"A1 NOOP\r\nA2 NO");
        assert_eq!(buffer.next_line().unwrap(), Some(&b"A1 NOOP\r\n"[..]));
        assert_eq!(buffer.next_line().unwrap(), None);
        // A partial line is kept.
        buffer.release_if_empty();
        buffer.append(b"OP\r\n");
        assert_eq!(buffer.next_line().unwrap(), Some(&b"A2 NOOP\r\n"[..]));
        buffer.release_if_empty();
        assert!(buffer.is_empty());
        assert_eq!(buffer.buf.capacity(), 0);
        buffer.append(b"A3 LOGOUT\r\n");
        assert_eq!(buffer.next_line().unwrap(), Some(&b"A3 LOGOUT\r\n"[..]));
    }

    fn lines_of(buffer: &mut LineBuffer) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Ok(Some(line)) = buffer.next_line() {
            out.push(line.to_vec());
        }
        out
    }

    #[test]
    fn yields_crlf_and_bare_lf_lines_with_their_terminators() {
        let mut buffer = LineBuffer::new(100);
        buffer.extend(b"EHLO a\r\nNOOP\nQUI");
        assert_eq!(
            lines_of(&mut buffer),
            vec![b"EHLO a\r\n".to_vec(), b"NOOP\n".to_vec()]
        );
        assert_eq!(buffer.pending(), b"QUI");
        buffer.extend(b"T\r\n");
        assert_eq!(lines_of(&mut buffer), vec![b"QUIT\r\n".to_vec()]);
        assert!(buffer.is_empty());
    }

    #[test]
    fn a_line_split_across_many_reads_is_reassembled() {
        let mut buffer = LineBuffer::new(100);
        for byte in b"a CAPABILITY\r\n" {
            assert_eq!(buffer.next_line(), Ok(None));
            buffer.extend(&[*byte]);
        }
        assert_eq!(buffer.next_line(), Ok(Some(&b"a CAPABILITY\r\n"[..])));
    }

    #[test]
    fn a_line_of_exactly_the_cap_is_accepted_and_one_more_byte_is_not() {
        let mut buffer = LineBuffer::new(6);
        buffer.extend(b"NOOP\r\n");
        assert_eq!(buffer.next_line(), Ok(Some(&b"NOOP\r\n"[..])));
        buffer.extend(b"NOOPS\r\n");
        assert_eq!(buffer.next_line(), Err(LineTooLong { max: 6 }));
    }

    #[test]
    fn an_unterminated_line_past_the_cap_is_reported_before_it_ends() {
        let mut buffer = LineBuffer::new(8);
        buffer.extend(b"12345678");
        assert_eq!(buffer.next_line(), Ok(None));
        assert!(buffer.has_room());
        buffer.extend(b"9");
        assert_eq!(buffer.next_line(), Err(LineTooLong { max: 8 }));
        assert!(!buffer.has_room());
    }

    #[test]
    fn pending_bytes_after_a_line_are_kept_verbatim_for_the_tls_handshake() {
        let mut buffer = LineBuffer::new(100);
        buffer.extend(b"STARTTLS\r\n\x16\x03\x01\x00\x05hello");
        assert_eq!(buffer.next_line(), Ok(Some(&b"STARTTLS\r\n"[..])));
        assert_eq!(buffer.take_pending(), b"\x16\x03\x01\x00\x05hello".to_vec());
        assert!(buffer.is_empty());
        assert_eq!(buffer.next_line(), Ok(None));
    }

    #[test]
    fn skipping_discards_literal_bodies_even_with_line_ends_inside() {
        let mut buffer = LineBuffer::new(100);
        buffer.extend(b"a\r\nb");
        assert_eq!(buffer.skip(5), 1);
        assert!(buffer.is_empty());
        buffer.extend(b"c rest\r\n");
        assert_eq!(buffer.skip(1), 0);
        assert_eq!(buffer.next_line(), Ok(Some(&b" rest\r\n"[..])));
    }

    #[test]
    fn compaction_keeps_partial_lines_intact() {
        let mut buffer = LineBuffer::new(100);
        buffer.extend(b"one\r\ntw");
        assert_eq!(buffer.next_line(), Ok(Some(&b"one\r\n"[..])));
        assert_eq!(buffer.next_line(), Ok(None));
        buffer.read_target().extend_from_slice(b"o\r\n");
        assert_eq!(buffer.next_line(), Ok(Some(&b"two\r\n"[..])));
        assert_eq!(buffer.discard_pending(), 0);
    }

    proptest::proptest! {
        #[test]
        fn lines_reassemble_to_the_input_and_respect_the_cap(
            input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            split in 1usize..64,
            cap in 1usize..64,
        ) {
            let mut buffer = LineBuffer::new(cap);
            let mut seen = Vec::new();
            let mut failed = false;
            'feed: for chunk in input.chunks(split) {
                buffer.extend(chunk);
                loop {
                    match buffer.next_line() {
                        Ok(Some(line)) => {
                            proptest::prop_assert!(line.len() <= cap);
                            proptest::prop_assert_eq!(line.last(), Some(&b'\n'));
                            seen.extend_from_slice(line);
                        }
                        Ok(None) => break,
                        Err(_) => { failed = true; break 'feed; }
                    }
                }
            }
            if !failed {
                seen.extend_from_slice(buffer.pending());
                proptest::prop_assert_eq!(seen, input);
            }
        }
    }
}
