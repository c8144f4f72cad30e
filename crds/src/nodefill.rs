//! `NodeFill`: the per-node work object, one per Node, cluster-scoped, with
//! the Node's name. The operator writes its spec (what this node must hold
//! and its role); only that node's agent writes its status (endpoint and
//! per-distribution progress). Nothing per-piece ever reaches the API
//! server.
//!
//! Removal protocol: to remove content from a node, the operator drops the
//! assignment from the spec; the agent deletes the data and then drops the
//! matching entry from its status. A Distribution's finalizer is released
//! once no NodeFill status lists it any more.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Finalizer the operator puts on each Distribution so that deleting it
/// first removes its data from the nodes.
pub const FINALIZER: &str = "peerfill.dev/cleanup";

/// Prefix of the node label the agent sets when a node holds a
/// distribution completely; see [`node_label_key`].
pub const NODE_LABEL_PREFIX: &str = "peerfill.dev/";
/// Value of that label.
pub const NODE_LABEL_VALUE: &str = "true";
/// Longest name part of a label key (after the `/`).
const LABEL_NAME_MAX: usize = 63;
/// Hex digits of the hash that replaces the tail of a too-long key.
const LABEL_HASH_HEX: usize = 16;

/// Condition type on NodeFill status: the agent is running and reachable.
pub const CONDITION_AGENT_READY: &str = "AgentReady";

/// The per-node work of one node: what it must hold, and how it is doing.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes
// for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "peerfill.dev",
    version = "v1alpha1",
    kind = "NodeFill",
    shortname = "nf",
    category = "peerfill",
    status = "NodeFillStatus",
    derive = "PartialEq",
    doc = "NodeFill is the per-node work of peerfill: one per Node, named after it. The operator writes spec, the node's agent writes status.",
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "QUIC endpoint of the node's agent"
    ),
    printcolumn(
        name = "Zone",
        type_ = "string",
        json_path = ".status.zone",
        priority = 1
    ),
    printcolumn(
        name = "Assigned",
        type_ = "integer",
        json_path = ".status.assigned",
        description = "Distributions assigned to this node"
    ),
    printcolumn(
        name = "Complete",
        type_ = "integer",
        json_path = ".status.complete",
        description = "Distributions this node holds completely"
    ),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeat"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeFillSpec {
    /// Distributions this node must hold, with its role in each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["uid".into()]))]
    pub distributions: Vec<Assignment>,
    /// QUIC endpoints of every node named in the assignments (peers, origin
    /// readers, seeders), so the agent needs to watch only its own object.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["node".into()]))]
    pub peers: Vec<PeerEndpoint>,
    /// The node's certificate, issued by the operator in answer to the
    /// agent's `status.certificateRequest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IssuedIdentity>,
    /// How often the agent writes progress and heartbeats, in seconds. The
    /// operator sets it from the node count so that the whole cluster stays
    /// within its status write budget (see [`crate::budget`]); changes of
    /// state are written at once regardless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_interval_seconds: Option<u32>,
}

/// Where a peer's agent listens.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerEndpoint {
    /// Node name (the name in the peer's certificate).
    pub node: String,
    /// `host:port` of the peer's QUIC endpoint.
    pub endpoint: String,
    /// SHA-256 fingerprint of the peer's certificate (`sha256:<hex>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_fingerprint: Option<String>,
    /// Zone of the peer, for topology-aware choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// A node certificate issued by the operator's cluster CA.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IssuedIdentity {
    /// PEM certificate of the node, naming the node.
    pub certificate: String,
    /// PEM certificate of the cluster CA (the trust anchor for peers).
    pub ca_certificate: String,
    /// `sha256:<hex>` of the PEM request this certificate answers, so an
    /// agent with a new key knows an old answer is not for it.
    pub request_digest: String,
}

/// One distribution assigned to one node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// Namespace of the Distribution.
    pub namespace: String,
    /// Name of the Distribution.
    pub name: String,
    /// UID of the Distribution (a re-created Distribution is new content).
    pub uid: String,
    /// `metadata.generation` of the Distribution this assignment reflects.
    pub generation: i64,
    /// Stable id of the content across the swarm (derived from the uid);
    /// the key of the content on the wire and in the agents' stores.
    pub content_id: String,
    /// Where the bytes come from, resolved by the operator.
    pub source: ResolvedSource,
    /// Where the content goes, relative to the agent's data root (already
    /// validated by the Distribution's schema).
    pub path: String,
    /// Content size in bytes, once known: agreed by the hash authorities
    /// (every origin reader, or the seeder) of this content id; never taken
    /// from any other node. Piece ranges are empty until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Number of files when the content is a directory (its file table
    /// leads the content, see the agent's `content::tree`); unset: one file.
    /// Pinned with the size, from the same authorities' reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// Piece size in bytes: the Distribution's, or once the size is pinned
    /// the one the operator chose for it (`validation::auto_piece_size`).
    /// `0` only while the Distribution leaves it to a size not pinned yet;
    /// with a size, `0` was written by an operator that left the choice to
    /// the agents (see [`Assignment::effective_piece_size`]).
    pub piece_size: u64,
    /// The pinned identity of the content: its BLAKE3 root (`blake3:<hex>`).
    /// From the user's `blake3:` digest at once; otherwise published only
    /// once every hash authority of this content id reported the same root
    /// (`status.distributions[].root`). An agent reports `Complete` only when
    /// its piece-hash list merges to this root and every piece verified
    /// against that list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
    /// What this node does beyond fetching from peers.
    #[serde(default)]
    pub role: Role,
    /// Which node reads which piece range from the origin, for all nodes of
    /// the distribution, so every agent knows whom to ask first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origin_readers: Vec<OriginReader>,
    /// Download cap of this node for this distribution, bytes per second,
    /// peers and origin together; the agent follows changes live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_download_bytes_per_second: Option<u64>,
    /// Upload cap of this node for this distribution, bytes per second, all
    /// peers together; the agent follows changes live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_upload_bytes_per_second: Option<u64>,
    /// Higher goes first for the node's bandwidth (see the Distribution's
    /// `strategy.priority`).
    #[serde(default)]
    pub priority: i32,
    /// Nodes allowed to exchange this content with this node (the agent
    /// serves it to no one else).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
}

impl Assignment {
    /// The content id of the Distribution with `uid` before any edit: the
    /// first 128 bits of BLAKE3 of the uid, in hex. A re-created
    /// Distribution (new uid) is new content.
    pub fn content_id_for_uid(uid: &str) -> String {
        let hash = blake3::hash(uid.as_bytes()).to_hex();
        hash.as_str()[..32].to_owned()
    }

    /// The content id of one *version* of a Distribution: what it
    /// distributes (`version_key`, the operator's canonical text of source,
    /// digest, target path and piece size) and how often the origin changed
    /// under it (`revision`). Any edit of those, or an origin change, gives
    /// a new id, so no node ever mixes pieces of two versions; the agents
    /// take the id as written and never derive it.
    pub fn content_id_for_version(uid: &str, version_key: &str, revision: u32) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"peerfill content id v2\0");
        for part in [
            uid.as_bytes(),
            version_key.as_bytes(),
            &revision.to_le_bytes(),
        ] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().to_hex().as_str()[..32].to_owned()
    }

    /// The piece size in use, once it is known: the one set, or for a `0`
    /// beside a pinned size the rule of the operators that wrote that
    /// (`validation::legacy_auto_piece_size`).
    pub fn effective_piece_size(&self) -> Option<u64> {
        match self.piece_size {
            0 => self.size.map(crate::validation::legacy_auto_piece_size),
            set => Some(set),
        }
    }

    /// Number of pieces, once the size is known (a 0-byte content has none).
    pub fn piece_count(&self) -> Option<u64> {
        Some(self.size?.div_ceil(self.effective_piece_size()?))
    }
}

/// The source of an assignment, resolved by the operator. Exactly one field
/// is set.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedSource {
    /// HTTP(S) origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<ResolvedHttpSource>,
    /// The node that seeds the content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<SeedNode>,
}

/// HTTP(S) origin of an assignment.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedHttpSource {
    /// URL of the content (with `files`, the base URL; readers use the
    /// files' own URLs).
    pub url: String,
    /// The files of a directory, each with its resolved URL, in the order
    /// the Distribution lists them. Only origin readers get the list (it
    /// can be long); every other node learns the directory's file table
    /// from the content itself, verified like every byte of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ResolvedHttpFile>,
    /// URL of the content's piece manifest (origin readers take their
    /// range's hashes from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_url: Option<String>,
    /// The content is a directory (`files` in the Distribution), also on
    /// nodes that do not get the list.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub directory: bool,
    /// Expected digest of the whole content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Secret whose data are extra request headers (only origin readers need
    /// it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret: Option<SecretRef>,
    /// The origin version every range read is pinned to (an `ETag`, or
    /// `Last-Modified` when the origin sends no strong ETag), from the first
    /// origin reader's report for this content id. Readers send it as
    /// `If-Match` / `If-Unmodified-Since`; an origin that answers otherwise
    /// has changed, and the reader reports `OriginChanged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_version: Option<String>,
    /// The origin ignores Range requests (an origin reader of this content
    /// id reported `OriginNoRangeSupport`): the one origin reader reads the
    /// whole content in one streaming GET, every other node fetches from
    /// peers. Kept for the content id once set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole_read: bool,
}

/// One file of a directory from an HTTP origin, URL resolved.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedHttpFile {
    /// Path beneath the target directory.
    pub path: String,
    /// URL of the file; unset: the source's `url` + `path`
    /// ([`crate::distribution::file_url`]), which keeps a reader's NodeFill
    /// small for a long list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Expected digest of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// A Secret by namespace and name.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Namespace of the Secret.
    pub namespace: String,
    /// Name of the Secret.
    pub name: String,
}

/// The node that seeds content it already holds.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SeedNode {
    /// Node name.
    pub node_name: String,
    /// Path relative to that node's agent data root.
    pub path: String,
}

/// A node's role in one distribution.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Role {
    /// Piece ranges this node reads from the origin (and announces first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origin_ranges: Vec<PieceRange>,
    /// This node already holds the content (node source) and seeds it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seed: bool,
}

/// Half-open range of piece indices `[start, end)`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PieceRange {
    /// First piece index.
    pub start: u64,
    /// One past the last piece index.
    pub end: u64,
}

impl PieceRange {
    /// Number of pieces in the range.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no piece.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether `piece` lies in the range.
    pub fn contains(&self, piece: u64) -> bool {
        self.start <= piece && piece < self.end
    }
}

/// Splits `piece_count` pieces into `readers` contiguous ranges whose sizes
/// differ by at most one (the first ranges get the extra pieces). Operator
/// and agents split the same way, so a reader's range follows from its
/// position in `originReaders`. Fewer ranges than readers when there are
/// fewer pieces; none for an empty content.
pub fn split_ranges(piece_count: u64, readers: u32) -> Vec<PieceRange> {
    if piece_count == 0 {
        return Vec::new();
    }
    let r = u64::from(readers).clamp(1, piece_count);
    let (base, extra) = (piece_count / r, piece_count % r);
    let mut start = 0;
    (0..r)
        .map(|i| {
            let end = start + base + u64::from(i < extra);
            let range = PieceRange { start, end };
            start = end;
            range
        })
        .collect()
}

/// A node reading a piece range `[start, end)` from the origin.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct OriginReader {
    /// Node name.
    pub node: String,
    /// First piece index.
    pub start: u64,
    /// One past the last piece index.
    pub end: u64,
}

/// What the node's agent reports. Written only by that agent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeFillStatus {
    /// `host:port` of the agent's QUIC endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// SHA-256 fingerprint of the agent's certificate (`sha256:<hex>`), so
    /// peers can pin it on top of the cluster CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_fingerprint: Option<String>,
    /// `topology.kubernetes.io/zone` of the node, for topology-aware peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Node pool of the node, for topology-aware peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Version of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// PEM certificate signing request for this node's key; the operator
    /// answers in `spec.identity`. The key never leaves the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_request: Option<String>,
    /// Last time the agent wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
    /// Distributions in the spec the agent has taken on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned: Option<u32>,
    /// Distributions this node holds completely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete: Option<u32>,
    /// Progress per distribution.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["uid".into()]))]
    pub distributions: Vec<NodeDistributionStatus>,
    /// Standard conditions, e.g. `AgentReady`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Phase of one distribution on one node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodePhase {
    /// Assigned, not started (e.g. waiting for size or manifest).
    Pending,
    /// Fetching pieces.
    Downloading,
    /// Holds the verified content (and serves it to peers).
    Complete,
    /// Gave up; see reason and message.
    Failed,
}

impl NodePhase {
    /// The name as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            NodePhase::Pending => "Pending",
            NodePhase::Downloading => "Downloading",
            NodePhase::Complete => "Complete",
            NodePhase::Failed => "Failed",
        }
    }
}

/// Progress of one distribution on one node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeDistributionStatus {
    /// Namespace of the Distribution.
    pub namespace: String,
    /// Name of the Distribution.
    pub name: String,
    /// UID of the Distribution.
    pub uid: String,
    /// Where this node is.
    pub phase: NodePhase,
    /// Verified bytes on disk.
    #[serde(default)]
    pub bytes_done: u64,
    /// The content id (version) this entry reports on; the operator ignores
    /// an entry whose id is not the current assignment's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_id: Option<String>,
    /// Content size, once known. Only a hash authority's report (origin
    /// reader or seeder of this content id) is ever used by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Number of files, when the content is a directory and this node
    /// knows its file table (only an authority's report is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// BLAKE3 root (`blake3:<hex>`) of the complete piece-hash list this node
    /// holds. Authorities report it; the operator pins it into
    /// `spec.distributions[].manifestDigest` once they all agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// The origin version (ETag or Last-Modified) this origin reader saw; with
    /// reason `OriginChanged` the new version it found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_version: Option<String>,
    /// Verified pieces.
    #[serde(default)]
    pub pieces_done: u64,
    /// Pieces in the content, once known.
    #[serde(default)]
    pub piece_count: u64,
    /// Bytes received from the origin.
    #[serde(default)]
    pub bytes_from_origin: u64,
    /// Bytes received from peers.
    #[serde(default)]
    pub bytes_from_peers: u64,
    /// Current download rate, bytes per second.
    #[serde(default)]
    pub bytes_per_second: u64,
    /// Digest of the piece-hash manifest this node published or accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
    /// Digest of the whole content, once this node computed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// CamelCase reason of the last transition, e.g. `DigestMismatch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When `phase` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

/// Key of the node label the agent sets (value [`NODE_LABEL_VALUE`]) once
/// the node holds distribution `namespace/name`, so workloads can select
/// nodes where the data already is.
///
/// The key is `peerfill.dev/<namespace>.<name>` when that fits the 63
/// characters Kubernetes allows after the `/`. Otherwise the readable part
/// is cut and a hash of the full `namespace/name` appended, so the key stays
/// valid and distinct for any namespace (≤ 63) and name (≤ 253).
pub fn node_label_key(namespace: &str, name: &str) -> String {
    let readable: String = format!("{namespace}.{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let fits = readable.len() <= LABEL_NAME_MAX
        && readable.starts_with(|c: char| c.is_ascii_alphanumeric())
        && readable.ends_with(|c: char| c.is_ascii_alphanumeric());
    // Only names that were already valid map to themselves; anything we had
    // to rewrite gets a hash too, so two different names never collide.
    if fits && readable == format!("{namespace}.{name}") {
        return format!("{NODE_LABEL_PREFIX}{readable}");
    }
    let digest = blake3::hash(format!("{namespace}/{name}").as_bytes()).to_hex();
    let hash = &digest.as_str()[..LABEL_HASH_HEX];
    let keep = LABEL_NAME_MAX - LABEL_HASH_HEX - 1;
    let head: String = readable.chars().take(keep).collect();
    // The part before the hash must start with an alphanumeric; the hash
    // itself ends with one.
    let head = head.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let head = head.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if head.is_empty() {
        format!("{NODE_LABEL_PREFIX}{hash}")
    } else {
        format!("{NODE_LABEL_PREFIX}{head}-{hash}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Kubernetes rule for the name part of a qualified label key.
    fn valid_label_name(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    }

    fn check(namespace: &str, name: &str) -> String {
        let key = node_label_key(namespace, name);
        let rest = key
            .strip_prefix(NODE_LABEL_PREFIX)
            .unwrap_or_else(|| panic!("{key} lacks the prefix"));
        assert!(valid_label_name(rest), "invalid label key {key}");
        key
    }

    #[test]
    fn short_names_stay_readable() {
        assert_eq!(check("default", "llama-3"), "peerfill.dev/default.llama-3");
    }

    #[test]
    fn long_names_are_hashed_within_limits() {
        let ns = "n".repeat(63);
        let name = format!("{}.{}", "a".repeat(200), "b".repeat(52));
        assert_eq!(name.len(), 253);
        let key = check(&ns, &name);
        assert_eq!(key.len(), NODE_LABEL_PREFIX.len() + 63);
        // Differs in the last character only: still a different key.
        let other = format!("{}c", &name[..252]);
        assert_ne!(key, check(&ns, &other));
        // Deterministic.
        assert_eq!(key, node_label_key(&ns, &name));
    }

    #[test]
    fn boundary_lengths() {
        // namespace.name of exactly 63 characters is kept as is.
        let name = "x".repeat(63 - "ns.".len());
        assert_eq!(check("ns", &name), format!("peerfill.dev/ns.{name}"));
        // One more character switches to the hashed form.
        let longer = format!("{name}x");
        let key = check("ns", &longer);
        assert_eq!(key.len(), NODE_LABEL_PREFIX.len() + 63);
        assert!(key.starts_with("peerfill.dev/ns.xxx"));
    }

    #[test]
    fn odd_characters_never_produce_invalid_keys() {
        for (ns, name) in [
            ("a", "-"),
            ("-", "."),
            ("ns", "a/b c"),
            ("", ""),
            ("ns", "ünï"),
        ] {
            check(ns, name);
        }
        assert_ne!(check("ns", "a/b"), check("ns", "a-b"));
    }

    #[test]
    fn content_ids_and_piece_counts() {
        let id = Assignment::content_id_for_uid("4f3c1a2e-0000-4000-8000-000000000001");
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            id,
            Assignment::content_id_for_uid("4f3c1a2e-0000-4000-8000-000000000001")
        );
        assert_ne!(
            id,
            Assignment::content_id_for_uid("4f3c1a2e-0000-4000-8000-000000000002")
        );

        let mut a = Assignment {
            piece_size: 4 << 20,
            ..Assignment::default()
        };
        assert_eq!(a.piece_count(), None);
        for (size, pieces) in [
            (0, 0),
            (1, 1),
            (4 << 20, 1),
            ((4 << 20) + 1, 2),
            (40 << 30, 10240),
        ] {
            a.size = Some(size);
            assert_eq!(a.piece_count(), Some(pieces), "{size}");
        }
        // Left to the size by an operator that did not publish its choice:
        // that operator's rule, 4 GiB in 4 MiB pieces.
        a.piece_size = 0;
        a.size = Some(4 << 30);
        assert_eq!(a.effective_piece_size(), Some(4 << 20));
        assert_eq!(a.piece_count(), Some(1024));
        a.size = None;
        assert_eq!(a.piece_count(), None);
    }

    #[test]
    fn split_ranges_cover_every_piece_once() {
        assert!(split_ranges(0, 4).is_empty());
        assert_eq!(split_ranges(3, 8).len(), 3);
        assert_eq!(
            split_ranges(10, 3),
            vec![
                PieceRange { start: 0, end: 4 },
                PieceRange { start: 4, end: 7 },
                PieceRange { start: 7, end: 10 },
            ]
        );
        assert_eq!(split_ranges(5, 0), vec![PieceRange { start: 0, end: 5 }]);
    }

    #[test]
    fn piece_ranges() {
        let r = PieceRange { start: 4, end: 8 };
        assert_eq!(r.len(), 4);
        assert!(r.contains(4) && r.contains(7) && !r.contains(8) && !r.contains(3));
        assert!(PieceRange { start: 5, end: 5 }.is_empty());
        assert_eq!(PieceRange { start: 6, end: 5 }.len(), 0);
    }
}
