//! HTTP(S) origin reads with Range requests.
//!
//! Origins are protected by reading them in disjoint piece ranges
//! ([`split_ranges`]) from a bounded number of nodes, so the origin serves
//! about one copy of the content whatever the cluster size. Each range read
//! checks the server really honoured the range and sent exactly the bytes
//! asked for; transient failures (timeouts, connection errors, 5xx, 429) are
//! retried with exponential backoff and jitter, permanent ones (4xx) are not.
//!
//! Error messages name the URL without its query string or credentials
//! (presigned URLs carry signatures there) and never include header values.
//!
//! Version pinning: the first response (HEAD or range GET) gives the
//! origin's validator — a strong `ETag`, else `Last-Modified` — unless the
//! operator already pinned one ([`OriginClient::pin_version`]). Every range
//! read then carries `If-Match` (or `If-Unmodified-Since`) and its response
//! validator is compared: a `412`, or a response naming another version, is
//! [`OriginError::Changed`], never retried, so bytes of two versions are
//! never mixed. An origin without validators is read unpinned (logged); the
//! hash authorities' root agreement is then the only guard.
//!
//! Private origins: unless [`OriginOptions::allow_private`], every address
//! the client connects to (the URL's IP literal, each DNS answer, every
//! redirect hop) is checked and loopback, link-local, unspecified and cloud
//! metadata addresses are refused (`OriginForbidden`): no SSRF from nodes.
//! Redirects are bounded ([`MAX_REDIRECTS`]), never downgrade https to http
//! and never carry credentials in the URL.
//!
//! An origin that ignores Range requests is read whole, in one streaming
//! GET, by a single reader ([`whole`]).

pub mod manifest;
mod tree;
mod whole;

pub use tree::{Origin, TreeOrigin};
pub use whole::WholeBody;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use tracing::{debug, warn};

use crate::content::Layout;
use crate::metrics::Metrics;

/// Timeouts and retry policy of an origin client.
#[derive(Debug, Clone)]
pub struct OriginOptions {
    /// Time to establish a connection (TCP + TLS).
    pub connect_timeout: Duration,
    /// Longest wait for response headers or for the next body bytes.
    pub read_timeout: Duration,
    /// Retries after the first attempt, for transient failures only.
    pub max_retries: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Allow origins (and redirect targets) on loopback, link-local,
    /// unspecified and metadata addresses. Off by default; the agent's
    /// `--allow-private-origins` turns it on (local clusters, tests).
    pub allow_private: bool,
}

impl Default for OriginOptions {
    fn default() -> Self {
        OriginOptions {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            max_retries: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            allow_private: false,
        }
    }
}

/// Most redirect hops followed.
pub const MAX_REDIRECTS: usize = 5;

/// Whether connecting to `ip` is refused when private origins are not
/// allowed: loopback, unspecified, link-local, and the cloud metadata
/// endpoints (AWS/GCP/Azure 169.254.169.254, AWS IPv6 fd00:ec2::254,
/// Alibaba 100.100.100.200). IPv4-mapped IPv6 addresses are judged as IPv4.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let metadata = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
            v6.is_loopback()
                || v6.is_unspecified()
                // fe80::/10
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == metadata
        }
    }
}

fn forbidden_v4(v4: Ipv4Addr) -> bool {
    v4.is_loopback()
        || v4.is_unspecified()
        || v4.is_link_local()
        || v4.is_broadcast()
        || v4 == Ipv4Addr::new(100, 100, 100, 200)
}

/// The error a refused address or redirect carries through reqwest, found
/// again by [`OriginClient::classify`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// DNS resolution that drops forbidden addresses (and fails when none is
/// left), so a name pointing at a metadata endpoint is never connected to.
struct CheckedResolver;

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?
                .collect();
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| !is_forbidden_ip(a.ip()))
                .collect();
            if allowed.is_empty() && !addrs.is_empty() {
                return Err(Box::new(Refused(format!(
                    "{host} resolves only to loopback, link-local or metadata addresses"
                )))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Why a URL (the origin's or a redirect target's) is refused, if it is.
fn refuse_url(url: &Url, allow_private: bool) -> Option<String> {
    if !url.username().is_empty() || url.password().is_some() {
        return Some("credentials in the URL are not allowed (use headersFrom)".into());
    }
    if allow_private {
        return None;
    }
    let host = url.host_str()?;
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let Ok(ip) = literal.parse::<IpAddr>() else {
        let d = host.trim_end_matches('.').to_ascii_lowercase();
        if d == "localhost" || d.ends_with(".localhost") {
            return Some(format!("host {host} is loopback"));
        }
        return None;
    };
    is_forbidden_ip(ip)
        .then(|| format!("address {ip} is loopback, link-local or a metadata endpoint"))
}

/// Redirects: at most [`MAX_REDIRECTS`] hops, no https→http downgrade, each
/// target checked like the origin itself.
fn redirect_policy(allow_private: bool) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(Refused(format!("more than {MAX_REDIRECTS} redirects")));
        }
        let downgrade = attempt
            .previous()
            .last()
            .is_some_and(|prev| prev.scheme() == "https" && attempt.url().scheme() != "https");
        if downgrade {
            return attempt.error(Refused("redirect from https to http refused".into()));
        }
        if !matches!(attempt.url().scheme(), "http" | "https") {
            return attempt.error(Refused("redirect to a non-http URL refused".into()));
        }
        if let Some(why) = refuse_url(attempt.url(), allow_private) {
            return attempt.error(Refused(format!("redirect refused: {why}")));
        }
        attempt.follow()
    })
}

/// Whether `v` (a pinned origin version) is an entity tag.
fn is_etag(v: &str) -> bool {
    v.starts_with('"')
}

/// The validator of a response: its strong ETag, else its Last-Modified.
/// Weak ETags (`W/"..."`) cannot pin byte ranges (If-Match compares
/// strongly), so they are skipped.
pub fn validator_of(headers: &HeaderMap) -> Option<String> {
    let etag = headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| is_etag(v) && v.len() >= 2);
    if let Some(e) = etag {
        return Some(e.to_string());
    }
    headers
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The response's validator of the same kind as `pinned` (an ETag is
/// compared with the ETag, a date with Last-Modified), if it sends one.
fn same_kind_validator(headers: &HeaderMap, pinned: &str) -> Option<String> {
    let name = if is_etag(pinned) {
        header::ETAG
    } else {
        header::LAST_MODIFIED
    };
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
}

/// Errors reading an origin. [`OriginError::reason`] gives the Kubernetes
/// condition reason for each.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("origin {url} returned 404 Not Found")]
    NotFound { url: String },
    #[error("origin {url} refused access (HTTP {status}); check the credentials in headersFrom")]
    Forbidden { url: String, status: u16 },
    #[error("origin {url} returned HTTP {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("origin {url} is unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("origin {url} timed out")]
    Timeout { url: String },
    #[error("origin {url} sent {got} bytes where {expected} were expected")]
    WrongLength {
        url: String,
        expected: u64,
        got: u64,
    },
    #[error("origin {url} does not support HTTP Range requests")]
    NoRangeSupport { url: String },
    #[error("origin {url} answered range {requested} with Content-Range {got:?}")]
    BadContentRange {
        url: String,
        requested: String,
        got: String,
    },
    #[error("origin {url} did not report the content length")]
    UnknownLength { url: String },
    #[error("invalid origin URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid origin header {name:?}: {reason}")]
    InvalidHeader { name: String, reason: String },
    #[error("origin {url} changed: reads are pinned to version {pinned}, the origin now has {found}", found = found.as_deref().unwrap_or("another version"))]
    Changed {
        url: String,
        pinned: String,
        found: Option<String>,
    },
    #[error("origin {url} refused: {reason}")]
    PrivateAddress { url: String, reason: String },
    #[error(
        "origin {url} sent piece {piece} with bytes that do not match its hash in the piece manifest"
    )]
    ManifestMismatch { url: String, piece: u32 },
    #[error("piece manifest {url}: {source}")]
    Manifest {
        url: String,
        #[source]
        source: manifest::ManifestError,
    },
}

impl OriginError {
    /// CamelCase reason for a Kubernetes condition.
    pub fn reason(&self) -> &'static str {
        match self {
            OriginError::NotFound { .. } => "OriginNotFound",
            OriginError::Forbidden { .. } | OriginError::PrivateAddress { .. } => "OriginForbidden",
            OriginError::Changed { .. } => "OriginChanged",
            OriginError::HttpStatus { .. }
            | OriginError::BadContentRange { .. }
            | OriginError::UnknownLength { .. } => "OriginHttpError",
            OriginError::Unreachable { .. } => "OriginUnreachable",
            OriginError::Timeout { .. } => "OriginTimeout",
            OriginError::WrongLength { .. } => "OriginWrongLength",
            OriginError::NoRangeSupport { .. } => "OriginNoRangeSupport",
            OriginError::InvalidUrl { .. } => "InvalidOriginUrl",
            OriginError::InvalidHeader { .. } => "InvalidOriginHeaders",
            OriginError::ManifestMismatch { .. } | OriginError::Manifest { .. } => {
                "OriginManifestMismatch"
            }
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            OriginError::Timeout { .. } | OriginError::Unreachable { .. } => true,
            OriginError::HttpStatus { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// The URL as shown in messages and logs: no credentials, no query string.
fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let had_query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    let mut s = u.to_string();
    if had_query {
        s.push_str("?…");
    }
    s
}

/// Reads one origin URL.
#[derive(Clone)]
pub struct OriginClient {
    client: reqwest::Client,
    url: Url,
    shown: String,
    opts: OriginOptions,
    metrics: Option<Metrics>,
    /// The version every read is pinned to (shared by clones: all readers
    /// of one content use one version).
    pin: Arc<Mutex<Option<String>>>,
    /// Whether the absence of validators was logged already.
    unpinned_noted: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for OriginClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginClient")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

/// What one attempt's response said, before the body is read.
enum Answer {
    Partial { total: Option<u64> },
    Whole,
}

impl OriginClient {
    /// A client for `url` (http or https) sending `headers` on every request
    /// (their values are marked sensitive and never logged).
    pub fn new(
        url: &str,
        headers: Vec<(String, String)>,
        opts: OriginOptions,
    ) -> Result<Self, OriginError> {
        let parsed = Url::parse(url).map_err(|e| OriginError::InvalidUrl {
            url: url.chars().take(200).collect(),
            reason: e.to_string(),
        })?;
        let shown = redact(&parsed);
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(OriginError::InvalidUrl {
                url: shown,
                reason: format!("scheme {:?} is not http or https", parsed.scheme()),
            });
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(OriginError::InvalidUrl {
                url: shown,
                reason: "no host".into(),
            });
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(OriginError::InvalidUrl {
                url: shown,
                reason: "credentials in the URL are not allowed (use headersFrom)".into(),
            });
        }
        if let Some(reason) = refuse_url(&parsed, opts.allow_private) {
            return Err(OriginError::PrivateAddress { url: shown, reason });
        }
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let hn = HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
                OriginError::InvalidHeader {
                    name: name.clone(),
                    reason: e.to_string(),
                }
            })?;
            if hn == header::RANGE || hn == header::HOST || hn == header::CONTENT_LENGTH {
                return Err(OriginError::InvalidHeader {
                    name,
                    reason: "this header is set by the agent".into(),
                });
            }
            let mut hv = HeaderValue::from_str(&value).map_err(|_| OriginError::InvalidHeader {
                name: name.clone(),
                reason: "the value contains characters not allowed in a header".into(),
            })?;
            hv.set_sensitive(true);
            map.append(hn, hv);
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(redirect_policy(opts.allow_private));
        if !opts.allow_private {
            builder = builder.dns_resolver(Arc::new(CheckedResolver));
        }
        let client = builder
            .default_headers(map)
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            // Ranges of compressed bodies would be ranges of the wrong bytes.
            .no_gzip()
            .build()
            .map_err(|e| OriginError::InvalidUrl {
                url: shown.clone(),
                reason: format!("cannot build an HTTP client: {}", e.without_url()),
            })?;
        Ok(OriginClient {
            client,
            url: parsed,
            shown,
            opts,
            metrics: None,
            pin: Arc::new(Mutex::new(None)),
            unpinned_noted: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }

    /// Pins reads to origin version `v` (an ETag, or a Last-Modified
    /// date): what the operator published for this content id.
    pub fn pin_version(&self, v: String) {
        *self.pin.lock().unwrap_or_else(PoisonError::into_inner) = Some(v);
    }

    /// The version reads are pinned to, once known.
    pub fn version(&self) -> Option<String> {
        self.pin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Checks a response against the pinned version, pinning its validator
    /// when nothing is pinned yet (the first response wins).
    fn check_version(&self, headers: &HeaderMap) -> Result<(), OriginError> {
        let mut pin = self.pin.lock().unwrap_or_else(PoisonError::into_inner);
        match pin.as_deref() {
            None => {
                match validator_of(headers) {
                    Some(v) => {
                        debug!(url = %self.shown, version = %v, "origin version pinned");
                        *pin = Some(v);
                    }
                    None => {
                        if !self
                            .unpinned_noted
                            .swap(true, std::sync::atomic::Ordering::Relaxed)
                        {
                            warn!(url = %self.shown, "the origin sends neither a strong ETag nor Last-Modified: reads cannot be pinned to one version; only the root agreement of the readers guards against a change");
                        }
                    }
                }
                Ok(())
            }
            Some(p) => match same_kind_validator(headers, p) {
                Some(found) if found != p => Err(OriginError::Changed {
                    url: self.shown.clone(),
                    pinned: p.to_string(),
                    found: Some(found),
                }),
                _ => Ok(()),
            },
        }
    }

    /// Adds the precondition of the pinned version to a range request.
    fn conditional(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.version() {
            Some(v) if is_etag(&v) => req.header(header::IF_MATCH, v),
            Some(v) => req.header(header::IF_UNMODIFIED_SINCE, v),
            None => req,
        }
    }

    /// Counts every request in `metrics` (`origin_requests_total{outcome}`,
    /// outcome `ok` or an error reason).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The URL as shown in messages (no credentials, no query).
    pub fn display_url(&self) -> &str {
        &self.shown
    }

    fn record<T>(&self, r: &Result<T, OriginError>) {
        if let Some(m) = &self.metrics {
            m.origin_request(match r {
                Ok(_) => "ok",
                Err(e) => e.reason(),
            });
        }
    }

    fn classify(&self, e: reqwest::Error) -> OriginError {
        // A refused address or redirect is ours, somewhere in the chain.
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cause {
            if let Some(r) = c.downcast_ref::<Refused>() {
                return OriginError::PrivateAddress {
                    url: self.shown.clone(),
                    reason: r.0.clone(),
                };
            }
            cause = c.source();
        }
        if e.is_timeout() {
            OriginError::Timeout {
                url: self.shown.clone(),
            }
        } else {
            OriginError::Unreachable {
                url: self.shown.clone(),
                source: e.without_url(),
            }
        }
    }

    fn status_error(&self, status: StatusCode) -> OriginError {
        let url = self.shown.clone();
        match status.as_u16() {
            404 | 410 => OriginError::NotFound { url },
            401 | 403 => OriginError::Forbidden {
                url,
                status: status.as_u16(),
            },
            s => OriginError::HttpStatus { url, status: s },
        }
    }

    /// The origin answered 412 to our precondition: it changed.
    fn changed(&self, headers: &HeaderMap) -> OriginError {
        OriginError::Changed {
            url: self.shown.clone(),
            pinned: self.version().unwrap_or_default(),
            found: validator_of(headers),
        }
    }

    /// Sends a request, bounding the wait for response headers.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, OriginError> {
        let limit = self.opts.connect_timeout + self.opts.read_timeout;
        match tokio::time::timeout(limit, req.send()).await {
            Err(_) => Err(OriginError::Timeout {
                url: self.shown.clone(),
            }),
            Ok(Err(e)) => Err(self.classify(e)),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Runs `attempt` with retries on transient errors: exponential backoff
    /// from `initial_backoff` doubling to `max_backoff`, with jitter that
    /// spreads the retries of many nodes hitting the same origin, at most
    /// `max_retries` times.
    async fn with_retries<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, OriginError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, OriginError>>,
    {
        use backon::Retryable;
        let policy = crate::retry::Policy::new(self.opts.initial_backoff, self.opts.max_backoff)
            .with_max_times(self.opts.max_retries as usize);
        let mut tries = 0u32;
        (|| {
            tries += 1;
            let fut = attempt();
            async move {
                let r = fut.await;
                self.record(&r);
                r
            }
        })
        .retry(policy)
        .sleep(tokio::time::sleep)
        .when(OriginError::is_transient)
        .notify(|e: &OriginError, wait: Duration| {
            warn!(
                url = %self.shown, what, error = %e,
                retry_in_ms = wait.as_millis() as u64,
                "origin request failed; retrying"
            );
        })
        .await
        .inspect_err(
            |_| debug!(url = %self.shown, what, attempts = tries, "origin request gave up"),
        )
    }

    /// The content length: from HEAD, or, when HEAD gives none, from the
    /// `Content-Range` of a `bytes=0-0` GET.
    pub async fn content_length(&self) -> Result<u64, OriginError> {
        self.with_retries("content length", || async {
            let resp = self.send(self.client.head(self.url.clone())).await?;
            let status = resp.status();
            if status.is_success()
                && let Some(len) = header_u64(resp.headers(), header::CONTENT_LENGTH)
            {
                self.check_version(resp.headers())?;
                return Ok(len);
            }
            if !status.is_success() && !matches!(status.as_u16(), 405 | 501) {
                return Err(self.status_error(status));
            }
            debug!(url = %self.shown, %status, "HEAD gave no length; trying a range GET");
            let resp = self
                .send(
                    self.conditional(self.client.get(self.url.clone()))
                        .header(header::RANGE, "bytes=0-0"),
                )
                .await?;
            let status = resp.status();
            if status == StatusCode::PRECONDITION_FAILED {
                return Err(self.changed(resp.headers()));
            }
            if status.is_success() {
                self.check_version(resp.headers())?;
            }
            let content_range = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match status {
                StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE => {
                    // 416 with `bytes */0` is how an empty file answers.
                    match content_range.as_deref().and_then(parse_content_range) {
                        Some((_, Some(total))) => Ok(total),
                        _ => Err(OriginError::UnknownLength {
                            url: self.shown.clone(),
                        }),
                    }
                }
                StatusCode::OK => {
                    header_u64(resp.headers(), header::CONTENT_LENGTH).ok_or_else(|| {
                        OriginError::UnknownLength {
                            url: self.shown.clone(),
                        }
                    })
                }
                s => Err(self.status_error(s)),
            }
        })
        .await
    }

    /// Reads bytes `range` of the content, exactly.
    pub async fn fetch_range(&self, range: Range<u64>) -> Result<Bytes, OriginError> {
        if range.end <= range.start {
            return Ok(Bytes::new());
        }
        self.with_retries("range", || self.fetch_range_once(range.clone()))
            .await
    }

    async fn fetch_range_once(&self, range: Range<u64>) -> Result<Bytes, OriginError> {
        let expected = range.end - range.start;
        let requested = format!("bytes={}-{}", range.start, range.end - 1);
        let resp = self
            .send(
                self.conditional(self.client.get(self.url.clone()))
                    .header(header::RANGE, &requested),
            )
            .await?;
        let status = resp.status();
        if status == StatusCode::PRECONDITION_FAILED {
            return Err(self.changed(resp.headers()));
        }
        if status.is_success() {
            self.check_version(resp.headers())?;
        }
        let answer = match status {
            StatusCode::PARTIAL_CONTENT => {
                let got = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                match parse_content_range(&got) {
                    Some((Some((a, b)), total)) if a == range.start && b + 1 == range.end => {
                        Answer::Partial { total }
                    }
                    _ => {
                        return Err(OriginError::BadContentRange {
                            url: self.shown.clone(),
                            requested,
                            got,
                        });
                    }
                }
            }
            // A server that ignores Range answers 200 with the whole file;
            // that is only what we asked for if the range is the whole file.
            StatusCode::OK => {
                let whole = range.start == 0
                    && header_u64(resp.headers(), header::CONTENT_LENGTH) == Some(expected);
                if !whole {
                    return Err(OriginError::NoRangeSupport {
                        url: self.shown.clone(),
                    });
                }
                Answer::Whole
            }
            s => return Err(self.status_error(s)),
        };
        if let Answer::Partial { total: Some(t) } = answer
            && t < range.end
        {
            return Err(OriginError::WrongLength {
                url: self.shown.clone(),
                expected: range.end,
                got: t,
            });
        }
        self.read_body(resp, expected).await
    }

    /// Reads a body of exactly `expected` bytes, never buffering more, with
    /// a bound on the wait for each chunk.
    async fn read_body(
        &self,
        resp: reqwest::Response,
        expected: u64,
    ) -> Result<Bytes, OriginError> {
        if let Some(len) = resp.content_length()
            && len != expected
        {
            return Err(OriginError::WrongLength {
                url: self.shown.clone(),
                expected,
                got: len,
            });
        }
        let cap = usize::try_from(expected).map_err(|_| OriginError::WrongLength {
            url: self.shown.clone(),
            expected,
            got: 0,
        })?;
        let mut buf = BytesMut::with_capacity(cap);
        let mut stream = resp.bytes_stream();
        loop {
            let next = tokio::time::timeout(self.opts.read_timeout, stream.next()).await;
            match next {
                Err(_) => {
                    return Err(OriginError::Timeout {
                        url: self.shown.clone(),
                    });
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(self.classify(e)),
                Ok(Some(Ok(chunk))) => {
                    if (buf.len() + chunk.len()) as u64 > expected {
                        return Err(OriginError::WrongLength {
                            url: self.shown.clone(),
                            expected,
                            got: (buf.len() + chunk.len()) as u64,
                        });
                    }
                    buf.extend_from_slice(&chunk);
                }
            }
        }
        if buf.len() as u64 != expected {
            return Err(OriginError::WrongLength {
                url: self.shown.clone(),
                expected,
                got: buf.len() as u64,
            });
        }
        Ok(buf.freeze())
    }
}

fn header_u64(headers: &HeaderMap, name: HeaderName) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// A parsed `Content-Range`: the inclusive span (absent in `bytes */N`) and
/// the total length (absent in `bytes a-b/*`).
type ContentRange = (Option<(u64, u64)>, Option<u64>);

/// Parses `bytes a-b/total`, `bytes a-b/*` or `bytes */total`.
fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let span = match span.trim() {
        "*" => None,
        s => {
            let (a, b) = s.split_once('-')?;
            let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            if b < a {
                return None;
            }
            Some((a, b))
        }
    };
    Some((span, total))
}

/// Splits the pieces into at most `readers` disjoint, contiguous index ranges
/// covering all pieces, as even as possible (sizes differ by at most one).
/// Empty content gives no range; `readers == 0` is treated as 1.
pub fn split_ranges(layout: &Layout, readers: u32) -> Vec<Range<u32>> {
    let count = layout.piece_count();
    if count == 0 {
        return Vec::new();
    }
    let r = readers.clamp(1, count);
    let (base, extra) = (count / r, count % r);
    let mut out = Vec::with_capacity(r as usize);
    let mut start = 0u32;
    for i in 0..r {
        let len = base + u32::from(i < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::{Request, Response};
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    type Handler = Arc<dyn Fn(&Request<Incoming>, usize) -> Response<Full<Bytes>> + Send + Sync>;

    struct TestServer {
        addr: SocketAddr,
        hits: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A tiny HTTP/1.1 server on 127.0.0.1; `handler` gets the request and
    /// its 0-based sequence number. `hang` makes it never answer.
    async fn server(handler: Handler, hang: bool) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h2 = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let hits = h2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let n = hits.fetch_add(1, Ordering::SeqCst);
                        async move {
                            if hang {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                            }
                            Ok::<_, Infallible>(handler(&req, n))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestServer { addr, hits, task }
    }

    fn content(n: usize) -> Bytes {
        Bytes::from((0..n).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>())
    }

    /// Serves `data` honouring single `bytes=a-b` ranges.
    fn ranged(data: Bytes) -> Handler {
        Arc::new(move |req, _| {
            let len = data.len() as u64;
            let range = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes="))
                .and_then(|v| v.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
            let mut resp = match range {
                Some((a, b)) if a < len => {
                    let b = b.min(len - 1);
                    let mut r = Response::new(Full::new(data.slice(a as usize..=b as usize)));
                    *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                    r.headers_mut().insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes {a}-{b}/{len}")).unwrap(),
                    );
                    r
                }
                Some(_) => {
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                    r.headers_mut().insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes */{len}")).unwrap(),
                    );
                    r
                }
                None => Response::new(Full::new(data.clone())),
            };
            resp.headers_mut()
                .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            resp
        })
    }

    fn status(code: u16) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from_static(b"no")));
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        r
    }

    fn fast_opts() -> OriginOptions {
        OriginOptions {
            connect_timeout: Duration::from_millis(500),
            read_timeout: Duration::from_millis(300),
            max_retries: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            // The test servers listen on loopback.
            allow_private: true,
        }
    }

    fn client(s: &TestServer) -> OriginClient {
        OriginClient::new(
            &format!("http://{}/blob?sig=secret", s.addr),
            vec![("Authorization".into(), "Bearer hunter2".into())],
            fast_opts(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn reads_correct_ranges_and_length() {
        let data = content(100_000);
        let s = server(ranged(data.clone()), false).await;
        let c = client(&s);
        assert_eq!(c.content_length().await.unwrap(), 100_000);
        assert_eq!(c.fetch_range(0..10).await.unwrap(), data.slice(0..10));
        assert_eq!(
            c.fetch_range(99_990..100_000).await.unwrap(),
            data.slice(99_990..)
        );
        assert_eq!(c.fetch_range(5..5).await.unwrap(), Bytes::new());
        assert_eq!(c.fetch_range(0..100_000).await.unwrap(), data);
        // Past the end: the server says 416, which is not retried.
        let before = s.hits.load(Ordering::SeqCst);
        let err = c.fetch_range(99_990..100_010).await.unwrap_err();
        assert!(
            matches!(err, OriginError::BadContentRange { .. }),
            "{err:?}"
        );
        let err = c.fetch_range(200_000..200_010).await.unwrap_err();
        assert!(
            matches!(err, OriginError::HttpStatus { status: 416, .. }),
            "{err:?}"
        );
        assert_eq!(s.hits.load(Ordering::SeqCst) - before, 2);
        // The message names the URL without its query or header values.
        let msg = err.to_string();
        assert!(msg.contains("/blob?…") && !msg.contains("secret") && !msg.contains("hunter2"));
    }

    #[tokio::test]
    async fn length_falls_back_to_range_get() {
        let data = content(4321);
        let inner = ranged(data);
        let h: Handler = Arc::new(move |req, n| {
            if req.method() == http::Method::HEAD {
                status(405)
            } else {
                inner(req, n)
            }
        });
        let s = server(h, false).await;
        assert_eq!(client(&s).content_length().await.unwrap(), 4321);
        let empty = server(ranged(Bytes::new()), false).await;
        let h: Handler = Arc::new(move |req, n| {
            if req.method() == http::Method::HEAD {
                status(405)
            } else {
                ranged(Bytes::new())(req, n)
            }
        });
        let s2 = server(h, false).await;
        assert_eq!(client(&s2).content_length().await.unwrap(), 0);
        assert_eq!(client(&empty).content_length().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn not_found_is_not_retried() {
        let s = server(Arc::new(|_, _| status(404)), false).await;
        let err = client(&s).fetch_range(0..10).await.unwrap_err();
        assert!(matches!(err, OriginError::NotFound { .. }));
        assert_eq!(err.reason(), "OriginNotFound");
        assert_eq!(s.hits.load(Ordering::SeqCst), 1);

        let s = server(Arc::new(|_, _| status(403)), false).await;
        let err = client(&s).content_length().await.unwrap_err();
        assert_eq!(err.reason(), "OriginForbidden");
        assert_eq!(s.hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn server_errors_are_retried() {
        let data = content(1000);
        let inner = ranged(data.clone());
        let s = server(
            Arc::new(move |req, n| if n < 2 { status(500) } else { inner(req, n) }),
            false,
        )
        .await;
        let m = Metrics::new();
        let c = client(&s).with_metrics(m.clone());
        assert_eq!(c.fetch_range(10..20).await.unwrap(), data.slice(10..20));
        assert_eq!(s.hits.load(Ordering::SeqCst), 3);
        let text = m.render();
        assert!(
            text.contains("peerfill_agent_origin_requests_total{outcome=\"OriginHttpError\"} 2")
        );
        assert!(text.contains("peerfill_agent_origin_requests_total{outcome=\"ok\"} 1"));

        // Always 503: gives up after 1 + max_retries attempts.
        let s = server(Arc::new(|_, _| status(503)), false).await;
        let err = client(&s).fetch_range(0..1).await.unwrap_err();
        assert!(matches!(err, OriginError::HttpStatus { status: 503, .. }));
        assert_eq!(s.hits.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn short_body_is_wrong_length() {
        let s = server(
            Arc::new(|_, _| {
                let mut r = Response::new(Full::new(Bytes::from_static(b"abc")));
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                r.headers_mut().insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_static("bytes 0-9/100"),
                );
                r
            }),
            false,
        )
        .await;
        let err = client(&s).fetch_range(0..10).await.unwrap_err();
        assert!(
            matches!(
                err,
                OriginError::WrongLength {
                    expected: 10,
                    got: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.reason(), "OriginWrongLength");
    }

    #[tokio::test]
    async fn ignored_range_is_no_range_support() {
        let data = content(1000);
        let s = server(
            Arc::new(move |_, _| Response::new(Full::new(data.clone()))),
            false,
        )
        .await;
        let c = client(&s);
        let err = c.fetch_range(10..20).await.unwrap_err();
        assert!(matches!(err, OriginError::NoRangeSupport { .. }));
        assert_eq!(err.reason(), "OriginNoRangeSupport");
        // The whole file as a 200 is fine.
        assert_eq!(c.fetch_range(0..1000).await.unwrap().len(), 1000);
    }

    /// Reads a whole body chunk by chunk.
    async fn read_whole(c: &OriginClient, size: u64) -> Result<Vec<u8>, OriginError> {
        let mut body = c.open_whole(size).await?;
        let mut out = Vec::new();
        while let Some(chunk) = body.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn whole_reads_stream_the_body_and_check_length_and_version() {
        let data = content(300_000);
        let d = data.clone();
        let s = server(
            Arc::new(move |req, _| {
                assert!(req.headers().get(header::RANGE).is_none());
                let mut r = Response::new(Full::new(d.clone()));
                r.headers_mut()
                    .insert(header::ETAG, HeaderValue::from_static("\"v1\""));
                r
            }),
            false,
        )
        .await;
        let c = client(&s);
        assert_eq!(read_whole(&c, 300_000).await.unwrap(), data.to_vec());
        assert_eq!(c.version().as_deref(), Some("\"v1\""), "pinned by the read");
        // Another size than the content's is refused before the body.
        let err = read_whole(&c, 299_999).await.unwrap_err();
        assert!(
            matches!(
                err,
                OriginError::WrongLength {
                    expected: 299_999,
                    got: 300_000,
                    ..
                }
            ),
            "{err:?}"
        );
        // Pinned to another version: the origin changed.
        c.pin_version("\"v0\"".into());
        let err = read_whole(&c, 300_000).await.unwrap_err();
        assert_eq!(err.reason(), "OriginChanged");
        // A server error is the caller's to retry.
        let s = server(Arc::new(|_, _| status(503)), false).await;
        let err = read_whole(&client(&s), 10).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert_eq!(s.hits.load(Ordering::SeqCst), 1, "one attempt");
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable() {
        // Bind then drop, so the port is (almost certainly) closed.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut opts = fast_opts();
        opts.max_retries = 1;
        let c = OriginClient::new(&format!("http://{addr}/x"), vec![], opts).unwrap();
        let err = c.fetch_range(0..10).await.unwrap_err();
        assert!(matches!(err, OriginError::Unreachable { .. }), "{err:?}");
        assert_eq!(err.reason(), "OriginUnreachable");
    }

    #[tokio::test]
    async fn hanging_server_times_out() {
        let s = server(Arc::new(|_, _| status(200)), true).await;
        let mut opts = fast_opts();
        opts.max_retries = 1;
        let c = OriginClient::new(&format!("http://{}/x", s.addr), vec![], opts).unwrap();
        let start = std::time::Instant::now();
        let err = c.fetch_range(0..10).await.unwrap_err();
        assert!(matches!(err, OriginError::Timeout { .. }), "{err:?}");
        assert_eq!(err.reason(), "OriginTimeout");
        // Two attempts of at most connect+read timeout each, plus backoff.
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(s.hits.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn invalid_urls_and_headers() {
        for bad in ["", "not a url", "ftp://h/x", "file:///etc/passwd"] {
            let err = OriginClient::new(bad, vec![], OriginOptions::default()).unwrap_err();
            assert_eq!(err.reason(), "InvalidOriginUrl", "{bad}");
        }
        let err = OriginClient::new(
            "https://h/x",
            vec![("Bad Name".into(), "v".into())],
            OriginOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, OriginError::InvalidHeader { .. }));
        let err = OriginClient::new(
            "https://h/x",
            vec![("X-Token".into(), "line\nbreak-secret".into())],
            OriginOptions::default(),
        )
        .unwrap_err();
        assert!(!err.to_string().contains("secret"));
        // Credentials in the URL are refused, and never shown.
        let err = OriginClient::new("https://user:pw@h/x?a=b", vec![], OriginOptions::default())
            .unwrap_err();
        assert_eq!(err.reason(), "InvalidOriginUrl");
        assert!(!err.to_string().contains("pw"), "{err}");
        let c = OriginClient::new("https://h/x?a=b", vec![], OriginOptions::default()).unwrap();
        assert_eq!(c.display_url(), "https://h/x?…");
    }

    /// Serves `ranged(data)` with a strong ETag, honouring If-Match; the
    /// content switches to `next` after `switch_after` requests.
    fn versioned(data: Bytes, next: Bytes, switch_after: usize) -> Handler {
        let (a, b) = (ranged(data.clone()), ranged(next.clone()));
        Arc::new(move |req, n| {
            let (serve, tag) = if n < switch_after {
                (&a, "\"v1\"")
            } else {
                (&b, "\"v2\"")
            };
            if let Some(want) = req.headers().get(header::IF_MATCH)
                && want.to_str().ok() != Some(tag)
            {
                let mut r = status(412);
                r.headers_mut()
                    .insert(header::ETAG, HeaderValue::from_static(tag));
                return r;
            }
            let mut r = serve(req, n);
            r.headers_mut()
                .insert(header::ETAG, HeaderValue::from_static(tag));
            r
        })
    }

    #[tokio::test]
    async fn reads_are_pinned_to_the_first_version_seen() {
        let (v1, v2) = (content(1000), Bytes::from(vec![9u8; 1000]));
        let s = server(versioned(v1.clone(), v2, 3), false).await;
        let c = client(&s);
        assert_eq!(c.content_length().await.unwrap(), 1000);
        assert_eq!(c.version().as_deref(), Some("\"v1\""));
        assert_eq!(c.fetch_range(0..10).await.unwrap(), v1.slice(0..10));
        assert_eq!(c.fetch_range(10..20).await.unwrap(), v1.slice(10..20));
        // The origin changed: If-Match fails, never retried, never mixed.
        let before = s.hits.load(Ordering::SeqCst);
        let err = c.fetch_range(20..30).await.unwrap_err();
        assert_eq!(err.reason(), "OriginChanged");
        assert!(!err.is_transient());
        assert!(
            matches!(&err, OriginError::Changed { pinned, found: Some(f), .. } if pinned == "\"v1\"" && f == "\"v2\""),
            "{err:?}"
        );
        assert_eq!(s.hits.load(Ordering::SeqCst) - before, 1);
    }

    #[tokio::test]
    async fn a_published_version_pins_from_the_start() {
        let (v1, v2) = (content(1000), Bytes::from(vec![9u8; 1000]));
        // The origin already serves v2; the operator pinned v1.
        let s = server(versioned(v1, v2, 0), false).await;
        let c = client(&s);
        c.pin_version("\"v1\"".into());
        let err = c.fetch_range(0..10).await.unwrap_err();
        assert_eq!(err.reason(), "OriginChanged");
        // HEAD names the new version too.
        let err = c.content_length().await.unwrap_err();
        assert_eq!(err.reason(), "OriginChanged");
    }

    #[tokio::test]
    async fn an_origin_ignoring_preconditions_is_caught_by_its_validator() {
        // Answers every range with the current version's ETag, ignoring
        // If-Match (as some servers do).
        let v1 = ranged(content(1000));
        let v2 = ranged(Bytes::from(vec![9u8; 1000]));
        let h: Handler = Arc::new(move |req, n| {
            let (mut r, tag) = if n < 1 {
                (v1(req, n), "\"a\"")
            } else {
                (v2(req, n), "\"b\"")
            };
            r.headers_mut()
                .insert(header::ETAG, HeaderValue::from_static(tag));
            r
        });
        let s = server(h, false).await;
        let c = client(&s);
        c.fetch_range(0..10).await.unwrap();
        let err = c.fetch_range(10..20).await.unwrap_err();
        assert_eq!(err.reason(), "OriginChanged");
    }

    #[tokio::test]
    async fn last_modified_pins_when_there_is_no_strong_etag() {
        let inner = ranged(content(1000));
        let h: Handler = Arc::new(move |req, n| {
            let mut r = inner(req, n);
            r.headers_mut()
                .insert(header::ETAG, HeaderValue::from_static("W/\"weak\""));
            let lm = if n < 2 {
                "Mon, 30 Nov 2026 10:00:00 GMT"
            } else {
                "Mon, 30 Nov 2026 11:00:00 GMT"
            };
            r.headers_mut()
                .insert(header::LAST_MODIFIED, HeaderValue::from_static(lm));
            r
        });
        let s = server(h, false).await;
        let c = client(&s);
        c.fetch_range(0..10).await.unwrap();
        assert_eq!(
            c.version().as_deref(),
            Some("Mon, 30 Nov 2026 10:00:00 GMT")
        );
        c.fetch_range(10..20).await.unwrap();
        let err = c.fetch_range(20..30).await.unwrap_err();
        assert_eq!(err.reason(), "OriginChanged");
    }

    #[test]
    fn forbidden_addresses() {
        for bad in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "169.254.169.254",
            "169.254.1.1",
            "100.100.100.200",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_forbidden_ip(bad.parse().unwrap()), "{bad}");
        }
        for ok in ["198.18.0.1", "198.19.255.254", "fd00::1", "2001:db8::1"] {
            assert!(!is_forbidden_ip(ok.parse().unwrap()), "{ok}");
        }
    }

    #[tokio::test]
    async fn private_origins_are_refused_unless_allowed() {
        let strict = OriginOptions {
            allow_private: false,
            ..fast_opts()
        };
        for url in [
            "http://127.0.0.1:1/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[fd00:ec2::254]/",
            "http://[::1]:8080/x",
            "http://localhost/x",
        ] {
            let err = OriginClient::new(url, vec![], strict.clone()).unwrap_err();
            assert_eq!(err.reason(), "OriginForbidden", "{url}");
        }
        // A name resolving to loopback is refused at connect time.
        let data = content(100);
        let s = server(ranged(data.clone()), false).await;
        let port = s.addr.port();
        let c = OriginClient::new(
            &format!("http://localtest.invalid.localhost.:{port}/x"),
            vec![],
            strict.clone(),
        );
        assert!(c.is_err(), "*.localhost is loopback");
        // Names are checked on what they resolve to.
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let resolved = CheckedResolver.resolve(name).await;
        let err = resolved.err().expect("localhost resolves only to loopback");
        assert!(err.is::<Refused>(), "{err}");
        // Allowed: the same origin is read.
        let c = OriginClient::new(&format!("http://{}/x", s.addr), vec![], fast_opts()).unwrap();
        assert_eq!(c.fetch_range(0..10).await.unwrap(), data.slice(0..10));
    }

    #[tokio::test]
    async fn redirects_are_checked_and_bounded() {
        let data = content(100);
        let target = server(ranged(data.clone()), false).await;
        let to = format!("http://{}/x", target.addr);
        let redirect: Handler = Arc::new(move |_, _| {
            let mut r = status(302);
            r.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_str(&to).unwrap());
            r
        });
        let hop = server(redirect, false).await;
        // Allowed private origins: followed.
        let c = OriginClient::new(&format!("http://{}/r", hop.addr), vec![], fast_opts()).unwrap();
        assert_eq!(c.fetch_range(0..10).await.unwrap(), data.slice(0..10));
        // A loop is cut after MAX_REDIRECTS hops.
        let looping: Handler = Arc::new(|req, _| {
            let mut r = status(302);
            let next = format!("{}x", req.uri().path());
            r.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_str(&next).unwrap());
            r
        });
        let l = server(looping, false).await;
        let c = OriginClient::new(&format!("http://{}/r", l.addr), vec![], fast_opts()).unwrap();
        let err = c.fetch_range(0..10).await.unwrap_err();
        assert_eq!(err.reason(), "OriginForbidden", "{err:?}");
        assert!(l.hits.load(Ordering::SeqCst) <= MAX_REDIRECTS + 1);
        // A redirect carrying credentials is refused.
        let cred: Handler = Arc::new(|_, _| {
            let mut r = status(302);
            r.headers_mut().insert(
                header::LOCATION,
                HeaderValue::from_static("http://user:pw@127.0.0.1:1/x"),
            );
            r
        });
        let cs = server(cred, false).await;
        let c = OriginClient::new(&format!("http://{}/r", cs.addr), vec![], fast_opts()).unwrap();
        let err = c.fetch_range(0..10).await.unwrap_err();
        assert_eq!(err.reason(), "OriginForbidden", "{err:?}");
        assert!(!err.to_string().contains("pw"), "{err}");
    }

    #[test]
    fn redirect_targets_are_judged_like_origins() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(refuse_url(&u("http://169.254.169.254/"), false).is_some());
        assert!(refuse_url(&u("http://[::ffff:7f00:1]/"), false).is_some());
        assert!(refuse_url(&u("http://198.18.1.3/"), false).is_none());
        assert!(refuse_url(&u("http://127.0.0.1/"), true).is_none());
        assert!(refuse_url(&u("http://a:b@198.18.1.3/"), true).is_some());
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((Some((0, 9)), Some(100)))
        );
        assert_eq!(
            parse_content_range("bytes 0-9/*"),
            Some((Some((0, 9)), None))
        );
        assert_eq!(parse_content_range("bytes */0"), Some((None, Some(0))));
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
        assert_eq!(parse_content_range("items 0-9/100"), None);
        assert_eq!(parse_content_range("bytes x-9/100"), None);
    }

    #[test]
    fn split_ranges_cover_disjointly() {
        for (size, readers) in [
            (0u64, 3u32),
            (1, 3),
            (16 << 10, 0),
            (100 << 14, 7),
            (13 << 14, 13),
            (5 << 14, 9),
        ] {
            let layout = Layout::new(size, 16 << 10).unwrap();
            let ranges = split_ranges(&layout, readers);
            let count = layout.piece_count();
            assert!(ranges.len() as u32 <= readers.max(1));
            let mut next = 0;
            for r in &ranges {
                assert_eq!(r.start, next);
                assert!(r.end > r.start);
                next = r.end;
            }
            assert_eq!(next, count);
            if let (Some(min), Some(max)) = (
                ranges.iter().map(|r| r.len()).min(),
                ranges.iter().map(|r| r.len()).max(),
            ) {
                assert!(max - min <= 1);
            }
        }
    }
}
