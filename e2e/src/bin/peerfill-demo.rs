//! `peerfill-demo`: the whole of peerfill on this machine, no root and no
//! real cluster needed.
//!
//!     cargo run -p peerfill-e2e --bin peerfill-demo
//!
//! Builds the operator and agent binaries, starts the local cluster (API
//! stand-in, operator, 8 agents on their own loopback addresses, an HTTP
//! origin serving a random 1 GiB artifact), applies `examples/http.yaml`
//! pointed at that origin, shows per-node progress and ends with a summary.
//! Ctrl-C stops everything and removes the work dir (exit 130).
//!
//! The origin is capped at 100 MiB/s in total by default (`--origin-rate`;
//! `0` lifts it): peer to peer pays off when the origin is the narrow part,
//! and an uncapped loopback origin is not. `--measure-baseline` times N
//! plain HTTP clients against the same origin afterwards; `--prometheus`
//! starts Prometheus on the cluster; `--dashboard-png FILE` draws the
//! dashboard's main panels from it (docs/dashboard.png is made that way).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use peerfill_e2e::demo::units::SizeError;
use peerfill_e2e::demo::{DemoError, DemoOptions, WorkDir, run, units::parse_size};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    name = "peerfill-demo",
    about = "Runs peerfill on a local cluster: N agents fetch one artifact from an HTTP origin, mostly from each other"
)]
struct Args {
    /// Nodes, each with its own agent, loopback address and data dir.
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// Artifact size (binary units: 1GiB, 512MiB, ...).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Piece size, a power of two from 64KiB to 64MiB (default: the
    /// example's, 4MiB).
    #[arg(long, value_parser = parse_size)]
    piece_size: Option<u64>,
    /// Work dir for the nodes' data, logs and kubeconfig; must be new or
    /// empty (default: a new dir under $TMPDIR).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the work dir afterwards (default: removed).
    #[arg(long)]
    keep: bool,
    /// Do not build the operator and agent binaries (use the ones next to
    /// this binary).
    #[arg(long)]
    no_build: bool,
    /// Seconds to wait for the Distribution to complete.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Plain progress lines even on a terminal.
    #[arg(long)]
    plain: bool,
    /// The origin's total rate cap per second (binary units: 100MiB,
    /// 1GiB); 0 lifts it.
    #[arg(long, default_value = "100MiB", value_parser = parse_rate)]
    origin_rate: Rate,
    /// After the swarm, download the artifact with N plain HTTP clients at
    /// once from the same origin and time them.
    #[arg(long)]
    measure_baseline: bool,
    /// Start Prometheus (if installed: $PROMETHEUS, .tools/ or PATH)
    /// scraping the cluster, and print its URL and queries to try.
    #[arg(long)]
    prometheus: bool,
    /// Draw the dashboard's main panels from Prometheus (query_range) into
    /// this PNG; needs Prometheus (implies --prometheus).
    #[arg(long, value_name = "FILE")]
    dashboard_png: Option<PathBuf>,
}

/// `--origin-rate`: bytes per second, `None` for no cap.
#[derive(Debug, Clone, Copy)]
struct Rate(Option<u64>);

fn parse_rate(s: &str) -> Result<Rate, SizeError> {
    let s = s.trim().trim_end_matches("/s");
    match parse_size(s)? {
        0 => Ok(Rate(None)),
        n => Ok(Rate(Some(n))),
    }
}

/// How the demo ended.
enum End {
    Done,
    Error(DemoError),
    Signal(&'static str, u8),
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let opts = DemoOptions {
        nodes: args.nodes,
        size: args.size,
        piece_size: args.piece_size,
        work_dir: args.work_dir,
        keep: args.keep,
        build: !args.no_build,
        ready_timeout: Duration::from_secs(90),
        timeout: Duration::from_secs(args.timeout),
        plain: args.plain,
        origin_rate: args.origin_rate.0,
        measure_baseline: args.measure_baseline,
        prometheus: args.prometheus,
        dashboard_png: args
            .dashboard_png
            .map(|p| std::path::absolute(&p).unwrap_or(p)),
    };
    let work = match WorkDir::new(opts.work_dir.clone(), opts.keep) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (mut int, mut term, mut hup) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(i), Ok(t), Ok(h)) => (i, t, h),
        _ => {
            eprintln!("error: cannot install the signal handlers");
            return ExitCode::from(1);
        }
    };
    // Dropping the demo's future on a signal drops the cluster (its
    // processes are killed and reaped) and the build (cargo's process group
    // is killed); `work` is dropped after it and removes the dir.
    let end = tokio::select! {
        r = run(&opts, &work) => match r {
            Ok(_) => End::Done,
            Err(e) => End::Error(e),
        },
        _ = int.recv() => End::Signal("interrupted", 130),
        _ = term.recv() => End::Signal("terminated", 143),
        _ = hup.recv() => End::Signal("hung up", 129),
    };
    let code = match end {
        End::Done => ExitCode::SUCCESS,
        End::Error(e) => {
            eprintln!("\nerror: {e}");
            ExitCode::from(1)
        }
        End::Signal(what, code) => {
            eprintln!("\n{what}: stopping everything the demo started");
            ExitCode::from(code)
        }
    };
    let dir = work.path().display().to_string();
    if work.keep() {
        println!("Kept {dir} (node data, logs, kubeconfig).");
    } else {
        drop(work);
        println!("Stopped every process and removed {dir}.");
    }
    code
}
