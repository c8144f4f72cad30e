//! Issue #4's integration tests: the real operator and agent binaries as
//! processes against the API stand-in (or a real cluster with
//! `E2E_KUBECONFIG`), plus the harness's own checks.
//!
//! Needs the binaries: `cargo build --workspace --bins`.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::cluster::{
    MIB, WAIT, check_all, check_gone_everywhere, check_untouched, counts, general_pool, start,
    targets, wait_complete, wait_failed, wait_moving,
};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::Api;
use peerfill_crds::{CONDITION_FAILED, NodePhase, node_label_key};
use peerfill_e2e::cluster::{
    LocalCluster, LocalClusterOptions, NodeOptions, POOL_LABEL, SYSTEM_NAMESPACE, ZONE_LABEL,
};

/// The harness alone: Nodes, namespace, origin, processes and cleanup (no
/// readiness wait, so it does not depend on the operator or agents working).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_nodes_origin_processes_and_cleanup() -> anyhow::Result<()> {
    if std::env::var_os(peerfill_e2e::cluster::KUBECONFIG_ENV).is_some() {
        println!("SKIP (real cluster): checks the local harness only");
        return Ok(());
    }
    let mut opts = LocalClusterOptions {
        nodes: 3,
        wait_ready: None,
        ..LocalClusterOptions::default()
    };
    opts.node_options
        .insert("node-3".into(), NodeOptions::tainted());
    let mut cluster = LocalCluster::start(opts).await?;
    let work = cluster.work_dir().to_path_buf();
    ensure!(cluster.kubeconfig_path().is_file());

    let client = cluster.client();
    Api::<Namespace>::all(client.clone())
        .get(SYSTEM_NAMESPACE)
        .await
        .context("system namespace")?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&Default::default())
        .await?;
    ensure!(nodes.items.len() == 3, "{} nodes", nodes.items.len());
    for (i, n) in nodes.items.iter().enumerate() {
        let labels = n.metadata.labels.clone().unwrap_or_default();
        let name = n.metadata.name.clone().unwrap_or_default();
        ensure!(name == format!("node-{}", i + 1));
        ensure!(labels.contains_key(ZONE_LABEL), "{name}: {labels:?}");
        let ip = n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .map(|a| a.address.clone());
        ensure!(
            ip.as_deref() == Some(&*format!("127.0.1.{}", i + 1)),
            "{name}: {ip:?}"
        );
        let tainted = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| !t.is_empty());
        ensure!(tainted == (name == "node-3"), "{name} taints");
        ensure!(
            labels.get(POOL_LABEL).map(String::as_str)
                == Some(if name == "node-3" {
                    "tainted"
                } else {
                    "general"
                })
        );
    }
    // Zones round-robin.
    let zones: Vec<String> = nodes
        .items
        .iter()
        .filter_map(|n| n.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned())
        .collect();
    ensure!(zones == ["zone-a", "zone-b", "zone-c"], "{zones:?}");

    // Origin: HEAD, ranges, counters, 404, unreachable.
    let blob = cluster.origin().add_blob("h.bin", 3 * MIB + 5, 9);
    let http = reqwest_free_get(&blob.url, Some("bytes=1048576-1048585")).await?;
    ensure!(http.0 == 206, "status {}", http.0);
    ensure!(
        http.1 == peerfill_e2e::cluster::generate(9, 1_048_576, 1_048_586),
        "range bytes differ"
    );
    let whole = reqwest_free_get(&blob.url, None).await?;
    ensure!(whole.0 == 200 && whole.1.len() as u64 == blob.size);
    let served = cluster.origin().served_of(&blob);
    ensure!(
        served.bytes == blob.size + 10 && served.requests == 2,
        "{served:?}"
    );
    ensure!(
        reqwest_free_get(&cluster.origin().not_found_url(), None)
            .await?
            .0
            == 404
    );
    ensure!(
        reqwest_free_get(&cluster.origin().unreachable_url(), None)
            .await
            .is_err()
    );

    // Processes: kill, restart, all gone after drop.
    cluster.restart_operator(0)?;
    let pid_files: Vec<_> = cluster.log_paths();
    ensure!(pid_files.len() == 4, "{pid_files:?}");
    cluster.kill_agent("node-1")?;
    ensure!(!cluster.agent_running("node-1"));
    cluster.restart_agent("node-1")?;
    let pids: Vec<u32> = cluster
        .nodes()
        .values()
        .filter_map(|n| n.agent_pid())
        .collect();
    drop(cluster);
    for pid in pids {
        ensure!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "agent {pid} survived the drop"
        );
    }
    ensure!(!work.exists(), "work dir {} left behind", work.display());
    Ok(())
}

/// A minimal HTTP/1.1 GET over a TCP stream: (status, body).
async fn reqwest_free_get(url: &str, range: Option<&str>) -> anyhow::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("http url")?;
    let (host, path) = rest.split_once('/').context("path")?;
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(host))
        .await??;
    let range = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\n{range}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("status")?;
    Ok((status, buf[split + 4..].to_vec()))
}

/// Apply → every matching node Complete with the right digest; a node
/// outside the selector and a tainted node get nothing; the label marks
/// the complete nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_fills_matching_nodes_only() -> anyhow::Result<()> {
    let cluster = start(6, |o| {
        // node-5: matches the selector but is tainted; node-6: another pool.
        let mut tainted = NodeOptions::tainted();
        tainted.labels.insert(POOL_LABEL.into(), "general".into());
        o.node_options.insert("node-5".into(), tainted);
        o.node_options.insert(
            "node-6".into(),
            NodeOptions::default().label(POOL_LABEL, "batch"),
        );
    })
    .await?;
    let blob = cluster.origin().add_blob("fill.bin", 32 * MIB, 1);
    let d = general_pool("fill", &blob.url, "data/fill.bin", Some(&blob.sha256));
    let want = targets(&cluster, &d).await?;
    if cluster.is_local() {
        ensure!(want == ["node-1", "node-2", "node-3", "node-4"], "{want:?}");
    }
    let applied = cluster.apply_distribution(&d).await?;
    let done = wait_complete(&cluster, &applied, want.len()).await?;
    check_all(&cluster, &applied, &want, &blob.sha256).await?;
    check_untouched(&cluster, &applied, &want).await?;
    let status = done.status.clone().unwrap_or_default();
    ensure!(status.size == Some(blob.size), "size {:?}", status.size);
    let key = node_label_key("default", "fill");
    for n in cluster.nodes().await? {
        ensure!(
            n.labels.contains_key(&key) == want.contains(&n.name),
            "label {key} on {}: {:?}",
            n.name,
            n.labels.get(&key)
        );
    }
    let served = cluster.origin().served_of(&blob);
    println!(
        "origin served {:.2} copies in {} requests",
        served.bytes as f64 / blob.size as f64,
        served.requests
    );
    cluster.delete_distribution(&applied).await?;
    check_gone_everywhere(&cluster, &applied).await?;
    Ok(())
}

/// A node added mid-way gets the data; a removed node is dropped from the
/// counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_added_midway_gets_data_and_removed_node_leaves_counts() -> anyhow::Result<()> {
    let mut cluster = start(4, |_| {}).await?;
    let blob = cluster.origin().add_blob("grow.bin", 48 * MIB, 2);
    cluster.origin().set_rate_limit(Some(12 * MIB));
    let d = general_pool("grow", &blob.url, "data/grow.bin", Some(&blob.blake3));
    let before = targets(&cluster, &d).await?;
    let applied = cluster.apply_distribution(&d).await?;
    wait_moving(&cluster, &applied, 1, MIB).await?;
    let Some(added) = cluster.add_node(NodeOptions::default()).await? else {
        return Ok(());
    };
    cluster.origin().set_rate_limit(None);
    let mut all = before.clone();
    all.push(added.clone());
    wait_complete(&cluster, &applied, all.len()).await?;
    check_all(&cluster, &applied, &all, &blob.blake3).await?;

    let removed = before[0].clone();
    ensure!(cluster.remove_node(&removed).await?);
    let after = cluster
        .wait_distribution(&applied, WAIT, "counts without the removed node", |d| {
            counts(d).0 as usize == all.len() - 1 && counts(d).1 as usize == all.len() - 1
        })
        .await?;
    ensure!(
        after
            .status
            .as_ref()
            .is_some_and(|s| s.failing_nodes.iter().all(|f| f.node != removed)),
        "{removed} still listed: {:?}",
        after.status
    );
    Ok(())
}

/// Deleting mid-transfer and after completion removes data, partial
/// files, status entries and labels everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_mid_transfer_and_after_completion_removes_everything() -> anyhow::Result<()> {
    let cluster = start(4, |_| {}).await?;
    let slow = cluster.origin().add_blob("slow.bin", 64 * MIB, 3);
    cluster.origin().set_rate_limit(Some(8 * MIB));
    let d = general_pool("slow", &slow.url, "data/slow.bin", None);
    let applied = cluster.apply_distribution(&d).await?;
    let seen = wait_moving(&cluster, &applied, 2, 2 * MIB).await?;
    ensure!(
        seen.values().all(|e| e.phase != NodePhase::Complete),
        "already complete: {seen:?}"
    );
    if let Some(l) = cluster.local() {
        // The leftover check looks at real files: partial files exist now.
        let partial = l.leftover_files(&applied);
        ensure!(!partial.is_empty(), "no partial file mid-transfer");
        println!("mid-transfer files: {partial:?}");
    }
    cluster.delete_distribution(&applied).await?;
    check_gone_everywhere(&cluster, &applied).await?;
    cluster.origin().set_rate_limit(None);

    let fast = cluster.origin().add_blob("fast.bin", 16 * MIB, 4);
    let d = general_pool("fast", &fast.url, "data/fast.bin", None);
    let want = targets(&cluster, &d).await?;
    let applied = cluster.apply_distribution(&d).await?;
    wait_complete(&cluster, &applied, want.len()).await?;
    check_all(&cluster, &applied, &want, &fast.blake3).await?;
    cluster.delete_distribution(&applied).await?;
    check_gone_everywhere(&cluster, &applied).await?;
    Ok(())
}

/// Origin 404 and an unreachable origin end in Failed with the reason in
/// the condition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_not_found_and_unreachable_fail_with_reason() -> anyhow::Result<()> {
    let cluster = start(3, |_| {}).await?;
    for (name, url, reason) in [
        ("gone", cluster.origin().not_found_url(), "OriginNotFound"),
        (
            "nowhere",
            cluster.origin().unreachable_url(),
            "OriginUnreachable",
        ),
    ] {
        let d = general_pool(name, &url, &format!("data/{name}.bin"), None);
        let applied = cluster.apply_distribution(&d).await?;
        let failed = wait_failed(&cluster, &applied).await?;
        let cond = failed
            .status
            .as_ref()
            .and_then(|s| s.condition(CONDITION_FAILED))
            .cloned()
            .context("Failed condition")?;
        ensure!(
            cond.reason == reason || cond.message.contains(reason),
            "{name}: Failed condition {cond:?}, want {reason}"
        );
        ensure!(
            cond.observed_generation == applied.metadata.generation,
            "{name}: observedGeneration {:?}",
            cond.observed_generation
        );
        println!("{name}: Failed {} {}", cond.reason, cond.message);
        cluster.delete_distribution(&applied).await?;
        check_gone_everywhere(&cluster, &applied).await?;
    }
    Ok(())
}

/// An agent restarted mid-transfer resumes: after the restart it receives
/// only what it lacked, not a whole copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_mid_transfer_resumes() -> anyhow::Result<()> {
    let mut cluster = start(3, |_| {}).await?;
    let size = 64 * MIB;
    let blob = cluster.origin().add_blob("resume.bin", size, 5);
    cluster.origin().set_rate_limit(Some(8 * MIB));
    let d = general_pool("resume", &blob.url, "data/resume.bin", Some(&blob.blake3));
    let want = targets(&cluster, &d).await?;
    let applied = cluster.apply_distribution(&d).await?;
    let seen = wait_moving(&cluster, &applied, 1, 16 * MIB).await?;
    let (victim, at_kill) = seen
        .iter()
        .max_by_key(|(_, e)| e.bytes_done)
        .map(|(n, e)| (n.clone(), e.bytes_done))
        .context("no progress")?;
    // Verified bytes the agent itself counted just before the crash.
    let verified_before = cluster.local().map(|l| {
        metric_sum(
            &l.agent_metrics(&victim),
            "peerfill_agent_received_bytes_total",
        )
    });
    cluster.kill_agent(&victim).await?;
    println!(
        "killed {victim}'s agent at {at_kill} bytes done (status), received {verified_before:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.restart_agent(&victim).await?;
    cluster.origin().set_rate_limit(None);
    wait_complete(&cluster, &applied, want.len()).await?;
    check_all(&cluster, &applied, &want, &blob.blake3).await?;
    if let Some(l) = cluster.local() {
        let after = metric_sum(
            &l.agent_metrics(&victim),
            "peerfill_agent_received_bytes_total",
        );
        println!("{victim} received {after} bytes after the restart (size {size})");
        // What a kill may lose: the unflushed durability batch and the
        // pieces in flight (store and swarm module docs).
        let may_lose =
            peerfill_agent::store::FLUSH_BYTES + peerfill_agent::swarm::DOWNLOAD_BUFFER_BYTES;
        ensure!(
            after + at_kill <= size + may_lose,
            "{victim} refetched too much after the restart: {after} received, {at_kill} were done"
        );
    }
    Ok(())
}

/// The sum of every sample of a metric family in Prometheus text.
fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The active operator killed mid-transfer: the standby takes the Lease
/// and the distribution completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_operator_takes_over_mid_transfer() -> anyhow::Result<()> {
    let mut cluster = start(4, |o| o.operators = 2).await?;
    let blob = cluster.origin().add_blob("failover.bin", 48 * MIB, 6);
    cluster.origin().set_rate_limit(Some(8 * MIB));
    let d = general_pool(
        "failover",
        &blob.url,
        "data/failover.bin",
        Some(&blob.sha256),
    );
    let want = targets(&cluster, &d).await?;
    let applied = cluster.apply_distribution(&d).await?;
    wait_moving(&cluster, &applied, 1, 2 * MIB).await?;
    let old = cluster.kill_leader().await?;
    let t = Instant::now();
    let deadline = t + WAIT;
    let new = loop {
        match cluster.leader().await? {
            Some(h) if h != old => break h,
            _ if Instant::now() > deadline => {
                anyhow::bail!(
                    "no new leader after {old}\n{}",
                    cluster.diagnostics(Some(&applied)).await
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    println!(
        "leader {old} killed; {new} took over in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    cluster.origin().set_rate_limit(None);
    wait_complete(&cluster, &applied, want.len()).await?;
    check_all(&cluster, &applied, &want, &blob.sha256).await?;
    Ok(())
}
