//! A simulated agent: `peerfill-agent node`'s side of docs/control-path.md
//! without any data — CSR, certificate, endpoint, per-distribution status
//! and heartbeats, node label and Event on completion — with progress from
//! the shared [`Fluid`] model.
//!
//! Writes follow the contract's budget: the NodeFill status at once on a
//! change of state (never more than once a second), otherwise once per
//! `spec.reportIntervalSeconds` (progress and heartbeat). Each agent
//! watches only its own NodeFill (field selector), as the real one does,
//! so the API stand-in carries one watch per node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
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

/// The status without the heartbeat and the progress counters: a change
/// of this is a change of state.
fn state_of(status: &NodeFillStatus) -> Value {
    let mut v = serde_json::to_value(status).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("lastHeartbeat");
        if let Some(Value::Array(entries)) = o.get_mut("distributions") {
            for e in entries.iter_mut().filter_map(Value::as_object_mut) {
                for f in [
                    "bytesDone",
                    "piecesDone",
                    "bytesFromOrigin",
                    "bytesFromPeers",
                    "bytesPerSecond",
                ] {
                    e.remove(f);
                }
            }
        }
    }
    v
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
    last_state: Option<Value>,
    last_write: Option<Instant>,
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
    };
    let api: Api<NodeFill> = Api::all(shared.client.clone());
    let config = watcher::Config::default().fields(&format!("metadata.name={}", agent.node));
    let mut fills = std::pin::pin!(
        watcher(api.clone(), config)
            .default_backoff()
            .applied_objects()
    );
    let recorder = Recorder::new(
        shared.client.clone(),
        Reporter {
            controller: "peerfill-agent".into(),
            instance: Some(agent.node.clone()),
        },
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
            agent.step(f, &api, &shared, &recorder).await;
        }
    }
}

impl Agent {
    async fn step(
        &mut self,
        fill: &NodeFill,
        api: &Api<NodeFill>,
        shared: &Shared,
        recorder: &Recorder,
    ) {
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
        let interval = Duration::from_secs(fill.spec.report_interval_seconds.unwrap_or(2).into());
        let state = state_of(&status);
        let since = self.last_write.map(|t| t.elapsed());
        let changed = self.last_state.as_ref() != Some(&state);
        let due = match since {
            None => true,
            Some(s) if changed => s >= Duration::from_secs(1),
            Some(s) => s >= interval,
        };
        if !due {
            return;
        }
        status.last_heartbeat = Some(Time(now));
        let patch = json!({ "status": status });
        match api
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.last_state = Some(state);
                self.last_write = Some(Instant::now());
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
                lock(&shared.record).failed_writes += 1;
                tracing::debug!(node = %self.node, error = %e, "status write");
                return;
            }
        }
        for a in completed {
            if self.labelled.insert(a.uid.clone(), true).is_none() {
                self.label_and_tell(&a, fill, shared, recorder).await;
            }
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
        let piece_size = match a.piece_size {
            0 => size.map_or(0, peerfill_crds::validation::auto_piece_size),
            p => p,
        };
        let mut entry = NodeDistributionStatus {
            namespace: a.namespace.clone(),
            name: a.name.clone(),
            uid: a.uid.clone(),
            phase: NodePhase::Pending,
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

    /// The node label and the `DistributionComplete` Event.
    async fn label_and_tell(
        &self,
        a: &Assignment,
        fill: &NodeFill,
        shared: &Shared,
        recorder: &Recorder,
    ) {
        let nodes: Api<Node> = Api::all(shared.client.clone());
        let label = node_label_key(&a.namespace, &a.name);
        let patch = json!({ "metadata": { "labels": { label: peerfill_crds::NODE_LABEL_VALUE } } });
        if let Err(e) = nodes
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            lock(&shared.record).failed_writes += 1;
            tracing::debug!(node = %self.node, error = %e, "label");
        }
        let ev = Event {
            type_: EventType::Normal,
            reason: "DistributionComplete".into(),
            note: Some(format!("{}/{} is complete", a.namespace, a.name)),
            action: "Distribute".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &fill.object_ref(&())).await {
            tracing::debug!(node = %self.node, error = %e, "event");
        }
        let _ = fill.name_any();
    }
}
