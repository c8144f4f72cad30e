//! Prometheus metrics and the `/metrics` + `/healthz` + `/readyz` endpoint,
//! served by every replica (leader or standby), with the agent's hardened
//! server (`peerfill_agent::metrics::serve_http`: header-read timeout,
//! connection deadline and cap, bounded request heads).
//!
//! Per-Distribution gauges (phase, node counts, failing nodes by reason,
//! throughput) mirror the statuses the leader writes, so alerts (the
//! chart's PrometheusRule) can name the Distribution that is stuck or
//! failing. Only the leader sets them; a standby exports none, and the
//! rules join on `peerfill_operator_leader == 1`. Their labels are
//! `distribution_namespace` and `distribution`: a scrape adds `namespace`
//! (the operator pod's), which must not collide.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use kube::ResourceExt;
use peerfill_agent::metrics::{ConnStats, ServerLimits, serve_http};
use peerfill_crds::{Distribution, Phase};
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
pub const DISTRIBUTION_PHASE: &str = "peerfill_operator_distribution_phase";
pub const DISTRIBUTION_NODES: &str = "peerfill_operator_distribution_nodes";
pub const DISTRIBUTION_FAILING: &str = "peerfill_operator_distribution_failing_nodes";
pub const DISTRIBUTION_RATE: &str = "peerfill_operator_distribution_bytes_per_second";

/// Phases as exported (a Distribution without a status is `Unknown`).
const PHASES: [&str; 6] = [
    "Pending",
    "Progressing",
    "Complete",
    "Failed",
    "Deleting",
    "Unknown",
];

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
        DISTRIBUTION_PHASE,
        DISTRIBUTION_NODES,
        DISTRIBUTION_FAILING,
        DISTRIBUTION_RATE,
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
    /// 1 for each Distribution's current phase.
    pub distribution_phase: IntGaugeVec,
    /// Nodes of a Distribution by `state` (desired, complete, failed).
    pub distribution_nodes: IntGaugeVec,
    /// Failing nodes listed in a Distribution's status, by `reason`.
    pub distribution_failing: IntGaugeVec,
    /// Aggregate receive rate of a Distribution's nodes.
    pub distribution_rate: IntGaugeVec,
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
        let per_dist = |name: &str, help: &str, extra: Option<&str>| {
            let mut labels = vec!["distribution_namespace", "distribution"];
            labels.extend(extra);
            IntGaugeVec::new(Opts::new(name, help), &labels)
        };
        let distribution_phase = per_dist(
            DISTRIBUTION_PHASE,
            "1 for the phase a Distribution is in",
            Some("phase"),
        )?;
        let distribution_nodes = per_dist(
            DISTRIBUTION_NODES,
            "Nodes of a Distribution by state (desired, complete, failed)",
            Some("state"),
        )?;
        let distribution_failing = per_dist(
            DISTRIBUTION_FAILING,
            "Failing nodes listed in a Distribution's status, by reason",
            Some("reason"),
        )?;
        let distribution_rate = per_dist(
            DISTRIBUTION_RATE,
            "Aggregate receive rate of a Distribution's nodes, bytes per second",
            None,
        )?;
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
        registry.register(Box::new(distribution_phase.clone()))?;
        registry.register(Box::new(distribution_nodes.clone()))?;
        registry.register(Box::new(distribution_failing.clone()))?;
        registry.register(Box::new(distribution_rate.clone()))?;
        Ok(Metrics {
            registry,
            distributions,
            reconcile_errors,
            reconcile_duration,
            leader,
            certificates_issued,
            spec_writes,
            node_events,
            distribution_phase,
            distribution_nodes,
            distribution_failing,
            distribution_rate,
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

    /// Sets the by-phase counts and the per-Distribution gauges from the
    /// statuses of every Distribution (the whole set: series of
    /// Distributions that are gone are dropped).
    pub fn observe_distributions(&self, dists: &[Arc<Distribution>]) {
        let mut by_phase: BTreeMap<&str, i64> = BTreeMap::new();
        self.distribution_phase.reset();
        self.distribution_nodes.reset();
        self.distribution_failing.reset();
        self.distribution_rate.reset();
        for dist in dists {
            let status = dist.status.as_ref();
            let phase = status
                .and_then(|s| s.phase)
                .map_or("Unknown", Phase::as_str);
            *by_phase.entry(phase).or_default() += 1;
            let ns = dist.namespace().unwrap_or_default();
            let name = dist.name_any();
            let id = [ns.as_str(), name.as_str()];
            let with = |extra: &'static str| [id[0], id[1], extra];
            for p in PHASES {
                self.distribution_phase
                    .with_label_values(&with(p))
                    .set(i64::from(p == phase));
            }
            let Some(s) = status else { continue };
            for (state, n) in [
                ("desired", s.desired_nodes),
                ("complete", s.complete_nodes),
                ("failed", s.failed_nodes),
            ] {
                self.distribution_nodes
                    .with_label_values(&with(state))
                    .set(i64::from(n.unwrap_or(0)));
            }
            let mut reasons: BTreeMap<&str, i64> = BTreeMap::new();
            for f in &s.failing_nodes {
                *reasons.entry(f.reason.as_str()).or_default() += 1;
            }
            for (reason, n) in reasons {
                self.distribution_failing
                    .with_label_values(&[id[0], id[1], reason])
                    .set(n);
            }
            let rate = s.bytes_per_second.unwrap_or(0);
            self.distribution_rate
                .with_label_values(&id)
                .set(i64::try_from(rate).unwrap_or(i64::MAX));
        }
        for p in PHASES {
            self.distributions
                .with_label_values(&[p])
                .set(by_phase.get(p).copied().unwrap_or(0));
        }
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

    fn dist(ns: &str, name: &str) -> Arc<Distribution> {
        let spec: peerfill_crds::DistributionSpec = serde_json::from_value(serde_json::json!({
            "source": {"http": {"url": "http://origin/x"}},
            "target": {"path": "x"},
        }))
        .expect("a valid spec");
        let mut d = Distribution::new(name, spec);
        d.metadata.namespace = Some(ns.into());
        Arc::new(d)
    }

    #[test]
    fn every_name_is_exported() {
        let m = Metrics::new().unwrap();
        m.distributions.with_label_values(&["Complete"]).set(1);
        m.reconcile_duration.observe(0.01);
        let mut d = (*dist("ns", "d")).clone();
        d.status = Some(peerfill_crds::DistributionStatus {
            failing_nodes: vec![peerfill_crds::FailingNode {
                node: "n".into(),
                reason: "DigestMismatch".into(),
                message: String::new(),
            }],
            ..Default::default()
        });
        m.observe_distributions(&[Arc::new(d)]);
        // A labelled family shows once it has a child.
        m.observe_trigger(crate::triggers::Trigger::State);
        let text = m.render();
        for name in metric_names() {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn per_distribution_gauges_follow_the_statuses() {
        use peerfill_crds::{DistributionStatus, FailingNode};
        let m = Metrics::new().unwrap();
        let mut d = (*dist("ml", "model")).clone();
        let failing = |node: &str, reason: &str| FailingNode {
            node: node.into(),
            reason: reason.into(),
            message: String::new(),
        };
        d.status = Some(DistributionStatus {
            phase: Some(Phase::Progressing),
            desired_nodes: Some(3),
            complete_nodes: Some(1),
            failed_nodes: Some(2),
            bytes_per_second: Some(1000),
            failing_nodes: vec![
                failing("a", "DigestMismatch"),
                failing("b", "DigestMismatch"),
            ],
            ..Default::default()
        });
        m.observe_distributions(&[Arc::new(d)]);
        let g = |v: &IntGaugeVec, extra: &str| v.with_label_values(&["ml", "model", extra]).get();
        assert_eq!(g(&m.distribution_phase, "Progressing"), 1);
        assert_eq!(g(&m.distribution_phase, "Complete"), 0);
        assert_eq!(g(&m.distribution_nodes, "failed"), 2);
        assert_eq!(g(&m.distribution_failing, "DigestMismatch"), 2);
        assert_eq!(
            m.distribution_rate
                .with_label_values(&["ml", "model"])
                .get(),
            1000
        );
        assert_eq!(m.distributions.with_label_values(&["Progressing"]).get(), 1);

        // A Distribution that is gone leaves no series behind.
        m.observe_distributions(&[]);
        assert!(!m.render().contains("distribution=\"model\""));
        assert_eq!(m.distributions.with_label_values(&["Progressing"]).get(), 0);
    }
}
