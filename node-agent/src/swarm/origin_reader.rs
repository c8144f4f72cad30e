//! Bytes that enter the swarm: an origin reader fetching its range of pieces
//! over HTTP, or a seeder hashing the file it already holds. Both hash what
//! they read; those hashes are what the rest of the swarm verifies against
//! (see the trust model in `fill`).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tracing::{debug, info, warn};

use super::{DownloadGate, Fill};
use crate::content::{self, PieceHash};
use crate::metrics::{Metrics, Source};
use crate::origin::{Origin, OriginClient, OriginError};
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

/// Reads the missing pieces of `range` from the origin with this reader's
/// share of `requests` at once (more once other readers finished, see
/// [`OriginRequests::per_reader`]), hashing, storing and announcing each as soon as
/// it arrives. The first piece goes alone: an origin that ignores Range
/// answers it with the whole body, and one such answer is dropped, not
/// several. Retries are the origin client's; an error here means it gave
/// up.
pub async fn read_origin_range(
    fill: Arc<Fill>,
    me: String,
    client: Origin,
    range: Range<u32>,
    requests: OriginRequests,
    limiter: DownloadGate,
    metrics: Metrics,
) -> Result<(), OriginReadError> {
    let layout = fill.layout();
    let missing: Vec<u32> = (range.start..range.end.min(layout.piece_count()))
        .filter(|p| !fill.store.has(*p))
        .collect();
    info!(content = %fill.spec.id, first = range.start, end = range.end, missing = missing.len(), "reading origin range");
    let read = |piece: u32| {
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
            // A hash already trusted for this piece (a piece manifest, or
            // our own earlier read) must be what the origin sends now.
            if fill.hash(piece).is_some_and(|known| known != hash) {
                return Err(OriginError::ManifestMismatch {
                    url: client.display_url(),
                    piece,
                }
                .into());
            }
            metrics.piece_verified();
            // Detached: a write must not be interrupted half-way.
            let f = fill.clone();
            tokio::spawn(async move { f.store_verified(None, &me, piece, data, Some(hash)).await })
                .await?
                .map_err(|source| OriginReadError::Store { piece, source })?;
            debug!(content = %fill.spec.id, piece, "piece read from origin");
            Ok::<(), OriginReadError>(())
        }
    };
    let Some((&first, rest)) = missing.split_first() else {
        return Ok(());
    };
    // Readers learn their hashes by reading, so the hashes still missing
    // tell who still reads. With a piece manifest every reader publishes
    // its range's hashes before it reads (ours are known already): they
    // tell nothing, and the reader keeps its first share.
    let others_tell = fill.hash(first).is_none();
    read(first).await?;
    let mut next = rest.iter().copied();
    let mut running = FuturesUnordered::new();
    let readers = fill.spec.authority.node_count();
    let mut limit = requests.per_reader(readers, readers);
    // Looking for the readers still reading scans every piece's hash under
    // the fill's lock: once a second is soon enough.
    let mut looked: Option<Instant> = None;
    loop {
        if others_tell && looked.is_none_or(|t| t.elapsed() >= READERS_LOOK_INTERVAL) {
            looked = Some(Instant::now());
            // A reader's hashes spread as it reads: the authorities whose
            // hashes we still miss are the readers still reading.
            let reading = fill.pending_authorities().len();
            limit = requests.per_reader(readers, reading);
        }
        while running.len() < limit {
            let Some(piece) = next.next() else { break };
            running.push(read(piece));
        }
        match running.next().await {
            Some(r) => r?,
            None => return Ok(()),
        }
    }
}

/// How often a reader looks which other readers still read.
const READERS_LOOK_INTERVAL: Duration = Duration::from_secs(1);

/// How many range requests the origin readers of one content keep in flight
/// (`Tuning::origin_concurrency`, `Tuning::origin_requests`).
#[derive(Debug, Clone, Copy)]
pub struct OriginRequests {
    /// At most, per reader, while every reader reads.
    pub per_reader: usize,
    /// At most, all readers together.
    pub total: usize,
}

impl OriginRequests {
    /// Range requests one reader keeps in flight: its share of what the
    /// `readers` keep together, taken over by those still `reading` as the
    /// others finish, so that they keep the origin's link full. Without
    /// taking over, the origin link idled at the end of a run while the
    /// slowest reader read the rest of its range (measured on the netbench,
    /// N = 16 at 20 Mbit/s: the origin at 37-82 % of its cap for the last
    /// 6 s). The origin never sees more requests at once than at the start:
    /// `min(per_reader x readers, total)`, or one per reader if that is more.
    pub fn per_reader(self, readers: usize, reading: usize) -> usize {
        let readers = readers.max(1);
        let together = self.total.min(self.per_reader.saturating_mul(readers));
        together.div_ceil(reading.clamp(1, readers)).max(1)
    }
}

/// Reads the whole content in one streaming GET from an origin that ignores
/// Range requests (see `origin::whole`); this reader is then the authority
/// of every piece. Each piece is hashed and stored as soon as its last byte
/// arrives; pieces already held are read past. A failure half-way starts
/// the body over (the origin cannot resume), with the client's retry policy
/// for transient failures.
pub async fn read_origin_whole(
    fill: Arc<Fill>,
    me: String,
    client: OriginClient,
    limiter: DownloadGate,
    metrics: Metrics,
) -> Result<(), OriginReadError> {
    use backon::Retryable;
    info!(content = %fill.spec.id, size = fill.layout().size, "reading the whole content from an origin without Range support");
    (|| read_whole_once(&fill, &me, &client, &limiter, &metrics))
        .retry(client.retry_policy())
        .sleep(tokio::time::sleep)
        .when(|e: &OriginReadError| matches!(e, OriginReadError::Origin(e) if e.is_transient()))
        .notify(|e: &OriginReadError, wait| {
            warn!(content = %fill.spec.id, error = %e, retry_in = ?wait, "whole-content read failed; reading it again");
        })
        .await
}

async fn read_whole_once(
    fill: &Arc<Fill>,
    me: &str,
    client: &OriginClient,
    limiter: &DownloadGate,
    metrics: &Metrics,
) -> Result<(), OriginReadError> {
    let layout = fill.layout();
    let mut body = client.open_whole(layout.size).await?;
    let mut buf = BytesMut::new();
    for piece in 0..layout.piece_count() {
        let len = layout.piece_len(piece) as usize;
        limiter.acquire(len as u64).await;
        while buf.len() < len {
            match body.next_chunk().await? {
                Some(chunk) => buf.extend_from_slice(&chunk),
                // The body checks its length: it cannot end before `size`.
                None => break,
            }
        }
        if buf.len() < len {
            return Err(OriginError::WrongLength {
                url: client.display_url().to_string(),
                expected: layout.size,
                got: layout.piece_range(piece).start + buf.len() as u64,
            }
            .into());
        }
        let data = buf.split_to(len).freeze();
        metrics.received(Source::Origin, len as u64);
        fill.stats
            .bytes_from_origin
            .fetch_add(len as u64, Ordering::Relaxed);
        if fill.store.has(piece) {
            continue;
        }
        let hash = {
            let data = data.clone();
            tokio::task::spawn_blocking(move || content::piece_hash(&layout, piece, &data)).await?
        };
        metrics.piece_verified();
        // Detached: a write must not be interrupted half-way.
        let (f, me) = (fill.clone(), me.to_string());
        tokio::spawn(async move { f.store_verified(None, &me, piece, data, Some(hash)).await })
            .await?
            .map_err(|source| OriginReadError::Store { piece, source })?;
    }
    // Nothing may follow the last piece.
    if body.next_chunk().await?.is_some() || !buf.is_empty() {
        return Err(OriginError::WrongLength {
            url: client.display_url().to_string(),
            expected: layout.size,
            got: layout.size + buf.len() as u64,
        }
        .into());
    }
    debug!(content = %fill.spec.id, "whole content read from the origin");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::OriginRequests;

    const TODAY: OriginRequests = OriginRequests {
        per_reader: 4,
        total: 16,
    };

    #[test]
    fn readers_left_take_over_the_finished_readers_requests() {
        // Four readers: four each, 16 at the origin throughout.
        assert_eq!(TODAY.per_reader(4, 4), 4);
        assert_eq!(TODAY.per_reader(4, 3), 6);
        assert_eq!(TODAY.per_reader(4, 2), 8);
        assert_eq!(TODAY.per_reader(4, 1), 16);
        // Counted as reading: this reader itself, even if its hashes are in.
        assert_eq!(TODAY.per_reader(4, 0), 16);
        // Few readers keep four each: one reader never opens 16.
        assert_eq!(TODAY.per_reader(1, 1), 4);
        assert_eq!(TODAY.per_reader(2, 2), 4);
        assert_eq!(TODAY.per_reader(2, 1), 8);
    }

    #[test]
    fn many_readers_share_the_origins_requests() {
        // Sixteen readers (the default): one each, two once half are done.
        assert_eq!(TODAY.per_reader(16, 16), 1);
        assert_eq!(TODAY.per_reader(16, 8), 2);
        assert_eq!(TODAY.per_reader(8, 8), 2);
        // More readers than requests: still one each.
        assert_eq!(TODAY.per_reader(64, 64), 1);
        let none = OriginRequests {
            per_reader: 0,
            total: 0,
        };
        assert_eq!(none.per_reader(0, 0), 1);
    }
}
