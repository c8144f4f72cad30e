//! `peerfill-agent`: the node agent binary.
//!
//! - `peerfill-agent run --config agent.json` fills (and seeds) the contents
//!   of the config; with `stay: true` it keeps serving until SIGTERM/SIGINT.
//! - `peerfill-agent node --node-name N --data-root DIR --listen ADDR
//!   --metrics ADDR [--metrics-bind-address IP] --identity-dir DIR
//!   [--allow-private-origins]` runs the agent of node N in a cluster: it
//!   watches its NodeFill, gets its certificate from the operator, fills
//!   what it is assigned and reports back (see `peerfill_agent::k8s` and
//!   docs/control-path.md).
//! - `peerfill-agent gen-certs --out DIR --nodes a,b,c` writes a cluster CA
//!   and one identity per node (`DIR/<node>/{tls.crt,tls.key,ca.crt}`), for
//!   tests, benchmarks and local demos.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use peerfill_agent::agent::{self, AgentConfig, Phase};
use peerfill_agent::k8s::{self, NodeArgs};
use peerfill_agent::logging::{self, LogFormat};
use peerfill_agent::tls::ClusterCa;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "peerfill-agent", version, about = "peerfill node agent")]
struct Cli {
    /// Log lines as text or JSON (filter with RUST_LOG).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "PEERFILL_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent with a JSON or YAML config file.
    Run {
        #[arg(long, env = "PEERFILL_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Run as the node agent of a Kubernetes cluster (the DaemonSet).
    Node(NodeCommand),
    /// Print the piece manifest of a file (JSON) for `source.http.manifestUrl`:
    /// publish it next to the file on the origin.
    Manifest {
        file: PathBuf,
        /// Piece size in bytes, the Distribution's `strategy.pieceSize` (0:
        /// the one the size gives, as when `pieceSize` is unset).
        #[arg(long, default_value_t = 0)]
        piece_size: u32,
    },
    /// Generate a cluster CA and node identities (for tests and demos).
    GenCerts {
        #[arg(long)]
        out: PathBuf,
        /// Comma-separated node names.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Common name of the CA.
        #[arg(long, default_value = "peerfill-cluster-ca")]
        ca_name: String,
    },
}

/// `node`: the cluster agent's own arguments plus the exposure settings.
#[derive(Args)]
struct NodeCommand {
    #[command(flatten)]
    args: NodeArgs,
    #[command(flatten)]
    exposure: Exposure,
}

/// Flags limiting what the agent exposes and connects to.
#[derive(Args, Debug, Clone, Copy, Default)]
struct Exposure {
    /// Bind the metrics/health endpoint to this IP instead of `--metrics`'s
    /// (the port stays `--metrics`'s). The chart passes the pod IP, so the
    /// endpoint is not exposed on every interface of the pod.
    #[arg(long)]
    metrics_bind_address: Option<IpAddr>,
}

impl Exposure {
    /// `metrics` with its IP replaced by `--metrics-bind-address`, if given.
    fn metrics_addr(&self, metrics: SocketAddr) -> SocketAddr {
        match self.metrics_bind_address {
            Some(ip) => SocketAddr::new(ip, metrics.port()),
            None => metrics,
        }
    }
}

/// Keeps piece-sized buffers out of the malloc heap: glibc otherwise raises
/// its mmap threshold after the first large free and serves later pieces
/// from per-thread arenas, whose fragmentation inflates the resident size.
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; it is called once,
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Command::GenCerts {
            out,
            nodes,
            ca_name,
        } => match gen_certs(&out, &nodes, &ca_name) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(error = %e, "gen-certs failed");
                ExitCode::FAILURE
            }
        },
        Command::Manifest { file, piece_size } => {
            match peerfill_agent::origin::manifest::PieceManifest::of_file(&file, piece_size) {
                Ok(m) => match serde_json::to_string(&m) {
                    Ok(json) => {
                        println!("{json}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        error!(error = %e, "manifest failed");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => {
                    error!(file = %file.display(), error = %e, "manifest failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => match runtime() {
            Some(rt) => rt.block_on(run(config)),
            None => ExitCode::FAILURE,
        },
        Command::Node(NodeCommand { mut args, exposure }) => match runtime() {
            Some(rt) => {
                args.metrics = exposure.metrics_addr(args.metrics);
                info!(
                    metrics = %args.metrics,
                    allow_private_origins = args.allow_private_origins,
                    "node agent starting"
                );
                rt.block_on(node(args))
            }
            None => ExitCode::FAILURE,
        },
    }
}

/// Blocking threads: piece hashing, writes, reads and flushes run there.
/// Few are ever busy at once (bounded by the download permits and upload
/// slots); a small cap bounds thread stacks and context switches.
const MAX_BLOCKING_THREADS: usize = 16;

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            None
        }
    }
}

/// A token cancelled by the first SIGINT/SIGTERM, so work stops cleanly.
fn cancel_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received, shutting down");
        token.cancel();
    });
    shutdown
}

async fn node(args: NodeArgs) -> ExitCode {
    match k8s::run_node(args, cancel_on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "node agent failed");
            ExitCode::FAILURE
        }
    }
}

fn gen_certs(out: &std::path::Path, nodes: &[String], ca_name: &str) -> anyhow::Result<()> {
    let ca = ClusterCa::generate(ca_name)?;
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("ca.crt"), ca.cert_pem())?;
    for node in nodes {
        ca.issue(node)?.write(&out.join(node))?;
    }
    info!(out = %out.display(), nodes = nodes.len(), "identities written");
    Ok(())
}

async fn run(config: PathBuf) -> ExitCode {
    let cfg = match AgentConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "invalid configuration");
            return ExitCode::from(2);
        }
    };
    match agent::run(cfg, cancel_on_signal()).await {
        Ok(summary) => {
            let failed: Vec<_> = summary
                .iter()
                .filter(|(_, p)| **p == Phase::Failed)
                .map(|(id, _)| id.as_str())
                .collect();
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                error!(?failed, "some contents failed");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            error!(error = %e, "agent failed");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("peerfill-agent").chain(args.iter().copied()))
    }

    #[test]
    fn node_exposure_flags() {
        let base = [
            "node",
            "--node-name",
            "n1",
            "--data-root",
            "/var/lib/peerfill",
            "--metrics",
            "0.0.0.0:9464",
            "--identity-dir",
            "/id",
        ];
        let Command::Node(n) = parse(&base).unwrap().command else {
            panic!("not the node command");
        };
        assert!(!n.args.allow_private_origins, "refused by default");
        assert_eq!(
            n.exposure.metrics_addr(n.args.metrics),
            "0.0.0.0:9464".parse::<SocketAddr>().unwrap()
        );
        let mut with = base.to_vec();
        with.extend([
            "--metrics-bind-address",
            "198.18.1.3",
            "--allow-private-origins",
        ]);
        let Command::Node(n) = parse(&with).unwrap().command else {
            panic!("not the node command");
        };
        assert!(n.args.allow_private_origins);
        assert_eq!(
            n.exposure.metrics_addr(n.args.metrics),
            "198.18.1.3:9464".parse::<SocketAddr>().unwrap()
        );
        with.extend(["--metrics-bind-address", "not-an-ip"]);
        assert!(parse(&with).is_err());
    }
}
