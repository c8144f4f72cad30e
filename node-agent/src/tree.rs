//! A directory as one content.
//!
//! A Distribution may carry a directory (a model's shards and small files,
//! a dataset, a build tree) instead of one file. Everything below the
//! content layer — pieces, hashes, the pinned root, the swarm, the store's
//! partial file — stays exactly as for one file, because the directory is
//! distributed as one *virtual blob*:
//!
//! ```text
//! blob = header ‖ file₀ ‖ file₁ ‖ … ‖ fileₙ₋₁
//! header = "peerfill-tree\0v1" ‖ u64 LE length of the table ‖ table (JSON)
//! table = [{"path", "size", "executable"?, "digest"?}, …]   sorted by path
//! ```
//!
//! - **Identity.** The table is part of the blob, so the pinned BLAKE3 root
//!   covers every path, size and mode along with every byte: a node that did
//!   not read the origin (or walk the source) learns the table from the
//!   first pieces, verified like any other piece, and trusts nothing else.
//!   The authorities (origin readers, the seeder) build the same table from
//!   the origin's lengths or the directory walk; they report the blob's size
//!   and the file count, which the operator pins when all agree.
//! - **Small files** cost no round trip of their own between peers: pieces
//!   span file boundaries.
//! - **On disk** the blob is filled in the store's one partial file. When it
//!   is complete and verified, [`stage`] writes each file into a staging
//!   directory beneath the partial directory (checking a file's own digest
//!   when the user gave one), fsyncs them, and swaps the directory in at
//!   the target with one rename (an exchange when a previous version is
//!   there), so a workload sees the old directory or the new one, never a
//!   mix. The encoded header is kept in the directory as [`TABLE_FILE`]
//!   (a reserved name no file of a Distribution can take), so the content
//!   can be served, and reused by a later version or after a restart,
//!   through [`disk::TreeFiles`] without the partial file.
//! - **Limits.** At most [`MAX_FILES`] files and [`MAX_TABLE_BYTES`] of
//!   table, so a header from a peer cannot make a node allocate without
//!   bound; paths follow the rules of `target.path`, none beneath another.

pub mod disk;
pub mod stage;

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fsroot::check_user_path;

/// First bytes of a directory's blob.
pub const MAGIC: &[u8; 16] = b"peerfill-tree\0v1";
/// Bytes before the table: magic and its length.
pub const PREAMBLE_LEN: u64 = 24;
/// Most files in one directory content.
pub const MAX_FILES: usize = 100_000;
/// Largest encoded table.
pub const MAX_TABLE_BYTES: u64 = 16 << 20;
/// Name of the encoded header inside a complete directory.
pub const TABLE_FILE: &str = ".peerfill-tree";

/// Errors of a file table.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("not a directory content: the header does not start with the peerfill-tree magic")]
    NoMagic,
    #[error("file table of {len} bytes exceeds the limit of {MAX_TABLE_BYTES}")]
    TableTooLarge { len: u64 },
    #[error("file table does not parse: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("a directory content has at most {MAX_FILES} files, this one {0}")]
    TooManyFiles(usize),
    #[error("invalid file path {path:?} in the directory: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error("invalid digest {digest:?} of {path:?}")]
    InvalidDigest { path: String, digest: String },
    #[error("the directory's files and table add up to {0} bytes, more than 2^64")]
    TooLarge(usize),
    #[error("the directory content is {actual} bytes, its file table says {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Fs(#[from] crate::fsroot::FsError),
    #[error("file {path:?} has digest {got}, the Distribution expects {want}")]
    FileDigestMismatch {
        path: String,
        got: String,
        want: String,
    },
    #[error("{path}: {what} inside a directory source (symlinks are never followed)")]
    Unsupported { path: String, what: &'static str },
}

impl TreeError {
    /// CamelCase reason for a status condition.
    pub fn reason(&self) -> &'static str {
        match self {
            TreeError::FileDigestMismatch { .. } => "DigestMismatch",
            TreeError::Unsupported { .. } => "SourceUnreadable",
            TreeError::Io { .. } | TreeError::Fs(_) => "StorageError",
            _ => "InvalidFileTable",
        }
    }
}

/// Whether `rel` beneath `root` is a directory content this agent wrote
/// (it holds [`TABLE_FILE`]): only such a directory is removed or replaced
/// as a whole.
pub fn is_ours(root: &crate::fsroot::DataRoot, rel: &Path) -> bool {
    root.metadata(&rel.join(TABLE_FILE))
        .ok()
        .flatten()
        .is_some_and(|m| m.is_file())
}

/// One file of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileEntry {
    /// Path beneath the directory (`/`-separated, relative).
    pub path: String,
    /// Length in bytes.
    pub size: u64,
    /// Written with mode 0755 instead of 0644.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub executable: bool,
    /// The user's digest of this file (`sha256:`/`blake3:`), checked when
    /// the directory is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// Where a byte range of the blob lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Bytes of the encoded header.
    Header(Range<u64>),
    /// Bytes `range` of file `index`.
    File { index: usize, range: Range<u64> },
}

/// The file table of a directory content, with each file's place in the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTable {
    entries: Vec<FileEntry>,
    /// The encoded header (preamble and table).
    header: Vec<u8>,
    /// Blob offset of each file.
    starts: Vec<u64>,
    size: u64,
}

impl FileTable {
    /// A table of `entries` (sorted by path here, so every authority
    /// builds the same bytes), checked against the limits and path rules.
    pub fn new(mut entries: Vec<FileEntry>) -> Result<FileTable, TreeError> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        check_entries(&entries)?;
        let json = serde_json::to_vec(&entries)?;
        let mut header = Vec::with_capacity(PREAMBLE_LEN as usize + json.len());
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(json.len() as u64).to_le_bytes());
        header.extend_from_slice(&json);
        if json.len() as u64 > MAX_TABLE_BYTES {
            return Err(TreeError::TableTooLarge {
                len: json.len() as u64,
            });
        }
        let mut starts = Vec::with_capacity(entries.len());
        let mut at = header.len() as u64;
        for e in &entries {
            starts.push(at);
            at = at
                .checked_add(e.size)
                .ok_or(TreeError::TooLarge(entries.len()))?;
        }
        Ok(FileTable {
            entries,
            header,
            starts,
            size: at,
        })
    }

    /// The length of the header that starts with `preamble` (at least
    /// [`PREAMBLE_LEN`] bytes of a blob).
    pub fn header_len(preamble: &[u8]) -> Result<u64, TreeError> {
        let (magic, rest) = preamble
            .split_at_checked(MAGIC.len())
            .ok_or(TreeError::NoMagic)?;
        if magic != MAGIC {
            return Err(TreeError::NoMagic);
        }
        let len = rest
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .ok_or(TreeError::NoMagic)?;
        if len > MAX_TABLE_BYTES {
            return Err(TreeError::TableTooLarge { len });
        }
        Ok(PREAMBLE_LEN + len)
    }

    /// Decodes a whole header (as [`FileTable::header_len`] measured it).
    /// The entries must be in the canonical order and re-encode to the same
    /// bytes: one content has exactly one header.
    pub fn decode(header: &[u8]) -> Result<FileTable, TreeError> {
        let len = Self::header_len(header)?;
        let json = header
            .get(PREAMBLE_LEN as usize..len as usize)
            .ok_or(TreeError::NoMagic)?;
        let entries: Vec<FileEntry> = serde_json::from_slice(json)?;
        let table = FileTable::new(entries)?;
        if table.header != header[..len as usize] {
            return Err(TreeError::InvalidPath {
                path: String::new(),
                reason: "the table is not in its canonical form".into(),
            });
        }
        Ok(table)
    }

    pub fn entries(&self) -> &[FileEntry] {
        &self.entries
    }

    /// The encoded header, the blob's first bytes.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Size of the blob: header and every file.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Blob range of file `index`.
    pub fn file_range(&self, index: usize) -> Range<u64> {
        let start = self.starts[index];
        start..start + self.entries[index].size
    }

    /// The pieces of blob range `range` (clamped to the blob), in order;
    /// empty files contribute nothing.
    pub fn segments(&self, range: Range<u64>) -> Vec<Segment> {
        let end = range.end.min(self.size);
        let mut out = Vec::new();
        let mut at = range.start;
        let header_len = self.header.len() as u64;
        if at < header_len && at < end {
            let stop = end.min(header_len);
            out.push(Segment::Header(at..stop));
            at = stop;
        }
        // The first file ending after `at`.
        let first = self.starts.partition_point(|&s| s <= at).saturating_sub(1);
        for index in first..self.entries.len() {
            if at >= end {
                break;
            }
            let r = self.file_range(index);
            if r.end <= at || r.is_empty() {
                continue;
            }
            let stop = end.min(r.end);
            out.push(Segment::File {
                index,
                range: at - r.start..stop - r.start,
            });
            at = stop;
        }
        out
    }
}

fn check_entries(entries: &[FileEntry]) -> Result<(), TreeError> {
    if entries.len() > MAX_FILES {
        return Err(TreeError::TooManyFiles(entries.len()));
    }
    for e in entries {
        check_user_path(Path::new(&e.path))
            .map_err(|err| TreeError::InvalidPath {
                path: e.path.clone(),
                reason: err.to_string(),
            })
            .and_then(|()| {
                peerfill_crds::validation::check_relative_path(&e.path).map_err(|p| {
                    TreeError::InvalidPath {
                        path: e.path.clone(),
                        reason: p.to_string(),
                    }
                })
            })?;
        if let Some(d) = &e.digest
            && d.parse::<crate::content::Digest>().is_err()
        {
            return Err(TreeError::InvalidDigest {
                path: e.path.clone(),
                digest: d.clone(),
            });
        }
    }
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    if let Some((i, problem)) = peerfill_crds::validation::check_file_paths(&paths) {
        return Err(TreeError::InvalidPath {
            path: entries[i].path.clone(),
            reason: problem.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, size: u64) -> FileEntry {
        FileEntry {
            path: path.into(),
            size,
            executable: false,
            digest: None,
        }
    }

    #[test]
    fn header_round_trips_in_canonical_order() {
        let t = FileTable::new(vec![entry("b/x", 10), entry("a", 0), entry("c", 5)]).unwrap();
        let paths: Vec<&str> = t.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "b/x", "c"]);
        let h = t.header().len() as u64;
        assert_eq!(t.size(), h + 15);
        assert_eq!(FileTable::header_len(t.header()).unwrap(), h);
        assert_eq!(FileTable::decode(t.header()).unwrap(), t);
        // A table out of order is not the canonical header of any content.
        let json = br#"[{"path":"c","size":1},{"path":"a","size":1}]"#;
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&(json.len() as u64).to_le_bytes());
        bad.extend_from_slice(json);
        assert!(FileTable::decode(&bad).is_err());
    }

    #[test]
    fn bad_tables_are_refused() {
        assert!(matches!(
            FileTable::header_len(b"not a tree at all, no"),
            Err(TreeError::NoMagic)
        ));
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&(MAX_TABLE_BYTES + 1).to_le_bytes());
        assert!(matches!(
            FileTable::header_len(&huge),
            Err(TreeError::TableTooLarge { .. })
        ));
        for bad in ["../x", "/etc/passwd", ".peerfill-tree", "a//b"] {
            assert!(FileTable::new(vec![entry(bad, 1)]).is_err(), "{bad}");
        }
        assert!(FileTable::new(vec![entry("a", 1), entry("a/b", 1)]).is_err());
        assert!(FileTable::new(vec![entry("a", 1), entry("a", 2)]).is_err());
    }

    #[test]
    fn segments_span_files_and_skip_empty_ones() {
        let t = FileTable::new(vec![entry("a", 3), entry("b", 0), entry("c", 4)]).unwrap();
        let h = t.header().len() as u64;
        assert_eq!(
            t.segments(h - 2..h + 5),
            vec![
                Segment::Header(h - 2..h),
                Segment::File {
                    index: 0,
                    range: 0..3
                },
                Segment::File {
                    index: 2,
                    range: 0..2
                },
            ]
        );
        assert_eq!(
            t.segments(h + 4..h + 100),
            vec![Segment::File {
                index: 2,
                range: 1..4
            }]
        );
        assert_eq!(t.segments(0..3), vec![Segment::Header(0..3)]);
    }
}
