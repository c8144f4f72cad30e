//! The engine: the QUIC swarm, the metrics and the status writer shared by
//! a changing set of contents, each run by its own content task (adding,
//! removing and re-peering them: `contents`).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info_span, warn};

use crate::content::Digest;
use crate::metrics::{self, Metrics};
use crate::ratelimit::RateLimiter;
use crate::swarm::{Swarm, SwarmOptions};
use crate::tls::NodeIdentity;

use super::status::{snapshot, status_loop, write_status_files};
use super::task::ContentRun;
use super::{AgentConfig, AgentError, ContentStatus, PeerConfig, STATUS_DIR, Summary};

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
