//! `peerfill-agent node`: the agent as a Kubernetes DaemonSet pod.
//!
//! It watches only its own NodeFill (same name as its Node), obtains its
//! certificate from the operator's cluster CA through that object (see
//! [`identity`]), runs the swarm engine for every assignment of the spec
//! (see [`translate`]), reports progress in the status within the write
//! budget (see [`report`]), and labels its Node for every distribution it
//! holds completely. The contract is docs/control-path.md.
//!
//! Read top-down:
//! - `run`: [`run_node`], the wiring: metrics and health, the NodeFill
//!   watch (`watch`), the certificate (`enroll`), the engine, then one loop
//!   that reacts to spec changes, engine changes and the report schedule;
//! - `reconcile`: the NodeFill spec → engine contents (new versions,
//!   restarts, peers, pins, unassignment and cleanup after a restart);
//! - `labels`: the Node labels of complete distributions;
//! - `reporter`: the NodeFill status (schedule in [`report`]);
//! - `events`: Warning Event series on the NodeFill.

pub mod headers;
pub mod identity;
pub mod manifest;
pub mod report;
pub mod translate;

mod enroll;
mod events;
mod labels;
mod reconcile;
mod reporter;
mod run;
mod watch;
mod zones;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::agent::AgentError;
use crate::tls::TlsError;
use identity::IdentityError;

pub use run::run_node;

/// Version written into `status.agentVersion`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Node label holding the zone, by default.
pub const DEFAULT_ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// How the node agent was started (`peerfill-agent node ...`, the chart's
/// contract in charts/peerfill/README.md).
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// This node's name (its Node and NodeFill are named so).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where contents are written (a hostPath); never left.
    #[arg(long)]
    pub data_root: PathBuf,
    /// QUIC listen address.
    #[arg(long, default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// Address of `/metrics` and `/healthz`.
    #[arg(long, default_value = "0.0.0.0:9464")]
    pub metrics: SocketAddr,
    /// Directory of the node key and certificate (an in-memory volume).
    #[arg(long)]
    pub identity_dir: PathBuf,
    /// `host:port` other agents dial (default: the listen address, with
    /// POD_IP for 0.0.0.0).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Node label that holds the node's zone.
    #[arg(long, default_value = DEFAULT_ZONE_LABEL)]
    pub zone_label: String,
    /// Allow origins on loopback, link-local and metadata addresses (and
    /// redirects to them). Refused by default: an origin URL must not reach
    /// the node's own services or the cloud metadata endpoint.
    #[arg(long)]
    pub allow_private_origins: bool,
    /// Node-wide download limit in bytes per second, over every
    /// distribution, peers and origin; served by priority (unset:
    /// unlimited). Each distribution's own cap applies within it.
    #[arg(long)]
    pub max_download_bytes_per_second: Option<u64>,
    /// Node-wide upload limit in bytes per second, over every distribution;
    /// served by priority (unset: unlimited).
    #[arg(long)]
    pub max_upload_bytes_per_second: Option<u64>,
    /// The pod's IP (from the downward API), advertised when listening on
    /// 0.0.0.0.
    #[arg(long, env = "POD_IP", hide = true)]
    pub pod_ip: Option<IpAddr>,
}

/// Errors that stop the node agent.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid arguments: {0}")]
    Args(String),
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("node identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}
