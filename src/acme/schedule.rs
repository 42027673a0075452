//! When to renew, and what one renewal does: the per-certificate task.
//!
//! A certificate is renewed when the CA's suggested window (ACME Renewal
//! Information, RFC 9773) says so, at a random moment inside it; without
//! one, when less than `renew_before_days` (default: a third of its
//! lifetime) is left. An entry with no usable certificate in the state
//! directory, or one whose names no longer match the configuration, is
//! ordered at once. `mail-tls-proxy acme renew` renews at once too.
//!
//! A failed order is retried after a capped exponential backoff with full
//! jitter: a random delay between 0 and 1 min, 2 min, 4 min, ... up to
//! 6 h, never sooner than the CA's Retry-After. The certificate served
//! keeps serving meanwhile, and nothing here ever stops the proxy.
//!
//! A new pair is checked exactly as a file reload checks one (chain,
//! key, key matches leaf) before it is written to the state directory;
//! the certificate reload is then asked to pick it up at once, and goes
//! through its own validate-then-swap.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::client::{Issuer, OrderFailure, RenewalWindow};
use super::settings::{AcmeCertificate, KeyType};
use super::store::{CertificateState, StateDir, PRIVKEY};
use crate::metrics::{self, AcmeOrderResult};
use crate::time::{format_unix_time, unix_now};
use crate::tls::reload::ReloadNow;

/// The first retry waits up to this long.
pub(crate) const RETRY_BASE: Duration = Duration::from_secs(60);
/// No retry waits longer than this.
pub(crate) const RETRY_CAP: Duration = Duration::from_secs(6 * 3600);
/// A wait for the renewal is cut into pieces of at most this, after each of
/// which the CA's renewal window and the files are looked at again.
const RECHECK_INTERVAL: Duration = Duration::from_secs(6 * 3600);
/// One order may take this long in all (validation, issuance, download).
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// The CA's renewal window (ACME Renewal Information) may take this long to
/// ask for; without an answer by then the certificate's own dates decide.
pub(crate) const RENEWAL_INFO_TIMEOUT: Duration = Duration::from_secs(60);
/// Orders that failed only on a refused nonce are tried again after this
/// pause, this many times per renewal, before the backoff applies.
const BAD_NONCE_PAUSE: Duration = Duration::from_secs(1);
const BAD_NONCE_RETRIES: u32 = 3;
/// A key waiting to replace the current one at the next renewal (a
/// planned key change: publish its TLSA record first).
pub(crate) const NEXT_PRIVKEY: &str = "next-privkey.pem";

/// Picks a delay between zero and the given ceiling.
pub(crate) type Jitter = fn(Duration) -> Duration;

/// Full jitter: uniform between 0 and `ceiling`, from the provider's
/// secure random generator (the ceiling itself if it has none).
pub(crate) fn full_jitter(ceiling: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    match crate::tls::provider::provider()
        .secure_random
        .fill(&mut bytes)
    {
        Ok(()) => {
            let fraction = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
            ceiling.mul_f64(fraction)
        }
        Err(_) => ceiling,
    }
}

/// The wait before retry number `attempt` (1 after the first failure):
/// full jitter under `min(RETRY_CAP, RETRY_BASE * 2^(attempt-1))`, at
/// least a second, and never before `retry_after`.
pub(crate) fn retry_delay(attempt: u32, retry_after: Option<Duration>, jitter: Jitter) -> Duration {
    let doublings = attempt.saturating_sub(1).min(20);
    let ceiling = RETRY_BASE.saturating_mul(1 << doublings).min(RETRY_CAP);
    let delay = jitter(ceiling).clamp(Duration::from_secs(1), ceiling.max(Duration::from_secs(1)));
    delay.max(retry_after.unwrap_or_default())
}

/// When a certificate valid from `not_before` to `not_after` is due for
/// renewal (Unix time): inside the CA's window if it gave one (at
/// `position`, 0.0 to 1.0, of it), else `renew_before` before its end, else
/// when a third of its lifetime is left.
pub(crate) fn renewal_due(
    not_before: i64,
    not_after: i64,
    renew_before: Option<Duration>,
    window: Option<RenewalWindow>,
    position: f64,
) -> i64 {
    if let Some(window) = window.filter(|window| window.end >= window.start) {
        let span = (window.end - window.start) as f64;
        return window.start + (span * position.clamp(0.0, 1.0)) as i64;
    }
    match renew_before {
        Some(before) => not_after.saturating_sub(before.as_secs() as i64),
        None => not_after - (not_after - not_before).max(0) / 3,
    }
}

/// The certificate in the state directory now, as far as scheduling goes.
#[derive(Debug)]
pub(crate) struct Current {
    pub(crate) leaf: rustls_pki_types::CertificateDer<'static>,
    pub(crate) names: Vec<String>,
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
}

/// Reads and checks the entry's pair in the state directory; `None` if
/// there is none or it cannot be used (then it is ordered anew).
pub(crate) fn current(certificate: &AcmeCertificate) -> Option<Current> {
    let files = &certificate.files;
    let cert = std::fs::read(&files.cert).ok()?;
    let key = std::fs::read(&files.key).ok()?;
    let provider = crate::tls::provider::provider();
    let loaded = crate::tls::certs::parse_certified_key(files, &cert, &key, &provider).ok()?;
    Some(Current {
        leaf: loaded.certified_key.cert[0].clone(),
        names: loaded.names,
        not_before: loaded.not_before,
        not_after: loaded.not_after,
    })
}

/// Whether the certificate covers exactly the configured names.
fn same_names(configured: &[String], issued: &[String]) -> bool {
    let mut configured = configured.to_vec();
    let mut issued = issued.to_vec();
    configured.sort();
    issued.sort();
    configured == issued
}

/// One ACME certificate's renewal task.
pub(crate) struct Renewal<I: Issuer> {
    pub(crate) issuer: Arc<I>,
    pub(crate) certificate: AcmeCertificate,
    pub(crate) renew_before: Option<Duration>,
    pub(crate) state: StateDir,
    /// Asks the certificate reload to read the state directory now.
    pub(crate) reload: ReloadNow,
    pub(crate) jitter: Jitter,
    /// `acme renew`: renew now (or retry now after a failure).
    pub(crate) requests: mpsc::UnboundedReceiver<()>,
}

impl<I: Issuer> Renewal<I> {
    /// Renews the certificate whenever it is due, forever.
    pub(crate) async fn run(mut self) {
        loop {
            let now = unix_now();
            let due = match current(&self.certificate) {
                None => now,
                Some(current) if !same_names(&self.certificate.names, &current.names) => {
                    info!(
                        certificate = %self.certificate.label(),
                        names = %self.certificate.names.join(","),
                        issued_for = %current.names.join(","),
                        "acme: the configured names changed: ordering a new certificate"
                    );
                    now
                }
                Some(current) => {
                    // A CA that never answers must not hold up the renewal.
                    let window = tokio::time::timeout(
                        RENEWAL_INFO_TIMEOUT,
                        self.issuer.renewal_window(&current.leaf),
                    )
                    .await
                    .unwrap_or_default();
                    let position =
                        full_jitter(Duration::from_secs(1_000_000)).as_secs_f64() / 1_000_000.0;
                    renewal_due(
                        current.not_before,
                        current.not_after,
                        self.renew_before,
                        window,
                        position,
                    )
                }
            };
            self.record_next_renewal(due);
            if due > now {
                let wait = Duration::from_secs((due - now) as u64).min(RECHECK_INTERVAL);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {
                        if wait == RECHECK_INTERVAL {
                            continue;
                        }
                    }
                    Some(()) = self.requests.recv() => {
                        info!(certificate = %self.certificate.label(), "acme: renewal requested");
                    }
                }
            }
            self.renew_until_done().await;
        }
    }

    /// Orders until an order succeeds, backing off between failures.
    async fn renew_until_done(&mut self) {
        let mut attempt = 0u32;
        let mut bad_nonce_retries = 0u32;
        loop {
            let result = match tokio::time::timeout(ORDER_TIMEOUT, self.renew_once()).await {
                Ok(result) => result,
                Err(_) => Err(OrderFailure::new(format!(
                    "the order took longer than {} s",
                    ORDER_TIMEOUT.as_secs()
                ))),
            };
            let failure = match result {
                Ok(()) => return,
                Err(failure) => failure,
            };
            ::metrics::counter!(metrics::ACME_ORDERS_TOTAL, "result" => AcmeOrderResult::Error.as_str())
                .increment(1);
            if failure.bad_nonce && bad_nonce_retries < BAD_NONCE_RETRIES {
                bad_nonce_retries += 1;
                info!(
                    certificate = %self.certificate.label(),
                    reason = %failure.reason,
                    "acme: the CA refused a nonce; ordering again at once"
                );
                tokio::time::sleep(BAD_NONCE_PAUSE).await;
                continue;
            }
            attempt += 1;
            let delay = retry_delay(attempt, failure.retry_after, self.jitter);
            let now = unix_now();
            let next_retry = now + delay.as_secs() as i64;
            warn!(
                certificate = %self.certificate.label(),
                names = %self.certificate.names.join(","),
                attempt,
                reason = %failure.reason,
                next_retry = %format_unix_time(next_retry),
                "acme: order failed; the certificate served now stays in use"
            );
            let mut state = self.state.certificate_state(self.certificate.label());
            state.last_error = Some(failure.reason.clone());
            state.last_error_at = Some(now);
            state.next_retry = Some(next_retry);
            let _ = self
                .state
                .write_certificate_state(self.certificate.label(), &state);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                Some(()) = self.requests.recv() => {
                    info!(certificate = %self.certificate.label(), "acme: renewal requested: retrying now");
                }
            }
        }
    }

    /// One order: key, CSR, certificate, checks, files, reload.
    async fn renew_once(&mut self) -> Result<(), OrderFailure> {
        let label = self.certificate.label().to_string();
        let folder = self.state.certificate_dir(&label);
        let next_key = folder.join(NEXT_PRIVKEY);
        let (key_pem, next_key_used) =
            private_key(&self.certificate, &folder.join(PRIVKEY), &next_key)?;
        let key = rcgen::KeyPair::from_pem(&key_pem)
            .map_err(|error| OrderFailure::new(format!("the private key: {error}")))?;
        let mut params = rcgen::CertificateParams::new(self.certificate.names.clone())
            .map_err(|error| OrderFailure::new(format!("the CSR: {error}")))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, label.clone());
        let csr = params
            .serialize_request(&key)
            .map_err(|error| OrderFailure::new(format!("the CSR: {error}")))?;
        let chain = self
            .issuer
            .issue(&self.certificate.names, csr.der())
            .await?;
        // The same checks as any certificate file gets, before anything is
        // written: a broken or mismatched result is never stored.
        let provider = crate::tls::provider::provider();
        let loaded = crate::tls::certs::parse_certified_key(
            &self.certificate.files,
            chain.as_bytes(),
            key_pem.as_bytes(),
            &provider,
        )
        .map_err(|error| OrderFailure::new(format!("the CA's certificate is unusable: {error}")))?;
        if let Some(missing) = self
            .certificate
            .names
            .iter()
            .find(|name| !loaded.names.contains(name))
        {
            return Err(OrderFailure::new(format!(
                "the CA's certificate does not name {missing}"
            )));
        }
        self.state
            .write_pair(&label, chain.as_bytes(), key_pem.as_bytes())
            .map_err(|error| OrderFailure::new(format!("cannot store the certificate: {error}")))?;
        if next_key_used {
            // Now in privkey.pem.
            let _ = std::fs::remove_file(&next_key);
        }
        self.reload.request();
        ::metrics::counter!(metrics::ACME_ORDERS_TOTAL, "result" => AcmeOrderResult::Ok.as_str())
            .increment(1);
        info!(
            certificate = %label,
            names = %loaded.names.join(","),
            not_after = %format_unix_time(loaded.not_after),
            "acme: certificate issued"
        );
        let state = CertificateState {
            names: loaded.names.clone(),
            issued_at: Some(unix_now()),
            not_after: Some(loaded.not_after),
            ..CertificateState::default()
        };
        let _ = self.state.write_certificate_state(&label, &state);
        Ok(())
    }

    fn record_next_renewal(&self, due: i64) {
        ::metrics::gauge!(
            metrics::ACME_NEXT_RENEWAL_TIMESTAMP_SECONDS,
            "certificate" => self.certificate.label().to_string()
        )
        .set(due as f64);
        let mut state = self.state.certificate_state(self.certificate.label());
        if state.next_renewal != Some(due) {
            state.next_renewal = Some(due);
            let _ = self
                .state
                .write_certificate_state(self.certificate.label(), &state);
        }
    }
}

/// The private key for the next CSR, and whether it is the prepared next
/// key: that one if there is one (of the configured type), else the
/// current key with `reuse_key` (if it is of the configured type), else a
/// new key of the configured type.
fn private_key(
    certificate: &AcmeCertificate,
    current: &std::path::Path,
    next: &std::path::Path,
) -> Result<(String, bool), OrderFailure> {
    let usable = |path: &std::path::Path| -> Option<String> {
        let pem = std::fs::read_to_string(path).ok()?;
        let key = rcgen::KeyPair::from_pem(&pem).ok()?;
        (key_type_of(&key) == Some(certificate.key_type)).then_some(pem)
    };
    if let Some(pem) = usable(next) {
        return Ok((pem, true));
    }
    if certificate.reuse_key {
        if let Some(pem) = usable(current) {
            return Ok((pem, false));
        }
    }
    generate_key(certificate.key_type).map(|pem| (pem, false))
}

fn key_type_of(key: &rcgen::KeyPair) -> Option<KeyType> {
    let algorithm = key.algorithm();
    if algorithm == &rcgen::PKCS_ECDSA_P256_SHA256 {
        Some(KeyType::EcdsaP256)
    } else if algorithm == &rcgen::PKCS_RSA_SHA256 {
        Some(KeyType::Rsa2048)
    } else {
        None
    }
}

/// A new private key of `key_type`, as PKCS#8 PEM.
pub(crate) fn generate_key(key_type: KeyType) -> Result<String, OrderFailure> {
    let key = match key_type {
        KeyType::EcdsaP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyType::Rsa2048 => {
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        }
    }
    .map_err(|error| OrderFailure::new(format!("cannot generate a key: {error}")))?;
    Ok(key.serialize_pem())
}

#[cfg(test)]
mod tests;
