//! A node-wide byte-rate limiter that serves waiters by priority.
//!
//! One token bucket (as [`RateLimiter`](super::RateLimiter)), but tokens are
//! handed out strictly in order of (priority, arrival): while a waiter of a
//! higher priority waits, no lower one is served, so a higher-priority
//! distribution gets the node's capped bandwidth first and a lower one only
//! what the higher ones do not take. Among equal priorities it is first come,
//! first served.
//!
//! The waiter at the head of the line sleeps until the bucket holds its
//! request (at most one burst: a larger request is served when a burst is
//! there and leaves the bucket in debt, so it never deadlocks); everyone else
//! sleeps until the line moves. A waiter that is cancelled leaves the line.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Bucket, FOREVER, default_burst};

/// Place in line: higher priority first, then arrival.
type Key = (Reverse<i32>, u64);

/// A shared prioritized byte-rate limiter; cheap to clone.
#[derive(Clone, Debug)]
pub struct PriorityLimiter {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// Woken whenever the line moves (a waiter served or gone).
    moved: Notify,
}

#[derive(Debug)]
struct State {
    bucket: Bucket,
    line: BTreeSet<Key>,
    next: u64,
}

/// Removes its key from the line when the wait ends or is cancelled.
struct InLine<'a> {
    inner: &'a Inner,
    key: Key,
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .line
            .remove(&self.key);
        self.inner.moved.notify_waiters();
    }
}

impl PriorityLimiter {
    /// `None` (or `Some(0)`) means unlimited; the burst is as for
    /// [`RateLimiter::new`](super::RateLimiter::new).
    pub fn new(bytes_per_sec: Option<u64>) -> PriorityLimiter {
        let inner = bytes_per_sec.filter(|&r| r > 0).map(|rate| {
            Arc::new(Inner {
                state: Mutex::new(State {
                    bucket: Bucket::new(rate, default_burst(rate)),
                    line: BTreeSet::new(),
                    next: 0,
                }),
                moved: Notify::new(),
            })
        });
        PriorityLimiter { inner }
    }

    /// The configured rate, `None` when unlimited.
    pub fn rate(&self) -> Option<u64> {
        self.inner.as_ref().map(|i| {
            let s = i.state.lock().unwrap_or_else(PoisonError::into_inner);
            s.bucket.rate as u64
        })
    }

    /// Waits until `n` bytes of a distribution of `priority` may pass.
    pub async fn acquire(&self, n: u64, priority: i32) {
        let Some(inner) = &self.inner else {
            return;
        };
        let key = {
            let mut s = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            let key = (Reverse(priority), s.next);
            s.next += 1;
            s.line.insert(key);
            key
        };
        let _in_line = InLine { inner, key };
        loop {
            // Registered before looking, so a move in between is not missed.
            let moved = inner.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let wait = {
                let mut s = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
                if s.line.first() == Some(&key) {
                    let b = &mut s.bucket;
                    b.refill(Instant::now());
                    let need = (n as f64).min(b.burst);
                    if b.tokens >= need {
                        b.tokens -= n as f64;
                        // `_in_line` leaves the line and wakes the next.
                        return;
                    }
                    Some(Duration::try_from_secs_f64((need - b.tokens) / b.rate).unwrap_or(FOREVER))
                } else {
                    None
                }
            };
            match wait {
                // Ahead of everyone: sleep until the tokens are there (a
                // higher-priority arrival meanwhile is first when we wake).
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = &mut moved => {}
                    }
                }
                None => moved.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const MIB: u64 = 1 << 20;

    /// Runs `tasks` senders of `priority`, each sending `total` bytes in
    /// 1 MiB requests, and returns the bytes each priority got.
    fn senders(
        rl: &PriorityLimiter,
        priority: i32,
        tasks: usize,
        total: u64,
        got: &Arc<AtomicU64>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..tasks)
            .map(|_| {
                let (rl, got) = (rl.clone(), got.clone());
                tokio::spawn(async move {
                    let mut sent = 0;
                    while sent < total {
                        rl.acquire(MIB, priority).await;
                        got.fetch_add(MIB, Ordering::SeqCst);
                        sent += MIB;
                    }
                })
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_higher_priority_gets_the_rate_while_it_wants_it() {
        let rl = PriorityLimiter::new(Some(8 * MIB));
        let (high, low) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        // Low arrives first, then high: 3 senders each, high wants 48 MiB.
        let mut tasks = senders(&rl, 0, 3, 64 * MIB, &low);
        tokio::task::yield_now().await;
        tasks.extend(senders(&rl, 10, 3, 16 * MIB, &high));
        // High's 48 MiB at 8 MiB/s take ~6 s; look at 5 s.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (h, l) = (high.load(Ordering::SeqCst), low.load(Ordering::SeqCst));
        // Low only got what was granted before high arrived (one burst of
        // 4 MiB, some of it to each low sender).
        assert!(l <= 4 * MIB, "low got {l} bytes meanwhile");
        assert!(h >= 36 * MIB, "high got {h} bytes in 5 s at 8 MiB/s");
        // Once high is done, low has the whole rate.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let l2 = low.load(Ordering::SeqCst);
        assert_eq!(high.load(Ordering::SeqCst), 48 * MIB);
        assert!(
            l2 - l >= 28 * MIB,
            "low got {} bytes in the next 5 s",
            l2 - l
        );
        for t in tasks {
            t.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn equal_priorities_share_and_the_total_rate_holds() {
        let rl = PriorityLimiter::new(Some(4 * MIB));
        // Drain the initial burst, so both start from an empty bucket.
        rl.acquire(4 * MIB, 5).await;
        let (a, b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = senders(&rl, 5, 2, 1 << 40, &a);
        tasks.extend(senders(&rl, 5, 2, 1 << 40, &b));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (a, b) = (a.load(Ordering::SeqCst), b.load(Ordering::SeqCst));
        // 10 s at 4 MiB/s, first come first served.
        let total = a + b;
        assert!((39 * MIB..=41 * MIB).contains(&total), "total {total}");
        let share = a as f64 / total as f64;
        assert!((0.45..=0.55).contains(&share), "share {share}");
        for t in tasks {
            t.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_line() {
        let rl = PriorityLimiter::new(Some(MIB));
        // Drain the burst, then a high waiter that gives up.
        rl.acquire(4 * MIB, 0).await;
        let high = tokio::spawn({
            let rl = rl.clone();
            async move { rl.acquire(MIB, 100).await }
        });
        tokio::task::yield_now().await;
        high.abort();
        let _ = high.await;
        // The low one is served as if the high one had never come: 1 MiB at
        // 1 MiB/s with the bucket empty.
        let start = Instant::now();
        rl.acquire(MIB, 0).await;
        let took = start.elapsed().as_secs_f64();
        assert!((0.99..=1.01).contains(&took), "took {took}s");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_beyond_the_burst_and_unlimited() {
        let rl = PriorityLimiter::new(Some(MIB));
        let start = Instant::now();
        rl.acquire(4 * MIB, 0).await; // the initial burst
        rl.acquire(10 * MIB, 0).await; // waits for one burst, goes into debt
        rl.acquire(MIB, 0).await; // repays the debt of 6 MiB first
        let took = start.elapsed().as_secs_f64();
        assert!((10.99..=11.01).contains(&took), "took {took}s");
        let free = PriorityLimiter::new(None);
        free.acquire(u64::MAX, -5).await;
        assert_eq!(free.rate(), None);
        assert_eq!(rl.rate(), Some(MIB));
    }
}
