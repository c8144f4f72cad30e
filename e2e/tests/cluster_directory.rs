//! Issue #12 item 1 on the local cluster (real `kubectl`-driven API
//! stand-in, operator and agents as real processes), or a real one with
//! `E2E_KUBECONFIG` where a test can run there:
//! - a model-shaped directory — 4 × 256 MiB shards and 10 files under
//!   1 MiB, some nested — from an HTTP origin. Every node ends with every
//!   file's exact bytes; the target directory never shows up partial on any
//!   node (polled throughout); the status counts the files; the origin
//!   serves about one copy;
//! - a small directory that holds exactly its files and goes away with its
//!   Distribution;
//! - a directory from a node source (nested, an executable kept);
//! - a directory from an origin without Range support: `Failed`, reason
//!   `OriginNoRangeSupport`, never read whole.
//!
//! Needs the binaries: `cargo build --workspace --bins`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use common::cluster::{
    MIB, check_gone_everywhere, general_pool, start, targets, wait_complete, wait_failed,
};
use k8s_openapi::api::core::v1::{
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
};
use peerfill_crds::HttpFile;
use peerfill_e2e::cluster::{NodeOptions, node_source_distribution};
use sha2::Digest as _;

/// Path beneath the directory and size of each file of the model.
fn model() -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = (1..=4)
        .map(|i| (format!("model-0000{i}-of-00004.safetensors"), 256 * MIB))
        .collect();
    for (p, len) in [
        ("config.json", 612),
        ("generation_config.json", 137),
        ("tokenizer.json", 900 << 10),
        ("tokenizer_config.json", 50_211),
        ("special_tokens_map.json", 414),
        ("chat_template.jinja", 4_096),
        ("README.md", 7_003),
        ("LICENSE", 11_357),
        ("tokenizer/vocab.txt", 231_508),
        ("tokenizer/merges.txt", 456_318),
    ] {
        files.push((p.to_string(), len));
    }
    files
}

fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_directory_appears_whole_and_only_when_complete() -> anyhow::Result<()> {
    let cluster = start(3, |_| {}).await?;
    let Some(local) = cluster.local() else {
        println!("skipped: reads the nodes' data directories");
        return Ok(());
    };
    let origin = cluster.origin();
    let files = model();
    let blobs: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, (p, len))| origin.add_blob(&format!("llama/{p}"), *len, 40 + i as u64))
        .collect();
    let total: u64 = files.iter().map(|(_, l)| l).sum();
    let base = format!("{}/blobs/llama/", origin.base_url());
    let mut d = general_pool("llama", &base, "models/llama", None);
    let http = d.spec.source.http.as_mut().context("http source")?;
    // Every file at base + path; the shards with their digest, checked
    // by every node as the directory is written.
    http.files = files
        .iter()
        .zip(&blobs)
        .map(|((p, len), b)| HttpFile {
            path: p.clone(),
            url: None,
            digest: (*len > MIB).then(|| b.sha256.clone()),
        })
        .collect();
    d.spec.strategy.piece_size = Some(4 * MIB);
    let want = targets(&cluster, &d).await?;
    ensure!(want.len() >= 2, "targets: {want:?}");

    // Poll every node's target while the content moves: it must be absent,
    // or whole (every file at its full size).
    let dirs: Vec<PathBuf> = want
        .iter()
        .map(|n| Ok(local.node_data_dir(n)?.join("models/llama")))
        .collect::<anyhow::Result<_>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (dirs, files, stop, rounds) =
            (dirs.clone(), files.clone(), stop.clone(), rounds.clone());
        tokio::task::spawn_blocking(move || {
            let mut violations = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for d in &dirs {
                    if !d.exists() {
                        continue;
                    }
                    for (p, len) in &files {
                        let got = std::fs::metadata(d.join(p)).map(|m| m.len()).ok();
                        if got != Some(*len) && violations.len() < 10 {
                            violations.push(format!("{}: {p} is {got:?} of {len}", d.display()));
                        }
                    }
                }
                rounds.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
            violations
        })
    };

    let applied = cluster.apply_distribution(&d).await?;
    let done = wait_complete(&cluster, &applied, want.len()).await;
    stop.store(true, Ordering::Relaxed);
    let violations = watcher.await?;
    let done = match done {
        Ok(d) => d,
        Err(e) => anyhow::bail!("{e}\n{}", cluster.diagnostics(Some(&applied)).await),
    };
    println!(
        "watched {} rounds over {} nodes; violations: {violations:?}",
        rounds.load(Ordering::Relaxed),
        dirs.len()
    );
    ensure!(
        violations.is_empty(),
        "a partial directory was visible: {violations:?}"
    );

    let status = done.status.clone().unwrap_or_default();
    ensure!(
        status.files == Some(files.len() as u64),
        "status.files {:?}",
        status.files
    );
    ensure!(
        status.size.is_some_and(|s| s > total),
        "size {:?} counts the table too",
        status.size
    );
    let mut by_node = BTreeMap::new();
    for d in &dirs {
        for ((p, _), b) in files.iter().zip(&blobs) {
            let got = sha256_file(&d.join(p))?;
            ensure!(
                got == b.sha256,
                "{}: {p} has {got}, want {}",
                d.display(),
                b.sha256
            );
        }
        by_node.insert(d.display().to_string(), files.len());
    }
    let served: u64 = blobs.iter().map(|b| origin.served_of(b).bytes).sum();
    let copies = served as f64 / total as f64;
    println!(
        "directory of {} files, {} MiB, on {} nodes: origin served {copies:.3} copies; verified {by_node:?}",
        files.len(),
        total / MIB,
        want.len()
    );
    ensure!(copies <= 1.05, "origin served {copies:.3} copies");
    Ok(())
}

/// The files under `dir`, relative, sorted, without the agent's own
/// (names starting with `.peerfill`: it keeps the file table there).
fn tree(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("{}", d.display()))? {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".peerfill"))
            {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir)?.to_string_lossy().into_owned();
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Four files (two shards with digests, the config and the tokenizer
/// without), one base URL, to 4 nodes: each node holds exactly these files
/// (and the agent's own table), and deleting the Distribution removes the
/// directory everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_directory_holds_exactly_its_files_and_goes_with_its_distribution()
-> anyhow::Result<()> {
    let cluster = start(4, |_| {}).await?;
    let files: [(&str, u64); 4] = [
        ("config.json", 2 * 1024 + 17),
        ("model-00001-of-00002.safetensors", 12 * MIB),
        ("model-00002-of-00002.safetensors", 9 * MIB + 123),
        ("tokenizer.json", 300 * 1024),
    ];
    let blobs: Vec<_> = files
        .iter()
        .zip(40..)
        .map(|((name, size), seed)| {
            cluster
                .origin()
                .add_blob(&format!("llm/{name}"), *size, seed)
        })
        .collect();
    let base = format!("{}/blobs/llm/", cluster.origin().base_url());
    let mut d = general_pool("llm", &base, "models/llm", None);
    if let Some(http) = d.spec.source.http.as_mut() {
        http.files = files
            .iter()
            .zip(&blobs)
            .map(|((name, _), blob)| HttpFile {
                path: (*name).into(),
                url: None,
                digest: name.ends_with(".safetensors").then(|| blob.sha256.clone()),
            })
            .collect();
    }
    let want = targets(&cluster, &d).await?;
    ensure!(!want.is_empty(), "no target");
    let applied = cluster.apply_distribution(&d).await?;
    let done = wait_complete(&cluster, &applied, want.len()).await?;
    let st = done.status.context("status")?;
    let bytes: u64 = files.iter().map(|(_, s)| s).sum();
    ensure!(st.files == Some(4), "status.files {:?}", st.files);
    // The size is the whole content: the file table, then the files.
    ensure!(
        st.size.is_some_and(|s| s > bytes),
        "status.size {:?} for {bytes} bytes of files",
        st.size
    );
    let served: u64 = blobs
        .iter()
        .map(|b| cluster.origin().served_of(b).bytes)
        .sum();
    let copies = served as f64 / bytes as f64;
    println!(
        "{} nodes hold the 4-file directory ({bytes} bytes of files, content {} bytes); origin served {copies:.2} copies",
        want.len(),
        st.size.unwrap_or_default()
    );
    ensure!(copies <= 1.5, "origin served {copies:.2} copies");
    if let Some(local) = cluster.local() {
        let names: Vec<String> = files.iter().map(|(n, _)| n.to_string()).collect();
        for n in &want {
            for ((name, _), blob) in files.iter().zip(&blobs) {
                local.check_file(n, &format!("models/llm/{name}"), &blob.sha256)?;
            }
            let dir = local.node_data_dir(n)?.join("models/llm");
            ensure!(tree(&dir)? == names, "{n}: {:?}", tree(&dir)?);
        }
    }
    cluster.delete_distribution(&applied).await?;
    check_gone_everywhere(&cluster, &applied).await?;
    if let Some(local) = cluster.local() {
        for n in &want {
            let dir = local.node_data_dir(n)?.join("models/llm");
            ensure!(!dir.exists(), "{n} still holds {}", dir.display());
        }
    }
    Ok(())
}

/// A directory under one node's data root (nested, one file executable)
/// is walked by its agent and lands whole on the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_source_directory_is_seeded_whole() -> anyhow::Result<()> {
    const BUILDER: &str = "peerfill-e2e/builder";
    let cluster = start(3, |o| {
        o.node_options.insert(
            "node-1".into(),
            NodeOptions::default().label(BUILDER, "true"),
        );
    })
    .await?;
    let Some(local) = cluster.local() else {
        println!("SKIP (real cluster): the suite cannot place files on a node's disk");
        return Ok(());
    };
    let files: [(&str, u64); 3] = [
        ("bin/tool", 3 * MIB + 5),
        ("lib/libtool.so", 5 * MIB + 77),
        ("README", 900),
    ];
    let root = local.node_data_dir("node-1")?.join("seed/toolchain");
    let mut digests = Vec::new();
    for ((name, size), seed) in files.iter().zip(60..) {
        let bytes = peerfill_e2e::cluster::generate(seed, 0, *size);
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().context("parent")?)?;
        std::fs::write(&path, &bytes)?;
        digests.push(format!("blake3:{}", blake3::hash(&bytes).to_hex()));
    }
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            root.join("bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )?;
    }

    let mut d = node_source_distribution(
        "toolchain",
        "node-1",
        "seed/toolchain",
        "toolchains/nightly",
    );
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
    ensure!(want == ["node-2", "node-3"], "{want:?}");
    let applied = cluster.apply_distribution(&d).await?;
    let done = wait_complete(&cluster, &applied, want.len()).await?;
    let st = done.status.context("status")?;
    ensure!(st.files == Some(3), "status.files {:?}", st.files);
    let mut names: Vec<String> = files.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    for n in &want {
        for ((name, _), digest) in files.iter().zip(&digests) {
            local.check_file(n, &format!("toolchains/nightly/{name}"), digest)?;
        }
        let dir = local.node_data_dir(n)?.join("toolchains/nightly");
        ensure!(tree(&dir)? == names, "{n}: {:?}", tree(&dir)?);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("bin/tool"))?
            .permissions()
            .mode();
        ensure!(mode & 0o111 != 0, "{n}: bin/tool mode {mode:o}");
    }
    cluster.delete_distribution(&applied).await?;
    check_gone_everywhere(&cluster, &applied).await?;
    // The seeder never deletes its source.
    ensure!(tree(&root)?.len() == 3, "the source directory is intact");
    Ok(())
}

/// A directory needs Range requests: from an origin that ignores them the
/// Distribution fails with `OriginNoRangeSupport` (never read whole by one
/// node, as a single file would be), and no node holds a directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_from_an_origin_without_ranges_fails_with_the_reason() -> anyhow::Result<()> {
    let cluster = start(3, |_| {}).await?;
    if !cluster.is_local() {
        println!("SKIP (real cluster): needs the test origin's no-Range mode");
        return Ok(());
    }
    let blobs: Vec<_> = [("config.json", 1000), ("weights.bin", 6 * MIB)]
        .iter()
        .zip(70..)
        .map(|((name, size), seed)| {
            cluster
                .origin()
                .add_blob(&format!("nr/{name}"), *size, seed)
        })
        .collect();
    cluster.origin().set_ignore_ranges(true);
    let base = format!("{}/blobs/nr/", cluster.origin().base_url());
    let mut d = general_pool("noranges-dir", &base, "models/nr", None);
    if let Some(http) = d.spec.source.http.as_mut() {
        http.files = ["config.json", "weights.bin"]
            .map(|path| HttpFile {
                path: path.into(),
                url: None,
                digest: None,
            })
            .to_vec();
    }
    let want = targets(&cluster, &d).await?;
    let applied = cluster.apply_distribution(&d).await?;
    let failed = wait_failed(&cluster, &applied).await?;
    let st = failed.status.context("status")?;
    let reason = st
        .condition(peerfill_crds::CONDITION_FAILED)
        .map(|c| c.reason.clone());
    ensure!(
        reason.as_deref() == Some("OriginNoRangeSupport"),
        "Failed reason {reason:?}: {st:?}"
    );
    let fills: Vec<peerfill_crds::NodeFill> = kube::Api::all(cluster.client())
        .list(&Default::default())
        .await?
        .items;
    for f in &fills {
        for a in f
            .spec
            .distributions
            .iter()
            .filter(|a| a.name == "noranges-dir")
        {
            let http = a.source.http.as_ref().context("http source")?;
            ensure!(
                !http.whole_read,
                "{}: wholeRead set",
                f.metadata.name.as_deref().unwrap_or("?")
            );
        }
    }
    if let Some(local) = cluster.local() {
        for n in &want {
            let dir = local.node_data_dir(n)?.join("models/nr");
            ensure!(!dir.exists(), "{n} holds {}", dir.display());
        }
    }
    let served: u64 = blobs
        .iter()
        .map(|b| cluster.origin().served_of(b).bytes)
        .sum();
    println!(
        "origin without Range support: {reason:?}; the origin sent {served} bytes before the readers dropped its whole-body answers"
    );
    cluster.delete_distribution(&applied).await?;
    check_gone_everywhere(&cluster, &applied).await?;
    Ok(())
}
