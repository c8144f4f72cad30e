//! The content task: fills or seeds one content, attempt after attempt,
//! until it is complete or failed for good.
//!
//! One attempt walks the data path top-down, one phase per module:
//! `prepare` (the content's identity: destination, size, layout, hash
//! authorities, piece store, pins) → `reuse` (pieces from files already on
//! disk) → `seed` (a seeder hashes the file it holds) or `origin` (an origin
//! reader reads its ranges) while the swarm fills the rest from peers →
//! `finish` (wait for the pinned identity, swap the file in).

mod finish;
mod origin;
mod prepare;
mod reuse;
mod seed;
mod state;

use std::sync::Arc;
use tracing::{Instrument, warn};

use crate::retry::{self, Backoff};
use crate::swarm::Fill;

use super::Phase;
use super::engine::Engine;
use super::failure::Failure;
pub(super) use state::ContentRun;

/// Aborts a spawned task when dropped, so a cancelled content task takes
/// its origin reader down with it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Fills or seeds one content until complete or failed for good. Each
/// attempt builds a fresh fill; an attempt that stops on a local fault
/// (and, in a long-running agent, only then) is retried with the capped
/// exponential backoff of [`retry::ENGINE`], the partial file kept, so the
/// content resumes by itself once the fault is gone.
pub(super) async fn content_task(run: Arc<ContentRun>, engine: Engine) {
    let retry = engine.inner.opts.retry_transient_origin;
    let mut backoff = Backoff::new(retry::ENGINE);
    loop {
        let failure = match content_attempt(&run, &engine).await {
            Ok(()) => return,
            Err(f) => f,
        };
        // Take this attempt's fill out of the swarm: peers' sessions move to
        // the next attempt's fill (see `peer::inbound_announce`).
        // (The closed fill stays in the run so the status keeps its
        // progress; the next attempt replaces it.)
        if let Some(fill) = run.fill() {
            engine.inner.swarm.remove_fill(&fill);
        }
        if !(retry && failure.is_local_fault()) {
            run.fail(failure.reason, failure.message);
            return;
        }
        let wait = backoff.next_delay();
        warn!(content = %run.cfg.id, reason = failure.reason, error = %failure.message, retry_in = ?wait, "local fault; retrying");
        run.set(
            Phase::Failed,
            Some(failure.reason),
            Some(format!(
                "{} (retrying in {}s)",
                failure.message,
                wait.as_secs().max(1)
            )),
        );
        tokio::time::sleep(wait).await;
    }
}

/// One attempt: establishes the content's identity, joins the swarm, then
/// seeds it or fills it (from disk, the origin and peers) until complete.
async fn content_attempt(run: &Arc<ContentRun>, engine: &Engine) -> Result<(), Failure> {
    let me = engine.inner.cfg.node.as_str();
    let p = prepare::prepare(run, engine).await?;
    // Files already on disk (at the destination, or the previous version's
    // path) are reuse sources, piece by piece, once each piece verifies.
    let reuse_files = if p.seed_path.is_some() {
        reuse::Sources::none()
    } else {
        reuse::sources(&p.data_root, &engine.inner.cfg.data_dir, &run.cfg, &p.dest)
    };
    join_swarm(run, engine, &p.fill, !reuse_files.is_empty());

    if let Some(path) = &p.seed_path {
        return seed::seed(run, &p.fill, me, path).await;
    }
    let _watchdog = {
        let (swarm, fill) = (engine.inner.swarm.clone(), p.fill.clone());
        AbortOnDrop(tokio::spawn(
            async move { swarm.watch_stalls(fill).await }.in_current_span(),
        ))
    };
    let _reuse = reuse::start(&p.fill, me, reuse_files).await;
    if let Some(reader) = origin::start_reader(run, engine, &p.fill, p.origin, &p.authority).await?
    {
        origin::await_reader(run, &p.fill, reader).await?;
    }
    finish::finish(run, &p.fill, &p.dest).await
}

/// Publishes this attempt's fill: in the run (for the status), and to the
/// swarm, which then serves and fetches its pieces. With files to reuse,
/// their pieces are held back from the network until tried.
fn join_swarm(run: &ContentRun, engine: &Engine, fill: &Arc<Fill>, reusing: bool) {
    let swarm = &engine.inner.swarm;
    if reusing {
        fill.defer_for_reuse();
    }
    *run.fill
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(fill.clone());
    run.set(Phase::Fetching, None, None);
    swarm.add_content(fill.clone());
    // The peer list may have changed while the content was being prepared.
    if let Some(allowed) = engine.allowed_of(&run.cfg.id) {
        swarm.set_allowed(&run.cfg.id, allowed);
    }
}
