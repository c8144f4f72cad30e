//! `peerfill-versions`: what a new version of a distribution costs to
//! distribute (issue 12 item 2). Starts the local cluster (build the
//! workspace binaries first: `cargo build --workspace --bins`), completes a
//! Distribution, edits its source to a version with `--changed` of the
//! bytes changed, and reports the bytes each node received for the new
//! version (see `peerfill_e2e::versions`).
//!
//!     peerfill-versions --nodes 8 --size-mib 1024 --changed 0.01 --out versions.json

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use peerfill_e2e::versions::{SourceKind, VersionsOptions, run};

#[derive(Debug, Parser)]
#[command(
    name = "peerfill-versions",
    about = "Measures the bytes a new version with a few changed bytes moves per node"
)]
struct Args {
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Share of the bytes the new version changes.
    #[arg(long, default_value_t = 0.01)]
    changed: f64,
    /// Runs of changed 64 KiB blocks, spread over the content.
    #[arg(long, default_value_t = 8)]
    regions: u64,
    /// Piece size in KiB (default: the operator's automatic choice).
    #[arg(long)]
    piece_kib: Option<u64>,
    /// Source kinds to run, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [SourceKind::Http, SourceKind::Node])]
    sources: Vec<SourceKind>,
    /// Seconds each version may take.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// JSON report.
    #[arg(long, default_value = "versions.json")]
    out: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let a = Args::parse();
    let opts = VersionsOptions {
        nodes: a.nodes,
        size: a.size_mib << 20,
        changed: a.changed,
        regions: a.regions,
        piece_size: a.piece_kib.map(|k| k << 10),
        sources: a.sources,
        timeout: Duration::from_secs(a.timeout),
    };
    let report = match run(&opts).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("peerfill-versions: {e}");
            return ExitCode::FAILURE;
        }
    };
    for r in &report.runs {
        for line in r.render() {
            println!("{line}");
        }
    }
    let json = match serde_json::to_string_pretty(&report) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("peerfill-versions: encoding the report: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(&a.out, json) {
        eprintln!("peerfill-versions: writing {}: {e}", a.out.display());
        return ExitCode::FAILURE;
    }
    println!("report: {}", a.out.display());
    ExitCode::SUCCESS
}
