//! The fluid model that drives the simulated agents' progress: no bytes,
//! only rates over capped links. Pure: the caller advances time.
//!
//! Per distribution, in each step of `dt` seconds:
//! - each origin reader reads its own range from the origin at
//!   `min(down, origin / readers still reading)` (the origin cap is per
//!   distribution: each has its own origin);
//! - what the swarm can have is what has left the origin (or everything,
//!   for a node source, whose seeder holds it all);
//! - every node holding bytes uploads at its `up` cap, split over the
//!   distributions it takes part in; every node still missing bytes gets
//!   `min(its down cap share, total upload / nodes missing bytes)`, never
//!   more than what the swarm has.
//!
//! Peer lists are not modelled (the swarm is one pool): this drives the
//! control plane realistically (nodes finish spread over time, in the
//! order and at the pace capped links allow); the swarm's own behaviour at
//! scale is the simulator's subject, not this one's.

use std::collections::BTreeMap;

/// Link caps, bytes per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Caps {
    pub down: f64,
    pub up: f64,
    pub origin: f64,
}

/// A node's part in one distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Part {
    /// Reads `range` bytes from the origin, and the rest from peers.
    Reader { range: u64 },
    /// Holds everything from the start (node source).
    Seeder,
    /// Everything from peers.
    Peer,
}

#[derive(Clone, Debug, Default)]
struct NodeState {
    part: Option<Part>,
    bytes: f64,
    origin_bytes: f64,
    rate: f64,
}

#[derive(Clone, Debug, Default)]
struct Swarm {
    size: u64,
    nodes: BTreeMap<String, NodeState>,
}

/// Progress of one node in one distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    pub bytes: u64,
    pub from_origin: u64,
    pub rate: u64,
    pub complete: bool,
}

/// Every distribution's swarm.
#[derive(Clone, Debug)]
pub struct Fluid {
    caps: Caps,
    swarms: BTreeMap<String, Swarm>,
}

impl Fluid {
    pub fn new(caps: Caps) -> Self {
        Fluid {
            caps,
            swarms: BTreeMap::new(),
        }
    }

    /// `node` takes part in distribution `uid` of `size` bytes (again: no-op).
    pub fn join(&mut self, uid: &str, node: &str, size: u64, part: Part) {
        let swarm = self.swarms.entry(uid.to_string()).or_default();
        swarm.size = size;
        let state = swarm.nodes.entry(node.to_string()).or_default();
        if state.part.is_none() {
            state.part = Some(part);
            if part == Part::Seeder {
                state.bytes = size as f64;
            }
        }
    }

    /// Where `node` is in `uid`, if it joined.
    pub fn progress(&self, uid: &str, node: &str) -> Option<Progress> {
        let swarm = self.swarms.get(uid)?;
        let s = swarm.nodes.get(node)?;
        Some(Progress {
            bytes: (s.bytes as u64).min(swarm.size),
            from_origin: s.origin_bytes as u64,
            rate: s.rate as u64,
            complete: s.bytes >= swarm.size as f64,
        })
    }

    /// Advances every swarm by `dt` seconds.
    pub fn step(&mut self, dt: f64) {
        // Distributions each node takes part in, for its upload share.
        let mut active: BTreeMap<&str, f64> = BTreeMap::new();
        for swarm in self.swarms.values() {
            for name in swarm.nodes.keys() {
                *active.entry(name.as_str()).or_default() += 1.0;
            }
        }
        let share: BTreeMap<String, f64> = active
            .into_iter()
            .map(|(n, k)| (n.to_string(), k))
            .collect();
        let caps = self.caps;
        for swarm in self.swarms.values_mut() {
            step_swarm(swarm, caps, &share, dt);
        }
    }
}

fn step_swarm(swarm: &mut Swarm, caps: Caps, share: &BTreeMap<String, f64>, dt: f64) {
    let size = swarm.size as f64;
    let k = |n: &str| share.get(n).copied().unwrap_or(1.0).max(1.0);
    let reading = swarm
        .nodes
        .values()
        .filter(|s| matches!(s.part, Some(Part::Reader { range }) if s.origin_bytes < range as f64))
        .count();
    let before: BTreeMap<String, f64> = swarm
        .nodes
        .iter()
        .map(|(n, s)| (n.clone(), s.bytes))
        .collect();
    // Origin reads.
    for (name, s) in &mut swarm.nodes {
        if let Some(Part::Reader { range }) = s.part
            && reading > 0
        {
            let rate = (caps.down / k(name)).min(caps.origin / reading as f64);
            let read = (rate * dt).min(range as f64 - s.origin_bytes).max(0.0);
            s.origin_bytes += read;
            s.bytes = (s.bytes + read).min(size);
        }
    }
    let available: f64 = if swarm.nodes.values().any(|s| s.part == Some(Part::Seeder)) {
        size
    } else {
        swarm
            .nodes
            .values()
            .map(|s| s.origin_bytes)
            .sum::<f64>()
            .min(size)
    };
    let upload: f64 = swarm
        .nodes
        .iter()
        .filter(|(_, s)| s.bytes > 0.0)
        .map(|(n, _)| caps.up / k(n))
        .sum();
    let missing = swarm
        .nodes
        .values()
        .filter(|s| s.bytes < available && s.bytes < size)
        .count();
    if missing > 0 {
        let fair = upload / missing as f64;
        for (name, s) in &mut swarm.nodes {
            if s.bytes < available && s.bytes < size {
                let rate = (caps.down / k(name)).min(fair);
                s.bytes = (s.bytes + rate * dt).min(available);
            }
        }
    }
    for (name, s) in &mut swarm.nodes {
        s.rate = (s.bytes - before.get(name).copied().unwrap_or(0.0)) / dt.max(1e-9);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    fn run(f: &mut Fluid, uid: &str, nodes: &[&str], max_steps: usize) -> usize {
        for step in 1..=max_steps {
            f.step(1.0);
            if nodes
                .iter()
                .all(|n| f.progress(uid, n).is_some_and(|p| p.complete))
            {
                return step;
            }
        }
        max_steps + 1
    }

    #[test]
    fn a_seeded_swarm_finishes_near_the_one_copy_bound() {
        let caps = Caps {
            down: 10.0 * MB,
            up: 10.0 * MB,
            origin: 10.0 * MB,
        };
        let mut f = Fluid::new(caps);
        let names: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
        f.join("d", "seed", 100_000_000, Part::Seeder);
        for n in &names {
            f.join("d", n, 100_000_000, Part::Peer);
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        // One copy at the down cap takes 10 s; the seeder alone would need
        // 20 copies / 10 MB/s = 200 s.
        let steps = run(&mut f, "d", &refs, 1000);
        assert!((10..=40).contains(&steps), "{steps} s");
        let p = f.progress("d", "n0").unwrap();
        assert_eq!((p.bytes, p.from_origin), (100_000_000, 0));
    }

    #[test]
    fn readers_split_the_origin_and_nobody_gets_ahead_of_it() {
        let caps = Caps {
            down: 100.0 * MB,
            up: 100.0 * MB,
            origin: 2.0 * MB,
        };
        let mut f = Fluid::new(caps);
        f.join("d", "r1", 10_000_000, Part::Reader { range: 5_000_000 });
        f.join("d", "r2", 10_000_000, Part::Reader { range: 5_000_000 });
        f.join("d", "p", 10_000_000, Part::Peer);
        f.step(1.0);
        // 1 MB/s each from the origin; the peer cannot have more than the
        // 2 MB that left it.
        let r1 = f.progress("d", "r1").unwrap();
        assert_eq!(r1.from_origin, 1_000_000);
        assert!(f.progress("d", "p").unwrap().bytes <= 2_000_000);
        let steps = run(&mut f, "d", &["r1", "r2", "p"], 100);
        // 10 MB at 2 MB/s from the origin: about 5 s, whatever the peers.
        assert!((4..=7).contains(&steps), "{steps} s");
        let total: u64 = ["r1", "r2", "p"]
            .iter()
            .map(|n| f.progress("d", n).unwrap().from_origin)
            .sum();
        assert_eq!(total, 10_000_000, "the origin served one copy");
    }

    #[test]
    fn an_unknown_node_or_distribution_has_no_progress() {
        let f = Fluid::new(Caps {
            down: 1.0,
            up: 1.0,
            origin: 1.0,
        });
        assert_eq!(f.progress("d", "n"), None);
    }
}
