//! Distribution helpers shared by the local and the real cluster: build,
//! apply, delete, wait (by watch), per-node progress, leftovers and
//! diagnostics, all through the Kubernetes API.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Taint, Toleration};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use peerfill_crds::{
    CONDITION_COMPLETE, CONDITION_FAILED, Distribution, DistributionSpec, HttpSource,
    NodeDistributionStatus, NodeFill, NodeSource, Source, Strategy, Target, node_label_key,
};

use super::{ClusterError, LEASE_NAME};

/// Field manager of the suite's writes.
const MANAGER: &str = "peerfill-e2e";

/// A Distribution in namespace `default` of the HTTP content at `url` to
/// every node (no selector), at `path` under the data root, with 1 MiB
/// pieces and 4 origin readers. Adjust fields before applying.
pub fn http_distribution(name: &str, url: &str, path: &str) -> Distribution {
    distribution(
        name,
        Source {
            http: Some(HttpSource {
                url: url.to_string(),
                manifest_url: None,
                files: Vec::new(),
                headers_from: None,
                digest: None,
            }),
            node: None,
        },
        path,
    )
}

/// A Distribution of the file `source_path` that already sits under
/// `node`'s data root, to `path` on every node.
pub fn node_source_distribution(
    name: &str,
    node: &str,
    source_path: &str,
    path: &str,
) -> Distribution {
    distribution(
        name,
        Source {
            http: None,
            node: Some(NodeSource {
                node_name: node.to_string(),
                path: source_path.to_string(),
            }),
        },
        path,
    )
}

fn distribution(name: &str, source: Source, path: &str) -> Distribution {
    let mut d = Distribution::new(
        name,
        DistributionSpec {
            source,
            target: Target {
                path: path.to_string(),
                ..Target::default()
            },
            strategy: Strategy {
                piece_size: Some(1 << 20),
                max_origin_connections: 4,
                ..Strategy::default()
            },
        },
    );
    d.metadata.namespace = Some("default".to_string());
    d
}

/// Whether the `Complete` condition is True.
pub fn is_complete(d: &Distribution) -> bool {
    d.status
        .as_ref()
        .is_some_and(|s| s.is_condition_true(CONDITION_COMPLETE))
}

/// Whether the `Failed` condition is True.
pub fn is_failed(d: &Distribution) -> bool {
    d.status
        .as_ref()
        .is_some_and(|s| s.is_condition_true(CONDITION_FAILED))
}

/// A Node as the suite sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TestNode {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
}

pub(crate) async fn list_nodes(client: &Client) -> Result<Vec<TestNode>, ClusterError> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(ClusterError::kube("listing Nodes"))?;
    Ok(nodes
        .into_iter()
        .map(|n| TestNode {
            name: n.name_any(),
            labels: n.metadata.labels.clone().unwrap_or_default(),
            taints: n
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default(),
        })
        .collect())
}

/// Names of the nodes `dist`'s target selects: node selector, required
/// node affinity (matchExpressions) and NoSchedule/NoExecute taints against
/// the tolerations — what the operator should pick among nodes whose agent
/// is up. Sorted.
pub fn matching_nodes(nodes: &[TestNode], dist: &Distribution) -> Vec<String> {
    let target = &dist.spec.target;
    let mut out: Vec<String> = nodes
        .iter()
        .filter(|n| {
            target
                .node_selector
                .iter()
                .all(|(k, v)| n.labels.get(k) == Some(v))
        })
        .filter(|n| {
            let Some(terms) = target.node_affinity.as_ref().and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            }) else {
                return true;
            };
            terms.node_selector_terms.iter().any(|t| {
                t.match_expressions
                    .iter()
                    .flatten()
                    .all(|e| expression_matches(e, &n.labels))
            })
        })
        .filter(|n| {
            n.taints
                .iter()
                .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
                .all(|t| target.tolerations.iter().any(|tol| tolerates(tol, t)))
        })
        .map(|n| n.name.clone())
        .collect();
    out.sort();
    out
}

fn expression_matches(e: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let values = e.values.clone().unwrap_or_default();
    let v = labels.get(&e.key);
    match e.operator.as_str() {
        "In" => v.is_some_and(|v| values.contains(v)),
        "NotIn" => v.is_none_or(|v| !values.contains(v)),
        "Exists" => v.is_some(),
        "DoesNotExist" => v.is_none(),
        _ => false,
    }
}

fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    if tol
        .effect
        .as_deref()
        .is_some_and(|e| !e.is_empty() && e != taint.effect)
    {
        return false;
    }
    match tol.operator.as_deref() {
        Some("Exists") => tol
            .key
            .as_deref()
            .is_none_or(|k| k.is_empty() || k == taint.key),
        _ => {
            tol.key.as_deref() == Some(taint.key.as_str())
                && tol.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
    }
}

fn namespace_of(d: &Distribution) -> String {
    d.metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string())
}

pub(crate) async fn apply(client: &Client, d: &Distribution) -> Result<Distribution, ClusterError> {
    let ns = namespace_of(d);
    let name = d.name_any();
    let api: Api<Distribution> = Api::namespaced(client.clone(), &ns);
    let mut body = d.clone();
    body.metadata.managed_fields = None;
    body.metadata.resource_version = None;
    body.metadata.uid = None;
    body.metadata.namespace = Some(ns.clone());
    body.status = None;
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(ClusterError::kube(format!(
        "applying Distribution {ns}/{name}"
    )))
}

pub(crate) async fn delete(client: &Client, d: &Distribution) -> Result<(), ClusterError> {
    let ns = namespace_of(d);
    let name = d.name_any();
    let api: Api<Distribution> = Api::namespaced(client.clone(), &ns);
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(ClusterError::Kube {
            what: format!("deleting Distribution {ns}/{name}"),
            source: e,
        }),
    }
}

/// Watches one Distribution until `cond` holds; `None` on timeout.
pub(crate) async fn wait_object(
    client: &Client,
    d: &Distribution,
    timeout: Duration,
    cond: impl Fn(Option<&Distribution>) -> bool,
) -> Option<Result<Option<Distribution>, ClusterError>> {
    let ns = namespace_of(d);
    let name = d.name_any();
    let api: Api<Distribution> = Api::namespaced(client.clone(), &ns);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let watch = async {
        let mut stream = watcher(api, cfg).default_backoff().boxed();
        let mut init: Option<Distribution> = None;
        while let Some(ev) = stream.next().await {
            let current = match ev {
                Ok(watcher::Event::Apply(o)) => Some(o),
                Ok(watcher::Event::Delete(_)) => None,
                Ok(watcher::Event::Init) => {
                    init = None;
                    continue;
                }
                Ok(watcher::Event::InitApply(o)) => {
                    init = Some(o);
                    continue;
                }
                Ok(watcher::Event::InitDone) => init.take(),
                Err(e) => {
                    tracing::debug!(error = %e, "watch of {ns}/{name} failed; retrying");
                    continue;
                }
            };
            if cond(current.as_ref()) {
                return Ok(current);
            }
        }
        Err(ClusterError::Invalid(format!("watch of {ns}/{name} ended")))
    };
    tokio::time::timeout(timeout, watch).await.ok()
}

/// Watches all NodeFills until `cond` holds for the list; `None` on timeout.
pub(crate) async fn wait_list(
    client: &Client,
    timeout: Duration,
    cond: impl Fn(&[NodeFill]) -> bool,
) -> Option<Result<Vec<NodeFill>, ClusterError>> {
    let api: Api<NodeFill> = Api::all(client.clone());
    let watch = async {
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut all: BTreeMap<String, NodeFill> = BTreeMap::new();
        let mut init: BTreeMap<String, NodeFill> = BTreeMap::new();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(o)) => {
                    all.insert(o.name_any(), o);
                }
                Ok(watcher::Event::Delete(o)) => {
                    all.remove(&o.name_any());
                }
                Ok(watcher::Event::Init) => {
                    init.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(o)) => {
                    init.insert(o.name_any(), o);
                    continue;
                }
                Ok(watcher::Event::InitDone) => all = std::mem::take(&mut init),
                Err(e) => {
                    tracing::debug!(error = %e, "NodeFill watch failed; retrying");
                    continue;
                }
            }
            let list: Vec<NodeFill> = all.values().cloned().collect();
            if cond(&list) {
                return Ok(list);
            }
        }
        Err(ClusterError::Invalid("NodeFill watch ended".into()))
    };
    tokio::time::timeout(timeout, watch).await.ok()
}

/// The uid of `d`, from the object or else from the API.
async fn uid_of(client: &Client, d: &Distribution) -> Result<String, ClusterError> {
    if let Some(uid) = d.metadata.uid.clone() {
        return Ok(uid);
    }
    let ns = namespace_of(d);
    let api: Api<Distribution> = Api::namespaced(client.clone(), &ns);
    let got = api
        .get(&d.name_any())
        .await
        .map_err(ClusterError::kube(format!(
            "reading Distribution {ns}/{}",
            d.name_any()
        )))?;
    got.metadata.uid.ok_or_else(|| {
        ClusterError::Invalid(format!("Distribution {ns}/{} has no uid", d.name_any()))
    })
}

pub(crate) async fn list_nodefills(client: &Client) -> Result<Vec<NodeFill>, ClusterError> {
    Ok(Api::<NodeFill>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(ClusterError::kube("listing NodeFills"))?
        .items)
}

pub(crate) async fn node_progress(
    client: &Client,
    d: &Distribution,
) -> Result<BTreeMap<String, NodeDistributionStatus>, ClusterError> {
    let uid = uid_of(client, d).await?;
    Ok(progress_in(&list_nodefills(client).await?, &uid))
}

/// Per-node status entries of the distribution with `uid`.
pub fn progress_in(fills: &[NodeFill], uid: &str) -> BTreeMap<String, NodeDistributionStatus> {
    fills
        .iter()
        .filter_map(|nf| {
            let entry = nf
                .status
                .as_ref()?
                .distributions
                .iter()
                .find(|e| e.uid == uid)?;
            Some((nf.name_any(), entry.clone()))
        })
        .collect()
}

/// Whether the NodeFill's agent is up as far as the status says.
pub fn agent_ready(nf: &NodeFill) -> bool {
    nf.status.as_ref().is_some_and(|s| {
        s.endpoint.is_some()
            && s.conditions.iter().any(|c| {
                c.type_ == peerfill_crds::nodefill::CONDITION_AGENT_READY && c.status == "True"
            })
    })
}

pub(crate) async fn ready_agents(client: &Client) -> Result<Vec<String>, ClusterError> {
    Ok(list_nodefills(client)
        .await?
        .iter()
        .filter(|nf| agent_ready(nf))
        .map(|nf| nf.name_any())
        .collect())
}

pub(crate) async fn lease_holder(
    client: &Client,
    ns: &str,
) -> Result<Option<String>, ClusterError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), ns);
    let lease = api
        .get_opt(LEASE_NAME)
        .await
        .map_err(ClusterError::kube(format!(
            "reading Lease {ns}/{LEASE_NAME}"
        )))?;
    Ok(lease
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

pub(crate) async fn leftovers_in_api(
    client: &Client,
    d: &Distribution,
) -> Result<Vec<String>, ClusterError> {
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let mut out = Vec::new();
    for nf in list_nodefills(client).await? {
        let spec_has = nf.spec.distributions.iter().any(|a| a.uid == uid);
        let status_has = nf
            .status
            .as_ref()
            .is_some_and(|s| s.distributions.iter().any(|e| e.uid == uid));
        if spec_has {
            out.push(format!("NodeFill {} still assigns it", nf.name_any()));
        }
        if status_has {
            out.push(format!("NodeFill {} status still lists it", nf.name_any()));
        }
    }
    let key = node_label_key(&namespace_of(d), &d.name_any());
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(ClusterError::kube("listing Nodes"))?;
    for n in nodes {
        if n.labels().contains_key(&key) {
            out.push(format!("Node {} still has label {key}", n.name_any()));
        }
        if n.annotations().contains_key(&key) {
            out.push(format!("Node {} still has annotation {key}", n.name_any()));
        }
    }
    Ok(out)
}

/// The Distribution's status and every NodeFill in a few lines each.
pub(crate) async fn api_diagnostics(client: &Client, d: Option<&Distribution>) -> String {
    let mut out = String::new();
    if let Some(d) = d {
        let ns = namespace_of(d);
        let api: Api<Distribution> = Api::namespaced(client.clone(), &ns);
        match api.get_opt(&d.name_any()).await {
            Ok(Some(cur)) => {
                let _ = writeln!(
                    out,
                    "--- Distribution {ns}/{} (uid {}, finalizers {:?}, deleting {}):\n{}",
                    cur.name_any(),
                    cur.metadata.uid.as_deref().unwrap_or("?"),
                    cur.metadata.finalizers.clone().unwrap_or_default(),
                    cur.metadata.deletion_timestamp.is_some(),
                    serde_json::to_string_pretty(&cur.status).unwrap_or_default()
                );
            }
            Ok(None) => {
                let _ = writeln!(out, "--- Distribution {ns}/{}: gone", d.name_any());
            }
            Err(e) => {
                let _ = writeln!(out, "--- Distribution {ns}/{}: {e}", d.name_any());
            }
        }
    }
    match list_nodefills(client).await {
        Ok(fills) => {
            let _ = writeln!(out, "--- NodeFills ({}):", fills.len());
            for nf in fills {
                describe_nodefill(&mut out, &nf);
            }
        }
        Err(e) => {
            let _ = writeln!(out, "--- NodeFills: {e}");
        }
    }
    for ns in [super::SYSTEM_NAMESPACE] {
        if let Ok(h) = lease_holder(client, ns).await {
            let _ = writeln!(out, "--- Lease {ns}/{LEASE_NAME} holder: {h:?}");
        }
    }
    out
}

fn describe_nodefill(out: &mut String, nf: &NodeFill) {
    let s = nf.status.clone().unwrap_or_default();
    let ready = s
        .conditions
        .iter()
        .map(|c| format!("{}={}({})", c.type_, c.status, c.reason))
        .collect::<Vec<_>>()
        .join(",");
    let _ = writeln!(
        out,
        "{}: endpoint {:?} [{ready}] heartbeat {:?} identity {} csr {} peers {}",
        nf.name_any(),
        s.endpoint,
        s.last_heartbeat.as_ref().map(|t| t.0.to_string()),
        nf.spec.identity.is_some(),
        s.certificate_request.is_some(),
        nf.spec.peers.len()
    );
    for a in &nf.spec.distributions {
        let readers: Vec<String> = a
            .origin_readers
            .iter()
            .map(|r| format!("{} {}..{}", r.node, r.start, r.end))
            .collect();
        let _ = writeln!(
            out,
            "  assigned {}/{} uid {} content {} size {:?} manifest {:?} role {:?} readers [{}] peers {}",
            a.namespace,
            a.name,
            a.uid,
            a.content_id,
            a.size,
            a.manifest_digest,
            a.role,
            readers.join(", "),
            a.peers.len()
        );
    }
    for e in &s.distributions {
        let _ = writeln!(
            out,
            "  status {}/{} content {:?} {} {}/{} B (origin {}, peers {}) root {:?} {:?} {:?}",
            e.namespace,
            e.name,
            e.content_id,
            e.phase.as_str(),
            e.bytes_done,
            e.size.unwrap_or(0),
            e.bytes_from_origin,
            e.bytes_from_peers,
            e.root,
            e.reason,
            e.message
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAffinity, NodeSelector, NodeSelectorTerm};

    fn node(name: &str, labels: &[(&str, &str)], taints: &[(&str, &str)]) -> TestNode {
        TestNode {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            taints: taints
                .iter()
                .map(|(k, e)| Taint {
                    key: k.to_string(),
                    value: Some("true".into()),
                    effect: e.to_string(),
                    time_added: None,
                })
                .collect(),
        }
    }

    #[test]
    fn selection_follows_selector_affinity_and_taints() {
        let nodes = vec![
            node("a", &[("pool", "general"), ("zone", "z1")], &[]),
            node("b", &[("pool", "general"), ("zone", "z2")], &[]),
            node(
                "c",
                &[("pool", "gpu"), ("zone", "z1")],
                &[("gpu", "NoSchedule")],
            ),
            node("d", &[("pool", "general")], &[("soft", "PreferNoSchedule")]),
        ];
        let mut d = http_distribution("x", "http://127.0.0.1:1/b", "p");
        assert_eq!(matching_nodes(&nodes, &d), ["a", "b", "d"]);
        d.spec.target.tolerations = vec![Toleration {
            key: Some("gpu".into()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        }];
        assert_eq!(matching_nodes(&nodes, &d), ["a", "b", "c", "d"]);
        d.spec
            .target
            .node_selector
            .insert("zone".into(), "z1".into());
        assert_eq!(matching_nodes(&nodes, &d), ["a", "c"]);
        d.spec.target.node_selector.clear();
        d.spec.target.node_affinity = Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: "pool".into(),
                        operator: "NotIn".into(),
                        values: Some(vec!["gpu".into()]),
                    }]),
                    match_fields: None,
                }],
            }),
            ..NodeAffinity::default()
        });
        assert_eq!(matching_nodes(&nodes, &d), ["a", "b", "d"]);
    }

    #[test]
    fn equal_tolerations_need_the_value() {
        let taint = Taint {
            key: "k".into(),
            value: Some("true".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        };
        let mut tol = Toleration {
            key: Some("k".into()),
            operator: Some("Equal".into()),
            value: Some("true".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        };
        assert!(tolerates(&tol, &taint));
        tol.value = Some("false".into());
        assert!(!tolerates(&tol, &taint));
        tol.value = Some("true".into());
        tol.effect = Some("NoExecute".into());
        assert!(!tolerates(&tol, &taint));
        let all = Toleration {
            operator: Some("Exists".into()),
            ..Toleration::default()
        };
        assert!(tolerates(&all, &taint));
    }
}
