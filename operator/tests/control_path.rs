//! The operator's shell against the in-process API stand-in, with fake
//! agents: test code that writes NodeFill status as the contract says.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use peerfill_crds::{
    CONDITION_COMPLETE, CONDITION_FAILED, Distribution, DistributionSpec, FINALIZER, HttpSource,
    NodeFill, Phase, Source, Strategy, Target,
};
use peerfill_e2e::apiserver::{ApiServer, ApiServerHandle, ApiServerOptions};
use peerfill_operator::metrics::Metrics;
use peerfill_operator::{Args, run_until};
use serde_json::{Value, json};

const NS: &str = "peerfill-system";
const MIB: u64 = 1 << 20;

async fn start_api() -> Result<ApiServerHandle> {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "peerfill_operator=debug".into()),
        )
        .try_init();
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let api = ApiServer::start(ApiServerOptions {
        crd_dir: Some(crds),
        bookmark_interval: Duration::from_secs(1),
        ..ApiServerOptions::default()
    })
    .await?;
    let client = api.client()?;
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client)
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(api)
}

fn args(identity: &str) -> Args {
    use clap::Parser;
    Args::parse_from([
        "peerfill-operator",
        "--metrics",
        "127.0.0.1:0",
        "--leader-election-namespace",
        NS,
        "--leader-election-lease",
        "peerfill-operator",
        "--identity",
        identity,
        "--lease-duration-seconds",
        "3",
        "--renew-deadline-seconds",
        "2",
        "--retry-period-seconds",
        "1",
        // The fake origin URLs are on loopback.
        "--allow-private-origins",
    ])
}

/// An operator instance running in a task; aborting the task stops it.
struct Operator {
    task: tokio::task::JoinHandle<Result<(), peerfill_operator::Error>>,
    metrics: Arc<Metrics>,
    /// Graceful shutdown (SIGTERM in the binary).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn start_operator(client: &Client, identity: &str) -> Result<Operator> {
    let metrics = Arc::new(Metrics::new()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let task = tokio::spawn(run_until(
        args(identity),
        client.clone(),
        metrics.clone(),
        shutdown,
    ));
    Ok(Operator {
        task,
        metrics,
        stop: Some(stop),
    })
}

async fn create_node(
    client: &Client,
    name: &str,
    labels: &[(&str, &str)],
    tainted: bool,
) -> Result<()> {
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: tainted.then(|| {
                vec![Taint {
                    key: "dedicated".into(),
                    value: Some("x".into()),
                    effect: "NoSchedule".into(),
                    time_added: None,
                }]
            }),
            ..NodeSpec::default()
        }),
        status: None,
    };
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await?;
    Ok(())
}

/// Polls `check` until it yields a value, failing after `secs`.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {secs}s waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sha256(s: &str) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(s.as_bytes())))
}

/// A fake agent: writes its NodeFill status like the real one would.
#[derive(Clone)]
struct FakeAgent {
    name: String,
    api: Api<NodeFill>,
    csr: String,
    endpoint: String,
    /// Per-distribution status entries by uid.
    distributions: Arc<Mutex<BTreeMap<String, Value>>>,
}

impl FakeAgent {
    fn new(client: &Client, name: &str, port: u16) -> Result<Self> {
        let (csr, _key) = peerfill_agent::tls::generate_csr(name)?;
        Ok(FakeAgent {
            name: name.into(),
            api: Api::all(client.clone()),
            csr,
            endpoint: format!("127.0.0.1:{port}"),
            distributions: Arc::default(),
        })
    }

    async fn patch_status(&self, status: Value) -> Result<()> {
        self.api
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await
            .with_context(|| format!("status of {}", self.name))?;
        Ok(())
    }

    fn ready_condition(ready: bool) -> Value {
        json!([{
            "type": "AgentReady",
            "status": if ready { "True" } else { "False" },
            "reason": if ready { "Ready" } else { "WaitingForCertificate" },
            "message": "",
            "lastTransitionTime": Timestamp::now().to_string(),
        }])
    }

    /// Steps 2 and 4 of "Node identity": request, wait for the answer,
    /// check it, publish the endpoint. Returns the certificate PEM.
    async fn join(&self) -> Result<String> {
        eventually(10, &format!("NodeFill {}", self.name), || async {
            Ok(self.api.get_opt(&self.name).await?)
        })
        .await?;
        self.patch_status(json!({
            "certificateRequest": self.csr,
            "agentVersion": "fake",
            "lastHeartbeat": Timestamp::now().to_string(),
            "conditions": Self::ready_condition(false),
        }))
        .await?;
        let digest = sha256(&self.csr);
        let identity = eventually(10, &format!("certificate of {}", self.name), || async {
            let fill = self.api.get(&self.name).await?;
            Ok(fill.spec.identity.filter(|i| i.request_digest == digest))
        })
        .await?;
        self.patch_status(json!({
            "endpoint": self.endpoint,
            "certificateFingerprint": format!("sha256:{}", self.name),
            "lastHeartbeat": Timestamp::now().to_string(),
            "conditions": Self::ready_condition(true),
        }))
        .await?;
        Ok(identity.certificate)
    }

    /// Heartbeats (with the current per-distribution list) every 500 ms.
    fn heartbeat(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let _ = me.report().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    async fn report(&self) -> Result<()> {
        let list: Vec<Value> = self
            .distributions
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .values()
            .cloned()
            .collect();
        self.patch_status(
            json!({ "lastHeartbeat": Timestamp::now().to_string(), "distributions": list }),
        )
        .await
    }

    /// Reports on the content id currently assigned to this node, as the
    /// real agent does (it takes the id as written).
    async fn set(
        &self,
        dist: &Distribution,
        phase: &str,
        size: Option<u64>,
        done: u64,
        reason: Option<&str>,
    ) -> Result<()> {
        self.set_with(dist, phase, size, done, reason, json!({}))
            .await
    }

    /// [`Self::set`] with extra fields (`root`, `originVersion`, ...).
    async fn set_with(
        &self,
        dist: &Distribution,
        phase: &str,
        size: Option<u64>,
        done: u64,
        reason: Option<&str>,
        extra: Value,
    ) -> Result<()> {
        let uid = dist.uid().context("uid")?;
        let content_id = self
            .api
            .get(&self.name)
            .await?
            .spec
            .distributions
            .into_iter()
            .find(|a| a.uid == uid)
            .map(|a| a.content_id);
        let mut entry = json!({
            "namespace": dist.namespace(), "name": dist.name_any(), "uid": uid, "phase": phase,
            "bytesDone": done, "bytesPerSecond": if phase == "Downloading" { 1000 } else { 0 },
            "contentId": content_id,
        });
        if let (Some(e), Some(x)) = (entry.as_object_mut(), extra.as_object()) {
            e.extend(x.clone());
        }
        if let Some(size) = size {
            entry["size"] = json!(size);
        }
        if let Some(reason) = reason {
            entry["reason"] = json!(reason);
            entry["message"] = json!("GET http://127.0.0.1:9/model.bin: 404 Not Found");
        }
        self.distributions
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .insert(uid, entry);
        self.report().await
    }

    async fn drop_entry(&self, uid: &str) -> Result<()> {
        self.distributions
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .remove(uid);
        self.report().await
    }
}

fn distribution(name: &str, readers: u32) -> Distribution {
    let mut d = Distribution::new(
        name,
        DistributionSpec {
            source: Source {
                http: Some(HttpSource {
                    url: "http://127.0.0.1:9/model.bin".into(),
                    manifest_url: None,
                    files: Vec::new(),
                    headers_from: None,
                    digest: None,
                }),
                node: None,
            },
            target: Target {
                node_selector: [("pool".to_string(), "gpu".to_string())].into(),
                path: format!("models/{name}.bin"),
                ..Target::default()
            },
            strategy: Strategy {
                piece_size: Some(MIB),
                max_origin_connections: readers,
                ..Strategy::default()
            },
        },
    );
    d.metadata.namespace = Some("default".into());
    d
}

async fn assignments(
    api: &Api<NodeFill>,
    node: &str,
    uid: &str,
) -> Result<Option<peerfill_crds::Assignment>> {
    Ok(api
        .get(node)
        .await?
        .spec
        .distributions
        .into_iter()
        .find(|a| a.uid == uid))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribution_lifecycle_with_fake_agents() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), lifecycle())
        .await
        .context("test timed out")?
}

async fn lifecycle() -> Result<()> {
    let api = start_api().await?;
    let client = api.client()?;
    for (name, labels, tainted) in [
        ("gpu-1", vec![("pool", "gpu")], false),
        ("gpu-2", vec![("pool", "gpu")], false),
        ("cpu-1", vec![("pool", "cpu")], false),
        ("gpu-tainted", vec![("pool", "gpu")], true),
    ] {
        create_node(&client, name, &labels, tainted).await?;
    }
    let operator = start_operator(&client, "op-a")?;
    let fills: Api<NodeFill> = Api::all(client.clone());

    // NodeFills appear for every node, owned by the Node.
    let mut agents = Vec::new();
    let mut heartbeats = BTreeMap::new();
    for (i, name) in ["gpu-1", "gpu-2", "cpu-1", "gpu-tainted"]
        .iter()
        .enumerate()
    {
        let agent = FakeAgent::new(&client, name, 7001 + i as u16)?;
        let cert = agent.join().await?;
        // The certificate names the node.
        let der = rustls_pemfile::certs(&mut cert.as_bytes())
            .next()
            .context("no certificate")??;
        assert_eq!(peerfill_agent::tls::node_name_of_cert(der.as_ref())?, *name);
        let fill = fills.get(name).await?;
        let owner = &fill.owner_references()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("Node", *name));
        assert_eq!(fill.spec.report_interval_seconds, Some(2));
        heartbeats.insert(name.to_string(), agent.heartbeat());
        agents.push(agent);
    }
    assert!(operator.metrics.certificates_issued.get() >= 4);

    // Apply: only the matching, untainted nodes get work.
    let dists: Api<Distribution> = Api::namespaced(client.clone(), "default");
    let d1 = dists
        .create(&PostParams::default(), &distribution("d1", 2))
        .await?;
    let uid = d1.uid().context("uid")?;
    let a1 = eventually(15, "assignments on gpu-1 and gpu-2", || async {
        let (a, b) = (
            assignments(&fills, "gpu-1", &uid).await?,
            assignments(&fills, "gpu-2", &uid).await?,
        );
        Ok(a.zip(b))
    })
    .await?
    .0;
    for other in ["cpu-1", "gpu-tainted"] {
        assert!(
            assignments(&fills, other, &uid).await?.is_none(),
            "{other} got work"
        );
    }
    assert_eq!(a1.origin_readers.len(), 2);
    assert!(a1.origin_readers.iter().all(|r| (r.start, r.end) == (0, 0)));
    assert_eq!(a1.peers, ["gpu-2"]);
    let spec1 = fills.get("gpu-1").await?.spec;
    assert_eq!(spec1.peers.len(), 1);
    assert_eq!(spec1.peers[0].endpoint, "127.0.0.1:7002");
    let d1 = dists.get("d1").await?;
    assert!(d1.finalizers().iter().any(|f| f == FINALIZER));

    // The readers learn the size: 3 MiB + 1 byte = 4 pieces. It is pinned
    // once both agree; cpu-1 (not a target) claiming another size is
    // ignored.
    let reader0 = a1.origin_readers[0].node.clone();
    let reader1 = a1.origin_readers[1].node.clone();
    let by_name = |n: &str| {
        agents
            .iter()
            .find(|a| a.name == n)
            .cloned()
            .context("agent")
    };
    let size = 3 * MIB + 1;
    by_name("cpu-1")?
        .set_with(
            &d1,
            "Downloading",
            Some(MIB),
            0,
            None,
            json!({ "contentId": a1.content_id }),
        )
        .await?;
    for r in [&reader0, &reader1] {
        by_name(r)?
            .set(&d1, "Downloading", Some(size), 0, None)
            .await?;
    }
    let sized = eventually(15, "size and ranges in the assignments", || async {
        let a = assignments(&fills, "gpu-2", &uid).await?;
        Ok(a.filter(|a| a.size == Some(size)))
    })
    .await?;
    let ranges: Vec<(String, u64, u64)> = sized
        .origin_readers
        .iter()
        .map(|r| (r.node.clone(), r.start, r.end))
        .collect();
    assert_eq!(ranges[0], (reader0.clone(), 0, 2));
    assert_eq!((ranges[1].1, ranges[1].2), (2, 4));
    let reader_assignment = assignments(&fills, &reader0, &uid)
        .await?
        .context("reader assignment")?;
    assert_eq!(reader_assignment.role.origin_ranges.len(), 1);
    assert_eq!(reader_assignment.role.origin_ranges[0].end, 2);

    // Progress, then both complete.
    by_name("gpu-1")?
        .set(&d1, "Downloading", Some(size), MIB, None)
        .await?;
    by_name("gpu-2")?
        .set(&d1, "Downloading", Some(size), MIB, None)
        .await?;
    eventually(15, "Progressing", || async {
        let st = dists.get("d1").await?.status;
        Ok(st.filter(|s| s.phase == Some(Phase::Progressing) && s.bytes_per_second == Some(2000)))
    })
    .await?;
    by_name("gpu-1")?
        .set(&d1, "Complete", Some(size), size, None)
        .await?;
    by_name("gpu-2")?
        .set(&d1, "Complete", Some(size), size, None)
        .await?;
    let st = eventually(15, "Complete", || async {
        Ok(dists
            .get("d1")
            .await?
            .status
            .filter(|s| s.phase == Some(Phase::Complete)))
    })
    .await?;
    assert_eq!(st.ready.as_deref(), Some("2/2"));
    assert_eq!(
        (st.desired_nodes, st.complete_nodes, st.failed_nodes),
        (Some(2), Some(2), Some(0))
    );
    assert_eq!(st.progress.as_deref(), Some("100%"));
    assert_eq!(st.size, Some(size));
    let complete = st
        .condition(CONDITION_COMPLETE)
        .context("Complete condition")?;
    assert_eq!(
        (complete.status.as_str(), complete.observed_generation),
        ("True", Some(1))
    );
    assert!(st.completion_time.is_some() && st.start_time.is_some());

    // Origin 404 reported by a reader fails the Distribution with its reason.
    let d2 = dists
        .create(&PostParams::default(), &distribution("d2", 1))
        .await?;
    let uid2 = d2.uid().context("uid")?;
    let a2 = eventually(15, "d2 assignment", || async {
        assignments(&fills, "gpu-1", &uid2).await
    })
    .await?;
    let reader = by_name(&a2.origin_readers[0].node)?;
    reader
        .set(&d2, "Failed", None, 0, Some("OriginNotFound"))
        .await?;
    let st2 = eventually(15, "d2 Failed", || async {
        Ok(dists
            .get("d2")
            .await?
            .status
            .filter(|s| s.phase == Some(Phase::Failed)))
    })
    .await?;
    let failed = st2
        .condition(CONDITION_FAILED)
        .context("Failed condition")?;
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("True", "OriginNotFound")
    );
    assert_eq!(st2.failing_nodes[0].reason, "OriginNotFound");
    eventually(10, "distributions metric", || async {
        let text = operator.metrics.render();
        Ok(text
            .contains("peerfill_operator_distributions{phase=\"Failed\"} 1")
            .then_some(()))
    })
    .await?;

    // Both nodes hold d1, so their agents label them.
    let nodes: Api<Node> = Api::all(client.clone());
    let label = peerfill_crds::node_label_key("default", "d1");
    for n in ["gpu-1", "gpu-2"] {
        let patch = json!({ "metadata": { "labels": { label.clone(): "true" } } });
        nodes
            .patch(n, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }

    // Delete: assignments dropped, the finalizer holds until the agents
    // drop their status entries.
    dists.delete("d1", &DeleteParams::default()).await?;
    eventually(15, "d1 assignments dropped", || async {
        let a = assignments(&fills, "gpu-1", &uid).await?;
        let b = assignments(&fills, "gpu-2", &uid).await?;
        Ok((a.is_none() && b.is_none()).then_some(()))
    })
    .await?;
    let deleting = eventually(10, "d1 Deleting", || async {
        Ok(dists
            .get_opt("d1")
            .await?
            .and_then(|d| d.status)
            .filter(|s| s.phase == Some(Phase::Deleting)))
    })
    .await?;
    assert_eq!(deleting.phase, Some(Phase::Deleting));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        dists.get_opt("d1").await?.is_some(),
        "finalizer released while agents still list d1"
    );
    // gpu-1's agent removes the data and its label, then the entry;
    // gpu-2's agent goes down without doing so: the operator removes
    // gpu-2's label itself and does not wait for it.
    let patch = json!({ "metadata": { "labels": { label.clone(): null } } });
    nodes
        .patch("gpu-1", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    by_name("gpu-1")?.drop_entry(&uid).await?;
    // cpu-1 never held d1 but listed it (the forged size): it drops the
    // entry too, or the finalizer would wait for it.
    by_name("cpu-1")?.drop_entry(&uid).await?;
    heartbeats
        .remove("gpu-2")
        .context("gpu-2 heartbeat")?
        .abort();
    by_name("gpu-2")?
        .patch_status(json!({ "conditions": FakeAgent::ready_condition(false) }))
        .await?;
    eventually(15, "d1 gone", || async {
        Ok(dists.get_opt("d1").await?.is_none().then_some(()))
    })
    .await?;
    let gpu2 = nodes.get("gpu-2").await?;
    assert!(
        !gpu2.labels().contains_key(&label),
        "label left on the down node"
    );

    operator.task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_identity_origin_changes_edits_and_path_ownership() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), identity())
        .await
        .context("test timed out")?
}

async fn status_where(
    dists: &Api<Distribution>,
    name: &str,
    what: &str,
    check: impl Fn(&peerfill_crds::DistributionStatus) -> bool,
) -> Result<peerfill_crds::DistributionStatus> {
    eventually(15, what, || async {
        Ok(dists
            .get_opt(name)
            .await?
            .and_then(|d| d.status)
            .filter(|s| check(s)))
    })
    .await
}

/// An operator ("op-a") over two `pool: gpu` nodes whose fake agents
/// (endpoints on ports `port` and `port + 1`) have joined and send
/// heartbeats.
struct GpuPair {
    _api: ApiServerHandle,
    operator: Operator,
    fills: Api<NodeFill>,
    dists: Api<Distribution>,
    agents: BTreeMap<String, FakeAgent>,
    heartbeats: Vec<tokio::task::JoinHandle<()>>,
}

async fn gpu_pair(port: u16) -> Result<GpuPair> {
    let api = start_api().await?;
    let client = api.client()?;
    for name in ["gpu-1", "gpu-2"] {
        create_node(&client, name, &[("pool", "gpu")], false).await?;
    }
    let operator = start_operator(&client, "op-a")?;
    let fills: Api<NodeFill> = Api::all(client.clone());
    let mut agents = BTreeMap::new();
    let mut heartbeats = Vec::new();
    for (i, name) in ["gpu-1", "gpu-2"].iter().enumerate() {
        let agent = FakeAgent::new(&client, name, port + i as u16)?;
        agent.join().await?;
        heartbeats.push(agent.heartbeat());
        agents.insert(name.to_string(), agent);
    }
    let dists: Api<Distribution> = Api::namespaced(client.clone(), "default");
    Ok(GpuPair {
        _api: api,
        operator,
        fills,
        dists,
        agents,
        heartbeats,
    })
}

async fn identity() -> Result<()> {
    let GpuPair {
        _api,
        operator,
        fills,
        dists,
        agents,
        heartbeats,
    } = gpu_pair(7101).await?;
    let d1 = dists
        .create(&PostParams::default(), &distribution("d1", 1))
        .await?;
    let uid = d1.uid().context("uid")?;
    let first = eventually(15, "d1 assignment", || async {
        assignments(&fills, "gpu-1", &uid).await
    })
    .await?;
    let cid1 = first.content_id.clone();
    let reader = agents[&first.origin_readers[0].node].clone();
    let other = agents
        .values()
        .find(|a| a.name != reader.name)
        .cloned()
        .context("other agent")?;

    // The reader (the only hash authority) reports size, root and the
    // origin's ETag: all three are pinned into every assignment.
    let root = format!("blake3:{}", "ab".repeat(32));
    let size = 2 * MIB;
    reader
        .set_with(
            &d1,
            "Downloading",
            Some(size),
            MIB,
            None,
            json!({ "root": root, "originVersion": "\"v1\"" }),
        )
        .await?;
    let pinned = eventually(15, "size, root and origin version pinned", || async {
        Ok(assignments(&fills, &other.name, &uid)
            .await?
            .filter(|a| a.size == Some(size) && a.manifest_digest.as_deref() == Some(&root)))
    })
    .await?;
    assert_eq!(pinned.content_id, cid1);
    let http = pinned.source.http.context("http source")?;
    assert_eq!(http.origin_version.as_deref(), Some("\"v1\""));
    let st = status_where(&dists, "d1", "status shows the identity", |s| {
        s.manifest_digest.as_deref() == Some(root.as_str())
    })
    .await?;
    assert_eq!(st.content_id.as_deref(), Some(cid1.as_str()));
    assert_eq!(st.origin_revision, Some(0));
    assert_eq!(st.size, Some(size));

    // The origin changes under the reader: a new revision, a new content id,
    // nothing pinned.
    reader
        .set_with(
            &d1,
            "Failed",
            None,
            MIB,
            Some("OriginChanged"),
            json!({ "originVersion": "\"v2\"" }),
        )
        .await?;
    let st = status_where(&dists, "d1", "origin revision 1", |s| {
        s.origin_revision == Some(1)
    })
    .await?;
    assert_eq!(st.phase, Some(Phase::Progressing));
    let cid2 = st.content_id.clone().context("content id")?;
    assert_ne!(cid2, cid1);
    let restarted = eventually(15, "new content id assigned", || async {
        Ok(assignments(&fills, &other.name, &uid)
            .await?
            .filter(|a| a.content_id == cid2))
    })
    .await?;
    assert_eq!(restarted.size, None);
    assert_eq!(restarted.manifest_digest, None);
    assert_eq!(restarted.source.http.and_then(|h| h.origin_version), None);

    // The new version completes on both nodes.
    reader
        .set_with(
            &d1,
            "Complete",
            Some(size),
            size,
            None,
            json!({ "root": root, "originVersion": "\"v2\"" }),
        )
        .await?;
    eventually(15, "new version pinned", || async {
        Ok(assignments(&fills, &other.name, &uid)
            .await?
            .filter(|a| a.size == Some(size) && a.content_id == cid2))
    })
    .await?;
    other.set(&d1, "Complete", Some(size), size, None).await?;
    status_where(&dists, "d1", "Complete", |s| {
        s.phase == Some(Phase::Complete)
    })
    .await?;

    // Editing the URL of a Complete Distribution: a new content id on every
    // node, back to Progressing for the new generation.
    let patch =
        json!({ "spec": { "source": { "http": { "url": "http://127.0.0.1:9/model-v3.bin" } } } });
    dists
        .patch("d1", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let st = status_where(&dists, "d1", "edit observed", |s| {
        s.observed_generation == Some(2)
    })
    .await?;
    assert_eq!(st.phase, Some(Phase::Progressing));
    let cid3 = st.content_id.clone().context("content id")?;
    assert!(cid3 != cid1 && cid3 != cid2);
    for n in ["gpu-1", "gpu-2"] {
        eventually(15, "edited content id assigned", || async {
            Ok(assignments(&fills, n, &uid)
                .await?
                .filter(|a| a.content_id == cid3 && a.size.is_none()))
        })
        .await?;
    }

    // A second Distribution on an overlapping path (here: the directory
    // that holds d1's file) gets nothing and names the owner.
    let mut thief = distribution("thief", 1);
    thief.spec.target.path = "models".into();
    let thief = dists.create(&PostParams::default(), &thief).await?;
    let thief_uid = thief.uid().context("uid")?;
    let st = status_where(&dists, "thief", "PathConflict", |s| {
        s.phase == Some(Phase::Failed)
    })
    .await?;
    let failed = st.condition(CONDITION_FAILED).context("Failed")?;
    assert_eq!(failed.reason, "PathConflict");
    assert!(failed.message.contains("default/d1"), "{}", failed.message);
    for n in ["gpu-1", "gpu-2"] {
        assert!(assignments(&fills, n, &thief_uid).await?.is_none());
    }

    // Once d1 is gone (its agents removed it), the path is free.
    dists.delete("d1", &DeleteParams::default()).await?;
    eventually(15, "d1 assignments dropped", || async {
        let a = assignments(&fills, "gpu-1", &uid).await?;
        let b = assignments(&fills, "gpu-2", &uid).await?;
        Ok((a.is_none() && b.is_none()).then_some(()))
    })
    .await?;
    for agent in agents.values() {
        agent.drop_entry(&uid).await?;
    }
    eventually(15, "d1 gone", || async {
        Ok(dists.get_opt("d1").await?.is_none().then_some(()))
    })
    .await?;
    eventually(30, "thief gets its turn", || async {
        assignments(&fills, "gpu-1", &thief_uid).await
    })
    .await?;
    status_where(&dists, "thief", "thief no longer in conflict", |s| {
        s.phase != Some(Phase::Failed)
    })
    .await?;
    for h in heartbeats {
        h.abort();
    }
    operator.task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_with_a_local_fault_is_replaced_and_blocks_no_one() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(90), local_fault())
        .await
        .context("test timed out")?
}

async fn local_fault() -> Result<()> {
    let GpuPair {
        _api,
        operator,
        fills,
        dists,
        agents,
        heartbeats,
    } = gpu_pair(7201).await?;
    let d = dists
        .create(&PostParams::default(), &distribution("full", 1))
        .await?;
    let uid = d.uid().context("uid")?;
    let first = eventually(15, "assignment", || async {
        assignments(&fills, "gpu-1", &uid).await
    })
    .await?;
    let reader = agents[&first.origin_readers[0].node].clone();
    let other = agents
        .values()
        .find(|a| a.name != reader.name)
        .cloned()
        .context("other agent")?;
    other.set(&d, "Pending", None, 0, None).await?;
    // The reader's disk is too small: it is replaced in its slot, and the
    // Distribution does not fail.
    reader
        .set(&d, "Failed", None, 0, Some("InsufficientSpace"))
        .await?;
    let moved = eventually(15, "reader replaced", || async {
        Ok(assignments(&fills, &other.name, &uid)
            .await?
            .filter(|a| a.origin_readers.iter().map(|r| &r.node).eq([&other.name])))
    })
    .await?;
    assert_eq!(moved.content_id, first.content_id, "same version");
    let st = status_where(&dists, "full", "failing node listed", |s| {
        s.failing_nodes.iter().any(|f| f.node == reader.name)
    })
    .await?;
    assert_ne!(st.phase, Some(Phase::Failed));
    assert_eq!(st.failing_nodes[0].reason, "InsufficientSpace");
    // The failed node keeps its assignment (its agent retries) without the
    // reader role.
    let kept = assignments(&fills, &reader.name, &uid)
        .await?
        .context("the failed node keeps its assignment")?;
    assert!(kept.role.origin_ranges.is_empty());
    // The new reader learns the size and completes; the failed node is the
    // only one left: Failed/NodesFailed naming it.
    let size = MIB;
    other.set(&d, "Complete", Some(size), size, None).await?;
    let st = status_where(&dists, "full", "NodesFailed", |s| {
        s.phase == Some(Phase::Failed)
    })
    .await?;
    assert_eq!(
        st.condition(CONDITION_FAILED).map(|c| c.reason.as_str()),
        Some("NodesFailed")
    );
    // Space freed: the agent retries and completes; so does the Distribution.
    reader.set(&d, "Complete", Some(size), size, None).await?;
    status_where(&dists, "full", "Complete", |s| {
        s.phase == Some(Phase::Complete)
    })
    .await?;
    for h in heartbeats {
        h.abort();
    }
    operator.task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_leader_dies() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(60), failover())
        .await
        .context("test timed out")?
}

async fn failover() -> Result<()> {
    let api = start_api().await?;
    let client = api.client()?;
    create_node(&client, "n1", &[], false).await?;
    let a = start_operator(&client, "op-a")?;
    // Let op-a win, so the roles are known.
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity);
    eventually(10, "op-a leads", || async {
        Ok(leases
            .get_opt("peerfill-operator")
            .await?
            .and_then(holder)
            .filter(|h| h == "op-a"))
    })
    .await?;
    let b = start_operator(&client, "op-b")?;
    let fills: Api<NodeFill> = Api::all(client.clone());
    eventually(10, "NodeFill n1", || async {
        Ok(fills.get_opt("n1").await?)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!((a.metrics.leader.get(), b.metrics.leader.get()), (1, 0));
    // Only the leader reconciles: the standby's reconcile histogram is empty
    // while the leader answers a certificate request.
    let agent = FakeAgent::new(&client, "n1", 7001)?;
    agent.join().await?;
    assert_eq!(a.metrics.certificates_issued.get(), 1);
    assert_eq!(b.metrics.certificates_issued.get(), 0);

    // Kill the leader: the standby takes over within the lease duration.
    a.task.abort();
    let killed = tokio::time::Instant::now();
    eventually(10, "op-b leads", || async {
        Ok(leases
            .get_opt("peerfill-operator")
            .await?
            .and_then(holder)
            .filter(|h| h == "op-b"))
    })
    .await?;
    let took = killed.elapsed();
    // 3 s lease + one 1 s retry period + scheduling slack.
    assert!(took < Duration::from_secs(6), "takeover took {took:?}");
    let lease = leases
        .get("peerfill-operator")
        .await?
        .spec
        .context("lease spec")?;
    assert_eq!(lease.lease_transitions, Some(1));
    assert_eq!(b.metrics.leader.get(), 1);

    // The new leader reconciles: a new node gets its NodeFill.
    create_node(&client, "n2", &[], false).await?;
    eventually(10, "NodeFill n2 from op-b", || async {
        Ok(fills.get_opt("n2").await?)
    })
    .await?;

    // A graceful shutdown releases the Lease: a third replica takes it at
    // its next retry, and the stopped one ends without error.
    let mut c = start_operator(&client, "op-c")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut b = b;
    let _ = b.stop.take().context("stop sender")?.send(());
    let ended = tokio::time::timeout(Duration::from_secs(10), b.task).await??;
    assert!(ended.is_ok(), "graceful shutdown: {ended:?}");
    eventually(10, "op-c leads", || async {
        Ok(leases
            .get_opt("peerfill-operator")
            .await?
            .and_then(holder)
            .filter(|h| h == "op-c"))
    })
    .await?;
    let lease = leases
        .get("peerfill-operator")
        .await?
        .spec
        .context("lease spec")?;
    assert_eq!(lease.lease_transitions, Some(2));
    c.stop.take();
    c.task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_goes_to_its_readers_and_pins_its_file_count() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(90), directory())
        .await
        .context("test timed out")?
}

/// A directory through the API stand-in, which checks every NodeFill
/// write against the generated schema.
async fn directory() -> Result<()> {
    let GpuPair {
        _api,
        operator,
        fills,
        dists,
        agents,
        heartbeats,
    } = gpu_pair(7301).await?;
    let mut d = distribution("model", 1);
    d.spec.target.path = "models/model".into();
    if let Some(http) = d.spec.source.http.as_mut() {
        http.url = "http://127.0.0.1:9/model/".into();
        http.files = [
            "config.json",
            "model-00001-of-00001.safetensors",
            "tokenizer.json",
        ]
        .map(|path| peerfill_crds::HttpFile {
            path: path.into(),
            url: None,
            digest: None,
        })
        .to_vec();
    }
    let d = dists.create(&PostParams::default(), &d).await?;
    let uid = d.uid().context("uid")?;
    let first = eventually(15, "assignment", || async {
        assignments(&fills, "gpu-1", &uid).await
    })
    .await?;
    let reader = agents[&first.origin_readers[0].node].clone();
    let other = agents
        .values()
        .find(|a| a.name != reader.name)
        .cloned()
        .context("other agent")?;
    let of = |a: Option<peerfill_crds::Assignment>| -> Result<peerfill_crds::ResolvedHttpSource> {
        a.and_then(|a| a.source.http).context("http source")
    };
    // The reader gets every file (a URL only where it is not base + path,
    // which the agent resolves); the other node only that it is a directory.
    let read = of(assignments(&fills, &reader.name, &uid).await?)?;
    assert!(read.directory);
    let resolved: Vec<String> = read
        .files
        .iter()
        .map(|f| {
            f.url
                .clone()
                .unwrap_or_else(|| peerfill_crds::distribution::file_url(&read.url, &f.path))
        })
        .collect();
    let urls: Vec<&str> = resolved.iter().map(String::as_str).collect();
    assert_eq!(
        urls,
        [
            "http://127.0.0.1:9/model/config.json",
            "http://127.0.0.1:9/model/model-00001-of-00001.safetensors",
            "http://127.0.0.1:9/model/tokenizer.json",
        ]
    );
    let seen = of(assignments(&fills, &other.name, &uid).await?)?;
    assert!(seen.directory && seen.files.is_empty());

    // The reader (the only authority) reports size and count: both pinned
    // into every assignment and the status.
    let size = 3 * MIB + 4096;
    reader
        .set_with(
            &d,
            "Downloading",
            Some(size),
            MIB,
            None,
            json!({ "files": 3 }),
        )
        .await?;
    eventually(15, "size and files pinned", || async {
        Ok(assignments(&fills, &other.name, &uid)
            .await?
            .filter(|a| a.size == Some(size) && a.files == Some(3)))
    })
    .await?;
    status_where(&dists, "model", "status.files", |s| {
        s.files == Some(3) && s.size == Some(size)
    })
    .await?;

    // An origin without Range support fails a directory (never read whole).
    reader
        .set(&d, "Failed", Some(size), MIB, Some("OriginNoRangeSupport"))
        .await?;
    let st = status_where(&dists, "model", "Failed", |s| {
        s.phase == Some(Phase::Failed)
    })
    .await?;
    assert_eq!(
        st.condition(CONDITION_FAILED).map(|c| c.reason.as_str()),
        Some("OriginNoRangeSupport")
    );
    let read = of(assignments(&fills, &reader.name, &uid).await?)?;
    assert!(!read.whole_read && read.files.len() == 3);
    for h in heartbeats {
        h.abort();
    }
    operator.task.abort();
    Ok(())
}
