//! Directories end to end (issue 12 item 1) on the local cluster, or a
//! real one with `E2E_KUBECONFIG`: the real operator and agents put a
//! model-shaped directory from an HTTP origin, and a directory from a node
//! source, on every target; `status.files` and `status.size` come from the
//! authorities, and every file is checked on every node's disk.
//!
//! Needs the binaries: `cargo build --workspace --bins`.

mod common;

use anyhow::{Context, ensure};
use common::cluster::{
    MIB, check_gone_everywhere, general_pool, start, targets, wait_complete, wait_failed,
};
use k8s_openapi::api::core::v1::{
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
};
use peerfill_crds::HttpFile;
use peerfill_e2e::cluster::{NodeOptions, node_source_distribution};

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

/// Four files as a model hub serves them (two shards with digests, the
/// config and the tokenizer without), one base URL, to 4 nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_directory_reaches_every_node_whole() -> anyhow::Result<()> {
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
