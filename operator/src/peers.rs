//! Who exchanges a content with whom (control-path.md "Peers"). Pure.
//!
//! Up to [`FULL_MESH_MAX_PEERS`] + 1 assigned nodes every node peers with
//! every other. Beyond, every node gets at most [`FULL_MESH_MAX_PEERS`]
//! peers, the hash authorities (origin readers, seeder) included, from two
//! kinds of symmetric links:
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
//! The hash authorities (origin readers, seeder) are the exception: beyond
//! the full mesh they additionally peer with every assigned node, so their
//! own lists — and NodeFills — grow with the cluster (at 5,000 nodes with 3
//! distributions the largest is ~900 KB: under etcd's 1.5 MiB, far over the
//! 64 KiB the other NodeFills stay under). A node verifies a piece against the hash
//! its range's authority announced, and the agents do not relay hash lists
//! yet; with bounded authority lists a node outside every authority's
//! neighbourhood — or an authority outside the others' — would never learn
//! the hashes of the other ranges and never complete. Relaying (hashes
//! signed by their authority, or verified against the pinned root) is what
//! lets the authorities become ordinary nodes.
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

/// Peers of every assigned node (targets and seeder) of one Distribution.
pub fn choose_peers(plan: &DistPlan, world: &World) -> BTreeMap<String, Vec<String>> {
    let nodes: Vec<(Option<String>, String)> = plan
        .assigned()
        .map(|n| (world.zone(n), n.clone()))
        .collect();
    let mut graph = peer_graph(&nodes);
    // Every node needs a session with the authority of each range (see the
    // module docs); in a full mesh it has one already.
    for authority in plan.authorities() {
        if !graph.contains_key(authority) {
            continue;
        }
        let others: Vec<String> = graph.keys().filter(|n| *n != authority).cloned().collect();
        for other in &others {
            if let Some(list) = graph.get_mut(other)
                && let Err(at) = list.binary_search_by(|p| p.as_str().cmp(authority))
            {
                list.insert(at, authority.to_string());
            }
        }
        graph.insert(authority.to_string(), others);
    }
    graph
}

/// The peer lists of `nodes` (zone, name): see the module docs. Every list
/// is sorted, never names its own node, holds at most
/// [`FULL_MESH_MAX_PEERS`] names, and the relation is symmetric.
pub fn peer_graph(nodes: &[(Option<String>, String)]) -> BTreeMap<String, Vec<String>> {
    let ring: Vec<(Option<String>, String)> = nodes
        .iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let len = ring.len();
    let mut links: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); len];
    let mut link = |a: usize, b: usize| {
        if a != b {
            links[a].insert(b);
            links[b].insert(a);
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
    ring.iter()
        .zip(links)
        .map(|((_, name), set)| {
            let mut peers: Vec<String> = set.into_iter().map(|i| ring[i].1.clone()).collect();
            peers.sort();
            (name.clone(), peers)
        })
        .collect()
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
    fn only_authorities_nodefills_grow_at_5000_nodes_with_3_distributions() {
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
        let dists = ["a", "b", "c"].map(|d| http_dist(d, &format!("uid-{d}"), 8));
        let mut w = world(dists.to_vec(), nodes, &up);
        // Realistic lengths: an IPv4 endpoint and a SHA-256 fingerprint.
        for fill in w.fills.values_mut() {
            let status = Arc::make_mut(fill).status.get_or_insert_default();
            status.endpoint = Some("198.18.123.234:7443".into());
            status.certificate_fingerprint = Some(format!("sha256:{}", "ab".repeat(32)));
        }
        let planned = plan(&w);
        let mut authorities = BTreeSet::new();
        for dp in planned.distributions.values() {
            for a in dp.authorities() {
                // Every other assigned node peers with each authority.
                assert_eq!(dp.peers[a].len(), dp.peers.len() - 1, "{a}");
                assert!(
                    dp.peers
                        .iter()
                        .all(|(n, p)| n == a || p.binary_search(&a.to_string()).is_ok())
                );
                authorities.insert(a.to_string());
            }
            // Everyone else: the ring and chords plus the authorities.
            let bound = FULL_MESH_MAX_PEERS + dp.authorities().len();
            assert!(
                dp.peers
                    .iter()
                    .all(|(n, p)| authorities.contains(n) || p.len() <= bound)
            );
        }
        let size = |name: &String| {
            let mut fill = NodeFill::new(name, planned.specs[name].clone());
            fill.status = w.fills[name].status.clone();
            serde_json::to_vec(&fill).map_or(usize::MAX, |v| v.len())
        };
        let largest_of = |authority: bool| {
            planned
                .specs
                .keys()
                .filter(|n| authorities.contains(*n) == authority)
                .map(|n| (size(n), n.clone()))
                .max()
                .unwrap_or_default()
        };
        let (largest, name) = largest_of(false);
        assert!(largest <= 64 * 1024, "{name}: {largest} bytes");
        // An authority's NodeFill names every assigned node, yet stays well
        // under etcd's 1.5 MiB object limit.
        let (largest, name) = largest_of(true);
        println!("largest authority NodeFill at 5,000 nodes: {name}, {largest} bytes");
        assert!(largest <= 1024 * 1024, "{name}: {largest} bytes");
    }
}
