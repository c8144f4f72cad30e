//! What each content's status says, and the status files: one small JSON
//! file per content, replaced atomically about twice a second, read by the
//! tests and the Kubernetes status reporter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::AgentError;
use super::engine::Engine;
use super::task::ContentRun;

/// Phase of one content on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Fetching,
    Complete,
    Failed,
}

/// What the status file of one content says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContentStatus {
    pub id: String,
    pub phase: Phase,
    /// CamelCase condition reason when failed.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    pub size: u64,
    /// Whether `size` is the content's (configured or learnt), not a
    /// placeholder.
    #[serde(default)]
    pub size_known: bool,
    /// Number of files, when the content is a directory whose file table
    /// this node knows.
    #[serde(default)]
    pub files: Option<u64>,
    pub piece_count: u32,
    pub pieces_done: u32,
    pub bytes_done: u64,
    pub bytes_from_origin: u64,
    pub bytes_from_peers: u64,
    pub bytes_sent: u64,
    /// Received bytes not used (endgame duplicates, rejected pieces).
    pub bytes_wasted: u64,
    /// Bytes per second received over the last interval.
    pub rate: f64,
    /// Pieces found on disk at start (resumed).
    pub resumed_pieces: u64,
    /// Pieces taken from files already on disk after verifying.
    #[serde(default)]
    pub reused_pieces: u64,
    /// BLAKE3 root (`blake3:<hex>`) of the complete piece-hash list, once
    /// every hash is known.
    #[serde(default)]
    pub root: Option<String>,
    /// Whether the root is pinned (Complete needs it where required).
    #[serde(default)]
    pub pinned: bool,
    /// The origin version this node reads at (origin readers), or found
    /// when the origin changed.
    #[serde(default)]
    pub origin_version: Option<String>,
    pub pieces_rejected: u64,
    /// Pieces rejected, by the node that sent them.
    pub rejected_from: BTreeMap<String, u64>,
    /// Nodes this agent banned.
    pub banned_peers: Vec<String>,
    pub connected_peers: Vec<String>,
    /// Unix time of this snapshot, in milliseconds.
    pub updated_at_ms: u64,
}

impl ContentStatus {
    /// Reads a status file.
    pub fn read(path: &Path) -> std::io::Result<ContentStatus> {
        let text = std::fs::read(path)?;
        serde_json::from_slice(&text).map_err(std::io::Error::other)
    }
}

/// Path of the status file of content `id` in `status_dir`.
pub fn status_path(status_dir: &Path, id: &str) -> PathBuf {
    status_dir.join(format!("{id}.json"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// Writes every content's status file and progress metrics.
pub(super) fn write_status_files(engine: &Engine) -> Result<(), AgentError> {
    let inner = &engine.inner;
    let runs: Vec<Arc<ContentRun>> = engine.contents().values().map(|r| r.run.clone()).collect();
    let banned = inner.swarm.banned();
    let connected = inner.swarm.connected();
    for run in runs {
        let st = snapshot(&run, &banned, &connected);
        if st.size > 0 {
            inner
                .metrics
                .set_progress(&st.id, st.bytes_done as f64 / st.size as f64);
        } else {
            inner.metrics.set_progress(&st.id, 1.0);
        }
        inner.metrics.set_rate(&st.id, st.rate);
        let path = status_path(&inner.status_dir, &st.id);
        let json = serde_json::to_vec_pretty(&st).unwrap_or_default();
        // A content removed meanwhile must not get its file back.
        if !engine.contents().contains_key(&st.id) {
            continue;
        }
        write_atomic(&path, &json).map_err(|source| AgentError::Status { path, source })?;
    }
    Ok(())
}

/// Writes the status files and progress metrics about twice a second.
pub(super) async fn status_loop(engine: Engine) {
    let stop = engine.inner.status_stop.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = write_status_files(&engine) {
            warn!(error = %e, "status writer failed");
        }
    }
}

pub(super) fn snapshot(run: &ContentRun, banned: &[String], connected: &[String]) -> ContentStatus {
    let (phase, reason, message) = {
        let o = run.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        (o.phase, o.reason.clone(), o.message.clone())
    };
    let mut st = ContentStatus {
        id: run.cfg.id.clone(),
        phase,
        reason,
        message,
        size: run.cfg.size.unwrap_or(0),
        size_known: run.cfg.size.is_some(),
        files: *run.files.lock().unwrap_or_else(PoisonError::into_inner),
        piece_count: 0,
        pieces_done: 0,
        bytes_done: 0,
        bytes_from_origin: 0,
        bytes_from_peers: 0,
        bytes_sent: 0,
        bytes_wasted: 0,
        rate: 0.0,
        resumed_pieces: 0,
        reused_pieces: 0,
        root: None,
        pinned: false,
        origin_version: run.origin_version(),
        pieces_rejected: 0,
        rejected_from: BTreeMap::new(),
        banned_peers: banned.to_vec(),
        connected_peers: connected.to_vec(),
        updated_at_ms: now_ms(),
    };
    if let Some(fill) = run.fill() {
        let s = &fill.stats;
        let layout = fill.layout();
        st.size = layout.size;
        st.size_known = true;
        st.piece_count = layout.piece_count();
        st.pieces_done = fill.pieces_done();
        st.bytes_done = fill.bytes_done();
        st.bytes_from_origin = s.bytes_from_origin.load(Ordering::Relaxed);
        st.bytes_from_peers = s.bytes_from_peers.load(Ordering::Relaxed);
        st.bytes_sent = s.bytes_sent.load(Ordering::Relaxed);
        st.bytes_wasted = s.bytes_wasted.load(Ordering::Relaxed);
        st.resumed_pieces = s.resumed_pieces.load(Ordering::Relaxed);
        st.reused_pieces = s.reused_pieces.load(Ordering::Relaxed);
        st.root = fill.content_digest().map(|d| d.to_string());
        st.pinned = fill.pinned_root().is_some();
        st.pieces_rejected = s.pieces_rejected.load(Ordering::Relaxed);
        st.rejected_from = fill.rejected_from();
        if phase == Phase::Fetching && st.message.is_none() {
            // Pieces are only fetched once their hash is known, and hashes
            // are signed by their authority and relayed by any peer: say
            // whose we wait for when no peer could relay them.
            let missing: Vec<String> = fill
                .pending_authorities()
                .into_iter()
                .filter(|n| n != &run.node && !connected.contains(n))
                .collect();
            if !missing.is_empty() && fill.session_nodes().is_empty() {
                st.message = Some(format!(
                    "waiting for piece hashes signed by {} (no peer to relay them)",
                    missing.join(", ")
                ));
            }
        }
        let received = st.bytes_from_origin + st.bytes_from_peers;
        let now = Instant::now();
        let mut mark = run.rate_mark.lock().unwrap_or_else(PoisonError::into_inner);
        let dt = now.duration_since(mark.0).as_secs_f64();
        // Rates over less than a quarter second are noise: callers that
        // sample more often get the last rate.
        if dt >= 0.25 {
            let rate = received.saturating_sub(mark.1) as f64 / dt;
            *mark = (now, received, rate);
        }
        st.rate = mark.2;
    }
    st
}
