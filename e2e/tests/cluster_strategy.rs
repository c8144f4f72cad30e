//! Issue #12 items 4 and 5 on the local cluster (operator and agents as real
//! processes): a download cap changed on a running Distribution takes effect
//! without a restart, and an origin that ignores Range requests is read
//! whole by one node while the others take it from peers.
//!
//! Needs the binaries: `cargo build --workspace --bins`.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::cluster::{MIB, WAIT, check_all, general_pool, start, targets, wait_complete};
use peerfill_crds::Distribution;
use peerfill_e2e::cluster::{Cluster, LocalCluster};

/// Bytes of content `content_id` each node holds, from the agents' metrics
/// (`peerfill_agent_content_progress_ratio` × size).
fn held(local: &LocalCluster, nodes: &[String], content_id: &str, size: u64) -> Vec<f64> {
    let prefix = format!("peerfill_agent_content_progress_ratio{{content=\"{content_id}\"}}");
    nodes
        .iter()
        .map(|n| {
            local
                .agent_metrics(n)
                .lines()
                .find(|l| l.starts_with(&prefix))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .map_or(0.0, |r| r * size as f64)
        })
        .collect()
}

/// Each node's receive rate of the content over `window`, in bytes/s.
async fn rates(
    local: &LocalCluster,
    nodes: &[String],
    content_id: &str,
    size: u64,
    window: Duration,
) -> Vec<f64> {
    let (t0, before) = (Instant::now(), held(local, nodes, content_id, size));
    tokio::time::sleep(window).await;
    let after = held(local, nodes, content_id, size);
    let secs = t0.elapsed().as_secs_f64();
    before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) / secs)
        .collect()
}

fn check_rates(what: &str, nodes: &[String], rates: &[f64], cap: u64) -> anyhow::Result<()> {
    for (n, r) in nodes.iter().zip(rates) {
        println!(
            "{what}: {n} at {:.2} MiB/s (cap {} MiB/s)",
            r / MIB as f64,
            cap / MIB
        );
    }
    for (n, r) in nodes.iter().zip(rates) {
        let cap = cap as f64;
        ensure!(
            (0.8 * cap..=1.2 * cap).contains(r),
            "{what}: {n} received {:.2} MiB/s, cap {:.0} MiB/s",
            r / MIB as f64,
            cap / MIB as f64
        );
    }
    Ok(())
}

async fn applied_content_id(c: &Cluster, d: &Distribution) -> anyhow::Result<String> {
    let d = c
        .wait_distribution(d, WAIT, "a content id in the status", |d| {
            d.status
                .as_ref()
                .and_then(|s| s.content_id.as_ref())
                .is_some()
        })
        .await?;
    d.status
        .and_then(|s| s.content_id)
        .context("content id vanished")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cap_changes_on_a_running_distribution() -> anyhow::Result<()> {
    let cluster = start(3, |_| {}).await?;
    let Some(local) = cluster.local() else {
        println!("skipped: measures the agents' metrics of the local cluster");
        return Ok(());
    };
    let size = 128 * MIB;
    let blob = cluster.origin().add_blob("capped.bin", size, 21);
    let mut d = general_pool("capped", &blob.url, "models/capped.bin", Some(&blob.sha256));
    d.spec.strategy.piece_size = Some(MIB);
    d.spec.strategy.max_download_bytes_per_second = Some(4 * MIB);
    let want = targets(&cluster, &d).await?;
    ensure!(want.len() >= 2, "targets: {want:?}");
    let applied = cluster.apply_distribution(&d).await?;
    let cid = applied_content_id(&cluster, &applied).await?;

    // Wait until every node moves, then measure 5 s at 4 MiB/s.
    let t0 = Instant::now();
    while !held(local, &want, &cid, size)
        .iter()
        .all(|&b| b >= 2.0 * MIB as f64)
    {
        ensure!(
            t0.elapsed() < WAIT,
            "not moving on every node\n{}",
            cluster.diagnostics(Some(&applied)).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let at4 = rates(local, &want, &cid, size, Duration::from_secs(5)).await;
    check_rates("cap 4 MiB/s", &want, &at4, 4 * MIB)?;

    // Raised to 8 MiB/s on the running Distribution: same content id (no
    // restart), the agents follow their NodeFill within a report or two.
    d.spec.strategy.max_download_bytes_per_second = Some(8 * MIB);
    let raised = cluster.apply_distribution(&d).await?;
    ensure!(
        applied_content_id(&cluster, &raised).await? == cid,
        "a cap change must not be a new version"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let at8 = rates(local, &want, &cid, size, Duration::from_secs(5)).await;
    check_rates("cap 8 MiB/s", &want, &at8, 8 * MIB)?;

    wait_complete(&cluster, &applied, want.len()).await?;
    check_all(&cluster, &applied, &want, &blob.sha256).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_without_ranges_is_read_whole_by_one_node() -> anyhow::Result<()> {
    let cluster = start(4, |_| {}).await?;
    if !cluster.is_local() {
        println!("skipped: needs the test origin's no-Range mode");
        return Ok(());
    }
    let size = 64 * MIB;
    let blob = cluster.origin().add_blob("noranges.bin", size, 31);
    cluster.origin().set_ignore_ranges(true);
    let mut d = general_pool(
        "noranges",
        &blob.url,
        "models/noranges.bin",
        Some(&blob.sha256),
    );
    d.spec.strategy.piece_size = Some(MIB);
    d.spec.strategy.max_origin_connections = 4;
    let want = targets(&cluster, &d).await?;
    ensure!(want.len() >= 3, "targets: {want:?}");
    let applied = cluster.apply_distribution(&d).await?;
    wait_complete(&cluster, &applied, want.len()).await?;
    check_all(&cluster, &applied, &want, &blob.sha256).await?;

    let progress = cluster.node_progress(&applied).await?;
    let readers: Vec<&String> = progress
        .iter()
        .filter(|(_, e)| e.bytes_from_origin > 0)
        .map(|(n, _)| n)
        .collect();
    let served = cluster.origin().served_of(&blob);
    let copies = served.bytes as f64 / size as f64;
    println!(
        "origin without Range support, {} nodes x {} MiB: origin served {copies:.2} copies in {} requests; nodes that read from the origin: {readers:?}",
        want.len(),
        size / MIB,
        served.requests
    );
    ensure!(
        readers.len() == 1,
        "one node reads the origin: {progress:?}"
    );
    let from_peers: u64 = progress.values().map(|e| e.bytes_from_peers).sum();
    ensure!(
        from_peers >= (want.len() as u64 - 1) * size,
        "the others take it from peers: {from_peers} bytes"
    );
    // One copy, plus what the first range reads were sent before they were
    // dropped.
    ensure!(copies <= 1.5, "origin served {copies:.2} copies");
    Ok(())
}
