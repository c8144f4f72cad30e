//! The node agent (`peerfill-agent node`, the real binary) against the API
//! stand-in, with this test playing the operator: it creates the Node and
//! the NodeFill, signs the agent's certificate request, assigns an HTTP
//! content, and unassigns it again.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Origin, kill_with_parent, random_bytes};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use peerfill_agent::k8s::identity::sha256_digest;
use peerfill_agent::tls::ClusterCa;
use peerfill_crds::nodefill::{
    Assignment, CONDITION_AGENT_READY, NodeFill, NodeFillSpec, NodePhase, OriginReader,
    ResolvedHttpSource, ResolvedSource, Role,
};
use peerfill_crds::{NODE_LABEL_VALUE, node_label_key};
use peerfill_e2e::apiserver::{ApiServer, ApiServerHandle, ApiServerOptions};
use serde_json::json;

const NODE: &str = "node-1";
const PIECE: u64 = 64 << 10;

/// The agent process, killed on every exit path.
struct AgentProc {
    child: Child,
    log: PathBuf,
}

impl AgentProc {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_agent(kubeconfig: &Path, root: &Path) -> AgentProc {
    let log = root.join("agent.log");
    let out = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new(common::BIN);
    cmd.args(["node", "--node-name", NODE, "--data-root"])
        .arg(root.join("data"))
        .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        // The test origin listens on loopback.
        .arg("--allow-private-origins")
        .arg("--identity-dir")
        .arg(root.join("identity"))
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,peerfill_agent=debug,quinn=warn")
        .env_remove("NODE_NAME")
        .env_remove("POD_IP")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out);
    kill_with_parent(&mut cmd);
    AgentProc {
        child: cmd.spawn().expect("spawn agent"),
        log,
    }
}

/// Polls `probe` every 100 ms for up to `secs` seconds.
async fn eventually<T, F, Fut>(secs: u64, what: &str, agent: &AgentProc, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}\nagent log:\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assignment(url: &str, size: Option<u64>) -> Assignment {
    let uid = "6a1f0c3e-0000-4000-8000-00000000000a";
    Assignment {
        namespace: "default".into(),
        name: "model".into(),
        uid: uid.into(),
        generation: 1,
        content_id: Assignment::content_id_for_uid(uid),
        source: ResolvedSource {
            http: Some(ResolvedHttpSource {
                url: url.into(),
                manifest_url: None,
                digest: None,
                headers_secret: None,
                origin_version: None,
                whole_read: false,
                files: Vec::new(),
                directory: false,
            }),
            node: None,
        },
        path: "models/model.bin".into(),
        size,
        piece_size: PIECE,
        role: Role::default(),
        origin_readers: vec![OriginReader {
            node: NODE.into(),
            start: 0,
            end: 0,
        }],
        ..Assignment::default()
    }
}

/// The API stand-in with the CRDs, a kubeconfig for it under `root`, and
/// the Node and NodeFill APIs.
async fn start_api(root: &Path) -> (ApiServerHandle, PathBuf, Api<Node>, Api<NodeFill>) {
    let server = ApiServer::start(ApiServerOptions {
        crd_dir: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")),
        bookmark_interval: Duration::from_secs(1),
        ..ApiServerOptions::default()
    })
    .await
    .expect("API stand-in");
    let kubeconfig = root.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let client = server.client().expect("client");
    (
        server,
        kubeconfig,
        Api::all(client.clone()),
        Api::all(client),
    )
}

/// Signs the certificate request the agent writes and answers it in
/// spec.identity.
async fn answer_identity(fills: &Api<NodeFill>, agent: &AgentProc) {
    let csr = eventually(30, "the certificate request", agent, || async {
        fills.get(NODE).await.ok()?.status?.certificate_request
    })
    .await;
    let ca = ClusterCa::generate("test-ca").expect("ca");
    let cert = ca
        .sign_csr(&csr, NODE)
        .expect("a valid request for this node");
    let identity = json!({ "spec": { "identity": {
        "certificate": cert,
        "caCertificate": ca.cert_pem(),
        "requestDigest": sha256_digest(csr.as_bytes()),
    } } });
    fills
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&identity))
        .await
        .expect("answer the request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_agent_gets_its_identity_fills_labels_and_cleans_up() {
    let root = tempfile::tempdir().expect("tempdir");
    let (server, kubeconfig, nodes, fills) = start_api(root.path()).await;

    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": NODE, "labels": {
            "topology.kubernetes.io/zone": "zone-a",
            // A label of a distribution unassigned while the agent was away.
            "peerfill.dev/default.gone": "true",
        } },
    }))
    .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");

    // The agent starts before its NodeFill exists and waits for it.
    let agent = spawn_agent(&kubeconfig, root.path());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let nf = NodeFill::new(
        NODE,
        NodeFillSpec {
            report_interval_seconds: Some(2),
            ..NodeFillSpec::default()
        },
    );
    fills
        .create(&PostParams::default(), &nf)
        .await
        .expect("create nodefill");

    // Identity: sign the request it writes, answer in spec.identity.
    answer_identity(&fills, &agent).await;
    let status = eventually(30, "AgentReady=True and an endpoint", &agent, || async {
        let st = fills.get(NODE).await.ok()?.status?;
        let ready = st
            .conditions
            .iter()
            .any(|c| c.type_ == CONDITION_AGENT_READY && c.status == "True");
        (ready && st.endpoint.is_some()).then_some(st)
    })
    .await;
    assert_eq!(status.zone.as_deref(), Some("zone-a"));
    assert!(
        status
            .certificate_fingerprint
            .as_deref()
            .is_some_and(|f| f.starts_with("sha256:")),
        "{status:?}"
    );
    assert!(status.agent_version.is_some());
    let identity_dir = root.path().join("identity");
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(identity_dir.join(f).exists(), "{f} not written");
    }
    // The stale label went at startup.
    let labels = nodes.get(NODE).await.expect("node").labels().clone();
    assert!(
        !labels.contains_key("peerfill.dev/default.gone"),
        "{labels:?}"
    );

    // Assign an HTTP content; the agent is its only origin reader, so it
    // learns the size itself.
    let data = Arc::new(random_bytes(1_500_000, 7));
    let origin = Origin::start(data.clone()).await;
    let a = assignment(&origin.url(), None);
    let assign = json!({ "spec": { "distributions": [a] } });
    fills
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&assign))
        .await
        .expect("assign");
    let dest = root.path().join("data/models/model.bin");
    // As the only authority it reports the root of its hash list and the
    // origin version it pinned, and waits for the operator to pin the
    // identity: holding every piece is not Complete yet.
    let want = blake3::hash(&data).to_hex().to_string();
    let vote = eventually(60, "the authority's root", &agent, || async {
        let st = fills.get(NODE).await.ok()?.status?;
        st.distributions
            .into_iter()
            .find(|d| d.uid == a.uid && d.reason.as_deref() == Some("WaitingForIdentity"))
    })
    .await;
    assert_eq!(vote.root, Some(format!("blake3:{want}")));
    assert_eq!(vote.content_id, Some(a.content_id.clone()));
    assert_eq!(vote.phase, NodePhase::Downloading);
    assert_eq!(vote.origin_version, Some(origin.etag()));
    assert!(
        !dest.exists(),
        "nothing is in place before the identity is pinned"
    );
    let mut pinned = a.clone();
    pinned.manifest_digest = vote.root.clone();
    pinned.size = vote.size;
    if let Some(h) = pinned.source.http.as_mut() {
        h.origin_version = vote.origin_version.clone();
    }
    let assign = json!({ "spec": { "distributions": [pinned] } });
    fills
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&assign))
        .await
        .expect("pin the identity");
    let entry = eventually(60, "the distribution Complete", &agent, || async {
        let st = fills.get(NODE).await.ok()?.status?;
        st.distributions
            .into_iter()
            .find(|d| d.uid == a.uid && d.phase == NodePhase::Complete)
    })
    .await;
    assert_eq!(common::file_blake3(&dest).as_deref(), Some(want.as_str()));
    assert_eq!(entry.size, Some(data.len() as u64));
    assert_eq!(entry.bytes_done, data.len() as u64);
    assert_eq!(entry.piece_count, (data.len() as u64).div_ceil(PIECE));
    assert_eq!(entry.pieces_done, entry.piece_count);
    assert_eq!(entry.bytes_from_origin, data.len() as u64);
    assert_eq!(entry.digest, Some(format!("blake3:{want}")));
    assert!(entry.last_transition_time.is_some());
    let key = node_label_key("default", "model");
    eventually(30, "the node label", &agent, || async {
        let n = nodes.get(NODE).await.ok()?;
        (n.labels().get(&key).map(String::as_str) == Some(NODE_LABEL_VALUE)).then_some(())
    })
    .await;
    // Its annotation names the version held.
    let n = nodes.get(NODE).await.expect("node");
    assert_eq!(
        n.annotations().get(&key).map(String::as_str),
        entry.content_id.as_deref(),
        "{:?}",
        n.annotations()
    );
    let st = fills
        .get(NODE)
        .await
        .expect("nodefill")
        .status
        .expect("status");
    assert_eq!(st.assigned, Some(1));
    assert_eq!(st.complete, Some(1));

    // Unassign: data and label go, then the status entry.
    let unassign = json!({ "spec": { "distributions": null } });
    fills
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&unassign))
        .await
        .expect("unassign");
    eventually(30, "the status entry dropped", &agent, || async {
        let st = fills.get(NODE).await.ok()?.status?;
        st.distributions.is_empty().then_some(())
    })
    .await;
    assert!(!dest.exists(), "the file is still there");
    let partial_dir = root.path().join("data/.peerfill-partial");
    let leftovers: Vec<_> = std::fs::read_dir(&partial_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    let n = nodes.get(NODE).await.expect("node");
    assert!(
        !n.labels().contains_key(&key),
        "label left: {:?}",
        n.labels()
    );
    assert!(
        !n.annotations().contains_key(&key),
        "annotation left: {:?}",
        n.annotations()
    );
    let st = fills
        .get(NODE)
        .await
        .expect("nodefill")
        .status
        .expect("status");
    assert_eq!(st.assigned, Some(0));
    assert_eq!(st.complete, Some(0));
    assert!(
        st.last_heartbeat.is_some(),
        "no heartbeat in {st:?}\n{}",
        agent.log_tail()
    );
    drop(agent);
    drop(origin);
    server.shutdown().await;
}

/// The API stand-in, the Node and NodeFill, and an agent with its identity
/// issued: what every scenario below starts from.
struct Cluster {
    root: tempfile::TempDir,
    server: ApiServerHandle,
    nodes: Api<Node>,
    fills: Api<NodeFill>,
    agent: AgentProc,
}

async fn cluster() -> Cluster {
    let root = tempfile::tempdir().expect("tempdir");
    let (server, kubeconfig, nodes, fills) = start_api(root.path()).await;
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": { "name": NODE },
    }))
    .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    let nf = NodeFill::new(
        NODE,
        NodeFillSpec {
            report_interval_seconds: Some(2),
            ..NodeFillSpec::default()
        },
    );
    fills
        .create(&PostParams::default(), &nf)
        .await
        .expect("create nodefill");
    let agent = spawn_agent(&kubeconfig, root.path());
    answer_identity(&fills, &agent).await;
    Cluster {
        root,
        server,
        nodes,
        fills,
        agent,
    }
}

impl Cluster {
    async fn assign(&self, list: &[Assignment]) {
        let assign = json!({ "spec": { "distributions": list } });
        self.fills
            .patch(NODE, &PatchParams::default(), &Patch::Merge(&assign))
            .await
            .expect("assign");
    }

    async fn entry(
        &self,
        what: &str,
        pred: impl Fn(&peerfill_crds::nodefill::NodeDistributionStatus) -> bool,
    ) -> peerfill_crds::nodefill::NodeDistributionStatus {
        eventually(60, what, &self.agent, || async {
            let st = self.fills.get(NODE).await.ok()?.status?;
            st.distributions.into_iter().find(|d| pred(d))
        })
        .await
    }

    /// Plays the operator: waits for the only authority's vote and pins it.
    async fn pin(&self, a: &mut Assignment, others: &[Assignment]) {
        let id = a.content_id.clone();
        let vote = self
            .entry("the authority's root", |d| {
                d.content_id.as_deref() == Some(id.as_str())
                    && d.reason.as_deref() == Some("WaitingForIdentity")
            })
            .await;
        a.manifest_digest = vote.root.clone();
        a.size = vote.size;
        if let Some(h) = a.source.http.as_mut() {
            h.origin_version = vote.origin_version.clone();
        }
        let mut list = others.to_vec();
        list.push(a.clone());
        self.assign(&list).await;
        self.entry("Complete", |d| {
            d.content_id.as_deref() == Some(id.as_str()) && d.phase == NodePhase::Complete
        })
        .await;
    }

    fn data(&self, path: &str) -> PathBuf {
        self.root.path().join("data").join(path)
    }

    /// The version the Node's label annotation says this node holds of
    /// `default/model` (`None`: not labelled).
    async fn labelled_version(&self) -> Option<String> {
        let n = self.nodes.get(NODE).await.ok()?;
        let key = node_label_key("default", "model");
        n.labels().get(&key)?;
        n.annotations().get(&key).cloned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_owned_and_edits_swap_the_new_version_in() {
    let c = cluster().await;
    let v1 = Arc::new(random_bytes(700_000, 21));
    let v2 = Arc::new(random_bytes(700_000, 22));
    let origin1 = Origin::start(v1.clone()).await;
    let origin2 = Origin::start(v2.clone()).await;
    let hex = |d: &[u8]| blake3::hash(d).to_hex().to_string();

    // Distribution A completes at models/m.bin.
    let mut a = assignment(&origin1.url(), None);
    c.assign(std::slice::from_ref(&a)).await;
    c.pin(&mut a, &[]).await;
    let path_a = c.data("models/model.bin");
    assert_eq!(common::file_blake3(&path_a), Some(hex(&v1)));
    eventually(30, "labelled with version A", &c.agent, || async {
        (c.labelled_version().await? == a.content_id).then_some(())
    })
    .await;

    // Distribution B (another namespace) on the same path, same size, other
    // bytes, no digest: refused, nothing touched.
    let mut b = assignment(&origin2.url(), None);
    b.uid = "6a1f0c3e-0000-4000-8000-00000000000b".into();
    b.namespace = "other".into();
    b.name = "intruder".into();
    b.content_id = Assignment::content_id_for_uid(&b.uid);
    c.assign(&[a.clone(), b.clone()]).await;
    let refused = c
        .entry("B refused", |d| {
            d.uid == b.uid && d.phase == NodePhase::Failed
        })
        .await;
    assert_eq!(refused.reason.as_deref(), Some("PathConflict"));
    assert!(
        refused
            .message
            .as_deref()
            .is_some_and(|m| m.contains("default/model")),
        "{refused:?}"
    );
    // Deleting B deletes nothing of A's.
    c.assign(std::slice::from_ref(&a)).await;
    eventually(30, "B's entry gone", &c.agent, || async {
        let st = c.fills.get(NODE).await.ok()?.status?;
        (!st.distributions.iter().any(|d| d.uid == b.uid)).then_some(())
    })
    .await;
    assert_eq!(common::file_blake3(&path_a), Some(hex(&v1)));
    c.entry("A still Complete", |d| {
        d.uid == a.uid && d.phase == NodePhase::Complete
    })
    .await;

    // Edit A: new URL and path, hence a new content id. The old file stays
    // until the new version is complete, then the old path is cleaned up.
    let mut edited = assignment(&origin2.url(), None);
    edited.content_id = Assignment::content_id_for_version(&a.uid, "edited", 0);
    edited.path = "models/model-v2.bin".into();
    c.assign(std::slice::from_ref(&edited)).await;
    let new_id = edited.content_id.clone();
    c.entry("the new version waiting for its identity", |d| {
        d.content_id.as_deref() == Some(new_id.as_str())
            && d.reason.as_deref() == Some("WaitingForIdentity")
    })
    .await;
    assert_eq!(
        common::file_blake3(&path_a),
        Some(hex(&v1)),
        "the previous version stays in place meanwhile"
    );
    assert_eq!(
        c.labelled_version().await.as_ref(),
        Some(&a.content_id),
        "the label still names the previous version"
    );
    c.pin(&mut edited, &[]).await;
    let path_v2 = c.data("models/model-v2.bin");
    assert_eq!(common::file_blake3(&path_v2), Some(hex(&v2)));
    eventually(30, "labelled with the new version", &c.agent, || async {
        (c.labelled_version().await? == new_id).then_some(())
    })
    .await;
    eventually(
        30,
        "the previous version's file removed",
        &c.agent,
        || async { (!path_a.exists()).then_some(()) },
    )
    .await;

    // Unassigned: only its own file goes.
    c.assign(&[]).await;
    eventually(30, "the new version's file removed", &c.agent, || async {
        (!path_v2.exists()).then_some(())
    })
    .await;
    drop(origin1);
    drop(origin2);
    let Cluster { server, agent, .. } = c;
    drop(agent);
    server.shutdown().await;
}
