//! Phase 1 of an attempt, the content's identity: where it goes (beneath
//! the data root, never through a symlink), how big it is (configured, or
//! the origin's length), its piece layout, who vouches for which piece
//! hashes (the origin readers' ranges, or the seeding node), the piece store
//! (a seeder's own file, or the partial file resumed) and the pins the
//! operator published.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use crate::content::{Digest, Layout};
use crate::fsroot::DataRoot;
use crate::origin::{Origin, OriginClient, OriginError, OriginOptions, TreeOrigin, split_ranges};
use crate::store::{PieceStore, StoreError};
use crate::swarm::{Authority, Fault, Fill, FillSpec};
use crate::tree::disk::TreeFiles;

use super::super::engine::Engine;
use super::super::failure::{Failure, origin_failure, store_reason};
use super::super::{ContentConfig, Headers, Phase, SourceConfig, dest_path};
use super::ContentRun;
use super::origin::with_origin_retry;

/// A content ready to fill or seed.
pub(super) struct Prepared {
    /// Where the complete file goes.
    pub(super) dest: PathBuf,
    pub(super) data_root: DataRoot,
    /// The origin client (HTTP sources).
    pub(super) origin: Option<Origin>,
    pub(super) authority: Authority,
    /// The file this node seeds from, if it is the seeder.
    pub(super) seed_path: Option<PathBuf>,
    /// This attempt's fill, not yet in the swarm.
    pub(super) fill: Arc<Fill>,
}

/// Establishes the content's identity and opens its store.
pub(super) async fn prepare(run: &ContentRun, engine: &Engine) -> Result<Prepared, Failure> {
    let inner = &engine.inner;
    let cfg = &inner.cfg;
    let c = &run.cfg;
    let me = cfg.node.as_str();
    let (dest, data_root) = destination(&cfg.data_dir, c)?;
    let origin = origin_client(run, engine)?;
    let seed_path = match &c.source {
        SourceConfig::Node { node, path } if node == me => {
            Some(path.clone().unwrap_or(dest.clone()))
        }
        _ => None,
    };
    // A node source's directory is walked once, here: its file table is
    // the head of the content it seeds.
    let seed_tree = match &seed_path {
        Some(p) if !outside_root(&cfg.data_dir, p) => walk_if_directory(&data_root, p)?,
        _ => None,
    };
    let size = match (&seed_tree, c.size) {
        (Some(t), None) => t.table().size(),
        _ => content_size(run, engine, origin.as_ref(), &data_root).await?,
    };
    let files = match &seed_tree {
        Some(t) => Some(t.table().entries().len() as u64),
        None => origin.as_ref().and_then(Origin::file_count),
    };
    *run.files.lock().unwrap_or_else(PoisonError::into_inner) = files;
    let layout = Layout::for_content(size, c.piece_size)
        .map_err(|e| Failure::new("InvalidConfig", e.to_string()))?;
    let authority = match &c.source {
        // One reader for everything when the origin is read whole.
        SourceConfig::Http { readers, whole, .. } => {
            let n = if *whole { 1 } else { readers.len() as u32 };
            let ranges = split_ranges(&layout, n);
            Authority::Readers(readers.iter().cloned().zip(ranges).collect())
        }
        SourceConfig::Node { node, .. } => Authority::Seeder(node.clone()),
    };
    let root = match c.root {
        Some(Digest::Blake3(b)) => Some(blake3::Hash::from_bytes(b)),
        _ => None,
    };
    let spec = FillSpec {
        id: c.id.clone(),
        layout,
        digest: c.digest,
        authority: authority.clone(),
        allowed: engine
            .allowed_of(&c.id)
            .unwrap_or_else(|| c.allowed_peers.iter().cloned().collect()),
        root,
        require_pin: inner.opts.require_pin,
    };
    // Nothing at the destination is trusted by its size: only a seeder's
    // source is served as it is (it IS the source, and is hashed later).
    let store = match &seed_path {
        Some(p) if let Some(tree) = seed_tree => PieceStore::open_complete_tree(tree, p, layout),
        Some(p) if outside_root(&cfg.data_dir, p) => PieceStore::open_complete(p, layout),
        Some(p) => data_root
            .user_rel_of(p)
            .map_err(StoreError::from)
            .and_then(|rel| PieceStore::open_complete_in(&data_root, &rel, layout)),
        None => PieceStore::open_in_async(&data_root, &c.id, layout).await,
    }
    .map_err(|e| Failure::new(store_reason(&e), e.to_string()))?;
    let liar = cfg.fault == Some(Fault::CorruptUploads);
    let fill = Fill::new(spec, store, liar);
    if let Some(r) = run.root_pin() {
        fill.pin_root(r);
    }
    Ok(Prepared {
        dest,
        data_root,
        origin,
        authority,
        seed_path,
        fill,
    })
}

/// The destination and the data root it is resolved beneath. Every file
/// this content touches is resolved beneath the data root, never through a
/// symlink; a bad path fails here, before any download.
fn destination(data_dir: &Path, c: &ContentConfig) -> Result<(PathBuf, DataRoot), Failure> {
    let dest = dest_path(data_dir, &c.path)
        .map_err(|_| Failure::new("InvalidPath", format!("invalid path {}", c.path.display())))?;
    let data_root =
        DataRoot::open(data_dir).map_err(|e| Failure::new("StorageError", e.to_string()))?;
    data_root
        .user_rel_of(&dest)
        .map_err(|e| Failure::new("InvalidPath", e.to_string()))?;
    Ok((dest, data_root))
}

/// The origin client of an HTTP source, pinned to the published version.
/// An origin reader also keeps it in the run, to report the version it
/// reads.
fn origin_client(run: &ContentRun, engine: &Engine) -> Result<Option<Origin>, Failure> {
    let inner = &engine.inner;
    let SourceConfig::Http {
        url,
        headers: h,
        readers,
        files,
        ..
    } = &run.cfg.source
    else {
        return Ok(None);
    };
    let origin_opts = origin_options(engine);
    let failed = |e: OriginError| Failure::new(e.reason(), e.to_string());
    let o = if files.is_empty() {
        Origin::One(
            OriginClient::new(url, headers(h), origin_opts)
                .map_err(failed)?
                .with_metrics(inner.metrics.clone()),
        )
    } else {
        Origin::Tree(Arc::new(
            TreeOrigin::new(url, files, headers(h), origin_opts, inner.metrics.clone())
                .map_err(failed)?,
        ))
    };
    if let Some(v) = run.origin_pin() {
        o.pin_version(v);
    }
    if readers.iter().any(|r| r == &inner.cfg.node) {
        *run.origin.lock().unwrap_or_else(PoisonError::into_inner) = Some(o.clone());
    }
    Ok(Some(o))
}

/// Options of this engine's origin clients.
pub(super) fn origin_options(engine: &Engine) -> OriginOptions {
    let inner = &engine.inner;
    let mut opts = if inner.opts.retry_transient_origin {
        // The engine retries on its own, showing the failure meanwhile.
        OriginOptions {
            max_retries: 2,
            ..OriginOptions::default()
        }
    } else {
        OriginOptions::default()
    };
    opts.allow_private = inner.opts.allow_private_origins;
    opts
}

pub(super) fn headers(h: &Headers) -> Vec<(String, String)> {
    h.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The content's size: configured, else the origin's length (retried like
/// any origin read), else the size of a node source's file.
async fn content_size(
    run: &ContentRun,
    engine: &Engine,
    origin: Option<&Origin>,
    data_root: &DataRoot,
) -> Result<u64, Failure> {
    let c = &run.cfg;
    let data_dir = &engine.inner.cfg.data_dir;
    let retry = engine.inner.opts.retry_transient_origin;
    match (c.size, origin) {
        (Some(s), _) => Ok(s),
        (None, Some(o)) => with_origin_retry(run, retry, Phase::Pending, || o.content_length())
            .await
            .map_err(|e| origin_failure(run, e)),
        (None, None) => match &c.source {
            SourceConfig::Node { path: Some(p), .. } if outside_root(data_dir, p) => {
                Ok(std::fs::symlink_metadata(p)
                    .map_err(|e| Failure::new("SourceUnreadable", format!("{}: {e}", p.display())))?
                    .len())
            }
            SourceConfig::Node { path: Some(p), .. } => source_len(data_root, p),
            _ => Err(Failure::new("InvalidConfig", "content size unknown")),
        },
    }
}

/// Whether a seed file lies outside the data root. Only the agent's own
/// config file (an administrator's choice) can name one: a Distribution's
/// node-source path is always joined beneath the root, where it is resolved
/// without following symlinks.
fn outside_root(data_dir: &Path, path: &Path) -> bool {
    !path.starts_with(data_dir)
}

/// A node source that is a directory, walked beneath the data root (see
/// [`TreeFiles::walk`]); `None` for anything else, which the file path
/// handles (and refuses if it is not a regular file).
fn walk_if_directory(root: &DataRoot, path: &Path) -> Result<Option<TreeFiles>, Failure> {
    match source_entry(root, path)? {
        (rel, Some(m)) if m.kind == crate::fsroot::EntryKind::Dir => TreeFiles::walk(root, &rel)
            .map(Some)
            .map_err(|e| Failure::new(e.reason(), e.to_string())),
        _ => Ok(None),
    }
}

/// Size of a node source's file, resolved beneath the data root: a symlink
/// anywhere on the way (which could lead out of the root) is refused.
fn source_len(root: &DataRoot, path: &Path) -> Result<u64, Failure> {
    match source_entry(root, path)?.1 {
        Some(m) if m.is_file() => Ok(m.len),
        Some(_) => Err(unreadable(
            path,
            "not a regular file (symlinks are never followed)".into(),
        )),
        None => Err(unreadable(path, "no such file".into())),
    }
}

/// A node source's path beneath the data root and its lstat (`None`: it
/// does not exist); a symlink on the way is refused.
fn source_entry(
    root: &DataRoot,
    path: &Path,
) -> Result<(PathBuf, Option<crate::fsroot::EntryMeta>), Failure> {
    let rel = root
        .user_rel_of(path)
        .map_err(|e| unreadable(path, e.to_string()))?;
    let meta = root
        .metadata(&rel)
        .map_err(|e| unreadable(path, e.to_string()))?;
    Ok((rel, meta))
}

fn unreadable(path: &Path, why: String) -> Failure {
    Failure::new("SourceUnreadable", format!("{}: {why}", path.display()))
}
