//! Directories in the plan (control-path.md "Per-node work"). A
//! Distribution whose HTTP source lists `files`, or whose node source is a
//! directory, is distributed as one blob: the agent's file table (sorted
//! by path) followed by every file's bytes. The operator adds little to
//! single-file planning:
//!
//! - only the nodes that read the origin get the file list, each URL
//!   resolved ([`resolved_files`]); every node of an HTTP directory gets
//!   `directory: true`, and learns the table from the content itself,
//!   verified against the pinned root like every byte;
//! - the files are part of the version key ([`files_key`]), so any edit of
//!   the list is a new version;
//! - the file count is pinned with the size ([`Extent`]): once every
//!   current authority reported the same size *and* count, sticky per
//!   content id, read back from the NodeFill specs like the other pins.
//!   The count is what tells every agent that the content is a directory.
//!
//! Pure.

use std::fmt;

use peerfill_crds::{Assignment, HttpSource, NodeDistributionStatus, ResolvedHttpFile};
use serde_json::{Value, json};

/// Every file of an HTTP directory, in the order the Distribution lists
/// them; a URL only where the file has its own (the others are the base
/// URL + path, which the agent derives the same way).
pub fn resolved_files(http: &HttpSource) -> Vec<ResolvedHttpFile> {
    http.files
        .iter()
        .map(|f| ResolvedHttpFile {
            path: f.path.clone(),
            url: f.url.clone(),
            digest: f.digest.clone(),
        })
        .collect()
}

/// The files' part of the version key: path, resolved URL and digest of
/// every file, sorted by path (the order the content lays them out in, so
/// reordering the list is no new version); `None` for a single file,
/// whose key (and content id) stays what it was before directories.
pub fn files_key(http: &HttpSource) -> Option<Value> {
    if http.files.is_empty() {
        return None;
    }
    let mut files: Vec<_> = http.files.iter().zip(http.file_urls()).collect();
    files.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    Some(Value::Array(
        files
            .into_iter()
            .map(|(f, url)| json!({ "path": f.path, "url": url, "digest": f.digest }))
            .collect(),
    ))
}

/// What is pinned together: the content size and, for a directory, its
/// number of files. Its `Debug` form is what a disagreement message shows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub size: u64,
    pub files: Option<u64>,
}

impl Extent {
    /// What an authority's report says, once it says all of it: a size,
    /// and for an HTTP directory (`directory`) its file count too.
    pub fn reported(r: &NodeDistributionStatus, directory: bool) -> Option<Extent> {
        let size = r.size?;
        if directory && r.files.is_none() {
            return None;
        }
        Some(Extent {
            size,
            files: r.files,
        })
    }
}

impl fmt::Debug for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.files {
            None => write!(f, "{}", self.size),
            Some(n) => write!(f, "{} ({n} files)", self.size),
        }
    }
}

/// The extent pinned in the current assignment of this content id, if any
/// (size and count are written together).
pub fn pinned_extent(current: Option<&Assignment>) -> Option<Extent> {
    let a = current?;
    Some(Extent {
        size: a.size?,
        files: a.files,
    })
}

#[cfg(test)]
#[path = "directory_tests.rs"]
mod tests;
