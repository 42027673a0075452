//! TLS session resumption: the one session ticketer of the process and the
//! keys it seals tickets with.
//!
//! A ticket is the server's own encrypted memo of a session, held by the
//! client and shown again on its next connection (TLS 1.3 PSK with (EC)DHE,
//! TLS 1.2 stateless tickets), so a reconnecting client skips the
//! certificate and the signature. Whichever proxy decrypts it resumes the
//! session: replicas behind one load balancer that share their ticket keys
//! resume each other's clients.
//!
//! One [`SessionTicketer`] is made when the proxy binds and handed to every
//! listener's rustls configuration, this one and every one a configuration
//! reload builds: its keys sit behind one atomic pointer, so a new key file,
//! a reload or a rotation swaps them without touching a configuration, and
//! tickets outlive reloads.
//!
//! Keys come from one of two places:
//! - `[tls] ticket_keys`: a file shared by a fleet (see [`file`] for the
//!   format, [`reload`] for how it is followed, [`rotate`] for the command
//!   that rotates it). The newest key (last line) seals new tickets; every
//!   key in the file opens them.
//! - otherwise, keys of this process only: a new random key every
//!   `ticket_lifetime`, the previous one kept for the tickets it sealed.
//!
//! A ticket is `key name (16 bytes) || nonce (12) || AES-256-GCM ciphertext
//! and tag`, the key name authenticated with it; the sealed plaintext is the
//! issue time (8 bytes, Unix seconds) followed by rustls' session state.
//! A ticket under an unknown key name, one that fails to open, and one
//! older than `ticket_lifetime` open to nothing: the client gets a full
//! handshake. The AEAD itself is in [`super::provider`].

pub(crate) mod file;
pub(crate) mod reload;
pub(crate) mod rotate;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::ProducesTickets;

use super::provider::{fill_random, TicketCipher};
use crate::time::unix_now;

pub use file::{TicketKeyError, TicketKeys, KEY_LENGTH, NAME_LENGTH};
pub use reload::TicketKeyReloads;
pub use rotate::{rotate_key_file, Rotation, DEFAULT_KEEP};

/// Bytes of the issue time at the start of a ticket's plaintext.
const ISSUED_AT_LENGTH: usize = 8;

/// One ticket key: its name (the first bytes of every ticket it seals) and
/// its AEAD.
#[derive(Debug)]
pub(crate) struct TicketKey {
    name: [u8; NAME_LENGTH],
    cipher: TicketCipher,
}

impl TicketKey {
    /// The key made of a file line's 80 bytes: name, then secret.
    fn from_bytes(bytes: &[u8; KEY_LENGTH]) -> Option<TicketKey> {
        let mut name = [0u8; NAME_LENGTH];
        name.copy_from_slice(&bytes[..NAME_LENGTH]);
        Some(TicketKey {
            name,
            cipher: TicketCipher::from_secret(&bytes[NAME_LENGTH..])?,
        })
    }

    /// A fresh random key (name and secret).
    fn random() -> Option<TicketKey> {
        let mut bytes = [0u8; KEY_LENGTH];
        fill_random(&mut bytes).ok()?;
        TicketKey::from_bytes(&bytes)
    }

    /// The name as hexadecimal (logged: names are no secret, every ticket
    /// carries its key's in the clear).
    pub(crate) fn name_hex(&self) -> String {
        hex(&self.name)
    }
}

/// Lower-case hexadecimal of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Where the keys in use come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeySource {
    /// The `ticket_keys` file.
    File,
    /// Made by this process; the newest was made at this Unix time.
    Generated { newest_made_at: i64 },
}

/// The keys in use, oldest first: the last one seals, all of them open.
#[derive(Debug)]
struct KeyRing {
    source: KeySource,
    keys: Vec<Arc<TicketKey>>,
}

impl KeyRing {
    fn generated(now: i64) -> Option<KeyRing> {
        Some(KeyRing {
            source: KeySource::Generated {
                newest_made_at: now,
            },
            keys: vec![Arc::new(TicketKey::random()?)],
        })
    }
}

/// The process's session ticketer (see the module documentation).
#[derive(Debug)]
pub struct SessionTicketer {
    ring: ArcSwap<KeyRing>,
    /// Seconds a ticket is good for: sent to clients as the lifetime hint
    /// and checked against the ticket's issue time.
    lifetime: AtomicU32,
    /// Held while a new generated key is made, so only one thread makes it.
    rotating: Mutex<()>,
}

impl SessionTicketer {
    /// A ticketer with keys of this process only, tickets good for
    /// `lifetime`.
    pub(crate) fn new(lifetime: Duration) -> Result<Arc<SessionTicketer>, TicketKeyError> {
        let ring = KeyRing::generated(unix_now()).ok_or(TicketKeyError::Random)?;
        Ok(Arc::new(SessionTicketer {
            ring: ArcSwap::from_pointee(ring),
            lifetime: AtomicU32::new(lifetime_seconds(lifetime)),
            rotating: Mutex::new(()),
        }))
    }

    /// New tickets are sealed with the newest of `keys`; tickets sealed with
    /// any of them open.
    pub(crate) fn use_file_keys(&self, keys: TicketKeys) {
        self.ring.store(Arc::new(KeyRing {
            source: KeySource::File,
            keys: keys.into_keys(),
        }));
    }

    /// Back to keys of this process only (when `ticket_keys` is no longer
    /// configured). Keys of this process already in use are kept.
    pub(crate) fn use_generated_keys(&self) -> Result<(), TicketKeyError> {
        if matches!(self.ring.load().source, KeySource::Generated { .. }) {
            return Ok(());
        }
        let ring = KeyRing::generated(unix_now()).ok_or(TicketKeyError::Random)?;
        self.ring.store(Arc::new(ring));
        Ok(())
    }

    /// Tickets issued from now on are good for `lifetime`; so are those
    /// issued before, when they are opened.
    pub(crate) fn set_lifetime(&self, lifetime: Duration) {
        self.lifetime
            .store(lifetime_seconds(lifetime), Ordering::Release);
    }

    /// Whether the keys come from a `ticket_keys` file.
    pub fn uses_file_keys(&self) -> bool {
        self.ring.load().source == KeySource::File
    }

    /// The names of the keys in use, oldest first, as hexadecimal.
    pub fn key_names(&self) -> Vec<String> {
        self.ring
            .load()
            .keys
            .iter()
            .map(|key| key.name_hex())
            .collect()
    }

    fn lifetime_seconds(&self) -> u32 {
        self.lifetime.load(Ordering::Acquire)
    }

    /// The keys to use at `now`: generated keys are replaced once the
    /// newest is a lifetime old (the previous one stays while a ticket it
    /// sealed can still be good).
    fn keys_at(&self, now: i64) -> Arc<KeyRing> {
        let ring = self.ring.load_full();
        let KeySource::Generated { newest_made_at } = ring.source else {
            return ring;
        };
        let lifetime = i64::from(self.lifetime_seconds());
        if now < newest_made_at.saturating_add(lifetime) {
            return ring;
        }
        // Another thread making the next key: the current one still works.
        let Ok(_rotating) = self.rotating.try_lock() else {
            return ring;
        };
        let current = self.ring.load_full();
        if current.source != ring.source {
            return current;
        }
        let Some(next) = TicketKey::random() else {
            return current;
        };
        // A ticket sealed with the newest key was issued less than a
        // lifetime after it was made, so it is good until two lifetimes
        // after that at most.
        let mut keys = Vec::with_capacity(2);
        if now < newest_made_at.saturating_add(lifetime.saturating_mul(2)) {
            keys.extend(current.keys.last().cloned());
        }
        keys.push(Arc::new(next));
        let rotated = Arc::new(KeyRing {
            source: KeySource::Generated {
                newest_made_at: now,
            },
            keys,
        });
        self.ring.store(rotated.clone());
        rotated
    }

    /// Seals `state` at `now` with the newest key.
    pub(crate) fn seal_at(&self, state: &[u8], now: i64) -> Option<Vec<u8>> {
        let ring = self.keys_at(now);
        let key = ring.keys.last()?;
        let mut plaintext = Vec::with_capacity(ISSUED_AT_LENGTH + state.len());
        plaintext.extend_from_slice(&now.to_be_bytes());
        plaintext.extend_from_slice(state);
        let sealed = key.cipher.seal(&key.name, &plaintext)?;
        let mut ticket = Vec::with_capacity(NAME_LENGTH + sealed.len());
        ticket.extend_from_slice(&key.name);
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    /// The state `ticket` holds, if a key in use sealed it and it is still
    /// good at `now`.
    pub(crate) fn open_at(&self, ticket: &[u8], now: i64) -> Option<Vec<u8>> {
        if ticket.len() < NAME_LENGTH + TicketCipher::OVERHEAD + ISSUED_AT_LENGTH {
            return None;
        }
        let (name, sealed) = ticket.split_at(NAME_LENGTH);
        let ring = self.keys_at(now);
        let key = ring.keys.iter().rev().find(|key| key.name == name)?;
        let mut plaintext = key.cipher.open(name, sealed)?;
        let mut issued_at = [0u8; ISSUED_AT_LENGTH];
        issued_at.copy_from_slice(&plaintext[..ISSUED_AT_LENGTH]);
        let age = now.saturating_sub(i64::from_be_bytes(issued_at));
        if age > i64::from(self.lifetime_seconds()) {
            return None;
        }
        plaintext.drain(..ISSUED_AT_LENGTH);
        Some(plaintext)
    }
}

/// Whole seconds, at least 1, at most `u32::MAX` (the configuration caps
/// it far lower: RFC 8446 allows 7 days).
fn lifetime_seconds(lifetime: Duration) -> u32 {
    u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX).max(1)
}

impl ProducesTickets for SessionTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime_seconds()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(plain, unix_now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_at(cipher, unix_now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const HOUR: Duration = Duration::from_secs(3600);
    const NOW: i64 = 1_750_000_000;

    /// Keys made of `fills` (each key all one byte), as a checked file.
    fn file_keys(fills: &[u8]) -> TicketKeys {
        let content: String = fills
            .iter()
            .map(|fill| {
                format!(
                    "{}\n",
                    base64::engine::general_purpose::STANDARD.encode([*fill; KEY_LENGTH])
                )
            })
            .collect();
        TicketKeys::from_content(std::path::Path::new("/keys"), content.as_bytes())
            .expect("valid keys")
    }

    fn ticketer_with(fills: &[u8]) -> Arc<SessionTicketer> {
        let ticketer = SessionTicketer::new(HOUR).expect("ticketer");
        ticketer.use_file_keys(file_keys(fills));
        ticketer
    }

    #[test]
    fn the_newest_key_seals_and_every_key_in_the_file_opens() {
        let old = ticketer_with(&[1]);
        let sealed_by_old = old.seal_at(b"state one", NOW).expect("sealed");
        assert_eq!(&sealed_by_old[..NAME_LENGTH], &[1; NAME_LENGTH]);
        assert_eq!(
            sealed_by_old.len(),
            NAME_LENGTH + TicketCipher::OVERHEAD + ISSUED_AT_LENGTH + 9
        );

        // A replica with the next file: key 1 still in it, key 2 newest.
        let rotated = ticketer_with(&[1, 2]);
        let sealed_by_new = rotated.seal_at(b"state two", NOW).expect("sealed");
        assert_eq!(&sealed_by_new[..NAME_LENGTH], &[2; NAME_LENGTH]);
        assert_eq!(
            rotated.open_at(&sealed_by_old, NOW + 10).as_deref(),
            Some(&b"state one"[..])
        );
        assert_eq!(
            rotated.open_at(&sealed_by_new, NOW + 10).as_deref(),
            Some(&b"state two"[..])
        );
        // The old replica does not know key 2 yet: a full handshake.
        assert_eq!(old.open_at(&sealed_by_new, NOW), None);
        // Two seals of the same state differ (a fresh nonce each).
        assert_ne!(rotated.seal_at(b"same", NOW), rotated.seal_at(b"same", NOW));
    }

    #[test]
    fn unknown_altered_short_and_expired_tickets_open_to_nothing() {
        let ticketer = ticketer_with(&[1, 2]);
        let ticket = ticketer.seal_at(b"state", NOW).expect("sealed");
        // An unknown key name.
        let mut unknown = ticket.clone();
        unknown[0] ^= 0xff;
        assert_eq!(ticketer.open_at(&unknown, NOW), None);
        // Any altered byte after the name: nonce, ciphertext, tag.
        for index in NAME_LENGTH..ticket.len() {
            let mut altered = ticket.clone();
            altered[index] ^= 0x01;
            assert_eq!(ticketer.open_at(&altered, NOW), None, "byte {index}");
        }
        // Another key's name on this ticket: fails to open.
        let mut renamed = ticket.clone();
        renamed[..NAME_LENGTH].copy_from_slice(&[1; NAME_LENGTH]);
        assert_eq!(ticketer.open_at(&renamed, NOW), None);
        for length in [0, 1, NAME_LENGTH, ticket.len() - 1] {
            assert_eq!(ticketer.open_at(&ticket[..length], NOW), None, "{length}");
        }
        // Good for exactly the lifetime.
        let lifetime = i64::from(ticketer.lifetime());
        assert_eq!(lifetime, 3600);
        assert!(ticketer.open_at(&ticket, NOW + lifetime).is_some());
        assert_eq!(ticketer.open_at(&ticket, NOW + lifetime + 1), None);
        ticketer.set_lifetime(Duration::from_secs(10));
        assert_eq!(ticketer.lifetime(), 10);
        assert_eq!(ticketer.open_at(&ticket, NOW + 11), None);
    }

    #[test]
    fn a_key_dropped_from_the_file_no_longer_opens_its_tickets() {
        let ticketer = ticketer_with(&[1, 2]);
        let sealed_by_1 = ticketer.clone().seal_at(b"a", NOW).expect("sealed");
        ticketer.use_file_keys(file_keys(&[1]));
        let sealed_by_1_again = ticketer.seal_at(b"b", NOW).expect("sealed");
        ticketer.use_file_keys(file_keys(&[1, 2, 3]));
        assert!(ticketer.open_at(&sealed_by_1, NOW).is_some());
        ticketer.use_file_keys(file_keys(&[2, 3]));
        assert_eq!(ticketer.open_at(&sealed_by_1_again, NOW), None);
        assert_eq!(ticketer.key_names().len(), 2);
        assert!(ticketer.uses_file_keys());
    }

    #[test]
    fn keys_of_the_process_rotate_every_lifetime_and_survive_going_back_to_them() {
        let ticketer = SessionTicketer::new(HOUR).expect("ticketer");
        assert!(!ticketer.uses_file_keys());
        let start = unix_now();
        let first = ticketer.seal_at(b"first", start).expect("sealed");
        let first_name = ticketer.key_names();
        assert_eq!(first_name.len(), 1);
        // Unchanged within the lifetime; "going back" to generated keys
        // (a reload without ticket_keys) keeps them.
        ticketer.use_generated_keys().expect("keys");
        assert_eq!(ticketer.key_names(), first_name);
        assert!(ticketer.open_at(&first, start + 100).is_some());

        // A lifetime later: a new key seals, the previous one still opens.
        let later = start + 3600;
        let second = ticketer.seal_at(b"second", later).expect("sealed");
        let names = ticketer.key_names();
        assert_eq!(names.len(), 2);
        assert_eq!(names[0], first_name[0]);
        assert_ne!(&second[..NAME_LENGTH], &first[..NAME_LENGTH]);
        assert!(ticketer.open_at(&first, later).is_some());

        // Long idle: both older keys are gone, none of their tickets can
        // still be good.
        let much_later = later + 3 * 3600;
        assert!(ticketer.seal_at(b"third", much_later).is_some());
        assert_eq!(ticketer.key_names().len(), 1);
        assert_eq!(ticketer.open_at(&second, much_later), None);

        // From a file and back: new keys of the process.
        ticketer.use_file_keys(file_keys(&[9]));
        ticketer.use_generated_keys().expect("keys");
        assert!(!ticketer.uses_file_keys());
        assert_ne!(ticketer.key_names(), vec![hex(&[9; NAME_LENGTH])]);
    }

    #[test]
    fn the_ticketer_is_what_rustls_asks() {
        let ticketer: Arc<dyn ProducesTickets> = ticketer_with(&[4]);
        assert!(ticketer.enabled());
        assert_eq!(ticketer.lifetime(), 3600);
        let ticket = ticketer.encrypt(b"session").expect("sealed");
        assert_eq!(ticketer.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        assert_eq!(ticketer.decrypt(b"garbage"), None);
    }
}
