//! Reconciling the NodeFill spec into the engine: one content per
//! assignment, new versions started beside the previous one, restarts when
//! an assignment changes, peers and pins followed, and the data of
//! unassigned distributions deleted (also after a restart).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::Api;
use peerfill_crds::node_label_key;
use peerfill_crds::nodefill::{Assignment, NODE_LABEL_PREFIX, NodeFillSpec};
use tracing::{debug, error, info, warn};

use super::NodeArgs;
use super::headers;
use super::labels::remove_label;
use super::manifest::{Entry, Manifest};
use super::reporter::Reporter;
use super::translate::{self, Desired};
use super::zones;
use crate::agent::{ContentConfig, Engine, Phase, SourceConfig, dest_path};

/// One assignment this agent took on.
pub(super) struct Tracked {
    pub(super) assignment: Assignment,
    /// What the spec asks for, translated.
    pub(super) desired: Desired,
    /// The config the engine runs, if it runs.
    pub(super) running: Option<ContentConfig>,
    /// The version (content id) the node label and its annotation say this
    /// node holds, once set.
    pub(super) labeled: Option<String>,
    /// The previous version (content id, path) while a new one fills: its
    /// file stays in place until the new one is complete.
    pub(super) superseded: Option<(String, PathBuf)>,
}

/// Earlier files a new run may reuse pieces from: the previous version's,
/// when it lived at another path.
fn reuse_from(t: &Tracked, cfg: &ContentConfig) -> Vec<PathBuf> {
    t.superseded
        .iter()
        .map(|(_, p)| p.clone())
        .filter(|p| p != &cfg.path)
        .collect()
}

/// An unassigned distribution whose label removal is still to be done; its
/// status entry stays until then.
pub(super) struct Removal {
    pub(super) namespace: String,
    pub(super) name: String,
}

pub(super) struct NodeAgent {
    pub(super) args: NodeArgs,
    pub(super) engine: Engine,
    pub(super) nodes: Api<Node>,
    /// For reads beyond Nodes (the `headersFrom` Secrets).
    pub(super) client: kube::Client,
    /// When to reconcile again for contents waiting on their headers Secret.
    pub(super) headers_recheck: Option<Instant>,
    pub(super) manifest: Manifest,
    /// By Distribution uid.
    pub(super) tracked: BTreeMap<String, Tracked>,
    /// By Distribution uid.
    pub(super) removing: BTreeMap<String, Removal>,
    pub(super) last_spec: Option<NodeFillSpec>,
    pub(super) cleaned_up: bool,
    pub(super) reporter: Reporter,
}

impl NodeAgent {
    /// Brings the engine in line with `spec`.
    pub(super) async fn reconcile(&mut self, spec: &NodeFillSpec) {
        let peer_addrs = resolve_peers(spec).await;
        let me = self.args.node_name.clone();
        self.engine
            .swarm()
            .set_remote_nodes(zones::remote_nodes(spec, self.reporter.zone.as_deref()));
        if !self.cleaned_up {
            self.startup_cleanup(spec).await;
            self.cleaned_up = true;
        }
        let claimed: Vec<PathBuf> = spec
            .distributions
            .iter()
            .flat_map(|a| translate::claimed_paths(a, &me))
            .collect();
        let assigned: BTreeSet<&str> = spec.distributions.iter().map(|a| a.uid.as_str()).collect();
        let gone: Vec<String> = self
            .tracked
            .keys()
            .filter(|uid| !assigned.contains(uid.as_str()))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(t) = self.tracked.remove(&uid) {
                self.unassign(&uid, t, &claimed).await;
            }
        }
        let conflicts = translate::path_conflicts(&spec.distributions, &me);
        for a in &spec.distributions {
            self.removing.remove(&a.uid);
            let desired = match conflicts.get(&a.uid) {
                Some(other) => Desired::Invalid {
                    reason: "PathConflict",
                    message: format!(
                        "path {} overlaps the path of {other} on this node; nothing was touched",
                        a.path
                    ),
                },
                None => translate::translate(a, &me, &self.args.data_root, &peer_addrs),
            };
            let desired = headers::resolve(&self.client, a, &me, desired).await;
            if let Desired::Invalid { reason, .. } | Desired::Wait { reason, .. } = &desired
                && headers::is_headers_reason(reason)
            {
                self.headers_recheck = Some(Instant::now() + headers::RECHECK);
            }
            let t = self
                .tracked
                .entry(a.uid.clone())
                .or_insert_with(|| Tracked {
                    assignment: a.clone(),
                    desired: desired.clone(),
                    running: None,
                    labeled: None,
                    superseded: None,
                });
            t.assignment = a.clone();
            t.desired = desired.clone();
            let id = a.content_id.clone();
            // A new content id for the same Distribution is a new version
            // (an edit, or the origin changed): stop the old run, keep its
            // file in place (and labelled) until the new one is swapped in.
            if let Some(old) = t.running.as_ref().filter(|old| old.id != id) {
                let (old_id, old_path) = (old.id.clone(), old.path.clone());
                info!(content = %id, previous = %old_id, distribution = %a.name, "new version of the distribution; starting it beside the previous one");
                if let Err(e) = self.engine.remove(&old_id, false).await {
                    warn!(content = %old_id, error = %e, "stopping the previous version failed");
                }
                // Its partial data is of no use any more; its file stays.
                if let Err(e) = self.engine.delete_data_of(&old_id, None) {
                    warn!(content = %old_id, error = %e, "deleting the previous version's partial data failed");
                }
                t.running = None;
                if t.superseded.is_none() {
                    t.superseded = Some((old_id, old_path));
                }
            }
            match desired {
                Desired::Run(mut cfg) => match &t.running {
                    Some(old) => {
                        let learnt = self
                            .engine
                            .status(&id)
                            .filter(|s| s.size_known)
                            .map(|s| s.size);
                        if translate::needs_restart(old, learnt, &cfg) {
                            info!(content = %id, distribution = %a.name, "assignment changed; restarting the content");
                            if let Err(e) = self.engine.remove(&id, false).await {
                                warn!(content = %id, error = %e, "stopping the content failed");
                            }
                            t.running = None;
                            cfg.reuse_from = reuse_from(t, &cfg);
                            start(&self.engine, &mut self.manifest, t, cfg, &me);
                        } else {
                            if translate::peers_changed(old, &cfg) {
                                debug!(content = %id, "peers changed");
                                self.engine.set_peers(
                                    &id,
                                    cfg.peers.clone(),
                                    cfg.allowed_peers.clone(),
                                );
                            }
                            self.engine.pin(&id, cfg.root, cfg.origin_version.clone());
                            if old.caps != cfg.caps {
                                info!(content = %id, caps = ?cfg.caps, "caps or priority changed");
                                self.engine.set_caps(&id, cfg.caps);
                            }
                            let mut keep = cfg;
                            keep.size = old.size;
                            keep.reuse_from.clone_from(&old.reuse_from);
                            t.running = Some(keep);
                        }
                    }
                    None => {
                        cfg.reuse_from = reuse_from(t, &cfg);
                        start(&self.engine, &mut self.manifest, t, cfg, &me);
                    }
                },
                Desired::Wait { .. } | Desired::Invalid { .. } => {
                    if let Some(old) = t.running.take()
                        && let Err(e) = self.engine.remove(&old.id, false).await
                    {
                        warn!(content = %old.id, error = %e, "stopping the content failed");
                    }
                }
            }
        }
    }

    /// Once a new version is complete (swapped in atomically at its path),
    /// removes what is left of the previous one: its record, and its file
    /// when the path changed and this Distribution owns it.
    pub(super) fn finish_swaps(&mut self) {
        let me = self.args.node_name.clone();
        let claimed: Vec<PathBuf> = self
            .tracked
            .values()
            .flat_map(|t| translate::claimed_paths(&t.assignment, &me))
            .collect();
        for t in self.tracked.values_mut() {
            let Some((old_id, _)) = &t.superseded else {
                continue;
            };
            let complete = t.running.is_some()
                && self
                    .engine
                    .status(&t.assignment.content_id)
                    .is_some_and(|s| s.phase == Phase::Complete);
            if !complete {
                continue;
            }
            let old_id = old_id.clone();
            if let Some(path) = self
                .manifest
                .deletable_path(&old_id, &t.assignment.uid, &claimed)
                .and_then(|p| dest_path(&self.args.data_root, &p).ok())
            {
                info!(content = %old_id, path = %path.display(), "removing the previous version's file");
                if let Err(e) = self.engine.delete_data_of(&old_id, Some(&path)) {
                    warn!(content = %old_id, error = %e, "deleting the previous version failed; retrying");
                    continue;
                }
            }
            if let Err(e) = self.manifest.remove(&old_id) {
                warn!(error = %e, "updating the manifest failed");
            }
            t.superseded = None;
        }
    }

    /// After a restart: deletes the data of contents no longer assigned
    /// (only those in the manifest: files this agent created, never a path a
    /// current assignment claims) and removes the labels of distributions
    /// no longer assigned.
    pub(super) async fn startup_cleanup(&mut self, spec: &NodeFillSpec) {
        let me = self.args.node_name.clone();
        let claimed: Vec<PathBuf> = spec
            .distributions
            .iter()
            .flat_map(|a| translate::claimed_paths(a, &me))
            .collect();
        let ids: BTreeSet<&str> = spec
            .distributions
            .iter()
            .map(|a| a.content_id.as_str())
            .collect();
        let stale: Vec<(String, Entry)> = self
            .manifest
            .entries()
            .iter()
            .filter(|(id, _)| !ids.contains(id.as_str()))
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect();
        for (id, e) in stale {
            info!(content = %id, distribution = %format!("{}/{}", e.namespace, e.name), "deleting the data of a content unassigned while the agent was away");
            let dest = self
                .manifest
                .deletable_path(&id, &e.uid, &claimed)
                .and_then(|p| dest_path(&self.args.data_root, &p).ok());
            match self.engine.delete_data_of(&id, dest.as_deref()) {
                Ok(()) => {
                    if let Err(e) = self.manifest.remove(&id) {
                        warn!(error = %e, "updating the manifest failed");
                    }
                }
                Err(e) => warn!(content = %id, error = %e, "deleting stale data failed"),
            }
        }
        let keep: BTreeSet<String> = spec
            .distributions
            .iter()
            .map(|a| node_label_key(&a.namespace, &a.name))
            .collect();
        match self.nodes.get_opt(&self.args.node_name).await {
            Ok(Some(node)) => {
                let stale: BTreeSet<String> = node
                    .labels()
                    .keys()
                    .chain(node.annotations().keys())
                    .filter(|k| k.starts_with(NODE_LABEL_PREFIX) && !keep.contains(*k))
                    .cloned()
                    .collect();
                for key in stale {
                    info!(label = %key, "removing the stale label of an unassigned distribution");
                    if let Err(e) = remove_label(&self.nodes, &self.args.node_name, &key).await {
                        warn!(label = %key, error = %e, "removing a stale label failed");
                    }
                }
                for t in self.tracked.values_mut() {
                    let key = node_label_key(&t.assignment.namespace, &t.assignment.name);
                    // A label without the annotation (set by an older
                    // agent) is labelled again, with its version.
                    t.labeled = node
                        .labels()
                        .contains_key(&key)
                        .then(|| node.annotations().get(&key).cloned())
                        .flatten();
                }
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot read this node's labels"),
        }
    }

    /// Removal protocol: stop the transfer and delete the data this
    /// Distribution owns (never a path another assignment claims, never a
    /// seeder's source), then remove the label, then (in the next status
    /// write) drop the entry.
    pub(super) async fn unassign(&mut self, uid: &str, t: Tracked, claimed: &[PathBuf]) {
        let a = &t.assignment;
        info!(content = %a.content_id, distribution = %format!("{}/{}", a.namespace, a.name), "unassigned; deleting its data");
        let mut ids = vec![a.content_id.clone()];
        if let Some(r) = &t.running
            && r.id != a.content_id
        {
            ids.push(r.id.clone());
        }
        if let Some((old, _)) = &t.superseded {
            ids.push(old.clone());
        }
        for id in ids {
            if let Err(e) = self.engine.remove(&id, false).await {
                warn!(content = %id, error = %e, "stopping the content failed");
            }
            let dest = self
                .manifest
                .deletable_path(&id, uid, claimed)
                .and_then(|p| dest_path(&self.args.data_root, &p).ok());
            match self.engine.delete_data_of(&id, dest.as_deref()) {
                Ok(()) => {
                    if let Err(e) = self.manifest.remove(&id) {
                        warn!(error = %e, "updating the manifest failed");
                    }
                }
                Err(e) => warn!(content = %id, error = %e, "deleting the data failed"),
            }
        }
        self.removing.insert(
            uid.to_string(),
            Removal {
                namespace: a.namespace.clone(),
                name: a.name.clone(),
            },
        );
        self.sync_labels().await;
    }
}

/// Starts a content, recording it in the manifest first.
fn start(engine: &Engine, manifest: &mut Manifest, t: &mut Tracked, cfg: ContentConfig, me: &str) {
    let a = &t.assignment;
    let seeder = matches!(&cfg.source, SourceConfig::Node { node, .. } if node == me);
    let entry = Entry {
        uid: a.uid.clone(),
        namespace: a.namespace.clone(),
        name: a.name.clone(),
        path: cfg.path.clone(),
        seeder,
    };
    if let Err(e) = manifest.insert(&cfg.id, entry) {
        warn!(error = %e, "updating the manifest failed");
    }
    info!(content = %cfg.id, distribution = %format!("{}/{}", a.namespace, a.name), size = ?cfg.size, "starting content");
    match engine.add(cfg.clone()) {
        Ok(()) => t.running = Some(cfg),
        Err(e) => {
            error!(content = %cfg.id, error = %e, "cannot start the content");
            t.running = None;
        }
    }
}

/// Resolves the endpoint of every node in `spec.peers` (IP literals
/// directly, names through DNS).
async fn resolve_peers(spec: &NodeFillSpec) -> HashMap<String, SocketAddr> {
    let mut out = HashMap::new();
    for p in &spec.peers {
        let addr = match p.endpoint.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => match tokio::net::lookup_host(p.endpoint.as_str()).await {
                Ok(mut it) => it.next(),
                Err(e) => {
                    warn!(peer = %p.node, endpoint = %p.endpoint, error = %e, "cannot resolve peer endpoint");
                    None
                }
            },
        };
        if let Some(a) = addr {
            out.insert(p.node.clone(), a);
        }
    }
    out
}
