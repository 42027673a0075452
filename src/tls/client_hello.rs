//! What the acceptor needs to know of a ClientHello that rustls does not
//! tell: whether the client offers a TLS 1.3 pre-shared key (a session
//! ticket), i.e. asks to resume.
//!
//! A resumed session is sent one new ticket, a full handshake two (OpenSSL's
//! policy): a client that uses each ticket once holds a fresh one after
//! every connection either way, and minting a ticket is a key derivation,
//! an encryption and record bytes that a resumed session need not pay twice.
//! The answer only chooses how many tickets to send; rustls still decides
//! whether the ticket is good, so a wrong answer costs at most one ticket.
//!
//! Sans-IO: it reads the bytes the acceptor has already received, and
//! treats anything it cannot follow as "no".

/// TLS record content type of handshake messages.
const HANDSHAKE_RECORD: u8 = 22;
/// Handshake message type of the ClientHello.
const CLIENT_HELLO: u8 = 1;
/// The `pre_shared_key` extension (RFC 8446, 4.2.11).
const PRE_SHARED_KEY: u16 = 41;
/// rustls refuses larger ClientHellos long before this.
const LARGEST_CLIENT_HELLO: usize = 64 * 1024;

/// Whether the ClientHello at the start of `received` (TLS records as they
/// came from the client) carries a `pre_shared_key` extension.
pub fn offers_pre_shared_key(received: &[u8]) -> bool {
    let message = handshake_bytes(received);
    client_hello_extensions(&message)
        .is_some_and(|extensions| has_extension(extensions, PRE_SHARED_KEY))
}

/// The handshake-record payloads at the start of `received`, joined (a
/// ClientHello may be split across records).
fn handshake_bytes(mut received: &[u8]) -> Vec<u8> {
    let mut joined = Vec::new();
    while let [HANDSHAKE_RECORD, _, _, high, low, rest @ ..] = received {
        let length = usize::from(u16::from_be_bytes([*high, *low]));
        let Some(fragment) = rest.get(..length) else {
            joined.extend_from_slice(rest);
            break;
        };
        joined.extend_from_slice(fragment);
        if joined.len() > LARGEST_CLIENT_HELLO {
            break;
        }
        received = &rest[length..];
    }
    joined
}

/// The extensions block of the ClientHello message at the start of
/// `message`, if it is whole and well formed up to there.
fn client_hello_extensions(message: &[u8]) -> Option<&[u8]> {
    let mut reader = Reader(message);
    if reader.u8()? != CLIENT_HELLO {
        return None;
    }
    let length = reader.u24()?;
    let mut body = Reader(reader.take(length)?);
    body.take(2 + 32)?; // legacy_version, random
    body.vector_u8()?; // legacy_session_id
    body.vector_u16()?; // cipher_suites
    body.vector_u8()?; // legacy_compression_methods
    body.vector_u16()
}

fn has_extension(extensions: &[u8], wanted: u16) -> bool {
    let mut reader = Reader(extensions);
    while let Some(kind) = reader.u16() {
        if kind == wanted {
            return true;
        }
        if reader.vector_u16().is_none() {
            return false;
        }
    }
    false
}

/// Big-endian reads from the front of a byte slice; `None` past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        let taken = self.0.get(..count)?;
        self.0 = &self.0[count..];
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|bytes| {
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2])
        })
    }

    fn vector_u8(&mut self) -> Option<&'a [u8]> {
        let length = usize::from(self.u8()?);
        self.take(length)
    }

    fn vector_u16(&mut self) -> Option<&'a [u8]> {
        let length = usize::from(self.u16()?);
        self.take(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A ClientHello with `extensions` (type, body), in records of at most
    /// `fragment` bytes.
    fn client_hello(extensions: &[(u16, Vec<u8>)], fragment: usize) -> Vec<u8> {
        let mut block = Vec::new();
        for (kind, body) in extensions {
            block.extend_from_slice(&kind.to_be_bytes());
            block.extend_from_slice(&(body.len() as u16).to_be_bytes());
            block.extend_from_slice(body);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[32]);
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&[0, 2, 0x13, 0x02]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(block.len() as u16).to_be_bytes());
        body.extend_from_slice(&block);
        let mut message = vec![CLIENT_HELLO];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        let mut records = Vec::new();
        for chunk in message.chunks(fragment) {
            records.extend_from_slice(&[HANDSHAKE_RECORD, 3, 1]);
            records.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            records.extend_from_slice(chunk);
        }
        records
    }

    fn resuming() -> Vec<(u16, Vec<u8>)> {
        vec![
            (0, b"\x00\x0a\x00\x00\x07example".to_vec()),
            (43, vec![2, 3, 4]),
            (45, vec![1, 1]),
            (PRE_SHARED_KEY, vec![0xaa; 120]),
        ]
    }

    #[test]
    fn a_pre_shared_key_is_found_in_one_record_or_split_across_many() {
        for fragment in [1, 5, 50, 16384] {
            assert!(
                offers_pre_shared_key(&client_hello(&resuming(), fragment)),
                "{fragment}"
            );
        }
    }

    #[test]
    fn a_client_hello_without_one_is_not_resuming() {
        let mut extensions = resuming();
        extensions.pop();
        assert!(!offers_pre_shared_key(&client_hello(&extensions, 16384)));
        // The extension's number inside another extension's body is not it.
        let hidden = vec![(0xfe0d, vec![0, 41, 0, 0])];
        assert!(!offers_pre_shared_key(&client_hello(&hidden, 16384)));
    }

    #[test]
    fn what_cannot_be_followed_is_a_no() {
        let whole = client_hello(&resuming(), 16384);
        for end in 0..whole.len() {
            assert!(!offers_pre_shared_key(&whole[..end]), "cut at {end}");
        }
        let mut not_handshake = whole.clone();
        not_handshake[0] = 23;
        assert!(!offers_pre_shared_key(&not_handshake));
        let mut not_client_hello = whole;
        not_client_hello[5] = 2;
        assert!(!offers_pre_shared_key(&not_client_hello));
        assert!(!offers_pre_shared_key(b"EHLO client.example\r\n"));
    }

    /// OpenSSL 3's own ClientHellos (Python's `ssl`, a full connection and
    /// one offering a ticket), as kept in the fuzz seeds: a size byte, then
    /// the handshake message.
    #[test]
    fn openssl_client_hellos_read_as_they_are() {
        let frame = |seed: &[u8]| {
            let message = &seed[1..];
            let mut records = vec![HANDSHAKE_RECORD, 3, 1];
            records.extend_from_slice(&(message.len() as u16).to_be_bytes());
            records.extend_from_slice(message);
            records
        };
        let full = include_bytes!("../../fuzz/corpus/client_hello/openssl-full-one-record");
        let resuming = include_bytes!("../../fuzz/corpus/client_hello/openssl-resuming-one-record");
        assert!(!offers_pre_shared_key(&frame(full)));
        assert!(offers_pre_shared_key(&frame(resuming)));
    }

    proptest! {
        #[test]
        fn any_bytes_are_answered_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = offers_pre_shared_key(&bytes);
        }

        #[test]
        fn any_record_split_gives_the_same_answer(fragment in 1usize..400, with_psk: bool) {
            let mut extensions = resuming();
            if !with_psk {
                extensions.pop();
            }
            prop_assert_eq!(offers_pre_shared_key(&client_hello(&extensions, fragment)), with_psk);
        }
    }
}
