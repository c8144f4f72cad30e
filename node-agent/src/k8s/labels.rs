//! The Node labels: one per distribution complete on this node, removed
//! when the distribution is unassigned.
//!
//! All label changes of a pass go out in ONE merge patch of the Node, and
//! a completion is labelled only once the status write that reports it
//! went out (completions are held and batched by the status schedule,
//! `report`): three distributions completing together cost one label
//! patch, not three. Removals are not held (a deleted Distribution's
//! finalizer waits on them).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use peerfill_crds::node_label_key;
use peerfill_crds::nodefill::NODE_LABEL_VALUE;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::is_not_found;
use super::reconcile::NodeAgent;
use crate::agent::Phase;

impl NodeAgent {
    /// Removes the labels of unassigned distributions (each one's status
    /// entry goes with the next write once its label is gone) and labels
    /// the Node for every distribution whose completion the status
    /// reported, in one patch.
    pub(super) async fn sync_labels(&mut self) {
        let mut changes: BTreeMap<String, bool> = BTreeMap::new();
        for r in self.removing.values() {
            changes.insert(node_label_key(&r.namespace, &r.name), false);
        }
        let mut labelled = Vec::new();
        for (uid, t) in &self.tracked {
            if t.labeled || t.running.is_none() || !self.reporter.reported_complete(uid) {
                continue;
            }
            let complete = self
                .engine
                .status(&t.assignment.content_id)
                .is_some_and(|s| s.phase == Phase::Complete);
            if complete {
                changes.insert(
                    node_label_key(&t.assignment.namespace, &t.assignment.name),
                    true,
                );
                labelled.push(uid.clone());
            }
        }
        if changes.is_empty() {
            return;
        }
        match set_labels(&self.nodes, &self.args.node_name, &changes).await {
            Ok(()) => {
                for uid in std::mem::take(&mut self.removing).into_keys() {
                    self.reporter.forget(&uid);
                }
                for uid in labelled {
                    if let Some(t) = self.tracked.get_mut(&uid) {
                        t.labeled = true;
                    }
                }
                info!(labels = ?changes, "node labels updated");
            }
            Err(e) => {
                warn!(labels = ?changes, error = %e, "updating the node labels failed; retrying")
            }
        }
    }
}

/// The merge patch setting (`true`) or removing (`false`) each label.
pub(super) fn labels_patch(changes: &BTreeMap<String, bool>) -> Value {
    let labels: serde_json::Map<String, Value> = changes
        .iter()
        .map(|(k, on)| {
            let v = if *on {
                json!(NODE_LABEL_VALUE)
            } else {
                Value::Null
            };
            (k.clone(), v)
        })
        .collect();
    json!({ "metadata": { "labels": labels } })
}

/// Applies `changes` to the Node's labels in one merge patch.
pub(super) async fn set_labels(
    nodes: &Api<Node>,
    node: &str,
    changes: &BTreeMap<String, bool>,
) -> Result<(), kube::Error> {
    let patch = labels_patch(changes);
    match nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // No Node, no label to remove (and none to set).
        Err(e) if is_not_found(&e) && changes.values().all(|on| !on) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets (`true`) or removes the node label `key`.
pub(super) async fn set_label(
    nodes: &Api<Node>,
    node: &str,
    key: &str,
    on: bool,
) -> Result<(), kube::Error> {
    set_labels(nodes, node, &BTreeMap::from([(key.to_string(), on)])).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_patch_sets_and_removes_every_label() {
        let changes = BTreeMap::from([
            ("peerfill.dev/default.a".to_string(), true),
            ("peerfill.dev/default.b".to_string(), true),
            ("peerfill.dev/default.old".to_string(), false),
        ]);
        assert_eq!(
            labels_patch(&changes),
            json!({ "metadata": { "labels": {
                "peerfill.dev/default.a": NODE_LABEL_VALUE,
                "peerfill.dev/default.b": NODE_LABEL_VALUE,
                "peerfill.dev/default.old": null,
            } } })
        );
    }
}
