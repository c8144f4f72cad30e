//! `peerfill-operator`: see charts/peerfill/README.md "Operator".

use std::process::ExitCode;

use clap::Parser;
use peerfill_operator::{Args, run};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no Kubernetes API (KUBECONFIG or in-cluster config)");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        result = run(args, client) => {
            // run() returns only on failure, e.g. a lost Lease: exit
            // non-zero so the pod restarts as a standby.
            if let Err(e) = result {
                tracing::error!(error = %e, "operator stopped");
            }
            ExitCode::FAILURE
        }
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            ExitCode::SUCCESS
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
