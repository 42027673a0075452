//! Talking to the CA: the [`Issuer`] the renewal schedule asks for
//! certificates (a trait, so the schedule is tested without a network),
//! and [`AcmeIssuer`], its RFC 8555 implementation on `instant-acme`.
//!
//! One order: the account (registered once, kept in `account.json`), a new
//! order for the names, each pending authorization's HTTP-01 or
//! TLS-ALPN-01 challenge published to the responders and marked ready,
//! the order polled until ready, finalized with the caller's CSR, and the
//! chain downloaded. The directory's HTTPS uses the proxy's own crypto
//! provider and trusts the system's roots, or only `ca_bundle`.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::challenges::{tls_alpn01_certificate, PendingChallenges};
use super::settings::{AcmeSettings, ChallengeKind};
use super::store::{write_atomically, StateDir};

/// Why an order did not give a certificate, and when the CA said to come
/// back (Retry-After), if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderFailure {
    pub(crate) reason: String,
    pub(crate) retry_after: Option<Duration>,
    /// The CA refused a nonce (RFC 8555 `badNonce`): nothing is wrong with
    /// the order, a new try at once usually passes.
    pub(crate) bad_nonce: bool,
}

impl OrderFailure {
    pub(crate) fn new(reason: impl Into<String>) -> OrderFailure {
        OrderFailure {
            reason: reason.into(),
            retry_after: None,
            bad_nonce: false,
        }
    }
}

/// The problem type of a refused nonce (RFC 8555 section 6.5).
const BAD_NONCE: &str = "urn:ietf:params:acme:error:badNonce";

impl From<instant_acme::Error> for OrderFailure {
    fn from(error: instant_acme::Error) -> OrderFailure {
        let retry_after = match &error {
            instant_acme::Error::Timeout(Some(at)) => {
                Some(at.saturating_duration_since(std::time::Instant::now()))
            }
            _ => None,
        };
        let bad_nonce = matches!(&error, instant_acme::Error::Api(problem)
            if problem.r#type.as_deref() == Some(BAD_NONCE));
        OrderFailure {
            reason: error.to_string(),
            retry_after,
            bad_nonce,
        }
    }
}

/// The CA's suggested renewal window (RFC 9773), as Unix times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RenewalWindow {
    pub(crate) start: i64,
    pub(crate) end: i64,
}

/// Where certificates come from.
pub(crate) trait Issuer: Send + Sync + 'static {
    /// Orders a certificate for `names` with the PKCS#10 request
    /// `csr_der`; returns the PEM chain, leaf first.
    fn issue(
        &self,
        names: &[String],
        csr_der: &[u8],
    ) -> impl Future<Output = Result<String, OrderFailure>> + Send;

    /// The CA's suggested renewal window for the leaf, if it offers ACME
    /// Renewal Information.
    fn renewal_window(
        &self,
        leaf: &CertificateDer<'static>,
    ) -> impl Future<Output = Option<RenewalWindow>> + Send;
}

/// `account.json`: the credentials and the directory they belong to.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// How long the CA gets to validate the challenges and to issue.
const ORDER_POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(500))
    .backoff(1.5)
    .timeout(Duration::from_secs(120));

/// The RFC 8555 client of one `[acme]` table.
pub(crate) struct AcmeIssuer {
    settings: AcmeSettings,
    state: StateDir,
    challenges: Arc<PendingChallenges>,
    account: tokio::sync::Mutex<Option<Account>>,
    /// The Retry-After of the CA's latest refusal (instant-acme's errors
    /// do not carry it; the HTTP client under it records it here).
    retry_after: RetryAfterCell,
}

impl AcmeIssuer {
    pub(crate) fn new(settings: AcmeSettings, challenges: Arc<PendingChallenges>) -> AcmeIssuer {
        AcmeIssuer {
            state: StateDir::new(&settings.state_dir),
            settings,
            challenges,
            account: tokio::sync::Mutex::new(None),
            retry_after: RetryAfterCell::default(),
        }
    }

    /// The account: from `account.json` if it was made for this directory,
    /// else registered now (terms of service agreed) and saved there.
    async fn account(&self) -> Result<Account, OrderFailure> {
        let mut slot = self.account.lock().await;
        if let Some(account) = &*slot {
            return Ok(account.clone());
        }
        let http = Box::new(RecordingRetryAfter {
            inner: http_client(self.settings.ca_bundle.as_deref())?,
            latest: self.retry_after.clone(),
        });
        let path = self.state.account();
        let stored = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<StoredAccount>(&bytes).ok())
            .filter(|stored| stored.directory == self.settings.directory);
        let account = match stored {
            Some(stored) => {
                Account::builder_with_http(http)
                    .from_credentials(stored.credentials)
                    .await?
            }
            None => {
                let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
                let (account, credentials) = Account::builder_with_http(http)
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.settings.directory.clone(),
                        None,
                    )
                    .await?;
                let stored = StoredAccount {
                    directory: self.settings.directory.clone(),
                    credentials,
                };
                let bytes = serde_json::to_vec_pretty(&stored)
                    .map_err(|error| OrderFailure::new(format!("account: {error}")))?;
                self.state
                    .create()
                    .and_then(|()| write_atomically(&path, &bytes, 0o600))
                    .map_err(|error| {
                        OrderFailure::new(format!("cannot save the account: {error}"))
                    })?;
                info!(
                    directory = %self.settings.directory,
                    account = %account.id(),
                    "acme: account registered"
                );
                account
            }
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    async fn order(&self, names: &[String], csr_der: &[u8]) -> Result<String, OrderFailure> {
        let account = self.account().await?;
        let identifiers: Vec<Identifier> = names
            .iter()
            .map(|name| Identifier::Dns(name.clone()))
            .collect();
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let kind = match self.settings.challenge {
            ChallengeKind::Http01 => ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        };
        // Kept until the order is over: dropping them withdraws them.
        let mut published = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            let name = authorization.identifier().to_string();
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => {
                    return Err(OrderFailure::new(format!(
                        "the authorization for {name} is {status:?}"
                    )))
                }
            }
            let mut challenge = authorization.challenge(kind.clone()).ok_or_else(|| {
                OrderFailure::new(format!(
                    "the CA offers no {} challenge for {name}",
                    self.settings.challenge.as_str()
                ))
            })?;
            let key_authorization = challenge.key_authorization();
            published.push(match self.settings.challenge {
                ChallengeKind::Http01 => self
                    .challenges
                    .publish_http01(&challenge.token, key_authorization.as_str()),
                ChallengeKind::TlsAlpn01 => {
                    let certificate =
                        tls_alpn01_certificate(&name, key_authorization.digest().as_ref())
                            .map_err(OrderFailure::new)?;
                    self.challenges.publish_tls_alpn01(&name, certificate)
                }
            });
            challenge.set_ready().await?;
        }
        let status = order.poll_ready(&ORDER_POLL).await?;
        if status != OrderStatus::Ready {
            let mut reasons = Vec::new();
            let mut authorizations = order.authorizations();
            while let Some(Ok(authorization)) = authorizations.next().await {
                for challenge in &authorization.challenges {
                    if let Some(problem) = &challenge.error {
                        reasons.push(format!("{}: {problem}", authorization.identifier()));
                    }
                }
            }
            return Err(OrderFailure::new(format!(
                "the order is {status:?}{}{}",
                if reasons.is_empty() { "" } else { ": " },
                reasons.join("; ")
            )));
        }
        order.finalize_csr(csr_der).await?;
        let chain = order.poll_certificate(&ORDER_POLL).await?;
        drop(published);
        Ok(chain)
    }
}

impl Issuer for AcmeIssuer {
    async fn issue(&self, names: &[String], csr_der: &[u8]) -> Result<String, OrderFailure> {
        self.retry_after.take();
        self.order(names, csr_der).await.map_err(|mut failure| {
            if let Some(wait) = self.retry_after.take() {
                failure.retry_after = Some(failure.retry_after.map_or(wait, |own| own.max(wait)));
            }
            failure
        })
    }

    async fn renewal_window(&self, leaf: &CertificateDer<'static>) -> Option<RenewalWindow> {
        let identifier = CertificateIdentifier::try_from(leaf).ok()?;
        let account = self.account().await.ok()?;
        let (info, _) = account.renewal_info(&identifier).await.ok()?;
        Some(RenewalWindow {
            start: info.suggested_window.start.unix_timestamp(),
            end: info.suggested_window.end.unix_timestamp(),
        })
    }
}

/// Where the HTTP client under instant-acme leaves the Retry-After of the
/// CA's latest refusal, as the time to wait from when it was read.
#[derive(Clone, Default)]
struct RetryAfterCell(Arc<std::sync::Mutex<Option<std::time::SystemTime>>>);

impl RetryAfterCell {
    fn record(&self, until: std::time::SystemTime) {
        if let Ok(mut latest) = self.0.lock() {
            *latest = Some(until);
        }
    }

    /// The wait still left of the latest Retry-After, and forgets it.
    fn take(&self) -> Option<Duration> {
        let until = self.0.lock().ok()?.take()?;
        until.duration_since(std::time::SystemTime::now()).ok()
    }
}

/// The directory's HTTP client, recording the `Retry-After` of every
/// refusal (4xx/5xx: rate limits, a CA in maintenance) so a failed order
/// waits at least that long before the next (RFC 8555 section 6.6).
struct RecordingRetryAfter {
    inner: Box<dyn HttpClient>,
    latest: RetryAfterCell,
}

impl HttpClient for RecordingRetryAfter {
    fn request(
        &self,
        request: hyper::Request<instant_acme::BodyWrapper<bytes::Bytes>>,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Result<instant_acme::BytesResponse, instant_acme::Error>> + Send>,
    > {
        let response = self.inner.request(request);
        let latest = self.latest.clone();
        Box::pin(async move {
            let response = response.await?;
            let status = response.parts.status;
            if status.is_client_error() || status.is_server_error() {
                if let Some(until) = retry_after(&response.parts.headers) {
                    latest.record(until);
                }
            }
            Ok(response)
        })
    }
}

/// `Retry-After` as a point in time: delay-seconds or an HTTP-date
/// (RFC 9110 section 10.2.3).
fn retry_after(headers: &hyper::HeaderMap) -> Option<std::time::SystemTime> {
    let value = headers
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    match value.parse::<u64>() {
        Ok(seconds) => std::time::SystemTime::now().checked_add(Duration::from_secs(seconds)),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

/// HTTPS to the directory with the proxy's crypto provider: trusting only
/// the certificates in `ca_bundle` when given, else the system's roots.
fn http_client(ca_bundle: Option<&Path>) -> Result<Box<dyn HttpClient>, OrderFailure> {
    use hyper_rustls::HttpsConnectorBuilder;
    use rustls_pki_types::pem::PemObject;
    let provider = crate::tls::provider::provider();
    let builder = match ca_bundle {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certificates = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|error| {
                    OrderFailure::new(format!("ca_bundle {}: {error}", path.display()))
                })?;
            let (added, _) = roots.add_parsable_certificates(certificates);
            if added == 0 {
                return Err(OrderFailure::new(format!(
                    "ca_bundle {}: no usable certificate",
                    path.display()
                )));
            }
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(crate::tls::provider::PROTOCOL_VERSIONS)
                .map_err(|error| OrderFailure::new(error.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            HttpsConnectorBuilder::new().with_tls_config(config)
        }
        None => HttpsConnectorBuilder::new()
            .with_provider_and_platform_verifier(provider)
            .map_err(|error| OrderFailure::new(format!("system roots: {error}")))?,
    };
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let connector = builder.https_only().enable_http1().wrap_connector(http);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, instant_acme::BodyWrapper<bytes::Bytes>>(connector);
    Ok(Box::new(client))
}

#[cfg(test)]
mod retry_after_tests {
    use super::*;

    /// Answers every request with `status` and these headers.
    struct Answering {
        status: u16,
        retry_after: Option<String>,
    }

    impl HttpClient for Answering {
        fn request(
            &self,
            _: hyper::Request<instant_acme::BodyWrapper<bytes::Bytes>>,
        ) -> std::pin::Pin<
            Box<
                dyn Future<Output = Result<instant_acme::BytesResponse, instant_acme::Error>>
                    + Send,
            >,
        > {
            let mut response = hyper::Response::builder().status(self.status);
            if let Some(value) = &self.retry_after {
                response = response.header(hyper::header::RETRY_AFTER, value.as_str());
            }
            let (parts, ()) = response.body(()).expect("response").into_parts();
            Box::pin(async move {
                Ok(instant_acme::BytesResponse {
                    parts,
                    body: Box::new(bytes::Bytes::new()),
                })
            })
        }
    }

    async fn recorded(status: u16, retry_after: Option<&str>) -> Option<Duration> {
        let latest = RetryAfterCell::default();
        let client = RecordingRetryAfter {
            inner: Box::new(Answering {
                status,
                retry_after: retry_after.map(str::to_string),
            }),
            latest: latest.clone(),
        };
        let request = hyper::Request::builder()
            .uri("https://ca.example/acme/new-order")
            .body(instant_acme::BodyWrapper::default())
            .expect("request");
        client.request(request).await.expect("answer");
        latest.take()
    }

    #[tokio::test]
    async fn a_refusal_with_retry_after_is_recorded_in_seconds_or_as_a_date() {
        let seconds = recorded(429, Some("120")).await.expect("recorded");
        assert!(seconds > Duration::from_secs(118) && seconds <= Duration::from_secs(120));
        let in_an_hour =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
        let date = recorded(503, Some(&in_an_hour)).await.expect("recorded");
        assert!(date > Duration::from_secs(3590) && date <= Duration::from_secs(3600));
    }

    #[tokio::test]
    async fn success_garbage_and_the_past_are_not_waits() {
        assert_eq!(recorded(200, Some("120")).await, None);
        assert_eq!(recorded(429, Some("soon")).await, None);
        assert_eq!(recorded(429, None).await, None);
        assert_eq!(
            recorded(429, Some("Fri, 31 Dec 1999 23:59:59 GMT")).await,
            None
        );
    }

    #[test]
    fn taking_forgets() {
        let cell = RetryAfterCell::default();
        cell.record(std::time::SystemTime::now() + Duration::from_secs(60));
        assert!(cell.take().is_some());
        assert_eq!(cell.take(), None);
    }
}
