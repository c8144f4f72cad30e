//! The thin Kubernetes shell around the pure decisions: reflectors give the
//! global view, a kube-runtime Controller reconciles Distributions (status,
//! finalizer, Events), and a node loop keeps one NodeFill per Node, answers
//! certificate requests and writes NodeFill specs that differ.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalized, finalizer};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use peerfill_agent::tls::ClusterCa;
use peerfill_crds::{
    Distribution, DistributionStatus, FINALIZER, NodeFill, NodeFillSpec, Phase, node_label_key,
};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::ca::{self, CsrDecision};
use crate::error::Error;
use crate::events::{self, Planned};
use crate::memory::Memory;
use crate::metrics::Metrics;
use crate::plan::{self, World};
use crate::status;
use crate::triggers::{self, FillKey, Trigger, WriteBudget};

/// The controller's name in Events and field managers.
pub const CONTROLLER_NAME: &str = "peerfill-operator";
/// Re-plan at least this often: agents go stale without any watch event.
const RESYNC: Duration = Duration::from_secs(5);
/// Changes arriving together are planned together.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Node/NodeFill changes of state reconcile every Distribution at most this
/// often (small clusters; see [`scaled`]).
const RECONCILE_ALL_EVERY: Duration = Duration::from_millis(500);
/// NodeFill spec writes per second on average once the burst is spent, and
/// the burst: a small cluster gets all its writes at once, a large one
/// stays under the cluster's ~50 writes/s with the agents' 20 periodic
/// status writes (crds `budget`).
const SPEC_WRITES_PER_SECOND: f64 = 20.0;
/// The burst also covers a pass that takes long (10 s of writes at the
/// rate): a pass over 5,000 nodes on a busy machine takes several seconds,
/// and a smaller burst would cap the rate at burst / pass time.
const SPEC_WRITE_BURST: f64 = 200.0;
/// NodeFill spec writes in flight at once.
const SPEC_WRITES_IN_FLIGHT: usize = 16;
/// An active Distribution looks at its nodes' progress this often.
/// Progress-only status changes are written at most every
/// `status::progress_write_interval_seconds` (this, or longer in large
/// clusters; changes of state at once), so status writes do not follow
/// every agent report.
const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a reconcile may take before it is retried.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest an Event may take to publish.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a deleted Distribution checks whether the agents are done.
const CLEANUP_POLL: Duration = Duration::from_secs(1);

/// State shared by the reconciler and the node loop.
pub struct Shared {
    client: Client,
    dists: Store<Distribution>,
    nodes: Store<Node>,
    fills: Store<NodeFill>,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    node_sync: Notify,
    /// Consecutive failures per Distribution uid, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Last status write per Distribution uid, to rate-limit progress.
    last_status_write: Mutex<HashMap<String, std::time::Instant>>,
    /// True once every store holds its first list (see `signal_ready`).
    ready: tokio::sync::watch::Receiver<bool>,
    /// `--allow-private-origins`.
    allow_private_origins: bool,
    /// What the decisions remember between reconciles (stalls, origin
    /// changes, disagreements).
    memory: Mutex<Memory>,
    /// Asks for a reconcile of every Distribution (throttled).
    dirty: Arc<Notify>,
}

impl Shared {
    /// A snapshot of everything the decisions read; records the nodes'
    /// progress in the memory first.
    fn world(&self) -> World {
        let world = World::new(
            self.dists.state(),
            self.nodes.state(),
            self.fills.state(),
            Timestamp::now(),
        );
        let memory = {
            let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
            memory.observe(&world.fills, world.now);
            memory.clone()
        };
        world.with(self.allow_private_origins, memory)
    }

    async fn publish(
        &self,
        planned: &Planned,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
    ) {
        let ev = KubeEvent {
            type_: if planned.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: planned.reason.clone(),
            note: Some(planned.note.chars().take(1000).collect()),
            action: planned.action.to_string(),
            secondary: None,
        };
        // Events are best effort: never let a slow API hold up a reconcile.
        match tokio::time::timeout(EVENT_TIMEOUT, self.recorder.publish(&ev, reference)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, reason = %planned.reason, "publishing an Event")
            }
            Err(_) => tracing::warn!(reason = %planned.reason, "publishing an Event timed out"),
        }
    }

    /// Waits until the three stores hold their first full list.
    async fn ready(&self) -> Result<(), Error> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| Error::WatchEnded { what: "store" })
    }

    /// The one waiter on the stores' readiness: kube's `wait_until_ready`
    /// keeps the waker of a single task only, so a second task waiting at
    /// the same time could sleep forever (seen: a restarted operator whose
    /// first reconcile hung while the node loop ran). Everyone else waits on
    /// `ready`, which this sets.
    async fn signal_ready(&self, ready: tokio::sync::watch::Sender<bool>) -> Result<(), Error> {
        let ended = |what| move |_| Error::WatchEnded { what };
        self.dists
            .wait_until_ready()
            .await
            .map_err(ended("Distribution"))?;
        self.nodes.wait_until_ready().await.map_err(ended("Node"))?;
        self.fills
            .wait_until_ready()
            .await
            .map_err(ended("NodeFill"))?;
        ready.send_replace(true);
        // Keep the sender (and with it the receivers' channel) alive.
        std::future::pending::<()>().await;
        Ok(())
    }
}

/// A JSON merge patch turning `old` into `new` at the top level: keys `new`
/// lacks are set to null (merge patches otherwise keep them).
pub fn replace_patch(old: &Value, new: &Value) -> Value {
    let mut patch = new.clone();
    if let (Some(old), Some(p)) = (old.as_object(), patch.as_object_mut()) {
        for key in old.keys() {
            p.entry(key.clone()).or_insert(Value::Null);
        }
    }
    patch
}

fn to_value<T: serde::Serialize>(what: &'static str, v: &T) -> Result<Value, Error> {
    serde_json::to_value(v).map_err(|source| Error::Serialize { what, source })
}

/// Runs the controller until a watch or the node loop fails for good.
pub async fn run(
    client: Client,
    ca: ClusterCa,
    metrics: Arc<Metrics>,
    instance: String,
    allow_private_origins: bool,
) -> Result<(), Error> {
    let (nodes, node_writer) = reflector::store::<Node>();
    let (fills, fill_writer) = reflector::store::<NodeFill>();
    // The stores hold every Node and NodeFill: keep only what the
    // decisions read (memory grows with the cluster). managedFields are
    // never read; a Node's status (images, conditions: kilobytes per node
    // on a real cluster) neither.
    let node_events = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()).modify(|n| {
            n.managed_fields_mut().clear();
            n.status = None;
        }),
    )
    .default_backoff();
    let fill_events = reflector::reflector(
        fill_writer,
        watcher(
            Api::<NodeFill>::all(client.clone()),
            watcher::Config::default(),
        )
        // The peer lists are most of a NodeFill's bytes and the plan never
        // reads them back: the store keeps their hash (triggers::slim).
        .modify(triggers::slim),
    )
    .default_backoff();
    let (trigger_tx, trigger_rx) = futures::channel::mpsc::channel::<()>(1);
    let controller = Controller::new(
        Api::<Distribution>::all(client.clone()),
        watcher::Config::default(),
    )
    .reconcile_all_on(trigger_rx);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: Some(instance),
        },
    );
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let dirty = Arc::new(Notify::new());
    let shared = Arc::new(Shared {
        client,
        dists: controller.store(),
        nodes,
        fills,
        metrics,
        recorder,
        node_sync: Notify::new(),
        failures: Mutex::new(HashMap::new()),
        last_status_write: Mutex::new(HashMap::new()),
        ready: ready_rx,
        allow_private_origins,
        memory: Mutex::new(Memory::default()),
        dirty: dirty.clone(),
    });

    // Node/NodeFill events are reduced to what they change (triggers.rs):
    // heartbeats nothing, progress nothing at once (active Distributions
    // requeue at their progress cadence), a change of state a re-plan and a
    // reconcile of every Distribution. Both are throttled (not debounced: a
    // debounce would starve while agents keep reporting), more in larger
    // clusters.
    let pump = {
        let shared = shared.clone();
        let dirty = dirty.clone();
        async move {
            let mut events = std::pin::pin!(stream::select(
                node_events.map(|e| e.map(Watched::Node)),
                fill_events.map(|e| e.map(Watched::Fill)),
            ));
            let mut seen = Seen::default();
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => {
                        let trigger = seen.trigger(event, Timestamp::now());
                        shared.metrics.observe_trigger(trigger);
                        if trigger == Trigger::State {
                            dirty.notify_one();
                            shared.node_sync.notify_one();
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "watching Nodes/NodeFills"),
                }
            }
            Err::<(), _>(Error::WatchEnded {
                what: "Node/NodeFill",
            })
        }
    };
    let throttle = {
        let shared = shared.clone();
        async move {
            let mut trigger_tx = trigger_tx;
            loop {
                dirty.notified().await;
                // Full: a reconcile-all is already pending.
                let _ = trigger_tx.try_send(());
                tokio::time::sleep(scaled(RECONCILE_ALL_EVERY, shared.nodes.state().len())).await;
            }
        }
    };
    let reconciler = controller
        .run(reconcile, error_policy, shared.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile");
            }
        });
    tokio::select! {
        r = shared.signal_ready(ready_tx) => r,
        r = pump => r,
        r = node_loop(shared.clone(), ca) => r,
        () = reconciler => Err(Error::WatchEnded { what: "Distribution" }),
        () = throttle => Ok(()),
    }
}

/// `base` in clusters up to 500 nodes, then growing with the node count
/// (5 s at 5,000 for the 500 ms reconcile-all period): the work of a
/// reconcile grows with the cluster, so they get rarer.
fn scaled(base: Duration, nodes: usize) -> Duration {
    base.max(base.mul_f64(nodes as f64 / 500.0))
}

/// The shortest time between two re-plans of the NodeFills: [`DEBOUNCE`]
/// up to 100 nodes, then 1 ms per node (1 s at 1,000, 5 s at 5,000 — the
/// [`RESYNC`] period). A re-plan costs in proportion to the cluster, and
/// what it reacts to (a node joining, an agent coming up, pins) can wait a
/// few seconds in a cluster that size.
fn replan_every(nodes: usize) -> Duration {
    DEBOUNCE.max(Duration::from_millis(nodes as u64))
}

/// One watch event of the node side (short-lived: the size difference of
/// the variants does not matter).
#[allow(clippy::large_enum_variant)]
enum Watched {
    Node(watcher::Event<Node>),
    Fill(watcher::Event<NodeFill>),
}

/// The last projection seen of every Node and NodeFill (a few words each).
#[derive(Default)]
struct Seen {
    nodes: HashMap<String, u64>,
    fills: HashMap<String, FillKey>,
}

impl Seen {
    fn trigger(&mut self, event: Watched, now: Timestamp) -> Trigger {
        use watcher::Event as E;
        match event {
            Watched::Node(E::Apply(n) | E::InitApply(n)) => {
                let key = triggers::node_key(&n);
                triggers::node_trigger(self.nodes.insert(n.name_any(), key), key)
            }
            Watched::Fill(E::Apply(f) | E::InitApply(f)) => {
                let key = triggers::fill_key(&f, now);
                triggers::fill_trigger(self.fills.insert(f.name_any(), key), key)
            }
            Watched::Node(E::Delete(n)) => {
                self.nodes.remove(&n.name_any());
                Trigger::State
            }
            Watched::Fill(E::Delete(f)) => {
                self.fills.remove(&f.name_any());
                Trigger::State
            }
            // A relist: what it brings is judged item by item; its end
            // may have dropped objects, so look again.
            Watched::Node(E::Init) | Watched::Fill(E::Init) => Trigger::Nothing,
            Watched::Node(E::InitDone) | Watched::Fill(E::InitDone) => Trigger::State,
        }
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << failures.min(10)))
        .min(Duration::from_secs(300))
}

fn error_policy(dist: Arc<Distribution>, error: &Error, shared: Arc<Shared>) -> Action {
    if error.is_waiting() {
        tracing::debug!(distribution = %dist.name_any(), %error, "cleanup pending");
        return Action::requeue(CLEANUP_POLL);
    }
    shared.metrics.reconcile_errors.inc();
    let uid = dist.uid().unwrap_or_default();
    let failures = {
        let mut map = shared.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(uid).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures);
    tracing::warn!(
        distribution = %format!("{}/{}", dist.namespace().unwrap_or_default(), dist.name_any()),
        %error,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

async fn reconcile(dist: Arc<Distribution>, shared: Arc<Shared>) -> Result<Action, Error> {
    let _timer = shared.metrics.reconcile_duration.start_timer();
    // A reconcile that hangs would hold its object forever (the Controller
    // never runs one object twice at once): bound it, retry with backoff.
    tokio::time::timeout(RECONCILE_TIMEOUT, reconcile_inner(dist, &shared))
        .await
        .unwrap_or(Err(Error::Timeout {
            what: "reconcile",
            after: RECONCILE_TIMEOUT,
        }))
}

async fn reconcile_inner(dist: Arc<Distribution>, shared: &Arc<Shared>) -> Result<Action, Error> {
    shared.ready().await?;
    let ns = dist.namespace().unwrap_or_default();
    let api: Api<Distribution> = Api::namespaced(shared.client.clone(), &ns);
    if dist.finalizers().is_empty() && dist.metadata.deletion_timestamp.is_none() {
        return add_first_finalizer(&dist, &api).await;
    }
    let result = finalizer(&api, FINALIZER, dist.clone(), |event| async {
        match event {
            Finalized::Apply(d) => apply(&d, &api, shared).await,
            Finalized::Cleanup(d) => cleanup(&d, &api, shared).await,
        }
    })
    .await;
    let result = match result {
        // Released by an earlier reconcile that the store had not seen yet.
        Err(kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(e)))
            if e.code == 404 =>
        {
            Ok(Action::await_change())
        }
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    };
    if result.is_ok() {
        let uid = dist.uid().unwrap_or_default();
        shared
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&uid);
    }
    result
}

/// Adds our finalizer to an object without any. kube's finalizer helper
/// does this with a JSON patch `test /metadata/finalizers == null`, which
/// the API stand-in (unlike the real API server) refuses for an absent
/// field; guarding on the resourceVersion is as safe and works on both.
async fn add_first_finalizer(
    dist: &Distribution,
    api: &Api<Distribution>,
) -> Result<Action, Error> {
    let name = dist.name_any();
    let patch: json_patch::Patch = serde_json::from_value(json!([
        { "op": "test", "path": "/metadata/resourceVersion", "value": dist.resource_version() },
        { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
    ]))
    .map_err(|source| Error::Serialize {
        what: "finalizer patch",
        source,
    })?;
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(Error::kube("add finalizer to", "Distribution", &name))?;
    // The change triggers the next reconcile.
    Ok(Action::await_change())
}

/// What [`write_status`] did.
#[derive(Debug, PartialEq, Eq)]
enum StatusWrite {
    Unchanged,
    Done,
    /// A progress-only change inside the progress write interval.
    Deferred,
}

/// Writes `new` as the status when it differs, then publishes the Events
/// of the change.
async fn write_status(
    dist: &Distribution,
    api: &Api<Distribution>,
    shared: &Shared,
    new: DistributionStatus,
) -> Result<StatusWrite, Error> {
    if dist.status.as_ref() == Some(&new) {
        return Ok(StatusWrite::Unchanged);
    }
    let uid = dist.uid().unwrap_or_default();
    if status::progress_only_change(dist.status.as_ref(), &new) {
        let last = shared
            .last_status_write
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&uid)
            .copied();
        let interval = status::progress_write_interval_seconds(
            peerfill_crds::budget::report_interval_seconds(shared.nodes.state().len()),
        );
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(u64::from(interval))) {
            return Ok(StatusWrite::Deferred);
        }
    }
    let name = dist.name_any();
    let old = to_value("status", &dist.status.clone().unwrap_or_default())?;
    let patch = json!({ "status": replace_patch(&old, &to_value("status", &new)?) });
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(Error::kube("patch status of", "Distribution", &name))?;
    shared
        .last_status_write
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(uid, std::time::Instant::now());
    let reference = dist.object_ref(&());
    for planned in events::events(dist.status.as_ref(), &new) {
        shared.publish(&planned, &reference).await;
    }
    Ok(StatusWrite::Done)
}

async fn apply(
    dist: &Distribution,
    api: &Api<Distribution>,
    shared: &Shared,
) -> Result<Action, Error> {
    shared.node_sync.notify_one();
    let world = shared.world();
    // The status needs no peers (plan_decisions leaves them out).
    let plan = plan::plan_decisions(dist, &world);
    let new = status::aggregate(dist, plan.as_ref(), &world);
    let (phase, ready) = (new.phase, new.ready.clone());
    // Only for the content id the status describes (a restart moved on).
    let disagreeing = plan.as_ref().is_ok_and(|p| {
        p.disagreement.is_some() && new.content_id.as_deref() == Some(p.content_id.as_str())
    });
    let revised = new.origin_revision.unwrap_or(0)
        > dist
            .status
            .as_ref()
            .and_then(|s| s.origin_revision)
            .unwrap_or(0);
    let written = write_status(dist, api, shared, new.clone()).await?;
    shared
        .memory
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .note_status(
            &dist.uid().unwrap_or_default(),
            dist.status.as_ref(),
            &new,
            disagreeing,
            world.now,
        );
    if revised {
        // The new revision is in the status now: the next plan gives every
        // node the new content id.
        tracing::warn!(
            distribution = %format!("{}/{}", dist.namespace().unwrap_or_default(), dist.name_any()),
            revision = new.origin_revision.unwrap_or(0),
            "the origin changed; restarting on a new content id"
        );
        shared.node_sync.notify_one();
    }
    tracing::debug!(
        distribution = %format!("{}/{}", dist.namespace().unwrap_or_default(), dist.name_any()),
        ?phase,
        ?ready,
        ?written,
        "reconciled"
    );
    // Progress alone triggers nothing (see `Seen`): an active
    // Distribution looks at it at the progress cadence.
    if written == StatusWrite::Deferred
        || matches!(phase, Some(Phase::Pending | Phase::Progressing))
    {
        return Ok(Action::requeue(PROGRESS_WRITE_INTERVAL));
    }
    // Agents go stale without any event: look again now and then.
    Ok(Action::requeue(Duration::from_secs(15)))
}

/// control-path.md "Removal": the plan already leaves the Distribution out
/// (it is being deleted); wait until no up agent lists it, removing the
/// node label ourselves where the agent is down.
async fn cleanup(
    dist: &Distribution,
    api: &Api<Distribution>,
    shared: &Shared,
) -> Result<Action, Error> {
    shared.node_sync.notify_one();
    let world = shared.world();
    let uid = dist.uid().unwrap_or_default();
    let label = node_label_key(&dist.namespace().unwrap_or_default(), &dist.name_any());
    let mut waiting = Vec::new();
    for (name, fill) in &world.fills {
        let listed = fill.spec.distributions.iter().any(|a| a.uid == uid)
            || fill
                .status
                .as_ref()
                .is_some_and(|s| s.distributions.iter().any(|d| d.uid == uid));
        if listed && world.nodes.contains_key(name) && world.agent_up(name) {
            waiting.push(name.clone());
        }
    }
    let nodes_api: Api<Node> = Api::all(shared.client.clone());
    for (name, node) in &world.nodes {
        if node.labels().contains_key(&label) && !world.agent_up(name) {
            // The annotation with the same key names the version held.
            let patch = json!({ "metadata": {
                "labels": { label.clone(): null },
                "annotations": { label.clone(): null },
            } });
            nodes_api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(Error::kube("remove label from", "Node", name))?;
            tracing::info!(node = %name, %label, "removed the label of a node whose agent is down");
        }
    }
    write_status(
        dist,
        api,
        shared,
        status::deleting_status(dist, waiting.len(), world.now),
    )
    .await?;
    if waiting.is_empty() {
        shared
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(&uid);
        // A Distribution that lost a path conflict to this one gets its
        // turn now: look at every Distribution again.
        shared.dirty.notify_one();
        tracing::info!(distribution = %format!("{}/{}", dist.namespace().unwrap_or_default(), dist.name_any()), "content removed from every node; releasing the finalizer");
        Ok(Action::await_change())
    } else {
        Err(Error::CleanupPending {
            remaining: waiting.len(),
            nodes: waiting.join(", "),
        })
    }
}

/// Keeps one NodeFill per Node, answers certificate requests and writes the
/// planned specs, on every change and every [`RESYNC`].
async fn node_loop(shared: Arc<Shared>, ca: ClusterCa) -> Result<(), Error> {
    shared.ready().await?;
    let mut refused: HashSet<(String, String)> = HashSet::new();
    let mut failures = 0u32;
    let mut budget = WriteBudget::new(
        SPEC_WRITES_PER_SECOND,
        SPEC_WRITE_BURST,
        std::time::Instant::now(),
    );
    loop {
        let started = std::time::Instant::now();
        let synced = sync_nodes(&shared, &ca, &mut refused, &mut budget).await;
        // The pass's snapshot and specs are gone: give their pages back.
        crate::heap::release_free_memory();
        match synced {
            Ok(0) => failures = 0,
            Ok(deferred) => {
                failures = 0;
                // The rest goes out as the budget refills.
                tracing::debug!(
                    deferred,
                    "NodeFill spec writes deferred by the write budget"
                );
                // Not sooner than a re-plan may run: a pass per token
                // would re-plan the whole cluster for each write.
                let nodes = shared.nodes.state().len();
                let pause = budget.wait().max(replan_every(nodes));
                tokio::time::sleep(pause.saturating_sub(started.elapsed())).await;
                continue;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                shared.metrics.reconcile_errors.inc();
                let delay = backoff(failures);
                tracing::warn!(error = %e, retry_in = ?delay, "syncing NodeFills failed");
                tokio::time::sleep(delay).await;
                continue;
            }
        }
        tokio::select! {
            () = shared.node_sync.notified() => {
                // Re-plan at most every `scaled(DEBOUNCE)`: planning costs
                // in proportion to the cluster.
                let min = replan_every(shared.nodes.state().len());
                tokio::time::sleep(DEBOUNCE.max(min.saturating_sub(started.elapsed()))).await;
            }
            () = tokio::time::sleep(RESYNC) => {}
        }
    }
}

/// Returns how many spec writes the budget deferred.
async fn sync_nodes(
    shared: &Shared,
    ca: &ClusterCa,
    refused: &mut HashSet<(String, String)>,
    budget: &mut WriteBudget,
) -> Result<usize, Error> {
    let world = shared.world();
    let fills_api: Api<NodeFill> = Api::all(shared.client.clone());
    let interval = peerfill_crds::budget::report_interval_seconds(world.nodes.len());

    // One NodeFill per Node, owned by it so it goes with the Node.
    for (name, node) in &world.nodes {
        if world.fills.contains_key(name) || node.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let fill = NodeFill {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: name.clone(),
                    uid: node.uid().unwrap_or_default(),
                    controller: Some(false),
                    block_owner_deletion: None,
                }]),
                ..ObjectMeta::default()
            },
            spec: NodeFillSpec {
                report_interval_seconds: Some(interval),
                ..NodeFillSpec::default()
            },
            status: None,
        };
        match fills_api.create(&PostParams::default(), &fill).await {
            Ok(_) => tracing::info!(node = %name, "created NodeFill"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(Error::kube("create", "NodeFill", name)(e)),
        }
    }

    // Certificate requests.
    let mut identities = HashMap::new();
    for (name, fill) in &world.fills {
        match ca::csr_decision(fill, world.nodes.get(name).map(Arc::as_ref)) {
            CsrDecision::Nothing => {}
            CsrDecision::Sign { csr, digest } => {
                if refused.contains(&(name.clone(), digest.clone())) {
                    continue;
                }
                match ca::answer(ca, name, &csr, digest.clone()) {
                    Ok(identity) => {
                        identities.insert(name.clone(), identity);
                    }
                    Err(e) => refuse(shared, fill, refused, digest, e.to_string()).await,
                }
            }
            CsrDecision::Refuse { digest, reason } => {
                if !refused.contains(&(name.clone(), digest.clone())) {
                    refuse(shared, fill, refused, digest, reason).await;
                }
            }
        }
    }

    // The planned specs, written where they differ, changes of state first
    // and within the write budget. One node's failure does not hold up the
    // others; the first error is returned for the backoff. Specs are built
    // one at a time and dropped once compared: at 5,000 nodes all of them
    // at once would take hundreds of MiB.
    let planned = plan::plan_nodes(&world);
    let desired = |name: &str, fill: &NodeFill, identities: &HashMap<String, _>| {
        let mut spec = planned.spec(&world, name, fill);
        if let Some(identity) = identities.get(name) {
            spec.identity = Some(Clone::clone(identity));
        }
        spec
    };
    let mut changes = Vec::new();
    for (name, fill) in &world.fills {
        let mut spec = desired(name, fill, &identities);
        changes.push((
            triggers::stored_spec_change(fill, &mut spec),
            name.clone(),
            (),
        ));
    }
    let authorities: std::collections::BTreeSet<&str> = planned
        .distributions
        .values()
        .flat_map(|d| d.authorities())
        .collect();
    let changes = triggers::order_writes(changes, &authorities);
    let mut deferred = 0;
    let mut chosen = Vec::new();
    for (_, name, ()) in changes {
        let Some(fill) = world.fills.get(&name) else {
            continue;
        };
        // An answer to a certificate request is never deferred: the agent
        // can do nothing without it, and asks once per start or renewal.
        let issued = identities.contains_key(&name);
        if !issued && !budget.take(std::time::Instant::now()) {
            deferred += 1;
            continue;
        }
        chosen.push((name.clone(), desired(&name, fill, &identities), issued));
    }
    // Several at once: one at a time, the API's latency (not the budget)
    // would set the pace of a large cluster's spec writes.
    let results: Vec<Result<(), Error>> = stream::iter(chosen)
        .map(|(name, spec, issued)| {
            let fills_api = fills_api.clone();
            async move {
                let patch = triggers::spec_patch(&spec);
                fills_api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(Error::kube("patch spec of", "NodeFill", &name))?;
                shared.metrics.spec_writes.inc();
                if issued {
                    shared.metrics.certificates_issued.inc();
                    tracing::info!(node = %name, "issued the node certificate");
                }
                tracing::debug!(node = %name, assignments = spec.distributions.len(), "wrote NodeFill spec");
                Ok(())
            }
        })
        .buffer_unordered(SPEC_WRITES_IN_FLIGHT)
        .collect()
        .await;
    let mut first_error = None;
    for e in results.into_iter().filter_map(Result::err) {
        tracing::warn!(error = %e, "writing a NodeFill spec");
        first_error.get_or_insert(e);
    }

    // Distributions by phase, and the per-Distribution gauges.
    shared.metrics.observe_distributions(&world.distributions);
    first_error.map_or(Ok(deferred), Err)
}

async fn refuse(
    shared: &Shared,
    fill: &NodeFill,
    refused: &mut HashSet<(String, String)>,
    digest: String,
    reason: String,
) {
    let name = fill.name_any();
    tracing::warn!(node = %name, %reason, "refused a certificate request");
    let planned = Planned {
        warning: true,
        reason: "CertificateRequestRefused".into(),
        action: "IssueCertificate",
        note: reason,
    };
    shared.publish(&planned, &fill.object_ref(&())).await;
    refused.insert((name, digest));
}

/// The CA Secret API of the operator's namespace.
pub fn secrets(client: &Client, namespace: &str) -> Api<Secret> {
    Api::namespaced(client.clone(), namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_patches_null_what_is_gone() {
        let old = json!({"a": 1, "b": [1], "c": "x"});
        let new = json!({"a": 2});
        assert_eq!(
            replace_patch(&old, &new),
            json!({"a": 2, "b": null, "c": null})
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(40), Duration::from_secs(300));
    }
}
