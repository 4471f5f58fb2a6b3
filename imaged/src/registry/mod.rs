//! Registry client: manifests, configs and layer streams over the distribution API, through
//! the hosts that hosts.toml lists, with basic and bearer-token authentication.
//!
//! Written on reqwest rather than oci-client because hosts.toml needs per-host TLS, client
//! certificates, headers, path-prefixed mirrors and fallback across hosts.

pub mod auth;
pub mod hosts;

use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::reference::{DOCKER_HUB, DOCKER_HUB_API, Reference};
use auth::{Challenge, Credentials};
use bytes::Bytes;
use hosts::Host;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_RANGE, CONTENT_TYPE, RANGE, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The broad class of a failed registry operation, which decides the gRPC code. When every
/// host fails, the greatest kind in this order speaks for them all: a timeout or an
/// oversized body says more about the registry than a host that could not be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureKind {
    /// Could not connect, TLS failed, timed out.
    Unavailable,
    /// 404 / unknown manifest or blob.
    NotFound,
    /// Content did not match its digest.
    Corrupt,
    /// 401 / 403 after authenticating.
    Unauthenticated,
    /// Any other HTTP status.
    Failed,
    /// A body beyond what imaged accepts for its kind of object.
    TooLarge,
    /// A request did not complete within its deadline.
    TimedOut,
}

/// One host's failure.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The URL tried.
    pub url: String,
    /// Class of failure.
    pub kind: FailureKind,
    /// What happened.
    pub detail: String,
}

/// Errors of the registry client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// hosts.toml could not be used.
    #[error(transparent)]
    Hosts(#[from] hosts::HostsError),
    /// No configured host may do what was asked.
    #[error("no host for {registry} has the {capability} capability (check hosts.toml)")]
    NoHosts {
        /// Registry.
        registry: String,
        /// `resolve` or `pull`.
        capability: &'static str,
    },
    /// Every host failed.
    #[error("{what}: {}", Attempts(.attempts))]
    Fetch {
        /// What was fetched (names the reference or digest).
        what: String,
        /// The most telling failure across hosts.
        kind: FailureKind,
        /// Every host tried, in order.
        attempts: Vec<Attempt>,
    },
}

struct Attempts<'a>(&'a [Attempt]);

impl fmt::Display for Attempts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", a.url, a.detail)?;
        }
        Ok(())
    }
}

/// A fetched manifest or index.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Digest of the bytes.
    pub digest: Digest,
    /// `Content-Type` as sent.
    pub content_type: Option<String>,
    /// The document.
    pub bytes: Bytes,
}

/// How long the registry may take, each `None` when turned off.
#[derive(Debug, Clone, Copy, Default)]
pub struct Deadlines {
    /// A connection that delivers nothing for this long fails (the next host is tried).
    pub stall: Option<Duration>,
    /// A manifest, index, config or token exchange, or a layer's response head, must be
    /// complete within this: a registry that dribbles bytes is never silent for long.
    pub request: Option<Duration>,
    /// Layer bodies must keep up this rate.
    pub min_rate: Option<MinRate>,
}

/// A rate a layer body keeps up over every window of waiting for the network; time spent
/// while imaged itself is busy with the bytes is not counted against the registry.
#[derive(Debug, Clone, Copy)]
pub struct MinRate {
    /// Bytes per second.
    pub bytes_per_second: u64,
    /// The span each measurement covers.
    pub window: Duration,
}

/// Shared HTTP clients and token cache; one per daemon.
#[derive(Debug)]
pub struct Registry {
    config_path: String,
    deadlines: Deadlines,
    metrics: Arc<Metrics>,
    clients: Mutex<HashMap<String, reqwest::Client>>,
    tokens: Mutex<HashMap<String, String>>,
}

impl Registry {
    /// A client reading hosts.toml files under `config_path`, holding registries to
    /// `deadlines`, counting what it receives in `metrics`.
    pub fn new(config_path: &str, deadlines: Deadlines, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            config_path: config_path.to_string(),
            deadlines,
            metrics,
            clients: Mutex::default(),
            tokens: Mutex::default(),
        })
    }

    /// The hosts to try for a registry, re-read from disk each time.
    pub fn hosts(&self, registry: &str) -> Result<Vec<Host>, RegistryError> {
        Ok(hosts::hosts_for(&self.config_path, registry)?)
    }

    /// Starts the work for one pull of `reference`.
    pub fn session(
        self: &Arc<Self>,
        reference: &Reference,
        credentials: Credentials,
    ) -> Result<Session, RegistryError> {
        // TLS files are read once per pull; a host whose files are unusable fails only when
        // it is tried, so the hosts after it still get their chance.
        let endpoints = self
            .hosts(&reference.registry)?
            .into_iter()
            .map(|host| Endpoint {
                client: self.client(&host),
                host,
            })
            .collect();
        Ok(Session {
            registry: self.clone(),
            reference: reference.clone(),
            endpoints: Arc::new(endpoints),
            credentials,
        })
    }

    /// The HTTP client for a host's TLS settings. Clients are cached by the *contents* of
    /// the CA and certificate files, so replacing a file takes effect on the next pull.
    fn client(&self, host: &Host) -> Result<reqwest::Client, String> {
        let tls = TlsFiles::read(host)?;
        let key = format!(
            "{}|{:?}|{}",
            host.skip_verify,
            host.dial_timeout,
            hex::encode(tls.fingerprint())
        );
        if let Some(client) = self.clients.lock().expect("client cache").get(&key) {
            return Ok(client.clone());
        }
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("imaged/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(host.dial_timeout)
            .tls_danger_accept_invalid_certs(host.skip_verify);
        if let Some(timeout) = self.deadlines.stall {
            builder = builder.read_timeout(timeout);
        }
        for (path, pem) in &tls.cas {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("ca {}: {e}", path.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        for (path, pem) in &tls.identities {
            let identity = reqwest::Identity::from_pem(pem)
                .map_err(|e| format!("client certificate {}: {e}", path.display()))?;
            builder = builder.identity(identity);
        }
        let client = builder.build().map_err(|e| format!("TLS setup: {e}"))?;
        self.clients
            .lock()
            .expect("client cache")
            .insert(key, client.clone());
        Ok(client)
    }
}

/// The PEM files a host's TLS settings name, read from disk.
struct TlsFiles {
    cas: Vec<(std::path::PathBuf, Vec<u8>)>,
    /// Certificate and key concatenated, per client certificate.
    identities: Vec<(std::path::PathBuf, Vec<u8>)>,
}

impl TlsFiles {
    fn read(host: &Host) -> Result<Self, String> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path).map_err(|e| format!("reading {what} {}: {e}", path.display()))
        };
        let mut cas = Vec::new();
        for ca in &host.ca {
            cas.push((ca.clone(), read(ca, "ca")?));
        }
        let mut identities = Vec::new();
        for (cert, key) in &host.client {
            let mut pem = read(cert, "client certificate")?;
            if let Some(key) = key {
                pem.extend(read(key, "client key")?);
            }
            identities.push((cert.clone(), pem));
        }
        Ok(Self { cas, identities })
    }

    fn fingerprint(&self) -> impl AsRef<[u8]> {
        let mut hasher = Sha256::new();
        for (_, pem) in self.cas.iter().chain(&self.identities) {
            hasher.update((pem.len() as u64).to_le_bytes());
            hasher.update(pem);
        }
        hasher.finalize()
    }
}

/// Registry access for one pull: the reference, its hosts and the caller's credentials.
#[derive(Debug, Clone)]
pub struct Session {
    registry: Arc<Registry>,
    reference: Reference,
    endpoints: Arc<Vec<Endpoint>>,
    credentials: Credentials,
}

/// A host with the HTTP client made for its TLS settings (or why none could be made).
#[derive(Debug, Clone)]
struct Endpoint {
    host: Host,
    client: Result<reqwest::Client, String>,
}

enum Object<'a> {
    Manifest(&'a str),
    Blob(&'a Digest),
}

impl Session {
    /// Resolves the reference's tag or digest to a manifest or index.
    pub async fn resolve(&self) -> Result<Fetched, RegistryError> {
        let object = self.reference.object().to_string();
        let expected = self.reference.digest.clone();
        // A digest in the reference comes without a size: the manifest limit bounds the read.
        self.fetch_document(&object, expected.as_ref(), None, expected.is_none())
            .await
    }

    /// Fetches a manifest by digest, of the `size` its descriptor declares.
    pub async fn manifest(&self, digest: &Digest, size: u64) -> Result<Fetched, RegistryError> {
        self.fetch_document(digest.as_str(), Some(digest), Some(size), false)
            .await
    }

    /// Fetches a small blob (the config) whole, verifying its digest and the `size` its
    /// descriptor declares; `limit` is the most imaged accepts for such a blob.
    pub async fn small_blob(
        &self,
        digest: &Digest,
        size: u64,
        limit: Limit,
    ) -> Result<Bytes, RegistryError> {
        let what = format!("blob {digest} of {}", self.reference);
        self.each_host(&what, false, |endpoint| async move {
            let response = self.get(&endpoint, Object::Blob(digest), None, 0).await?;
            let url = response.url().to_string();
            let bytes = read_limited(response, limit, Some(size)).await?;
            self.count(&endpoint.host, &bytes);
            verify(&bytes, digest, &url)?;
            Ok(bytes)
        })
        .await
    }

    /// Opens a streaming GET of a blob from byte `from` on (0: the whole blob; more: a
    /// download that broke off); the caller verifies what it reads. A registry that ignores
    /// `Range` sends the whole blob, and the body skips what was already received; one that
    /// answers another range is refused.
    pub async fn blob_from(&self, digest: &Digest, from: u64) -> Result<BlobBody, RegistryError> {
        let what = format!("blob {digest} of {}", self.reference);
        let (response, counted_as) = self
            .each_host(&what, false, |endpoint| async move {
                let response = self
                    .get(&endpoint, Object::Blob(digest), None, from)
                    .await?;
                check_range(&response, from)?;
                Ok((response, endpoint.host.authority))
            })
            .await?;
        let host = response.url().authority().to_string();
        let skip = match response.status() {
            StatusCode::PARTIAL_CONTENT => 0,
            _ => from,
        };
        Ok(BlobBody {
            response,
            host,
            counted_as,
            metrics: self.registry.metrics.clone(),
            skip,
            pace: self.registry.deadlines.min_rate.map(Pace::new),
        })
    }

    async fn fetch_document(
        &self,
        object: &str,
        expected: Option<&Digest>,
        size: Option<u64>,
        by_tag: bool,
    ) -> Result<Fetched, RegistryError> {
        let what = if by_tag || self.reference.digest.as_ref() == expected {
            format!("manifest {}", self.reference)
        } else {
            format!("manifest {object} of {}", self.reference.name())
        };
        self.each_host(&what, by_tag, |endpoint| async move {
            let response = self
                .get(
                    &endpoint,
                    Object::Manifest(object),
                    Some(crate::manifest::ACCEPT),
                    0,
                )
                .await?;
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let url = response.url().to_string();
            let bytes = read_limited(response, MANIFEST_LIMIT, size).await?;
            self.count(&endpoint.host, &bytes);
            let digest = match expected {
                Some(d) => {
                    verify(&bytes, d, &url)?;
                    d.clone()
                }
                None => Digest::of(&bytes),
            };
            Ok(Fetched {
                digest,
                content_type,
                bytes,
            })
        })
        .await
    }

    /// Counts bytes by the host of hosts.toml they were asked of, not where a redirect
    /// took the request (a CDN's many names).
    fn count(&self, host: &Host, bytes: &[u8]) {
        self.registry
            .metrics
            .fetched(&host.authority, bytes.len() as u64);
    }

    async fn each_host<T, F, Fut>(
        &self,
        what: &str,
        resolving: bool,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Endpoint) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let candidates: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| {
                let caps = e.host.capabilities;
                caps.pull && (!resolving || caps.resolve)
            })
            .collect();
        if candidates.is_empty() {
            return Err(RegistryError::NoHosts {
                registry: self.reference.registry.clone(),
                capability: if resolving { "resolve" } else { "pull" },
            });
        }
        let mut attempts = Vec::new();
        for endpoint in candidates {
            let outcome = match self.registry.deadlines.request {
                Some(deadline) => tokio::time::timeout(deadline, attempt(endpoint.clone()))
                    .await
                    .unwrap_or_else(|_| Err(late(&endpoint.host, deadline))),
                None => attempt(endpoint.clone()).await,
            };
            match outcome {
                Ok(value) => return Ok(value),
                Err(failure) => {
                    tracing::debug!(url = %failure.url, detail = %failure.detail, "registry host failed");
                    attempts.push(failure);
                }
            }
        }
        let kind = attempts
            .iter()
            .map(|a| a.kind)
            .max()
            .unwrap_or(FailureKind::Failed);
        Err(RegistryError::Fetch {
            what: what.to_string(),
            kind,
            attempts,
        })
    }

    fn url(&self, host: &Host, object: &Object<'_>) -> reqwest::Url {
        let (kind, name) = match object {
            Object::Manifest(name) => ("manifests", *name),
            Object::Blob(digest) => ("blobs", digest.as_str()),
        };
        let base = host.base.as_str().trim_end_matches('/');
        let mut url = reqwest::Url::parse(&format!(
            "{base}/{}/{kind}/{name}",
            self.reference.repository
        ))
        .expect("valid registry URL");
        if !self.is_upstream(host) {
            url.query_pairs_mut()
                .append_pair("ns", &self.reference.registry);
        }
        url
    }

    fn is_upstream(&self, host: &Host) -> bool {
        host.authority == self.reference.registry
            || (self.reference.registry == DOCKER_HUB && host.authority == DOCKER_HUB_API)
    }

    /// Credentials may go over TLS, or in clear only to this machine.
    fn may_send_credentials(url: &reqwest::Url) -> bool {
        url.scheme() == "https" || url.host_str().is_some_and(hosts::is_loopback)
    }

    /// GETs `object`; a nonzero `from` asks for the bytes from that offset on (`Range`).
    async fn get(
        &self,
        endpoint: &Endpoint,
        object: Object<'_>,
        accept: Option<&str>,
        from: u64,
    ) -> Result<Response, Attempt> {
        let host = &endpoint.host;
        let url = self.url(host, &object);
        let fail = |kind, detail: String| Attempt {
            url: url.to_string(),
            kind,
            detail,
        };
        let client = endpoint
            .client
            .clone()
            .map_err(|e| fail(FailureKind::Unavailable, e))?;
        let scope = format!("repository:{}:pull", self.reference.repository);
        let cache_key = format!("{}|{scope}|{}", host.authority, self.credential_id());
        let mut authorization = self
            .registry
            .tokens
            .lock()
            .expect("token cache")
            .get(&cache_key)
            .cloned();
        for round in 0..2 {
            let mut request = client.request(Method::GET, url.clone());
            for (name, value) in &host.headers {
                request = request.header(name, value);
            }
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some(auth) = &authorization {
                request = request.header(AUTHORIZATION, auth);
            }
            if from > 0 {
                request = request.header(RANGE, format!("bytes={from}-"));
            }
            let response = request
                .send()
                .await
                .map_err(|e| fail(FailureKind::Unavailable, plumbing::error_chain(&e)))?;
            let status = response.status();
            if status.is_success() {
                if round == 1
                    && let Some(auth) = authorization
                {
                    self.registry
                        .tokens
                        .lock()
                        .expect("token cache")
                        .insert(cache_key, auth);
                }
                return Ok(response);
            }
            if status == StatusCode::UNAUTHORIZED && round == 0 {
                let challenge = response
                    .headers()
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(auth::parse_challenge);
                let Some(challenge) = challenge else {
                    return Err(fail(
                        FailureKind::Unauthenticated,
                        "401 Unauthorized without a usable WWW-Authenticate challenge".into(),
                    ));
                };
                authorization = Some(
                    self.authorize(&client, &url, challenge, &scope)
                        .await
                        .map_err(|detail| fail(FailureKind::Unauthenticated, detail))?,
                );
                continue;
            }
            return Err(status_failure(status, &url, response).await);
        }
        Err(fail(
            FailureKind::Unauthenticated,
            "401 Unauthorized: credentials were refused".into(),
        ))
    }

    fn credential_id(&self) -> String {
        let text = match &self.credentials {
            Credentials::Anonymous => return "anonymous".into(),
            Credentials::Basic { username, password } => format!("b{username}:{password}"),
            Credentials::Identity(t) => format!("i{t}"),
            Credentials::Token(t) => format!("t{t}"),
        };
        hex::encode(&Sha256::digest(text.as_bytes())[..16])
    }

    async fn authorize(
        &self,
        client: &reqwest::Client,
        url: &reqwest::Url,
        challenge: Challenge,
        default_scope: &str,
    ) -> Result<String, String> {
        let credentials = if Self::may_send_credentials(url) {
            &self.credentials
        } else {
            &Credentials::Anonymous
        };
        match (challenge, credentials) {
            (_, Credentials::Token(token)) => Ok(format!("Bearer {token}")),
            (Challenge::Basic, Credentials::Basic { username, password }) => {
                use base64::Engine as _;
                let encoded = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{password}"));
                Ok(format!("Basic {encoded}"))
            }
            (Challenge::Basic, _) => Err(
                "401 Unauthorized: registry asks for basic auth and no credentials were given"
                    .into(),
            ),
            (
                Challenge::Bearer {
                    realm,
                    service,
                    scope,
                    ..
                },
                credentials,
            ) => {
                let scope = scope.unwrap_or_else(|| default_scope.to_string());
                let token =
                    fetch_token(client, &realm, service.as_deref(), &scope, credentials).await?;
                Ok(format!("Bearer {token}"))
            }
        }
    }
}

fn late(host: &Host, deadline: Duration) -> Attempt {
    Attempt {
        url: host.base.to_string(),
        kind: FailureKind::TimedOut,
        detail: format!(
            "{} gave no complete answer within {deadline:?} (image_pull_request_timeout)",
            host.authority
        ),
    }
}

/// A 206 answer must run from where it was asked to start to the blob's end.
fn check_range(response: &Response, from: u64) -> Result<(), Attempt> {
    if response.status() != StatusCode::PARTIAL_CONTENT {
        return Ok(());
    }
    let range = response
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let bounds = range.strip_prefix("bytes ").and_then(|r| {
        let (span, total) = r.split_once('/')?;
        let (first, last) = span.split_once('-')?;
        let number = |s: &str| s.parse::<u64>().ok();
        Some((number(first)?, number(last)?, number(total)?))
    });
    if let Some((first, last, total)) = bounds
        && from > 0
        && first == from
        && last + 1 == total
    {
        return Ok(());
    }
    Err(Attempt {
        url: response.url().to_string(),
        kind: FailureKind::Corrupt,
        detail: format!("asked for bytes {from}- and got Content-Range {range:?}"),
    })
}

/// Why a layer body stopped short.
#[derive(Debug)]
pub struct BodyError {
    /// What happened, naming the host.
    pub detail: String,
    /// Whether asking again for the rest may help: a connection that broke, not a
    /// registry too slow for `image_pull_min_rate`.
    pub resumable: bool,
}

/// A layer body as it arrives, held to the minimum rate when one is set.
#[derive(Debug)]
pub struct BlobBody {
    response: Response,
    /// Where the body comes from, for messages.
    host: String,
    /// The hosts.toml host it was asked of, for the metrics.
    counted_as: String,
    metrics: Arc<Metrics>,
    /// Bytes at the start that the caller already has (a `Range` the registry ignored).
    skip: u64,
    pace: Option<Pace>,
}

impl BlobBody {
    /// The next piece of the body, `None` at its end; a failure names the host.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        loop {
            let Some(mut chunk) = self.next().await? else {
                return Ok(None);
            };
            self.metrics.fetched(&self.counted_as, chunk.len() as u64);
            let skipped = self.skip.min(chunk.len() as u64);
            self.skip -= skipped;
            let _ = chunk.split_to(skipped as usize);
            if !chunk.is_empty() {
                return Ok(Some(chunk));
            }
        }
    }

    async fn next(&mut self) -> Result<Option<Bytes>, BodyError> {
        let broken = |host: &str, e: &reqwest::Error| BodyError {
            detail: failed(host, e),
            resumable: true,
        };
        let Some(pace) = &mut self.pace else {
            return self
                .response
                .chunk()
                .await
                .map_err(|e| broken(&self.host, &e));
        };
        loop {
            let left = pace.rate.window.saturating_sub(pace.waited);
            let started = Instant::now();
            let next = tokio::time::timeout(left, self.response.chunk()).await;
            pace.waited += started.elapsed();
            let next = match next {
                Ok(next) => Some(next.map_err(|e| broken(&self.host, &e))?),
                Err(_) => None,
            };
            if let Some(Some(chunk)) = &next {
                pace.received += chunk.len() as u64;
            }
            if pace.waited >= pace.rate.window {
                pace.check(&self.host).map_err(|detail| BodyError {
                    detail,
                    resumable: false,
                })?;
            }
            if let Some(next) = next {
                return Ok(next);
            }
        }
    }
}

fn failed(host: &str, error: &reqwest::Error) -> String {
    format!("{host}: {}", plumbing::error_chain(error))
}

/// What a layer body delivered in the current window.
#[derive(Debug)]
struct Pace {
    rate: MinRate,
    waited: Duration,
    received: u64,
}

impl Pace {
    fn new(rate: MinRate) -> Self {
        Self {
            rate,
            waited: Duration::ZERO,
            received: 0,
        }
    }

    /// Ends a window: fails if it fell short, else starts the next.
    fn check(&mut self, host: &str) -> Result<(), String> {
        let needed = self.rate.bytes_per_second as f64 * self.waited.as_secs_f64();
        if (self.received as f64) < needed {
            return Err(format!(
                "{host} sent {} bytes in {:?}, below image_pull_min_rate of {} bytes/s",
                self.received, self.waited, self.rate.bytes_per_second
            ));
        }
        self.waited = Duration::ZERO;
        self.received = 0;
        Ok(())
    }
}

async fn fetch_token(
    client: &reqwest::Client,
    realm: &str,
    service: Option<&str>,
    scope: &str,
    credentials: &Credentials,
) -> Result<String, String> {
    let realm_url =
        reqwest::Url::parse(realm).map_err(|e| format!("token realm {realm:?}: {e}"))?;
    if !matches!(realm_url.scheme(), "http" | "https") {
        return Err(format!("token realm {realm:?} is not http(s)"));
    }
    let credentials = if Session::may_send_credentials(&realm_url) {
        credentials
    } else {
        &Credentials::Anonymous
    };
    let mut query = vec![("scope", scope)];
    if let Some(service) = service {
        query.push(("service", service));
    }
    let request = match credentials {
        Credentials::Identity(refresh) => {
            let mut form = vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.as_str()),
                ("client_id", "imaged"),
            ];
            form.extend(query.iter().copied());
            client.post(realm_url).form(&form)
        }
        Credentials::Basic { username, password } => client
            .get(realm_url)
            .query(&query)
            .basic_auth(username, Some(password)),
        _ => client.get(realm_url).query(&query),
    };
    let response = request
        .send()
        .await
        .map_err(|e| format!("token request to {realm}: {}", plumbing::error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "token request to {realm}: HTTP {status}: credentials refused"
        ));
    }
    let body = read_limited(response, TOKEN_LIMIT, None)
        .await
        .map_err(|a| format!("token response from {realm}: {}", a.detail))?;
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
    }
    let parsed: TokenResponse =
        serde_json::from_slice(&body).map_err(|e| format!("token response from {realm}: {e}"))?;
    parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("token response from {realm} holds no token"))
}

async fn status_failure(status: StatusCode, url: &reqwest::Url, response: Response) -> Attempt {
    let kind = match status {
        StatusCode::NOT_FOUND => FailureKind::NotFound,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => FailureKind::Unauthenticated,
        _ => FailureKind::Failed,
    };
    let body = read_limited(response, ERROR_BODY_LIMIT, None)
        .await
        .unwrap_or_default();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string));
    let detail = match code {
        Some(code) => format!("HTTP {status} ({code})"),
        None => format!("HTTP {status}"),
    };
    Attempt {
        url: url.to_string(),
        kind,
        detail: if kind == FailureKind::NotFound {
            format!("{detail}: not found")
        } else {
            detail
        },
    }
}

/// The most imaged reads of a body of some kind, named for messages.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// Bytes.
    pub bytes: u64,
    /// What the limit is for, as messages name it.
    pub of: &'static str,
}

/// Manifests and indexes, by tag or digest (containerd's bound).
const MANIFEST_LIMIT: Limit = Limit {
    bytes: crate::manifest::MAX_MANIFEST,
    of: "manifests and indexes",
};
/// Image configs, which a manifest's descriptor sizes as well.
pub const CONFIG_LIMIT: Limit = Limit {
    bytes: crate::manifest::MAX_CONFIG,
    of: "image configs",
};
const TOKEN_LIMIT: Limit = Limit {
    bytes: 1 << 20,
    of: "token responses",
};
const ERROR_BODY_LIMIT: Limit = Limit {
    bytes: 4096,
    of: "error bodies",
};

/// Reads a whole body of at most `limit` bytes and, when a descriptor declares its size,
/// exactly `declared` bytes: reading stops as soon as the body is longer than either, so a
/// body that never ends costs no more than that.
async fn read_limited(
    mut response: Response,
    limit: Limit,
    declared: Option<u64>,
) -> Result<Bytes, Attempt> {
    let url = response.url().to_string();
    let fail = |kind, detail| Attempt {
        url: url.clone(),
        kind,
        detail,
    };
    let too_large = |what: String| {
        let detail = format!(
            "{what}, beyond the limit of {} bytes for {}",
            limit.bytes, limit.of
        );
        fail(FailureKind::TooLarge, detail)
    };
    let longer = |size: u64| {
        let detail = format!("the body is longer than the {size} bytes its descriptor declares");
        fail(FailureKind::Corrupt, detail)
    };
    match (declared, response.content_length()) {
        (Some(size), _) if size > limit.bytes => {
            return Err(too_large(format!("its descriptor declares {size} bytes")));
        }
        (Some(size), Some(length)) if length > size => return Err(longer(size)),
        (_, Some(length)) if length > limit.bytes => {
            return Err(too_large(format!("the body has {length} bytes")));
        }
        _ => {}
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| fail(FailureKind::Unavailable, plumbing::error_chain(&e)))?
    {
        body.extend_from_slice(&chunk);
        let read = body.len() as u64;
        match declared {
            Some(size) if read > size => return Err(longer(size)),
            _ if read > limit.bytes => {
                let what = format!("the body has more than {} bytes", limit.bytes);
                return Err(too_large(what));
            }
            _ => {}
        }
    }
    match declared {
        Some(size) if (body.len() as u64) < size => {
            let detail = format!(
                "the body ended after {} of the {size} bytes its descriptor declares",
                body.len()
            );
            Err(fail(FailureKind::Corrupt, detail))
        }
        _ => Ok(body.into()),
    }
}

fn verify(bytes: &[u8], expected: &Digest, url: &str) -> Result<(), Attempt> {
    let actual = Digest::of(bytes);
    if &actual == expected {
        Ok(())
    } else {
        Err(Attempt {
            url: url.to_string(),
            kind: FailureKind::Corrupt,
            detail: format!("digest mismatch: expected {expected}, got {actual}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_travel_over_tls_or_to_this_machine_only() {
        let allowed = |url: &str| Session::may_send_credentials(&reqwest::Url::parse(url).unwrap());
        assert!(allowed("https://registry.example/v2/x"));
        assert!(allowed("https://192.0.2.7:5000/v2/x"));
        assert!(allowed("http://127.0.0.1:5000/v2/x"));
        assert!(allowed("http://localhost:5000/v2/x"));
        assert!(allowed("http://[::1]:5000/v2/x"));
        assert!(!allowed("http://192.0.2.7:5000/v2/x"));
        assert!(!allowed("http://mirror.example/v2/x"));
    }
}
