//! Directory operations beneath the data root, for directory contents:
//! listing a node-source directory, creating a staged file, swapping a
//! staged directory in, and removing a tree. Every one resolves beneath
//! the root without following a symlink, like the rest of [`super`]; a
//! removal never descends through a symlink (the link itself is removed).

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use super::{DataRoot, EntryKind, EntryMeta, FsError};

impl DataRoot {
    /// The entries of directory `rel` (empty: the root itself), each with
    /// its kind as lstat sees it, sorted by name.
    pub fn read_dir(&self, rel: &Path) -> Result<Vec<(OsString, EntryKind)>, FsError> {
        let dir = self.open_dir(rel)?;
        let mut reader =
            rustix::fs::Dir::read_from(&dir).map_err(|e| self.io("listing", rel, e))?;
        let mut out = Vec::new();
        while let Some(entry) = reader.read() {
            let entry = entry.map_err(|e| self.io("listing", rel, e))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let st = rustix::fs::statat(&dir, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| self.io("inspecting", &rel.join(OsStr(name)), e))?;
            out.push((OsString::from(OsStr(name)), EntryMeta::from_stat(&st).kind));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Creates the new regular file `rel` (parents created; an existing
    /// entry is an error) for writing, mode 0755 if `executable` else 0644.
    pub fn create_new_file(&self, rel: &Path, executable: bool) -> Result<File, FsError> {
        self.check(rel)?;
        let (dir, name) = self.parent_dir(rel, true)?;
        let mode = if executable { 0o755 } else { 0o644 };
        let fd = rustix::fs::openat(
            &dir,
            &name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| self.classify(rel, "creating", e))?;
        Ok(File::from(fd))
    }

    /// fsyncs directory `rel` (empty: the root), so the entries made in it
    /// survive a crash.
    pub fn sync_dir(&self, rel: &Path) -> Result<(), FsError> {
        let dir = self.open_dir(rel)?;
        rustix::fs::fsync(&dir).map_err(|e| self.io("syncing directory", rel, e))
    }

    /// Moves `from_rel` (beneath `src`) to `to_rel` (beneath this root,
    /// parents created) in one step: a plain rename when nothing is at
    /// `to_rel`, else an atomic exchange, after which `from_rel` holds what
    /// was at `to_rel` (the caller removes it). Returns whether it was an
    /// exchange. Both parent directories are fsynced.
    pub fn swap_in_from(
        &self,
        src: &DataRoot,
        from_rel: &Path,
        to_rel: &Path,
    ) -> Result<bool, FsError> {
        src.check(from_rel)?;
        self.check(to_rel)?;
        let (from_dir, from_name) = src.parent_dir(from_rel, false)?;
        let (to_dir, to_name) = self.parent_dir(to_rel, true)?;
        let moved =
            |flags| rustix::fs::renameat_with(&from_dir, &from_name, &to_dir, &to_name, flags);
        let exchanged = match moved(RenameFlags::NOREPLACE) {
            Ok(()) => false,
            Err(Errno::EXIST) | Err(Errno::NOTEMPTY) => {
                moved(RenameFlags::EXCHANGE).map_err(|e| self.io("swapping in", to_rel, e))?;
                true
            }
            Err(e) => return Err(self.io("moving into place", to_rel, e)),
        };
        rustix::fs::fsync(&to_dir).map_err(|e| self.io("syncing directory of", to_rel, e))?;
        rustix::fs::fsync(&from_dir).map_err(|e| src.io("syncing directory of", from_rel, e))?;
        Ok(exchanged)
    }

    /// Removes `rel` whatever it is: a file or symlink (the link itself),
    /// or a directory with everything beneath it, never descending through
    /// a symlink. Returns whether something was removed.
    pub fn remove_tree(&self, rel: &Path) -> Result<bool, FsError> {
        self.check(rel)?;
        let (dir, name) = match self.parent_dir(rel, false) {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&dir, &name, AtFlags::empty()) {
            Ok(()) => return Ok(true),
            Err(Errno::NOENT) => return Ok(false),
            Err(Errno::ISDIR) | Err(Errno::PERM) => {}
            Err(e) => return Err(self.io("removing", rel, e)),
        }
        self.empty_dir_at(&dir, &name, rel)?;
        match rustix::fs::unlinkat(&dir, &name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(true),
            Err(e) => Err(self.io("removing directory", rel, e)),
        }
    }

    /// Removes everything inside directory `name` of `parent`.
    fn empty_dir_at(&self, parent: &OwnedFd, name: &OsString, rel: &Path) -> Result<(), FsError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let dir = rustix::fs::openat(parent, name, flags, Mode::empty())
            .map_err(|e| self.classify(rel, "opening directory", e))?;
        let mut names = Vec::new();
        let mut reader =
            rustix::fs::Dir::read_from(&dir).map_err(|e| self.io("listing", rel, e))?;
        while let Some(entry) = reader.read() {
            let entry = entry.map_err(|e| self.io("listing", rel, e))?;
            let n = entry.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(OsString::from(OsStr(n)));
            }
        }
        for n in names {
            let child = rel.join(&n);
            match rustix::fs::unlinkat(&dir, &n, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => continue,
                Err(Errno::ISDIR) | Err(Errno::PERM) => {}
                Err(e) => return Err(self.io("removing", &child, e)),
            }
            self.empty_dir_at(&dir, &n, &child)?;
            rustix::fs::unlinkat(&dir, &n, AtFlags::REMOVEDIR)
                .or_else(|e| if e == Errno::NOENT { Ok(()) } else { Err(e) })
                .map_err(|e| self.io("removing directory", &child, e))?;
        }
        Ok(())
    }

    /// Opens directory `rel` (empty: the root) confined.
    fn open_dir(&self, rel: &Path) -> Result<OwnedFd, FsError> {
        if rel.as_os_str().is_empty() {
            return rustix::io::dup(&*self.dir).map_err(|e| self.io("opening", rel, e));
        }
        self.check(rel)?;
        self.resolve(
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
            "opening directory",
        )
    }
}

#[allow(non_snake_case)]
fn OsStr(b: &[u8]) -> &std::ffi::OsStr {
    std::ffi::OsStr::from_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn trees_are_listed_swapped_and_removed_without_following_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"keep").unwrap();
        let root = DataRoot::open(tmp.path()).unwrap();

        let mut f = root.create_new_file(Path::new("new/a/x"), true).unwrap();
        std::io::Write::write_all(&mut f, b"x").unwrap();
        assert!(root.create_new_file(Path::new("new/a/x"), false).is_err());
        symlink(outside.path(), tmp.path().join("new/out")).unwrap();
        let names: Vec<_> = root.read_dir(Path::new("new")).unwrap();
        assert_eq!(
            names,
            [
                (OsString::from("a"), EntryKind::Dir),
                (OsString::from("out"), EntryKind::Symlink)
            ]
        );

        // Nothing at the target: a rename.
        let stage = root.subdir(Path::new("stage"), true).unwrap();
        std::fs::create_dir(tmp.path().join("stage/s")).unwrap();
        std::fs::write(tmp.path().join("stage/s/v2"), b"2").unwrap();
        assert!(
            !root
                .swap_in_from(&stage, Path::new("s"), Path::new("dest"))
                .unwrap()
        );
        // Something there: an exchange, the old one left at the stage name.
        std::fs::create_dir(tmp.path().join("stage/s")).unwrap();
        std::fs::write(tmp.path().join("stage/s/v3"), b"3").unwrap();
        assert!(
            root.swap_in_from(&stage, Path::new("s"), Path::new("dest"))
                .unwrap()
        );
        assert!(tmp.path().join("dest/v3").exists());
        assert!(tmp.path().join("stage/s/v2").exists());

        assert!(root.remove_tree(Path::new("new")).unwrap());
        assert!(!tmp.path().join("new").exists());
        assert!(
            outside.path().join("keep").exists(),
            "a symlink is never followed"
        );
        assert!(!root.remove_tree(Path::new("new")).unwrap());
    }
}
