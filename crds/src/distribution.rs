//! `Distribution`: what users write — put these bytes on those nodes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{NodeAffinity, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::*;

/// Condition type: the content is being distributed.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type: every selected node holds the verified content
/// (`kubectl wait --for=condition=Complete dist/<name>`).
pub const CONDITION_COMPLETE: &str = "Complete";
/// Condition type: the distribution cannot complete without a change
/// (bad source, digest mismatch, nodes failing repeatedly).
pub const CONDITION_FAILED: &str = "Failed";

/// Most failing nodes listed in `status.failingNodes`; the rest are counted
/// in `status.failedNodes` only, so status stays small at thousands of nodes.
pub const MAX_FAILING_NODES: usize = 10;

/// Puts the same content on every node the target selects, fetched mostly
/// from other nodes rather than from the origin.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes
// for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "peerfill.dev",
    version = "v1alpha1",
    kind = "Distribution",
    namespaced,
    shortname = "dist",
    category = "peerfill",
    status = "DistributionStatus",
    derive = "PartialEq",
    doc = "Distribution puts the same content on every node its target selects, fetched peer-to-peer.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Progressing, Complete, Failed or Deleting"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Nodes holding the verified content / nodes selected"
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress",
        description = "Bytes on nodes / bytes wanted on all selected nodes"
    ),
    printcolumn(
        name = "Throughput",
        type_ = "string",
        json_path = ".status.throughput",
        description = "Aggregate download rate over all nodes"
    ),
    printcolumn(
        name = "Files",
        type_ = "integer",
        json_path = ".status.files",
        description = "Number of files, when the content is a directory",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DistributionSpec {
    /// Where the content comes from: exactly one of `http` or `node`.
    pub source: Source,
    /// Which nodes get the content, and where it goes on them.
    pub target: Target,
    /// How the content is moved.
    #[serde(default)]
    pub strategy: Strategy,
}

/// Where the content comes from. Exactly one field is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new(SOURCE_EXACTLY_ONE_RULE).message(SOURCE_EXACTLY_ONE_MESSAGE))]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// An HTTP(S) origin, read in disjoint ranges by a few nodes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// A file or directory already on one node (e.g. a build machine); that
    /// node's agent seeds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeSource>,
}

/// An HTTP(S) origin: one file (`url`), or a directory of files (`files`,
/// each at `url` + its path unless it names its own URL).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(FILES_NO_WHOLE_DIGEST_RULE).message(FILES_NO_WHOLE_DIGEST_MESSAGE).field_path(".digest"))]
#[x_kube(validation = Rule::new(FILES_BASE_URL_RULE).message(FILES_BASE_URL_MESSAGE).field_path(".url"))]
#[x_kube(validation = Rule::new(MANIFEST_ONE_FILE_RULE).message(MANIFEST_ONE_FILE_MESSAGE).field_path(".manifestUrl"))]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// `http://` or `https://` URL of the content; with `files`, the base
    /// URL the files' paths are appended to (ending in `/`). The origin
    /// should support Range requests; a single file from one that answers a
    /// range with the whole body is read whole, in one streaming GET, by a
    /// single node, and every other node takes the content from peers
    /// (slower: one node's download speed); a directory needs Range support.
    /// Credentials in the URL are refused: use `headersFrom`.
    #[schemars(length(min = 1, max = URL_MAX_LEN), pattern(URL_PATTERN), transform = url_rules)]
    pub url: String,
    /// The files of a directory (at most 1000): `target.path` becomes a
    /// directory holding each at its `path`, and appears only once every
    /// file verified. Unset: `url` is one file and `target.path` that file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_FILES))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["path".into()]))]
    pub files: Vec<HttpFile>,
    /// URL of the content's piece manifest (`peerfill-agent manifest FILE
    /// --piece-size N` writes one; one file only). Origin readers take the
    /// piece hashes from it instead of reading their whole range, so a new
    /// version reads only the pieces that changed from the origin (every
    /// other piece comes from the previous copy on disk). Its piece size
    /// must be the Distribution's: set `strategy.pieceSize`. A manifest
    /// that does not describe the origin's bytes fails the readers with
    /// `OriginManifestMismatch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = URL_MAX_LEN), pattern(URL_PATTERN), transform = url_rules)]
    pub manifest_url: Option<String>,
    /// Extra request headers (e.g. `Authorization`) taken from a Secret in the
    /// Distribution's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_from: Option<HeadersFrom>,
    /// Expected digest of the whole content, `sha256:<hex>` or
    /// `blake3:<hex>`. When set, content that does not match fails the
    /// distribution instead of being placed on nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DIGEST_PATTERN))]
    pub digest: Option<String>,
}

/// One file of a directory from an HTTP(S) origin.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpFile {
    /// Where the file goes beneath the target directory, and (unless `url`
    /// is set) what is appended to the source's `url`. Same rules as
    /// `target.path`; no file may sit beneath another file's path.
    #[schemars(length(min = 1, max = PATH_MAX_LEN), pattern(PATH_PATTERN), transform = relative_path_rules)]
    pub path: String,
    /// URL of this file, when it is not the source's `url` + `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = URL_MAX_LEN), pattern(URL_PATTERN), transform = url_rules)]
    pub url: Option<String>,
    /// Expected digest of this file, `sha256:<hex>` or `blake3:<hex>`: a
    /// file that does not match fails the distribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DIGEST_PATTERN))]
    pub digest: Option<String>,
}

impl HttpSource {
    /// The URL of every file of a directory source, in `files` order: its
    /// own `url`, or the source's `url` with the path appended (each
    /// segment percent-encoded).
    pub fn file_urls(&self) -> Vec<String> {
        self.files
            .iter()
            .map(|f| match &f.url {
                Some(u) => u.clone(),
                None => file_url(&self.url, &f.path),
            })
            .collect()
    }
}

/// The URL of a directory's file without a URL of its own: the base URL
/// with the path appended, each segment percent-encoded.
pub fn file_url(base: &str, path: &str) -> String {
    format!("{base}{}", encode_path(path))
}

/// Percent-encodes every byte of each path segment that is not unreserved
/// in a URL path (RFC 3986), keeping the `/` between segments.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Request headers from a Secret.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeadersFrom {
    /// Name of a Secret in the Distribution's namespace. Each data key is a
    /// header name, its value the header value.
    #[schemars(length(min = 1, max = DNS_SUBDOMAIN_MAX_LEN), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub secret_name: String,
}

/// Content that already sits on one node. A directory is walked beneath
/// the data root (symlinks are never followed: one inside it fails the
/// distribution) and distributed as a directory of its regular files.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeSource {
    /// The node that holds the content (its agent seeds it).
    #[schemars(length(min = 1, max = DNS_SUBDOMAIN_MAX_LEN), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub node_name: String,
    /// File or directory on that node, relative to the seeding agent's data
    /// root (the agent can read nothing outside it). Same rules as
    /// `target.path`.
    #[schemars(length(min = 1, max = PATH_MAX_LEN), pattern(PATH_PATTERN), transform = relative_path_rules)]
    pub path: String,
}

/// Adds the CEL rules of an origin URL.
fn url_rules(schema: &mut schemars::Schema) {
    kube::core::validate(
        schema,
        kube::core::Rule::new(URL_NO_CREDENTIALS_RULE).message(URL_NO_CREDENTIALS_MESSAGE),
    )
    .expect("a CEL rule serializes");
}

/// Adds the CEL rules of a relative path under the data root (`source.node.path`
/// and `target.path` share them).
fn relative_path_rules(schema: &mut schemars::Schema) {
    for (rule, message) in [
        (PATH_RELATIVE_RULE, PATH_RELATIVE_MESSAGE),
        (PATH_DOT_SEGMENT_RULE, PATH_DOT_SEGMENT_MESSAGE),
        (PATH_EMPTY_SEGMENT_RULE, PATH_EMPTY_SEGMENT_MESSAGE),
        (PATH_SEGMENT_LEN_RULE, PATH_SEGMENT_LEN_MESSAGE),
        (PATH_RESERVED_RULE, PATH_RESERVED_MESSAGE),
    ] {
        kube::core::validate(schema, kube::core::Rule::new(rule).message(message))
            .expect("a CEL rule serializes");
    }
}

/// Which nodes get the content, and where it goes on them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Only nodes with all these labels. Empty: every node (subject to
    /// taints, see `tolerations`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints of nodes to include anyway, as for a Pod (e.g. a GPU pool).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node affinity, as for a Pod; only the `required…` part selects nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_affinity: Option<NodeAffinity>,
    /// Where the content goes on each node, relative to the agent's data
    /// root: never absolute, no `.`/`..` or empty segments, no control
    /// characters, no segment starting with `.peerfill` (the agent's own
    /// state), at most 1024 characters, segments at most 255.
    #[schemars(length(min = 1, max = PATH_MAX_LEN), pattern(PATH_PATTERN), transform = relative_path_rules)]
    pub path: String,
}

/// How the content is moved.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Strategy {
    /// Piece size in bytes: the unit of verification and exchange. A power
    /// of two from 65536 (64 KiB) to 67108864 (64 MiB). Unset: chosen from
    /// the content size, about 4096 pieces, from 256 KiB to 4 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = PIECE_SIZE_MIN, max = PIECE_SIZE_MAX))]
    #[x_kube(validation = Rule::new(PIECE_SIZE_POWER_OF_TWO_RULE).message(PIECE_SIZE_POWER_OF_TWO_MESSAGE))]
    pub piece_size: Option<u64>,
    /// Most nodes reading from the origin at once (each reads a disjoint
    /// range), 1 to 64; default 16. Together they keep at most 16 range
    /// requests in flight (at least one each). The origin serves about one
    /// copy in total.
    #[serde(default = "default_max_origin_connections")]
    #[schemars(range(min = MAX_ORIGIN_CONNECTIONS_MIN, max = MAX_ORIGIN_CONNECTIONS_MAX))]
    pub max_origin_connections: u32,
    /// Download cap of this distribution on each node, in bytes per second
    /// (1 MiB/s to 100 GiB/s), from peers and the origin together. The
    /// agent's own node-wide limits apply on top. A change applies to the
    /// running distribution within a report interval, without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = BANDWIDTH_MIN, max = BANDWIDTH_MAX))]
    pub max_download_bytes_per_second: Option<u64>,
    /// Upload cap of this distribution on each node, in bytes per second
    /// (1 MiB/s to 100 GiB/s), to all peers together. The agent's own
    /// node-wide limits apply on top; changes apply without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = BANDWIDTH_MIN, max = BANDWIDTH_MAX))]
    pub max_upload_bytes_per_second: Option<u64>,
    /// Higher goes first when a node has several distributions (-1000 to
    /// 1000; default 0): under the agent's node-wide download and upload
    /// limits, a lower priority gets bandwidth only while no higher one
    /// waits for it; without node-wide limits, a lower priority takes a
    /// download slot only while no higher one waits for one. Uploads are
    /// ordered by priority only under a node-wide upload limit.
    #[serde(default)]
    #[schemars(range(min = PRIORITY_MIN, max = PRIORITY_MAX))]
    pub priority: i32,
}

fn default_max_origin_connections() -> u32 {
    MAX_ORIGIN_CONNECTIONS_DEFAULT
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            piece_size: None,
            max_origin_connections: MAX_ORIGIN_CONNECTIONS_DEFAULT,
            max_download_bytes_per_second: None,
            max_upload_bytes_per_second: None,
            priority: 0,
        }
    }
}

/// Lifecycle phase of a Distribution.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Accepted; no node has started yet.
    Pending,
    /// Nodes are fetching the content.
    Progressing,
    /// Every selected node holds the verified content.
    Complete,
    /// Cannot complete without a change to the spec or the origin.
    Failed,
    /// Being deleted; nodes are removing the content.
    Deleting,
}

impl Phase {
    /// The name as written in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Progressing => "Progressing",
            Phase::Complete => "Complete",
            Phase::Failed => "Failed",
            Phase::Deleting => "Deleting",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Observed state, written by the operator only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DistributionStatus {
    /// Summary of the lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Standard conditions: `Progressing`, `Complete`, `Failed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Content size in bytes, once known (for a directory, its files plus
    /// the file table that leads the content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Number of files, when the content is a directory (agreed by the hash
    /// authorities like the size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// Digest of the whole content (`sha256:…` or `blake3:…`), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The pinned identity every node's content is checked against: the
    /// BLAKE3 root (`blake3:<hex>`), from the user's digest or agreed by the
    /// hash authorities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
    /// Content id of the version being distributed (changes with every edit
    /// of source, digest, path or piece size, and when the origin changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_id: Option<String>,
    /// How many times the origin changed under this Distribution (each
    /// change restarts the content on a new content id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_revision: Option<u32>,
    /// The origin version (ETag or Last-Modified) reads are pinned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_version: Option<String>,
    /// Nodes the target selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_nodes: Option<u32>,
    /// Nodes holding the verified content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_nodes: Option<u32>,
    /// Nodes that reported a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_nodes: Option<u32>,
    /// `complete/desired`, e.g. `7/10` (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Bytes on nodes over bytes wanted, e.g. `42%` (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// The same as a number from 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub progress_ratio: Option<f64>,
    /// Aggregate download rate of all nodes, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
    /// The same for humans, e.g. `118 MiB/s` (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<String>,
    /// Some failing nodes with the reason (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_FAILING_NODES))]
    pub failing_nodes: Vec<FailingNode>,
    /// When the first node started fetching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the last node completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

/// A node that failed, and why.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FailingNode {
    /// Node name.
    pub node: String,
    /// CamelCase reason, e.g. `DigestMismatch`.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl DistributionStatus {
    /// The condition of type `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Whether condition `type_` is set with status `True`.
    pub fn is_condition_true(&self, type_: &str) -> bool {
        self.condition(type_).is_some_and(|c| c.status == "True")
    }
}

impl Distribution {
    /// Checks the spec against the same rules as the CRD schema, naming the
    /// offending field as the API server would (`spec.target.path`). The
    /// schema stays the source of truth; this lets the operator and tests
    /// double-check objects that did not come through an API server.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        self.spec.validate()
    }
}

impl DistributionSpec {
    /// See [`Distribution::validate`].
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut c = Collector::default();
        let source = &self.source;
        if source.http.is_some() == source.node.is_some() {
            c.push("spec.source", Problem::SourceCount);
        }
        if let Some(http) = &source.http {
            c.check("spec.source.http.url", check_url(&http.url));
            if let Some(digest) = &http.digest {
                c.check("spec.source.http.digest", check_digest(digest));
            }
            check_http_files(&mut c, http);
            if let Some(m) = &http.manifest_url {
                c.check("spec.source.http.manifestUrl", check_url(m));
                if !http.files.is_empty() {
                    c.push("spec.source.http.manifestUrl", Problem::ManifestWithFiles);
                }
            }
            if let Some(h) = &http.headers_from {
                c.check(
                    "spec.source.http.headersFrom.secretName",
                    check_dns_subdomain(&h.secret_name),
                );
            }
        }
        if let Some(node) = &source.node {
            c.check(
                "spec.source.node.nodeName",
                check_dns_subdomain(&node.node_name),
            );
            c.check("spec.source.node.path", check_relative_path(&node.path));
        }
        c.check("spec.target.path", check_relative_path(&self.target.path));
        let s = &self.strategy;
        if let Some(size) = s.piece_size {
            c.check("spec.strategy.pieceSize", check_piece_size(size));
        }
        c.check(
            "spec.strategy.maxOriginConnections",
            check_range(
                s.max_origin_connections,
                MAX_ORIGIN_CONNECTIONS_MIN,
                MAX_ORIGIN_CONNECTIONS_MAX,
            ),
        );
        for (field, cap) in [
            (
                "spec.strategy.maxDownloadBytesPerSecond",
                s.max_download_bytes_per_second,
            ),
            (
                "spec.strategy.maxUploadBytesPerSecond",
                s.max_upload_bytes_per_second,
            ),
        ] {
            if let Some(cap) = cap {
                c.check(field, check_range(cap, BANDWIDTH_MIN, BANDWIDTH_MAX));
            }
        }
        c.check(
            "spec.strategy.priority",
            check_range(s.priority, PRIORITY_MIN, PRIORITY_MAX),
        );
        c.finish()
    }
}

/// The rules of `spec.source.http.files` (see [`HttpSource`]).
fn check_http_files(c: &mut Collector, http: &HttpSource) {
    if http.files.is_empty() {
        return;
    }
    if http.files.len() > MAX_FILES {
        c.push(
            "spec.source.http.files",
            Problem::TooMany {
                max: MAX_FILES,
                len: http.files.len(),
            },
        );
    }
    if http.digest.is_some() {
        c.push("spec.source.http.digest", Problem::WholeDigestWithFiles);
    }
    let needs_base = http.files.iter().any(|f| f.url.is_none());
    if needs_base && !http.url.ends_with('/') {
        c.push("spec.source.http.url", Problem::BaseUrlWithoutSlash);
    }
    for (i, f) in http.files.iter().enumerate() {
        let field = |name: &str| format!("spec.source.http.files[{i}].{name}");
        c.check(&field("path"), check_relative_path(&f.path));
        if let Some(u) = &f.url {
            c.check(&field("url"), check_url(u));
        }
        if let Some(d) = &f.digest {
            c.check(&field("digest"), check_digest(d));
        }
    }
    let paths: Vec<&str> = http.files.iter().map(|f| f.path.as_str()).collect();
    match check_file_paths(&paths) {
        // The list is keyed by path: the API server names the item.
        Some((i, p @ Problem::DuplicatePath(_))) => {
            c.push(&format!("spec.source.http.files[{i}]"), p)
        }
        Some((i, p)) => c.push(&format!("spec.source.http.files[{i}].path"), p),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DistributionSpec {
        DistributionSpec {
            source: Source {
                http: Some(HttpSource {
                    url: "https://origin.example/model.bin".into(),
                    manifest_url: None,
                    files: Vec::new(),
                    headers_from: None,
                    digest: None,
                }),
                node: None,
            },
            target: Target {
                path: "models/model.bin".into(),
                ..Target::default()
            },
            strategy: Strategy::default(),
        }
    }

    #[test]
    fn valid_spec_passes() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn every_invalid_field_is_named() {
        let mut s = spec();
        s.source.node = Some(NodeSource {
            node_name: "Build_Node".into(),
            path: "/abs".into(),
        });
        s.target.path = "../x".into();
        s.strategy.piece_size = Some(0);
        s.strategy.max_origin_connections = 65;
        s.strategy.max_upload_bytes_per_second = Some(1);
        s.strategy.priority = 5000;
        let errors = s.validate().expect_err("spec is invalid");
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.source",
                "spec.source.node.nodeName",
                "spec.source.node.path",
                "spec.target.path",
                "spec.strategy.pieceSize",
                "spec.strategy.maxOriginConnections",
                "spec.strategy.maxUploadBytesPerSecond",
                "spec.strategy.priority",
            ]
        );
    }

    #[test]
    fn directory_files_are_checked_and_named() {
        let mut s = spec();
        let file = |path: &str, url: Option<&str>| HttpFile {
            path: path.into(),
            url: url.map(Into::into),
            digest: None,
        };
        let http = s.source.http.as_mut().expect("http source");
        http.url = "https://origin.example/model/".into();
        http.files = vec![
            file("config.json", None),
            file("shards/model 1.safetensors", None),
            file("tok.json", Some("https://cdn.example/t.json")),
        ];
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(
            s.source.http.as_ref().map(HttpSource::file_urls),
            Some(vec![
                "https://origin.example/model/config.json".to_owned(),
                "https://origin.example/model/shards/model%201.safetensors".to_owned(),
                "https://cdn.example/t.json".to_owned(),
            ])
        );

        let http = s.source.http.as_mut().expect("http source");
        http.url = "https://origin.example/model".into();
        http.digest = Some(format!("sha256:{}", "0".repeat(64)));
        http.files.push(file("config.json/x", None));
        http.files.push(file("../up", None));
        let errors = s.validate().expect_err("spec is invalid");
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.source.http.digest",
                "spec.source.http.url",
                "spec.source.http.files[4].path",
                "spec.source.http.files[3].path",
            ],
            "{errors}"
        );
        assert!(errors.to_string().contains("is a file"), "{errors}");
    }

    #[test]
    fn defaults_apply_when_strategy_is_omitted() {
        let s: DistributionSpec = serde_json::from_value(serde_json::json!({
            "source": {"http": {"url": "http://127.0.0.1:8080/x"}},
            "target": {"path": "x"},
        }))
        .expect("minimal spec parses");
        assert_eq!(s.strategy, Strategy::default());
        assert_eq!(s.strategy.piece_size, None);
        assert_eq!(s.strategy.max_origin_connections, 16);
    }

    #[test]
    fn conditions_by_type() {
        let condition = |type_: &str, status: &str| Condition {
            type_: type_.into(),
            status: status.into(),
            reason: "Test".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        };
        let status = DistributionStatus {
            conditions: vec![
                condition(CONDITION_PROGRESSING, "False"),
                condition(CONDITION_COMPLETE, "True"),
            ],
            ..DistributionStatus::default()
        };
        assert!(status.is_condition_true(CONDITION_COMPLETE));
        assert!(!status.is_condition_true(CONDITION_PROGRESSING));
        assert!(!status.is_condition_true(CONDITION_FAILED));
        assert_eq!(
            status
                .condition(CONDITION_PROGRESSING)
                .map(|c| c.status.as_str()),
            Some("False")
        );
    }

    #[test]
    fn phase_serializes_as_plain_string() {
        let v = serde_json::to_value(Phase::Progressing).expect("serializes");
        assert_eq!(v, serde_json::json!("Progressing"));
        for p in [
            Phase::Pending,
            Phase::Progressing,
            Phase::Complete,
            Phase::Failed,
            Phase::Deleting,
        ] {
            assert_eq!(serde_json::to_value(p).ok(), Some(p.as_str().into()));
        }
    }
}
