//! Why an attempt at a content stopped, and which failures are this node's
//! own (retried) rather than the content's (reported, given up).

use std::sync::PoisonError;

use crate::store::StoreError;

use super::task::ContentRun;

/// Why one attempt at a content stopped.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) reason: &'static str,
    pub(super) message: String,
}

impl Failure {
    pub(super) fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Failure {
            reason,
            message: message.into(),
        }
    }

    /// A fault of this node (disk full, I/O error): retried, since freeing
    /// space or a remount recovers it, and never a reason to give up the
    /// content everywhere.
    pub(super) fn is_local_fault(&self) -> bool {
        is_local_fault(self.reason)
    }
}

/// Whether `reason` names a fault of this node rather than of the content.
pub fn is_local_fault(reason: &str) -> bool {
    matches!(reason, "InsufficientSpace" | "StorageError")
}

pub(super) fn store_reason(e: &StoreError) -> &'static str {
    e.reason()
}

/// An origin failure; a change of the origin records the version found.
pub(super) fn origin_failure(run: &ContentRun, e: crate::origin::OriginError) -> Failure {
    if let crate::origin::OriginError::Changed { found, .. } = &e {
        *run.origin_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = found.clone();
    }
    Failure::new(e.reason(), e.to_string())
}

/// The failure of a reader whose origin version is not the published one.
pub(super) fn version_conflict(run: &ContentRun) -> Failure {
    let own = run.origin_version().unwrap_or_default();
    Failure::new(
        "OriginChanged",
        format!(
            "this reader read origin version {own}, not the published one: the origin changed between the readers"
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn only_faults_of_this_node_are_local() {
        for reason in ["InsufficientSpace", "StorageError"] {
            assert!(is_local_fault(reason), "{reason}");
            assert!(Failure::new(reason, "x").is_local_fault());
        }
        for reason in [
            "DigestMismatch",
            "IdentityMismatch",
            "OriginChanged",
            "OriginUnreachable",
            "InvalidPath",
            "InvalidConfig",
            "SourceUnreadable",
        ] {
            assert!(!is_local_fault(reason), "{reason}");
        }
    }

    #[test]
    fn a_full_disk_is_insufficient_space_any_other_store_error_a_storage_error() {
        let full = StoreError::InsufficientSpace {
            needed: 2,
            available: 1,
            path: PathBuf::from("/data/x"),
        };
        assert_eq!(store_reason(&full), "InsufficientSpace");
        let missing = StoreError::NotHeld { index: 3 };
        assert_eq!(store_reason(&missing), "StorageError");
    }
}
