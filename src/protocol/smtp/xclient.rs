//! Client identity by XCLIENT: the exchange the proxy has with the backend
//! before the client hears the greeting (see the module notes of `smtp`).

use super::*;

use std::net::IpAddr;

/// Where the XCLIENT exchange is; each step collects one whole reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// The backend's greeting, held back.
    Greeting,
    /// The reply to the proxy's EHLO.
    Ehlo,
    /// The reply to XCLIENT: a new greeting, or an error.
    Xclient,
}

impl SmtpInspector {
    /// XCLIENT mode: one whole reply of the identification exchange.
    pub(super) fn finish_identify(&mut self, step: Step, code: u16, out: &mut Output) -> Next {
        match step {
            Step::Greeting if code == 220 => {
                self.held_greeting.clear();
                self.held_greeting.extend_from_slice(&self.reply);
                out.to_backend.extend_from_slice(b"EHLO ");
                out.to_backend.extend_from_slice(self.hostname.as_bytes());
                out.to_backend.extend_from_slice(b"\r\n");
                self.start_collecting_step(Step::Ehlo);
                return Next::Continue;
            }
            // A refusal at connect (554, 421): the client hears it as is.
            Step::Greeting => self.relay_collected(out),
            Step::Ehlo => {
                let offered = match (self.client, (200..300).contains(&code)) {
                    (Some(client), true) => xclient_offer(self.collected_lines())
                        .and_then(|offered| xclient_command(offered, client, self.server)),
                    _ => None,
                };
                match offered {
                    Some(command) => {
                        out.to_backend.extend_from_slice(&command);
                        self.start_collecting_step(Step::Xclient);
                        return Next::Continue;
                    }
                    None => {
                        out.to_client.extend_from_slice(&self.held_greeting);
                        out.notice = Some(Notice::XclientNotOffered);
                    }
                }
            }
            // The new greeting, said as if the client had just connected.
            Step::Xclient if code == 220 => {
                self.relay_collected(out);
                out.notice = Some(Notice::XclientAccepted);
            }
            // "421 unable to proceed, disconnecting": the client hears it.
            Step::Xclient if code == 421 => self.relay_collected(out),
            Step::Xclient => {
                out.to_client.extend_from_slice(&self.held_greeting);
                out.notice = Some(Notice::XclientRefused(code));
            }
        }
        self.held_greeting = Vec::new();
        self.state = State::Idle;
        Next::Continue
    }

    pub(super) fn start_collecting_step(&mut self, step: Step) {
        self.reply.clear();
        self.reply_line_ends.clear();
        self.state = State::Identify(step);
    }
}

/// The attributes an EHLO reply (all its lines, the first being the
/// greeting line) offers after the XCLIENT keyword, if it offers XCLIENT.
pub(crate) fn xclient_offer<'a>(ehlo_reply: impl Iterator<Item = &'a [u8]>) -> Option<&'a [u8]> {
    ehlo_reply
        .skip(1)
        .map(reply_text)
        .find(|text| is_keyword(text, b"XCLIENT"))
        .map(|text| split_word(text).1)
}

/// `XCLIENT` with the attributes the backend offers (`offered`, from
/// [`xclient_offer`]) for a client at `client` that connected to `server`,
/// or `None` when the backend does not take ADDR. The values need no xtext
/// encoding: digits, dots, colons, `IPV6:` and `[UNAVAILABLE]` are all plain
/// xtext characters. Also what the relay guard's probe sends
/// ([`crate::relay_guard`]), so it presents itself as sessions do.
///
/// NAME is `[UNAVAILABLE]`: the proxy does not look up host names, and
/// leaving NAME out would keep the name the backend found for the
/// *proxy's* address (`localhost`, say) next to the client's address.
/// HELO, PROTO and LOGIN are not sent: the client's own EHLO/HELO and
/// AUTH, which come after the new greeting, set them.
pub(crate) fn xclient_command(
    offered: &[u8],
    client: SocketAddr,
    server: Option<SocketAddr>,
) -> Option<Vec<u8>> {
    let offers = |name: &[u8]| {
        offered
            .split(|&b| b == b' ')
            .any(|word| word.eq_ignore_ascii_case(name))
    };
    if !offers(b"ADDR") {
        return None;
    }
    let mut command = String::from("XCLIENT");
    if offers(b"NAME") {
        command.push_str(" NAME=[UNAVAILABLE]");
    }
    command.push_str(&format!(" ADDR={}", xclient_address(client.ip())));
    if offers(b"PORT") {
        command.push_str(&format!(" PORT={}", client.port()));
    }
    if let Some(server) = server {
        if offers(b"DESTADDR") {
            command.push_str(&format!(" DESTADDR={}", xclient_address(server.ip())));
        }
        if offers(b"DESTPORT") {
            command.push_str(&format!(" DESTPORT={}", server.port()));
        }
    }
    command.push_str("\r\n");
    Some(command.into_bytes())
}

/// An address as XCLIENT wants it: IPv4 dotted, IPv6 with an `IPV6:` prefix
/// (XCLIENT_README), an IPv4-mapped IPv6 address as the IPv4 it is.
fn xclient_address(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("IPV6:{ip}"),
    }
}
