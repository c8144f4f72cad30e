//! One agent process: its configuration (a JSON or YAML file today; the
//! Kubernetes per-node object feeds the same struct later), the contents it
//! fills or seeds, and the status it reports.
//!
//! Status: one small JSON file per content in the status directory, replaced
//! atomically about twice a second, so tests and the Kubernetes status
//! reporter can follow progress without talking to the process.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::content::{self, Digest, Layout};
use crate::fsroot::DataRoot;
use crate::metrics::{self, Metrics};
use crate::origin::{OriginClient, OriginOptions, split_ranges};
use crate::ratelimit::RateLimiter;
use crate::store::{PARTIAL_DIR, PieceStore, StoreError};
use crate::swarm::{
    Authority, Fault, Fill, FillSpec, Swarm, SwarmOptions, read_origin_range, seed_hashes,
};
use crate::tls::{self, NodeIdentity};

/// Directory (under the data root) of the status files, by default.
pub const STATUS_DIR: &str = ".peerfill-status";

/// Environment variable that must be `1` for [`AgentConfig::fault`] to be
/// honoured, so a production config can never make an agent lie.
pub const ALLOW_FAULTS_ENV: &str = "PEERFILL_ALLOW_FAULTS";

/// Whether this process may inject faults (see [`ALLOW_FAULTS_ENV`]).
pub fn faults_allowed() -> bool {
    std::env::var(ALLOW_FAULTS_ENV).is_ok_and(|v| v == "1")
}

/// Configuration of one agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name; must match the name in its certificate.
    pub node: String,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Data root: contents are written under it, never outside.
    pub data_dir: PathBuf,
    pub identity: IdentityFiles,
    /// Where `/metrics` and `/healthz` are served, if anywhere.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Status files directory (default `<dataDir>/.peerfill-status`).
    #[serde(default)]
    pub status_dir: Option<PathBuf>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub tuning: Tuning,
    /// Keep serving after every content is complete (a DaemonSet agent does;
    /// a one-shot fill does not).
    #[serde(default)]
    pub stay: bool,
    /// Misbehave on purpose (tests of the honest agents only); refused
    /// unless the environment has `PEERFILL_ALLOW_FAULTS=1`.
    #[serde(default)]
    pub fault: Option<Fault>,
    /// Allow origins on loopback, link-local and metadata addresses (local
    /// test setups). Off by default.
    #[serde(default)]
    pub allow_private_origins: bool,
    pub contents: Vec<ContentConfig>,
}

/// PEM files of this node's identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl IdentityFiles {
    /// The files `NodeIdentity::write` puts in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        IdentityFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        }
    }
}

/// Per-agent byte rates (bytes per second; absent means unlimited).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    #[serde(default)]
    pub download_bytes_per_sec: Option<u64>,
    #[serde(default)]
    pub upload_bytes_per_sec: Option<u64>,
    #[serde(default)]
    pub origin_bytes_per_sec: Option<u64>,
}

/// Engine tuning; the defaults suit 4 MiB pieces.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Tuning {
    pub max_inflight: usize,
    pub pipeline: usize,
    pub upload_slots: usize,
    pub strikes_to_ban: u32,
    pub request_timeout_secs: u64,
    /// Concurrent range requests of one origin reader.
    pub origin_concurrency: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            max_inflight: 8,
            pipeline: 3,
            upload_slots: 4,
            strikes_to_ban: 2,
            request_timeout_secs: 30,
            origin_concurrency: 2,
        }
    }
}

/// One content to fill or seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContentConfig {
    /// Content id (a file name: no `/`, no leading `.`).
    pub id: String,
    /// Destination, relative to the data root.
    pub path: PathBuf,
    /// Size in bytes; asked from the origin (HEAD) when absent.
    #[serde(default)]
    pub size: Option<u64>,
    /// Piece size; `0` (the default): chosen from the size, as the operator
    /// does for a Distribution without `pieceSize` ([`Layout::for_content`]).
    #[serde(default)]
    pub piece_size: u32,
    /// Expected digest, `sha256:<hex>` or `blake3:<hex>`; always enforced.
    #[serde(default)]
    pub digest: Option<Digest>,
    pub source: SourceConfig,
    /// Peers to connect to for this content.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Nodes this content may be served to.
    #[serde(default)]
    pub allowed_peers: Vec<String>,
    /// The pinned BLAKE3 root (`blake3:<hex>`) every piece-hash list must
    /// merge to (the operator's `manifestDigest`), when known at start.
    #[serde(default)]
    pub root: Option<Digest>,
    /// The origin version (ETag or Last-Modified) reads are pinned to, when
    /// known at start.
    #[serde(default)]
    pub origin_version: Option<String>,
    /// Files of earlier versions (relative to the data root) whose pieces
    /// may be reused once they verify; the destination itself always is.
    #[serde(default)]
    pub reuse_from: Vec<PathBuf>,
}

/// Where the bytes come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum SourceConfig {
    /// An HTTP(S) origin read in disjoint ranges by `readers` (in order: the
    /// first reader gets the first range of `split_ranges`).
    Http {
        url: String,
        #[serde(default)]
        headers: BTreeMap<String, String>,
        readers: Vec<String>,
    },
    /// A file already on node `node`, which seeds it from `path` (an
    /// absolute path on that node; ignored elsewhere).
    Node {
        node: String,
        #[serde(default)]
        path: Option<PathBuf>,
    },
}

/// A peer's node name and QUIC address.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerConfig {
    pub node: String,
    pub addr: SocketAddr,
}

/// Errors that stop the agent as a whole (a content's own failure is
/// reported in its status instead).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading config {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing config {path}: {reason}")]
    ParseConfig { path: PathBuf, reason: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("identity: {0}")]
    Identity(#[from] tls::TlsError),
    #[error("the certificate is for node {cert}, but the config says {config}")]
    NodeMismatch { cert: String, config: String },
    #[error(transparent)]
    Swarm(#[from] crate::swarm::SwarmError),
    #[error("writing status {path}: {source}")]
    Status {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AgentConfig {
    /// A config with default limits and tuning, no metrics endpoint and the
    /// default status directory, that keeps serving after completion (as a
    /// DaemonSet agent does).
    pub fn new(
        node: impl Into<String>,
        listen: SocketAddr,
        data_dir: PathBuf,
        identity: IdentityFiles,
        contents: Vec<ContentConfig>,
    ) -> Self {
        AgentConfig {
            node: node.into(),
            listen,
            data_dir,
            identity,
            metrics_addr: None,
            status_dir: None,
            limits: Limits::default(),
            tuning: Tuning::default(),
            stay: true,
            fault: None,
            allow_private_origins: false,
            contents,
        }
    }

    /// Loads a config from a `.json`, `.yaml` or `.yml` file.
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        let cfg: AgentConfig = if yaml {
            serde_saphyr::from_str(&text).map_err(|e| AgentError::ParseConfig {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?
        } else {
            serde_json::from_str(&text).map_err(|e| AgentError::ParseConfig {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: ids, destinations inside the data root,
    /// piece sizes, readers.
    pub fn validate(&self) -> Result<(), AgentError> {
        tls::validate_node_name(&self.node)?;
        let mut ids = HashSet::new();
        for c in &self.contents {
            validate_content(self, c)?;
            if !ids.insert(&c.id) {
                return Err(AgentError::Invalid(format!(
                    "duplicate content id {:?}",
                    c.id
                )));
            }
        }
        Ok(())
    }
}

/// `data_dir/rel`, refusing anything that could leave the data root, the
/// agent's own state directories, and control characters (a NUL byte would
/// only fail after the whole download).
pub fn dest_path(data_dir: &Path, rel: &Path) -> Result<PathBuf, AgentError> {
    let ok =
        !rel.as_os_str().is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(AgentError::Invalid(format!(
            "path {} must be relative to the data root, without '..'",
            rel.display()
        )));
    }
    if rel
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .any(|b| b.is_ascii_control())
    {
        return Err(AgentError::Invalid(format!(
            "path {:?} contains control characters",
            rel.display()
        )));
    }
    if let Some(Component::Normal(first)) = rel.components().next()
        && (first == STATUS_DIR || first == PARTIAL_DIR)
    {
        return Err(AgentError::Invalid(format!(
            "path {} is inside the agent's own state ({})",
            rel.display(),
            first.to_string_lossy()
        )));
    }
    Ok(data_dir.join(rel))
}

/// Phase of one content on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Fetching,
    Complete,
    Failed,
}

/// What the status file of one content says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContentStatus {
    pub id: String,
    pub phase: Phase,
    /// CamelCase condition reason when failed.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    pub size: u64,
    /// Whether `size` is the content's (configured or learnt), not a
    /// placeholder.
    #[serde(default)]
    pub size_known: bool,
    pub piece_count: u32,
    pub pieces_done: u32,
    pub bytes_done: u64,
    pub bytes_from_origin: u64,
    pub bytes_from_peers: u64,
    pub bytes_sent: u64,
    /// Received bytes not used (endgame duplicates, rejected pieces).
    pub bytes_wasted: u64,
    /// Bytes per second received over the last interval.
    pub rate: f64,
    /// Pieces found on disk at start (resumed).
    pub resumed_pieces: u64,
    /// Pieces taken from files already on disk after verifying.
    #[serde(default)]
    pub reused_pieces: u64,
    /// BLAKE3 root (`blake3:<hex>`) of the complete piece-hash list, once
    /// every hash is known.
    #[serde(default)]
    pub root: Option<String>,
    /// Whether the root is pinned (Complete needs it where required).
    #[serde(default)]
    pub pinned: bool,
    /// The origin version this node reads at (origin readers), or found
    /// when the origin changed.
    #[serde(default)]
    pub origin_version: Option<String>,
    pub pieces_rejected: u64,
    /// Pieces rejected, by the node that sent them.
    pub rejected_from: BTreeMap<String, u64>,
    /// Nodes this agent banned.
    pub banned_peers: Vec<String>,
    pub connected_peers: Vec<String>,
    /// Unix time of this snapshot, in milliseconds.
    pub updated_at_ms: u64,
}

impl ContentStatus {
    /// Reads a status file.
    pub fn read(path: &Path) -> std::io::Result<ContentStatus> {
        let text = std::fs::read(path)?;
        serde_json::from_slice(&text).map_err(std::io::Error::other)
    }
}

/// Path of the status file of content `id` in `status_dir`.
pub fn status_path(status_dir: &Path, id: &str) -> PathBuf {
    status_dir.join(format!("{id}.json"))
}

struct Outcome {
    phase: Phase,
    reason: Option<String>,
    message: Option<String>,
}

struct ContentRun {
    cfg: ContentConfig,
    /// This agent's node name.
    node: String,
    fill: Mutex<Option<Arc<Fill>>>,
    outcome: Mutex<Outcome>,
    /// Received bytes at the last rate sample, and that rate.
    rate_mark: Mutex<(Instant, u64, f64)>,
    /// Woken on every change of phase, reason or size.
    changed: Arc<tokio::sync::Notify>,
    /// The pinned root and origin version, as the operator published them
    /// (the config's at first); applied to every attempt's fill and client.
    pins: Mutex<(Option<blake3::Hash>, Option<String>)>,
    /// This attempt's origin client (origin readers), for its version.
    origin: Mutex<Option<OriginClient>>,
    /// The version found when the origin changed (`OriginChanged`).
    origin_seen: Mutex<Option<String>>,
    /// Cancelled when the published origin version is not the one this
    /// reader read at: its pieces are of another version, so the content
    /// stops with `OriginChanged` (the operator then starts a new version).
    origin_conflict: CancellationToken,
}

impl ContentRun {
    fn new(cfg: ContentConfig, node: String, changed: Arc<tokio::sync::Notify>) -> Self {
        let root = match cfg.root {
            Some(Digest::Blake3(b)) => Some(blake3::Hash::from_bytes(b)),
            _ => None,
        };
        ContentRun {
            pins: Mutex::new((root, cfg.origin_version.clone())),
            origin: Mutex::new(None),
            origin_seen: Mutex::new(None),
            origin_conflict: CancellationToken::new(),
            cfg,
            node,
            fill: Mutex::new(None),
            outcome: Mutex::new(Outcome {
                phase: Phase::Pending,
                reason: None,
                message: None,
            }),
            rate_mark: Mutex::new((Instant::now(), 0, 0.0)),
            changed,
        }
    }
    fn set(&self, phase: Phase, reason: Option<&str>, message: Option<String>) {
        {
            let mut o = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
            o.phase = phase;
            o.reason = reason.map(str::to_string);
            o.message = message;
        }
        self.changed.notify_waiters();
    }
    fn phase(&self) -> Phase {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .phase
    }
    fn fill(&self) -> Option<Arc<Fill>> {
        self.fill
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    fn root_pin(&self) -> Option<blake3::Hash> {
        self.pins.lock().unwrap_or_else(PoisonError::into_inner).0
    }
    fn origin_pin(&self) -> Option<String> {
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .clone()
    }
    /// The origin version this node reads (or found changed), if any.
    fn origin_version(&self) -> Option<String> {
        let seen = self
            .origin_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        seen.or_else(|| {
            self.origin
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .and_then(OriginClient::version)
        })
    }
    fn fail(&self, reason: &str, message: String) {
        error!(content = %self.cfg.id, reason, %message, "content failed");
        self.set(Phase::Failed, Some(reason), Some(message));
    }
    /// The node seeds this content from a file it already holds.
    fn seeds(&self) -> bool {
        matches!(&self.cfg.source, SourceConfig::Node { node, .. } if node == &self.node)
    }
}

/// Final phase of each content when [`run`] returns.
pub type Summary = BTreeMap<String, Phase>;

/// Aborts a spawned task when dropped, so a cancelled content task takes
/// its origin reader down with it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// First wait before retrying an origin that failed transiently, or a
/// content stopped by a local fault.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between two such attempts.
const RETRY_MAX: Duration = Duration::from_secs(60);

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

struct Running {
    run: Arc<ContentRun>,
    task: tokio::task::JoinHandle<()>,
    /// Current peers and allowed nodes (the config's at first).
    peers: Vec<PeerConfig>,
    allowed: HashSet<String>,
}

struct EngineInner {
    cfg: AgentConfig,
    opts: EngineOptions,
    swarm: Swarm,
    metrics: Metrics,
    origin_limiter: RateLimiter,
    status_dir: PathBuf,
    contents: Mutex<BTreeMap<String, Running>>,
    changed: Arc<tokio::sync::Notify>,
    status_stop: CancellationToken,
}

/// The swarm engine with a changing set of contents: contents are added,
/// removed and re-peered while it runs. [`run`] drives it from a config
/// file; the Kubernetes agent from its NodeFill. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
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
        tokio::spawn(status_loop(engine.clone()));
        Ok(engine)
    }

    fn contents(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
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
        let task = tokio::spawn(content_task(run.clone(), self.clone()));
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
    fn allowed_of(&self, id: &str) -> Option<HashSet<String>> {
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

/// Checks one content against the agent config: id, destination inside
/// the data root, layout, readers.
fn validate_content(cfg: &AgentConfig, c: &ContentConfig) -> Result<(), AgentError> {
    if c.id.is_empty() || c.id.contains('/') || c.id.starts_with('.') || c.id.len() > 253 {
        return Err(AgentError::Invalid(format!(
            "invalid content id {:?}",
            c.id
        )));
    }
    dest_path(&cfg.data_dir, &c.path)?;
    if let Some(size) = c.size {
        Layout::for_content(size, c.piece_size)
            .map_err(|e| AgentError::Invalid(format!("content {}: {e}", c.id)))?;
    }
    match &c.source {
        SourceConfig::Http { readers, .. } if readers.is_empty() => {
            Err(AgentError::Invalid(format!(
                "content {}: an http source needs at least one origin reader",
                c.id
            )))
        }
        SourceConfig::Node { node, .. } if node != &cfg.node && c.size.is_none() => {
            Err(AgentError::Invalid(format!(
                "content {}: size is required for a node source seeded elsewhere",
                c.id
            )))
        }
        _ => Ok(()),
    }
}

/// Runs an agent until every content is complete or failed (or, with
/// `stay`, until `shutdown`). Returns the final phase of each content.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<Summary, AgentError> {
    cfg.validate()?;
    if cfg.fault.is_some() && !faults_allowed() {
        return Err(AgentError::Invalid(format!(
            "fault injection (fault: {:?}) is a test mode; it needs {ALLOW_FAULTS_ENV}=1",
            cfg.fault
        )));
    }
    let identity = NodeIdentity::load(&cfg.identity.cert, &cfg.identity.key, &cfg.identity.ca)?;
    let engine = Engine::start(
        &cfg,
        &identity,
        EngineOptions {
            allow_private_origins: cfg.allow_private_origins,
            ..EngineOptions::default()
        },
    )?;
    for c in &cfg.contents {
        engine.add(c.clone()).map_err(|e| match e {
            ContentOpError::Invalid(e) => e,
            other => AgentError::Invalid(other.to_string()),
        })?;
    }
    // Content tasks end when their content is complete or failed.
    tokio::select! {
        _ = engine.wait_idle() => {
            info!("every content is complete or failed");
            if cfg.stay {
                shutdown.cancelled().await;
            }
        }
        _ = shutdown.cancelled() => {}
    }
    let summary = engine.summary();
    engine.shutdown().await;
    Ok(summary)
}

fn headers(h: &BTreeMap<String, String>) -> Vec<(String, String)> {
    h.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The capped exponential backoff of the engine's retries (transient origin
/// failures, local faults): 1 s doubling to 60 s, with jitter so nodes that
/// failed together do not retry together.
fn retry_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// Runs `op` until it succeeds; a transient origin failure is shown as
/// Failed with its reason and retried after a capped exponential backoff
/// when the engine retries (otherwise it is returned).
async fn with_origin_retry<T, E, F, Fut>(
    run: &ContentRun,
    retry: bool,
    resume_phase: Phase,
    op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: OriginFailure,
{
    let failed = std::sync::atomic::AtomicBool::new(false);
    let result = op
        .retry(retry_backoff())
        .sleep(tokio::time::sleep)
        .when(|e: &E| retry && e.transient())
        .notify(|e: &E, wait: Duration| {
            warn!(content = %run.cfg.id, reason = e.reason_str(), error = %e, retry_in = ?wait, "origin failed; retrying");
            run.set(
                Phase::Failed,
                Some(e.reason_str()),
                Some(format!("{e} (retrying in {}s)", wait.as_secs().max(1))),
            );
            failed.store(true, Ordering::Relaxed);
        })
        .await;
    if result.is_ok() && failed.load(Ordering::Relaxed) {
        info!(content = %run.cfg.id, "origin reachable again");
        run.set(resume_phase, None, None);
    }
    result
}

/// Origin errors as [`with_origin_retry`] sees them.
trait OriginFailure: std::fmt::Display {
    fn transient(&self) -> bool;
    fn reason_str(&self) -> &'static str;
}

impl OriginFailure for crate::origin::OriginError {
    fn transient(&self) -> bool {
        self.is_transient()
    }
    fn reason_str(&self) -> &'static str {
        self.reason()
    }
}

impl OriginFailure for crate::swarm::OriginReadError {
    fn transient(&self) -> bool {
        matches!(self, crate::swarm::OriginReadError::Origin(e) if e.is_transient())
    }
    fn reason_str(&self) -> &'static str {
        self.reason()
    }
}

/// Why one attempt at a content stopped.
#[derive(Debug)]
struct Failure {
    reason: &'static str,
    message: String,
}

impl Failure {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Failure {
            reason,
            message: message.into(),
        }
    }

    /// A fault of this node (disk full, I/O error): retried, since freeing
    /// space or a remount recovers it, and never a reason to give up the
    /// content everywhere.
    fn is_local_fault(&self) -> bool {
        is_local_fault(self.reason)
    }
}

/// Whether `reason` names a fault of this node rather than of the content.
pub fn is_local_fault(reason: &str) -> bool {
    matches!(reason, "InsufficientSpace" | "StorageError")
}

fn store_reason(e: &StoreError) -> &'static str {
    match e {
        StoreError::InsufficientSpace { .. } => "InsufficientSpace",
        _ => "StorageError",
    }
}

/// Fills or seeds one content until complete or failed for good. Each
/// attempt builds a fresh fill; an attempt that stops on a local fault
/// (and, in a long-running agent, only then) is retried with capped
/// exponential backoff, the partial file kept, so the content resumes by
/// itself once the fault is gone.
async fn content_task(run: Arc<ContentRun>, engine: Engine) {
    let retry = engine.inner.opts.retry_transient_origin;
    let mut backoff = retry_backoff().build();
    loop {
        let failure = match content_attempt(&run, &engine).await {
            Ok(()) => return,
            Err(f) => f,
        };
        // Take this attempt's fill out of the swarm: peers' sessions move to
        // the next attempt's fill (see `peer::inbound_announce`).
        // (The closed fill stays in the run so the status keeps its
        // progress; the next attempt replaces it.)
        if let Some(fill) = run.fill() {
            engine.inner.swarm.remove_fill(&fill);
        }
        if !(retry && failure.is_local_fault()) {
            run.fail(failure.reason, failure.message);
            return;
        }
        let wait = backoff.next().unwrap_or(RETRY_MAX);
        warn!(content = %run.cfg.id, reason = failure.reason, error = %failure.message, retry_in = ?wait, "local fault; retrying");
        run.set(
            Phase::Failed,
            Some(failure.reason),
            Some(format!(
                "{} (retrying in {}s)",
                failure.message,
                wait.as_secs().max(1)
            )),
        );
        tokio::time::sleep(wait).await;
    }
}

/// One attempt: prepares the content (layout, store, hash authority), then
/// fills or seeds it until complete.
async fn content_attempt(run: &Arc<ContentRun>, engine: &Engine) -> Result<(), Failure> {
    let inner = &engine.inner;
    let cfg = &inner.cfg;
    let swarm = &inner.swarm;
    let metrics = &inner.metrics;
    let retry = inner.opts.retry_transient_origin;
    let c = &run.cfg;
    let me = cfg.node.as_str();
    let dest = dest_path(&cfg.data_dir, &c.path)
        .map_err(|_| Failure::new("InvalidPath", format!("invalid path {}", c.path.display())))?;
    // Every file this content touches is resolved beneath the data root,
    // never through a symlink; a bad path fails here, before any download.
    let data_root =
        DataRoot::open(&cfg.data_dir).map_err(|e| Failure::new("StorageError", e.to_string()))?;
    data_root
        .user_rel_of(&dest)
        .map_err(|e| Failure::new("InvalidPath", e.to_string()))?;
    // Layout: configured, or the origin's length.
    let mut origin_opts = if retry {
        // The engine retries on its own, showing the failure meanwhile.
        OriginOptions {
            max_retries: 2,
            ..OriginOptions::default()
        }
    } else {
        OriginOptions::default()
    };
    origin_opts.allow_private = inner.opts.allow_private_origins;
    let origin = match &c.source {
        SourceConfig::Http {
            url, headers: h, ..
        } => {
            let o = OriginClient::new(url, headers(h), origin_opts)
                .map_err(|e| Failure::new(e.reason(), e.to_string()))?
                .with_metrics(metrics.clone());
            if let Some(v) = run.origin_pin() {
                o.pin_version(v);
            }
            if matches!(&c.source, SourceConfig::Http { readers, .. } if readers.iter().any(|r| r == me))
            {
                // An origin reader reports the version it reads.
                *run.origin.lock().unwrap_or_else(PoisonError::into_inner) = Some(o.clone());
            }
            Some(o)
        }
        SourceConfig::Node { .. } => None,
    };
    let size = match (c.size, &origin) {
        (Some(s), _) => s,
        (None, Some(o)) => with_origin_retry(run, retry, Phase::Pending, || o.content_length())
            .await
            .map_err(|e| origin_failure(run, e))?,
        (None, None) => match &c.source {
            SourceConfig::Node { path: Some(p), .. } if outside_root(&cfg.data_dir, p) => {
                std::fs::symlink_metadata(p)
                    .map_err(|e| Failure::new("SourceUnreadable", format!("{}: {e}", p.display())))?
                    .len()
            }
            SourceConfig::Node { path: Some(p), .. } => source_len(&data_root, p)?,
            _ => return Err(Failure::new("InvalidConfig", "content size unknown")),
        },
    };
    let layout = Layout::for_content(size, c.piece_size)
        .map_err(|e| Failure::new("InvalidConfig", e.to_string()))?;
    let authority = match &c.source {
        SourceConfig::Http { readers, .. } => {
            let ranges = split_ranges(&layout, readers.len() as u32);
            Authority::Readers(readers.iter().cloned().zip(ranges).collect())
        }
        SourceConfig::Node { node, .. } => Authority::Seeder(node.clone()),
    };
    let root = match c.root {
        Some(Digest::Blake3(b)) => Some(blake3::Hash::from_bytes(b)),
        _ => None,
    };
    let spec = FillSpec {
        id: c.id.clone(),
        layout,
        digest: c.digest,
        authority: authority.clone(),
        allowed: engine
            .allowed_of(&c.id)
            .unwrap_or_else(|| c.allowed_peers.iter().cloned().collect()),
        root,
        require_pin: inner.opts.require_pin,
    };
    let seed_path = match &c.source {
        SourceConfig::Node { node, path } if node == me => {
            Some(path.clone().unwrap_or(dest.clone()))
        }
        _ => None,
    };
    // Nothing at the destination is trusted by its size: only a seeder's
    // source is served as it is (it IS the source, and is hashed below).
    let store = match &seed_path {
        Some(p) if outside_root(&cfg.data_dir, p) => PieceStore::open_complete(p, layout),
        Some(p) => data_root
            .user_rel_of(p)
            .map_err(StoreError::from)
            .and_then(|rel| PieceStore::open_complete_in(&data_root, &rel, layout)),
        None => PieceStore::open_in_async(&data_root, &c.id, layout).await,
    }
    .map_err(|e| Failure::new(store_reason(&e), e.to_string()))?;
    let liar = cfg.fault == Some(Fault::CorruptUploads);
    let fill = Fill::new(spec, store, liar);
    if let Some(r) = run.root_pin() {
        fill.pin_root(r);
    }
    // Files already on disk (at the destination, or the previous version's
    // path) are reuse sources, piece by piece, once each piece verifies;
    // their pieces are held back from the network until tried.
    let reuse_files: Vec<Arc<std::fs::File>> = if seed_path.is_some() {
        Vec::new()
    } else {
        std::iter::once(dest.clone())
            .chain(
                c.reuse_from
                    .iter()
                    .filter_map(|p| dest_path(&cfg.data_dir, p).ok()),
            )
            .filter_map(|p| open_reuse_source(&data_root, &p).map(Arc::new))
            .collect()
    };
    if !reuse_files.is_empty() {
        fill.defer_for_reuse();
    }
    *run.fill.lock().unwrap_or_else(PoisonError::into_inner) = Some(fill.clone());
    run.set(Phase::Fetching, None, None);
    swarm.add_content(fill.clone());
    // The peer list may have changed while the content was being prepared.
    if let Some(allowed) = engine.allowed_of(&c.id) {
        swarm.set_allowed(&c.id, allowed);
    }

    if let Some(path) = seed_path {
        // A seeder: hash the file we hold, check it against the digest if
        // one was given, and against the pinned identity.
        info!(content = %c.id, path = %path.display(), "seeding a file");
        seed_hashes(&fill, me, 0..layout.piece_count())
            .await
            .map_err(|e| Failure::new(e.reason(), e.to_string()))?;
        fill.mark_all_held();
        if let Some(want) = c.digest {
            match content::digest_file(&path, want.algo()).await {
                Ok(got) if got == want => {}
                Ok(got) => {
                    return Err(Failure::new(
                        "DigestMismatch",
                        format!("{} has digest {got}, expected {want}", path.display()),
                    ));
                }
                Err(e) => return Err(Failure::new("SourceUnreadable", e.to_string())),
            }
        }
        let pin = wait_for_identity(run, &fill).await;
        let got = fill.content_digest();
        if let Some(want) = pin
            && got != Some(Digest::Blake3(*want.as_bytes()))
        {
            return Err(Failure::new(
                "IdentityMismatch",
                format!(
                    "{} no longer has the pinned content blake3:{}",
                    path.display(),
                    want.to_hex()
                ),
            ));
        }
        run.set(Phase::Complete, None, None);
        return Ok(());
    }

    let _watchdog = {
        let (swarm, fill) = (swarm.clone(), fill.clone());
        AbortOnDrop(tokio::spawn(async move { swarm.watch_stalls(fill).await }))
    };
    let mut reuse_files = reuse_files;
    if trust_verified_file(&fill, me, &reuse_files).await {
        // Every hash is known: take the whole file before reading anything.
        reuse_pieces(
            fill.clone(),
            me.to_string(),
            std::mem::take(&mut reuse_files),
        )
        .await;
    }
    let _reuse = (!reuse_files.is_empty()).then(|| {
        let (fill, me) = (fill.clone(), me.to_string());
        AbortOnDrop(tokio::spawn(async move {
            reuse_pieces(fill, me, reuse_files).await
        }))
    });

    // Origin reader: re-hash what we already hold of our range (resume),
    // then read the rest.
    let mut origin_task = None;
    if let (Some(client), Authority::Readers(rs)) = (origin, &authority) {
        for (_, range) in rs.iter().filter(|(n, _)| n == me) {
            seed_hashes(&fill, me, range.clone())
                .await
                .map_err(|e| Failure::new(e.reason(), e.to_string()))?;
        }
        let mine: Vec<_> = rs
            .iter()
            .filter(|(n, _)| n == me)
            .map(|(_, r)| r.clone())
            .collect();
        if !mine.is_empty() {
            let (fill, me, limiter, metrics, run) = (
                fill.clone(),
                me.to_string(),
                inner.origin_limiter.clone(),
                metrics.clone(),
                run.clone(),
            );
            let concurrency = cfg.tuning.origin_concurrency;
            origin_task = Some(AbortOnDrop(tokio::spawn(async move {
                for range in mine {
                    with_origin_retry(&run, retry, Phase::Fetching, || {
                        read_origin_range(
                            fill.clone(),
                            me.clone(),
                            client.clone(),
                            range.clone(),
                            concurrency,
                            limiter.clone(),
                            metrics.clone(),
                        )
                    })
                    .await?;
                }
                Ok::<(), crate::swarm::OriginReadError>(())
            })));
        }
    }
    if let Some(mut task) = origin_task {
        let result = tokio::select! {
            r = &mut task.0 => r,
            _ = fill.wait_complete() => Ok(Ok(())),
            _ = run.origin_conflict.cancelled() => return Err(version_conflict(run)),
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if let crate::swarm::OriginReadError::Origin(oe) = e {
                    return Err(origin_failure(run, oe));
                }
                return Err(Failure::new(e.reason(), e.to_string()));
            }
            Err(e) => return Err(Failure::new("InternalError", e.to_string())),
        }
    }
    tokio::select! {
        _ = async {
            fill.wait_complete().await;
            wait_for_identity(run, &fill).await;
        } => {}
        _ = run.origin_conflict.cancelled() => return Err(version_conflict(run)),
    }
    match fill.finish(&dest).await {
        Ok(()) => {
            info!(content = %c.id, dest = %dest.display(), "content complete and verified");
            run.set(Phase::Complete, None, None);
            Ok(())
        }
        Err(e) => Err(Failure::new(e.reason(), e.to_string())),
    }
}

/// An origin failure; a change of the origin records the version found.
fn origin_failure(run: &ContentRun, e: crate::origin::OriginError) -> Failure {
    if let crate::origin::OriginError::Changed { found, .. } = &e {
        *run.origin_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = found.clone();
    }
    Failure::new(e.reason(), e.to_string())
}

/// The failure of a reader whose origin version is not the published one.
fn version_conflict(run: &ContentRun) -> Failure {
    let own = run.origin_version().unwrap_or_default();
    Failure::new(
        "OriginChanged",
        format!(
            "this reader read origin version {own}, not the published one: the origin changed between the readers"
        ),
    )
}

/// When the engine requires a pinned identity and none is there yet, shows
/// the content waiting for it (`WaitingForIdentity`) until the operator
/// publishes it. Returns the pin, if any.
async fn wait_for_identity(run: &ContentRun, fill: &Fill) -> Option<blake3::Hash> {
    if let Some(r) = fill.pinned_root() {
        return Some(r);
    }
    if !fill.spec.require_pin {
        return None;
    }
    info!(content = %run.cfg.id, root = ?fill.content_digest().map(|d| d.to_string()), "every piece held; waiting for the pinned identity");
    run.set(
        Phase::Fetching,
        Some("WaitingForIdentity"),
        Some(
            "every piece is held and verified against the authorities' hashes; waiting for the operator to pin the content's root".into(),
        ),
    );
    let r = fill.wait_pinned().await;
    run.set(Phase::Fetching, None, None);
    Some(r)
}

/// Takes pieces from files already on disk (`sources`: the destination, a
/// previous version's file): as each missing piece's hash becomes trusted,
/// its byte range is read from each source in turn, verified against that
/// hash, and stored (counted as reused, not fetched). A mismatching piece is
/// simply fetched as usual. Only regular files are read, never through a
/// symlink.
async fn reuse_pieces(fill: Arc<Fill>, me: String, files: Vec<Arc<std::fs::File>>) {
    /// Releases whatever is still held back, however the task ends.
    struct Release(Arc<Fill>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.reuse_finished();
        }
    }
    let _release = Release(fill.clone());
    let layout = fill.layout();
    let mut untried: Vec<u32> = (0..layout.piece_count())
        .filter(|p| !fill.store.has(*p))
        .collect();
    let mut reused = 0u64;
    while !untried.is_empty() && !fill.is_complete() {
        let changed = fill.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (ready, rest): (Vec<u32>, Vec<u32>) = untried
            .into_iter()
            .partition(|p| fill.store.has(*p) || fill.hash(*p).is_some());
        untried = rest;
        for piece in ready {
            if fill.is_closed() {
                return;
            }
            let Some(hash) = fill.hash(piece).filter(|_| !fill.store.has(piece)) else {
                fill.reuse_tried(piece);
                continue;
            };
            let range = layout.piece_range(piece);
            for file in &files {
                let file = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; (range.end - range.start) as usize];
                    file.read_exact_at(&mut buf, range.start).ok()?;
                    let ok = content::verify_piece(&layout, piece, &buf, &hash).is_ok();
                    ok.then(|| bytes::Bytes::from(buf))
                })
                .await;
                let Ok(Some(data)) = read else { continue };
                let len = data.len() as u64;
                match fill.store_verified(None, &me, piece, data, None).await {
                    Ok(true) => {
                        reused += 1;
                        fill.stats.reused_pieces.fetch_add(1, Ordering::Relaxed);
                        fill.stats.bytes_reused.fetch_add(len, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // The fetch path meets the same fault and reports it.
                        warn!(content = %fill.spec.id, piece, error = %e, "cannot store a reused piece");
                        return;
                    }
                }
                break;
            }
            fill.reuse_tried(piece);
        }
        if untried.is_empty() {
            break;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = fill.closed() => return,
        }
    }
    if reused > 0 {
        info!(content = %fill.spec.id, reused, "pieces reused from files on disk");
    }
}

/// A whole file that merges to the pinned root is this content: its hashes
/// are trusted at once (no authority needed, and an origin reader need not
/// re-read its range after a restart). Done before any origin read starts.
async fn trust_verified_file(fill: &Fill, me: &str, files: &[Arc<std::fs::File>]) -> bool {
    let Some(root) = fill.pinned_root() else {
        return false;
    };
    let layout = fill.layout();
    for file in files {
        if file.metadata().map(|m| m.len()).ok() != Some(layout.size) {
            continue;
        }
        let f = file.clone();
        let hashes = tokio::task::spawn_blocking(move || hash_file(&f, &layout)).await;
        if let Ok(Some(hashes)) = hashes
            && content::root_from_pieces(&layout, &hashes).ok() == Some(root)
        {
            info!(content = %fill.spec.id, "a file on disk is the pinned content; its hashes are trusted");
            let entries: Vec<(u32, content::PieceHash)> = (0u32..).zip(hashes).collect();
            fill.own_hashes(me, &entries);
            return true;
        }
    }
    false
}

/// The piece hashes of a whole file (None if it cannot be read).
fn hash_file(file: &std::fs::File, layout: &Layout) -> Option<Vec<content::PieceHash>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; layout.piece_size as usize];
    (0..layout.piece_count())
        .map(|i| {
            let r = layout.piece_range(i);
            let b = &mut buf[..(r.end - r.start) as usize];
            file.read_exact_at(b, r.start).ok()?;
            Some(content::piece_hash(layout, i, b))
        })
        .collect()
}

/// Opens `path` (beneath the data root) for reading if it is a regular file
/// reached without following a symlink in any component.
fn open_reuse_source(root: &DataRoot, path: &Path) -> Option<std::fs::File> {
    let rel = root.user_rel_of(path).ok()?;
    let file = root.open_read(&rel).ok()?;
    file.metadata().ok()?.is_file().then_some(file)
}

/// Whether a seed file lies outside the data root. Only the agent's own
/// config file (an administrator's choice) can name one: a Distribution's
/// node-source path is always joined beneath the root, where it is resolved
/// without following symlinks.
fn outside_root(data_dir: &Path, path: &Path) -> bool {
    !path.starts_with(data_dir)
}

/// Size of a node source's file, resolved beneath the data root: a symlink
/// anywhere on the way (which could lead out of the root) is refused.
fn source_len(root: &DataRoot, path: &Path) -> Result<u64, Failure> {
    let unreadable =
        |why: String| Failure::new("SourceUnreadable", format!("{}: {why}", path.display()));
    let rel = root
        .user_rel_of(path)
        .map_err(|e| unreadable(e.to_string()))?;
    match root.metadata(&rel).map_err(|e| unreadable(e.to_string()))? {
        Some(m) if m.is_file() => Ok(m.len),
        Some(_) => Err(unreadable(
            "not a regular file (symlinks are never followed)".into(),
        )),
        None => Err(unreadable("no such file".into())),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// Writes every content's status file and progress metrics.
fn write_status_files(engine: &Engine) -> Result<(), AgentError> {
    let inner = &engine.inner;
    let runs: Vec<Arc<ContentRun>> = engine.contents().values().map(|r| r.run.clone()).collect();
    let banned = inner.swarm.banned();
    let connected = inner.swarm.connected();
    for run in runs {
        let st = snapshot(&run, &banned, &connected);
        if st.size > 0 {
            inner
                .metrics
                .set_progress(&st.id, st.bytes_done as f64 / st.size as f64);
        } else {
            inner.metrics.set_progress(&st.id, 1.0);
        }
        inner.metrics.set_rate(&st.id, st.rate);
        let path = status_path(&inner.status_dir, &st.id);
        let json = serde_json::to_vec_pretty(&st).unwrap_or_default();
        // A content removed meanwhile must not get its file back.
        if !engine.contents().contains_key(&st.id) {
            continue;
        }
        write_atomic(&path, &json).map_err(|source| AgentError::Status { path, source })?;
    }
    Ok(())
}

/// Writes the status files and progress metrics about twice a second.
async fn status_loop(engine: Engine) {
    let stop = engine.inner.status_stop.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = write_status_files(&engine) {
            warn!(error = %e, "status writer failed");
        }
    }
}

fn snapshot(run: &ContentRun, banned: &[String], connected: &[String]) -> ContentStatus {
    let (phase, reason, message) = {
        let o = run.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        (o.phase, o.reason.clone(), o.message.clone())
    };
    let mut st = ContentStatus {
        id: run.cfg.id.clone(),
        phase,
        reason,
        message,
        size: run.cfg.size.unwrap_or(0),
        size_known: run.cfg.size.is_some(),
        piece_count: 0,
        pieces_done: 0,
        bytes_done: 0,
        bytes_from_origin: 0,
        bytes_from_peers: 0,
        bytes_sent: 0,
        bytes_wasted: 0,
        rate: 0.0,
        resumed_pieces: 0,
        reused_pieces: 0,
        root: None,
        pinned: false,
        origin_version: run.origin_version(),
        pieces_rejected: 0,
        rejected_from: BTreeMap::new(),
        banned_peers: banned.to_vec(),
        connected_peers: connected.to_vec(),
        updated_at_ms: now_ms(),
    };
    if let Some(fill) = run.fill() {
        let s = &fill.stats;
        let layout = fill.layout();
        st.size = layout.size;
        st.size_known = true;
        st.piece_count = layout.piece_count();
        st.pieces_done = fill.pieces_done();
        st.bytes_done = fill.bytes_done();
        st.bytes_from_origin = s.bytes_from_origin.load(Ordering::Relaxed);
        st.bytes_from_peers = s.bytes_from_peers.load(Ordering::Relaxed);
        st.bytes_sent = s.bytes_sent.load(Ordering::Relaxed);
        st.bytes_wasted = s.bytes_wasted.load(Ordering::Relaxed);
        st.resumed_pieces = s.resumed_pieces.load(Ordering::Relaxed);
        st.reused_pieces = s.reused_pieces.load(Ordering::Relaxed);
        st.root = fill.content_digest().map(|d| d.to_string());
        st.pinned = fill.pinned_root().is_some();
        st.pieces_rejected = s.pieces_rejected.load(Ordering::Relaxed);
        st.rejected_from = fill.rejected_from();
        if phase == Phase::Fetching && st.message.is_none() {
            // Pieces are only fetched once their hash is known, and hashes
            // come from their authority only: say whom we are waiting for.
            let missing: Vec<String> = fill
                .pending_authorities()
                .into_iter()
                .filter(|n| n != &run.node && !connected.contains(n))
                .collect();
            if !missing.is_empty() {
                st.message = Some(format!(
                    "waiting for piece hashes from {} (not connected)",
                    missing.join(", ")
                ));
            }
        }
        let received = st.bytes_from_origin + st.bytes_from_peers;
        let now = Instant::now();
        let mut mark = run.rate_mark.lock().unwrap_or_else(PoisonError::into_inner);
        let dt = now.duration_since(mark.0).as_secs_f64();
        // Rates over less than a quarter second are noise: callers that
        // sample more often get the last rate.
        if dt >= 0.25 {
            let rate = received.saturating_sub(mark.1) as f64 / dt;
            *mark = (now, received, rate);
        }
        st.rate = mark.2;
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
node: node-a
listen: 127.0.0.1:7100
dataDir: /var/lib/peerfill
identity: { cert: /etc/peerfill/tls.crt, key: /etc/peerfill/tls.key, ca: /etc/peerfill/ca.crt }
limits: { downloadBytesPerSec: 104857600 }
stay: true
contents:
  - id: model-a
    path: models/a.bin
    digest: "blake3:0000000000000000000000000000000000000000000000000000000000000000"
    source:
      http: { url: "http://127.0.0.1:8080/a.bin", readers: [node-a, node-b] }
    peers: [{ node: node-b, addr: "127.0.0.2:7100" }]
    allowedPeers: [node-a, node-b]
  - id: build-b
    path: builds/b.tar
    size: 1048576
    pieceSize: 65536
    source:
      node: { node: node-b }
"#;

    fn load_str(text: &str, ext: &str) -> Result<AgentConfig, AgentError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(format!("agent.{ext}"));
        std::fs::write(&path, text).expect("write config");
        AgentConfig::load(&path)
    }

    #[test]
    fn loads_yaml_and_json_alike() {
        let cfg = load_str(YAML, "yaml").expect("yaml config");
        assert_eq!(cfg.contents.len(), 2);
        assert_eq!(cfg.contents[0].piece_size, 0);
        assert_eq!(cfg.limits.download_bytes_per_sec, Some(100 << 20));
        assert!(matches!(
            &cfg.contents[1].source,
            SourceConfig::Node { node, path: None } if node == "node-b"
        ));
        let json = serde_json::to_string(&cfg).expect("to json");
        let back = load_str(&json, "json").expect("json config");
        assert_eq!(serde_json::to_string(&back).expect("to json"), json);
    }

    #[test]
    fn rejects_paths_escaping_the_data_root() {
        let root = Path::new("/var/lib/peerfill");
        assert!(dest_path(root, Path::new("a/b.bin")).is_ok());
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "",
            ".peerfill-status/assignments.json",
            ".peerfill-partial/x.bitmap",
            "a/b\0c",
            "a/b\nc",
        ] {
            assert!(dest_path(root, Path::new(bad)).is_err(), "{bad:?} accepted");
        }
        let escaping = YAML.replace("models/a.bin", "../../etc/shadow");
        assert!(matches!(
            load_str(&escaping, "yaml"),
            Err(AgentError::Invalid(_))
        ));
    }

    #[test]
    fn rejects_bad_contents() {
        let no_readers = YAML.replace("readers: [node-a, node-b]", "readers: []");
        assert!(matches!(
            load_str(&no_readers, "yml"),
            Err(AgentError::Invalid(_))
        ));
        let bad_piece = YAML.replace("pieceSize: 65536", "pieceSize: 65537");
        assert!(matches!(
            load_str(&bad_piece, "yml"),
            Err(AgentError::Invalid(_))
        ));
        let unknown_field = YAML.replace("stay: true", "stay: true\nbogus: 1");
        assert!(matches!(
            load_str(&unknown_field, "yaml"),
            Err(AgentError::ParseConfig { .. })
        ));
        let dup = YAML.replace("id: build-b", "id: model-a");
        assert!(matches!(
            load_str(&dup, "yaml"),
            Err(AgentError::Invalid(_))
        ));
    }
}
