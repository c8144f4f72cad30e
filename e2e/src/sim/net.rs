//! Capped links and the flows that share them (a fluid model, no packets).
//!
//! A flow is one piece (or one origin range request) in transit: a byte
//! count draining at a rate through up to three links (the sender's uplink,
//! the receiver's downlink, and the directed link between two zones when
//! they differ). Rates are **max-min fair**, found by progressive filling:
//! raise every flow's rate together until some link is full, freeze the
//! flows on that link, go on with the rest. That is what long-lived
//! TCP/QUIC flows with equal RTTs approach, and unlike a per-flow equal
//! share it is work-conserving (a flow held back at its receiver leaves its
//! sender's capacity to the sender's other flows).
//!
//! Rates change only when a flow starts or ends (event-driven). Two ways to
//! recompute them ([`Fairness`]):
//! - `Exact`: progressive filling over every flow, the true max-min
//!   allocation; O(flows log links) per event, for small swarms;
//! - `Local`: progressive filling over the flows that share a link with the
//!   flow that started or ended, the other flows keeping their rates (their
//!   use is taken off the links' capacity, so the allocation stays
//!   feasible). Capacity freed further away is picked up at those flows'
//!   own next event, much like congestion control reacting on its own
//!   path. Cheap enough for 5,000 nodes; `peerfill-sim` reports both at
//!   N = 16 and 100 so the difference is measured, not assumed.
//!
//! Every byte a flow moves is counted on each of its links, and on the
//! per-second series of the link's class (for utilization plots).

use std::collections::{BTreeSet, BinaryHeap};

/// Index of a link.
pub type LinkId = usize;
/// Index of a flow (slots are reused after a flow ends).
pub type FlowId = usize;

/// How rates are recomputed on a flow's start or end (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Fairness {
    Exact,
    Local,
}

#[derive(Debug, Clone)]
struct Flow {
    links: Vec<LinkId>,
    remaining: f64,
    rate: f64,
    /// When `remaining` was last brought up to date.
    since: f64,
    /// Set from the net's counter on every rate change (unique across
    /// flows, whose slots are reused), so stale completions are ignored.
    version: u64,
}

/// A flow whose completion time changed: schedule `(id, version)` at `at`
/// (infinite when its rate is zero: it waits for a later change).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reschedule {
    pub id: FlowId,
    pub version: u64,
    pub at: f64,
}

/// The links, the flows on them and the bytes they carried.
#[derive(Debug)]
pub struct Net {
    fairness: Fairness,
    caps: Vec<f64>,
    /// Flows on each link.
    on_link: Vec<Vec<FlowId>>,
    /// Bytes each link carried.
    carried: Vec<f64>,
    /// Class of each link (for the per-second series), if counted.
    class: Vec<Option<usize>>,
    /// Bytes per second per class: `series[class][second]`.
    series: Vec<Vec<f64>>,
    flows: Vec<Option<Flow>>,
    free: Vec<FlowId>,
    active: BTreeSet<FlowId>,
    versions: u64,
}

impl Net {
    pub fn new(fairness: Fairness, classes: usize) -> Self {
        Net {
            fairness,
            caps: Vec::new(),
            on_link: Vec::new(),
            carried: Vec::new(),
            class: Vec::new(),
            series: vec![Vec::new(); classes],
            flows: Vec::new(),
            free: Vec::new(),
            active: BTreeSet::new(),
            versions: 0,
        }
    }

    /// Adds a link of `cap` bytes/s; its bytes go to `class`'s series.
    pub fn add_link(&mut self, cap: f64, class: Option<usize>) -> LinkId {
        self.caps.push(cap.max(1.0));
        self.on_link.push(Vec::new());
        self.carried.push(0.0);
        self.class.push(class);
        self.caps.len() - 1
    }

    pub fn cap(&self, link: LinkId) -> f64 {
        self.caps[link]
    }

    /// Bytes `link` carried so far (up to the last settle of its flows).
    pub fn carried(&self, link: LinkId) -> f64 {
        self.carried[link]
    }

    /// Bytes per second of a link class.
    pub fn series(&self, class: usize) -> &[f64] {
        &self.series[class]
    }

    pub fn rate(&self, id: FlowId) -> f64 {
        self.flows[id].as_ref().map_or(0.0, |f| f.rate)
    }

    pub fn active_flows(&self) -> usize {
        self.active.len()
    }

    /// Starts a flow of `bytes` over `links` at `now`.
    pub fn start(&mut self, now: f64, links: &[LinkId], bytes: f64) -> (FlowId, Vec<Reschedule>) {
        let flow = Flow {
            links: links.to_vec(),
            remaining: bytes.max(0.0),
            rate: 0.0,
            since: now,
            version: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.flows[id] = Some(flow);
                id
            }
            None => {
                self.flows.push(Some(flow));
                self.flows.len() - 1
            }
        };
        for &l in links {
            self.on_link[l].push(id);
        }
        self.active.insert(id);
        let touched = self.neighbourhood(links);
        (id, self.refill(now, &touched))
    }

    /// Ends a flow (done or cancelled) at `now`; returns the bytes it had
    /// left (0 when done) and the flows whose completion moved.
    pub fn stop(&mut self, now: f64, id: FlowId) -> (f64, Vec<Reschedule>) {
        if !self.active.contains(&id) {
            return (0.0, Vec::new());
        }
        self.settle(now, id);
        let Some(flow) = self.flows[id].take() else {
            return (0.0, Vec::new());
        };
        self.active.remove(&id);
        self.free.push(id);
        for &l in &flow.links {
            self.on_link[l].retain(|f| *f != id);
        }
        let touched = self.neighbourhood(&flow.links);
        (flow.remaining.max(0.0), self.refill(now, &touched))
    }

    /// Whether `(id, version)` is still the flow's current completion.
    pub fn is_current(&self, id: FlowId, version: u64) -> bool {
        self.flows
            .get(id)
            .and_then(Option::as_ref)
            .is_some_and(|f| f.version == version)
    }

    /// Brings every flow's bytes up to `now` (before reading counters).
    pub fn settle_all(&mut self, now: f64) {
        let ids: Vec<FlowId> = self.active.iter().copied().collect();
        for id in ids {
            self.settle(now, id);
        }
    }

    /// The flows whose rates a change on `links` recomputes.
    fn neighbourhood(&self, links: &[LinkId]) -> Vec<FlowId> {
        match self.fairness {
            Fairness::Exact => self.active.iter().copied().collect(),
            Fairness::Local => {
                let mut ids: Vec<FlowId> = links
                    .iter()
                    .flat_map(|&l| self.on_link[l].iter().copied())
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            }
        }
    }

    /// Moves a flow's bytes from `since` to `now` at its current rate.
    fn settle(&mut self, now: f64, id: FlowId) {
        let Some(f) = self.flows[id].as_mut() else {
            return;
        };
        let dt = now - f.since;
        if dt <= 0.0 {
            return;
        }
        let moved = (f.rate * dt).min(f.remaining);
        f.remaining -= moved;
        let (from, rate) = (f.since, f.rate);
        f.since = now;
        if moved <= 0.0 {
            return;
        }
        for i in 0..self.flows[id].as_ref().map_or(0, |f| f.links.len()) {
            let l = self.flows[id].as_ref().map_or(0, |f| f.links[i]);
            self.carried[l] += moved;
            if let Some(c) = self.class[l] {
                spread(&mut self.series[c], from, now, rate, moved);
            }
        }
    }

    /// Max-min fair rates for `ids` by progressive filling, the other flows
    /// keeping theirs; returns the new completion times.
    fn refill(&mut self, now: f64, ids: &[FlowId]) -> Vec<Reschedule> {
        for &id in ids {
            self.settle(now, id);
        }
        let chosen: BTreeSet<FlowId> = ids.iter().copied().collect();
        // Residual capacity and unfrozen flow count of each touched link.
        let mut links: Vec<LinkId> = ids
            .iter()
            .filter_map(|&id| self.flows[id].as_ref())
            .flat_map(|f| f.links.iter().copied())
            .collect();
        links.sort_unstable();
        links.dedup();
        let mut residual = std::collections::HashMap::with_capacity(links.len());
        let mut count = std::collections::HashMap::with_capacity(links.len());
        for &l in &links {
            let fixed: f64 = self.on_link[l]
                .iter()
                .filter(|f| !chosen.contains(f))
                .map(|&f| self.rate(f))
                .sum();
            residual.insert(l, (self.caps[l] - fixed).max(0.0));
            count.insert(
                l,
                self.on_link[l]
                    .iter()
                    .filter(|f| chosen.contains(f))
                    .count(),
            );
        }
        // Min-heap of (fair share, link, count when pushed) with lazy
        // invalidation: an entry is stale when the link's count moved.
        let mut heap: BinaryHeap<Share> = links
            .iter()
            .filter(|l| count[l] > 0)
            .map(|&l| Share::new(residual[&l] / count[&l] as f64, l, count[&l]))
            .collect();
        let mut frozen: BTreeSet<FlowId> = BTreeSet::new();
        let mut out = Vec::with_capacity(ids.len());
        while let Some(s) = heap.pop() {
            if count[&s.link] != s.count || s.count == 0 {
                continue;
            }
            let share = s.share.max(0.0);
            let flows: Vec<FlowId> = self.on_link[s.link]
                .iter()
                .copied()
                .filter(|f| chosen.contains(f) && !frozen.contains(f))
                .collect();
            for f in flows {
                frozen.insert(f);
                let Some(flow) = self.flows[f].as_mut() else {
                    continue;
                };
                self.versions += 1;
                flow.rate = share;
                flow.version = self.versions;
                out.push(Reschedule {
                    id: f,
                    version: flow.version,
                    at: if share > 0.0 {
                        now + flow.remaining / share
                    } else {
                        f64::INFINITY
                    },
                });
                for &l in &flow.links {
                    if let (Some(r), Some(c)) = (residual.get_mut(&l), count.get_mut(&l)) {
                        *r = (*r - share).max(0.0);
                        *c -= 1;
                        if *c > 0 {
                            heap.push(Share::new(*r / *c as f64, l, *c));
                        }
                    }
                }
            }
        }
        out
    }
}

/// Adds `moved` bytes sent at `rate` over `[from, to]` to per-second bins.
fn spread(bins: &mut Vec<f64>, from: f64, to: f64, rate: f64, moved: f64) {
    // The flow may have finished inside the interval: it sent `moved` from
    // `from` on at `rate`.
    let end = if rate > 0.0 {
        (from + moved / rate).min(to)
    } else {
        to
    };
    let mut t = from;
    while t < end {
        let sec = t.floor();
        let upto = (sec + 1.0).min(end);
        let idx = sec as usize;
        if bins.len() <= idx {
            bins.resize(idx + 1, 0.0);
        }
        bins[idx] += rate * (upto - t);
        t = upto;
    }
}

#[derive(Debug, Clone, Copy)]
struct Share {
    share: f64,
    link: LinkId,
    count: usize,
}

impl Share {
    fn new(share: f64, link: LinkId, count: usize) -> Self {
        Share { share, link, count }
    }
}

impl PartialEq for Share {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Share {}
impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Share {
    // Reversed: BinaryHeap is a max-heap, the smallest share goes first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .share
            .total_cmp(&self.share)
            .then(other.link.cmp(&self.link))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the net until every flow ends; returns each flow's end time.
    fn drain(net: &mut Net, mut pending: Vec<Reschedule>) -> Vec<(FlowId, f64)> {
        let mut ends = Vec::new();
        loop {
            pending.retain(|r| net.is_current(r.id, r.version));
            let Some(next) = pending.iter().copied().min_by(|a, b| a.at.total_cmp(&b.at)) else {
                return ends;
            };
            assert!(next.at.is_finite(), "a flow stalled");
            let (left, more) = net.stop(next.at, next.id);
            assert!(left < 1e-6, "ended with {left} bytes left");
            ends.push((next.id, next.at));
            pending.extend(more);
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.max(1.0)
    }

    #[test]
    fn one_flow_over_one_link_takes_size_over_cap() {
        for fairness in [Fairness::Exact, Fairness::Local] {
            let mut net = Net::new(fairness, 1);
            let l = net.add_link(1000.0, Some(0));
            let (_, r) = net.start(2.0, &[l], 5000.0);
            let ends = drain(&mut net, r);
            assert!(close(ends[0].1, 7.0), "{ends:?}");
            assert!(close(net.carried(l), 5000.0));
            // The per-second series holds the same bytes, 1000 per second.
            assert_eq!(net.series(0).len(), 7);
            assert!(close(net.series(0)[3], 1000.0));
            assert!(close(net.series(0).iter().sum::<f64>(), 5000.0));
        }
    }

    #[test]
    fn two_flows_share_a_link_fairly_and_the_survivor_speeds_up() {
        for fairness in [Fairness::Exact, Fairness::Local] {
            let mut net = Net::new(fairness, 0);
            let l = net.add_link(100.0, None);
            let (a, mut r) = net.start(0.0, &[l], 100.0);
            let (b, r2) = net.start(0.0, &[l], 300.0);
            r.extend(r2);
            assert!(close(net.rate(a), 50.0) && close(net.rate(b), 50.0));
            // a ends at 2 s (100 at 50/s); b then has 200 left at 100/s.
            let ends = drain(&mut net, r);
            assert_eq!(ends.iter().map(|e| e.0).collect::<Vec<_>>(), vec![a, b]);
            assert!(close(ends[0].1, 2.0) && close(ends[1].1, 4.0), "{ends:?}");
        }
    }

    #[test]
    fn a_cross_zone_cap_binds_the_flows_that_cross_it() {
        for fairness in [Fairness::Exact, Fairness::Local] {
            let mut net = Net::new(fairness, 0);
            let up: Vec<LinkId> = (0..3).map(|_| net.add_link(100.0, None)).collect();
            let down: Vec<LinkId> = (0..3).map(|_| net.add_link(100.0, None)).collect();
            let xz = net.add_link(60.0, None);
            // Two flows cross zones (60 between them), one stays inside.
            let (a, _) = net.start(0.0, &[up[0], down[0], xz], 1e6);
            let (b, _) = net.start(0.0, &[up[1], down[1], xz], 1e6);
            let (c, _) = net.start(0.0, &[up[2], down[2]], 1e6);
            assert!(close(net.rate(a), 30.0) && close(net.rate(b), 30.0));
            assert!(close(net.rate(c), 100.0));
        }
    }

    #[test]
    fn max_min_gives_a_senders_spare_capacity_to_its_unhindered_flow() {
        // Sender 0 (100) sends to r1 (downlink 20) and r2 (downlink 1000):
        // max-min gives 20 and 80; an equal share would give 20 and 50.
        for fairness in [Fairness::Exact, Fairness::Local] {
            let mut net = Net::new(fairness, 0);
            let up = net.add_link(100.0, None);
            let d1 = net.add_link(20.0, None);
            let d2 = net.add_link(1000.0, None);
            let (a, _) = net.start(0.0, &[up, d1], 1e6);
            let (b, _) = net.start(0.0, &[up, d2], 1e6);
            assert!(close(net.rate(a), 20.0) && close(net.rate(b), 80.0));
            // Never more than a link's cap.
            assert!(net.rate(a) + net.rate(b) <= net.cap(up) + 1e-9);
        }
    }

    #[test]
    fn a_cancelled_flow_returns_its_remaining_bytes() {
        let mut net = Net::new(Fairness::Local, 0);
        let l = net.add_link(10.0, None);
        let (a, _) = net.start(0.0, &[l], 100.0);
        let (left, _) = net.stop(4.0, a);
        assert!(close(left, 60.0));
        assert!(close(net.carried(l), 40.0));
        assert_eq!(net.active_flows(), 0);
    }
}
