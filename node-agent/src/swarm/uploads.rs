//! Upload admission: which waiting request gets this node's next upload slot.
//!
//! Why not first come, first served. A node that just got a piece nobody
//! else holds (an origin reader's fresh piece, or the first copy a peer
//! forwarded) is asked for it by every peer at once, because every peer's
//! picker wants the rarest piece. Serving those requests in arrival order
//! spends the holder's uplink on N-1 copies of one piece while the nodes
//! that already received it sit idle: measured, origin readers uploaded two
//! copies of the content each while most nodes uploaded a fraction of one,
//! and the swarm ran at 4-6x the lower bound on links where CPU was no
//! limit. The schedule the bound needs (Mutualcast, Kumar-Ross) hands every
//! fresh byte to one node which forwards it on, so that every uplink works.
//!
//! The rule here gets that shape from local knowledge only: each node counts
//! the copies of each piece it has started uploading, and
//! - a free slot goes to the waiting request whose piece this node has sent
//!   the fewest times (oldest first among equals): a piece nobody got from
//!   us yet leaves within about one piece-time of a slot freeing;
//! - a request for a piece we already sent, arriving while `busy_after`
//!   requests are waiting, is refused at once with
//!   [`RejectReason::Unavailable`](crate::wire::RejectReason) ("not now, ask
//!   another holder"): whoever we sent it to holds it, or soon will, and has
//!   an uplink of its own. The requester asks someone else, or us later;
//! - a request for a piece we never sent is always queued; if that makes the
//!   queue longer than `max_waiting`, the waiting request with the most-sent
//!   piece is refused instead.
//!
//! The result is a forwarding tree per piece that doubles its holders every
//! piece-time, rather than a star around whoever read it. Memory stays
//! bounded: at most `slots` pieces and `budget` bytes are being uploaded at
//! once (one piece always may), and a waiting request holds no piece buffer.
//! A slot is held until the peer has the data (measured: freeing it once the
//! data is handed to QUIC multiplexes every request at once, fresh pieces
//! lose their head start and the swarm took 1.4x as long).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use super::Fill;

/// A request waiting for a slot.
struct Waiter {
    seq: u64,
    fill: Arc<Fill>,
    piece: u32,
    len: u64,
    tx: oneshot::Sender<Result<UploadPermit, Busy>>,
}

struct QueueState {
    busy: usize,
    busy_bytes: u64,
    waiting: Vec<Waiter>,
    next_seq: u64,
}

/// The node's upload slots and the requests waiting for them.
pub(crate) struct UploadQueue {
    limits: Limits,
    st: Mutex<QueueState>,
}

/// The numbers the admission rule works with, derived from the slot count
/// and the byte budget. Pure, so the swarm simulator (`peerfill-sim`) runs
/// the same rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pieces being uploaded at once, at most.
    pub slots: usize,
    /// Bytes of pieces being uploaded at once, at most (one piece always may).
    pub budget: u64,
    /// Waiting requests beyond which a piece already sent is refused.
    pub busy_after: usize,
    /// Waiting requests beyond which a fresh one evicts a most-sent one.
    pub max_waiting: usize,
}

impl Limits {
    pub fn new(slots: usize, budget: u64) -> Self {
        let slots = slots.max(1);
        Limits {
            slots,
            budget,
            busy_after: slots,
            max_waiting: 4 * slots,
        }
    }

    /// Whether a piece of `len` bytes may start while `busy` uploads of
    /// `busy_bytes` in all run.
    pub fn fits(&self, busy: usize, busy_bytes: u64, len: u64) -> bool {
        busy < self.slots && (busy == 0 || busy_bytes + len <= self.budget)
    }
}

/// The request was refused: ask another holder, or later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Busy;

/// One upload slot; freeing it hands the slot to the best waiting request.
pub(crate) struct UploadPermit {
    queue: Arc<UploadQueue>,
    len: u64,
}

impl Drop for UploadPermit {
    fn drop(&mut self) {
        self.queue.release(self.len);
    }
}

/// What happens to a request arriving while every slot is taken or others
/// wait. Pure: `sent` is how many copies of its piece this node started,
/// `waiting` how many requests wait now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    Queue,
    /// Queue it and refuse the waiting request with the most-sent piece.
    QueueAndEvict,
    Refuse,
}

pub fn on_arrival(sent: u32, waiting: usize, busy_after: usize, max_waiting: usize) -> Arrival {
    if sent == 0 {
        if waiting >= max_waiting {
            Arrival::QueueAndEvict
        } else {
            Arrival::Queue
        }
    } else if waiting < busy_after {
        Arrival::Queue
    } else {
        Arrival::Refuse
    }
}

/// Index of the request to serve next: fewest copies sent, then oldest.
/// Pure over `(sent, seq)` pairs.
pub fn next_to_serve(waiting: &[(u32, u64)]) -> Option<usize> {
    (0..waiting.len()).min_by_key(|&i| waiting[i])
}

/// Index of the request to refuse to make room: most copies sent (only a
/// piece we already sent may be refused), newest among equals.
pub fn to_evict(waiting: &[(u32, u64)]) -> Option<usize> {
    (0..waiting.len())
        .filter(|&i| waiting[i].0 > 0)
        .max_by_key(|&i| waiting[i])
}

impl UploadQueue {
    pub(crate) fn new(slots: usize, budget: u64) -> Arc<Self> {
        Arc::new(UploadQueue {
            limits: Limits::new(slots, budget),
            st: Mutex::new(QueueState {
                busy: 0,
                busy_bytes: 0,
                waiting: Vec::new(),
                next_seq: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every critical section leaves the queue consistent.
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn keys(waiting: &[Waiter]) -> Vec<(u32, u64)> {
        waiting
            .iter()
            .map(|w| (w.fill.upload_count(w.piece), w.seq))
            .collect()
    }

    /// Whether a piece of `len` bytes may start now.
    fn fits(&self, st: &QueueState, len: u64) -> bool {
        self.limits.fits(st.busy, st.busy_bytes, len)
    }

    /// Waits for a slot to upload `piece` (`len` bytes) of `fill`, or is
    /// refused. Dropping the future gives up the place in line (and a slot
    /// granted meanwhile).
    pub(crate) async fn admit(
        self: &Arc<Self>,
        fill: &Arc<Fill>,
        piece: u32,
        len: u64,
    ) -> Result<UploadPermit, Busy> {
        let rx = {
            let mut st = self.lock();
            st.waiting.retain(|w| !w.tx.is_closed());
            if st.waiting.is_empty() && self.fits(&st, len) {
                st.busy += 1;
                st.busy_bytes += len;
                fill.count_upload(piece);
                return Ok(UploadPermit {
                    queue: self.clone(),
                    len,
                });
            }
            let sent = fill.upload_count(piece);
            let arrival = on_arrival(
                sent,
                st.waiting.len(),
                self.limits.busy_after,
                self.limits.max_waiting,
            );
            if arrival == Arrival::Refuse {
                return Err(Busy);
            }
            if arrival == Arrival::QueueAndEvict
                && let Some(i) = to_evict(&Self::keys(&st.waiting))
            {
                let w = st.waiting.swap_remove(i);
                let _ = w.tx.send(Err(Busy));
            }
            let (tx, rx) = oneshot::channel();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.waiting.push(Waiter {
                seq,
                fill: fill.clone(),
                piece,
                len,
                tx,
            });
            rx
        };
        self.dispatch();
        // A permit sent to a receiver dropped meanwhile frees itself.
        rx.await.unwrap_or(Err(Busy))
    }

    /// A slot freed.
    fn release(self: &Arc<Self>, len: u64) {
        {
            let mut st = self.lock();
            st.busy = st.busy.saturating_sub(1);
            st.busy_bytes = st.busy_bytes.saturating_sub(len);
        }
        self.dispatch();
    }

    /// Hands free slots to the best waiting requests still listening.
    fn dispatch(self: &Arc<Self>) {
        let mut st = self.lock();
        while st.busy < self.limits.slots {
            st.waiting.retain(|w| !w.tx.is_closed());
            let Some(i) = next_to_serve(&Self::keys(&st.waiting)) else {
                return;
            };
            // The best request waits for room rather than be overtaken.
            if !self.fits(&st, st.waiting[i].len) {
                return;
            }
            let w = st.waiting.swap_remove(i);
            st.busy += 1;
            st.busy_bytes += w.len;
            w.fill.count_upload(w.piece);
            let permit = UploadPermit {
                queue: self.clone(),
                len: w.len,
            };
            // Drop the lock before a failed send drops the permit (which
            // would take the lock again to free the slot).
            drop(st);
            if let Err(Ok(permit)) = w.tx.send(Ok(permit)) {
                drop(permit);
            }
            st = self.lock();
        }
    }

    /// Requests waiting now (for metrics and tests).
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_pieces_are_always_queued_sent_ones_only_while_the_line_is_short() {
        assert_eq!(on_arrival(0, 0, 2, 8), Arrival::Queue);
        assert_eq!(on_arrival(0, 7, 2, 8), Arrival::Queue);
        assert_eq!(on_arrival(0, 8, 2, 8), Arrival::QueueAndEvict);
        assert_eq!(on_arrival(1, 1, 2, 8), Arrival::Queue);
        assert_eq!(on_arrival(1, 2, 2, 8), Arrival::Refuse);
        assert_eq!(on_arrival(5, 9, 2, 8), Arrival::Refuse);
    }

    #[test]
    fn the_least_sent_piece_goes_first_then_the_oldest_request() {
        assert_eq!(next_to_serve(&[]), None);
        assert_eq!(next_to_serve(&[(2, 0), (0, 5), (0, 3), (1, 1)]), Some(2));
        assert_eq!(next_to_serve(&[(1, 4), (1, 2)]), Some(1));
    }

    #[test]
    fn limits_follow_the_slots_and_the_byte_budget_lets_one_piece_go() {
        let l = Limits::new(0, 3 << 20);
        assert_eq!((l.slots, l.busy_after, l.max_waiting), (1, 1, 4));
        let l = Limits::new(8, 12 << 20);
        assert_eq!((l.slots, l.busy_after, l.max_waiting), (8, 8, 32));
        // A piece larger than the budget goes when nothing else does.
        assert!(l.fits(0, 0, 64 << 20));
        assert!(l.fits(2, 8 << 20, 4 << 20));
        assert!(!l.fits(3, 12 << 20, 4 << 20));
        assert!(!l.fits(8, 0, 1));
    }

    #[test]
    fn only_a_piece_already_sent_is_evicted_the_most_sent_newest_first() {
        assert_eq!(to_evict(&[(0, 1), (0, 2)]), None);
        assert_eq!(to_evict(&[(0, 1), (3, 2), (3, 7), (1, 9)]), Some(2));
    }

    fn fill(dir: &std::path::Path) -> Arc<Fill> {
        use super::super::{Authority, FillSpec};
        use crate::content::Layout;
        use crate::store::PieceStore;
        let layout = Layout::new(8 << 20, 1 << 20).expect("layout");
        let store = PieceStore::open(dir, "c", layout).expect("store");
        let spec = FillSpec {
            id: "c".into(),
            layout,
            digest: None,
            authority: Authority::Seeder("s".into()),
            allowed: ["a".to_string()].into(),
            root: None,
            require_pin: false,
        };
        Fill::new(spec, store, false)
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_fresh_piece_and_resent_pieces_are_refused_when_the_line_is_long()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fill(dir.path());
        let q = UploadQueue::new(1, 1 << 30);
        // Piece 0 is being sent (one copy started).
        let first = q.admit(&f, 0, 1 << 20).await.expect("free slot");
        assert_eq!(f.upload_count(0), 1);
        // Another request for piece 0 waits (the line is short)...
        let again = tokio::spawn({
            let (q, f) = (q.clone(), f.clone());
            async move { q.admit(&f, 0, 1 << 20).await.map(|_| ()) }
        });
        while q.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        // ...then a third copy of piece 0 is refused at once,
        assert_eq!(q.admit(&f, 0, 1 << 20).await.err(), Some(Busy));
        // while a piece never sent queues behind it and is served first.
        let fresh = tokio::spawn({
            let (q, f) = (q.clone(), f.clone());
            async move {
                let _permit = q.admit(&f, 5, 1 << 20).await.ok()?;
                Some(f.upload_count(0))
            }
        });
        while q.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        drop(first);
        // The fresh piece got the slot while piece 0 still had one copy.
        assert_eq!(fresh.await.expect("task"), Some(1));
        assert_eq!(f.upload_count(5), 1);
        again
            .await
            .expect("task")
            .expect("served after the fresh piece");
        assert_eq!(f.upload_count(0), 2);
        assert_eq!(q.waiting(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_the_line_and_never_holds_a_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fill(dir.path());
        let q = UploadQueue::new(1, 1 << 30);
        let first = q.admit(&f, 1, 1 << 20).await.expect("free slot");
        let gone = tokio::spawn({
            let (q, f) = (q.clone(), f.clone());
            async move { q.admit(&f, 2, 1 << 20).await.map(|_| ()) }
        });
        while q.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        drop(first);
        // The slot is free again: the next request gets it at once.
        let _next = q.admit(&f, 3, 1 << 20).await.expect("slot freed");
        assert_eq!(f.upload_count(2), 0);
    }

    #[tokio::test]
    async fn the_byte_budget_bounds_uploads_but_one_piece_always_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fill(dir.path());
        let q = UploadQueue::new(8, 3 << 20);
        // A piece larger than the whole budget still goes when alone.
        let big = q.admit(&f, 0, 4 << 20).await.expect("alone");
        let small = tokio::spawn({
            let (q, f) = (q.clone(), f.clone());
            async move { q.admit(&f, 1, 1 << 20).await.map(|_| ()) }
        });
        while q.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        drop(big);
        small.await.expect("task").expect("room after the big one");
        // Three 1 MiB pieces fill the budget; the fourth waits.
        let held: Vec<_> = futures::future::join_all((1..4).map(|p| q.admit(&f, p, 1 << 20)))
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("within budget");
        let fourth = tokio::spawn({
            let (q, f) = (q.clone(), f.clone());
            async move { q.admit(&f, 6, 1 << 20).await.map(|_| ()) }
        });
        while q.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        drop(held);
        fourth.await.expect("task").expect("served once room freed");
    }
}
