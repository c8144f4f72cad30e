//! `peerfill-sim`: the swarm at thousands of nodes, simulated (issue 13,
//! item 4). A discrete-event simulation that runs the agent's own piece
//! picker (`peerfill_agent::swarm::picker`) and upload admission rule
//! (`peerfill_agent::swarm::uploads`) on every node, with the agent's
//! constants (upload slots and byte budget, requests in flight, pipeline
//! per peer, origin range requests in flight, refusal backoff), over the
//! operator's own choice of origin readers, their ranges and every node's
//! peers (`peerfill_operator::plan`, `peerfill_operator::peers`).
//!
//! - [`net`]: capped links and max-min fair flows (the fluid model);
//! - [`topology`]: node names, zones, readers and peer lists, from the
//!   operator's functions;
//! - [`swarm`]: the agents' behaviour as events;
//! - [`report`]: time / T*, origin copies, cross-zone bytes, utilization,
//!   the JSON report and the plots.
//!
//! What it does not model (so its times are a floor for the real agent on
//! the same links): CPU, disks, packet loss, congestion-control ramps, the
//! control plane's delays (assignment, size pinning), failures. Wire
//! overhead can be given as link efficiencies (payload share of the cap).

pub mod net;
pub mod report;
pub mod swarm;
pub mod topology;

use peerfill_crds::validation::{AUTO_PIECES, MAX_ORIGIN_CONNECTIONS_DEFAULT, auto_piece_size};
use serde::{Deserialize, Serialize};

pub use net::Fairness;
pub use report::Report;
pub use topology::PeerChoice;

/// Errors of a simulation run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("building the topology: {0}")]
    Topology(String),
    #[error("no event left at {at:.3} s with {done} of {nodes} nodes complete")]
    Stuck { at: f64, done: usize, nodes: usize },
    #[error("simulated time passed {limit:.0} s with {done} of {nodes} nodes complete")]
    Limit {
        limit: f64,
        done: usize,
        nodes: usize,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("plot {path}: {reason}")]
    Plot { path: String, reason: String },
    #[error("report {path}: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One simulation: the swarm, its links and the agent's constants. Rates
/// are bytes per second of the links' caps (wire), times are seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub nodes: usize,
    pub zones: usize,
    /// Content size, bytes.
    pub size: u64,
    /// Piece size; 0: the agent's and operator's `auto_piece_size`.
    pub piece_size: u64,
    pub node_up: f64,
    pub node_down: f64,
    /// The origin's uplink.
    pub origin: f64,
    /// Each directed link between two zones (aggregate of every flow from
    /// one zone to the other).
    pub cross_zone: f64,
    /// Round trip between any two hosts (origin included).
    pub rtt: f64,
    /// `strategy.maxOriginConnections` (origin readers).
    pub readers: usize,
    /// Range requests in flight per reader, at most
    /// (`Tuning::origin_concurrency`).
    pub origin_concurrency: usize,
    /// Range requests in flight of all readers together, at most
    /// (`Tuning::origin_requests`; each reader's share is the agent's
    /// `OriginRequests::per_reader`).
    pub origin_requests: usize,
    /// Pieces being downloaded at once per node (`Tuning::max_inflight`).
    pub max_inflight: usize,
    /// Requests outstanding per peer, at most (`Tuning::pipeline`; fewer
    /// with many peers, `swarm::pipeline_for`).
    pub pipeline: usize,
    /// `Tuning::upload_slots`.
    pub upload_slots: usize,
    /// `swarm::DOWNLOAD_BUFFER_BYTES`.
    pub download_budget: u64,
    /// `swarm::UPLOAD_BUFFER_BYTES`.
    pub upload_budget: u64,
    pub fairness: Fairness,
    pub peers: PeerChoice,
    /// A/B switch of the agent's zone rule: the agents are not told their
    /// peers' zones (as without zone labels), so the picker is zone-blind.
    #[serde(default)]
    pub zone_blind: bool,
    /// Payload share of a peer link's cap (QUIC headers, acks).
    pub peer_efficiency: f64,
    /// Payload share of the origin link's cap (HTTP over TCP).
    pub origin_efficiency: f64,
    pub seed: u64,
    /// Simulated seconds after which the run fails.
    pub limit_secs: f64,
}

impl Config {
    /// `nodes` nodes in `zones` zones with the agent's defaults, all links
    /// at `link` bytes/s, the cross-zone links at `cross_zone`.
    pub fn new(nodes: usize, zones: usize, size: u64, link: f64, cross_zone: f64) -> Self {
        let tuning = peerfill_agent::agent::Tuning::default();
        Config {
            nodes,
            zones,
            size,
            piece_size: 0,
            node_up: link,
            node_down: link,
            origin: link,
            cross_zone,
            rtt: 0.001,
            readers: MAX_ORIGIN_CONNECTIONS_DEFAULT as usize,
            origin_concurrency: tuning.origin_concurrency,
            origin_requests: tuning.origin_requests,
            max_inflight: tuning.max_inflight,
            pipeline: tuning.pipeline,
            upload_slots: tuning.upload_slots,
            download_budget: peerfill_agent::swarm::DOWNLOAD_BUFFER_BYTES,
            upload_budget: peerfill_agent::swarm::UPLOAD_BUFFER_BYTES,
            fairness: Fairness::Local,
            peers: PeerChoice::Operator,
            zone_blind: false,
            peer_efficiency: 1.0,
            origin_efficiency: 1.0,
            seed: 1,
            limit_secs: 0.0,
        }
    }

    /// The piece size the agent and operator use for this content.
    pub fn effective_piece_size(&self) -> u64 {
        if self.piece_size > 0 {
            self.piece_size
        } else {
            auto_piece_size(self.size)
        }
    }

    fn check(&self) -> Result<(), SimError> {
        let bad = |m: &str| Err(SimError::Config(m.to_string()));
        if self.nodes < 2 {
            return bad("at least 2 nodes");
        }
        if self.size == 0 {
            return bad("size must be positive");
        }
        let rates = [self.node_up, self.node_down, self.origin, self.cross_zone];
        if rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            return bad("every link rate must be positive");
        }
        let effs = [self.peer_efficiency, self.origin_efficiency];
        if effs.iter().any(|e| !(*e > 0.0 && *e <= 1.0)) {
            return bad("efficiencies must be in (0, 1]");
        }
        if !(self.rtt >= 0.0 && self.rtt.is_finite()) {
            return bad("rtt must be >= 0");
        }
        if self.size.div_ceil(self.effective_piece_size()) > 64 * AUTO_PIECES {
            return bad("more than 65,536 pieces");
        }
        Ok(())
    }
}

/// Runs one simulation; `progress(sim_secs, nodes_done, flows)` is called
/// about once per simulated second.
pub fn run(cfg: &Config, progress: impl FnMut(f64, usize, usize)) -> Result<Report, SimError> {
    cfg.check()?;
    let piece_size = cfg.effective_piece_size();
    let pieces = u32::try_from(cfg.size.div_ceil(piece_size))
        .map_err(|_| SimError::Config("too many pieces".into()))?;
    let topo = topology::build(
        cfg.nodes,
        cfg.zones,
        pieces,
        piece_size,
        cfg.readers,
        cfg.peers,
    )?;
    let mut cfg = cfg.clone();
    let bound = report::kumar_ross_secs(&cfg);
    if cfg.limit_secs <= 0.0 {
        // Far beyond any sane schedule, yet bounded.
        cfg.limit_secs = 50.0 * bound + 60.0;
    }
    let started = std::time::Instant::now();
    let outcome = swarm::Sim::new(&cfg, &topo, pieces, piece_size).run(progress)?;
    Ok(Report::new(
        &cfg,
        &topo,
        piece_size,
        &outcome,
        started.elapsed().as_secs_f64(),
    ))
}
