//! Prometheus metrics of the agent and the HTTP endpoint that exposes them.
//!
//! The metric names here are an interface: the chart's Grafana dashboard
//! queries them, and CI checks the dashboard against [`metric_names`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::core::Collector;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
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

        let collectors: [Box<dyn Collector>; 9] = [
            Box::new(received_bytes.clone()),
            Box::new(sent_bytes.clone()),
            Box::new(pieces_verified.clone()),
            Box::new(pieces_rejected.clone()),
            Box::new(peers_connected.clone()),
            Box::new(peers_banned.clone()),
            Box::new(content_progress.clone()),
            Box::new(content_rate.clone()),
            Box::new(origin_requests.clone()),
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
        let collectors: [&dyn Collector; 9] = [
            &self.inner.received_bytes,
            &self.inner.sent_bytes,
            &self.inner.pieces_verified,
            &self.inner.pieces_rejected,
            &self.inner.peers_connected,
            &self.inner.peers_banned,
            &self.inner.content_progress,
            &self.inner.content_rate,
            &self.inner.origin_requests,
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

/// Serves `GET /metrics` (Prometheus text format) and `GET /healthz` on
/// `addr` until the task is dropped or accepting fails.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> Result<(), std::io::Error> {
    let listener = TcpListener::bind(addr).await?;
    serve_listener(listener, metrics).await
}

/// [`serve`] on an already bound listener (tests bind port 0).
pub async fn serve_listener(listener: TcpListener, metrics: Metrics) -> Result<(), std::io::Error> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) if is_transient_accept_error(&e) => {
                warn!(error = %e, "metrics: accept failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(handle(&metrics, req)) }
            });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(libc::EMFILE)
        || e.raw_os_error() == Some(libc::ENFILE)
}

fn handle(metrics: &Metrics, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(metrics.render()),
        ),
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
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
}
