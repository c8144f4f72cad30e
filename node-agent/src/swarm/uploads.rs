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
//! - a request for a piece we never sent waits for a slot;
//! - a request for a piece we already sent, arriving while every slot is
//!   taken (or others wait), is refused at once with
//!   [`RejectReason::Unavailable`](crate::wire::RejectReason) ("not now, ask
//!   another holder"): whoever we sent it to holds it, or soon will, and has
//!   an uplink of its own. The requester asks someone else, or us later.
//!
//! Why refuse rather than queue the second kind: a waiting request holds
//! one of the requester's download permits while its downlink may idle and
//! other holders' uplinks may be free. The node's downlink is the bound
//! (T* = F/d when links are symmetric), so every second it idles is lost
//! for good. Measured in the simulator (`peerfill-sim`, N = 16 x 64 MiB at
//! 20 Mbit/s, 6 seeds): queueing already-sent pieces while fewer than
//! `slots` waited gave 1.34 T*, refusing them at once 1.20 T* (both with 16
//! pieces in flight, 3 per peer); with the downloader's matching change (8
//! in flight, spread over peers, `peer::pipeline_for`) 1.13 T*.
//!
//! The result is a forwarding tree per piece that doubles its holders every
//! piece-time, rather than a star around whoever read it. Memory stays
//! bounded: at most `slots` pieces are being sent and `budget` bytes held
//! (sent or awaiting acknowledgement) at once (one piece always may when
//! nothing is held), and a waiting request holds no piece buffer (at most
//! one per peer session and outstanding request).
//!
//! A slot is held until every byte of its piece is on the wire
//! ([`UploadPermit::all_sent`]); the piece's bytes stay counted against the
//! budget until the peer acknowledged them. Why not sooner: freeing the slot
//! once the piece is handed to QUIC (which buffers all of it at once)
//! multiplexes every request at once, fresh pieces lose their head start
//! and the swarm took 1.4x as long. Why not later: the acknowledgement of
//! the last bytes waits behind the receiver's queues. On the netbench (N =
//! 16 x 64 MiB, 20 Mbit/s links, 256 KiB FIFOs) it came 70 ms (mean; p90
//! 136 ms) after the receiver had the piece, 7 % of the time a slot was
//! held, with nothing left to send; freeing the slot when the bytes are
//! sent took the swarm from 1.28-1.30 to 1.25-1.28 T*.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

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
    /// Pieces being sent at once, at most.
    pub slots: usize,
    /// Bytes of pieces being uploaded or awaiting acknowledgement at once, at
    /// most (one piece always may when none is held).
    pub budget: u64,
}

impl Limits {
    pub fn new(slots: usize, budget: u64) -> Self {
        Limits {
            slots: slots.max(1),
            budget,
        }
    }

    /// Whether a piece of `len` bytes may start while `busy` uploads are
    /// sending and `busy_bytes` (theirs, and those of pieces sent but not
    /// yet acknowledged) are held.
    pub fn fits(&self, busy: usize, busy_bytes: u64, len: u64) -> bool {
        busy < self.slots && (busy_bytes == 0 || busy_bytes + len <= self.budget)
    }
}

/// The request was refused: ask another holder, or later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Busy;

/// One upload slot and the piece's share of the byte budget. The slot is
/// handed to the best waiting request when the piece is all sent
/// ([`all_sent`](Self::all_sent)) or the permit is dropped, the bytes when
/// it is dropped.
pub(crate) struct UploadPermit {
    queue: Arc<UploadQueue>,
    len: u64,
    sending: bool,
}

impl UploadPermit {
    fn new(queue: Arc<UploadQueue>, len: u64) -> Self {
        UploadPermit {
            queue,
            len,
            sending: true,
        }
    }

    /// Every byte of the piece is on the wire: the slot goes to the next
    /// request while the last bytes are acknowledged (module docs).
    pub(crate) fn all_sent(&mut self) {
        if std::mem::replace(&mut self.sending, false) {
            self.queue.release(0, true);
        }
    }

    #[cfg(test)]
    pub(crate) fn sending(&self) -> bool {
        self.sending
    }
}

impl Drop for UploadPermit {
    fn drop(&mut self) {
        self.queue.release(self.len, self.sending);
    }
}

/// When to look again whether an upload's piece is all on the wire: `None`
/// once `sent` bytes reach its `len`, else about when they will at the rate
/// so far (within 5-200 ms; 50 ms before the first byte). Pure.
pub fn next_send_check(sent: u64, len: u64, elapsed: Duration) -> Option<Duration> {
    const FIRST: Duration = Duration::from_millis(50);
    const MIN: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_millis(200);
    if sent >= len {
        return None;
    }
    if sent == 0 || elapsed.is_zero() {
        return Some(FIRST);
    }
    let left = elapsed.as_secs_f64() * (len - sent) as f64 / sent as f64;
    Some(Duration::from_secs_f64(left).clamp(MIN, MAX))
}

/// What happens to a request that finds every slot taken or others
/// waiting. Pure: `sent` is how many copies of its piece this node started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    Queue,
    Refuse,
}

pub fn on_arrival(sent: u32) -> Arrival {
    if sent == 0 {
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
                return Ok(UploadPermit::new(self.clone(), len));
            }
            if on_arrival(fill.upload_count(piece)) == Arrival::Refuse {
                return Err(Busy);
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

    /// `len` bytes of the budget, and a slot if `slot`, freed.
    fn release(self: &Arc<Self>, len: u64, slot: bool) {
        {
            let mut st = self.lock();
            if slot {
                st.busy = st.busy.saturating_sub(1);
            }
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
            let permit = UploadPermit::new(self.clone(), w.len);
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
    fn fresh_pieces_wait_for_a_slot_sent_ones_are_refused() {
        assert_eq!(on_arrival(0), Arrival::Queue);
        assert_eq!(on_arrival(1), Arrival::Refuse);
        assert_eq!(on_arrival(5), Arrival::Refuse);
    }

    #[test]
    fn the_least_sent_piece_goes_first_then_the_oldest_request() {
        assert_eq!(next_to_serve(&[]), None);
        assert_eq!(next_to_serve(&[(2, 0), (0, 5), (0, 3), (1, 1)]), Some(2));
        assert_eq!(next_to_serve(&[(1, 4), (1, 2)]), Some(1));
    }

    #[test]
    fn limits_follow_the_slots_and_the_byte_budget_lets_one_piece_go() {
        assert_eq!(Limits::new(0, 3 << 20).slots, 1);
        let l = Limits::new(8, 12 << 20);
        assert_eq!(l.slots, 8);
        // A piece larger than the budget goes when nothing else does.
        assert!(l.fits(0, 0, 64 << 20));
        assert!(l.fits(2, 8 << 20, 4 << 20));
        assert!(!l.fits(3, 12 << 20, 4 << 20));
        assert!(!l.fits(8, 0, 1));
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

    /// Spawns a request for `piece` and returns once the line holds `line`
    /// requests (this one included).
    async fn in_line(
        q: &Arc<UploadQueue>,
        f: &Arc<Fill>,
        piece: u32,
        len: u64,
        line: usize,
    ) -> tokio::task::JoinHandle<Result<UploadPermit, Busy>> {
        let task = tokio::spawn({
            let (q, f) = (q.clone(), f.clone());
            async move { q.admit(&f, piece, len).await }
        });
        while q.waiting() < line {
            tokio::task::yield_now().await;
        }
        task
    }

    #[tokio::test]
    async fn a_sent_piece_is_refused_while_slots_are_taken_fresh_ones_wait_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fill(dir.path());
        let q = UploadQueue::new(1, 1 << 30);
        // Piece 0 is being sent (one copy started).
        let first = q.admit(&f, 0, 1 << 20).await.expect("free slot");
        assert_eq!(f.upload_count(0), 1);
        // A second copy of piece 0 is refused at once: ask another holder.
        assert_eq!(q.admit(&f, 0, 1 << 20).await.err(), Some(Busy));
        assert_eq!(q.waiting(), 0);
        // Pieces never sent wait, and are served oldest first.
        let five = in_line(&q, &f, 5, 1 << 20, 1).await;
        let six = in_line(&q, &f, 6, 1 << 20, 2).await;
        drop(first);
        let five = five.await.expect("task").expect("served first");
        assert_eq!((f.upload_count(5), f.upload_count(6)), (1, 0));
        // Piece 6 still waits; piece 5, now sent, is refused meanwhile.
        assert_eq!(q.admit(&f, 5, 1 << 20).await.err(), Some(Busy));
        drop(five);
        drop(six.await.expect("task").expect("served next"));
        assert_eq!(f.upload_count(6), 1);
        // With a slot free and nobody waiting, a sent piece goes again.
        let _again = q.admit(&f, 0, 1 << 20).await.expect("free slot");
        assert_eq!(f.upload_count(0), 2);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_the_line_and_never_holds_a_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fill(dir.path());
        let q = UploadQueue::new(1, 1 << 30);
        let first = q.admit(&f, 1, 1 << 20).await.expect("free slot");
        let gone = in_line(&q, &f, 2, 1 << 20, 1).await;
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
        let small = in_line(&q, &f, 1, 1 << 20, 1).await;
        drop(big);
        small.await.expect("task").expect("room after the big one");
        // Three 1 MiB pieces fill the budget; the fourth waits.
        let held: Vec<_> = futures::future::join_all((1..4).map(|p| q.admit(&f, p, 1 << 20)))
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("within budget");
        let fourth = in_line(&q, &f, 6, 1 << 20, 1).await;
        drop(held);
        fourth.await.expect("task").expect("served once room freed");
    }

    #[tokio::test]
    async fn a_piece_all_sent_frees_its_slot_but_its_bytes_stay_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fill(dir.path());
        let q = UploadQueue::new(1, 3 << 20);
        let mut first = q.admit(&f, 0, 1 << 20).await.expect("free slot");
        let second = in_line(&q, &f, 1, 1 << 20, 1).await;
        // The first piece is on the wire, not yet acknowledged: the one
        // slot goes to the next request at once (twice is harmless).
        first.all_sent();
        first.all_sent();
        let mut second = second.await.expect("task").expect("slot handed on");
        second.all_sent();
        // 2 MiB are still held of the 3 MiB budget: a 2 MiB piece waits,
        // though the slot is free, until the first is acknowledged.
        let third = in_line(&q, &f, 2, 2 << 20, 1).await;
        tokio::task::yield_now().await;
        assert_eq!(q.waiting(), 1);
        drop(first);
        let third = third.await.expect("task").expect("room once acknowledged");
        assert!(third.sending() && !second.sending());
    }

    #[tokio::test]
    async fn a_piece_over_the_budget_goes_alone_only_once_nothing_is_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fill(dir.path());
        let q = UploadQueue::new(8, 3 << 20);
        let mut small = q.admit(&f, 0, 1 << 20).await.expect("free slot");
        small.all_sent();
        // No upload is sending, but 1 MiB awaits acknowledgement.
        let big = in_line(&q, &f, 1, 4 << 20, 1).await;
        drop(small);
        big.await
            .expect("task")
            .expect("alone once nothing is held");
    }

    #[test]
    fn the_next_send_check_comes_about_when_the_rest_will_be_sent() {
        let ms = Duration::from_millis;
        // All sent (the connection's other traffic may make it more).
        assert_eq!(next_send_check(100, 100, ms(10)), None);
        assert_eq!(next_send_check(150, 100, ms(10)), None);
        // Nothing sent yet: no rate to go by.
        assert_eq!(next_send_check(0, 100, ms(10)), Some(ms(50)));
        assert_eq!(next_send_check(10, 100, Duration::ZERO), Some(ms(50)));
        // Half in 100 ms: the other half in about 100 ms.
        assert_eq!(next_send_check(50, 100, ms(100)), Some(ms(100)));
        // Within 5..=200 ms either way.
        assert_eq!(next_send_check(99, 100, ms(100)), Some(ms(5)));
        assert_eq!(next_send_check(1, 100, ms(100)), Some(ms(200)));
    }
}
