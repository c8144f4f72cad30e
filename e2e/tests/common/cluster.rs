//! Helpers of the cluster tests (`tests/cluster_*.rs`) on top of
//! `peerfill_e2e::cluster`: bounded waits that print the Distribution, the
//! NodeFills and the process logs on timeout, and checks of the content on
//! every node.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use peerfill_crds::{Distribution, NodeDistributionStatus, NodePhase};
use peerfill_e2e::cluster::{
    Cluster, LocalClusterOptions, POOL_GENERAL, POOL_LABEL, is_complete, is_failed, matching_nodes,
    progress_in,
};

/// Bound of every wait of the suite.
pub const WAIT: Duration = Duration::from_secs(90);
/// Test content piece size.
pub const PIECE: u64 = 1 << 20;
pub const MIB: u64 = 1 << 20;

/// A cluster of `nodes` nodes and one operator (or the real cluster of
/// `E2E_KUBECONFIG`), with `tweak` applied to the options. Logs go to the
/// test's output through tracing only when RUST_LOG is set.
pub async fn start(
    nodes: usize,
    tweak: impl FnOnce(&mut LocalClusterOptions),
) -> anyhow::Result<Cluster> {
    init_tracing();
    let mut opts = LocalClusterOptions {
        nodes,
        ..LocalClusterOptions::default()
    };
    tweak(&mut opts);
    let t = Instant::now();
    let c = Cluster::start(opts).await.context("starting the cluster")?;
    println!(
        "cluster up in {:.1}s ({})",
        t.elapsed().as_secs_f64(),
        if c.is_local() {
            "local"
        } else {
            "E2E_KUBECONFIG"
        }
    );
    Ok(c)
}

fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// `(desired, complete, failed)` from the status.
pub fn counts(d: &Distribution) -> (u32, u32, u32) {
    let s = d.status.clone().unwrap_or_default();
    (
        s.desired_nodes.unwrap_or(0),
        s.complete_nodes.unwrap_or(0),
        s.failed_nodes.unwrap_or(0),
    )
}

/// Waits for the `Complete` condition with `desired` nodes all complete.
pub async fn wait_complete(
    c: &Cluster,
    d: &Distribution,
    desired: usize,
) -> anyhow::Result<Distribution> {
    let what = format!(
        "{} Complete on {desired} nodes",
        d.metadata.name.as_deref().unwrap_or("?")
    );
    Ok(c.wait_distribution(d, WAIT, &what, |d| {
        is_complete(d) && counts(d).0 as usize == desired && counts(d).1 as usize == desired
    })
    .await?)
}

/// Waits for the `Failed` condition; returns it.
pub async fn wait_failed(c: &Cluster, d: &Distribution) -> anyhow::Result<Distribution> {
    let what = format!("{} Failed", d.metadata.name.as_deref().unwrap_or("?"));
    Ok(c.wait_distribution(d, WAIT, &what, is_failed).await?)
}

/// Waits until at least `nodes` nodes report at least `min_bytes` done of
/// `d` (which must carry its uid: pass the applied object) while none is
/// complete yet — the transfer is under way. Returns the progress seen.
pub async fn wait_moving(
    c: &Cluster,
    d: &Distribution,
    nodes: usize,
    min_bytes: u64,
) -> anyhow::Result<BTreeMap<String, NodeDistributionStatus>> {
    let uid = d
        .metadata
        .uid
        .clone()
        .context("pass the applied Distribution")?;
    let what = format!(
        "{nodes} nodes with >= {min_bytes} bytes of {}",
        d.metadata.name.as_deref().unwrap_or("?")
    );
    let fills = c
        .wait_nodefills(WAIT, &what, |fills| {
            let p = progress_in(fills, &uid);
            p.values().filter(|e| e.bytes_done >= min_bytes).count() >= nodes
        })
        .await?;
    Ok(progress_in(&fills, &uid))
}

/// Whether no node has finished `d` yet in this progress snapshot.
pub fn none_complete(p: &BTreeMap<String, NodeDistributionStatus>) -> bool {
    p.values().all(|e| e.phase != NodePhase::Complete)
}

/// Nodes the Distribution should reach, per the cluster's Node objects.
pub async fn targets(c: &Cluster, d: &Distribution) -> anyhow::Result<Vec<String>> {
    Ok(matching_nodes(&c.nodes().await?, d))
}

/// Checks the content on every node of `nodes`.
pub async fn check_all(
    c: &Cluster,
    d: &Distribution,
    nodes: &[String],
    digest: &str,
) -> anyhow::Result<()> {
    for n in nodes {
        c.check_content(n, d, digest).await?;
    }
    Ok(())
}

/// Checks that nodes outside `targets` got nothing of `d`: no status entry
/// and (locally) no file.
pub async fn check_untouched(
    c: &Cluster,
    d: &Distribution,
    targets: &[String],
) -> anyhow::Result<()> {
    let progress = c.node_progress(d).await?;
    for (node, entry) in &progress {
        ensure!(
            targets.contains(node),
            "{node} is not a target but reports {:?}",
            entry.phase
        );
    }
    if let Some(l) = c.local() {
        for node in l.nodes().keys().filter(|n| !targets.contains(n)) {
            let path = l.node_data_dir(node)?.join(&d.spec.target.path);
            ensure!(!path.exists(), "{node} holds {}", path.display());
        }
    }
    Ok(())
}

/// A Distribution of `url` to the general pool at `path`, with `digest`.
pub fn general_pool(name: &str, url: &str, path: &str, digest: Option<&str>) -> Distribution {
    let mut d = peerfill_e2e::cluster::http_distribution(name, url, path);
    d.spec
        .target
        .node_selector
        .insert(POOL_LABEL.to_string(), POOL_GENERAL.to_string());
    if let Some(h) = d.spec.source.http.as_mut() {
        h.digest = digest.map(str::to_string);
    }
    d
}

/// Waits until `d` is gone, then checks nothing of it is left anywhere.
pub async fn check_gone_everywhere(c: &Cluster, d: &Distribution) -> anyhow::Result<()> {
    c.wait_distribution_gone(d, WAIT).await?;
    // The finalizer goes once no status lists the uid; give the agents'
    // label removal and the API a moment to agree by polling briefly.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = c.leftovers(d).await?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "left behind:\n{}\n{}",
                left.join("\n"),
                c.diagnostics(Some(d)).await
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
