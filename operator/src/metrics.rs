//! Prometheus metrics and the `/metrics` + `/healthz` endpoint, served by
//! every replica (leader or standby).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;

use crate::error::Error;

pub const DISTRIBUTIONS: &str = "peerfill_operator_distributions";
pub const RECONCILE_ERRORS: &str = "peerfill_operator_reconcile_errors_total";
pub const RECONCILE_DURATION: &str = "peerfill_operator_reconcile_duration_seconds";
pub const LEADER: &str = "peerfill_operator_leader";
pub const CERTIFICATES_ISSUED: &str = "peerfill_operator_node_certificates_issued_total";

/// Every metric name the operator exports (histograms as their base name).
pub fn metric_names() -> Vec<&'static str> {
    vec![
        DISTRIBUTIONS,
        RECONCILE_ERRORS,
        RECONCILE_DURATION,
        LEADER,
        CERTIFICATES_ISSUED,
    ]
}

/// The operator's metrics, one registry per instance.
pub struct Metrics {
    pub registry: Registry,
    /// Distributions by `phase`.
    pub distributions: IntGaugeVec,
    pub reconcile_errors: IntCounter,
    pub reconcile_duration: Histogram,
    pub leader: IntGauge,
    pub certificates_issued: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new();
        let distributions = IntGaugeVec::new(
            Opts::new(DISTRIBUTIONS, "Distributions by phase"),
            &["phase"],
        )?;
        let reconcile_errors = IntCounter::new(RECONCILE_ERRORS, "Reconciles that failed")?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(RECONCILE_DURATION, "Time spent reconciling a Distribution")
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
        )?;
        let leader = IntGauge::new(LEADER, "1 while this replica holds the leader lease")?;
        let certificates_issued = IntCounter::new(CERTIFICATES_ISSUED, "Node certificates signed")?;
        registry.register(Box::new(distributions.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(certificates_issued.clone()))?;
        Ok(Metrics {
            registry,
            distributions,
            reconcile_errors,
            reconcile_duration,
            leader,
            certificates_issued,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Binds `addr` now (so a bad address fails at start), serves later.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::MetricsBind { addr, source })
}

/// Bounds of the metrics server, so that slow or many clients cannot pin
/// the operator's memory or tasks (a scrape needs one short connection).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; further ones are closed at once.
    pub max_connections: usize,
    /// Longest wait for a request's headers.
    pub header_read_timeout: Duration,
    /// Longest life of one connection (keep-alive included).
    pub connection_lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(5),
            connection_lifetime: Duration::from_secs(60),
        }
    }
}

/// Serves `GET /metrics` and `GET /healthz` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> Result<(), Error> {
    serve_with(listener, metrics, Limits::default()).await
}

/// [`serve`] with explicit [`Limits`].
pub async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> Result<(), Error> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept");
                // E.g. out of file descriptors: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: connection cap reached, closing");
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.connection_lifetime, conn).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
                Ok(Ok(())) => {}
                Err(_) => tracing::debug!(%peer, "metrics connection outlived its lifetime"),
            }
        });
    }
}

fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads until the server closes the connection (bounded by the test).
    async fn closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt as _;
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got).await;
        got
    }

    #[tokio::test]
    async fn slow_and_surplus_clients_are_cut_off() {
        use tokio::io::AsyncWriteExt as _;
        let test = async {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let limits = Limits {
                max_connections: 2,
                header_read_timeout: Duration::from_secs(2),
                connection_lifetime: Duration::from_secs(5),
            };
            let server = tokio::spawn(serve_with(
                listener,
                Arc::new(Metrics::new().unwrap()),
                limits,
            ));
            // Two clients that never finish their headers hold both slots.
            let mut slow = Vec::new();
            for _ in 0..2 {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    .await
                    .unwrap();
                slow.push(s);
            }
            // Once the server holds both, any further client is closed at
            // once, without an answer (polled: the accepts race the
            // clients).
            let mut refused = false;
            for _ in 0..100 {
                let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
                let _ = extra
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await;
                if closed(&mut extra).await.is_empty() {
                    refused = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(refused, "the connection cap never applied");
            // The slow ones are cut off by the header timeout (hyper may
            // answer 408 first), which frees the slots.
            for mut s in slow {
                let got = closed(&mut s).await;
                assert!(
                    got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
                    "{}",
                    String::from_utf8_lossy(&got)
                );
            }
            let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
            ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let got = closed(&mut ok).await;
            assert!(
                got.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&got)
            );
            server.abort();
        };
        tokio::time::timeout(Duration::from_secs(20), test)
            .await
            .expect("bounded");
    }

    #[test]
    fn every_name_is_exported() {
        let m = Metrics::new().unwrap();
        m.distributions.with_label_values(&["Complete"]).set(1);
        m.reconcile_duration.observe(0.01);
        let text = m.render();
        for name in metric_names() {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
