//! An in-memory stand-in for the Kubernetes API server, faithful for the
//! subset peerfill uses, so kubectl, kube-rs and the project's binaries can
//! run without a cluster.
//!
//! Served: discovery (`/version`, `/api`, `/apis`, group resource lists),
//! OpenAPI v3 (enough for kubectl's server-side field validation), CRUD with
//! resourceVersion conflicts, the status subresource, list/watch with
//! selectors, bookmarks and 410 Gone, merge/JSON/strategic/apply patches,
//! finalizers, garbage collection, namespaces, Tables for `kubectl get`, and
//! custom resources admitted by [`validation::CompiledSchema`].
//!
//! Known simplifications (each documented where it is implemented):
//! - one store per group/resource, no version conversion (the served
//!   version's `apiVersion` is stamped on the way out); core/v1 Events share
//!   the events.k8s.io/v1 store and are converted field by field;
//! - lists at an older exact resourceVersion serve the current state (or 410
//!   when it is older than the retained history); continue tokens are not
//!   snapshots either;
//! - server-side apply tracks ownership per manager as leaf paths (see
//!   `patch.rs`); strategic merge patch is approximated with the merge keys
//!   of the built-in lists;
//! - garbage collection runs synchronously after each deletion; deleting a
//!   CRD removes its objects at once (their finalizers are not waited for);
//! - pods are deleted at once (no kubelet grace period), and only a few
//!   kind-specific defaults are applied (namespace phase, pod phase, secret
//!   `stringData`);
//! - protobuf request bodies are decoded only for the kinds kubectl's typed
//!   `create` generators send (Namespace, Secret, ConfigMap, ServiceAccount);
//!   responses are always JSON;
//! - `fieldValidation` acts on unknown fields of custom resources only;
//! - no authentication or authorisation: any (or no) credential is accepted.
//!
//! Faithfulness is checked by the tests in `e2e/tests/` with the real
//! kubectl, kube-rs `Api` calls and the kube-runtime watcher.

pub mod validation;

mod error;
mod handler;
mod meta;
mod patch;
mod protobuf;
mod registry;
mod selector;
mod store;
mod table;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use handler::RequestKey;

use store::{FieldValidation, State, WriteCtx};

/// Errors starting or driving the stand-in.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding 127.0.0.1:{port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("reading CRDs from {path}: {source}")]
    ReadCrds {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing YAML in {path}: {message}")]
    ParseCrds { path: PathBuf, message: String },
    #[error("loading CRD {name} from {path}: {source}")]
    LoadCrd {
        name: String,
        path: PathBuf,
        source: Box<ApiError>,
    },
    #[error("writing kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building kube client: {0}")]
    Client(#[from] kube::Error),
    #[error("invalid server URL: {0}")]
    Uri(String),
    #[error("internal state lock poisoned")]
    Poisoned,
}

/// How to start the server.
#[derive(Debug, Clone)]
pub struct ApiServerOptions {
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Directory whose `*.yaml`/`*.yml` CRDs are loaded at start.
    pub crd_dir: Option<PathBuf>,
    /// Watch history kept (events); older resourceVersions get 410 Gone.
    pub history: usize,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        Self {
            port: 0,
            crd_dir: None,
            history: 10_000,
            bookmark_interval: Duration::from_secs(60),
        }
    }
}

/// Shared server state.
pub(crate) struct Inner {
    state: Mutex<State>,
    metrics: Mutex<BTreeMap<RequestKey, u64>>,
    shutdown: CancellationToken,
    bookmark_interval: Duration,
    port: u16,
    active_watches: AtomicUsize,
    /// Live watch events sent (initial lists and backlogs not counted).
    watch_events_sent: AtomicU64,
}

impl Inner {
    fn lock(&self) -> Result<MutexGuard<'_, State>, ApiError> {
        self.state
            .lock()
            .map_err(|_| ApiError::internal("server state lock poisoned"))
    }

    fn count(&self, key: RequestKey) {
        if let Ok(mut m) = self.metrics.lock() {
            *m.entry(key).or_insert(0) += 1;
        }
    }

    fn metrics_text(&self) -> String {
        let mut out = String::from(
            "# HELP apiserver_request_total Requests served, by verb, group, resource and subresource.\n# TYPE apiserver_request_total counter\n",
        );
        if let Ok(m) = self.metrics.lock() {
            for (k, v) in m.iter() {
                out.push_str(&format!(
                    "apiserver_request_total{{verb=\"{}\",group=\"{}\",resource=\"{}\",subresource=\"{}\"}} {v}\n",
                    k.verb, k.group, k.resource, k.subresource
                ));
            }
        }
        out.push_str(&format!(
            "# HELP peerfill_apiserver_watches Watch streams currently open.\n# TYPE peerfill_apiserver_watches gauge\npeerfill_apiserver_watches {}\n",
            self.active_watches.load(Ordering::Relaxed)
        ));
        if let Ok(s) = self.state.lock() {
            out.push_str(&format!(
                "# HELP peerfill_apiserver_resource_version Current resourceVersion.\n# TYPE peerfill_apiserver_resource_version gauge\npeerfill_apiserver_resource_version {}\n",
                s.current_rv()
            ));
        }
        out
    }
}

/// Entry point: `ApiServer::start(options).await`.
pub struct ApiServer;

impl ApiServer {
    pub async fn start(opts: ApiServerOptions) -> Result<ApiServerHandle, ServerError> {
        let mut state = State::new(opts.history);
        if let Some(dir) = &opts.crd_dir {
            load_crds(&mut state, dir)?;
        }
        let bind_err = |source| ServerError::Bind {
            port: opts.port,
            source,
        };
        let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], opts.port)))
            .map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let shutdown = CancellationToken::new();
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            metrics: Mutex::new(BTreeMap::new()),
            shutdown: shutdown.clone(),
            bookmark_interval: opts.bookmark_interval,
            port: addr.port(),
            active_watches: AtomicUsize::new(0),
            watch_events_sent: AtomicU64::new(0),
        });
        // The server runs on its own thread and runtime, so it keeps serving
        // while the caller blocks (e.g. a current-thread test running a
        // process synchronously).
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let thread_inner = inner.clone();
        std::thread::Builder::new()
            .name(format!("apiserver-{}", addr.port()))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("apiserver-worker")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build the API server runtime");
                        return;
                    }
                };
                rt.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => accept_loop(l, thread_inner).await,
                        Err(e) => tracing::error!(error = %e, "cannot register the listener"),
                    }
                });
                // Dropping the runtime ends any remaining watch tasks.
                drop(rt);
                let _ = done_tx.send(());
            })
            .map_err(bind_err)?;
        tracing::info!(%addr, "in-memory API server listening");
        Ok(ApiServerHandle {
            inner,
            addr,
            done: Some(done_rx),
        })
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let inner = inner.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| handler::handle(inner.clone(), req));
                    if let Err(e) = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        tracing::debug!(error = %e, "connection ended");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

fn load_crds(state: &mut State, dir: &Path) -> Result<(), ServerError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ServerError::ReadCrds {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| ServerError::ReadCrds {
            path: path.clone(),
            source,
        })?;
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).map_err(|e| ServerError::ParseCrds {
                path: path.clone(),
                message: e.to_string(),
            })?;
        for doc in docs
            .into_iter()
            .filter(|d| d.get("kind").and_then(Value::as_str) == Some("CustomResourceDefinition"))
        {
            let name = meta::str_at(&doc, "/metadata/name").to_string();
            let def = state
                .registry
                .get("apiextensions.k8s.io", "v1", "customresourcedefinitions")
                .ok_or(ServerError::Poisoned)?;
            state
                .create(
                    &def,
                    None,
                    doc,
                    &WriteCtx {
                        manager: "peerfill-apiserver".into(),
                        dry_run: false,
                        field_validation: FieldValidation::Ignore,
                    },
                )
                .map_err(|source| ServerError::LoadCrd {
                    name,
                    path: path.clone(),
                    source: Box::new(source),
                })?;
        }
    }
    Ok(())
}

/// A running server. Dropping it stops the server too.
pub struct ApiServerHandle {
    inner: Arc<Inner>,
    addr: SocketAddr,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl ApiServerHandle {
    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Kubeconfig text pointing at this server (no credentials needed).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: peerfill-local\n  cluster:\n    server: {url}\ncontexts:\n- name: peerfill-local\n  context:\n    cluster: peerfill-local\n    user: peerfill-local\n    namespace: default\ncurrent-context: peerfill-local\nusers:\n- name: peerfill-local\n  user: {{}}\n",
            url = self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), ServerError> {
        std::fs::write(path, self.kubeconfig()).map_err(|source| ServerError::Kubeconfig {
            path: path.to_path_buf(),
            source,
        })
    }

    /// A kube-rs client for this server (default namespace `default`).
    pub fn client(&self) -> Result<kube::Client, ServerError> {
        let uri: http::Uri = self
            .url()
            .parse()
            .map_err(|e: http::uri::InvalidUri| ServerError::Uri(e.to_string()))?;
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".into();
        Ok(kube::Client::try_from(config)?)
    }

    /// Requests served so far, by verb/group/resource/subresource.
    pub fn request_counts(&self) -> BTreeMap<RequestKey, u64> {
        self.inner
            .metrics
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// Watch streams currently open.
    pub fn active_watches(&self) -> usize {
        self.inner.active_watches.load(Ordering::Relaxed)
    }

    /// Live watch events sent so far, over all watches (a change seen by
    /// ten watchers counts ten).
    pub fn watch_events_sent(&self) -> u64 {
        self.inner.watch_events_sent.load(Ordering::Relaxed)
    }

    /// Current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().map(|s| s.current_rv()).unwrap_or(0)
    }

    /// Test hook: forget all watch history and end every open watch with
    /// 410 Gone, so clients must relist.
    pub fn compact(&self) {
        if let Ok(mut s) = self.inner.lock() {
            s.compact();
        }
    }

    /// Stops accepting, ends watches and closes connections.
    pub async fn shutdown(mut self) {
        self.inner.shutdown.cancel();
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.inner.shutdown.cancel();
    }
}
