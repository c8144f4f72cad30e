//! Bandwidth caps and priority of the contents of one node.
//!
//! Every byte a content moves passes two limiters, in this order:
//! - its own caps (`strategy.maxDownloadBytesPerSecond` /
//!   `maxUploadBytesPerSecond` of its Distribution): one download bucket
//!   shared by its peer requests and its origin reads, one upload bucket
//!   shared by everything it serves. They follow the spec while the content
//!   runs ([`Limits::set`]).
//! - the node-wide limits of the agent config, which serve waiters by
//!   priority ([`PriorityLimiter`]): a higher-priority content gets the
//!   node's capped bandwidth first.
//!
//! The own cap comes first so that a content waiting for its own cap does
//! not hold a place in the node-wide line.
//!
//! Without a node-wide limit the link itself is the bottleneck, which no
//! token bucket sees; priority then orders the node's download concurrency:
//! a session may take a download permit only while no session of a
//! higher-priority content waits for one ([`Limits::permit_turn`]), so the
//! higher one's requests are in flight first. Origin reads and the upload
//! slots are not ordered by priority (the node-wide upload limit is).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::ratelimit::{PriorityLimiter, RateLimiter};

/// The caps and priority of one content (from its Distribution's strategy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContentCaps {
    /// Download cap of this content on this node, peers and origin
    /// together, bytes per second.
    #[serde(default)]
    pub download_bytes_per_sec: Option<u64>,
    /// Upload cap of this content on this node, bytes per second.
    #[serde(default)]
    pub upload_bytes_per_sec: Option<u64>,
    /// Higher goes first.
    #[serde(default)]
    pub priority: i32,
}

#[derive(Debug)]
struct ContentLimits {
    down: RateLimiter,
    up: RateLimiter,
    priority: AtomicI32,
}

impl ContentLimits {
    fn new(caps: ContentCaps) -> ContentLimits {
        ContentLimits {
            down: RateLimiter::adjustable(caps.download_bytes_per_sec),
            up: RateLimiter::adjustable(caps.upload_bytes_per_sec),
            priority: AtomicI32::new(caps.priority),
        }
    }

    fn priority(&self) -> i32 {
        self.priority.load(Ordering::Relaxed)
    }
}

/// The limiters of one node: node-wide, and per content.
#[derive(Debug)]
pub(crate) struct Limits {
    down: PriorityLimiter,
    up: PriorityLimiter,
    contents: Mutex<HashMap<String, Arc<ContentLimits>>>,
    /// Sessions waiting for a download permit, by priority.
    permit_waiters: Mutex<BTreeMap<i32, usize>>,
    permit_moved: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Limits {
    /// Node-wide limits in bytes per second (`None`: unlimited).
    pub(crate) fn new(download: Option<u64>, upload: Option<u64>) -> Limits {
        Limits {
            down: PriorityLimiter::new(download),
            up: PriorityLimiter::new(upload),
            contents: Mutex::new(HashMap::new()),
            permit_waiters: Mutex::new(BTreeMap::new()),
            permit_moved: Notify::new(),
        }
    }

    /// Sets (or changes, taking effect from the next request) the caps and
    /// priority of content `id`.
    pub(crate) fn set(&self, id: &str, caps: ContentCaps) {
        let mut contents = lock(&self.contents);
        match contents.get(id) {
            Some(c) => {
                c.down.set_rate(caps.download_bytes_per_sec);
                c.up.set_rate(caps.upload_bytes_per_sec);
                c.priority.store(caps.priority, Ordering::Relaxed);
            }
            None => {
                contents.insert(id.to_string(), Arc::new(ContentLimits::new(caps)));
            }
        }
    }

    /// Forgets content `id` (it runs unlimited but for the node-wide limits
    /// until set again).
    pub(crate) fn remove(&self, id: &str) {
        lock(&self.contents).remove(id);
    }

    fn get(&self, id: &str) -> Option<Arc<ContentLimits>> {
        lock(&self.contents).get(id).cloned()
    }

    /// The priority of content `id` (0 when it has none set).
    pub(crate) fn priority(&self, id: &str) -> i32 {
        self.get(id).map_or(0, |c| c.priority())
    }

    /// Waits until `n` bytes of content `id` may be downloaded.
    pub(crate) async fn download(&self, id: &str, n: u64) {
        self.download_gate(id).acquire(n).await;
    }

    /// Waits until `n` bytes of content `id` may be uploaded.
    pub(crate) async fn upload(&self, id: &str, n: u64) {
        let c = self.get(id);
        let priority = match &c {
            Some(c) => {
                c.up.acquire(n).await;
                c.priority()
            }
            None => 0,
        };
        self.up.acquire(n, priority).await;
    }

    /// The download limiters of content `id`, for its origin reader.
    pub(crate) fn download_gate(&self, id: &str) -> DownloadGate {
        DownloadGate {
            origin: RateLimiter::unlimited(),
            content: self.get(id),
            node: self.down.clone(),
        }
    }

    /// Whether a session of a content of `priority` must leave the download
    /// permits to a higher-priority content waiting for one.
    pub(crate) fn outranked(&self, priority: i32) -> bool {
        lock(&self.permit_waiters)
            .range(priority.saturating_add(1)..)
            .any(|(_, &n)| n > 0)
    }

    /// Stands in line for a download permit at `priority` and resolves when
    /// no higher priority waits; the returned guard keeps the place (so lower
    /// ones keep out) until dropped, i.e. until the permit is taken.
    pub(crate) async fn permit_turn(&self, priority: i32) -> PermitTurn<'_> {
        *lock(&self.permit_waiters).entry(priority).or_insert(0) += 1;
        let turn = PermitTurn {
            limits: self,
            priority,
        };
        loop {
            let moved = self.permit_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if !self.outranked(priority) {
                return turn;
            }
            moved.await;
        }
    }
}

/// A place in the line for download permits (see [`Limits::permit_turn`]).
pub(crate) struct PermitTurn<'a> {
    limits: &'a Limits,
    priority: i32,
}

impl Drop for PermitTurn<'_> {
    fn drop(&mut self) {
        let mut w = lock(&self.limits.permit_waiters);
        if let Some(n) = w.get_mut(&self.priority) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.priority);
            }
        }
        drop(w);
        self.limits.permit_moved.notify_waiters();
    }
}

/// The download limiters of one content: for origin reads the per-origin
/// limit, then its own cap, then the node-wide limit at its priority. Cheap
/// to clone; follows cap changes.
#[derive(Clone, Debug)]
pub struct DownloadGate {
    origin: RateLimiter,
    content: Option<Arc<ContentLimits>>,
    node: PriorityLimiter,
}

impl DownloadGate {
    /// The same gate behind the per-origin limiter `origin`.
    pub fn with_origin(mut self, origin: RateLimiter) -> DownloadGate {
        self.origin = origin;
        self
    }

    /// Waits until `n` bytes may be downloaded.
    pub async fn acquire(&self, n: u64) {
        self.origin.acquire(n).await;
        let priority = match &self.content {
            Some(c) => {
                c.down.acquire(n).await;
                c.priority()
            }
            None => 0,
        };
        self.node.acquire(n, priority).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    const MIB: u64 = 1 << 20;

    #[tokio::test(start_paused = true)]
    async fn a_byte_passes_the_content_cap_and_the_node_limit() {
        // Node-wide 8 MiB/s, content capped at 2 MiB/s: the cap binds.
        let limits = Limits::new(Some(8 * MIB), None);
        limits.set(
            "a",
            ContentCaps {
                download_bytes_per_sec: Some(2 * MIB),
                ..ContentCaps::default()
            },
        );
        // Both buckets start with one burst (4 MiB).
        limits.download("a", 4 * MIB).await;
        let start = Instant::now();
        for _ in 0..8 {
            limits.download("a", MIB).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((3.99..=4.01).contains(&took), "took {took}s");
        // Raised above the node-wide limit: now the node limit binds.
        limits.set(
            "a",
            ContentCaps {
                download_bytes_per_sec: Some(64 * MIB),
                ..ContentCaps::default()
            },
        );
        let start = Instant::now();
        for _ in 0..16 {
            limits.download("a", MIB).await;
        }
        let took = start.elapsed().as_secs_f64();
        // The node limit binds: its bucket holds one burst (4 MiB) and the
        // other 12 MiB take 1.5 s at 8 MiB/s (at 64 MiB/s the cap alone
        // would take 0.25 s); the cap's own short waits come on top.
        assert!((1.5..=1.7).contains(&took), "took {took}s");
    }

    #[tokio::test(start_paused = true)]
    async fn uploads_of_each_content_have_their_own_cap() {
        let limits = Arc::new(Limits::new(None, None));
        for (id, cap) in [("four", 4 * MIB), ("eight", 8 * MIB)] {
            limits.set(
                id,
                ContentCaps {
                    upload_bytes_per_sec: Some(cap),
                    ..ContentCaps::default()
                },
            );
        }
        let sent = |id: &'static str| {
            let limits = limits.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let mut n = 0;
                while start.elapsed() < Duration::from_secs(10) {
                    limits.upload(id, MIB).await;
                    n += MIB;
                }
                n
            })
        };
        let (four, eight) = (sent("four"), sent("eight"));
        let (four, eight) = (four.await.unwrap(), eight.await.unwrap());
        // One burst (4 MiB) plus 10 s of rate each (± the request that
        // straddles the end).
        assert!((43..=45).contains(&(four / MIB)), "{four}");
        assert!((83..=85).contains(&(eight / MIB)), "{eight}");
        // Unknown contents pass unlimited.
        let start = Instant::now();
        limits.upload("other", u64::MAX).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn lower_priorities_wait_for_permits_while_a_higher_one_waits() {
        let limits = Arc::new(Limits::new(None, None));
        assert!(!limits.outranked(0));
        let high = limits.permit_turn(10).await;
        assert!(limits.outranked(0));
        assert!(!limits.outranked(10), "equal priorities are not outranked");
        let low = tokio::spawn({
            let limits = limits.clone();
            async move {
                let _turn = limits.permit_turn(0).await;
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!low.is_finished(), "the low one waits behind the high one");
        drop(high);
        low.await.unwrap();
        assert!(!limits.outranked(-1000));
    }
}
