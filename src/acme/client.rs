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
}

impl AcmeIssuer {
    pub(crate) fn new(settings: AcmeSettings, challenges: Arc<PendingChallenges>) -> AcmeIssuer {
        AcmeIssuer {
            state: StateDir::new(&settings.state_dir),
            settings,
            challenges,
            account: tokio::sync::Mutex::new(None),
        }
    }

    /// The account: from `account.json` if it was made for this directory,
    /// else registered now (terms of service agreed) and saved there.
    async fn account(&self) -> Result<Account, OrderFailure> {
        let mut slot = self.account.lock().await;
        if let Some(account) = &*slot {
            return Ok(account.clone());
        }
        let http = http_client(self.settings.ca_bundle.as_deref())?;
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
        self.order(names, csr_der).await
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
