//! The Node labels: one per distribution complete on this node, removed
//! when the distribution is unassigned.

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use peerfill_crds::node_label_key;
use peerfill_crds::nodefill::NODE_LABEL_VALUE;
use serde_json::json;
use tracing::{info, warn};

use super::is_not_found;
use super::reconcile::NodeAgent;
use crate::agent::Phase;

impl NodeAgent {
    /// Removes the labels of unassigned distributions; each one's status
    /// entry goes with the next write once its label is gone.
    pub(super) async fn retry_removals(&mut self) {
        let uids: Vec<String> = self.removing.keys().cloned().collect();
        for uid in uids {
            let Some(r) = self.removing.get(&uid) else {
                continue;
            };
            let key = node_label_key(&r.namespace, &r.name);
            match set_label(&self.nodes, &self.args.node_name, &key, false).await {
                Ok(()) => {
                    self.removing.remove(&uid);
                    self.reporter.forget(&uid);
                }
                Err(e) => warn!(label = %key, error = %e, "removing the label failed; retrying"),
            }
        }
    }

    /// Labels the Node for every distribution complete here.
    pub(super) async fn label_complete(&mut self) {
        for t in self.tracked.values_mut() {
            if t.labeled || t.running.is_none() {
                continue;
            }
            let complete = self
                .engine
                .status(&t.assignment.content_id)
                .is_some_and(|s| s.phase == Phase::Complete);
            if !complete {
                continue;
            }
            let key = node_label_key(&t.assignment.namespace, &t.assignment.name);
            match set_label(&self.nodes, &self.args.node_name, &key, true).await {
                Ok(()) => {
                    info!(label = %key, "node labelled: the distribution is complete here");
                    t.labeled = true;
                }
                Err(e) => warn!(label = %key, error = %e, "labelling the node failed; retrying"),
            }
        }
    }
}

/// Sets (`true`) or removes the node label `key`.
pub(super) async fn set_label(
    nodes: &Api<Node>,
    node: &str,
    key: &str,
    on: bool,
) -> Result<(), kube::Error> {
    let value = if on {
        json!(NODE_LABEL_VALUE)
    } else {
        serde_json::Value::Null
    };
    let patch = json!({ "metadata": { "labels": { key: value } } });
    match nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // No Node, no label to remove.
        Err(e) if !on && is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}
