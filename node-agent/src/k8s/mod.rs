//! `peerfill-agent node`: the agent as a Kubernetes DaemonSet pod.
//!
//! It watches only its own NodeFill (same name as its Node), obtains its
//! certificate from the operator's cluster CA through that object (see
//! [`identity`]), runs the swarm engine for every assignment of the spec
//! (see [`translate`]), reports progress in the status within the write
//! budget (see [`report`]), and labels its Node for every distribution it
//! holds completely. The contract is docs/control-path.md.

pub mod identity;
pub mod manifest;
pub mod report;
pub mod translate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter as EventReporter};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use peerfill_crds::node_label_key;
use peerfill_crds::nodefill::{
    Assignment, CONDITION_AGENT_READY, NODE_LABEL_PREFIX, NODE_LABEL_VALUE, NodeDistributionStatus,
    NodeFill, NodeFillSpec, NodePhase,
};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::agent::{
    AgentConfig, AgentError, ContentConfig, Engine, EngineOptions, IdentityFiles, Phase,
    SourceConfig, dest_path,
};
use crate::metrics::{self, Metrics};
use crate::tls::{self, TlsError};
use identity::{IdentityError, Request};
use manifest::{Entry, Manifest};
use translate::Desired;

/// Version written into `status.agentVersion`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Node label holding the zone, by default.
pub const DEFAULT_ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// How the node agent was started (`peerfill-agent node ...`, the chart's
/// contract in charts/peerfill/README.md).
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// This node's name (its Node and NodeFill are named so).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where contents are written (a hostPath); never left.
    #[arg(long)]
    pub data_root: PathBuf,
    /// QUIC listen address.
    #[arg(long, default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// Address of `/metrics` and `/healthz`.
    #[arg(long, default_value = "0.0.0.0:9464")]
    pub metrics: SocketAddr,
    /// Directory of the node key and certificate (an in-memory volume).
    #[arg(long)]
    pub identity_dir: PathBuf,
    /// `host:port` other agents dial (default: the listen address, with
    /// POD_IP for 0.0.0.0).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Node label that holds the node's zone.
    #[arg(long, default_value = DEFAULT_ZONE_LABEL)]
    pub zone_label: String,
    /// Allow origins on loopback, link-local and metadata addresses (and
    /// redirects to them). Refused by default: an origin URL must not reach
    /// the node's own services or the cloud metadata endpoint.
    #[arg(long)]
    pub allow_private_origins: bool,
    /// The pod's IP (from the downward API), advertised when listening on
    /// 0.0.0.0.
    #[arg(long, env = "POD_IP", hide = true)]
    pub pod_ip: Option<IpAddr>,
}

/// Errors that stop the node agent.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid arguments: {0}")]
    Args(String),
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("node identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The NodeFill as last seen by the watch (`None`: not there).
type FillRx = watch::Receiver<Option<NodeFill>>;

/// Keeps the latest version of NodeFill `node` in a watch channel: one
/// watch with a field selector on the name, relisting (after a 410 Gone or
/// a broken stream) with backoff.
fn watch_nodefill(
    api: Api<NodeFill>,
    node: String,
    stop: CancellationToken,
    health: metrics::Health,
) -> FillRx {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
        let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
        let mut listed = false;
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = stop.cancelled() => return,
            };
            let Some(ev) = ev else { return };
            // Readiness follows the watch: any event (a re-list included)
            // shows the API server answers; an error shows it does not.
            match &ev {
                Ok(_) => health.set_watch_alive(std::time::Instant::now()),
                Err(e) => health.set_watch_down(std::time::Instant::now(), e.to_string()),
            }
            match ev {
                Ok(Event::Init) => listed = false,
                Ok(Event::InitApply(o)) | Ok(Event::Apply(o)) if o.name_any() == node => {
                    listed = true;
                    tx.send_replace(Some(o));
                }
                Ok(Event::InitDone) if !listed => {
                    tx.send_replace(None);
                }
                Ok(Event::Delete(o)) if o.name_any() == node => {
                    tx.send_replace(None);
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "watching the NodeFill failed; retrying"),
            }
        }
    });
    rx
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

fn condition(status: bool, reason: &str, message: String, since: &Time) -> Condition {
    Condition {
        type_: CONDITION_AGENT_READY.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: None,
        last_transition_time: since.clone(),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

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
    let mut reporter = Reporter::new(fills.clone(), client, &args, request.clone(), zone);
    let Some(mut identity) =
        wait_for_identity(&mut reporter, &request, &mut fill_rx, &shutdown).await
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
    let mut progress_seen: HashMap<String, (u64, Instant)> = HashMap::new();

    let mut agent = NodeAgent {
        manifest: Manifest::load(engine.status_dir()),
        engine: engine.clone(),
        nodes,
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
                    match renewer.on_issued(&mut identity, issued) {
                        Ok(true) => match identity.fingerprint() {
                            Ok(f) => agent.reporter.fingerprint = Some(f),
                            Err(e) => warn!(error = %e, "fingerprint of the renewed certificate"),
                        },
                        Ok(false) => {}
                        Err(e) => warn!(error = %e, "cannot take the renewed certificate"),
                    }
                }
                agent.reconcile(&nf.spec).await;
                agent.last_spec = Some(nf.spec.clone());
            }
        }
        agent.retry_removals().await;
        agent.label_complete().await;
        agent.finish_swaps();
        // Short-lived certificates: ask for the next one ahead of expiry
        // (published with the next status write).
        match renewer.due_request(&identity, std::time::SystemTime::now()) {
            Ok(Some(req)) if req.digest != agent.reporter.request.digest => {
                agent.reporter.request = req.clone();
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot prepare the certificate renewal"),
        }
        mark_stuck(&engine, &health, &mut progress_seen);
        let due = agent.report().await;

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

/// Writes the request until the operator answers it; `None` on shutdown.
async fn wait_for_identity(
    reporter: &mut Reporter,
    request: &Request,
    fill_rx: &mut FillRx,
    shutdown: &CancellationToken,
) -> Option<tls::NodeIdentity> {
    let mut backoff = Duration::from_secs(1);
    let mut written: Option<Instant> = None;
    let mut refused: Option<String> = None;
    loop {
        let current = fill_rx.borrow_and_update().clone();
        if let Some(nf) = &current {
            reporter.interval = report::report_interval(nf.spec.report_interval_seconds);
            if let Some(issued) = &nf.spec.identity {
                match request.accept(issued) {
                    Ok(id) => return Some(id),
                    Err(e) => {
                        let msg = e.to_string();
                        if refused.as_deref() != Some(msg.as_str()) {
                            debug!(error = %msg, "spec.identity is not (yet) the answer to our request");
                            refused = Some(msg);
                        }
                    }
                }
            }
        }
        // (Re)write the request when the NodeFill appears, and as a
        // heartbeat while we wait.
        let due = written.is_none_or(|w| w.elapsed() >= reporter.interval);
        if current.is_some() && due {
            match reporter.write_request().await {
                Ok(()) => {
                    written = Some(Instant::now());
                    backoff = Duration::from_secs(1);
                }
                Err(e) if is_not_found(&e) => {
                    debug!("NodeFill not there yet");
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "cannot write the certificate request");
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        } else if current.is_none() {
            written = None;
        }
        tokio::select! {
            _ = fill_rx.changed() => {}
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return None,
        }
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

/// One assignment this agent took on.
struct Tracked {
    assignment: Assignment,
    /// What the spec asks for, translated.
    desired: Desired,
    /// The config the engine runs, if it runs.
    running: Option<ContentConfig>,
    /// The node label for this distribution is set.
    labeled: bool,
    /// The previous version (content id, path) while a new one fills: its
    /// file stays in place until the new one is complete.
    superseded: Option<(String, PathBuf)>,
}

/// Earlier files a new run may reuse pieces from: the previous version's,
/// when it lived at another path.
fn reuse_from(t: &Tracked, cfg: &ContentConfig) -> Vec<PathBuf> {
    t.superseded
        .iter()
        .map(|(_, p)| p.clone())
        .filter(|p| p != &cfg.path)
        .collect()
}

/// An unassigned distribution whose label removal is still to be done; its
/// status entry stays until then.
struct Removal {
    namespace: String,
    name: String,
}

struct NodeAgent {
    args: NodeArgs,
    engine: Engine,
    nodes: Api<Node>,
    manifest: Manifest,
    /// By Distribution uid.
    tracked: BTreeMap<String, Tracked>,
    /// By Distribution uid.
    removing: BTreeMap<String, Removal>,
    last_spec: Option<NodeFillSpec>,
    cleaned_up: bool,
    reporter: Reporter,
}

impl NodeAgent {
    /// Brings the engine in line with `spec`.
    async fn reconcile(&mut self, spec: &NodeFillSpec) {
        let peer_addrs = resolve_peers(spec).await;
        let me = self.args.node_name.clone();
        if !self.cleaned_up {
            self.startup_cleanup(spec).await;
            self.cleaned_up = true;
        }
        let claimed: Vec<PathBuf> = spec
            .distributions
            .iter()
            .flat_map(|a| translate::claimed_paths(a, &me))
            .collect();
        let assigned: BTreeSet<&str> = spec.distributions.iter().map(|a| a.uid.as_str()).collect();
        let gone: Vec<String> = self
            .tracked
            .keys()
            .filter(|uid| !assigned.contains(uid.as_str()))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(t) = self.tracked.remove(&uid) {
                self.unassign(&uid, t, &claimed).await;
            }
        }
        let conflicts = translate::path_conflicts(&spec.distributions, &me);
        for a in &spec.distributions {
            self.removing.remove(&a.uid);
            let desired = match conflicts.get(&a.uid) {
                Some(other) => Desired::Invalid {
                    reason: "PathConflict",
                    message: format!(
                        "path {} overlaps the path of {other} on this node; nothing was touched",
                        a.path
                    ),
                },
                None => translate::translate(a, &me, &self.args.data_root, &peer_addrs),
            };
            let t = self
                .tracked
                .entry(a.uid.clone())
                .or_insert_with(|| Tracked {
                    assignment: a.clone(),
                    desired: desired.clone(),
                    running: None,
                    labeled: false,
                    superseded: None,
                });
            t.assignment = a.clone();
            t.desired = desired.clone();
            let id = a.content_id.clone();
            // A new content id for the same Distribution is a new version
            // (an edit, or the origin changed): stop the old run, keep its
            // file in place (and labelled) until the new one is swapped in.
            if let Some(old) = t.running.as_ref().filter(|old| old.id != id) {
                let (old_id, old_path) = (old.id.clone(), old.path.clone());
                info!(content = %id, previous = %old_id, distribution = %a.name, "new version of the distribution; starting it beside the previous one");
                if let Err(e) = self.engine.remove(&old_id, false).await {
                    warn!(content = %old_id, error = %e, "stopping the previous version failed");
                }
                // Its partial data is of no use any more; its file stays.
                if let Err(e) = self.engine.delete_data_of(&old_id, None) {
                    warn!(content = %old_id, error = %e, "deleting the previous version's partial data failed");
                }
                t.running = None;
                if t.superseded.is_none() {
                    t.superseded = Some((old_id, old_path));
                }
            }
            match desired {
                Desired::Run(mut cfg) => match &t.running {
                    Some(old) => {
                        let learnt = self
                            .engine
                            .status(&id)
                            .filter(|s| s.size_known)
                            .map(|s| s.size);
                        if translate::needs_restart(old, learnt, &cfg) {
                            info!(content = %id, distribution = %a.name, "assignment changed; restarting the content");
                            if let Err(e) = self.engine.remove(&id, false).await {
                                warn!(content = %id, error = %e, "stopping the content failed");
                            }
                            t.running = None;
                            cfg.reuse_from = reuse_from(t, &cfg);
                            start(&self.engine, &mut self.manifest, t, cfg, &me);
                        } else {
                            if translate::peers_changed(old, &cfg) {
                                debug!(content = %id, "peers changed");
                                self.engine.set_peers(
                                    &id,
                                    cfg.peers.clone(),
                                    cfg.allowed_peers.clone(),
                                );
                            }
                            self.engine.pin(&id, cfg.root, cfg.origin_version.clone());
                            let mut keep = cfg;
                            keep.size = old.size;
                            keep.reuse_from.clone_from(&old.reuse_from);
                            t.running = Some(keep);
                        }
                    }
                    None => {
                        cfg.reuse_from = reuse_from(t, &cfg);
                        start(&self.engine, &mut self.manifest, t, cfg, &me);
                    }
                },
                Desired::Wait { .. } | Desired::Invalid { .. } => {
                    if let Some(old) = t.running.take()
                        && let Err(e) = self.engine.remove(&old.id, false).await
                    {
                        warn!(content = %old.id, error = %e, "stopping the content failed");
                    }
                }
            }
        }
    }

    /// Once a new version is complete (swapped in atomically at its path),
    /// removes what is left of the previous one: its record, and its file
    /// when the path changed and this Distribution owns it.
    fn finish_swaps(&mut self) {
        let me = self.args.node_name.clone();
        let claimed: Vec<PathBuf> = self
            .tracked
            .values()
            .flat_map(|t| translate::claimed_paths(&t.assignment, &me))
            .collect();
        for t in self.tracked.values_mut() {
            let Some((old_id, _)) = &t.superseded else {
                continue;
            };
            let complete = t.running.is_some()
                && self
                    .engine
                    .status(&t.assignment.content_id)
                    .is_some_and(|s| s.phase == Phase::Complete);
            if !complete {
                continue;
            }
            let old_id = old_id.clone();
            if let Some(path) = self
                .manifest
                .deletable_path(&old_id, &t.assignment.uid, &claimed)
                .and_then(|p| dest_path(&self.args.data_root, &p).ok())
            {
                info!(content = %old_id, path = %path.display(), "removing the previous version's file");
                if let Err(e) = self.engine.delete_data_of(&old_id, Some(&path)) {
                    warn!(content = %old_id, error = %e, "deleting the previous version failed; retrying");
                    continue;
                }
            }
            if let Err(e) = self.manifest.remove(&old_id) {
                warn!(error = %e, "updating the manifest failed");
            }
            t.superseded = None;
        }
    }

    /// After a restart: deletes the data of contents no longer assigned
    /// (only those in the manifest: files this agent created, never a path a
    /// current assignment claims) and removes the labels of distributions
    /// no longer assigned.
    async fn startup_cleanup(&mut self, spec: &NodeFillSpec) {
        let me = self.args.node_name.clone();
        let claimed: Vec<PathBuf> = spec
            .distributions
            .iter()
            .flat_map(|a| translate::claimed_paths(a, &me))
            .collect();
        let ids: BTreeSet<&str> = spec
            .distributions
            .iter()
            .map(|a| a.content_id.as_str())
            .collect();
        let stale: Vec<(String, Entry)> = self
            .manifest
            .entries()
            .iter()
            .filter(|(id, _)| !ids.contains(id.as_str()))
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect();
        for (id, e) in stale {
            info!(content = %id, distribution = %format!("{}/{}", e.namespace, e.name), "deleting the data of a content unassigned while the agent was away");
            let dest = self
                .manifest
                .deletable_path(&id, &e.uid, &claimed)
                .and_then(|p| dest_path(&self.args.data_root, &p).ok());
            match self.engine.delete_data_of(&id, dest.as_deref()) {
                Ok(()) => {
                    if let Err(e) = self.manifest.remove(&id) {
                        warn!(error = %e, "updating the manifest failed");
                    }
                }
                Err(e) => warn!(content = %id, error = %e, "deleting stale data failed"),
            }
        }
        let keep: BTreeSet<String> = spec
            .distributions
            .iter()
            .map(|a| node_label_key(&a.namespace, &a.name))
            .collect();
        match self.nodes.get_opt(&self.args.node_name).await {
            Ok(Some(node)) => {
                let stale: Vec<String> = node
                    .labels()
                    .keys()
                    .filter(|k| k.starts_with(NODE_LABEL_PREFIX) && !keep.contains(*k))
                    .cloned()
                    .collect();
                for key in stale {
                    info!(label = %key, "removing the stale label of an unassigned distribution");
                    if let Err(e) = set_label(&self.nodes, &self.args.node_name, &key, false).await
                    {
                        warn!(label = %key, error = %e, "removing a stale label failed");
                    }
                }
                for t in self.tracked.values_mut() {
                    let key = node_label_key(&t.assignment.namespace, &t.assignment.name);
                    t.labeled = node.labels().contains_key(&key);
                }
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot read this node's labels"),
        }
    }

    /// Removal protocol: stop the transfer and delete the data this
    /// Distribution owns (never a path another assignment claims, never a
    /// seeder's source), then remove the label, then (in the next status
    /// write) drop the entry.
    async fn unassign(&mut self, uid: &str, t: Tracked, claimed: &[PathBuf]) {
        let a = &t.assignment;
        info!(content = %a.content_id, distribution = %format!("{}/{}", a.namespace, a.name), "unassigned; deleting its data");
        let mut ids = vec![a.content_id.clone()];
        if let Some(r) = &t.running
            && r.id != a.content_id
        {
            ids.push(r.id.clone());
        }
        if let Some((old, _)) = &t.superseded {
            ids.push(old.clone());
        }
        for id in ids {
            if let Err(e) = self.engine.remove(&id, false).await {
                warn!(content = %id, error = %e, "stopping the content failed");
            }
            let dest = self
                .manifest
                .deletable_path(&id, uid, claimed)
                .and_then(|p| dest_path(&self.args.data_root, &p).ok());
            match self.engine.delete_data_of(&id, dest.as_deref()) {
                Ok(()) => {
                    if let Err(e) = self.manifest.remove(&id) {
                        warn!(error = %e, "updating the manifest failed");
                    }
                }
                Err(e) => warn!(content = %id, error = %e, "deleting the data failed"),
            }
        }
        self.removing.insert(
            uid.to_string(),
            Removal {
                namespace: a.namespace.clone(),
                name: a.name.clone(),
            },
        );
        self.retry_removals().await;
    }

    /// Removes the labels of unassigned distributions; each one's status
    /// entry goes with the next write once its label is gone.
    async fn retry_removals(&mut self) {
        let uids: Vec<String> = self.removing.keys().cloned().collect();
        for uid in uids {
            let Some(r) = self.removing.get(&uid) else {
                continue;
            };
            let key = node_label_key(&r.namespace, &r.name);
            match set_label(&self.nodes, &self.args.node_name, &key, false).await {
                Ok(()) => {
                    self.removing.remove(&uid);
                    self.reporter.forget(&uid);
                }
                Err(e) => warn!(label = %key, error = %e, "removing the label failed; retrying"),
            }
        }
    }

    /// Labels the Node for every distribution complete here.
    async fn label_complete(&mut self) {
        for t in self.tracked.values_mut() {
            if t.labeled || t.running.is_none() {
                continue;
            }
            let complete = self
                .engine
                .status(&t.assignment.content_id)
                .is_some_and(|s| s.phase == Phase::Complete);
            if !complete {
                continue;
            }
            let key = node_label_key(&t.assignment.namespace, &t.assignment.name);
            match set_label(&self.nodes, &self.args.node_name, &key, true).await {
                Ok(()) => {
                    info!(label = %key, "node labelled: the distribution is complete here");
                    t.labeled = true;
                }
                Err(e) => warn!(label = %key, error = %e, "labelling the node failed; retrying"),
            }
        }
    }

    /// Writes the status if due; returns when the next write is due.
    async fn report(&mut self) -> Instant {
        let mut entries = Vec::new();
        for t in self.tracked.values() {
            entries.push(self.entry(t));
        }
        self.reporter.publish(entries, &self.removing).await
    }

    /// The status entry of one assignment.
    fn entry(&self, t: &Tracked) -> NodeDistributionStatus {
        let a = &t.assignment;
        let mut e = NodeDistributionStatus {
            namespace: a.namespace.clone(),
            name: a.name.clone(),
            uid: a.uid.clone(),
            phase: NodePhase::Pending,
            bytes_done: 0,
            content_id: Some(a.content_id.clone()),
            root: None,
            origin_version: None,
            size: a.size,
            pieces_done: 0,
            piece_count: a.piece_count().unwrap_or(0),
            bytes_from_origin: 0,
            bytes_from_peers: 0,
            bytes_per_second: 0,
            manifest_digest: None,
            digest: None,
            reason: None,
            message: None,
            last_transition_time: None,
        };
        match (&t.desired, &t.running) {
            (Desired::Wait { reason, message }, _) => {
                e.reason = Some((*reason).to_string());
                e.message = Some(message.clone());
            }
            (Desired::Invalid { reason, message }, _) => {
                e.phase = NodePhase::Failed;
                e.reason = Some((*reason).to_string());
                e.message = Some(message.clone());
            }
            (Desired::Run(_), Some(_)) => {
                let id = &a.content_id;
                if let Some(st) = self.engine.status(id) {
                    e.phase = match st.phase {
                        Phase::Pending => NodePhase::Pending,
                        Phase::Fetching => NodePhase::Downloading,
                        Phase::Complete => NodePhase::Complete,
                        Phase::Failed => NodePhase::Failed,
                    };
                    if st.size_known {
                        e.size = Some(st.size);
                        e.piece_count = u64::from(st.piece_count);
                    }
                    e.bytes_done = st.bytes_done;
                    e.pieces_done = u64::from(st.pieces_done);
                    e.bytes_from_origin = st.bytes_from_origin;
                    e.bytes_from_peers = st.bytes_from_peers;
                    e.bytes_per_second = st.rate.max(0.0) as u64;
                    e.reason = st.reason;
                    e.message = st.message;
                    // The root of the complete hash list (the authorities'
                    // vote for the pinned identity) and the origin version.
                    e.root.clone_from(&st.root);
                    e.origin_version = st.origin_version;
                    if e.phase == NodePhase::Complete {
                        e.digest = st.root;
                    }
                }
            }
            (Desired::Run(_), None) => {
                e.phase = NodePhase::Failed;
                e.reason = Some("InvalidAssignment".into());
                e.message = Some("the engine refused the content; see the agent log".into());
            }
        }
        e
    }
}

/// Starts a content, recording it in the manifest first.
fn start(engine: &Engine, manifest: &mut Manifest, t: &mut Tracked, cfg: ContentConfig, me: &str) {
    let a = &t.assignment;
    let seeder = matches!(&cfg.source, SourceConfig::Node { node, .. } if node == me);
    let entry = Entry {
        uid: a.uid.clone(),
        namespace: a.namespace.clone(),
        name: a.name.clone(),
        path: cfg.path.clone(),
        seeder,
    };
    if let Err(e) = manifest.insert(&cfg.id, entry) {
        warn!(error = %e, "updating the manifest failed");
    }
    info!(content = %cfg.id, distribution = %format!("{}/{}", a.namespace, a.name), size = ?cfg.size, "starting content");
    match engine.add(cfg.clone()) {
        Ok(()) => t.running = Some(cfg),
        Err(e) => {
            error!(content = %cfg.id, error = %e, "cannot start the content");
            t.running = None;
        }
    }
}

/// Resolves the endpoint of every node in `spec.peers` (IP literals
/// directly, names through DNS).
async fn resolve_peers(spec: &NodeFillSpec) -> HashMap<String, SocketAddr> {
    let mut out = HashMap::new();
    for p in &spec.peers {
        let addr = match p.endpoint.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => match tokio::net::lookup_host(p.endpoint.as_str()).await {
                Ok(mut it) => it.next(),
                Err(e) => {
                    warn!(peer = %p.node, endpoint = %p.endpoint, error = %e, "cannot resolve peer endpoint");
                    None
                }
            },
        };
        if let Some(a) = addr {
            out.insert(p.node.clone(), a);
        }
    }
    out
}

/// Sets (`true`) or removes the node label `key`.
async fn set_label(nodes: &Api<Node>, node: &str, key: &str, on: bool) -> Result<(), kube::Error> {
    let value = if on {
        json!(NODE_LABEL_VALUE)
    } else {
        serde_json::Value::Null
    };
    let patch = json!({ "metadata": { "labels": { key: value } } });
    match nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // No Node, no label to remove.
        Err(e) if !on && is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes the NodeFill status (merge patch on the status subresource) on
/// the schedule of [`report::next_write`].
struct Reporter {
    api: Api<NodeFill>,
    node: String,
    request: Request,
    zone: Option<String>,
    endpoint: Option<String>,
    fingerprint: Option<String>,
    /// When the agent became ready (the condition's transition time).
    ready_since: Option<Time>,
    waiting_since: Time,
    interval: Duration,
    last_write: Option<Instant>,
    /// The state part of the last status written (phases, sizes, ...).
    last_state: Option<serde_json::Value>,
    /// Last phase and transition time per uid.
    transitions: HashMap<String, (NodePhase, Time)>,
    /// Last entry written per uid (kept while a removal is pending).
    last_entries: BTreeMap<String, NodeDistributionStatus>,
    /// Events on the NodeFill (Warning when a distribution fails here).
    recorder: Recorder,
    /// The NodeFill, as events reference it.
    object_ref: Option<ObjectReference>,
}

impl Reporter {
    fn new(
        api: Api<NodeFill>,
        client: Client,
        args: &NodeArgs,
        request: Request,
        zone: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client,
            EventReporter {
                controller: "peerfill-agent".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Reporter {
            recorder,
            object_ref: None,
            api,
            node: args.node_name.clone(),
            request,
            zone,
            endpoint: None,
            fingerprint: None,
            ready_since: None,
            waiting_since: now_time(),
            interval: report::report_interval(None),
            last_write: None,
            last_state: None,
            transitions: HashMap::new(),
            last_entries: BTreeMap::new(),
        }
    }

    /// Records an Event for a distribution that just completed or failed
    /// here (in the background: events are best effort).
    fn event(&self, e: &NodeDistributionStatus) {
        let Some(reference) = self.object_ref.clone() else {
            return;
        };
        let dist = format!("{}/{}", e.namespace, e.name);
        let ev = match e.phase {
            NodePhase::Failed => KubeEvent {
                type_: EventType::Warning,
                reason: e.reason.clone().unwrap_or_else(|| "Failed".into()),
                note: Some(format!(
                    "{dist} failed on this node: {}",
                    e.message.as_deref().unwrap_or("no detail")
                )),
                action: "Fill".into(),
                secondary: None,
            },
            NodePhase::Complete => KubeEvent {
                type_: EventType::Normal,
                reason: "DistributionComplete".into(),
                note: Some(format!("{dist} is complete on this node")),
                action: "Fill".into(),
                secondary: None,
            },
            _ => return,
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(err) = recorder.publish(&ev, &reference).await {
                debug!(error = %err, "cannot record an event");
            }
        });
    }

    fn forget(&mut self, uid: &str) {
        self.transitions.remove(uid);
        self.last_entries.remove(uid);
    }

    async fn patch(&self, status: serde_json::Value) -> Result<(), kube::Error> {
        let patch = json!({ "status": status });
        self.api
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    }

    /// The request alone, while waiting for the certificate.
    async fn write_request(&self) -> Result<(), kube::Error> {
        self.patch(json!({
            "certificateRequest": self.request.csr_pem,
            "agentVersion": AGENT_VERSION,
            "zone": self.zone,
            "lastHeartbeat": now_time(),
            "conditions": [condition(
                false,
                "WaitingForCertificate",
                format!("certificate requested ({})", self.request.digest),
                &self.waiting_since,
            )],
        }))
        .await
    }

    /// Marks the agent not ready on a clean stop.
    async fn stopping(&self) {
        let r = self
            .patch(json!({
                "lastHeartbeat": now_time(),
                "conditions": [condition(false, "AgentStopped", "the agent is shutting down".into(), &now_time())],
            }))
            .await;
        if let Err(e) = r {
            debug!(error = %e, "cannot mark the agent stopped");
        }
    }

    /// Writes the full status if due; returns when the next write is due.
    async fn publish(
        &mut self,
        mut entries: Vec<NodeDistributionStatus>,
        removing: &BTreeMap<String, Removal>,
    ) -> Instant {
        let now = Instant::now();
        for e in &mut entries {
            let changed = self
                .transitions
                .get(&e.uid)
                .is_none_or(|(phase, _)| *phase != e.phase);
            if changed {
                self.transitions
                    .insert(e.uid.clone(), (e.phase, now_time()));
                self.event(e);
            }
            e.last_transition_time = self.transitions.get(&e.uid).map(|t| t.1.clone());
        }
        let assigned = entries.len();
        let complete = entries
            .iter()
            .filter(|e| e.phase == NodePhase::Complete)
            .count();
        // Entries of distributions being removed stay until their label is
        // gone (the operator releases its finalizer once they are).
        for uid in removing.keys() {
            if let Some(e) = self.last_entries.get(uid) {
                entries.push(e.clone());
            }
        }
        let state = json!({
            "endpoint": self.endpoint,
            "fingerprint": self.fingerprint,
            "distributions": entries.iter().map(|e| json!([e.uid, e.content_id, e.phase, e.size, e.reason, e.digest, e.root, e.origin_version])).collect::<Vec<_>>(),
        });
        let dirty = self.last_state.as_ref() != Some(&state);
        let due = report::next_write(now, self.last_write, self.interval, dirty);
        if due > now {
            return due;
        }
        let since = self.ready_since.clone().unwrap_or_else(now_time);
        let status = json!({
            "endpoint": self.endpoint,
            "certificateFingerprint": self.fingerprint,
            "zone": self.zone,
            "agentVersion": AGENT_VERSION,
            "certificateRequest": self.request.csr_pem,
            "lastHeartbeat": now_time(),
            "assigned": assigned,
            "complete": complete,
            // Always written, also empty: a merge patch replaces the list.
            "distributions": entries,
            "conditions": [condition(
                true,
                "Ready",
                format!("serving on {}", self.endpoint.as_deref().unwrap_or("?")),
                &since,
            )],
        });
        self.last_write = Some(now);
        match self.patch(status).await {
            Ok(()) => {
                self.last_state = Some(state);
                for e in entries {
                    self.last_entries.insert(e.uid.clone(), e);
                }
            }
            Err(e) => {
                // Retried after the spacing, as a state change.
                warn!(error = %e, "writing the NodeFill status failed");
                self.last_state = None;
            }
        }
        report::next_write(Instant::now(), self.last_write, self.interval, false)
    }
}
