//! Writing a complete directory content into place.
//!
//! The verified blob (the store's partial file) is split into its files in
//! a staging directory beneath the partial directory — each file copied
//! from its blob range (`copy_file_range`, so the kernel moves the bytes;
//! read and hashed instead when the user gave the file a digest), fsynced,
//! the encoded table kept as [`TABLE_FILE`], every directory fsynced — and
//! then swapped in at the target with one rename, or an exchange when a
//! previous version is there (then removed). A crash before the swap
//! leaves the target as it was and a stale stage that the next attempt
//! removes; the blob is removed by the caller only after the swap.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::info;

use super::{FileTable, PREAMBLE_LEN, TABLE_FILE, TreeError};
use crate::content::{Digest, StreamingDigest};
use crate::fsroot::DataRoot;

/// Splits `blob` (a complete, verified directory content of `size` bytes)
/// into directory `stage_rel` beneath `stage`, then swaps that in at
/// `dest_rel` beneath `root`. Returns the table. Blocking.
pub fn write_tree(
    blob: &File,
    size: u64,
    root: &DataRoot,
    stage: &DataRoot,
    stage_rel: &Path,
    dest_rel: &Path,
) -> Result<FileTable, TreeError> {
    let table = read_table(blob)?;
    if table.size() != size {
        return Err(TreeError::SizeMismatch {
            expected: table.size(),
            actual: size,
        });
    }
    stage.remove_tree(stage_rel)?;
    for (i, e) in table.entries().iter().enumerate() {
        let rel = stage_rel.join(&e.path);
        let out = stage.create_new_file(&rel, e.executable)?;
        let want = e
            .digest
            .as_deref()
            .map(str::parse::<Digest>)
            .transpose()
            .map_err(|_| TreeError::InvalidDigest {
                path: e.path.clone(),
                digest: e.digest.clone().unwrap_or_default(),
            })?;
        let range = table.file_range(i);
        let shown = stage.join(&rel);
        match want {
            None => copy_range(blob, &out, range.start, e.size, &shown)?,
            Some(want) => {
                let got = copy_hashing(blob, &out, range.start, e.size, want, &shown)?;
                if got != want {
                    return Err(TreeError::FileDigestMismatch {
                        path: e.path.clone(),
                        got: got.to_string(),
                        want: want.to_string(),
                    });
                }
            }
        }
        out.sync_all().map_err(io("syncing", &shown))?;
    }
    let table_rel = stage_rel.join(TABLE_FILE);
    let mut t = stage.create_new_file(&table_rel, false)?;
    std::io::Write::write_all(&mut t, table.header())
        .map_err(io("writing", &stage.join(&table_rel)))?;
    t.sync_all()
        .map_err(io("syncing", &stage.join(&table_rel)))?;
    // Deepest first, so each directory's entry in its parent is durable too.
    let mut dirs: Vec<PathBuf> = table
        .entries()
        .iter()
        .flat_map(|e| {
            Path::new(&e.path)
                .ancestors()
                .skip(1)
                .map(Path::to_path_buf)
        })
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.dedup();
    for d in dirs {
        stage.sync_dir(&stage_rel.join(d))?;
    }
    if root.swap_in_from(stage, stage_rel, dest_rel)? {
        // The previous version is now at the stage name.
        stage.remove_tree(stage_rel)?;
    }
    info!(dest = %root.join(dest_rel).display(), files = table.entries().len(), bytes = size, "directory in place");
    Ok(table)
}

/// The file table at the start of a directory content's blob.
pub fn read_table(blob: &File) -> Result<FileTable, TreeError> {
    let mut pre = [0u8; PREAMBLE_LEN as usize];
    blob.read_exact_at(&mut pre, 0)
        .map_err(io("reading the file table of", Path::new("the content")))?;
    let len = FileTable::header_len(&pre)?;
    let mut header = vec![0u8; len as usize];
    blob.read_exact_at(&mut header, 0)
        .map_err(io("reading the file table of", Path::new("the content")))?;
    FileTable::decode(&header)
}

/// Copies `len` bytes at `from` of `blob` to the start of `out` in the
/// kernel, falling back to reads and writes where it cannot.
fn copy_range(blob: &File, out: &File, from: u64, len: u64, shown: &Path) -> Result<(), TreeError> {
    let (mut off_in, mut off_out) = (from, 0u64);
    while off_out < len {
        let want = usize::try_from(len - off_out)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(blob, Some(&mut off_in), out, Some(&mut off_out), want) {
            Ok(0) => {
                return Err(TreeError::Io {
                    op: "copying into",
                    path: shown.display().to_string(),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            Ok(_) => {}
            Err(_) => {
                return copy_by_reads(blob, out, off_in, off_out, len - off_out, None, shown)
                    .map(drop);
            }
        }
    }
    Ok(())
}

/// Copies like [`copy_range`] through a buffer, hashing the bytes.
fn copy_hashing(
    blob: &File,
    out: &File,
    from: u64,
    len: u64,
    want: Digest,
    shown: &Path,
) -> Result<Digest, TreeError> {
    let digest = StreamingDigest::new(want.algo());
    let d = copy_by_reads(blob, out, from, 0, len, Some(digest), shown)?;
    Ok(d.map(StreamingDigest::finalize).unwrap_or(want))
}

fn copy_by_reads(
    blob: &File,
    out: &File,
    mut off_in: u64,
    mut off_out: u64,
    len: u64,
    mut digest: Option<StreamingDigest>,
    shown: &Path,
) -> Result<Option<StreamingDigest>, TreeError> {
    let mut buf = vec![0u8; 1 << 20];
    let end = off_out + len;
    while off_out < end {
        let n = (end - off_out).min(buf.len() as u64) as usize;
        blob.read_exact_at(&mut buf[..n], off_in)
            .map_err(io("reading the content for", shown))?;
        if let Some(d) = digest.as_mut() {
            d.update(&buf[..n]);
        }
        out.write_all_at(&buf[..n], off_out)
            .map_err(io("writing", shown))?;
        off_in += n as u64;
        off_out += n as u64;
    }
    Ok(digest)
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> TreeError + 'a {
    move |source| TreeError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::super::FileEntry;
    use super::super::disk::TreeFiles;
    use super::*;

    fn blob_of(table: &FileTable, files: &[&[u8]]) -> Vec<u8> {
        let mut b = table.header().to_vec();
        for f in files {
            b.extend_from_slice(f);
        }
        b
    }

    #[test]
    fn a_blob_becomes_the_directory_in_one_swap() {
        let tmp = tempfile::tempdir().unwrap();
        let root = DataRoot::open(tmp.path()).unwrap();
        let stage = root.subdir(Path::new(".peerfill-partial"), true).unwrap();
        let sha = |b: &[u8]| {
            let mut d = StreamingDigest::new(crate::content::DigestAlgo::Sha256);
            d.update(b);
            d.finalize().to_string()
        };
        let entries = vec![
            FileEntry {
                path: "run.sh".into(),
                size: 3,
                executable: true,
                digest: Some(sha(b"sh\n")),
            },
            FileEntry {
                path: "w/shard-1".into(),
                size: 5,
                executable: false,
                digest: None,
            },
        ];
        let table = FileTable::new(entries.clone()).unwrap();
        let blob = blob_of(&table, &[b"sh\n", b"12345"]);
        std::fs::write(tmp.path().join("blob"), &blob).unwrap();
        let f = File::open(tmp.path().join("blob")).unwrap();
        // A previous version is at the target.
        std::fs::create_dir_all(tmp.path().join("models/m")).unwrap();
        std::fs::write(tmp.path().join("models/m/old"), b"old").unwrap();
        write_tree(
            &f,
            blob.len() as u64,
            &root,
            &stage,
            Path::new("c1.tree"),
            Path::new("models/m"),
        )
        .unwrap();
        let m = tmp.path().join("models/m");
        assert_eq!(std::fs::read(m.join("run.sh")).unwrap(), b"sh\n");
        assert_eq!(std::fs::read(m.join("w/shard-1")).unwrap(), b"12345");
        assert!(!m.join("old").exists());
        assert!(!tmp.path().join(".peerfill-partial/c1.tree").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(m.join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
        // Served back as the same blob.
        let t = TreeFiles::open(&root, Path::new("models/m")).unwrap();
        let mut back = vec![0u8; blob.len()];
        t.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, blob);

        // A file whose bytes do not match its digest never reaches the target.
        let mut bad = entries;
        bad[0].digest = Some(sha(b"other"));
        let table = FileTable::new(bad).unwrap();
        let blob = blob_of(&table, &[b"sh\n", b"12345"]);
        std::fs::write(tmp.path().join("blob2"), &blob).unwrap();
        let f = File::open(tmp.path().join("blob2")).unwrap();
        let err = write_tree(
            &f,
            blob.len() as u64,
            &root,
            &stage,
            Path::new("c2.tree"),
            Path::new("models/m"),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "DigestMismatch");
        assert_eq!(std::fs::read(m.join("w/shard-1")).unwrap(), b"12345");
    }
}
