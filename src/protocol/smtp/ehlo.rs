//! The EHLO reply rewrite: the backend's STARTTLS, XCLIENT and XFORWARD
//! lines removed, the proxy's STARTTLS added before TLS, AUTH hidden while
//! the policy says so, and the HELO fallback for backends that predate EHLO.

use super::*;

impl SmtpInspector {
    /// Handles the complete reply to EHLO.
    pub(super) fn finish_ehlo(&mut self, code: u16, out: &mut Output) -> Next {
        if (200..300).contains(&code) {
            let mut texts = Vec::with_capacity(self.reply.len() + 16);
            for (index, line) in self.collected_lines().enumerate() {
                let text = reply_text(line);
                // The first line is the server's name, never an extension.
                let hidden = index > 0
                    && (is_keyword(text, b"STARTTLS")
                        || is_keyword(text, b"XCLIENT")
                        || is_keyword(text, b"XFORWARD"));
                if !hidden {
                    texts.extend_from_slice(text);
                    texts.extend_from_slice(b"\r\n");
                }
            }
            if !self.gate.tls_active() {
                self.capabilities_before_tls = Some(texts.clone());
            }
            write_ehlo_reply(
                &texts,
                self.gate.offers_starttls(),
                self.gate.restricted(),
                out,
            );
            self.state = State::Idle;
            return Next::Continue;
        }
        let refused = matches!(code, 500 | 502 | 503 | 504);
        if refused && self.gate.tls_active() {
            if let Some(texts) = &self.capabilities_before_tls {
                // RFC 3207 wants a fresh EHLO after TLS; a backend that does
                // not allow a second one still has the session it greeted,
                // so its earlier answer stands (STARTTLS already removed).
                write_ehlo_reply(texts, false, false, out);
                self.state = State::Idle;
                return Next::Continue;
            }
        }
        if matches!(code, 500 | 502 | 504) {
            // An RFC 821 backend: greet it with HELO and answer EHLO ourselves.
            out.to_backend.extend_from_slice(b"HELO ");
            out.to_backend.extend_from_slice(&self.ehlo_domain);
            out.to_backend.extend_from_slice(b"\r\n");
            self.start_collecting(Pending::HeloFallback);
            return Next::Continue;
        }
        self.relay_collected(out);
        self.state = State::Idle;
        Next::Continue
    }

    /// Handles the complete reply to the HELO sent in place of EHLO.
    pub(super) fn finish_helo_fallback(&mut self, code: u16, out: &mut Output) -> Next {
        if (200..300).contains(&code) {
            let mut texts = Vec::with_capacity(64);
            if let Some(first) = self.collected_lines().next() {
                texts.extend_from_slice(reply_text(first));
            }
            texts.extend_from_slice(b"\r\n");
            write_ehlo_reply(&texts, self.gate.offers_starttls(), false, out);
        } else {
            self.relay_collected(out);
        }
        self.state = State::Idle;
        Next::Continue
    }
}

/// `AUTH mechanisms` or the pre-RFC 4954 `AUTH=mechanisms` form.
fn is_auth_extension(text: &[u8]) -> bool {
    is_keyword(text, b"AUTH")
        || text
            .get(..5)
            .is_some_and(|start| start.eq_ignore_ascii_case(b"AUTH="))
}

/// Whether an EHLO extension line names `keyword` (case-insensitive).
pub(super) fn is_keyword(text: &[u8], keyword: &[u8]) -> bool {
    split_word(text).0.eq_ignore_ascii_case(keyword)
}

/// Writes a 250 EHLO reply from `\r\n`-terminated line texts, adding STARTTLS
/// last when asked and leaving out AUTH extensions when asked, with `250-` on
/// every line but the last.
fn write_ehlo_reply(texts: &[u8], with_starttls: bool, hide_auth: bool, out: &mut Output) {
    let mut lines: Vec<&[u8]> = texts
        .split_inclusive(|&b| b == b'\n')
        .map(trim_eol)
        .enumerate()
        .filter(|(index, text)| !(hide_auth && *index > 0 && is_auth_extension(text)))
        .map(|(_, text)| text)
        .collect();
    if lines.is_empty() {
        lines.push(b"");
    }
    if with_starttls {
        lines.push(b"STARTTLS");
    }
    let count = lines.len();
    for (index, text) in lines.into_iter().enumerate() {
        out.to_client
            .extend_from_slice(if index + 1 == count { b"250 " } else { b"250-" });
        out.to_client.extend_from_slice(text);
        out.to_client.extend_from_slice(b"\r\n");
    }
}
