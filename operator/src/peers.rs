//! Who exchanges a content with whom (control-path.md "Peers"). Pure.
//!
//! Up to [`FULL_MESH_MAX_PEERS`] + 1 assigned nodes every node peers with
//! every other. Beyond, every node — the hash authorities (origin readers,
//! seeder) like any other — gets at most [`FULL_MESH_MAX_PEERS`] peers,
//! from two kinds of symmetric links:
//!
//! - a **ring** of all assigned nodes ordered by (zone, name), each node
//!   linked to its [`RING_NEIGHBOURS_PER_SIDE`] neighbours on each side:
//!   locality (a node's ring neighbours are in its own zone, except near a
//!   zone boundary, which is also where zones meet);
//! - [`CHORD_RINGS`] **chord rings** per zone, each ordering the zone's
//!   nodes by a hash of (ring index, node name) and linking each node to its
//!   two neighbours in that order: random long links inside the zone, so
//!   the graph is an expander and a piece crosses a zone of thousands of
//!   nodes in a handful of hops (the plain ring alone needs
//!   zone size / 48 hops).
//!
//! No node needs a link to an authority: the agents relay the piece hashes
//! an authority signed with its node key, and each node verifies them
//! against the certificate fingerprint the operator publishes for that
//! authority (`spec.peers` names the authorities of every assignment even
//! when they are not peers; see `plan`), so hashes spread hop by hop like
//! pieces. Every NodeFill therefore grows with the peer count, not the
//! cluster (under 64 KiB at 5,000 nodes with 3 distributions).
//!
//! The links depend on the node names and zones only, not on the
//! Distribution: distributions over the same nodes choose the same peers,
//! so a node's `spec.peers` (one endpoint per distinct peer) does not grow
//! with the number of distributions.

use std::collections::{BTreeMap, BTreeSet};

use crate::plan::{DistPlan, World};

/// Nodes a node exchanges a content with before the swarm switches from a
/// full mesh to the bounded graph; also the bound of every node's list.
pub const FULL_MESH_MAX_PEERS: usize = 64;
/// Ring neighbours on each side in a large swarm.
pub const RING_NEIGHBOURS_PER_SIDE: usize = 24;
/// Random chord rings per zone (two peers each), filling the list up to
/// `2 * (RING_NEIGHBOURS_PER_SIDE + CHORD_RINGS)` = [`FULL_MESH_MAX_PEERS`].
pub const CHORD_RINGS: usize = 8;

const _: () = assert!(2 * (RING_NEIGHBOURS_PER_SIDE + CHORD_RINGS) == FULL_MESH_MAX_PEERS);

/// Peers of every assigned node (targets and seeder) of one Distribution,
/// as a map (the simulator and tests; the operator keeps a [`PeerGraph`]).
pub fn choose_peers(plan: &DistPlan, world: &World) -> BTreeMap<String, Vec<String>> {
    choose_peer_graph(plan, world).to_map()
}

/// A node as the peer choice sees it: (zone, name).
pub type PeerInput = (Option<String>, String);

/// The assigned nodes of `plan` with their zones: what the peer choice
/// depends on (sorted, without duplicates).
pub fn peer_inputs(plan: &DistPlan, world: &World) -> Vec<PeerInput> {
    plan.assigned()
        .map(|n| (world.zone(n), n.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// [`choose_peers`] as a [`PeerGraph`].
pub fn choose_peer_graph(plan: &DistPlan, world: &World) -> PeerGraph {
    PeerGraph::build(&peer_inputs(plan, world))
}

/// The peer lists of `nodes` (zone, name) as a map: see [`PeerGraph`].
pub fn peer_graph(nodes: &[(Option<String>, String)]) -> BTreeMap<String, Vec<String>> {
    PeerGraph::build(nodes).to_map()
}

/// The peer lists of a set of nodes (see the module docs), held compactly:
/// every name once, each list as indices. At 5,000 nodes the lists are
/// 320,000 entries; as strings (one allocation each) they took ~20 MiB
/// per Distribution in the operator, as indices 1.3 MiB. Every list is
/// sorted by name, never names its own node, holds at most
/// [`FULL_MESH_MAX_PEERS`] names, and the relation is symmetric.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerGraph {
    /// Sorted.
    names: Vec<String>,
    /// By index into `names`: the peers' indices, ascending (so by name).
    lists: Vec<Vec<u32>>,
}

impl PeerGraph {
    /// The graph of `nodes` (zone, name); order and duplicates of the
    /// input do not matter.
    pub fn build(nodes: &[(Option<String>, String)]) -> Self {
        let ring: Vec<&(Option<String>, String)> =
            nodes.iter().collect::<BTreeSet<_>>().into_iter().collect();
        let len = ring.len();
        let mut names: Vec<String> = ring.iter().map(|n| n.1.clone()).collect();
        names.sort();
        names.dedup();
        // Ring position -> index of the name (a node listed in two zones
        // is one node).
        let index: Vec<u32> = ring
            .iter()
            .map(|n| names.binary_search(&n.1).unwrap_or_default() as u32)
            .collect();
        let mut lists: Vec<Vec<u32>> = vec![Vec::new(); names.len()];
        let mut link = |a: usize, b: usize| {
            let (a, b) = (index[a], index[b]);
            if a != b {
                lists[a as usize].push(b);
                lists[b as usize].push(a);
            }
        };
        if len <= FULL_MESH_MAX_PEERS + 1 {
            for a in 0..len {
                for b in a + 1..len {
                    link(a, b);
                }
            }
        } else {
            // len > 65: the forward links 1..=24 of all nodes never overlap.
            for i in 0..len {
                for d in 1..=RING_NEIGHBOURS_PER_SIDE {
                    link(i, (i + d) % len);
                }
            }
            // The ring is sorted by zone: each zone is one contiguous run.
            let mut lo = 0;
            while lo < len {
                let hi = lo + ring[lo..].iter().take_while(|n| n.0 == ring[lo].0).count();
                if hi - lo >= 3 {
                    for k in 0..CHORD_RINGS {
                        let mut order: Vec<usize> = (lo..hi).collect();
                        order.sort_by_cached_key(|&i| {
                            *blake3::hash(format!("{k}/{}", ring[i].1).as_bytes()).as_bytes()
                        });
                        for w in 0..order.len() {
                            link(order[w], order[(w + 1) % order.len()]);
                        }
                    }
                }
                lo = hi;
            }
        }
        for l in &mut lists {
            l.sort_unstable();
            l.dedup();
            l.shrink_to_fit();
        }
        PeerGraph { names, lists }
    }

    /// The peers of `node`, sorted (empty when it is not in the graph).
    pub fn peers_of(&self, node: &str) -> Vec<String> {
        self.names
            .binary_search_by(|n| n.as_str().cmp(node))
            .ok()
            .and_then(|i| self.lists.get(i))
            .map(|l| l.iter().map(|&j| self.names[j as usize].clone()).collect())
            .unwrap_or_default()
    }

    /// Every node with its peers.
    pub fn to_map(&self) -> BTreeMap<String, Vec<String>> {
        self.names
            .iter()
            .map(|n| (n.clone(), self.peers_of(n)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn zoned(n: usize, zones: usize) -> Vec<(Option<String>, String)> {
        (0..n)
            .map(|i| (Some(format!("z{}", i % zones)), format!("n{i:05}")))
            .collect()
    }

    /// Hops from `from` to the farthest node (panics when one is unreachable).
    fn eccentricity(graph: &BTreeMap<String, Vec<String>>, from: &str) -> usize {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::from([(from, 0)]);
        let mut queue = VecDeque::from([from]);
        while let Some(n) = queue.pop_front() {
            let d = seen[n];
            for p in &graph[n] {
                if !seen.contains_key(p.as_str()) {
                    seen.insert(p, d + 1);
                    queue.push_back(p);
                }
            }
        }
        assert_eq!(seen.len(), graph.len(), "not connected");
        seen.values().copied().max().unwrap_or(0)
    }

    fn check_bounded_symmetric(graph: &BTreeMap<String, Vec<String>>) {
        for (node, peers) in graph {
            assert!(!peers.contains(node), "{node} lists itself");
            assert!(
                peers.len() <= FULL_MESH_MAX_PEERS,
                "{node}: {}",
                peers.len()
            );
            for p in peers {
                assert!(graph[p].contains(node), "{node} -> {p} is not symmetric");
            }
        }
    }

    #[test]
    fn small_swarms_are_a_full_mesh() {
        let g = peer_graph(&zoned(65, 3));
        assert!(g.values().all(|p| p.len() == 64));
    }

    #[test]
    fn large_swarms_are_bounded_symmetric_local_and_shallow() {
        let g = peer_graph(&zoned(300, 3));
        check_bounded_symmetric(&g);
        // Every node, whatever its role, has the same kind of list.
        assert!(g.values().all(|p| p.len() >= 2 * RING_NEIGHBOURS_PER_SIDE));
        // Same zone first: a node in the middle of its zone's run has only
        // same-zone peers.
        let zone_of = |n: &str| n[1..].parse::<usize>().map(|i| i % 3).ok();
        let mid = "n00150"; // z0, the 50th of 100 in its run
        assert!(g[mid].iter().all(|p| zone_of(p) == zone_of(mid)));
        // Chords keep it shallow: a zone of 100 would need 3 ring hops.
        assert!(eccentricity(&g, mid) <= 4);
    }

    #[test]
    fn five_thousand_nodes_are_a_few_hops_apart() {
        let g = peer_graph(&zoned(5_000, 3));
        check_bounded_symmetric(&g);
        // The ring alone would need ~1,667 / 48 = 35 hops inside a zone.
        for from in ["n00000", "n02500", "n04999"] {
            let e = eccentricity(&g, from);
            assert!(e <= 8, "{from}: {e} hops");
        }
    }

    #[test]
    fn the_choice_does_not_depend_on_input_order_or_duplicates() {
        let nodes = zoned(200, 2);
        let mut shuffled: Vec<_> = nodes.iter().rev().cloned().collect();
        shuffled.extend(nodes.iter().take(10).cloned());
        assert_eq!(peer_graph(&nodes), peer_graph(&shuffled));
    }

    #[test]
    fn every_nodefill_stays_under_64_kib_at_5000_nodes_with_3_distributions() {
        use crate::plan::tests::{http_dist, node, world};
        use crate::plan::{ZONE_LABEL, plan};
        use peerfill_crds::NodeFill;
        use std::sync::Arc;

        let names: Vec<String> = (0..5_000).map(|i| format!("node-{i:05}")).collect();
        let zones = ["zone-a", "zone-b", "zone-c"];
        let nodes = names
            .iter()
            .enumerate()
            .map(|(i, n)| node(n, &[(ZONE_LABEL, zones[i % 3])]))
            .collect();
        let up: Vec<&str> = names.iter().map(String::as_str).collect();
        // Each its own target path (one owner per path).
        let mut dists = ["a", "b", "c"].map(|d| {
            let mut dist = (*http_dist(d, &format!("uid-{d}"), 8)).clone();
            dist.spec.target.path = format!("models/{d}.bin");
            Arc::new(dist)
        });
        // One from a node source: its seeder is the only authority.
        let mut seeded = (*dists[2]).clone();
        seeded.spec.source = peerfill_crds::Source {
            http: None,
            node: Some(peerfill_crds::NodeSource {
                node_name: "node-00007".into(),
                path: "build/out.tar".into(),
            }),
        };
        seeded.spec.target.path = "build/in.tar".into();
        dists[2] = Arc::new(seeded);
        let mut w = world(dists.to_vec(), nodes, &up);
        // Realistic lengths: an IPv4 endpoint and a SHA-256 fingerprint.
        for fill in w.fills.values_mut() {
            let status = Arc::make_mut(fill).status.get_or_insert_default();
            status.endpoint = Some("198.18.123.234:7443".into());
            status.certificate_fingerprint = Some(format!("sha256:{}", "ab".repeat(32)));
        }
        let planned = plan(&w);
        assert_eq!(planned.distributions.len(), 3);
        let mut authorities = BTreeSet::new();
        for dp in planned.distributions.values() {
            assert!(!dp.authorities().is_empty());
            check_bounded_symmetric(&dp.peers.to_map());
            for a in dp.authorities() {
                authorities.insert(a.to_string());
            }
        }
        assert!(authorities.len() >= 8, "{authorities:?}");
        // Every node's spec.peers carries every authority of its
        // assignments (with its fingerprint), peer or not.
        for (name, spec) in &planned.specs {
            for a in &spec.distributions {
                let readers = a.origin_readers.iter().map(|r| &r.node);
                for auth in readers.chain(a.source.node.iter().map(|s| &s.node_name)) {
                    assert!(
                        auth == name
                            || spec
                                .peers
                                .iter()
                                .any(|p| &p.node == auth && p.certificate_fingerprint.is_some()),
                        "{name} lacks authority {auth}"
                    );
                }
            }
        }
        let size = |name: &String| {
            let mut fill = NodeFill::new(name, planned.specs[name].clone());
            fill.status = w.fills[name].status.clone();
            serde_json::to_vec(&fill).map_or(usize::MAX, |v| v.len())
        };
        let (largest, name) = planned
            .specs
            .keys()
            .map(|n| (size(n), n.clone()))
            .max()
            .unwrap_or_default();
        println!("largest NodeFill at 5,000 nodes x 3 distributions: {name}, {largest} bytes");
        assert!(largest <= 64 * 1024, "{name}: {largest} bytes");
        let (largest, name) = authorities
            .iter()
            .map(|n| (size(n), n.clone()))
            .max()
            .unwrap_or_default();
        println!("largest authority NodeFill: {name}, {largest} bytes");
        assert!(largest <= 64 * 1024, "{name}: {largest} bytes");
    }
}
