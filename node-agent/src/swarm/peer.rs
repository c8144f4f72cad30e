//! What happens on one peer connection.
//!
//! - For each content the peer may have, we open a unidirectional *announce*
//!   stream: `Hello`, our bitfield, the signed hash batches covering the
//!   pieces we hold (each signer's certificate first, once per stream), then
//!   a `Have` per piece we get, after the batch with its hash when the peer
//!   was not sent that batch yet (see `announcers`, `relay`).
//! - For each announce stream the peer opens to us, a *session*: its
//!   bitfield and haves feed the picker, and a downloader keeps up to
//!   `pipeline` requests outstanding to that peer.
//! - Each request is its own bidirectional stream (`Request` → `Piece` or
//!   `Reject`), so pieces never queue behind each other and cancelling one
//!   (endgame loser, banned peer) is stopping its stream.
//!
//! A malformed frame closes the connection with the decoding error as reason.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::announcers::Outgoing;
use super::picker::PeerId;
use super::relay::{Rejection, SignedBatch};
use super::uploads::{self, Busy, UploadPermit};
use super::{DOWNLOAD_BUFFER_BYTES, Fault, Fill, Shared, buffer_units, close};
use crate::content::{self, PieceHash};
use crate::metrics::Source;
use crate::wire::{self, Message, RejectReason, WireError};

/// Largest control frame (bitfields, hash batches, requests).
const MAX_CONTROL_FRAME: u32 = 1 << 20;

/// Largest request frame (a content id and a piece index).
const MAX_REQUEST_FRAME: u32 = 1024;

/// How long an announcement for a content not (yet) configured here is kept
/// open: peers may learn of a content before we finish preparing it.
const CONTENT_WAIT: Duration = Duration::from_secs(120);

/// Signer certificates one announce stream may hold (a content has a few
/// authorities; more is a peer wasting our memory).
const MAX_STREAM_CERTS: usize = 64;

fn protocol_error(conn: &quinn::Connection, node: &str, what: &str, err: &dyn std::fmt::Display) {
    warn!(peer = node, error = %err, "closing connection: {what}");
    let reason = format!("{what}: {err}");
    conn.close(close::PROTOCOL, &reason.as_bytes()[..reason.len().min(200)]);
}

/// Most bytes of queued announcements written at once.
const MAX_ANNOUNCE_WRITE: usize = 64 << 10;

/// Sends our announcements for `fill` to `node` until either side goes away.
///
/// Everything queued when the task wakes goes out in one write (a `Have`
/// and the batch riding with it, a burst of `Have`s): one wake-up and as
/// few packets as the bytes need, instead of one write per message.
pub(crate) async fn announce(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    node: String,
    fill: Arc<Fill>,
) {
    let mut send = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            debug!(peer = %node, error = %e, "cannot open announce stream");
            return;
        }
    };
    fill.resign_if_renewed();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = fill.register_announcer(tx, &node);
    let mut enc = AnnounceEncoder {
        tamper: shared.opts.fault == Some(Fault::TamperHashes),
        peer: node.clone(),
        certs_sent: Default::default(),
    };
    loop {
        let out = tokio::select! {
            m = rx.recv() => m,
            _ = conn.closed() => None,
        };
        let Some(out) = out else { break };
        let mut buf = BytesMut::new();
        enc.encode(out, &mut buf);
        while buf.len() < MAX_ANNOUNCE_WRITE
            && let Ok(out) = rx.try_recv()
        {
            enc.encode(out, &mut buf);
        }
        if let Err(e) = send.write_chunk(buf.freeze()).await {
            debug!(peer = %node, error = %e, "announce stream closed");
            break;
        }
    }
    fill.unregister_announcer(id);
}

/// Turns what one announce stream carries into frames.
struct AnnounceEncoder {
    /// Fault injection: alter relayed hashes (never to their signer).
    tamper: bool,
    peer: String,
    /// Signer -> fingerprint of the certificate sent on this stream.
    certs_sent: std::collections::HashMap<String, String>,
}

impl AnnounceEncoder {
    fn encode(&mut self, out: Outgoing, buf: &mut BytesMut) {
        match out {
            Outgoing::Msg(Message::Hashes { mut entries }) if self.tamper => {
                if let Some((_, h)) = entries.first_mut() {
                    h[0] ^= 0xff;
                }
                Message::Hashes { entries }.encode_into(buf);
            }
            Outgoing::Msg(m) => m.encode_into(buf),
            Outgoing::Batch(b) => self.batch(&b, buf),
            Outgoing::Have { piece, batch } => {
                if let Some(b) = batch {
                    self.batch(&b, buf);
                }
                Message::Have { piece }.encode_into(buf);
            }
        }
    }

    /// The batch, after its signer's certificate if not sent yet.
    fn batch(&mut self, b: &SignedBatch, buf: &mut BytesMut) {
        if self.certs_sent.get(&b.signer) != Some(&b.fingerprint) {
            self.certs_sent
                .insert(b.signer.clone(), b.fingerprint.clone());
            Message::AuthorityCert {
                node: b.signer.clone(),
                cert: b.cert.clone(),
            }
            .encode_into(buf);
        }
        let mut m = b.message();
        // A careful liar never lies to the signer itself.
        if self.tamper
            && b.signer != self.peer
            && let Message::SignedHashes { hashes, .. } = &mut m
        {
            hashes[0][0] ^= 0xff;
        }
        m.encode_into(buf);
    }
}

/// Accepts the streams the peer opens until the connection closes.
pub(crate) async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection, node: String) {
    let uni = {
        let (shared, conn, node) = (shared.clone(), conn.clone(), node.clone());
        async move {
            while let Ok(recv) = conn.accept_uni().await {
                tokio::spawn(inbound_announce(
                    shared.clone(),
                    conn.clone(),
                    node.clone(),
                    recv,
                ));
            }
        }
    };
    let bi = async move {
        while let Ok((send, recv)) = conn.accept_bi().await {
            tokio::spawn(serve_request(
                shared.clone(),
                conn.clone(),
                node.clone(),
                send,
                recv,
            ));
        }
    };
    tokio::join!(uni, bi);
}

/// Reads a peer's announcements for one content and downloads from it.
///
/// What the peer said on this stream (its pieces, the hash batches we
/// accepted from it, its complete hash list) is kept, so that when our run
/// of the content is replaced while the stream lives (a restart, a retry
/// after a local fault) the session re-attaches to the new run with that
/// state instead of staying attached to a dead one: the peer never has to
/// repeat itself.
async fn inbound_announce(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    node: String,
    mut recv: quinn::RecvStream,
) {
    let (content_id, size, piece_size) = match wire::read_frame(&mut recv, MAX_CONTROL_FRAME).await
    {
        Ok(Some(Message::Hello {
            content,
            size,
            piece_size,
        })) => (content, size, piece_size),
        Ok(Some(Message::Resync { content })) => {
            // The peer asks us to announce this content again.
            if let Some(fill) = shared.content(&content).filter(|f| !f.is_closed())
                && fill.allows(&node)
            {
                debug!(peer = %node, content = %content, "peer asked for a fresh announcement");
                tokio::spawn(announce(shared.clone(), conn, node, fill));
            }
            return;
        }
        Ok(None) => return,
        Ok(Some(other)) => {
            protocol_error(
                &conn,
                &node,
                "announce stream must start with Hello",
                &format!("{other:?}").chars().take(60).collect::<String>(),
            );
            return;
        }
        Err(e) => {
            protocol_error(&conn, &node, "malformed frame", &e);
            return;
        }
    };
    // The peer's state as announced on this stream (replayed on re-attach).
    let pieces = usize::try_from(size.div_ceil(u64::from(piece_size.max(1)))).unwrap_or(0);
    let mut peer_bits = vec![0u8; pieces.div_ceil(8)];
    // Bounded by the piece count, however often the peer repeats itself.
    let mut peer_hashes: std::collections::BTreeMap<u32, PieceHash> =
        std::collections::BTreeMap::new();
    // Signer certificates sent on this stream (at most MAX_STREAM_CERTS),
    // and the batches the fill accepted (bounded by what it keeps).
    let mut certs: std::collections::HashMap<String, Bytes> = Default::default();
    let mut accepted: Vec<Arc<SignedBatch>> = Vec::new();
    let mut attached_before = false;
    loop {
        let Some(fill) = shared.wait_content(&content_id, CONTENT_WAIT).await else {
            debug!(peer = %node, content = %content_id, "announce for a content we do not hold");
            let _ = recv.stop(0u32.into());
            return;
        };
        let layout = fill.layout();
        if layout.size != size || layout.piece_size != piece_size {
            warn!(peer = %node, content = %content_id, size, piece_size, "peer announces another layout; ignored");
            let _ = recv.stop(0u32.into());
            return;
        }
        let sid: PeerId = shared.next_session();
        let (cancel, wake) = fill.add_session(sid, &node);
        if attached_before {
            debug!(peer = %node, content = %content_id, "announce session re-attached to the new run");
            fill.session_bitfield(sid, &peer_bits);
            for b in &accepted {
                let _ = fill.offer_batch(&shared.batch_verifier, &node, b.clone());
            }
            if peer_hashes.len() == pieces {
                let _ = fill.offer_unsigned(&node, peer_hashes.values().copied().collect());
            }
        }
        attached_before = true;
        let downloader = tokio::spawn(download(
            shared.clone(),
            conn.clone(),
            node.clone(),
            fill.clone(),
            sid,
            cancel.clone(),
            wake,
        ));
        let mut stream_over = false;
        loop {
            let frame = tokio::select! {
                f = wire::read_frame(&mut recv, MAX_CONTROL_FRAME) => f,
                _ = cancel.cancelled() => break,
            };
            match frame {
                Ok(Some(Message::Bitfield { bits })) => {
                    for (dst, src) in peer_bits.iter_mut().zip(bits.iter()) {
                        *dst = *src;
                    }
                    fill.session_bitfield(sid, &bits);
                }
                Ok(Some(Message::Have { piece })) => {
                    if let Some(b) = peer_bits.get_mut(piece as usize / 8) {
                        *b |= 0x80 >> (piece % 8);
                    }
                    fill.session_have(sid, piece);
                }
                Ok(Some(Message::Hashes { entries })) => {
                    // Used only once complete, against the pinned root.
                    let before = peer_hashes.len();
                    peer_hashes.extend(entries.into_iter().filter(|(p, _)| (*p as usize) < pieces));
                    if peer_hashes.len() == pieces && before < pieces {
                        let list = peer_hashes.values().copied().collect();
                        if let Err(r) = fill.offer_unsigned(&node, list) {
                            refuse(&shared, &fill, &node, &r);
                        }
                    }
                }
                Ok(Some(Message::AuthorityCert { node: signer, cert })) => {
                    if certs.len() < MAX_STREAM_CERTS || certs.contains_key(&signer) {
                        certs.insert(signer, cert);
                    }
                }
                Ok(Some(Message::SignedHashes {
                    signer,
                    first,
                    hashes,
                    scheme,
                    signature,
                })) => {
                    let Some(cert) = certs.get(&signer).cloned() else {
                        refuse(&shared, &fill, &node, &Rejection::NoCertificate(signer));
                        continue;
                    };
                    let batch = Arc::new(SignedBatch::received(
                        signer, first, hashes, scheme, signature, cert,
                    ));
                    match fill.offer_batch(&shared.batch_verifier, &node, batch.clone()) {
                        Ok(n) if n > 0 => accepted.push(batch),
                        Ok(_) => {}
                        Err(r) => refuse(&shared, &fill, &node, &r),
                    }
                }
                Ok(Some(other)) => {
                    let what = format!("{other:?}").chars().take(60).collect::<String>();
                    protocol_error(&conn, &node, "unexpected message on announce stream", &what);
                    stream_over = true;
                    break;
                }
                Ok(None) => {
                    stream_over = true;
                    break;
                }
                Err(WireError::Io(e)) => {
                    debug!(peer = %node, error = %e, "announce stream ended");
                    stream_over = true;
                    break;
                }
                Err(e) => {
                    protocol_error(&conn, &node, "malformed frame", &e);
                    stream_over = true;
                    break;
                }
            }
        }
        fill.remove_session(sid);
        downloader.abort();
        // Our run was replaced under a live stream: attach to the next one.
        // Any other end (peer done, dropped, banned) ends the stream.
        if stream_over || !fill.is_closed() || conn.close_reason().is_some() {
            return;
        }
    }
}

/// A hash batch or list from `node` was refused: counted, and a strike
/// when only a liar can have sent it (see `relay`).
fn refuse(shared: &Shared, fill: &Fill, node: &str, why: &Rejection) {
    shared.metrics.piece_rejected(why.reason());
    if why.is_lie() {
        warn!(peer = node, content = %fill.spec.id, error = %why, "refused hashes from a lying peer");
        fill.hashes_refused(node);
        shared.strike(node, "hashes");
    } else {
        debug!(peer = node, content = %fill.spec.id, error = %why, "hash batch not usable here");
    }
}

/// Asks `node` to announce `content` to us again (see [`Message::Resync`]).
pub(crate) async fn request_resync(conn: quinn::Connection, node: String, content: String) {
    let mut send = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            debug!(peer = %node, error = %e, "cannot open a resync stream");
            return;
        }
    };
    if let Err(e) = send.write_all(&Message::Resync { content }.encode()).await {
        debug!(peer = %node, error = %e, "cannot send a resync");
        return;
    }
    let _ = send.finish();
}

/// Content id of liveness probes: ids never start with a dot, so the peer
/// answers `Reject` at once.
const PROBE_CONTENT: &str = ".probe";

/// Whether `conn` still answers a request within `wait` (a dead connection
/// to a restarted peer does not).
pub(crate) async fn probe(conn: &quinn::Connection, wait: Duration) -> bool {
    let attempt = async {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        let req = Message::Request {
            content: PROBE_CONTENT.to_string(),
            piece: 0,
        };
        send.write_all(&req.encode()).await.ok()?;
        let _ = send.finish();
        wire::read_frame(&mut recv, MAX_REQUEST_FRAME).await.ok()?
    };
    matches!(tokio::time::timeout(wait, attempt).await, Ok(Some(_)))
}

/// How often a session whose peer holds pieces we want, none of which we may
/// ask for right now (refused for now, or in flight elsewhere), looks again.
const REFUSAL_RECHECK: Duration = Duration::from_millis(50);

/// Requests one session keeps outstanding: the node's `max_inflight`
/// spread over the content's `sessions`, at least one and at most `cap`.
///
/// Why spread: a request waits at its holder while that holder's slots are
/// busy, and the holders of the freshest pieces are the busiest. Several
/// requests to one peer stack up behind its uplink while other peers' sit
/// idle; one each (when there are at least `max_inflight` peers) puts every
/// permit on a different uplink. Measured in the simulator (20 Mbit/s, 8 in
/// flight, the upload rule of `uploads`, 4-6 seeds): 2 per peer against 1
/// per peer, N = 16 x 64 MiB 1.14 and 1.13 T*, N = 32 x 32 MiB 1.49 and
/// 1.36 T*, N = 64 x 32 MiB 1.78 and 1.55 T*. `cap` keeps a node with one
/// or two peers (a single seeder) pipelined.
pub fn pipeline_for(max_inflight: usize, sessions: usize, cap: usize) -> usize {
    max_inflight.div_ceil(sessions.max(1)).clamp(1, cap.max(1))
}

/// The two download permits a request holds until its piece is written:
/// one of `max_inflight` and its piece's share of the byte budget.
type DownloadPermit = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// Takes both permits now, or `None` if either budget is used up or a
/// content of higher priority than `priority` waits for one.
fn try_permit(shared: &Shared, units: u32, priority: i32) -> Option<DownloadPermit> {
    if shared.limits.outranked(priority) {
        return None;
    }
    let count = shared.inflight.clone().try_acquire_owned().ok()?;
    let bytes = shared
        .inflight_bytes
        .clone()
        .try_acquire_many_owned(units)
        .ok()?;
    Some((count, bytes))
}

/// Waits in line for both permits (always in the same order, so sessions
/// cannot hold one each and wait for the other forever), behind every
/// content of higher priority (see `limits`).
async fn queue_for_permit(
    shared: Arc<Shared>,
    units: u32,
    priority: i32,
) -> Option<DownloadPermit> {
    let _turn = shared.limits.permit_turn(priority).await;
    let count = shared.inflight.clone().acquire_owned().await.ok()?;
    let bytes = shared
        .inflight_bytes
        .clone()
        .acquire_many_owned(units)
        .await
        .ok()?;
    Some((count, bytes))
}

/// Keeps up to [`pipeline_for`] requests outstanding to one peer for one
/// content.
///
/// The download budgets are shared by every session, so most sessions wait
/// for a permit most of the time. A session that has something to ask for
/// waits in the semaphores' queue (first come, first served): a permit
/// another session frees is handed on at once rather than found by a poll,
/// and a session whose peer has nothing we need never takes one.
///
/// It wakes for its own peer's news (`wake`), for news concerning every
/// session (`fill.changed`), when a request ends or a permit comes, and,
/// only while a piece it could ask for was refused for now, every
/// [`REFUSAL_RECHECK`]; never on a timer while its pipeline is full.
async fn download(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    node: String,
    fill: Arc<Fill>,
    sid: PeerId,
    cancel: CancellationToken,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut outstanding = JoinSet::new();
    // Our place in the permit queue, kept across wake-ups for other reasons.
    let mut queued: Option<Pin<Box<dyn Future<Output = Option<DownloadPermit>> + Send>>> = None;
    let mut granted: Option<DownloadPermit> = None;
    // Every piece of a content but the last has the full piece size.
    let units = buffer_units(u64::from(fill.layout().piece_size), DOWNLOAD_BUFFER_BYTES);
    loop {
        // Register for wake-ups before looking at the state.
        let changed = fill.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let mut starved = false;
        let mut unpicked = false;
        // Read each round: a Distribution's priority may change.
        let priority = shared.limits.priority(&fill.spec.id);
        let pipeline = pipeline_for(
            shared.opts.max_inflight,
            fill.session_count(),
            shared.opts.pipeline,
        );
        while outstanding.len() < pipeline && !fill.is_complete() {
            let Some(permit) = granted
                .take()
                .or_else(|| try_permit(&shared, units, priority))
            else {
                starved = true;
                break;
            };
            // Nothing to ask for: the permit goes back to whoever waits.
            let Some((piece, hash, token)) = fill.pick(sid) else {
                unpicked = true;
                break;
            };
            outstanding.spawn(fetch(
                shared.clone(),
                conn.clone(),
                node.clone(),
                fill.clone(),
                sid,
                piece,
                hash,
                token,
                permit,
            ));
        }
        // Only sessions with something to ask for stand in line.
        let interesting = fill.interesting(sid);
        let wants = starved && interesting;
        if !wants {
            queued = None;
        } else if queued.is_none() {
            queued = Some(Box::pin(queue_for_permit(shared.clone(), units, priority)));
        }
        tokio::select! {
            Some(_) = outstanding.join_next(), if !outstanding.is_empty() => {}
            permit = async {
                match queued.as_mut() {
                    Some(q) => q.await,
                    None => std::future::pending().await,
                }
            }, if queued.is_some() => {
                queued = None;
                granted = permit;
            }
            _ = &mut changed => {}
            _ = wake.notified() => {}
            // A piece refused for now becomes askable again after a while.
            _ = tokio::time::sleep(REFUSAL_RECHECK), if unpicked && interesting => {}
            _ = cancel.cancelled() => break,
        }
    }
    outstanding.abort_all();
}

enum FetchError {
    Rejected(RejectReason),
    Transport(String),
    Protocol(String),
    Timeout,
}

#[allow(clippy::too_many_arguments)]
async fn fetch(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    node: String,
    fill: Arc<Fill>,
    sid: PeerId,
    piece: u32,
    hash: PieceHash,
    token: CancellationToken,
    permit: DownloadPermit,
) {
    let layout = fill.layout();
    let len = layout.piece_len(piece);
    let result = tokio::select! {
        r = tokio::time::timeout(shared.opts.request_timeout, request_piece(&shared, &conn, &fill.spec.id, piece, len)) => {
            r.unwrap_or(Err(FetchError::Timeout))
        }
        _ = token.cancelled() => {
            // Endgame loser or ended session: dropping the streams stops them.
            fill.release(sid, piece);
            return;
        }
    };
    let data = match result {
        Ok(d) => d,
        Err(e) => {
            match e {
                FetchError::Rejected(RejectReason::Unavailable) => {
                    // Busy with pieces it sent fewer times: ask other holders.
                    debug!(peer = %node, piece, "request refused for now");
                    fill.refused(sid, piece);
                    return;
                }
                FetchError::Rejected(r) => {
                    debug!(peer = %node, piece, reason = ?r, "request rejected")
                }
                FetchError::Transport(e) => {
                    debug!(peer = %node, piece, error = %e, "request failed")
                }
                FetchError::Timeout => warn!(peer = %node, piece, "request timed out"),
                FetchError::Protocol(e) => protocol_error(&conn, &node, "bad piece response", &e),
            }
            fill.release(sid, piece);
            return;
        }
    };
    let check = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || content::verify_piece(&layout, piece, &data, &hash))
            .await
    };
    match check {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(peer = %node, piece, error = %e, "piece failed verification");
            shared.metrics.piece_rejected("hash_mismatch");
            fill.rejected(sid, &node, piece, u64::from(len));
            shared.strike(&node, "a piece");
            return;
        }
        Err(e) => {
            warn!(error = %e, "verification task failed");
            fill.release(sid, piece);
            return;
        }
    }
    shared.metrics.piece_verified();
    // The request is done: returning frees this peer's pipeline slot so the
    // link stays busy while the piece is written. The write runs detached
    // (cancelling the request cannot interrupt it half-way) and keeps the
    // global in-flight permit, which bounds the piece buffers held.
    tokio::spawn(async move {
        let stored = fill
            .store_verified(Some(sid), &shared.opts.node, piece, data, None)
            .await;
        drop(permit);
        match stored {
            Ok(true) => {
                shared.metrics.received(Source::Peer, u64::from(len));
                fill.stats
                    .bytes_from_peers
                    .fetch_add(u64::from(len), Ordering::Relaxed);
            }
            Ok(false) => {
                fill.stats
                    .bytes_wasted
                    .fetch_add(u64::from(len), Ordering::Relaxed);
            }
            Err(e) => warn!(content = %fill.spec.id, piece, error = %e, "cannot store piece"),
        }
    });
}

async fn request_piece(
    shared: &Shared,
    conn: &quinn::Connection,
    content: &str,
    piece: u32,
    len: u32,
) -> Result<Bytes, FetchError> {
    shared.limits.download(content, u64::from(len)).await;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| FetchError::Transport(e.to_string()))?;
    let req = Message::Request {
        content: content.to_string(),
        piece,
    };
    send.write_all(&req.encode())
        .await
        .map_err(|e| FetchError::Transport(e.to_string()))?;
    let _ = send.finish();
    match wire::read_frame(&mut recv, len.saturating_add(64)).await {
        Ok(Some(Message::Piece { piece: p, data })) if p == piece => {
            if data.len() != len as usize {
                return Err(FetchError::Protocol(format!(
                    "piece {piece} has {} bytes, expected {len}",
                    data.len()
                )));
            }
            Ok(data)
        }
        Ok(Some(Message::Reject { reason, .. })) => Err(FetchError::Rejected(reason)),
        Ok(Some(other)) => Err(FetchError::Protocol(
            format!("unexpected response {other:?}")
                .chars()
                .take(80)
                .collect(),
        )),
        Ok(None) => Err(FetchError::Transport(
            "stream ended without a response".into(),
        )),
        Err(WireError::Io(e)) => Err(FetchError::Transport(e.to_string())),
        Err(WireError::UnexpectedEof) => Err(FetchError::Transport("stream ended early".into())),
        Err(e) => Err(FetchError::Protocol(e.to_string())),
    }
}

/// Waits until the peer acknowledged the whole piece (true) or the stream
/// failed (false). Meanwhile it frees the upload slot as soon as the
/// connection has sent as many bytes as the piece since `started` (then
/// every byte of it went out once, or the connection's other traffic made up
/// the difference: the next upload starts a little early, and its bytes
/// still count against the budget); see [`uploads`]. The caller bounds the
/// wait: a peer that stops reading must not hold a slot forever.
async fn await_delivery(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    permit: &mut UploadPermit,
    len: u64,
    sent_before: u64,
    started: tokio::time::Instant,
) -> bool {
    let stopped = send.stopped();
    tokio::pin!(stopped);
    let mut check = Some(Duration::ZERO);
    while let Some(wait) = check {
        tokio::select! {
            r = &mut stopped => return matches!(r, Ok(None)),
            _ = tokio::time::sleep(wait) => {
                let sent = conn.stats().udp_tx.bytes.saturating_sub(sent_before);
                check = uploads::next_send_check(sent, len, started.elapsed());
            }
        }
    }
    permit.all_sent();
    matches!(stopped.await, Ok(None))
}

/// Answers one request stream.
async fn serve_request(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    node: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (content_id, piece) = match wire::read_frame(&mut recv, MAX_REQUEST_FRAME).await {
        Ok(Some(Message::Request { content, piece })) => (content, piece),
        Ok(None) | Err(WireError::Io(_)) => return,
        Ok(Some(other)) => {
            let what = format!("{other:?}").chars().take(60).collect::<String>();
            protocol_error(&conn, &node, "unexpected message on request stream", &what);
            return;
        }
        Err(e) => {
            protocol_error(&conn, &node, "malformed frame", &e);
            return;
        }
    };
    let reject = |reason: RejectReason| Message::Reject { piece, reason }.encode();
    let Some(fill) = shared.content(&content_id) else {
        let _ = send.write_all(&reject(RejectReason::UnknownContent)).await;
        let _ = send.finish();
        return;
    };
    if !fill.allows(&node) {
        warn!(peer = %node, content = %content_id, "refused a request from a peer not allowed this content");
        let _ = send.write_all(&reject(RejectReason::NotAllowed)).await;
        let _ = send.finish();
        return;
    }
    let layout = fill.layout();
    if piece >= layout.piece_count() || (!fill.liar && !fill.store.has(piece)) {
        let _ = send.write_all(&reject(RejectReason::NotHeld)).await;
        let _ = send.finish();
        return;
    }
    // Bounded upload slots, least-sent piece first; a piece we already sent
    // may be refused for now (see `uploads`), unless the requester gives up.
    let mut permit = tokio::select! {
        p = shared.uploads.admit(&fill, piece, u64::from(layout.piece_len(piece))) => match p {
            Ok(p) => p,
            Err(Busy) => {
                if let Some(c) = &shared.uploads_refused {
                    c.inc();
                }
                let _ = send.write_all(&reject(RejectReason::Unavailable)).await;
                let _ = send.finish();
                return;
            }
        },
        _ = send.stopped() => return,
    };
    let len = layout.piece_len(piece);
    let data = if fill.liar {
        Bytes::from(vec![0xA5u8; len as usize])
    } else {
        match fill.store.read_piece(piece).await {
            Ok(d) => d,
            Err(e) => {
                warn!(content = %content_id, piece, error = %e, "cannot read piece to serve it");
                let _ = send.write_all(&reject(RejectReason::Unavailable)).await;
                let _ = send.finish();
                return;
            }
        }
    };
    shared.limits.upload(&content_id, u64::from(len)).await;
    let sent_before = conn.stats().udp_tx.bytes;
    let started = tokio::time::Instant::now();
    let header = wire::piece_header(piece, data.len());
    if send.write_all(&header).await.is_err() || send.write_chunk(data).await.is_err() {
        return;
    }
    let _ = send.finish();
    let delivered = tokio::time::timeout(
        shared.opts.request_timeout,
        await_delivery(
            &conn,
            &mut send,
            &mut permit,
            u64::from(len),
            sent_before,
            started,
        ),
    )
    .await
    .unwrap_or(false);
    drop(permit);
    if delivered {
        shared.metrics.sent(u64::from(len));
        fill.stats
            .bytes_sent
            .fetch_add(u64::from(len), Ordering::Relaxed);
    }
}
