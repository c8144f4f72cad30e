//! Prometheus metrics of the agent and the HTTP endpoint that exposes them.
//!
//! The metric names here are an interface: the chart's Grafana dashboard
//! queries them, and CI checks the dashboard against [`metric_names`].
//!
//! The endpoint ([`serve_http`], also used by the operator) is reachable by
//! anything that can reach the pod, so it is hardened: HTTP/1 only, one
//! request per connection, a header-read timeout and an overall connection
//! deadline, bounded request heads, and a cap on concurrent connections
//! (connections over the cap are closed at once, never queued). `/healthz`
//! (liveness) and `/readyz` (readiness) answer from a [`Health`] handle that
//! the rest of the agent keeps up to date.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::core::Collector;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Where received bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Peer,
    Origin,
}

impl Source {
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Peer => "peer",
            Source::Origin => "origin",
        }
    }
}

/// The agent's metrics; cheap to clone (clones share the collectors).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    received_bytes: IntCounterVec,
    sent_bytes: IntCounter,
    pieces_verified: IntCounter,
    pieces_rejected: IntCounterVec,
    peers_connected: IntGauge,
    peers_banned: IntCounter,
    content_progress: GaugeVec,
    content_rate: GaugeVec,
    origin_requests: IntCounterVec,
    ready: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the collectors and registers them into a registry of their own
    /// (not the process-global one, so tests and several agents in one
    /// process do not collide).
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Names and label sets are constants, so construction and
        // registration cannot fail at run time; a failure is a bug here.
        let received_bytes = IntCounterVec::new(
            Opts::new(
                "peerfill_agent_received_bytes_total",
                "Verified content bytes received, by source (peer or origin).",
            ),
            &["source"],
        )
        .expect("valid metric");
        let sent_bytes = IntCounter::new(
            "peerfill_agent_sent_bytes_total",
            "Content bytes sent to other agents.",
        )
        .expect("valid metric");
        let pieces_verified = IntCounter::new(
            "peerfill_agent_pieces_verified_total",
            "Pieces that passed BLAKE3 verification.",
        )
        .expect("valid metric");
        let pieces_rejected = IntCounterVec::new(
            Opts::new(
                "peerfill_agent_pieces_rejected_total",
                "Pieces dropped because they failed verification, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let peers_connected = IntGauge::new(
            "peerfill_agent_peers_connected",
            "Peers with an open QUIC connection.",
        )
        .expect("valid metric");
        let peers_banned = IntCounter::new(
            "peerfill_agent_peers_banned_total",
            "Peers banned for sending bad pieces.",
        )
        .expect("valid metric");
        let content_progress = GaugeVec::new(
            Opts::new(
                "peerfill_agent_content_progress_ratio",
                "Fraction of a content's bytes held and verified (0..1).",
            ),
            &["content"],
        )
        .expect("valid metric");
        let content_rate = GaugeVec::new(
            Opts::new(
                "peerfill_agent_content_receive_bytes_per_second",
                "Recent receive rate of a content, in bytes per second.",
            ),
            &["content"],
        )
        .expect("valid metric");
        let origin_requests = IntCounterVec::new(
            Opts::new(
                "peerfill_agent_origin_requests_total",
                "HTTP requests to origins, by outcome.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        // /readyz as a metric: alerts see an agent that runs but is not
        // ready (no API watch, endpoint down, a content stuck).
        let ready = IntGauge::new(
            "peerfill_agent_ready",
            "1 while the agent's readiness checks (/readyz) pass.",
        )
        .expect("valid metric");
        // The known reason exists from the start at 0, so "Rejected pieces"
        // shows 0 (not "No data") on a healthy swarm and increase() sees
        // the first rejection.
        pieces_rejected.with_label_values(&["hash_mismatch"]);
        for source in [Source::Peer, Source::Origin] {
            received_bytes.with_label_values(&[source.as_str()]);
        }

        let collectors: [Box<dyn Collector>; 10] = [
            Box::new(received_bytes.clone()),
            Box::new(sent_bytes.clone()),
            Box::new(pieces_verified.clone()),
            Box::new(pieces_rejected.clone()),
            Box::new(peers_connected.clone()),
            Box::new(peers_banned.clone()),
            Box::new(content_progress.clone()),
            Box::new(content_rate.clone()),
            Box::new(origin_requests.clone()),
            Box::new(ready.clone()),
        ];
        for c in collectors {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                received_bytes,
                sent_bytes,
                pieces_verified,
                pieces_rejected,
                peers_connected,
                peers_banned,
                content_progress,
                content_rate,
                origin_requests,
                ready,
            }),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Counts `n` verified bytes received from `source`.
    pub fn received(&self, source: Source, n: u64) {
        self.inner
            .received_bytes
            .with_label_values(&[source.as_str()])
            .inc_by(n);
    }

    /// Counts `n` bytes sent to peers.
    pub fn sent(&self, n: u64) {
        self.inner.sent_bytes.inc_by(n);
    }

    pub fn piece_verified(&self) {
        self.inner.pieces_verified.inc();
    }

    /// Counts a rejected piece; `reason` is a short snake_case word such as
    /// `hash_mismatch` or `wrong_length` (keep the set small: it is a label).
    pub fn piece_rejected(&self, reason: &str) {
        self.inner
            .pieces_rejected
            .with_label_values(&[reason])
            .inc();
    }

    pub fn peer_connected(&self) {
        self.inner.peers_connected.inc();
    }

    pub fn peer_disconnected(&self) {
        self.inner.peers_connected.dec();
    }

    pub fn peer_banned(&self) {
        self.inner.peers_banned.inc();
    }

    /// Sets the progress (0..1, clamped) of `content`.
    pub fn set_progress(&self, content: &str, ratio: f64) {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        self.inner
            .content_progress
            .with_label_values(&[content])
            .set(ratio);
    }

    /// Sets the recent receive rate of `content`, bytes per second.
    pub fn set_rate(&self, content: &str, bytes_per_second: f64) {
        self.inner
            .content_rate
            .with_label_values(&[content])
            .set(bytes_per_second.max(0.0));
    }

    /// Drops the per-content series of a content the node no longer holds.
    pub fn remove_content(&self, content: &str) {
        // Absent series are fine: nothing to remove.
        let _ = self.inner.content_progress.remove_label_values(&[content]);
        let _ = self.inner.content_rate.remove_label_values(&[content]);
    }

    /// Counts an origin request; `outcome` is e.g. `ok`, `retry`, or an
    /// `OriginError::reason()`.
    pub fn origin_request(&self, outcome: &str) {
        self.inner
            .origin_requests
            .with_label_values(&[outcome])
            .inc();
    }

    /// Sets the readiness gauge (from the health checks, at scrape time).
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.set(i64::from(ready));
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        match TextEncoder::new().encode_to_string(&self.inner.registry.gather()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "encoding metrics failed");
                String::new()
            }
        }
    }

    fn names(&self) -> Vec<String> {
        let collectors: [&dyn Collector; 10] = [
            &self.inner.received_bytes,
            &self.inner.sent_bytes,
            &self.inner.pieces_verified,
            &self.inner.pieces_rejected,
            &self.inner.peers_connected,
            &self.inner.peers_banned,
            &self.inner.content_progress,
            &self.inner.content_rate,
            &self.inner.origin_requests,
            &self.inner.ready,
        ];
        let mut names: Vec<String> = collectors
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Every metric name the agent exports, read from the collectors'
/// descriptors (so it cannot drift from what is registered).
pub fn metric_names() -> Vec<String> {
    Metrics::new().names()
}

/// Limits of the metrics/health HTTP server (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// A client must send its whole request head within this time.
    pub header_read_timeout: Duration,
    /// No connection lives longer than this, whatever it does.
    pub connection_timeout: Duration,
    /// Connections served at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Bound of the buffered request head (and of anything else read).
    pub max_request_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(15),
            max_connections: 64,
            // hyper's minimum; a scrape or probe request head is far smaller.
            max_request_bytes: 8192,
        }
    }
}

/// Connection counters of one server (for tests and logs).
#[derive(Debug, Default)]
pub struct ConnStats {
    active: AtomicUsize,
    peak: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl ConnStats {
    /// Connections being served now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
    /// Most connections ever served at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }
    /// Connections accepted and served (within the cap).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }
    /// Connections closed at once because the cap was reached.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Acquire)
    }
}

/// Decrements the active count when a connection task ends, however it ends.
struct ActiveGuard(Arc<ConnStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `handler` on `listener` under `limits` until the task is dropped
/// or accepting fails for good.
pub async fn serve_http<H>(
    listener: TcpListener,
    limits: ServerLimits,
    stats: Arc<ConnStats>,
    handler: H,
) -> Result<(), std::io::Error>
where
    H: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let max_buf = limits.max_request_bytes.max(HYPER_MIN_BUF_SIZE);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) if is_transient_accept_error(&e) => {
                warn!(error = %e, "metrics: accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Over the cap: close now rather than queue, so slow or idle
            // clients cannot pile up file descriptors.
            stats.refused.fetch_add(1, Ordering::AcqRel);
            debug!(%peer, "metrics: connection cap reached; closing");
            drop(stream);
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::AcqRel);
        let now = stats.active.fetch_add(1, Ordering::AcqRel) + 1;
        stats.peak.fetch_max(now, Ordering::AcqRel);
        let guard = ActiveGuard(stats.clone());
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _guard = guard;
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(&req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(false)
                .max_buf_size(max_buf)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(limits.connection_timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics connection ended with an error"),
                Err(_) => debug!(%peer, "metrics connection deadline reached; closed"),
            }
        });
    }
}

/// hyper's h1 `max_buf_size` panics below this.
const HYPER_MIN_BUF_SIZE: usize = 8192;

/// Serves `GET /metrics` (Prometheus text format), `GET /healthz` and
/// `GET /readyz` on `addr` until the task is dropped or accepting fails.
/// Health: always ready (a one-shot `run`); see [`serve_with`].
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> Result<(), std::io::Error> {
    let listener = TcpListener::bind(addr).await?;
    serve_listener(listener, metrics).await
}

/// [`serve`] on an already bound listener (tests bind port 0).
pub async fn serve_listener(listener: TcpListener, metrics: Metrics) -> Result<(), std::io::Error> {
    serve_with(
        listener,
        metrics,
        Health::always_ready(),
        ServerLimits::default(),
    )
    .await
}

/// Serves the agent's endpoint with health from `health`.
pub async fn serve_with(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    limits: ServerLimits,
) -> Result<(), std::io::Error> {
    serve_http(
        listener,
        limits,
        Arc::new(ConnStats::default()),
        move |req| handle(&metrics, &health, req),
    )
    .await
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(libc::EMFILE)
        || e.raw_os_error() == Some(libc::ENFILE)
}

/// The answer of a health check: 200 "ok", or 503 listing what fails.
pub fn health_response(failing: &[String]) -> (StatusCode, Bytes) {
    if failing.is_empty() {
        (StatusCode::OK, Bytes::from_static(b"ok\n"))
    } else {
        let mut body = String::from("not ok:\n");
        for f in failing {
            body.push_str("- ");
            body.push_str(f);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, Bytes::from(body))
    }
}

fn handle(metrics: &Metrics, health: &Health, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let now = Instant::now();
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            metrics.set_ready(health.readiness(now).is_empty());
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(metrics.render()),
            )
        }
        (&Method::GET, "/healthz") => {
            let (status, body) = health_response(&health.liveness(now));
            (status, "text/plain", body)
        }
        (&Method::GET, "/readyz") => {
            let (status, body) = health_response(&health.readiness(now));
            (status, "text/plain", body)
        }
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"method not allowed\n"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    resp
}

/// What the agent's health depends on, and how long things may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Readiness needs the API watch (NodeFill) to be alive.
    pub require_watch: bool,
    /// The watch counts as dead when no event (including a re-list) came
    /// for this long; `None`: only an explicit [`Health::set_watch_down`].
    pub watch_stale_after: Option<Duration>,
    /// Readiness needs the QUIC endpoint up.
    pub require_endpoint: bool,
    /// Liveness fails once a content has been stuck this long, so the
    /// kubelet restarts an agent that cannot recover by itself.
    pub stuck_liveness_after: Duration,
}

impl HealthConfig {
    /// The DaemonSet agent: watch and endpoint required.
    pub fn node() -> HealthConfig {
        HealthConfig {
            require_watch: true,
            // kube-rs watchers re-list at least every ~5 min (server-side
            // watch timeout), so 15 min without any event is a dead watch.
            watch_stale_after: Some(Duration::from_secs(15 * 60)),
            require_endpoint: true,
            stuck_liveness_after: Duration::from_secs(10 * 60),
        }
    }

    /// No requirement: always ready (one-shot runs, the legacy endpoint).
    pub fn none() -> HealthConfig {
        HealthConfig {
            require_watch: false,
            watch_stale_after: None,
            require_endpoint: false,
            stuck_liveness_after: Duration::MAX,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum WatchState {
    Never,
    Alive(Instant),
    Down { since: Instant, error: String },
}

#[derive(Debug)]
struct HealthState {
    cfg: HealthConfig,
    watch: WatchState,
    endpoint_up: bool,
    /// Contents stuck, with when they were first seen stuck.
    stuck: BTreeMap<String, Instant>,
}

/// The agent's health, shared by the endpoint and whoever observes the
/// watch, the endpoint and the contents. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Mutex<HealthState>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::always_ready()
    }
}

impl Health {
    pub fn new(cfg: HealthConfig) -> Health {
        Health {
            inner: Arc::new(Mutex::new(HealthState {
                cfg,
                watch: WatchState::Never,
                endpoint_up: false,
                stuck: BTreeMap::new(),
            })),
        }
    }

    /// A health with no requirement: ready unless a content is stuck.
    pub fn always_ready() -> Health {
        Self::new(HealthConfig::none())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The API watch delivered an event (or (re)listed) at `at`.
    pub fn set_watch_alive(&self, at: Instant) {
        self.lock().watch = WatchState::Alive(at);
    }

    /// The API watch failed (it retries; readiness fails until it recovers).
    pub fn set_watch_down(&self, at: Instant, error: impl Into<String>) {
        let mut s = self.lock();
        // Keep the first failure time across retries.
        let since = match &s.watch {
            WatchState::Down { since, .. } => *since,
            _ => at,
        };
        s.watch = WatchState::Down {
            since,
            error: error.into(),
        };
    }

    /// The QUIC endpoint is (or is no longer) accepting connections.
    pub fn set_endpoint_up(&self, up: bool) {
        self.lock().endpoint_up = up;
    }

    /// Content `content` makes no progress although it should (`true`), or
    /// recovered / finished / was removed (`false`).
    pub fn set_stuck(&self, content: &str, stuck: bool) {
        self.set_stuck_at(content, stuck, Instant::now());
    }

    /// [`Health::set_stuck`] with an explicit time (tests).
    pub fn set_stuck_at(&self, content: &str, stuck: bool, at: Instant) {
        let mut s = self.lock();
        if stuck {
            s.stuck.entry(content.to_string()).or_insert(at);
        } else {
            s.stuck.remove(content);
        }
    }

    /// The failing readiness checks at `now` (empty: ready).
    pub fn readiness(&self, now: Instant) -> Vec<String> {
        let s = self.lock();
        let mut failing = Vec::new();
        if s.cfg.require_watch {
            match &s.watch {
                WatchState::Never => failing.push("watch: no NodeFill watch event yet".into()),
                WatchState::Down { since, error } => failing.push(format!(
                    "watch: failing for {}s: {error}",
                    now.saturating_duration_since(*since).as_secs()
                )),
                WatchState::Alive(at) => {
                    let quiet = now.saturating_duration_since(*at);
                    if s.cfg.watch_stale_after.is_some_and(|max| quiet > max) {
                        failing.push(format!(
                            "watch: no NodeFill watch event for {}s",
                            quiet.as_secs()
                        ));
                    }
                }
            }
        }
        if s.cfg.require_endpoint && !s.endpoint_up {
            failing.push("quic endpoint: down".into());
        }
        for (content, since) in &s.stuck {
            failing.push(format!(
                "content {content}: stuck for {}s",
                now.saturating_duration_since(*since).as_secs()
            ));
        }
        failing
    }

    /// The failing liveness checks at `now`: only what a restart may fix (a
    /// content stuck for long). A dead API watch is not one: restarting
    /// every agent during an API outage helps nobody.
    pub fn liveness(&self, now: Instant) -> Vec<String> {
        let s = self.lock();
        s.stuck
            .iter()
            .filter(|(_, since)| {
                now.saturating_duration_since(**since) > s.cfg.stuck_liveness_after
            })
            .map(|(content, since)| {
                format!(
                    "content {content}: stuck for {}s",
                    now.saturating_duration_since(*since).as_secs()
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn names_are_the_documented_ones() {
        let names = metric_names();
        assert_eq!(
            names,
            vec![
                "peerfill_agent_content_progress_ratio",
                "peerfill_agent_content_receive_bytes_per_second",
                "peerfill_agent_origin_requests_total",
                "peerfill_agent_peers_banned_total",
                "peerfill_agent_peers_connected",
                "peerfill_agent_pieces_rejected_total",
                "peerfill_agent_pieces_verified_total",
                "peerfill_agent_ready",
                "peerfill_agent_received_bytes_total",
                "peerfill_agent_sent_bytes_total",
            ]
        );
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn scrape_over_loopback() {
        let m = Metrics::new();
        m.received(Source::Origin, 1234);
        m.received(Source::Peer, 10);
        m.sent(7);
        m.piece_verified();
        m.piece_rejected("hash_mismatch");
        m.peer_connected();
        m.peer_connected();
        m.peer_disconnected();
        m.set_progress("ns/dist", 0.5);
        m.set_rate("ns/dist", 1e6);
        m.origin_request("ok");

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_listener(listener, m.clone()));
        let body = tokio::time::timeout(std::time::Duration::from_secs(10), get(addr, "/metrics"))
            .await
            .unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("peerfill_agent_received_bytes_total{source=\"origin\"} 1234"));
        assert!(body.contains("peerfill_agent_peers_connected 1"));
        assert!(body.contains("peerfill_agent_content_progress_ratio{content=\"ns/dist\"} 0.5"));
        assert!(body.contains("peerfill_agent_pieces_rejected_total{reason=\"hash_mismatch\"} 1"));

        m.sent(3);
        let body = get(addr, "/metrics").await;
        assert!(
            body.contains("peerfill_agent_sent_bytes_total 10"),
            "{body}"
        );
        let health = get(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        m.remove_content("ns/dist");
        assert!(!m.render().contains("ns/dist"));
        server.abort();
    }

    #[test]
    fn readiness_reflects_watch_endpoint_and_stuck_contents() {
        let t0 = Instant::now();
        let h = Health::new(HealthConfig::node());
        let r = h.readiness(t0);
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].starts_with("watch: no NodeFill watch event yet"));
        assert_eq!(r[1], "quic endpoint: down");
        h.set_watch_alive(t0);
        h.set_endpoint_up(true);
        assert!(h.readiness(t0).is_empty());
        // A watch quiet for longer than allowed is dead.
        let later = t0 + Duration::from_secs(16 * 60);
        assert_eq!(
            h.readiness(later),
            vec!["watch: no NodeFill watch event for 960s"]
        );
        h.set_watch_alive(later);
        assert!(h.readiness(later).is_empty());
        // Watch errors: not ready, first failure time kept across retries.
        h.set_watch_down(later, "connection refused");
        h.set_watch_down(later + Duration::from_secs(5), "connection refused");
        assert_eq!(
            h.readiness(later + Duration::from_secs(10)),
            vec!["watch: failing for 10s: connection refused"]
        );
        // ... but liveness does not restart the agent for it.
        assert!(h.liveness(later + Duration::from_secs(3600)).is_empty());
        h.set_watch_alive(later);
        // A stuck content: not ready at once, not live after the bound.
        h.set_stuck_at("ns/a", true, later);
        h.set_stuck_at("ns/a", true, later + Duration::from_secs(30));
        assert_eq!(
            h.readiness(later + Duration::from_secs(60)),
            vec!["content ns/a: stuck for 60s"]
        );
        assert!(h.liveness(later + Duration::from_secs(60)).is_empty());
        assert_eq!(
            h.liveness(later + Duration::from_secs(601)),
            vec!["content ns/a: stuck for 601s"]
        );
        h.set_stuck("ns/a", false);
        assert!(h.readiness(later).is_empty());
        assert!(h.liveness(later + Duration::from_secs(9999)).is_empty());
        h.set_endpoint_up(false);
        assert_eq!(h.readiness(later), vec!["quic endpoint: down"]);
        // The one-shot health has no requirement.
        assert!(Health::always_ready().readiness(t0).is_empty());
    }

    #[tokio::test]
    async fn readyz_flips_over_http() {
        let h = Health::new(HealthConfig::node());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_with(
            listener,
            Metrics::new(),
            h.clone(),
            ServerLimits::default(),
        ));
        let bound = Duration::from_secs(10);
        let r = tokio::time::timeout(bound, get(addr, "/readyz"))
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("- quic endpoint: down"), "{r}");
        let m = tokio::time::timeout(bound, get(addr, "/metrics"))
            .await
            .unwrap();
        assert!(m.contains("\npeerfill_agent_ready 0\n"), "{m}");
        h.set_watch_alive(Instant::now());
        h.set_endpoint_up(true);
        let r = tokio::time::timeout(bound, get(addr, "/readyz"))
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let m = tokio::time::timeout(bound, get(addr, "/metrics"))
            .await
            .unwrap();
        assert!(m.contains("\npeerfill_agent_ready 1\n"), "{m}");
        h.set_stuck("ns/x", true);
        let r = tokio::time::timeout(bound, get(addr, "/readyz"))
            .await
            .unwrap();
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("content ns/x: stuck"),
            "{r}"
        );
        let r = tokio::time::timeout(bound, get(addr, "/healthz"))
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        server.abort();
    }

    /// 200 clients each send half a request head and stall. The server holds
    /// at most `max_connections` of them, closes the rest at once, closes
    /// the held ones at the header timeout, and then serves again.
    #[tokio::test]
    async fn slow_clients_are_capped_and_timed_out() {
        const CLIENTS: usize = 200;
        let limits = ServerLimits {
            header_read_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_secs(3),
            max_connections: 16,
            max_request_bytes: 8192,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(ConnStats::default());
        let metrics = Metrics::new();
        let health = Health::always_ready();
        let server = tokio::spawn(serve_http(listener, limits, stats.clone(), move |req| {
            handle(&metrics, &health, req)
        }));
        // Everything below is bounded: a hang fails the test, never blocks CI.
        tokio::time::timeout(Duration::from_secs(60), async {
            let mut clients = Vec::new();
            for _ in 0..CLIENTS {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                // Half a request head, never finished. (Writing may fail
                // once the server closed a refused connection.)
                let _ = s
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow:")
                    .await;
                clients.push(s);
            }
            // Every connection was seen by the server: served or refused.
            while stats.accepted() + stats.refused() < CLIENTS as u64 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                stats.peak() <= limits.max_connections,
                "peak {}",
                stats.peak()
            );
            assert!(stats.refused() >= (CLIENTS - limits.max_connections) as u64);
            // Every client sees its connection closed by the server (EOF
            // or reset), refused ones at once, held ones at the timeout,
            // none ever gets a response.
            for mut c in clients {
                let mut buf = Vec::new();
                let _ = c.read_to_end(&mut buf).await;
                let text = String::from_utf8_lossy(&buf);
                assert!(
                    buf.is_empty() || text.starts_with("HTTP/1.1 408"),
                    "unexpected answer to a half request: {text}"
                );
            }
            while stats.active() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(stats.peak() <= limits.max_connections);
            // The server still answers.
            let r = get(addr, "/healthz").await;
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        })
        .await
        .expect("slow clients were not closed in time");
        server.abort();
    }
}
