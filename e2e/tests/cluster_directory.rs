//! Issue #12 item 1 on the local cluster (real `kubectl`-driven API
//! stand-in, operator and agents as real processes): a model-shaped
//! directory — 4 × 256 MiB shards and 10 files under 1 MiB, some nested —
//! from an HTTP origin. Every node ends with every file's exact bytes; the
//! target directory never shows up partial on any node (polled throughout);
//! the status counts the files; the origin serves about one copy.
//!
//! Needs the binaries: `cargo build --workspace --bins`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use common::cluster::{MIB, general_pool, start, targets, wait_complete};
use peerfill_crds::HttpFile;
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
