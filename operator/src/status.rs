//! Status aggregation and phase transitions of a Distribution, from its
//! plan and the nodes' reports. Pure: the clock is passed in.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use peerfill_crds::distribution::MAX_FAILING_NODES;
use peerfill_crds::{
    Assignment, CONDITION_COMPLETE, CONDITION_FAILED, CONDITION_PROGRESSING, Distribution,
    DistributionStatus, FailingNode, NodeDistributionStatus, NodePhase, Phase,
    format_bytes_per_second, progress_string, ready_string,
};

pub use crate::memory::ORIGIN_CHANGE_WINDOW_SECONDS;
use crate::plan::{DistPlan, NoWork, World, report_for, version_key};
pub use crate::policy::{REASON_ORIGIN_CHANGED, REASON_ORIGIN_FORBIDDEN, REASON_PATH_CONFLICT};
use crate::policy::{ReasonKind, reason_kind_of};

/// Reason of a Distribution whose target selects no node with a ready agent.
pub const REASON_NO_TARGET_NODES: &str = "NoTargetNodes";
/// Reason while the nodes have not started.
pub const REASON_WAITING_FOR_NODES: &str = "WaitingForNodes";
/// Reason while content moves.
pub const REASON_TRANSFERRING: &str = "Transferring";
/// Reason of a Distribution every target holds.
pub const REASON_ALL_NODES_COMPLETE: &str = "AllNodesComplete";
/// Reason when every node finished and some failed.
pub const REASON_NODES_FAILED: &str = "NodesFailed";
/// Reason when nothing failed.
pub const REASON_NO_FAILURE: &str = "NoFailure";
/// Reason of a spec the operator cannot act on.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Reason while the finalizer removes the content.
pub const REASON_DELETING: &str = "Deleting";
/// Reason while the hash authorities of the content disagree (on its size
/// or root): nothing is pinned, and after [`AUTHORITIES_DISAGREE_SECONDS`]
/// the content restarts on a new origin revision.
pub const REASON_AUTHORITIES_DISAGREE: &str = "AuthoritiesDisagree";
/// Reason while the source node of a `node` source cannot seed (agent down
/// or failed); it cannot be replaced.
pub const REASON_SEEDER_UNAVAILABLE: &str = "SeederUnavailable";
/// Reason of a Distribution whose origin changed [`ORIGIN_UNSTABLE_CHANGES`]
/// times within [`ORIGIN_CHANGE_WINDOW_SECONDS`].
pub const REASON_ORIGIN_UNSTABLE: &str = "OriginUnstable";
/// Origin changes within the window after which the operator stops
/// restarting (Failed, `OriginUnstable`) until the window has passed.
pub const ORIGIN_UNSTABLE_CHANGES: usize = 5;
/// How long the authorities may disagree before the content restarts.
pub const AUTHORITIES_DISAGREE_SECONDS: i64 = 60;

/// The report of `node` for distribution `uid`, whatever its content id.
pub fn node_report<'a>(
    world: &'a World,
    node: &str,
    uid: &str,
) -> Option<&'a NodeDistributionStatus> {
    world
        .fills
        .get(node)?
        .status
        .as_ref()?
        .distributions
        .iter()
        .find(|d| d.uid == uid)
}

/// Sets condition `type_`, keeping `lastTransitionTime` unless the status
/// changes.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" };
    let previous = conditions.iter().find(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => *c = condition,
        None => conditions.push(condition),
    }
}

fn plural(n: usize, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// The three conditions for a phase.
#[allow(clippy::too_many_arguments)]
fn set_conditions(
    st: &mut DistributionStatus,
    progressing: (bool, &str, String),
    complete: (bool, &str, String),
    failed: (bool, &str, String),
    generation: Option<i64>,
    now: Timestamp,
) {
    for (type_, (status, reason, message)) in [
        (CONDITION_PROGRESSING, progressing),
        (CONDITION_COMPLETE, complete),
        (CONDITION_FAILED, failed),
    ] {
        set_condition(
            &mut st.conditions,
            type_,
            status,
            reason,
            message,
            generation,
            now,
        );
    }
}

/// The conditions of a Failed phase: Failed=True, Progressing and Complete
/// False, all three with `reason` and `message`.
fn set_failed(
    st: &mut DistributionStatus,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) {
    set_conditions(
        st,
        (false, reason, message.clone()),
        (false, reason, message.clone()),
        (true, reason, message),
        generation,
        now,
    );
}

/// The status of a Distribution being deleted: the previous one with phase
/// Deleting, `remaining` nodes still holding it.
pub fn deleting_status(
    dist: &Distribution,
    remaining: usize,
    now: Timestamp,
) -> DistributionStatus {
    let mut st = dist.status.clone().unwrap_or_default();
    st.phase = Some(Phase::Deleting);
    let generation = dist.metadata.generation;
    st.observed_generation = generation;
    set_condition(
        &mut st.conditions,
        CONDITION_PROGRESSING,
        false,
        REASON_DELETING,
        format!("removing the content from {}", plural(remaining, "node")),
        generation,
        now,
    );
    st
}

/// The status of a Distribution that gets no work.
fn no_work_status(
    dist: &Distribution,
    why: &NoWork,
    mut st: DistributionStatus,
    now: Timestamp,
) -> DistributionStatus {
    let generation = dist.metadata.generation;
    let (reason, message) = match why {
        NoWork::InvalidSpec(m) => (REASON_INVALID_SPEC, m.clone()),
        NoWork::Inactive => (
            REASON_INVALID_SPEC,
            "the Distribution has no uid".to_string(),
        ),
        NoWork::OriginForbidden(m) => (REASON_ORIGIN_FORBIDDEN, m.clone()),
        NoWork::PathConflict(c) => (
            REASON_PATH_CONFLICT,
            format!(
                "spec.target.path: {} overlaps {} of {}, which owns it; this Distribution touches no node until that one is deleted or moves",
                c.path, c.owner_path, c.owner
            ),
        ),
    };
    st.phase = Some(Phase::Failed);
    set_failed(&mut st, reason, message, generation, now);
    st
}

/// The status of an active Distribution, from the nodes' reports on its
/// current content id (reports on other versions count as not reported).
pub fn aggregate(
    dist: &Distribution,
    plan: Result<&DistPlan, &NoWork>,
    world: &World,
) -> DistributionStatus {
    let now = world.now;
    let old = dist.status.clone().unwrap_or_default();
    let generation = dist.metadata.generation;
    let mut st = DistributionStatus {
        conditions: old.conditions.clone(),
        observed_generation: generation,
        start_time: old.start_time.clone(),
        origin_revision: old.origin_revision,
        ..DistributionStatus::default()
    };
    let plan = match plan {
        Ok(plan) => plan,
        Err(why) => return no_work_status(dist, why, st, now),
    };
    let uid = &plan.uid;
    let cid = plan.content_id.as_str();
    st.content_id = Some(plan.content_id.clone());
    st.origin_revision = Some(plan.origin_revision);
    st.manifest_digest = plan.manifest_digest.clone();
    st.origin_version = plan.origin_version.clone();
    let desired = plan.targets.len();
    let reports: Vec<(&String, Option<&NodeDistributionStatus>)> = plan
        .targets
        .iter()
        .map(|n| (n, report_for(world, n, uid, cid)))
        .collect();
    let phase_of = |r: Option<&NodeDistributionStatus>| r.map(|r| r.phase);
    let complete = reports
        .iter()
        .filter(|(_, r)| phase_of(*r) == Some(NodePhase::Complete))
        .count();
    let reason_kind = |reason: &str| reason_kind_of(reason, plan.directory);
    // A reader that found the origin ignores ranges is about to read it
    // whole (`plan::whole_read`): not a failure (unless a directory).
    let failed = |r: &NodeDistributionStatus| {
        r.phase == NodePhase::Failed
            && reason_kind(r.reason.as_deref().unwrap_or_default()) != ReasonKind::OriginNoRanges
    };
    let failed_nodes: Vec<FailingNode> = plan
        .assigned()
        .filter_map(|n| {
            let r = report_for(world, n, uid, cid)?;
            failed(r).then(|| FailingNode {
                node: n.clone(),
                reason: r.reason.clone().unwrap_or_else(|| "Failed".into()),
                message: r.message.clone().unwrap_or_default(),
            })
        })
        .collect();
    let failed_targets = reports
        .iter()
        .filter(|(_, r)| r.is_some_and(failed))
        .count();
    // A new version restarts every node: Progressing at once, not Pending.
    let version_changed = old.content_id.as_deref().is_some_and(|c| c != cid);
    // Reports on an earlier version count here: the content restarts.
    let started = version_changed
        || plan.targets.iter().any(|n| {
            node_report(world, n, uid).is_some_and(|r| {
                matches!(r.phase, NodePhase::Downloading | NodePhase::Complete) || r.bytes_done > 0
            })
        });

    // Size, digest, progress, throughput.
    st.size = plan.size;
    st.files = plan.files;
    let authorities = plan.authorities();
    st.digest = dist
        .spec
        .source
        .http
        .as_ref()
        .and_then(|h| h.digest.clone())
        .or_else(|| {
            authorities
                .iter()
                .find_map(|n| report_for(world, n, uid, cid)?.digest.clone())
        });
    let size = plan.size.unwrap_or(0);
    let done: u64 = reports
        .iter()
        .map(|(_, r)| match r {
            Some(r) if r.phase == NodePhase::Complete => size,
            Some(r) => r.bytes_done.min(size),
            None => 0,
        })
        .sum();
    let total = size.saturating_mul(desired as u64);
    let ratio = if total == 0 {
        if desired > 0 && complete == desired {
            1.0
        } else {
            0.0
        }
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    };
    st.progress = Some(if total == 0 && ratio >= 1.0 {
        "100%".into()
    } else {
        progress_string(done, total)
    });
    st.progress_ratio = Some(ratio);
    let rate: u64 = reports
        .iter()
        .filter_map(|(_, r)| *r)
        .filter(|r| r.phase == NodePhase::Downloading)
        .map(|r| r.bytes_per_second)
        .fold(0u64, u64::saturating_add);
    st.bytes_per_second = Some(rate);
    st.throughput = Some(format_bytes_per_second(rate));
    st.desired_nodes = Some(u32::try_from(desired).unwrap_or(u32::MAX));
    st.complete_nodes = Some(u32::try_from(complete).unwrap_or(u32::MAX));
    st.failed_nodes = Some(u32::try_from(failed_nodes.len()).unwrap_or(u32::MAX));
    st.ready = Some(ready_string(
        st.complete_nodes.unwrap_or(0),
        st.desired_nodes.unwrap_or(0),
    ));
    st.failing_nodes = failed_nodes
        .iter()
        .take(MAX_FAILING_NODES)
        .cloned()
        .collect();

    // What the authorities' failures mean (control-path.md "Reassignment").
    let authority_failure = |kind: ReasonKind| {
        failed_nodes
            .iter()
            .find(|f| authorities.contains(f.node.as_str()) && reason_kind(&f.reason) == kind)
    };
    let origin_failure = authority_failure(ReasonKind::OriginPermanent);
    let origin_changed = plan.readers.iter().find_map(|r| {
        failed_nodes
            .iter()
            .find(|f| f.node == r.node && reason_kind(&f.reason) == ReasonKind::OriginChanged)
    });
    let origin_down = authority_failure(ReasonKind::OriginTransient);
    let seeder_failure = plan
        .seeder
        .as_ref()
        .and_then(|s| failed_nodes.iter().find(|f| &f.node == s));
    let disagree_too_long = plan.disagreement.is_some()
        && world
            .memory
            .disagreeing_seconds(uid, cid, now)
            .is_some_and(|s| s >= AUTHORITIES_DISAGREE_SECONDS);

    let down_note = if plan.agent_down.is_empty() {
        String::new()
    } else {
        format!(
            "; {} no ready agent",
            if plan.agent_down.len() == 1 {
                "1 matching node has".to_string()
            } else {
                format!("{} matching nodes have", plan.agent_down.len())
            }
        )
    };
    let whole_note = if plan.whole_read {
        "; the origin ignores Range requests: one node reads it whole, the others take it from peers"
    } else {
        ""
    };
    let counts = format!(
        "{complete}/{desired} nodes complete, {failed_targets} failed{down_note}{whole_note}"
    );

    // A changed origin (or authorities that keep disagreeing) restarts the
    // content on a new revision, hence a new content id, unless it changed
    // too often lately.
    let restart = if origin_failure.is_some() {
        None
    } else if let Some(f) = origin_changed {
        Some((REASON_ORIGIN_CHANGED, format!("{}: {}", f.node, f.message)))
    } else if disagree_too_long {
        Some((
            REASON_AUTHORITIES_DISAGREE,
            plan.disagreement.clone().unwrap_or_default(),
        ))
    } else {
        None
    };
    if let Some((reason, why)) = restart {
        let recent = world.memory.recent_origin_changes(uid, now);
        if recent >= ORIGIN_UNSTABLE_CHANGES {
            let message = format!(
                "the origin changed {recent} times within {} s ({why}); waiting before the next attempt",
                ORIGIN_CHANGE_WINDOW_SECONDS
            );
            st.phase = Some(Phase::Failed);
            set_failed(&mut st, REASON_ORIGIN_UNSTABLE, message, generation, now);
            st.completion_time = None;
            return st;
        }
        let revision = plan.origin_revision.saturating_add(1);
        let new_id = Assignment::content_id_for_version(uid, &version_key(dist), revision);
        let message = format!("{why}; restarting on origin revision {revision}");
        st.origin_revision = Some(revision);
        st.content_id = Some(new_id);
        st.size = None;
        st.files = None;
        st.origin_version = None;
        st.manifest_digest = crate::plan::user_root(dist);
        st.complete_nodes = Some(0);
        st.failed_nodes = Some(0);
        st.failing_nodes = Vec::new();
        st.ready = Some(ready_string(0, st.desired_nodes.unwrap_or(0)));
        st.progress = Some(progress_string(0, 0));
        st.progress_ratio = Some(0.0);
        st.phase = Some(Phase::Progressing);
        set_conditions(
            &mut st,
            (true, reason, message.clone()),
            (false, reason, message),
            (false, REASON_NO_FAILURE, String::new()),
            generation,
            now,
        );
        st.start_time = st.start_time.or(Some(Time(now)));
        st.completion_time = None;
        return st;
    }

    let phase = if let Some(f) = origin_failure {
        let message = format!("{}: {} ({counts})", f.node, f.message);
        set_failed(&mut st, &f.reason, message, generation, now);
        Phase::Failed
    } else if desired == 0 {
        let message = format!("the target selects no node with a ready agent{down_note}");
        set_conditions(
            &mut st,
            (false, REASON_NO_TARGET_NODES, message.clone()),
            (false, REASON_NO_TARGET_NODES, message),
            (false, REASON_NO_FAILURE, String::new()),
            generation,
            now,
        );
        Phase::Pending
    } else if complete == desired {
        set_conditions(
            &mut st,
            (false, REASON_ALL_NODES_COMPLETE, counts.clone()),
            (true, REASON_ALL_NODES_COMPLETE, counts),
            (false, REASON_NO_FAILURE, String::new()),
            generation,
            now,
        );
        Phase::Complete
    } else if let Some(f) = origin_down.filter(|_| complete + failed_targets == desired) {
        // Nothing moves while the origin is down: say so with the origin's
        // reason (the agents keep retrying; a reachable origin turns this
        // back into Progressing).
        let message = format!(
            "{}: {} ({counts}); the agents keep retrying",
            f.node, f.message
        );
        set_failed(&mut st, &f.reason, message, generation, now);
        Phase::Failed
    } else if complete + failed_targets == desired {
        // Only local faults are left (origin faults failed above): the
        // failed nodes keep their assignments, and the agents retry, so a
        // node that recovers turns this back into Progressing.
        let message = format!("{} failed ({counts})", plural(failed_targets, "node"));
        set_failed(&mut st, REASON_NODES_FAILED, message, generation, now);
        Phase::Failed
    } else {
        let (reason, message, waiting) = if let Some(d) = &plan.disagreement {
            (
                REASON_AUTHORITIES_DISAGREE,
                format!("the hash authorities disagree on the {d} ({counts})"),
                true,
            )
        } else if !plan.seeder_up || seeder_failure.is_some() {
            let seeder = dist
                .spec
                .source
                .node
                .as_ref()
                .map(|n| n.node_name.clone())
                .unwrap_or_default();
            let detail = seeder_failure
                .map(|f| format!("{}: {}", f.reason, f.message))
                .unwrap_or_else(|| "its agent is not ready".to_string());
            (
                REASON_SEEDER_UNAVAILABLE,
                format!(
                    "the source node {seeder} cannot seed ({detail}); it cannot be replaced ({counts})"
                ),
                true,
            )
        } else if let Some(f) = origin_down {
            (
                f.reason.as_str(),
                format!("{}: {} ({counts})", f.node, f.message),
                true,
            )
        } else if started {
            (REASON_TRANSFERRING, counts.clone(), false)
        } else {
            (REASON_WAITING_FOR_NODES, counts.clone(), false)
        };
        set_conditions(
            &mut st,
            (true, reason, message.clone()),
            (false, reason, message),
            (false, REASON_NO_FAILURE, String::new()),
            generation,
            now,
        );
        if started || waiting {
            Phase::Progressing
        } else {
            Phase::Pending
        }
    };
    st.phase = Some(phase);
    if st.start_time.is_none() && (started || phase == Phase::Complete) {
        st.start_time = Some(Time(now));
    }
    st.completion_time = match (phase, old.completion_time) {
        (Phase::Complete, Some(t))
            if old.phase == Some(Phase::Complete) && old.content_id.as_deref() == Some(cid) =>
        {
            Some(t)
        }
        (Phase::Complete, _) => Some(Time(now)),
        _ => None,
    };
    st
}

/// Whether `new` differs from `old` only in the figures that move with
/// the nodes' reports: progress, throughput, how many nodes are complete
/// (`completeNodes`, `ready`) and the condition messages quoting those
/// counts. Such writes are rate-limited ([`progress_write_interval_seconds`]);
/// changes of state (a phase, a condition's status or reason, desired or
/// failed nodes, failing nodes, pins, times) are written at once.
pub fn progress_only_change(old: Option<&DistributionStatus>, new: &DistributionStatus) -> bool {
    let Some(old) = old else {
        return false;
    };
    let strip = |s: &DistributionStatus| DistributionStatus {
        progress: None,
        progress_ratio: None,
        bytes_per_second: None,
        throughput: None,
        complete_nodes: None,
        ready: None,
        conditions: s
            .conditions
            .iter()
            .map(|c| Condition {
                message: String::new(),
                ..c.clone()
            })
            .collect(),
        ..s.clone()
    };
    old != new && strip(old) == strip(new)
}

/// Shortest time between two progress-only status writes of one
/// Distribution, from the agents' report interval: 2 s, or a 25th of the
/// interval in large clusters (4 s at 2,000 nodes, 10 s at 5,000), where
/// a node's report is up to an interval old anyway and a count that moves
/// with every completion would otherwise be written every few seconds per
/// Distribution.
pub fn progress_write_interval_seconds(report_interval_seconds: u32) -> u32 {
    (report_interval_seconds / 25).max(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{edit_report, http_dist, node, now, report, world};
    use crate::plan::{World, plan_distribution};
    use std::sync::Arc;

    fn status_of(w: &World) -> DistributionStatus {
        let d = &w.distributions[0];
        aggregate(d, plan_distribution(d, w).as_ref(), w)
    }

    fn with_reports(mut w: World, reports: &[(&str, NodePhase, Option<u64>, u64)]) -> World {
        for (n, phase, size, done) in reports {
            let mut f = (*w.fills[*n]).clone();
            report(&mut f, "u", *phase, *size, *done);
            w.fills.insert(n.to_string(), Arc::new(f));
        }
        w
    }

    fn cond<'a>(st: &'a DistributionStatus, t: &str) -> &'a Condition {
        st.condition(t).unwrap_or_else(|| panic!("no {t}"))
    }

    #[test]
    fn phases() {
        use NodePhase::*;
        let nodes = || vec![node("a", &[]), node("b", &[])];
        const MIB: u64 = 1 << 20;
        type Case<'a> = (
            &'a str,
            Vec<(&'a str, NodePhase, Option<u64>, u64)>,
            Phase,
            [&'a str; 3],
            &'a str,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "nothing reported",
                vec![],
                Phase::Pending,
                ["True", "False", "False"],
                REASON_WAITING_FOR_NODES,
                "0/2",
            ),
            (
                "downloading",
                vec![
                    ("a", Downloading, Some(4 * MIB), MIB),
                    ("b", Pending, Some(4 * MIB), 0),
                ],
                Phase::Progressing,
                ["True", "False", "False"],
                REASON_TRANSFERRING,
                "0/2",
            ),
            (
                "one complete",
                vec![
                    ("a", Complete, Some(4 * MIB), 4 * MIB),
                    ("b", Downloading, None, 2 * MIB),
                ],
                Phase::Progressing,
                ["True", "False", "False"],
                REASON_TRANSFERRING,
                "1/2",
            ),
            (
                "all complete",
                vec![
                    ("a", Complete, Some(4 * MIB), 4 * MIB),
                    ("b", Complete, None, 4 * MIB),
                ],
                Phase::Complete,
                ["False", "True", "False"],
                REASON_ALL_NODES_COMPLETE,
                "2/2",
            ),
            (
                "one failed, one complete",
                vec![
                    ("a", Complete, Some(4 * MIB), 4 * MIB),
                    ("b", Failed, None, 0),
                ],
                Phase::Failed,
                ["False", "False", "True"],
                REASON_NODES_FAILED,
                "1/2",
            ),
        ];
        for (what, reports, phase, statuses, reason, ready) in cases {
            // One reader (max 1 origin connection): "a" or "b" by hash; make
            // failure tests independent of it by giving 0 readers a chance:
            // NodesFailed needs the failed node not to be the reader.
            let w = world(vec![http_dist("d", "u", 1)], nodes(), &["a", "b"]);
            let reader = plan_distribution(&w.distributions[0], &w).unwrap().readers[0]
                .node
                .clone();
            let reports: Vec<_> = reports
                .into_iter()
                .map(|(n, p, s, d)| {
                    // Keep the failing node a non-reader, the size reporter the reader.
                    let n = if phase == Phase::Failed {
                        if p == Failed {
                            if reader == "a" { "b" } else { "a" }
                        } else {
                            reader.as_str()
                        }
                    } else {
                        n
                    };
                    (n, p, s, d)
                })
                .collect();
            let w = with_reports(w, &reports);
            let st = status_of(&w);
            assert_eq!(st.phase, Some(phase), "{what}");
            assert_eq!(st.ready.as_deref(), Some(ready), "{what}");
            for (t, want) in [CONDITION_PROGRESSING, CONDITION_COMPLETE, CONDITION_FAILED]
                .iter()
                .zip(statuses)
            {
                assert_eq!(cond(&st, t).status, want, "{what}: {t}");
                assert_eq!(cond(&st, t).observed_generation, Some(1), "{what}");
            }
            let main = if phase == Phase::Failed {
                CONDITION_FAILED
            } else if phase == Phase::Complete {
                CONDITION_COMPLETE
            } else {
                CONDITION_PROGRESSING
            };
            assert_eq!(cond(&st, main).reason, reason, "{what}");
            assert_eq!(st.desired_nodes, Some(2), "{what}");
        }
    }

    #[test]
    fn progress_throughput_and_counts() {
        let w = world(
            vec![http_dist("d", "u", 1)],
            vec![node("a", &[]), node("b", &[])],
            &["a", "b"],
        );
        let w = with_reports(
            w,
            &[
                ("a", NodePhase::Downloading, Some(1000), 250),
                ("b", NodePhase::Complete, Some(1000), 1000),
            ],
        );
        let st = status_of(&w);
        assert_eq!(st.size, Some(1000));
        assert_eq!(st.progress.as_deref(), Some("62%"));
        assert_eq!(st.progress_ratio, Some(0.625));
        // Only downloading nodes count toward throughput (100 B/s each).
        assert_eq!(st.bytes_per_second, Some(100));
        assert_eq!(st.throughput.as_deref(), Some("100 B/s"));
        assert_eq!(st.complete_nodes, Some(1));
        assert_eq!(st.failed_nodes, Some(0));
        assert!(st.start_time.is_some());
        assert!(st.completion_time.is_none());
    }

    #[test]
    fn reader_origin_error_fails_with_its_reason() {
        let w = world(
            vec![http_dist("d", "u", 1)],
            vec![node("a", &[]), node("b", &[])],
            &["a", "b"],
        );
        let reader = plan_distribution(&w.distributions[0], &w).unwrap().readers[0]
            .node
            .clone();
        let mut w = with_reports(w, &[(reader.as_str(), NodePhase::Failed, None, 0)]);
        let mut f = (*w.fills[&reader]).clone();
        let r = &mut f.status.as_mut().unwrap().distributions[0];
        r.reason = Some("OriginNotFound".into());
        r.message = Some("GET http://127.0.0.1:8080/model.bin: 404 Not Found".into());
        w.fills.insert(reader.clone(), Arc::new(f));
        let st = status_of(&w);
        assert_eq!(st.phase, Some(Phase::Failed));
        let failed = cond(&st, CONDITION_FAILED);
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("True", "OriginNotFound")
        );
        assert!(failed.message.contains("404"), "{}", failed.message);
        assert_eq!(st.failing_nodes.len(), 1);
        assert_eq!(st.failing_nodes[0].reason, "OriginNotFound");
    }

    #[test]
    fn an_origin_without_ranges_is_read_whole_not_failed() {
        // One target, which is the reader: its report must not fail the
        // Distribution, it is about to read the origin whole.
        let w = world(vec![http_dist("d", "u", 2)], vec![node("a", &[])], &["a"]);
        let mut w = with_reports(w, &[("a", NodePhase::Failed, None, 0)]);
        let mut f = (*w.fills["a"]).clone();
        let r = &mut f.status.as_mut().unwrap().distributions[0];
        r.reason = Some("OriginNoRangeSupport".into());
        w.fills.insert("a".into(), Arc::new(f));
        let st = status_of(&w);
        // Nothing moved yet: Pending, with the reason why in the message.
        assert_eq!(st.phase, Some(Phase::Pending));
        assert_eq!((st.failed_nodes, st.failing_nodes.len()), (Some(0), 0));
        let p = cond(&st, CONDITION_PROGRESSING);
        assert!(p.message.contains("reads it whole"), "{}", p.message);
    }

    #[test]
    fn no_targets_is_pending_with_a_reason() {
        let w = world(vec![http_dist("d", "u", 1)], vec![node("a", &[])], &[]);
        let st = status_of(&w);
        assert_eq!(st.phase, Some(Phase::Pending));
        let p = cond(&st, CONDITION_PROGRESSING);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("False", REASON_NO_TARGET_NODES)
        );
        assert!(
            p.message.contains("1 matching node has no ready agent"),
            "{}",
            p.message
        );
        assert_eq!(st.ready.as_deref(), Some("0/0"));
    }

    fn two_node_world() -> (World, String, String) {
        let w = world(
            vec![http_dist("d", "u", 1)],
            vec![node("a", &[]), node("b", &[])],
            &["a", "b"],
        );
        let reader = plan_distribution(&w.distributions[0], &w).unwrap().readers[0]
            .node
            .clone();
        let other = if reader == "a" { "b" } else { "a" }.to_string();
        (w, reader, other)
    }

    fn fail(w: &mut World, node: &str, reason: &str) {
        edit_report(w, node, "u", |e| {
            e.phase = NodePhase::Failed;
            e.reason = Some(reason.into());
            e.message = Some(format!("{reason} on {node}"));
        });
    }

    #[test]
    fn origin_change_restarts_on_a_new_revision_and_is_bounded() {
        let (mut w, reader, other) = two_node_world();
        edit_report(&mut w, &other, "u", |e| {
            e.phase = NodePhase::Downloading;
            e.bytes_done = 10;
        });
        fail(&mut w, &reader, REASON_ORIGIN_CHANGED);
        let st = status_of(&w);
        assert_eq!(st.origin_revision, Some(1));
        assert_eq!(st.phase, Some(Phase::Progressing));
        assert_eq!(
            cond(&st, CONDITION_PROGRESSING).reason,
            REASON_ORIGIN_CHANGED
        );
        assert_eq!(cond(&st, CONDITION_FAILED).status, "False");
        let mut d = (*w.distributions[0]).clone();
        let new_id = Assignment::content_id_for_version("u", &version_key(&d), 1);
        assert_eq!(st.content_id.as_deref(), Some(new_id.as_str()));
        assert_eq!((st.size, st.manifest_digest.clone()), (None, None));
        // Written, the revision gives the plan the new content id, and the
        // old report no longer counts: no second bump.
        d.status = Some(st.clone());
        w.distributions[0] = Arc::new(d);
        let p = plan_distribution(&w.distributions[0], &w).unwrap();
        assert_eq!(p.content_id, new_id);
        let again = status_of(&w);
        assert_eq!(again.origin_revision, Some(1));

        // Too many changes lately: Failed, OriginUnstable, no bump.
        let (mut w, reader, _) = two_node_world();
        fail(&mut w, &reader, REASON_ORIGIN_CHANGED);
        for rev in 1..=ORIGIN_UNSTABLE_CHANGES as u32 {
            w.memory.record_origin_change("u", rev, now());
        }
        let st = status_of(&w);
        assert_eq!(st.phase, Some(Phase::Failed));
        assert_eq!(cond(&st, CONDITION_FAILED).reason, REASON_ORIGIN_UNSTABLE);
        assert_eq!(st.origin_revision, Some(0));
    }

    #[test]
    fn disagreeing_authorities_wait_then_restart() {
        let w = world(
            vec![http_dist("d", "u", 2)],
            vec![node("a", &[]), node("b", &[])],
            &["a", "b"],
        );
        let mut w = w;
        edit_report(&mut w, "a", "u", |e| e.size = Some(100));
        edit_report(&mut w, "b", "u", |e| e.size = Some(200));
        let st = status_of(&w);
        assert_eq!(st.phase, Some(Phase::Progressing));
        let p = cond(&st, CONDITION_PROGRESSING);
        assert_eq!(p.reason, REASON_AUTHORITIES_DISAGREE);
        assert!(p.message.contains("size"), "{}", p.message);
        assert_eq!(st.size, None);
        // The shell notes the disagreement; past the bound it restarts.
        w.memory.note_status("u", None, &st, true, now());
        assert_eq!(status_of(&w).origin_revision, Some(0));
        w.now = Timestamp::from_second(now().as_second() + AUTHORITIES_DISAGREE_SECONDS).unwrap();
        // (Heartbeats would be stale by then: the test keeps the agents up.)
        w.fills = w
            .fills
            .iter()
            .map(|(n, f)| {
                let mut f = (**f).clone();
                f.status.as_mut().unwrap().last_heartbeat = Some(Time(w.now));
                (n.clone(), Arc::new(f))
            })
            .collect();
        let st = status_of(&w);
        assert_eq!(st.origin_revision, Some(1));
        assert_eq!(
            cond(&st, CONDITION_PROGRESSING).reason,
            REASON_AUTHORITIES_DISAGREE
        );
    }

    #[test]
    fn local_faults_never_fail_the_others() {
        // (what, the failing node is the reader?, its reason, others'
        // phase, expected phase, expected main reason)
        use NodePhase::*;
        let cases = [
            (
                "reader disk full, other still fetching",
                true,
                "InsufficientSpace",
                Downloading,
                Phase::Progressing,
                REASON_TRANSFERRING,
            ),
            (
                "reader disk full, other complete",
                true,
                "InsufficientSpace",
                Complete,
                Phase::Failed,
                REASON_NODES_FAILED,
            ),
            (
                "non-reader storage error",
                false,
                "StorageError",
                Downloading,
                Phase::Progressing,
                REASON_TRANSFERRING,
            ),
            (
                "origin down for a while",
                true,
                "OriginUnreachable",
                Downloading,
                Phase::Progressing,
                "OriginUnreachable",
            ),
            (
                "origin gone",
                true,
                "OriginNotFound",
                Downloading,
                Phase::Failed,
                "OriginNotFound",
            ),
            (
                "non-reader sees a 404",
                false,
                "OriginNotFound",
                Downloading,
                Phase::Progressing,
                REASON_TRANSFERRING,
            ),
        ];
        for (what, on_reader, reason, others, phase, main) in cases {
            let (mut w, reader, other) = two_node_world();
            let (failing, healthy) = if on_reader {
                (reader, other)
            } else {
                (other, reader)
            };
            edit_report(&mut w, &healthy, "u", |e| {
                e.phase = others;
                e.size = Some(10);
                e.bytes_done = 5;
            });
            fail(&mut w, &failing, reason);
            let st = status_of(&w);
            assert_eq!(st.phase, Some(phase), "{what}");
            let c = match phase {
                Phase::Failed => CONDITION_FAILED,
                _ => CONDITION_PROGRESSING,
            };
            assert_eq!(cond(&st, c).reason, main, "{what}");
            assert_eq!(st.failing_nodes.len(), 1, "{what}");
            assert_eq!(st.failing_nodes[0].node, failing, "{what}");
        }
    }

    #[test]
    fn an_origin_down_for_every_reader_fails_until_it_answers() {
        // Both nodes read the origin. One world through the steps, each
        // status written back as the shell does: (what, a's and b's
        // failure reason or downloading, expected phase, Failed
        // condition's status, main reason).
        const DOWN: Option<&str> = Some("OriginUnreachable");
        const UP: Option<&str> = None;
        let steps = [
            (
                "every reader finds the origin down",
                DOWN,
                DOWN,
                Phase::Failed,
                "True",
                "OriginUnreachable",
            ),
            (
                "one reader answered, the other still finds it down",
                UP,
                DOWN,
                Phase::Progressing,
                "False",
                "OriginUnreachable",
            ),
            (
                "both readers answered",
                UP,
                UP,
                Phase::Progressing,
                "False",
                REASON_TRANSFERRING,
            ),
        ];
        let mut w = world(
            vec![http_dist("d", "u", 2)],
            vec![node("a", &[]), node("b", &[])],
            &["a", "b"],
        );
        let plan = plan_distribution(&w.distributions[0], &w).unwrap();
        let mut readers: Vec<&str> = plan.readers.iter().map(|r| r.node.as_str()).collect();
        readers.sort_unstable();
        assert_eq!(readers, ["a", "b"]);
        for (what, a, b, phase, failed, main) in steps {
            for (n, reason) in [("a", a), ("b", b)] {
                match reason {
                    Some(reason) => fail(&mut w, n, reason),
                    None => edit_report(&mut w, n, "u", |e| {
                        e.phase = NodePhase::Downloading;
                        e.reason = None;
                        e.message = None;
                        e.size = Some(10);
                        e.bytes_done = 5;
                    }),
                }
            }
            let st = status_of(&w);
            assert_eq!(st.phase, Some(phase), "{what}");
            let f = cond(&st, CONDITION_FAILED);
            assert_eq!(f.status, failed, "{what}");
            let c = match phase {
                Phase::Failed => f,
                _ => cond(&st, CONDITION_PROGRESSING),
            };
            assert_eq!(c.reason, main, "{what}");
            assert_eq!(st.origin_revision, Some(0), "{what}");
            let mut d = (*w.distributions[0]).clone();
            d.status = Some(st);
            w.distributions[0] = Arc::new(d);
        }
    }

    #[test]
    fn a_down_seeder_is_named() {
        let mut d = (*http_dist("d", "u", 1)).clone();
        d.spec.source = peerfill_crds::Source {
            http: None,
            node: Some(peerfill_crds::NodeSource {
                node_name: "build".into(),
                path: "out/x".into(),
            }),
        };
        // "build" has a NodeFill but no ready agent.
        let w = world(
            vec![Arc::new(d)],
            vec![node("build", &[]), node("a", &[])],
            &["a"],
        );
        let st = status_of(&w);
        assert_eq!(st.phase, Some(Phase::Progressing));
        let p = cond(&st, CONDITION_PROGRESSING);
        assert_eq!(p.reason, REASON_SEEDER_UNAVAILABLE);
        assert!(p.message.contains("build"), "{}", p.message);
    }

    #[test]
    fn no_work_statuses_name_the_cause() {
        let d = http_dist("d", "u", 1);
        let w = world(vec![d.clone()], vec![node("a", &[])], &["a"]);
        let conflict = NoWork::PathConflict(crate::policy::PathConflict {
            owner: "team-a/model".into(),
            owner_path: "models".into(),
            path: "models/model.bin".into(),
        });
        let forbidden =
            NoWork::OriginForbidden("spec.source.http.url: the origin host is x".into());
        for (why, reason, names) in [
            (conflict, REASON_PATH_CONFLICT, "team-a/model"),
            (forbidden, REASON_ORIGIN_FORBIDDEN, "spec.source.http.url"),
        ] {
            let st = aggregate(&d, Err(&why), &w);
            assert_eq!(st.phase, Some(Phase::Failed));
            let f = cond(&st, CONDITION_FAILED);
            assert_eq!((f.status.as_str(), f.reason.as_str()), ("True", reason));
            assert!(f.message.contains(names), "{}", f.message);
            assert_eq!(st.desired_nodes, None, "no work, no counts");
        }
    }

    #[test]
    fn an_edit_of_a_complete_distribution_goes_back_to_progressing() {
        let w = world(vec![http_dist("d", "u", 1)], vec![node("a", &[])], &["a"]);
        let mut w = with_reports(w, &[("a", NodePhase::Complete, Some(10), 10)]);
        let st = status_of(&w);
        assert_eq!(st.phase, Some(Phase::Complete));
        let mut d = (*w.distributions[0]).clone();
        d.status = Some(st.clone());
        d.spec.source.http.as_mut().unwrap().url = "http://127.0.0.1:8080/v2.bin".into();
        d.metadata.generation = Some(2);
        w.distributions[0] = Arc::new(d);
        // "a" still reports Complete, on the old content id.
        let st2 = status_of(&w);
        assert_eq!(st2.phase, Some(Phase::Progressing));
        assert_eq!(st2.complete_nodes, Some(0));
        assert_eq!(st2.observed_generation, Some(2));
        assert_ne!(st2.content_id, st.content_id);
        assert_eq!(st2.size, None, "the old size is not this version's");
        assert_eq!(st2.completion_time, None);
    }

    #[test]
    fn transition_times_move_only_on_status_changes() {
        let t0 = now();
        let mut conds = Vec::new();
        set_condition(&mut conds, "Complete", false, "A", "x".into(), Some(1), t0);
        let later = Timestamp::from_second(t0.as_second() + 60).unwrap();
        set_condition(
            &mut conds,
            "Complete",
            false,
            "B",
            "y".into(),
            Some(2),
            later,
        );
        assert_eq!(conds[0].last_transition_time, Time(t0));
        assert_eq!(
            (conds[0].reason.as_str(), conds[0].observed_generation),
            ("B", Some(2))
        );
        set_condition(
            &mut conds,
            "Complete",
            true,
            "B",
            "y".into(),
            Some(2),
            later,
        );
        assert_eq!(conds[0].last_transition_time, Time(later));
        assert_eq!(conds.len(), 1);
    }

    #[test]
    fn completion_time_is_kept_while_complete() {
        let w = world(vec![http_dist("d", "u", 1)], vec![node("a", &[])], &["a"]);
        let mut w = with_reports(w, &[("a", NodePhase::Complete, Some(10), 10)]);
        let st = status_of(&w);
        assert_eq!(st.completion_time, Some(Time(now())));
        let mut d = (*w.distributions[0]).clone();
        d.status = Some(st.clone());
        w.distributions[0] = Arc::new(d);
        w.now = Timestamp::from_second(now().as_second() + 10).unwrap();
        let again = status_of(&w);
        assert_eq!(again.completion_time, st.completion_time);
        assert_eq!(again.conditions, st.conditions, "no condition moved");
    }

    #[test]
    fn invalid_spec_fails() {
        let mut d = (*http_dist("d", "u", 1)).clone();
        d.spec.target.path = "../x".into();
        let w = world(vec![Arc::new(d)], vec![node("a", &[])], &["a"]);
        let st = status_of(&w);
        assert_eq!(st.phase, Some(Phase::Failed));
        assert_eq!(cond(&st, CONDITION_FAILED).reason, REASON_INVALID_SPEC);
    }

    #[test]
    fn progress_only_changes() {
        let a = DistributionStatus {
            phase: Some(Phase::Progressing),
            progress: Some("10%".into()),
            ..Default::default()
        };
        let b = DistributionStatus {
            progress: Some("20%".into()),
            bytes_per_second: Some(5),
            ..a.clone()
        };
        let c = DistributionStatus {
            complete_nodes: Some(1),
            ..b.clone()
        };
        assert!(progress_only_change(Some(&a), &b));
        assert!(!progress_only_change(Some(&a), &a), "no change at all");
        assert!(
            progress_only_change(Some(&b), &c),
            "a node completed: a count"
        );
        assert!(!progress_only_change(None, &a), "first status");
        let d = DistributionStatus {
            failed_nodes: Some(1),
            ..c.clone()
        };
        assert!(!progress_only_change(Some(&c), &d), "a node failed");
        let done = DistributionStatus {
            phase: Some(Phase::Complete),
            ..c.clone()
        };
        assert!(!progress_only_change(Some(&c), &done), "a new phase");
    }

    #[test]
    fn condition_messages_with_counts_are_progress_reasons_are_not() {
        let w = world(
            vec![http_dist("d", "u", 1)],
            vec![node("a", &[]), node("b", &[]), node("c", &[])],
            &["a", "b", "c"],
        );
        let w = with_reports(w, &[("a", NodePhase::Downloading, Some(10), 5)]);
        let before = status_of(&w);
        // One more node complete: counts and the message move, nothing else.
        let w = with_reports(w, &[("b", NodePhase::Complete, Some(10), 10)]);
        let after = status_of(&w);
        assert_ne!(
            cond(&before, CONDITION_PROGRESSING).message,
            cond(&after, CONDITION_PROGRESSING).message
        );
        assert_eq!(before.phase, after.phase);
        assert!(progress_only_change(Some(&before), &after));
        // Another reason (a failure) is news at once.
        let mut failed = after.clone();
        if let Some(c) = failed
            .conditions
            .iter_mut()
            .find(|c| c.type_ == CONDITION_PROGRESSING)
        {
            c.reason = "OriginTimeout".into();
        }
        assert!(!progress_only_change(Some(&after), &failed));
    }

    #[test]
    fn progress_is_written_less_often_in_large_clusters() {
        let at = |nodes| {
            progress_write_interval_seconds(peerfill_crds::budget::report_interval_seconds(nodes))
        };
        assert_eq!(at(3), 2);
        assert_eq!(at(1_000), 2);
        assert_eq!(at(2_000), 4);
        assert_eq!(at(5_000), 10);
    }

    #[test]
    fn deleting() {
        let d = http_dist("d", "u", 1);
        let st = deleting_status(&d, 3, now());
        assert_eq!(st.phase, Some(Phase::Deleting));
        assert_eq!(
            cond(&st, CONDITION_PROGRESSING).message,
            "removing the content from 3 nodes"
        );
    }
}
