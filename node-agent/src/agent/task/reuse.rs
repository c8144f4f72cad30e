//! Phase 2 of an attempt: reuse of files already on disk (the destination,
//! a previous version's file; a directory content is read as its blob, so a
//! file unchanged between two versions of a directory is reused as long as
//! its place in the blob did not move). Every piece that verifies against a trusted
//! hash is taken from them instead of the network; a whole file that merges
//! to the pinned root is trusted at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::{Instrument, info, warn};

use crate::content::{self, Layout};
use crate::fsroot::{DataRoot, EntryKind};
use crate::swarm::Fill;
use crate::tree::disk::{ContentFile, Remapped, TreeFiles};
use crate::tree::{FileTable, PREAMBLE_LEN};

use super::super::{ContentConfig, dest_path};
use super::AbortOnDrop;

/// What pieces are reused from: files (and directories read as their blob)
/// already on disk, and, for a directory content, the directories among
/// them to read again in the new version's layout once its file table is
/// known ([`Remapped`]).
pub(super) struct Sources {
    pub(super) files: Vec<Arc<ContentFile>>,
    remap: Option<(DataRoot, Vec<PathBuf>)>,
}

impl Sources {
    pub(super) fn none() -> Sources {
        Sources {
            files: Vec::new(),
            remap: None,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// The files to reuse pieces from: the destination, then the `reuseFrom`
/// paths, each a regular file (or a directory content) beneath the data
/// root.
pub(super) fn sources(root: &DataRoot, data_dir: &Path, c: &ContentConfig, dest: &Path) -> Sources {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for p in std::iter::once(dest.to_path_buf()).chain(
        c.reuse_from
            .iter()
            .filter_map(|p| dest_path(data_dir, p).ok()),
    ) {
        if let Some(f) = open_reuse_source(root, &p) {
            if let (ContentFile::Tree(_), Ok(rel)) = (&f, root.user_rel_of(&p)) {
                dirs.push(rel);
            }
            files.push(Arc::new(f));
        }
    }
    let remap = (c.directory && !dirs.is_empty()).then(|| (root.clone(), dirs));
    Sources { files, remap }
}

/// Starts reusing `files`: a file that is the pinned content is taken whole
/// before anything is read elsewhere; otherwise pieces are tried in the
/// background as their hashes become trusted (the task stops with the
/// returned guard).
pub(super) async fn start(
    fill: &Arc<Fill>,
    me: &str,
    mut sources: Sources,
) -> Option<AbortOnDrop<()>> {
    if trust_verified_file(fill, me, &sources.files).await {
        // Every hash is known: take the whole file before reading anything.
        let all = std::mem::replace(&mut sources, Sources::none());
        reuse_pieces(fill.clone(), me.to_string(), all).await;
    }
    (!sources.is_empty()).then(|| {
        let (fill, me) = (fill.clone(), me.to_string());
        AbortOnDrop(tokio::spawn(
            async move { reuse_pieces(fill, me, sources).await }.in_current_span(),
        ))
    })
}

/// Takes pieces from files already on disk (`sources`: the destination, a
/// previous version's file): as each missing piece's hash becomes trusted,
/// its byte range is read from each source in turn, verified against that
/// hash, and stored (counted as reused, not fetched). A mismatching piece is
/// simply fetched as usual. Only regular files are read, never through a
/// symlink.
async fn reuse_pieces(fill: Arc<Fill>, me: String, sources: Sources) {
    /// Releases whatever is still held back, however the task ends.
    struct Release(Arc<Fill>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.reuse_finished();
        }
    }
    let _release = Release(fill.clone());
    let Sources {
        mut files,
        mut remap,
    } = sources;
    let layout = fill.layout();
    let mut untried: Vec<u32> = (0..layout.piece_count())
        .filter(|p| !fill.store.has(*p))
        .collect();
    let mut reused = 0u64;
    while !untried.is_empty() && !fill.is_complete() {
        let changed = fill.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // A directory's old copies are read in the new layout once the new
        // file table is held; until then only the pieces of the table are
        // tried, so no other piece is given up to the network too early.
        let mut table_pieces = u32::MAX;
        if let Some((root, dirs)) = &remap {
            match new_table(&fill).await {
                Ok(table) => {
                    let mut remapped: Vec<Arc<ContentFile>> = dirs
                        .iter()
                        .filter_map(|d| TreeFiles::open(root, d).ok())
                        .map(|old| {
                            Arc::new(ContentFile::Remapped(Remapped::new(table.clone(), old)))
                        })
                        .collect();
                    remapped.append(&mut files);
                    files = remapped;
                    remap = None;
                }
                // Held but not a table (cannot be, for verified pieces):
                // no remap, rather than holding every piece back.
                Err(pieces) if (0..pieces).all(|p| fill.store.has(p)) => remap = None,
                Err(pieces) => table_pieces = pieces,
            }
        }
        let (ready, rest): (Vec<u32>, Vec<u32>) = untried
            .into_iter()
            .partition(|p| fill.store.has(*p) || (fill.hash(*p).is_some() && *p < table_pieces));
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
            // Pieces of the table may arrive from peers meanwhile.
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)), if remap.is_some() => {}
        }
    }
    if reused > 0 {
        info!(content = %fill.spec.id, reused, "pieces reused from files on disk");
    }
}

/// The new version's file table, once the pieces holding it are held
/// (verified); otherwise how many leading pieces hold it (1 until the first
/// piece tells its length).
async fn new_table(fill: &Fill) -> Result<FileTable, u32> {
    let layout = fill.layout();
    if !fill.store.has(0) {
        return Err(1);
    }
    let first = fill.store.read_piece(0).await.map_err(|_| 1u32)?;
    let len = first
        .get(..PREAMBLE_LEN as usize)
        .and_then(|pre| FileTable::header_len(pre).ok())
        .ok_or(1u32)?;
    let pieces = u32::try_from(len.div_ceil(u64::from(layout.piece_size)))
        .unwrap_or(u32::MAX)
        .min(layout.piece_count());
    if !(1..pieces).all(|i| fill.store.has(i)) {
        return Err(pieces);
    }
    let mut header = Vec::with_capacity(len as usize);
    header.extend_from_slice(&first);
    for i in 1..pieces {
        let data = fill.store.read_piece(i).await.map_err(|_| pieces)?;
        header.extend_from_slice(&data);
    }
    header.truncate(len as usize);
    FileTable::decode(&header).map_err(|_| pieces)
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
        if file.size().ok() != Some(layout.size) {
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
