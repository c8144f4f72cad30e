//! A real cluster with peerfill installed by the chart, reached through
//! `E2E_KUBECONFIG` (see the module docs of `cluster`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, ObjectList};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};

use super::{ClusterError, Origin, SYSTEM_NAMESPACE};

/// Namespace of the release (default `peerfill-system`).
pub const NAMESPACE_ENV: &str = "E2E_NAMESPACE";
/// Helm release name (default `peerfill`).
pub const RELEASE_ENV: &str = "E2E_RELEASE";
/// Address the origin binds to (default `127.0.0.1:0`).
pub const ORIGIN_LISTEN_ENV: &str = "E2E_ORIGIN_LISTEN";
/// Host the nodes use to reach the origin (default: the bound IP).
pub const ORIGIN_HOST_ENV: &str = "E2E_ORIGIN_HOST";

/// A real cluster; nothing runs locally but the origin.
pub struct RemoteCluster {
    client: Client,
    kubeconfig: PathBuf,
    namespace: String,
    release: String,
    origin: Origin,
}

impl RemoteCluster {
    /// Connects with the kubeconfig at `path` and starts the origin.
    pub async fn connect(path: &Path) -> Result<RemoteCluster, ClusterError> {
        let kc = Kubeconfig::read_from(path)
            .map_err(|e| ClusterError::Invalid(format!("reading {}: {e}", path.display())))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| ClusterError::Invalid(format!("loading {}: {e}", path.display())))?;
        let client = Client::try_from(config)
            .map_err(ClusterError::kube(format!("client for {}", path.display())))?;
        let listen: SocketAddr = std::env::var(ORIGIN_LISTEN_ENV)
            .ok()
            .map(|v| {
                v.parse()
                    .map_err(|e| ClusterError::Invalid(format!("{ORIGIN_LISTEN_ENV}={v}: {e}")))
            })
            .transpose()?
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let origin = Origin::start_on(listen, std::env::var(ORIGIN_HOST_ENV).ok())?;
        Ok(RemoteCluster {
            client,
            kubeconfig: path.to_path_buf(),
            namespace: std::env::var(NAMESPACE_ENV).unwrap_or_else(|_| SYSTEM_NAMESPACE.into()),
            release: std::env::var(RELEASE_ENV).unwrap_or_else(|_| "peerfill".into()),
            origin,
        })
    }

    /// A kube client.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The kubeconfig of `E2E_KUBECONFIG`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The release namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The origin.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    fn selector(&self, component: &str) -> String {
        format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component={component}",
            self.release
        )
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The agent pods (of this release) on `node`.
    async fn agent_pods(&self, node: &str) -> Result<ObjectList<Pod>, ClusterError> {
        let lp = ListParams::default()
            .labels(&self.selector("agent"))
            .fields(&format!("spec.nodeName={node}"));
        self.pods()
            .list(&lp)
            .await
            .map_err(ClusterError::kube(format!(
                "listing the agent pod on {node}"
            )))
    }

    /// Deletes the agent pod on `node` (the DaemonSet replaces it).
    pub async fn delete_agent_pod(&self, node: &str) -> Result<(), ClusterError> {
        let pods = self.agent_pods(node).await?;
        if pods.items.is_empty() {
            return Err(ClusterError::NoSuchNode(format!("{node} (no agent pod)")));
        }
        for p in pods {
            self.delete_pod(&p.name_any()).await?;
        }
        Ok(())
    }

    /// Waits up to 120 s for a running, ready agent pod on `node`.
    pub async fn wait_agent_pod_running(&self, node: &str) -> Result<(), ClusterError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let pods = self.agent_pods(node).await?;
            let ready = pods.items.iter().any(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .flatten()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    })
            });
            if ready {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ClusterError::Timeout {
                    what: format!("a ready agent pod on {node}"),
                    secs: 120.0,
                    diagnostics: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Deletes the operator pod named `name` (the Lease holder identity is
    /// the pod name).
    pub async fn delete_operator_pod(&self, name: &str) -> Result<(), ClusterError> {
        self.delete_pod(name).await
    }

    /// Deletes the `k`-th operator pod by name order.
    pub async fn delete_operator_pod_index(&self, k: usize) -> Result<(), ClusterError> {
        let lp = ListParams::default().labels(&self.selector("operator"));
        let mut names: Vec<String> = self
            .pods()
            .list(&lp)
            .await
            .map_err(ClusterError::kube("listing the operator pods"))?
            .iter()
            .map(|p| p.name_any())
            .collect();
        names.sort();
        let name = names.get(k).ok_or(ClusterError::NoSuchOperator(k))?;
        self.delete_pod(name).await
    }

    async fn delete_pod(&self, name: &str) -> Result<(), ClusterError> {
        // Grace period 0: the test wants a crash, not a graceful stop.
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        match self.pods().delete(name, &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(ClusterError::Kube {
                what: format!("deleting pod {}/{name}", self.namespace),
                source: e,
            }),
        }
    }
}
