//! The peerfill node agent: a swarm engine that fills a node-local file from
//! an HTTP origin and from other agents over QUIC, verifying every piece.
//!
//! Data path, top-down: `origin` (HTTP range reads) → `content` (piece layout
//! and BLAKE3 verification) → `tree` (a directory as one content: a file
//! table, then its files) → `store` (partial file, bitmap, atomic rename) →
//! `wire` + `tls` (QUIC frames between mutually authenticated agents) →
//! `swarm` (who fetches which piece from whom) → `agent` (one process).

pub mod bufpool;
pub mod content;
pub mod fsroot;
pub mod metrics;
pub mod origin;
pub mod ratelimit;
pub mod retry;
pub mod store;
pub mod tls;
pub mod tree;

pub mod agent;
pub mod k8s;
pub mod logging;
pub mod swarm;
pub mod wire;
