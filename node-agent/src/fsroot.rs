//! Confinement of every file operation the agent does under its data root.
//!
//! The agent runs as root and its paths come from Distribution specs, so a
//! path must never lead it out of the data root: a symlinked directory or
//! file inside the root (made by anyone with access to the node's volume)
//! would otherwise turn a write, a delete or a node-source read into one on
//! an arbitrary host file. Every path below the root is therefore resolved
//! relative to an open directory descriptor of the root, refusing symlinks
//! in *every* component:
//!
//! - Linux `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS` when the kernel has it (5.6+);
//! - otherwise (ENOSYS, or a seccomp profile refusing it with EPERM) a walk
//!   opening one component at a time with `O_NOFOLLOW | O_DIRECTORY`.
//!
//! Paths are checked lexically first (relative, no `..`, no NUL or control
//! characters); [`check_user_path`] additionally refuses the agent's own
//! reserved names (any component starting with [`RESERVED_PREFIX`]) so a
//! Distribution can never target the agent's state. Callers check a
//! caller-supplied path with it *before* downloading anything.

mod dirs;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use tracing::debug;

/// Names starting with this prefix belong to the agent (partial files,
/// status files, manifests, identity); a Distribution may not use them.
pub const RESERVED_PREFIX: &str = ".peerfill";

/// Longest path accepted (Linux `PATH_MAX`, including the NUL).
const PATH_MAX: usize = 4095;
/// Longest path component (Linux `NAME_MAX`).
const NAME_MAX: usize = 255;

/// Why a relative path is refused before touching the filesystem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is empty")]
    Empty,
    #[error("the path must be relative to the data root, not absolute")]
    Absolute,
    #[error("the path may not contain '..' or '.' components")]
    DotComponent,
    #[error("the path contains a NUL byte")]
    Nul,
    #[error("the path contains a control character (byte {byte:#04x})")]
    ControlChar { byte: u8 },
    #[error(
        "the path component {component:?} is reserved for the agent (names starting with {RESERVED_PREFIX:?})"
    )]
    Reserved { component: String },
    #[error("the path is too long ({len} bytes; the limit is {PATH_MAX})")]
    TooLong { len: usize },
    #[error("the path component {component:?} is too long (limit {NAME_MAX} bytes)")]
    ComponentTooLong { component: String },
}

/// Errors of operations beneath the data root.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("invalid path {path:?}: {source}")]
    Path {
        path: PathBuf,
        #[source]
        source: PathError,
    },
    #[error("{path} is not beneath the data root {root}")]
    OutsideRoot { path: PathBuf, root: PathBuf },
    #[error("refusing to follow a symlink at {path} (beneath the data root {root})")]
    Symlink { path: PathBuf, root: PathBuf },
    #[error("{path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FsError {
    /// The underlying I/O error kind, if any (`NotFound` and friends).
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            FsError::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// Whether the error is "no such file or directory".
    pub fn is_not_found(&self) -> bool {
        self.io_kind() == Some(std::io::ErrorKind::NotFound)
    }
}

/// Lexical checks shared by every operation: relative, only normal
/// components, no NUL/control characters, within Linux length limits.
pub fn check_rel_path(rel: &Path) -> Result<(), PathError> {
    let bytes = rel.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(PathError::Empty);
    }
    if bytes.len() > PATH_MAX {
        return Err(PathError::TooLong { len: bytes.len() });
    }
    if let Some(&b) = bytes.iter().find(|&&b| b < 0x20 || b == 0x7f) {
        return Err(if b == 0 {
            PathError::Nul
        } else {
            PathError::ControlChar { byte: b }
        });
    }
    for c in rel.components() {
        match c {
            Component::Normal(n) => {
                if n.len() > NAME_MAX {
                    return Err(PathError::ComponentTooLong {
                        component: n.to_string_lossy().into_owned(),
                    });
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(PathError::Absolute),
            Component::CurDir | Component::ParentDir => return Err(PathError::DotComponent),
        }
    }
    // `Path::components` silently drops interior `.`; refuse it too, so the
    // path checked is the path used.
    if bytes.split(|&b| b == b'/').any(|c| c == b".") {
        return Err(PathError::DotComponent);
    }
    Ok(())
}

/// Checks a path supplied by a Distribution (target or node-source path):
/// [`check_rel_path`] plus no component reserved for the agent.
pub fn check_user_path(rel: &Path) -> Result<(), PathError> {
    check_rel_path(rel)?;
    for c in rel.components() {
        if let Component::Normal(n) = c
            && n.as_bytes().starts_with(RESERVED_PREFIX.as_bytes())
        {
            return Err(PathError::Reserved {
                component: n.to_string_lossy().into_owned(),
            });
        }
    }
    Ok(())
}

/// What [`DataRoot::metadata`] reports: lstat-like, a symlink is reported as
/// one and never followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    pub kind: EntryKind,
    pub len: u64,
    /// Bytes actually allocated on disk (`st_blocks * 512`).
    pub allocated: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

impl EntryMeta {
    fn from_stat(st: &rustix::fs::Stat) -> EntryMeta {
        use rustix::fs::FileType;
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => EntryKind::File,
            FileType::Directory => EntryKind::Dir,
            FileType::Symlink => EntryKind::Symlink,
            _ => EntryKind::Other,
        };
        #[allow(clippy::unnecessary_cast)] // field widths differ between targets
        EntryMeta {
            kind,
            len: st.st_size.max(0) as u64,
            allocated: (st.st_blocks.max(0) as u64).saturating_mul(512),
        }
    }

    pub fn is_file(&self) -> bool {
        self.kind == EntryKind::File
    }
}

/// Set once `openat2` turned out to be unavailable; later calls walk.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// A directory that file operations are confined to. Cheap to clone (the
/// directory descriptor is shared).
#[derive(Clone)]
pub struct DataRoot {
    path: PathBuf,
    dir: Arc<OwnedFd>,
    /// Never try openat2 (tests of the fallback walk).
    walk_only: bool,
}

impl std::fmt::Debug for DataRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataRoot")
            .field("path", &self.path)
            .finish()
    }
}

fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

impl DataRoot {
    /// Opens (creating it if needed) the data root itself. The root path is
    /// the administrator's configuration and trusted as given; only what is
    /// beneath it is confined.
    pub fn open(root: &Path) -> Result<DataRoot, FsError> {
        std::fs::create_dir_all(root).map_err(|source| FsError::Io {
            op: "creating the data root",
            path: root.to_path_buf(),
            source,
        })?;
        let dir = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::Io {
            op: "opening the data root",
            path: root.to_path_buf(),
            source: errno_io(e),
        })?;
        Ok(DataRoot {
            path: root.to_path_buf(),
            dir: Arc::new(dir),
            walk_only: false,
        })
    }

    /// The root's path (for messages and for callers holding absolute paths).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The absolute path of `rel` (for messages only: never opened by path).
    pub fn join(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }

    /// The path of `abs` relative to the root, lexically checked; refuses a
    /// path that is not beneath the root.
    pub fn rel_of(&self, abs: &Path) -> Result<PathBuf, FsError> {
        let rel = abs
            .strip_prefix(&self.path)
            .map_err(|_| FsError::OutsideRoot {
                path: abs.to_path_buf(),
                root: self.path.clone(),
            })?;
        self.check(rel)?;
        Ok(rel.to_path_buf())
    }

    /// [`DataRoot::rel_of`] for a path a Distribution chose (target or
    /// node-source path): also refuses the agent's reserved names
    /// ([`check_user_path`]). Call it before downloading anything.
    pub fn user_rel_of(&self, abs: &Path) -> Result<PathBuf, FsError> {
        let rel = self.rel_of(abs)?;
        check_user_path(&rel).map_err(|source| FsError::Path {
            path: rel.clone(),
            source,
        })?;
        Ok(rel)
    }

    /// A directory beneath the root (created if `create`), as a root of its
    /// own: operations on it stay confined to it.
    pub fn subdir(&self, rel: &Path, create: bool) -> Result<DataRoot, FsError> {
        self.check(rel)?;
        let dir = if create {
            self.walk_dirs(rel, true)?
        } else {
            self.resolve(
                rel,
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
                "opening directory",
            )?
        };
        Ok(DataRoot {
            path: self.path.join(rel),
            dir: Arc::new(dir),
            walk_only: self.walk_only,
        })
    }

    /// Creates the parent directories of `rel` (each refused if a symlink).
    pub fn create_parent_dirs(&self, rel: &Path) -> Result<(), FsError> {
        self.check(rel)?;
        self.parent_dir(rel, true).map(drop)
    }

    /// Opens a regular file for reading (node-source reads, serving a
    /// complete file). A symlink anywhere in `rel` is refused, as is
    /// anything but a regular file (a FIFO would block, a device is not
    /// content).
    pub fn open_read(&self, rel: &Path) -> Result<File, FsError> {
        self.check(rel)?;
        let fd = self.resolve(
            rel,
            OFlags::RDONLY | OFlags::NONBLOCK,
            Mode::empty(),
            "opening",
        )?;
        let st = rustix::fs::fstat(&fd).map_err(|e| self.io("inspecting", rel, e))?;
        if EntryMeta::from_stat(&st).kind != EntryKind::File {
            return Err(FsError::NotRegular {
                path: self.join(rel),
            });
        }
        // Back to blocking reads (O_NONBLOCK only kept a FIFO open from
        // hanging before it could be refused).
        rustix::fs::fcntl_setfl(&fd, OFlags::empty()).map_err(|e| self.io("opening", rel, e))?;
        Ok(File::from(fd))
    }

    /// Opens (creating, mode 0644, if missing) a regular file for reading
    /// and writing, parents created: the partial files of the store.
    pub fn create_partial(&self, rel: &Path) -> Result<File, FsError> {
        self.check(rel)?;
        self.parent_dir(rel, true)?;
        let fd = self.resolve(
            rel,
            OFlags::RDWR | OFlags::CREATE,
            Mode::from_raw_mode(0o644),
            "opening",
        )?;
        let st = rustix::fs::fstat(&fd).map_err(|e| self.io("inspecting", rel, e))?;
        if EntryMeta::from_stat(&st).kind != EntryKind::File {
            return Err(FsError::NotRegular {
                path: self.join(rel),
            });
        }
        Ok(File::from(fd))
    }

    /// Reads a whole (small) file beneath the root.
    pub fn read(&self, rel: &Path) -> Result<Vec<u8>, FsError> {
        use std::io::Read;
        let mut f = self.open_read(rel)?;
        let mut out = Vec::new();
        f.read_to_end(&mut out).map_err(|source| FsError::Io {
            op: "reading",
            path: self.join(rel),
            source,
        })?;
        Ok(out)
    }

    /// Replaces `rel` atomically with `data`: a temporary file next to it
    /// (truncated, fsynced), then a rename. The directory is not fsynced
    /// (callers needing that durability use [`DataRoot::rename_into_place`]).
    pub fn write_atomic(&self, rel: &Path, data: &[u8]) -> Result<(), FsError> {
        use std::io::Write;
        self.check(rel)?;
        let mut tmp_name = rel.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        self.check(&tmp)?;
        self.parent_dir(rel, true)?;
        let fd = self.resolve(
            &tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC,
            Mode::from_raw_mode(0o644),
            "creating",
        )?;
        let mut f = File::from(fd);
        let io = |op| {
            let path = self.join(&tmp);
            move |source| FsError::Io { op, path, source }
        };
        f.write_all(data).map_err(io("writing"))?;
        f.sync_all().map_err(io("syncing"))?;
        drop(f);
        self.rename(self, &tmp, rel, false)
    }

    /// Renames `from_rel` onto `to_rel` (both beneath this root; `to_rel`'s
    /// parents created, an existing `to_rel` replaced — a symlink there is
    /// replaced, never followed), then fsyncs the destination directory so
    /// the rename survives a crash.
    pub fn rename_into_place(&self, from_rel: &Path, to_rel: &Path) -> Result<(), FsError> {
        self.rename(self, from_rel, to_rel, true)
    }

    /// Like [`DataRoot::rename_into_place`], from a file beneath `src` (e.g.
    /// the partial directory) to one beneath this root.
    pub fn rename_from(
        &self,
        src: &DataRoot,
        from_rel: &Path,
        to_rel: &Path,
    ) -> Result<(), FsError> {
        self.rename(src, from_rel, to_rel, true)
    }

    fn rename(
        &self,
        src: &DataRoot,
        from_rel: &Path,
        to_rel: &Path,
        sync: bool,
    ) -> Result<(), FsError> {
        src.check(from_rel)?;
        self.check(to_rel)?;
        let (from_dir, from_name) = src.parent_dir(from_rel, false)?;
        let (to_dir, to_name) = self.parent_dir(to_rel, true)?;
        rustix::fs::renameat(&from_dir, &from_name, &to_dir, &to_name).map_err(|e| {
            FsError::Io {
                op: "renaming into place",
                path: self.join(to_rel),
                source: errno_io(e),
            }
        })?;
        if sync {
            rustix::fs::fsync(&to_dir).map_err(|e| self.io("syncing directory of", to_rel, e))?;
        }
        Ok(())
    }

    /// Removes the file (or symlink: the link itself, never its target) at
    /// `rel`. Returns whether something was removed. A missing parent
    /// directory counts as nothing to remove; a symlinked parent is refused.
    pub fn remove_file(&self, rel: &Path) -> Result<bool, FsError> {
        self.check(rel)?;
        let (dir, name) = match self.parent_dir(rel, false) {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&dir, &name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(self.io("removing", rel, e)),
        }
    }

    /// lstat of `rel`: `None` if it does not exist. A symlink in a parent
    /// component is an error; a symlink as the last one is reported.
    pub fn metadata(&self, rel: &Path) -> Result<Option<EntryMeta>, FsError> {
        self.check(rel)?;
        let (dir, name) = match self.parent_dir(rel, false) {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(EntryMeta::from_stat(&st))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(self.io("inspecting", rel, e)),
        }
    }

    fn check(&self, rel: &Path) -> Result<(), FsError> {
        check_rel_path(rel).map_err(|source| FsError::Path {
            path: rel.to_path_buf(),
            source,
        })
    }

    fn io(&self, op: &'static str, rel: &Path, e: Errno) -> FsError {
        FsError::Io {
            op,
            path: self.join(rel),
            source: errno_io(e),
        }
    }

    /// The directory holding `rel` (opened confined, created if `create`)
    /// and `rel`'s last component.
    fn parent_dir(&self, rel: &Path, create: bool) -> Result<(OwnedFd, OsString), FsError> {
        let name = rel
            .file_name()
            .map(OsStr::to_os_string)
            .ok_or_else(|| FsError::Path {
                path: rel.to_path_buf(),
                source: PathError::Empty,
            })?;
        let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = match parent {
            None => {
                rustix::io::dup(&*self.dir).map_err(|e| self.io("opening", Path::new(""), e))?
            }
            Some(p) if create => self.walk_dirs(p, true)?,
            Some(p) => self.resolve(
                p,
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
                "opening directory",
            )?,
        };
        Ok((dir, name))
    }

    /// Opens `rel` beneath the root refusing symlinks everywhere: openat2
    /// when available, else the component walk.
    fn resolve(
        &self,
        rel: &Path,
        flags: OFlags,
        mode: Mode,
        op: &'static str,
    ) -> Result<OwnedFd, FsError> {
        let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        if !self.walk_only && !NO_OPENAT2.load(Ordering::Relaxed) {
            let how =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match rustix::fs::openat2(&*self.dir, rel, flags, mode, how) {
                Ok(fd) => return Ok(fd),
                Err(Errno::NOSYS) | Err(Errno::PERM) => {
                    debug!("openat2 unavailable; resolving paths one component at a time");
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(self.classify(rel, op, e)),
            }
        }
        let (dir, name) = match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(p) => (
                self.walk_dirs(p, false)?,
                rel.file_name().unwrap_or_default(),
            ),
            None => (
                rustix::io::dup(&*self.dir).map_err(|e| self.io(op, rel, e))?,
                rel.as_os_str(),
            ),
        };
        rustix::fs::openat(&dir, name, flags, mode).map_err(|e| self.classify(rel, op, e))
    }

    /// Opens directory `rel` one component at a time with `O_NOFOLLOW`
    /// (components are lexically normal, so each step stays beneath),
    /// creating missing ones if `create`.
    fn walk_dirs(&self, rel: &Path, create: bool) -> Result<OwnedFd, FsError> {
        let mut cur = rustix::io::dup(&*self.dir).map_err(|e| self.io("opening", rel, e))?;
        let mut done = PathBuf::new();
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(FsError::Path {
                    path: rel.to_path_buf(),
                    source: PathError::DotComponent,
                });
            };
            done.push(name);
            if create {
                match rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(self.io("creating directory", &done, e)),
                }
            }
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            cur = rustix::fs::openat(&cur, name, flags, Mode::empty())
                .map_err(|e| self.classify(&done, "opening directory", e))?;
        }
        Ok(cur)
    }

    /// Turns a resolution failure into a typed error: a symlink met on the
    /// way (ELOOP, or ENOTDIR from `O_DIRECTORY|O_NOFOLLOW` on a link, or
    /// EXDEV from RESOLVE_BENEATH) is [`FsError::Symlink`].
    fn classify(&self, rel: &Path, op: &'static str, e: Errno) -> FsError {
        let symlink = match e {
            Errno::LOOP | Errno::XDEV => true,
            Errno::NOTDIR => self.has_symlink_component(rel),
            _ => false,
        };
        if symlink {
            FsError::Symlink {
                path: rel.to_path_buf(),
                root: self.path.clone(),
            }
        } else {
            self.io(op, rel, e)
        }
    }

    fn has_symlink_component(&self, rel: &Path) -> bool {
        let mut cur = PathBuf::new();
        for c in rel.components() {
            cur.push(c);
            // Diagnostics only: lstat by path is fine here.
            if std::fs::symlink_metadata(self.path.join(&cur))
                .is_ok_and(|m| m.file_type().is_symlink())
            {
                return true;
            }
        }
        false
    }

    /// The directory descriptor (for `statvfs` and the like).
    pub fn dir_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Setup {
        _tmp: tempfile::TempDir,
        root: DataRoot,
        outside: PathBuf,
    }

    /// A root with `evil_dir -> <outside dir>` and `evil_file -> <outside
    /// dir>/secret`, the outside file holding "secret".
    fn setup() -> Setup {
        setup_with(false)
    }

    fn setup_with(walk_only: bool) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        let rootp = tmp.path().join("root");
        std::fs::create_dir(&rootp).unwrap();
        symlink(&outside, rootp.join("evil_dir")).unwrap();
        symlink(outside.join("secret"), rootp.join("evil_file")).unwrap();
        let mut root = DataRoot::open(&rootp).unwrap();
        root.walk_only = walk_only;
        Setup {
            _tmp: tmp,
            root,
            outside,
        }
    }

    fn outside_untouched(s: &Setup) {
        let names: Vec<_> = std::fs::read_dir(&s.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("secret")]);
        assert_eq!(std::fs::read(s.outside.join("secret")).unwrap(), b"secret");
    }

    fn symlink_escapes_are_refused(s: &Setup) {
        let r = &s.root;
        let through_dir = Path::new("evil_dir/secret");
        assert!(matches!(
            r.open_read(through_dir),
            Err(FsError::Symlink { .. })
        ));
        assert!(matches!(
            r.open_read(Path::new("evil_file")),
            Err(FsError::Symlink { .. })
        ));
        assert!(matches!(
            r.create_partial(Path::new("evil_dir/new")),
            Err(FsError::Symlink { .. })
        ));
        assert!(matches!(
            r.create_parent_dirs(Path::new("evil_dir/a/b")),
            Err(FsError::Symlink { .. })
        ));
        assert!(matches!(
            r.write_atomic(Path::new("evil_dir/secret"), b"pwned"),
            Err(FsError::Symlink { .. })
        ));
        assert!(matches!(
            r.remove_file(through_dir),
            Err(FsError::Symlink { .. })
        ));
        assert!(matches!(
            r.metadata(through_dir),
            Err(FsError::Symlink { .. })
        ));
        // The link itself is reported, not its target.
        assert_eq!(
            r.metadata(Path::new("evil_file")).unwrap().unwrap().kind,
            EntryKind::Symlink
        );
        // Renaming onto a symlinked directory's child is refused; renaming
        // onto the symlink itself replaces the link, not the outside file.
        std::fs::write(r.join(Path::new("src1")), b"mine").unwrap();
        assert!(matches!(
            r.rename_into_place(Path::new("src1"), through_dir),
            Err(FsError::Symlink { .. })
        ));
        r.rename_into_place(Path::new("src1"), Path::new("evil_file"))
            .unwrap();
        assert_eq!(r.read(Path::new("evil_file")).unwrap(), b"mine");
        outside_untouched(s);
        // Removing the (now regular) file; a dangling create through a link
        // was never possible.
        assert!(r.remove_file(Path::new("evil_file")).unwrap());
        assert!(!r.remove_file(Path::new("evil_file")).unwrap());
        // Removing a symlink removes the link only.
        assert!(r.remove_file(Path::new("evil_dir")).unwrap());
        outside_untouched(s);
    }

    #[test]
    fn symlinks_never_lead_out_of_the_root() {
        let s = setup();
        symlink_escapes_are_refused(&s);
    }

    #[test]
    fn component_walk_fallback_refuses_the_same() {
        let s = setup_with(true);
        symlink_escapes_are_refused(&s);
        // Normal nested paths work without openat2 too.
        s.root
            .write_atomic(Path::new("a/b/c.bin"), b"data")
            .unwrap();
        assert_eq!(s.root.read(Path::new("a/b/c.bin")).unwrap(), b"data");
    }

    #[test]
    fn lexical_checks() {
        let bad: &[(&[u8], PathError)] = &[
            (b"", PathError::Empty),
            (b"/etc/passwd", PathError::Absolute),
            (b"../x", PathError::DotComponent),
            (b"a/../../x", PathError::DotComponent),
            (b"a/./b", PathError::DotComponent),
            (b"a\0b", PathError::Nul),
            (b"a\nb", PathError::ControlChar { byte: b'\n' }),
            (b"a\x7f", PathError::ControlChar { byte: 0x7f }),
        ];
        for (p, want) in bad {
            let p = Path::new(OsStr::from_bytes(p));
            assert_eq!(check_rel_path(p).as_ref(), Err(want), "{p:?}");
            assert_eq!(check_user_path(p).as_ref(), Err(want), "{p:?}");
        }
        let long = "a".repeat(256);
        assert!(matches!(
            check_rel_path(Path::new(&long)),
            Err(PathError::ComponentTooLong { .. })
        ));
        for reserved in [
            ".peerfill-status/x.json",
            "models/.peerfill-partial/a",
            ".peerfill",
        ] {
            let p = Path::new(reserved);
            assert!(check_rel_path(p).is_ok());
            assert!(
                matches!(check_user_path(p), Err(PathError::Reserved { .. })),
                "{reserved}"
            );
        }
        for ok in [
            "a",
            "models/llama/weights.bin",
            ".hidden/x",
            "peerfill/x",
            "a b/ü.bin",
        ] {
            assert_eq!(check_user_path(Path::new(ok)), Ok(()), "{ok}");
        }
    }

    #[test]
    fn operations_refuse_invalid_paths_before_touching_disk() {
        let s = setup();
        let r = &s.root;
        for p in ["../outside/secret", "/etc/passwd", "a/../../x"] {
            let p = Path::new(p);
            assert!(matches!(r.open_read(p), Err(FsError::Path { .. })));
            assert!(matches!(r.remove_file(p), Err(FsError::Path { .. })));
            assert!(matches!(r.create_partial(p), Err(FsError::Path { .. })));
        }
        let nul = Path::new(OsStr::from_bytes(b"x\0y"));
        assert!(matches!(
            r.create_partial(nul),
            Err(FsError::Path {
                source: PathError::Nul,
                ..
            })
        ));
        assert!(matches!(
            r.rel_of(Path::new("/somewhere/else")),
            Err(FsError::OutsideRoot { .. })
        ));
        outside_untouched(&s);
    }

    #[test]
    fn normal_nested_paths_work() {
        let s = setup();
        let r = &s.root;
        let rel = Path::new("models/llama/w.bin");
        assert_eq!(r.metadata(rel).unwrap(), None);
        assert!(!r.remove_file(rel).unwrap());
        {
            use std::io::Write;
            let mut f = r
                .create_partial(Path::new(".peerfill-partial/c.partial"))
                .unwrap();
            f.write_all(b"hello").unwrap();
        }
        r.rename_into_place(Path::new(".peerfill-partial/c.partial"), rel)
            .unwrap();
        let m = r.metadata(rel).unwrap().unwrap();
        assert!(m.is_file());
        assert_eq!(m.len, 5);
        assert_eq!(r.read(rel).unwrap(), b"hello");
        assert_eq!(r.rel_of(&r.join(rel)).unwrap(), rel);
        assert_eq!(r.user_rel_of(&r.join(rel)).unwrap(), rel);
        let state = r.join(Path::new(".peerfill-status/x.json"));
        assert!(r.rel_of(&state).is_ok());
        assert!(matches!(
            r.user_rel_of(&state),
            Err(FsError::Path {
                source: PathError::Reserved { .. },
                ..
            })
        ));
        let sub = r.subdir(Path::new("models"), false).unwrap();
        assert_eq!(sub.read(Path::new("llama/w.bin")).unwrap(), b"hello");
        assert!(r.remove_file(rel).unwrap());
        assert_eq!(r.metadata(rel).unwrap(), None);
        // A FIFO is not content.
        let fifo = r.join(Path::new("fifo"));
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert!(matches!(
            r.open_read(Path::new("fifo")),
            Err(FsError::NotRegular { .. })
        ));
    }
}
