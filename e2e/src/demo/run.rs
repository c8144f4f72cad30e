//! The demo's steps: build, start the local cluster, apply, watch, verify,
//! summarise. Every resource it starts is owned by a value whose drop
//! stops it (the cluster kills its children, the build kills cargo's
//! process group, [`WorkDir`] removes the work dir), so dropping the
//! [`run`] future — on Ctrl-C or an error — leaves nothing behind.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::ListParams;
use peerfill_crds::{Distribution, NodeFill};

use super::artifact::digest_file;
use super::baseline;
use super::build::{BuildError, BuildPlan};
use super::manifest::{ManifestError, demo_distribution};
use super::progress::{Display, Snapshot};
use super::summary::{NodeFigures, RunFigures};
use super::units::{bytes, mib_per_s};
use crate::cluster::{
    Blob, Cluster, ClusterError, LocalCluster, LocalClusterOptions, Origin, is_complete, is_failed,
};

/// Namespace of the demo's Distribution.
const NAMESPACE: &str = "default";
/// How often the origin's byte counter is sampled (its busy time is
/// measured to this resolution).
const ORIGIN_TICK: Duration = Duration::from_millis(100);
/// How often the Distribution and the NodeFills are read.
const API_EVERY_TICKS: u32 = 2;
/// Interval of the plain progress lines when stdout is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(3);

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Nodes (agents).
    pub nodes: usize,
    /// Artifact size in bytes.
    pub size: u64,
    /// Piece size; `None` keeps the example's.
    pub piece_size: Option<u64>,
    /// Work dir; `None`: a new one under the temp dir.
    pub work_dir: Option<PathBuf>,
    /// Keep the work dir (data, logs, kubeconfig) afterwards.
    pub keep: bool,
    /// Build the operator and agent binaries first.
    pub build: bool,
    /// Limit for the agents to come up.
    pub ready_timeout: Duration,
    /// Limit for the Distribution to complete.
    pub timeout: Duration,
    /// Force plain progress lines even on a terminal.
    pub plain: bool,
    /// The origin's total rate cap, bytes per second (`None`: as fast as
    /// the CPU serves loopback).
    pub origin_rate: Option<u64>,
    /// After the swarm, time N plain HTTP clients against the same origin.
    pub measure_baseline: bool,
    /// Start Prometheus (when installed) scraping the cluster.
    pub prometheus: bool,
    /// Draw the dashboard's main panels from Prometheus into this PNG.
    pub dashboard_png: Option<PathBuf>,
}

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The binaries could not be built.
    #[error("building the binaries: {0}")]
    Build(#[from] BuildError),
    /// The local cluster failed.
    #[error("local cluster: {0}")]
    Cluster(#[from] ClusterError),
    /// The example could not be used.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// An API call failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was asked.
        what: String,
        /// The client's error.
        source: kube::Error,
    },
    /// The work dir cannot be used.
    #[error("work dir {path}: {detail}")]
    WorkDir {
        /// The dir.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The Distribution failed.
    #[error("the Distribution failed: {0}")]
    Failed(String),
    /// The Distribution did not complete in time.
    #[error("the Distribution was not Complete after {0:.0?}")]
    Timeout(Duration),
    /// A node's file could not be read.
    #[error("verifying {path}: {source}")]
    Verify {
        /// The file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The baseline clients failed.
    #[error("baseline: {0}")]
    Baseline(#[from] super::baseline::BaselineError),
    /// Prometheus failed.
    #[error("prometheus: {0}")]
    Prometheus(#[from] crate::prom::PromError),
    /// The dashboard PNG could not be drawn.
    #[error("dashboard PNG: {0}")]
    Plot(#[from] crate::prom::plot::PlotError),
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Kube { what, source }
}

/// The demo's work dir: removed when dropped, unless kept. Only a dir that
/// did not exist or was empty is accepted, so nothing of the user's is ever
/// removed.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    /// `path`, or a new name under the temp dir. The dir itself is created
    /// by the cluster.
    pub fn new(path: Option<PathBuf>, keep: bool) -> Result<WorkDir, DemoError> {
        let path = match path {
            Some(p) => std::path::absolute(&p).unwrap_or(p),
            None => std::env::temp_dir().join(format!(
                "peerfill-demo-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            )),
        };
        let fail = |detail: String| DemoError::WorkDir {
            path: path.clone(),
            detail,
        };
        match std::fs::read_dir(&path) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(fail(
                        "exists and is not empty; give a new or empty dir".into(),
                    ));
                }
                // Empty: let the cluster create it again, so it counts as ours.
                std::fs::remove_dir(&path).map_err(|e| fail(e.to_string()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e.to_string())),
        }
        Ok(WorkDir { path, keep })
    }

    /// The dir.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it stays afterwards.
    pub fn keep(&self) -> bool {
        self.keep
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("removing {}: {e}", self.path.display()),
        }
    }
}

/// Runs the demo in `work` and returns the measured figures (already
/// printed).
pub async fn run(opts: &DemoOptions, work: &WorkDir) -> Result<RunFigures, DemoError> {
    if opts.nodes == 0 {
        return Err(DemoError::Usage("--nodes must be at least 1".into()));
    }
    if opts.size == 0 {
        return Err(DemoError::Usage("--size must be more than 0".into()));
    }
    println!(
        "peerfill demo: {} nodes, a {} artifact from one HTTP origin, {} pieces",
        opts.nodes,
        bytes(opts.size),
        opts.piece_size.map_or("the example's".to_owned(), bytes)
    );

    // 1. The binaries the cluster runs.
    if opts.build {
        let plan = BuildPlan::current()?;
        println!(
            "\n[1/5] Building the operator and agent binaries (and the other workspace binaries): {}",
            plan.command_line()
        );
        plan.run().await?;
    } else {
        println!("\n[1/5] Using the operator and agent binaries next to this one (--no-build)");
    }

    // 2. The cluster.
    println!(
        "\n[2/5] Starting the local cluster in {}",
        work.path().display()
    );
    let started = Instant::now();
    // The local cluster whatever E2E_KUBECONFIG says: the demo needs the
    // nodes' disks and the origin's counters.
    let cluster = Cluster::Local(
        LocalCluster::start(LocalClusterOptions {
            nodes: opts.nodes,
            work_dir: Some(work.path().to_owned()),
            keep_work_dir: work.keep(),
            wait_ready: None,
            ..LocalClusterOptions::default()
        })
        .await?,
    );
    let local = cluster
        .local()
        .ok_or_else(|| DemoError::Usage("not a local cluster".into()))?;
    let nodes = node_order(local);
    let first = local.nodes().get(nodes.first().map_or("", String::as_str));
    let last = local.nodes().get(nodes.last().map_or("", String::as_str));
    println!(
        "      API stand-in {}, 1 operator, {} agents ({} .. {} on {} .. {}), data under {}/nodes/<node>/data",
        local.api_server().url(),
        nodes.len(),
        first.map_or("-", |n| n.name.as_str()),
        last.map_or("-", |n| n.name.as_str()),
        first.map_or("-".to_owned(), |n| n.ip.to_string()),
        last.map_or("-".to_owned(), |n| n.ip.to_string()),
        work.path().display()
    );
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    println!("      Watch it from another terminal:");
    println!("        kubectl --kubeconfig {kubeconfig} get dist -w");
    println!("        kubectl --kubeconfig {kubeconfig} get nf");
    let seed = rand::random::<u64>();
    let blob = tokio::task::block_in_place(|| {
        local
            .origin()
            .add_blob("model.safetensors", opts.size, seed)
    });
    local.origin().set_rate_limit(opts.origin_rate);
    println!(
        "      HTTP origin {} serves {} of random bytes ({}), {}",
        blob.url,
        bytes(blob.size),
        blob.blake3,
        opts.origin_rate
            .map_or("uncapped (--origin-rate 0)".to_owned(), |r| format!(
                "capped at {} in total, like a WAN link or an object store (--origin-rate)",
                mib_per_s(r as f64)
            ))
    );
    let prometheus = if opts.prometheus || opts.dashboard_png.is_some() {
        start_prometheus(local, work, opts.dashboard_png.is_some()).await?
    } else {
        None
    };

    // 3. Agents up: each got its certificate from the operator's CA.
    println!("\n[3/5] Waiting for the operator and the agents (certificates from the cluster CA)");
    local.wait_ready(opts.ready_timeout).await?;
    println!(
        "      {} agents up, {:.1} s after start",
        nodes.len(),
        started.elapsed().as_secs_f64()
    );

    // 4. Apply and watch.
    let dist = demo_distribution(&blob.url, &blob.blake3, NAMESPACE, opts.piece_size)?;
    let name = dist.metadata.name.clone().unwrap_or_default();
    println!(
        "\n[4/5] kubectl apply -f examples/http.yaml (url: the local origin, digest: {}, no headersFrom) -> {NAMESPACE}/{name}",
        short_digest(&blob.blake3)
    );
    let applied_at = Instant::now();
    let applied = cluster.apply_distribution(&dist).await?;
    let uid = applied.metadata.uid.clone().unwrap_or_default();
    let terminal = std::io::stdout().is_terminal() && !opts.plain;
    let mut display = Display::new(&name, &nodes, blob.size, terminal, PLAIN_EVERY);
    let watched = watch(
        local,
        &blob,
        &name,
        &uid,
        &nodes,
        &mut display,
        applied_at,
        opts.timeout,
    )
    .await;
    let watched = match watched {
        Ok(w) => w,
        Err(e) => {
            display.println(&format!(
                "--- last lines of the process logs:\n{}",
                local.log_tails(15)
            ));
            return Err(e);
        }
    };

    // 5. Check every node's file ourselves.
    println!("\n[5/5] Hashing every node's file (BLAKE3) against the origin's digest");
    let swarm_end = crate::prom::now();
    if let (Some(p), Some(png)) = (&prometheus, &opts.dashboard_png) {
        // The window: from just before the apply to a few scrapes after
        // Complete (the rate window must cover the end).
        tokio::time::sleep(Duration::from_secs(6)).await;
        let start = swarm_end - watched.wall.as_secs_f64() - 3.0;
        crate::prom::plot::dashboard_png(p, start, swarm_end + 5.0, png).await?;
        println!(
            "\n[dashboard] drew the main panels from Prometheus into {}",
            png.display()
        );
    }
    let mut figures = verify(local, &applied, &blob, &watched).await?;
    figures.origin_cap = opts.origin_rate;
    if opts.measure_baseline {
        println!(
            "\n[baseline] {} plain HTTP clients download the artifact from the same origin at once",
            nodes.len()
        );
        let b = baseline::measure(&blob.url, nodes.len(), blob.size, &blob.blake3).await?;
        println!(
            "      all {} bodies verified, {:.1} s from the first request to the last byte",
            b.clients,
            b.wall.as_secs_f64()
        );
        figures.baseline = Some(b);
    }
    for line in figures.render() {
        println!("{line}");
    }
    if figures.nodes.iter().any(|n| !n.verified) {
        return Err(DemoError::Failed(
            "a node's file does not match the origin's digest".into(),
        ));
    }
    if let Some(p) = &prometheus
        && std::io::stdout().is_terminal()
    {
        println!(
            "\nPrometheus stays up at {} with the cluster; Ctrl-C stops everything.",
            p.url()
        );
        std::future::pending::<()>().await;
    }
    Ok(figures)
}

/// Starts Prometheus on the cluster's endpoints and prints where to look;
/// `None` (with a note) when it is not installed, unless `required`.
async fn start_prometheus(
    local: &LocalCluster,
    work: &WorkDir,
    required: bool,
) -> Result<Option<crate::prom::Prometheus>, DemoError> {
    let binary = match crate::prom::find_binary() {
        Ok(b) => b,
        Err(e) if !required => {
            println!("      --prometheus: {e}; going on without it");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let targets = crate::prom::cluster_targets(local);
    let p = crate::prom::Prometheus::start(&binary, &work.path().join("prometheus"), &targets, &[])
        .await?;
    println!(
        "      Prometheus {} scrapes the operator and {} agents every second; try:",
        p.url(),
        targets.len().saturating_sub(1)
    );
    for q in [
        "sum(rate(peerfill_agent_received_bytes_total[5s]))",
        "sum by (source) (rate(peerfill_agent_received_bytes_total[5s]))",
        "avg by (content) (peerfill_agent_content_progress_ratio)",
        "peerfill_operator_distribution_nodes",
    ] {
        let enc: String = form_urlencoded::byte_serialize(q.as_bytes()).collect();
        println!("        curl -s '{}/api/v1/query?query={enc}'", p.url());
    }
    Ok(Some(p))
}

/// Node names in numeric order (`node-2` before `node-10`).
fn node_order(cluster: &LocalCluster) -> Vec<String> {
    let mut nodes: Vec<String> = cluster.nodes().keys().cloned().collect();
    nodes.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    nodes
}

/// `blake3:1a2b3c4d…`.
fn short_digest(d: &str) -> String {
    match d.split_once(':') {
        Some((algo, hex)) if hex.len() > 16 => format!("{algo}:{}…", &hex[..16]),
        _ => d.to_owned(),
    }
}

/// The origin's counter over time: when it first and last moved.
struct OriginClock {
    last_bytes: u64,
    first_move: Option<Instant>,
    last_move: Option<Instant>,
}

impl OriginClock {
    fn new(bytes: u64) -> Self {
        OriginClock {
            last_bytes: bytes,
            first_move: None,
            last_move: None,
        }
    }

    fn sample(&mut self, bytes: u64, now: Instant) {
        if bytes > self.last_bytes {
            // The bytes counted now were sent during the last tick.
            self.first_move.get_or_insert(now - ORIGIN_TICK);
            self.last_move = Some(now);
            self.last_bytes = bytes;
        }
    }

    fn busy(&self) -> Duration {
        match (self.first_move, self.last_move) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        }
    }
}

/// The outcome of the watch.
struct Watched {
    wall: Duration,
    origin_busy: Duration,
    last: Snapshot,
}

/// Shows progress until the Distribution is Complete (or Failed, or the
/// timeout passes).
#[allow(clippy::too_many_arguments)]
async fn watch(
    cluster: &LocalCluster,
    blob: &Blob,
    name: &str,
    uid: &str,
    nodes: &[String],
    display: &mut Display,
    applied_at: Instant,
    timeout: Duration,
) -> Result<Watched, DemoError> {
    let dists: Api<Distribution> = Api::namespaced(cluster.client(), NAMESPACE);
    let fills: Api<NodeFill> = Api::all(cluster.client());
    let origin: &Origin = cluster.origin();
    let mut clock = OriginClock::new(origin.served_of(blob).bytes);
    let mut tick = tokio::time::interval(ORIGIN_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    loop {
        tick.tick().await;
        let now = Instant::now();
        clock.sample(origin.served_of(blob).bytes, now);
        n = n.wrapping_add(1);
        if !n.is_multiple_of(API_EVERY_TICKS) {
            continue;
        }
        let dist = dists
            .get_opt(name)
            .await
            .map_err(kube_err(format!("reading Distribution {name}")))?;
        let list = fills
            .list(&ListParams::default())
            .await
            .map_err(kube_err("listing NodeFills"))?;
        let snap = Snapshot::from_objects(dist.as_ref(), uid, nodes, &list.items);
        display.update(&snap);
        let Some(dist) = dist else {
            return Err(DemoError::Failed(format!("Distribution {name} vanished")));
        };
        if is_complete(&dist) {
            let wall = now.duration_since(applied_at);
            // The counter may still move by the last tick's bytes.
            clock.sample(origin.served_of(blob).bytes, Instant::now());
            display.finish(&snap);
            return Ok(Watched {
                wall,
                origin_busy: clock.busy(),
                last: snap,
            });
        }
        if is_failed(&dist) {
            display.finish(&snap);
            let status = dist.status.unwrap_or_default();
            let nodes: Vec<String> = status
                .failing_nodes
                .iter()
                .map(|f| format!("{}: {} {}", f.node, f.reason, f.message))
                .collect();
            return Err(DemoError::Failed(format!(
                "{}{}",
                snap.distribution.message.unwrap_or_default(),
                if nodes.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", nodes.join("; "))
                }
            )));
        }
        if now.duration_since(applied_at) > timeout {
            display.finish(&snap);
            return Err(DemoError::Timeout(timeout));
        }
    }
}

/// Hashes every node's file and assembles the run's figures.
async fn verify(
    cluster: &LocalCluster,
    dist: &Distribution,
    blob: &Blob,
    watched: &Watched,
) -> Result<RunFigures, DemoError> {
    let mut jobs = Vec::new();
    for node in &watched.last.nodes {
        let path = cluster
            .node_data_dir(&node.node)?
            .join(&dist.spec.target.path);
        let p = path.clone();
        jobs.push((
            node,
            path,
            tokio::task::spawn_blocking(move || digest_file(&p)),
        ));
    }
    let mut figures = Vec::new();
    for (node, path, job) in jobs {
        let digest = job
            .await
            .map_err(|e| DemoError::Verify {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| DemoError::Verify {
                path: path.clone(),
                source,
            })?;
        figures.push(NodeFigures {
            node: node.node.clone(),
            from_origin: node.from_origin,
            from_peers: node.from_peers,
            path,
            verified: digest == blob.blake3,
        });
    }
    Ok(RunFigures {
        size: blob.size,
        wall: watched.wall,
        origin_served: cluster.origin().served_of(blob).bytes,
        origin_busy: watched.origin_busy,
        digest: blob.blake3.clone(),
        nodes: figures,
        origin_cap: None,
        baseline: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_dir_refuses_a_non_empty_dir_and_removes_its_own() {
        let base = tempfile::tempdir().expect("tempdir");
        let full = base.path().join("full");
        std::fs::create_dir(&full).expect("mkdir");
        std::fs::write(full.join("keep-me"), b"x").expect("write");
        assert!(WorkDir::new(Some(full.clone()), false).is_err());
        assert!(full.join("keep-me").exists());

        let empty = base.path().join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        let w = WorkDir::new(Some(empty.clone()), false).expect("empty dir accepted");
        std::fs::create_dir_all(empty.join("nodes/node-1")).expect("fill");
        drop(w);
        assert!(!empty.exists());

        let kept = base.path().join("kept");
        let w = WorkDir::new(Some(kept.clone()), true).expect("new dir");
        std::fs::create_dir_all(&kept).expect("mkdir");
        drop(w);
        assert!(kept.exists());

        let default = WorkDir::new(None, false).expect("default");
        assert!(default.path().starts_with(std::env::temp_dir()));
        assert!(!default.path().exists());
    }

    #[test]
    fn origin_clock_measures_first_to_last_movement() {
        let t0 = Instant::now();
        let mut c = OriginClock::new(10);
        c.sample(10, t0 + Duration::from_secs(1));
        assert_eq!(c.busy(), Duration::ZERO);
        c.sample(20, t0 + Duration::from_secs(2));
        c.sample(30, t0 + Duration::from_secs(3));
        c.sample(30, t0 + Duration::from_secs(9));
        assert_eq!(c.busy(), Duration::from_secs(1) + ORIGIN_TICK);
    }

    #[test]
    fn digests_are_shortened_for_display() {
        assert_eq!(
            short_digest(&format!("blake3:{}", "ab".repeat(32))),
            "blake3:abababababababab…"
        );
        assert_eq!(short_digest("x"), "x");
    }
}
