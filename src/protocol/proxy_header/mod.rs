//! The PROXY protocol header (HAProxy's "The PROXY protocol, Versions 1 & 2",
//! doc/proxy-protocol.txt): the first bytes on a connection, telling the
//! receiver who the client is. This module writes the header the backend
//! receives; [`parse`] reads the one a trusted load balancer sends the proxy.
//!
//! Pure functions, no I/O: the session driver writes the bytes right after
//! its backend connect.
//!
//! - Version 1 is one line of text: `PROXY TCP4 src dst sport dport\r\n`
//!   (`TCP6` for IPv6), section 2.1.
//! - Version 2 is binary, section 2.2: the 12-byte signature, `0x21`
//!   (version 2, command PROXY), `0x11` (TCP over IPv4) or `0x21` (TCP over
//!   IPv6), the length of what follows, the addresses and ports, then TLVs.
//!   When the backend connection starts after the client's TLS handshake
//!   (implicit TLS), the TLVs carry what the handshake established:
//!   `PP2_TYPE_AUTHORITY` (the SNI name) and `PP2_TYPE_SSL` (client flags,
//!   verify result, TLS version, cipher).
//!
//! IPv4-mapped IPv6 addresses (a dual-stack `[::]` listener accepting an
//! IPv4 client) are sent as the IPv4 addresses they are; a pair that still
//! mixes families is sent as IPv6 (the IPv4 side mapped), because both
//! addresses must share the header's one family.

pub mod parse;

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

/// The 12 bytes every version 2 header starts with (section 2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// What a version 1 header starts with (section 2.1).
pub const V1_PREFIX: &[u8] = b"PROXY ";

/// Version 2, command PROXY ("the connection was established on behalf of
/// another node").
const V2_VERSION_PROXY: u8 = 0x21;
/// TCP over IPv4.
const V2_TCP4: u8 = 0x11;
/// TCP over IPv6.
const V2_TCP6: u8 = 0x21;

/// The host name the client asked for: in TLS, the SNI name.
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// TLS facts, with sub-TLVs.
pub const PP2_TYPE_SSL: u8 = 0x20;
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
pub const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
/// `client` bit: the client connected over TLS.
pub const PP2_CLIENT_SSL: u8 = 0x01;
/// The `verify` field is "zero if the client presented a certificate and it
/// was successfully verified, and non-zero otherwise" (section 2.2.6). The
/// proxy requests no client certificates, so it is never zero.
/// (HAProxy itself leaves it 0 when there is no certificate; this follows
/// the specification, which keeps a receiver that tests only `verify == 0`
/// from believing a certificate was verified.)
pub const VERIFY_NO_CERTIFICATE: u32 = 1;

/// What the client's TLS handshake established, for the version 2 TLVs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsFacts<'a> {
    /// OpenSSL's spelling, as the specification's examples: `TLSv1.3`.
    pub version: &'a str,
    /// OpenSSL's name, as the specification's example
    /// `ECDHE-RSA-AES128-GCM-SHA256` (see [`openssl_cipher_name`]).
    pub cipher: &'a str,
    /// The SNI name the client sent, if any.
    pub server_name: Option<&'a str>,
}

/// The version 1 header for a TCP connection from `source` to `destination`.
pub fn v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source_ip, destination_ip) = one_family(source.ip(), destination.ip());
    let family = if source_ip.is_ipv4() { "TCP4" } else { "TCP6" };
    // `Ipv6Addr`'s Display is the canonical compressed form (RFC 5952),
    // which the specification's "one double colon" rule allows.
    format!(
        "PROXY {family} {source_ip} {destination_ip} {} {}\r\n",
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// The version 2 header for a TCP connection from `source` to
/// `destination`, with TLS facts as TLVs when the client's TLS is already
/// established.
pub fn v2(source: SocketAddr, destination: SocketAddr, tls: Option<&TlsFacts<'_>>) -> Vec<u8> {
    let mut header = Vec::with_capacity(16 + 36 + 64);
    header.extend_from_slice(&V2_SIGNATURE);
    header.push(V2_VERSION_PROXY);
    match one_family(source.ip(), destination.ip()) {
        (IpAddr::V4(source_ip), IpAddr::V4(destination_ip)) => {
            header.push(V2_TCP4);
            header.extend_from_slice(&[0, 0]); // length, filled in below
            header.extend_from_slice(&source_ip.octets());
            header.extend_from_slice(&destination_ip.octets());
        }
        (source_ip, destination_ip) => {
            header.push(V2_TCP6);
            header.extend_from_slice(&[0, 0]);
            header.extend_from_slice(&as_ipv6(source_ip).octets());
            header.extend_from_slice(&as_ipv6(destination_ip).octets());
        }
    }
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    if let Some(tls) = tls {
        if let Some(name) = tls.server_name {
            push_tlv(&mut header, PP2_TYPE_AUTHORITY, name.as_bytes());
        }
        let mut ssl = Vec::with_capacity(5 + 3 + tls.version.len() + 3 + tls.cipher.len());
        ssl.push(PP2_CLIENT_SSL);
        ssl.extend_from_slice(&VERIFY_NO_CERTIFICATE.to_be_bytes());
        push_tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, tls.version.as_bytes());
        push_tlv(&mut ssl, PP2_SUBTYPE_SSL_CIPHER, tls.cipher.as_bytes());
        push_tlv(&mut header, PP2_TYPE_SSL, &ssl);
    }
    // Everything after the 16-byte fixed part; far below u16::MAX (an SNI
    // name is at most 255 bytes, see push_tlv for the bound).
    let length = u16::try_from(header.len() - 16).unwrap_or(u16::MAX);
    header[14..16].copy_from_slice(&length.to_be_bytes());
    header
}

/// Type, 16-bit big-endian length, value. Values longer than a TLV can hold
/// are cut (none of ours comes close: SNI names are at most 255 bytes).
fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let value = &value[..value.len().min(usize::from(u16::MAX))];
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// Both addresses in one family: IPv4 when both are IPv4 (or IPv4-mapped
/// IPv6), otherwise IPv6.
fn one_family(source: IpAddr, destination: IpAddr) -> (IpAddr, IpAddr) {
    let (source, destination) = (source.to_canonical(), destination.to_canonical());
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (
            IpAddr::V6(as_ipv6(source)),
            IpAddr::V6(as_ipv6(destination)),
        )
    }
}

fn as_ipv6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    }
}

/// OpenSSL's spelling of a TLS version (what HAProxy and nginx send in
/// `PP2_SUBTYPE_SSL_VERSION`).
pub fn tls_version_name(version: rustls::ProtocolVersion) -> Cow<'static, str> {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => Cow::Borrowed("TLSv1.3"),
        rustls::ProtocolVersion::TLSv1_2 => Cow::Borrowed("TLSv1.2"),
        other => Cow::Owned(format!("{other:?}")),
    }
}

/// OpenSSL's name of a cipher suite, as the specification's example
/// (`ECDHE-RSA-AES128-GCM-SHA256`) and as HAProxy and nginx send it. For
/// TLS 1.3 OpenSSL uses the IANA names (`TLS_AES_128_GCM_SHA256`). Covers
/// every suite the proxy's provider offers; anything else falls back to
/// rustls' name for it.
pub fn openssl_cipher_name(suite: rustls::CipherSuite) -> Cow<'static, str> {
    use rustls::CipherSuite as S;
    Cow::Borrowed(match suite {
        S::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        S::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        S::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        other => return Cow::Owned(format!("{other:?}")),
    })
}

/// Whether a client's first bytes are a PROXY protocol header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientHeader {
    /// They start with `PROXY ` or the version 2 signature.
    Present,
    /// Every byte so far matches the start of one: wait for more.
    Undecided,
    /// They cannot be one.
    Absent,
}

/// Judges the first bytes a client sent. Clients never send a PROXY header
/// to the proxy (only a trusted proxy may, and this proxy accepts none), so
/// one is refused before anything reaches the backend.
///
/// A client whose first line is a bare blank line (a prefix of the version 2
/// signature) is held until more bytes or the idle timeout; no mail client
/// starts that way.
pub fn client_header(first_bytes: &[u8]) -> ClientHeader {
    if first_bytes.starts_with(V1_PREFIX) || first_bytes.starts_with(&V2_SIGNATURE) {
        ClientHeader::Present
    } else if V1_PREFIX.starts_with(first_bytes) || V2_SIGNATURE.starts_with(first_bytes) {
        ClientHeader::Undecided
    } else {
        ClientHeader::Absent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    // Section 2.1's example: "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".
    #[test]
    fn v1_ipv4_is_the_specifications_example() {
        assert_eq!(
            v1(address("192.168.0.1:56324"), address("192.168.0.11:443")),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
    }

    // Section 2.1's longest lines: 56 bytes for TCP4, 104 for TCP6.
    #[test]
    fn v1_longest_lines_match_the_specification() {
        let line = v1(
            address("255.255.255.255:65535"),
            address("255.255.255.255:65535"),
        );
        assert_eq!(
            line,
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
        );
        assert_eq!(line.len(), 56);
        let all_ones = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        let line = v1(address(all_ones), address(all_ones));
        assert_eq!(
            line,
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
        );
        assert_eq!(line.len(), 104);
    }

    #[test]
    fn v1_ipv6_uses_the_compressed_form() {
        assert_eq!(
            v1(
                address("[2001:db8::1]:40000"),
                address("[2001:db8::25]:465")
            ),
            b"PROXY TCP6 2001:db8::1 2001:db8::25 40000 465\r\n"
        );
    }

    #[test]
    fn ipv4_mapped_addresses_are_sent_as_ipv4_and_mixed_pairs_as_ipv6() {
        assert_eq!(
            v1(
                address("[::ffff:192.0.2.7]:1234"),
                address("[::ffff:192.0.2.1]:25")
            ),
            b"PROXY TCP4 192.0.2.7 192.0.2.1 1234 25\r\n"
        );
        assert_eq!(
            v1(address("[2001:db8::7]:1234"), address("192.0.2.1:25")),
            b"PROXY TCP6 2001:db8::7 ::ffff:192.0.2.1 1234 25\r\n"
        );
        let header = v2(
            address("[::ffff:192.0.2.7]:1234"),
            address("192.0.2.1:25"),
            None,
        );
        assert_eq!(header[13], 0x11);
    }

    // Section 2.2: signature, 0x21, 0x11, length 12, then
    // src_addr, dst_addr, src_port, dst_port in network byte order; the
    // same connection as the version 1 example.
    #[test]
    fn v2_ipv4_without_tls_is_byte_exact() {
        let header = v2(
            address("192.168.0.1:56324"),
            address("192.168.0.11:443"),
            None,
        );
        let expected: &[u8] = &[
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54,
            0x0A, // signature
            0x21, // version 2, PROXY
            0x11, // TCP over IPv4
            0x00, 0x0C, // 12 address bytes follow
            192, 168, 0, 1, // source
            192, 168, 0, 11, // destination
            0xDC, 0x04, // 56324
            0x01, 0xBB, // 443
        ];
        assert_eq!(header, expected);
        assert_eq!(header.len(), 16 + 12);
    }

    #[test]
    fn v2_ipv6_without_tls_is_byte_exact() {
        let header = v2(
            address("[2001:db8::1]:40000"),
            address("[2001:db8::25]:993"),
            None,
        );
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]); // 36 address bytes
        expected.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
        ]);
        expected.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x25,
        ]);
        expected.extend_from_slice(&[0x9C, 0x40, 0x03, 0xE1]); // 40000, 993
        assert_eq!(header, expected);
    }

    #[test]
    fn v2_with_tls_carries_authority_and_ssl_tlvs() {
        let tls = TlsFacts {
            version: "TLSv1.3",
            cipher: "TLS_AES_256_GCM_SHA384",
            server_name: Some("mail.example.org"),
        };
        let header = v2(
            address("192.0.2.7:50000"),
            address("192.0.2.1:993"),
            Some(&tls),
        );
        let mut expected = V2_SIGNATURE.to_vec();
        // 12 address bytes + AUTHORITY (3 + 16) + SSL (3 + 5 + 3 + 7 + 3 + 22) = 74
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 74]);
        expected.extend_from_slice(&[192, 0, 2, 7, 192, 0, 2, 1, 0xC3, 0x50, 0x03, 0xE1]);
        expected.extend_from_slice(&[0x02, 0x00, 16]);
        expected.extend_from_slice(b"mail.example.org");
        expected.extend_from_slice(&[0x20, 0x00, 40]); // PP2_TYPE_SSL, 40 bytes
        expected.push(0x01); // client: PP2_CLIENT_SSL, no certificate flags
        expected.extend_from_slice(&[0x00, 0x00, 0x00, 0x01]); // verify: non-zero, no certificate
        expected.extend_from_slice(&[0x21, 0x00, 7]);
        expected.extend_from_slice(b"TLSv1.3");
        expected.extend_from_slice(&[0x23, 0x00, 22]);
        expected.extend_from_slice(b"TLS_AES_256_GCM_SHA384");
        assert_eq!(header, expected);
        assert_eq!(header.len(), 16 + 74);
    }

    #[test]
    fn v2_without_sni_has_no_authority_tlv() {
        let tls = TlsFacts {
            version: "TLSv1.2",
            cipher: "ECDHE-RSA-AES128-GCM-SHA256",
            server_name: None,
        };
        let header = v2(
            address("[2001:db8::1]:1"),
            address("[2001:db8::2]:2"),
            Some(&tls),
        );
        let tlvs = &header[16 + 36..];
        assert_eq!(tlvs[0], PP2_TYPE_SSL);
        let length = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        assert_eq!(tlvs.len(), 3 + length);
        assert_eq!(
            &tlvs[3..],
            &b"\x01\x00\x00\x00\x01\x21\x00\x07TLSv1.2\x23\x00\x1bECDHE-RSA-AES128-GCM-SHA256"[..]
        );
        assert_eq!(
            usize::from(u16::from_be_bytes([header[14], header[15]])),
            36 + tlvs.len()
        );
    }

    #[test]
    fn names_follow_openssl() {
        assert_eq!(
            openssl_cipher_name(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
            "TLS_AES_128_GCM_SHA256"
        );
        assert_eq!(
            openssl_cipher_name(rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
            "ECDHE-RSA-AES128-GCM-SHA256"
        );
        assert_eq!(
            tls_version_name(rustls::ProtocolVersion::TLSv1_3),
            "TLSv1.3"
        );
        // Every suite the proxy can negotiate has an OpenSSL name.
        for suite in crate::tls::provider::provider().cipher_suites.iter() {
            let name = openssl_cipher_name(suite.suite());
            assert!(
                matches!(name, Cow::Borrowed(_)),
                "no OpenSSL name for {:?}",
                suite.suite()
            );
        }
    }

    #[test]
    fn client_sent_headers_are_recognised() {
        assert_eq!(
            client_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
            ClientHeader::Present
        );
        let mut v2_header = V2_SIGNATURE.to_vec();
        v2_header.extend_from_slice(&[0x21, 0x11, 0, 12]);
        assert_eq!(client_header(&v2_header), ClientHeader::Present);
        assert_eq!(client_header(b""), ClientHeader::Undecided);
        assert_eq!(client_header(b"PRO"), ClientHeader::Undecided);
        assert_eq!(client_header(b"\r\n\r\n\0"), ClientHeader::Undecided);
        for legit in [
            &b"EHLO client.example\r\n"[..],
            b"a1 CAPABILITY\r\n",
            b"P1 LOGIN a b\r\n",
            b"PROXY\r\n",
            b"proxy tcp4\r\n",
            b"\r\nEHLO x\r\n",
        ] {
            assert_eq!(client_header(legit), ClientHeader::Absent, "{legit:?}");
        }
    }
}
