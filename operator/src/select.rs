//! Which nodes a Distribution targets, and whether a node's agent is up.
//! Pure: no I/O, the clock is passed in.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeAffinity, NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration,
};
use k8s_openapi::jiff::Timestamp;
use peerfill_crds::nodefill::CONDITION_AGENT_READY;
use peerfill_crds::{NodeFill, Target, budget};

/// Why a node is or is not a target of a Distribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeMatch {
    /// Selected, not being deleted, agent up: a target.
    Target,
    /// Selected by the target, but its agent is not up.
    AgentDown,
    /// Not selected (labels, affinity, taints) or being deleted.
    NotSelected,
}

/// Whether `node` matches `target` (labels, required affinity, taints) and
/// is not being deleted. Agent state is checked separately ([`agent_up`]).
pub fn node_selected(target: &Target, node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let name = node.metadata.name.as_deref().unwrap_or_default();
    target
        .node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && target
            .node_affinity
            .as_ref()
            .is_none_or(|a| affinity_matches(a, labels, name))
        && taints_tolerated(
            node.spec
                .as_ref()
                .and_then(|s| s.taints.as_deref())
                .unwrap_or_default(),
            &target.tolerations,
        )
}

/// Target, agent down, or not selected.
pub fn classify(
    target: &Target,
    node: &Node,
    fill: Option<&NodeFill>,
    now: Timestamp,
) -> NodeMatch {
    if !node_selected(target, node) {
        NodeMatch::NotSelected
    } else if fill.is_some_and(|f| agent_up(f, now)) {
        NodeMatch::Target
    } else {
        NodeMatch::AgentDown
    }
}

/// Only the `requiredDuringSchedulingIgnoredDuringExecution` part selects
/// nodes, as for Pods: terms are ORed, a term's requirements ANDed; an empty
/// term matches nothing; no required part matches everything.
pub fn affinity_matches(
    affinity: &NodeAffinity,
    labels: &BTreeMap<String, String>,
    node_name: &str,
) -> bool {
    let Some(required) = &affinity.required_during_scheduling_ignored_during_execution else {
        return true;
    };
    required
        .node_selector_terms
        .iter()
        .any(|term| term_matches(term, labels, node_name))
}

fn term_matches(term: &NodeSelectorTerm, labels: &BTreeMap<String, String>, name: &str) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| {
            // Kubernetes supports only `metadata.name` (In/NotIn) here.
            r.key == "metadata.name"
                && matches!(r.operator.as_str(), "In" | "NotIn")
                && requirement_matches(r, Some(name))
        })
}

/// One `matchExpressions`/`matchFields` requirement against the value of its
/// key (`None`: the key is absent).
pub fn requirement_matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.as_deref().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        op @ ("Gt" | "Lt") => {
            // Exactly one integer value; the label must parse as an integer.
            let (Some(v), [bound]) = (value, values) else {
                return false;
            };
            match (v.parse::<i64>(), bound.parse::<i64>()) {
                (Ok(v), Ok(b)) if op == "Gt" => v > b,
                (Ok(v), Ok(b)) => v < b,
                _ => false,
            }
        }
        _ => false,
    }
}

/// Every `NoSchedule`/`NoExecute` taint must be tolerated;
/// `PreferNoSchedule` never keeps content off a node.
pub fn taints_tolerated(taints: &[Taint], tolerations: &[Toleration]) -> bool {
    taints
        .iter()
        .filter(|t| matches!(t.effect.as_str(), "NoSchedule" | "NoExecute"))
        .all(|t| tolerations.iter().any(|tol| tolerates(tol, t)))
}

/// Kubernetes' rule: the effect matches (empty = all), the key matches
/// (empty key with `Exists` = every key), and `Exists` ignores the value
/// while `Equal` (the default) compares it.
pub fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    let effect = tol.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = tol.key.as_deref().unwrap_or_default();
    let operator = tol.operator.as_deref().unwrap_or("Equal");
    if key.is_empty() {
        return operator == "Exists";
    }
    if key != taint.key {
        return false;
    }
    match operator {
        "Exists" => true,
        "Equal" => {
            tol.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// `sha256:<hex>` of a PEM certificate request, as in
/// `spec.identity.requestDigest`.
pub fn request_digest(csr_pem: &str) -> String {
    use sha2::Digest as _;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(csr_pem.as_bytes()))
    )
}

/// Heartbeats older than this make an agent down, for a NodeFill.
pub fn stale_after_seconds(fill: &NodeFill) -> u32 {
    let interval = fill
        .spec
        .report_interval_seconds
        .unwrap_or(budget::MIN_REPORT_INTERVAL_SECONDS);
    budget::agent_stale_after_seconds(interval)
}

/// control-path.md "An agent is up": endpoint set, `AgentReady` True, its
/// certificate answers its current request, and a fresh heartbeat.
pub fn agent_up(fill: &NodeFill, now: Timestamp) -> bool {
    let Some(status) = &fill.status else {
        return false;
    };
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == CONDITION_AGENT_READY && c.status == "True");
    let identity_current = match (&status.certificate_request, &fill.spec.identity) {
        (Some(csr), Some(id)) => id.request_digest == request_digest(csr),
        _ => false,
    };
    let fresh = status.last_heartbeat.as_ref().is_some_and(|hb| {
        let age = now.as_second() - hb.0.as_second();
        age <= i64::from(stale_after_seconds(fill))
    });
    status.endpoint.as_deref().is_some_and(|e| !e.is_empty()) && ready && identity_current && fresh
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSelector, NodeSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
    use peerfill_crds::{IssuedIdentity, NodeFillSpec, NodeFillStatus};

    fn node(name: &str, labels: &[(&str, &str)], taints: &[(&str, &str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: Some(
                    taints
                        .iter()
                        .map(|(k, v, e)| Taint {
                            key: k.to_string(),
                            value: (!v.is_empty()).then(|| v.to_string()),
                            effect: e.to_string(),
                            time_added: None,
                        })
                        .collect(),
                ),
                ..NodeSpec::default()
            }),
            status: None,
        }
    }

    fn req(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn tol(key: &str, op: &str, value: &str, effect: &str) -> Toleration {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Toleration {
            key: opt(key),
            operator: opt(op),
            value: opt(value),
            effect: opt(effect),
            toleration_seconds: None,
        }
    }

    #[test]
    fn requirements() {
        let cases: &[(NodeSelectorRequirement, Option<&str>, bool)] = &[
            (req("k", "In", &["a", "b"]), Some("a"), true),
            (req("k", "In", &["a", "b"]), Some("c"), false),
            (req("k", "In", &["a"]), None, false),
            (req("k", "NotIn", &["a"]), Some("a"), false),
            (req("k", "NotIn", &["a"]), Some("b"), true),
            (req("k", "NotIn", &["a"]), None, true),
            (req("k", "Exists", &[]), Some(""), true),
            (req("k", "Exists", &[]), None, false),
            (req("k", "DoesNotExist", &[]), None, true),
            (req("k", "DoesNotExist", &[]), Some("x"), false),
            (req("k", "Gt", &["4"]), Some("8"), true),
            (req("k", "Gt", &["4"]), Some("4"), false),
            (req("k", "Gt", &["4"]), Some("x"), false),
            (req("k", "Gt", &["4"]), None, false),
            (req("k", "Gt", &["4", "5"]), Some("8"), false),
            (req("k", "Lt", &["4"]), Some("-1"), true),
            (req("k", "Lt", &["4"]), Some("4"), false),
            (req("k", "Bogus", &["4"]), Some("4"), false),
        ];
        for (r, value, want) in cases {
            assert_eq!(requirement_matches(r, *value), *want, "{r:?} vs {value:?}");
        }
    }

    fn affinity(terms: Vec<NodeSelectorTerm>) -> NodeAffinity {
        NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: terms,
            }),
            preferred_during_scheduling_ignored_during_execution: None,
        }
    }

    fn term(
        exprs: Vec<NodeSelectorRequirement>,
        fields: Vec<NodeSelectorRequirement>,
    ) -> NodeSelectorTerm {
        NodeSelectorTerm {
            match_expressions: (!exprs.is_empty()).then_some(exprs),
            match_fields: (!fields.is_empty()).then_some(fields),
        }
    }

    #[test]
    fn affinity_terms() {
        let labels: BTreeMap<String, String> = [
            ("gpu".to_string(), "a100".to_string()),
            ("cores".into(), "64".into()),
        ]
        .into();
        let cases = [
            ("no required part", NodeAffinity::default(), true),
            ("no terms", affinity(vec![]), false),
            ("empty term", affinity(vec![term(vec![], vec![])]), false),
            (
                "AND within a term",
                affinity(vec![term(
                    vec![req("gpu", "In", &["a100"]), req("cores", "Gt", &["32"])],
                    vec![],
                )]),
                true,
            ),
            (
                "AND fails",
                affinity(vec![term(
                    vec![req("gpu", "In", &["a100"]), req("cores", "Gt", &["64"])],
                    vec![],
                )]),
                false,
            ),
            (
                "OR across terms",
                affinity(vec![
                    term(vec![req("gpu", "DoesNotExist", &[])], vec![]),
                    term(vec![req("cores", "Lt", &["100"])], vec![]),
                ]),
                true,
            ),
            (
                "matchFields name In",
                affinity(vec![term(
                    vec![],
                    vec![req("metadata.name", "In", &["n1", "n2"])],
                )]),
                true,
            ),
            (
                "matchFields name NotIn",
                affinity(vec![term(
                    vec![],
                    vec![req("metadata.name", "NotIn", &["n1"])],
                )]),
                false,
            ),
            (
                "matchFields other key",
                affinity(vec![term(vec![], vec![req("metadata.uid", "In", &["n1"])])]),
                false,
            ),
        ];
        for (what, a, want) in cases {
            assert_eq!(affinity_matches(&a, &labels, "n1"), want, "{what}");
        }
    }

    #[test]
    fn taints_and_tolerations() {
        let t = |k: &str, v: &str, e: &str| Taint {
            key: k.into(),
            value: (!v.is_empty()).then(|| v.to_string()),
            effect: e.into(),
            time_added: None,
        };
        let cases: Vec<(&str, Vec<Taint>, Vec<Toleration>, bool)> = vec![
            ("no taints", vec![], vec![], true),
            (
                "NoSchedule untolerated",
                vec![t("gpu", "x", "NoSchedule")],
                vec![],
                false,
            ),
            (
                "NoExecute untolerated",
                vec![t("gpu", "", "NoExecute")],
                vec![],
                false,
            ),
            (
                "PreferNoSchedule ignored",
                vec![t("gpu", "", "PreferNoSchedule")],
                vec![],
                true,
            ),
            (
                "Equal with value",
                vec![t("gpu", "x", "NoSchedule")],
                vec![tol("gpu", "Equal", "x", "NoSchedule")],
                true,
            ),
            (
                "Equal is the default operator",
                vec![t("gpu", "x", "NoSchedule")],
                vec![tol("gpu", "", "x", "")],
                true,
            ),
            (
                "Equal wrong value",
                vec![t("gpu", "x", "NoSchedule")],
                vec![tol("gpu", "Equal", "y", "NoSchedule")],
                false,
            ),
            (
                "Exists ignores the value",
                vec![t("gpu", "x", "NoExecute")],
                vec![tol("gpu", "Exists", "", "")],
                true,
            ),
            (
                "effect must match",
                vec![t("gpu", "x", "NoExecute")],
                vec![tol("gpu", "Exists", "", "NoSchedule")],
                false,
            ),
            (
                "empty key + Exists tolerates all",
                vec![t("a", "1", "NoExecute"), t("b", "", "NoSchedule")],
                vec![tol("", "Exists", "", "")],
                true,
            ),
            (
                "empty key + Equal tolerates nothing",
                vec![t("a", "", "NoSchedule")],
                vec![tol("", "Equal", "", "")],
                false,
            ),
            (
                "every taint needs a toleration",
                vec![t("a", "", "NoSchedule"), t("b", "", "NoSchedule")],
                vec![tol("a", "Exists", "", "")],
                false,
            ),
        ];
        for (what, taints, tols, want) in cases {
            assert_eq!(taints_tolerated(&taints, &tols), want, "{what}");
        }
    }

    #[test]
    fn node_selection() {
        let target = Target {
            node_selector: [("pool".to_string(), "gpu".to_string())].into(),
            path: "x".into(),
            ..Target::default()
        };
        assert!(node_selected(&target, &node("n", &[("pool", "gpu")], &[])));
        assert!(!node_selected(&target, &node("n", &[("pool", "cpu")], &[])));
        assert!(!node_selected(&target, &node("n", &[], &[])));
        assert!(!node_selected(
            &target,
            &node("n", &[("pool", "gpu")], &[("dedicated", "x", "NoSchedule")])
        ));
        let mut deleting = node("n", &[("pool", "gpu")], &[]);
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        assert!(!node_selected(&target, &deleting));
    }

    pub(crate) fn up_fill(name: &str, heartbeat: Timestamp) -> NodeFill {
        let csr = format!("csr of {name}");
        let mut fill = NodeFill::new(
            name,
            NodeFillSpec {
                identity: Some(IssuedIdentity {
                    certificate: "cert".into(),
                    ca_certificate: "ca".into(),
                    request_digest: request_digest(&csr),
                }),
                report_interval_seconds: Some(2),
                ..NodeFillSpec::default()
            },
        );
        fill.status = Some(NodeFillStatus {
            endpoint: Some("127.0.0.1:7443".into()),
            certificate_request: Some(csr),
            last_heartbeat: Some(Time(heartbeat)),
            conditions: vec![Condition {
                type_: CONDITION_AGENT_READY.into(),
                status: "True".into(),
                reason: "Ready".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(heartbeat),
            }],
            ..NodeFillStatus::default()
        });
        fill
    }

    #[test]
    fn agent_up_rules() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let fresh = up_fill("n", now);
        assert!(agent_up(&fresh, now));
        // Stale after 3 * 2 + 15 = 21 s.
        let at = |s: i64| Timestamp::from_second(1_000_000 + s).unwrap();
        assert!(agent_up(&fresh, at(21)));
        assert!(!agent_up(&fresh, at(22)));

        let mut f = fresh.clone();
        f.status.as_mut().unwrap().endpoint = None;
        assert!(!agent_up(&f, now), "no endpoint");
        let mut f = fresh.clone();
        f.status.as_mut().unwrap().conditions[0].status = "False".into();
        assert!(!agent_up(&f, now), "not ready");
        let mut f = fresh.clone();
        f.status.as_mut().unwrap().certificate_request = Some("a new key".into());
        assert!(!agent_up(&f, now), "identity answers an old request");
        let mut f = fresh.clone();
        f.spec.identity = None;
        assert!(!agent_up(&f, now), "no identity");
        let mut f = fresh;
        f.status = None;
        assert!(!agent_up(&f, now), "no status");
    }

    #[test]
    fn classification() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let target = Target {
            path: "x".into(),
            ..Target::default()
        };
        let n = node("n", &[], &[]);
        let fill = up_fill("n", now);
        assert_eq!(classify(&target, &n, Some(&fill), now), NodeMatch::Target);
        assert_eq!(classify(&target, &n, None, now), NodeMatch::AgentDown);
        let tainted = node("n", &[], &[("t", "", "NoSchedule")]);
        assert_eq!(
            classify(&target, &tainted, Some(&fill), now),
            NodeMatch::NotSelected
        );
    }
}
