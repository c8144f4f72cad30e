//! What the operator remembers between reconciles that the API objects do
//! not hold: when each node's progress last moved (to find stalled origin
//! readers), when the origin last changed under each Distribution (to bound
//! restarts), and since when the hash authorities of a content disagree.
//! Pure: the shell feeds it observations with the time; the decisions read
//! a snapshot of it through [`crate::plan::World`]. Lost on a restart,
//! which only delays those bounds.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use peerfill_crds::{DistributionStatus, NodeFill, NodePhase};

/// How far back origin changes count towards `OriginUnstable`.
pub const ORIGIN_CHANGE_WINDOW_SECONDS: i64 = 600;

/// The last progress seen of one node on one distribution.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    content_id: Option<String>,
    phase: NodePhase,
    bytes_done: u64,
    /// When any of the above last changed.
    since: Timestamp,
}

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// By node, then by distribution uid. Shared with the snapshots the
    /// decisions read (a `World` per reconcile): cloning the memory is a
    /// reference count, and [`Memory::observe`] copies the map only while
    /// such a snapshot is alive.
    progress: Arc<BTreeMap<String, Vec<(String, Seen)>>>,
    /// By uid: origin revision -> when this operator first wrote it.
    origin_changes: BTreeMap<String, BTreeMap<u32, Timestamp>>,
    /// By uid: the content id whose authorities disagree, and since when.
    disagree_since: BTreeMap<String, (String, Timestamp)>,
}

impl Memory {
    /// Records every node's per-distribution progress; entries that moved
    /// restart their clock, vanished ones are forgotten. Updates in place:
    /// at 5,000 nodes this runs for every reconcile, and rebuilding the
    /// map each time churned tens of thousands of allocations.
    pub fn observe(&mut self, fills: &BTreeMap<String, Arc<NodeFill>>, now: Timestamp) {
        let progress = Arc::make_mut(&mut self.progress);
        progress.retain(|node, _| fills.get(node).is_some_and(|f| f.status.is_some()));
        for (node, fill) in fills {
            let Some(status) = &fill.status else {
                continue;
            };
            if !progress.contains_key(node) {
                progress.insert(node.clone(), Vec::new());
            }
            let Some(entries) = progress.get_mut(node) else {
                continue;
            };
            entries.retain(|(uid, _)| status.distributions.iter().any(|d| &d.uid == uid));
            for d in &status.distributions {
                let moved = |old: &Seen| {
                    old.content_id != d.content_id
                        || old.phase != d.phase
                        || old.bytes_done != d.bytes_done
                };
                let seen = || Seen {
                    content_id: d.content_id.clone(),
                    phase: d.phase,
                    bytes_done: d.bytes_done,
                    since: now,
                };
                match entries.iter_mut().find(|(uid, _)| uid == &d.uid) {
                    Some((_, old)) if moved(old) => *old = seen(),
                    Some(_) => {}
                    None => entries.push((d.uid.clone(), seen())),
                }
            }
        }
    }

    /// Seconds `node` has been `Downloading` content `content_id` of `uid`
    /// without any change of its verified bytes (None when it is not
    /// downloading that content, or was never seen).
    pub fn stalled_seconds(
        &self,
        node: &str,
        uid: &str,
        content_id: &str,
        now: Timestamp,
    ) -> Option<i64> {
        let (_, seen) = self.progress.get(node)?.iter().find(|(u, _)| u == uid)?;
        (seen.phase == NodePhase::Downloading && seen.content_id.as_deref() == Some(content_id))
            .then(|| now.as_second() - seen.since.as_second())
    }

    /// Origin changes of `uid` within [`ORIGIN_CHANGE_WINDOW_SECONDS`].
    pub fn recent_origin_changes(&self, uid: &str, now: Timestamp) -> usize {
        self.origin_changes.get(uid).map_or(0, |m| {
            m.values()
                .filter(|t| now.as_second() - t.as_second() <= ORIGIN_CHANGE_WINDOW_SECONDS)
                .count()
        })
    }

    /// Seconds the authorities of content `content_id` of `uid` have
    /// disagreed.
    pub fn disagreeing_seconds(&self, uid: &str, content_id: &str, now: Timestamp) -> Option<i64> {
        self.disagree_since
            .get(uid)
            .filter(|(id, _)| id == content_id)
            .map(|(_, t)| now.as_second() - t.as_second())
    }

    /// Records what a status the operator wrote (or found current) says:
    /// a new origin revision, or (`disagreeing`) that the authorities of its
    /// content id disagree.
    pub fn note_status(
        &mut self,
        uid: &str,
        old: Option<&DistributionStatus>,
        new: &DistributionStatus,
        disagreeing: bool,
        now: Timestamp,
    ) {
        let old_revision = old.and_then(|o| o.origin_revision).unwrap_or(0);
        let revision = new.origin_revision.unwrap_or(0);
        if revision > old_revision {
            let changes = self.origin_changes.entry(uid.to_string()).or_default();
            changes.entry(revision).or_insert(now);
            changes.retain(|_, t| now.as_second() - t.as_second() <= ORIGIN_CHANGE_WINDOW_SECONDS);
        }
        match (&new.content_id, disagreeing) {
            (Some(id), true) => {
                let entry = self
                    .disagree_since
                    .entry(uid.to_string())
                    .or_insert_with(|| (id.clone(), now));
                if &entry.0 != id {
                    *entry = (id.clone(), now);
                }
            }
            _ => {
                self.disagree_since.remove(uid);
            }
        }
    }

    /// Forgets a Distribution that is gone.
    pub fn forget(&mut self, uid: &str) {
        self.origin_changes.remove(uid);
        self.disagree_since.remove(uid);
    }

    /// Test helper: pretends the origin of `uid` changed at `at`.
    #[cfg(test)]
    pub fn record_origin_change(&mut self, uid: &str, revision: u32, at: Timestamp) {
        self.origin_changes
            .entry(uid.to_string())
            .or_default()
            .insert(revision, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{now, report};
    use peerfill_crds::{NodeFillSpec, NodePhase};

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(now().as_second() + s).unwrap()
    }

    fn fills(phase: NodePhase, done: u64, cid: &str) -> BTreeMap<String, Arc<NodeFill>> {
        let mut f = NodeFill::new("a", NodeFillSpec::default());
        report(&mut f, "u", phase, None, done);
        f.status.as_mut().unwrap().distributions[0].content_id = Some(cid.into());
        [("a".to_string(), Arc::new(f))].into()
    }

    #[test]
    fn stall_clock_restarts_on_any_progress() {
        let mut m = Memory::default();
        m.observe(&fills(NodePhase::Downloading, 10, "c1"), at(0));
        m.observe(&fills(NodePhase::Downloading, 10, "c1"), at(20));
        assert_eq!(m.stalled_seconds("a", "u", "c1", at(31)), Some(31));
        assert_eq!(m.stalled_seconds("a", "u", "c2", at(31)), None);
        m.observe(&fills(NodePhase::Downloading, 11, "c1"), at(40));
        assert_eq!(m.stalled_seconds("a", "u", "c1", at(45)), Some(5));
        m.observe(&fills(NodePhase::Complete, 11, "c1"), at(50));
        assert_eq!(m.stalled_seconds("a", "u", "c1", at(99)), None);
        m.observe(&BTreeMap::new(), at(100));
        assert_eq!(m.stalled_seconds("a", "u", "c1", at(100)), None);
    }

    #[test]
    fn origin_changes_count_within_the_window_once_per_revision() {
        let mut m = Memory::default();
        let st = |rev: u32| DistributionStatus {
            origin_revision: Some(rev),
            ..DistributionStatus::default()
        };
        m.note_status("u", Some(&st(0)), &st(1), false, at(0));
        // The same bump seen again (a stale cache) counts once.
        m.note_status("u", Some(&st(0)), &st(1), false, at(1));
        m.note_status("u", Some(&st(1)), &st(2), false, at(100));
        assert_eq!(m.recent_origin_changes("u", at(100)), 2);
        assert_eq!(m.recent_origin_changes("u", at(650)), 1);
        assert_eq!(m.recent_origin_changes("other", at(0)), 0);
    }

    #[test]
    fn disagreement_clock_per_content_id() {
        let mut m = Memory::default();
        let st = DistributionStatus {
            content_id: Some("c".into()),
            ..DistributionStatus::default()
        };
        m.note_status("u", None, &st, true, at(0));
        m.note_status("u", None, &st, true, at(30));
        assert_eq!(m.disagreeing_seconds("u", "c", at(30)), Some(30));
        assert_eq!(m.disagreeing_seconds("u", "other", at(30)), None);
        // A new content id starts its own clock.
        let next = DistributionStatus {
            content_id: Some("c2".into()),
            ..DistributionStatus::default()
        };
        m.note_status("u", None, &next, true, at(40));
        assert_eq!(m.disagreeing_seconds("u", "c2", at(41)), Some(1));
        m.note_status("u", None, &next, false, at(42));
        assert_eq!(m.disagreeing_seconds("u", "c2", at(42)), None);
    }
}
