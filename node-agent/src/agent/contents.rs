//! The engine's set of contents while it runs: adding (which starts a
//! content task), removing (optionally with the data), re-peering, and
//! applying the identity the operator pinned.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, PoisonError};

use tracing::{Instrument, info, info_span, warn};

use crate::content::Digest;
use crate::fsroot::DataRoot;
use crate::store::{PieceStore, StoreError};

use super::config::validate_content;
use super::engine::{Engine, Running};
use super::task::{ContentRun, content_task};
use super::{AgentError, ContentCaps, ContentConfig, PeerConfig, dest_path, status_path};

/// Errors of adding or removing a content.
#[derive(Debug, thiserror::Error)]
pub enum ContentOpError {
    #[error(transparent)]
    Invalid(#[from] AgentError),
    #[error("content {0} is already running")]
    Duplicate(String),
    #[error("deleting the data of content {id}: {source}")]
    Delete {
        id: String,
        #[source]
        source: StoreError,
    },
}

impl Engine {
    /// Starts filling (or seeding) a content and dials its peers.
    pub fn add(&self, c: ContentConfig) -> Result<(), ContentOpError> {
        validate_content(&self.inner.cfg, &c)?;
        let mut contents = self.contents();
        if contents.contains_key(&c.id) {
            return Err(ContentOpError::Duplicate(c.id));
        }
        // Before the task starts, so its first byte is capped already.
        self.inner.swarm.set_caps(&c.id, c.caps);
        let run = Arc::new(ContentRun::new(
            c.clone(),
            self.inner.cfg.node.clone(),
            self.inner.changed.clone(),
        ));
        // One span per content task: its logs (and its helpers') carry the
        // content id and path.
        let span = info_span!("content", id = %c.id, path = %c.path.display());
        let task = tokio::spawn(content_task(run.clone(), self.clone()).instrument(span));
        contents.insert(
            c.id.clone(),
            Running {
                run,
                task,
                peers: c.peers.clone(),
                allowed: c.allowed_peers.iter().cloned().collect(),
            },
        );
        drop(contents);
        self.inner
            .swarm
            .connect(c.peers.iter().map(|p| (p.node.clone(), p.addr)));
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// Stops a content. With `delete_data`, its final file, partial file,
    /// bitmap and status file are deleted — never the file a seeder seeds
    /// from. Without, the partial file and bitmap stay so a later `add`
    /// resumes. Returns whether the content was running.
    pub async fn remove(&self, id: &str, delete_data: bool) -> Result<bool, ContentOpError> {
        let Some(running) = self.contents().remove(id) else {
            if delete_data {
                self.delete_data_of(id, None)?;
            }
            return Ok(false);
        };
        running.task.abort();
        let _ = running.task.await;
        self.inner.swarm.remove_content(id);
        if let Some(fill) = running.run.fill() {
            fill.close();
        }
        self.inner.metrics.remove_content(id);
        self.redial();
        let _ = std::fs::remove_file(status_path(&self.inner.status_dir, id));
        if delete_data && !running.run.seeds() {
            let dest = dest_path(&self.inner.cfg.data_dir, &running.run.cfg.path)?;
            self.delete_data_of(id, Some(&dest))?;
        }
        info!(content = %id, delete_data, "content removed");
        self.inner.changed.notify_waiters();
        Ok(true)
    }

    /// Deletes the partial file and bitmap of `id`, and `dest` if given.
    pub fn delete_data_of(&self, id: &str, dest: Option<&Path>) -> Result<(), ContentOpError> {
        let del = |source| ContentOpError::Delete {
            id: id.to_string(),
            source,
        };
        let data_dir = &self.inner.cfg.data_dir;
        if !data_dir.exists() {
            return Ok(());
        }
        // Beneath the root only: a symlinked directory on the way is
        // refused, so a delete never reaches a file outside the root.
        let root = DataRoot::open(data_dir).map_err(|e| del(e.into()))?;
        PieceStore::remove_in(&root, id).map_err(del)?;
        if let Some(dest) = dest {
            let rel = root.user_rel_of(dest).map_err(|e| del(e.into()))?;
            // A directory goes only if it is a directory content this agent
            // wrote (it holds the table file); anything else there is not
            // ours to delete recursively.
            if crate::tree::is_ours(&root, &rel) {
                root.remove_tree(&rel).map_err(|e| del(e.into()))?;
            } else {
                root.remove_file(&rel).map_err(|e| del(e.into()))?;
            }
        }
        let _ = std::fs::remove_file(status_path(&self.inner.status_dir, id));
        Ok(())
    }

    /// Replaces the peers of content `id` (dialing new ones, following
    /// address changes) and the nodes it may be exchanged with.
    pub fn set_peers(&self, id: &str, peers: Vec<PeerConfig>, allowed: Vec<String>) {
        {
            let mut contents = self.contents();
            let Some(r) = contents.get_mut(id) else {
                return;
            };
            r.peers = peers;
            r.allowed = allowed.iter().cloned().collect();
        }
        self.inner
            .swarm
            .set_allowed(id, allowed.into_iter().collect());
        self.redial();
    }

    /// Changes the caps and priority of running content `id`; its next
    /// requests follow them (no restart).
    pub fn set_caps(&self, id: &str, caps: ContentCaps) {
        if self.contents().contains_key(id) {
            self.inner.swarm.set_caps(id, caps);
        }
    }

    /// Points the swarm at the union of the peers of every content.
    fn redial(&self) {
        let all: Vec<(String, SocketAddr)> = self
            .contents()
            .values()
            .flat_map(|r| r.peers.iter().map(|p| (p.node.clone(), p.addr)))
            .collect();
        self.inner.swarm.set_peers(all);
    }

    /// Applies the identity the operator published for content `id`: its
    /// pinned root (a content waiting for it completes once its hash list
    /// merges to it) and the origin version reads are pinned to.
    pub fn pin(&self, id: &str, root: Option<Digest>, origin_version: Option<String>) {
        let Some(run) = self.contents().get(id).map(|r| r.run.clone()) else {
            return;
        };
        let root = match root {
            Some(Digest::Blake3(b)) => Some(blake3::Hash::from_bytes(b)),
            _ => None,
        };
        {
            let mut pins = run.pins.lock().unwrap_or_else(PoisonError::into_inner);
            if pins.0.is_none() {
                pins.0 = root;
            }
            if pins.1.is_none() {
                pins.1.clone_from(&origin_version);
            }
        }
        if let (Some(r), Some(fill)) = (root, run.fill()) {
            fill.pin_root(r);
        }
        if let Some(v) = origin_version
            && let Some(client) = run
                .origin
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
        {
            match client.version() {
                Some(own) if own != v => {
                    // We read another version than the one published: what
                    // we hold must never be mixed with the others' pieces.
                    warn!(content = %id, own = %own, published = %v, "this reader read another origin version than the published one");
                    *run.origin_seen
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(own);
                    run.origin_conflict.cancel();
                }
                Some(_) => {}
                None => {
                    info!(content = %id, version = %v, "origin reads pinned to the published version");
                    client.pin_version(v);
                }
            }
        }
    }

    /// The nodes content `id` may be exchanged with now.
    pub(super) fn allowed_of(&self, id: &str) -> Option<HashSet<String>> {
        self.contents().get(id).map(|r| r.allowed.clone())
    }
}
