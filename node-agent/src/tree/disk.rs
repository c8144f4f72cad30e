//! A directory on disk read as its content's blob: a complete directory
//! this agent wrote (its table kept in [`TABLE_FILE`]), or a node-source
//! directory walked beneath the data root. Every file is opened beneath
//! the root without following a symlink and checked against the size its
//! table gives; reads past what a file holds (it shrank) are errors, so
//! only bytes that then verify against their piece hash ever leave.

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{FileEntry, FileTable, MAX_FILES, Segment, TABLE_FILE, TreeError};
use crate::fsroot::{DataRoot, EntryKind, RESERVED_PREFIX};

/// A directory's files, open, with its table.
#[derive(Debug)]
pub struct TreeFiles {
    table: FileTable,
    files: Vec<File>,
    /// The directory, for messages.
    dir: PathBuf,
}

/// The bytes of a content on disk: one regular file, or a directory.
#[derive(Debug)]
pub enum ContentFile {
    File(File),
    Tree(TreeFiles),
    /// A previous version's directory read in a new version's layout.
    Remapped(Remapped),
}

/// A previous version's directory read as the blob of a *new* file table:
/// each file's bytes come from the old file at the same path, wherever the
/// new table puts it. So a file unchanged between two versions is reused
/// even when files before it were added, removed or resized (which moves
/// every later offset); the header and files the old version lacks read as
/// errors, and those pieces come from the network. Nothing read here is
/// trusted: each piece is verified against its hash before it is stored.
#[derive(Debug)]
pub struct Remapped {
    table: FileTable,
    old: TreeFiles,
    /// New file index → old file index, for paths the old version has.
    old_index: Vec<Option<usize>>,
}

impl Remapped {
    /// `old` read in the layout of `table`.
    pub fn new(table: FileTable, old: TreeFiles) -> Remapped {
        let by_path: std::collections::HashMap<&str, usize> = old
            .table
            .entries()
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.as_str(), i))
            .collect();
        let old_index = table
            .entries()
            .iter()
            .map(|e| by_path.get(e.path.as_str()).copied())
            .collect();
        Remapped {
            table,
            old,
            old_index,
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        read_segments(&self.table, buf, offset, |index, range, out| {
            let missing = || std::io::Error::from(std::io::ErrorKind::NotFound);
            let old = self.old_index[index].ok_or_else(missing)?;
            if self.old.table.entries()[old].size < range.end {
                return Err(missing());
            }
            self.old.files[old].read_exact_at(out, range.start)
        })
    }
}

/// Fills `buf` with the blob of `table` at `offset`: header bytes from the
/// table, file bytes through `file(index, range in the file, out)`.
fn read_segments(
    table: &FileTable,
    buf: &mut [u8],
    offset: u64,
    mut file: impl FnMut(usize, std::ops::Range<u64>, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let end = offset + buf.len() as u64;
    if end > table.size() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "read past the end of the directory content",
        ));
    }
    let mut at = 0usize;
    for seg in table.segments(offset..end) {
        match seg {
            Segment::Header(r) => {
                let n = (r.end - r.start) as usize;
                buf[at..at + n].copy_from_slice(&table.header()[r.start as usize..r.end as usize]);
                at += n;
            }
            Segment::File { index, range } => {
                let n = (range.end - range.start) as usize;
                file(index, range, &mut buf[at..at + n])?;
                at += n;
            }
        }
    }
    Ok(())
}

impl ContentFile {
    /// Reads exactly `buf.len()` bytes at blob offset `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            ContentFile::File(f) => f.read_exact_at(buf, offset),
            ContentFile::Tree(t) => t.read_exact_at(buf, offset),
            ContentFile::Remapped(r) => r.read_exact_at(buf, offset),
        }
    }

    /// Size of the content (a directory's: its blob's).
    pub fn size(&self) -> std::io::Result<u64> {
        match self {
            ContentFile::File(f) => f.metadata().map(|m| m.len()),
            ContentFile::Tree(t) => Ok(t.table.size()),
            ContentFile::Remapped(r) => Ok(r.table.size()),
        }
    }
}

impl TreeFiles {
    /// A complete directory content at `rel` (written by
    /// [`super::stage::write_tree`]): its table from [`TABLE_FILE`].
    pub fn open(root: &DataRoot, rel: &Path) -> Result<TreeFiles, TreeError> {
        let header = root.read(&rel.join(TABLE_FILE))?;
        let table = FileTable::decode(&header)?;
        Self::open_files(root, rel, table)
    }

    /// A node-source directory at `rel`, walked: every regular file beneath
    /// it (the agent's own reserved names skipped); a symlink or a special
    /// file inside fails, naming it.
    pub fn walk(root: &DataRoot, rel: &Path) -> Result<TreeFiles, TreeError> {
        let mut entries = Vec::new();
        walk_into(root, rel, Path::new(""), &mut entries)?;
        let table = FileTable::new(entries)?;
        Self::open_files(root, rel, table)
    }

    fn open_files(root: &DataRoot, rel: &Path, table: FileTable) -> Result<TreeFiles, TreeError> {
        let mut files = Vec::with_capacity(table.entries().len());
        for e in table.entries() {
            let path = rel.join(&e.path);
            let f = root.open_read(&path)?;
            let len = f
                .metadata()
                .map_err(|source| io_error("inspecting", &root.join(&path), source))?
                .len();
            if len != e.size {
                return Err(TreeError::SizeMismatch {
                    expected: e.size,
                    actual: len,
                });
            }
            files.push(f);
        }
        Ok(TreeFiles {
            table,
            files,
            dir: root.join(rel),
        })
    }

    pub fn table(&self) -> &FileTable {
        &self.table
    }

    /// Reads exactly `buf.len()` bytes of the blob at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        read_segments(&self.table, buf, offset, |index, range, out| {
            self.files[index].read_exact_at(out, range.start)
        })
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.dir.display())))
    }
}

fn walk_into(
    root: &DataRoot,
    base: &Path,
    sub: &Path,
    out: &mut Vec<FileEntry>,
) -> Result<(), TreeError> {
    for (name, kind) in root.read_dir(&base.join(sub))? {
        if name
            .as_encoded_bytes()
            .starts_with(RESERVED_PREFIX.as_bytes())
        {
            continue;
        }
        let rel = sub.join(&name);
        let full = root.join(&base.join(&rel));
        match kind {
            EntryKind::Dir => walk_into(root, base, &rel, out)?,
            EntryKind::File => {
                let path = rel.to_str().ok_or_else(|| TreeError::InvalidPath {
                    path: full.display().to_string(),
                    reason: "not valid UTF-8".into(),
                })?;
                let f = root.open_read(&base.join(&rel))?;
                let meta = f.metadata().map_err(|e| io_error("inspecting", &full, e))?;
                out.push(FileEntry {
                    path: path.to_owned(),
                    size: meta.len(),
                    executable: meta.permissions().mode() & 0o111 != 0,
                    digest: None,
                });
                if out.len() > MAX_FILES {
                    return Err(TreeError::TooManyFiles(out.len()));
                }
            }
            EntryKind::Symlink => {
                return Err(TreeError::Unsupported {
                    path: full.display().to_string(),
                    what: "a symlink",
                });
            }
            EntryKind::Other => {
                return Err(TreeError::Unsupported {
                    path: full.display().to_string(),
                    what: "a special file",
                });
            }
        }
    }
    Ok(())
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> TreeError {
    TreeError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walked_directory_reads_as_its_blob() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("src");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("b.txt"), b"bbbb").unwrap();
        std::fs::write(d.join("sub/a.bin"), b"aa").unwrap();
        std::fs::write(d.join("empty"), b"").unwrap();
        std::fs::write(d.join(".peerfill-tree"), b"ignored").unwrap();
        let root = DataRoot::open(tmp.path()).unwrap();
        let t = TreeFiles::walk(&root, Path::new("src")).unwrap();
        let paths: Vec<&str> = t
            .table()
            .entries()
            .iter()
            .map(|e| e.path.as_str())
            .collect();
        assert_eq!(paths, ["b.txt", "empty", "sub/a.bin"]);
        let h = t.table().header().len();
        let mut all = vec![0u8; t.table().size() as usize];
        t.read_exact_at(&mut all, 0).unwrap();
        assert_eq!(&all[..h], t.table().header());
        assert_eq!(&all[h..], b"bbbbaa");
        let mut mid = [0u8; 3];
        t.read_exact_at(&mut mid, h as u64 + 2).unwrap();
        assert_eq!(&mid, b"bba");
        assert!(t.read_exact_at(&mut mid, t.table().size() - 1).is_err());

        // Read in the layout of a new version that adds a file before the
        // others and resizes one: unchanged files are found by path.
        let new = FileTable::new(vec![
            FileEntry {
                path: "a-new".into(),
                size: 5,
                executable: false,
                digest: None,
            },
            FileEntry {
                path: "b.txt".into(),
                size: 4,
                executable: false,
                digest: None,
            },
            FileEntry {
                path: "sub/a.bin".into(),
                size: 3,
                executable: false,
                digest: None,
            },
        ])
        .unwrap();
        let h2 = new.header().len() as u64;
        let r = ContentFile::Remapped(Remapped::new(
            new,
            TreeFiles::walk(&root, Path::new("src")).unwrap(),
        ));
        let mut b = [0u8; 4];
        r.read_exact_at(&mut b, h2 + 5).unwrap();
        assert_eq!(&b, b"bbbb");
        assert!(
            r.read_exact_at(&mut b, h2).is_err(),
            "a file the old version lacks"
        );
        assert!(
            r.read_exact_at(&mut [0u8; 3], h2 + 9).is_err(),
            "a file that grew"
        );
        let mut two = [0u8; 2];
        r.read_exact_at(&mut two, h2 + 9).unwrap();
        assert_eq!(&two, b"aa");

        std::os::unix::fs::symlink("/etc", d.join("sub/link")).unwrap();
        let err = TreeFiles::walk(&root, Path::new("src")).unwrap_err();
        assert_eq!(err.reason(), "SourceUnreadable");
        assert!(err.to_string().contains("sub/link"), "{err}");
    }
}
