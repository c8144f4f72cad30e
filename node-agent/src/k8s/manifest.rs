//! The contents this agent took on, persisted under the data root, so that
//! after a restart it deletes the data of distributions unassigned while it
//! was away — and only files it created itself.
//!
//! Ownership: each entry names the content id, the owning Distribution uid
//! and the path its file lives at. A file is deleted only through the entry
//! of the uid that owns it, never when it is a seeder's source, and never
//! while any current assignment claims an overlapping path
//! ([`Manifest::deletable_path`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the manifest in the status directory.
pub const MANIFEST_FILE: &str = "assignments.json";

/// One content the agent fills or filled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Destination relative to the data root.
    pub path: PathBuf,
    /// The node seeds this content from a file it did not create: never
    /// deleted.
    #[serde(default)]
    pub seeder: bool,
}

/// Errors reading or writing the manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Content id → entry, mirrored to disk on every change.
#[derive(Debug)]
pub struct Manifest {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
}

impl Manifest {
    /// Loads the manifest in `status_dir`; a missing or unreadable one is
    /// empty (an unreadable one is logged: its files are then left alone).
    pub fn load(status_dir: &Path) -> Manifest {
        let path = status_dir.join(MANIFEST_FILE);
        let entries = match std::fs::read(&path) {
            Ok(raw) => match serde_json::from_slice(&raw) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable manifest ignored");
                    BTreeMap::new()
                }
            },
            Err(_) => BTreeMap::new(),
        };
        Manifest { path, entries }
    }

    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    /// Records (or updates) a content before any of its files exist.
    pub fn insert(&mut self, id: &str, entry: Entry) -> Result<(), ManifestError> {
        if self.entries.get(id) == Some(&entry) {
            return Ok(());
        }
        self.entries.insert(id.to_string(), entry);
        self.save()
    }

    /// Forgets a content once its files are gone.
    pub fn remove(&mut self, id: &str) -> Result<(), ManifestError> {
        if self.entries.remove(id).is_some() {
            self.save()?;
        }
        Ok(())
    }

    /// The file that removing content `id` of Distribution `uid` may delete:
    /// its recorded path, if the entry exists, belongs to `uid`, is not a
    /// seeder's source, and no path in `claimed` (the current assignments'
    /// targets and seed sources) overlaps it.
    pub fn deletable_path(&self, id: &str, uid: &str, claimed: &[PathBuf]) -> Option<PathBuf> {
        let e = self.entries.get(id)?;
        if e.uid != uid || e.seeder {
            return None;
        }
        if claimed
            .iter()
            .any(|c| crate::k8s::translate::paths_overlap(c, &e.path))
        {
            return None;
        }
        Some(e.path.clone())
    }

    fn save(&self) -> Result<(), ManifestError> {
        let io = |op, source| ManifestError::Io {
            op,
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(&self.entries).unwrap_or_default();
        std::fs::write(&tmp, json).map_err(|e| io("writing", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("renaming", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = Manifest::load(dir.path());
        assert!(m.entries().is_empty());
        let e = Entry {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "d".into(),
            path: "a/b.bin".into(),
            seeder: false,
        };
        m.insert("c1", e.clone()).expect("insert");
        m.insert(
            "c2",
            Entry {
                seeder: true,
                ..e.clone()
            },
        )
        .expect("insert");
        m.remove("c2").expect("remove");
        let again = Manifest::load(dir.path());
        assert_eq!(again.entries().len(), 1);
        assert_eq!(again.entries().get("c1"), Some(&e));
    }

    #[test]
    fn only_the_owner_deletes_and_never_a_claimed_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = Manifest::load(dir.path());
        let e = Entry {
            uid: "u1".into(),
            namespace: "ns".into(),
            name: "d".into(),
            path: "a/b.bin".into(),
            seeder: false,
        };
        m.insert("c1", e.clone()).expect("insert");
        m.insert(
            "s1",
            Entry {
                seeder: true,
                path: "src/x".into(),
                ..e.clone()
            },
        )
        .expect("insert");
        assert_eq!(
            m.deletable_path("c1", "u1", &[]),
            Some(PathBuf::from("a/b.bin"))
        );
        // Another uid does not own it.
        assert_eq!(m.deletable_path("c1", "u2", &[]), None);
        // Unknown content: nothing recorded, nothing deleted.
        assert_eq!(m.deletable_path("c9", "u1", &[]), None);
        // A seeder's source is never deleted.
        assert_eq!(m.deletable_path("s1", "u1", &[]), None);
        // A path another current assignment claims (equal or overlapping)
        // stays.
        for claimed in ["a/b.bin", "a"] {
            assert_eq!(
                m.deletable_path("c1", "u1", &[PathBuf::from(claimed)]),
                None,
                "{claimed}"
            );
        }
        assert!(
            m.deletable_path("c1", "u1", &[PathBuf::from("a/b.bin2")])
                .is_some()
        );
    }
}
