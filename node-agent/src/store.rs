//! Streamed, crash-safe storage of one content being filled piece by piece.
//!
//! Data goes to `<dir>/<id>.partial`, preallocated to the full size and
//! written at piece offsets in any order. Which pieces are on disk is kept in
//! `<dir>/<id>.bitmap`, replaced atomically (temp file + fsync + rename).
//! When every piece is held, [`PieceStore::finalize`] fsyncs the data and
//! renames it onto its destination, so the destination path never shows a
//! half-written file. `dir` must be on the same filesystem as the
//! destination (the agent uses `<data root>/.peerfill-partial`), so that
//! rename is atomic.
//!
//! # Durability batch (the crash bound)
//!
//! A piece is held (served, announced) as soon as its verified bytes are
//! written to the file. Making it durable costs an fdatasync and a bitmap
//! rename, so that is done for a *batch* of pieces at once: a flush
//! snapshots the pieces written so far, fdatasyncs the file, then persists
//! that snapshot as the bitmap. The bitmap therefore never claims a piece
//! whose bytes are not durable, and only pieces it claims are trusted on
//! resume: every other piece is missing and fetched (and verified) again.
//!
//! A flush runs when the unflushed pieces reach [`FLUSH_BYTES`] or the
//! oldest of them is [`FLUSH_INTERVAL`] old (checked at each write), on
//! [`PieceStore::flush`] / [`PieceStore::close`], when the last handle
//! drops, and before the final rename. So a killed agent (or a power loss)
//! loses at most the pieces being written plus one batch: fewer than
//! [`FLUSH_BYTES`] + one piece of verified data per content, re-fetched and
//! re-verified after the restart. Nothing unverified is ever trusted.
//!
//! Memory: one piece buffer per in-flight read or write; nothing grows with
//! the content size except the bitmap (1 bit per piece).
//!
//! Confinement: every file operation goes through [`crate::fsroot`]: the
//! partial directory, the bitmap and the final rename are resolved beneath
//! the data root, never following a symlink, and the destination must be a
//! caller path beneath the root that is not one of the agent's reserved
//! names.
//!
//! Test-only fault: with `PEERFILL_ALLOW_FAULTS=1`, [`FAULT_DISK_CAP_FILE_ENV`]
//! caps the free space the store sees (see [`available_space`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::content::Layout;
use crate::fsroot::{DataRoot, FsError, check_user_path};
use crate::tree::TreeError;
use crate::tree::disk::{ContentFile, TreeFiles};

/// Unflushed bytes that trigger a flush (see the module doc).
pub const FLUSH_BYTES: u64 = 16 << 20;

/// Age of the oldest unflushed piece that triggers a flush at the next write.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Name of the directory, under the agent's data root, that holds partial
/// files (same filesystem as the destinations, so the final rename is atomic).
pub const PARTIAL_DIR: &str = ".peerfill-partial";

/// Test-only disk-full fault: when the agent runs with
/// `PEERFILL_ALLOW_FAULTS=1` (see `agent::ALLOW_FAULTS_ENV`), this
/// environment variable names a file holding a decimal byte count. The
/// store then sees at most that many bytes free (re-read on every check, so
/// a test can "fill" and later "free" the disk at runtime): opening a
/// content that needs more, or writing a piece longer than it, fails with
/// [`StoreError::InsufficientSpace`], exactly as on a real full disk. A
/// missing or unreadable file means no cap.
pub const FAULT_DISK_CAP_FILE_ENV: &str = "PEERFILL_FAULT_DISK_CAP_FILE";

/// Errors decoding a bitmap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("bitmap for {len} pieces needs {expected} bytes, got {got}")]
    WrongLength {
        len: u32,
        expected: usize,
        got: usize,
    },
    #[error("bitmap has bits set past its last piece")]
    TrailingBits,
}

/// One bit per piece: which pieces are held. Bit `i` is bit `7 - i % 8` of
/// byte `i / 8` (most significant first, as in BitTorrent's bitfield).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitmap {
    len: u32,
    bits: Vec<u8>,
}

impl Bitmap {
    /// An empty bitmap (no piece held) for `len` pieces.
    pub fn new(len: u32) -> Bitmap {
        Bitmap {
            len,
            bits: vec![0; Self::byte_len(len)],
        }
    }

    /// A bitmap with every one of `len` pieces held.
    pub fn full(len: u32) -> Bitmap {
        let mut b = Bitmap {
            len,
            bits: vec![0xff; Self::byte_len(len)],
        };
        b.clear_padding();
        b
    }

    fn byte_len(len: u32) -> usize {
        (len as usize).div_ceil(8)
    }

    fn clear_padding(&mut self) {
        let rem = self.len % 8;
        if rem != 0
            && let Some(last) = self.bits.last_mut()
        {
            *last &= 0xffu8 << (8 - rem);
        }
    }

    /// Number of pieces this bitmap covers.
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether piece `index` is held (false for an index out of range).
    pub fn get(&self, index: u32) -> bool {
        if index >= self.len {
            return false;
        }
        self.bits[(index / 8) as usize] & (0x80 >> (index % 8)) != 0
    }

    /// Marks piece `index` held; returns whether it was newly set. Indexes
    /// out of range are ignored (returns false).
    pub fn set(&mut self, index: u32) -> bool {
        if index >= self.len {
            return false;
        }
        let byte = &mut self.bits[(index / 8) as usize];
        let mask = 0x80 >> (index % 8);
        let was = *byte & mask != 0;
        *byte |= mask;
        !was
    }

    /// Marks piece `index` not held.
    pub fn clear(&mut self, index: u32) {
        if index < self.len {
            self.bits[(index / 8) as usize] &= !(0x80 >> (index % 8));
        }
    }

    /// Number of pieces held.
    pub fn count_ones(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    /// Whether every piece is held (true for an empty content).
    pub fn is_full(&self) -> bool {
        self.count_ones() == self.len
    }

    /// Indexes of the pieces not held, ascending.
    pub fn iter_missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(move |&i| !self.get(i))
    }

    /// Indexes of the pieces held, ascending.
    pub fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(move |&i| self.get(i))
    }

    /// Compact encoding: `ceil(len / 8)` bytes, 1 bit per piece.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bits.clone()
    }

    /// Decodes [`Bitmap::to_bytes`] for `len` pieces; rejects a wrong length
    /// or set padding bits (never panics on untrusted input).
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Result<Bitmap, BitmapError> {
        let expected = Self::byte_len(len);
        if bytes.len() != expected {
            return Err(BitmapError::WrongLength {
                len,
                expected,
                got: bytes.len(),
            });
        }
        let b = Bitmap {
            len,
            bits: bytes.to_vec(),
        };
        let mut clean = b.clone();
        clean.clear_padding();
        if clean != b {
            return Err(BitmapError::TrailingBits);
        }
        Ok(b)
    }
}

/// Errors of the piece store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "not enough free space for {path}: {needed} more bytes are needed but only {available} are available on its filesystem"
    )]
    InsufficientSpace {
        needed: u64,
        available: u64,
        path: PathBuf,
    },
    #[error("piece {index} is not held")]
    NotHeld { index: u32 },
    #[error("piece index {index} out of range: the content has {count} pieces")]
    PieceOutOfRange { index: u32, count: u32 },
    #[error("piece {index} has {got} bytes, expected {expected}")]
    WrongLength {
        index: u32,
        expected: u32,
        got: usize,
    },
    #[error("cannot finalize: {missing} of {count} pieces are still missing")]
    Incomplete { missing: u32, count: u32 },
    #[error("invalid content id {id:?}: must be a non-empty file name without '/' or leading '.'")]
    InvalidId { id: String },
    #[error("{path} has {actual} bytes, but the content has {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("the store for {path} is read-only (serving a complete file) or already finalized")]
    ReadOnly { path: PathBuf },
    #[error(
        "cannot move {from} to {to}: they are on different filesystems; the partial directory must be on the destination's filesystem"
    )]
    CrossDevice { from: PathBuf, to: PathBuf },
    #[error("invalid bitmap: {0}")]
    Bitmap(#[from] BitmapError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("storage task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("directory content: {0}")]
    Tree(#[from] TreeError),
}

impl StoreError {
    /// CamelCase reason for a status condition.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::InsufficientSpace { .. } => "InsufficientSpace",
            StoreError::Tree(e) => e.reason(),
            _ => "StorageError",
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Storage of one content: a partial file being filled, or a complete file
/// being served. Cheap to clone; clones share the file and the bitmap, so
/// tasks can write different pieces concurrently.
#[derive(Clone)]
pub struct PieceStore {
    inner: Arc<Inner>,
}

struct Inner {
    layout: Layout,
    /// The partial file while filling; what is served once complete (a
    /// file, or a directory read as its blob — swapped in when a directory
    /// content is finalized).
    data: RwLock<Arc<ContentFile>>,
    /// The partial file again, opened with `O_DIRECT`: whole pieces in
    /// aligned buffers (the pool's) are written through it, skipping the
    /// copy into the page cache, which profiles showed as the largest cost
    /// per byte received. `None` where the filesystem refuses `O_DIRECT`.
    direct: Option<File>,
    /// The data file (the `.partial`, or the complete file being served);
    /// for messages and [`PieceStore::path`] only, never opened by path.
    data_path: PathBuf,
    /// `Some` while filling; `None` when serving a complete file.
    partial: Option<Partial>,
    have: Mutex<Bitmap>,
    /// Pieces written but not yet durable (see the module doc).
    dirty: Mutex<Dirty>,
    /// When a batch is due: [`FLUSH_BYTES`], [`FLUSH_INTERVAL`] (tests
    /// change them to make the batch boundary deterministic).
    flush_bytes: u64,
    flush_interval: Duration,
    /// Serialises flushes, so persisted bitmaps only grow; a writer that
    /// finds the batch full waits here (back-pressure keeps the bound).
    flushing: Mutex<()>,
    /// Set once finalized, closed or discarded: no more writes or flushes.
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct Dirty {
    bytes: u64,
    /// When the oldest unflushed piece was written.
    since: Option<Instant>,
}

impl Inner {
    /// What is read now (see `data`).
    fn data(&self) -> Arc<ContentFile> {
        self.data
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs `f` on the partial file (or a complete single file): what
    /// writes and syncs go to; a directory being served takes none.
    fn with_file<R>(
        &self,
        f: impl FnOnce(&File) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        match &*self.data() {
            ContentFile::File(file) => f(file),
            ContentFile::Tree(_) | ContentFile::Remapped(_) => Err(StoreError::ReadOnly {
                path: self.data_path.clone(),
            }),
        }
    }
}

impl Dirty {
    fn due(&self, bytes: u64, interval: Duration) -> bool {
        self.bytes >= bytes || self.since.is_some_and(|t| t.elapsed() >= interval)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle went away without finalize/close/discard (e.g. the
        // agent shuts down): keep what was written for the resume.
        if self.partial.is_some()
            && !self.closed.load(Ordering::Acquire)
            && let Err(e) = flush_inner(self)
        {
            warn!(path = %self.data_path.display(), error = %e, "cannot persist the last batch of pieces");
        }
    }
}

/// See [`PieceStore::flush`].
fn flush_inner(inner: &Inner) -> Result<(), StoreError> {
    let Some(p) = inner.partial.as_ref() else {
        return Ok(());
    };
    let _serial = inner
        .flushing
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if inner.closed.load(Ordering::Acquire) {
        return Ok(());
    }
    // Snapshot first: every piece in it was written before the fdatasync
    // below starts, so the fdatasync covers all of them.
    let snapshot = {
        let have = inner.have.lock().unwrap_or_else(PoisonError::into_inner);
        let mut dirty = inner.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        if dirty.since.is_none() {
            return Ok(());
        }
        *dirty = Dirty::default();
        have.clone()
    };
    let result = inner
        .with_file(|f| f.sync_data().map_err(io_err("syncing", &inner.data_path)))
        .and_then(|()| {
            // `closed` is set before discard takes this lock: a discarded
            // store never gets its bitmap back.
            if inner.closed.load(Ordering::Acquire) {
                return Ok(());
            }
            write_bitmap_file(p, &inner.layout, &snapshot)
        });
    if result.is_err() {
        // Not durable: the next write retries the whole batch.
        inner
            .dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .since
            .get_or_insert_with(Instant::now);
    }
    debug!(path = %inner.data_path.display(), held = snapshot.count_ones(), "pieces flushed");
    result
}

impl std::fmt::Debug for PieceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceStore")
            .field("path", &self.inner.data_path)
            .field("layout", &self.inner.layout)
            .finish_non_exhaustive()
    }
}

/// Where a filling store's files live, all resolved beneath the data root.
struct Partial {
    root: DataRoot,
    /// The partial directory (a confined root of its own).
    dir: DataRoot,
    /// `<id>.partial` and `<id>.bitmap`, relative to `dir`.
    data_name: PathBuf,
    bitmap_name: PathBuf,
}

impl Partial {
    fn tmp_bitmap_name(&self) -> PathBuf {
        let mut n = self.bitmap_name.as_os_str().to_owned();
        n.push(".tmp");
        PathBuf::from(n)
    }
}

const BITMAP_MAGIC: &[u8; 8] = b"PFBITMP1";

/// Bitmap file: magic, layout (size u64 LE, piece size u32 LE), bitmap bytes,
/// then a BLAKE3 of everything before it, so a corrupt file is detected and
/// the content restarts rather than trusting garbage.
fn encode_bitmap_file(layout: &Layout, bitmap: &Bitmap) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 12 + bitmap.bits.len() + 32);
    out.extend_from_slice(BITMAP_MAGIC);
    out.extend_from_slice(&layout.size.to_le_bytes());
    out.extend_from_slice(&layout.piece_size.to_le_bytes());
    out.extend_from_slice(&bitmap.bits);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn decode_bitmap_file(raw: &[u8], layout: &Layout) -> Option<Bitmap> {
    let body_len = raw.len().checked_sub(32)?;
    let (body, sum) = raw.split_at(body_len);
    if blake3::hash(body) != blake3::Hash::from_slice(sum).ok()? {
        return None;
    }
    let rest = body.strip_prefix(BITMAP_MAGIC.as_slice())?;
    if rest.len() < 12 {
        return None;
    }
    let size = u64::from_le_bytes(rest[..8].try_into().ok()?);
    let piece_size = u32::from_le_bytes(rest[8..12].try_into().ok()?);
    if size != layout.size || piece_size != layout.piece_size {
        return None;
    }
    Bitmap::from_bytes(layout.piece_count(), &rest[12..]).ok()
}

fn write_bitmap_file(p: &Partial, layout: &Layout, bitmap: &Bitmap) -> Result<(), StoreError> {
    // No directory fsync: if the rename is lost in a crash, the previous
    // bitmap (a subset of this one) is still consistent with the data.
    p.dir
        .write_atomic(&p.bitmap_name, &encode_bitmap_file(layout, bitmap))?;
    Ok(())
}

fn remove_if_exists(dir: &DataRoot, rel: &Path) -> Result<(), StoreError> {
    dir.remove_file(rel)?;
    Ok(())
}

/// The test-only cap of [`FAULT_DISK_CAP_FILE_ENV`] for a store in `dir`,
/// if faults are allowed and the file holds a number.
pub fn fault_disk_cap(dir: &Path) -> Option<u64> {
    #[cfg(test)]
    if let Some(file) = test_cap::file_for(dir) {
        return read_cap_file(&file);
    }
    #[cfg(not(test))]
    let _ = dir;
    if !crate::agent::faults_allowed() {
        return None;
    }
    read_cap_file(Path::new(&std::env::var_os(FAULT_DISK_CAP_FILE_ENV)?))
}

/// Unit tests run in parallel in one process, so instead of the process
/// environment they register a cap file per data root.
#[cfg(test)]
mod test_cap {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FILES: Mutex<Option<HashMap<PathBuf, PathBuf>>> = Mutex::new(None);

    pub fn set(root: &Path, file: &Path) {
        let mut m = FILES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get_or_insert_with(HashMap::new)
            .insert(root.to_path_buf(), file.to_path_buf());
    }

    pub fn file_for(dir: &Path) -> Option<PathBuf> {
        let m = FILES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.as_ref()?
            .iter()
            .find(|(root, _)| dir.starts_with(root))
            .map(|(_, f)| f.clone())
    }
}

fn read_cap_file(path: &Path) -> Option<u64> {
    match std::fs::read_to_string(path) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(cap) => Some(cap),
            Err(e) => {
                warn!(file = %path.display(), error = %e, "disk cap fault file does not hold a byte count; ignored");
                None
            }
        },
        Err(_) => None,
    }
}

/// Bytes available to unprivileged users on the filesystem holding `dir`
/// (capped by the test-only [`FAULT_DISK_CAP_FILE_ENV`] fault).
pub fn available_space(dir: &Path) -> Result<u64, StoreError> {
    let st = rustix::fs::statvfs(dir).map_err(|e| StoreError::Io {
        op: "checking free space of",
        path: dir.to_path_buf(),
        source: std::io::Error::from_raw_os_error(e.raw_os_error()),
    })?;
    Ok(cap_space(st.f_bavail.saturating_mul(st.f_frsize), dir))
}

/// [`available_space`] of the filesystem holding an open confined root.
pub fn available_space_in(dir: &DataRoot) -> Result<u64, StoreError> {
    let st = rustix::fs::fstatvfs(dir.dir_fd()).map_err(|e| StoreError::Io {
        op: "checking free space of",
        path: dir.path().to_path_buf(),
        source: std::io::Error::from_raw_os_error(e.raw_os_error()),
    })?;
    Ok(cap_space(
        st.f_bavail.saturating_mul(st.f_frsize),
        dir.path(),
    ))
}

fn cap_space(real: u64, dir: &Path) -> u64 {
    match fault_disk_cap(dir) {
        Some(cap) => real.min(cap),
        None => real,
    }
}

/// Splits a store directory given by path into the data root and the
/// partial directory beneath it: `<root>/.peerfill-partial` (what the agent
/// uses) is the partial directory of `<root>`; any other directory is its
/// own root holding the partial files directly (tests, one-shot fills).
fn split_store_dir(dir: &Path) -> (&Path, Option<&Path>) {
    match (dir.file_name(), dir.parent()) {
        (Some(name), Some(parent)) if name == PARTIAL_DIR && !parent.as_os_str().is_empty() => {
            (parent, Some(Path::new(PARTIAL_DIR)))
        }
        _ => (dir, None),
    }
}

/// Reserves the file's blocks so a full disk shows up now, not half-way.
/// Filesystems without fallocate keep the sparse file from `set_len`.
fn preallocate(file: &File, len: u64, path: &Path) -> Result<(), StoreError> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let Ok(len_off) = libc::off_t::try_from(len) else {
        return Ok(());
    };
    // SAFETY: plain syscall on an fd we own; mode 0 only allocates blocks.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_off) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                debug!(path = %path.display(), "fallocate unsupported; file stays sparse");
            }
            _ => return Err(io_err("preallocating", path)(err)),
        }
    }
    Ok(())
}

/// A second, `O_DIRECT` descriptor of `file` (a new open file description,
/// so the buffered one keeps its flags), or `None` if refused.
fn open_direct(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    let magic = format!("/proc/self/fd/{}", file.as_raw_fd());
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&magic)
    {
        Ok(f) => Some(f),
        Err(e) => {
            debug!(error = %e, "no O_DIRECT for the partial file; writes go through the page cache");
            None
        }
    }
}

/// Whether a write of `data` at `offset` meets `O_DIRECT`'s alignment.
fn direct_aligned(data: &[u8], offset: u64) -> bool {
    let align = crate::bufpool::ALIGN;
    (data.as_ptr() as usize).is_multiple_of(align)
        && data.len().is_multiple_of(align)
        && offset.is_multiple_of(align as u64)
}

fn check_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty() || id.contains('/') || id.contains('\0') || id.starts_with('.') {
        return Err(StoreError::InvalidId { id: id.to_string() });
    }
    Ok(())
}

impl PieceStore {
    /// Async wrapper of [`PieceStore::open_in`] (runs it on a blocking thread).
    pub async fn open_in_async(
        root: &DataRoot,
        id: &str,
        layout: Layout,
    ) -> Result<PieceStore, StoreError> {
        check_id(id)?;
        let root = root.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || Self::open_in(&root, &id, layout)).await?
    }

    /// Async wrapper of [`PieceStore::open`] (runs it on a blocking thread).
    pub async fn open_async(
        dir: &Path,
        id: &str,
        layout: Layout,
    ) -> Result<PieceStore, StoreError> {
        check_id(id)?;
        let dir = dir.to_path_buf();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || Self::open(&dir, &id, layout)).await?
    }

    /// Opens the store for content `id` in `dir` (created if needed): resumes
    /// from an existing partial file and bitmap of the same layout, otherwise
    /// starts over. Fails with [`StoreError::InsufficientSpace`] when the
    /// filesystem cannot hold the bytes still to be allocated. Blocking (a
    /// few small file operations and one fallocate); see also
    /// [`PieceStore::open_async`].
    ///
    /// `dir` is `<data root>/.peerfill-partial` (the data root is then its
    /// parent and [`PieceStore::finalize`] may place the file anywhere
    /// beneath it), or any directory that is then the data root itself.
    pub fn open(dir: &Path, id: &str, layout: Layout) -> Result<PieceStore, StoreError> {
        check_id(id)?;
        let (root, sub) = split_store_dir(dir);
        let root = DataRoot::open(root)?;
        Self::open_at(&root, sub, id, layout)
    }

    /// Opens the store for content `id` in the partial directory
    /// ([`PARTIAL_DIR`]) of the data root `root`; see [`PieceStore::open`].
    pub fn open_in(root: &DataRoot, id: &str, layout: Layout) -> Result<PieceStore, StoreError> {
        Self::open_at(root, Some(Path::new(PARTIAL_DIR)), id, layout)
    }

    fn open_at(
        root: &DataRoot,
        sub: Option<&Path>,
        id: &str,
        layout: Layout,
    ) -> Result<PieceStore, StoreError> {
        check_id(id)?;
        let dir = match sub {
            Some(sub) => root.subdir(sub, true)?,
            None => root.clone(),
        };
        let p = Partial {
            root: root.clone(),
            data_name: PathBuf::from(format!("{id}.partial")),
            bitmap_name: PathBuf::from(format!("{id}.bitmap")),
            dir,
        };
        let data_path = p.dir.join(&p.data_name);
        let bitmap_path = p.dir.join(&p.bitmap_name);

        let resumed = match p.dir.read(&p.bitmap_name) {
            Ok(raw) => match decode_bitmap_file(&raw, &layout) {
                Some(bm) => match p.dir.metadata(&p.data_name)? {
                    Some(m) if m.is_file() && m.len == layout.size => Some(bm),
                    _ => None,
                },
                None => {
                    warn!(path = %bitmap_path.display(), "bitmap unreadable or for another layout; starting over");
                    None
                }
            },
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };

        let have = match resumed {
            Some(bm) => {
                info!(
                    path = %data_path.display(),
                    held = bm.count_ones(),
                    pieces = bm.len(),
                    "resuming partial content"
                );
                bm
            }
            None => {
                remove_if_exists(&p.dir, &p.bitmap_name)?;
                remove_if_exists(&p.dir, &p.data_name)?;
                Bitmap::new(layout.piece_count())
            }
        };

        let file = p.dir.create_partial(&p.data_name)?;
        let meta = file.metadata().map_err(io_err("inspecting", &data_path))?;
        // Only the blocks not yet allocated still need room.
        let allocated = meta.blocks().saturating_mul(512);
        let needed = layout.size.saturating_sub(allocated);
        let available = available_space_in(&p.dir)?;
        if needed > available {
            drop(file);
            if have.count_ones() == 0 {
                remove_if_exists(&p.dir, &p.data_name)?;
            }
            return Err(StoreError::InsufficientSpace {
                needed,
                available,
                path: data_path,
            });
        }
        file.set_len(layout.size)
            .map_err(io_err("sizing", &data_path))?;
        preallocate(&file, layout.size, &data_path)?;
        if have.count_ones() == 0 {
            // Record the layout now, so a restart can tell this partial file
            // belongs to this layout even before its first piece lands.
            write_bitmap_file(&p, &layout, &have)?;
        }
        let direct = open_direct(&file);
        Ok(PieceStore {
            inner: Arc::new(Inner {
                layout,
                data: RwLock::new(Arc::new(ContentFile::File(file))),
                direct,
                data_path,
                partial: Some(p),
                have: Mutex::new(have),
                dirty: Mutex::new(Dirty::default()),
                flush_bytes: FLUSH_BYTES,
                flush_interval: FLUSH_INTERVAL,
                flushing: Mutex::new(()),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Serves pieces of an already complete file (a seeder, or an agent that
    /// finished): every piece is held, writes are refused. The file is
    /// trusted to hold the content; callers verify it first if needed.
    ///
    /// By absolute path: only the last component is refused if it is a
    /// symlink. Prefer [`PieceStore::open_complete_in`], which refuses a
    /// symlink anywhere beneath the data root.
    pub fn open_complete(path: &Path, layout: Layout) -> Result<PieceStore, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_err("opening", path))?;
        Self::complete_from(file, path, layout)
    }

    /// Serves pieces of the complete regular file `rel` beneath the data
    /// root (a node source, or a content finished before a restart): a
    /// symlink anywhere in `rel` is refused ([`FsError::Symlink`]), so a
    /// node source can never send a file from outside the root.
    pub fn open_complete_in(
        root: &DataRoot,
        rel: &Path,
        layout: Layout,
    ) -> Result<PieceStore, StoreError> {
        let file = root.open_read(rel)?;
        Self::complete_from(file, &root.join(rel), layout)
    }

    fn complete_from(file: File, path: &Path, layout: Layout) -> Result<PieceStore, StoreError> {
        let meta = file.metadata().map_err(io_err("inspecting", path))?;
        if !meta.is_file() {
            return Err(FsError::NotRegular {
                path: path.to_path_buf(),
            }
            .into());
        }
        let actual = meta.len();
        if actual != layout.size {
            return Err(StoreError::SizeMismatch {
                path: path.to_path_buf(),
                expected: layout.size,
                actual,
            });
        }
        Self::complete_of(ContentFile::File(file), path, layout)
    }

    /// Serves pieces of a complete directory (a node source walked, or a
    /// directory content finished before a restart): every piece is held.
    pub fn open_complete_tree(
        tree: TreeFiles,
        path: &Path,
        layout: Layout,
    ) -> Result<PieceStore, StoreError> {
        let actual = tree.table().size();
        if actual != layout.size {
            return Err(StoreError::SizeMismatch {
                path: path.to_path_buf(),
                expected: layout.size,
                actual,
            });
        }
        Self::complete_of(ContentFile::Tree(tree), path, layout)
    }

    fn complete_of(
        data: ContentFile,
        path: &Path,
        layout: Layout,
    ) -> Result<PieceStore, StoreError> {
        Ok(PieceStore {
            inner: Arc::new(Inner {
                layout,
                data: RwLock::new(Arc::new(data)),
                direct: None,
                data_path: path.to_path_buf(),
                partial: None,
                have: Mutex::new(Bitmap::full(layout.piece_count())),
                dirty: Mutex::new(Dirty::default()),
                flush_bytes: FLUSH_BYTES,
                flush_interval: FLUSH_INTERVAL,
                flushing: Mutex::new(()),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Deletes the partial file and bitmap of content `id` in `dir`, if any
    /// (a distribution was deleted).
    /// `dir` as in [`PieceStore::open`].
    pub fn remove(dir: &Path, id: &str) -> Result<(), StoreError> {
        check_id(id)?;
        let (root, sub) = split_store_dir(dir);
        if !root.exists() {
            return Ok(());
        }
        Self::remove_at(&DataRoot::open(root)?, sub, id)
    }

    /// Deletes the partial file and bitmap of content `id` in the partial
    /// directory of `root`, if any (never following a symlink).
    pub fn remove_in(root: &DataRoot, id: &str) -> Result<(), StoreError> {
        Self::remove_at(root, Some(Path::new(PARTIAL_DIR)), id)
    }

    fn remove_at(root: &DataRoot, sub: Option<&Path>, id: &str) -> Result<(), StoreError> {
        check_id(id)?;
        let prefix = sub.map(Path::to_path_buf).unwrap_or_default();
        for ext in ["partial", "bitmap", "bitmap.tmp"] {
            remove_if_exists(root, &prefix.join(format!("{id}.{ext}")))?;
        }
        // A directory content's stage (see `finalize_tree`).
        root.remove_tree(&prefix.join(format!("{id}.tree")))?;
        Ok(())
    }

    pub fn layout(&self) -> Layout {
        self.inner.layout
    }

    /// Path of the data file (the partial file, or the complete file served).
    pub fn path(&self) -> &Path {
        &self.inner.data_path
    }

    /// A snapshot of the pieces held. (A snapshot rather than a reference:
    /// concurrent writers update the live bitmap under a lock.)
    pub fn have(&self) -> Bitmap {
        self.lock_have().clone()
    }

    /// Whether piece `index` is held.
    pub fn has(&self, index: u32) -> bool {
        self.lock_have().get(index)
    }

    /// Number of pieces held.
    pub fn held_count(&self) -> u32 {
        self.lock_have().count_ones()
    }

    /// Bytes of the pieces held.
    pub fn held_bytes(&self) -> u64 {
        let have = self.lock_have();
        have.iter_ones()
            .map(|i| u64::from(self.inner.layout.piece_len(i)))
            .sum()
    }

    pub fn is_complete(&self) -> bool {
        self.lock_have().is_full()
    }

    fn lock_have(&self) -> std::sync::MutexGuard<'_, Bitmap> {
        // The bitmap stays consistent even if a holder panicked: it is only
        // ever updated by a single `set`.
        self.inner
            .have
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn check_piece(&self, index: u32) -> Result<(), StoreError> {
        let count = self.inner.layout.piece_count();
        if index >= count {
            return Err(StoreError::PieceOutOfRange { index, count });
        }
        Ok(())
    }

    /// Writes piece `index` at its offset and marks it held; it becomes
    /// durable with its batch (see the module doc: a flush runs here when
    /// the batch is due). Callers pass only VERIFIED data (see
    /// `content::verify_piece`): whatever is written here is served to
    /// other peers. Safe to call concurrently for different pieces; writing
    /// a piece already held is a no-op.
    pub async fn write_piece(&self, index: u32, data: Bytes) -> Result<(), StoreError> {
        self.check_piece(index)?;
        let expected = self.inner.layout.piece_len(index);
        if data.len() != expected as usize {
            return Err(StoreError::WrongLength {
                index,
                expected,
                got: data.len(),
            });
        }
        if self.inner.partial.is_none() || self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::ReadOnly {
                path: self.inner.data_path.clone(),
            });
        }
        if self.has(index) {
            return Ok(());
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write_piece_blocking(index, &data)).await?
    }

    fn write_piece_blocking(&self, index: u32, data: &[u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        let Some(p) = inner.partial.as_ref() else {
            return Err(StoreError::ReadOnly {
                path: inner.data_path.clone(),
            });
        };
        // The disk-full fault hits writes too (the blocks are
        // preallocated, so a real full disk would not; the fault
        // emulates a filesystem that cannot reserve them).
        let len = data.len() as u64;
        if let Some(cap) = fault_disk_cap(p.dir.path())
            && cap < len
        {
            return Err(StoreError::InsufficientSpace {
                needed: len,
                available: cap,
                path: inner.data_path.clone(),
            });
        }
        let offset = inner.layout.piece_range(index).start;
        // A whole piece in an unaligned buffer (e.g. read from the origin):
        // copying it into a pooled aligned buffer costs far less than the
        // page-cache copy a buffered write makes.
        let realign = inner.direct.is_some()
            && !direct_aligned(data, offset)
            && data.len() >= crate::bufpool::POOL_MIN_LEN
            && data.len().is_multiple_of(crate::bufpool::ALIGN)
            && offset.is_multiple_of(crate::bufpool::ALIGN as u64);
        let realigned = realign.then(|| {
            let pool = crate::bufpool::global();
            let mut buf = pool.take(data.len());
            buf.as_mut_slice().copy_from_slice(data);
            pool.freeze(buf)
        });
        let data = realigned.as_deref().unwrap_or(data);
        let direct = inner
            .direct
            .as_ref()
            .filter(|_| direct_aligned(data, offset))
            .map(|f| f.write_all_at(data, offset));
        if !matches!(direct, Some(Ok(()))) {
            if let Some(Err(e)) = direct {
                // E.g. a short direct write; the buffered path always works.
                debug!(error = %e, piece = index, "direct write failed; writing through the page cache");
            }
            inner.with_file(|file| {
                file.write_all_at(data, offset)
                    .map_err(io_err("writing", &inner.data_path))
            })?;
        }
        let due = {
            let mut have = self.lock_have();
            if inner.closed.load(Ordering::Acquire) {
                return Err(StoreError::ReadOnly {
                    path: inner.data_path.clone(),
                });
            }
            if !have.set(index) {
                return Ok(());
            }
            let mut dirty = inner.dirty.lock().unwrap_or_else(PoisonError::into_inner);
            dirty.bytes += len;
            dirty.since.get_or_insert_with(Instant::now);
            dirty.due(inner.flush_bytes, inner.flush_interval)
        };
        if due {
            flush_inner(inner)?;
        }
        Ok(())
    }

    /// Makes every piece written so far durable and records it in the
    /// persisted bitmap (fdatasync + bitmap rename; nothing if no piece is
    /// unflushed). Blocking.
    pub fn flush(&self) -> Result<(), StoreError> {
        flush_inner(&self.inner)
    }

    /// Reads piece `index`; only for pieces held ([`StoreError::NotHeld`]
    /// otherwise), so only verified bytes ever leave the store.
    pub async fn read_piece(&self, index: u32) -> Result<Bytes, StoreError> {
        self.check_piece(index)?;
        if !self.has(index) {
            return Err(StoreError::NotHeld { index });
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let inner = &this.inner;
            let range = inner.layout.piece_range(index);
            let pool = crate::bufpool::global();
            let mut buf = pool.take((range.end - range.start) as usize);
            inner
                .data()
                .read_exact_at(buf.as_mut_slice(), range.start)
                .map_err(io_err("reading", &inner.data_path))?;
            Ok(pool.freeze(buf))
        })
        .await?
    }

    /// Makes the complete content durable and moves it atomically to `dest`
    /// (parent directories created; `dest` replaced if it exists), then drops
    /// the bitmap. Fails with [`StoreError::Incomplete`] if a piece is missing.
    ///
    /// `dest` must be beneath the data root and pass
    /// [`crate::fsroot::check_user_path`] relative to it; the rename is
    /// resolved beneath the root without following symlinks.
    pub async fn finalize(self, dest: &Path) -> Result<(), StoreError> {
        let Some(p) = self.inner.partial.as_ref() else {
            return Err(StoreError::ReadOnly {
                path: self.inner.data_path.clone(),
            });
        };
        let rel = p.root.rel_of(dest)?;
        self.finalize_rel(&rel).await
    }

    /// [`PieceStore::finalize`] to `rel`, relative to the data root.
    pub async fn finalize_rel(self, rel: &Path) -> Result<(), StoreError> {
        self.begin_finalize(rel)?;
        let rel = rel.to_path_buf();
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let from = &inner.data_path;
            let Some(p) = inner.partial.as_ref() else {
                return Err(StoreError::ReadOnly { path: from.clone() });
            };
            let dest = p.root.join(&rel);
            inner.with_file(|file| file.sync_all().map_err(io_err("syncing", from)))?;
            // A previous version that was a directory content of ours is
            // swapped out in one exchange, then removed: a rename cannot
            // replace a directory with a file.
            let moved = if crate::tree::is_ours(&p.root, &rel) {
                p.root.swap_in_from(&p.dir, &p.data_name, &rel).map(|_| {
                    // The new file is in place; a leftover old tree only
                    // costs space until the content is removed.
                    if let Err(e) = p.dir.remove_tree(&p.data_name) {
                        warn!(error = %e, "cannot remove the previous version's directory");
                    }
                })
            } else {
                p.root.rename_from(&p.dir, &p.data_name, &rel)
            };
            if let Err(e) = moved {
                inner.closed.store(false, Ordering::Release);
                if let FsError::Io { source, .. } = &e
                    && source.raw_os_error() == Some(libc::EXDEV)
                {
                    return Err(StoreError::CrossDevice {
                        from: from.clone(),
                        to: dest,
                    });
                }
                return Err(e.into());
            }
            remove_if_exists(&p.dir, &p.bitmap_name)?;
            rustix::fs::fsync(p.dir.dir_fd()).map_err(|e| StoreError::Io {
                op: "syncing directory",
                path: p.dir.path().to_path_buf(),
                source: std::io::Error::from_raw_os_error(e.raw_os_error()),
            })?;
            info!(dest = %dest.display(), bytes = inner.layout.size, "content complete");
            Ok(())
        })
        .await?
    }

    /// Checks that a partial store is complete and may move to `rel`, and
    /// refuses writes from then on.
    fn begin_finalize(&self, rel: &Path) -> Result<(), StoreError> {
        if self.inner.partial.is_none() {
            return Err(StoreError::ReadOnly {
                path: self.inner.data_path.clone(),
            });
        }
        check_user_path(rel).map_err(|source| FsError::Path {
            path: rel.to_path_buf(),
            source,
        })?;
        let have = self.have();
        if !have.is_full() {
            return Err(StoreError::Incomplete {
                missing: have.len() - have.count_ones(),
                count: have.len(),
            });
        }
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Err(StoreError::ReadOnly {
                path: self.inner.data_path.clone(),
            });
        }
        Ok(())
    }

    /// [`PieceStore::finalize`] for a directory content: the complete blob
    /// is written out as the directory at `dest` ([`crate::tree::stage`]),
    /// served from there on, and the partial file and bitmap removed.
    pub async fn finalize_tree(self, dest: &Path) -> Result<(), StoreError> {
        let Some(p) = self.inner.partial.as_ref() else {
            return Err(StoreError::ReadOnly {
                path: self.inner.data_path.clone(),
            });
        };
        let rel = p.root.rel_of(dest)?;
        self.begin_finalize(&rel)?;
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || {
            let Some(p) = inner.partial.as_ref() else {
                return Err(StoreError::ReadOnly {
                    path: inner.data_path.clone(),
                });
            };
            let mut stage = p.data_name.clone();
            stage.set_extension("tree");
            inner.with_file(|blob| {
                crate::tree::stage::write_tree(
                    blob,
                    inner.layout.size,
                    &p.root,
                    &p.dir,
                    &stage,
                    &rel,
                )
                .map_err(StoreError::from)
            })?;
            let tree = TreeFiles::open(&p.root, &rel)?;
            *inner.data.write().unwrap_or_else(PoisonError::into_inner) =
                Arc::new(ContentFile::Tree(tree));
            remove_if_exists(&p.dir, &p.data_name)?;
            remove_if_exists(&p.dir, &p.bitmap_name)?;
            p.dir.sync_dir(Path::new(""))?;
            Ok(())
        })
        .await?;
        if result.is_err() {
            // Nothing moved: the partial file stays for the next attempt.
            self.inner.closed.store(false, Ordering::Release);
        }
        result
    }

    /// Stops filling, keeping the partial file and bitmap (a fill that is
    /// stopped or restarted with another role resumes from them): flushes
    /// the pieces written so far (blocking: one fdatasync), then refuses
    /// writes. Takes the bitmap lock so no write in flight records a piece
    /// afterwards.
    pub fn close(&self) {
        if let Err(e) = self.flush() {
            warn!(path = %self.inner.data_path.display(), error = %e, "cannot persist the last batch of pieces");
        }
        self.inner.closed.store(true, Ordering::Release);
        drop(self.lock_have());
    }

    /// Test-only crash: stops the store WITHOUT flushing, as a killed agent
    /// would, so dropping it afterwards persists nothing more.
    #[cfg(test)]
    fn crash(self) {
        self.inner.closed.store(true, Ordering::Release);
    }

    /// Test-only: a batch of `bytes` and no time trigger, on a store just
    /// opened (no other handle yet).
    #[cfg(test)]
    fn with_batch(mut self, bytes: u64) -> PieceStore {
        let inner = Arc::get_mut(&mut self.inner).expect("a store just opened");
        inner.flush_bytes = bytes;
        inner.flush_interval = Duration::from_secs(24 * 3600);
        self
    }

    /// Stops filling and deletes the partial file and bitmap.
    pub async fn discard(self) -> Result<(), StoreError> {
        self.inner.closed.store(true, Ordering::Release);
        if self.inner.partial.is_none() {
            // Serving a complete file: it is not ours to delete.
            return Ok(());
        }
        let this = self;
        tokio::task::spawn_blocking(move || {
            // Under the flush lock: in-flight flushes see `closed` before
            // they could write the bitmap again.
            let _serial = this
                .inner
                .flushing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(p) = this.inner.partial.as_ref() else {
                return Ok(());
            };
            remove_if_exists(&p.dir, &p.data_name)?;
            remove_if_exists(&p.dir, &p.bitmap_name)?;
            remove_if_exists(&p.dir, &p.tmp_bitmap_name())
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::MIN_PIECE_SIZE;

    fn piece(layout: &Layout, i: u32) -> Bytes {
        let len = layout.piece_len(i) as usize;
        Bytes::from(
            (0..len)
                .map(|j| (i as usize * 31 + j) as u8)
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn bitmap_basics() {
        let mut b = Bitmap::new(11);
        assert_eq!(b.to_bytes().len(), 2);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(10));
        assert!(!b.set(11));
        assert!(b.get(10) && b.get(0) && !b.get(5) && !b.get(99));
        assert_eq!(b.count_ones(), 2);
        assert_eq!(b.iter_missing().count(), 9);
        assert_eq!(b.to_bytes(), vec![0x80, 0x20]);
        assert_eq!(Bitmap::from_bytes(11, &b.to_bytes()).unwrap(), b);
        let f = Bitmap::full(11);
        assert!(f.is_full());
        assert_eq!(f.to_bytes(), vec![0xff, 0xe0]);
        assert!(Bitmap::new(0).is_full());
        assert!(Bitmap::from_bytes(11, &[0xff, 0xff]).is_err());
        assert!(Bitmap::from_bytes(11, &[0xff]).is_err());
    }

    #[test]
    fn bitmap_from_garbage_never_panics() {
        use proptest::prelude::*;
        proptest!(|(len in 0u32..200, bytes in proptest::collection::vec(any::<u8>(), 0..40))| {
            if let Ok(b) = Bitmap::from_bytes(len, &bytes) {
                prop_assert_eq!(b.to_bytes(), bytes);
                prop_assert!(b.count_ones() <= len);
                prop_assert_eq!(b.iter_missing().count() as u32, len - b.count_ones());
            }
        });
        // Also the large-length edge.
        assert!(Bitmap::from_bytes(u32::MAX, &[1, 2, 3]).is_err());
    }

    #[tokio::test]
    async fn a_file_version_replaces_a_directory_version_in_one_swap() {
        let tmp = tempfile::tempdir().unwrap();
        let root = DataRoot::open(tmp.path()).unwrap();
        let old = tmp.path().join("models/m");
        std::fs::create_dir_all(old.join("sub")).unwrap();
        std::fs::write(old.join(crate::tree::TABLE_FILE), b"table").unwrap();
        std::fs::write(old.join("sub/shard"), b"old").unwrap();
        let layout = Layout::new(3 * u64::from(MIN_PIECE_SIZE), MIN_PIECE_SIZE).unwrap();
        let store = PieceStore::open_in(&root, "v2", layout).unwrap();
        for i in 0..layout.piece_count() {
            store.write_piece(i, piece(&layout, i)).await.unwrap();
        }
        store.clone().finalize(&old).await.unwrap();
        assert!(old.is_file(), "the directory was replaced by the file");
        assert_eq!(std::fs::metadata(&old).unwrap().len(), layout.size);
        let partial = tmp.path().join(PARTIAL_DIR);
        let left: Vec<_> = std::fs::read_dir(&partial).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        // Served from the new place.
        assert_eq!(store.read_piece(1).await.unwrap(), piece(&layout, 1));
    }

    #[tokio::test]
    async fn write_out_of_order_resume_finalize() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(PARTIAL_DIR);
        let layout = Layout::new(u64::from(MIN_PIECE_SIZE) * 5 + 123, MIN_PIECE_SIZE).unwrap();
        let store = PieceStore::open(&dir, "c1", layout).unwrap();
        assert_eq!(store.held_count(), 0);
        // Concurrent, out-of-order writes.
        let (a, b) = tokio::join!(
            store.write_piece(4, piece(&layout, 4)),
            store.write_piece(1, piece(&layout, 1))
        );
        a.unwrap();
        b.unwrap();
        store.write_piece(5, piece(&layout, 5)).await.unwrap();
        assert!(matches!(
            store.read_piece(0).await,
            Err(StoreError::NotHeld { index: 0 })
        ));
        assert!(matches!(
            store.write_piece(0, Bytes::from_static(b"short")).await,
            Err(StoreError::WrongLength { .. })
        ));
        assert!(matches!(
            store.write_piece(6, piece(&layout, 5)).await,
            Err(StoreError::PieceOutOfRange { .. })
        ));
        drop(store);

        // Resume: the bitmap survived and the data reads back.
        let store = PieceStore::open(&dir, "c1", layout).unwrap();
        let have = store.have();
        assert_eq!(have.iter_ones().collect::<Vec<_>>(), vec![1, 4, 5]);
        assert_eq!(store.read_piece(4).await.unwrap(), piece(&layout, 4));
        assert_eq!(store.read_piece(5).await.unwrap(), piece(&layout, 5));
        assert!(matches!(
            store.clone().finalize(&root.path().join("x")).await,
            Err(StoreError::Incomplete {
                missing: 3,
                count: 6
            })
        ));
        for i in [0, 2, 3] {
            store.write_piece(i, piece(&layout, i)).await.unwrap();
        }
        assert!(store.is_complete());
        let dest = root.path().join("models/a/b.bin");
        store.finalize(&dest).await.unwrap();
        let got = std::fs::read(&dest).unwrap();
        let want: Vec<u8> = (0..6).flat_map(|i| piece(&layout, i).to_vec()).collect();
        assert_eq!(got, want);
        assert!(!dir.join("c1.partial").exists());
        assert!(!dir.join("c1.bitmap").exists());

        // Serve it back from the complete file.
        let seeder = PieceStore::open_complete(&dest, layout).unwrap();
        assert!(seeder.is_complete());
        assert_eq!(seeder.read_piece(2).await.unwrap(), piece(&layout, 2));
        assert!(matches!(
            seeder.write_piece(2, piece(&layout, 2)).await,
            Err(StoreError::ReadOnly { .. })
        ));
        let other = Layout::new(layout.size + 1, MIN_PIECE_SIZE).unwrap();
        assert!(matches!(
            PieceStore::open_complete(&dest, other),
            Err(StoreError::SizeMismatch { .. })
        ));
    }

    /// A crash mid-batch: the pieces of the unflushed batch were served
    /// while held, but after the restart none of them is trusted (whatever
    /// the crash left in their bytes); the flushed ones are.
    #[tokio::test]
    async fn a_crash_mid_batch_trusts_only_flushed_pieces() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(u64::from(MIN_PIECE_SIZE) * 6, MIN_PIECE_SIZE).unwrap();
        let batch = 2 * u64::from(MIN_PIECE_SIZE);
        let store = PieceStore::open(root.path(), "c", layout)
            .unwrap()
            .with_batch(batch);
        // Pieces 4 and 1 fill a batch: flushed by the second write.
        for i in [4, 1] {
            store.write_piece(i, piece(&layout, i)).await.unwrap();
        }
        // Pieces 2 and 5: a batch not yet full when the agent dies.
        store.write_piece(2, piece(&layout, 2)).await.unwrap();
        assert!(store.has(2), "held (and servable) before it is durable");
        assert_eq!(store.read_piece(2).await.unwrap(), piece(&layout, 2));
        store.crash();
        // A crash may leave anything in bytes not yet synced.
        let raw = OpenOptions::new()
            .write(true)
            .open(root.path().join("c.partial"))
            .unwrap();
        let r = layout.piece_range(2);
        raw.write_all_at(&vec![0xEE; (r.end - r.start) as usize], r.start)
            .unwrap();
        drop(raw);

        let store = PieceStore::open(root.path(), "c", layout)
            .unwrap()
            .with_batch(batch);
        assert_eq!(store.have().iter_ones().collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!(store.read_piece(4).await.unwrap(), piece(&layout, 4));
        assert!(matches!(
            store.read_piece(2).await,
            Err(StoreError::NotHeld { index: 2 })
        ));
        // Fetched again, it is held again; close() persists a partial batch.
        store.write_piece(2, piece(&layout, 2)).await.unwrap();
        store.close();
        drop(store);
        let store = PieceStore::open(root.path(), "c", layout).unwrap();
        assert_eq!(store.have().iter_ones().collect::<Vec<_>>(), vec![1, 2, 4]);
        assert_eq!(store.read_piece(2).await.unwrap(), piece(&layout, 2));
    }

    /// Pieces in the pool's aligned buffers take the O_DIRECT path (where
    /// the filesystem has it); they read back the same, before and after a
    /// reopen, like any other piece.
    #[tokio::test]
    async fn aligned_pieces_write_through_and_read_back() {
        let root = tempfile::tempdir().unwrap();
        // Pieces above the pool's minimum; the last one is short (buffered).
        let size = 256 << 10;
        let layout = Layout::new(u64::from(size) * 2 + 100, size).unwrap();
        let store = PieceStore::open(root.path(), "c", layout).unwrap();
        let pool = crate::bufpool::global();
        for i in 0..layout.piece_count() {
            let want = piece(&layout, i);
            // Piece 1 comes in an ordinary (unaligned) buffer: realigned.
            let data = if i == 1 {
                want.clone()
            } else {
                let mut buf = pool.take(want.len());
                buf.as_mut_slice().copy_from_slice(&want);
                pool.freeze(buf)
            };
            store.write_piece(i, data).await.unwrap();
            assert_eq!(store.read_piece(i).await.unwrap(), want);
        }
        drop(store);
        let store = PieceStore::open(root.path(), "c", layout).unwrap();
        assert!(store.is_complete());
        for i in 0..layout.piece_count() {
            assert_eq!(store.read_piece(i).await.unwrap(), piece(&layout, i));
        }
    }

    /// Without a crash nothing is lost: the last handle dropping flushes,
    /// and the batch bound holds while writing.
    #[tokio::test]
    async fn batches_flush_at_the_bound_and_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(u64::from(MIN_PIECE_SIZE) * 5, MIN_PIECE_SIZE).unwrap();
        let store = PieceStore::open(root.path(), "c", layout)
            .unwrap()
            .with_batch(3 * u64::from(MIN_PIECE_SIZE));
        let persisted = |root: &Path| {
            let raw = std::fs::read(root.join("c.bitmap")).unwrap();
            decode_bitmap_file(&raw, &layout)
                .unwrap()
                .iter_ones()
                .collect::<Vec<_>>()
        };
        for i in 0..2 {
            store.write_piece(i, piece(&layout, i)).await.unwrap();
        }
        assert!(persisted(root.path()).is_empty(), "batch not full yet");
        store.write_piece(2, piece(&layout, 2)).await.unwrap();
        assert_eq!(persisted(root.path()), vec![0, 1, 2]);
        store.write_piece(3, piece(&layout, 3)).await.unwrap();
        assert_eq!(persisted(root.path()), vec![0, 1, 2]);
        drop(store);
        assert_eq!(persisted(root.path()), vec![0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn layout_change_starts_over_and_corrupt_bitmap_is_ignored() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(u64::from(MIN_PIECE_SIZE) * 3, MIN_PIECE_SIZE).unwrap();
        let store = PieceStore::open(root.path(), "c", layout).unwrap();
        store.write_piece(0, piece(&layout, 0)).await.unwrap();
        drop(store);
        let bigger = Layout::new(u64::from(MIN_PIECE_SIZE) * 4, MIN_PIECE_SIZE).unwrap();
        let store = PieceStore::open(root.path(), "c", bigger).unwrap();
        assert_eq!(store.held_count(), 0);
        store.write_piece(3, piece(&bigger, 3)).await.unwrap();
        drop(store);
        // Flip a byte of the bitmap file: the checksum catches it.
        let bm = root.path().join("c.bitmap");
        let mut raw = std::fs::read(&bm).unwrap();
        raw[20] ^= 0xff;
        std::fs::write(&bm, raw).unwrap();
        let store = PieceStore::open(root.path(), "c", bigger).unwrap();
        assert_eq!(store.held_count(), 0);
        let clone = store.clone();
        store.discard().await.unwrap();
        assert!(!root.path().join("c.partial").exists());
        assert!(!bm.exists());
        // A write racing the discard fails and does not bring the bitmap back.
        assert!(matches!(
            clone.write_piece(1, piece(&bigger, 1)).await,
            Err(StoreError::ReadOnly { .. })
        ));
        assert!(!bm.exists());
    }

    #[tokio::test]
    async fn insufficient_space_is_reported() {
        let root = tempfile::tempdir().unwrap();
        // 1 PiB: absurd for a test machine, yet a valid layout (2^24 pieces).
        let layout = Layout::new(1 << 50, 64 << 20).unwrap();
        let err = PieceStore::open_async(root.path(), "huge", layout)
            .await
            .unwrap_err();
        match &err {
            StoreError::InsufficientSpace {
                needed, available, ..
            } => {
                assert_eq!(*needed, 1 << 50);
                assert!(available < needed);
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().starts_with("not enough free space"));
        assert!(!root.path().join("huge.partial").exists());
    }

    #[tokio::test]
    async fn remove_and_invalid_ids() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(10, MIN_PIECE_SIZE).unwrap();
        let store = PieceStore::open(root.path(), "r", layout).unwrap();
        store.write_piece(0, piece(&layout, 0)).await.unwrap();
        drop(store);
        PieceStore::remove(root.path(), "r").unwrap();
        assert!(!root.path().join("r.partial").exists());
        PieceStore::remove(root.path(), "r").unwrap();
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(matches!(
                PieceStore::open(root.path(), bad, layout),
                Err(StoreError::InvalidId { .. })
            ));
        }
        // Empty content: complete at once, finalizes to an empty file.
        let empty = Layout::new(0, MIN_PIECE_SIZE).unwrap();
        let store = PieceStore::open(root.path(), "e", empty).unwrap();
        assert!(store.is_complete());
        let dest = root.path().join("out/empty");
        store.finalize(&dest).await.unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 0);
    }

    #[tokio::test]
    async fn symlinks_in_the_data_root_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"victim").unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("evil")).unwrap();
        let layout = Layout::new(10, MIN_PIECE_SIZE).unwrap();
        let data_root = DataRoot::open(&root).unwrap();

        // Finalizing through a symlinked directory, onto a reserved name, or
        // outside the root is refused and leaves the partial file in place.
        let store = PieceStore::open_in(&data_root, "c", layout).unwrap();
        store.write_piece(0, piece(&layout, 0)).await.unwrap();
        for dest in ["evil/victim", "evil/new", ".peerfill-status/c.json"] {
            let err = store.clone().finalize(&root.join(dest)).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Fs(FsError::Symlink { .. } | FsError::Path { .. })
                ),
                "{dest}: {err}"
            );
        }
        assert!(matches!(
            store.clone().finalize(&outside.join("x")).await,
            Err(StoreError::Fs(FsError::OutsideRoot { .. }))
        ));
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"victim");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        store.finalize(&root.join("ok/c.bin")).await.unwrap();
        assert_eq!(
            std::fs::read(root.join("ok/c.bin")).unwrap(),
            piece(&layout, 0)
        );

        // A node source (or a complete file) that is, or is under, a symlink
        // to the outside is not served.
        std::os::unix::fs::symlink(outside.join("victim"), root.join("link")).unwrap();
        for rel in ["link", "evil/victim"] {
            assert!(matches!(
                PieceStore::open_complete_in(&data_root, Path::new(rel), layout),
                Err(StoreError::Fs(FsError::Symlink { .. }))
            ));
        }
        assert!(PieceStore::open_complete(&root.join("link"), layout).is_err());
        assert!(PieceStore::open_complete_in(&data_root, Path::new("ok/c.bin"), layout).is_ok());

        // A partial directory that is a symlink to the outside is refused.
        let root2 = tmp.path().join("root2");
        std::fs::create_dir(&root2).unwrap();
        std::os::unix::fs::symlink(&outside, root2.join(PARTIAL_DIR)).unwrap();
        let err = PieceStore::open(&root2.join(PARTIAL_DIR), "d", layout).unwrap_err();
        assert!(
            matches!(err, StoreError::Fs(FsError::Symlink { .. })),
            "{err}"
        );
        PieceStore::remove(&root2.join(PARTIAL_DIR), "victim").unwrap_err();
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"victim");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn disk_cap_fault_fills_and_frees_the_disk_at_runtime() {
        let tmp = tempfile::tempdir().unwrap();
        let cap_file = tmp.path().join("cap");
        let root = tmp.path().join("root");
        test_cap::set(&root, &cap_file);
        let layout = Layout::new(u64::from(MIN_PIECE_SIZE) * 2, MIN_PIECE_SIZE).unwrap();
        let data_root = DataRoot::open(&root).unwrap();

        // "Full" disk: opening fails with the real error, nothing is left.
        std::fs::write(&cap_file, "100").unwrap();
        assert_eq!(available_space_in(&data_root).unwrap(), 100);
        let err = PieceStore::open_in(&data_root, "c", layout).unwrap_err();
        assert!(
            matches!(err, StoreError::InsufficientSpace { available: 100, .. }),
            "{err}"
        );
        assert!(!root.join(PARTIAL_DIR).join("c.partial").exists());

        // Freed: opens; filled again at runtime: writes fail the same way.
        std::fs::write(&cap_file, (layout.size * 4).to_string()).unwrap();
        let store = PieceStore::open_in(&data_root, "c", layout).unwrap();
        store.write_piece(0, piece(&layout, 0)).await.unwrap();
        std::fs::write(&cap_file, "0\n").unwrap();
        assert!(matches!(
            store.write_piece(1, piece(&layout, 1)).await,
            Err(StoreError::InsufficientSpace { available: 0, .. })
        ));
        assert!(!store.has(1));
        // Freed again: the write goes through.
        std::fs::write(&cap_file, "99999999").unwrap();
        store.write_piece(1, piece(&layout, 1)).await.unwrap();
        assert!(store.is_complete());
        // Garbage in the file means no cap.
        std::fs::write(&cap_file, "lots").unwrap();
        assert!(available_space_in(&data_root).unwrap() > 0);
        assert_eq!(read_cap_file(&cap_file), None);
        assert_eq!(read_cap_file(&tmp.path().join("missing")), None);
    }

    fn peak_rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Benchmark, not a check: fills a 2 GiB content with 4 concurrent
    /// writers (fdatasync + bitmap persist per batch), then reads it back,
    /// and prints throughput and the process's peak RSS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark: cargo nextest run -p peerfill-agent --run-ignored only --no-capture bench_"]
    async fn bench_store_fill_2gib() {
        use crate::content::DEFAULT_PIECE_SIZE;
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(2 << 30, DEFAULT_PIECE_SIZE).unwrap();
        let store = PieceStore::open(root.path(), "bench", layout).unwrap();
        let rss_before = peak_rss_kib();
        let start = std::time::Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let (store, next) = (store.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= layout.piece_count() {
                            break;
                        }
                        store.write_piece(i, piece(&layout, i)).await.unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let write_secs = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        for i in 0..layout.piece_count() {
            std::hint::black_box(store.read_piece(i).await.unwrap());
        }
        let read_secs = start.elapsed().as_secs_f64();
        let dest = root.path().join("out/bench.bin");
        let start = std::time::Instant::now();
        store.finalize(&dest).await.unwrap();
        println!(
            "BENCH store 2 GiB: write {:.0} MiB/s, read {:.0} MiB/s, finalize {:.3}s, peak RSS {} MiB (before fill {} MiB)",
            2048.0 / write_secs,
            2048.0 / read_secs,
            start.elapsed().as_secs_f64(),
            peak_rss_kib() / 1024,
            rss_before / 1024
        );
    }
}
