//! `peerfill-operator`: see charts/peerfill/README.md "Operator".

use std::process::ExitCode;

use clap::Parser;
use std::sync::Arc;

use peerfill_operator::metrics::Metrics;
use peerfill_operator::{Args, run_until};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    peerfill_agent::logging::init(args.log_format);
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no Kubernetes API (KUBECONFIG or in-cluster config)");
            return ExitCode::FAILURE;
        }
    };
    let metrics = match Metrics::new() {
        Ok(m) => Arc::new(m),
        Err(e) => {
            tracing::error!(error = %e, "metrics registry");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = async {
        shutdown_signal().await;
        tracing::info!("shutting down");
    };
    match run_until(args, client, metrics, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        // Anything else, e.g. a lost Lease: exit non-zero so the pod
        // restarts as a standby.
        Err(e) => {
            tracing::error!(error = %e, "operator stopped");
            ExitCode::FAILURE
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
