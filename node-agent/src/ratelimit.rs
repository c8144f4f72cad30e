//! Token-bucket rate limiting of bytes, shared by every task that moves data
//! in one direction (node upload, node download, one origin).
//!
//! `acquire(n)` takes `n` tokens at once and, when the bucket runs dry, goes
//! into debt and sleeps until the debt is repaid. Requests larger than the
//! burst therefore never deadlock, and waiters are served in arrival order
//! (each one's sleep covers the debt of those before it).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::content::DEFAULT_PIECE_SIZE;

const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// A shared byte-rate limiter; cheap to clone (clones share the bucket).
#[derive(Clone, Debug)]
pub struct RateLimiter {
    bucket: Option<Arc<Mutex<Bucket>>>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes per second.
    rate: f64,
    /// Most tokens the bucket holds.
    burst: f64,
    /// Available tokens; negative while in debt.
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }
}

impl RateLimiter {
    /// `None` (or `Some(0)`, which would block forever) means unlimited. The
    /// burst is one default piece or a quarter second of rate, whichever is
    /// larger, so a whole piece can go at once without stalling.
    pub fn new(bytes_per_sec: Option<u64>) -> RateLimiter {
        let burst = bytes_per_sec
            .map(|r| (r / 4).max(u64::from(DEFAULT_PIECE_SIZE)))
            .unwrap_or(0);
        Self::with_burst(bytes_per_sec, burst)
    }

    /// Like [`RateLimiter::new`] with an explicit burst (at least 1 byte).
    /// The bucket starts full.
    pub fn with_burst(bytes_per_sec: Option<u64>, burst: u64) -> RateLimiter {
        let bucket = bytes_per_sec.filter(|&r| r > 0).map(|rate| {
            let burst = burst.max(1) as f64;
            Arc::new(Mutex::new(Bucket {
                rate: rate as f64,
                burst,
                tokens: burst,
                last: Instant::now(),
            }))
        });
        RateLimiter { bucket }
    }

    /// An unlimited limiter.
    pub fn unlimited() -> RateLimiter {
        RateLimiter { bucket: None }
    }

    /// The configured rate, `None` when unlimited.
    pub fn rate(&self) -> Option<u64> {
        self.bucket.as_ref().map(|b| {
            let b = b.lock().unwrap_or_else(PoisonError::into_inner);
            b.rate as u64
        })
    }

    /// Waits until `n` bytes may pass. Cancel-safe in the sense that a
    /// cancelled wait still counts its bytes (they were reserved up front),
    /// which errs on the side of staying under the rate.
    pub async fn acquire(&self, n: u64) {
        let Some(bucket) = &self.bucket else {
            return;
        };
        let wait = {
            let mut b = bucket.lock().unwrap_or_else(PoisonError::into_inner);
            b.refill(Instant::now());
            b.tokens -= n as f64;
            if b.tokens >= 0.0 {
                return;
            }
            // Absurd debts (n near u64::MAX at a tiny rate) exceed what a
            // Duration holds; a year is "forever" for a transfer.
            Duration::try_from_secs_f64(-b.tokens / b.rate).unwrap_or(FOREVER)
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ten_megabytes_at_five_per_second_take_two_seconds() {
        let rl = RateLimiter::new(Some(5_000_000));
        // Drain the initial burst so the measurement is in steady state.
        rl.acquire(u64::from(DEFAULT_PIECE_SIZE)).await;
        let start = Instant::now();
        for _ in 0..10 {
            rl.acquire(1_000_000).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((1.95..=2.05).contains(&took), "took {took}s");
    }

    #[tokio::test(start_paused = true)]
    async fn burst_passes_at_once_and_big_requests_go_into_debt() {
        let rl = RateLimiter::with_burst(Some(1_000_000), 500_000);
        let start = Instant::now();
        rl.acquire(500_000).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        // 3x the burst: no deadlock, waits for the 3 s of debt.
        rl.acquire(3_000_000).await;
        let took = start.elapsed().as_secs_f64();
        assert!((2.99..=3.01).contains(&took), "took {took}s");
    }

    #[tokio::test(start_paused = true)]
    async fn shared_between_clones_and_tasks() {
        let rl = RateLimiter::with_burst(Some(1_000_000), 1);
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let rl = rl.clone();
                tokio::spawn(async move {
                    for _ in 0..5 {
                        rl.acquire(100_000).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // 2 MB through a shared 1 MB/s bucket.
        let took = start.elapsed().as_secs_f64();
        assert!((1.99..=2.01).contains(&took), "took {took}s");
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_requests_do_not_panic() {
        let rl = RateLimiter::with_burst(Some(1), 1);
        let waiter = tokio::spawn({
            let rl = rl.clone();
            async move {
                rl.acquire(u64::MAX).await;
                rl.acquire(u64::MAX).await;
            }
        });
        // The waiter sleeps (virtually) far in the future instead of panicking.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!waiter.is_finished());
        waiter.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        for rl in [RateLimiter::new(None), RateLimiter::new(Some(0))] {
            let start = Instant::now();
            rl.acquire(u64::MAX).await;
            assert_eq!(start.elapsed(), Duration::ZERO);
            assert_eq!(rl.rate(), None);
        }
        assert_eq!(RateLimiter::new(Some(7)).rate(), Some(7));
    }
}
