//! The swarm engine: one QUIC endpoint per agent, one mutually authenticated
//! connection per peer node, and per content the piece exchange of
//! [`peer`] driven by the [`picker`].
//!
//! Connections: every agent dials the peers it is given and accepts peers
//! dialing it; a peer must present a certificate of the cluster CA (checked
//! in the TLS handshake, before any stream exists). When both sides dial
//! each other, the connection dialed by the node with the smaller name is
//! kept and the other closed, on both sides, so each pair ends up with one
//! connection. A banned node is disconnected and never accepted again. An
//! incoming connection presenting the certificate of a node we already hold
//! a connection to replaces that one only if it no longer answers a probe
//! (the peer restarted); a live connection is never silently replaced.
//!
//! Schedule: downloaders ask each peer for the rarest piece it holds
//! ([`picker`]); uploaders serve the piece they have sent the fewest times
//! first and refuse, for now, a piece they already sent while others wait
//! (`uploads`), so every fresh piece is handed to one node which forwards it
//! in turn, and every uplink works (the Mutualcast shape the Kumar–Ross
//! bound needs), instead of the origin readers serving everyone.
//!
//! Hashes: a piece is requested only once its hash is trusted. The hash
//! authorities sign the hashes they vouch for and every node relays the
//! signed batches it verified ([`relay`]), so a node needs no connection to
//! an authority and its peer list stays bounded.
//!
//! Liveness: every content runs a stall watchdog ([`Swarm::watch_stalls`]):
//! no piece or hash gained for [`STALL_AFTER`] while a connected peer or
//! authority could help resets that content's sessions with them and asks
//! them to announce again ([`wire::Message::Resync`]).
//!
//! Memory: at most `max_inflight` pieces and [`DOWNLOAD_BUFFER_BYTES`] are
//! being downloaded, and at most `upload_slots` pieces and
//! [`UPLOAD_BUFFER_BYTES`] being uploaded, at any time, each one buffer of
//! one piece, so memory does not grow with the content size, the piece size
//! or the peer count.

mod announcers;
mod fill;
mod limits;
mod origin_reader;
mod peer;
pub mod picker;
pub mod relay;
pub mod uploads;

pub use peer::pipeline_for;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use fill::{Authority, Fill, FillError, FillSpec, FillStats};
pub use limits::{ContentCaps, DownloadGate};
pub use origin_reader::{
    OriginReadError, OriginRequests, read_origin_range, read_origin_whole, seed_hashes,
};

use crate::metrics::Metrics;
use crate::tls::{self, NodeIdentity};

/// Application close codes of a connection.
pub(crate) mod close {
    use quinn::VarInt;
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    pub const DUPLICATE: VarInt = VarInt::from_u32(1);
    pub const PROTOCOL: VarInt = VarInt::from_u32(2);
    pub const BANNED: VarInt = VarInt::from_u32(3);
    pub const WRONG_NODE: VarInt = VarInt::from_u32(4);
}

/// Faults an agent can be told to commit, for tests of the honest agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Fault {
    /// Claim every piece of every content and serve corrupted bytes.
    CorruptUploads,
    /// Relay signed hash batches with a hash altered (signature kept),
    /// except to their signer, and complete hash lists with a hash altered.
    TamperHashes,
}

/// Piece buffers being downloaded, at most (whatever the piece size: with
/// 4 MiB pieces that is 3 requests, with 256 KiB ones `max_inflight`).
pub const DOWNLOAD_BUFFER_BYTES: u64 = 12 << 20;
/// Piece buffers being uploaded, at most (see [`uploads`]).
pub const UPLOAD_BUFFER_BYTES: u64 = 12 << 20;
/// Unit of the download byte budget's semaphore.
const BUFFER_UNIT: u64 = 64 << 10;

/// Units of [`BUFFER_UNIT`] a piece of `len` bytes takes (at least one, at
/// most the whole budget, so one piece of any size can always go).
pub(crate) fn buffer_units(len: u64, budget: u64) -> u32 {
    let units = len.div_ceil(BUFFER_UNIT).clamp(1, budget / BUFFER_UNIT);
    u32::try_from(units).unwrap_or(u32::MAX)
}

/// Tuning and identity of the engine.
#[derive(Debug, Clone)]
pub struct SwarmOptions {
    pub node: String,
    pub listen: SocketAddr,
    /// Pieces being downloaded at once, over all peers and contents: half
    /// again a node's upload slots. Requests land unevenly on holders, and
    /// a node whose few requests sit at busy uplinks cannot fill its
    /// downlink. Simulated: 1,000 nodes x 4 GiB in 1 MiB pieces, 12 gave
    /// 1.20 T* against 1.29 for 8 (100 nodes: 1.50 against 1.61); 32 x
    /// 32 MiB at 20 Mbit/s, 3 seeds with the measured wire efficiency,
    /// 1.49–1.52 against 1.62–1.64. Many more only share the downlink among
    /// more pieces, so each fresh piece reaches its next holder later: at
    /// 16 x 64 MiB (6 seeds) 12 gave 1.25–1.28 T* against 1.24–1.26 for 8
    /// (earlier, raw caps: 16 gave 1.20 against 1.15 for 8).
    pub max_inflight: usize,
    /// Outstanding requests per peer and content, at most (fewer with many
    /// peers: `peer::pipeline_for`).
    pub pipeline: usize,
    /// Pieces being uploaded at once; further requests wait in line.
    pub upload_slots: usize,
    /// Bad pieces from one node before it is banned.
    pub strikes_to_ban: u32,
    /// Longest wait for one piece before the request is given up.
    pub request_timeout: Duration,
    pub download_rate: Option<u64>,
    pub upload_rate: Option<u64>,
    pub fault: Option<Fault>,
}

impl SwarmOptions {
    /// Defaults for a node named `node` listening on `listen`.
    pub fn new(node: impl Into<String>, listen: SocketAddr) -> Self {
        SwarmOptions {
            node: node.into(),
            listen,
            max_inflight: 12,
            pipeline: 3,
            upload_slots: 8,
            strikes_to_ban: 2,
            request_timeout: Duration::from_secs(30),
            download_rate: None,
            upload_rate: None,
            fault: None,
        }
    }
}

/// Errors starting the engine.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("binding QUIC endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

struct DialTarget {
    addr: SocketAddr,
    wanted: bool,
}

struct PeerConn {
    conn: quinn::Connection,
    dialed_by_me: bool,
    since: std::time::Instant,
}

/// Simultaneous dials settle within this time; an incoming connection next
/// to an older one means the peer restarted, or someone else presents its
/// certificate: the older one is probed.
const RESTART_GRACE: Duration = Duration::from_secs(3);

/// How long a probe of an existing connection may take before it counts as
/// dead.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// No progress for this long, while a connected peer or authority could
/// help, is a stall.
pub const STALL_AFTER: Duration = Duration::from_secs(15);
/// Longest wait between two resyncs of a content that stays stalled.
const STALL_MAX: Duration = Duration::from_secs(60);
/// How often the watchdog looks.
const STALL_POLL: Duration = Duration::from_secs(2);

pub(crate) struct Shared {
    pub(crate) opts: SwarmOptions,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    contents: RwLock<HashMap<String, Arc<Fill>>>,
    contents_added: tokio::sync::Notify,
    conns: Mutex<HashMap<String, PeerConn>>,
    /// Peers to keep a connection to, by node: their current address, and
    /// whether they are still wanted. An entry exists while its dial loop
    /// runs; the loop reads the address on every attempt, so a peer that
    /// restarted elsewhere is redialed at its new address.
    dial_targets: Mutex<HashMap<String, DialTarget>>,
    banned: Mutex<HashSet<String>>,
    strikes: Mutex<HashMap<String, u32>>,
    pub(crate) uploads: Arc<uploads::UploadQueue>,
    /// Requests refused for now (`peerfill_agent_upload_requests_refused_total`).
    pub(crate) uploads_refused: Option<prometheus::IntCounter>,
    pub(crate) inflight: Arc<Semaphore>,
    /// [`DOWNLOAD_BUFFER_BYTES`] in [`BUFFER_UNIT`]s.
    pub(crate) inflight_bytes: Arc<Semaphore>,
    /// Node-wide and per-content byte rates, and priority ([`limits`]).
    pub(crate) limits: limits::Limits,
    pub(crate) metrics: Metrics,
    next_session: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    /// Stall resyncs done (`peerfill_agent_stall_resyncs_total`).
    stall_resyncs: Option<prometheus::IntCounter>,
    /// Second connections refused because the node's live connection
    /// answered (`peerfill_agent_duplicate_connections_refused_total`).
    duplicates_refused: Option<prometheus::IntCounter>,
    /// Checks signed hash batches (see [`relay`]).
    pub(crate) batch_verifier: relay::BatchVerifier,
    /// Signs the hash batches this node is the authority for.
    live: tls::LiveIdentity,
    /// Peers known to be in another zone than this node (see `picker`).
    remote_nodes: RwLock<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves these maps consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Kernel socket buffer the QUIC endpoint asks for, each way. The default
/// (~208 KiB) overflows under a burst of GSO batches at loopback or LAN
/// speed; every drop is a loss to congestion control. The kernel caps it at
/// `net.core.rmem_max` / `wmem_max`. Kernel memory, not the agent's RSS.
const UDP_SOCKET_BUFFER: libc::c_int = 8 << 20;

/// Binds the endpoint's UDP socket with [`UDP_SOCKET_BUFFER`] each way
/// (also the netbench floor's, so it measures the agent's socket).
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind(addr)?;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        let size = UDP_SOCKET_BUFFER;
        // SAFETY: setsockopt on a socket we own, with a c_int option value
        // of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            // Not fatal: the default buffer works, only slower.
            warn!(error = %std::io::Error::last_os_error(), "cannot enlarge the UDP socket buffer");
        }
    }
    Ok(socket)
}

/// The running engine of one agent. Cheap to clone.
#[derive(Clone)]
pub struct Swarm {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Swarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm")
            .field("node", &self.shared.opts.node)
            .finish_non_exhaustive()
    }
}

impl Swarm {
    /// Binds the QUIC endpoint and starts accepting peers.
    pub fn start(
        opts: SwarmOptions,
        identity: &NodeIdentity,
        metrics: Metrics,
    ) -> Result<Swarm, SwarmError> {
        // Transport settings (windows, keep-alive, idle timeout, MTU
        // discovery) come with the TLS configs.
        let server = tls::server_config(identity)?;
        let client_config = tls::client_config(identity)?;
        let batch_verifier = relay::BatchVerifier::new(tls::NodeSignatureVerifier::new(identity)?);
        let bind_err = |source| SwarmError::Bind {
            addr: opts.listen,
            source,
        };
        let socket = bind_udp(opts.listen).map_err(bind_err)?;
        let runtime = quinn::default_runtime().ok_or_else(|| {
            bind_err(std::io::Error::other(
                "no async runtime for the QUIC endpoint",
            ))
        })?;
        let endpoint = quinn::Endpoint::new(tls::endpoint_config(), Some(server), socket, runtime)
            .map_err(bind_err)?;
        let stall_resyncs = prometheus::IntCounter::new(
            "peerfill_agent_stall_resyncs_total",
            "Contents that made no progress while peers could help, and were resynced",
        )
        .ok()
        .filter(|c| metrics.registry().register(Box::new(c.clone())).is_ok());
        let duplicates_refused = prometheus::IntCounter::new(
            "peerfill_agent_duplicate_connections_refused_total",
            "Connections presenting the certificate of a node whose live connection still answers, refused",
        )
        .ok()
        .filter(|c| metrics.registry().register(Box::new(c.clone())).is_ok());
        let uploads_refused = prometheus::IntCounter::new(
            "peerfill_agent_upload_requests_refused_total",
            "Piece requests refused for now because this node already sent that piece and its upload slots are wanted for pieces it sent fewer times",
        )
        .ok()
        .filter(|c| metrics.registry().register(Box::new(c.clone())).is_ok());
        let shared = Arc::new(Shared {
            batch_verifier,
            live: identity.live.clone(),
            remote_nodes: RwLock::new(HashSet::new()),
            uploads_refused,
            stall_resyncs,
            duplicates_refused,
            uploads: uploads::UploadQueue::new(opts.upload_slots, UPLOAD_BUFFER_BYTES),
            inflight: Arc::new(Semaphore::new(opts.max_inflight.max(1))),
            inflight_bytes: Arc::new(Semaphore::new(
                (DOWNLOAD_BUFFER_BYTES / BUFFER_UNIT) as usize,
            )),
            limits: limits::Limits::new(opts.download_rate, opts.upload_rate),
            opts,
            endpoint,
            client_config,
            contents: RwLock::new(HashMap::new()),
            contents_added: tokio::sync::Notify::new(),
            conns: Mutex::new(HashMap::new()),
            dial_targets: Mutex::new(HashMap::new()),
            banned: Mutex::new(HashSet::new()),
            strikes: Mutex::new(HashMap::new()),
            metrics,
            next_session: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(shared.clone()));
        info!(node = %shared.opts.node, addr = ?shared.endpoint.local_addr().ok(), "swarm listening");
        Ok(Swarm { shared })
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.endpoint.local_addr().ok()
    }

    pub fn node(&self) -> &str {
        &self.shared.opts.node
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The download limiters of content `id` (its cap, then the node-wide
    /// limit at its priority), for its origin reads.
    pub fn download_gate(&self, id: &str) -> DownloadGate {
        self.shared.limits.download_gate(id)
    }

    /// Sets or changes the caps and priority of content `id`; a running
    /// content follows from its next request.
    pub fn set_caps(&self, id: &str, caps: ContentCaps) {
        self.shared.limits.set(id, caps);
    }

    /// Adds a content and announces it to connected peers allowed to have it.
    pub fn add_content(&self, fill: Arc<Fill>) {
        fill.set_signer(&self.shared.opts.node, self.shared.live.clone());
        {
            // Held while the fill is published, so a concurrent
            // `set_remote_nodes` (same lock order) reaches it too.
            let remote = self
                .shared
                .remote_nodes
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            fill.set_remote_nodes(&remote);
            self.shared
                .contents
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(fill.spec.id.clone(), fill.clone());
        }
        self.shared.contents_added.notify_waiters();
        let conns: Vec<(String, quinn::Connection)> = lock(&self.shared.conns)
            .iter()
            .map(|(n, c)| (n.clone(), c.conn.clone()))
            .collect();
        for (node, conn) in conns {
            if fill.allows(&node) {
                tokio::spawn(peer::announce(
                    self.shared.clone(),
                    conn,
                    node,
                    fill.clone(),
                ));
            }
        }
    }

    /// Sets the peers known to be in another zone than this node, for every
    /// content (the picker asks them only when same-zone peers offer
    /// nothing). Empty (the default): zones are unknown and play no part.
    pub fn set_remote_nodes(&self, nodes: HashSet<String>) {
        let mut cur = self
            .shared
            .remote_nodes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if *cur == nodes {
            return;
        }
        *cur = nodes;
        let fills: Vec<Arc<Fill>> = self
            .shared
            .contents
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for f in fills {
            f.set_remote_nodes(&cur);
        }
    }

    /// Keeps a connection to each of these peers (redialing with backoff),
    /// in addition to those already wanted. A known peer given a new
    /// address is redialed there.
    pub fn connect(&self, peers: impl IntoIterator<Item = (String, SocketAddr)>) {
        for (node, addr) in peers {
            self.want_peer(node, addr);
        }
    }

    /// Keeps connections to exactly these peers: new ones are dialed, known
    /// ones follow address changes, the others are no longer redialed (an
    /// open connection to them stays until it closes).
    pub fn set_peers(&self, peers: impl IntoIterator<Item = (String, SocketAddr)>) {
        let mut keep = HashSet::new();
        for (node, addr) in peers {
            keep.insert(node.clone());
            self.want_peer(node, addr);
        }
        for (node, t) in lock(&self.shared.dial_targets).iter_mut() {
            if !keep.contains(node) {
                t.wanted = false;
            }
        }
    }

    fn want_peer(&self, node: String, addr: SocketAddr) {
        if node == self.shared.opts.node {
            return;
        }
        let moved = {
            let mut targets = lock(&self.shared.dial_targets);
            match targets.get_mut(&node) {
                Some(t) => {
                    t.wanted = true;
                    std::mem::replace(&mut t.addr, addr) != addr
                }
                None => {
                    targets.insert(node.clone(), DialTarget { addr, wanted: true });
                    tokio::spawn(dial_loop(self.shared.clone(), node.clone()));
                    false
                }
            }
        };
        if moved {
            // The peer restarted elsewhere: a connection to the old address
            // is dead or about to be; drop it so the dial loop redials now.
            let stale = lock(&self.shared.conns)
                .get(&node)
                .filter(|pc| pc.dialed_by_me && pc.conn.remote_address() != addr)
                .map(|pc| pc.conn.clone());
            if let Some(conn) = stale {
                info!(peer = %node, %addr, "peer moved; redialing");
                conn.close(close::SHUTDOWN, b"peer moved");
            }
        }
    }

    /// Removes a content: it is no longer served or fetched, its fill is
    /// closed (see [`Fill::close`]) and its caps forgotten. Returns the
    /// fill, if it was there.
    pub fn remove_content(&self, id: &str) -> Option<Arc<Fill>> {
        self.shared.limits.remove(id);
        let fill = self
            .shared
            .contents
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)?;
        fill.close();
        Some(fill)
    }

    /// Removes `fill` if it is still the content's current fill (not a
    /// successor added meanwhile), closing it.
    pub fn remove_fill(&self, fill: &Arc<Fill>) {
        {
            let mut contents = self
                .shared
                .contents
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if contents
                .get(&fill.spec.id)
                .is_some_and(|f| Arc::ptr_eq(f, fill))
            {
                contents.remove(&fill.spec.id);
            }
        }
        fill.close();
    }

    /// Replaces the nodes content `id` may be exchanged with, announcing it
    /// to connected nodes that are newly allowed.
    pub fn set_allowed(&self, id: &str, allowed: HashSet<String>) {
        let Some(fill) = self.shared.content(id) else {
            return;
        };
        let added = fill.set_allowed(allowed);
        for node in added {
            let conn = lock(&self.shared.conns).get(&node).map(|c| c.conn.clone());
            if let Some(conn) = conn {
                tokio::spawn(peer::announce(
                    self.shared.clone(),
                    conn,
                    node,
                    fill.clone(),
                ));
            }
        }
    }

    /// Watches `fill` until it is complete or closed: when it gains no
    /// piece and no hash for [`STALL_AFTER`] (doubling up to a minute while
    /// it stays stalled) and a connected node could help — an allowed peer
    /// with no announce session (a lost announcement), the authority of a
    /// missing hash, any peer while hashes are missing (it may relay
    /// them), or a peer holding a piece we could request — the
    /// sessions with those nodes are reset and they are asked to announce
    /// again.
    pub async fn watch_stalls(&self, fill: Arc<Fill>) {
        let mut mark = fill.progress_mark();
        let mut since = tokio::time::Instant::now();
        let mut patience = STALL_AFTER;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(STALL_POLL) => {}
                _ = fill.closed() => return,
                _ = self.shared.shutdown.cancelled() => return,
            }
            if fill.is_complete() {
                return;
            }
            let now = fill.progress_mark();
            if now != mark {
                mark = now;
                since = tokio::time::Instant::now();
                patience = STALL_AFTER;
                continue;
            }
            if since.elapsed() < patience {
                continue;
            }
            let targets = self.stall_targets(&fill);
            if targets.is_empty() {
                continue;
            }
            warn!(
                content = %fill.spec.id,
                stalled_secs = since.elapsed().as_secs(),
                nodes = ?targets,
                "no progress while peers could help; resetting sessions and asking for fresh announcements"
            );
            if let Some(c) = &self.shared.stall_resyncs {
                c.inc();
            }
            for node in &targets {
                fill.drop_node(node);
                let conn = lock(&self.shared.conns).get(node).map(|c| c.conn.clone());
                if let Some(conn) = conn {
                    tokio::spawn(peer::request_resync(
                        conn,
                        node.clone(),
                        fill.spec.id.clone(),
                    ));
                }
            }
            since = tokio::time::Instant::now();
            patience = (patience * 2).min(STALL_MAX);
        }
    }

    /// The connected nodes a stalled `fill` should resync with.
    fn stall_targets(&self, fill: &Fill) -> Vec<String> {
        let connected: HashSet<String> = lock(&self.shared.conns).keys().cloned().collect();
        let sessions = fill.session_nodes();
        let mut out: HashSet<String> = fill
            .allowed_nodes()
            .into_iter()
            .filter(|n| connected.contains(n) && !sessions.contains(n))
            .collect();
        out.extend(
            fill.pending_authorities()
                .into_iter()
                .filter(|n| connected.contains(n)),
        );
        // Any peer may hold the missing hashes (relayed batches), and one
        // holding a piece we could request should be asked again.
        if fill.any_peer_interesting() || fill.hashes_missing() > 0 {
            out.extend(sessions.into_iter().filter(|n| connected.contains(n)));
        }
        out.remove(&self.shared.opts.node);
        let mut v: Vec<String> = out.into_iter().collect();
        v.sort();
        v
    }

    /// Nodes banned for sending bad pieces.
    pub fn banned(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.shared.banned).iter().cloned().collect();
        v.sort();
        v
    }

    /// The remote address of the connection to `node`, if connected.
    pub fn peer_addr(&self, node: &str) -> Option<SocketAddr> {
        lock(&self.shared.conns)
            .get(node)
            .map(|c| c.conn.remote_address())
    }

    /// Nodes currently connected.
    pub fn connected(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.shared.conns).keys().cloned().collect();
        v.sort();
        v
    }

    /// Closes every connection and stops the endpoint.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.endpoint.close(close::SHUTDOWN, b"shutdown");
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.shared.endpoint.wait_idle()).await;
    }
}

impl Shared {
    pub(crate) fn content(&self, id: &str) -> Option<Arc<Fill>> {
        self.contents
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// The content `id`, waiting up to `wait` for it to be added.
    pub(crate) async fn wait_content(&self, id: &str, wait: Duration) -> Option<Arc<Fill>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let added = self.contents_added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            // A closed fill is a run being replaced: wait for its successor.
            if let Some(f) = self.content(id).filter(|f| !f.is_closed()) {
                return Some(f);
            }
            tokio::select! {
                _ = &mut added => {}
                _ = tokio::time::sleep_until(deadline) => return self.content(id).filter(|f| !f.is_closed()),
                _ = self.shutdown.cancelled() => return None,
            }
        }
    }

    fn contents(&self) -> Vec<Arc<Fill>> {
        self.contents
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn next_session(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn is_banned(&self, node: &str) -> bool {
        lock(&self.banned).contains(node)
    }

    /// A node sent something that failed verification (`what`: a piece, a
    /// hash batch); bans it after `strikes_to_ban` such strikes.
    pub(crate) fn strike(&self, node: &str, what: &str) {
        let strikes = {
            let mut s = lock(&self.strikes);
            let e = s.entry(node.to_string()).or_default();
            *e += 1;
            *e
        };
        warn!(
            peer = node,
            strikes, "peer sent {what} that failed verification"
        );
        if strikes < self.opts.strikes_to_ban || !lock(&self.banned).insert(node.to_string()) {
            return;
        }
        warn!(peer = node, strikes, "peer banned");
        self.metrics.peer_banned();
        if let Some(pc) = lock(&self.conns).remove(node) {
            pc.conn.close(close::BANNED, b"banned: bad pieces");
            self.metrics.peer_disconnected();
        }
        for fill in self.contents() {
            fill.drop_node(node);
        }
    }
}

/// Registers an established connection unless it duplicates a better one,
/// then runs it until it closes.
async fn run_connection(shared: Arc<Shared>, conn: quinn::Connection, node: String, dialed: bool) {
    if shared.is_banned(&node) {
        conn.close(close::BANNED, b"banned");
        return;
    }
    // A peer only dials when it has no connection to us, so a new incoming
    // connection next to an established one means the peer lost the old
    // one (restarted) — or someone else presents its certificate. Probe the
    // old one: replace it only if it no longer answers.
    let older = lock(&shared.conns)
        .get(&node)
        .filter(|pc| {
            pc.conn.close_reason().is_none() && !dialed && pc.since.elapsed() > RESTART_GRACE
        })
        .map(|pc| pc.conn.clone());
    let mut old_dead = None;
    if let Some(old) = older {
        if peer::probe(&old, PROBE_WAIT).await {
            warn!(peer = %node, addr = %conn.remote_address(), live = %old.remote_address(), "refused a second connection presenting the certificate of a node whose connection is alive");
            if let Some(c) = &shared.duplicates_refused {
                c.inc();
            }
            conn.close(close::DUPLICATE, b"duplicate: the live connection answers");
            return;
        }
        info!(peer = %node, "the old connection does not answer; the peer restarted");
        old_dead = Some(old.stable_id());
    }
    {
        let mut conns = lock(&shared.conns);
        if let Some(existing) = conns.get(&node)
            && existing.conn.close_reason().is_none()
        {
            // Otherwise both dialed at once: keep the connection dialed by
            // the smaller node name, which both sides choose alike.
            let peer_restarted = old_dead == Some(existing.conn.stable_id());
            let me_smaller = shared.opts.node < node;
            let new_canonical = dialed == me_smaller;
            let old_canonical = existing.dialed_by_me == me_smaller;
            if !peer_restarted && (old_canonical || !new_canonical) {
                debug!(peer = %node, "duplicate connection closed");
                conn.close(close::DUPLICATE, b"duplicate");
                return;
            }
            existing.conn.close(close::DUPLICATE, b"duplicate");
            conns.remove(&node);
            shared.metrics.peer_disconnected();
        }
        conns.insert(
            node.clone(),
            PeerConn {
                conn: conn.clone(),
                dialed_by_me: dialed,
                since: std::time::Instant::now(),
            },
        );
        shared.metrics.peer_connected();
    }
    info!(peer = %node, addr = %conn.remote_address(), dialed, "peer connected");
    for fill in shared.contents() {
        if fill.allows(&node) {
            tokio::spawn(peer::announce(
                shared.clone(),
                conn.clone(),
                node.clone(),
                fill,
            ));
        }
    }
    let streams = peer::serve_connection(shared.clone(), conn.clone(), node.clone());
    tokio::select! {
        _ = streams => {}
        _ = shared.shutdown.cancelled() => {}
    }
    let reason = conn.closed().now_or_never_reason();
    let mut conns = lock(&shared.conns);
    if conns
        .get(&node)
        .is_some_and(|pc| pc.conn.stable_id() == conn.stable_id())
    {
        conns.remove(&node);
        shared.metrics.peer_disconnected();
    }
    drop(conns);
    let stats = conn.stats();
    info!(
        peer = %node,
        reason = %reason,
        mtu = stats.path.current_mtu,
        rtt_us = stats.path.rtt.as_micros() as u64,
        udp_tx_datagrams = stats.udp_tx.datagrams,
        udp_rx_datagrams = stats.udp_rx.datagrams,
        udp_tx_ios = stats.udp_tx.ios,
        udp_rx_ios = stats.udp_rx.ios,
        lost_packets = stats.path.lost_packets,
        congestion_events = stats.path.congestion_events,
        cwnd = stats.path.cwnd,
        "peer disconnected"
    );
}

/// Formats why a connection closed, without waiting.
trait CloseReason {
    fn now_or_never_reason(self) -> String;
}

impl<F: std::future::Future<Output = quinn::ConnectionError>> CloseReason for F {
    fn now_or_never_reason(self) -> String {
        use futures::FutureExt;
        match self.now_or_never() {
            Some(e) => e.to_string(),
            None => "still open".to_string(),
        }
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            i = shared.endpoint.accept() => i,
            _ = shared.shutdown.cancelled() => return,
        };
        let Some(incoming) = incoming else { return };
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            // The handshake verifies the client certificate against the
            // cluster CA: an unauthenticated client never gets a stream.
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%remote, error = %e, "refused incoming connection");
                    return;
                }
            };
            let node = match tls::peer_node(&conn) {
                Ok(n) => n,
                Err(e) => {
                    warn!(%remote, error = %e, "refused peer without a usable node identity");
                    conn.close(close::WRONG_NODE, b"no node identity");
                    return;
                }
            };
            let span = tracing::info_span!("peer", node = %node, %remote, dialed = false);
            tracing::Instrument::instrument(run_connection(shared, conn, node, false), span).await;
        });
    }
}

async fn dial_loop(shared: Arc<Shared>, node: String) {
    // The larger name waits a little so that, when both dial at once, the
    // preferred connection (dialed by the smaller name) usually wins outright.
    if shared.opts.node > node {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(1500)) => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
    let mut backoff = crate::retry::Backoff::new(crate::retry::DIAL);
    loop {
        let addr = {
            let mut targets = lock(&shared.dial_targets);
            match targets.get(&node) {
                Some(t) if t.wanted && !shared.shutdown.is_cancelled() => t.addr,
                _ => {
                    targets.remove(&node);
                    return;
                }
            }
        };
        if shared.is_banned(&node) {
            lock(&shared.dial_targets).remove(&node);
            return;
        }
        let existing = lock(&shared.conns).get(&node).map(|c| c.conn.clone());
        if let Some(conn) = existing {
            if conn.close_reason().is_none() {
                tokio::select! {
                    _ = conn.closed() => {}
                    _ = shared.shutdown.cancelled() => {}
                }
                backoff.reset();
                continue;
            }
            // Closed, but its task has not dropped it from the map yet:
            // `closed()` would be ready at once and this loop would spin
            // without ever yielding, starving the runtime. Drop the stale
            // entry and wait before redialing.
            {
                let mut conns = lock(&shared.conns);
                if conns
                    .get(&node)
                    .is_some_and(|pc| pc.conn.stable_id() == conn.stable_id())
                {
                    conns.remove(&node);
                }
            }
            backoff.sleep(&shared.shutdown).await;
            continue;
        }
        match dial(&shared, &node, addr).await {
            Ok(conn) => {
                let began = tokio::time::Instant::now();
                let span = tracing::info_span!("peer", node = %node, remote = %addr, dialed = true);
                let run = run_connection(shared.clone(), conn.clone(), node.clone(), true);
                tracing::Instrument::instrument(run, span).await;
                if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.close_reason()
                    && c.error_code == close::BANNED
                {
                    warn!(peer = %node, "the peer banned this node; not redialing");
                    lock(&shared.dial_targets).remove(&node);
                    return;
                }
                if began.elapsed() < Duration::from_secs(1) {
                    // Closed at once (e.g. refused as a duplicate of a live
                    // connection): back off rather than redial in a loop.
                    backoff.sleep(&shared.shutdown).await;
                } else {
                    backoff.reset();
                }
            }
            Err(e) => {
                debug!(peer = %node, %addr, error = %e, "dial failed");
                backoff.sleep(&shared.shutdown).await;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error("peer identity: {0}")]
    Identity(String),
    #[error("expected node {want}, the peer is {got}")]
    WrongNode { want: String, got: String },
}

async fn dial(
    shared: &Shared,
    node: &str,
    addr: SocketAddr,
) -> Result<quinn::Connection, DialError> {
    let conn = shared
        .endpoint
        .connect_with(shared.client_config.clone(), addr, node)?
        .await?;
    let got = tls::peer_node(&conn).map_err(|e| DialError::Identity(e.to_string()))?;
    if got != node {
        conn.close(close::WRONG_NODE, b"unexpected node");
        return Err(DialError::WrongNode {
            want: node.to_string(),
            got,
        });
    }
    Ok(conn)
}
