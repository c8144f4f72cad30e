//! `peerfill-versions`: what a new version of a distribution costs.
//!
//! A Distribution completes on the local cluster; then its source is
//! edited to a new version that differs from the first in a small share of
//! its bytes (`changed` of the size, in `regions` runs of 64 KiB blocks
//! spread over the content and deliberately not aligned to pieces). Each
//! node reuses the pieces of its previous copy that verify against the new
//! version's hashes and fetches the rest, so the bytes a node receives
//! over the network for the new version should be about the pieces the
//! edits touch, not the size.
//!
//! Measured per node, for the new version only (its status entry counts
//! from zero for a new content id): bytes from the origin and from peers,
//! over the size. A hash authority of an HTTP source (an origin reader)
//! must read its whole range from the origin to learn the new hashes, so
//! readers are reported apart; a node source's seeder hashes its file
//! locally. Every node's file is checked against the new digest, and the
//! Node annotation beside the distribution's label must name the new
//! content id.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use peerfill_crds::{Distribution, node_label_key};
use serde::Serialize;

use peerfill_agent::content::Layout;
use peerfill_agent::origin::manifest::PieceManifest;

use crate::cluster::{
    Blob, Cluster, ClusterError, LocalCluster, LocalClusterOptions, generate, generate_edited,
    http_distribution, is_complete, node_source_distribution,
};

mod edits;
mod report;

/// Node holding the node source's files.
const SEEDER: &str = "node-1";

/// Where the new version comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The local HTTP origin (the URL is edited).
    Http,
    /// The same with a piece manifest published next to each version
    /// (`source.http.manifestUrl`, edited with the URL).
    HttpManifest,
    /// A file under the seeder's data root (the path is edited).
    Node,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct VersionsOptions {
    pub nodes: usize,
    pub size: u64,
    /// Share of the bytes the new version changes (0.01 = 1 %).
    pub changed: f64,
    /// Runs of changed blocks.
    pub regions: u64,
    /// `None`: the operator's automatic piece size.
    pub piece_size: Option<u64>,
    pub sources: Vec<SourceKind>,
    /// Limit for each version to complete.
    pub timeout: Duration,
}

pub use edits::{spread_edits, touched_piece_bytes};
pub use report::{NodeBytes, SourceReport, VersionsReport};

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum VersionsError {
    #[error("local cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("API: {0}")]
    Api(#[from] kube::Error),
    #[error("{0}")]
    Check(String),
    #[error("writing the seed file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Starts the local cluster and runs each source kind in turn.
pub async fn run(opts: &VersionsOptions) -> Result<VersionsReport, VersionsError> {
    let local = LocalCluster::start(LocalClusterOptions {
        nodes: opts.nodes,
        wait_ready: Some(Duration::from_secs(120)),
        ..LocalClusterOptions::default()
    })
    .await?;
    let cluster = Cluster::Local(local);
    let mut runs = Vec::new();
    for (i, kind) in opts.sources.iter().enumerate() {
        println!("== {kind:?} source: {} nodes", opts.nodes);
        runs.push(run_one(&cluster, opts, *kind, i as u64).await?);
    }
    Ok(VersionsReport {
        nodes: opts.nodes,
        runs,
    })
}

async fn run_one(
    cluster: &Cluster,
    opts: &VersionsOptions,
    kind: SourceKind,
    n: u64,
) -> Result<SourceReport, VersionsError> {
    let local = cluster
        .local()
        .ok_or_else(|| VersionsError::Check("not a local cluster".into()))?;
    let edits = spread_edits(opts.size, opts.changed, opts.regions);
    let name = format!("versions-{}", n + 1);
    let target = format!("versions/{name}.bin");
    let (mut dist, v2_digest, v2_patch) = match kind {
        SourceKind::Http | SourceKind::HttpManifest => {
            let origin = local.origin();
            let manifests = kind == SourceKind::HttpManifest;
            let (v1, v2, m1, m2) = tokio::task::block_in_place(|| {
                let v1 = origin.add_blob(&format!("{name}-v1.bin"), opts.size, 100 + n);
                let v2 = origin.add_edited_blob(&format!("{name}-v2.bin"), &v1, edits.clone());
                // Each version's manifest, as `peerfill-agent manifest`
                // would write it for the operator's piece size.
                let manifest = |b: &Blob| -> Result<Option<String>, VersionsError> {
                    if !manifests {
                        return Ok(None);
                    }
                    let layout = Layout::for_content(b.size, opts.piece_size.unwrap_or(0) as u32)
                        .map_err(|e| VersionsError::Check(e.to_string()))?;
                    let bytes = generate_edited(b.seed, &b.edits, 0, b.size);
                    let json = serde_json::to_vec(&PieceManifest::of(&layout, &bytes))
                        .map_err(|e| VersionsError::Check(e.to_string()))?;
                    let name = format!("{}.manifest", b.path.trim_start_matches("/blobs/"));
                    Ok(Some(origin.add_static(&name, json).url))
                };
                Ok::<_, VersionsError>((v1.clone(), v2.clone(), manifest(&v1)?, manifest(&v2)?))
            })?;
            let mut d = http_distribution(&name, &v1.url, &target);
            if let Some(h) = d.spec.source.http.as_mut() {
                h.digest = Some(v1.blake3.clone());
                h.manifest_url = m1;
            }
            let patch = serde_json::json!({"spec": {"source": {"http": {
                "url": v2.url, "digest": v2.blake3, "manifestUrl": m2 }}}});
            (d, v2.blake3, patch)
        }
        SourceKind::Node => {
            let dir = local.node_data_dir(SEEDER)?.join("versions-seed");
            let (p1, p2) = (
                dir.join(format!("{name}-v1.bin")),
                dir.join(format!("{name}-v2.bin")),
            );
            let io = |path: &PathBuf| {
                let path = path.clone();
                move |source| VersionsError::Io { path, source }
            };
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let seed = 100 + n;
            let v2 = tokio::task::block_in_place(|| -> Result<String, VersionsError> {
                std::fs::write(&p1, generate(seed, 0, opts.size)).map_err(io(&p1))?;
                let bytes = generate_edited(seed, &edits, 0, opts.size);
                std::fs::write(&p2, &bytes).map_err(io(&p2))?;
                Ok(format!("blake3:{}", blake3::hash(&bytes).to_hex()))
            })?;
            let rel = |f: &str| format!("versions-seed/{f}");
            let d =
                node_source_distribution(&name, SEEDER, &rel(&format!("{name}-v1.bin")), &target);
            let patch = serde_json::json!({"spec": {"source": {"node": {
                "path": rel(&format!("{name}-v2.bin")) }}}});
            (d, v2, patch)
        }
    };
    dist.spec.strategy.piece_size = opts.piece_size;

    let started = Instant::now();
    let applied = cluster.apply_distribution(&dist).await?;
    let first = wait_version(cluster, &applied, None, opts.timeout).await?;
    let first_secs = started.elapsed().as_secs_f64();
    let first_id = content_id(&first)?;
    println!("   first version complete in {first_secs:.1} s ({first_id})");

    let served_before = local.origin().served().bytes;
    let api: Api<Distribution> = Api::namespaced(cluster.client(), "default");
    let started = Instant::now();
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&v2_patch))
        .await?;
    let done = wait_version(cluster, &applied, Some(&first_id), opts.timeout).await?;
    let new_secs = started.elapsed().as_secs_f64();
    let new_id = content_id(&done)?;
    let origin_served = local.origin().served().bytes - served_before;
    println!("   new version complete in {new_secs:.1} s ({new_id})");

    let fills = cluster
        .wait_nodefills(Duration::from_secs(5), "the NodeFills", |_| true)
        .await?;
    let assignment = fills
        .iter()
        .flat_map(|f| f.spec.distributions.iter())
        .find(|a| a.content_id == new_id)
        .ok_or_else(|| VersionsError::Check(format!("no NodeFill assigns {new_id}")))?;
    let readers: Vec<String> = assignment
        .origin_readers
        .iter()
        .map(|r| r.node.clone())
        .collect();
    let piece_size = assignment
        .effective_piece_size()
        .ok_or_else(|| VersionsError::Check(format!("no size pinned for {new_id}")))?
        .max(1);
    // The seeder of a node source is not a target: it holds the source.
    let seeders: Vec<String> = fills
        .iter()
        .filter(|f| {
            f.spec
                .distributions
                .iter()
                .any(|a| a.content_id == new_id && a.role.seed)
        })
        .filter_map(|f| f.metadata.name.clone())
        .collect();
    let mut progress = cluster.node_progress(&done).await?;
    progress.retain(|node, _| !seeders.contains(node));
    check_nodes(cluster, &done, &progress, &new_id, &v2_digest).await?;

    let size = opts.size as f64;
    let nodes: Vec<NodeBytes> = progress
        .iter()
        .map(|(node, p)| NodeBytes {
            node: node.clone(),
            reader: readers.contains(node),
            from_origin: p.bytes_from_origin,
            from_peers: p.bytes_from_peers,
            network_share: (p.bytes_from_origin + p.bytes_from_peers) as f64 / size,
        })
        .collect();
    let max = |f: &dyn Fn(&&NodeBytes) -> bool| {
        nodes
            .iter()
            .filter(f)
            .map(|b| b.network_share)
            .fold(0.0, f64::max)
    };
    let touched = touched_piece_bytes(opts.size, piece_size, &edits);
    let report = SourceReport {
        source: kind,
        size: opts.size,
        piece_size,
        changed_bytes: edits.bytes(opts.size),
        changed_share: edits.bytes(opts.size) as f64 / size,
        touched_piece_bytes: touched,
        touched_share: touched as f64 / size,
        first_version_secs: first_secs,
        new_version_secs: new_secs,
        origin_served_new_version: origin_served,
        max_share_non_reader: max(&|b| !b.reader),
        max_share: max(&|_| true),
        nodes,
    };
    cluster.delete_distribution(&done).await?;
    cluster
        .wait_distribution_gone(&done, Duration::from_secs(60))
        .await?;
    Ok(report)
}

fn content_id(d: &Distribution) -> Result<String, VersionsError> {
    d.status
        .as_ref()
        .and_then(|s| s.content_id.clone())
        .ok_or_else(|| VersionsError::Check("a Complete Distribution without contentId".into()))
}

/// Waits until `d` is Complete on every target with a content id other
/// than `previous`.
async fn wait_version(
    cluster: &Cluster,
    d: &Distribution,
    previous: Option<&str>,
    timeout: Duration,
) -> Result<Distribution, VersionsError> {
    let what = if previous.is_some() {
        "the new version Complete"
    } else {
        "the first version Complete"
    };
    Ok(cluster
        .wait_distribution(d, timeout, what, |d| {
            let s = d.status.clone().unwrap_or_default();
            is_complete(d)
                && s.content_id.is_some()
                && s.content_id.as_deref() != previous
                && s.desired_nodes.is_some_and(|n| n > 0)
                && s.complete_nodes == s.desired_nodes
        })
        .await?)
}

/// Every target holds the new bytes, and its Node annotation names the new
/// version.
async fn check_nodes(
    cluster: &Cluster,
    d: &Distribution,
    progress: &BTreeMap<String, peerfill_crds::NodeDistributionStatus>,
    id: &str,
    digest: &str,
) -> Result<(), VersionsError> {
    let nodes: Api<Node> = Api::all(cluster.client());
    let key = node_label_key("default", d.metadata.name.as_deref().unwrap_or_default());
    for node in progress.keys() {
        cluster.check_content(node, d, digest).await?;
        let n = nodes.get(node).await?;
        let held = n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(&key))
            .map(String::as_str);
        if held != Some(id) {
            return Err(VersionsError::Check(format!(
                "{node}: annotation {key} is {held:?}, want {id}"
            )));
        }
    }
    Ok(())
}
