//! The NodeFill status: the entry of every assignment, written as a merge
//! patch on the status subresource on the schedule of [`report`], and a
//! Warning Event series when a distribution fails here ([`events`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use peerfill_crds::nodefill::{CONDITION_AGENT_READY, NodeDistributionStatus, NodeFill, NodePhase};
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::events::{self, Aggregator};
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
            let a = &t.assignment;
            let authority = a.role.seed
                || a.origin_readers
                    .iter()
                    .any(|r| r.node == self.args.node_name);
            entries.push((self.entry(t), authority));
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
            files: a.files,
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
                        e.files = st.files.or(a.files);
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
    /// The projection of the last status written.
    pub(super) last_state: Option<report::Projection>,
    /// Since when a routine change waits (see [`report::next_write`]).
    pub(super) dirty_since: Option<Instant>,
    /// Last phase and transition time per uid.
    pub(super) transitions: HashMap<String, (NodePhase, Time)>,
    /// Last entry written per uid (kept while a removal is pending).
    pub(super) last_entries: BTreeMap<String, NodeDistributionStatus>,
    /// Warning Event series on the NodeFill, by reason.
    pub(super) events: Aggregator,
    /// `(reason, name)` of Events the background writes created.
    pub(super) created_events: Arc<Mutex<Vec<(String, String)>>>,
    pub(super) client: Client,
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
        Reporter {
            events: Aggregator::default(),
            created_events: Arc::default(),
            client,
            dirty_since: None,
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

    /// Records a failure here in its reason's Event series (a new Event
    /// only the first time; the count later, see [`events`]).
    fn event(&mut self, e: &NodeDistributionStatus) {
        if e.phase != NodePhase::Failed {
            return;
        }
        let reason = e.reason.clone().unwrap_or_else(|| "Failed".into());
        let note = format!(
            "{}/{} failed on this node: {}",
            e.namespace,
            e.name,
            e.message.as_deref().unwrap_or("no detail")
        );
        let first = self.events.record(&reason, note, Instant::now());
        self.send_events(first.into_iter().collect());
    }

    /// Writes series updates in the background (events are best effort).
    fn send_events(&mut self, writes: Vec<events::EventWrite>) {
        let Some(reference) = self.object_ref.clone() else {
            return;
        };
        let instance = std::env::var("POD_NAME").unwrap_or_else(|_| self.node.clone());
        for w in writes {
            let (client, reference, instance) =
                (self.client.clone(), reference.clone(), instance.clone());
            let created = self.created_events.clone();
            tokio::spawn(async move {
                let reason = match &w {
                    events::EventWrite::Create { reason, .. } => Some(reason.clone()),
                    events::EventWrite::Count { .. } => None,
                };
                let name = events::write(&client, &reference, &instance, w).await;
                if let (Some(reason), Some(name)) = (reason, name) {
                    created
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((reason, name));
                }
            });
        }
    }

    /// Takes in the names of Events created since the last call and
    /// writes the counts that are due.
    fn flush_events(&mut self) {
        let created: Vec<(String, String)> = std::mem::take(
            &mut *self
                .created_events
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (reason, name) in created {
            self.events.created(&reason, name);
        }
        let due = self.events.due(Instant::now());
        self.send_events(due);
    }

    /// True when the last status written shows `uid` complete (its node
    /// label goes out with or after that write).
    pub(super) fn reported_complete(&self, uid: &str) -> bool {
        self.last_entries
            .get(uid)
            .is_some_and(|e| e.phase == NodePhase::Complete)
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
        entries: Vec<(NodeDistributionStatus, bool)>,
        removing: &BTreeMap<String, Removal>,
    ) -> Instant {
        let now = Instant::now();
        self.flush_events();
        let (mut entries, authority): (Vec<NodeDistributionStatus>, Vec<bool>) =
            entries.into_iter().unzip();
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
        let mut flags = authority;
        for uid in removing.keys() {
            if let Some(e) = self.last_entries.get(uid) {
                entries.push(e.clone());
                flags.push(false);
            }
        }
        let with: Vec<report::Entry<'_>> = entries.iter().zip(flags.iter().copied()).collect();
        let state = report::projection(
            self.endpoint.as_deref(),
            self.fingerprint.as_deref(),
            &self.request.digest,
            &with,
        );
        let change = report::classify(self.last_state.as_ref(), &state);
        if change == report::Change::Progress {
            self.dirty_since = None;
        } else {
            self.dirty_since.get_or_insert(now);
        }
        let due = report::next_write(
            now,
            self.last_write,
            self.interval,
            change,
            self.dirty_since,
        );
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
                self.dirty_since = None;
                for e in entries {
                    self.last_entries.insert(e.uid.clone(), e);
                }
            }
            Err(e) => {
                // Retried after the spacing, as an urgent change.
                warn!(error = %e, "writing the NodeFill status failed");
                self.last_state = None;
            }
        }
        let next = report::next_write(
            Instant::now(),
            self.last_write,
            self.interval,
            report::Change::Progress,
            None,
        );
        // A failed write is retried after the spacing.
        if self.last_state.is_none() {
            return Instant::now() + report::MIN_WRITE_SPACING;
        }
        next
    }
}
