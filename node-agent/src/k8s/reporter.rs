//! The NodeFill status: the entry of every assignment, written as a merge
//! patch on the status subresource within the write budget, and an Event
//! when a distribution completes or fails here.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter as EventReporter};
use peerfill_crds::nodefill::{CONDITION_AGENT_READY, NodeDistributionStatus, NodeFill, NodePhase};
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::identity::Request;
use super::reconcile::{NodeAgent, Removal, Tracked};
use super::report;
use super::translate::Desired;
use super::{AGENT_VERSION, NodeArgs};
use crate::agent::Phase;

pub(super) fn now_time() -> Time {
    Time(Timestamp::now())
}

fn condition(status: bool, reason: &str, message: String, since: &Time) -> Condition {
    Condition {
        type_: CONDITION_AGENT_READY.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: None,
        last_transition_time: since.clone(),
    }
}

impl NodeAgent {
    /// Writes the status if due; returns when the next write is due.
    pub(super) async fn report(&mut self) -> Instant {
        let mut entries = Vec::new();
        for t in self.tracked.values() {
            entries.push(self.entry(t));
        }
        self.reporter.publish(entries, &self.removing).await
    }

    /// The status entry of one assignment.
    pub(super) fn entry(&self, t: &Tracked) -> NodeDistributionStatus {
        let a = &t.assignment;
        let mut e = NodeDistributionStatus {
            namespace: a.namespace.clone(),
            name: a.name.clone(),
            uid: a.uid.clone(),
            phase: NodePhase::Pending,
            bytes_done: 0,
            content_id: Some(a.content_id.clone()),
            root: None,
            origin_version: None,
            size: a.size,
            pieces_done: 0,
            piece_count: a.piece_count().unwrap_or(0),
            bytes_from_origin: 0,
            bytes_from_peers: 0,
            bytes_per_second: 0,
            manifest_digest: None,
            digest: None,
            reason: None,
            message: None,
            last_transition_time: None,
        };
        match (&t.desired, &t.running) {
            (Desired::Wait { reason, message }, _) => {
                e.reason = Some((*reason).to_string());
                e.message = Some(message.clone());
            }
            (Desired::Invalid { reason, message }, _) => {
                e.phase = NodePhase::Failed;
                e.reason = Some((*reason).to_string());
                e.message = Some(message.clone());
            }
            (Desired::Run(_), Some(_)) => {
                let id = &a.content_id;
                if let Some(st) = self.engine.status(id) {
                    e.phase = match st.phase {
                        Phase::Pending => NodePhase::Pending,
                        Phase::Fetching => NodePhase::Downloading,
                        Phase::Complete => NodePhase::Complete,
                        Phase::Failed => NodePhase::Failed,
                    };
                    if st.size_known {
                        e.size = Some(st.size);
                        e.piece_count = u64::from(st.piece_count);
                    }
                    e.bytes_done = st.bytes_done;
                    e.pieces_done = u64::from(st.pieces_done);
                    e.bytes_from_origin = st.bytes_from_origin;
                    e.bytes_from_peers = st.bytes_from_peers;
                    e.bytes_per_second = st.rate.max(0.0) as u64;
                    e.reason = st.reason;
                    e.message = st.message;
                    // The root of the complete hash list (the authorities'
                    // vote for the pinned identity) and the origin version.
                    e.root.clone_from(&st.root);
                    e.origin_version = st.origin_version;
                    if e.phase == NodePhase::Complete {
                        e.digest = st.root;
                    }
                }
            }
            (Desired::Run(_), None) => {
                e.phase = NodePhase::Failed;
                e.reason = Some("InvalidAssignment".into());
                e.message = Some("the engine refused the content; see the agent log".into());
            }
        }
        e
    }
}

/// Writes the NodeFill status (merge patch on the status subresource) on
/// the schedule of [`report::next_write`].
pub(super) struct Reporter {
    pub(super) api: Api<NodeFill>,
    pub(super) node: String,
    pub(super) request: Request,
    pub(super) zone: Option<String>,
    pub(super) endpoint: Option<String>,
    pub(super) fingerprint: Option<String>,
    /// When the agent became ready (the condition's transition time).
    pub(super) ready_since: Option<Time>,
    pub(super) waiting_since: Time,
    pub(super) interval: Duration,
    pub(super) last_write: Option<Instant>,
    /// The state part of the last status written (phases, sizes, ...).
    pub(super) last_state: Option<serde_json::Value>,
    /// Last phase and transition time per uid.
    pub(super) transitions: HashMap<String, (NodePhase, Time)>,
    /// Last entry written per uid (kept while a removal is pending).
    pub(super) last_entries: BTreeMap<String, NodeDistributionStatus>,
    /// Events on the NodeFill (Warning when a distribution fails here).
    pub(super) recorder: Recorder,
    /// The NodeFill, as events reference it.
    pub(super) object_ref: Option<ObjectReference>,
}

impl Reporter {
    pub(super) fn new(
        api: Api<NodeFill>,
        client: Client,
        args: &NodeArgs,
        request: Request,
        zone: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client,
            EventReporter {
                controller: "peerfill-agent".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Reporter {
            recorder,
            object_ref: None,
            api,
            node: args.node_name.clone(),
            request,
            zone,
            endpoint: None,
            fingerprint: None,
            ready_since: None,
            waiting_since: now_time(),
            interval: report::report_interval(None),
            last_write: None,
            last_state: None,
            transitions: HashMap::new(),
            last_entries: BTreeMap::new(),
        }
    }

    /// Records an Event for a distribution that just completed or failed
    /// here (in the background: events are best effort).
    pub(super) fn event(&self, e: &NodeDistributionStatus) {
        let Some(reference) = self.object_ref.clone() else {
            return;
        };
        let dist = format!("{}/{}", e.namespace, e.name);
        let ev = match e.phase {
            NodePhase::Failed => KubeEvent {
                type_: EventType::Warning,
                reason: e.reason.clone().unwrap_or_else(|| "Failed".into()),
                note: Some(format!(
                    "{dist} failed on this node: {}",
                    e.message.as_deref().unwrap_or("no detail")
                )),
                action: "Fill".into(),
                secondary: None,
            },
            NodePhase::Complete => KubeEvent {
                type_: EventType::Normal,
                reason: "DistributionComplete".into(),
                note: Some(format!("{dist} is complete on this node")),
                action: "Fill".into(),
                secondary: None,
            },
            _ => return,
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(err) = recorder.publish(&ev, &reference).await {
                debug!(error = %err, "cannot record an event");
            }
        });
    }

    pub(super) fn forget(&mut self, uid: &str) {
        self.transitions.remove(uid);
        self.last_entries.remove(uid);
    }

    pub(super) async fn patch(&self, status: serde_json::Value) -> Result<(), kube::Error> {
        let patch = json!({ "status": status });
        self.api
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    }

    /// The request alone, while waiting for the certificate.
    pub(super) async fn write_request(&self) -> Result<(), kube::Error> {
        self.patch(json!({
            "certificateRequest": self.request.csr_pem,
            "agentVersion": AGENT_VERSION,
            "zone": self.zone,
            "lastHeartbeat": now_time(),
            "conditions": [condition(
                false,
                "WaitingForCertificate",
                format!("certificate requested ({})", self.request.digest),
                &self.waiting_since,
            )],
        }))
        .await
    }

    /// Marks the agent not ready on a clean stop.
    pub(super) async fn stopping(&self) {
        let r = self
            .patch(json!({
                "lastHeartbeat": now_time(),
                "conditions": [condition(false, "AgentStopped", "the agent is shutting down".into(), &now_time())],
            }))
            .await;
        if let Err(e) = r {
            debug!(error = %e, "cannot mark the agent stopped");
        }
    }

    /// Writes the full status if due; returns when the next write is due.
    pub(super) async fn publish(
        &mut self,
        mut entries: Vec<NodeDistributionStatus>,
        removing: &BTreeMap<String, Removal>,
    ) -> Instant {
        let now = Instant::now();
        for e in &mut entries {
            let changed = self
                .transitions
                .get(&e.uid)
                .is_none_or(|(phase, _)| *phase != e.phase);
            if changed {
                self.transitions
                    .insert(e.uid.clone(), (e.phase, now_time()));
                self.event(e);
            }
            e.last_transition_time = self.transitions.get(&e.uid).map(|t| t.1.clone());
        }
        let assigned = entries.len();
        let complete = entries
            .iter()
            .filter(|e| e.phase == NodePhase::Complete)
            .count();
        // Entries of distributions being removed stay until their label is
        // gone (the operator releases its finalizer once they are).
        for uid in removing.keys() {
            if let Some(e) = self.last_entries.get(uid) {
                entries.push(e.clone());
            }
        }
        let state = json!({
            "endpoint": self.endpoint,
            "fingerprint": self.fingerprint,
            "distributions": entries.iter().map(|e| json!([e.uid, e.content_id, e.phase, e.size, e.reason, e.digest, e.root, e.origin_version])).collect::<Vec<_>>(),
        });
        let dirty = self.last_state.as_ref() != Some(&state);
        let due = report::next_write(now, self.last_write, self.interval, dirty);
        if due > now {
            return due;
        }
        let since = self.ready_since.clone().unwrap_or_else(now_time);
        let status = json!({
            "endpoint": self.endpoint,
            "certificateFingerprint": self.fingerprint,
            "zone": self.zone,
            "agentVersion": AGENT_VERSION,
            "certificateRequest": self.request.csr_pem,
            "lastHeartbeat": now_time(),
            "assigned": assigned,
            "complete": complete,
            // Always written, also empty: a merge patch replaces the list.
            "distributions": entries,
            "conditions": [condition(
                true,
                "Ready",
                format!("serving on {}", self.endpoint.as_deref().unwrap_or("?")),
                &since,
            )],
        });
        self.last_write = Some(now);
        match self.patch(status).await {
            Ok(()) => {
                self.last_state = Some(state);
                for e in entries {
                    self.last_entries.insert(e.uid.clone(), e);
                }
            }
            Err(e) => {
                // Retried after the spacing, as a state change.
                warn!(error = %e, "writing the NodeFill status failed");
                self.last_state = None;
            }
        }
        report::next_write(Instant::now(), self.last_write, self.interval, false)
    }
}
