//! Issue #11's chaos suite: the real API stand-in, operator, agents and
//! kubectl on the local cluster, an origin that misbehaves on purpose, and
//! faults injected while content moves. Every scenario ends with every
//! target holding verified content of the right version (the files on the
//! nodes' data dirs are hashed and compared with the origin's versions) or
//! the Distribution `Failed` with a reason that names the cause — never
//! Complete with other bytes, never stuck (every wait is bounded and prints
//! the Distribution, the NodeFills and the process logs on timeout).
//!
//! One cluster is shared: each scenario runs on its own group of nodes
//! (label [`GROUP_LABEL`]) with its own origin, so the scenarios run
//! concurrently and the whole suite fits in a few minutes on two cores.
//! Scenarios that only disturb the origin or the API share the `calm`
//! group; the ones that stop, kill or starve agents have their own.
//!
//! `PEERFILL_CHAOS_ONLY=a,d` runs a subset (letters as in the issue).
//! Needs the binaries: `cargo build --workspace --bins`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use common::cluster::{MIB, counts, start};
use common::kubectl::Kubectl;
use k8s_openapi::api::core::v1::{
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
};
use kube::ResourceExt;
use peerfill_crds::{
    CONDITION_FAILED, CONDITION_PROGRESSING, Distribution, NodeDistributionStatus, NodeFill,
    NodePhase, Phase, node_label_key,
};
use peerfill_e2e::cluster::{
    AgentSignal, Blob, Cluster, HOSTNAME_LABEL, LocalCluster, NodeOptions, Origin, Outage,
    Validators, generate, http_distribution, is_complete, node_source_distribution, progress_in,
};

/// Label naming a node's scenario group.
const GROUP_LABEL: &str = "peerfill-e2e/chaos";
/// Content size of most scenarios (1 MiB pieces).
const SIZE: u64 = 16 * MIB;
/// Bound of a wait for a Distribution to finish after the fault ended.
const SETTLE: Duration = Duration::from_secs(90);
/// Bound of one whole scenario.
const SCENARIO: Duration = Duration::from_secs(270);
/// Test-only fault switches of the agent (honoured only with
/// `PEERFILL_ALLOW_FAULTS=1`): a file holding the bytes the store may use.
const ALLOW_FAULTS_ENV: &str = "PEERFILL_ALLOW_FAULTS";
const DISK_CAP_ENV: &str = "PEERFILL_FAULT_DISK_CAP_FILE";

/// Node groups in node order: `node-1..4` pause, `node-5..8` killreader, ...
const GROUPS: &[(&str, usize)] = &[
    ("pause", 4),
    ("killreader", 4),
    ("crash", 6),
    ("disk", 3),
    ("calm", 4),
    ("forger", 1),
];

struct Ctx {
    cluster: Cluster,
    groups: BTreeMap<&'static str, Vec<String>>,
    /// The node of group `disk` whose agent runs with the disk-cap fault.
    disk_node: String,
    disk_cap_file: PathBuf,
    /// Directories "outside" every data root (symlink targets).
    outside: tempfile::TempDir,
    kubectl: Kubectl,
}

impl Ctx {
    fn local(&self) -> &LocalCluster {
        self.cluster
            .local()
            .expect("the chaos suite runs on the local cluster")
    }

    fn group(&self, g: &str) -> Vec<String> {
        self.groups.get(g).cloned().unwrap_or_default()
    }
}

type ScenarioFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// All scenarios of issue 11's must-have 7, concurrently on one cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_suite() -> anyhow::Result<()> {
    let only: Option<BTreeSet<String>> = std::env::var("PEERFILL_CHAOS_ONLY")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let outside = tempfile::Builder::new()
        .prefix("peerfill-chaos-outside-")
        .tempdir()?;
    let disk_cap_file = outside.path().join("disk-cap");
    // The starved node's disk holds 4 MiB from the start; (f) raises it.
    std::fs::write(&disk_cap_file, (4 * MIB).to_string())?;
    let mut groups: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut node_options = BTreeMap::new();
    let mut index = 1;
    for (g, n) in GROUPS {
        for _ in 0..*n {
            let name = format!("node-{index}");
            index += 1;
            let mut opts = NodeOptions::default().label(GROUP_LABEL, g);
            if *g == "disk" && groups.get(g).is_none_or(Vec::is_empty) {
                opts = opts.env(ALLOW_FAULTS_ENV, "1").env(
                    DISK_CAP_ENV,
                    disk_cap_file.to_str().context("utf-8 temp path")?,
                );
            }
            node_options.insert(name.clone(), opts);
            groups.entry(g).or_default().push(name);
        }
    }
    let total = index - 1;
    let t0 = Instant::now();
    let cluster = start(total, |o| {
        o.node_options = node_options;
        o.wait_ready = Some(Duration::from_secs(120));
    })
    .await?;
    if !cluster.is_local() {
        println!(
            "SKIP (real cluster): the chaos suite stops agents, fills disks and plants symlinks on the nodes"
        );
        return Ok(());
    }
    let kubectl = Kubectl::with_kubeconfig(cluster.kubeconfig_path())?;
    let disk_node = groups["disk"][0].clone();
    let ctx = Arc::new(Ctx {
        cluster,
        groups,
        disk_node,
        disk_cap_file,
        outside,
        kubectl,
    });

    let all: Vec<(&str, &str, ScenarioFuture<'_>)> = vec![
        (
            "a",
            "origin reader paused 60 s",
            Box::pin(reader_paused(&ctx)),
        ),
        (
            "b",
            "origin reader killed for good",
            Box::pin(reader_killed(&ctx)),
        ),
        (
            "c",
            "30% of agents killed mid-transfer",
            Box::pin(agents_crash(&ctx)),
        ),
        ("d", "origin down 30 s", Box::pin(origin_down(&ctx))),
        (
            "e",
            "origin content changed mid-transfer",
            Box::pin(origin_changed(&ctx)),
        ),
        (
            "f",
            "origin reader with a full disk",
            Box::pin(full_disk(&ctx)),
        ),
        (
            "g",
            "two Distributions on one path",
            Box::pin(path_conflict(&ctx)),
        ),
        (
            "h",
            "URL edited mid-transfer and after Complete",
            Box::pin(url_edited(&ctx)),
        ),
        (
            "i",
            "forged size from a non-target node",
            Box::pin(forged_size(&ctx)),
        ),
        ("j", "symlink escapes", Box::pin(symlink_escapes(&ctx))),
    ];
    let runs = all
        .into_iter()
        .filter(|(id, _, _)| only.as_ref().is_none_or(|o| o.contains(*id)))
        .map(|(id, what, fut)| async move {
            let t = Instant::now();
            let r = match tokio::time::timeout(SCENARIO, fut).await {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("scenario not finished after {SCENARIO:?}")),
            };
            let secs = t.elapsed().as_secs_f64();
            match &r {
                Ok(()) => println!("CHAOS ({id}) {what}: PASS in {secs:.0}s"),
                Err(e) => println!("CHAOS ({id}) {what}: FAIL after {secs:.0}s: {e:#}"),
            }
            (id, what, r)
        });
    let results = futures::future::join_all(runs).await;
    println!("chaos suite: {:.0}s in all", t0.elapsed().as_secs_f64());
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(id, what, r)| r.as_ref().err().map(|e| format!("({id}) {what}: {e:#}")))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} scenarios failed:\n{}",
            failed.len(),
            results.len(),
            failed.join("\n\n")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- helpers

/// An HTTP Distribution to the nodes of `group`, 1 MiB pieces.
fn group_dist(
    ns: &str,
    name: &str,
    group: &str,
    blob: &Blob,
    path: &str,
    digest: Option<&str>,
    readers: u32,
) -> Distribution {
    let mut d = http_distribution(name, &blob.url, path);
    d.metadata.namespace = Some(ns.to_string());
    d.spec
        .target
        .node_selector
        .insert(GROUP_LABEL.to_string(), group.to_string());
    d.spec.strategy.max_origin_connections = readers;
    if let Some(h) = d.spec.source.http.as_mut() {
        h.digest = digest.map(str::to_string);
    }
    d
}

/// Excludes `nodes` from `d`'s targets (node affinity on the hostname).
fn excluding(mut d: Distribution, nodes: &[String]) -> Distribution {
    d.spec.target.node_affinity = Some(NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: HOSTNAME_LABEL.into(),
                    operator: "NotIn".into(),
                    values: Some(nodes.to_vec()),
                }]),
                match_fields: None,
            }],
        }),
        ..NodeAffinity::default()
    });
    d
}

fn name_of(d: &Distribution) -> String {
    format!(
        "{}/{}",
        d.metadata.namespace.as_deref().unwrap_or("default"),
        d.name_any()
    )
}

/// The `Failed` condition's (reason, message), if it is True.
fn failure(d: &Distribution) -> Option<(String, String)> {
    let s = d.status.as_ref()?;
    let c = s.condition(CONDITION_FAILED)?;
    (c.status == "True").then(|| (c.reason.clone(), c.message.clone()))
}

/// `(reason, message)` when `d` is Failed for one of `reasons`: the
/// condition's own reason, or a failing node's (the operator may sum node
/// failures up as e.g. `NodesFailed`).
fn failed_with(d: &Distribution, reasons: &[&str]) -> Option<(String, String)> {
    let (reason, message) = failure(d)?;
    if reasons.contains(&reason.as_str()) {
        return Some((reason, message));
    }
    d.status
        .as_ref()?
        .failing_nodes
        .iter()
        .find(|f| reasons.contains(&f.reason.as_str()))
        .map(|f| {
            (
                f.reason.clone(),
                format!("{}: {} ({message})", f.node, f.message),
            )
        })
}

fn generation_observed(d: &Distribution) -> bool {
    d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation
}

/// Complete on exactly `desired` nodes, for the current generation.
fn complete_on(d: &Distribution, desired: usize) -> bool {
    let (want, done, _) = counts(d);
    is_complete(d) && generation_observed(d) && want as usize == desired && done as usize == desired
}

/// Waits (bounded) for `cond`; the error carries the diagnostics.
async fn wait_for(
    ctx: &Ctx,
    d: &Distribution,
    bound: Duration,
    what: &str,
    cond: impl Fn(&Distribution) -> bool,
) -> anyhow::Result<Distribution> {
    let what = format!("{}: {what}", name_of(d));
    Ok(ctx.cluster.wait_distribution(d, bound, &what, cond).await?)
}

/// Waits until `d` is Complete on `desired` nodes.
async fn wait_complete_on(
    ctx: &Ctx,
    d: &Distribution,
    desired: usize,
) -> anyhow::Result<Distribution> {
    wait_for(
        ctx,
        d,
        SETTLE,
        &format!("Complete on {desired} nodes"),
        |d| complete_on(d, desired),
    )
    .await
}

/// Waits until every node of `nodes` reports `d` (by uid) Complete in its
/// NodeFill status; returns the entries.
async fn wait_nodes_complete(
    ctx: &Ctx,
    d: &Distribution,
    nodes: &[String],
    bound: Duration,
) -> anyhow::Result<BTreeMap<String, NodeDistributionStatus>> {
    let uid = d.uid().context("pass the applied Distribution")?;
    let what = format!("{} Complete on {nodes:?} (NodeFill status)", name_of(d));
    let fills = ctx
        .cluster
        .wait_nodefills(bound, &what, |fills| {
            let p = progress_in(fills, &uid);
            nodes
                .iter()
                .all(|n| p.get(n).is_some_and(|e| e.phase == NodePhase::Complete))
        })
        .await?;
    Ok(progress_in(&fills, &uid))
}

/// Waits until `nodes` nodes report at least `bytes` of `d`.
async fn wait_moving(ctx: &Ctx, d: &Distribution, nodes: usize, bytes: u64) -> anyhow::Result<()> {
    let uid = d.uid().context("pass the applied Distribution")?;
    let what = format!("{nodes} nodes with >= {bytes} bytes of {}", name_of(d));
    ctx.cluster
        .wait_nodefills(SETTLE, &what, |fills| {
            progress_in(fills, &uid)
                .values()
                .filter(|e| e.bytes_done >= bytes)
                .count()
                >= nodes
        })
        .await?;
    Ok(())
}

/// Polls (bounded) until the origin served `bytes` of `blob`.
async fn wait_served(origin: &Origin, blob: &Blob, bytes: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE;
    while origin.served_of(blob).bytes < bytes {
        ensure!(
            Instant::now() < deadline,
            "the origin served only {} of {} bytes of {} in {SETTLE:?}",
            origin.served_of(blob).bytes,
            bytes,
            blob.path
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The origin readers named in `d`'s assignments (NodeFill specs), in
/// reader order.
async fn readers_of(ctx: &Ctx, d: &Distribution) -> anyhow::Result<Vec<String>> {
    let uid = d.uid().context("pass the applied Distribution")?;
    let fills: Vec<NodeFill> = kube::Api::<NodeFill>::all(ctx.cluster.client())
        .list(&Default::default())
        .await?
        .items;
    Ok(fills
        .iter()
        .flat_map(|f| f.spec.distributions.iter())
        .find(|a| a.uid == uid && !a.origin_readers.is_empty())
        .map(|a| a.origin_readers.iter().map(|r| r.node.clone()).collect())
        .unwrap_or_default())
}

/// Waits (bounded) for `d`'s readers to be assigned.
async fn wait_readers(ctx: &Ctx, d: &Distribution) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let r = readers_of(ctx, d).await?;
        if !r.is_empty() {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!(
                "no origin readers assigned for {} in {SETTLE:?}\n{}",
                name_of(d),
                ctx.cluster.diagnostics(Some(d)).await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every node of `nodes` holds exactly `want` (a `blake3:` digest) at
/// `path` under its data root.
fn check_files(ctx: &Ctx, nodes: &[String], path: &str, want: &Blob) -> anyhow::Result<()> {
    for n in nodes {
        let got = ctx.local().file_blake3(n, path)?;
        ensure!(
            got.as_deref() == Some(want.blake3.as_str()),
            "{n}:{path} holds {got:?}, want version {} ({})",
            want.version,
            want.blake3
        );
    }
    Ok(())
}

/// Never Complete with other bytes: every node whose status says `d` is
/// Complete holds one of `allowed` at the path, and any file at the path
/// is one of `allowed`.
async fn check_no_wrong_bytes(
    ctx: &Ctx,
    d: &Distribution,
    nodes: &[String],
    allowed: &[&Blob],
) -> anyhow::Result<()> {
    let progress = ctx.cluster.node_progress(d).await?;
    for n in nodes {
        let got = ctx.local().file_blake3(n, &d.spec.target.path)?;
        let ok = got
            .as_deref()
            .is_none_or(|g| allowed.iter().any(|b| b.blake3 == g));
        ensure!(
            ok,
            "{n}:{} holds {got:?}, none of the versions {:?} (status {:?})",
            d.spec.target.path,
            allowed.iter().map(|b| b.version).collect::<Vec<_>>(),
            progress.get(n).map(|e| e.phase)
        );
        if progress
            .get(n)
            .is_some_and(|e| e.phase == NodePhase::Complete)
        {
            ensure!(got.is_some(), "{n} reports Complete but has no file");
        }
    }
    Ok(())
}

/// Applies and returns the applied object (with uid).
async fn apply(ctx: &Ctx, d: &Distribution) -> anyhow::Result<Distribution> {
    Ok(ctx.cluster.apply_distribution(d).await?)
}

/// `kubectl patch` of a Distribution with a merge patch.
async fn kubectl_patch(
    ctx: &Ctx,
    d: &Distribution,
    patch: &serde_json::Value,
) -> anyhow::Result<()> {
    let ns = d
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let body = patch.to_string();
    ctx.kubectl
        .ok(&[
            "patch",
            "dist",
            &d.name_any(),
            "-n",
            &ns,
            "--type=merge",
            "-p",
            &body,
        ])
        .await?;
    Ok(())
}

async fn kubectl_delete(ctx: &Ctx, d: &Distribution) -> anyhow::Result<()> {
    let ns = d
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    ctx.kubectl
        .ok(&["delete", "dist", &d.name_any(), "-n", &ns, "--wait=false"])
        .await?;
    Ok(())
}

async fn current(ctx: &Ctx, d: &Distribution) -> anyhow::Result<Distribution> {
    let ns = d
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    Ok(
        kube::Api::<Distribution>::namespaced(ctx.cluster.client(), &ns)
            .get(&d.name_any())
            .await?,
    )
}

async fn node_labels(ctx: &Ctx) -> anyhow::Result<BTreeMap<String, BTreeMap<String, String>>> {
    Ok(ctx
        .cluster
        .nodes()
        .await?
        .into_iter()
        .map(|n| (n.name, n.labels))
        .collect())
}

// -------------------------------------------------------------- scenarios

/// (a) An origin reader's agent frozen (SIGSTOP) for 60 s mid-transfer:
/// the other targets complete while it is frozen (the reader is replaced
/// and its range reassigned), and after SIGCONT it completes too.
async fn reader_paused(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes = ctx.group("pause");
    let origin = Origin::start()?;
    let blob = origin.add_blob("pause.bin", SIZE, 1001);
    origin.set_rate_limit(Some(2 * MIB));
    let d = group_dist(
        "default",
        "chaos-pause",
        "pause",
        &blob,
        "chaos/pause.bin",
        None,
        2,
    );
    let d = apply(ctx, &d).await?;
    let readers = wait_readers(ctx, &d).await?;
    wait_moving(ctx, &d, 1, MIB).await?;
    let victim = readers[0].clone();
    ctx.local().signal_agent(&victim, AgentSignal::Stop)?;
    let frozen = Instant::now();
    origin.set_rate_limit(None);
    let others: Vec<String> = nodes.iter().filter(|n| **n != victim).cloned().collect();
    // Reader replaced within 30 s of being seen down, then the rest moves:
    // the others must be done well before the freeze ends.
    let r = wait_nodes_complete(ctx, &d, &others, Duration::from_secs(58)).await;
    let waited = frozen.elapsed();
    let readers_during = readers_of(ctx, &d).await.unwrap_or_default();
    if let Some(left) = Duration::from_secs(60).checked_sub(frozen.elapsed()) {
        tokio::time::sleep(left).await;
    }
    ctx.local().signal_agent(&victim, AgentSignal::Continue)?;
    r.with_context(|| format!("with reader {victim} frozen (readers then {readers_during:?})"))?;
    println!(
        "(a) others complete {:.0}s after freezing reader {victim}; readers then {readers_during:?}",
        waited.as_secs_f64()
    );
    wait_complete_on(ctx, &d, nodes.len()).await?;
    check_files(ctx, &nodes, "chaos/pause.bin", &blob)?;
    Ok(())
}

/// (b) An origin reader killed for good mid-transfer: the others complete
/// (its agent is down, so it is no target any more).
async fn reader_killed(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes = ctx.group("killreader");
    let origin = Origin::start()?;
    let blob = origin.add_blob("killreader.bin", SIZE, 1101);
    origin.set_rate_limit(Some(2 * MIB));
    let d = group_dist(
        "default",
        "chaos-killreader",
        "killreader",
        &blob,
        "chaos/killreader.bin",
        Some(&blob.blake3),
        2,
    );
    let d = apply(ctx, &d).await?;
    let readers = wait_readers(ctx, &d).await?;
    wait_moving(ctx, &d, 1, MIB).await?;
    let victim = readers[readers.len() - 1].clone();
    ctx.local().crash_agent(&victim)?;
    origin.set_rate_limit(None);
    let others: Vec<String> = nodes.iter().filter(|n| **n != victim).cloned().collect();
    wait_complete_on(ctx, &d, others.len()).await?;
    check_files(ctx, &others, "chaos/killreader.bin", &blob)?;
    check_no_wrong_bytes(ctx, &d, &nodes, &[&blob]).await?;
    println!(
        "(b) complete without killed reader {victim}; readers now {:?}",
        readers_of(ctx, &d).await?
    );
    Ok(())
}

/// (c) 2 of 6 agents (a reader and the node furthest ahead) SIGKILLed
/// mid-transfer and started again a few seconds later.
async fn agents_crash(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes = ctx.group("crash");
    let origin = Origin::start()?;
    let blob = origin.add_blob("crash.bin", SIZE, 1201);
    origin.set_rate_limit(Some(3 * MIB));
    let d = group_dist(
        "default",
        "chaos-crash",
        "crash",
        &blob,
        "chaos/crash.bin",
        Some(&blob.sha256),
        3,
    );
    let d = apply(ctx, &d).await?;
    let readers = wait_readers(ctx, &d).await?;
    wait_moving(ctx, &d, 2, 2 * MIB).await?;
    let progress = ctx.cluster.node_progress(&d).await?;
    let ahead = progress
        .iter()
        .filter(|(n, _)| **n != readers[0])
        .max_by_key(|(_, e)| e.bytes_done)
        .map(|(n, _)| n.clone())
        .context("no progress")?;
    let victims = [readers[0].clone(), ahead];
    for v in &victims {
        ctx.local().crash_agent(v)?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for v in &victims {
        ctx.local().start_agent(v)?;
    }
    origin.set_rate_limit(None);
    wait_complete_on(ctx, &d, nodes.len()).await?;
    check_files(ctx, &nodes, "chaos/crash.bin", &blob)?;
    println!("(c) complete after killing and restarting {victims:?}");
    Ok(())
}

/// (d) The origin refuses connections for 15 s, then accepts but answers
/// nothing for 15 s, then comes back: the Distribution completes.
async fn origin_down(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes = ctx.group("calm");
    let origin = Origin::start()?;
    let blob = origin.add_blob("down.bin", SIZE, 1301);
    origin.set_rate_limit(Some(2 * MIB));
    let d = group_dist(
        "default",
        "chaos-origin-down",
        "calm",
        &blob,
        "chaos/down.bin",
        Some(&blob.blake3),
        2,
    );
    let d = apply(ctx, &d).await?;
    wait_moving(ctx, &d, 1, MIB).await?;
    origin.go_down(Outage::Refuse);
    tokio::time::sleep(Duration::from_secs(15)).await;
    origin.go_down(Outage::Hang);
    tokio::time::sleep(Duration::from_secs(15)).await;
    check_no_wrong_bytes(ctx, &d, &nodes, &[&blob]).await?;
    origin.set_rate_limit(None);
    origin.come_up();
    wait_complete_on(ctx, &d, nodes.len()).await?;
    check_files(ctx, &nodes, "chaos/down.bin", &blob)?;
    Ok(())
}

/// (e) The origin's content replaced by another version of the same size
/// mid-transfer (connections under way cut, so readers must ask again):
/// without a digest every node ends with one version, all identical; with
/// a `blake3:`/`sha256:` digest of the old version the nodes end with the
/// old version or the Distribution fails (DigestMismatch / OriginChanged).
async fn origin_changed(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes = ctx.group("calm");
    let origin = Origin::start()?;
    let free = origin.add_blob("changed-free.bin", SIZE, 1401);
    let b3 = origin.add_blob("changed-b3.bin", SIZE, 1411);
    let sha = origin.add_blob("changed-sha.bin", SIZE, 1421);
    origin.set_rate_limit(Some(3 * MIB));
    let d_free = apply(
        ctx,
        &group_dist(
            "default",
            "chaos-changed",
            "calm",
            &free,
            "chaos/changed.bin",
            None,
            2,
        ),
    )
    .await?;
    let d_b3 = apply(
        ctx,
        &group_dist(
            "default",
            "chaos-changed-b3",
            "calm",
            &b3,
            "chaos/changed-b3.bin",
            Some(&b3.blake3),
            2,
        ),
    )
    .await?;
    let d_sha = apply(
        ctx,
        &group_dist(
            "default",
            "chaos-changed-sha",
            "calm",
            &sha,
            "chaos/changed-sha.bin",
            Some(&sha.sha256),
            2,
        ),
    )
    .await?;
    let mut new = Vec::new();
    for (blob, seed) in [(&free, 1402), (&b3, 1412), (&sha, 1422)] {
        wait_served(&origin, blob, 3 * MIB).await?;
        new.push(origin.replace_blob(blob, seed, Validators::Both));
    }
    // Cut the responses still streaming the old version: readers must ask
    // again, and get the new version (or 412 if they pin the old one).
    origin.cut_connections();
    origin.set_rate_limit(None);

    // Without a digest: Complete everywhere with one version.
    let no_digest = async {
        let done = wait_complete_on(ctx, &d_free, nodes.len()).await?;
        let first = ctx.local().file_blake3(&nodes[0], "chaos/changed.bin")?;
        let version = [&free, &new[0]]
            .into_iter()
            .find(|b| Some(&b.blake3) == first.as_ref())
            .with_context(|| {
                format!(
                    "{}: {first:?} is none of the origin's versions (a mix of both?)",
                    nodes[0]
                )
            })?;
        check_files(ctx, &nodes, "chaos/changed.bin", version)?;
        let s = done.status.clone().unwrap_or_default();
        // Version 1 bytes had been read when it changed: ending with
        // version 2 means the change was seen and the content restarted.
        ensure!(
            version.version == 1 || s.origin_revision.unwrap_or(0) >= 1,
            "every node holds version {} but status.originRevision is {:?}: the origin change went unnoticed",
            version.version,
            s.origin_revision
        );
        println!(
            "(e) no digest: every node holds version {} (originRevision {:?}, contentId {:?}, origin 412s {})",
            version.version,
            s.origin_revision,
            s.content_id,
            origin.precondition_failures_of(&free)
        );
        anyhow::Ok(())
    };
    // With a digest of the old version: the old bytes, or Failed.
    const EXPECTED: &[&str] = &["DigestMismatch", "OriginChanged"];
    let with_digest = |d: Distribution, old: Blob| {
        let nodes = nodes.clone();
        async move {
            // Transient origin failures (retried) are no outcome.
            let end = wait_for(
                ctx,
                &d,
                SETTLE,
                "Complete, or Failed with DigestMismatch/OriginChanged",
                |d| complete_on(d, nodes.len()) || failed_with(d, EXPECTED).is_some(),
            )
            .await?;
            check_no_wrong_bytes(ctx, &d, &nodes, &[&old]).await?;
            match failed_with(&end, EXPECTED) {
                Some((reason, message)) => {
                    println!("(e) {}: Failed {reason}: {message}", name_of(&d));
                }
                None => {
                    check_files(ctx, &nodes, &d.spec.target.path, &old)?;
                    println!("(e) {}: Complete with the old version", name_of(&d));
                }
            }
            anyhow::Ok(())
        }
    };
    let (r_free, r_b3, r_sha) = tokio::join!(
        no_digest,
        with_digest(d_b3.clone(), b3.clone()),
        with_digest(d_sha.clone(), sha.clone())
    );
    // Still no node holds other bytes once everything settled.
    let settled = async {
        check_no_wrong_bytes(ctx, &d_b3, &nodes, &[&b3]).await?;
        check_no_wrong_bytes(ctx, &d_sha, &nodes, &[&sha]).await
    }
    .await;
    all_of([
        ("no digest", r_free),
        ("blake3 digest of the old version", r_b3),
        ("sha256 digest of the old version", r_sha),
        ("after settling", settled),
    ])
}

/// Ok if every part is; else an error listing the failed parts.
fn all_of<const N: usize>(parts: [(&str, anyhow::Result<()>); N]) -> anyhow::Result<()> {
    let failed: Vec<String> = parts
        .into_iter()
        .filter_map(|(what, r)| r.err().map(|e| format!("[{what}] {e:#}")))
        .collect();
    ensure!(failed.is_empty(), "{}", failed.join("\n"));
    Ok(())
}

/// (f) One origin reader's disk is too small (test-only fault): the
/// healthy nodes complete, the Distribution never fails as a whole, and
/// once space is freed that node completes too.
async fn full_disk(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes = ctx.group("disk");
    let origin = Origin::start()?;
    let blob = origin.add_blob("disk.bin", SIZE, 1501);
    // As many readers as targets: the starved node is a reader.
    let d = group_dist(
        "default",
        "chaos-disk",
        "disk",
        &blob,
        "chaos/disk.bin",
        None,
        nodes.len() as u32,
    );
    let d = apply(ctx, &d).await?;
    let readers = wait_readers(ctx, &d).await?;
    // Every target is a reader at first; the starved one may already have
    // failed and been replaced (a reader failing locally is) by the time
    // the list is read, which its own report then says.
    let starved = ctx
        .cluster
        .node_progress(&d)
        .await?
        .get(&ctx.disk_node)
        .is_some_and(|e| e.reason.as_deref() == Some("InsufficientSpace"));
    ensure!(
        readers.contains(&ctx.disk_node) || starved,
        "{} is no reader and reports no full disk ({readers:?})",
        ctx.disk_node
    );
    let healthy: Vec<String> = nodes
        .iter()
        .filter(|n| **n != ctx.disk_node)
        .cloned()
        .collect();
    wait_nodes_complete(ctx, &d, &healthy, SETTLE).await?;
    check_files(ctx, &healthy, "chaos/disk.bin", &blob)?;
    let now = current(ctx, &d).await?;
    let entry = ctx.cluster.node_progress(&d).await?.remove(&ctx.disk_node);
    println!(
        "(f) healthy nodes complete; {} reports {:?} {:?}; readers now {:?}; Distribution {:?}",
        ctx.disk_node,
        entry.as_ref().map(|e| e.phase),
        entry.as_ref().and_then(|e| e.reason.clone()),
        readers_of(ctx, &d).await?,
        failure(&now)
    );
    ensure!(
        entry
            .as_ref()
            .is_none_or(|e| e.phase != NodePhase::Complete),
        "{} completed {} bytes with a {}-byte disk: the fault {DISK_CAP_ENV} had no effect",
        ctx.disk_node,
        SIZE,
        4 * MIB
    );
    ensure!(
        !failure(&now).is_some_and(|(r, _)| r == "InsufficientSpace" || r == "StorageError"),
        "one node's local fault failed the whole Distribution: {:?}",
        failure(&now)
    );
    check_no_wrong_bytes(ctx, &d, &nodes, &[&blob]).await?;
    std::fs::write(&ctx.disk_cap_file, (1u64 << 40).to_string())?;
    wait_complete_on(ctx, &d, nodes.len()).await?;
    check_files(ctx, &nodes, "chaos/disk.bin", &blob)?;
    Ok(())
}

/// (g) Two Distributions in different namespaces with one target path: the
/// second fails with PathConflict naming the first and writes nothing;
/// deleting it leaves the first's files and labels; deleting the first
/// lets the second proceed.
async fn path_conflict(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes = ctx.group("calm");
    let local = ctx.local();
    local.create_namespace_named("chaos-a").await?;
    local.create_namespace_named("chaos-b").await?;
    let origin = Origin::start()?;
    let a_blob = origin.add_blob("owner.bin", SIZE, 1601);
    let b_blob = origin.add_blob("intruder.bin", SIZE, 1602);
    let path = "chaos/conflict.bin";
    let a = apply(
        ctx,
        &group_dist("chaos-a", "owner", "calm", &a_blob, path, None, 2),
    )
    .await?;
    wait_complete_on(ctx, &a, nodes.len()).await?;
    check_files(ctx, &nodes, path, &a_blob)?;
    let a_label = node_label_key("chaos-a", "owner");
    let labelled = |labels: &BTreeMap<String, BTreeMap<String, String>>| {
        nodes
            .iter()
            .all(|n| labels.get(n).is_some_and(|l| l.contains_key(&a_label)))
    };
    ensure!(labelled(&node_labels(ctx).await?), "owner's label missing");

    let b_spec = group_dist("chaos-b", "intruder", "calm", &b_blob, path, None, 2);
    for round in 1..=2 {
        let b = apply(ctx, &b_spec).await?;
        let failed = wait_for(ctx, &b, SETTLE, "Failed (PathConflict)", |d| {
            failed_with(d, &["PathConflict"]).is_some()
        })
        .await?;
        let (reason, message) = failed_with(&failed, &["PathConflict"]).unwrap_or_default();
        ensure!(
            message.contains("chaos-a/owner"),
            "intruder (round {round}) Failed with {reason}: {message}; the message must name chaos-a/owner"
        );
        ensure!(
            origin.served_of(&b_blob).bytes == 0,
            "the intruder's content was fetched ({} bytes)",
            origin.served_of(&b_blob).bytes
        );
        check_files(ctx, &nodes, path, &a_blob)?;
        if round == 2 {
            break;
        }
        kubectl_delete(ctx, &b).await?;
        ctx.cluster.wait_distribution_gone(&b, SETTLE).await?;
        check_files(ctx, &nodes, path, &a_blob)?;
        ensure!(
            labelled(&node_labels(ctx).await?),
            "deleting the intruder removed the owner's label"
        );
        ensure!(
            is_complete(&current(ctx, &a).await?),
            "the owner is no longer Complete"
        );
    }
    // Deleting the owner lets the intruder (round 2) proceed.
    kubectl_delete(ctx, &a).await?;
    ctx.cluster.wait_distribution_gone(&a, SETTLE).await?;
    let b = current(ctx, &b_spec).await?;
    wait_complete_on(ctx, &b, nodes.len()).await?;
    check_files(ctx, &nodes, path, &b_blob)?;
    let labels = node_labels(ctx).await?;
    ensure!(
        nodes
            .iter()
            .all(|n| labels.get(n).is_some_and(|l| !l.contains_key(&a_label))),
        "the deleted owner's label is still on a node"
    );
    kubectl_delete(ctx, &b).await?;
    ctx.cluster.wait_distribution_gone(&b, SETTLE).await?;
    Ok(())
}

/// (h) The URL edited (kubectl patch) mid-transfer and again after
/// Complete, each time to a new version of the same size: every node ends
/// with the new bytes, status goes back to Progressing, observedGeneration
/// follows.
async fn url_edited(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes = ctx.group("calm");
    let origin = Origin::start()?;
    let v1 = origin.add_blob("edit-v1.bin", SIZE, 1701);
    let v2 = origin.add_blob("edit-v2.bin", SIZE, 1702);
    let v3 = origin.add_blob("edit-v3.bin", SIZE, 1703);
    let path = "chaos/edited.bin";
    origin.set_rate_limit(Some(3 * MIB));
    let d = apply(
        ctx,
        &group_dist("default", "chaos-edit", "calm", &v1, path, None, 2),
    )
    .await?;
    wait_moving(ctx, &d, 1, 2 * MIB).await?;
    let url_patch = |url: &str| serde_json::json!({"spec": {"source": {"http": {"url": url}}}});
    kubectl_patch(ctx, &d, &url_patch(&v2.url)).await?;
    origin.set_rate_limit(None);
    let done = wait_complete_on(ctx, &d, nodes.len()).await?;
    check_files(ctx, &nodes, path, &v2)?;
    let id2 = done.status.as_ref().and_then(|s| s.content_id.clone());

    origin.set_rate_limit(Some(4 * MIB));
    kubectl_patch(ctx, &d, &url_patch(&v3.url)).await?;
    let gen3 = current(ctx, &d).await?.metadata.generation;
    wait_for(ctx, &d, SETTLE, "Progressing for the new URL", |d| {
        d.metadata.generation == gen3
            && generation_observed(d)
            && d.status.as_ref().is_some_and(|s| {
                matches!(s.phase, Some(Phase::Progressing | Phase::Pending))
                    && s.is_condition_true(CONDITION_PROGRESSING)
            })
    })
    .await?;
    origin.set_rate_limit(None);
    let done = wait_complete_on(ctx, &d, nodes.len()).await?;
    check_files(ctx, &nodes, path, &v3)?;
    let id3 = done.status.as_ref().and_then(|s| s.content_id.clone());
    ensure!(
        id2.is_none() || id2 != id3,
        "status.contentId unchanged by the URL edit ({id3:?})"
    );
    kubectl_delete(ctx, &d).await?;
    ctx.cluster.wait_distribution_gone(&d, SETTLE).await?;
    Ok(())
}

/// (i) A node that is not a target writes a (short) `size` for the
/// Distribution into its own NodeFill status before the readers learn the
/// real one, and keeps doing so: ignored, the targets complete with the
/// full content.
async fn forged_size(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes = ctx.group("calm");
    let forger = ctx.group("forger")[0].clone();
    let origin = Origin::start()?;
    let blob = origin.add_blob("forged.bin", SIZE, 1801);
    // Readers cannot learn the size until the origin answers.
    origin.go_down(Outage::Hang);
    let d = apply(
        ctx,
        &group_dist(
            "default",
            "chaos-forged",
            "calm",
            &blob,
            "chaos/forged.bin",
            None,
            2,
        ),
    )
    .await?;
    let uid = d.uid().context("uid")?;
    wait_readers(ctx, &d).await?;
    let content_id = kube::Api::<NodeFill>::all(ctx.cluster.client())
        .list(&Default::default())
        .await?
        .items
        .iter()
        .flat_map(|f| f.spec.distributions.iter())
        .find(|a| a.uid == uid)
        .map(|a| a.content_id.clone())
        .context("no assignment")?;
    let forged = 3 * MIB;
    let entry = serde_json::json!({
        "namespace": "default", "name": "chaos-forged", "uid": uid,
        "phase": "Complete", "contentId": content_id,
        "size": forged, "bytesDone": forged, "piecesDone": 3, "pieceCount": 3,
        "bytesFromOrigin": forged, "bytesFromPeers": 0, "bytesPerSecond": 0,
    });
    let stop = AtomicBool::new(false);
    let forge = async {
        let mut writes = 0u32;
        while !stop.load(Ordering::SeqCst) {
            let patch = serde_json::json!({"status": {"distributions": [entry.clone()]}});
            let body = patch.to_string();
            let r = ctx
                .kubectl
                .ok(&[
                    "patch",
                    "nodefill",
                    &forger,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    &body,
                ])
                .await;
            match r {
                Ok(_) => writes += 1,
                Err(e) => println!("(i) forging failed: {e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        writes
    };
    let check = async {
        // Let the operator see the forged size while nobody knows better.
        tokio::time::sleep(Duration::from_secs(5)).await;
        origin.come_up();
        let r = wait_complete_on(ctx, &d, nodes.len()).await;
        stop.store(true, Ordering::SeqCst);
        r
    };
    let (writes, done) = tokio::join!(forge, check);
    let done = done?;
    ensure!(writes > 0, "no forged status was ever written");
    let size = done.status.as_ref().and_then(|s| s.size);
    ensure!(size == Some(SIZE), "status.size {size:?}, want {SIZE}");
    check_files(ctx, &nodes, "chaos/forged.bin", &blob)?;
    println!("(i) {writes} forged status writes ignored");
    Ok(())
}

/// (j) Symlinks out of the data root: a target path through a symlinked
/// directory is refused (Failed) and nothing outside is written or deleted;
/// a node source that is a symlink to a file outside is refused and
/// nothing is sent.
async fn symlink_escapes(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes = ctx.group("calm");
    let origin = Origin::start()?;
    let blob = origin.add_blob("escape.bin", 4 * MIB, 1901);

    let through_dir = symlinked_target_dir(ctx, &nodes, &blob).await;
    let source = symlinked_source(ctx, &nodes).await;
    all_of([
        ("target path through a symlinked directory", through_dir),
        ("node source that is a symlink", source),
    ])
}

async fn symlinked_target_dir(ctx: &Ctx, nodes: &[String], blob: &Blob) -> anyhow::Result<()> {
    let local = ctx.local();
    let mut outside_dirs = Vec::new();
    for n in nodes {
        let out = ctx.outside.path().join(format!("escape-{n}"));
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("victim.bin"), b"precious, outside the data root")?;
        std::os::unix::fs::symlink(&out, local.node_data_dir(n)?.join("chaos-escape"))?;
        outside_dirs.push(out);
    }
    let before = snapshot(&outside_dirs)?;
    let d = apply(
        ctx,
        &group_dist(
            "default",
            "chaos-escape",
            "calm",
            blob,
            "chaos-escape/victim.bin",
            None,
            2,
        ),
    )
    .await?;
    let (reason, message) = wait_refused(ctx, &d, nodes).await?;
    unchanged(&before, &snapshot(&outside_dirs)?)
        .context("files outside the data root changed while the Distribution ran")?;
    println!("(j) symlinked directory: refused, {reason}: {message}");
    kubectl_delete(ctx, &d).await?;
    ctx.cluster.wait_distribution_gone(&d, SETTLE).await?;
    unchanged(&before, &snapshot(&outside_dirs)?)
        .context("deleting the Distribution changed files outside the data root")?;
    Ok(())
}

async fn symlinked_source(ctx: &Ctx, nodes: &[String]) -> anyhow::Result<()> {
    let local = ctx.local();
    let seeder = nodes[0].clone();
    let secret = ctx.outside.path().join("secret.bin");
    let secret_bytes = generate(1902, 0, 2 * MIB);
    std::fs::write(&secret, &secret_bytes)?;
    std::os::unix::fs::symlink(
        &secret,
        local.node_data_dir(&seeder)?.join("chaos-seed-link.bin"),
    )?;
    let mut s = node_source_distribution(
        "chaos-stolen",
        &seeder,
        "chaos-seed-link.bin",
        "chaos/stolen.bin",
    );
    s.spec
        .target
        .node_selector
        .insert(GROUP_LABEL.to_string(), "calm".to_string());
    let s = excluding(s, std::slice::from_ref(&seeder));
    let targets: Vec<String> = nodes.iter().filter(|n| **n != seeder).cloned().collect();
    let s = apply(ctx, &s).await?;
    let (reason, message) = wait_refused(ctx, &s, std::slice::from_ref(&seeder)).await?;
    let progress = ctx.cluster.node_progress(&s).await?;
    for n in &targets {
        ensure!(
            ctx.local().file_blake3(n, "chaos/stolen.bin")?.is_none(),
            "{n} received the file behind the symlink"
        );
        let got = progress
            .get(n)
            .map_or(0, |e| e.bytes_done + e.bytes_from_peers);
        ensure!(
            got == 0,
            "{n} received {got} bytes of the file behind the symlink"
        );
    }
    println!("(j) symlinked node source: refused, {reason}: {message}");
    kubectl_delete(ctx, &s).await?;
    ctx.cluster.wait_distribution_gone(&s, SETTLE).await?;
    ensure!(
        std::fs::read(&secret)? == secret_bytes,
        "the file behind the symlinked source changed"
    );
    Ok(())
}

/// Waits (bounded) until `d` is refused: the Distribution `Failed` with a
/// reason, or nodes of `nodes` reporting it `Failed` with a reason while
/// none of them downloads or holds it (a refusal may count as a local node
/// fault that does not fail the whole Distribution; the callers check the
/// files outside the root again after deletion, so a node that writes
/// later is still caught). Complete is an error. Returns (reason,
/// message).
async fn wait_refused(
    ctx: &Ctx,
    d: &Distribution,
    nodes: &[String],
) -> anyhow::Result<(String, String)> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = current(ctx, d).await?;
        ensure!(
            !is_complete(&now),
            "{} completed: {:?}",
            name_of(d),
            now.status
        );
        if let Some((reason, message)) = failure(&now).filter(|(r, _)| !r.is_empty()) {
            return Ok((reason, format!("Distribution Failed: {message}")));
        }
        let progress = ctx.cluster.node_progress(d).await?;
        let entries: Vec<(&String, &NodeDistributionStatus)> = nodes
            .iter()
            .filter_map(|n| Some((n, progress.get(n)?)))
            .collect();
        let moving = entries
            .iter()
            .any(|(_, e)| matches!(e.phase, NodePhase::Downloading | NodePhase::Complete));
        let refused: Vec<(String, String)> = entries
            .iter()
            .filter(|(_, e)| e.phase == NodePhase::Failed)
            .filter_map(|(n, e)| {
                let reason = e.reason.clone().filter(|r| !r.is_empty())?;
                Some((
                    reason,
                    format!("{n}: {}", e.message.clone().unwrap_or_default()),
                ))
            })
            .collect();
        if !moving && !refused.is_empty() {
            let reason = refused[0].0.clone();
            let messages: Vec<String> = refused.into_iter().map(|(_, m)| m).collect();
            return Ok((reason, format!("node Failed: {}", messages.join("; "))));
        }
        if Instant::now() > deadline {
            bail!(
                "{} neither Failed nor refused by {nodes:?} in {SETTLE:?}\n{}",
                name_of(d),
                ctx.cluster.diagnostics(Some(d)).await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Ok if `after` equals `before`; else names the files removed, changed
/// and created.
fn unchanged(
    before: &BTreeMap<PathBuf, Vec<u8>>,
    after: &BTreeMap<PathBuf, Vec<u8>>,
) -> anyhow::Result<()> {
    let mut diff = Vec::new();
    for (p, bytes) in before {
        match after.get(p) {
            None => diff.push(format!("removed {}", p.display())),
            Some(b) if b != bytes => diff.push(format!("changed {}", p.display())),
            Some(_) => {}
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        diff.push(format!("created {}", p.display()));
    }
    ensure!(diff.is_empty(), "{}", diff.join(", "));
    Ok(())
}

/// Every file under `dirs` with its bytes.
fn snapshot(dirs: &[PathBuf]) -> anyhow::Result<BTreeMap<PathBuf, Vec<u8>>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) -> anyhow::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else {
                out.insert(p.clone(), std::fs::read(&p)?);
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    for d in dirs {
        walk(d, &mut out)?;
    }
    Ok(out)
}
