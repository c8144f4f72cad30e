//! The peerfill operator: turns Distributions into per-node work
//! (`NodeFill` specs) and the nodes' reports into Distribution status.
//!
//! Read top-down: the pure decisions ([`select`] which nodes, [`plan`] what
//! each node does, [`directory`] what a directory adds to that, [`status`]
//! how a Distribution is doing, [`events`] what deserves an Event,
//! [`leader::decide`] the Lease), then the thin shell
//! ([`controller`], [`ca`], [`leader`], [`metrics`]) and [`run`]. [`policy`]
//! holds the admission rules of work (private origins, path ownership,
//! failure reasons), [`memory`] what is remembered between reconciles,
//! [`heap`] how freed memory goes back to the system after a pass.

pub mod ca;
pub mod cli;
pub mod controller;
pub mod directory;
pub mod error;
pub mod events;
pub mod heap;
pub mod leader;
pub mod memory;
pub mod metrics;
pub mod peers;
pub mod plan;
pub mod policy;
pub mod select;
pub mod status;
pub mod triggers;

use std::sync::Arc;

use kube::Client;
use tokio::task::JoinSet;

pub use cli::Args;
pub use error::Error;

/// Runs one replica: serves metrics at once, waits for the leader Lease,
/// then reconciles until something fails for good — losing the Lease
/// included, after which the caller should exit non-zero (as client-go
/// does) so that the pod restarts as a standby. Dropping the future stops
/// everything it started.
pub async fn run(args: Args, client: Client) -> Result<(), Error> {
    run_with_metrics(args, client, Arc::new(metrics::Metrics::new()?)).await
}

/// [`run`] with a given metrics registry (tests read it directly).
pub async fn run_with_metrics(
    args: Args,
    client: Client,
    metrics: Arc<metrics::Metrics>,
) -> Result<(), Error> {
    run_until(args, client, metrics, std::future::pending()).await
}

/// [`run_with_metrics`] until `shutdown` completes: then the reconcilers
/// stop and a held Lease is released, so a standby takes over at once
/// instead of after the lease duration (client-go's ReleaseOnCancel).
/// Returns `Ok(())` only after such a shutdown.
pub async fn run_until(
    args: Args,
    client: Client,
    metrics: Arc<metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let mut shutdown = std::pin::pin!(shutdown);
    let timing = args.timing().map_err(Error::Config)?;
    let listener = metrics::bind(args.metrics_addr()).await?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics and /healthz");
    }
    let mut tasks: JoinSet<Result<(), Error>> = JoinSet::new();
    tasks.spawn(metrics::serve(listener, metrics.clone()));

    let identity = args.identity();
    let allow_private_origins = args.allow_private_origins;
    if allow_private_origins {
        tracing::warn!(
            "--allow-private-origins: origins on loopback, link-local and metadata addresses are accepted"
        );
    }
    let identity_for_release = identity.clone();
    let namespace = args.leader_election_namespace.clone();
    let mut elector = leader::Elector::new(
        client.clone(),
        &namespace,
        &args.leader_election_lease,
        &identity,
        timing,
    );
    tracing::info!(%identity, lease = %format!("{namespace}/{}", args.leader_election_lease), "waiting for the leader lease");
    tokio::select! {
        r = elector.acquire() => r?,
        Some(r) = tasks.join_next() => return flatten(r),
        () = &mut shutdown => return Ok(()),
    }
    metrics.leader.set(1);
    tasks.spawn(elector.hold());
    {
        let client = client.clone();
        let metrics = metrics.clone();
        let secret = args.ca_secret.clone();
        tasks.spawn(async move {
            let ca = ca::load_or_create(&controller::secrets(&client, &namespace), &secret).await?;
            controller::run(client, ca, metrics, identity, allow_private_origins).await
        });
    }
    let lease_api = leader::lease_api(&client, &args.leader_election_namespace);
    let result = tokio::select! {
        r = tasks.join_next() => match r {
            Some(r) => flatten(r),
            None => Err(Error::Task("no task left".into())),
        },
        () = &mut shutdown => {
            // Stop reconciling before giving the Lease away.
            tasks.shutdown().await;
            leader::release(&lease_api, &args.leader_election_lease, &identity_for_release).await
        }
    };
    metrics.leader.set(0);
    result
}

fn flatten(r: Result<Result<(), Error>, tokio::task::JoinError>) -> Result<(), Error> {
    match r {
        Ok(Ok(())) => Err(Error::Task("a task ended unexpectedly".into())),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(Error::Task(e.to_string())),
    }
}
