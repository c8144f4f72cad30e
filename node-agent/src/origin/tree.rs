//! A directory from an HTTP origin, read as its content's blob.
//!
//! An origin reader of a directory holds one [`OriginClient`] per file
//! (each with its own URL, headers and pinned version). It learns every
//! file's length (HEAD, as for one file), builds the file table
//! ([`crate::tree::FileTable`], sorted by path, so every reader builds the
//! same bytes) and then serves any byte range of the blob: the header from
//! memory, file bytes by range requests to the files the range covers,
//! concurrently. So a piece that spans ten small files costs ten small
//! requests to the origin, made by one reader, and nothing between peers.
//!
//! The content's origin version is one string for the whole directory: a
//! hash of every file's path and validator (`tree:<hex>`), published by the
//! operator like a file's ETag; a reader whose files add up to another one
//! reports `OriginChanged`. Each file's own range reads are pinned to its
//! own validator, as for one file. A directory needs Range support: a file
//! whose origin ignores ranges fails with `OriginNoRangeSupport`.

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};

use super::{OriginClient, OriginError, OriginOptions};
use crate::agent::HttpFile;
use crate::metrics::Metrics;
use crate::tree::{FileEntry, FileTable, Segment};

/// Concurrent requests of one reader while learning lengths or reading the
/// files a range covers.
const CONCURRENCY: usize = 8;

/// The origin of an HTTP source: one file, or a directory.
// One per content, so the size of the file variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Origin {
    One(OriginClient),
    Tree(Arc<TreeOrigin>),
}

/// A directory's files at their URLs.
pub struct TreeOrigin {
    /// Sorted by path (the table's order).
    files: Vec<(HttpFile, OriginClient)>,
    table: OnceLock<FileTable>,
    /// The directory's version as published (or as first computed).
    pin: Mutex<Option<String>>,
    shown: String,
}

impl std::fmt::Debug for TreeOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeOrigin")
            .field("files", &self.files.len())
            .field("shown", &self.shown)
            .finish_non_exhaustive()
    }
}

impl Origin {
    /// The length of the content (a directory's: its blob's, once every
    /// file's length is known).
    pub async fn content_length(&self) -> Result<u64, OriginError> {
        match self {
            Origin::One(c) => c.content_length().await,
            Origin::Tree(t) => t.table().await.map(|t| t.size()),
        }
    }

    /// Reads bytes `range` of the content, exactly.
    pub async fn fetch_range(&self, range: Range<u64>) -> Result<Bytes, OriginError> {
        match self {
            Origin::One(c) => c.fetch_range(range).await,
            Origin::Tree(t) => t.fetch_range(range).await,
        }
    }

    /// Pins reads to the published version.
    pub fn pin_version(&self, v: String) {
        match self {
            Origin::One(c) => c.pin_version(v),
            Origin::Tree(t) => *t.pin.lock().unwrap_or_else(PoisonError::into_inner) = Some(v),
        }
    }

    /// The version reads are pinned to, once known.
    pub fn version(&self) -> Option<String> {
        match self {
            Origin::One(c) => c.version(),
            Origin::Tree(t) => t.pin.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        }
    }

    /// The URL as shown in messages (a directory's base URL).
    pub fn display_url(&self) -> String {
        match self {
            Origin::One(c) => c.display_url().to_string(),
            Origin::Tree(t) => t.shown.clone(),
        }
    }

    /// The file count of a directory, once its table is known.
    pub fn file_count(&self) -> Option<u64> {
        match self {
            Origin::One(_) => None,
            Origin::Tree(t) => t.table.get().map(|t| t.entries().len() as u64),
        }
    }
}

impl TreeOrigin {
    /// Clients for `files` (URLs checked like one file's), sharing headers
    /// and options.
    pub fn new(
        base: &str,
        files: &[HttpFile],
        headers: Vec<(String, String)>,
        opts: OriginOptions,
        metrics: Metrics,
    ) -> Result<TreeOrigin, OriginError> {
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            let c = OriginClient::new(&f.url, headers.clone(), opts.clone())?
                .with_metrics(metrics.clone());
            out.push((f.clone(), c));
        }
        out.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        Ok(TreeOrigin {
            files: out,
            table: OnceLock::new(),
            pin: Mutex::new(None),
            shown: base.to_string(),
        })
    }

    /// The file table: every file's length from the origin (once), then
    /// the directory's version checked against the published one.
    async fn table(&self) -> Result<&FileTable, OriginError> {
        if let Some(t) = self.table.get() {
            return Ok(t);
        }
        let clients: Vec<OriginClient> = self.files.iter().map(|(_, c)| c.clone()).collect();
        let sizes: Vec<u64> = futures::stream::iter(clients)
            .map(|c| async move { c.content_length().await })
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        let entries = self
            .files
            .iter()
            .zip(sizes)
            .map(|((f, _), size)| FileEntry {
                path: f.path.clone(),
                size,
                executable: false,
                digest: f.digest.clone(),
            })
            .collect();
        let table = FileTable::new(entries).map_err(|e| OriginError::InvalidUrl {
            url: self.shown.clone(),
            reason: e.to_string(),
        })?;
        self.check_version()?;
        Ok(self.table.get_or_init(|| table))
    }

    /// The directory's version from its files' (None while one of them has
    /// none), compared with the pinned one, pinning it if none is.
    fn check_version(&self) -> Result<(), OriginError> {
        let mut h = blake3::Hasher::new();
        for (f, c) in &self.files {
            let Some(v) = c.version() else {
                return Ok(());
            };
            for part in [f.path.as_bytes(), v.as_bytes()] {
                h.update(&(part.len() as u64).to_le_bytes());
                h.update(part);
            }
        }
        let ours = format!("tree:{}", &h.finalize().to_hex()[..32]);
        let mut pin = self.pin.lock().unwrap_or_else(PoisonError::into_inner);
        match pin.as_deref() {
            Some(p) if p != ours => Err(OriginError::Changed {
                url: self.shown.clone(),
                pinned: p.to_string(),
                found: Some(ours),
            }),
            Some(_) => Ok(()),
            None => {
                *pin = Some(ours);
                Ok(())
            }
        }
    }

    async fn fetch_range(&self, range: Range<u64>) -> Result<Bytes, OriginError> {
        let table = self.table().await?;
        /// A segment with what reads it owned, for the stream.
        enum Part {
            Header(Bytes),
            File(OriginClient, Range<u64>),
        }
        let reads: Vec<Part> = table
            .segments(range)
            .into_iter()
            .map(|seg| match seg {
                Segment::Header(r) => Part::Header(Bytes::copy_from_slice(
                    &table.header()[r.start as usize..r.end as usize],
                )),
                Segment::File { index, range } => Part::File(self.files[index].1.clone(), range),
            })
            .collect();
        let parts: Vec<Bytes> = futures::stream::iter(reads)
            .map(|read| async move {
                match read {
                    Part::Header(header) => Ok(header),
                    Part::File(client, range) => client.fetch_range(range).await,
                }
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        if let [one] = parts.as_slice() {
            return Ok(one.clone());
        }
        let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }
}
