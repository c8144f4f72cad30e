//! Phase 2 of an attempt: reuse of files already on disk (the destination,
//! a previous version's file; a directory content is read as its blob, so a
//! file unchanged between two versions of a directory is reused as long as
//! its place in the blob did not move). Every piece that verifies against a trusted
//! hash is taken from them instead of the network; a whole file that merges
//! to the pinned root is trusted at once.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::{Instrument, info, warn};

use crate::content::{self, Layout};
use crate::fsroot::{DataRoot, EntryKind};
use crate::swarm::Fill;
use crate::tree::disk::{ContentFile, TreeFiles};

use super::super::{ContentConfig, dest_path};
use super::AbortOnDrop;

/// The files to reuse pieces from: the destination, then the `reuseFrom`
/// paths, each a regular file beneath the data root.
pub(super) fn sources(
    root: &DataRoot,
    data_dir: &Path,
    c: &ContentConfig,
    dest: &Path,
) -> Vec<Arc<ContentFile>> {
    std::iter::once(dest.to_path_buf())
        .chain(
            c.reuse_from
                .iter()
                .filter_map(|p| dest_path(data_dir, p).ok()),
        )
        .filter_map(|p| open_reuse_source(root, &p).map(Arc::new))
        .collect()
}

/// Starts reusing `files`: a file that is the pinned content is taken whole
/// before anything is read elsewhere; otherwise pieces are tried in the
/// background as their hashes become trusted (the task stops with the
/// returned guard).
pub(super) async fn start(
    fill: &Arc<Fill>,
    me: &str,
    mut files: Vec<Arc<ContentFile>>,
) -> Option<AbortOnDrop<()>> {
    if trust_verified_file(fill, me, &files).await {
        // Every hash is known: take the whole file before reading anything.
        reuse_pieces(fill.clone(), me.to_string(), std::mem::take(&mut files)).await;
    }
    (!files.is_empty()).then(|| {
        let (fill, me) = (fill.clone(), me.to_string());
        AbortOnDrop(tokio::spawn(
            async move { reuse_pieces(fill, me, files).await }.in_current_span(),
        ))
    })
}

/// Takes pieces from files already on disk (`sources`: the destination, a
/// previous version's file): as each missing piece's hash becomes trusted,
/// its byte range is read from each source in turn, verified against that
/// hash, and stored (counted as reused, not fetched). A mismatching piece is
/// simply fetched as usual. Only regular files are read, never through a
/// symlink.
async fn reuse_pieces(fill: Arc<Fill>, me: String, files: Vec<Arc<ContentFile>>) {
    /// Releases whatever is still held back, however the task ends.
    struct Release(Arc<Fill>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.reuse_finished();
        }
    }
    let _release = Release(fill.clone());
    let layout = fill.layout();
    let mut untried: Vec<u32> = (0..layout.piece_count())
        .filter(|p| !fill.store.has(*p))
        .collect();
    let mut reused = 0u64;
    while !untried.is_empty() && !fill.is_complete() {
        let changed = fill.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (ready, rest): (Vec<u32>, Vec<u32>) = untried
            .into_iter()
            .partition(|p| fill.store.has(*p) || fill.hash(*p).is_some());
        untried = rest;
        for piece in ready {
            if fill.is_closed() {
                return;
            }
            let Some(hash) = fill.hash(piece).filter(|_| !fill.store.has(piece)) else {
                fill.reuse_tried(piece);
                continue;
            };
            let range = layout.piece_range(piece);
            for file in &files {
                let file = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; (range.end - range.start) as usize];
                    file.read_exact_at(&mut buf, range.start).ok()?;
                    let ok = content::verify_piece(&layout, piece, &buf, &hash).is_ok();
                    ok.then(|| bytes::Bytes::from(buf))
                })
                .await;
                let Ok(Some(data)) = read else { continue };
                let len = data.len() as u64;
                match fill.store_verified(None, &me, piece, data, None).await {
                    Ok(true) => {
                        reused += 1;
                        fill.stats.reused_pieces.fetch_add(1, Ordering::Relaxed);
                        fill.stats.bytes_reused.fetch_add(len, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // The fetch path meets the same fault and reports it.
                        warn!(content = %fill.spec.id, piece, error = %e, "cannot store a reused piece");
                        return;
                    }
                }
                break;
            }
            fill.reuse_tried(piece);
        }
        if untried.is_empty() {
            break;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = fill.closed() => return,
        }
    }
    if reused > 0 {
        info!(content = %fill.spec.id, reused, "pieces reused from files on disk");
    }
}

/// A whole file that merges to the pinned root is this content: its hashes
/// are trusted at once (no authority needed, and an origin reader need not
/// re-read its range after a restart). Done before any origin read starts.
async fn trust_verified_file(fill: &Fill, me: &str, files: &[Arc<ContentFile>]) -> bool {
    let Some(root) = fill.pinned_root() else {
        return false;
    };
    let layout = fill.layout();
    for file in files {
        if file.len().ok() != Some(layout.size) {
            continue;
        }
        let f = file.clone();
        let hashes = tokio::task::spawn_blocking(move || hash_file(&f, &layout)).await;
        if let Ok(Some(hashes)) = hashes
            && content::root_from_pieces(&layout, &hashes).ok() == Some(root)
        {
            info!(content = %fill.spec.id, "a file on disk is the pinned content; its hashes are trusted");
            let entries: Vec<(u32, content::PieceHash)> = (0u32..).zip(hashes).collect();
            fill.own_hashes(me, &entries);
            return true;
        }
    }
    false
}

/// The piece hashes of a whole file (None if it cannot be read).
fn hash_file(file: &ContentFile, layout: &Layout) -> Option<Vec<content::PieceHash>> {
    let mut buf = vec![0u8; layout.piece_size as usize];
    (0..layout.piece_count())
        .map(|i| {
            let r = layout.piece_range(i);
            let b = &mut buf[..(r.end - r.start) as usize];
            file.read_exact_at(b, r.start).ok()?;
            Some(content::piece_hash(layout, i, b))
        })
        .collect()
}

/// Opens `path` (beneath the data root) for reading if it is a regular file
/// reached without following a symlink in any component, or a directory
/// content this agent wrote (read as its blob, see [`TreeFiles::open`]).
fn open_reuse_source(root: &DataRoot, path: &Path) -> Option<ContentFile> {
    let rel = root.user_rel_of(path).ok()?;
    match root.metadata(&rel).ok()??.kind {
        EntryKind::Dir => TreeFiles::open(root, &rel).ok().map(ContentFile::Tree),
        _ => {
            let file = root.open_read(&rel).ok()?;
            file.metadata()
                .ok()?
                .is_file()
                .then_some(ContentFile::File(file))
        }
    }
}
