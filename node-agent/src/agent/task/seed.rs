//! Phase 3 of an attempt, for the seeder: it holds the whole file and is the
//! authority of every piece hash, so it hashes the file, checks it against
//! the configured digest and the pinned identity, and serves it.

use std::path::Path;
use std::sync::Arc;

use tracing::info;

use crate::content::{self, Digest};
use crate::swarm::{Fill, seed_hashes};

use super::super::Phase;
use super::super::failure::Failure;
use super::ContentRun;
use super::finish::wait_for_identity;

/// Hashes the file this node seeds from `path` and marks every piece held;
/// complete once it matches the digest (if given) and the pinned root.
pub(super) async fn seed(
    run: &ContentRun,
    fill: &Arc<Fill>,
    me: &str,
    path: &Path,
) -> Result<(), Failure> {
    let c = &run.cfg;
    info!(content = %c.id, path = %path.display(), "seeding a file");
    seed_hashes(fill, me, 0..fill.layout().piece_count())
        .await
        .map_err(|e| Failure::new(e.reason(), e.to_string()))?;
    fill.mark_all_held();
    if let Some(want) = c.digest {
        match content::digest_file(path, want.algo()).await {
            Ok(got) if got == want => {}
            Ok(got) => {
                return Err(Failure::new(
                    "DigestMismatch",
                    format!("{} has digest {got}, expected {want}", path.display()),
                ));
            }
            Err(e) => return Err(Failure::new("SourceUnreadable", e.to_string())),
        }
    }
    let pin = wait_for_identity(run, fill).await;
    let got = fill.content_digest();
    if let Some(want) = pin
        && got != Some(Digest::Blake3(*want.as_bytes()))
    {
        return Err(Failure::new(
            "IdentityMismatch",
            format!(
                "{} no longer has the pinned content blake3:{}",
                path.display(),
                want.to_hex()
            ),
        ));
    }
    run.set(Phase::Complete, None, None);
    Ok(())
}
