//! Which Kubernetes Events a status change deserves. Pure.

use peerfill_crds::{CONDITION_FAILED, CONDITION_PROGRESSING, DistributionStatus, Phase};

/// Progressing reasons announced with a Warning Event.
pub const WARNING_PROGRESS_REASONS: &[&str] = &[
    crate::policy::REASON_ORIGIN_CHANGED,
    crate::status::REASON_AUTHORITIES_DISAGREE,
    crate::status::REASON_SEEDER_UNAVAILABLE,
];

/// An Event to publish on a Distribution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub warning: bool,
    pub reason: String,
    pub action: &'static str,
    pub note: String,
}

fn normal(reason: &str, action: &'static str, note: String) -> Planned {
    Planned {
        warning: false,
        reason: reason.into(),
        action,
        note,
    }
}

fn warning(reason: &str, action: &'static str, note: String) -> Planned {
    Planned {
        warning: true,
        reason: reason.into(),
        action,
        note,
    }
}

/// Events for the change from `old` to `new`: Assigned (the number of
/// target nodes changed), Progressing, Complete, Failed, NodeFailed (per
/// newly failing node), Deleting.
pub fn events(old: Option<&DistributionStatus>, new: &DistributionStatus) -> Vec<Planned> {
    let mut out = Vec::new();
    let old_phase = old.and_then(|o| o.phase);
    let old_desired = old.and_then(|o| o.desired_nodes).unwrap_or(0);
    let desired = new.desired_nodes.unwrap_or(0);
    if new.phase != Some(Phase::Deleting) && desired != old_desired && desired > 0 {
        out.push(normal(
            "Assigned",
            "Assign",
            format!("assigned to {desired} node(s) (was {old_desired})"),
        ));
    }
    if new.phase != old_phase {
        match new.phase {
            Some(Phase::Progressing) => out.push(normal(
                "Progressing",
                "Transfer",
                "nodes started fetching the content".into(),
            )),
            Some(Phase::Complete) => out.push(normal(
                "Complete",
                "Transfer",
                format!("all {desired} node(s) hold the verified content"),
            )),
            Some(Phase::Failed) => {
                let c = new.condition(CONDITION_FAILED);
                out.push(warning(
                    c.map(|c| c.reason.as_str()).unwrap_or("Failed"),
                    "Transfer",
                    c.map(|c| c.message.clone()).unwrap_or_default(),
                ));
            }
            Some(Phase::Deleting) => out.push(normal(
                "Deleting",
                "Delete",
                "removing the content from the nodes".into(),
            )),
            Some(Phase::Pending) | None => {}
        }
    }
    // Trouble that keeps the Distribution Progressing still deserves a
    // Warning: a changed origin, disagreeing authorities, a lost seeder.
    let progressing_reason = |s: &DistributionStatus| {
        s.condition(CONDITION_PROGRESSING)
            .filter(|c| c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, message)) = progressing_reason(new) {
        let was = old.and_then(progressing_reason).map(|(r, _)| r);
        let revised =
            new.origin_revision.unwrap_or(0) > old.and_then(|o| o.origin_revision).unwrap_or(0);
        if WARNING_PROGRESS_REASONS.contains(&reason.as_str())
            && (was.as_deref() != Some(reason.as_str()) || revised)
        {
            out.push(warning(&reason, "Transfer", message));
        }
    }
    for f in &new.failing_nodes {
        let known = old.is_some_and(|o| {
            o.failing_nodes
                .iter()
                .any(|p| p.node == f.node && p.reason == f.reason)
        });
        if !known {
            out.push(warning(
                "NodeFailed",
                "Transfer",
                format!("{}: {}: {}", f.node, f.reason, f.message),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerfill_crds::FailingNode;

    fn st(phase: Phase, desired: u32, failing: &[&str]) -> DistributionStatus {
        DistributionStatus {
            phase: Some(phase),
            desired_nodes: Some(desired),
            failing_nodes: failing
                .iter()
                .map(|n| FailingNode {
                    node: n.to_string(),
                    reason: "DiskFull".into(),
                    message: "no space".into(),
                })
                .collect(),
            ..DistributionStatus::default()
        }
    }

    #[test]
    fn table() {
        let reasons = |old: Option<DistributionStatus>, new: DistributionStatus| {
            events(old.as_ref(), &new)
                .into_iter()
                .map(|e| e.reason)
                .collect::<Vec<_>>()
        };
        let cases: Vec<(
            &str,
            Option<DistributionStatus>,
            DistributionStatus,
            Vec<&str>,
        )> = vec![
            (
                "first sight, no nodes",
                None,
                st(Phase::Pending, 0, &[]),
                vec![],
            ),
            (
                "first sight, nodes",
                None,
                st(Phase::Pending, 3, &[]),
                vec!["Assigned"],
            ),
            (
                "unchanged",
                Some(st(Phase::Progressing, 3, &[])),
                st(Phase::Progressing, 3, &[]),
                vec![],
            ),
            (
                "started",
                Some(st(Phase::Pending, 3, &[])),
                st(Phase::Progressing, 3, &[]),
                vec!["Progressing"],
            ),
            (
                "node joined",
                Some(st(Phase::Progressing, 3, &[])),
                st(Phase::Progressing, 4, &[]),
                vec!["Assigned"],
            ),
            (
                "done",
                Some(st(Phase::Progressing, 3, &[])),
                st(Phase::Complete, 3, &[]),
                vec!["Complete"],
            ),
            (
                "node failed",
                Some(st(Phase::Progressing, 3, &[])),
                st(Phase::Progressing, 3, &["n1"]),
                vec!["NodeFailed"],
            ),
            (
                "still failed",
                Some(st(Phase::Progressing, 3, &["n1"])),
                st(Phase::Progressing, 3, &["n1"]),
                vec![],
            ),
            (
                "failed",
                Some(st(Phase::Progressing, 3, &["n1"])),
                st(Phase::Failed, 3, &["n1"]),
                vec!["Failed"],
            ),
            (
                "deleting",
                Some(st(Phase::Complete, 3, &[])),
                st(Phase::Deleting, 0, &[]),
                vec!["Deleting"],
            ),
        ];
        for (what, old, new, want) in cases {
            assert_eq!(reasons(old, new), want, "{what}");
        }
    }

    #[test]
    fn trouble_while_progressing_is_a_warning() {
        let with = |reason: &str, revision: u32| {
            let mut s = st(Phase::Progressing, 2, &[]);
            s.origin_revision = Some(revision);
            s.conditions
                .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                    type_: CONDITION_PROGRESSING.into(),
                    status: "True".into(),
                    reason: reason.into(),
                    message: format!("because {reason}"),
                    observed_generation: Some(1),
                    last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                    ),
                });
            s
        };
        let warnings = |old: &DistributionStatus, new: &DistributionStatus| {
            events(Some(old), new)
                .into_iter()
                .filter(|e| e.warning)
                .map(|e| e.reason)
                .collect::<Vec<_>>()
        };
        let cases = [
            (
                "origin changed",
                with("Transferring", 0),
                with("OriginChanged", 1),
                vec!["OriginChanged"],
            ),
            (
                "changed again",
                with("OriginChanged", 1),
                with("OriginChanged", 2),
                vec!["OriginChanged"],
            ),
            (
                "same state",
                with("OriginChanged", 1),
                with("OriginChanged", 1),
                vec![],
            ),
            (
                "disagree",
                with("Transferring", 0),
                with("AuthoritiesDisagree", 0),
                vec!["AuthoritiesDisagree"],
            ),
            (
                "seeder",
                with("Transferring", 0),
                with("SeederUnavailable", 0),
                vec!["SeederUnavailable"],
            ),
            (
                "ordinary",
                with("WaitingForNodes", 0),
                with("Transferring", 0),
                vec![],
            ),
        ];
        for (what, old, new, want) in cases {
            assert_eq!(warnings(&old, &new), want, "{what}");
        }
    }
}
