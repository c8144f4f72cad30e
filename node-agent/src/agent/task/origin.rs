//! Phase 3 of an attempt, for an origin reader: it is the authority of the
//! piece hashes of its ranges, so it re-hashes what it already holds of them
//! (resume), then reads the rest from the origin over HTTP (in range
//! requests, or whole in one GET from an origin that ignores ranges), while
//! the swarm fetches everything else from peers. Transient origin failures are shown
//! in the status and retried when the engine retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::Retryable;
use tracing::{Instrument, info, warn};

use crate::content::PieceHash;
use crate::origin::manifest::{MAX_MANIFEST_BYTES, ManifestError, PieceManifest};
use crate::origin::{Origin, OriginClient, OriginError};
use crate::retry;
use crate::swarm::{
    Authority, Fill, OriginReadError, OriginRequests, read_origin_range, read_origin_whole,
    seed_hashes,
};

use super::super::engine::Engine;
use super::super::failure::{Failure, origin_failure, version_conflict};
use super::super::{Phase, SourceConfig};
use super::prepare::{headers as prepare_headers, origin_options};
use super::{AbortOnDrop, ContentRun};

/// The background task reading this node's ranges from the origin.
pub(super) type ReaderTask = AbortOnDrop<Result<(), OriginReadError>>;

/// For an origin reader: re-hashes what it holds of its ranges, then starts
/// reading the rest. `None` when this node reads nothing.
pub(super) async fn start_reader(
    run: &Arc<ContentRun>,
    engine: &Engine,
    fill: &Arc<Fill>,
    origin: Option<Origin>,
    authority: &Authority,
) -> Result<Option<ReaderTask>, Failure> {
    let (Some(client), Authority::Readers(rs)) = (origin, authority) else {
        return Ok(None);
    };
    let inner = &engine.inner;
    let me = inner.cfg.node.as_str();
    if let SourceConfig::Http {
        manifest_url: Some(url),
        headers,
        ..
    } = &run.cfg.source
    {
        let retry = inner.opts.retry_transient_origin;
        let hashes = with_origin_retry(run, retry, Phase::Fetching, || {
            fetch_manifest(engine, url, headers, fill)
        })
        .await
        .map_err(|e| origin_failure(run, e))?;
        let mine: Vec<(u32, PieceHash)> = rs
            .iter()
            .filter(|(n, _)| n == me)
            .flat_map(|(_, r)| r.clone())
            .filter_map(|p| Some((p, *hashes.get(p as usize)?)))
            .collect();
        info!(content = %run.cfg.id, pieces = mine.len(), "range hashes from the piece manifest");
        fill.own_hashes(me, &mine);
        // Pieces already on disk (the previous version) need no origin read.
        for (_, range) in rs.iter().filter(|(n, _)| n == me) {
            fill.reuse_settled(range.clone()).await;
        }
    }
    for (_, range) in rs.iter().filter(|(n, _)| n == me) {
        seed_hashes(fill, me, range.clone())
            .await
            .map_err(|e| Failure::new(e.reason(), e.to_string()))?;
    }
    let mine: Vec<_> = rs
        .iter()
        .filter(|(n, _)| n == me)
        .map(|(_, r)| r.clone())
        .collect();
    if mine.is_empty() {
        return Ok(None);
    }
    let (fill, me, limiter, metrics, run) = (
        fill.clone(),
        me.to_string(),
        inner
            .swarm
            .download_gate(&run.cfg.id)
            .with_origin(inner.origin_limiter.clone()),
        inner.metrics.clone(),
        run.clone(),
    );
    let retry = inner.opts.retry_transient_origin;
    let requests = OriginRequests {
        per_reader: inner.cfg.tuning.origin_concurrency,
        total: inner.cfg.tuning.origin_requests,
    };
    let whole = match (&client, &run.cfg.source) {
        (Origin::One(c), SourceConfig::Http { whole: true, .. }) => Some(c.clone()),
        (Origin::Tree(_), SourceConfig::Http { whole: true, .. }) => {
            return Err(Failure::new(
                "OriginNoRangeSupport",
                "a directory needs an origin that supports Range requests".to_string(),
            ));
        }
        _ => None,
    };
    let read = async move {
        if let Some(client) = whole {
            // One range, every piece: one streaming GET (`origin::whole`).
            return with_origin_retry(&run, retry, Phase::Fetching, || {
                read_origin_whole(
                    fill.clone(),
                    me.clone(),
                    client.clone(),
                    limiter.clone(),
                    metrics.clone(),
                )
            })
            .await;
        }
        for range in mine {
            with_origin_retry(&run, retry, Phase::Fetching, || {
                read_origin_range(
                    fill.clone(),
                    me.clone(),
                    client.clone(),
                    range.clone(),
                    requests,
                    limiter.clone(),
                    metrics.clone(),
                )
            })
            .await?;
        }
        Ok::<(), OriginReadError>(())
    };
    Ok(Some(AbortOnDrop(tokio::spawn(read.in_current_span()))))
}

/// The piece hashes of a content's piece manifest at `url`, read with the
/// content's headers; it must describe the content's layout exactly.
async fn fetch_manifest(
    engine: &Engine,
    url: &str,
    headers: &crate::agent::Headers,
    fill: &Fill,
) -> Result<Vec<PieceHash>, OriginError> {
    let client = OriginClient::new(url, prepare_headers(headers), origin_options(engine))?
        .with_metrics(engine.inner.metrics.clone());
    let len = client.content_length().await?;
    if len > MAX_MANIFEST_BYTES {
        return Err(OriginError::Manifest {
            url: client.display_url().to_string(),
            source: ManifestError::TooLarge(len),
        });
    }
    let body = client.fetch_range(0..len).await?;
    PieceManifest::hashes_for(&body, &fill.layout()).map_err(|source| OriginError::Manifest {
        url: client.display_url().to_string(),
        source,
    })
}

/// Waits until the reader has read its ranges or the content is complete
/// without it (the reader is then stopped), or the published origin version
/// turns out not to be the one it read.
pub(super) async fn await_reader(
    run: &ContentRun,
    fill: &Fill,
    mut task: ReaderTask,
) -> Result<(), Failure> {
    let result = tokio::select! {
        r = &mut task.0 => r,
        _ = fill.wait_complete() => Ok(Ok(())),
        _ = run.origin_conflict.cancelled() => return Err(version_conflict(run)),
    };
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(OriginReadError::Origin(oe))) => Err(origin_failure(run, oe)),
        Ok(Err(e)) => Err(Failure::new(e.reason(), e.to_string())),
        Err(e) => Err(Failure::new("InternalError", e.to_string())),
    }
}

/// Runs `op` until it succeeds; a transient origin failure is shown as
/// Failed with its reason and retried after a capped exponential backoff
/// when the engine retries (otherwise it is returned).
pub(super) async fn with_origin_retry<T, E, F, Fut>(
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
    let failed = AtomicBool::new(false);
    let result = op
        .retry(retry::ENGINE)
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
pub(super) trait OriginFailure: std::fmt::Display {
    fn transient(&self) -> bool;
    fn reason_str(&self) -> &'static str;
}

impl OriginFailure for OriginError {
    fn transient(&self) -> bool {
        self.is_transient()
    }
    fn reason_str(&self) -> &'static str {
        self.reason()
    }
}

impl OriginFailure for OriginReadError {
    fn transient(&self) -> bool {
        matches!(self, OriginReadError::Origin(e) if e.is_transient())
    }
    fn reason_str(&self) -> &'static str {
        self.reason()
    }
}
