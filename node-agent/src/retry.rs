//! The agent's one retry policy: capped exponential backoff with jitter,
//! built on `backon`.
//!
//! Every retry of the agent waits this way: the engine's retries of a
//! transient origin failure or a local fault ([`ENGINE`]), the origin
//! client's own retries of one request (its configurable
//! `initial_backoff`/`max_backoff`), the certificate request written until
//! the operator answers ([`ENROLL`]) and the redial of a peer ([`DIAL`]).
//! The n-th wait (from 0) is drawn from `[min·2ⁿ, 2·min·2ⁿ)` and never
//! exceeds `max`: the jitter spreads nodes that failed together (a restarted
//! origin, a lost API server, a peer back up) so they do not retry together,
//! and `max` is the longest wait indeed.
//!
//! Use [`Policy`] where `backon` drives the retries (`Retryable::retry`
//! takes it as a [`BackoffBuilder`]), and [`Backoff`] in a hand-written loop
//! that must keep waiting after a success resets it.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// Capped exponential backoff with jitter, doubling from `min` to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The first wait (before jitter).
    pub min: Duration,
    /// The longest wait, jitter included.
    pub max: Duration,
    /// Give up after this many retries (`None`: never).
    pub max_times: Option<usize>,
}

/// The engine's retries of a transient origin failure or of a content
/// stopped by a local fault (disk full, I/O error): 1 s doubling to 60 s.
pub const ENGINE: Policy = Policy::new(Duration::from_secs(1), Duration::from_secs(60));

/// Writing the certificate request while the API server refuses it: 1 s
/// doubling to 30 s.
pub const ENROLL: Policy = Policy::new(Duration::from_secs(1), Duration::from_secs(30));

/// Redialing a peer that cannot be reached or closed at once: 200 ms
/// doubling to 5 s.
pub const DIAL: Policy = Policy::new(Duration::from_millis(200), Duration::from_secs(5));

impl Policy {
    /// Retries forever, waiting from `min` up to `max`.
    pub const fn new(min: Duration, max: Duration) -> Self {
        Policy {
            min,
            max,
            max_times: None,
        }
    }

    /// Gives up after `times` retries.
    pub const fn with_max_times(mut self, times: usize) -> Self {
        self.max_times = Some(times);
        self
    }
}

impl BackoffBuilder for Policy {
    type Backoff = Delays;

    fn build(self) -> Delays {
        let exp = ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter();
        let exp = match self.max_times {
            Some(n) => exp.with_max_times(n),
            None => exp.without_max_times(),
        };
        Delays {
            inner: exp.build(),
            max: self.max,
        }
    }
}

/// The waits of one run of retries (an iterator; `None` once given up).
#[derive(Debug)]
pub struct Delays {
    inner: <ExponentialBuilder as BackoffBuilder>::Backoff,
    max: Duration,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // backon's jitter adds up to the delay again, also at the cap:
        // clamp, so `max` bounds every wait.
        self.inner.next().map(|d| d.min(self.max))
    }
}

/// A backoff for a loop driven by hand: each failure waits longer, a
/// success [`reset`](Backoff::reset)s it.
#[derive(Debug)]
pub struct Backoff {
    policy: Policy,
    delays: Delays,
}

impl Backoff {
    pub fn new(policy: Policy) -> Self {
        Backoff {
            policy,
            delays: policy.build(),
        }
    }

    /// The next wait; `max` once a bounded policy has given up.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.policy.max)
    }

    /// Starts over from `min` (after a success).
    pub fn reset(&mut self) {
        self.delays = self.policy.build();
    }

    /// Sleeps the next wait; `false` if `cancel` fired first.
    pub async fn sleep(&mut self, cancel: &CancellationToken) -> bool {
        let wait = self.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = cancel.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// The wait before jitter of the n-th retry.
    fn nominal(p: &Policy, n: u32) -> Duration {
        p.min.saturating_mul(1 << n.min(20)).min(p.max)
    }

    #[test]
    fn delays_double_within_the_jitter_and_stop_at_max() {
        for policy in [ENGINE, ENROLL, DIAL, Policy::new(10 * MS, 40 * MS)] {
            for _ in 0..20 {
                let delays: Vec<Duration> = policy.build().take(12).collect();
                assert_eq!(delays.len(), 12, "an unbounded policy never gives up");
                for (n, d) in (0u32..).zip(&delays) {
                    let low = nominal(&policy, n);
                    let high = (low * 2).min(policy.max);
                    assert!(
                        low <= *d && *d <= high,
                        "{policy:?}: retry {n} waits {d:?}, not in [{low:?}, {high:?}]"
                    );
                }
                // Twelve doublings of every policy here reach the cap.
                assert_eq!(delays[11], policy.max, "{policy:?}");
            }
        }
    }

    #[test]
    fn jitter_spreads_the_waits_of_nodes_failing_together() {
        let firsts: std::collections::BTreeSet<Duration> = (0..64)
            .map(|_| ENGINE.build().next().expect("a first wait"))
            .collect();
        // 64 draws from [1 s, 2 s): equal ones would mean no jitter at all.
        assert!(firsts.len() > 1, "no jitter: {firsts:?}");
        assert!(
            firsts
                .iter()
                .all(|d| ENGINE.min <= *d && *d < ENGINE.min * 2)
        );
    }

    #[test]
    fn a_bounded_policy_gives_up() {
        let policy = Policy::new(10 * MS, 40 * MS).with_max_times(3);
        assert_eq!(policy.build().count(), 3);
        let mut b = Backoff::new(policy);
        for _ in 0..3 {
            assert!(b.next_delay() <= policy.max);
        }
        assert_eq!(b.next_delay(), policy.max, "waits max once given up");
    }

    #[test]
    fn reset_starts_over_from_min() {
        let mut b = Backoff::new(DIAL);
        for _ in 0..10 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), DIAL.max);
        b.reset();
        let d = b.next_delay();
        assert!(DIAL.min <= d && d < DIAL.min * 2, "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_waits_the_next_delay_or_stops_when_cancelled() {
        let cancel = CancellationToken::new();
        let mut b = Backoff::new(ENROLL);
        let t0 = tokio::time::Instant::now();
        assert!(b.sleep(&cancel).await);
        let first = t0.elapsed();
        assert!(ENROLL.min <= first && first <= ENROLL.min * 2, "{first:?}");
        let t1 = tokio::time::Instant::now();
        assert!(b.sleep(&cancel).await);
        let second = t1.elapsed();
        assert!(
            ENROLL.min * 2 <= second && second <= ENROLL.min * 4,
            "{second:?}"
        );

        cancel.cancel();
        let t2 = tokio::time::Instant::now();
        assert!(!b.sleep(&cancel).await);
        assert_eq!(
            t2.elapsed(),
            Duration::ZERO,
            "a cancelled sleep returns at once"
        );
    }
}
