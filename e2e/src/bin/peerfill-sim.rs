//! `peerfill-sim`: the swarm at thousands of nodes, simulated (see
//! `peerfill_e2e::sim`). `run` simulates one swarm and writes its JSON
//! report; `plot` draws time / T* against N and the uplink utilization of
//! several reports.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use peerfill_e2e::sim::{self, Config, Fairness, PeerChoice, Report, report};

#[derive(Debug, Parser)]
#[command(
    about = "The swarm at scale, simulated: the agent's picker and upload rule, the operator's peer choice, capped links"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FairnessArg {
    Exact,
    Local,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PeersArg {
    /// `choose_peers` as today: bounded lists plus authorities peered with all.
    Operator,
    /// `peer_graph` only: bounded lists for every node (hash lists relayed).
    Bounded,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Nodes are spread evenly over this many zones.
    #[arg(long, default_value_t = 3)]
    zones: usize,
    /// Content size, MiB.
    #[arg(long, default_value_t = 4096)]
    size_mib: u64,
    /// Piece size, KiB (0: auto_piece_size, about 4096 pieces).
    #[arg(long, default_value_t = 0)]
    piece_kib: u64,
    /// Every node's uplink and downlink and the origin's uplink, Mbit/s.
    #[arg(long, default_value_t = 1000.0)]
    link_mbit: f64,
    /// The origin's uplink, Mbit/s (default: --link-mbit).
    #[arg(long)]
    origin_mbit: Option<f64>,
    /// Each directed link between two zones, Mbit/s.
    #[arg(long, default_value_t = 5000.0)]
    cross_zone_mbit: f64,
    /// Round trip between any two hosts, ms.
    #[arg(long, default_value_t = 1.0)]
    rtt_ms: f64,
    /// Origin readers (strategy.maxOriginConnections).
    #[arg(long)]
    readers: Option<usize>,
    #[arg(long, value_enum, default_value_t = FairnessArg::Local)]
    fairness: FairnessArg,
    #[arg(long, value_enum, default_value_t = PeersArg::Operator)]
    peers: PeersArg,
    /// A/B: do not tell the agents their peers' zones (the picker is then
    /// zone-blind, as in a cluster without zone labels).
    #[arg(long)]
    zone_blind: bool,
    /// A/B of the agent's download byte budget, MiB (default: `DOWNLOAD_BUFFER_BYTES`).
    #[arg(long)]
    download_budget_mib: Option<u64>,
    /// A/B of the agent's upload byte budget, MiB (default: `UPLOAD_BUFFER_BYTES`).
    #[arg(long)]
    upload_budget_mib: Option<u64>,
    /// A/B of the agent's upload slots (default: `Tuning::upload_slots`).
    #[arg(long)]
    upload_slots: Option<usize>,
    /// A/B of the agent's pieces downloading at once (default: `Tuning::max_inflight`).
    #[arg(long)]
    max_inflight: Option<usize>,
    /// A/B of the agent's requests outstanding per peer (default: `Tuning::pipeline`).
    #[arg(long)]
    pipeline: Option<usize>,
    /// A/B of an origin reader's range requests in flight, at most (default: `Tuning::origin_concurrency`).
    #[arg(long)]
    origin_concurrency: Option<usize>,
    /// A/B of the origin readers' range requests in flight together, at most (default: `Tuning::origin_requests`).
    #[arg(long)]
    origin_requests: Option<usize>,
    /// Payload share of a peer link's cap (e.g. 0.904: QUIC as measured on the netbench).
    #[arg(long, default_value_t = 1.0)]
    peer_efficiency: f64,
    /// Payload share of the origin link's cap (e.g. 0.956: HTTP over TCP).
    #[arg(long, default_value_t = 1.0)]
    origin_efficiency: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Simulated seconds after which the run fails (default: 50 T* + 60 s).
    #[arg(long)]
    limit_secs: Option<f64>,
    /// Report path (default: sim-<nodes>.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One run; prints progress and a summary line, writes the JSON report.
    Run(Box<RunArgs>),
    /// Plots reports: time / T* against N, and uplink utilization.
    Plot {
        /// Directory of the PNGs (sim-ratio.png, sim-utilization.png).
        #[arg(long, default_value = "docs/bench")]
        out_dir: PathBuf,
        reports: Vec<PathBuf>,
    },
}

const MBIT: f64 = 1e6 / 8.0;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Args::parse().command {
        Command::Run(args) => {
            let RunArgs {
                nodes,
                zones,
                size_mib,
                piece_kib,
                link_mbit,
                origin_mbit,
                cross_zone_mbit,
                rtt_ms,
                readers,
                fairness,
                peers,
                zone_blind,
                download_budget_mib,
                upload_budget_mib,
                upload_slots,
                max_inflight,
                pipeline,
                origin_concurrency,
                origin_requests,
                peer_efficiency,
                origin_efficiency,
                seed,
                limit_secs,
                out,
            } = *args;
            let mut cfg = Config::new(
                nodes,
                zones,
                size_mib << 20,
                link_mbit * MBIT,
                cross_zone_mbit * MBIT,
            );
            cfg.piece_size = piece_kib << 10;
            cfg.origin = origin_mbit.unwrap_or(link_mbit) * MBIT;
            cfg.rtt = rtt_ms / 1000.0;
            if let Some(r) = readers {
                cfg.readers = r;
            }
            cfg.fairness = match fairness {
                FairnessArg::Exact => Fairness::Exact,
                FairnessArg::Local => Fairness::Local,
            };
            cfg.peers = match peers {
                PeersArg::Operator => PeerChoice::Operator,
                PeersArg::Bounded => PeerChoice::Bounded,
            };
            cfg.zone_blind = zone_blind;
            if let Some(b) = download_budget_mib {
                cfg.download_budget = b << 20;
            }
            if let Some(b) = upload_budget_mib {
                cfg.upload_budget = b << 20;
            }
            cfg.upload_slots = upload_slots.unwrap_or(cfg.upload_slots);
            cfg.max_inflight = max_inflight.unwrap_or(cfg.max_inflight);
            cfg.pipeline = pipeline.unwrap_or(cfg.pipeline);
            cfg.origin_concurrency = origin_concurrency.unwrap_or(cfg.origin_concurrency);
            cfg.origin_requests = origin_requests.unwrap_or(cfg.origin_requests);
            cfg.peer_efficiency = peer_efficiency;
            cfg.origin_efficiency = origin_efficiency;
            cfg.seed = seed;
            cfg.limit_secs = limit_secs.unwrap_or(0.0);
            let bound = report::kumar_ross_secs(&cfg);
            eprintln!(
                "simulating N = {nodes} in {zones} zone(s), {size_mib} MiB, piece {} KiB, T* = {bound:.1} s",
                cfg.effective_piece_size() >> 10
            );
            let started = std::time::Instant::now();
            let mut shown = started;
            // A line every 5 s of wall time: bounded output, visible progress.
            let report = sim::run(&cfg, |t, done, flows| {
                if shown.elapsed().as_secs_f64() >= 5.0 {
                    shown = std::time::Instant::now();
                    eprintln!(
                        "  simulated {t:.1} s ({:.2} T*): {done}/{nodes} complete, {flows} flows, wall {:.0} s",
                        t / bound,
                        started.elapsed().as_secs_f64()
                    );
                }
            })?;
            println!("{}", report.summary());
            let out = out.unwrap_or_else(|| PathBuf::from(format!("sim-{nodes}.json")));
            report.write(&out)?;
            println!("report: {}", out.display());
        }
        Command::Plot { out_dir, reports } => {
            let reports: Vec<Report> = reports
                .iter()
                .map(|p| Report::read(p))
                .collect::<Result<_, _>>()?;
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let ratio = out_dir.join("sim-ratio.png");
            report::plot_ratio(&ratio, &reports)?;
            let util = out_dir.join("sim-utilization.png");
            report::plot_utilization(&util, &reports)?;
            println!("wrote {} and {}", ratio.display(), util.display());
        }
    }
    Ok(())
}
