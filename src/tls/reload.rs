//! Certificate rotation without restart: the decision.
//!
//! The [`Reloader`] owns the configured `[[certificate]]` files and the store
//! rustls reads from. It re-reads the files when [`super::watch`] reports a
//! change in a directory that holds one of them, on SIGHUP (always a full
//! re-check), and every `certificate_poll_interval` (a fallback for
//! filesystems without inotify, e.g. some network filesystems).
//!
//! Each pair's bytes are compared with what was last read; only a pair that
//! changed is parsed and checked (chain, key, key matches leaf). A pair that
//! fails keeps serving its previous version, the error is logged with the
//! file and the reason, and the next change is tried again, so a half-written
//! or mismatched replacement (a key written before its certificate) is never
//! served and the new pair is picked up as soon as both files are in place.
//! The new set is swapped in with one atomic pointer store: new handshakes
//! see it, established sessions keep the certificate they were made with.
//! Every reload is counted in the certificate metrics; expiry warnings come
//! from [`super::expiry`].
//!
//! An ACME entry (see [`crate::acme`]) is a source like any other whose
//! files are in the ACME state directory, with one difference: until its
//! first certificate is issued its files are missing, and a self-signed
//! placeholder for its names is served instead of refusing to start. The
//! ACME renewal asks for a reload at once ([`ReloadNow`]) after it wrote a
//! new pair, rather than waiting for the watch.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::certs::{parse_certified_key, read_file, CertificateError, LoadedCertificate};
use super::expiry::{warn_about_expiry, EXPIRY_WARNING_INTERVAL};
use super::generate::self_signed;
use super::resolver::{CertificateSet, CertificateStore};
use super::watch::{parent_directory, Triggers};
use crate::config::CertificateFiles;
use crate::metrics::{self, ReloadResult};
use crate::time::{format_unix_time, unix_now};

/// What made a reload happen (a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// A file system event in a watched directory.
    Watch,
    /// The poll interval.
    Poll,
    /// SIGHUP: re-read and re-check everything, changed or not.
    Signal,
    /// The ACME renewal wrote a new pair.
    Acme,
}

impl Trigger {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Trigger::Watch => "watch",
            Trigger::Poll => "poll",
            Trigger::Signal => "sighup",
            Trigger::Acme => "acme",
        }
    }
}

/// Counts of reloads by result, for this proxy (the metrics are process-wide).
#[derive(Debug, Default)]
pub struct ReloadStats {
    ok: AtomicU64,
    errors: AtomicU64,
}

impl ReloadStats {
    /// Reloads that swapped in new certificates (or, on SIGHUP, re-checked
    /// everything without an error).
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Acquire)
    }

    /// Reloads where at least one changed pair could not be used.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Acquire)
    }
}

/// What one reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ReloadOutcome {
    /// Labels of the certificates now served in a new version.
    pub(crate) replaced: Vec<String>,
    /// One message per pair that could not be used (file and reason).
    pub(crate) errors: Vec<String>,
}

/// What reading a pair's two files gave, to tell whether anything changed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Observation {
    Read { cert: Vec<u8>, key: Vec<u8> },
    Unreadable(String),
}

/// One `[[certificate]]` as the reloader is given it: its files and, for
/// an ACME entry, the names of the placeholder served while the files are
/// missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceSpec {
    pub(crate) files: CertificateFiles,
    pub(crate) placeholder_names: Option<Vec<String>>,
}

/// Asks a running [`Reloader`] to re-read its files now (after the ACME
/// renewal wrote a pair).
#[derive(Debug, Clone)]
pub(crate) struct ReloadNow(mpsc::UnboundedSender<()>);

impl ReloadNow {
    /// A handle and the receiving end it sends to (for tests).
    pub(crate) fn channel() -> (ReloadNow, mpsc::UnboundedReceiver<()>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (ReloadNow(sender), receiver)
    }

    /// Requests a reload; nothing happens if the reloader is gone.
    pub(crate) fn request(&self) {
        let _ = self.0.send(());
    }
}

/// One configured `[[certificate]]`.
struct Source {
    files: CertificateFiles,
    /// ACME entries: the placeholder's names (missing files are expected
    /// until the first issuance).
    placeholder_names: Option<Vec<String>>,
    /// Whether the placeholder is what is served now.
    serving_placeholder: bool,
    /// The metrics label, fixed at start-up so a series never goes stale.
    label: String,
    /// What was read last, whether it could be used or not.
    observed: Observation,
    /// The bytes of what is served now.
    served_bytes: (Vec<u8>, Vec<u8>),
    /// What is served now.
    served: Arc<LoadedCertificate>,
    /// The error of the last attempt, while the files stay broken.
    failing: Option<String>,
}

/// Owns the certificate files, the store, and the reload logic.
pub struct Reloader {
    sources: Vec<Source>,
    /// The generated default (only when no `[[certificate]]` is configured).
    generated: Option<Arc<LoadedCertificate>>,
    store: Arc<CertificateStore>,
    provider: Arc<CryptoProvider>,
    stats: Arc<ReloadStats>,
    /// SIGHUP and the directory watch, once [`Reloader::start_watching`]
    /// ran (until [`Reloader::run`] takes them).
    triggers: Option<Triggers>,
    /// Whether SIGHUP re-reads the certificates here; false when SIGHUP
    /// reloads the whole configuration (which re-reads them too).
    reload_on_hangup: bool,
    /// [`ReloadNow`] requests, until [`Reloader::run`] takes them.
    reload_now: (ReloadNow, Option<mpsc::UnboundedReceiver<()>>),
}

fn read_pair(files: &CertificateFiles) -> Result<(Vec<u8>, Vec<u8>), CertificateError> {
    Ok((read_file(&files.cert)?, read_file(&files.key)?))
}

/// Counts one certificate reload (in `stats` and the metrics); a
/// successful one also sets the last-reload time.
pub(crate) fn count_reload(stats: &ReloadStats, result: ReloadResult) {
    let counter = match result {
        ReloadResult::Ok => &stats.ok,
        ReloadResult::Error => &stats.errors,
    };
    counter.fetch_add(1, Ordering::AcqRel);
    ::metrics::counter!(metrics::CERTIFICATE_RELOADS_TOTAL, "result" => result.as_str())
        .increment(1);
    if result == ReloadResult::Ok {
        ::metrics::gauge!(metrics::CERTIFICATE_RELOAD_TIMESTAMP_SECONDS).set(unix_now() as f64);
    }
}

impl Reloader {
    /// Loads every configured pair, or generates the self-signed default for
    /// `hostname` when there is none. Any error stops (it names the file and
    /// the reason): a proxy must not start without its certificates.
    pub fn load(
        certificates: &[CertificateFiles],
        hostname: &str,
    ) -> Result<Reloader, CertificateError> {
        let specs: Vec<SourceSpec> = certificates
            .iter()
            .map(|files| SourceSpec {
                files: files.clone(),
                placeholder_names: None,
            })
            .collect();
        Reloader::load_sources(&specs, hostname)
    }

    /// [`Reloader::load`], where an ACME entry (`placeholder_names`) whose
    /// pair is missing or unusable serves a self-signed placeholder for
    /// its names (with a warning) until its first certificate is issued.
    pub(crate) fn load_sources(
        certificates: &[SourceSpec],
        hostname: &str,
    ) -> Result<Reloader, CertificateError> {
        let provider = super::provider::provider();
        let mut sources: Vec<Source> = Vec::with_capacity(certificates.len());
        for spec in certificates {
            let files = &spec.files;
            let read = read_pair(files).and_then(|(cert, key)| {
                parse_certified_key(files, &cert, &key, &provider).map(|loaded| (loaded, cert, key))
            });
            let (loaded, observed, served_bytes, serving_placeholder) = match (
                read,
                &spec.placeholder_names,
            ) {
                (Ok((loaded, cert, key)), _) => (
                    Arc::new(loaded),
                    Observation::Read {
                        cert: cert.clone(),
                        key: key.clone(),
                    },
                    (cert, key),
                    false,
                ),
                (Err(error), None) => return Err(error),
                (Err(error), Some(names)) => {
                    match &error {
                        CertificateError::Read { .. } => warn!(
                            names = %names.join(","),
                            "acme: no certificate issued yet: serving a self-signed placeholder that clients will not trust until the first issuance"
                        ),
                        _ => error!(
                            names = %names.join(","),
                            %error,
                            "acme: the stored certificate is unusable: serving a self-signed placeholder until a new one is issued"
                        ),
                    }
                    let placeholder = super::generate::placeholder(names, &provider)?;
                    let observed = match read_pair(files) {
                        Ok((cert, key)) => Observation::Read { cert, key },
                        Err(error) => Observation::Unreadable(error.to_string()),
                    };
                    (
                        Arc::new(placeholder),
                        observed,
                        (Vec::new(), Vec::new()),
                        true,
                    )
                }
            };
            let mut label = loaded.label();
            if sources.iter().any(|source| source.label == label) {
                label = files.cert.display().to_string();
            }
            sources.push(Source {
                files: files.clone(),
                placeholder_names: spec.placeholder_names.clone(),
                serving_placeholder,
                label,
                observed,
                served_bytes,
                served: loaded,
                failing: None,
            });
        }
        let generated = if sources.is_empty() {
            warn!(
                %hostname,
                "no [[certificate]] configured: serving a generated self-signed certificate that clients will not trust"
            );
            Some(Arc::new(self_signed(hostname, &provider)?))
        } else {
            None
        };
        let entries: Vec<Arc<LoadedCertificate>> = match &generated {
            Some(generated) => vec![generated.clone()],
            None => sources.iter().map(|source| source.served.clone()).collect(),
        };
        let set = CertificateSet::new(entries).expect("at least one certificate");
        let reloader = Reloader {
            sources,
            generated,
            store: Arc::new(CertificateStore::new(set)),
            provider,
            stats: Arc::new(ReloadStats::default()),
            triggers: None,
            reload_on_hangup: true,
            reload_now: {
                let (handle, requests) = ReloadNow::channel();
                (handle, Some(requests))
            },
        };
        let now = unix_now();
        for (label, certificate) in reloader.labelled() {
            info!(
                certificate = %label,
                names = %certificate.names.join(","),
                not_after = %format_unix_time(certificate.not_after),
                chain = certificate.certified_key.cert.len(),
                source = %certificate.source(),
                "certificate loaded"
            );
            warn_about_expiry(&label, &certificate, now);
        }
        // The metrics follow what is served: the caller exports them once
        // this set is in use (start-up, or a reload's take-over), never for
        // a set a refused reload only read.
        Ok(reloader)
    }

    /// The store the rustls configurations resolve from.
    pub(crate) fn store(&self) -> Arc<CertificateStore> {
        self.store.clone()
    }

    pub(crate) fn stats(&self) -> Arc<ReloadStats> {
        self.stats.clone()
    }

    /// SIGHUP is someone else's (a whole-configuration reload): only file
    /// changes and polling re-read the certificates here. Call it before
    /// [`Reloader::start_watching`].
    pub(crate) fn leave_hangup_to_caller(&mut self) {
        self.reload_on_hangup = false;
    }

    /// Takes over from the reloader of the configuration served so far:
    /// `store`, which every listener resolves from, serves this reloader's
    /// certificates from now on and follows its reloads, and `stats` goes on
    /// counting them.
    /// The re-read counts as a successful certificate reload.
    pub(crate) fn take_over(&mut self, store: Arc<CertificateStore>, stats: Arc<ReloadStats>) {
        store.replace_with(self.store.current());
        self.store = store;
        self.stats = stats;
        self.export_metrics();
        count_reload(&self.stats, ReloadResult::Ok);
    }

    /// The metrics label of each certificate served.
    pub(crate) fn labels(&self) -> Vec<String> {
        self.labelled()
            .into_iter()
            .map(|(label, _)| label)
            .collect()
    }

    /// Asks this reloader, once running, to re-read its files now.
    pub(crate) fn reload_now(&self) -> ReloadNow {
        self.reload_now.0.clone()
    }

    /// What is served now, in configuration order.
    pub fn certificates(&self) -> Vec<Arc<LoadedCertificate>> {
        self.store.current().entries().to_vec()
    }

    /// Whether certificates come from files (and so can be reloaded).
    pub(crate) fn has_files(&self) -> bool {
        !self.sources.is_empty()
    }

    /// The directories to watch: each file's parent, once.
    pub(crate) fn watched_directories(&self) -> Vec<PathBuf> {
        let mut directories = BTreeSet::new();
        for source in &self.sources {
            for path in [&source.files.cert, &source.files.key] {
                directories.insert(parent_directory(path));
            }
        }
        directories.into_iter().collect()
    }

    fn labelled(&self) -> Vec<(String, Arc<LoadedCertificate>)> {
        match &self.generated {
            Some(generated) => vec![(generated.label(), generated.clone())],
            None => self
                .sources
                .iter()
                .map(|source| (source.label.clone(), source.served.clone()))
                .collect(),
        }
    }

    /// Sets the certificate series for the set served now.
    pub(crate) fn export_metrics(&self) {
        for (label, certificate) in self.labelled() {
            ::metrics::gauge!(metrics::CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, "certificate" => label)
                .set(certificate.not_after as f64);
        }
        ::metrics::gauge!(metrics::CERTIFICATE_RELOAD_TIMESTAMP_SECONDS).set(unix_now() as f64);
        // Both series exist from the start, at zero.
        for result in ReloadResult::ALL {
            ::metrics::counter!(metrics::CERTIFICATE_RELOADS_TOTAL, "result" => result.as_str())
                .increment(0);
        }
    }

    /// Re-reads every pair and swaps in those that changed and check out.
    /// Without `Trigger::Signal`, a pair whose files read the same as last
    /// time is skipped (nothing is logged or counted for it).
    pub(crate) fn reload(&mut self, trigger: Trigger) -> ReloadOutcome {
        let mut outcome = ReloadOutcome::default();
        if self.sources.is_empty() {
            if trigger == Trigger::Signal {
                info!("SIGHUP: no [[certificate]] configured, nothing to reload");
            }
            return outcome;
        }
        let force = trigger == Trigger::Signal;
        let now = unix_now();
        for source in &mut self.sources {
            let observed = match read_pair(&source.files) {
                Ok((cert, key)) => Observation::Read { cert, key },
                Err(error) => Observation::Unreadable(error.to_string()),
            };
            if observed == source.observed && !force {
                continue;
            }
            source.observed = observed.clone();
            let result = match observed {
                // An ACME entry before its first issuance: the placeholder
                // stays until both files are there.
                Observation::Unreadable(message) if source.serving_placeholder => {
                    debug!(certificate = %source.label, %message, "acme: still no certificate issued: serving the placeholder");
                    Ok(None)
                }
                Observation::Unreadable(message) => Err(message),
                Observation::Read { cert, key } => {
                    if (&cert, &key) == (&source.served_bytes.0, &source.served_bytes.1) {
                        // Back to what is served (or SIGHUP without a change).
                        Ok(None)
                    } else {
                        parse_certified_key(&source.files, &cert, &key, &self.provider)
                            .map(|loaded| Some((loaded, cert, key)))
                            .map_err(|error| error.to_string())
                    }
                }
            };
            match result {
                Ok(None) => {
                    if source.failing.take().is_some() {
                        info!(
                            certificate = %source.label,
                            trigger = %trigger.as_str(),
                            "certificate files are back to the pair being served"
                        );
                    }
                }
                Ok(Some((loaded, cert, key))) => {
                    source.failing = None;
                    let loaded = Arc::new(loaded);
                    info!(
                        certificate = %source.label,
                        trigger = %trigger.as_str(),
                        names = %loaded.names.join(","),
                        not_after = %format_unix_time(loaded.not_after),
                        chain = loaded.certified_key.cert.len(),
                        cert = %source.files.cert.display(),
                        "certificate reloaded: new handshakes get the new certificate"
                    );
                    warn_about_expiry(&source.label, &loaded, now);
                    source.serving_placeholder = false;
                    source.served = loaded;
                    source.served_bytes = (cert, key);
                    outcome.replaced.push(source.label.clone());
                }
                Err(message) => {
                    error!(
                        certificate = %source.label,
                        trigger = %trigger.as_str(),
                        error = %message,
                        "certificate reload failed: still serving the previous certificate; the next change is tried again"
                    );
                    source.failing = Some(message.clone());
                    outcome.errors.push(message);
                }
            }
        }
        if !outcome.replaced.is_empty() {
            let entries = self
                .sources
                .iter()
                .map(|source| source.served.clone())
                .collect();
            let set = CertificateSet::new(entries).expect("at least one certificate");
            self.store.replace(set);
        }
        let succeeded = outcome.errors.is_empty() && (!outcome.replaced.is_empty() || force);
        if succeeded {
            count_reload(&self.stats, ReloadResult::Ok);
        } else if !outcome.errors.is_empty() {
            count_reload(&self.stats, ReloadResult::Error);
        }
        if !outcome.replaced.is_empty() {
            for source in &self.sources {
                ::metrics::gauge!(metrics::CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, "certificate" => source.label.clone())
                    .set(source.served.not_after as f64);
            }
        }
        if force && outcome.errors.is_empty() && outcome.replaced.is_empty() {
            info!("SIGHUP: certificates re-read and checked, nothing changed");
        }
        outcome
    }

    /// The daily reminder: certificates expired or expiring soon, and pairs
    /// whose files are still broken.
    pub(crate) fn remind(&self) {
        let now = unix_now();
        for (label, certificate) in self.labelled() {
            warn_about_expiry(&label, &certificate, now);
        }
        for source in &self.sources {
            if let Some(message) = &source.failing {
                error!(
                    certificate = %source.label,
                    error = %message,
                    "certificate files are still broken: serving the previous certificate"
                );
            }
        }
    }

    /// Starts listening for SIGHUP and watching the certificate
    /// directories, then re-reads the files at once: a change made between
    /// loading and watching is not left for the next poll. Call it (inside
    /// the runtime) before announcing that the proxy serves, so that any
    /// change or SIGHUP from then on is acted on (and a SIGHUP never falls
    /// to its default action, ending the process). Does its work once.
    pub(crate) fn start_watching(&mut self) {
        if self.triggers.is_some() {
            return;
        }
        // An ACME entry's folder may not exist before its first issuance;
        // made now, its files are watched from the start.
        for source in &self.sources {
            if source.placeholder_names.is_some() {
                let _ =
                    crate::acme::store::create_private_dir(&parent_directory(&source.files.cert));
            }
        }
        self.triggers = Some(Triggers::start(
            &self.watched_directories(),
            self.reload_on_hangup,
        ));
        self.reload(Trigger::Watch);
    }

    /// Watches, polls and listens for SIGHUP until the task is dropped.
    pub(crate) async fn run(mut self, poll_interval: Duration) {
        self.start_watching();
        // Kept here for the life of the task: dropping them stops the watch.
        let mut triggers = self.triggers.take().expect("started above");
        let start = tokio::time::Instant::now();
        let mut poll = tokio::time::interval_at(start + poll_interval, poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut daily =
            tokio::time::interval_at(start + EXPIRY_WARNING_INTERVAL, EXPIRY_WARNING_INTERVAL);
        daily.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reload_now = self.reload_now.1.take();
        let mut reloader = self;
        loop {
            let trigger = tokio::select! {
                Some(()) = async {
                    match reload_now.as_mut() {
                        Some(requests) => requests.recv().await,
                        None => std::future::pending().await,
                    }
                } => Trigger::Acme,
                trigger = triggers.next() => {
                    if trigger == Trigger::Watch {
                        triggers.settle().await;
                    }
                    trigger
                }
                _ = poll.tick(), if reloader.has_files() => Trigger::Poll,
                _ = daily.tick() => {
                    reloader.remind();
                    continue;
                }
            };
            // Reading files and parsing keys blocks; keep it off the
            // threads that serve connections.
            reloader = match tokio::task::spawn_blocking(move || {
                reloader.reload(trigger);
                reloader
            })
            .await
            {
                Ok(reloader) => reloader,
                Err(error) => {
                    error!(%error, "certificate reload panicked; automatic reloads stop");
                    return;
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;
    use crate::tls::generate::{generate_pair, GeneratedPair};

    fn pair_files(dir: &TestDir, name: &str) -> CertificateFiles {
        CertificateFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        }
    }

    fn write(files: &CertificateFiles, names: &[&str]) -> GeneratedPair {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let pair = generate_pair(&names).expect("generate");
        std::fs::write(&files.cert, &pair.cert_pem).expect("write");
        std::fs::write(&files.key, &pair.key_pem).expect("write");
        pair
    }

    fn served(reloader: &Reloader, index: usize) -> Vec<u8> {
        reloader.store().current().entries()[index]
            .certified_key
            .cert[0]
            .to_vec()
    }

    #[test]
    fn a_changed_pair_is_swapped_in_and_an_unchanged_one_is_skipped() {
        let dir = TestDir::new("reload-swap");
        let files = pair_files(&dir, "a");
        let first = write(&files, &["a.example"]);
        let mut reloader = Reloader::load(std::slice::from_ref(&files), "unused").expect("load");
        assert_eq!(served(&reloader, 0), first.cert_der.to_vec());
        assert_eq!(reloader.reload(Trigger::Watch), ReloadOutcome::default());
        assert_eq!((reloader.stats().ok(), reloader.stats().errors()), (0, 0));

        let second = write(&files, &["a.example"]);
        let outcome = reloader.reload(Trigger::Watch);
        assert_eq!(outcome.replaced, vec!["a.example".to_string()]);
        assert!(outcome.errors.is_empty());
        assert_eq!(served(&reloader, 0), second.cert_der.to_vec());
        assert_eq!((reloader.stats().ok(), reloader.stats().errors()), (1, 0));
    }

    #[test]
    fn a_broken_replacement_keeps_the_old_pair_until_fixed() {
        let dir = TestDir::new("reload-broken");
        let files = pair_files(&dir, "a");
        let first = write(&files, &["a.example"]);
        let mut reloader = Reloader::load(std::slice::from_ref(&files), "unused").expect("load");

        // Key first: new key, old certificate = mismatch.
        let next = generate_pair(&["a.example".to_string()]).expect("generate");
        std::fs::write(&files.key, &next.key_pem).expect("write");
        let outcome = reloader.reload(Trigger::Watch);
        assert!(outcome.replaced.is_empty());
        assert_eq!(outcome.errors.len(), 1);
        assert!(outcome.errors[0].contains("does not belong"), "{outcome:?}");
        assert_eq!(served(&reloader, 0), first.cert_der.to_vec());
        // Nothing changed since: not tried (nor counted) again.
        assert_eq!(reloader.reload(Trigger::Poll), ReloadOutcome::default());
        assert_eq!(reloader.stats().errors(), 1);

        // A truncated certificate is still broken.
        std::fs::write(&files.cert, &next.cert_pem[..next.cert_pem.len() - 40]).expect("write");
        let outcome = reloader.reload(Trigger::Watch);
        assert_eq!(outcome.errors.len(), 1);
        assert!(outcome.errors[0].contains("a.crt"), "{outcome:?}");
        assert_eq!(served(&reloader, 0), first.cert_der.to_vec());

        // Both in place: the new pair.
        std::fs::write(&files.cert, &next.cert_pem).expect("write");
        let outcome = reloader.reload(Trigger::Watch);
        assert_eq!(outcome.replaced.len(), 1);
        assert_eq!(served(&reloader, 0), next.cert_der.to_vec());
        assert_eq!((reloader.stats().ok(), reloader.stats().errors()), (1, 2));
    }

    #[test]
    fn a_missing_file_is_an_error_and_the_old_pair_stays() {
        let dir = TestDir::new("reload-missing");
        let files = pair_files(&dir, "a");
        let first = write(&files, &["a.example"]);
        let mut reloader = Reloader::load(std::slice::from_ref(&files), "unused").expect("load");
        std::fs::remove_file(&files.cert).expect("remove");
        let outcome = reloader.reload(Trigger::Poll);
        assert_eq!(outcome.errors.len(), 1);
        assert!(outcome.errors[0].contains("cannot read"), "{outcome:?}");
        assert_eq!(served(&reloader, 0), first.cert_der.to_vec());
        // Restored as it was: served as before, no swap needed.
        std::fs::write(&files.cert, &first.cert_pem).expect("write");
        let outcome = reloader.reload(Trigger::Poll);
        assert_eq!(outcome, ReloadOutcome::default());
        assert_eq!(served(&reloader, 0), first.cert_der.to_vec());
    }

    #[test]
    fn each_pair_is_judged_on_its_own() {
        let dir = TestDir::new("reload-pairs");
        let (a, b) = (pair_files(&dir, "a"), pair_files(&dir, "b"));
        write(&a, &["a.example"]);
        let b_first = write(&b, &["b.example"]);
        let mut reloader = Reloader::load(&[a.clone(), b.clone()], "unused").expect("load");
        let a_next = write(&a, &["a.example"]);
        std::fs::write(&b.cert, "garbage").expect("write");
        let outcome = reloader.reload(Trigger::Watch);
        assert_eq!(outcome.replaced, vec!["a.example".to_string()]);
        assert_eq!(outcome.errors.len(), 1);
        assert_eq!(served(&reloader, 0), a_next.cert_der.to_vec());
        assert_eq!(served(&reloader, 1), b_first.cert_der.to_vec());
    }

    #[test]
    fn sighup_rechecks_even_without_a_change() {
        let dir = TestDir::new("reload-sighup");
        let files = pair_files(&dir, "a");
        write(&files, &["a.example"]);
        let mut reloader = Reloader::load(std::slice::from_ref(&files), "unused").expect("load");
        assert_eq!(reloader.reload(Trigger::Signal), ReloadOutcome::default());
        assert_eq!(reloader.stats().ok(), 1);
    }

    #[test]
    fn start_up_errors_name_the_file() {
        let dir = TestDir::new("reload-startup");
        let files = pair_files(&dir, "a");
        write(&files, &["a.example"]);
        std::fs::write(&files.key, "").expect("write");
        let error = Reloader::load(std::slice::from_ref(&files), "unused")
            .err()
            .expect("refused");
        assert!(error.to_string().contains("a.key"), "{error}");
    }

    #[test]
    fn without_files_the_self_signed_default_is_served() {
        let mut reloader = Reloader::load(&[], "mx.example.org").expect("load");
        assert!(!reloader.has_files());
        let certificates = reloader.certificates();
        assert_eq!(certificates.len(), 1);
        assert_eq!(certificates[0].names, vec!["mx.example.org", "localhost"]);
        assert_eq!(reloader.reload(Trigger::Signal), ReloadOutcome::default());
    }

    #[test]
    fn duplicate_first_names_get_distinct_labels_and_directories_are_watched_once() {
        let dir = TestDir::new("reload-labels");
        let (a, b) = (pair_files(&dir, "rsa"), pair_files(&dir, "ecdsa"));
        write(&a, &["mail.example"]);
        write(&b, &["mail.example"]);
        let reloader = Reloader::load(&[a, b.clone()], "unused").expect("load");
        let labels: Vec<String> = reloader.labelled().into_iter().map(|(l, _)| l).collect();
        assert_eq!(
            labels,
            vec!["mail.example".to_string(), b.cert.display().to_string()]
        );
        assert_eq!(
            reloader.watched_directories(),
            vec![dir.path().to_path_buf()]
        );
    }
}
