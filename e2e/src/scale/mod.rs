//! `peerfill-scale`: the control plane at thousands of nodes, on one
//! machine. One process runs the API stand-in (in-process), the real
//! `peerfill-operator` binary as a child process, and one simulated agent
//! per node as a tokio task ([`agent`]: the control-path.md contract
//! without data, progress from the [`fluid`] model of capped links).
//!
//! A run: create the Nodes (three zones), start the agents over a ramp
//! (as a DaemonSet rollout would), wait until every agent holds its
//! certificate (bring-up), then apply three Distributions at once — two
//! from an HTTP origin, one from a node source — and measure until all
//! three are `Complete` or the time limit ([`measure`]). Writes are
//! counted by the stand-in (by verb and resource), the operator's CPU and
//! memory read from `/proc/<pid>/stat`. The report ([`report`]) is JSON.
//!
//! What is not simulated: bytes, QUIC, peer lists (the fluid swarm is one
//! pool), origin failures, Node kubelet heartbeats.

pub mod agent;
pub mod fluid;
pub mod measure;
pub mod report;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, ObjectMeta, PostParams};
use peerfill_crds::Distribution;
use tokio_util::sync::CancellationToken;

use crate::apiserver::{ApiServer, ApiServerOptions};
use crate::cluster::process::{ChildProcess, binary_path};
use fluid::{Caps, Fluid};
pub use report::Report;

/// Errors of a scale run.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("API stand-in: {0}")]
    Server(#[from] crate::apiserver::ServerError),
    #[error("{0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("simulated agent {0}")]
    Agent(String),
    #[error("{0}")]
    Timeout(String),
    #[error("invalid: {0}")]
    Invalid(String),
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ScaleError {
    let what = what.into();
    move |source| ScaleError::Kube { what, source }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: usize,
    /// 1..=3: the first two are HTTP, the third a node source.
    pub distributions: usize,
    /// Bytes of each content.
    pub size: u64,
    pub caps: Caps,
    /// Seconds over which the agents start.
    pub ramp: Duration,
    /// Longest the measured phase may take.
    pub limit: Duration,
    /// Working directory (kubeconfig, operator log).
    pub work_dir: PathBuf,
}

const SYSTEM_NAMESPACE: &str = "peerfill-system";
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// Node names: `node-00000` …
pub fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// Runs one scale experiment and returns its report.
pub async fn run(opts: &Options) -> Result<Report, ScaleError> {
    if opts.nodes < 2 || !(1..=3).contains(&opts.distributions) {
        return Err(ScaleError::Invalid(
            "at least 2 nodes and 1 to 3 distributions".into(),
        ));
    }
    std::fs::create_dir_all(&opts.work_dir).map_err(|source| ScaleError::Io {
        what: format!("creating {}", opts.work_dir.display()),
        source,
    })?;
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let api = ApiServer::start(ApiServerOptions {
        crd_dir: Some(crds),
        bookmark_interval: Duration::from_secs(60),
        // Each entry holds an object and its previous state (tens of KiB
        // for a NodeFill): a long history costs gigabytes at 5,000 nodes.
        history: 5_000,
        ..ApiServerOptions::default()
    })
    .await?;
    let kubeconfig = opts.work_dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let client = api.client()?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(SYSTEM_NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .map_err(kube_err("creating the namespace"))?;

    let mut operator = start_operator(opts, &kubeconfig)?;
    let pid = operator
        .pid()
        .ok_or_else(|| ScaleError::Agent("operator did not start".into()))?;
    tracing::info!(pid, "operator started");

    create_nodes(&client, opts.nodes).await?;
    let sizes = (0..opts.distributions)
        .map(|d| (dist_name(d), opts.size))
        .collect();
    let shared = Arc::new(agent::Shared {
        client: client.clone(),
        fluid: Mutex::new(Fluid::new(opts.caps)),
        sizes,
        root: format!("blake3:{}", blake3::hash(b"peerfill-scale").to_hex()),
        record: Mutex::new(agent::Record::default()),
    });
    let stop = CancellationToken::new();
    let started = Instant::now();
    let agents = spawn_agents(opts, &shared, &stop);
    let fluid_task = tokio::spawn(step_fluid(shared.clone(), stop.clone()));

    // Bring-up: every agent holds its certificate.
    let bringup_limit = opts.ramp + Duration::from_secs(120 + opts.nodes as u64 / 20);
    wait_for(bringup_limit, "every agent to get its certificate", || {
        super_ready(&shared) >= opts.nodes
    })
    .await?;
    let bringup = started.elapsed();
    tracing::info!(secs = bringup.as_secs_f64(), "every agent is ready");

    let result = measure::measure(opts, &api, &client, &shared, pid, bringup).await;
    stop.cancel();
    let _ = fluid_task.await;
    for a in agents {
        let _ = a.await;
    }
    // SIGTERM first: the operator releases its Lease and exits.
    let _ = operator.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    operator.kill();
    api.shutdown().await;
    result
}

fn super_ready(shared: &agent::Shared) -> usize {
    shared
        .record
        .lock()
        .map(|r| r.ready.len())
        .unwrap_or_default()
}

/// Polls `done` every 500 ms until it holds or `limit` passes.
pub async fn wait_for(
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<(), ScaleError> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return Err(ScaleError::Timeout(format!(
                "waited {}s for {what}",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// Distribution names: `scale-0` …
pub fn dist_name(d: usize) -> String {
    format!("scale-{d}")
}

fn start_operator(opts: &Options, kubeconfig: &Path) -> Result<ChildProcess, ScaleError> {
    let bin = binary_path("peerfill-operator")?;
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|source| ScaleError::Io {
            what: "picking a metrics port".into(),
            source,
        })?;
    let args: Vec<OsString> = vec![
        "--metrics".into(),
        metrics.to_string().into(),
        "--leader-election-namespace".into(),
        SYSTEM_NAMESPACE.into(),
    ];
    let env: Vec<(OsString, OsString)> = vec![
        ("KUBECONFIG".into(), kubeconfig.into()),
        (
            "RUST_LOG".into(),
            std::env::var("PEERFILL_SCALE_OPERATOR_LOG")
                .unwrap_or_else(|_| "warn".into())
                .into(),
        ),
        ("POD_NAME".into(), "operator-0".into()),
        ("POD_NAMESPACE".into(), SYSTEM_NAMESPACE.into()),
    ];
    let mut p = ChildProcess::new(
        "operator",
        bin,
        args,
        env,
        opts.work_dir.join("operator.log"),
    );
    p.start()?;
    Ok(p)
}

async fn create_nodes(client: &kube::Client, n: usize) -> Result<(), ScaleError> {
    let api: Api<Node> = Api::all(client.clone());
    let results: Vec<Result<(), ScaleError>> = stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let node = Node {
                    metadata: ObjectMeta {
                        name: Some(node_name(i)),
                        labels: Some(BTreeMap::from([
                            (
                                "topology.kubernetes.io/zone".to_string(),
                                ZONES[i % 3].to_string(),
                            ),
                            ("kubernetes.io/os".to_string(), "linux".to_string()),
                        ])),
                        ..ObjectMeta::default()
                    },
                    ..Node::default()
                };
                api.create(&PostParams::default(), &node)
                    .await
                    .map(|_| ())
                    .map_err(kube_err(format!("creating Node {}", node_name(i))))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Starts the agents evenly over the ramp.
fn spawn_agents(
    opts: &Options,
    shared: &Arc<agent::Shared>,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let step = opts.ramp.div_f64(opts.nodes.max(1) as f64);
    (0..opts.nodes)
        .map(|i| {
            let shared = shared.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(step.mul_f64(i as f64)).await;
                // An address from 198.18.0.0/15: nothing is ever sent to it.
                let endpoint = format!("198.18.{}.{}:7443", i / 256, i % 256);
                if let Err(e) =
                    agent::run(node_name(i), ZONES[i % 3].into(), endpoint, shared, stop).await
                {
                    tracing::warn!(error = %e, "simulated agent ended");
                }
            })
        })
        .collect()
}

async fn step_fluid(shared: Arc<agent::Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let dt = last.elapsed().as_secs_f64();
        last = Instant::now();
        if let Ok(mut f) = shared.fluid.lock() {
            f.step(dt);
        }
    }
}

/// The Distributions of a run: `scale-0`, `scale-1` from an HTTP origin
/// (never contacted: the agents are simulated), `scale-2` from
/// `node-00000`'s `build/out.bin`; all on every node.
pub fn distributions(opts: &Options, root: &str) -> Result<Vec<Distribution>, ScaleError> {
    (0..opts.distributions)
        .map(|d| {
            let source = if d < 2 {
                serde_json::json!({ "http": {
                    "url": format!("http://198.18.0.1/artifact-{d}.bin"),
                    "digest": root,
                }})
            } else {
                serde_json::json!({ "node": { "nodeName": node_name(0), "path": "build/out.bin" } })
            };
            serde_json::from_value(serde_json::json!({
                "apiVersion": "peerfill.dev/v1alpha1",
                "kind": "Distribution",
                "metadata": { "name": dist_name(d), "namespace": "default" },
                "spec": {
                    "source": source,
                    "target": { "path": format!("scale/{d}.bin") },
                    "strategy": { "maxOriginConnections": 4 },
                },
            }))
            .map_err(|e| ScaleError::Invalid(format!("Distribution {}: {e}", dist_name(d))))
        })
        .collect()
}
