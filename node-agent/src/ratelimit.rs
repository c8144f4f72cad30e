//! Token-bucket rate limiting of bytes, shared by every task that moves data
//! in one direction (node upload, node download, one origin).
//!
//! `acquire(n)` takes `n` tokens at once and, when the bucket runs dry, goes
//! into debt and sleeps until the debt is repaid. Requests larger than the
//! burst therefore never deadlock, and waiters are served in arrival order
//! (each one's sleep covers the debt of those before it).
//!
//! Two kinds are layered on every byte (a byte passes all of them):
//! per-content caps ([`RateLimiter::adjustable`], whose rate follows the
//! Distribution's spec while it runs) and the node-wide limits, which serve
//! waiters by priority ([`PriorityLimiter`]).

mod priority;

pub use priority::PriorityLimiter;

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
    /// Bytes per second; `0` means unlimited (an adjustable limiter without
    /// a cap for now).
    rate: f64,
    /// Most tokens the bucket holds.
    burst: f64,
    /// Available tokens; negative while in debt.
    tokens: f64,
    last: Instant,
}

/// The burst of a limiter of `rate` bytes per second: one default piece or
/// a quarter second of rate, whichever is larger, so a whole piece can go
/// at once without stalling.
fn default_burst(rate: u64) -> u64 {
    (rate / 4).max(u64::from(DEFAULT_PIECE_SIZE))
}

impl Bucket {
    fn new(rate: u64, burst: u64) -> Bucket {
        let burst = burst.max(1) as f64;
        Bucket {
            rate: rate as f64,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

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
        let burst = bytes_per_sec.map(default_burst).unwrap_or(0);
        Self::with_burst(bytes_per_sec, burst)
    }

    /// A limiter whose rate can be changed while it is shared
    /// ([`RateLimiter::set_rate`]); `None` or `Some(0)`: unlimited for now.
    pub fn adjustable(bytes_per_sec: Option<u64>) -> RateLimiter {
        let limiter = RateLimiter {
            bucket: Some(Arc::new(Mutex::new(Bucket::new(0, 1)))),
        };
        limiter.set_rate(bytes_per_sec);
        limiter
    }

    /// Changes the rate of every clone of an adjustable limiter, keeping
    /// the tokens it holds (at most the new burst). Waiters already asleep
    /// keep their wake-up time; later ones see the new rate. No-op on a
    /// fixed unlimited limiter.
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        let Some(bucket) = &self.bucket else {
            return;
        };
        let rate = bytes_per_sec.unwrap_or(0);
        let mut b = bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        b.refill(now);
        if rate == 0 {
            b.rate = 0.0;
            return;
        }
        let was_unlimited = b.rate == 0.0;
        b.rate = rate as f64;
        b.burst = default_burst(rate) as f64;
        // From unlimited: start full, as a new limiter does.
        b.tokens = if was_unlimited {
            b.burst
        } else {
            b.tokens.min(b.burst)
        };
        b.last = now;
    }

    /// Like [`RateLimiter::new`] with an explicit burst (at least 1 byte).
    /// The bucket starts full.
    pub fn with_burst(bytes_per_sec: Option<u64>, burst: u64) -> RateLimiter {
        let bucket = bytes_per_sec
            .filter(|&r| r > 0)
            .map(|rate| Arc::new(Mutex::new(Bucket::new(rate, burst))));
        RateLimiter { bucket }
    }

    /// An unlimited limiter.
    pub fn unlimited() -> RateLimiter {
        RateLimiter { bucket: None }
    }

    /// The configured rate, `None` when unlimited.
    pub fn rate(&self) -> Option<u64> {
        self.bucket.as_ref().and_then(|b| {
            let b = b.lock().unwrap_or_else(PoisonError::into_inner);
            (b.rate > 0.0).then_some(b.rate as u64)
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
            if b.rate == 0.0 {
                return;
            }
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
    async fn adjustable_rates_apply_to_every_clone_from_the_next_request() {
        let rl = RateLimiter::adjustable(None);
        let clone = rl.clone();
        assert_eq!(rl.rate(), None);
        let start = Instant::now();
        clone.acquire(100_000_000).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "no cap yet");

        rl.set_rate(Some(4 << 20));
        assert_eq!(clone.rate(), Some(4 << 20));
        // Starts full (one burst), then 4 MiB/s: 5 bursts of 4 MiB in 4 s.
        let start = Instant::now();
        for _ in 0..5 {
            clone.acquire(4 << 20).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((3.99..=4.01).contains(&took), "took {took}s");

        // Raised to 8 MiB/s: the bucket is empty, 16 MiB take 2 s.
        rl.set_rate(Some(8 << 20));
        let start = Instant::now();
        for _ in 0..4 {
            clone.acquire(4 << 20).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((1.99..=2.01).contains(&took), "took {took}s");

        rl.set_rate(None);
        let start = Instant::now();
        clone.acquire(u64::MAX).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "cap removed");
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
