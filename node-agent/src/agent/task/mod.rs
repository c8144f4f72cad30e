//! The content task: fills or seeds one content, attempt after attempt,
//! until it is complete or failed for good.

mod reuse;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::content::{self, Digest, Layout};
use crate::fsroot::DataRoot;
use crate::origin::{OriginClient, OriginOptions, split_ranges};
use crate::store::{PieceStore, StoreError};
use crate::swarm::{Authority, Fault, Fill, FillSpec, read_origin_range, seed_hashes};

use super::engine::Engine;
use super::failure::{Failure, origin_failure, store_reason, version_conflict};
use super::{ContentConfig, Phase, SourceConfig, dest_path};
use reuse::{open_reuse_source, reuse_pieces, trust_verified_file};

pub(super) struct Outcome {
    pub(super) phase: Phase,
    pub(super) reason: Option<String>,
    pub(super) message: Option<String>,
}

pub(super) struct ContentRun {
    pub(super) cfg: ContentConfig,
    /// This agent's node name.
    pub(super) node: String,
    pub(super) fill: Mutex<Option<Arc<Fill>>>,
    pub(super) outcome: Mutex<Outcome>,
    /// Received bytes at the last rate sample, and that rate.
    pub(super) rate_mark: Mutex<(Instant, u64, f64)>,
    /// Woken on every change of phase, reason or size.
    pub(super) changed: Arc<tokio::sync::Notify>,
    /// The pinned root and origin version, as the operator published them
    /// (the config's at first); applied to every attempt's fill and client.
    pub(super) pins: Mutex<(Option<blake3::Hash>, Option<String>)>,
    /// This attempt's origin client (origin readers), for its version.
    pub(super) origin: Mutex<Option<OriginClient>>,
    /// The version found when the origin changed (`OriginChanged`).
    pub(super) origin_seen: Mutex<Option<String>>,
    /// Cancelled when the published origin version is not the one this
    /// reader read at: its pieces are of another version, so the content
    /// stops with `OriginChanged` (the operator then starts a new version).
    pub(super) origin_conflict: CancellationToken,
}

impl ContentRun {
    pub(super) fn new(cfg: ContentConfig, node: String, changed: Arc<tokio::sync::Notify>) -> Self {
        let root = match cfg.root {
            Some(Digest::Blake3(b)) => Some(blake3::Hash::from_bytes(b)),
            _ => None,
        };
        ContentRun {
            pins: Mutex::new((root, cfg.origin_version.clone())),
            origin: Mutex::new(None),
            origin_seen: Mutex::new(None),
            origin_conflict: CancellationToken::new(),
            cfg,
            node,
            fill: Mutex::new(None),
            outcome: Mutex::new(Outcome {
                phase: Phase::Pending,
                reason: None,
                message: None,
            }),
            rate_mark: Mutex::new((Instant::now(), 0, 0.0)),
            changed,
        }
    }
    pub(super) fn set(&self, phase: Phase, reason: Option<&str>, message: Option<String>) {
        {
            let mut o = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
            o.phase = phase;
            o.reason = reason.map(str::to_string);
            o.message = message;
        }
        self.changed.notify_waiters();
    }
    pub(super) fn phase(&self) -> Phase {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .phase
    }
    pub(super) fn fill(&self) -> Option<Arc<Fill>> {
        self.fill
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    fn root_pin(&self) -> Option<blake3::Hash> {
        self.pins.lock().unwrap_or_else(PoisonError::into_inner).0
    }
    fn origin_pin(&self) -> Option<String> {
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .clone()
    }
    /// The origin version this node reads (or found changed), if any.
    pub(super) fn origin_version(&self) -> Option<String> {
        let seen = self
            .origin_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        seen.or_else(|| {
            self.origin
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .and_then(OriginClient::version)
        })
    }
    fn fail(&self, reason: &str, message: String) {
        error!(content = %self.cfg.id, reason, %message, "content failed");
        self.set(Phase::Failed, Some(reason), Some(message));
    }
    /// The node seeds this content from a file it already holds.
    pub(super) fn seeds(&self) -> bool {
        matches!(&self.cfg.source, SourceConfig::Node { node, .. } if node == &self.node)
    }
}

/// Aborts a spawned task when dropped, so a cancelled content task takes
/// its origin reader down with it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// First wait before retrying an origin that failed transiently, or a
/// content stopped by a local fault.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between two such attempts.
const RETRY_MAX: Duration = Duration::from_secs(60);

fn headers(h: &BTreeMap<String, String>) -> Vec<(String, String)> {
    h.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The capped exponential backoff of the engine's retries (transient origin
/// failures, local faults): 1 s doubling to 60 s, with jitter so nodes that
/// failed together do not retry together.
fn retry_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// Runs `op` until it succeeds; a transient origin failure is shown as
/// Failed with its reason and retried after a capped exponential backoff
/// when the engine retries (otherwise it is returned).
async fn with_origin_retry<T, E, F, Fut>(
    run: &ContentRun,
    retry: bool,
    resume_phase: Phase,
    op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: OriginFailure,
{
    let failed = std::sync::atomic::AtomicBool::new(false);
    let result = op
        .retry(retry_backoff())
        .sleep(tokio::time::sleep)
        .when(|e: &E| retry && e.transient())
        .notify(|e: &E, wait: Duration| {
            warn!(content = %run.cfg.id, reason = e.reason_str(), error = %e, retry_in = ?wait, "origin failed; retrying");
            run.set(
                Phase::Failed,
                Some(e.reason_str()),
                Some(format!("{e} (retrying in {}s)", wait.as_secs().max(1))),
            );
            failed.store(true, Ordering::Relaxed);
        })
        .await;
    if result.is_ok() && failed.load(Ordering::Relaxed) {
        info!(content = %run.cfg.id, "origin reachable again");
        run.set(resume_phase, None, None);
    }
    result
}

/// Origin errors as [`with_origin_retry`] sees them.
trait OriginFailure: std::fmt::Display {
    fn transient(&self) -> bool;
    fn reason_str(&self) -> &'static str;
}

impl OriginFailure for crate::origin::OriginError {
    fn transient(&self) -> bool {
        self.is_transient()
    }
    fn reason_str(&self) -> &'static str {
        self.reason()
    }
}

impl OriginFailure for crate::swarm::OriginReadError {
    fn transient(&self) -> bool {
        matches!(self, crate::swarm::OriginReadError::Origin(e) if e.is_transient())
    }
    fn reason_str(&self) -> &'static str {
        self.reason()
    }
}

/// Fills or seeds one content until complete or failed for good. Each
/// attempt builds a fresh fill; an attempt that stops on a local fault
/// (and, in a long-running agent, only then) is retried with capped
/// exponential backoff, the partial file kept, so the content resumes by
/// itself once the fault is gone.
pub(super) async fn content_task(run: Arc<ContentRun>, engine: Engine) {
    let retry = engine.inner.opts.retry_transient_origin;
    let mut backoff = retry_backoff().build();
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
        let wait = backoff.next().unwrap_or(RETRY_MAX);
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

/// One attempt: prepares the content (layout, store, hash authority), then
/// fills or seeds it until complete.
async fn content_attempt(run: &Arc<ContentRun>, engine: &Engine) -> Result<(), Failure> {
    let inner = &engine.inner;
    let cfg = &inner.cfg;
    let swarm = &inner.swarm;
    let metrics = &inner.metrics;
    let retry = inner.opts.retry_transient_origin;
    let c = &run.cfg;
    let me = cfg.node.as_str();
    let dest = dest_path(&cfg.data_dir, &c.path)
        .map_err(|_| Failure::new("InvalidPath", format!("invalid path {}", c.path.display())))?;
    // Every file this content touches is resolved beneath the data root,
    // never through a symlink; a bad path fails here, before any download.
    let data_root =
        DataRoot::open(&cfg.data_dir).map_err(|e| Failure::new("StorageError", e.to_string()))?;
    data_root
        .user_rel_of(&dest)
        .map_err(|e| Failure::new("InvalidPath", e.to_string()))?;
    // Layout: configured, or the origin's length.
    let mut origin_opts = if retry {
        // The engine retries on its own, showing the failure meanwhile.
        OriginOptions {
            max_retries: 2,
            ..OriginOptions::default()
        }
    } else {
        OriginOptions::default()
    };
    origin_opts.allow_private = inner.opts.allow_private_origins;
    let origin = match &c.source {
        SourceConfig::Http {
            url, headers: h, ..
        } => {
            let o = OriginClient::new(url, headers(h), origin_opts)
                .map_err(|e| Failure::new(e.reason(), e.to_string()))?
                .with_metrics(metrics.clone());
            if let Some(v) = run.origin_pin() {
                o.pin_version(v);
            }
            if matches!(&c.source, SourceConfig::Http { readers, .. } if readers.iter().any(|r| r == me))
            {
                // An origin reader reports the version it reads.
                *run.origin.lock().unwrap_or_else(PoisonError::into_inner) = Some(o.clone());
            }
            Some(o)
        }
        SourceConfig::Node { .. } => None,
    };
    let size = match (c.size, &origin) {
        (Some(s), _) => s,
        (None, Some(o)) => with_origin_retry(run, retry, Phase::Pending, || o.content_length())
            .await
            .map_err(|e| origin_failure(run, e))?,
        (None, None) => match &c.source {
            SourceConfig::Node { path: Some(p), .. } if outside_root(&cfg.data_dir, p) => {
                std::fs::symlink_metadata(p)
                    .map_err(|e| Failure::new("SourceUnreadable", format!("{}: {e}", p.display())))?
                    .len()
            }
            SourceConfig::Node { path: Some(p), .. } => source_len(&data_root, p)?,
            _ => return Err(Failure::new("InvalidConfig", "content size unknown")),
        },
    };
    let layout = Layout::new(size, c.piece_size)
        .map_err(|e| Failure::new("InvalidConfig", e.to_string()))?;
    let authority = match &c.source {
        SourceConfig::Http { readers, .. } => {
            let ranges = split_ranges(&layout, readers.len() as u32);
            Authority::Readers(readers.iter().cloned().zip(ranges).collect())
        }
        SourceConfig::Node { node, .. } => Authority::Seeder(node.clone()),
    };
    let root = match c.root {
        Some(Digest::Blake3(b)) => Some(blake3::Hash::from_bytes(b)),
        _ => None,
    };
    let spec = FillSpec {
        id: c.id.clone(),
        layout,
        digest: c.digest,
        authority: authority.clone(),
        allowed: engine
            .allowed_of(&c.id)
            .unwrap_or_else(|| c.allowed_peers.iter().cloned().collect()),
        root,
        require_pin: inner.opts.require_pin,
    };
    let seed_path = match &c.source {
        SourceConfig::Node { node, path } if node == me => {
            Some(path.clone().unwrap_or(dest.clone()))
        }
        _ => None,
    };
    // Nothing at the destination is trusted by its size: only a seeder's
    // source is served as it is (it IS the source, and is hashed below).
    let store = match &seed_path {
        Some(p) if outside_root(&cfg.data_dir, p) => PieceStore::open_complete(p, layout),
        Some(p) => data_root
            .user_rel_of(p)
            .map_err(StoreError::from)
            .and_then(|rel| PieceStore::open_complete_in(&data_root, &rel, layout)),
        None => PieceStore::open_in_async(&data_root, &c.id, layout).await,
    }
    .map_err(|e| Failure::new(store_reason(&e), e.to_string()))?;
    let liar = cfg.fault == Some(Fault::CorruptUploads);
    let fill = Fill::new(spec, store, liar);
    if let Some(r) = run.root_pin() {
        fill.pin_root(r);
    }
    // Files already on disk (at the destination, or the previous version's
    // path) are reuse sources, piece by piece, once each piece verifies;
    // their pieces are held back from the network until tried.
    let reuse_files: Vec<Arc<std::fs::File>> = if seed_path.is_some() {
        Vec::new()
    } else {
        std::iter::once(dest.clone())
            .chain(
                c.reuse_from
                    .iter()
                    .filter_map(|p| dest_path(&cfg.data_dir, p).ok()),
            )
            .filter_map(|p| open_reuse_source(&data_root, &p).map(Arc::new))
            .collect()
    };
    if !reuse_files.is_empty() {
        fill.defer_for_reuse();
    }
    *run.fill.lock().unwrap_or_else(PoisonError::into_inner) = Some(fill.clone());
    run.set(Phase::Fetching, None, None);
    swarm.add_content(fill.clone());
    // The peer list may have changed while the content was being prepared.
    if let Some(allowed) = engine.allowed_of(&c.id) {
        swarm.set_allowed(&c.id, allowed);
    }

    if let Some(path) = seed_path {
        // A seeder: hash the file we hold, check it against the digest if
        // one was given, and against the pinned identity.
        info!(content = %c.id, path = %path.display(), "seeding a file");
        seed_hashes(&fill, me, 0..layout.piece_count())
            .await
            .map_err(|e| Failure::new(e.reason(), e.to_string()))?;
        fill.mark_all_held();
        if let Some(want) = c.digest {
            match content::digest_file(&path, want.algo()).await {
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
        let pin = wait_for_identity(run, &fill).await;
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
        return Ok(());
    }

    let _watchdog = {
        let (swarm, fill) = (swarm.clone(), fill.clone());
        AbortOnDrop(tokio::spawn(async move { swarm.watch_stalls(fill).await }))
    };
    let mut reuse_files = reuse_files;
    if trust_verified_file(&fill, me, &reuse_files).await {
        // Every hash is known: take the whole file before reading anything.
        reuse_pieces(
            fill.clone(),
            me.to_string(),
            std::mem::take(&mut reuse_files),
        )
        .await;
    }
    let _reuse = (!reuse_files.is_empty()).then(|| {
        let (fill, me) = (fill.clone(), me.to_string());
        AbortOnDrop(tokio::spawn(async move {
            reuse_pieces(fill, me, reuse_files).await
        }))
    });

    // Origin reader: re-hash what we already hold of our range (resume),
    // then read the rest.
    let mut origin_task = None;
    if let (Some(client), Authority::Readers(rs)) = (origin, &authority) {
        for (_, range) in rs.iter().filter(|(n, _)| n == me) {
            seed_hashes(&fill, me, range.clone())
                .await
                .map_err(|e| Failure::new(e.reason(), e.to_string()))?;
        }
        let mine: Vec<_> = rs
            .iter()
            .filter(|(n, _)| n == me)
            .map(|(_, r)| r.clone())
            .collect();
        if !mine.is_empty() {
            let (fill, me, limiter, metrics, run) = (
                fill.clone(),
                me.to_string(),
                inner.origin_limiter.clone(),
                metrics.clone(),
                run.clone(),
            );
            let concurrency = cfg.tuning.origin_concurrency;
            origin_task = Some(AbortOnDrop(tokio::spawn(async move {
                for range in mine {
                    with_origin_retry(&run, retry, Phase::Fetching, || {
                        read_origin_range(
                            fill.clone(),
                            me.clone(),
                            client.clone(),
                            range.clone(),
                            concurrency,
                            limiter.clone(),
                            metrics.clone(),
                        )
                    })
                    .await?;
                }
                Ok::<(), crate::swarm::OriginReadError>(())
            })));
        }
    }
    if let Some(mut task) = origin_task {
        let result = tokio::select! {
            r = &mut task.0 => r,
            _ = fill.wait_complete() => Ok(Ok(())),
            _ = run.origin_conflict.cancelled() => return Err(version_conflict(run)),
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if let crate::swarm::OriginReadError::Origin(oe) = e {
                    return Err(origin_failure(run, oe));
                }
                return Err(Failure::new(e.reason(), e.to_string()));
            }
            Err(e) => return Err(Failure::new("InternalError", e.to_string())),
        }
    }
    tokio::select! {
        _ = async {
            fill.wait_complete().await;
            wait_for_identity(run, &fill).await;
        } => {}
        _ = run.origin_conflict.cancelled() => return Err(version_conflict(run)),
    }
    match fill.finish(&dest).await {
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
async fn wait_for_identity(run: &ContentRun, fill: &Fill) -> Option<blake3::Hash> {
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

/// Whether a seed file lies outside the data root. Only the agent's own
/// config file (an administrator's choice) can name one: a Distribution's
/// node-source path is always joined beneath the root, where it is resolved
/// without following symlinks.
fn outside_root(data_dir: &Path, path: &Path) -> bool {
    !path.starts_with(data_dir)
}

/// Size of a node source's file, resolved beneath the data root: a symlink
/// anywhere on the way (which could lead out of the root) is refused.
fn source_len(root: &DataRoot, path: &Path) -> Result<u64, Failure> {
    let unreadable =
        |why: String| Failure::new("SourceUnreadable", format!("{}: {why}", path.display()));
    let rel = root
        .user_rel_of(path)
        .map_err(|e| unreadable(e.to_string()))?;
    match root.metadata(&rel).map_err(|e| unreadable(e.to_string()))? {
        Some(m) if m.is_file() => Ok(m.len),
        Some(_) => Err(unreadable(
            "not a regular file (symlinks are never followed)".into(),
        )),
        None => Err(unreadable("no such file".into())),
    }
}
