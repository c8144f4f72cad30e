//! What a watch event asks of the operator, and in which order NodeFill
//! spec writes go out. Pure: no I/O, the clock is passed in.
//!
//! At 5,000 nodes the agents write ~20 statuses a second, nearly all of
//! them heartbeats and progress. Re-planning the cluster on each of them
//! costs CPU in proportion to the cluster times the write rate, while it
//! changes nothing. So every Node/NodeFill event is reduced to a small
//! projection and compared with the last one seen for that object:
//!
//! - [`Trigger::State`] — anything the plan or a Distribution's state can
//!   depend on changed (labels, taints, deletion, the spec, an endpoint, a
//!   condition, a phase, a size or root, the agent coming up): re-plan the
//!   NodeFills and reconcile every Distribution (both throttled);
//! - [`Trigger::Progress`] — only byte and piece counters moved: no
//!   re-plan; each active Distribution picks progress up at its own
//!   progress cadence;
//! - [`Trigger::Nothing`] — a heartbeat (or a Node's kubelet status).
//!
//! Spec writes are spread under a budget ([`WriteBudget`]); when it runs
//! short, changes of state (a new or dropped assignment, an issued
//! certificate, new pins) go before peer-list updates ([`spec_change`]).

use std::collections::BTreeSet;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use peerfill_crds::{NodeFill, NodeFillSpec};
use serde_json::{Value, json};

use crate::select;

/// What an event asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trigger {
    Nothing,
    Progress,
    State,
}

/// The parts of a NodeFill that matter, hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FillKey {
    state: u64,
    progress: u64,
    up: bool,
}

/// Per-distribution counters that move with every report.
const PROGRESS_FIELDS: [&str; 5] = [
    "bytesDone",
    "piecesDone",
    "bytesFromOrigin",
    "bytesFromPeers",
    "bytesPerSecond",
];

fn hash(v: &Value) -> u64 {
    let mut h = DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// The projection of `fill` at `now`.
pub fn fill_key(fill: &NodeFill, now: Timestamp) -> FillKey {
    let mut status = serde_json::to_value(&fill.status).unwrap_or(Value::Null);
    let mut progress = Vec::new();
    if let Some(s) = status.as_object_mut() {
        s.remove("lastHeartbeat");
        if let Some(Value::Array(entries)) = s.get_mut("distributions") {
            for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
                for field in PROGRESS_FIELDS {
                    progress.push(entry.remove(field).unwrap_or(Value::Null));
                }
            }
        }
    }
    let state = json!({
        "deleting": fill.metadata.deletion_timestamp.is_some(),
        "spec": serde_json::to_value(&fill.spec).unwrap_or(Value::Null),
        "status": status,
    });
    FillKey {
        state: hash(&state),
        progress: hash(&Value::Array(progress)),
        up: select::agent_up(fill, now),
    }
}

/// What a NodeFill going from `old` (last seen) to `new` asks for.
pub fn fill_trigger(old: Option<FillKey>, new: FillKey) -> Trigger {
    match old {
        None => Trigger::State,
        Some(o) if o.state != new.state || o.up != new.up => Trigger::State,
        Some(o) if o.progress != new.progress => Trigger::Progress,
        Some(_) => Trigger::Nothing,
    }
}

/// The parts of a Node the plan reads (labels, taints and other spec
/// fields, deletion, identity), hashed; kubelet status updates are left out.
pub fn node_key(node: &Node) -> u64 {
    hash(&json!({
        "uid": node.metadata.uid,
        "labels": node.metadata.labels,
        "deleting": node.metadata.deletion_timestamp.is_some(),
        "spec": serde_json::to_value(&node.spec).unwrap_or(Value::Null),
    }))
}

/// What a Node going from `old` to `new` (keys) asks for.
pub fn node_trigger(old: Option<u64>, new: u64) -> Trigger {
    if old == Some(new) {
        Trigger::Nothing
    } else {
        Trigger::State
    }
}

/// How a desired NodeFill spec differs from the stored one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpecChange {
    /// Something the agent must act on: an assignment taken on, dropped or
    /// changed beyond its peers, an issued certificate, the interval.
    State,
    /// Only who the peers are or where they listen.
    Peers,
    None,
}

/// The kind of change from `old` to `new`.
pub fn spec_change(old: &NodeFillSpec, new: &NodeFillSpec) -> SpecChange {
    if old == new {
        return SpecChange::None;
    }
    let without_peers = |s: &NodeFillSpec| {
        let mut s = s.clone();
        s.peers.clear();
        for a in &mut s.distributions {
            a.peers.clear();
        }
        s
    };
    if without_peers(old) == without_peers(new) {
        SpecChange::Peers
    } else {
        SpecChange::State
    }
}

/// Annotation holding [`peers_hash`] of a watched NodeFill's spec in the
/// operator's store (set by [`slim`]; never written to the API).
pub const PEERS_HASH_ANNOTATION: &str = "peerfill.dev/operator-peers-hash";

/// A hash of everything [`slim`] drops from a spec: `spec.peers` and every
/// assignment's peer names. Hashed field by field (no serialisation): the
/// operator hashes every planned spec on every pass.
pub fn peers_hash(spec: &NodeFillSpec) -> u64 {
    let mut h = DefaultHasher::new();
    for p in &spec.peers {
        (&p.node, &p.endpoint, &p.certificate_fingerprint, &p.zone).hash(&mut h);
    }
    for a in &spec.distributions {
        (&a.uid, &a.peers).hash(&mut h);
    }
    h.finish()
}

/// Reduces a watched NodeFill to what the operator reads: the peer lists
/// of its spec (most of its bytes: ~200 endpoints with fingerprints per
/// node, every assigned node for a hash authority) are replaced by their
/// [`peers_hash`]; the plan never reads them back and [`stored_spec_change`]
/// compares with the hash. managedFields are dropped too.
pub fn slim(fill: &mut NodeFill) {
    let hash = peers_hash(&fill.spec);
    fill.metadata.managed_fields = None;
    fill.metadata
        .annotations
        .get_or_insert_default()
        .insert(PEERS_HASH_ANNOTATION.into(), hash.to_string());
    fill.spec.peers = Vec::new();
    for a in &mut fill.spec.distributions {
        a.peers = Vec::new();
    }
}

/// How `new` differs from the spec of `stored`, which may be [`slim`]med
/// (its peers then known by hash only).
pub fn stored_spec_change(stored: &NodeFill, new: &mut NodeFillSpec) -> SpecChange {
    let Some(hash) = stored
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PEERS_HASH_ANNOTATION))
        .and_then(|h| h.parse::<u64>().ok())
    else {
        return spec_change(&stored.spec, new);
    };
    let peers_equal = peers_hash(new) == hash;
    // Compare the rest without cloning: lend the peer lists out meanwhile.
    let peers = std::mem::take(&mut new.peers);
    let names: Vec<Vec<String>> = new
        .distributions
        .iter_mut()
        .map(|a| std::mem::take(&mut a.peers))
        .collect();
    let rest_equal = stored.spec == *new;
    new.peers = peers;
    for (a, n) in new.distributions.iter_mut().zip(names) {
        a.peers = n;
    }
    match (rest_equal, peers_equal) {
        (true, true) => SpecChange::None,
        (true, false) => SpecChange::Peers,
        (false, _) => SpecChange::State,
    }
}

/// The merge patch making a NodeFill's spec `new`: every top-level field
/// `new` leaves out is nulled (the stored spec may be slimmed, so its keys
/// are not a guide).
pub fn spec_patch(new: &NodeFillSpec) -> Value {
    let mut spec = serde_json::to_value(new).unwrap_or(Value::Null);
    if let Some(o) = spec.as_object_mut() {
        for key in [
            "distributions",
            "peers",
            "identity",
            "reportIntervalSeconds",
        ] {
            o.entry(key).or_insert(Value::Null);
        }
    }
    json!({ "spec": spec })
}

/// The write order: changes of state first — the hash authorities'
/// (origin readers, seeder) before everyone else, since no other node can
/// start before they report the size and root — then peer updates, by
/// name within each (stable, so a node deferred now is near the front
/// later).
pub fn order_writes<T>(
    mut writes: Vec<(SpecChange, String, T)>,
    authorities: &BTreeSet<&str>,
) -> Vec<(SpecChange, String, T)> {
    writes.retain(|w| w.0 != SpecChange::None);
    writes.sort_by(|a, b| {
        let key = |w: &(SpecChange, String, T)| (w.0, !authorities.contains(w.1.as_str()));
        (key(a), &a.1).cmp(&(key(b), &b.1))
    });
    writes
}

/// A token bucket: `rate` writes a second on average, up to `burst` at once
/// (so a small cluster gets all its writes in one pass).
#[derive(Clone, Debug)]
pub struct WriteBudget {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl WriteBudget {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        WriteBudget {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one write if the budget allows it at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until the next write is allowed.
    pub fn wait(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens).max(0.0) / self.rate).max(0.01))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::tests::up_fill;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use peerfill_crds::{Assignment, NodeDistributionStatus, NodePhase, PeerEndpoint};

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_000_000 + s).unwrap_or_default()
    }

    fn with_entry(mut fill: NodeFill, phase: NodePhase, done: u64) -> NodeFill {
        let status = fill.status.get_or_insert_default();
        status.distributions = vec![NodeDistributionStatus {
            namespace: "default".into(),
            name: "d".into(),
            uid: "u".into(),
            phase,
            bytes_done: done,
            content_id: Some("c".into()),
            size: Some(100),
            files: None,
            root: None,
            origin_version: None,
            pieces_done: done / 10,
            piece_count: 10,
            bytes_from_origin: 0,
            bytes_from_peers: done,
            bytes_per_second: done / 2,
            manifest_digest: None,
            digest: None,
            reason: None,
            message: None,
            last_transition_time: None,
        }];
        fill
    }

    #[test]
    fn heartbeats_progress_and_state_are_told_apart() {
        let base = with_entry(up_fill("n", at(0)), NodePhase::Downloading, 10);
        let key0 = fill_key(&base, at(1));
        assert_eq!(fill_trigger(None, key0), Trigger::State);
        // A heartbeat: only lastHeartbeat moved.
        let mut beat = base.clone();
        beat.status.get_or_insert_default().last_heartbeat = Some(Time(at(2)));
        assert_eq!(
            fill_trigger(Some(key0), fill_key(&beat, at(2))),
            Trigger::Nothing
        );
        // Progress: counters moved.
        let more = with_entry(beat.clone(), NodePhase::Downloading, 20);
        assert_eq!(
            fill_trigger(Some(key0), fill_key(&more, at(2))),
            Trigger::Progress
        );
        // A change of phase is a change of state, counters or not.
        let done = with_entry(beat.clone(), NodePhase::Complete, 20);
        assert_eq!(
            fill_trigger(Some(key0), fill_key(&done, at(2))),
            Trigger::State
        );
        // A heartbeat that brings a stale agent back up is a change of
        // state (it becomes a target again): stale after 3 * 2 + 15 s.
        let stale = fill_key(&base, at(30));
        assert!(!stale.up);
        let mut back = base.clone();
        back.status.get_or_insert_default().last_heartbeat = Some(Time(at(30)));
        assert_eq!(
            fill_trigger(Some(stale), fill_key(&back, at(30))),
            Trigger::State
        );
        // So is any spec change (the operator's own writes: pins, readers).
        let mut spec = base.clone();
        spec.spec.report_interval_seconds = Some(3);
        assert_eq!(
            fill_trigger(Some(key0), fill_key(&spec, at(1))),
            Trigger::State
        );
    }

    #[test]
    fn node_status_updates_are_ignored_labels_are_not() {
        use crate::plan::tests::node;
        let n = node("n", &[("a", "1")]);
        let mut kubelet = (*n).clone();
        kubelet.status = Some(Default::default());
        assert_eq!(
            node_trigger(Some(node_key(&n)), node_key(&kubelet)),
            Trigger::Nothing
        );
        let relabelled = node("n", &[("a", "2")]);
        assert_eq!(
            node_trigger(Some(node_key(&n)), node_key(&relabelled)),
            Trigger::State
        );
    }

    #[test]
    fn state_changes_go_before_peer_updates() {
        let assignment = |peers: &[&str]| Assignment {
            uid: "u".into(),
            peers: peers.iter().map(|p| p.to_string()).collect(),
            ..Assignment::default()
        };
        let old = NodeFillSpec {
            distributions: vec![assignment(&["a"])],
            ..NodeFillSpec::default()
        };
        let mut peers_only = old.clone();
        peers_only.distributions[0].peers.push("b".into());
        peers_only.peers.push(PeerEndpoint {
            node: "b".into(),
            endpoint: "127.0.0.1:1".into(),
            certificate_fingerprint: None,
            zone: None,
        });
        let mut state = old.clone();
        state.distributions[0].size = Some(7);
        let dropped = NodeFillSpec::default();
        assert_eq!(spec_change(&old, &old), SpecChange::None);
        assert_eq!(spec_change(&old, &peers_only), SpecChange::Peers);
        assert_eq!(spec_change(&old, &state), SpecChange::State);
        assert_eq!(spec_change(&old, &dropped), SpecChange::State);
        let order = order_writes(
            vec![
                (SpecChange::Peers, "a".to_string(), ()),
                (SpecChange::None, "b".to_string(), ()),
                (SpecChange::State, "c".to_string(), ()),
                (SpecChange::State, "b".to_string(), ()),
                (SpecChange::State, "reader".to_string(), ()),
                (SpecChange::Peers, "seeder".to_string(), ()),
            ],
            &BTreeSet::from(["reader", "seeder"]),
        );
        let names: Vec<&str> = order.iter().map(|w| w.1.as_str()).collect();
        assert_eq!(names, ["reader", "b", "c", "seeder", "a"]);
    }

    #[test]
    fn a_slimmed_store_tells_the_same_changes_apart() {
        let assignment = |peers: &[&str]| Assignment {
            uid: "u".into(),
            peers: peers.iter().map(|p| p.to_string()).collect(),
            ..Assignment::default()
        };
        let endpoint = |node: &str| PeerEndpoint {
            node: node.into(),
            endpoint: "198.18.0.1:7443".into(),
            certificate_fingerprint: Some("sha256:ab".into()),
            zone: Some("a".into()),
        };
        let full = NodeFillSpec {
            distributions: vec![assignment(&["a", "b"])],
            peers: vec![endpoint("a"), endpoint("b")],
            report_interval_seconds: Some(2),
            ..NodeFillSpec::default()
        };
        let mut stored = up_fill("n", at(0));
        stored.spec = full.clone();
        slim(&mut stored);
        assert!(stored.spec.peers.is_empty() && stored.spec.distributions[0].peers.is_empty());
        let mut same = full.clone();
        assert_eq!(stored_spec_change(&stored, &mut same), SpecChange::None);
        // The lent peer lists are back.
        assert_eq!(same, full);
        let mut moved = full.clone();
        moved.peers[1].endpoint = "198.18.0.2:7443".into();
        assert_eq!(stored_spec_change(&stored, &mut moved), SpecChange::Peers);
        let mut fewer = full.clone();
        fewer.distributions[0].peers.pop();
        assert_eq!(stored_spec_change(&stored, &mut fewer), SpecChange::Peers);
        let mut pinned = full.clone();
        pinned.distributions[0].size = Some(7);
        assert_eq!(stored_spec_change(&stored, &mut pinned), SpecChange::State);
        // The patch nulls what the new spec leaves out.
        let patch = spec_patch(&NodeFillSpec::default());
        assert_eq!(
            patch,
            json!({"spec": {"distributions": null, "peers": null, "identity": null, "reportIntervalSeconds": null}})
        );
    }

    #[test]
    fn the_budget_allows_a_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = WriteBudget::new(20.0, 100.0, t0);
        assert_eq!((0..150).filter(|_| b.take(t0)).count(), 100);
        assert!(!b.take(t0));
        assert!(b.wait() > Duration::ZERO);
        // One second later: 20 more, not more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..50).filter(|_| b.take(t1)).count(), 20);
        // Long idle: back to the burst, never beyond.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..500).filter(|_| b.take(t2)).count(), 100);
    }
}
