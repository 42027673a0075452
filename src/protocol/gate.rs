//! The STARTTLS gate: where one session stands with TLS and what the
//! listener's policy allows because of it, as all three machines ask it.
//!
//! - [`TlsGate::offers_starttls`]: capability lists offer the proxy's
//!   STARTTLS (a STARTTLS listener before TLS).
//! - [`TlsGate::restricted`]: the policy restricts the dialogue (credentials
//!   hidden and refused; nothing hands the session to pass-through), and
//!   [`TlsGate::road_to_tls_only`]: only what leads to TLS is served
//!   (`require_tls = "all"`).
//! - [`TlsGate::starttls`]: how the STARTTLS command (POP3's STLS) is
//!   answered: with arguments, a syntax error; with TLS already active, a
//!   refusal; otherwise the go-ahead, and the handshake follows.
//! - [`TlsGate::refuses_line`]: the pre-TLS line policy. Before TLS on a
//!   STARTTLS listener, whatever `require_tls` says, a command line holding
//!   a NUL or a bare CR is refused with the protocol's own error and never
//!   forwarded. A backend that ends strings at NUL reads `a STARTTLS\0` as
//!   the STARTTLS the proxy must answer itself (it would start TLS with a
//!   client that never asked the proxy for it); one that ends lines at a
//!   bare CR reads `NOOP\rUSER joe` as two commands, the second never seen
//!   by the policy (or a `NOOP\rSTARTTLS` the proxy did not answer). No
//!   conforming client sends either byte in a command line (RFC 5321
//!   sections 2.3.8 and 4.1.1; RFC 9051's `CHAR` and `TEXT-CHAR`; RFC 1939's
//!   printable keywords). After TLS lines go to the backend as they come:
//!   the proxy no longer guards anything by reading them (SMTP's XCLIENT
//!   mode, which reads the whole session, keeps refusing a bare CR; see
//!   `smtp`).

use super::{lenient_verb, InspectorOptions, Next, RequireTls, TlsMode};

/// One session's TLS state and the listener's policy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TlsGate {
    mode: TlsMode,
    require_tls: RequireTls,
    tls_active: bool,
}

/// How the STARTTLS command is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartTls {
    /// It carried arguments (RFC 3207 section 4, RFC 2595): a syntax error.
    Syntax,
    /// TLS is already active (implicit TLS, or a second STARTTLS).
    AlreadyActive,
    /// The go-ahead; the TLS handshake starts right after it.
    Begin,
}

/// The answers to STARTTLS in one protocol's words (IMAP's follow `tag SP`).
#[derive(Debug)]
pub(crate) struct StartTlsReplies {
    pub(crate) begin: &'static [u8],
    pub(crate) already_active: &'static [u8],
    pub(crate) syntax: &'static [u8],
}

/// Why a command line is refused before TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnsafeLine {
    /// It holds a NUL.
    Nul,
    /// It holds a CR that does not end it.
    BareCr,
}

impl TlsGate {
    pub(crate) fn new(options: &InspectorOptions) -> Self {
        Self {
            mode: options.mode,
            require_tls: options.require_tls,
            tls_active: options.mode == TlsMode::Implicit,
        }
    }

    /// Whether the client's connection is encrypted.
    pub(crate) fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The client finished the TLS handshake.
    pub(crate) fn tls_established(&mut self) {
        self.tls_active = true;
    }

    /// Whether capability lists must offer the proxy's STARTTLS right now.
    pub(crate) fn offers_starttls(&self) -> bool {
        self.mode == TlsMode::StartTls && !self.tls_active
    }

    /// Whether the listener's policy restricts the dialogue right now:
    /// credentials are hidden and refused, and nothing may end inspection.
    pub(crate) fn restricted(&self) -> bool {
        self.offers_starttls() && self.require_tls != RequireTls::None
    }

    /// Whether only the commands that lead to TLS are served right now.
    pub(crate) fn road_to_tls_only(&self) -> bool {
        self.restricted() && self.require_tls == RequireTls::All
    }

    /// How STARTTLS with `arguments` (blanks after the command word
    /// removed) is answered right now.
    pub(crate) fn starttls(&self, arguments: &[u8]) -> StartTls {
        if !arguments.is_empty() {
            StartTls::Syntax
        } else if self.tls_active {
            StartTls::AlreadyActive
        } else {
            StartTls::Begin
        }
    }

    /// The answer to a command line if it asks for TLS: `word` and
    /// `arguments` as the protocol splits the command (on spaces), `command`
    /// the line from the command word on. A spelling only a lenient server
    /// reads as `upgrade` (`STLS\tx`, a tab before `STARTTLS`, a NUL after
    /// it) is answered too, as the command with arguments: the backend never
    /// gets an upgrade command, which could begin a TLS the proxy does not
    /// see. `None`: not an upgrade command.
    pub(crate) fn upgrade_request(
        &self,
        upgrade: &[u8],
        word: &[u8],
        arguments: &[u8],
        command: &[u8],
    ) -> Option<StartTls> {
        if word.eq_ignore_ascii_case(upgrade) {
            Some(self.starttls(arguments))
        } else if lenient_verb(command).eq_ignore_ascii_case(upgrade) {
            Some(StartTls::Syntax)
        } else {
            None
        }
    }

    /// The pre-TLS line policy (see the module notes): why `text`, a client
    /// command line without its terminator, is refused right now, if it is.
    pub(crate) fn refuses_line(&self, text: &[u8]) -> Option<UnsafeLine> {
        if self.offers_starttls() {
            unsafe_line(text)
        } else {
            None
        }
    }
}

impl StartTls {
    /// The reply, in the protocol's words.
    pub(crate) fn reply(self, replies: &StartTlsReplies) -> &'static [u8] {
        match self {
            StartTls::Syntax => replies.syntax,
            StartTls::AlreadyActive => replies.already_active,
            StartTls::Begin => replies.begin,
        }
    }

    /// What the driver does once the reply is written.
    pub(crate) fn next(self) -> Next {
        match self {
            StartTls::Begin => Next::StartTls,
            StartTls::Syntax | StartTls::AlreadyActive => Next::Continue,
        }
    }
}

/// Whether a command line (without its terminator) holds a byte a lenient
/// backend may read as its end: a NUL, or a CR.
pub(crate) fn unsafe_line(text: &[u8]) -> Option<UnsafeLine> {
    if text.contains(&0) {
        Some(UnsafeLine::Nul)
    } else if text.contains(&b'\r') {
        Some(UnsafeLine::BareCr)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(mode: TlsMode, require_tls: RequireTls) -> TlsGate {
        TlsGate::new(&InspectorOptions::new(mode, require_tls))
    }

    #[test]
    fn offers_and_restrictions_hold_only_before_tls_on_starttls_listeners() {
        for policy in [RequireTls::Auth, RequireTls::All, RequireTls::None] {
            let implicit = gate(TlsMode::Implicit, policy);
            assert!(implicit.tls_active() && !implicit.offers_starttls());
            assert!(!implicit.restricted() && !implicit.road_to_tls_only());

            let mut starttls = gate(TlsMode::StartTls, policy);
            assert!(!starttls.tls_active() && starttls.offers_starttls());
            assert_eq!(starttls.restricted(), policy != RequireTls::None);
            assert_eq!(starttls.road_to_tls_only(), policy == RequireTls::All);
            starttls.tls_established();
            assert!(starttls.tls_active() && !starttls.offers_starttls());
            assert!(!starttls.restricted() && !starttls.road_to_tls_only());
        }
    }

    #[test]
    fn starttls_is_a_syntax_error_with_arguments_refused_once_tls_is_up() {
        let mut starttls = gate(TlsMode::StartTls, RequireTls::None);
        assert_eq!(starttls.starttls(b"now"), StartTls::Syntax);
        assert_eq!(starttls.starttls(b""), StartTls::Begin);
        assert_eq!(StartTls::Begin.next(), Next::StartTls);
        starttls.tls_established();
        assert_eq!(starttls.starttls(b""), StartTls::AlreadyActive);
        assert_eq!(starttls.starttls(b"x"), StartTls::Syntax);
        assert_eq!(StartTls::AlreadyActive.next(), Next::Continue);
        let implicit = gate(TlsMode::Implicit, RequireTls::Auth);
        assert_eq!(implicit.starttls(b""), StartTls::AlreadyActive);
    }

    #[test]
    fn upgrade_spellings_for_lenient_servers_are_syntax_errors_never_other_commands() {
        let mut gate = gate(TlsMode::StartTls, RequireTls::None);
        let ask = |gate: &TlsGate, word: &[u8], arguments: &[u8], command: &[u8]| {
            gate.upgrade_request(b"STLS", word, arguments, command)
        };
        assert_eq!(ask(&gate, b"stls", b"", b"stls"), Some(StartTls::Begin));
        assert_eq!(ask(&gate, b"STLS", b"x", b"STLS x"), Some(StartTls::Syntax));
        assert_eq!(
            ask(&gate, b"STLS\tx", b"", b"STLS\tx"),
            Some(StartTls::Syntax)
        );
        assert_eq!(
            ask(&gate, b"\tSTLS", b"", b"\tSTLS"),
            Some(StartTls::Syntax)
        );
        assert_eq!(
            ask(&gate, b"STLS\0", b"", b"STLS\0"),
            Some(StartTls::Syntax)
        );
        assert_eq!(ask(&gate, b"STLSX", b"", b"STLSX"), None);
        assert_eq!(ask(&gate, b"CAPA", b"", b"CAPA"), None);
        gate.tls_established();
        assert_eq!(
            ask(&gate, b"STLS", b"", b"STLS"),
            Some(StartTls::AlreadyActive)
        );
        assert_eq!(
            ask(&gate, b"STLS\tx", b"", b"STLS\tx"),
            Some(StartTls::Syntax)
        );
    }

    #[test]
    fn nul_and_bare_cr_are_refused_before_tls_under_every_policy_and_not_after() {
        for policy in [RequireTls::Auth, RequireTls::All, RequireTls::None] {
            let mut starttls = gate(TlsMode::StartTls, policy);
            for (text, expected) in [
                (&b"a STARTTLS\0"[..], Some(UnsafeLine::Nul)),
                (b"STLS\0", Some(UnsafeLine::Nul)),
                (b"\0", Some(UnsafeLine::Nul)),
                (b"NOOP\rUSER joe", Some(UnsafeLine::BareCr)),
                (b"NOOP\r", Some(UnsafeLine::BareCr)),
                (b"NOOP\0\r", Some(UnsafeLine::Nul)),
                (b"a NOOP", None),
                (b"", None),
                (b"\xff\x7f\t\x0b\x0c", None),
            ] {
                assert_eq!(starttls.refuses_line(text), expected, "{policy:?} {text:?}");
            }
            starttls.tls_established();
            assert_eq!(starttls.refuses_line(b"a STARTTLS\0"), None);
            assert_eq!(starttls.refuses_line(b"NOOP\rUSER joe"), None);
            let implicit = gate(TlsMode::Implicit, policy);
            assert_eq!(implicit.refuses_line(b"STLS\0"), None);
        }
    }
}
