//! The state of one content being filled (or seeded) by this agent: which
//! pieces are held, which piece hashes are trusted, which peers announce what,
//! who we announce to, and the counters behind status and metrics.
//!
//! # Trust model
//!
//! A piece is only ever written, counted, announced or served after its
//! BLAKE3 hash matched a *trusted* piece hash. Piece hashes are trusted from:
//!
//! - ourselves, for the pieces we read from the origin (we hash what we read)
//!   or hold as the seeder (we hash the file up front);
//! - the *authority* of that piece, and nobody else: the seeder for a `node`
//!   source, or the origin reader assigned the range holding the piece for an
//!   `http` source. The authority signs the hashes it vouches for with its
//!   node key (cluster CA certificate, pinned by the fingerprint the
//!   operator published), and every node relays the signed batches it
//!   verified, so a batch reaches us through any peer and nobody can forge
//!   one (see `relay`). No node needs a connection to an authority;
//! - once the root is pinned, a complete hash list from any peer that
//!   merges to it.
//!
//! A hash announced twice with different values is a conflict: the first one
//! stays and the conflict is logged (a batch carrying one is not relayed). The content has a *pinned root* (its
//! identity): the user's `blake3:` digest, or the root the operator
//! published once every authority reported the same one. The full hash list
//! must merge to it before the content completes; without a pin yet a fill
//! that requires one ([`FillSpec::require_pin`]) waits. With a `sha256:`
//! digest the finished file is hashed and compared. The file is not
//! re-hashed with BLAKE3: every piece was verified against its trusted hash
//! on its way in, and the root is the hash of that list.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::announcers::{Announcers, Outgoing};
use super::picker::{PeerId, Picker};
use super::relay::{self, BatchStore, BatchVerifier, Rejection, SignedBatch};
use crate::content::{self, Digest, Layout, PieceHash};
use crate::store::PieceStore;
use crate::tls::LiveIdentity;
use crate::wire::{self, Message};

/// How long a piece a peer refused for now is asked of other holders only.
const REFUSAL_BACKOFF: Duration = Duration::from_millis(500);

/// Who may tell us the hash of a piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authority {
    /// A node holding the whole content (a `node` source).
    Seeder(String),
    /// Origin readers, each owning a disjoint range of pieces.
    Readers(Vec<(String, Range<u32>)>),
}

impl Authority {
    /// The node trusted for the hash of `piece`.
    pub fn of(&self, piece: u32) -> Option<&str> {
        match self {
            Authority::Seeder(n) => Some(n),
            Authority::Readers(rs) => rs
                .iter()
                .find(|(_, r)| r.contains(&piece))
                .map(|(n, _)| n.as_str()),
        }
    }

    /// How many nodes are authorities (one for a seeder).
    pub fn node_count(&self) -> usize {
        match self {
            Authority::Seeder(_) => 1,
            Authority::Readers(rs) => {
                let mut nodes: Vec<&str> = rs.iter().map(|(n, _)| n.as_str()).collect();
                nodes.sort_unstable();
                nodes.dedup();
                nodes.len()
            }
        }
    }

    /// The pieces `node` is the authority for.
    pub fn ranges_of<'a>(&'a self, node: &'a str) -> impl Iterator<Item = Range<u32>> + 'a {
        let (seeder, readers): (Option<&String>, &[(String, Range<u32>)]) = match self {
            Authority::Seeder(n) => (Some(n), &[]),
            Authority::Readers(rs) => (None, rs),
        };
        let whole = seeder.filter(|s| s.as_str() == node).map(|_| 0..u32::MAX);
        whole.into_iter().chain(
            readers
                .iter()
                .filter(move |(n, _)| n == node)
                .map(|(_, r)| r.clone()),
        )
    }
}

/// What the agent knows about one content.
#[derive(Debug, Clone)]
pub struct FillSpec {
    pub id: String,
    pub layout: Layout,
    pub digest: Option<Digest>,
    pub authority: Authority,
    /// Nodes this content may be served to.
    pub allowed: HashSet<String>,
    /// The pinned BLAKE3 root known at start (the operator's
    /// `manifestDigest`); a `blake3:` digest pins too. Later pins arrive
    /// through [`Fill::pin_root`].
    pub root: Option<blake3::Hash>,
    /// Never finish without a pinned root (the Kubernetes agent: only the
    /// operator's agreed identity makes a content Complete).
    pub require_pin: bool,
}

/// Errors of finishing a content.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("piece hashes do not merge to the expected digest {0}")]
    ManifestMismatch(Digest),
    #[error("the finished file has digest {got}, expected {want}")]
    DigestMismatch { got: Digest, want: Digest },
    #[error("piece hashes merge to {got}, not to the pinned root {want}")]
    IdentityMismatch { got: String, want: String },
    #[error("no pinned root yet")]
    NotPinned,
    #[error("piece hash list incomplete: {0} hashes unknown")]
    HashesMissing(usize),
    #[error(transparent)]
    Content(#[from] content::ContentError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl FillError {
    /// CamelCase reason for status conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            FillError::ManifestMismatch(_) | FillError::DigestMismatch { .. } => "DigestMismatch",
            FillError::IdentityMismatch { .. } => "IdentityMismatch",
            FillError::NotPinned => "WaitingForIdentity",
            FillError::HashesMissing(_) => "HashesMissing",
            FillError::Content(_) => "VerificationFailed",
            FillError::Store(e) => e.reason(),
        }
    }
}

/// Byte and piece counters of one content, for status and rate.
#[derive(Debug, Default)]
pub struct FillStats {
    pub bytes_from_origin: AtomicU64,
    pub bytes_from_peers: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Bytes received that were not used (endgame duplicates, bad pieces).
    pub bytes_wasted: AtomicU64,
    pub pieces_rejected: AtomicU64,
    /// Pieces held when the store was opened (resumed from disk).
    pub resumed_pieces: AtomicU64,
    /// Pieces taken from a file already on disk (the previous version or a
    /// file at the destination) after they verified against their hash.
    pub reused_pieces: AtomicU64,
    pub bytes_reused: AtomicU64,
}

struct Session {
    node: String,
    cancel: CancellationToken,
    /// Outstanding requests of this session, cancelled when another copy wins.
    requests: HashMap<u32, CancellationToken>,
    /// Wakes this session's downloader alone: news from its own peer (a
    /// `Have`) concerns no other session, and waking every downloader of
    /// the content for every `Have` was most of the agent's wake-ups.
    wake: Arc<Notify>,
}

struct State {
    picker: Picker,
    hashes: Vec<Option<PieceHash>>,
    unknown_hashes: usize,
    announcers: Announcers,
    sessions: HashMap<PeerId, Session>,
    rejected_from: BTreeMap<String, u64>,
    /// Pieces a file on disk may provide, not tried yet: their hash is kept
    /// from the picker until the reuse task tried them, so they are not
    /// fetched over the network first. Empty without reuse sources.
    reuse_pending: Vec<bool>,
    /// Signed batches verified (or signed by us), relayed to our peers.
    batches: BatchStore,
    /// A complete unsigned hash list received before the root was pinned,
    /// and who sent it: tried when the pin arrives.
    unsigned_candidate: Option<(String, Vec<PieceHash>)>,
    /// Nodes known to be in another zone (their sessions are remote peers
    /// for the picker).
    remote_nodes: HashSet<String>,
}

/// One content in the swarm. Shared by the peer sessions, the origin
/// readers and the agent's status task.
pub struct Fill {
    pub spec: FillSpec,
    pub(crate) store: PieceStore,
    state: Mutex<State>,
    /// Woken whenever something a downloader waits for may have changed.
    pub(crate) changed: Notify,
    pub stats: FillStats,
    /// Becomes true when every piece is held and every hash known.
    complete: watch::Sender<bool>,
    /// Announce every piece and serve garbage (fault injection for tests).
    pub(crate) liar: bool,
    /// Nodes this content may be exchanged with; starts as `spec.allowed`
    /// and follows the assignment's peer list while the content runs.
    allowed: Mutex<HashSet<String>>,
    /// Cancelled when the content is removed from this agent: sessions and
    /// announcements end, the store takes no more writes.
    closed: CancellationToken,
    /// The pinned root (see the module comment); set once.
    pinned: watch::Sender<Option<blake3::Hash>>,
    /// Copies of each piece this node started uploading (see `uploads`).
    uploads: Box<[AtomicU32]>,
    /// This node's name and live identity, to sign the hashes it is the
    /// authority for (set when the fill joins the swarm).
    signer: OnceLock<(String, LiveIdentity)>,
}

impl std::fmt::Debug for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fill").field("id", &self.spec.id).finish()
    }
}

impl Fill {
    /// A fill over `store` (resumed pieces are taken from its bitmap).
    pub fn new(spec: FillSpec, store: PieceStore, liar: bool) -> Arc<Fill> {
        let n = spec.layout.piece_count();
        let mut picker = Picker::new(n);
        let have = store.have();
        for i in have.iter_ones() {
            picker.set_have(i);
        }
        let stats = FillStats::default();
        stats
            .resumed_pieces
            .store(u64::from(have.count_ones()), Ordering::Relaxed);
        let (complete, _) = watch::channel(false);
        let allowed = Mutex::new(spec.allowed.clone());
        let initial_pin = spec.root.or(match spec.digest {
            Some(Digest::Blake3(b)) => Some(blake3::Hash::from_bytes(b)),
            _ => None,
        });
        let (pinned, _) = watch::channel(initial_pin);
        Arc::new(Fill {
            signer: OnceLock::new(),
            uploads: (0..n).map(|_| AtomicU32::new(0)).collect(),
            pinned,
            allowed,
            closed: CancellationToken::new(),
            spec,
            store,
            state: Mutex::new(State {
                picker,
                hashes: vec![None; n as usize],
                unknown_hashes: n as usize,
                announcers: Announcers::default(),
                sessions: HashMap::new(),
                rejected_from: BTreeMap::new(),
                reuse_pending: Vec::new(),
                batches: BatchStore::default(),
                unsigned_candidate: None,
                remote_nodes: HashSet::new(),
            }),
            changed: Notify::new(),
            stats,
            complete,
            liar,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // State updates are small and leave it consistent at every step.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn layout(&self) -> Layout {
        self.spec.layout
    }

    pub fn allows(&self, node: &str) -> bool {
        self.allowed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(node)
    }

    /// Replaces the nodes this content may be exchanged with. Returns the
    /// nodes newly allowed (to announce to); sessions with nodes no longer
    /// allowed end.
    pub fn set_allowed(&self, allowed: HashSet<String>) -> Vec<String> {
        let (added, removed): (Vec<String>, Vec<String>) = {
            let mut cur = self.allowed.lock().unwrap_or_else(PoisonError::into_inner);
            let added = allowed.difference(&cur).cloned().collect();
            let removed = cur.difference(&allowed).cloned().collect();
            *cur = allowed;
            (added, removed)
        };
        for node in &removed {
            self.drop_node(node);
        }
        added
    }

    /// Stops this content: every session and announcement ends, and the
    /// store refuses further writes (pieces in flight are dropped), so its
    /// files can be deleted or reopened by a new fill.
    pub fn close(&self) {
        self.closed.cancel();
        self.store.close();
        let ids: Vec<PeerId> = {
            let mut st = self.lock();
            // Dropping the senders ends the announce streams.
            st.announcers.clear();
            st.sessions.keys().copied().collect()
        };
        for id in ids {
            self.remove_session(id);
        }
    }

    /// Pins the content's root (the operator's agreed identity). A pin is
    /// never replaced: another root means another content id.
    pub fn pin_root(&self, root: blake3::Hash) {
        let pinned = self.pinned.send_if_modified(|p| {
            if p.is_none() {
                *p = Some(root);
                true
            } else {
                false
            }
        });
        let candidate = pinned
            .then(|| self.lock().unsigned_candidate.take())
            .flatten();
        if let Some((from, hashes)) = candidate
            && let Err(e) = self.offer_unsigned(&from, hashes)
        {
            warn!(content = %self.spec.id, peer = %from, error = %e, "hash list received before the pin does not match it");
        }
    }

    /// The pinned root, if any.
    pub fn pinned_root(&self) -> Option<blake3::Hash> {
        *self.pinned.borrow()
    }

    /// Resolves once a root is pinned.
    pub async fn wait_pinned(&self) -> blake3::Hash {
        let mut rx = self.pinned.subscribe();
        loop {
            if let Some(r) = *rx.borrow_and_update() {
                return r;
            }
            // The sender lives as long as `self`.
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Pieces held plus hashes known: grows whenever the fill makes progress
    /// (the stall watchdog compares it over time).
    pub fn progress_mark(&self) -> u64 {
        let st = self.lock();
        let known = st.hashes.len() - st.unknown_hashes;
        u64::from(self.store.held_count()) + known as u64
    }

    /// Whether some session's peer holds a piece we could request now.
    pub fn any_peer_interesting(&self) -> bool {
        let st = self.lock();
        st.sessions.keys().any(|id| st.picker.interesting(*id))
    }

    /// Open sessions (one per peer) of this content.
    pub(crate) fn session_count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Nodes with an open announce session for this content.
    pub fn session_nodes(&self) -> HashSet<String> {
        self.lock()
            .sessions
            .values()
            .map(|s| s.node.clone())
            .collect()
    }

    /// Nodes this content may be exchanged with now.
    pub fn allowed_nodes(&self) -> HashSet<String> {
        self.allowed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Holds back every missing piece for the reuse task (see
    /// `State::reuse_pending`) until [`Fill::reuse_tried`] or
    /// [`Fill::reuse_finished`].
    pub fn defer_for_reuse(&self) {
        let mut st = self.lock();
        let n = self.spec.layout.piece_count();
        st.reuse_pending = (0..n).map(|i| !st.picker.have(i)).collect();
    }

    /// The reuse task tried `piece` (reused or not): it may be fetched now.
    pub fn reuse_tried(&self, piece: u32) {
        let mut st = self.lock();
        if let Some(p) = st.reuse_pending.get_mut(piece as usize) {
            *p = false;
        }
        if st.hashes.get(piece as usize).is_some_and(Option::is_some) {
            st.picker.set_hash_known(piece);
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Waits until the reuse task tried every piece of `range` (at once
    /// when nothing is held back), so an origin reader reads from the
    /// origin only what files on disk did not hold.
    pub async fn reuse_settled(&self, range: std::ops::Range<u32>) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let pending = {
                let st = self.lock();
                range
                    .clone()
                    .any(|p| st.reuse_pending.get(p as usize).is_some_and(|b| *b))
            };
            if !pending || self.is_closed() {
                return;
            }
            changed.await;
        }
    }

    /// The reuse task is done (or gone): nothing is held back any more.
    pub fn reuse_finished(&self) {
        let mut st = self.lock();
        let pending = std::mem::take(&mut st.reuse_pending);
        for (i, p) in pending.into_iter().enumerate() {
            if p && st.hashes[i].is_some() {
                st.picker.set_hash_known(i as u32);
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Resolves when the fill is closed.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Whether [`Fill::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// BLAKE3 of the whole content (`blake3:<hex>`), merged from the piece
    /// hashes once every one is known.
    pub fn content_digest(&self) -> Option<Digest> {
        let hashes: Vec<PieceHash> = {
            let st = self.lock();
            if st.unknown_hashes > 0 {
                return None;
            }
            st.hashes.iter().flatten().copied().collect()
        };
        let root = content::root_from_pieces(&self.spec.layout, &hashes).ok()?;
        Some(Digest::Blake3(*root.as_bytes()))
    }

    /// Pieces held (verified and durable).
    pub fn pieces_done(&self) -> u32 {
        self.store.held_count()
    }

    pub fn bytes_done(&self) -> u64 {
        self.store.held_bytes()
    }

    /// Pieces (and hash batches or lists) rejected as lies, by the node
    /// that sent them.
    pub fn rejected_from(&self) -> BTreeMap<String, u64> {
        self.lock().rejected_from.clone()
    }

    /// Resolves when the content is complete (all pieces held and hashes known).
    pub async fn wait_complete(&self) {
        let mut rx = self.complete.subscribe();
        // The sender lives as long as `self`, so this only ends when complete.
        let _ = rx.wait_for(|c| *c).await;
    }

    fn check_complete(&self, st: &State) {
        if st.picker.is_complete() && st.unknown_hashes == 0 {
            self.complete.send_replace(true);
        }
    }

    /// Nodes whose piece hashes we still wait for (the authorities of the
    /// pieces with an unknown hash), sorted.
    pub fn pending_authorities(&self) -> Vec<String> {
        let st = self.lock();
        let mut nodes: Vec<String> = Vec::new();
        if st.unknown_hashes == 0 {
            return nodes;
        }
        for (i, h) in st.hashes.iter().enumerate() {
            if h.is_none()
                && let Some(n) = self.spec.authority.of(i as u32)
                && !nodes.iter().any(|x| x == n)
            {
                nodes.push(n.to_string());
            }
        }
        nodes.sort();
        nodes
    }

    /// The trusted hash of a piece, if known.
    pub fn hash(&self, piece: u32) -> Option<PieceHash> {
        self.lock().hashes.get(piece as usize).copied().flatten()
    }

    fn set_hash_locked(&self, st: &mut State, piece: u32, hash: PieceHash, from: &str) -> bool {
        let Some(slot) = st.hashes.get_mut(piece as usize) else {
            return false;
        };
        match slot {
            Some(h) if *h == hash => false,
            Some(_) => {
                warn!(content = %self.spec.id, piece, from, "conflicting piece hash ignored");
                false
            }
            None => {
                *slot = Some(hash);
                st.unknown_hashes -= 1;
                if !st
                    .reuse_pending
                    .get(piece as usize)
                    .copied()
                    .unwrap_or(false)
                {
                    st.picker.set_hash_known(piece);
                }
                true
            }
        }
    }

    /// Hashes `node` vouches for, kept only for the pieces it is the
    /// authority for (tests; the swarm takes them as signed batches).
    #[cfg(test)]
    pub(crate) fn hashes_from(&self, node: &str, entries: &[(u32, PieceHash)]) {
        let mut st = self.lock();
        let mut learned = 0;
        for (piece, hash) in entries {
            if self.spec.authority.of(*piece) != Some(node) {
                debug!(content = %self.spec.id, piece, from = node, "hash from non-authority ignored");
                continue;
            }
            if self.set_hash_locked(&mut st, *piece, *hash, node) {
                learned += 1;
            }
        }
        if learned > 0 {
            self.check_complete(&st);
            drop(st);
            self.changed.notify_waiters();
        }
    }

    /// Hashes we computed ourselves over bytes we hold (resumed origin
    /// ranges, a seeded file). Announced to peers if we are their authority.
    pub fn own_hashes(&self, node: &str, entries: &[(u32, PieceHash)]) {
        let mut st = self.lock();
        for (piece, hash) in entries {
            self.set_hash_locked(&mut st, *piece, *hash, node);
        }
        let mine: Vec<_> = entries
            .iter()
            .filter(|(p, _)| self.spec.authority.of(*p) == Some(node))
            .copied()
            .collect();
        self.check_complete(&st);
        drop(st);
        self.changed.notify_waiters();
        self.sign_own(mine);
    }

    /// Number of piece hashes not known yet.
    pub fn hashes_missing(&self) -> usize {
        self.lock().unknown_hashes
    }

    /// Signs with `live` the hashes `node` (this agent) is the authority
    /// for, those known now and those learnt later. Set once.
    pub(crate) fn set_signer(&self, node: &str, live: LiveIdentity) {
        if self.signer.set((node.to_string(), live)).is_err() {
            return;
        }
        let mine = self.own_known(node);
        self.sign_own(mine);
    }

    /// The known hashes `me` is the authority for.
    fn own_known(&self, me: &str) -> Vec<(u32, PieceHash)> {
        let st = self.lock();
        st.hashes
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                let i = i as u32;
                (self.spec.authority.of(i) == Some(me)).then_some((i, (*h)?))
            })
            .collect()
    }

    /// Signs and publishes `entries` (hashes this node is the authority
    /// for); then, for each of its ranges now wholly known, signs the whole
    /// range, which supersedes the small batches (see `relay`).
    fn sign_own(&self, entries: Vec<(u32, PieceHash)>) {
        self.sign_own_as(entries, false);
    }

    /// [`Fill::sign_own`]; `renewed`: the batches replace ones signed with
    /// our previous certificate and go to every peer.
    fn sign_own_as(&self, entries: Vec<(u32, PieceHash)>, renewed: bool) {
        if self.signer.get().is_none() || entries.is_empty() {
            return;
        }
        if !renewed {
            self.resign_if_renewed();
        }
        let signed = self.sign_runs(&entries);
        self.store_batches(&mut self.lock(), signed, renewed);
        self.sign_whole_ranges(&entries);
    }

    /// For each range of ours that `entries` touch and that is now wholly
    /// known, signs the whole range once (it supersedes the small batches).
    fn sign_whole_ranges(&self, entries: &[(u32, PieceHash)]) {
        let Some((me, _)) = self.signer.get() else {
            return;
        };
        let n = self.spec.layout.piece_count();
        let ranges: Vec<Range<u32>> = self
            .spec
            .authority
            .ranges_of(me)
            .map(|r| r.start.min(n)..r.end.min(n))
            .filter(|r| entries.iter().any(|(p, _)| r.contains(p)))
            .collect();
        for r in ranges {
            let whole: Option<Vec<(u32, PieceHash)>> = {
                let st = self.lock();
                let batches = st.batches.count_within(me, r.start, r.end);
                let needed = (r.len()).div_ceil(wire::MAX_HASHES_PER_FRAME);
                if batches <= needed {
                    None
                } else {
                    r.clone()
                        .map(|p| st.hashes[p as usize].map(|h| (p, h)))
                        .collect()
                }
            };
            if let Some(whole) = whole {
                let signed = self.sign_runs(&whole);
                self.store_batches(&mut self.lock(), signed, false);
            }
        }
    }

    /// Signs `entries` (hashes we are the authority for) in runs.
    fn sign_runs(&self, entries: &[(u32, PieceHash)]) -> Vec<Arc<SignedBatch>> {
        let Some((me, live)) = self.signer.get() else {
            return Vec::new();
        };
        let layout = self.spec.layout;
        let mut signed = Vec::new();
        for (first, hashes) in relay::runs(entries) {
            match relay::sign_batch(live, me, &self.spec.id, &layout, first, hashes) {
                Ok(b) => signed.push(Arc::new(b)),
                Err(e) => {
                    warn!(content = %self.spec.id, error = %e, "cannot sign a hash batch; its hashes are not announced");
                    return Vec::new();
                }
            }
        }
        signed
    }

    /// Keeps `batches` and sends each where it is needed now (see
    /// `announcers`): to every stream when it replaces batches of a renewed
    /// certificate (`to_all`), else to the streams told about one of its
    /// pieces without its hash. The rest ride with later `Have`s.
    fn store_batches(&self, st: &mut State, batches: Vec<Arc<SignedBatch>>, to_all: bool) {
        for b in batches {
            if !st.batches.insert(b.clone()) {
                continue;
            }
            if to_all {
                st.announcers.send_to_all(&b);
            } else {
                let (picker, liar) = (&st.picker, self.liar);
                st.announcers.stored(&b, |p| liar || picker.have(p));
            }
        }
    }

    /// The stored batch holding the hash of `piece`, signed by its authority.
    fn batch_for<'a>(&self, st: &'a State, piece: u32) -> Option<&'a Arc<SignedBatch>> {
        st.batches.covering(self.spec.authority.of(piece)?, piece)
    }

    /// After a renewal of our certificate: our own batches carry the old
    /// one, which peers that see the new pin refuse; sign them again.
    pub(crate) fn resign_if_renewed(&self) {
        let Some((me, live)) = self.signer.get() else {
            return;
        };
        let Some(fp) = live.fingerprint() else {
            return;
        };
        let stale = {
            let mut st = self.lock();
            let stale = st.batches.has_stale(me, &fp);
            if stale {
                st.batches.remove_of(me);
            }
            stale
        };
        if stale {
            let mine = self.own_known(me);
            self.sign_own_as(mine, true);
        }
    }

    /// A signed batch received from `from`: checked (see `relay`), its new
    /// hashes trusted and kept for our peers (see `announcers`). Returns the number of
    /// hashes learnt; a batch that adds nothing is dropped without any
    /// cryptography unless it supersedes stored ones.
    pub(crate) fn offer_batch(
        &self,
        verifier: &BatchVerifier,
        from: &str,
        batch: Arc<SignedBatch>,
    ) -> Result<usize, Rejection> {
        let layout = self.spec.layout;
        BatchVerifier::check_claim(&layout, &self.spec.authority, &batch)?;
        let first = batch.first as usize;
        let known = |st: &State| {
            batch
                .hashes
                .iter()
                .enumerate()
                .all(|(i, h)| st.hashes[first + i] == Some(*h))
        };
        {
            let st = self.lock();
            if known(&st)
                && st.batches.superseded_by(&batch) < 2
                && st
                    .batches
                    .stale_overlaps(&batch, verifier.pins())
                    .is_empty()
            {
                return Ok(0);
            }
        }
        verifier.check(&self.spec.id, &layout, &self.spec.authority, &batch)?;
        let mut st = self.lock();
        // Verified, so its certificate is the published one: it replaces
        // batches whose certificate no longer is.
        let stale = st.batches.stale_overlaps(&batch, verifier.pins());
        st.batches.remove(&stale);
        let conflict = batch
            .hashes
            .iter()
            .enumerate()
            .any(|(i, h)| st.hashes[first + i].is_some_and(|k| k != *h));
        if conflict {
            warn!(content = %self.spec.id, signer = %batch.signer, peer = from, first, "a signed batch conflicts with known hashes; not relayed");
            return Ok(0);
        }
        let mut learned = 0;
        for (i, h) in batch.hashes.iter().enumerate() {
            if self.set_hash_locked(&mut st, (first + i) as u32, *h, &batch.signer) {
                learned += 1;
            }
        }
        self.store_batches(&mut st, vec![batch], !stale.is_empty());
        if learned > 0 {
            debug!(content = %self.spec.id, peer = from, learned, "hashes learnt from a signed batch");
            self.check_complete(&st);
            drop(st);
            self.changed.notify_waiters();
        }
        Ok(learned)
    }

    /// A complete unsigned hash list (one per piece) from `from`: trusted
    /// when it merges to the pinned root; kept for the pin when none yet.
    /// `Err` when it does not merge to the pin (the sender lied).
    pub(crate) fn offer_unsigned(
        &self,
        from: &str,
        hashes: Vec<PieceHash>,
    ) -> Result<usize, Rejection> {
        let layout = self.spec.layout;
        if hashes.len() != layout.piece_count() as usize || self.hashes_missing() == 0 {
            return Ok(0);
        }
        let Some(root) = self.pinned_root() else {
            self.lock().unsigned_candidate = Some((from.to_string(), hashes));
            return Ok(0);
        };
        let got = content::root_from_pieces(&layout, &hashes).ok();
        if got != Some(root) {
            return Err(Rejection::RootMismatch {
                got: got.map(|h| h.to_hex().to_string()).unwrap_or_default(),
            });
        }
        let mut st = self.lock();
        let mut learned = 0;
        for (i, h) in hashes.into_iter().enumerate() {
            if self.set_hash_locked(&mut st, i as u32, h, from) {
                learned += 1;
            }
        }
        if learned > 0 {
            debug!(content = %self.spec.id, peer = from, learned, "hashes learnt from a list matching the pinned root");
            self.check_complete(&st);
            drop(st);
            self.changed.notify_waiters();
        }
        Ok(learned)
    }

    /// Registers an announce stream to a peer: queues `Hello`, our
    /// bitfield, the signed batches covering pieces we hold (and, once
    /// pinned, our complete hash list), then every later `Have`, with the
    /// batches it needs (see `announcers`). Done under the state
    /// lock so nothing falls between snapshot and registration.
    pub(crate) fn register_announcer(
        &self,
        tx: mpsc::UnboundedSender<Outgoing>,
        peer: &str,
    ) -> u64 {
        let mut st = self.lock();
        if self.is_closed() {
            // Dropping `tx` ends the announce stream at once.
            return st.announcers.skip();
        }
        let layout = self.spec.layout;
        let n = layout.piece_count();
        let _ = tx.send(Outgoing::Msg(Message::Hello {
            content: self.spec.id.clone(),
            size: layout.size,
            piece_size: layout.piece_size,
        }));
        let told = |i: u32| self.liar || st.picker.have(i);
        let bits = wire::pack_bits((0..n).map(told));
        let _ = tx.send(Outgoing::Msg(Message::Bitfield { bits }));
        // The hashes of the pieces it is told about (see `announcers`).
        let sent: Vec<Arc<SignedBatch>> = st
            .batches
            .all()
            .filter(|b| (b.first..b.end().min(u64::from(n)) as u32).any(told))
            .cloned()
            .collect();
        for b in &sent {
            let _ = tx.send(Outgoing::Batch(b.clone()));
        }
        // The pinned list lets a pinned peer skip every signature (and is
        // the only way to pass on hashes learnt without batches).
        if st.unknown_hashes == 0 && self.pinned_root().is_some() {
            let all: Vec<(u32, PieceHash)> =
                (0u32..).zip(st.hashes.iter().flatten().copied()).collect();
            for m in wire::hash_messages(&all) {
                let _ = tx.send(Outgoing::Msg(m));
            }
        }
        st.announcers.insert(tx, peer, n, &sent)
    }

    pub(crate) fn unregister_announcer(&self, id: u64) {
        self.lock().announcers.remove(id);
    }

    /// A peer opened an announce stream for this content.
    /// Returns the token that ends the session and the notification that
    /// wakes its downloader for news from its peer alone (see `Session`);
    /// news for every session comes through [`Fill::changed`].
    pub(crate) fn add_session(&self, id: PeerId, node: &str) -> (CancellationToken, Arc<Notify>) {
        let cancel = CancellationToken::new();
        let wake = Arc::new(Notify::new());
        let mut st = self.lock();
        if self.is_closed() {
            cancel.cancel();
            return (cancel, wake);
        }
        st.picker.add_peer(id, |_| false);
        let remote = st.remote_nodes.contains(node);
        st.picker.set_remote(id, remote);
        st.sessions.insert(
            id,
            Session {
                node: node.to_string(),
                cancel: cancel.clone(),
                requests: HashMap::new(),
                wake: wake.clone(),
            },
        );
        (cancel, wake)
    }

    /// Sets the nodes known to be in another zone than this one: the picker
    /// asks them only when no same-zone peer offers anything.
    pub(crate) fn set_remote_nodes(&self, nodes: &HashSet<String>) {
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            for (id, s) in &st.sessions {
                st.picker.set_remote(*id, nodes.contains(&s.node));
            }
            st.remote_nodes.clone_from(nodes);
        }
        self.changed.notify_waiters();
    }

    pub(crate) fn remove_session(&self, id: PeerId) {
        let mut st = self.lock();
        st.picker.remove_peer(id);
        if let Some(s) = st.sessions.remove(&id) {
            s.cancel.cancel();
            for (_, c) in s.requests {
                c.cancel();
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Ends every session with `node` (it was banned).
    pub(crate) fn drop_node(&self, node: &str) {
        let ids: Vec<PeerId> = self
            .lock()
            .sessions
            .iter()
            .filter(|(_, s)| s.node == node)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.remove_session(id);
        }
    }

    pub(crate) fn session_bitfield(&self, id: PeerId, bits: &[u8]) {
        let mut st = self.lock();
        let Some(wake) = st.sessions.get(&id).map(|s| s.wake.clone()) else {
            return;
        };
        st.picker.add_peer(id, |i| wire::bit(bits, i));
        drop(st);
        wake.notify_one();
    }

    /// The peer of session `id` got `piece`: its downloader wakes if we
    /// lack the piece (a permit stored by `notify_one` is never lost).
    pub(crate) fn session_have(&self, id: PeerId, piece: u32) {
        let mut st = self.lock();
        st.picker.peer_has(id, piece);
        let wake = st
            .sessions
            .get(&id)
            .filter(|_| !st.picker.have(piece))
            .map(|s| s.wake.clone());
        drop(st);
        if let Some(w) = wake {
            w.notify_one();
        }
    }

    /// Copies of `piece` this node started uploading.
    pub(crate) fn upload_count(&self, piece: u32) -> u32 {
        self.uploads
            .get(piece as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub(crate) fn count_upload(&self, piece: u32) {
        if let Some(c) = self.uploads.get(piece as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Chooses a piece to request from session `id` and returns it with its
    /// trusted hash and a token that cancels the request.
    pub(crate) fn pick(&self, id: PeerId) -> Option<(u32, PieceHash, CancellationToken)> {
        let mut st = self.lock();
        let piece = st.picker.pick(id, &mut rand::rng(), Instant::now())?;
        let Some(hash) = st.hashes[piece as usize] else {
            // The picker only offers pieces with a known hash.
            st.picker.release(piece, id);
            return None;
        };
        let token = CancellationToken::new();
        if let Some(s) = st.sessions.get_mut(&id) {
            s.requests.insert(piece, token.clone());
        }
        Some((piece, hash, token))
    }

    /// Whether the peer of session `id` has a piece we could request now.
    pub(crate) fn interesting(&self, id: PeerId) -> bool {
        self.lock().picker.interesting(id)
    }

    pub fn is_complete(&self) -> bool {
        *self.complete.borrow()
    }

    fn forget_request(st: &mut State, id: PeerId, piece: u32) {
        if let Some(s) = st.sessions.get_mut(&id) {
            s.requests.remove(&piece);
        }
    }

    /// A request failed or was cancelled: the piece goes back to the pool.
    pub(crate) fn release(&self, id: PeerId, piece: u32) {
        let mut st = self.lock();
        st.picker.release(piece, id);
        Self::forget_request(&mut st, id, piece);
        drop(st);
        self.changed.notify_waiters();
    }

    /// The peer of session `id` refused the piece for now (its uplink is
    /// taken by pieces it has sent fewer times): ask other holders first.
    pub(crate) fn refused(&self, id: PeerId, piece: u32) {
        let mut st = self.lock();
        st.picker
            .refused(piece, id, Instant::now() + REFUSAL_BACKOFF);
        Self::forget_request(&mut st, id, piece);
        drop(st);
        self.changed.notify_waiters();
    }

    /// A piece from `node` failed verification.
    pub(crate) fn rejected(&self, id: PeerId, node: &str, piece: u32, len: u64) {
        self.stats.pieces_rejected.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_wasted.fetch_add(len, Ordering::Relaxed);
        let mut st = self.lock();
        *st.rejected_from.entry(node.to_string()).or_default() += 1;
        st.picker.release(piece, id);
        Self::forget_request(&mut st, id, piece);
        drop(st);
        self.changed.notify_waiters();
    }

    /// Hashes from `node` were refused as a lie (see `relay`): counted
    /// with its rejected pieces.
    pub(crate) fn hashes_refused(&self, node: &str) {
        *self
            .lock()
            .rejected_from
            .entry(node.to_string())
            .or_default() += 1;
    }

    /// Stores a verified piece received from session `id` (`None`: read from
    /// the origin by us, with `hash` computed from the data) and announces
    /// it. Returns false when the piece was a duplicate (already held or
    /// being written).
    pub(crate) async fn store_verified(
        &self,
        id: Option<PeerId>,
        me: &str,
        piece: u32,
        data: Bytes,
        own_hash: Option<PieceHash>,
    ) -> Result<bool, crate::store::StoreError> {
        {
            let mut st = self.lock();
            let peer = id.unwrap_or(PeerId::MAX);
            if let Some(id) = id {
                Self::forget_request(&mut st, id, piece);
            }
            if !st.picker.begin_write(piece, peer) {
                drop(st);
                self.changed.notify_waiters();
                return Ok(false);
            }
        }
        if let Err(e) = self.store.write_piece(piece, data).await {
            self.lock().picker.abort_write(piece);
            self.changed.notify_waiters();
            return Err(e);
        }
        // A piece we are the authority for is signed before it is
        // announced, so its batch goes out with its `Have`.
        let signed = match own_hash.filter(|_| self.spec.authority.of(piece) == Some(me)) {
            Some(h) => {
                self.resign_if_renewed();
                self.sign_runs(&[(piece, h)])
            }
            None => Vec::new(),
        };
        let mut st = self.lock();
        if let Some(h) = own_hash {
            self.set_hash_locked(&mut st, piece, h, me);
        }
        let own_signed = !signed.is_empty();
        self.store_batches(&mut st, signed, false);
        let losers = st.picker.finish_write(piece);
        for loser in losers {
            if let Some(s) = st.sessions.get_mut(&loser)
                && let Some(tok) = s.requests.remove(&piece)
            {
                tok.cancel();
            }
        }
        let covering = self.batch_for(&st, piece).cloned();
        // Peers that announced the piece are not told (see `announcers`).
        let State {
            sessions,
            picker,
            announcers,
            ..
        } = &mut *st;
        announcers.have(piece, covering.as_ref(), |peer| {
            sessions
                .iter()
                .any(|(id, s)| s.node == peer && picker.peer_holds(*id, piece))
        });
        let own = st.hashes[piece as usize]
            .filter(|_| self.spec.authority.of(piece) == Some(me))
            .map(|h| (piece, h));
        self.check_complete(&st);
        drop(st);
        self.changed.notify_waiters();
        match own {
            Some(own) if own_signed => self.sign_whole_ranges(&[own]),
            // Our hash, learnt some other way (a resumed piece).
            Some(own) => self.sign_own(vec![own]),
            None => {}
        }
        Ok(true)
    }

    /// Marks the whole content complete without downloading (a seeder).
    pub(crate) fn mark_all_held(&self) {
        let mut st = self.lock();
        for i in 0..self.spec.layout.piece_count() {
            st.picker.set_have(i);
        }
        self.check_complete(&st);
    }

    /// Final checks once every piece is held and every hash known (see the
    /// module comment), then the atomic rename onto `dest`.
    pub async fn finish(&self, dest: &std::path::Path) -> Result<(), FillError> {
        self.check_identity().await?;
        self.store.clone().finalize(dest).await?;
        Ok(())
    }

    /// [`Fill::finish`] for a directory content: the verified blob becomes
    /// the directory at `dest` ([`crate::tree::stage`]), each file's own
    /// digest checked on the way.
    pub async fn finish_tree(&self, dest: &std::path::Path) -> Result<(), FillError> {
        self.check_identity().await?;
        self.store.clone().finalize_tree(dest).await?;
        Ok(())
    }

    /// Checks that every piece is held under a hash list that merges to the
    /// pinned root (and the user's digest), before anything is moved.
    async fn check_identity(&self) -> Result<(), FillError> {
        let layout = self.spec.layout;
        let hashes: Vec<PieceHash> = {
            let st = self.lock();
            if st.unknown_hashes > 0 {
                return Err(FillError::HashesMissing(st.unknown_hashes));
            }
            st.hashes.iter().flatten().copied().collect()
        };
        let root = content::root_from_pieces(&layout, &hashes)?;
        if let Some(d @ Digest::Blake3(_)) = &self.spec.digest
            && !content::manifest_root_matches(&layout, &hashes, d)
        {
            return Err(FillError::ManifestMismatch(*d));
        }
        let pinned = self.pinned_root();
        match pinned {
            Some(want) if want != root => {
                return Err(FillError::IdentityMismatch {
                    got: format!("blake3:{}", root.to_hex()),
                    want: format!("blake3:{}", want.to_hex()),
                });
            }
            None if self.spec.require_pin => return Err(FillError::NotPinned),
            _ => {}
        }
        // Every piece was verified against its trusted hash when it was
        // stored (or read by us from the origin or the seeded file), and the
        // root is the hash of exactly that hash list: the file is that
        // content, so re-hashing it would only repeat the work. Only a
        // sha256 digest needs the bytes again.
        if let Some(want @ Digest::Sha256(_)) = self.spec.digest {
            let mut sha = content::StreamingDigest::new(content::DigestAlgo::Sha256);
            for i in 0..layout.piece_count() {
                let data = self.store.read_piece(i).await?;
                sha = tokio::task::spawn_blocking(move || {
                    sha.update(&data);
                    sha
                })
                .await
                .map_err(|e| FillError::Store(crate::store::StoreError::Join(e)))?;
            }
            let got = sha.finalize();
            if got != want {
                return Err(FillError::DigestMismatch { got, want });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::piece_hash;

    const PIECE: u32 = 16 << 10;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn fill(dir: &std::path::Path, size: usize, digest: Option<Digest>) -> Arc<Fill> {
        let layout = Layout::new(size as u64, PIECE).expect("layout");
        let store = PieceStore::open(dir, "c", layout).expect("store");
        let spec = FillSpec {
            id: "c".into(),
            layout,
            digest,
            authority: Authority::Readers(vec![("r0".into(), 0..2), ("r1".into(), 2..4)]),
            allowed: ["a".to_string()].into(),
            root: None,
            require_pin: false,
        };
        Fill::new(spec, store, false)
    }

    #[test]
    fn hashes_are_taken_only_from_the_authority_of_each_piece() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fill(dir.path(), 4 * PIECE as usize, None);
        f.hashes_from("r1", &[(0, [1; 32]), (2, [2; 32])]);
        assert_eq!(f.hash(0), None, "r1 is not the authority of piece 0");
        assert_eq!(f.hash(2), Some([2; 32]));
        f.hashes_from("mallory", &[(1, [9; 32])]);
        assert_eq!(f.hash(1), None);
        // A conflicting second value from the authority is ignored.
        f.hashes_from("r1", &[(2, [3; 32])]);
        assert_eq!(f.hash(2), Some([2; 32]));
    }

    #[tokio::test]
    async fn completes_and_checks_the_whole_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = data(4 * PIECE as usize);
        let digest = Digest::Blake3(*blake3::hash(&bytes).as_bytes());
        let f = fill(dir.path(), bytes.len(), Some(digest));
        let layout = f.layout();
        let hashes: Vec<(u32, PieceHash)> = (0..4)
            .map(|i| {
                let r = layout.piece_range(i);
                (
                    i,
                    piece_hash(&layout, i, &bytes[r.start as usize..r.end as usize]),
                )
            })
            .collect();
        assert_eq!(f.pending_authorities(), vec!["r0", "r1"]);
        assert_eq!(f.spec.authority.node_count(), 2);
        f.hashes_from("r0", &hashes[..2]);
        assert_eq!(f.pending_authorities(), vec!["r1"]);
        f.hashes_from("r1", &hashes[2..]);
        assert!(f.pending_authorities().is_empty());
        for i in 0..4 {
            let r = layout.piece_range(i);
            let piece = Bytes::copy_from_slice(&bytes[r.start as usize..r.end as usize]);
            assert!(
                f.store_verified(None, "me", i, piece, None)
                    .await
                    .expect("store")
            );
        }
        assert!(f.is_complete());
        let dest = dir.path().join("out/c.bin");
        f.finish(&dest).await.expect("finish");
        assert_eq!(std::fs::read(&dest).expect("dest"), bytes);
    }

    #[tokio::test]
    async fn a_manifest_not_matching_the_digest_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = data(2 * PIECE as usize);
        let f = fill(dir.path(), bytes.len(), Some(Digest::Blake3([7; 32])));
        let layout = f.layout();
        for i in 0..2 {
            let r = layout.piece_range(i);
            let piece = Bytes::copy_from_slice(&bytes[r.start as usize..r.end as usize]);
            let h = piece_hash(&layout, i, &piece);
            f.store_verified(None, "r0", i, piece, Some(h))
                .await
                .expect("store");
        }
        let err = f
            .finish(&dir.path().join("out"))
            .await
            .expect_err("must fail");
        assert_eq!(err.reason(), "DigestMismatch");
    }

    fn hashes(layout: &Layout, bytes: &[u8]) -> Vec<(u32, PieceHash)> {
        (0..layout.piece_count())
            .map(|i| {
                let r = layout.piece_range(i);
                (
                    i,
                    piece_hash(layout, i, &bytes[r.start as usize..r.end as usize]),
                )
            })
            .collect()
    }

    fn pinned_fill(dir: &std::path::Path, size: usize) -> Arc<Fill> {
        let layout = Layout::new(size as u64, PIECE).expect("layout");
        let store = PieceStore::open(dir, "c", layout).expect("store");
        let spec = FillSpec {
            id: "c".into(),
            layout,
            digest: None,
            authority: Authority::Seeder("s".into()),
            allowed: HashSet::new(),
            root: None,
            require_pin: true,
        };
        Fill::new(spec, store, false)
    }

    async fn store_all(f: &Fill, bytes: &[u8]) {
        let layout = f.layout();
        for i in 0..layout.piece_count() {
            let r = layout.piece_range(i);
            let piece = Bytes::copy_from_slice(&bytes[r.start as usize..r.end as usize]);
            f.store_verified(None, "me", i, piece, None)
                .await
                .expect("store");
        }
    }

    #[tokio::test]
    async fn complete_only_against_the_pinned_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = data(3 * PIECE as usize);
        let f = pinned_fill(dir.path(), bytes.len());
        f.hashes_from("s", &hashes(&f.layout(), &bytes));
        store_all(&f, &bytes).await;
        assert!(f.is_complete(), "every piece held and hash known");
        // Held, but no identity pinned: not finished.
        let dest = dir.path().join("out/c.bin");
        let err = f.finish(&dest).await.expect_err("no pin yet");
        assert_eq!(err.reason(), "WaitingForIdentity");
        assert!(!dest.exists());
        // A pin that is not this list's root: refused, nothing in place.
        let other = blake3::hash(b"other content");
        f.pin_root(other);
        let err = f.finish(&dest).await.expect_err("wrong identity");
        assert_eq!(err.reason(), "IdentityMismatch");
        assert!(!dest.exists());
        // A pin is never replaced.
        f.pin_root(blake3::hash(&bytes));
        assert_eq!(f.pinned_root(), Some(other));

        let dir2 = tempfile::tempdir().expect("tempdir");
        let g = pinned_fill(dir2.path(), bytes.len());
        g.hashes_from("s", &hashes(&g.layout(), &bytes));
        store_all(&g, &bytes).await;
        let root = blake3::hash(&bytes);
        let waiter = {
            let g = g.clone();
            tokio::spawn(async move { g.wait_pinned().await })
        };
        g.pin_root(root);
        assert_eq!(waiter.await.expect("join"), root);
        let dest = dir2.path().join("out/c.bin");
        g.finish(&dest).await.expect("finish against the pin");
        assert_eq!(std::fs::read(&dest).expect("dest"), bytes);
    }
}
