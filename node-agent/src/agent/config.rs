//! The agent's configuration: what one agent runs (node, endpoint, data
//! root, identity, limits, tuning) and the contents it fills or seeds, with
//! the checks serde cannot make (ids, destinations inside the data root,
//! layouts, readers).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::content::{Digest, Layout};
use crate::store::PARTIAL_DIR;
use crate::swarm::{ContentCaps, Fault};
use crate::tls;

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

/// Engine tuning. Piece buffers are also bounded by bytes
/// (`swarm::DOWNLOAD_BUFFER_BYTES`, `swarm::UPLOAD_BUFFER_BYTES`), so the
/// counts here bind only for small pieces.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Tuning {
    /// `SwarmOptions::max_inflight`.
    pub max_inflight: usize,
    /// `SwarmOptions::pipeline` (a cap; see `swarm::pipeline_for`).
    pub pipeline: usize,
    pub upload_slots: usize,
    pub strikes_to_ban: u32,
    pub request_timeout_secs: u64,
    /// Range requests one origin reader keeps in flight at most (while
    /// every reader reads; see `origin_requests`). Four, not two: an origin
    /// reader's downlink also carries its peers' pieces, and with two TCP
    /// flows against them the origin link idled (measured: the origin's
    /// copy out at 1.16x the bound, 1.05-1.09x with four).
    pub origin_concurrency: usize,
    /// Range requests the origin readers of one content keep in flight
    /// together, at most: with more than four readers each keeps its share
    /// (at least one; `swarm::OriginRequests`). Sixteen readers of one
    /// request each (the default of `maxOriginConnections`) spread the
    /// origin's pieces over 16 uplinks that forward them at once, where four
    /// readers of four requests each put them behind four.
    pub origin_requests: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            max_inflight: 12,
            pipeline: 3,
            upload_slots: 8,
            strikes_to_ban: 2,
            request_timeout_secs: 30,
            origin_concurrency: 4,
            origin_requests: 16,
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
    /// This content's bandwidth caps and priority on this node, on top of
    /// the node-wide `limits` (see `swarm::limits`).
    #[serde(default)]
    pub caps: ContentCaps,
    /// The content is a directory (see [`crate::tree`]): its file table
    /// leads the content, and `path` becomes a directory. A node source's
    /// seeder finds out by itself (its path is a directory).
    #[serde(default)]
    pub directory: bool,
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
        headers: Headers,
        readers: Vec<String>,
        /// The origin ignores Range requests: the first reader reads the
        /// whole content in one streaming GET, the others are not used.
        #[serde(default)]
        whole: bool,
        /// The files of a directory (origin readers only): each read from
        /// its own URL; `url` is then unused.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        files: Vec<HttpFile>,
        /// URL of the content's piece manifest: origin readers take their
        /// ranges' hashes from it (see `origin::manifest`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manifest_url: Option<String>,
    },
    /// A file already on node `node`, which seeds it from `path` (an
    /// absolute path on that node; ignored elsewhere).
    Node {
        node: String,
        #[serde(default)]
        path: Option<PathBuf>,
    },
}

/// One file of a directory from an HTTP origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFile {
    /// Path beneath the directory.
    pub path: String,
    pub url: String,
    /// The user's digest of the file (`sha256:`/`blake3:`).
    #[serde(default)]
    pub digest: Option<String>,
}

/// Extra request headers for an HTTP origin (from `headersFrom`). The
/// values are credentials: `Debug` shows the names only, so a logged config
/// never carries them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Headers(pub BTreeMap<String, String>);

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
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

/// Checks one content against the agent config: id, destination inside
/// the data root, layout, readers.
pub(super) fn validate_content(cfg: &AgentConfig, c: &ContentConfig) -> Result<(), AgentError> {
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
