//! The Node labels: one per distribution complete on this node, removed
//! when the distribution is unassigned; and beside each label an annotation
//! with the same key naming the version the node holds (the content id,
//! as in the Distribution's `status.contentId`). While a new version fills,
//! the label stays and the annotation names the previous version, whose
//! file is still in place; when the new version is swapped in, the
//! annotation changes in the same patch as any other label change.
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
        let mut changes: BTreeMap<String, Option<String>> = BTreeMap::new();
        for r in self.removing.values() {
            changes.insert(node_label_key(&r.namespace, &r.name), None);
        }
        let mut labelled = Vec::new();
        for (uid, t) in &self.tracked {
            let id = &t.assignment.content_id;
            if t.labeled.as_ref() == Some(id)
                || t.running.is_none()
                || !self.reporter.reported_complete(uid)
            {
                continue;
            }
            let complete = self
                .engine
                .status(id)
                .is_some_and(|s| s.phase == Phase::Complete);
            if complete {
                changes.insert(
                    node_label_key(&t.assignment.namespace, &t.assignment.name),
                    Some(id.clone()),
                );
                labelled.push((uid.clone(), id.clone()));
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
                for (uid, id) in labelled {
                    if let Some(t) = self.tracked.get_mut(&uid) {
                        t.labeled = Some(id);
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

/// The merge patch setting each label (to `true`, its annotation to the
/// version held) or removing label and annotation (`None`).
pub(super) fn labels_patch(changes: &BTreeMap<String, Option<String>>) -> Value {
    let labels: serde_json::Map<String, Value> = changes
        .iter()
        .map(|(k, held)| {
            let v = held
                .as_ref()
                .map_or(Value::Null, |_| json!(NODE_LABEL_VALUE));
            (k.clone(), v)
        })
        .collect();
    let annotations: serde_json::Map<String, Value> = changes
        .iter()
        .map(|(k, held)| (k.clone(), held.as_ref().map_or(Value::Null, |id| json!(id))))
        .collect();
    json!({ "metadata": { "labels": labels, "annotations": annotations } })
}

/// Applies `changes` to the Node's labels and annotations in one merge patch.
pub(super) async fn set_labels(
    nodes: &Api<Node>,
    node: &str,
    changes: &BTreeMap<String, Option<String>>,
) -> Result<(), kube::Error> {
    let patch = labels_patch(changes);
    match nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // No Node, no label to remove (and none to set).
        Err(e) if is_not_found(&e) && changes.values().all(Option::is_none) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the node label `key` and its annotation.
pub(super) async fn remove_label(
    nodes: &Api<Node>,
    node: &str,
    key: &str,
) -> Result<(), kube::Error> {
    set_labels(nodes, node, &BTreeMap::from([(key.to_string(), None)])).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_patch_sets_and_removes_every_label() {
        let changes = BTreeMap::from([
            (
                "peerfill.dev/default.a".to_string(),
                Some("id-a".to_string()),
            ),
            (
                "peerfill.dev/default.b".to_string(),
                Some("id-b".to_string()),
            ),
            ("peerfill.dev/default.old".to_string(), None),
        ]);
        assert_eq!(
            labels_patch(&changes),
            json!({ "metadata": {
                "labels": {
                    "peerfill.dev/default.a": NODE_LABEL_VALUE,
                    "peerfill.dev/default.b": NODE_LABEL_VALUE,
                    "peerfill.dev/default.old": null,
                },
                "annotations": {
                    "peerfill.dev/default.a": "id-a",
                    "peerfill.dev/default.b": "id-b",
                    "peerfill.dev/default.old": null,
                },
            } })
        );
    }
}
