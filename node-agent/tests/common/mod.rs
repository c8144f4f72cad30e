//! Shared harness of the integration tests: an HTTP origin that honours
//! Range requests and counts what it serves, agent processes that are killed
//! on every exit path, configs, status polling.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use peerfill_agent::agent::{
    AgentConfig, ContentConfig, ContentStatus, IdentityFiles, PeerConfig, SourceConfig, status_path,
};
use peerfill_agent::tls::ClusterCa;
use rand::{RngCore, SeedableRng};

pub const BIN: &str = env!("CARGO_BIN_EXE_peerfill-agent");

/// Random bytes, reproducible from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// An HTTP origin on 127.0.0.1 serving one blob at `/blob`, with HEAD and
/// single `bytes=a-b` ranges, counting the body bytes it sends.
pub struct Origin {
    pub addr: SocketAddr,
    pub served: Arc<AtomicU64>,
    pub requests: Arc<AtomicU64>,
    /// The content served now (replaceable: an origin that changes).
    current: Arc<std::sync::Mutex<Arc<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The strong ETag the test origin sends for `data`.
pub fn etag_of(data: &[u8]) -> String {
    format!("\"{}\"", &blake3::hash(data).to_hex()[..16])
}

impl Origin {
    pub async fn start(data: Arc<Vec<u8>>) -> Origin {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let served = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let current = Arc::new(std::sync::Mutex::new(data));
        let (s, r, cur) = (served.clone(), requests.clone(), current.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (cur, s, r) = (cur.clone(), s.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let data = cur.lock().map(|d| d.clone()).unwrap_or_default();
                        let (s, r) = (s.clone(), r.clone());
                        async move { Ok::<_, Infallible>(serve(req, &data, &s, &r)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin {
            addr,
            served,
            requests,
            current,
            task,
        }
    }

    /// Serves `data` from now on (the origin's content changes).
    pub fn replace(&self, data: Arc<Vec<u8>>) {
        if let Ok(mut cur) = self.current.lock() {
            *cur = data;
        }
    }

    /// The ETag of what the origin serves now.
    pub fn etag(&self) -> String {
        self.current.lock().map(|d| etag_of(&d)).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://{}/blob", self.addr)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn serve(
    req: Request<Incoming>,
    data: &[u8],
    served: &AtomicU64,
    requests: &AtomicU64,
) -> Response<Full<Bytes>> {
    requests.fetch_add(1, Ordering::SeqCst);
    let total = data.len() as u64;
    let etag = etag_of(data);
    // Reads pinned to another version fail their precondition.
    if let Some(want) = req.headers().get(hyper::header::IF_MATCH)
        && want.to_str().ok() != Some(etag.as_str())
    {
        return Response::builder()
            .status(StatusCode::PRECONDITION_FAILED)
            .header(hyper::header::ETAG, etag)
            .body(Full::new(Bytes::new()))
            .unwrap_or_default();
    }
    let head = req.method() == hyper::Method::HEAD;
    if req.uri().path() != "/blob" {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::new()))
            .unwrap_or_default();
    }
    let range = req
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| {
            let (a, b) = v.split_once('-')?;
            let a: u64 = a.parse().ok()?;
            let b: u64 = if b.is_empty() {
                total - 1
            } else {
                b.parse().ok()?
            };
            (a <= b && b < total).then_some((a, b))
        });
    let (status, body, content_range) = match range {
        Some((a, b)) => (
            StatusCode::PARTIAL_CONTENT,
            &data[a as usize..=b as usize],
            Some(format!("bytes {a}-{b}/{total}")),
        ),
        None => (StatusCode::OK, data, None),
    };
    let mut resp = Response::builder()
        .status(status)
        .header(hyper::header::ACCEPT_RANGES, "bytes")
        .header(hyper::header::ETAG, etag)
        .header(hyper::header::CONTENT_LENGTH, body.len());
    if let Some(cr) = content_range {
        resp = resp.header(hyper::header::CONTENT_RANGE, cr);
    }
    let body = if head {
        Bytes::new()
    } else {
        served.fetch_add(body.len() as u64, Ordering::SeqCst);
        Bytes::copy_from_slice(body)
    };
    resp.body(Full::new(body)).unwrap_or_default()
}

/// A free UDP port on `ip` (bound and released).
pub fn free_udp_addr(ip: Ipv4Addr) -> SocketAddr {
    let s = UdpSocket::bind((ip, 0)).expect("bind probe socket");
    s.local_addr().expect("probe addr")
}

/// Writes a CA and one identity per node under `dir/<node>/`.
pub fn make_identities(dir: &Path, nodes: &[String]) -> ClusterCa {
    let ca = ClusterCa::generate("peerfill-test-ca").expect("generate CA");
    for n in nodes {
        ca.issue(n)
            .expect("issue node cert")
            .write(&dir.join(n))
            .expect("write identity");
    }
    ca
}

/// One agent of a test swarm.
#[derive(Clone)]
pub struct Node {
    pub name: String,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub metrics: SocketAddr,
}

/// A swarm layout: `n` nodes on 127.0.0.(10+i), with dirs under `root`.
pub fn nodes(root: &Path, n: usize) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::new(127, 0, 0, 10 + i as u8);
            Node {
                name: format!("node-{i}"),
                addr: free_udp_addr(ip),
                data_dir: root.join(format!("node-{i}")),
                metrics: std::net::TcpListener::bind((ip, 0))
                    .and_then(|l| l.local_addr())
                    .expect("metrics port"),
            }
        })
        .collect()
}

/// `n` nodes under `root` (see [`nodes`]) with their identities written
/// under `root/certs`; returns the nodes and that directory.
pub fn nodes_with_identities(root: &Path, n: usize) -> (Vec<Node>, PathBuf) {
    let nodes = nodes(root, n);
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let certs = root.join("certs");
    make_identities(&certs, &names);
    (nodes, certs)
}

/// A config for `me` filling content `id` from an HTTP origin with every
/// other node as a peer and every node allowed.
pub fn http_config(
    me: &Node,
    all: &[Node],
    certs: &Path,
    id: &str,
    url: &str,
    readers: &[String],
    digest: Option<String>,
) -> AgentConfig {
    let contents = vec![ContentConfig {
        id: id.to_string(),
        path: PathBuf::from(format!("out/{id}.bin")),
        size: None,
        piece_size: 4 << 20,
        digest: digest.map(|d| d.parse().expect("digest")),
        source: SourceConfig::Http {
            url: url.to_string(),
            headers: Default::default(),
            readers: readers.to_vec(),
            whole: false,
            files: Vec::new(),
            manifest_url: None,
        },
        peers: all
            .iter()
            .filter(|n| n.name != me.name)
            .map(|n| PeerConfig {
                node: n.name.clone(),
                addr: n.addr,
            })
            .collect(),
        allowed_peers: all.iter().map(|n| n.name.clone()).collect(),
        root: None,
        origin_version: None,
        reuse_from: Vec::new(),
        caps: Default::default(),
        directory: false,
    }];
    AgentConfig {
        metrics_addr: Some(me.metrics),
        // The test origins listen on loopback.
        allow_private_origins: true,
        ..AgentConfig::new(
            me.name.clone(),
            me.addr,
            me.data_dir.clone(),
            IdentityFiles::in_dir(&certs.join(&me.name)),
            contents,
        )
    }
}

/// A running agent process, killed when dropped.
pub struct Agent {
    pub node: Node,
    child: Option<Child>,
    pub log: PathBuf,
    pub config: PathBuf,
    /// The config injects a fault: the process gets `PEERFILL_ALLOW_FAULTS=1`.
    pub allow_faults: bool,
}

impl Agent {
    pub fn spawn(node: &Node, cfg: &AgentConfig) -> Agent {
        std::fs::create_dir_all(&node.data_dir).expect("data dir");
        let config = node.data_dir.join("agent.json");
        std::fs::write(
            &config,
            serde_json::to_vec_pretty(cfg).expect("config json"),
        )
        .expect("write config");
        let log = node.data_dir.join("agent.log");
        let mut agent = Agent {
            node: node.clone(),
            child: None,
            log,
            config,
            allow_faults: cfg.fault.is_some(),
        };
        agent.start();
        agent
    }

    /// (Re)starts the process with the same config; the log is appended.
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,peerfill_agent=debug,quinn=warn")
            .env_remove(peerfill_agent::agent::ALLOW_FAULTS_ENV)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if self.allow_faults {
            cmd.env(peerfill_agent::agent::ALLOW_FAULTS_ENV, "1");
        }
        kill_with_parent(&mut cmd);
        let child = cmd.spawn().expect("spawn agent");
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn status(&self, id: &str) -> Option<ContentStatus> {
        ContentStatus::read(&status_path(
            &self.node.data_dir.join(peerfill_agent::agent::STATUS_DIR),
            id,
        ))
        .ok()
    }

    pub fn dest(&self, id: &str) -> PathBuf {
        self.node.data_dir.join(format!("out/{id}.bin"))
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Scrapes the Prometheus endpoint.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) =
            std::net::TcpStream::connect_timeout(&self.node.metrics, Duration::from_secs(2))
        else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cond()
}

/// Waits up to `timeout` until content `id` is `Complete` or `Failed` on
/// every agent, then asserts it is `Complete` everywhere with BLAKE3 (hex)
/// `want` at its destination; returns the final statuses, in order.
pub async fn assert_all_complete(
    agents: &[&Agent],
    id: &str,
    want: &str,
    timeout: Duration,
) -> Vec<ContentStatus> {
    use peerfill_agent::agent::Phase;
    let done = wait_until(timeout, || {
        agents.iter().all(|a| {
            a.status(id)
                .is_some_and(|s| matches!(s.phase, Phase::Complete | Phase::Failed))
        })
    })
    .await;
    let mut out = Vec::new();
    for a in agents {
        let st = a.status(id).expect("status");
        assert!(done, "{}: {st:?}\n{}", a.node.name, a.log_tail());
        assert_eq!(
            st.phase,
            Phase::Complete,
            "{}: {st:?}\n{}",
            a.node.name,
            a.log_tail()
        );
        assert_eq!(
            file_blake3(&a.dest(id)).as_deref(),
            Some(want),
            "{}: wrong bytes",
            a.node.name
        );
        out.push(st);
    }
    out
}

/// BLAKE3 of a file (hex), or None if unreadable.
pub fn file_blake3(path: &Path) -> Option<String> {
    let data = std::fs::read(path).ok()?;
    Some(blake3::hash(&data).to_hex().to_string())
}

/// The value of a metric line starting with `prefix` (first match).
pub fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Makes the kernel kill the child if this process dies without running
/// destructors (e.g. the test runner kills it on timeout).
pub fn kill_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}
