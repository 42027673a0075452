//! The certificates rustls serves, chosen by SNI and swappable at run time.
//!
//! Selection: the entries whose leaf names the client's SNI (subjectAltName
//! DNS names, case-insensitive; `*.example.com` matches exactly one label) are
//! the candidates, exact names before wildcards, each group in configuration
//! order. The first candidate whose key the client can verify (its signature
//! schemes) is served, so an RSA and an ECDSA certificate for the same name
//! both get used. No SNI, or no entry that names it, gets the first entry;
//! a listener with `sni_strict` refuses instead (see [`super::acceptor`]).

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use super::certs::LoadedCertificate;

/// How a certificate name matched an SNI name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum NameMatch {
    Exact,
    Wildcard,
}

/// Whether certificate name `pattern` (lower case) covers `host`.
///
/// A wildcard is only a whole left-most label (`*.example.com`) and stands
/// for exactly one non-empty label: it matches `mail.example.com`, not
/// `example.com` nor `a.b.example.com`.
pub(crate) fn name_matches(pattern: &str, host: &str) -> Option<NameMatch> {
    let host = normalize(host);
    if host.contains('*') {
        return None;
    }
    let pattern = pattern.trim_end_matches('.');
    if pattern.eq_ignore_ascii_case(&host) && !pattern.contains('*') {
        return Some(NameMatch::Exact);
    }
    let suffix = pattern.strip_prefix("*.")?;
    if suffix.is_empty() || suffix.contains('*') {
        return None;
    }
    let (first, rest) = host.split_once('.')?;
    (!first.is_empty() && rest.eq_ignore_ascii_case(suffix)).then_some(NameMatch::Wildcard)
}

fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Every certificate the proxy serves; never empty. The first is the default.
#[derive(Debug, Clone)]
pub(crate) struct CertificateSet {
    entries: Vec<Arc<LoadedCertificate>>,
}

/// What [`CertificateSet::select`] found for a handshake.
#[derive(Debug, Clone)]
pub(crate) struct Selection {
    pub(crate) certificate: Arc<LoadedCertificate>,
    /// `false` when the client sent an SNI name that no entry covers (the
    /// default was picked).
    pub(crate) matched: bool,
}

impl CertificateSet {
    /// `None` if `entries` is empty.
    pub(crate) fn new(entries: Vec<Arc<LoadedCertificate>>) -> Option<Self> {
        (!entries.is_empty()).then_some(Self { entries })
    }

    pub(crate) fn entries(&self) -> &[Arc<LoadedCertificate>] {
        &self.entries
    }

    /// The certificate served without SNI, or for a name nothing covers.
    pub(crate) fn default_entry(&self) -> &Arc<LoadedCertificate> {
        &self.entries[0]
    }

    /// Whether some entry covers `host`.
    pub(crate) fn covers(&self, host: &str) -> bool {
        self.select(Some(host), &[]).matched
    }

    /// The certificate for a handshake with SNI `server_name` from a client
    /// that verifies `schemes` (empty: do not filter by scheme).
    pub(crate) fn select(
        &self,
        server_name: Option<&str>,
        schemes: &[SignatureScheme],
    ) -> Selection {
        let Some(host) = server_name else {
            return Selection {
                certificate: self.default_entry().clone(),
                matched: true,
            };
        };
        let mut candidates: Vec<(NameMatch, usize)> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(index, entry)| {
                entry
                    .names
                    .iter()
                    .filter_map(|name| name_matches(name, host))
                    .min()
                    .map(|how| (how, index))
            })
            .collect();
        if candidates.is_empty() {
            return Selection {
                certificate: self.default_entry().clone(),
                matched: false,
            };
        }
        candidates.sort();
        let usable = |index: &usize| {
            schemes.is_empty()
                || self.entries[*index]
                    .certified_key
                    .key
                    .choose_scheme(schemes)
                    .is_some()
        };
        let index = candidates
            .iter()
            .map(|(_, index)| *index)
            .find(usable)
            .unwrap_or(candidates[0].1);
        Selection {
            certificate: self.entries[index].clone(),
            matched: true,
        }
    }
}

/// Holds the certificate set currently served; rustls consults it on every
/// handshake. Replacing it is one atomic pointer swap: handshakes that already
/// picked a certificate, and established sessions, are unaffected.
pub(crate) struct CertificateStore {
    current: ArcSwap<CertificateSet>,
}

impl CertificateStore {
    pub(crate) fn new(initial: CertificateSet) -> Self {
        Self {
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// Serves `next` to every handshake from now on.
    pub(crate) fn replace(&self, next: CertificateSet) {
        self.current.store(Arc::new(next));
    }

    /// Serves the set another store serves now (a reloaded configuration's
    /// certificates, taken over by the store every listener resolves from).
    pub(crate) fn replace_with(&self, next: Arc<CertificateSet>) {
        self.current.store(next);
    }

    /// The set served right now.
    pub(crate) fn current(&self) -> Arc<CertificateSet> {
        self.current.load_full()
    }

    /// The default certificate served right now.
    #[cfg(test)]
    pub(crate) fn default_certified_key(&self) -> Arc<CertifiedKey> {
        self.current.load().default_entry().certified_key.clone()
    }
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = self.current.load();
        f.debug_struct("CertificateStore")
            .field(
                "certificates",
                &set.entries
                    .iter()
                    .map(|entry| entry.label())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.load();
        let selection = set.select(client_hello.server_name(), client_hello.signature_schemes());
        Some(selection.certificate.certified_key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CertificateFiles;
    use crate::tls::certs::parse_certified_key;
    use crate::tls::generate::generate_pair;
    use crate::tls::provider::provider;

    #[test]
    fn exact_names_match_case_insensitively() {
        assert_eq!(
            name_matches("mail.example.com", "mail.example.com"),
            Some(NameMatch::Exact)
        );
        assert_eq!(
            name_matches("mail.example.com", "MAIL.Example.COM"),
            Some(NameMatch::Exact)
        );
        assert_eq!(
            name_matches("mail.example.com", "mail.example.com."),
            Some(NameMatch::Exact)
        );
        assert_eq!(name_matches("mail.example.com", "mx.example.com"), None);
        assert_eq!(name_matches("mail.example.com", "example.com"), None);
        assert_eq!(name_matches("example.com", "mail.example.com"), None);
    }

    #[test]
    fn a_wildcard_matches_exactly_one_label() {
        assert_eq!(
            name_matches("*.example.com", "mail.example.com"),
            Some(NameMatch::Wildcard)
        );
        assert_eq!(
            name_matches("*.example.com", "IMAP.EXAMPLE.com"),
            Some(NameMatch::Wildcard)
        );
        assert_eq!(name_matches("*.example.com", "example.com"), None);
        assert_eq!(name_matches("*.example.com", "a.b.example.com"), None);
        assert_eq!(name_matches("*.example.com", ".example.com"), None);
        assert_eq!(name_matches("*.example.com", "mail.example.org"), None);
        assert_eq!(name_matches("*.example.com", "*.example.com"), None);
        // Only a whole left-most label is a wildcard.
        assert_eq!(name_matches("m*.example.com", "mail.example.com"), None);
        assert_eq!(name_matches("mail.*.com", "mail.example.com"), None);
        assert_eq!(name_matches("*", "localhost"), None);
        assert_eq!(name_matches("*.*.com", "a.b.com"), None);
    }

    fn entry(names: &[&str]) -> Arc<LoadedCertificate> {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let pair = generate_pair(&names).expect("generate");
        let files = CertificateFiles {
            cert: format!("{}.crt", names[0]).into(),
            key: format!("{}.key", names[0]).into(),
        };
        Arc::new(
            parse_certified_key(
                &files,
                pair.cert_pem.as_bytes(),
                pair.key_pem.as_bytes(),
                &provider(),
            )
            .expect("load"),
        )
    }

    fn picked(set: &CertificateSet, sni: Option<&str>) -> (String, bool) {
        let selection = set.select(sni, &[]);
        (selection.certificate.names[0].clone(), selection.matched)
    }

    #[test]
    fn selection_by_sni_with_fallback_to_the_first_entry() {
        let set = CertificateSet::new(vec![
            entry(&["default.example"]),
            entry(&["*.example.com"]),
            entry(&["mail.example.com", "smtp.example.com"]),
            entry(&["imap.example.org", "Other.Example.Net"]),
        ])
        .expect("not empty");
        let cases = [
            (None, ("default.example", true)),
            (Some("default.example"), ("default.example", true)),
            // An exact name beats a wildcard listed earlier.
            (Some("mail.example.com"), ("mail.example.com", true)),
            (Some("SMTP.example.COM"), ("mail.example.com", true)),
            (Some("pop.example.com"), ("*.example.com", true)),
            (Some("imap.example.org"), ("imap.example.org", true)),
            (Some("other.example.net"), ("imap.example.org", true)),
            // No entry names these: the default, flagged as unmatched.
            (Some("a.b.example.com"), ("default.example", false)),
            (Some("example.com"), ("default.example", false)),
            (Some("unknown.test"), ("default.example", false)),
        ];
        for (sni, (expected, matched)) in cases {
            assert_eq!(
                picked(&set, sni),
                (expected.to_string(), matched),
                "SNI {sni:?}"
            );
        }
        assert!(set.covers("pop.example.com"));
        assert!(!set.covers("a.b.example.com"));
    }

    #[test]
    fn the_first_entry_wins_among_equals() {
        let first = entry(&["same.example"]);
        let second = entry(&["same.example"]);
        let set = CertificateSet::new(vec![entry(&["default.example"]), first.clone(), second])
            .expect("not empty");
        let selection = set.select(Some("same.example"), &[]);
        assert!(Arc::ptr_eq(&selection.certificate, &first));
    }

    #[test]
    fn a_certificate_the_client_cannot_verify_is_skipped_among_candidates() {
        // Both name the host; the first has an ECDSA P-256 key. A client
        // that only verifies Ed25519 gets the second... if it is Ed25519.
        let ecdsa = entry(&["dual.example"]);
        let ed25519 = {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
            let cert = rcgen::CertificateParams::new(vec!["dual.example".to_string()])
                .expect("params")
                .self_signed(&key)
                .expect("sign");
            let files = CertificateFiles {
                cert: "ed.crt".into(),
                key: "ed.key".into(),
            };
            Arc::new(
                parse_certified_key(
                    &files,
                    cert.pem().as_bytes(),
                    key.serialize_pem().as_bytes(),
                    &provider(),
                )
                .expect("load"),
            )
        };
        let set = CertificateSet::new(vec![ecdsa.clone(), ed25519.clone()]).expect("not empty");
        let only_ed25519 = set.select(Some("dual.example"), &[SignatureScheme::ED25519]);
        assert!(Arc::ptr_eq(&only_ed25519.certificate, &ed25519));
        let ecdsa_client = set.select(
            Some("dual.example"),
            &[
                SignatureScheme::ECDSA_NISTP256_SHA256,
                SignatureScheme::ED25519,
            ],
        );
        assert!(Arc::ptr_eq(&ecdsa_client.certificate, &ecdsa));
        // Nobody usable: the first candidate anyway (rustls then refuses).
        let neither = set.select(Some("dual.example"), &[SignatureScheme::RSA_PSS_SHA256]);
        assert!(Arc::ptr_eq(&neither.certificate, &ecdsa));
    }

    #[test]
    fn an_empty_set_is_refused() {
        assert!(CertificateSet::new(Vec::new()).is_none());
    }

    #[test]
    fn replacing_the_set_changes_what_is_served() {
        let first = entry(&["one.example"]);
        let second = entry(&["two.example"]);
        let store = CertificateStore::new(CertificateSet::new(vec![first.clone()]).unwrap());
        let held = store.current();
        store.replace(CertificateSet::new(vec![second.clone()]).unwrap());
        assert!(Arc::ptr_eq(
            &store.default_certified_key(),
            &second.certified_key
        ));
        // What a handshake already took is untouched.
        assert!(Arc::ptr_eq(held.default_entry(), &first));
    }
}
