//! Reading the PROXY protocol header a trusted load balancer (HAProxy, a
//! cloud network load balancer) sends before anything else on a connection,
//! naming the real client.
//!
//! Pure functions, no I/O: [`parse`] judges the bytes received so far and
//! says whether they hold a complete header (and how many bytes it spans,
//! so the caller consumes exactly those and nothing of the client's own
//! bytes behind it), need more, or cannot be one. The session driver calls it
//! only for connections from `accept_proxy_from` sources; from anyone else a
//! header is refused (see [`super::client_header`]).
//!
//! What is trusted from a header is the source and destination address and
//! port, nothing else: TLVs (`PP2_TYPE_AUTHORITY` among them) are skipped,
//! so an upstream cannot choose the certificate a client gets.
//!
//! Bounds: a version 1 line is at most 107 bytes (section 2.1); a version 2
//! header at most [`MAX_V2_LENGTH`] bytes after its 16-byte fixed part,
//! far above what HAProxy and cloud balancers send (addresses plus a few
//! short TLVs), so a peer cannot make the proxy buffer more.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{V1_PREFIX, V2_SIGNATURE};

/// Section 2.1: "a 108-byte buffer is always enough to store all the line
/// and a trailing zero": 107 bytes with the CRLF.
pub const MAX_V1_LINE: usize = 107;
/// The most a version 2 header may carry after its fixed part (addresses
/// and TLVs).
pub const MAX_V2_LENGTH: usize = 1024;
/// The longest header [`parse`] accepts, either version.
pub const MAX_HEADER: usize = V2_FIXED + MAX_V2_LENGTH;

/// Signature, version and command, family and transport, length.
const V2_FIXED: usize = 16;
/// Version 2 address block sizes (section 2.2): two addresses, two ports.
const V2_INET_ADDRESSES: usize = 4 + 4 + 2 + 2;
const V2_INET6_ADDRESSES: usize = 16 + 16 + 2 + 2;

/// Who the balancer says the connection is from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// A relayed connection: the real client, and the address it connected
    /// to on the balancer.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer's own connection, not relaying a client: version 2
    /// `LOCAL` (health checks), version 1 `UNKNOWN`, or a version 2 address
    /// family that carries no IP address (`AF_UNSPEC`, `AF_UNIX`). Served as
    /// a connection from the balancer itself.
    Local,
}

/// What the bytes received so far amount to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Every byte fits a header that is not complete yet: all of them belong
    /// to it, so they may be consumed, and more must be read.
    Incomplete,
    /// A whole header spanning the first `length` bytes.
    Complete { header: Received, length: usize },
}

/// Why bytes are not an acceptable PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection does not start with a PROXY protocol header")]
    NotAHeader,
    #[error("PROXY v1 line without CRLF within {MAX_V1_LINE} bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 line: {0}")]
    V1Malformed(&'static str),
    #[error("PROXY v2 version/command byte {0:#04x} is neither LOCAL nor PROXY of version 2")]
    V2VersionCommand(u8),
    #[error("PROXY v2 family/transport byte {0:#04x} is not TCP (or unspecified)")]
    V2Transport(u8),
    #[error("PROXY v2 header announces {0} bytes, more than the {MAX_V2_LENGTH} accepted")]
    V2TooLong(usize),
    #[error("PROXY v2 address block of {0} bytes is too short for its family")]
    V2ShortAddresses(usize),
}

impl HeaderError {
    /// A short fixed name, for log fields.
    pub fn as_str(self) -> &'static str {
        match self {
            HeaderError::NotAHeader => "not_a_header",
            HeaderError::V1TooLong => "v1_too_long",
            HeaderError::V1Malformed(_) => "v1_malformed",
            HeaderError::V2VersionCommand(_) => "v2_version_command",
            HeaderError::V2Transport(_) => "v2_transport",
            HeaderError::V2TooLong(_) => "v2_too_long",
            HeaderError::V2ShortAddresses(_) => "v2_short_addresses",
        }
    }
}

/// Judges the first bytes of a connection from a trusted source.
pub fn parse(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    if bytes.starts_with(V1_PREFIX) {
        parse_v1(bytes)
    } else if bytes.starts_with(&V2_SIGNATURE) {
        parse_v2(bytes)
    } else if V1_PREFIX.starts_with(bytes) || V2_SIGNATURE.starts_with(bytes) {
        // Including no bytes at all.
        Ok(Parsed::Incomplete)
    } else {
        Err(HeaderError::NotAHeader)
    }
}

/// Section 2.1: `PROXY TCP4|TCP6 src dst sport dport\r\n`, single spaces,
/// or `PROXY UNKNOWN` followed by anything up to the CRLF.
fn parse_v1(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    let window = &bytes[..bytes.len().min(MAX_V1_LINE)];
    // The line ends at its first LF, which must follow a CR.
    let Some(lf) = window.iter().position(|&byte| byte == b'\n') else {
        return if window.len() >= MAX_V1_LINE {
            Err(HeaderError::V1TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(HeaderError::V1Malformed("line ends without CR"));
    }
    let end = lf - 1;
    let line = &bytes[V1_PREFIX.len()..end];
    let length = end + 2;
    if line.starts_with(b"UNKNOWN") && matches!(line.get(7), None | Some(b' ')) {
        return Ok(Parsed::Complete {
            header: Received::Local,
            length,
        });
    }
    let text = std::str::from_utf8(line).map_err(|_| HeaderError::V1Malformed("not ASCII"))?;
    let mut fields = text.split(' ');
    let (
        Some(family),
        Some(source),
        Some(destination),
        Some(source_port),
        Some(destination_port),
        None,
    ) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    )
    else {
        return Err(HeaderError::V1Malformed(
            "expected protocol, two addresses and two ports separated by single spaces",
        ));
    };
    let (source, destination): (IpAddr, IpAddr) = match family {
        "TCP4" => (
            IpAddr::V4(v1_address::<Ipv4Addr>(source)?),
            IpAddr::V4(v1_address::<Ipv4Addr>(destination)?),
        ),
        "TCP6" => (
            IpAddr::V6(v1_address::<Ipv6Addr>(source)?),
            IpAddr::V6(v1_address::<Ipv6Addr>(destination)?),
        ),
        _ => {
            return Err(HeaderError::V1Malformed(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    Ok(Parsed::Complete {
        header: Received::Proxied {
            source: SocketAddr::new(source, v1_port(source_port)?),
            destination: SocketAddr::new(destination, v1_port(destination_port)?),
        },
        length,
    })
}

fn v1_address<A: std::str::FromStr>(text: &str) -> Result<A, HeaderError> {
    text.parse()
        .map_err(|_| HeaderError::V1Malformed("address does not match the protocol"))
}

/// Decimal, 0 to 65535, digits only (no sign, no leading zero but "0").
fn v1_port(text: &str) -> Result<u16, HeaderError> {
    let digits_only = !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit());
    let leading_zero = text.len() > 1 && text.starts_with('0');
    match text.parse::<u16>() {
        Ok(port) if digits_only && !leading_zero => Ok(port),
        _ => Err(HeaderError::V1Malformed(
            "port is not a number from 0 to 65535",
        )),
    }
}

/// Section 2.2: signature, version and command, family and transport,
/// length, addresses, TLVs.
fn parse_v2(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    // The fixed part decides the rest; judge each byte as soon as it is here.
    let version_command = match bytes.get(12) {
        None => return Ok(Parsed::Incomplete),
        Some(&byte) if byte == 0x20 || byte == 0x21 => byte,
        Some(&byte) => return Err(HeaderError::V2VersionCommand(byte)),
    };
    let Some(&transport) = bytes.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    let Some(length) = bytes.get(14..16) else {
        return Ok(Parsed::Incomplete);
    };
    let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
    if length > MAX_V2_LENGTH {
        return Err(HeaderError::V2TooLong(length));
    }
    let local = version_command == 0x20;
    // LOCAL ignores the family entirely (section 2.2: "the receiver must
    // accept this connection as valid and must use the real connection
    // endpoints"); PROXY must be TCP or carry no address.
    let family = transport >> 4;
    let stream = transport & 0x0F;
    let tcp_or_unspecified = matches!((family, stream), (1..=3, 1)) || transport == 0x00;
    if !local && !tcp_or_unspecified {
        return Err(HeaderError::V2Transport(transport));
    }
    let needed = match (local, family) {
        (false, 1) => V2_INET_ADDRESSES,
        (false, 2) => V2_INET6_ADDRESSES,
        _ => 0,
    };
    if length < needed {
        return Err(HeaderError::V2ShortAddresses(length));
    }
    let total = V2_FIXED + length;
    let Some(addresses) = bytes.get(V2_FIXED..total) else {
        return Ok(Parsed::Incomplete);
    };
    let header = match (local, family) {
        (false, 1) => {
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    addresses[at],
                    addresses[at + 1],
                    addresses[at + 2],
                    addresses[at + 3],
                ))
            };
            let port = |at: usize| u16::from_be_bytes([addresses[at], addresses[at + 1]]);
            Received::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        (false, 2) => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&addresses[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([addresses[at], addresses[at + 1]]);
            Received::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        _ => Received::Local,
    };
    Ok(Parsed::Complete {
        header,
        length: total,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{v1, v2, TlsFacts};
    use super::*;

    fn address(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    fn complete(bytes: &[u8]) -> (Received, usize) {
        match parse(bytes) {
            Ok(Parsed::Complete { header, length }) => (header, length),
            other => panic!("{bytes:?}: expected a complete header, got {other:?}"),
        }
    }

    // Section 2.1's example.
    #[test]
    fn v1_the_specifications_example() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        assert_eq!(
            complete(line),
            (
                Received::Proxied {
                    source: address("192.168.0.1:56324"),
                    destination: address("192.168.0.11:443"),
                },
                line.len()
            )
        );
    }

    #[test]
    fn v1_the_client_bytes_behind_the_line_are_not_part_of_it() {
        let mut bytes = b"PROXY TCP6 2001:db8::1 2001:db8::25 40000 25\r\n".to_vec();
        let header_length = bytes.len();
        bytes.extend_from_slice(b"EHLO client.example\r\n");
        assert_eq!(
            complete(&bytes),
            (
                Received::Proxied {
                    source: address("[2001:db8::1]:40000"),
                    destination: address("[2001:db8::25]:25"),
                },
                header_length
            )
        );
    }

    #[test]
    fn v1_unknown_is_the_balancers_own_connection() {
        assert_eq!(complete(b"PROXY UNKNOWN\r\n"), (Received::Local, 15));
        let line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert_eq!(complete(line), (Received::Local, line.len()));
    }

    #[test]
    fn v1_longest_lines_are_accepted() {
        let all_ones = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        let line = v1(address(all_ones), address(all_ones));
        assert_eq!(line.len(), 104);
        assert_eq!(complete(&line).1, 104);
        // UNKNOWN may carry anything up to the 107-byte limit.
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(MAX_V1_LINE - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(complete(&line), (Received::Local, MAX_V1_LINE));
    }

    #[test]
    fn v1_incomplete_until_the_crlf_then_too_long() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        for cut in 0..line.len() {
            assert_eq!(parse(&line[..cut]), Ok(Parsed::Incomplete), "{cut}");
        }
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_V1_LINE, b'x');
        assert_eq!(parse(&long), Err(HeaderError::V1TooLong));
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Err(HeaderError::V1TooLong));
    }

    #[test]
    fn v1_malformed_lines_are_refused() {
        for line in [
            &b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n"[..],
            b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 9\r\n",
            b"PROXY TCP4 2001:db8::1 192.168.0.11 56324 443\r\n",
            b"PROXY TCP6 192.168.0.1 2001:db8::1 56324 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 +80 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 080 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n",
            b"PROXY TCP4 192.168.000.1 192.168.0.11 1 443\r\n",
            b"PROXY UDP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n",
            b"PROXY TCP4 \xff.168.0.1 192.168.0.11 56324 443\r\n",
            b"PROXY \r\n",
            // A bare LF inside an UNKNOWN line ends it, malformed, even
            // with a CRLF further on (found by fuzzing: the prefix and the
            // whole line must be judged alike).
            b"PROXY UNKNOWN a\nb\r\n",
        ] {
            assert!(
                matches!(parse(line), Err(HeaderError::V1Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(line),
                parse(line)
            );
        }
    }

    #[test]
    fn other_first_bytes_are_not_a_header() {
        for bytes in [
            &b"EHLO client.example\r\n"[..],
            b"\x16\x03\x01\x02\x00\x01",
            b"proxy TCP4",
            b"PROXY\r\n",
            b"\r\n\r\n\0\r\nQUIX\n",
        ] {
            assert_eq!(parse(bytes), Err(HeaderError::NotAHeader), "{bytes:?}");
        }
        assert_eq!(parse(b""), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PROX"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"\r\n\r\n\0"), Ok(Parsed::Incomplete));
    }

    // The headers this proxy itself writes are read back as they were meant.
    #[test]
    fn v2_round_trips_with_the_writer() {
        for (source, destination) in [
            ("192.168.0.1:56324", "192.168.0.11:443"),
            ("[2001:db8::1]:40000", "[2001:db8::25]:993"),
        ] {
            let (source, destination) = (address(source), address(destination));
            let header = v2(source, destination, None);
            assert_eq!(
                complete(&header),
                (
                    Received::Proxied {
                        source,
                        destination
                    },
                    header.len()
                )
            );
        }
    }

    #[test]
    fn v2_tlvs_are_skipped_and_authority_is_not_trusted() {
        let facts = TlsFacts {
            version: "TLSv1.3",
            cipher: "TLS_AES_256_GCM_SHA384",
            server_name: Some("attacker.example"),
        };
        let mut bytes = v2(
            address("192.0.2.7:50000"),
            address("192.0.2.1:993"),
            Some(&facts),
        );
        let header_length = bytes.len();
        bytes.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            complete(&bytes),
            (
                Received::Proxied {
                    source: address("192.0.2.7:50000"),
                    destination: address("192.0.2.1:993"),
                },
                header_length
            )
        );
    }

    // Section 2.2 byte layout, written out by hand.
    #[test]
    fn v2_ipv4_byte_exact() {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        bytes.extend_from_slice(&[203, 0, 113, 9, 10, 0, 0, 1, 0x04, 0xD2, 0x00, 0x19]);
        assert_eq!(
            complete(&bytes),
            (
                Received::Proxied {
                    source: address("203.0.113.9:1234"),
                    destination: address("10.0.0.1:25"),
                },
                28
            )
        );
    }

    #[test]
    fn v2_local_and_address_free_families_are_the_balancer_itself() {
        // HAProxy's health check: LOCAL, AF_UNSPEC, no addresses.
        let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
        assert_eq!(complete(local), (Received::Local, 16));
        // LOCAL with addresses present: still the real endpoints.
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x20, 0x11, 0x00, 0x0C]);
        bytes.extend_from_slice(&[203, 0, 113, 9, 10, 0, 0, 1, 0x04, 0xD2, 0x00, 0x19]);
        assert_eq!(complete(&bytes), (Received::Local, 28));
        // PROXY over AF_UNSPEC, and over AF_UNIX (paths, not addresses).
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
        assert_eq!(complete(&bytes), (Received::Local, 16));
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x21, 0x31, 0x00, 0xD8]);
        bytes.resize(16 + 216, b'/');
        assert_eq!(complete(&bytes), (Received::Local, 16 + 216));
    }

    #[test]
    fn v2_incomplete_until_the_announced_length() {
        let header = v2(
            address("[2001:db8::1]:40000"),
            address("[2001:db8::25]:993"),
            None,
        );
        for cut in 0..header.len() {
            assert_eq!(parse(&header[..cut]), Ok(Parsed::Incomplete), "{cut}");
        }
    }

    #[test]
    fn v2_bad_fixed_parts_are_refused_as_soon_as_they_arrive() {
        let with = |rest: &[u8]| {
            let mut bytes = V2_SIGNATURE.to_vec();
            bytes.extend_from_slice(rest);
            bytes
        };
        assert_eq!(
            parse(&with(&[0x11])),
            Err(HeaderError::V2VersionCommand(0x11))
        );
        assert_eq!(
            parse(&with(&[0x22])),
            Err(HeaderError::V2VersionCommand(0x22))
        );
        // UDP over IPv4 and IPv6, and an unknown family.
        for transport in [0x12, 0x22, 0x41, 0x10, 0x01] {
            assert_eq!(
                parse(&with(&[0x21, transport, 0, 12])),
                Err(HeaderError::V2Transport(transport))
            );
        }
        assert_eq!(
            parse(&with(&[0x21, 0x11, 0x04, 0x01])),
            Err(HeaderError::V2TooLong(1025))
        );
        assert_eq!(
            parse(&with(&[0x21, 0x11, 0xFF, 0xFF])),
            Err(HeaderError::V2TooLong(65535))
        );
        assert_eq!(
            parse(&with(&[0x21, 0x11, 0x00, 0x0B])),
            Err(HeaderError::V2ShortAddresses(11))
        );
        assert_eq!(
            parse(&with(&[0x21, 0x21, 0x00, 0x0C])),
            Err(HeaderError::V2ShortAddresses(12))
        );
        // The longest accepted announcement is incomplete, not refused.
        assert_eq!(
            parse(&with(&[0x21, 0x11, 0x04, 0x00])),
            Ok(Parsed::Incomplete)
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            // Any bytes: a verdict, never a panic, and a complete header
            // never claims more bytes than it was given or than the limit.
            #[test]
            fn any_bytes_get_a_verdict(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                if let Ok(Parsed::Complete { length, .. }) = parse(&bytes) {
                    prop_assert!(length <= bytes.len());
                    prop_assert!(length <= MAX_HEADER);
                }
            }

            // Bytes behind a v2 signature, the riskiest path.
            #[test]
            fn any_v2_body_gets_a_verdict(body in proptest::collection::vec(any::<u8>(), 0..300)) {
                let mut bytes = V2_SIGNATURE.to_vec();
                bytes.extend_from_slice(&body);
                if let Ok(Parsed::Complete { length, .. }) = parse(&bytes) {
                    prop_assert!(length <= bytes.len());
                }
            }

            // Every header the writer makes is read back exactly, whatever
            // follows it, and every proper prefix is incomplete.
            #[test]
            fn written_headers_read_back(
                source in any::<SocketAddr>(),
                destination in any::<SocketAddr>(),
                version_two in any::<bool>(),
                tail in proptest::collection::vec(any::<u8>(), 0..40),
            ) {
                let header = if version_two {
                    v2(source, destination, None)
                } else {
                    v1(source, destination)
                };
                let mut bytes = header.clone();
                bytes.extend_from_slice(&tail);
                let (received, length) = match parse(&bytes) {
                    Ok(Parsed::Complete { header, length }) => (header, length),
                    other => return Err(TestCaseError::fail(format!("{other:?}"))),
                };
                prop_assert_eq!(length, header.len());
                let Received::Proxied { source: read_source, destination: read_destination } = received else {
                    return Err(TestCaseError::fail("not proxied"));
                };
                prop_assert_eq!(read_source.port(), source.port());
                prop_assert_eq!(read_destination.port(), destination.port());
                // The writer sends IPv4-mapped addresses as IPv4, and mixed
                // pairs as IPv6: compare canonical forms.
                prop_assert_eq!(read_source.ip().to_canonical(), source.ip().to_canonical());
                prop_assert_eq!(read_destination.ip().to_canonical(), destination.ip().to_canonical());
                for cut in 0..header.len() {
                    prop_assert_eq!(parse(&header[..cut]), Ok(Parsed::Incomplete));
                }
            }
        }
    }
}
