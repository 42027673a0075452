//! The capability rewrite: every capability list relayed during inspection
//! (an untagged `* CAPABILITY` response, a `[CAPABILITY ...]` response code)
//! loses the backend's STARTTLS and LOGINDISABLED and, as the listener's
//! policy says, its `AUTH=` atoms, and gains the proxy's own atoms.

use super::super::{eol_of, split_word, trim_eol};

/// The capability atom the proxy adds and removes.
pub(super) const STARTTLS: &[u8] = b"STARTTLS";
/// The capability atom the proxy adds before TLS under a restricting policy
/// and otherwise removes.
pub(super) const LOGINDISABLED: &[u8] = b"LOGINDISABLED";
/// The prefix of the SASL mechanism atoms hidden before TLS.
const AUTH_PREFIX: &[u8] = b"AUTH=";
/// The capability keyword, as an untagged response and as a response code.
const CAPABILITY: &[u8] = b"CAPABILITY";

/// How the capability lists relayed right now are rewritten. The backend's
/// STARTTLS and LOGINDISABLED atoms are always removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rewrite {
    /// Remove the `AUTH=` atoms.
    pub(super) hide_auth: bool,
    /// Append ` LOGINDISABLED`.
    pub(super) login_disabled: bool,
    /// Append ` STARTTLS` (after LOGINDISABLED).
    pub(super) starttls: bool,
}

/// Where a line's capability list sits, as a byte range of the line without
/// its terminator: from right after the `CAPABILITY` keyword to the end of
/// the line (untagged `* CAPABILITY` response) or to the `]` closing the
/// response code (`* OK [CAPABILITY ...]`, `tag OK [CAPABILITY ...]`, and the
/// other status responses). A code whose `]` is missing runs to the end.
pub(super) fn capability_list(text: &[u8]) -> Option<(usize, usize)> {
    let (first, rest) = split_word(text);
    if first.is_empty() {
        return None;
    }
    let (second, after) = split_word(rest);
    // `rest` and `after` are suffixes of `text` whenever they are not empty.
    let second_at = text.len() - rest.len();
    if first == b"*" && second.eq_ignore_ascii_case(CAPABILITY) {
        return Some((second_at + second.len(), text.len()));
    }
    let is_status = [&b"OK"[..], b"NO", b"BAD", b"PREAUTH", b"BYE"]
        .iter()
        .any(|status| second.eq_ignore_ascii_case(status));
    // A response code may also open a continuation request (`+ [CAPABILITY
    // ...] text`, RFC 9051 section 7.5).
    let code = if first == b"+" {
        rest.strip_prefix(b"[")?
    } else if is_status {
        after.strip_prefix(b"[")?
    } else {
        return None;
    };
    let name_len = code
        .iter()
        .position(|&b| b == b' ' || b == b']')
        .unwrap_or(code.len());
    if !code.get(..name_len)?.eq_ignore_ascii_case(CAPABILITY) {
        return None;
    }
    let start = text.len() - code.len() + name_len;
    let end = text
        .get(start..)?
        .iter()
        .position(|&b| b == b']')
        .map_or(text.len(), |offset| start + offset);
    Some((start, end))
}

/// Writes a backend line with its capability list (if any) rewritten as
/// `rewrite` says. Everything else, terminator included, is copied unchanged.
pub(super) fn write_rewritten(line: &[u8], rewrite: Rewrite, out: &mut Vec<u8>) {
    let text = trim_eol(line);
    let parts = capability_list(text).and_then(|(start, end)| {
        Some((text.get(..start)?, text.get(start..end)?, text.get(end..)?))
    });
    let Some((head, list, tail)) = parts else {
        out.extend_from_slice(line);
        return;
    };
    out.extend_from_slice(head);
    write_filtered_list(list, rewrite, out);
    out.extend_from_slice(tail);
    out.extend_from_slice(eol_of(line));
}

/// Whether the atom is a SASL mechanism (`AUTH=PLAIN`).
fn is_auth_atom(atom: &[u8]) -> bool {
    atom.get(..AUTH_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(AUTH_PREFIX))
}

/// Copies a space-separated atom list without its STARTTLS and LOGINDISABLED
/// atoms (and its `AUTH=` atoms when asked), each removed with the spaces
/// before it, appending ` LOGINDISABLED` and ` STARTTLS` after the last atom
/// when asked. Other spacing is kept as it was.
fn write_filtered_list(list: &[u8], rewrite: Rewrite, out: &mut Vec<u8>) {
    let mut rest = list;
    loop {
        let spaces = rest.iter().take_while(|&&b| b == b' ').count();
        let (gap, after) = rest.split_at(spaces);
        let atom_len = after.iter().position(|&b| b == b' ').unwrap_or(after.len());
        if atom_len == 0 {
            if rewrite.login_disabled {
                out.push(b' ');
                out.extend_from_slice(LOGINDISABLED);
            }
            if rewrite.starttls {
                out.push(b' ');
                out.extend_from_slice(STARTTLS);
            }
            out.extend_from_slice(gap);
            return;
        }
        let (atom, tail) = after.split_at(atom_len);
        let removed = atom.eq_ignore_ascii_case(STARTTLS)
            || atom.eq_ignore_ascii_case(LOGINDISABLED)
            || (rewrite.hide_auth && is_auth_atom(atom));
        if !removed {
            out.extend_from_slice(gap);
            out.extend_from_slice(atom);
        }
        rest = tail;
    }
}
