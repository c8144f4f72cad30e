//! A simulated agent: `peerfill-agent node`'s side of docs/control-path.md
//! without any data — CSR, certificate, endpoint, per-distribution status
//! and heartbeats, node label and Event on completion — with progress from
//! the shared [`Fluid`] model.
//!
//! Writes follow the contract's budget through the real agent's own
//! schedule (`peerfill_agent::k8s::report`: `projection`, `classify`,
//! `next_write`): urgent changes at once (never more than once a second),
//! completions held for `state_hold_seconds` and batched, everything else
//! with the periodic write once per `spec.reportIntervalSeconds`. The node
//! label patch goes out after the status write that reports a completion,
//! one patch for all of them, and no per-node completion Event is written
//! (as the real agent). Each agent watches only its own NodeFill (field
//! selector), as the real one does, so the API stand-in carries one watch
//! per node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use peerfill_agent::k8s::report::{self, Change, Projection};
use peerfill_crds::nodefill::CONDITION_AGENT_READY;
use peerfill_crds::{
    Assignment, NodeDistributionStatus, NodeFill, NodeFillStatus, NodePhase, node_label_key,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::ScaleError;
use super::fluid::{Fluid, Part};

/// What every simulated agent shares.
pub struct Shared {
    pub client: kube::Client,
    pub fluid: Mutex<Fluid>,
    /// Content size by Distribution name (what an authority learns from
    /// the origin or the source file).
    pub sizes: BTreeMap<String, u64>,
    /// The BLAKE3 root every authority reports.
    pub root: String,
    pub record: Mutex<Record>,
}

/// What the agents saw, for the report.
#[derive(Debug, Default)]
pub struct Record {
    /// Nodes whose agent holds its certificate and published its endpoint.
    pub ready: BTreeMap<String, Instant>,
    /// First time each node saw an assignment of a Distribution (by name).
    pub specified: BTreeMap<String, BTreeMap<String, Instant>>,
    /// When each node wrote `Complete` for a Distribution (by name).
    pub complete: BTreeMap<String, BTreeMap<String, Instant>>,
    /// Status writes by the agents, by cause.
    pub state_writes: u64,
    pub periodic_writes: u64,
    pub failed_writes: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `sha256:<hex>` of a PEM request, as the operator writes it back.
fn request_digest(csr_pem: &str) -> String {
    use sha2::Digest as _;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(csr_pem.as_bytes()))
    )
}

struct Agent {
    node: String,
    zone: String,
    endpoint: String,
    csr: String,
    digest: String,
    fingerprint: Option<String>,
    /// Phase and its transition time by uid.
    phases: BTreeMap<String, (NodePhase, Timestamp)>,
    labelled: BTreeMap<String, bool>,
    last_state: Option<Projection>,
    last_write: Option<tokio::time::Instant>,
    dirty_since: Option<tokio::time::Instant>,
}

/// Runs the agent of `node` until `stop`.
pub async fn run(
    node: String,
    zone: String,
    endpoint: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<(), ScaleError> {
    let (csr, _key) = peerfill_agent::tls::generate_csr(&node)
        .map_err(|e| ScaleError::Agent(format!("{node}: CSR: {e}")))?;
    let mut agent = Agent {
        digest: request_digest(&csr),
        node,
        zone,
        endpoint,
        csr,
        fingerprint: None,
        phases: BTreeMap::new(),
        labelled: BTreeMap::new(),
        last_state: None,
        last_write: None,
        dirty_since: None,
    };
    let api: Api<NodeFill> = Api::all(shared.client.clone());
    let config = watcher::Config::default().fields(&format!("metadata.name={}", agent.node));
    let mut fills = std::pin::pin!(
        watcher(api.clone(), config)
            .default_backoff()
            .applied_objects()
    );
    let mut fill: Option<NodeFill> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            next = fills.next() => match next {
                Some(Ok(f)) => fill = Some(f),
                Some(Err(e)) => tracing::debug!(node = %agent.node, error = %e, "watch"),
                None => return Err(ScaleError::Agent(format!("{}: watch ended", agent.node))),
            },
            _ = tick.tick() => {}
        }
        if let Some(f) = &fill {
            agent.step(f, &api, &shared).await;
        }
    }
}

impl Agent {
    async fn step(&mut self, fill: &NodeFill, api: &Api<NodeFill>, shared: &Shared) {
        let now = Timestamp::now();
        let answered = fill
            .spec
            .identity
            .as_ref()
            .filter(|id| id.request_digest == self.digest);
        if let (Some(id), None) = (answered, &self.fingerprint) {
            let identity = peerfill_agent::tls::NodeIdentity::new(
                self.node.clone(),
                id.certificate.clone(),
                String::new(),
                id.ca_certificate.clone(),
            );
            match identity.fingerprint() {
                Ok(fp) => {
                    self.fingerprint = Some(fp);
                    lock(&shared.record)
                        .ready
                        .insert(self.node.clone(), Instant::now());
                }
                Err(e) => tracing::warn!(node = %self.node, error = %e, "issued certificate"),
            }
        }
        let ready = self.fingerprint.is_some();
        let mut status = NodeFillStatus {
            certificate_request: Some(self.csr.clone()),
            agent_version: Some("scale-sim".into()),
            zone: Some(self.zone.clone()),
            ..NodeFillStatus::default()
        };
        status.conditions = vec![Condition {
            type_: CONDITION_AGENT_READY.into(),
            status: if ready { "True" } else { "False" }.into(),
            reason: if ready {
                "Ready"
            } else {
                "WaitingForCertificate"
            }
            .into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(now),
        }];
        let mut completed = Vec::new();
        let mut authority = Vec::new();
        if ready {
            status.endpoint = Some(self.endpoint.clone());
            status.certificate_fingerprint = self.fingerprint.clone();
            for a in &fill.spec.distributions {
                lock(&shared.record)
                    .specified
                    .entry(a.name.clone())
                    .or_default()
                    .entry(self.node.clone())
                    .or_insert_with(Instant::now);
                let entry = self.entry(a, shared, now);
                authority.push(a.role.seed || a.origin_readers.iter().any(|r| r.node == self.node));
                if entry.phase == NodePhase::Complete {
                    completed.push(a.clone());
                }
                status.distributions.push(entry);
            }
            let n =
                |p: NodePhase| status.distributions.iter().filter(|d| d.phase == p).count() as u32;
            status.assigned = Some(status.distributions.len() as u32);
            status.complete = Some(n(NodePhase::Complete));
        }
        // Conditions carry their own transition time: keep it stable.
        if let Some(old) = fill.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == CONDITION_AGENT_READY)
        }) && old.status == status.conditions[0].status
        {
            status.conditions[0].last_transition_time = old.last_transition_time.clone();
        }
        let interval = report::report_interval(fill.spec.report_interval_seconds);
        let with: Vec<report::Entry<'_>> = status
            .distributions
            .iter()
            .zip(authority.iter().copied())
            .collect();
        let state = report::projection(
            status.endpoint.as_deref(),
            status.certificate_fingerprint.as_deref(),
            &self.digest,
            &with,
        );
        let change = report::classify(self.last_state.as_ref(), &state);
        let tnow = tokio::time::Instant::now();
        if change == Change::Progress {
            self.dirty_since = None;
        } else {
            self.dirty_since.get_or_insert(tnow);
        }
        if report::next_write(tnow, self.last_write, interval, change, self.dirty_since) > tnow {
            return;
        }
        let changed = change != Change::Progress;
        status.last_heartbeat = Some(Time(now));
        let patch = json!({ "status": status });
        match api
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.last_state = Some(state);
                self.last_write = Some(tokio::time::Instant::now());
                self.dirty_since = None;
                let mut record = lock(&shared.record);
                if changed {
                    record.state_writes += 1;
                } else {
                    record.periodic_writes += 1;
                }
                for a in &completed {
                    record
                        .complete
                        .entry(a.name.clone())
                        .or_default()
                        .entry(self.node.clone())
                        .or_insert_with(Instant::now);
                }
            }
            Err(e) => {
                // Retried after the spacing, as an urgent change.
                self.last_state = None;
                self.last_write = Some(tokio::time::Instant::now());
                lock(&shared.record).failed_writes += 1;
                tracing::debug!(node = %self.node, error = %e, "status write");
                return;
            }
        }
        let fresh: Vec<&Assignment> = completed
            .iter()
            .filter(|a| !self.labelled.contains_key(&a.uid))
            .collect();
        if !fresh.is_empty() {
            self.label(&fresh, shared).await;
        }
    }

    /// This node's entry for assignment `a`.
    fn entry(&mut self, a: &Assignment, shared: &Shared, now: Timestamp) -> NodeDistributionStatus {
        let seeder = a.role.seed;
        let reader = a.origin_readers.iter().find(|r| r.node == self.node);
        let authority = seeder || reader.is_some();
        // Authorities learn the size themselves (HEAD / stat).
        let size = a.size.or_else(|| {
            authority
                .then(|| shared.sizes.get(&a.name).copied())
                .flatten()
        });
        // As the agent's `translate`: the operator's choice once pinned,
        // else the rule applied to the size learnt.
        let piece_size = a
            .effective_piece_size()
            .or(size.map(peerfill_crds::validation::auto_piece_size))
            .unwrap_or(0);
        let mut entry = NodeDistributionStatus {
            namespace: a.namespace.clone(),
            name: a.name.clone(),
            uid: a.uid.clone(),
            phase: NodePhase::Pending,
            files: None,
            content_id: Some(a.content_id.clone()),
            size,
            root: authority.then(|| shared.root.clone()),
            origin_version: None,
            bytes_done: 0,
            pieces_done: 0,
            piece_count: 0,
            bytes_from_origin: 0,
            bytes_from_peers: 0,
            bytes_per_second: 0,
            manifest_digest: None,
            digest: None,
            reason: None,
            message: None,
            last_transition_time: None,
        };
        match (a.size, size) {
            (_, None) => entry.reason = Some("WaitingForSize".into()),
            (pinned, Some(size)) => {
                let mut fluid = lock(&shared.fluid);
                if seeder {
                    fluid.join(&a.uid, &self.node, size, Part::Seeder);
                } else if pinned.is_some() {
                    let part = match reader {
                        Some(r) if piece_size > 0 => Part::Reader {
                            range: (r.end.saturating_sub(r.start) * piece_size).min(size),
                        },
                        _ => Part::Peer,
                    };
                    fluid.join(&a.uid, &self.node, size, part);
                }
                let progress = fluid.progress(&a.uid, &self.node);
                entry.phase = NodePhase::Downloading;
                if let Some(p) = progress {
                    entry.bytes_done = p.bytes;
                    entry.bytes_from_origin = p.from_origin;
                    entry.bytes_from_peers = p.bytes.saturating_sub(p.from_origin);
                    entry.bytes_per_second = p.rate;
                    if piece_size > 0 {
                        entry.piece_count = size.div_ceil(piece_size);
                        entry.pieces_done = p.bytes / piece_size;
                    }
                    // Complete only against the pinned root.
                    if p.complete && a.manifest_digest.is_some() {
                        entry.phase = NodePhase::Complete;
                        entry.pieces_done = entry.piece_count;
                        entry.manifest_digest = a.manifest_digest.clone();
                        entry.digest = a.manifest_digest.clone();
                        entry.bytes_per_second = 0;
                    }
                }
            }
        }
        let key = a.uid.clone();
        let since = match self.phases.get(&key) {
            Some((phase, at)) if *phase == entry.phase => *at,
            _ => now,
        };
        self.phases.insert(key, (entry.phase, since));
        entry.last_transition_time = Some(Time(since));
        entry
    }

    /// The node labels of the completions a status write just reported,
    /// in one patch.
    async fn label(&mut self, complete: &[&Assignment], shared: &Shared) {
        let nodes: Api<Node> = Api::all(shared.client.clone());
        let labels: serde_json::Map<String, Value> = complete
            .iter()
            .map(|a| {
                (
                    node_label_key(&a.namespace, &a.name),
                    json!(peerfill_crds::NODE_LABEL_VALUE),
                )
            })
            .collect();
        let patch = json!({ "metadata": { "labels": labels } });
        match nodes
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                for a in complete {
                    self.labelled.insert(a.uid.clone(), true);
                }
            }
            Err(e) => {
                lock(&shared.record).failed_writes += 1;
                tracing::debug!(node = %self.node, error = %e, "label");
            }
        }
    }
}
