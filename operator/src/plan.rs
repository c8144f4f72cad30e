//! The per-node work: from the observed Distributions, Nodes and NodeFills
//! to the desired `NodeFill.spec` of every node (control-path.md "Per-node
//! work"). Pure: no I/O, the clock is passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use peerfill_crds::nodefill::split_ranges;
use peerfill_crds::{
    Assignment, Distribution, FINALIZER, NodeDistributionStatus, NodeFill, NodeFillSpec, NodePhase,
    OriginReader, PeerEndpoint, PieceRange, ResolvedHttpSource, ResolvedSource, Role, SecretRef,
    SeedNode, budget,
};

use crate::directory::{self, Extent};
use crate::memory::Memory;
use crate::policy::{self, PathConflict, ReasonKind};
use crate::select::{self, NodeMatch};

pub use crate::peers::{
    CHORD_RINGS, FULL_MESH_MAX_PEERS, PeerGraph, RING_NEIGHBOURS_PER_SIDE, choose_peers,
};
/// Node label of the zone, for topology-aware peers.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// An origin reader `Downloading` without any new verified byte for this
/// long (or two report intervals, in clusters large enough that agents
/// report less often) is replaced.
pub const READER_STALL_SECONDS: i64 = 30;

/// Everything the decisions read: the reflector stores' contents and the
/// time.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub distributions: Vec<Arc<Distribution>>,
    /// By name.
    pub nodes: BTreeMap<String, Arc<Node>>,
    /// By name (= node name).
    pub fills: BTreeMap<String, Arc<NodeFill>>,
    pub now: Timestamp,
    /// `--allow-private-origins`.
    pub allow_private_origins: bool,
    /// Distributions that may not own their paths, by uid.
    pub conflicts: BTreeMap<String, PathConflict>,
    /// What the operator remembers between reconciles.
    pub memory: Memory,
}

impl World {
    pub fn new(
        distributions: Vec<Arc<Distribution>>,
        nodes: Vec<Arc<Node>>,
        fills: Vec<Arc<NodeFill>>,
        now: Timestamp,
    ) -> Self {
        let fills: BTreeMap<String, Arc<NodeFill>> =
            fills.into_iter().map(|f| (f.name_any(), f)).collect();
        World {
            conflicts: policy::path_conflicts(&distributions, &fills),
            distributions,
            nodes: nodes.into_iter().map(|n| (n.name_any(), n)).collect(),
            fills,
            now,
            allow_private_origins: false,
            memory: Memory::default(),
        }
    }

    /// The same world with `--allow-private-origins` and the operator's
    /// memory.
    pub fn with(mut self, allow_private_origins: bool, memory: Memory) -> Self {
        self.allow_private_origins = allow_private_origins;
        self.memory = memory;
        self
    }

    /// Whether the node's agent is up (control-path.md "An agent is up").
    pub fn agent_up(&self, node: &str) -> bool {
        self.fills
            .get(node)
            .is_some_and(|f| select::agent_up(f, self.now))
    }

    /// The node's zone: its agent's report, else the Node label.
    pub fn zone(&self, node: &str) -> Option<String> {
        self.fills
            .get(node)
            .and_then(|f| f.status.as_ref())
            .and_then(|s| s.zone.clone())
            .or_else(|| {
                self.nodes
                    .get(node)
                    .and_then(|n| n.labels().get(ZONE_LABEL).cloned())
            })
    }
}

/// The decisions for one Distribution.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DistPlan {
    pub uid: String,
    /// Target nodes (selected, not deleting, agent up), sorted; never the
    /// seeder.
    pub targets: Vec<String>,
    /// Selected nodes whose agent is not up, sorted.
    pub agent_down: Vec<String>,
    /// The seeding node of a `node` source, when it has a NodeFill.
    pub seeder: Option<String>,
    /// Origin readers in reader order with their piece ranges.
    pub readers: Vec<OriginReader>,
    /// Content size, once the authorities of this content id agree.
    pub size: Option<u64>,
    /// Piece size: the Distribution's, or chosen once the size is pinned;
    /// 0 until then.
    pub piece_size: u64,
    /// Number of files of a directory, pinned with the size (`None`: one
    /// file, or not pinned yet).
    pub files: Option<u64>,
    /// An HTTP source with `files`: a directory (never read whole).
    pub directory: bool,
    /// Peers of every assigned node (targets and seeder); shared by the
    /// Distributions over the same nodes.
    pub peers: Arc<PeerGraph>,
    /// The content id of the version being distributed.
    pub content_id: String,
    /// How often the origin changed (part of the content id).
    pub origin_revision: u32,
    /// The pinned BLAKE3 root, once known.
    pub manifest_digest: Option<String>,
    /// The pinned origin validator, once a reader reported one.
    pub origin_version: Option<String>,
    /// What the authorities disagree on (size or root), if they do.
    pub disagreement: Option<String>,
    /// The seeder's agent is up (always true for an http source).
    pub seeder_up: bool,
    /// The origin ignores Range requests: one reader reads it whole
    /// ([`whole_read`]).
    pub whole_read: bool,
}

impl DistPlan {
    /// Targets and the seeder: every node holding an assignment.
    pub fn assigned(&self) -> impl Iterator<Item = &String> {
        self.targets.iter().chain(self.seeder.iter())
    }

    /// Origin readers and the seeder: the nodes others cannot finish without.
    pub fn authorities(&self) -> BTreeSet<&str> {
        self.readers
            .iter()
            .map(|r| r.node.as_str())
            .chain(self.seeder.as_deref())
            .collect()
    }
}

/// The assignment of content `content_id` currently in the NodeFill specs
/// (the first one by node name, preferring one that lists readers): where
/// the sticky pins (size and files, root, origin version) come from. Assignments of
/// other content ids (older versions) pin nothing.
fn current_assignment<'a>(world: &'a World, content_id: &str) -> Option<&'a Assignment> {
    let mut all = world
        .fills
        .values()
        .flat_map(|f| f.spec.distributions.iter())
        .filter(|a| a.content_id == content_id);
    let first = all.clone().next();
    all.find(|a| !a.origin_readers.is_empty()).or(first)
}

/// The previous origin readers of `uid` in reader order, whatever the
/// content id (keeping readers across versions keeps load spread evenly).
fn previous_readers(world: &World, uid: &str, content_id: &str) -> Vec<String> {
    let all = || {
        world
            .fills
            .values()
            .flat_map(|f| f.spec.distributions.iter())
            .filter(|a| a.uid == uid && !a.origin_readers.is_empty())
    };
    all()
        .find(|a| a.content_id == content_id)
        .or_else(|| all().next())
        .map(|a| a.origin_readers.iter().map(|r| r.node.clone()).collect())
        .unwrap_or_default()
}

/// The report of `node` on content `content_id` of `uid`; reports on other
/// versions (or without a content id) count as not yet reported.
pub fn report_for<'a>(
    world: &'a World,
    node: &str,
    uid: &str,
    content_id: &str,
) -> Option<&'a NodeDistributionStatus> {
    world
        .fills
        .get(node)?
        .status
        .as_ref()?
        .distributions
        .iter()
        .find(|d| d.uid == uid && d.content_id.as_deref() == Some(content_id))
}

/// The canonical text of what a Distribution distributes: source (URL and
/// digest, the files of a directory, or node and path), target path and
/// piece size. Any edit of these changes the content id.
pub fn version_key(dist: &Distribution) -> String {
    let spec = &dist.spec;
    let source = match (&spec.source.http, &spec.source.node) {
        (Some(h), _) => {
            let mut http = serde_json::json!({ "url": h.url, "digest": h.digest });
            // Only a directory has the key: a single file's id is unchanged.
            if let Some(files) = directory::files_key(h) {
                http["files"] = files;
            }
            serde_json::json!({ "http": http })
        }
        (None, Some(n)) => serde_json::json!({
            "node": { "nodeName": n.node_name, "path": n.path }
        }),
        (None, None) => serde_json::Value::Null,
    };
    // serde_json writes object keys sorted: one spelling per version.
    serde_json::json!({
        "source": source,
        "targetPath": spec.target.path,
        "pieceSize": spec.strategy.piece_size,
    })
    .to_string()
}

/// The root the user pinned: a `blake3:` digest is the content's BLAKE3
/// root already (a `sha256:` one is not a root; agents check it over the
/// finished file).
pub fn user_root(dist: &Distribution) -> Option<String> {
    dist.spec
        .source
        .http
        .as_ref()
        .and_then(|h| h.digest.clone())
        .filter(|d| d.starts_with("blake3:"))
}

/// The origin revision a Distribution is at (`status.originRevision`).
pub fn origin_revision(dist: &Distribution) -> u32 {
    dist.status
        .as_ref()
        .and_then(|s| s.origin_revision)
        .unwrap_or(0)
}

/// The content id of a Distribution's current version.
pub fn content_id(dist: &Distribution, uid: &str) -> String {
    Assignment::content_id_for_version(uid, &version_key(dist), origin_revision(dist))
}

/// The one value every authority reported, `Err` naming the disagreement
/// when two differ (even before all reported), `Ok(None)` while some have
/// not reported.
pub fn agreed<T: PartialEq + Clone + std::fmt::Debug>(
    what: &str,
    values: &[(&str, Option<T>)],
) -> Result<Option<T>, String> {
    let reported: Vec<(&str, &T)> = values
        .iter()
        .filter_map(|(n, v)| v.as_ref().map(|v| (*n, v)))
        .collect();
    if let Some((n0, v0)) = reported.first()
        && let Some((n, v)) = reported.iter().find(|(_, v)| v != v0)
    {
        return Err(format!("{what}: {n0} reported {v0:?}, {n} reported {v:?}"));
    }
    if values.is_empty() || reported.len() < values.len() {
        return Ok(None);
    }
    Ok(reported.first().map(|(_, v)| (*v).clone()))
}

/// Why a Distribution gets no work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoWork {
    /// No uid, no finalizer yet, or being deleted.
    Inactive,
    /// The spec breaks a schema rule (message names the field).
    InvalidSpec(String),
    /// The origin is a private address and private origins are not allowed.
    OriginForbidden(String),
    /// Another Distribution owns an overlapping path.
    PathConflict(PathConflict),
}

/// Whether the Distribution takes part in planning: has a uid, carries our
/// finalizer (so no node gets content that a deletion could leave behind),
/// is not being deleted and has a valid spec.
pub fn active(dist: &Distribution) -> bool {
    dist.metadata.uid.is_some()
        && dist.finalizers().iter().any(|f| f == FINALIZER)
        && dist.metadata.deletion_timestamp.is_none()
        && dist.validate().is_ok()
}

/// The decisions for one Distribution, or why it gets no work.
pub fn plan_distribution(dist: &Distribution, world: &World) -> Result<DistPlan, NoWork> {
    let mut plan = plan_decisions(dist, world)?;
    plan.peers = Arc::new(crate::peers::choose_peer_graph(&plan, world));
    Ok(plan)
}

/// [`plan_distribution`] without the peers (left empty): all a
/// Distribution's status needs. Choosing peers costs time and memory in
/// proportion to the cluster (64 names per node), and a reconcile runs
/// every few seconds per active Distribution.
pub fn plan_decisions(dist: &Distribution, world: &World) -> Result<DistPlan, NoWork> {
    if let Err(e) = dist.validate() {
        return Err(NoWork::InvalidSpec(e.to_string()));
    }
    if !active(dist) {
        return Err(NoWork::Inactive);
    }
    let uid = dist.metadata.uid.clone().ok_or(NoWork::Inactive)?;
    if let Some(http) = &dist.spec.source.http
        && !world.allow_private_origins
        && let Some(why) = policy::private_origin(&http.url)
    {
        return Err(NoWork::OriginForbidden(why));
    }
    if let Some(conflict) = world.conflicts.get(&uid) {
        return Err(NoWork::PathConflict(conflict.clone()));
    }
    let content_id = content_id(dist, &uid);
    let origin_revision = origin_revision(dist);
    let seeder = dist
        .spec
        .source
        .node
        .as_ref()
        .map(|n| n.node_name.clone())
        .filter(|n| {
            world.fills.contains_key(n)
                && world
                    .nodes
                    .get(n)
                    .is_some_and(|node| node.metadata.deletion_timestamp.is_none())
        });
    let seeder_up =
        dist.spec.source.node.is_none() || seeder.as_deref().is_some_and(|s| world.agent_up(s));
    let mut targets = Vec::new();
    let mut agent_down = Vec::new();
    for (name, node) in &world.nodes {
        if Some(name) == seeder.as_ref() {
            continue;
        }
        let fill = world.fills.get(name).map(Arc::as_ref);
        match select::classify(&dist.spec.target, node, fill, world.now) {
            NodeMatch::Target => targets.push(name.clone()),
            NodeMatch::AgentDown => agent_down.push(name.clone()),
            NodeMatch::NotSelected => {}
        }
    }

    let current = current_assignment(world, &content_id);
    let report = |n: &str| report_for(world, n, &uid, &content_id);
    let mut disagreement = None;

    let directory = dist
        .spec
        .source
        .http
        .as_ref()
        .is_some_and(|h| !h.files.is_empty());
    // A directory needs ranges: its `OriginNoRangeSupport` stays a failure.
    let whole_read = dist.spec.source.http.is_some()
        && !directory
        && whole_read(current, targets.iter().filter_map(|n| report(n)));
    // Origin readers first: the size must come from exactly these.
    let names = if dist.spec.source.http.is_some() {
        let previous = previous_readers(world, &uid, &content_id);
        let max = if whole_read {
            1
        } else {
            usize::try_from(dist.spec.strategy.max_origin_connections).unwrap_or(usize::MAX)
        };
        let size_known = current.and_then(|a| a.size);
        let unfit = unfit_readers(world, &uid, &content_id, &targets, &previous, size_known);
        let candidates: Vec<String> = targets
            .iter()
            .filter(|t| !unfit.contains(t.as_str()))
            .cloned()
            .collect();
        choose_readers(&uid, &candidates, &previous, max, &|n| world.zone(n))
    } else {
        Vec::new()
    };
    // The hash authorities of this content id.
    let authorities: Vec<&str> = match &seeder {
        Some(s) => vec![s.as_str()],
        None => names.iter().map(String::as_str).collect(),
    };
    // A Failed entry (e.g. OriginChanged with the new version) pins nothing.
    let usable = |r: &NodeDistributionStatus| r.phase != NodePhase::Failed;

    let extent = directory::pinned_extent(current).or_else(|| {
        let values: Vec<(&str, Option<Extent>)> = authorities
            .iter()
            .map(|n| {
                let r = report(n).filter(|r| usable(r));
                (*n, r.and_then(|r| Extent::reported(r, directory)))
            })
            .collect();
        agreed("size", &values).unwrap_or_else(|e| {
            disagreement = Some(e);
            None
        })
    });
    let size = extent.map(|e| e.size);
    let chosen = names.clone();
    // Chosen once, when the size is pinned, and published: a content id
    // keeps the piece size it was first published with (an older operator's
    // `0` meant its own rule), so a new rule never re-cuts running content.
    let piece_size = dist
        .spec
        .strategy
        .piece_size
        .or_else(|| current.and_then(Assignment::effective_piece_size))
        .or(size.map(peerfill_crds::validation::auto_piece_size))
        .unwrap_or(0);
    let readers = reader_ranges(names, size, piece_size);

    let manifest_digest = user_root(dist)
        .or_else(|| current.and_then(|a| a.manifest_digest.clone()))
        .or_else(|| {
            size?;
            // Once the size is pinned: readers beyond the piece count are
            // dropped and do not hash anything.
            // A 0-byte content has no ranges: every chosen reader hashes it.
            let holders: Vec<&str> = match &seeder {
                Some(s) => vec![s.as_str()],
                None if readers.is_empty() => chosen.iter().map(String::as_str).collect(),
                None => readers.iter().map(|r| r.node.as_str()).collect(),
            };
            let values: Vec<(&str, Option<String>)> = holders
                .iter()
                .map(|n| {
                    (
                        *n,
                        report(n).filter(|r| usable(r)).and_then(|r| r.root.clone()),
                    )
                })
                .collect();
            if values.is_empty() {
                return None;
            }
            agreed("root", &values).unwrap_or_else(|e| {
                disagreement.get_or_insert(e);
                None
            })
        });
    let origin_version = current
        .and_then(|a| a.source.http.as_ref()?.origin_version.clone())
        .or_else(|| {
            readers.iter().find_map(|r| {
                report(&r.node)
                    .filter(|r| usable(r))
                    .and_then(|r| r.origin_version.clone())
            })
        })
        .filter(|_| dist.spec.source.http.is_some());

    let plan = DistPlan {
        uid,
        targets,
        agent_down,
        seeder,
        readers,
        size,
        piece_size,
        files: extent.and_then(|e| e.files),
        directory,
        peers: Arc::default(),
        content_id,
        origin_revision,
        manifest_digest,
        origin_version,
        disagreement,
        seeder_up,
        whole_read,
    };
    Ok(plan)
}

/// Whether the origin of this content id is read whole by one reader: it
/// was already (the NodeFill specs keep it, so it survives restarts of the
/// operator and of the reader), or a node reports that the origin answered a
/// range request with the whole body (`OriginNoRangeSupport`). What the
/// README promises for such an origin: one node downloads it whole, the
/// others take it from peers.
pub fn whole_read<'a>(
    current: Option<&Assignment>,
    mut reports: impl Iterator<Item = &'a NodeDistributionStatus>,
) -> bool {
    current
        .and_then(|a| a.source.http.as_ref())
        .is_some_and(|h| h.whole_read)
        || reports.any(|r| {
            r.phase == NodePhase::Failed
                && r.reason.as_deref() == Some(policy::REASON_ORIGIN_NO_RANGES)
        })
}

/// Targets that must not read from the origin now: those whose report on
/// this content is `Failed` with a local fault (until they report anything
/// else; the agent retries), and previous readers that are stalled
/// (`Downloading` without a new verified byte for
/// [`READER_STALL_SECONDS`] while their content is incomplete). Every
/// stalled reader is replaced, even when all are: an origin that is down
/// shows as a transient `Failed` reason (not `Downloading`), and a reader
/// that finished its own range but waits on a stuck one cannot be told
/// apart from the stuck one; re-reading a range costs one more copy from the
/// origin, never correctness or liveness.
pub fn unfit_readers<'a>(
    world: &World,
    uid: &str,
    content_id: &str,
    targets: &'a [String],
    previous: &[String],
    size: Option<u64>,
) -> BTreeSet<&'a str> {
    let mut unfit: BTreeSet<&str> = targets
        .iter()
        .filter(|t| {
            report_for(world, t, uid, content_id).is_some_and(|r| {
                r.phase == NodePhase::Failed
                    && policy::reason_kind(r.reason.as_deref().unwrap_or_default())
                        == ReasonKind::Local
            })
        })
        .map(String::as_str)
        .collect();
    let stalled = |n: &str| {
        let incomplete = report_for(world, n, uid, content_id)
            .is_some_and(|r| size.is_none_or(|s| r.bytes_done < s));
        // Progress shows only once per report interval: never judge a
        // stall on fewer than two reports.
        let interval = world
            .fills
            .get(n)
            .and_then(|f| f.spec.report_interval_seconds)
            .unwrap_or(budget::MIN_REPORT_INTERVAL_SECONDS);
        let bound = READER_STALL_SECONDS.max(2 * i64::from(interval));
        incomplete
            && world
                .memory
                .stalled_seconds(n, uid, content_id, world.now)
                .is_some_and(|s| s >= bound)
    };
    for p in previous {
        if let Some(t) = targets.iter().find(|t| *t == p)
            && stalled(t)
        {
            unfit.insert(t.as_str());
        }
    }
    unfit
}

/// Origin readers: the previous ones that are still targets keep their
/// position (so their ranges hold); holes and new slots are filled by
/// rendezvous hashing (`blake3(uid/node)`, so different distributions
/// spread their reads over different nodes), each from the zone (`zone_of`)
/// with the fewest readers so far, so fresh pieces enter every zone from
/// the origin rather than all through one; up to `min(max, targets)`.
/// Nodes without a zone count as one zone.
pub fn choose_readers(
    uid: &str,
    targets: &[String],
    previous: &[String],
    max: usize,
    zone_of: &dyn Fn(&str) -> Option<String>,
) -> Vec<String> {
    let want = max.min(targets.len());
    let is_target: BTreeSet<&str> = targets.iter().map(String::as_str).collect();
    let mut slots: Vec<Option<String>> = previous
        .iter()
        .map(|p| is_target.contains(p.as_str()).then(|| p.clone()))
        .collect();
    while slots.len() < want {
        slots.push(None);
    }
    let kept: BTreeSet<String> = slots.iter().flatten().cloned().collect();
    let mut per_zone: BTreeMap<Option<String>, usize> =
        targets.iter().map(|t| (zone_of(t), 0)).collect();
    for k in &kept {
        *per_zone.entry(zone_of(k)).or_default() += 1;
    }
    let mut candidates: Vec<(Option<String>, &String)> = targets
        .iter()
        .filter(|t| !kept.contains(*t))
        .map(|t| (zone_of(t), t))
        .collect();
    candidates.sort_by_key(|(_, t)| {
        (
            blake3::hash(format!("{uid}/{t}").as_bytes()).to_hex(),
            t.as_str(),
        )
    });
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        // The first candidate (hash order) of the zone with the fewest
        // readers among zones that still have one.
        let Some(i) = candidates
            .iter()
            .enumerate()
            .min_by_key(|(i, (z, _))| (per_zone.get(z).copied().unwrap_or(0), *i))
            .map(|(i, _)| i)
        else {
            break;
        };
        let (z, c) = candidates.remove(i);
        *per_zone.entry(z).or_default() += 1;
        *slot = Some(c.clone());
    }
    let mut readers: Vec<String> = slots.into_iter().flatten().collect();
    readers.truncate(want);
    readers
}

/// Ranges per reader once the size is known (readers beyond the number of
/// pieces are dropped), `0..0` before.
pub fn reader_ranges(names: Vec<String>, size: Option<u64>, piece_size: u64) -> Vec<OriginReader> {
    let piece_count = size
        .filter(|_| piece_size > 0)
        .map(|s| s.div_ceil(piece_size));
    match piece_count {
        None => names
            .into_iter()
            .map(|node| OriginReader {
                node,
                start: 0,
                end: 0,
            })
            .collect(),
        Some(count) => {
            let readers = u32::try_from(names.len()).unwrap_or(u32::MAX);
            split_ranges(count, readers)
                .into_iter()
                .zip(names)
                .map(|(r, node)| OriginReader {
                    node,
                    start: r.start,
                    end: r.end,
                })
                .collect()
        }
    }
}

/// The source as a node gets it: only a node that reads the origin
/// (`reader`) gets the file list of a directory (it can be long).
fn resolved_source(dist: &Distribution, plan: &DistPlan, reader: bool) -> ResolvedSource {
    let ns = dist.namespace().unwrap_or_default();
    ResolvedSource {
        http: dist.spec.source.http.as_ref().map(|h| ResolvedHttpSource {
            url: h.url.clone(),
            files: if reader {
                directory::resolved_files(h)
            } else {
                Vec::new()
            },
            directory: plan.directory,
            manifest_url: h.manifest_url.clone(),
            digest: h.digest.clone(),
            headers_secret: h.headers_from.as_ref().map(|f| SecretRef {
                namespace: ns.clone(),
                name: f.secret_name.clone(),
            }),
            origin_version: plan.origin_version.clone(),
            whole_read: plan.whole_read,
        }),
        node: dist.spec.source.node.as_ref().map(|n| SeedNode {
            node_name: n.node_name.clone(),
            path: n.path.clone(),
        }),
    }
}

/// The assignment of `node` in `dist`.
pub fn assignment(dist: &Distribution, plan: &DistPlan, node: &str) -> Assignment {
    let s = &dist.spec.strategy;
    let origin_ranges = plan
        .readers
        .iter()
        .filter(|r| r.node == node)
        .map(|r| PieceRange {
            start: r.start,
            end: r.end,
        })
        .collect::<Vec<_>>();
    Assignment {
        namespace: dist.namespace().unwrap_or_default(),
        name: dist.name_any(),
        uid: plan.uid.clone(),
        generation: dist.metadata.generation.unwrap_or_default(),
        content_id: plan.content_id.clone(),
        source: resolved_source(dist, plan, !origin_ranges.is_empty()),
        path: dist.spec.target.path.clone(),
        size: plan.size,
        files: plan.files,
        piece_size: plan.piece_size,
        manifest_digest: plan.manifest_digest.clone(),
        role: Role {
            origin_ranges,
            seed: plan.seeder.as_deref() == Some(node),
        },
        origin_readers: plan.readers.clone(),
        max_download_bytes_per_second: s.max_download_bytes_per_second,
        max_upload_bytes_per_second: s.max_upload_bytes_per_second,
        priority: s.priority,
        peers: plan.peers.peers_of(node),
    }
}

/// The result of planning: every active Distribution's decisions and the
/// desired spec of every existing NodeFill.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// By Distribution uid.
    pub distributions: BTreeMap<String, DistPlan>,
    /// By node name; `identity` is copied from the current spec.
    pub specs: BTreeMap<String, NodeFillSpec>,
}

/// Every active Distribution's decisions; each node's spec is built on
/// demand ([`NodePlan::spec`]), so a pass over 5,000 nodes holds one
/// desired spec at a time, not all of them (tens of KiB each).
#[derive(Clone, Debug, Default)]
pub struct NodePlan {
    /// By Distribution uid.
    pub distributions: BTreeMap<String, DistPlan>,
    /// The planned Distributions in the order of the world.
    planned: Vec<(Arc<Distribution>, String)>,
    interval: u32,
}

impl NodePlan {
    /// The desired spec of the NodeFill `fill` (named `name`); `identity`
    /// is copied from its current spec.
    pub fn spec(&self, world: &World, name: &str, fill: &NodeFill) -> NodeFillSpec {
        let mut list: Vec<Assignment> = self
            .planned
            .iter()
            .filter_map(|(dist, uid)| {
                let p = self.distributions.get(uid)?;
                let assigned = p.targets.binary_search_by(|t| t.as_str().cmp(name)).is_ok()
                    || p.seeder.as_deref() == Some(name);
                assigned.then(|| assignment(dist, p, name))
            })
            .collect();
        list.sort_by(|a, b| (&a.namespace, &a.name, &a.uid).cmp(&(&b.namespace, &b.name, &b.uid)));
        // The hash authorities (readers, seeder) are named even when they
        // are not peers: a node checks the certificate of a hash batch they
        // signed against the fingerprint published here.
        let named: BTreeSet<&String> = list
            .iter()
            .flat_map(|a| {
                a.peers
                    .iter()
                    .chain(a.origin_readers.iter().map(|r| &r.node))
                    .chain(a.source.node.iter().map(|s| &s.node_name))
            })
            .filter(|n| *n != name)
            .collect();
        let peers = named
            .into_iter()
            .filter_map(|n| peer_endpoint(world, n))
            .collect();
        NodeFillSpec {
            distributions: list,
            peers,
            identity: fill.spec.identity.clone(),
            report_interval_seconds: Some(self.interval),
        }
    }
}

/// Plans every Distribution (the per-node specs on demand).
pub fn plan_nodes(world: &World) -> NodePlan {
    let mut out = NodePlan {
        interval: budget::report_interval_seconds(world.nodes.len()),
        ..NodePlan::default()
    };
    // Distributions over the same nodes get the same peers: one graph.
    let mut graphs: Vec<(Vec<crate::peers::PeerInput>, Arc<PeerGraph>)> = Vec::new();
    for dist in &world.distributions {
        let Ok(mut p) = plan_decisions(dist, world) else {
            continue;
        };
        let inputs = crate::peers::peer_inputs(&p, world);
        p.peers = match graphs.iter().find(|(i, _)| *i == inputs) {
            Some((_, g)) => g.clone(),
            None => {
                let g = Arc::new(PeerGraph::build(&inputs));
                graphs.push((inputs, g.clone()));
                g
            }
        };
        out.planned.push((dist.clone(), p.uid.clone()));
        out.distributions.insert(p.uid.clone(), p);
    }
    out
}

/// Plans the whole cluster, every spec built.
pub fn plan(world: &World) -> Plan {
    let nodes = plan_nodes(world);
    let specs = world
        .fills
        .iter()
        .map(|(name, fill)| (name.clone(), nodes.spec(world, name, fill)))
        .collect();
    Plan {
        distributions: nodes.distributions,
        specs,
    }
}

fn peer_endpoint(world: &World, node: &str) -> Option<PeerEndpoint> {
    let status = world.fills.get(node)?.status.as_ref()?;
    Some(PeerEndpoint {
        node: node.to_string(),
        endpoint: status.endpoint.clone().filter(|e| !e.is_empty())?,
        certificate_fingerprint: status.certificate_fingerprint.clone(),
        zone: status.zone.clone().or_else(|| world.zone(node)),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::select::tests::up_fill;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use peerfill_crds::{DistributionSpec, HttpSource, NodeSource, Source, Strategy, Target};

    pub fn now() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap()
    }

    pub fn node(name: &str, labels: &[(&str, &str)]) -> Arc<Node> {
        Arc::new(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec::default()),
            status: None,
        })
    }

    pub fn tainted(name: &str) -> Arc<Node> {
        let mut n = (*node(name, &[])).clone();
        n.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "dedicated".into(),
                value: None,
                effect: "NoSchedule".into(),
                time_added: None,
            }]),
            ..NodeSpec::default()
        });
        Arc::new(n)
    }

    pub fn http_dist(name: &str, uid: &str, readers: u32) -> Arc<Distribution> {
        let mut d = Distribution::new(
            name,
            DistributionSpec {
                source: Source {
                    http: Some(HttpSource {
                        url: "http://127.0.0.1:8080/model.bin".into(),
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
                strategy: Strategy {
                    piece_size: Some(1 << 20),
                    max_origin_connections: readers,
                    ..Strategy::default()
                },
            },
        );
        d.metadata.namespace = Some("default".into());
        d.metadata.uid = Some(uid.into());
        d.metadata.generation = Some(1);
        d.metadata.finalizers = Some(vec![FINALIZER.into()]);
        Arc::new(d)
    }

    /// The content id of [`http_dist`]'s version (any name, readers).
    pub fn test_content_id(uid: &str) -> String {
        content_id(&http_dist("d", uid, 1), uid)
    }

    /// A report on the current version of an unedited [`http_dist`].
    pub fn report(fill: &mut NodeFill, uid: &str, phase: NodePhase, size: Option<u64>, done: u64) {
        report_on(fill, uid, &test_content_id(uid), phase, size, done);
    }

    pub fn report_on(
        fill: &mut NodeFill,
        uid: &str,
        content_id: &str,
        phase: NodePhase,
        size: Option<u64>,
        done: u64,
    ) {
        let status = fill.status.get_or_insert_with(Default::default);
        status.distributions.retain(|d| d.uid != uid);
        status.distributions.push(NodeDistributionStatus {
            namespace: "default".into(),
            name: "d".into(),
            uid: uid.into(),
            phase,
            bytes_done: done,
            content_id: Some(content_id.into()),
            root: None,
            origin_version: None,
            size,
            files: None,
            pieces_done: 0,
            piece_count: 0,
            bytes_from_origin: 0,
            bytes_from_peers: 0,
            bytes_per_second: 100,
            manifest_digest: None,
            digest: None,
            reason: None,
            message: None,
            last_transition_time: None,
        });
    }

    pub fn world(dists: Vec<Arc<Distribution>>, nodes: Vec<Arc<Node>>, up: &[&str]) -> World {
        let fills = nodes
            .iter()
            .map(|n| {
                let name = n.name_any();
                if up.contains(&name.as_str()) {
                    Arc::new(up_fill(&name, now()))
                } else {
                    Arc::new(NodeFill::new(&name, NodeFillSpec::default()))
                }
            })
            .collect();
        // The test origin is on loopback.
        World::new(dists, nodes, fills, now()).with(true, Memory::default())
    }

    #[test]
    fn targets_are_selected_untainted_up_nodes() {
        let mut d = (*http_dist("d", "u1", 2)).clone();
        d.spec.target.node_selector = [("pool".to_string(), "gpu".to_string())].into();
        let w = world(
            vec![Arc::new(d)],
            vec![
                node("a", &[("pool", "gpu")]),
                node("b", &[("pool", "gpu")]),
                node("c", &[("pool", "cpu")]),
                node("down", &[("pool", "gpu")]),
                tainted("t"),
            ],
            &["a", "b", "c", "t"],
        );
        let p = plan(&w);
        let dp = &p.distributions["u1"];
        assert_eq!(dp.targets, ["a", "b"]);
        assert_eq!(dp.agent_down, ["down"]);
        assert_eq!(p.specs["a"].distributions.len(), 1);
        assert_eq!(p.specs["b"].distributions.len(), 1);
        for n in ["c", "down", "t"] {
            assert!(p.specs[n].distributions.is_empty(), "{n}");
        }
        let a = &p.specs["a"].distributions[0];
        assert_eq!(a.content_id, test_content_id("u1"));
        assert_eq!(a.path, "models/model.bin");
        assert_eq!(a.piece_size, 1 << 20);
        assert_eq!(a.peers, ["b"]);
        assert_eq!(
            a.source.http.as_ref().unwrap().url,
            "http://127.0.0.1:8080/model.bin"
        );
        assert_eq!(p.specs["a"].report_interval_seconds, Some(2));
        assert_eq!(p.specs["a"].peers.len(), 1);
        assert_eq!(p.specs["a"].peers[0].node, "b");
        // Both readers before the size is known, ranges 0..0.
        assert_eq!(a.origin_readers.len(), 2);
        assert!(a.origin_readers.iter().all(|r| r.start == 0 && r.end == 0));
    }

    #[test]
    fn readers_get_ranges_once_a_size_is_reported_and_stay_stable() {
        let nodes: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| node(n, &[]))
            .collect();
        let w = world(
            vec![http_dist("d", "u1", 3)],
            nodes.clone(),
            &["a", "b", "c", "d", "e"],
        );
        let first = plan(&w);
        let readers: Vec<String> = first.distributions["u1"]
            .readers
            .iter()
            .map(|r| r.node.clone())
            .collect();
        assert_eq!(readers.len(), 3);

        // Specs written; the first reader reports 10 MiB + 1 byte: 11 pieces.
        let mut fills: BTreeMap<String, NodeFill> = w
            .fills
            .iter()
            .map(|(n, f)| {
                let mut f = (**f).clone();
                f.spec = first.specs[n].clone();
                (n.clone(), f)
            })
            .collect();
        let world_of = |fills: &BTreeMap<String, NodeFill>| {
            World::new(
                w.distributions.clone(),
                nodes.clone(),
                fills.values().cloned().map(Arc::new).collect(),
                now(),
            )
            .with(true, Memory::default())
        };
        // The size is pinned only once every reader reported it.
        for (i, r) in readers.iter().enumerate() {
            assert_eq!(
                plan(&world_of(&fills)).distributions["u1"].size,
                None,
                "{i} reported"
            );
            report(
                fills.get_mut(r).unwrap(),
                "u1",
                NodePhase::Downloading,
                Some((10 << 20) + 1),
                0,
            );
        }
        let second = plan(&world_of(&fills));
        let dp = &second.distributions["u1"];
        assert_eq!(dp.size, Some((10 << 20) + 1));
        let got: Vec<(String, u64, u64)> = dp
            .readers
            .iter()
            .map(|r| (r.node.clone(), r.start, r.end))
            .collect();
        assert_eq!(
            got,
            vec![
                (readers[0].clone(), 0, 4),
                (readers[1].clone(), 4, 8),
                (readers[2].clone(), 8, 11)
            ]
        );
        for (i, r) in readers.iter().enumerate() {
            let a = &second.specs[r].distributions[0];
            assert_eq!(
                a.role.origin_ranges,
                [PieceRange {
                    start: got[i].1,
                    end: got[i].2
                }]
            );
            assert_eq!(a.size, Some((10 << 20) + 1));
        }
        let non_reader = ["a", "b", "c", "d", "e"]
            .into_iter()
            .find(|n| !readers.iter().any(|r| r == n))
            .unwrap();
        assert!(
            second.specs[non_reader].distributions[0]
                .role
                .origin_ranges
                .is_empty()
        );
        assert_eq!(
            second.specs[non_reader].distributions[0].size,
            Some((10 << 20) + 1)
        );
    }

    #[test]
    fn reader_choice_keeps_positions_and_fills_holes() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // (what, targets, previous readers, max, expected: Some(kept) or None (new))
        type Case<'a> = (
            &'a str,
            Vec<String>,
            Vec<String>,
            usize,
            Vec<Option<&'a str>>,
        );
        let cases: Vec<Case> = vec![
            (
                "all kept",
                t(&["a", "b", "c", "d"]),
                t(&["c", "a"]),
                2,
                vec![Some("c"), Some("a")],
            ),
            (
                "hole filled in place",
                t(&["a", "b", "d"]),
                t(&["c", "a"]),
                2,
                vec![None, Some("a")],
            ),
            (
                "fewer targets than max",
                t(&["a"]),
                t(&[]),
                4,
                vec![Some("a")],
            ),
            (
                "max lowered",
                t(&["a", "b", "c"]),
                t(&["c", "b", "a"]),
                2,
                vec![Some("c"), Some("b")],
            ),
            ("no targets", t(&[]), t(&["a"]), 2, vec![]),
        ];
        for (what, targets, previous, max, want) in cases {
            let got = choose_readers("u", &targets, &previous, max, &|_| None);
            assert_eq!(got.len(), want.len(), "{what}: {got:?}");
            for (g, w) in got.iter().zip(&want) {
                if let Some(w) = w {
                    assert_eq!(g, w, "{what}: {got:?}");
                } else {
                    assert!(
                        targets.contains(g) && !previous.contains(g),
                        "{what}: {got:?}"
                    );
                }
            }
            let unique: BTreeSet<_> = got.iter().collect();
            assert_eq!(unique.len(), got.len(), "{what}: duplicates");
        }
    }

    #[test]
    fn readers_are_spread_over_zones() {
        let targets: Vec<String> = (0..30).map(|i| format!("n{i:02}")).collect();
        let zone = |n: &str| {
            let i: usize = n[1..].parse().unwrap_or(0);
            Some(["a", "b", "c"][i % 3].to_string())
        };
        let count = |readers: &[String]| {
            let mut m = BTreeMap::new();
            for r in readers {
                *m.entry(zone(r)).or_insert(0) += 1;
            }
            let mut v: Vec<usize> = m.into_values().collect();
            v.sort();
            v
        };
        for uid in ["u1", "u2", "u3", "u4"] {
            let got = choose_readers(uid, &targets, &[], 4, &zone);
            assert_eq!(count(&got), [1, 1, 2], "{uid}: {got:?}");
            // A kept reader keeps its slot and counts for its zone.
            let previous = vec!["n00".to_string(), "gone".to_string()];
            let again = choose_readers(uid, &targets, &previous, 3, &zone);
            assert_eq!(again[0], "n00");
            assert_eq!(count(&again), [1, 1, 1], "{uid}: {again:?}");
        }
        // Without zones: rendezvous order, as before.
        let plain = choose_readers("u1", &targets, &[], 4, &|_| None);
        let mut by_hash = targets.clone();
        by_hash.sort_by_key(|t| blake3::hash(format!("u1/{t}").as_bytes()).to_hex());
        assert_eq!(plain, by_hash[..4]);
    }

    #[test]
    fn ranges_split_pieces_and_drop_idle_readers() {
        let names = |n: usize| (0..n).map(|i| format!("n{i}")).collect::<Vec<_>>();
        assert!(
            reader_ranges(names(3), None, 1 << 20)
                .iter()
                .all(|r| r.start == 0 && r.end == 0)
        );
        let r = reader_ranges(names(4), Some(2 << 20), 1 << 20);
        assert_eq!(r.len(), 2, "two pieces need only two readers");
        assert_eq!((r[1].start, r[1].end), (1, 2));
        assert!(reader_ranges(names(4), Some(0), 1 << 20).is_empty());
    }

    #[test]
    fn node_source_seeder_is_assigned_but_not_a_target() {
        let mut d = (*http_dist("d", "u2", 4)).clone();
        d.spec.source = Source {
            http: None,
            node: Some(NodeSource {
                node_name: "build".into(),
                path: "out/image.tar".into(),
            }),
        };
        let w = world(
            vec![Arc::new(d)],
            vec![node("build", &[]), node("a", &[]), node("b", &[])],
            &["build", "a", "b"],
        );
        let p = plan(&w);
        let dp = &p.distributions["u2"];
        assert_eq!(dp.targets, ["a", "b"]);
        assert_eq!(dp.seeder.as_deref(), Some("build"));
        assert!(dp.readers.is_empty());
        let seed = &p.specs["build"].distributions[0];
        assert!(seed.role.seed);
        assert_eq!(seed.peers, ["a", "b"]);
        assert_eq!(seed.source.node.as_ref().unwrap().path, "out/image.tar");
        let a = &p.specs["a"].distributions[0];
        assert!(!a.role.seed);
        assert_eq!(a.peers, ["b", "build"]);
    }

    #[test]
    fn deleted_invalid_and_unfinalized_distributions_get_no_work() {
        let mut deleting = (*http_dist("d1", "u1", 1)).clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
        let mut invalid = (*http_dist("d2", "u2", 1)).clone();
        invalid.spec.target.path = "/etc/passwd".into();
        let w = world(
            vec![Arc::new(deleting), Arc::new(invalid)],
            vec![node("a", &[])],
            &["a"],
        );
        let p = plan(&w);
        assert!(p.distributions.is_empty());
        assert!(p.specs["a"].distributions.is_empty());
    }

    /// Sets fields of `node`'s report on `uid` (creating it on the current
    /// version of an unedited [`http_dist`]).
    pub fn edit_report(
        w: &mut World,
        node: &str,
        uid: &str,
        f: impl FnOnce(&mut NodeDistributionStatus),
    ) {
        let mut fill = (*w.fills[node]).clone();
        let exists = fill
            .status
            .as_ref()
            .is_some_and(|s| s.distributions.iter().any(|d| d.uid == uid));
        if !exists {
            report(&mut fill, uid, NodePhase::Downloading, None, 0);
        }
        let status = fill.status.as_mut().expect("status");
        let entry = status
            .distributions
            .iter_mut()
            .find(|d| d.uid == uid)
            .expect("entry");
        f(entry);
        w.fills.insert(node.to_string(), Arc::new(fill));
    }

    fn abcd_world(readers: u32) -> World {
        let nodes = ["a", "b", "c", "d"].map(|n| node(n, &[])).to_vec();
        world(
            vec![http_dist("d", "u", readers)],
            nodes,
            &["a", "b", "c", "d"],
        )
    }

    fn reader_names(w: &World) -> Vec<String> {
        plan_distribution(&w.distributions[0], w)
            .unwrap()
            .readers
            .into_iter()
            .map(|r| r.node)
            .collect()
    }

    #[test]
    fn content_id_changes_with_every_version_edit_only() {
        let base = (*http_dist("d", "u", 2)).clone();
        let id = |d: &Distribution| content_id(d, "u");
        type Edit = Box<dyn Fn(&mut Distribution)>;
        let edits: Vec<(&str, Edit, bool)> = vec![
            (
                "url",
                Box::new(|d| d.spec.source.http.as_mut().unwrap().url = "http://o/v2".into()),
                true,
            ),
            (
                "digest",
                Box::new(|d| {
                    d.spec.source.http.as_mut().unwrap().digest =
                        Some(format!("sha256:{}", "0".repeat(64)))
                }),
                true,
            ),
            (
                "target path",
                Box::new(|d| d.spec.target.path = "models/other.bin".into()),
                true,
            ),
            (
                "piece size",
                Box::new(|d| d.spec.strategy.piece_size = Some(1 << 21)),
                true,
            ),
            (
                "origin revision",
                Box::new(|d| {
                    d.status = Some(peerfill_crds::DistributionStatus {
                        origin_revision: Some(1),
                        ..Default::default()
                    })
                }),
                true,
            ),
            (
                "source kind",
                Box::new(|d| {
                    d.spec.source.http = None;
                    d.spec.source.node = Some(NodeSource {
                        node_name: "b".into(),
                        path: "x".into(),
                    });
                }),
                true,
            ),
            (
                "priority",
                Box::new(|d| d.spec.strategy.priority = 7),
                false,
            ),
            (
                "readers",
                Box::new(|d| d.spec.strategy.max_origin_connections = 9),
                false,
            ),
            (
                "selector",
                Box::new(|d| {
                    d.spec.target.node_selector = [("k".to_string(), "v".to_string())].into()
                }),
                false,
            ),
            (
                "generation",
                Box::new(|d| d.metadata.generation = Some(5)),
                false,
            ),
        ];
        for (what, edit, changes) in edits {
            let mut d = base.clone();
            edit(&mut d);
            assert_eq!(id(&d) != id(&base), changes, "{what}");
        }
        assert_ne!(content_id(&base, "u"), content_id(&base, "u2"), "uid");
    }

    #[test]
    fn size_is_pinned_only_when_every_reader_agrees() {
        let mut w = abcd_world(2);
        let readers = reader_names(&w);
        let outsider = ["a", "b", "c", "d"]
            .into_iter()
            .find(|n| !readers.iter().any(|r| r == n))
            .unwrap();
        let size = |w: &World| plan_distribution(&w.distributions[0], w).unwrap().size;
        let disagreement = |w: &World| {
            plan_distribution(&w.distributions[0], w)
                .unwrap()
                .disagreement
        };
        // A non-authority's size (the forged-size attack) is never used.
        edit_report(&mut w, outsider, "u", |r| r.size = Some(5));
        assert_eq!(size(&w), None);
        // A report on another content id counts as none.
        edit_report(&mut w, &readers[0], "u", |r| {
            r.size = Some(10 << 20);
            r.content_id = Some("old-version".into());
        });
        edit_report(&mut w, &readers[1], "u", |r| r.size = Some(10 << 20));
        assert_eq!(size(&w), None);
        edit_report(&mut w, &readers[0], "u", |r| {
            r.content_id = Some(test_content_id("u"))
        });
        assert_eq!(size(&w), Some(10 << 20));
        assert_eq!(disagreement(&w), None);
        // Readers that disagree pin nothing and say why.
        edit_report(&mut w, &readers[1], "u", |r| r.size = Some(11 << 20));
        assert_eq!(size(&w), None);
        let why = disagreement(&w).unwrap();
        assert!(why.starts_with("size:"), "{why}");
    }

    #[test]
    fn root_and_origin_version_are_pinned_from_the_readers() {
        let mut w = abcd_world(2);
        let readers = reader_names(&w);
        let root = |c: &str| format!("blake3:{}", c.repeat(64));
        for (i, r) in readers.iter().enumerate() {
            edit_report(&mut w, r, "u", |e| {
                e.size = Some(4 << 20);
                e.origin_version = Some(format!("\"v{i}\""));
            });
        }
        let p = plan_distribution(&w.distributions[0], &w).unwrap();
        assert_eq!(p.manifest_digest, None, "no root reported yet");
        // The first reader in reader order pins the origin version.
        assert_eq!(p.origin_version.as_deref(), Some("\"v0\""));
        let plan_all = plan(&w);
        for n in ["a", "b", "c", "d"] {
            let a = &plan_all.specs[n].distributions[0];
            assert_eq!(
                a.source.http.as_ref().unwrap().origin_version.as_deref(),
                Some("\"v0\""),
                "{n}"
            );
        }
        edit_report(&mut w, &readers[0], "u", |e| e.root = Some(root("a")));
        assert_eq!(
            plan_distribution(&w.distributions[0], &w)
                .unwrap()
                .manifest_digest,
            None,
            "one reader is not all"
        );
        edit_report(&mut w, &readers[1], "u", |e| e.root = Some(root("b")));
        let p = plan_distribution(&w.distributions[0], &w).unwrap();
        assert_eq!(p.manifest_digest, None);
        assert!(p.disagreement.unwrap().starts_with("root:"));
        edit_report(&mut w, &readers[1], "u", |e| e.root = Some(root("a")));
        let p = plan_distribution(&w.distributions[0], &w).unwrap();
        assert_eq!(p.manifest_digest, Some(root("a")));
        assert_eq!(
            plan(&w).specs["a"].distributions[0].manifest_digest,
            Some(root("a"))
        );

        // A user's blake3 digest is the root at once; a sha256 one is not.
        for (digest, pinned) in [
            (root("c"), true),
            (format!("sha256:{}", "c".repeat(64)), false),
        ] {
            let mut d = (*http_dist("d", "u", 2)).clone();
            d.spec.source.http.as_mut().unwrap().digest = Some(digest.clone());
            let w = world(vec![Arc::new(d)], vec![node("a", &[])], &["a"]);
            let p = plan_distribution(&w.distributions[0], &w).unwrap();
            assert_eq!(p.manifest_digest.is_some(), pinned, "{digest}");
        }
    }

    #[test]
    fn pins_are_sticky_per_content_id_only() {
        let mut w = abcd_world(1);
        let reader = reader_names(&w)[0].clone();
        edit_report(&mut w, &reader, "u", |e| e.size = Some(3 << 20));
        let first = plan(&w);
        // The specs are written; the reader's report disappears (restart).
        let mut fills = BTreeMap::new();
        for (n, f) in &w.fills {
            let mut f = (**f).clone();
            f.spec = first.specs[n].clone();
            f.status.as_mut().unwrap().distributions.clear();
            fills.insert(n.clone(), Arc::new(f));
        }
        w.fills = fills;
        assert_eq!(plan(&w).distributions["u"].size, Some(3 << 20), "sticky");
        // An edit (new content id) starts with nothing pinned.
        let mut d = (*w.distributions[0]).clone();
        d.spec.source.http.as_mut().unwrap().url = "http://o/v2".into();
        w.distributions[0] = Arc::new(d);
        assert_eq!(plan(&w).distributions["u"].size, None, "new version");
    }

    #[test]
    fn the_chosen_piece_size_is_published_with_the_size_and_kept() {
        let mut w = abcd_world(1);
        let mut d = (*w.distributions[0]).clone();
        d.spec.strategy.piece_size = None;
        let id = content_id(&d, "u");
        w.distributions[0] = Arc::new(d);
        let reader = reader_names(&w)[0].clone();
        let assigned = |w: &World| plan(w).specs[&reader].distributions[0].clone();
        // Left to the size: nothing to publish until the size is pinned.
        assert_eq!(assigned(&w).piece_size, 0);
        edit_report(&mut w, &reader, "u", |e| {
            e.content_id = Some(id.clone());
            e.size = Some(4 << 30);
        });
        let a = assigned(&w);
        assert_eq!(a.piece_size, 1 << 20, "today's rule, published");
        assert_eq!(
            a.role.origin_ranges,
            [PieceRange {
                start: 0,
                end: 4096
            }]
        );
        // An operator from before published the size with `0` (its own
        // rule: 4 MiB pieces); the content keeps that cut.
        let mut fill = (*w.fills[&reader]).clone();
        fill.spec.distributions = vec![Assignment { piece_size: 0, ..a }];
        w.fills.insert(reader.clone(), Arc::new(fill));
        let a = assigned(&w);
        assert_eq!(a.piece_size, 4 << 20);
        assert_eq!(
            a.role.origin_ranges,
            [PieceRange {
                start: 0,
                end: 1024
            }]
        );
    }

    #[test]
    fn an_origin_without_ranges_gets_one_whole_reader_for_its_content_id() {
        let mut w = abcd_world(3);
        let before = reader_names(&w);
        assert_eq!(before.len(), 3);
        assert!(
            !plan_distribution(&w.distributions[0], &w)
                .unwrap()
                .whole_read
        );
        // The second reader's first range came back whole.
        edit_report(&mut w, &before[1], "u", |e| {
            e.phase = NodePhase::Failed;
            e.reason = Some("OriginNoRangeSupport".into());
        });
        let p = plan_distribution(&w.distributions[0], &w).unwrap();
        assert!(p.whole_read);
        assert_eq!(
            reader_names(&w),
            before[..1],
            "the first reader keeps its slot"
        );
        // Once the size is known it reads every piece.
        edit_report(&mut w, &before[0], "u", |e| e.size = Some(5 << 20));
        let first = plan(&w);
        let a = &first.specs[&before[0]].distributions[0];
        assert!(a.source.http.as_ref().unwrap().whole_read);
        assert_eq!(
            (a.origin_readers.len(), a.role.origin_ranges.clone()),
            (1, vec![PieceRange { start: 0, end: 5 }])
        );
        // Sticky: the specs keep it after the failure report is gone (the
        // reader restarted), and a reader replaced for a local fault reads
        // whole too.
        let mut fills = BTreeMap::new();
        for (n, f) in &w.fills {
            let mut f = (**f).clone();
            f.spec = first.specs[n].clone();
            f.status.as_mut().unwrap().distributions.clear();
            fills.insert(n.clone(), Arc::new(f));
        }
        w.fills = fills;
        assert!(
            plan(&w).specs[&before[1]].distributions[0]
                .source
                .http
                .as_ref()
                .unwrap()
                .whole_read
        );
        edit_report(&mut w, &before[0], "u", |e| {
            e.phase = NodePhase::Failed;
            e.reason = Some("InsufficientSpace".into());
        });
        let p = plan_distribution(&w.distributions[0], &w).unwrap();
        assert!(p.whole_read);
        assert_eq!(p.readers.len(), 1);
        assert_ne!(p.readers[0].node, before[0], "replaced");
        // A new version (new content id) tries ranges again.
        let mut d = (*w.distributions[0]).clone();
        d.spec.source.http.as_mut().unwrap().url = "http://o/v2".into();
        w.distributions[0] = Arc::new(d);
        let p = plan_distribution(&w.distributions[0], &w).unwrap();
        assert!(!p.whole_read);
        assert_eq!(p.readers.len(), 3);
    }

    #[test]
    fn zero_byte_content_is_pinned_by_every_chosen_reader() {
        let mut w = abcd_world(2);
        let readers = reader_names(&w);
        let root = format!("blake3:{}", "e".repeat(64));
        for r in &readers {
            edit_report(&mut w, r, "u", |e| {
                e.size = Some(0);
                e.root = Some(root.clone());
            });
        }
        let p = plan_distribution(&w.distributions[0], &w).unwrap();
        assert_eq!((p.size, p.readers.len()), (Some(0), 0));
        assert_eq!(p.manifest_digest, Some(root));
    }

    #[test]
    fn readers_are_replaced_in_place_for_local_faults_and_stalls() {
        use crate::memory::Memory;
        // The memory saw the reports READER_STALL_SECONDS ago (heartbeats
        // stay fresh: the agents are up).
        let earlier = Timestamp::from_second(now().as_second() - READER_STALL_SECONDS).unwrap();
        // (what, reason of readers[0]'s Failed report or None, stalled
        // readers, report interval, replaced?)
        type Case<'a> = (&'a str, Option<&'a str>, &'a [usize], u32, bool);
        let cases: Vec<Case> = vec![
            ("healthy", None, &[], 2, false),
            ("disk full", Some("InsufficientSpace"), &[], 2, true),
            ("storage error", Some("StorageError"), &[], 2, true),
            ("unknown local reason", Some("Weird"), &[], 2, true),
            (
                "origin down for everyone",
                Some("OriginUnreachable"),
                &[],
                2,
                false,
            ),
            ("origin gone", Some("OriginNotFound"), &[], 2, false),
            ("stalled", None, &[0], 2, true),
            ("every reader stalled", None, &[0, 1], 2, true),
            (
                "no news, but reports come every 20 s",
                None,
                &[0],
                20,
                false,
            ),
        ];
        for (what, reason, stalled, interval, replaced) in cases {
            let mut w = abcd_world(2);
            let first = plan(&w);
            let before = reader_names(&w);
            // Specs written, so the previous readers are known.
            let mut fills = BTreeMap::new();
            for (n, f) in &w.fills {
                let mut f = (**f).clone();
                f.spec = first.specs[n].clone();
                f.spec.report_interval_seconds = Some(interval);
                fills.insert(n.clone(), Arc::new(f));
            }
            w.fills = fills;
            for (i, r) in before.iter().enumerate() {
                edit_report(&mut w, r, "u", |e| {
                    e.phase = NodePhase::Downloading;
                    e.bytes_done = 1 << 20;
                    if i == 0
                        && let Some(reason) = reason
                    {
                        e.phase = NodePhase::Failed;
                        e.reason = Some(reason.into());
                    }
                });
            }
            let mut memory = Memory::default();
            memory.observe(&w.fills, earlier);
            // Readers not stalled moved on meanwhile.
            for (i, r) in before.iter().enumerate() {
                if !stalled.contains(&i) {
                    edit_report(&mut w, r, "u", |e| e.bytes_done += 1);
                }
            }
            memory.observe(&w.fills, w.now);
            w.memory = memory;
            let after = reader_names(&w);
            assert_eq!(after.len(), 2, "{what}");
            assert_eq!(
                after[1] != before[1],
                stalled.contains(&1) && replaced,
                "{what}: the other reader keeps its slot unless stalled too"
            );
            assert_eq!(
                after[0] != before[0],
                replaced,
                "{what}: {before:?} -> {after:?}"
            );
        }
    }

    #[test]
    fn private_origins_and_path_conflicts_get_no_work() {
        let mut d = (*http_dist("d", "u", 1)).clone();
        d.spec.source.http.as_mut().unwrap().url = "http://169.254.169.254/latest".into();
        let d = Arc::new(d);
        let w = world(vec![d.clone()], vec![node("a", &[])], &["a"]);
        assert!(plan_distribution(&d, &w).is_ok(), "allowed by the flag");
        let strict = w.clone().with(false, Memory::default());
        match plan_distribution(&d, &strict) {
            Err(NoWork::OriginForbidden(m)) => assert!(m.contains("169.254.169.254"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(plan(&strict).specs["a"].distributions.is_empty());

        let mut older = (*http_dist("old", "u1", 1)).clone();
        let mut newer = (*http_dist("new", "u2", 1)).clone();
        older.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
        newer.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::from_second(now().as_second() + 1).unwrap(),
            ));
        newer.metadata.namespace = Some("other".into());
        let w = world(
            vec![Arc::new(newer.clone()), Arc::new(older)],
            vec![node("a", &[])],
            &["a"],
        );
        match plan_distribution(&newer, &w) {
            Err(NoWork::PathConflict(c)) => assert_eq!(c.owner, "default/old"),
            other => panic!("{other:?}"),
        }
        let p = plan(&w);
        assert_eq!(p.specs["a"].distributions.len(), 1);
        assert_eq!(p.specs["a"].distributions[0].uid, "u1");
    }

    #[test]
    fn identity_is_kept_and_interval_follows_node_count() {
        let nodes: Vec<_> = (0..100).map(|i| node(&format!("n{i}"), &[])).collect();
        let w = world(vec![], nodes, &["n1"]);
        let p = plan(&w);
        assert_eq!(p.specs["n1"].identity, w.fills["n1"].spec.identity);
        // 100 nodes / 20 periodic writes a second (crds `budget`).
        assert_eq!(p.specs["n1"].report_interval_seconds, Some(5));
    }
}
