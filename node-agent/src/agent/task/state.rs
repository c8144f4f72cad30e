//! The state one content task shares with the engine and the status writer:
//! the configuration, this attempt's fill, the outcome, the pins the
//! operator published and the origin version read.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::content::Digest;
use crate::origin::Origin;
use crate::swarm::Fill;

use super::super::{ContentConfig, Phase, SourceConfig};

pub(in crate::agent) struct Outcome {
    pub(in crate::agent) phase: Phase,
    pub(in crate::agent) reason: Option<String>,
    pub(in crate::agent) message: Option<String>,
}

pub(in crate::agent) struct ContentRun {
    pub(in crate::agent) cfg: ContentConfig,
    /// This agent's node name.
    pub(in crate::agent) node: String,
    pub(in crate::agent) fill: Mutex<Option<Arc<Fill>>>,
    pub(in crate::agent) outcome: Mutex<Outcome>,
    /// Received bytes at the last rate sample, and that rate.
    pub(in crate::agent) rate_mark: Mutex<(Instant, u64, f64)>,
    /// Woken on every change of phase, reason or size.
    pub(in crate::agent) changed: Arc<tokio::sync::Notify>,
    /// The pinned root and origin version, as the operator published them
    /// (the config's at first); applied to every attempt's fill and client.
    pub(in crate::agent) pins: Mutex<(Option<blake3::Hash>, Option<String>)>,
    /// This attempt's origin client (origin readers), for its version.
    pub(in crate::agent) origin: Mutex<Option<Origin>>,
    /// The file count of a directory content, once its table is known.
    pub(in crate::agent) files: Mutex<Option<u64>>,
    /// The version found when the origin changed (`OriginChanged`).
    pub(in crate::agent) origin_seen: Mutex<Option<String>>,
    /// Cancelled when the published origin version is not the one this
    /// reader read at: its pieces are of another version, so the content
    /// stops with `OriginChanged` (the operator then starts a new version).
    pub(in crate::agent) origin_conflict: CancellationToken,
}

impl ContentRun {
    pub(in crate::agent) fn new(
        cfg: ContentConfig,
        node: String,
        changed: Arc<tokio::sync::Notify>,
    ) -> Self {
        let root = match cfg.root {
            Some(Digest::Blake3(b)) => Some(blake3::Hash::from_bytes(b)),
            _ => None,
        };
        ContentRun {
            pins: Mutex::new((root, cfg.origin_version.clone())),
            origin: Mutex::new(None),
            origin_seen: Mutex::new(None),
            files: Mutex::new(None),
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
    pub(in crate::agent) fn set(
        &self,
        phase: Phase,
        reason: Option<&str>,
        message: Option<String>,
    ) {
        {
            let mut o = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
            o.phase = phase;
            o.reason = reason.map(str::to_string);
            o.message = message;
        }
        self.changed.notify_waiters();
    }
    pub(in crate::agent) fn phase(&self) -> Phase {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .phase
    }
    pub(in crate::agent) fn fill(&self) -> Option<Arc<Fill>> {
        self.fill
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    pub(in crate::agent) fn root_pin(&self) -> Option<blake3::Hash> {
        self.pins.lock().unwrap_or_else(PoisonError::into_inner).0
    }
    pub(in crate::agent) fn origin_pin(&self) -> Option<String> {
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .clone()
    }
    /// The origin version this node reads (or found changed), if any.
    pub(in crate::agent) fn origin_version(&self) -> Option<String> {
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
                .and_then(Origin::version)
        })
    }
    pub(in crate::agent) fn fail(&self, reason: &str, message: String) {
        error!(content = %self.cfg.id, reason, %message, "content failed");
        self.set(Phase::Failed, Some(reason), Some(message));
    }
    /// The node seeds this content from a file it already holds.
    pub(in crate::agent) fn seeds(&self) -> bool {
        matches!(&self.cfg.source, SourceConfig::Node { node, .. } if node == &self.node)
    }
}
