//! `peerfill-scale`: the control plane at 1,000-5,000 nodes on one machine
//! (the API stand-in in-process, the real operator, simulated agents; see
//! `peerfill_e2e::scale`). `run` measures one node count and writes its
//! JSON report; `plot` draws BENCHMARKS.md's charts from several reports.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use peerfill_e2e::scale::{self, Options, Report, fluid::Caps};

#[derive(Debug, Parser)]
#[command(
    about = "Control plane at thousands of nodes: real operator, API stand-in, simulated agents"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One run; prints a summary line and writes the JSON report.
    Run {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// 1-3 (two from an HTTP origin, the third from a node source).
        #[arg(long, default_value_t = 3)]
        distributions: usize,
        /// Content size of each Distribution, MiB.
        #[arg(long, default_value_t = 2048)]
        size_mib: u64,
        /// Per-node down and up caps, MiB/s.
        #[arg(long, default_value_t = 100.0)]
        node_mib_s: f64,
        /// Origin cap per Distribution, MiB/s.
        #[arg(long, default_value_t = 200.0)]
        origin_mib_s: f64,
        /// Seconds over which the agents start (default: nodes / 100).
        #[arg(long)]
        ramp_secs: Option<u64>,
        /// Longest the measured phase may take, seconds.
        #[arg(long, default_value_t = 300)]
        limit_secs: u64,
        /// Report path (default: scale-<nodes>.json).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Work dir (kubeconfig, operator log); default a temporary one.
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// Plots reports against their node counts.
    Plot {
        /// Directory of the PNGs.
        #[arg(long, default_value = "docs/bench")]
        out_dir: PathBuf,
        reports: Vec<PathBuf>,
    },
}

const MIB: f64 = 1024.0 * 1024.0;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Args::parse().command {
        Command::Run {
            nodes,
            distributions,
            size_mib,
            node_mib_s,
            origin_mib_s,
            ramp_secs,
            limit_secs,
            out,
            work_dir,
        } => {
            let temp = tempfile::Builder::new()
                .prefix("peerfill-scale-")
                .tempdir()
                .context("creating the work dir")?;
            let opts = Options {
                nodes,
                distributions,
                size: size_mib * 1024 * 1024,
                caps: Caps {
                    down: node_mib_s * MIB,
                    up: node_mib_s * MIB,
                    origin: origin_mib_s * MIB,
                },
                ramp: Duration::from_secs(ramp_secs.unwrap_or(nodes as u64 / 100)),
                limit: Duration::from_secs(limit_secs),
                work_dir: work_dir.unwrap_or_else(|| temp.path().to_path_buf()),
            };
            let report = scale::run(&opts).await.context("scale run")?;
            println!("{}", report.summary());
            let out = out.unwrap_or_else(|| PathBuf::from(format!("scale-{nodes}.json")));
            std::fs::write(&out, report.to_json()?)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("report: {}", out.display());
        }
        Command::Plot { out_dir, reports } => {
            let mut all: Vec<Report> = Vec::new();
            for path in &reports {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                all.push(
                    serde_json::from_str(&text)
                        .with_context(|| format!("parsing {}", path.display()))?,
                );
            }
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            scale::report::plot(&out_dir, &all)?;
            println!("plots in {}", out_dir.display());
        }
    }
    Ok(())
}
