//! Phase 4 of an attempt: once every piece is held and verified, wait for
//! the pinned identity where the engine requires one, then swap the
//! complete file in at its destination.

use std::path::Path;

use tracing::info;

use crate::swarm::Fill;

use super::super::Phase;
use super::super::failure::{Failure, version_conflict};
use super::ContentRun;

/// Waits for every piece (and the pin), then moves the file in place.
pub(super) async fn finish(run: &ContentRun, fill: &Fill, dest: &Path) -> Result<(), Failure> {
    let c = &run.cfg;
    tokio::select! {
        _ = async {
            fill.wait_complete().await;
            wait_for_identity(run, fill).await;
        } => {}
        _ = run.origin_conflict.cancelled() => return Err(version_conflict(run)),
    }
    let finished = if c.directory {
        fill.finish_tree(dest).await
    } else {
        fill.finish(dest).await
    };
    match finished {
        Ok(()) => {
            info!(content = %c.id, dest = %dest.display(), "content complete and verified");
            run.set(Phase::Complete, None, None);
            Ok(())
        }
        Err(e) => Err(Failure::new(e.reason(), e.to_string())),
    }
}

/// When the engine requires a pinned identity and none is there yet, shows
/// the content waiting for it (`WaitingForIdentity`) until the operator
/// publishes it. Returns the pin, if any.
pub(super) async fn wait_for_identity(run: &ContentRun, fill: &Fill) -> Option<blake3::Hash> {
    if let Some(r) = fill.pinned_root() {
        return Some(r);
    }
    if !fill.spec.require_pin {
        return None;
    }
    info!(content = %run.cfg.id, root = ?fill.content_digest().map(|d| d.to_string()), "every piece held; waiting for the pinned identity");
    run.set(
        Phase::Fetching,
        Some("WaitingForIdentity"),
        Some(
            "every piece is held and verified against the authorities' hashes; waiting for the operator to pin the content's root".into(),
        ),
    );
    let r = fill.wait_pinned().await;
    run.set(Phase::Fetching, None, None);
    Some(r)
}
