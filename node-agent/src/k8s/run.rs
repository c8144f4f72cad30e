//! The node agent's wiring and main loop.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::{Client, Resource, ResourceExt};
use peerfill_crds::nodefill::NodeFill;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use super::enroll::wait_for_identity;
use super::identity::{self, Request};
use super::manifest::Manifest;
use super::reconcile::NodeAgent;
use super::report;
use super::reporter::{Reporter, now_time};
use super::watch::watch_nodefill;
use super::{NodeArgs, NodeError};
use crate::agent::{AgentConfig, Engine, EngineOptions, IdentityFiles, dest_path};
use crate::metrics::{self, Metrics};
use crate::tls;

/// Runs the node agent until `shutdown`.
pub async fn run_node(args: NodeArgs, shutdown: CancellationToken) -> Result<(), NodeError> {
    tls::validate_node_name(&args.node_name)?;
    dest_path(&args.data_root, std::path::Path::new("x"))?;
    let metrics = Metrics::new();
    let health = metrics::Health::new(metrics::HealthConfig::node());
    // Liveness is served from the start, also while waiting for the
    // certificate; readiness needs the watch and the QUIC endpoint.
    let listener = tokio::net::TcpListener::bind(args.metrics)
        .await
        .map_err(|source| NodeError::Metrics {
            addr: args.metrics,
            source,
        })?;
    {
        let (m, h) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let limits = metrics::ServerLimits::default();
            if let Err(e) = metrics::serve_with(listener, m, h, limits).await {
                error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    let client = Client::try_default().await?;
    let fills: Api<NodeFill> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let stop_watch = shutdown.child_token();
    let mut fill_rx = watch_nodefill(
        fills.clone(),
        args.node_name.clone(),
        stop_watch.clone(),
        health.clone(),
    );

    let zone = match nodes.get_opt(&args.node_name).await {
        Ok(Some(n)) => n.labels().get(&args.zone_label).cloned(),
        Ok(None) => {
            warn!(node = %args.node_name, "this node's Node object does not exist");
            None
        }
        Err(e) => {
            warn!(error = %e, "cannot read this node's Node object; no zone");
            None
        }
    };

    let request = Request::load_or_generate(&args.node_name, &args.identity_dir)?;
    info!(node = %args.node_name, digest = %request.digest, "certificate requested");
    let mut reporter = Reporter::new(fills.clone(), client.clone(), &args, request.clone(), zone);
    let Some(mut identity) = wait_for_identity(&mut reporter, &request, &mut fill_rx, &shutdown)
        .instrument(info_span!("enroll", node = %args.node_name))
        .await
    else {
        stop_watch.cancel();
        return Ok(());
    };
    identity.write(&args.identity_dir)?;
    info!(node = %args.node_name, "certificate issued; starting the QUIC endpoint");

    let mut cfg = AgentConfig::new(
        args.node_name.clone(),
        args.listen,
        args.data_root.clone(),
        IdentityFiles::in_dir(&args.identity_dir),
        Vec::new(),
    );
    cfg.metrics_addr = None;
    cfg.limits.download_bytes_per_sec = args.max_download_bytes_per_second;
    cfg.limits.upload_bytes_per_sec = args.max_upload_bytes_per_second;
    let engine = Engine::start_with_metrics(
        &cfg,
        &identity,
        EngineOptions {
            retry_transient_origin: true,
            require_pin: true,
            allow_private_origins: args.allow_private_origins,
        },
        metrics,
    )?;
    reporter.endpoint = Some(advertised_endpoint(&args, engine.local_addr()));
    reporter.fingerprint = Some(identity::fingerprint(&identity.cert_pem)?);
    reporter.ready_since = Some(now_time());
    health.set_endpoint_up(true);
    let mut renewer = identity::Renewer::new(&args.node_name, &args.identity_dir);
    // Renewal runs inside the main loop (no await): its steps log in this span.
    let renewal = info_span!("renewal", node = %args.node_name);
    let mut progress_seen: HashMap<String, (u64, Instant)> = HashMap::new();

    let mut agent = NodeAgent {
        manifest: Manifest::load(engine.status_dir()),
        engine: engine.clone(),
        nodes,
        client: client.clone(),
        headers_recheck: None,
        args,
        tracked: BTreeMap::new(),
        removing: BTreeMap::new(),
        last_spec: None,
        cleaned_up: false,
        reporter,
    };
    let changed = engine.changed();
    loop {
        let changed_fut = changed.notified();
        tokio::pin!(changed_fut);
        changed_fut.as_mut().enable();

        let current = fill_rx.borrow_and_update().clone();
        if let Some(nf) = current {
            if agent.reporter.object_ref.is_none() {
                agent.reporter.object_ref = Some(nf.object_ref(&()));
            }
            agent.reporter.interval = report::report_interval(nf.spec.report_interval_seconds);
            if agent.last_spec.as_ref() != Some(&nf.spec) {
                // Peers are pinned to the certificate fingerprints the
                // operator published, on top of the cluster CA.
                identity.pins.set(
                    nf.spec
                        .peers
                        .iter()
                        .filter_map(|p| Some((p.node.clone(), p.certificate_fingerprint.clone()?))),
                );
                if let Some(issued) = &nf.spec.identity {
                    renewal.in_scope(|| match renewer.on_issued(&mut identity, issued) {
                        Ok(true) => match identity.fingerprint() {
                            Ok(f) => agent.reporter.fingerprint = Some(f),
                            Err(e) => warn!(error = %e, "fingerprint of the renewed certificate"),
                        },
                        Ok(false) => {}
                        Err(e) => warn!(error = %e, "cannot take the renewed certificate"),
                    });
                }
                agent.reconcile(&nf.spec).await;
                agent.last_spec = Some(nf.spec.clone());
            }
        }
        // A headers Secret may be created or fixed without any NodeFill
        // change: try the contents waiting on it again now and then.
        if agent
            .headers_recheck
            .is_some_and(|t| std::time::Instant::now() >= t)
        {
            agent.headers_recheck = None;
            if let Some(spec) = agent.last_spec.clone() {
                agent.reconcile(&spec).await;
            }
        }
        agent.finish_swaps();
        // Short-lived certificates: ask for the next one ahead of expiry
        // (published with the next status write).
        renewal.in_scope(
            || match renewer.due_request(&identity, std::time::SystemTime::now()) {
                Ok(Some(req)) if req.digest != agent.reporter.request.digest => {
                    agent.reporter.request = req.clone();
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot prepare the certificate renewal"),
            },
        );
        mark_stuck(&engine, &health, &mut progress_seen);
        let due = agent.report().await;
        // Labels follow the status write that reported the completion.
        agent.sync_labels().await;

        let wait = due
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(500));
        tokio::select! {
            r = fill_rx.changed() => {
                if r.is_err() {
                    warn!("the NodeFill watch ended");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            _ = &mut changed_fut => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    info!("shutting down");
    stop_watch.cancel();
    engine.shutdown().await;
    agent.reporter.stopping().await;
    Ok(())
}

/// A content counts as stuck (readiness, and after long enough liveness)
/// when it is fetching and its verified bytes did not grow for this long.
const STUCK_AFTER: Duration = Duration::from_secs(120);

/// Feeds the health checks from the contents' progress.
fn mark_stuck(
    engine: &Engine,
    health: &metrics::Health,
    seen: &mut HashMap<String, (u64, Instant)>,
) {
    let ids = engine.ids();
    seen.retain(|id, _| {
        let keep = ids.contains(id);
        if !keep {
            health.set_stuck(id, false);
        }
        keep
    });
    for id in ids {
        let Some(st) = engine.status(&id) else {
            continue;
        };
        if st.phase != crate::agent::Phase::Fetching {
            seen.remove(&id);
            health.set_stuck(&id, false);
            continue;
        }
        let now = Instant::now();
        let entry = seen.entry(id.clone()).or_insert((st.bytes_done, now));
        if entry.0 != st.bytes_done {
            *entry = (st.bytes_done, now);
        }
        health.set_stuck(&id, now.duration_since(entry.1) >= STUCK_AFTER);
    }
}

/// `--advertise`, else the listen address with `POD_IP` for an unspecified
/// IP.
fn advertised_endpoint(args: &NodeArgs, bound: Option<SocketAddr>) -> String {
    if let Some(a) = &args.advertise {
        return a.clone();
    }
    let addr = bound.unwrap_or(args.listen);
    if addr.ip().is_unspecified() {
        match args.pod_ip {
            Some(ip) => SocketAddr::new(ip, addr.port()).to_string(),
            None => {
                warn!(%addr, "listening on an unspecified address without POD_IP or --advertise; peers cannot dial this endpoint");
                addr.to_string()
            }
        }
    } else {
        addr.to_string()
    }
}
