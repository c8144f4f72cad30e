//! The announce streams of one content: what each peer is told, and which
//! piece hashes each stream was sent.
//!
//! Every piece we hold is announced to every peer (the `Bitfield` when its
//! stream opens, a `Have` per piece after), except to a peer that already
//! announced that piece to us: it never asks for a piece it holds, so the
//! `Have` would be a packet for nothing. On the 20 Mbit/s netbench those
//! `Have`s were most of the small packets an agent sent besides pieces, and
//! at the swarm's midpoint half the peers hold any piece a node receives.
//! A peer that loses pieces comes back on a new stream, which gets our
//! whole bitfield. A peer told about a piece must
//! be able to learn its hash, so the signed batch carrying it (see `relay`)
//! travels with the announcement: the `Have` of the first piece of a batch
//! a stream is told about carries that batch, in the same write, and each
//! stream remembers per piece whether its hash went out, so no batch is
//! sent to a peer twice. A stream opening gets the batches that cover the
//! pieces in its bitfield.
//!
//! A batch is *not* sent on when we receive it: we rarely hold its pieces
//! yet, and a peer has no use for the hashes of pieces nobody told it
//! about. Broadcasting every relayed batch on receipt, each as its own
//! write on every stream, cost about a quarter of the agent's CPU on the
//! 20 Mbit/s netbench (see `node-agent/PERF.md`).
//!
//! Two rarer cases send a batch on its own: a batch stored after we told a
//! stream about a piece it covers (pieces held before their hashes were,
//! e.g. resumed from disk) goes to the streams that lack its hashes; a
//! batch replacing batches signed with a certificate since renewed goes to
//! every stream, as the stale ones did (see `relay`).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::relay::SignedBatch;
use crate::wire::Message;

/// What an announce stream carries (see `peer::announce`, which writes
/// everything queued at once, each signer's certificate before its first
/// batch on the stream).
#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    Msg(Message),
    /// A signed batch on its own.
    Batch(Arc<SignedBatch>),
    /// We hold `piece`; `batch`, when set, carries its hash and goes first.
    Have {
        piece: u32,
        batch: Option<Arc<SignedBatch>>,
    },
}

/// One bit per piece.
#[derive(Debug, Clone, Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u32) -> Bits {
        Bits(vec![0; (n as usize).div_ceil(64)])
    }

    fn get(&self, i: u32) -> bool {
        self.0
            .get(i as usize / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set_range(&mut self, start: u32, end: u64) {
        let end = end.min(self.0.len() as u64 * 64) as u32;
        for i in start..end {
            self.0[i as usize / 64] |= 1 << (i % 64);
        }
    }
}

struct Stream {
    tx: mpsc::UnboundedSender<Outgoing>,
    /// The node the stream goes to.
    peer: String,
    /// Pieces whose hash this stream was sent (in some batch), or which
    /// its peer holds (and so verified).
    hashes_sent: Bits,
}

impl Stream {
    fn mark(&mut self, b: &SignedBatch) {
        self.hashes_sent.set_range(b.first, b.end());
    }
}

/// The open announce streams of one content, by id.
#[derive(Default)]
pub(crate) struct Announcers {
    streams: HashMap<u64, Stream>,
    next: u64,
}

impl Announcers {
    /// An id for a stream that is not kept (the content is closed).
    pub(crate) fn skip(&mut self) -> u64 {
        self.next += 1;
        self.next - 1
    }

    /// Keeps `tx`, the stream to `peer` (a content of `pieces` pieces),
    /// which was already sent the batches `sent`.
    pub(crate) fn insert(
        &mut self,
        tx: mpsc::UnboundedSender<Outgoing>,
        peer: &str,
        pieces: u32,
        sent: &[Arc<SignedBatch>],
    ) -> u64 {
        let mut s = Stream {
            tx,
            peer: peer.to_string(),
            hashes_sent: Bits::new(pieces),
        };
        for b in sent {
            s.mark(b);
        }
        let id = self.skip();
        self.streams.insert(id, s);
        id
    }

    pub(crate) fn remove(&mut self, id: u64) {
        self.streams.remove(&id);
    }

    /// Drops every stream (they end once their queue is written).
    pub(crate) fn clear(&mut self) {
        self.streams.clear();
    }

    /// Tells every stream we hold `piece`, but those to peers that hold it
    /// too (`holds`); `covering`, the stored batch with its hash, rides
    /// along to the streams not sent that hash yet.
    pub(crate) fn have(
        &mut self,
        piece: u32,
        covering: Option<&Arc<SignedBatch>>,
        holds: impl Fn(&str) -> bool,
    ) {
        self.streams.retain(|_, s| {
            if holds(&s.peer) {
                // It verified the piece: it has the hash too.
                s.hashes_sent.set_range(piece, u64::from(piece) + 1);
                return !s.tx.is_closed();
            }
            let batch = covering.filter(|_| !s.hashes_sent.get(piece)).cloned();
            if let Some(b) = &batch {
                s.mark(b);
            }
            s.tx.send(Outgoing::Have { piece, batch }).is_ok()
        });
    }

    /// A batch was stored: it goes to the streams told about one of its
    /// pieces (`told`) without that piece's hash.
    pub(crate) fn stored(&mut self, b: &Arc<SignedBatch>, told: impl Fn(u32) -> bool) {
        let end = u32::try_from(b.end()).unwrap_or(u32::MAX);
        let told: Vec<u32> = (b.first..end).filter(|p| told(*p)).collect();
        if told.is_empty() {
            return;
        }
        self.streams.retain(|_, s| {
            if told.iter().all(|p| s.hashes_sent.get(*p)) {
                return true;
            }
            s.mark(b);
            s.tx.send(Outgoing::Batch(b.clone())).is_ok()
        });
    }

    /// Sends `b` to every stream (it replaces batches whose certificate
    /// was renewed).
    pub(crate) fn send_to_all(&mut self, b: &Arc<SignedBatch>) {
        self.streams.retain(|_, s| {
            s.mark(b);
            s.tx.send(Outgoing::Batch(b.clone())).is_ok()
        });
    }

    /// Streams kept (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn batch(first: u32, n: usize) -> Arc<SignedBatch> {
        Arc::new(SignedBatch::received(
            "r0".into(),
            first,
            vec![[first as u8; 32]; n],
            0,
            Bytes::from_static(b"sig"),
            Bytes::from_static(b"cert"),
        ))
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Vec<(Option<u32>, Option<u32>)> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(match m {
                Outgoing::Have { piece, batch } => (Some(piece), batch.map(|b| b.first)),
                Outgoing::Batch(b) => (None, Some(b.first)),
                Outgoing::Msg(_) => (None, None),
            });
        }
        out
    }

    #[test]
    fn a_batch_rides_with_the_first_have_it_covers_and_is_not_resent() {
        let mut a = Announcers::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        a.insert(tx, "n1", 8, &[]);
        let range = batch(0, 4);
        a.have(1, Some(&range), |_| false);
        a.have(2, Some(&range), |_| false);
        a.have(5, None, |_| false);
        assert_eq!(
            drain(&mut rx),
            [(Some(1), Some(0)), (Some(2), None), (Some(5), None)]
        );
        // A stream opened with the batch already sent never gets it again.
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        a.insert(tx2, "n2", 8, std::slice::from_ref(&range));
        a.have(3, Some(&range), |_| false);
        assert_eq!(drain(&mut rx2), [(Some(3), None)]);
        assert_eq!(drain(&mut rx), [(Some(3), None)]);
    }

    #[test]
    fn a_batch_stored_late_goes_only_where_its_pieces_were_told_without_it() {
        let mut a = Announcers::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        a.insert(tx, "n1", 8, &[]);
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        a.insert(tx2, "n2", 8, &[batch(4, 2)]);
        // Nothing of it was told: nobody needs it yet.
        a.stored(&batch(4, 2), |_| false);
        assert!(drain(&mut rx).is_empty());
        // Piece 5 was told: the stream without its hash gets the batch.
        a.stored(&batch(4, 2), |p| p == 5);
        assert_eq!(drain(&mut rx), [(None, Some(4))]);
        assert!(drain(&mut rx2).is_empty());
        // ... once.
        a.stored(&batch(4, 2), |p| p == 5);
        assert!(drain(&mut rx).is_empty());
        // A renewal's batch goes everywhere.
        a.send_to_all(&batch(4, 2));
        assert_eq!(drain(&mut rx), [(None, Some(4))]);
        assert_eq!(drain(&mut rx2), [(None, Some(4))]);
    }

    #[test]
    fn a_peer_that_announced_a_piece_is_not_told_we_hold_it() {
        let mut a = Announcers::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        a.insert(tx, "n1", 8, &[]);
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        a.insert(tx2, "n2", 8, &[]);
        let range = batch(0, 4);
        a.have(1, Some(&range), |peer| peer == "n2");
        assert_eq!(drain(&mut rx), [(Some(1), Some(0))]);
        assert!(drain(&mut rx2).is_empty());
        // Its stream stays, and is told (with the batch) of what it lacks.
        a.have(2, Some(&range), |peer| peer == "n1");
        assert!(drain(&mut rx).is_empty());
        assert_eq!(drain(&mut rx2), [(Some(2), Some(0))]);
        assert_eq!(a.len(), 2);
        // A batch stored later is not sent for a piece the peer holds.
        a.have(6, None, |peer| peer == "n2");
        a.stored(&batch(6, 1), |p| p == 6);
        assert_eq!(drain(&mut rx), [(Some(6), None), (None, Some(6))]);
        assert!(drain(&mut rx2).is_empty());
    }

    #[test]
    fn a_closed_stream_is_forgotten() {
        let mut a = Announcers::default();
        let (tx, rx) = mpsc::unbounded_channel();
        a.insert(tx, "n1", 8, &[]);
        drop(rx);
        a.have(0, None, |_| false);
        assert_eq!(a.len(), 0);
    }
}
