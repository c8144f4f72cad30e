//! The local cluster: the API stand-in, Node objects, the real
//! `peerfill-operator` and one `peerfill-agent node` process per node, and an
//! HTTP origin — for the end-to-end tests and the demo.
//!
//! # Local
//!
//! ```no_run
//! # async fn demo() -> Result<(), peerfill_e2e::cluster::ClusterError> {
//! use peerfill_e2e::cluster::{Cluster, LocalClusterOptions, http_distribution};
//! let mut cluster = Cluster::start(LocalClusterOptions { nodes: 8, ..Default::default() }).await?;
//! let blob = cluster.origin().add_blob("weights.bin", 64 << 20, 1);
//! let dist = http_distribution("weights", &blob.url, "models/weights.bin");
//! cluster.apply_distribution(&dist).await?;
//! let done = cluster
//!     .wait_distribution(&dist, std::time::Duration::from_secs(90), "Complete", |d| {
//!         d.status.as_ref().is_some_and(|s| s.is_condition_true("Complete"))
//!     })
//!     .await?;
//! # let _ = done; Ok(()) }
//! ```
//!
//! [`LocalCluster::start`] starts the stand-in in-process with the CRDs of
//! `crds/`, writes `<work dir>/kubeconfig`, creates namespace
//! [`SYSTEM_NAMESPACE`] and Nodes `node-1..N` (labels
//! `kubernetes.io/hostname`, `kubernetes.io/os=linux`,
//! `topology.kubernetes.io/zone` = `zone-a|b|c`, [`POOL_LABEL`] = `general`;
//! InternalIP = the node's own loopback address `127.0.1.<i>`), then
//! spawns the operator(s) (`POD_NAME=operator-<k>`, leader election in
//! [`SYSTEM_NAMESPACE`], metrics on 127.0.0.1) and one agent per node
//! (QUIC and metrics on the node's address, data and identity dirs under
//! `<work dir>/nodes/<node>/`). Child output goes to `<work dir>/logs/*.log`.
//! Every child is SIGKILLed when the cluster is dropped (also on panic, and
//! by the kernel if the test process dies); the work dir is removed unless
//! `PEERFILL_E2E_KEEP=1` or [`LocalClusterOptions::keep_work_dir`].
//!
//! Binaries are taken from next to the running executable (`target/<profile>/`);
//! build them first with `cargo build --workspace --bins`. Both binaries get
//! [`ALLOW_PRIVATE_ORIGINS`] (the origin is on loopback) when their `--help`
//! lists it.
//!
//! Faults for the chaos suite (`tests/chaos.rs`): agents can be SIGSTOPped
//! and continued ([`LocalCluster::signal_agent`]), crashed and started
//! through a shared reference ([`LocalCluster::crash_agent`],
//! [`LocalCluster::start_agent`]), and given extra environment
//! ([`NodeOptions::env`], e.g. the test-only disk-cap fault); the
//! [`Origin`] can replace a blob by another version ([`Origin::replace_blob`],
//! with or without validators), go down ([`Outage`]) and cut connections,
//! and answers conditional requests as nginx does.
//!
//! # Real cluster
//!
//! With `E2E_KUBECONFIG` set, [`Cluster::start`] starts no process and talks
//! to that cluster (peerfill installed by the chart in `E2E_NAMESPACE`,
//! default `peerfill-system`, release `E2E_RELEASE`, default `peerfill`):
//! node add/remove are skipped with a printed reason (the methods return
//! `None`/`false`), killing an agent deletes its pod (selected by the chart's
//! labels `app.kubernetes.io/instance=<release>,app.kubernetes.io/component=agent`
//! and `spec.nodeName`), restarting it waits for the DaemonSet, and files on
//! nodes are checked through the digest in the NodeFill status instead of
//! reading the node's disk. The in-process origin must then be reachable
//! from the nodes: `E2E_ORIGIN_LISTEN` (bind address, default
//! `127.0.0.1:0`) and `E2E_ORIGIN_HOST` (host the nodes use in URLs).

mod dist;
mod local;
mod origin;
pub mod process;
mod remote;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Taint;
use peerfill_crds::{Distribution, NodeDistributionStatus};

pub use dist::{
    TestNode, agent_ready, http_distribution, is_complete, is_failed, matching_nodes,
    node_source_distribution, progress_in,
};
pub(crate) use local::free_tcp;
pub use local::{ALLOW_PRIVATE_ORIGINS, AgentSignal, LocalCluster, LocalClusterOptions, LocalNode};
pub use origin::{
    Blob, Edits, NOT_FOUND_PATH, Origin, Outage, Served, Validators, generate, generate_edited,
};
pub use process::{BIN_DIR_ENV, ChildProcess, binary_path, tail};
pub use remote::RemoteCluster;

/// Namespace of the operator's Lease and CA Secret.
pub const SYSTEM_NAMESPACE: &str = "peerfill-system";
/// Name of the operator's leader-election Lease.
pub const LEASE_NAME: &str = "peerfill-operator";
/// Node pool label (the same key as the kind cluster of `e2e/kind`).
pub const POOL_LABEL: &str = "peerfill-e2e/pool";
/// Pool of ordinary nodes.
pub const POOL_GENERAL: &str = "general";
/// Pool of tainted nodes ([`NodeOptions::tainted`]).
pub const POOL_TAINTED: &str = "tainted";
/// Taint key of the tainted pool (effect NoSchedule, value `true`).
pub const TAINT_KEY: &str = "peerfill-e2e/dedicated";
/// Zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Hostname label.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// Set to `1` to keep the work dir (logs, data dirs, kubeconfig).
pub const KEEP_ENV: &str = "PEERFILL_E2E_KEEP";
/// Set to a kubeconfig path to run against a real cluster.
pub const KUBECONFIG_ENV: &str = "E2E_KUBECONFIG";

/// Errors of the cluster harness.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "binary `{name}` not found (looked in {searched:?}): run `cargo build --workspace --bins` first"
    )]
    BinaryMissing {
        name: String,
        searched: Vec<PathBuf>,
    },
    #[error("starting {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("API stand-in: {0}")]
    ApiServer(#[from] crate::apiserver::ServerError),
    #[error("{what}: {source}")]
    Kube { what: String, source: kube::Error },
    #[error("timed out after {secs:.0}s waiting for {what}\n{diagnostics}")]
    Timeout {
        what: String,
        secs: f64,
        diagnostics: String,
    },
    #[error("no node {0} in this cluster")]
    NoSuchNode(String),
    #[error("no operator #{0} in this cluster")]
    NoSuchOperator(usize),
    #[error("{0}")]
    Invalid(String),
    #[error("content on node {node}: {detail}")]
    Content { node: String, detail: String },
}

impl ClusterError {
    pub(crate) fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ClusterError {
        let what = what.into();
        move |source| ClusterError::Kube { what, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
        let what = what.into();
        move |source| ClusterError::Io { what, source }
    }
}

/// Extra labels, taints and agent of one node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Added to (or overriding) the default labels.
    pub labels: BTreeMap<String, String>,
    /// `spec.taints` of the Node.
    pub taints: Vec<Taint>,
    /// Whether an agent runs on the node (default true).
    pub start_agent: bool,
    /// Extra environment of the node's agent (e.g. the test-only fault
    /// switches `PEERFILL_ALLOW_FAULTS=1`, `PEERFILL_FAULT_DISK_CAP_FILE`).
    pub agent_env: Vec<(String, String)>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            labels: BTreeMap::new(),
            taints: Vec::new(),
            start_agent: true,
            agent_env: Vec::new(),
        }
    }
}

impl NodeOptions {
    /// A node of the tainted pool: [`POOL_LABEL`]=[`POOL_TAINTED`] and taint
    /// [`TAINT_KEY`]`=true:NoSchedule` (as in the kind cluster).
    pub fn tainted() -> Self {
        NodeOptions {
            labels: BTreeMap::from([(POOL_LABEL.to_string(), POOL_TAINTED.to_string())]),
            taints: vec![Taint {
                key: TAINT_KEY.to_string(),
                value: Some("true".to_string()),
                effect: "NoSchedule".to_string(),
                time_added: None,
            }],
            start_agent: true,
            agent_env: Vec::new(),
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// Adds an environment variable of the node's agent.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.agent_env.push((key.to_string(), value.to_string()));
        self
    }
}

/// A local cluster, or a real one when `E2E_KUBECONFIG` is set; tests use
/// this so that they run unchanged against both (see the module docs).
#[allow(clippy::large_enum_variant)]
pub enum Cluster {
    /// Processes on this machine.
    Local(LocalCluster),
    /// A real cluster with peerfill installed.
    Remote(RemoteCluster),
}

impl Cluster {
    /// A [`RemoteCluster`] if `E2E_KUBECONFIG` is set (then `opts` is not
    /// used), else a [`LocalCluster`] started with `opts`.
    pub async fn start(opts: LocalClusterOptions) -> Result<Cluster, ClusterError> {
        match std::env::var_os(KUBECONFIG_ENV) {
            Some(path) if !path.is_empty() => Ok(Cluster::Remote(
                RemoteCluster::connect(Path::new(&path)).await?,
            )),
            _ => Ok(Cluster::Local(LocalCluster::start(opts).await?)),
        }
    }

    /// The local cluster, if this is one.
    pub fn local(&self) -> Option<&LocalCluster> {
        match self {
            Cluster::Local(l) => Some(l),
            Cluster::Remote(_) => None,
        }
    }

    /// The local cluster, if this is one.
    pub fn local_mut(&mut self) -> Option<&mut LocalCluster> {
        match self {
            Cluster::Local(l) => Some(l),
            Cluster::Remote(_) => None,
        }
    }

    /// Whether this is the local cluster.
    pub fn is_local(&self) -> bool {
        matches!(self, Cluster::Local(_))
    }

    /// A kube client for the cluster.
    pub fn client(&self) -> kube::Client {
        match self {
            Cluster::Local(l) => l.client(),
            Cluster::Remote(r) => r.client(),
        }
    }

    /// Kubeconfig for `kubectl --kubeconfig`.
    pub fn kubeconfig_path(&self) -> &Path {
        match self {
            Cluster::Local(l) => l.kubeconfig_path(),
            Cluster::Remote(r) => r.kubeconfig_path(),
        }
    }

    /// The HTTP origin.
    pub fn origin(&self) -> &Origin {
        match self {
            Cluster::Local(l) => l.origin(),
            Cluster::Remote(r) => r.origin(),
        }
    }

    /// Adds a node (Node object + agent) and returns its name; `None` (with
    /// the reason printed) on a real cluster.
    pub async fn add_node(&mut self, opts: NodeOptions) -> Result<Option<String>, ClusterError> {
        match self {
            Cluster::Local(l) => l.add_node(opts).await.map(Some),
            Cluster::Remote(_) => {
                skip("add_node: a real cluster's nodes are not created by the suite");
                Ok(None)
            }
        }
    }

    /// Deletes the Node object and kills its agent; `false` (with the
    /// reason printed) on a real cluster.
    pub async fn remove_node(&mut self, name: &str) -> Result<bool, ClusterError> {
        match self {
            Cluster::Local(l) => l.remove_node(name).await.map(|()| true),
            Cluster::Remote(_) => {
                skip("remove_node: a real cluster's nodes are not deleted by the suite");
                Ok(false)
            }
        }
    }

    /// Kills the node's agent (SIGKILL locally; deletes its pod on a real
    /// cluster, which the DaemonSet replaces).
    pub async fn kill_agent(&mut self, node: &str) -> Result<(), ClusterError> {
        match self {
            Cluster::Local(l) => l.kill_agent(node),
            Cluster::Remote(r) => r.delete_agent_pod(node).await,
        }
    }

    /// Starts the node's agent again (locally the same command line, data
    /// and identity dirs; on a real cluster waits for the replacement pod to
    /// run).
    pub async fn restart_agent(&mut self, node: &str) -> Result<(), ClusterError> {
        match self {
            Cluster::Local(l) => l.restart_agent(node),
            Cluster::Remote(r) => r.wait_agent_pod_running(node).await,
        }
    }

    /// The holder of the operator Lease (`POD_NAME` of the leader).
    pub async fn leader(&self) -> Result<Option<String>, ClusterError> {
        dist::lease_holder(&self.client(), self.system_namespace()).await
    }

    /// Kills the operator holding the Lease; returns its name. Locally the
    /// process gets SIGKILL (restart it with [`Cluster::restart_operator`]);
    /// on a real cluster its pod is deleted.
    pub async fn kill_leader(&mut self) -> Result<String, ClusterError> {
        let holder = self
            .leader()
            .await?
            .ok_or_else(|| ClusterError::Invalid("no operator holds the Lease".into()))?;
        match self {
            Cluster::Local(l) => l.kill_operator_named(&holder)?,
            Cluster::Remote(r) => r.delete_operator_pod(&holder).await?,
        }
        Ok(holder)
    }

    /// Kills operator `operator-<k>` (locally; on a real cluster deletes
    /// that pod if the name matches a pod).
    pub async fn kill_operator(&mut self, k: usize) -> Result<(), ClusterError> {
        match self {
            Cluster::Local(l) => l.kill_operator(k),
            Cluster::Remote(r) => r.delete_operator_pod_index(k).await,
        }
    }

    /// Starts operator `operator-<k>` again (no-op on a real cluster: the
    /// Deployment replaces deleted pods).
    pub async fn restart_operator(&mut self, k: usize) -> Result<(), ClusterError> {
        match self {
            Cluster::Local(l) => l.restart_operator(k),
            Cluster::Remote(_) => Ok(()),
        }
    }

    /// Namespace of the operator's Lease and CA.
    pub fn system_namespace(&self) -> &str {
        match self {
            Cluster::Local(_) => SYSTEM_NAMESPACE,
            Cluster::Remote(r) => r.namespace(),
        }
    }

    /// Nodes of the cluster with their labels and taints.
    pub async fn nodes(&self) -> Result<Vec<TestNode>, ClusterError> {
        dist::list_nodes(&self.client()).await
    }

    /// Creates or updates `dist` (server-side apply, field manager
    /// `peerfill-e2e`); namespace `default` unless set.
    pub async fn apply_distribution(
        &self,
        dist: &Distribution,
    ) -> Result<Distribution, ClusterError> {
        dist::apply(&self.client(), dist).await
    }

    /// Deletes `dist` (returns at once; the finalizer may hold it).
    pub async fn delete_distribution(&self, dist: &Distribution) -> Result<(), ClusterError> {
        dist::delete(&self.client(), dist).await
    }

    /// Watches `dist` until `cond` holds (returns that version) or the
    /// timeout passes (then the error carries [`Cluster::diagnostics`]).
    /// A deleted object is passed to `cond` as `None`.
    pub async fn wait_distribution_opt(
        &self,
        dist: &Distribution,
        timeout: Duration,
        what: &str,
        cond: impl Fn(Option<&Distribution>) -> bool,
    ) -> Result<Option<Distribution>, ClusterError> {
        match dist::wait_object(&self.client(), dist, timeout, cond).await {
            Some(r) => r,
            None => Err(self.timeout(what, timeout, Some(dist)).await),
        }
    }

    /// [`Cluster::wait_distribution_opt`] for a condition on an existing
    /// object.
    pub async fn wait_distribution(
        &self,
        dist: &Distribution,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&Distribution) -> bool,
    ) -> Result<Distribution, ClusterError> {
        let found = self
            .wait_distribution_opt(dist, timeout, what, |d| d.is_some_and(&cond))
            .await?;
        found.ok_or_else(|| ClusterError::Invalid(format!("{what}: object vanished")))
    }

    /// Waits until `dist` no longer exists (finalizer released).
    pub async fn wait_distribution_gone(
        &self,
        dist: &Distribution,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        self.wait_distribution_opt(dist, timeout, "the Distribution to be gone", |d| {
            d.is_none()
        })
        .await
        .map(|_| ())
    }

    /// Watches the NodeFills until `cond` holds for the whole list.
    pub async fn wait_nodefills(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&[peerfill_crds::NodeFill]) -> bool,
    ) -> Result<Vec<peerfill_crds::NodeFill>, ClusterError> {
        match dist::wait_list(&self.client(), timeout, cond).await {
            Some(r) => r,
            None => Err(self.timeout(what, timeout, None).await),
        }
    }

    /// Per-node progress of `dist` (by uid) from the NodeFill statuses.
    pub async fn node_progress(
        &self,
        dist: &Distribution,
    ) -> Result<BTreeMap<String, NodeDistributionStatus>, ClusterError> {
        dist::node_progress(&self.client(), dist).await
    }

    /// Nodes whose agent is up (NodeFill endpoint set, `AgentReady` True).
    pub async fn ready_agents(&self) -> Result<Vec<String>, ClusterError> {
        dist::ready_agents(&self.client()).await
    }

    /// Checks that `node` holds `dist`'s content with digest `expected`
    /// (`sha256:` or `blake3:`). Locally: hashes the file under the node's
    /// data root. On a real cluster: the digest in the node's status entry.
    pub async fn check_content(
        &self,
        node: &str,
        dist: &Distribution,
        expected: &str,
    ) -> Result<(), ClusterError> {
        match self {
            Cluster::Local(l) => l.check_file(node, &dist.spec.target.path, expected),
            Cluster::Remote(_) => {
                let progress = self.node_progress(dist).await?;
                let got = progress.get(node).and_then(|p| p.digest.clone());
                if got.as_deref() == Some(expected) {
                    Ok(())
                } else {
                    Err(ClusterError::Content {
                        node: node.to_string(),
                        detail: format!("status digest {got:?}, want {expected}"),
                    })
                }
            }
        }
    }

    /// What is left of `dist` anywhere: the file or partial files on a
    /// node's disk (locally), the node label, NodeFill status entries and
    /// assignments. Empty when the content is gone everywhere.
    pub async fn leftovers(&self, dist: &Distribution) -> Result<Vec<String>, ClusterError> {
        let mut out = dist::leftovers_in_api(&self.client(), dist).await?;
        if let Cluster::Local(l) = self {
            out.extend(l.leftover_files(dist));
        }
        Ok(out)
    }

    /// Distribution status, NodeFills and the tails of the process logs.
    pub async fn diagnostics(&self, dist: Option<&Distribution>) -> String {
        let mut out = dist::api_diagnostics(&self.client(), dist).await;
        if let Cluster::Local(l) = self {
            out.push_str(&l.log_tails(40));
        }
        out
    }

    async fn timeout(&self, what: &str, t: Duration, dist: Option<&Distribution>) -> ClusterError {
        ClusterError::Timeout {
            what: what.to_string(),
            secs: t.as_secs_f64(),
            diagnostics: self.diagnostics(dist).await,
        }
    }
}

/// Prints why a step is skipped on a real cluster.
fn skip(reason: &str) {
    println!("SKIP (real cluster): {reason}");
}
