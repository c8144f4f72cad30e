//! The local cluster: API stand-in in-process, Node objects, operator and
//! agent processes, HTTP origin (see the module docs of `cluster`).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use peerfill_agent::content::{DigestAlgo, StreamingDigest};
use peerfill_crds::{Assignment, Distribution};

use super::process::{ChildProcess, binary_path, tail};
use super::{
    ClusterError, HOSTNAME_LABEL, KEEP_ENV, LEASE_NAME, NodeOptions, Origin, POOL_GENERAL,
    POOL_LABEL, SYSTEM_NAMESPACE, ZONE_LABEL, dist,
};
use crate::apiserver::{ApiServer, ApiServerHandle, ApiServerOptions};

/// Environment variable overriding the children's `RUST_LOG`.
pub const LOG_ENV: &str = "PEERFILL_E2E_LOG";
const DEFAULT_LOG: &str = "info,quinn=warn,rustls=warn,hyper=warn,kube=info";
/// Most nodes: one loopback address 127.0.1.<i> each.
const MAX_NODES: u32 = 254;

/// How to start a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct LocalClusterOptions {
    /// Nodes `node-1..N` (default 8).
    pub nodes: usize,
    /// Operator processes `operator-0..K-1` (default 1; 2 for failover).
    pub operators: usize,
    /// Zones the nodes are spread over round-robin, `zone-a`.. (default 3).
    pub zones: usize,
    /// Work dir (kubeconfig, logs, node dirs); default a new temp dir. A
    /// given dir is removed afterwards only if this created it.
    pub work_dir: Option<PathBuf>,
    /// Keep the work dir (also with `PEERFILL_E2E_KEEP=1`).
    pub keep_work_dir: bool,
    /// Extra labels / taints / no agent, by node name (`node-3`).
    pub node_options: BTreeMap<String, NodeOptions>,
    /// Extra operator arguments, after the chart's (default: short leases,
    /// see [`LocalClusterOptions::TEST_OPERATOR_ARGS`]).
    pub operator_args: Vec<String>,
    /// Extra `peerfill-agent node` arguments.
    pub agent_args: Vec<String>,
    /// `RUST_LOG` of the children (default from `PEERFILL_E2E_LOG`, else
    /// info).
    pub rust_log: Option<String>,
    /// Wait at start until a leader holds the Lease and every agent is up
    /// (`None`: return as soon as the processes are spawned).
    pub wait_ready: Option<Duration>,
    /// Directory of CRD YAML to load (default: the workspace's `crds/`).
    pub crd_dir: Option<PathBuf>,
}

impl LocalClusterOptions {
    /// Short leader-election timings so failover takes seconds.
    pub const TEST_OPERATOR_ARGS: &'static [&'static str] = &[
        "--lease-duration-seconds",
        "4",
        "--renew-deadline-seconds",
        "3",
        "--retry-period-seconds",
        "1",
    ];
}

impl Default for LocalClusterOptions {
    fn default() -> Self {
        LocalClusterOptions {
            nodes: 8,
            operators: 1,
            zones: 3,
            work_dir: None,
            keep_work_dir: false,
            node_options: BTreeMap::new(),
            operator_args: Self::TEST_OPERATOR_ARGS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            agent_args: Vec::new(),
            rust_log: None,
            wait_ready: Some(Duration::from_secs(60)),
            crd_dir: None,
        }
    }
}

/// One node of the local cluster.
#[derive(Debug)]
pub struct LocalNode {
    /// Node name, `node-<i>`.
    pub name: String,
    /// Its loopback address `127.0.1.<i>` (the Node's InternalIP).
    pub ip: Ipv4Addr,
    /// The agent's QUIC listen address.
    pub quic: SocketAddr,
    /// The agent's metrics address (`/metrics`, `/healthz`).
    pub metrics: SocketAddr,
    /// The agent's `--data-root`.
    pub data_dir: PathBuf,
    /// The agent's `--identity-dir`.
    pub identity_dir: PathBuf,
    /// Labels and taints it was created with.
    pub options: NodeOptions,
    /// The agent (behind a lock so that concurrent scenarios can crash,
    /// stop and start agents through a shared `&LocalCluster`).
    agent: Option<Mutex<ChildProcess>>,
    log: Option<PathBuf>,
}

impl LocalNode {
    /// The agent's log file, if the node has an agent.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The agent's pid while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent
            .as_ref()
            .and_then(|a| a.lock().ok().and_then(|a| a.pid()))
    }
}

/// Signals the suite sends to an agent besides SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentSignal {
    /// SIGSTOP: the agent freezes (a hung node), sockets stay open.
    Stop,
    /// SIGCONT: it runs again.
    Continue,
    /// SIGTERM: a graceful stop.
    Terminate,
}

struct Operator {
    pod_name: String,
    metrics: SocketAddr,
    process: ChildProcess,
}

/// A local cluster; dropping it kills every process and removes the work
/// dir (unless kept).
pub struct LocalCluster {
    // Field order is drop order: processes first, then the servers, then
    // the work dir (removed in `Drop`).
    nodes: BTreeMap<String, LocalNode>,
    operators: Vec<Operator>,
    origin: Origin,
    api: ApiServerHandle,
    client: Client,
    work_dir: PathBuf,
    remove_work_dir: bool,
    kubeconfig: PathBuf,
    opts: LocalClusterOptions,
    rust_log: String,
    next_index: u32,
    /// Content ids seen per Distribution uid (see
    /// [`LocalCluster::leftover_files`]).
    content_ids: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl LocalCluster {
    /// Starts the cluster: stand-in, namespace, Nodes, origin, operators,
    /// agents; then waits for readiness if `opts.wait_ready` is set.
    pub async fn start(opts: LocalClusterOptions) -> Result<LocalCluster, ClusterError> {
        if opts.nodes > MAX_NODES as usize {
            return Err(ClusterError::Invalid(format!(
                "at most {MAX_NODES} nodes (one loopback address each)"
            )));
        }
        // Fail early, before anything runs, when the binaries are missing.
        let operator_bin = binary_path("peerfill-operator")?;
        let agent_bin = binary_path("peerfill-agent")?;
        let (work_dir, created) = match &opts.work_dir {
            Some(d) => {
                let existed = d.exists();
                std::fs::create_dir_all(d)
                    .map_err(ClusterError::io(format!("creating {}", d.display())))?;
                (d.clone(), !existed)
            }
            None => {
                let d = tempfile::Builder::new()
                    .prefix("peerfill-cluster-")
                    .tempdir()
                    .map_err(ClusterError::io("creating the work dir"))?;
                (d.keep(), true)
            }
        };
        let keep = opts.keep_work_dir || std::env::var(KEEP_ENV).is_ok_and(|v| v == "1");
        for sub in ["logs", "nodes"] {
            std::fs::create_dir_all(work_dir.join(sub))
                .map_err(ClusterError::io(format!("creating {sub} in the work dir")))?;
        }
        let crd_dir = match &opts.crd_dir {
            Some(d) => d.clone(),
            None => workspace_crds(&work_dir)?,
        };
        let api = ApiServer::start(ApiServerOptions {
            crd_dir: Some(crd_dir),
            bookmark_interval: Duration::from_secs(5),
            ..ApiServerOptions::default()
        })
        .await?;
        let kubeconfig = work_dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let client = api.client()?;
        let origin = Origin::start()?;
        let rust_log = opts
            .rust_log
            .clone()
            .or_else(|| std::env::var(LOG_ENV).ok())
            .unwrap_or_else(|| DEFAULT_LOG.to_string());
        let mut cluster = LocalCluster {
            nodes: BTreeMap::new(),
            operators: Vec::new(),
            origin,
            api,
            client,
            work_dir,
            remove_work_dir: created && !keep,
            kubeconfig,
            opts: opts.clone(),
            rust_log,
            next_index: 1,
            content_ids: Mutex::new(BTreeMap::new()),
        };
        if keep {
            println!(
                "peerfill local cluster work dir (kept): {}",
                cluster.work_dir.display()
            );
        }
        cluster.create_namespace(SYSTEM_NAMESPACE).await?;
        for k in 0..opts.operators {
            let metrics = free_tcp(Ipv4Addr::LOCALHOST)?;
            let pod_name = format!("operator-{k}");
            let mut args: Vec<OsString> = vec![
                "--metrics".into(),
                metrics.to_string().into(),
                "--leader-election-namespace".into(),
                SYSTEM_NAMESPACE.into(),
                "--leader-election-lease".into(),
                LEASE_NAME.into(),
            ];
            // The local cluster's origins live on loopback.
            args.push(ALLOW_PRIVATE_ORIGINS.into());
            args.extend(opts.operator_args.iter().map(OsString::from));
            let env = cluster.env(&[
                ("POD_NAME", pod_name.as_str()),
                ("POD_NAMESPACE", SYSTEM_NAMESPACE),
            ]);
            let log = cluster
                .work_dir
                .join("logs")
                .join(format!("{pod_name}.log"));
            let mut process =
                ChildProcess::new(pod_name.clone(), operator_bin.clone(), args, env, log);
            process.start()?;
            cluster.operators.push(Operator {
                pod_name,
                metrics,
                process,
            });
        }
        for _ in 0..opts.nodes {
            let name = format!("node-{}", cluster.next_index);
            let node_opts = opts.node_options.get(&name).cloned().unwrap_or_default();
            cluster.add_node_with(&agent_bin, node_opts).await?;
        }
        if let Some(t) = opts.wait_ready {
            cluster.wait_ready(t).await?;
        }
        Ok(cluster)
    }

    fn env(&self, extra: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = vec![
            ("KUBECONFIG".into(), self.kubeconfig.clone().into()),
            ("RUST_LOG".into(), self.rust_log.clone().into()),
        ];
        env.extend(
            extra
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        env
    }

    async fn create_namespace(&self, name: &str) -> Result<(), ClusterError> {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(ClusterError::Kube {
                what: format!("creating namespace {name}"),
                source: e,
            }),
        }
    }

    /// Waits until a leader holds the Lease (if any operator runs) and the
    /// agent of every node that has one is up.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ClusterError> {
        let want: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.agent.is_some())
            .map(|n| n.name.clone())
            .collect();
        let deadline = tokio::time::Instant::now() + timeout;
        let wait_agents = dist::wait_list(&self.client, timeout, |fills| {
            want.iter().all(|n| {
                fills
                    .iter()
                    .any(|f| kube::ResourceExt::name_any(f) == *n && dist::agent_ready(f))
            })
        });
        let timed_out = |what: String| async move {
            ClusterError::Timeout {
                what,
                secs: timeout.as_secs_f64(),
                diagnostics: format!(
                    "{}{}",
                    dist::api_diagnostics(&self.client, None).await,
                    self.log_tails(40)
                ),
            }
        };
        match wait_agents.await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(timed_out(format!("the agents of {want:?} to be up")).await),
        }
        if !self.operators.is_empty() {
            loop {
                if dist::lease_holder(&self.client, SYSTEM_NAMESPACE)
                    .await?
                    .is_some()
                {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(timed_out("an operator to hold the Lease".to_string()).await);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// A kube client for the stand-in.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The stand-in's handle (request counts, compaction, ...).
    pub fn api_server(&self) -> &ApiServerHandle {
        &self.api
    }

    /// The kubeconfig written into the work dir.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The work dir.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The HTTP origin.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Nodes by name (including nodes without an agent; removed nodes are
    /// gone).
    pub fn nodes(&self) -> &BTreeMap<String, LocalNode> {
        &self.nodes
    }

    /// One node.
    pub fn node(&self, name: &str) -> Result<&LocalNode, ClusterError> {
        self.nodes
            .get(name)
            .ok_or_else(|| ClusterError::NoSuchNode(name.to_string()))
    }

    /// The agent's data root of `name`.
    pub fn node_data_dir(&self, name: &str) -> Result<&Path, ClusterError> {
        Ok(&self.node(name)?.data_dir)
    }

    /// `POD_NAME`s of the operators, index = `k`.
    pub fn operator_names(&self) -> Vec<String> {
        self.operators.iter().map(|o| o.pod_name.clone()).collect()
    }

    /// Metrics address of operator `k`.
    pub fn operator_metrics(&self, k: usize) -> Result<SocketAddr, ClusterError> {
        self.operators
            .get(k)
            .map(|o| o.metrics)
            .ok_or(ClusterError::NoSuchOperator(k))
    }

    /// Adds node `node-<next>` (Node object, dirs, agent) and returns its
    /// name.
    pub async fn add_node(&mut self, opts: NodeOptions) -> Result<String, ClusterError> {
        let bin = binary_path("peerfill-agent")?;
        self.add_node_with(&bin, opts).await
    }

    async fn add_node_with(
        &mut self,
        bin: &Path,
        opts: NodeOptions,
    ) -> Result<String, ClusterError> {
        let index = self.next_index;
        if index > MAX_NODES {
            return Err(ClusterError::Invalid(format!(
                "at most {MAX_NODES} nodes (one loopback address each)"
            )));
        }
        self.next_index += 1;
        let name = format!("node-{index}");
        let ip = Ipv4Addr::new(127, 0, 1, index as u8);
        let dir = self.work_dir.join("nodes").join(&name);
        let data_dir = dir.join("data");
        let identity_dir = dir.join("identity");
        for d in [&data_dir, &identity_dir] {
            std::fs::create_dir_all(d)
                .map_err(ClusterError::io(format!("creating {}", d.display())))?;
        }
        let zones = self.opts.zones.max(1);
        let zone = format!(
            "zone-{}",
            (b'a' + ((index as usize - 1) % zones) as u8) as char
        );
        let mut labels = BTreeMap::from([
            (HOSTNAME_LABEL.to_string(), name.clone()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            (
                "kubernetes.io/arch".to_string(),
                std::env::consts::ARCH
                    .replace("x86_64", "amd64")
                    .replace("aarch64", "arm64"),
            ),
            (ZONE_LABEL.to_string(), zone),
            (POOL_LABEL.to_string(), POOL_GENERAL.to_string()),
        ]);
        labels.extend(opts.labels.clone());
        self.create_node_object(&name, ip, labels, &opts).await?;
        let quic = free_udp(ip)?;
        let metrics = free_tcp(ip)?;
        let agent = if opts.start_agent {
            let mut args: Vec<OsString> = vec![
                "node".into(),
                "--node-name".into(),
                name.clone().into(),
                "--data-root".into(),
                data_dir.clone().into(),
                "--listen".into(),
                quic.to_string().into(),
                "--metrics".into(),
                metrics.to_string().into(),
                "--identity-dir".into(),
                identity_dir.clone().into(),
            ];
            args.push(ALLOW_PRIVATE_ORIGINS.into());
            args.extend(self.opts.agent_args.iter().map(OsString::from));
            let pod = format!("peerfill-agent-{name}");
            let ip_text = ip.to_string();
            let mut env = self.env(&[
                ("NODE_NAME", name.as_str()),
                ("POD_IP", ip_text.as_str()),
                ("POD_NAME", pod.as_str()),
                ("POD_NAMESPACE", SYSTEM_NAMESPACE),
            ]);
            env.extend(
                opts.agent_env
                    .iter()
                    .map(|(k, v)| (OsString::from(k), OsString::from(v))),
            );
            let log = self.work_dir.join("logs").join(format!("agent-{name}.log"));
            let mut p = ChildProcess::new(
                format!("agent {name}"),
                bin.to_path_buf(),
                args,
                env,
                log.clone(),
            );
            p.start()?;
            Some((Mutex::new(p), log))
        } else {
            None
        };
        let (agent, log) = match agent {
            Some((a, l)) => (Some(a), Some(l)),
            None => (None, None),
        };
        self.nodes.insert(
            name.clone(),
            LocalNode {
                name: name.clone(),
                ip,
                quic,
                metrics,
                data_dir,
                identity_dir,
                options: opts,
                agent,
                log,
            },
        );
        Ok(name)
    }

    async fn create_node_object(
        &self,
        name: &str,
        ip: Ipv4Addr,
        labels: BTreeMap<String, String>,
        opts: &NodeOptions,
    ) -> Result<(), ClusterError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let status = NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.to_string(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name.to_string(),
                },
            ]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: Some("KubeletReady".into()),
                message: Some("local cluster node".into()),
                last_heartbeat_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
                last_transition_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
            }]),
            ..NodeStatus::default()
        };
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: (!opts.taints.is_empty()).then(|| opts.taints.clone()),
                ..NodeSpec::default()
            }),
            status: Some(status.clone()),
        };
        api.create(&PostParams::default(), &node)
            .await
            .map_err(ClusterError::kube(format!("creating Node {name}")))?;
        // A server may drop status on create; set it through the subresource.
        let patch = serde_json::json!({ "status": status });
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(ClusterError::kube(format!(
                "setting the status of Node {name}"
            )))?;
        Ok(())
    }

    /// Kills the node's agent and deletes its Node object (its NodeFill
    /// goes with it by owner reference). The node's dirs stay.
    pub async fn remove_node(&mut self, name: &str) -> Result<(), ClusterError> {
        let mut node = self
            .nodes
            .remove(name)
            .ok_or_else(|| ClusterError::NoSuchNode(name.to_string()))?;
        if let Some(a) = node.agent.as_mut() {
            lock(a).kill();
        }
        let api: Api<Node> = Api::all(self.client.clone());
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(ClusterError::Kube {
                what: format!("deleting Node {name}"),
                source: e,
            }),
        }
    }

    fn with_agent<T>(
        &self,
        node: &str,
        f: impl FnOnce(&mut ChildProcess) -> T,
    ) -> Result<T, ClusterError> {
        let agent = self
            .nodes
            .get(node)
            .and_then(|n| n.agent.as_ref())
            .ok_or_else(|| ClusterError::NoSuchNode(format!("{node} (with an agent)")))?;
        Ok(f(&mut lock(agent)))
    }

    /// SIGKILLs the node's agent (a crash).
    pub fn kill_agent(&mut self, node: &str) -> Result<(), ClusterError> {
        self.crash_agent(node)
    }

    /// Starts the node's agent again with the same arguments, data dir and
    /// identity dir (a container restart in the same pod).
    pub fn restart_agent(&mut self, node: &str) -> Result<(), ClusterError> {
        self.with_agent(node, ChildProcess::restart)?
    }

    /// Whether the node's agent process runs.
    pub fn agent_running(&mut self, node: &str) -> bool {
        self.agent_is_running(node)
    }

    /// SIGKILLs the node's agent (a crash), through a shared reference.
    pub fn crash_agent(&self, node: &str) -> Result<(), ClusterError> {
        self.with_agent(node, ChildProcess::kill)
    }

    /// Starts the node's agent if it does not run (same command line, data
    /// and identity dirs), through a shared reference.
    pub fn start_agent(&self, node: &str) -> Result<(), ClusterError> {
        self.with_agent(node, ChildProcess::start)?
    }

    /// Whether the node's agent process runs, through a shared reference.
    pub fn agent_is_running(&self, node: &str) -> bool {
        self.with_agent(node, |a| a.is_running()).unwrap_or(false)
    }

    /// Sends `signal` to the node's agent (e.g. SIGSTOP for 60 s, then
    /// SIGCONT: a node that hangs and comes back).
    pub fn signal_agent(&self, node: &str, signal: AgentSignal) -> Result<(), ClusterError> {
        let sig = match signal {
            AgentSignal::Stop => libc::SIGSTOP,
            AgentSignal::Continue => libc::SIGCONT,
            AgentSignal::Terminate => libc::SIGTERM,
        };
        self.with_agent(node, |a| a.signal(sig))?
            .map_err(ClusterError::io(format!(
                "sending {signal:?} to the agent of {node}"
            )))
    }

    /// SIGKILLs operator `k`.
    pub fn kill_operator(&mut self, k: usize) -> Result<(), ClusterError> {
        let op = self
            .operators
            .get_mut(k)
            .ok_or(ClusterError::NoSuchOperator(k))?;
        op.process.kill();
        Ok(())
    }

    /// SIGKILLs the operator whose `POD_NAME` is `pod_name`.
    pub fn kill_operator_named(&mut self, pod_name: &str) -> Result<(), ClusterError> {
        let k = self
            .operators
            .iter()
            .position(|o| o.pod_name == pod_name)
            .ok_or_else(|| ClusterError::Invalid(format!("no operator named {pod_name}")))?;
        self.kill_operator(k)
    }

    /// Starts operator `k` again (kills it first if it runs).
    pub fn restart_operator(&mut self, k: usize) -> Result<(), ClusterError> {
        self.operators
            .get_mut(k)
            .ok_or(ClusterError::NoSuchOperator(k))?
            .process
            .restart()
    }

    /// Whether operator `k` runs.
    pub fn operator_running(&mut self, k: usize) -> bool {
        self.operators
            .get_mut(k)
            .is_some_and(|o| o.process.is_running())
    }

    /// Checks the file `rel_path` under the node's data root against
    /// `expected` (`sha256:<hex>` or `blake3:<hex>`).
    pub fn check_file(
        &self,
        node: &str,
        rel_path: &str,
        expected: &str,
    ) -> Result<(), ClusterError> {
        let path = self.node_data_dir(node)?.join(rel_path);
        let got = file_digest(&path, expected).map_err(|e| ClusterError::Content {
            node: node.to_string(),
            detail: format!("{}: {e}", path.display()),
        })?;
        if got == expected {
            Ok(())
        } else {
            Err(ClusterError::Content {
                node: node.to_string(),
                detail: format!("{} has digest {got}, want {expected}", path.display()),
            })
        }
    }

    /// Files of `dist` left on any node's disk: the target file, and any
    /// file under the data root whose name holds one of its content ids
    /// (partial files, bitmaps, status files). Pass the applied object
    /// (with uid). Content ids change with every version, so they are
    /// gathered from the uid (first version), `status.contentId`, and the
    /// agents' records (`.peerfill-status/assignments.json`), and
    /// remembered for later calls (after deletion the records are gone).
    pub fn leftover_files(&self, dist: &Distribution) -> Vec<String> {
        let ids = dist
            .metadata
            .uid
            .as_deref()
            .map(|uid| self.content_ids_of(uid, dist))
            .unwrap_or_default();
        let mut out = Vec::new();
        for node in self.nodes.values() {
            let target = node.data_dir.join(&dist.spec.target.path);
            if target.exists() {
                out.push(format!("{}: {}", node.name, target.display()));
            }
            walk(&node.data_dir, &mut |p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if ids.iter().any(|id| name.contains(id.as_str())) {
                    out.push(format!("{}: {}", node.name, p.display()));
                }
            });
        }
        out
    }

    /// Every content id known for `uid` (see [`LocalCluster::leftover_files`]).
    fn content_ids_of(&self, uid: &str, dist: &Distribution) -> BTreeSet<String> {
        let mut ids = BTreeSet::from([Assignment::content_id_for_uid(uid)]);
        if let Some(id) = dist.status.as_ref().and_then(|s| s.content_id.clone()) {
            ids.insert(id);
        }
        for node in self.nodes.values() {
            let manifest = node.data_dir.join(".peerfill-status/assignments.json");
            let Ok(raw) = std::fs::read(&manifest) else {
                continue;
            };
            let Ok(entries) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(&raw)
            else {
                continue;
            };
            ids.extend(
                entries
                    .into_iter()
                    .filter(|(_, e)| e.get("uid").and_then(|u| u.as_str()) == Some(uid))
                    .map(|(id, _)| id),
            );
        }
        if let Ok(mut seen) = self.content_ids.lock() {
            let known = seen.entry(uid.to_string()).or_default();
            known.extend(ids);
            known.clone()
        } else {
            ids
        }
    }

    /// Creates a namespace (no error if it exists).
    pub async fn create_namespace_named(&self, name: &str) -> Result<(), ClusterError> {
        self.create_namespace(name).await
    }

    /// The `blake3:` digest of the file `rel_path` under the node's data
    /// root, `None` if there is no such file.
    pub fn file_blake3(&self, node: &str, rel_path: &str) -> Result<Option<String>, ClusterError> {
        let path = self.node_data_dir(node)?.join(rel_path);
        match file_digest(&path, "blake3:") {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClusterError::Content {
                node: node.to_string(),
                detail: format!("{}: {e}", path.display()),
            }),
        }
    }

    /// Paths of every process log.
    pub fn log_paths(&self) -> Vec<PathBuf> {
        let ops = self
            .operators
            .iter()
            .map(|o| o.process.log_path().to_path_buf());
        let agents = self
            .nodes
            .values()
            .filter_map(|n| n.log_path().map(Path::to_path_buf));
        ops.chain(agents).collect()
    }

    /// The last `lines` lines of every process log, with their paths.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for path in self.log_paths() {
            let _ = writeln!(
                out,
                "--- {} (last {lines} lines):\n{}",
                path.display(),
                tail(&path, lines)
            );
        }
        out
    }

    /// Scrapes the agent's `/metrics` ("" when unreachable).
    pub fn agent_metrics(&self, node: &str) -> String {
        self.node(node)
            .map(|n| http_get(n.metrics, "/metrics"))
            .unwrap_or_default()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "local cluster dropped during a panic; process logs:\n{}",
                self.log_tails(60)
            );
        }
        for node in self.nodes.values_mut() {
            if let Some(a) = node.agent.as_mut() {
                lock(a).kill();
            }
        }
        for op in &mut self.operators {
            op.process.kill();
        }
        if self.remove_work_dir {
            if let Err(e) = std::fs::remove_dir_all(&self.work_dir) {
                eprintln!("removing {}: {e}", self.work_dir.display());
            }
        } else {
            eprintln!(
                "kept the local cluster work dir {}",
                self.work_dir.display()
            );
        }
    }
}

/// Flag of both binaries that lets them use loopback/private origins (the
/// local origin is on 127.0.0.1).
pub const ALLOW_PRIVATE_ORIGINS: &str = "--allow-private-origins";

/// Locks a child process; a poisoned lock (a panic while holding it) still
/// gives the process, so it can be killed.
fn lock(m: &Mutex<ChildProcess>) -> std::sync::MutexGuard<'_, ChildProcess> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The workspace's `crds/` if it exists; else the generated CRDs written
/// into the work dir.
fn workspace_crds(work_dir: &Path) -> Result<PathBuf, ClusterError> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    if dir.join("distribution.yaml").is_file() {
        return Ok(dir);
    }
    let out = work_dir.join("crds");
    std::fs::create_dir_all(&out).map_err(ClusterError::io("creating the CRD dir"))?;
    for c in peerfill_crds::crds() {
        // JSON is YAML; the stand-in reads either.
        let text = serde_json::to_string_pretty(&c.crd)
            .map_err(|e| ClusterError::Invalid(format!("serialising CRD {}: {e}", c.file_name)))?;
        std::fs::write(out.join(c.file_name), text)
            .map_err(ClusterError::io(format!("writing CRD {}", c.file_name)))?;
    }
    Ok(out)
}

/// Ports handed to agents and operators, below Linux's default ephemeral
/// range (32768-60999). A port the kernel chose for `bind(0)` is free only
/// until the socket closes: another process's ephemeral socket may take it
/// before the agent binds it (seen: "Address already in use" at start).
/// The kernel never hands these out on its own, so only another harness
/// picking the same port on the same address could collide; each pick
/// starts at a random place and checks the port is free.
const HARNESS_PORTS: std::ops::Range<u16> = 20000..32000;

fn pick_port(
    ip: Ipv4Addr,
    what: &str,
    free: impl Fn(SocketAddr) -> bool,
) -> Result<SocketAddr, ClusterError> {
    use rand::Rng;
    let span = HARNESS_PORTS.end - HARNESS_PORTS.start;
    let start = rand::rng().random_range(0..span);
    (0..span)
        .map(|i| SocketAddr::from((ip, HARNESS_PORTS.start + (start + i) % span)))
        .find(|addr| free(*addr))
        .ok_or_else(|| {
            ClusterError::io(format!("finding a free {what} port on {ip}"))(std::io::Error::from(
                std::io::ErrorKind::AddrInUse,
            ))
        })
}

fn free_udp(ip: Ipv4Addr) -> Result<SocketAddr, ClusterError> {
    pick_port(ip, "UDP", |a| std::net::UdpSocket::bind(a).is_ok())
}

pub(crate) fn free_tcp(ip: Ipv4Addr) -> Result<SocketAddr, ClusterError> {
    pick_port(ip, "TCP", |a| std::net::TcpListener::bind(a).is_ok())
}

/// Hex digest of a file in the algorithm of `like` (`sha256:`/`blake3:`),
/// with that prefix.
fn file_digest(path: &Path, like: &str) -> std::io::Result<String> {
    let algo = if like.starts_with("sha256:") {
        DigestAlgo::Sha256
    } else {
        DigestAlgo::Blake3
    };
    let mut h = StreamingDigest::new(algo);
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_string())
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

/// A plain HTTP/1.1 GET of `path` on `addr`; the body ("" on any error).
fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::Write as _;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}
