//! The engine: the QUIC swarm, the metrics and the status writer shared by
//! a changing set of contents, each run by its own content task.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::content::Digest;
use crate::fsroot::DataRoot;
use crate::metrics::{self, Metrics};
use crate::ratelimit::RateLimiter;
use crate::store::{PieceStore, StoreError};
use crate::swarm::{Swarm, SwarmOptions};
use crate::tls::NodeIdentity;

use super::config::validate_content;
use super::status::{snapshot, status_loop, write_status_files};
use super::task::{ContentRun, content_task};
use super::{
    AgentConfig, AgentError, ContentConfig, ContentStatus, PeerConfig, STATUS_DIR, Summary,
    dest_path, status_path,
};

/// How the engine treats its contents beyond the agent config.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Retry an origin that fails transiently (unreachable, timeout, 5xx)
    /// with capped exponential backoff, showing the content Failed with the
    /// reason meanwhile, instead of giving up (a long-running node agent
    /// does; a one-shot fill does not). Local faults (`InsufficientSpace`,
    /// `StorageError`) are retried the same way.
    pub retry_transient_origin: bool,
    /// Never report a content Complete before its root is pinned (the
    /// Kubernetes agent: the operator publishes the agreed root). A
    /// standalone agent without one checks the file against its own hash
    /// list instead.
    pub require_pin: bool,
    /// Allow origins on loopback, link-local and metadata addresses
    /// (`--allow-private-origins`).
    pub allow_private_origins: bool,
}

pub(super) struct Running {
    pub(super) run: Arc<ContentRun>,
    pub(super) task: tokio::task::JoinHandle<()>,
    /// Current peers and allowed nodes (the config's at first).
    pub(super) peers: Vec<PeerConfig>,
    pub(super) allowed: HashSet<String>,
}

pub(super) struct EngineInner {
    pub(super) cfg: AgentConfig,
    pub(super) opts: EngineOptions,
    pub(super) swarm: Swarm,
    pub(super) metrics: Metrics,
    pub(super) origin_limiter: RateLimiter,
    pub(super) status_dir: PathBuf,
    pub(super) contents: Mutex<BTreeMap<String, Running>>,
    pub(super) changed: Arc<tokio::sync::Notify>,
    pub(super) status_stop: CancellationToken,
}

/// The swarm engine with a changing set of contents: contents are added,
/// removed and re-peered while it runs. [`run`](super::run) drives it from a config
/// file; the Kubernetes agent from its NodeFill. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(super) inner: Arc<EngineInner>,
}

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
    /// Starts the QUIC endpoint, the metrics endpoint (if configured) and
    /// the status writer, with no content yet (`cfg.contents` is ignored).
    pub fn start(
        cfg: &AgentConfig,
        identity: &NodeIdentity,
        opts: EngineOptions,
    ) -> Result<Engine, AgentError> {
        Self::start_with_metrics(cfg, identity, opts, Metrics::new())
    }

    /// [`Engine::start`] recording into `metrics` (which the caller may
    /// already serve).
    pub fn start_with_metrics(
        cfg: &AgentConfig,
        identity: &NodeIdentity,
        opts: EngineOptions,
        metrics: Metrics,
    ) -> Result<Engine, AgentError> {
        if identity.node != cfg.node {
            return Err(AgentError::NodeMismatch {
                cert: identity.node.clone(),
                config: cfg.node.clone(),
            });
        }
        if let Some(addr) = cfg.metrics_addr {
            let m = metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = metrics::serve(addr, m).await {
                    error!(%addr, error = %e, "metrics endpoint failed");
                }
            });
        }
        let mut sw = SwarmOptions::new(cfg.node.clone(), cfg.listen);
        sw.max_inflight = cfg.tuning.max_inflight;
        sw.pipeline = cfg.tuning.pipeline;
        sw.upload_slots = cfg.tuning.upload_slots;
        sw.strikes_to_ban = cfg.tuning.strikes_to_ban;
        sw.request_timeout = Duration::from_secs(cfg.tuning.request_timeout_secs.max(1));
        sw.download_rate = cfg.limits.download_bytes_per_sec;
        sw.upload_rate = cfg.limits.upload_bytes_per_sec;
        sw.fault = cfg.fault;
        let swarm = Swarm::start(sw, identity, metrics.clone())?;

        let status_dir = cfg
            .status_dir
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join(STATUS_DIR));
        std::fs::create_dir_all(&status_dir).map_err(|source| AgentError::Status {
            path: status_dir.clone(),
            source,
        })?;
        let mut cfg = cfg.clone();
        cfg.contents.clear();
        let engine = Engine {
            inner: Arc::new(EngineInner {
                origin_limiter: RateLimiter::new(cfg.limits.origin_bytes_per_sec),
                cfg,
                opts,
                swarm,
                metrics,
                status_dir,
                contents: Mutex::new(BTreeMap::new()),
                changed: Arc::new(tokio::sync::Notify::new()),
                status_stop: CancellationToken::new(),
            }),
        };
        let span = info_span!("status_writer", dir = %engine.inner.status_dir.display());
        tokio::spawn(status_loop(engine.clone()).instrument(span));
        Ok(engine)
    }

    pub(super) fn contents(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.inner
            .contents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.cfg.node
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.swarm.local_addr()
    }

    pub fn swarm(&self) -> &Swarm {
        &self.inner.swarm
    }

    /// Where the status files are written.
    pub fn status_dir(&self) -> &Path {
        &self.inner.status_dir
    }

    /// Woken whenever a content changes phase, reason or learns its size.
    pub fn changed(&self) -> Arc<tokio::sync::Notify> {
        self.inner.changed.clone()
    }

    /// Ids of the contents running.
    pub fn ids(&self) -> Vec<String> {
        self.contents().keys().cloned().collect()
    }

    /// Starts filling (or seeding) a content and dials its peers.
    pub fn add(&self, c: ContentConfig) -> Result<(), ContentOpError> {
        validate_content(&self.inner.cfg, &c)?;
        let mut contents = self.contents();
        if contents.contains_key(&c.id) {
            return Err(ContentOpError::Duplicate(c.id));
        }
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
            root.remove_file(&rel).map_err(|e| del(e.into()))?;
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

    /// A snapshot of the status of content `id`.
    pub fn status(&self, id: &str) -> Option<ContentStatus> {
        let run = self.contents().get(id).map(|r| r.run.clone())?;
        let banned = self.inner.swarm.banned();
        let connected = self.inner.swarm.connected();
        Some(snapshot(&run, &banned, &connected))
    }

    /// The content digest (`blake3:<hex>`) once every piece hash is known.
    pub fn content_digest(&self, id: &str) -> Option<Digest> {
        let run = self.contents().get(id).map(|r| r.run.clone())?;
        run.fill()?.content_digest()
    }

    /// Resolves when no content task is running any more (every content
    /// complete or failed).
    pub async fn wait_idle(&self) {
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.contents().values().all(|r| r.task.is_finished()) {
                return;
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Final phase of every content.
    pub fn summary(&self) -> Summary {
        self.contents()
            .iter()
            .map(|(id, r)| (id.clone(), r.run.phase()))
            .collect()
    }

    /// Stops every content (keeping its data), writes the status files a
    /// last time and closes the endpoint.
    pub async fn shutdown(&self) {
        let tasks: Vec<_> = self
            .contents()
            .values()
            .map(|r| {
                r.task.abort();
                r.run.clone()
            })
            .collect();
        drop(tasks);
        self.inner.status_stop.cancel();
        if let Err(e) = write_status_files(self) {
            warn!(error = %e, "writing the last status failed");
        }
        self.inner.swarm.shutdown().await;
    }
}
