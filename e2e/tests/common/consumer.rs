//! A stand-in for the workload of `examples/consume.yaml`: on every target
//! node it keeps looking at what such a workload could see, the node label
//! (its required node affinity) and the file at the target path (its
//! read-only hostPath mount), and records every observation that breaks the
//! promise: a partial or mixed file at the path, or the label on a node
//! without a complete version in place.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;
use peerfill_e2e::cluster::{Blob, Cluster};

/// What one node showed the last time it was looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Seen {
    /// Nothing at the target path.
    #[default]
    Absent,
    /// One of the expected versions, complete (index into the versions).
    Version(usize),
}

/// Everything the consumer saw, for the test's assertions.
#[derive(Debug, Default)]
pub struct Observed {
    /// Broken promises, each with the node and what was seen.
    pub violations: Vec<String>,
    /// Rounds over all nodes.
    pub rounds: u64,
    /// Per node: the states seen, in order, without repeats.
    pub history: BTreeMap<String, Vec<Seen>>,
    /// Per node: rounds in which the label was set.
    pub labelled_rounds: BTreeMap<String, u64>,
}

/// The consumer's task; [`Consumer::stop`] ends it and returns what it saw.
pub struct Consumer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Observed>,
}

/// Identity of the file at the path: a new inode, size or timestamp means
/// it must be hashed again (an in-place write changes mtime and ctime).
type FileKey = (u64, u64, u64, i64, i64);

impl Consumer {
    /// Starts watching `nodes` for `label` and the file at `paths[node]`,
    /// which may only ever hold one of `versions` whole.
    pub fn start(
        cluster: &Cluster,
        nodes: &[String],
        paths: BTreeMap<String, PathBuf>,
        label: String,
        versions: Vec<Blob>,
    ) -> Consumer {
        let stop = Arc::new(AtomicBool::new(false));
        let api: Api<Node> = Api::all(cluster.client());
        let nodes = nodes.to_vec();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = Observed::default();
            let mut known: BTreeMap<String, (FileKey, Seen)> = BTreeMap::new();
            while !flag.load(Ordering::Relaxed) {
                // The label first: a workload scheduled by it reads the
                // file afterwards, so the file must be complete by now.
                let labelled: BTreeMap<String, bool> = match api.list(&ListParams::default()).await
                {
                    Ok(list) => list
                        .items
                        .into_iter()
                        .filter_map(|n| {
                            let name = n.metadata.name?;
                            let on = n.metadata.labels.is_some_and(|l| l.contains_key(&label));
                            Some((name, on))
                        })
                        .collect(),
                    Err(e) => {
                        seen.violations.push(format!("listing nodes failed: {e}"));
                        break;
                    }
                };
                for node in &nodes {
                    let Some(path) = paths.get(node) else {
                        continue;
                    };
                    let state = look(path, &versions, known.get(node)).await;
                    let state = match state {
                        Ok((key, s)) => {
                            if let Some(k) = key {
                                known.insert(node.clone(), (k, s.clone()));
                            } else {
                                known.remove(node);
                            }
                            s
                        }
                        Err(what) => {
                            seen.violations.push(format!("{node}: {what}"));
                            continue;
                        }
                    };
                    let on = labelled.get(node).copied().unwrap_or(false);
                    if on {
                        *seen.labelled_rounds.entry(node.clone()).or_default() += 1;
                        if state == Seen::Absent {
                            seen.violations
                                .push(format!("{node}: labelled while nothing is at the path"));
                        }
                    }
                    let h = seen.history.entry(node.clone()).or_default();
                    if h.last() != Some(&state) {
                        h.push(state);
                    }
                }
                seen.rounds += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        });
        Consumer { stop, task }
    }

    /// Stops watching and returns what was seen.
    pub async fn stop(self) -> anyhow::Result<Observed> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// What is at `path`: absent, or a complete expected version. Anything else
/// (a partial file, a mix of versions, a symlink) is an error. A file whose
/// key is unchanged since `before` is not hashed again.
pub async fn look(
    path: &std::path::Path,
    versions: &[Blob],
    before: Option<&(FileKey, Seen)>,
) -> Result<(Option<FileKey>, Seen), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, Seen::Absent)),
        Err(e) => return Err(format!("stat {}: {e}", path.display())),
    };
    if !meta.file_type().is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let key = (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
        meta.ctime_nsec() + meta.ctime() * 1_000_000_000,
    );
    if let Some((k, s)) = before
        && *k == key
    {
        return Ok((Some(key), s.clone()));
    }
    let p = path.to_path_buf();
    let digest = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(&p)?)?;
        Ok(format!("blake3:{}", h.finalize().to_hex()))
    })
    .await
    .map_err(|e| format!("hashing task: {e}"))?;
    let digest = match digest {
        Ok(d) => d,
        // Replaced by a rename between stat and open: look again next round.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, Seen::Absent)),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    match versions.iter().position(|v| v.blake3 == digest) {
        Some(i) => Ok((Some(key), Seen::Version(i))),
        None => Err(format!(
            "{} holds {} bytes that are no complete version ({digest})",
            path.display(),
            meta.size()
        )),
    }
}
