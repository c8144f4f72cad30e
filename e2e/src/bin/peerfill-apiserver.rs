//! `peerfill-apiserver`: the in-memory Kubernetes API stand-in as a process.
//! Listens on 127.0.0.1, writes a kubeconfig, exits cleanly on Ctrl-C/SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use peerfill_e2e::apiserver::{ApiServer, ApiServerOptions};

#[derive(Debug, Parser)]
#[command(about = "In-memory Kubernetes API server for tests and the local demo")]
struct Args {
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where to write a kubeconfig that points at this server.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Directory of CustomResourceDefinition YAML files to load at start.
    #[arg(long)]
    crds: Option<PathBuf>,
    /// Watch history kept, in events; older resourceVersions get 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_interval_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let handle = ApiServer::start(ApiServerOptions {
        port: args.port,
        crd_dir: args.crds.clone(),
        history: args.history,
        bookmark_interval: Duration::from_secs(args.bookmark_interval_secs.max(1)),
    })
    .await
    .context("starting the API server")?;
    if let Some(path) = &args.kubeconfig {
        handle
            .write_kubeconfig(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // The URL on stdout lets a parent process find an ephemeral port.
    println!("{}", handle.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}
