//! Bytes that enter the swarm: an origin reader fetching its range of pieces
//! over HTTP, or a seeder hashing the file it already holds. Both hash what
//! they read; those hashes are what the rest of the swarm verifies against
//! (see the trust model in `fill`).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use tracing::{debug, info};

use super::Fill;
use crate::content::{self, PieceHash};
use crate::metrics::{Metrics, Source};
use crate::origin::{OriginClient, OriginError};
use crate::ratelimit::RateLimiter;
use crate::store::StoreError;

/// Why reading the origin failed.
#[derive(Debug, thiserror::Error)]
pub enum OriginReadError {
    #[error("origin: {0}")]
    Origin(#[from] OriginError),
    #[error("storing piece {piece}: {source}")]
    Store {
        piece: u32,
        #[source]
        source: StoreError,
    },
    #[error("hashing task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl OriginReadError {
    /// CamelCase reason for status conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            OriginReadError::Origin(e) => e.reason(),
            OriginReadError::Store {
                source: StoreError::InsufficientSpace { .. },
                ..
            } => "InsufficientSpace",
            OriginReadError::Store { .. } => "StorageError",
            OriginReadError::Join(_) => "InternalError",
        }
    }
}

/// Hashes pieces we hold in `range` (resumed from disk, or a seeded file)
/// and publishes those hashes as our own. Reads one piece at a time.
pub async fn seed_hashes(
    fill: &Arc<Fill>,
    me: &str,
    range: Range<u32>,
) -> Result<u32, OriginReadError> {
    let layout = fill.layout();
    let end = range.end.min(layout.piece_count());
    let mut batch: Vec<(u32, PieceHash)> = Vec::new();
    let mut hashed = 0;
    for piece in range.start..end {
        if !fill.store.has(piece) {
            continue;
        }
        let data = fill
            .store
            .read_piece(piece)
            .await
            .map_err(|source| OriginReadError::Store { piece, source })?;
        let hash =
            tokio::task::spawn_blocking(move || content::piece_hash(&layout, piece, &data)).await?;
        batch.push((piece, hash));
        hashed += 1;
        if batch.len() >= 256 {
            fill.own_hashes(me, &batch);
            batch.clear();
        }
    }
    fill.own_hashes(me, &batch);
    Ok(hashed)
}

/// Reads the missing pieces of `range` from the origin with at most
/// `concurrency` requests at once, hashing, storing and announcing each as
/// soon as it arrives. Retries are the origin client's; an error here means
/// it gave up.
pub async fn read_origin_range(
    fill: Arc<Fill>,
    me: String,
    client: OriginClient,
    range: Range<u32>,
    concurrency: usize,
    limiter: RateLimiter,
    metrics: Metrics,
) -> Result<(), OriginReadError> {
    let layout = fill.layout();
    let missing: Vec<u32> = (range.start..range.end.min(layout.piece_count()))
        .filter(|p| !fill.store.has(*p))
        .collect();
    info!(content = %fill.spec.id, first = range.start, end = range.end, missing = missing.len(), "reading origin range");
    let results = futures::stream::iter(missing)
        .map(|piece| {
            let (fill, me, client, limiter, metrics) = (
                fill.clone(),
                me.clone(),
                client.clone(),
                limiter.clone(),
                metrics.clone(),
            );
            async move {
                // Taken meanwhile (reused from a verified file on disk).
                if fill.store.has(piece) {
                    return Ok(());
                }
                let bytes = layout.piece_range(piece);
                limiter.acquire(bytes.end - bytes.start).await;
                let data = client.fetch_range(bytes).await?;
                let len = data.len() as u64;
                metrics.received(Source::Origin, len);
                fill.stats
                    .bytes_from_origin
                    .fetch_add(len, Ordering::Relaxed);
                let hash = {
                    let data = data.clone();
                    tokio::task::spawn_blocking(move || content::piece_hash(&layout, piece, &data))
                        .await?
                };
                metrics.piece_verified();
                // Detached: a write must not be interrupted half-way.
                let f = fill.clone();
                tokio::spawn(
                    async move { f.store_verified(None, &me, piece, data, Some(hash)).await },
                )
                .await?
                .map_err(|source| OriginReadError::Store { piece, source })?;
                debug!(content = %fill.spec.id, piece, "piece read from origin");
                Ok::<(), OriginReadError>(())
            }
        })
        .buffer_unordered(concurrency.max(1));
    futures::pin_mut!(results);
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}
