//! The CAPA rewrite: the backend's STLS line removed, the proxy's added
//! before the terminating `.` before TLS, the ways to log in hidden while the
//! policy says so, and a list offering STLS for backends that predate CAPA.

use super::*;

/// The capability lines hidden before TLS under a restricting policy.
const CREDENTIAL_CAPABILITIES: &[&[u8]] = &[b"USER", b"SASL"];

impl Pop3Inspector {
    pub(super) fn capa_status(&mut self, line: &[u8], out: &mut Output) {
        if is_ok(line) {
            out.to_client.extend_from_slice(line);
            self.state = State::CapaBody;
            return;
        }
        // `-ERR` (or anything that is not `+OK`): a backend without CAPA.
        if self.gate.offers_starttls() {
            out.to_client.extend_from_slice(SYNTHESIZED_CAPA);
        } else {
            out.to_client.extend_from_slice(line);
        }
        self.state = State::Idle;
    }

    pub(super) fn capa_body(&mut self, line: &[u8], out: &mut Output) {
        let text = trim_eol(line);
        if text == b"." {
            if self.gate.offers_starttls() {
                out.to_client.extend_from_slice(STLS_CAPABILITY);
            }
            out.to_client.extend_from_slice(line);
            self.state = State::Idle;
        } else if split_word(text).0.eq_ignore_ascii_case(b"STLS")
            || (self.gate.restricted() && is_one_of(lenient_verb(text), CREDENTIAL_CAPABILITIES))
        {
            // Dropped: the backend's STLS, and the ways to log in that the
            // policy does not allow before TLS.
        } else {
            // Dot-stuffed lines (`..`) are data and relayed as they are.
            out.to_client.extend_from_slice(line);
        }
    }
}
