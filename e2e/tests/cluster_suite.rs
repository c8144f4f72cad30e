//! Issue #5's end-to-end suite: the real `kubectl` and the kube client
//! against the local cluster (or a real one with `E2E_KUBECONFIG`).
//!
//! Needs the binaries: `cargo build --workspace --bins`.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::cluster::{
    MIB, WAIT, check_all, check_gone_everywhere, counts, general_pool, start, targets,
    wait_complete, wait_moving,
};
use common::consumer::{Consumer, Seen};
use common::kubectl::{Kubectl, check_invalid_examples_refused};
use k8s_openapi::api::core::v1::{
    Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
};
use kube::Api;
use peerfill_crds::Distribution;
use peerfill_e2e::cluster::{
    NodeOptions, POOL_GENERAL, POOL_LABEL, ZONE_LABEL, is_complete, node_source_distribution,
    progress_in,
};

/// 8 nodes, driven with kubectl: apply, get (printer columns), wait for
/// Complete, delete. Prints apply → first piece moving and apply →
/// Complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_on_8_nodes_with_kubectl() -> anyhow::Result<()> {
    let cluster = start(8, |_| {}).await?;
    let k = Kubectl::with_kubeconfig(cluster.kubeconfig_path())?;
    let size = 64 * MIB;
    let blob = cluster.origin().add_blob("happy.bin", size, 11);
    let typed = general_pool("happy", &blob.url, "models/happy.bin", Some(&blob.sha256));
    let want = targets(&cluster, &typed).await?;
    ensure!(
        !want.is_empty(),
        "no node matches {POOL_LABEL}={POOL_GENERAL}"
    );
    let manifest = k.dir.path().join("happy.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: peerfill.dev/v1alpha1\nkind: Distribution\nmetadata:\n  name: happy\n  namespace: default\nspec:\n  source:\n    http:\n      url: {}\n      digest: {}\n  target:\n    nodeSelector:\n      {POOL_LABEL}: {POOL_GENERAL}\n    path: models/happy.bin\n  strategy:\n    pieceSize: 1048576\n    maxOriginConnections: 4\n",
            blob.url, blob.sha256
        ),
    )?;

    let t0 = Instant::now();
    let out = k.ok(&["apply", "-f", &manifest.to_string_lossy()]).await?;
    ensure!(
        out.contains("distribution.peerfill.dev/happy created"),
        "{out}"
    );
    let applied: Distribution = Api::namespaced(cluster.client(), "default")
        .get("happy")
        .await?;
    let uid = applied.metadata.uid.clone().context("uid")?;

    let first_origin_byte = async {
        while cluster.origin().served_of(&blob).bytes == 0 {
            if t0.elapsed() > WAIT {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Some(t0.elapsed())
    };
    let first_reported = async {
        cluster
            .wait_nodefills(WAIT, "a node reporting bytes", |f| {
                progress_in(f, &uid).values().any(|e| e.bytes_done > 0)
            })
            .await
            .map(|_| t0.elapsed())
    };
    let complete = async {
        let o = k
            .run(&[
                "wait",
                "--for=condition=Complete",
                "dist/happy",
                "-n",
                "default",
                "--timeout=90s",
            ])
            .await;
        (o, t0.elapsed())
    };
    let (first_byte, first_status, (waited, to_complete)) =
        tokio::join!(first_origin_byte, first_reported, complete);
    let waited = waited?;
    if !waited.ok {
        anyhow::bail!(
            "kubectl wait: {}{}\n{}",
            waited.stdout,
            waited.stderr,
            cluster.diagnostics(Some(&applied)).await
        );
    }
    ensure!(waited.stdout.contains("condition met"), "{}", waited.stdout);
    let first_status = first_status?;

    let table = k.ok(&["get", "dist", "-n", "default"]).await?;
    let header = table.lines().next().unwrap_or("");
    for col in ["NAME", "PHASE", "READY", "PROGRESS", "THROUGHPUT", "AGE"] {
        ensure!(header.contains(col), "header {header:?} lacks {col}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with("happy "))
        .context("no happy row")?;
    let ready = format!("{0}/{0}", want.len());
    ensure!(row.contains("Complete") && row.contains(&ready), "{table}");

    check_all(&cluster, &applied, &want, &blob.sha256).await?;
    let served = cluster.origin().served_of(&blob);
    let copies = served.bytes as f64 / size as f64;
    let progress = cluster.node_progress(&applied).await?;
    let from_peers: u64 = progress.values().map(|e| e.bytes_from_peers).sum();
    let from_origin: u64 = progress.values().map(|e| e.bytes_from_origin).sum();
    println!(
        "TIMING happy path, {} nodes x {} MiB, 1 MiB pieces: apply -> first origin byte {:.3}s, -> first NodeFill progress {:.3}s, -> Complete (kubectl wait returned) {:.3}s",
        want.len(),
        size / MIB,
        first_byte.map_or(f64::NAN, |d| d.as_secs_f64()),
        first_status.as_secs_f64(),
        to_complete.as_secs_f64()
    );
    println!(
        "origin served {copies:.2} copies in {} requests; nodes report {} MiB from the origin, {} MiB from peers",
        served.requests,
        from_origin / MIB,
        from_peers / MIB
    );
    // The origin serves about one copy whatever the node count.
    ensure!(copies <= 1.5, "origin served {copies:.2} copies");

    let out = k
        .ok(&["delete", "dist", "happy", "-n", "default", "--timeout=90s"])
        .await?;
    ensure!(out.contains("deleted"), "{out}");
    check_gone_everywhere(&cluster, &applied).await?;
    Ok(())
}

/// Node source: a file pre-placed under one node's data root is seeded to
/// the others (not to the builder itself, excluded by node affinity); the
/// seed file stays after the Distribution is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_source_seeds_the_other_nodes() -> anyhow::Result<()> {
    const BUILDER: &str = "peerfill-e2e/builder";
    let cluster = start(4, |o| {
        o.node_options.insert(
            "node-1".into(),
            NodeOptions::default().label(BUILDER, "true"),
        );
    })
    .await?;
    let Some(local) = cluster.local() else {
        println!("SKIP (real cluster): the suite cannot place a file on a node's disk");
        return Ok(());
    };
    let size = 24 * MIB + 12345;
    let bytes = peerfill_e2e::cluster::generate(21, 0, size);
    let digest = format!("blake3:{}", blake3::hash(&bytes).to_hex());
    let seed = local.node_data_dir("node-1")?.join("seed/build.bin");
    std::fs::create_dir_all(seed.parent().context("parent")?)?;
    std::fs::write(&seed, &bytes)?;
    drop(bytes);

    let mut d = node_source_distribution("seeded", "node-1", "seed/build.bin", "builds/build.bin");
    d.spec.target.node_affinity = Some(NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: BUILDER.into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                }]),
                match_fields: None,
            }],
        }),
        ..NodeAffinity::default()
    });
    let want = targets(&cluster, &d).await?;
    ensure!(want == ["node-2", "node-3", "node-4"], "{want:?}");
    let applied = cluster.apply_distribution(&d).await?;
    let done = wait_complete(&cluster, &applied, want.len()).await?;
    ensure!(
        done.status.as_ref().and_then(|s| s.size) == Some(size),
        "size {:?}",
        done.status.as_ref().and_then(|s| s.size)
    );
    check_all(&cluster, &applied, &want, &digest).await?;
    ensure!(
        !local
            .node_data_dir("node-1")?
            .join("builds/build.bin")
            .exists(),
        "the builder is not a target"
    );
    cluster.delete_distribution(&applied).await?;
    check_gone_everywhere(&cluster, &applied).await?;
    if let Some(local) = cluster.local() {
        local.check_file("node-1", "seed/build.bin", &digest)?;
    }
    Ok(())
}

fn zones(values: &[&str]) -> NodeAffinity {
    NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: ZONE_LABEL.into(),
                    operator: "In".into(),
                    values: Some(values.iter().map(|s| s.to_string()).collect()),
                }]),
                match_fields: None,
            }],
        }),
        ..NodeAffinity::default()
    }
}

/// Two distributions at once whose targets overlap: both complete, each
/// node holds what it should.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_distributions_sharing_nodes() -> anyhow::Result<()> {
    let cluster = start(6, |_| {}).await?;
    let a_blob = cluster.origin().add_blob("a.bin", 32 * MIB, 31);
    let b_blob = cluster.origin().add_blob("b.bin", 24 * MIB, 32);
    let mut a = general_pool("share-a", &a_blob.url, "shared/a.bin", Some(&a_blob.blake3));
    a.spec.target.node_affinity = Some(zones(&["zone-a", "zone-b"]));
    let mut b = general_pool("share-b", &b_blob.url, "shared/b.bin", Some(&b_blob.sha256));
    b.spec.target.node_affinity = Some(zones(&["zone-b", "zone-c"]));
    let (ta, tb) = (targets(&cluster, &a).await?, targets(&cluster, &b).await?);
    if ta.is_empty() || tb.is_empty() {
        println!("SKIP: no nodes in zones zone-a/b/c ({ta:?}, {tb:?})");
        return Ok(());
    }
    if cluster.is_local() {
        ensure!(ta == ["node-1", "node-2", "node-4", "node-5"], "{ta:?}");
        ensure!(tb == ["node-2", "node-3", "node-5", "node-6"], "{tb:?}");
    }
    let (a, b) = (
        cluster.apply_distribution(&a).await?,
        cluster.apply_distribution(&b).await?,
    );
    let (ra, rb) = tokio::join!(
        wait_complete(&cluster, &a, ta.len()),
        wait_complete(&cluster, &b, tb.len())
    );
    ra?;
    rb?;
    check_all(&cluster, &a, &ta, &a_blob.blake3).await?;
    check_all(&cluster, &b, &tb, &b_blob.sha256).await?;
    common::cluster::check_untouched(&cluster, &a, &ta).await?;
    common::cluster::check_untouched(&cluster, &b, &tb).await?;
    for d in [&a, &b] {
        cluster.delete_distribution(d).await?;
    }
    check_gone_everywhere(&cluster, &a).await?;
    check_gone_everywhere(&cluster, &b).await?;
    Ok(())
}

/// Every `examples/invalid/*.yaml` is refused by the real kubectl against
/// the cluster, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_manifests_refused_naming_the_field() -> anyhow::Result<()> {
    let cluster = start(1, |_| {}).await?;
    let k = Kubectl::with_kubeconfig(cluster.kubeconfig_path())?;
    let n = check_invalid_examples_refused(&k).await?;
    println!("{n} invalid manifests refused");
    Ok(())
}

/// A node that joins mid-way gets the content too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_joins_mid_way() -> anyhow::Result<()> {
    let mut cluster = start(8, |_| {}).await?;
    let blob = cluster.origin().add_blob("join.bin", 48 * MIB, 41);
    cluster.origin().set_rate_limit(Some(12 * MIB));
    let d = general_pool("join", &blob.url, "data/join.bin", Some(&blob.blake3));
    let mut want = targets(&cluster, &d).await?;
    let applied = cluster.apply_distribution(&d).await?;
    wait_moving(&cluster, &applied, 2, MIB).await?;
    let Some(joined) = cluster.add_node(NodeOptions::default()).await? else {
        return Ok(());
    };
    cluster.origin().set_rate_limit(None);
    want.push(joined.clone());
    wait_complete(&cluster, &applied, want.len()).await?;
    check_all(&cluster, &applied, &want, &blob.blake3).await?;
    Ok(())
}

/// An agent killed mid-transfer and started again: everything completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_and_restarted() -> anyhow::Result<()> {
    let mut cluster = start(8, |_| {}).await?;
    let blob = cluster.origin().add_blob("crash.bin", 48 * MIB, 51);
    cluster.origin().set_rate_limit(Some(12 * MIB));
    let d = general_pool("crash", &blob.url, "data/crash.bin", Some(&blob.sha256));
    let want = targets(&cluster, &d).await?;
    let applied = cluster.apply_distribution(&d).await?;
    let seen = wait_moving(&cluster, &applied, 2, 2 * MIB).await?;
    let victim = seen
        .iter()
        .max_by_key(|(_, e)| e.bytes_done)
        .map(|(n, _)| n.clone())
        .context("no progress")?;
    cluster.kill_agent(&victim).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart_agent(&victim).await?;
    cluster.origin().set_rate_limit(None);
    wait_complete(&cluster, &applied, want.len()).await?;
    check_all(&cluster, &applied, &want, &blob.sha256).await?;
    Ok(())
}

/// The only operator restarted mid-transfer: the distribution completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_restarted_mid_transfer() -> anyhow::Result<()> {
    let mut cluster = start(8, |_| {}).await?;
    let blob = cluster.origin().add_blob("oprestart.bin", 48 * MIB, 61);
    cluster.origin().set_rate_limit(Some(12 * MIB));
    let d = general_pool(
        "oprestart",
        &blob.url,
        "data/oprestart.bin",
        Some(&blob.blake3),
    );
    let want = targets(&cluster, &d).await?;
    let applied = cluster.apply_distribution(&d).await?;
    wait_moving(&cluster, &applied, 2, MIB).await?;
    cluster.kill_operator(0).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart_operator(0).await?;
    cluster.origin().set_rate_limit(None);
    wait_complete(&cluster, &applied, want.len()).await?;
    check_all(&cluster, &applied, &want, &blob.blake3).await?;
    Ok(())
}

/// A Distribution deleted mid-transfer leaves no partial file anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_mid_transfer_leaves_no_partial_files() -> anyhow::Result<()> {
    let cluster = start(8, |_| {}).await?;
    let blob = cluster.origin().add_blob("abort.bin", 64 * MIB, 71);
    cluster.origin().set_rate_limit(Some(8 * MIB));
    let d = general_pool("abort", &blob.url, "data/abort.bin", None);
    let applied = cluster.apply_distribution(&d).await?;
    wait_moving(&cluster, &applied, 3, 2 * MIB).await?;
    if let Some(l) = cluster.local() {
        let files = l.leftover_files(&applied);
        ensure!(!files.is_empty(), "no partial file mid-transfer");
    }
    cluster.delete_distribution(&applied).await?;
    check_gone_everywhere(&cluster, &applied).await?;
    Ok(())
}

/// Issue #12 item 6: what a workload set up like `examples/consume.yaml`
/// (required node affinity on the label, the target's directory mounted
/// read-only) can see, polled every ~20 ms on every target node while a
/// Distribution fills and while it moves to a new version: the target path
/// is absent or holds one complete version, never a partial or mixed file,
/// and the label is set only where a complete version is in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_see_the_label_only_with_complete_content_never_a_partial_file()
-> anyhow::Result<()> {
    let cluster = start(6, |_| {}).await?;
    let Some(local) = cluster.local() else {
        println!("SKIPPED: needs the local cluster (reads the nodes' disks)");
        return Ok(());
    };
    let size = 24 * MIB;
    let v1 = cluster.origin().add_blob("consume-v1.bin", size, 81);
    let v2 = cluster.origin().add_blob("consume-v2.bin", size, 82);
    cluster.origin().set_rate_limit(Some(6 * MIB));
    let path = "models/consume/weights.bin";
    let d = general_pool("consume", &v1.url, path, None);
    let want = targets(&cluster, &d).await?;
    let paths = want
        .iter()
        .map(|n| Ok((n.clone(), local.node_data_dir(n)?.join(path))))
        .collect::<anyhow::Result<_>>()?;
    let label = peerfill_crds::node_label_key("default", "consume");
    let consumer = Consumer::start(
        &cluster,
        &want,
        paths,
        label.clone(),
        vec![v1.clone(), v2.clone()],
    );

    let applied = cluster.apply_distribution(&d).await?;
    wait_complete(&cluster, &applied, want.len()).await?;
    check_all(&cluster, &applied, &want, &v1.blake3).await?;
    // The agents label right after they report Complete.
    wait_labelled(&cluster, &want, &label).await?;

    // A new version: the URL moves to v2 while workloads keep reading v1.
    let api: Api<Distribution> = Api::namespaced(cluster.client(), "default");
    let patch = serde_json::json!({"spec": {"source": {"http": {"url": v2.url}}}});
    let edited = api
        .patch(
            "consume",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    let generation = edited.metadata.generation;
    cluster
        .wait_distribution(&applied, WAIT, "the new version Complete everywhere", |d| {
            d.status.as_ref().and_then(|s| s.observed_generation) == generation
                && is_complete(d)
                && counts(d).1 as usize == want.len()
        })
        .await?;
    check_all(&cluster, &applied, &want, &v2.blake3).await?;
    wait_labelled(&cluster, &want, &label).await?;
    cluster.origin().set_rate_limit(None);
    let seen = consumer.stop().await?;

    println!(
        "{} rounds; per node: {:?}",
        seen.rounds,
        seen.history.values().next()
    );
    ensure!(
        seen.violations.is_empty(),
        "a workload could have seen:\n{}",
        seen.violations.join("\n")
    );
    for n in &want {
        let h = seen.history.get(n).map(Vec::as_slice).unwrap_or_default();
        // The watcher saw the whole life: nothing, v1 whole, then v2 whole
        // (never back to nothing in between: the swap is one rename).
        ensure!(
            h == [Seen::Absent, Seen::Version(0), Seen::Version(1)],
            "{n}: saw {h:?}, want [Absent, v1, v2]"
        );
        ensure!(
            seen.labelled_rounds.get(n).copied().unwrap_or(0) > 0,
            "{n}: never saw its label"
        );
    }
    Ok(())
}

/// Waits until every node of `nodes` carries `label`.
async fn wait_labelled(
    cluster: &peerfill_e2e::cluster::Cluster,
    nodes: &[String],
    label: &str,
) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(cluster.client());
    let t = Instant::now();
    loop {
        let labelled: Vec<String> = api
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|n| {
                n.metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(label))
            })
            .filter_map(|n| n.metadata.name)
            .collect();
        if nodes.iter().all(|n| labelled.contains(n)) {
            return Ok(());
        }
        ensure!(
            t.elapsed() < WAIT,
            "timed out waiting for {label} on {nodes:?} (labelled: {labelled:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The consumer above is only worth its silence if it does flag what it
/// looks for: a partial file, mixed versions, a symlink at the path.
#[tokio::test]
async fn the_consumer_flags_partial_mixed_and_symlinked_files() -> anyhow::Result<()> {
    let origin = peerfill_e2e::cluster::Origin::start()?;
    let (v1, v2) = (
        origin.add_blob("c1.bin", 2 * MIB, 1),
        origin.add_blob("c2.bin", 2 * MIB, 2),
    );
    let versions = vec![v1.clone(), v2.clone()];
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("weights.bin");
    let bytes =
        |b: &peerfill_e2e::cluster::Blob| peerfill_e2e::cluster::generate(b.seed, 0, b.size);
    ensure!(
        common::consumer::look(&path, &versions, None)
            .await
            .map_err(anyhow::Error::msg)?
            == (None, Seen::Absent)
    );
    std::fs::write(&path, bytes(&v2))?;
    ensure!(matches!(
        common::consumer::look(&path, &versions, None)
            .await
            .map_err(anyhow::Error::msg)?,
        (Some(_), Seen::Version(1))
    ));
    let partial = &bytes(&v1)[..MIB as usize];
    std::fs::write(&path, partial)?;
    ensure!(
        common::consumer::look(&path, &versions, None)
            .await
            .is_err()
    );
    let mut mixed = bytes(&v1);
    mixed[MIB as usize..].copy_from_slice(&bytes(&v2)[MIB as usize..]);
    std::fs::write(&path, mixed)?;
    ensure!(
        common::consumer::look(&path, &versions, None)
            .await
            .is_err()
    );
    std::fs::remove_file(&path)?;
    let real = dir.path().join("real.bin");
    std::fs::write(&real, bytes(&v1))?;
    std::os::unix::fs::symlink(&real, &path)?;
    ensure!(
        common::consumer::look(&path, &versions, None)
            .await
            .is_err()
    );
    Ok(())
}

/// Issue #12 item 3: a private origin (401 without the right header) is
/// read with the headers of the `headersFrom` Secret. A missing Secret makes
/// the Distribution Failed with a reason and message naming it; once it is
/// created the readers pick it up without any edit. The header value shows
/// up in no status, NodeFill, Event or process log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_origin_with_headers_from_a_secret() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{Event, Secret};
    use peerfill_crds::{CONDITION_FAILED, HeadersFrom, NodeFill};

    const TOKEN: &str = "Bearer pf-e2e-s3cr3t-7d1c";
    let cluster = start(4, |_| {}).await?;
    let blob = cluster.origin().add_blob("private.bin", 8 * MIB, 91);
    cluster
        .origin()
        .require_header(Some(("authorization", TOKEN)));
    let mut d = general_pool("private", &blob.url, "private/weights.bin", None);
    if let Some(h) = d.spec.source.http.as_mut() {
        h.headers_from = Some(HeadersFrom {
            secret_name: "registry-token".into(),
        });
    }
    let want = targets(&cluster, &d).await?;
    let applied = cluster.apply_distribution(&d).await?;

    // No Secret yet: Failed, naming it.
    let failed = cluster
        .wait_distribution(&applied, WAIT, "Failed for the missing Secret", |d| {
            d.status.as_ref().is_some_and(|s| {
                s.condition(CONDITION_FAILED).is_some_and(|c| {
                    c.status == "True" && c.reason == "OriginHeadersSecretNotFound"
                })
            })
        })
        .await?;
    let message = failed
        .status
        .as_ref()
        .and_then(|s| s.condition(CONDITION_FAILED))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(
        message.contains("default/registry-token"),
        "the Failed message does not name the Secret: {message}"
    );

    // The Secret appears: the readers re-read it by themselves.
    let secrets: Api<Secret> = Api::namespaced(cluster.client(), "default");
    // The stand-in, like the API server, folds stringData into data.
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "registry-token", "namespace": "default"},
        "stringData": {"Authorization": TOKEN},
    }))?;
    secrets.create(&Default::default(), &secret).await?;
    wait_complete(&cluster, &applied, want.len()).await?;
    check_all(&cluster, &applied, &want, &blob.blake3).await?;

    // The value went to the origin and nowhere else.
    let dist = serde_json::to_string(
        &Api::<Distribution>::namespaced(cluster.client(), "default")
            .get("private")
            .await?,
    )?;
    let fills = serde_json::to_string(
        &Api::<NodeFill>::all(cluster.client())
            .list(&Default::default())
            .await?
            .items,
    )?;
    let events = serde_json::to_string(
        &Api::<Event>::all(cluster.client())
            .list(&Default::default())
            .await?
            .items,
    )?;
    for (what, text) in [
        ("the Distribution", &dist),
        ("NodeFills", &fills),
        ("Events", &events),
    ] {
        ensure!(!text.contains("s3cr3t"), "{what} carry the header value");
    }
    ensure!(
        fills.contains("registry-token"),
        "the NodeFills do not name the Secret (is headersFrom passed on?)"
    );
    if let Some(l) = cluster.local() {
        for log in l.log_paths() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            ensure!(
                !text.contains("s3cr3t"),
                "{} holds the header value",
                log.display()
            );
        }
    }
    Ok(())
}

/// Issue 12 item 2: a new version (the URL, or the node source's path,
/// edited to content with ~1 % of its bytes changed) is swapped in on every
/// node with the new bytes and the Node annotation naming it, and a node
/// that is not an origin reader receives only the pieces the edit touched
/// (its previous copy supplies the rest). `peerfill-versions` is the same
/// run at 1 GiB, reported in BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_moves_only_the_pieces_it_changed() -> anyhow::Result<()> {
    use peerfill_e2e::versions::{SourceKind, VersionsOptions, run};
    let report = run(&VersionsOptions {
        nodes: 5,
        size: 32 * MIB,
        changed: 0.01,
        regions: 2,
        piece_size: None,
        sources: vec![SourceKind::Http, SourceKind::Node],
        timeout: WAIT,
    })
    .await?;
    for r in &report.runs {
        let lines = r.render().join("\n");
        println!("{lines}");
        // A piece may arrive twice in the endgame: one piece of slack.
        let allowed = (r.touched_piece_bytes + r.piece_size) as f64 / r.size as f64;
        ensure!(
            r.nodes.iter().any(|b| !b.reader),
            "no node outside the origin readers:\n{lines}"
        );
        ensure!(
            r.max_share_non_reader <= allowed,
            "a node moved more than the touched pieces ({allowed:.4} of the size):\n{lines}"
        );
        ensure!(
            r.touched_share < 0.1,
            "the edit touched too much to tell reuse from a refetch:\n{lines}"
        );
        if r.source == SourceKind::Http {
            ensure!(
                r.origin_served_new_version <= r.size + r.size / 10,
                "the origin served more than one copy for the new version:\n{lines}"
            );
        }
    }
    Ok(())
}
