//! One agent process: its configuration, the contents it fills or seeds,
//! and the status it reports.
//!
//! # Design
//!
//! The agent is a swarm [`Engine`] holding a changing set of contents. A
//! standalone agent ([`run`]) feeds it from a JSON or YAML config file; the
//! Kubernetes agent (`crate::k8s`) from its NodeFill. Either way each
//! content becomes one long-lived *content task* (`task`), which walks the
//! data path top-down, one attempt at a time:
//!
//! 1. **identity**: resolve the destination beneath the data root, learn
//!    the size (configured, or the origin's length), derive the piece
//!    layout, who is the authority of which piece hashes (the origin
//!    readers' ranges, or the seeding node), open the piece store and apply
//!    the pinned root and origin version the operator published;
//! 2. **reuse**: files already on disk (the destination, a previous
//!    version's file) give up every piece that verifies against a trusted
//!    hash, instead of the network;
//! 3. **origin or seed**: a seeder hashes the file it holds; an origin
//!    reader reads its disjoint ranges over HTTP, hashing each piece as the
//!    authority of those hashes;
//! 4. **swarm fill**: every other piece comes from peers over QUIC, each
//!    verified with BLAKE3 against its authority's hash before it reaches
//!    the disk (`crate::swarm`);
//! 5. **finish**: once every piece is held (and the root is pinned where
//!    required) the partial file is swapped in at the destination.
//!
//! A failed attempt is classified (`failure`): a fault of this node (disk
//! full, I/O error) or a transient origin failure is retried with the one
//! backoff policy of [`crate::retry`] in a long-running agent; anything else
//! fails the content, which the status shows.
//!
//! Status (`status`): one small JSON file per content in the status
//! directory, replaced atomically about twice a second, so tests and the
//! Kubernetes status reporter can follow progress without talking to the
//! process.

mod config;
mod contents;
mod engine;
mod failure;
mod status;
mod task;

use std::collections::BTreeMap;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::tls::NodeIdentity;

pub use crate::swarm::ContentCaps;
pub use config::{
    ALLOW_FAULTS_ENV, AgentConfig, AgentError, ContentConfig, Headers, HttpFile, IdentityFiles,
    Limits, PeerConfig, STATUS_DIR, SourceConfig, Tuning, dest_path, faults_allowed,
};
pub use contents::ContentOpError;
pub use engine::{Engine, EngineOptions};
pub use failure::is_local_fault;
pub use status::{ContentStatus, Phase, status_path};

/// Final phase of each content when [`run`] returns.
pub type Summary = BTreeMap<String, Phase>;

/// Runs an agent until every content is complete or failed (or, with
/// `stay`, until `shutdown`). Returns the final phase of each content.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<Summary, AgentError> {
    cfg.validate()?;
    if cfg.fault.is_some() && !faults_allowed() {
        return Err(AgentError::Invalid(format!(
            "fault injection (fault: {:?}) is a test mode; it needs {ALLOW_FAULTS_ENV}=1",
            cfg.fault
        )));
    }
    let identity = NodeIdentity::load(&cfg.identity.cert, &cfg.identity.key, &cfg.identity.ca)?;
    let engine = Engine::start(
        &cfg,
        &identity,
        EngineOptions {
            allow_private_origins: cfg.allow_private_origins,
            ..EngineOptions::default()
        },
    )?;
    for c in &cfg.contents {
        engine.add(c.clone()).map_err(|e| match e {
            ContentOpError::Invalid(e) => e,
            other => AgentError::Invalid(other.to_string()),
        })?;
    }
    // Content tasks end when their content is complete or failed.
    tokio::select! {
        _ = engine.wait_idle() => {
            info!("every content is complete or failed");
            if cfg.stay {
                shutdown.cancelled().await;
            }
        }
        _ = shutdown.cancelled() => {}
    }
    let summary = engine.summary();
    engine.shutdown().await;
    Ok(summary)
}
