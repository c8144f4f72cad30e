//! Sign / verify / reject of hash batches, the batch store, and a fill
//! learning and relaying hashes through them.

use super::*;
use crate::content::{self, PieceHash, piece_hash};
use crate::store::PieceStore;
use crate::swarm::announcers::Outgoing;
use crate::swarm::fill::{Fill, FillSpec};
use crate::tls::{ClusterCa, NodeIdentity};

const PIECE: u32 = 16 << 10;
const CONTENT: &str = "c";

fn identity(ca: &ClusterCa, node: &str) -> NodeIdentity {
    let id = ca.issue(node).expect("issue");
    id.live.set(&id).expect("live");
    id
}

fn layout() -> Layout {
    Layout::new(4 * u64::from(PIECE), PIECE).expect("layout")
}

fn readers() -> Authority {
    Authority::Readers(vec![("r0".into(), 0..2), ("r1".into(), 2..4)])
}

fn data() -> Vec<u8> {
    (0..4 * PIECE as usize)
        .map(|i| (i * 31 % 251) as u8)
        .collect()
}

fn hashes(bytes: &[u8]) -> Vec<PieceHash> {
    let l = layout();
    (0..l.piece_count())
        .map(|i| {
            let r = l.piece_range(i);
            piece_hash(&l, i, &bytes[r.start as usize..r.end as usize])
        })
        .collect()
}

struct Cluster {
    ca: ClusterCa,
    r0: NodeIdentity,
    r1: NodeIdentity,
    /// The receiver's verifier.
    verifier: BatchVerifier,
    receiver: NodeIdentity,
}

fn cluster() -> Cluster {
    let ca = ClusterCa::generate("test-ca").expect("ca");
    let receiver = identity(&ca, "a");
    Cluster {
        r0: identity(&ca, "r0"),
        r1: identity(&ca, "r1"),
        verifier: BatchVerifier::new(NodeSignatureVerifier::new(&receiver).expect("verifier")),
        receiver,
        ca,
    }
}

fn sign(id: &NodeIdentity, signer: &str, first: u32, hashes: &[PieceHash]) -> SignedBatch {
    sign_batch(&id.live, signer, CONTENT, &layout(), first, hashes.to_vec()).expect("sign")
}

fn check(c: &Cluster, b: &SignedBatch) -> Result<(), Rejection> {
    c.verifier.check(CONTENT, &layout(), &readers(), b)
}

#[test]
fn a_batch_signed_by_its_authority_verifies() {
    let c = cluster();
    let h = hashes(&data());
    check(&c, &sign(&c.r0, "r0", 0, &h[..2])).expect("r0's range");
    check(&c, &sign(&c.r1, "r1", 3, &h[3..])).expect("part of r1's range");
}

#[test]
fn a_wrong_signer_is_refused() {
    let c = cluster();
    let h = hashes(&data());
    // r1 vouching for r0's pieces under its own name: not their authority.
    let err = check(&c, &sign(&c.r1, "r1", 0, &h[..2])).expect_err("not the authority");
    assert!(matches!(err, Rejection::NotAuthority { .. }), "{err}");
    assert!(!err.is_lie());
    // r1 signing in r0's name: r1's certificate does not name r0.
    let mut forged = sign(&c.r1, "r0", 0, &h[..2]);
    let err = check(&c, &forged).expect_err("certificate of another node");
    assert!(matches!(err, Rejection::Certificate(_)), "{err}");
    assert!(err.is_lie());
    // r0's certificate on r1's signature: the signature does not verify.
    forged.cert = sign(&c.r0, "r0", 0, &h[..2]).cert;
    forged.fingerprint = tls::cert_fingerprint(&forged.cert);
    let err = check(&c, &forged).expect_err("signature of another key");
    assert!(matches!(err, Rejection::Signature(_)), "{err}");
    assert!(err.is_lie());
    // A node of another CA named r0.
    let rogue_ca = ClusterCa::generate("rogue").expect("ca");
    let rogue = identity(&rogue_ca, "r0");
    let err = check(&c, &sign(&rogue, "r0", 0, &h[..2])).expect_err("another CA");
    assert!(matches!(err, Rejection::Certificate(_)), "{err}");
    assert!(err.is_lie());
}

#[test]
fn a_wrong_range_is_refused() {
    let c = cluster();
    let h = hashes(&data());
    // Straddles r0's and r1's ranges.
    let err = check(&c, &sign(&c.r0, "r0", 1, &h[1..3])).expect_err("straddles");
    assert!(matches!(err, Rejection::NotAuthority { .. }), "{err}");
    // Beyond the last piece.
    let err = check(&c, &sign(&c.r1, "r1", 3, &h[..2])).expect_err("past the end");
    assert!(matches!(err, Rejection::OutOfRange { .. }), "{err}");
    assert!(err.is_lie());
    // Signed for another content or layout: the signature binds both.
    let other = sign_batch(&c.r0.live, "r0", "other", &layout(), 0, h[..2].to_vec()).expect("sign");
    let err = check(&c, &other).expect_err("another content");
    assert!(matches!(err, Rejection::Signature(_)), "{err}");
}

#[test]
fn a_tampered_hash_is_refused() {
    let c = cluster();
    let h = hashes(&data());
    let mut b = sign(&c.r0, "r0", 0, &h[..2]);
    b.hashes[1][7] ^= 1;
    let err = check(&c, &b).expect_err("tampered");
    assert!(matches!(err, Rejection::Signature(_)), "{err}");
    assert!(err.is_lie());
    let mut b = sign(&c.r0, "r0", 0, &h[..2]);
    b.first = 1;
    b.hashes.truncate(1);
    assert!(check(&c, &b).is_err(), "moved to another piece");
}

#[test]
fn a_certificate_not_matching_the_published_fingerprint_is_refused() {
    let c = cluster();
    let h = hashes(&data());
    let b = sign(&c.r0, "r0", 0, &h[..2]);
    check(&c, &b).expect("no pin published yet: the chain and name suffice");
    // The operator published another certificate for r0 (e.g. renewed).
    let renewed = identity(&c.ca, "r0");
    c.receiver
        .pins
        .set([("r0", renewed.fingerprint().expect("fp"))]);
    let err = check(&c, &b).expect_err("not the published certificate");
    assert!(matches!(err, Rejection::Certificate(_)), "{err}");
    assert!(!err.is_lie(), "a renewal is not a lie of the relay");
    check(&c, &sign(&renewed, "r0", 0, &h[..2])).expect("the published one");
    c.receiver.pins.set([("r0", b.fingerprint.clone())]);
    check(&c, &b).expect("pinned again");
}

#[test]
fn runs_split_at_gaps_and_frame_limits() {
    let e: Vec<(u32, Hash32)> = [5u32, 1, 2, 3, 7, 2]
        .iter()
        .map(|p| (*p, [*p as u8; 32]))
        .collect();
    let r = runs(&e);
    let firsts: Vec<(u32, usize)> = r.iter().map(|(f, h)| (*f, h.len())).collect();
    assert_eq!(firsts, [(1, 3), (5, 1), (7, 1)]);
    let many: Vec<(u32, Hash32)> = (0..5000u32).map(|p| (p, [0; 32])).collect();
    let r = runs(&many);
    assert_eq!(r.len(), 2);
    assert_eq!(r[1].0 as usize, wire::MAX_HASHES_PER_FRAME);
}

#[test]
fn the_store_keeps_the_widest_batches() {
    let c = cluster();
    let h = hashes(&data());
    let mut s = BatchStore::default();
    let p0 = Arc::new(sign(&c.r0, "r0", 0, &h[..1]));
    let p1 = Arc::new(sign(&c.r0, "r0", 1, &h[1..2]));
    let whole = Arc::new(sign(&c.r0, "r0", 0, &h[..2]));
    assert!(s.insert(p0.clone()));
    assert!(s.insert(p1));
    assert_eq!(s.superseded_by(&whole), 2);
    assert!(s.insert(whole.clone()));
    assert_eq!(s.all().count(), 1);
    assert!(!s.insert(p0), "covered by the whole range");
    assert!(s.insert(Arc::new(sign(&c.r1, "r1", 2, &h[2..]))));
    assert_eq!(s.covered(4), 4);
    assert_eq!(s.count_within("r0", 0, 2), 1);
}

fn fill(dir: &std::path::Path, root: Option<blake3::Hash>) -> Arc<Fill> {
    let l = layout();
    let store = PieceStore::open(dir, CONTENT, l).expect("store");
    let spec = FillSpec {
        id: CONTENT.into(),
        layout: l,
        digest: None,
        authority: readers(),
        allowed: ["r0".to_string(), "r1".into(), "a".into(), "b".into()].into(),
        root,
        require_pin: false,
    };
    Fill::new(spec, store, false)
}

/// Stores piece `i` of `data()` in `f`, received from a peer.
async fn store(f: &Fill, i: u32) {
    let l = layout();
    let r = l.piece_range(i);
    let piece = Bytes::copy_from_slice(&data()[r.start as usize..r.end as usize]);
    assert!(
        f.store_verified(None, "a", i, piece, None)
            .await
            .expect("store")
    );
}

/// Stores `pieces` of `data()` in `r0` as their authority, read from the
/// origin: r0 hashes and signs them.
async fn read_from_origin(r0: &Fill, pieces: std::ops::Range<u32>) {
    let (l, bytes) = (layout(), data());
    let h = hashes(&bytes);
    for i in pieces {
        let r = l.piece_range(i);
        let piece = Bytes::copy_from_slice(&bytes[r.start as usize..r.end as usize]);
        r0.store_verified(None, "r0", i, piece, Some(h[i as usize]))
            .await
            .expect("store");
    }
}

/// What an announce stream got since: `(Have, first piece of the batch
/// sent with it or alone)`.
fn sent_on(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Outgoing>,
) -> Vec<(Option<u32>, Option<u32>)> {
    let mut out = Vec::new();
    while let Ok(m) = rx.try_recv() {
        match m {
            Outgoing::Have { piece, batch } => out.push((Some(piece), batch.map(|b| b.first))),
            Outgoing::Batch(b) => out.push((None, Some(b.first))),
            Outgoing::Msg(_) => {}
        }
    }
    out
}

/// Batches queued on an announce stream registered now.
fn announced(
    f: &Fill,
) -> (
    Vec<Arc<SignedBatch>>,
    usize,
    tokio::sync::mpsc::UnboundedReceiver<Outgoing>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    f.register_announcer(tx, "listener");
    let mut batches = Vec::new();
    let mut listed = 0;
    while let Ok(m) = rx.try_recv() {
        match m {
            Outgoing::Batch(b) => batches.push(b),
            Outgoing::Msg(Message::Hashes { entries }) => listed += entries.len(),
            Outgoing::Msg(_) | Outgoing::Have { .. } => {}
        }
    }
    (batches, listed, rx)
}

#[tokio::test]
async fn an_authority_signs_what_it_holds_and_a_relay_passes_it_on() {
    let c = cluster();
    let bytes = data();
    let h = hashes(&bytes);
    // r0 reads its range from the origin: one batch per piece, each sent
    // with the piece's `Have`, then one batch of the whole range replaces
    // them (for streams opened later: this one has every hash).
    let d0 = tempfile::tempdir().expect("tempdir");
    let r0 = fill(d0.path(), None);
    r0.set_signer("r0", c.r0.live.clone());
    let (_, _, mut live_rx) = announced(&r0);
    read_from_origin(&r0, 0..2).await;
    assert_eq!(
        sent_on(&mut live_rx),
        [(Some(0), Some(0)), (Some(1), Some(1))],
        "each piece's batch with its Have"
    );
    let (batches, _, _) = announced(&r0);
    assert_eq!(batches.len(), 1, "a new stream gets the range batch only");
    assert_eq!(batches[0].hashes.len(), 2);
    let range0 = batches[0].clone();

    // Relay `a` (not connected to r0 in a large swarm) verifies it and
    // learns the hashes; it sends the batch on only with the first piece
    // it covers that `a` announces, once per stream.
    let da = tempfile::tempdir().expect("tempdir");
    let a = fill(da.path(), None);
    let (_, _, mut a_rx) = announced(&a);
    let learned = a
        .offer_batch(&c.verifier, "r0", batches[0].clone())
        .expect("valid");
    assert_eq!(learned, 2);
    assert_eq!(a.hash(1), Some(h[1]));
    assert!(sent_on(&mut a_rx).is_empty(), "not broadcast on receipt");
    store(&a, 1).await;
    store(&a, 0).await;
    assert_eq!(
        sent_on(&mut a_rx),
        [(Some(1), Some(0)), (Some(0), None)],
        "the batch rides with the first Have it covers, and only then"
    );
    // The same batch again costs nothing and goes nowhere.
    assert_eq!(
        a.offer_batch(&c.verifier, "b", batches[0].clone())
            .expect("known"),
        0
    );
    assert!(a_rx.try_recv().is_err());

    // A lying relay's tampered copy of r1's batch: refused, nothing learnt.
    let mut bad = sign(&c.r1, "r1", 2, &h[2..]);
    bad.hashes[0][0] ^= 0xff;
    let err = a
        .offer_batch(&c.verifier, "liar", Arc::new(bad))
        .expect_err("tampered");
    assert!(err.is_lie());
    assert_eq!(a.hash(2), None);
    assert_eq!(a.hashes_missing(), 2);
    // ... and the honest copy still gets through.
    let good = Arc::new(sign(&c.r1, "r1", 2, &h[2..]));
    assert_eq!(a.offer_batch(&c.verifier, "b", good).expect("valid"), 2);
    assert_eq!(a.hashes_missing(), 0);
    let (batches, listed, mut new_rx) = announced(&a);
    assert_eq!(
        batches,
        [range0],
        "a new stream gets the batches of the pieces in its bitfield"
    );
    assert_eq!(listed, 0, "no pinned root: no unsigned list");
    store(&a, 3).await;
    assert_eq!(
        sent_on(&mut new_rx),
        [(Some(3), Some(2))],
        "r1's batch comes with its first piece"
    );
}

#[tokio::test]
async fn a_complete_list_is_used_only_against_the_pinned_root() {
    let c = cluster();
    let bytes = data();
    let h = hashes(&bytes);
    let root = content::root_from_pieces(&layout(), &h).expect("root");
    let mut wrong = h.clone();
    wrong[3][0] ^= 1;

    let d = tempfile::tempdir().expect("tempdir");
    let pinned = fill(d.path(), Some(root));
    let err = pinned
        .offer_unsigned("liar", wrong.clone())
        .expect_err("lie");
    assert!(matches!(err, Rejection::RootMismatch { .. }) && err.is_lie());
    assert_eq!(pinned.hashes_missing(), 4);
    assert_eq!(
        pinned
            .offer_unsigned("b", h[..3].to_vec())
            .expect("partial"),
        0
    );
    assert_eq!(pinned.offer_unsigned("b", h.clone()).expect("matches"), 4);
    // Pinned and complete: it passes the list on.
    let (_, listed, _) = announced(&pinned);
    assert_eq!(listed, 4);

    // Before the pin a list waits; the pin decides.
    let d2 = tempfile::tempdir().expect("tempdir");
    let later = fill(d2.path(), None);
    assert_eq!(later.offer_unsigned("liar", wrong).expect("kept"), 0);
    later.pin_root(root);
    assert_eq!(later.hashes_missing(), 4, "the lie did not match the pin");
    let d3 = tempfile::tempdir().expect("tempdir");
    let later = fill(d3.path(), None);
    later.offer_unsigned("b", h.clone()).expect("kept");
    later.pin_root(root);
    assert_eq!(later.hashes_missing(), 0);
    assert_eq!(later.hash(3), Some(h[3]));
    drop(c);
}

#[tokio::test]
async fn after_a_renewal_fresh_batches_replace_the_stale_ones() {
    let c = cluster();
    let h = hashes(&data());
    let d = tempfile::tempdir().expect("tempdir");
    let a = fill(d.path(), None);
    let old = Arc::new(sign(&c.r0, "r0", 0, &h[..2]));
    assert_eq!(
        a.offer_batch(&c.verifier, "b", old.clone()).expect("valid"),
        2
    );
    store(&a, 0).await;
    store(&a, 1).await;
    // r0 renews; the operator publishes the new fingerprint.
    let renewed = identity(&c.ca, "r0");
    c.receiver
        .pins
        .set([("r0", renewed.fingerprint().expect("fp"))]);
    let (_, _, mut rx) = announced(&a);
    let fresh = Arc::new(sign(&renewed, "r0", 0, &h[..2]));
    assert_eq!(
        a.offer_batch(&c.verifier, "b", fresh.clone())
            .expect("valid"),
        0
    );
    assert!(
        matches!(rx.try_recv(), Ok(Outgoing::Batch(b)) if b == fresh),
        "the fresh batch is passed on"
    );
    let (batches, _, _) = announced(&a);
    assert_eq!(
        batches,
        std::slice::from_ref(&fresh),
        "the stale one is gone"
    );
    // The stale one does not come back: it adds nothing (dropped without
    // any cryptography) ...
    assert_eq!(
        a.offer_batch(&c.verifier, "b", old.clone()).expect("known"),
        0
    );
    assert_eq!(announced(&a).0, [fresh]);
    // ... and where its hashes are new it is refused, without blame.
    let d2 = tempfile::tempdir().expect("tempdir");
    let fresh_node = fill(d2.path(), None);
    let err = fresh_node
        .offer_batch(&c.verifier, "b", old)
        .expect_err("no longer published");
    assert!(!err.is_lie());
    assert_eq!(fresh_node.hashes_missing(), 4);
}

/// The store's range lookups (`superseded_by`, `count_within`,
/// `stale_overlaps`, `insert`) against their definitions over every stored
/// batch, on random overlapping batches of two certificates.
#[test]
fn the_store_lookups_match_a_scan_of_every_batch() {
    use rand::{Rng, SeedableRng};
    let fake = |first: u32, len: u32, cert: &'static [u8]| SignedBatch {
        signer: "r0".into(),
        first,
        hashes: vec![[first as u8; 32]; len as usize],
        scheme: 0,
        signature: Bytes::from_static(b"sig"),
        cert: Bytes::from_static(cert),
        fingerprint: crate::tls::cert_fingerprint(cert),
    };
    let pins = crate::tls::PeerPins::new();
    pins.set([("r0", crate::tls::cert_fingerprint(b"new"))]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..200 {
        let mut s = BatchStore::default();
        // An unrelated signer, which no lookup of r0 may see.
        s.insert(Arc::new(SignedBatch {
            signer: "r1".into(),
            ..fake(0, 64, b"old")
        }));
        for _ in 0..rng.random_range(0..20) {
            let cert: &'static [u8] = if rng.random_bool(0.5) { b"old" } else { b"new" };
            let b = fake(rng.random_range(0..60), rng.random_range(1..8), cert);
            let covered_before = s
                .all()
                .any(|x| x.signer == b.signer && x.first <= b.first && b.end() <= x.end());
            assert_eq!(s.insert(Arc::new(b)), !covered_before);
        }
        let stored: Vec<Arc<SignedBatch>> = s.all().cloned().collect();
        let mine = || stored.iter().filter(|x| x.signer == "r0");
        for _ in 0..20 {
            let cert: &'static [u8] = if rng.random_bool(0.5) { b"old" } else { b"new" };
            let q = fake(rng.random_range(0..64), rng.random_range(1..16), cert);
            let superseded = mine()
                .filter(|x| q.first <= x.first && x.end() <= q.end() && x.as_ref() != &q)
                .count();
            assert_eq!(s.superseded_by(&q), superseded);
            let (a, b) = (q.first, q.end() as u32);
            let within = mine()
                .filter(|x| a <= x.first && x.end() <= u64::from(b))
                .count();
            assert_eq!(s.count_within("r0", a, b), within);
            let mut stale: Vec<(String, u32)> = mine()
                .filter(|x| {
                    u64::from(x.first) < q.end()
                        && u64::from(q.first) < x.end()
                        && x.fingerprint != q.fingerprint
                        && pins.check(&x.signer, &x.cert).is_err()
                })
                .map(|x| (x.signer.clone(), x.first))
                .collect();
            let mut got = s.stale_overlaps(&q, &pins);
            stale.sort();
            got.sort();
            assert_eq!(got, stale);
        }
    }
}

#[tokio::test]
async fn a_peer_that_announced_a_piece_is_not_told_we_hold_it() {
    let c = cluster();
    let d0 = tempfile::tempdir().expect("tempdir");
    let r0 = fill(d0.path(), None);
    r0.set_signer("r0", c.r0.live.clone());
    // `b` announced piece 0 on its session; `a` announced nothing.
    let _ = r0.add_session(1, "b");
    r0.session_have(1, 0);
    let (tx_a, mut rx_a) = tokio::sync::mpsc::unbounded_channel();
    r0.register_announcer(tx_a, "a");
    let (tx_b, mut rx_b) = tokio::sync::mpsc::unbounded_channel();
    r0.register_announcer(tx_b, "b");
    sent_on(&mut rx_a);
    sent_on(&mut rx_b);
    read_from_origin(&r0, 0..2).await;
    assert_eq!(sent_on(&mut rx_a), [(Some(0), Some(0)), (Some(1), Some(1))]);
    assert_eq!(
        sent_on(&mut rx_b),
        [(Some(1), Some(1))],
        "b holds piece 0: only piece 1 is announced to it"
    );
}
