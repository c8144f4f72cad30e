//! Prometheus metrics and the `/metrics` + `/healthz` + `/readyz` endpoint,
//! served by every replica (leader or standby), with the agent's hardened
//! server (`peerfill_agent::metrics::serve_http`: header-read timeout,
//! connection deadline and cap, bounded request heads).

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use peerfill_agent::metrics::{ConnStats, ServerLimits, serve_http};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::error::Error;

pub const DISTRIBUTIONS: &str = "peerfill_operator_distributions";
pub const RECONCILE_ERRORS: &str = "peerfill_operator_reconcile_errors_total";
pub const RECONCILE_DURATION: &str = "peerfill_operator_reconcile_duration_seconds";
pub const LEADER: &str = "peerfill_operator_leader";
pub const CERTIFICATES_ISSUED: &str = "peerfill_operator_node_certificates_issued_total";
pub const SPEC_WRITES: &str = "peerfill_operator_nodefill_spec_writes_total";
pub const NODE_EVENTS: &str = "peerfill_operator_node_events_total";

/// Every metric name the operator exports (histograms as their base name).
pub fn metric_names() -> Vec<&'static str> {
    vec![
        DISTRIBUTIONS,
        RECONCILE_ERRORS,
        RECONCILE_DURATION,
        LEADER,
        CERTIFICATES_ISSUED,
        SPEC_WRITES,
        NODE_EVENTS,
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
    /// NodeFill spec writes (after the write budget).
    pub spec_writes: IntCounter,
    /// Node/NodeFill watch events by what they triggered (`trigger`:
    /// nothing, progress, state).
    pub node_events: IntCounterVec,
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
        let spec_writes = IntCounter::new(SPEC_WRITES, "NodeFill spec writes")?;
        let node_events = IntCounterVec::new(
            Opts::new(
                NODE_EVENTS,
                "Node/NodeFill watch events by what they triggered",
            ),
            &["trigger"],
        )?;
        registry.register(Box::new(certificates_issued.clone()))?;
        registry.register(Box::new(spec_writes.clone()))?;
        registry.register(Box::new(node_events.clone()))?;
        Ok(Metrics {
            registry,
            distributions,
            reconcile_errors,
            reconcile_duration,
            leader,
            certificates_issued,
            spec_writes,
            node_events,
        })
    }

    /// Counts one Node/NodeFill event by what it triggered.
    pub fn observe_trigger(&self, trigger: crate::triggers::Trigger) {
        use crate::triggers::Trigger;
        let label = match trigger {
            Trigger::Nothing => "nothing",
            Trigger::Progress => "progress",
            Trigger::State => "state",
        };
        self.node_events.with_label_values(&[label]).inc();
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

/// Serves `GET /metrics`, `GET /healthz` and `GET /readyz` until the task
/// is dropped or accepting fails for good.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> Result<(), Error> {
    let addr = listener.local_addr().ok();
    serve_http(
        listener,
        ServerLimits::default(),
        Arc::new(ConnStats::default()),
        move |req| respond(req, &metrics),
    )
    .await
    .map_err(|source| Error::MetricsBind {
        addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        source,
    })
}

fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        // A replica that serves this is alive; a standby is ready too (it
        // only waits for the lease, and must not be restarted for it).
        (&Method::GET, "/healthz" | "/readyz") => {
            (StatusCode::OK, "text/plain", "ok\n".to_string())
        }
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

    #[test]
    fn every_name_is_exported() {
        let m = Metrics::new().unwrap();
        m.distributions.with_label_values(&["Complete"]).set(1);
        m.reconcile_duration.observe(0.01);
        // A labelled family shows once it has a child.
        m.observe_trigger(crate::triggers::Trigger::State);
        let text = m.render();
        for name in metric_names() {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
