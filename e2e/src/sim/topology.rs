//! Who reads the origin and who peers with whom: the operator's own
//! decisions (`peerfill_operator::plan::choose_readers`, `reader_ranges`,
//! `peerfill_operator::peers::choose_peers`), computed for simulated nodes
//! named and zoned like a cluster's.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use peerfill_operator::peers::{choose_peers, peer_graph};
use peerfill_operator::plan::{DistPlan, World, ZONE_LABEL, choose_readers, reader_ranges};

use super::SimError;

/// Which peer lists the nodes get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PeerChoice {
    /// `choose_peers` as the operator runs it today: the bounded ring and
    /// chords plus every hash authority (origin reader) peered with every
    /// node.
    Operator,
    /// `peer_graph` alone: the bounded lists every node gets once hash
    /// lists are relayed (issue 13 item 1) and authorities are ordinary
    /// nodes.
    Bounded,
}

/// The swarm's shape: node names and zones, readers with their piece
/// ranges, and every node's peers as indices.
#[derive(Debug, Clone)]
pub struct Topology {
    pub names: Vec<String>,
    /// Zone index of each node.
    pub zone: Vec<usize>,
    /// `(node, first piece, end piece)` in reader order.
    pub readers: Vec<(usize, u32, u32)>,
    /// Peers of each node, as node indices (sorted by name).
    pub peers: Vec<Vec<usize>>,
}

/// The operator's choice for `nodes` nodes in `zones` zones (node `i` in
/// zone `i % zones`, as a cluster spread evenly over zones), a content of
/// `pieces` pieces read by at most `max_readers` nodes.
pub fn build(
    nodes: usize,
    zones: usize,
    pieces: u32,
    piece_size: u64,
    max_readers: usize,
    choice: PeerChoice,
) -> Result<Topology, SimError> {
    let zones = zones.max(1);
    let names: Vec<String> = (0..nodes).map(|i| format!("node-{i:05}")).collect();
    let zone: Vec<usize> = (0..nodes).map(|i| i % zones).collect();
    let zone_name = |z: usize| format!("zone-{}", (b'a' + (z % 26) as u8) as char);
    let k8s_nodes: Vec<Arc<Node>> = names
        .iter()
        .zip(&zone)
        .map(|(n, z)| {
            Arc::new(Node {
                metadata: ObjectMeta {
                    name: Some(n.clone()),
                    labels: Some([(ZONE_LABEL.to_string(), zone_name(*z))].into()),
                    ..ObjectMeta::default()
                },
                spec: Some(NodeSpec::default()),
                status: None,
            })
        })
        .collect();
    let world = World::new(Vec::new(), k8s_nodes, Vec::new(), Timestamp::UNIX_EPOCH);
    let mut targets = names.clone();
    targets.sort();
    let uid = "sim-uid";
    let size = u64::from(pieces) * piece_size;
    let readers = reader_ranges(
        choose_readers(uid, &targets, &[], max_readers, &|n| world.zone(n)),
        Some(size),
        piece_size,
    );
    let plan = DistPlan {
        uid: uid.to_string(),
        targets: targets.clone(),
        readers: readers.clone(),
        size: Some(size),
        seeder_up: true,
        ..DistPlan::default()
    };
    let lists: BTreeMap<String, Vec<String>> = match choice {
        PeerChoice::Operator => choose_peers(&plan, &world),
        PeerChoice::Bounded => {
            let zoned: Vec<(Option<String>, String)> =
                targets.iter().map(|n| (world.zone(n), n.clone())).collect();
            peer_graph(&zoned)
        }
    };
    let index: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let find = |n: &str| {
        index
            .get(n)
            .copied()
            .ok_or_else(|| SimError::Topology(format!("unknown node {n}")))
    };
    let mut peers = vec![Vec::new(); nodes];
    for (node, list) in &lists {
        let i = find(node)?;
        peers[i] = list.iter().map(|p| find(p)).collect::<Result<_, _>>()?;
    }
    let readers = readers
        .iter()
        .map(|r| {
            let to_u32 = |v: u64| u32::try_from(v).map_err(|_| SimError::Topology("range".into()));
            Ok((find(&r.node)?, to_u32(r.start)?, to_u32(r.end)?))
        })
        .collect::<Result<Vec<_>, SimError>>()?;
    Ok(Topology {
        names,
        zone,
        readers,
        peers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_lists_are_symmetric_and_readers_cover_every_piece() {
        for (n, choice) in [
            (16, PeerChoice::Operator),
            (300, PeerChoice::Operator),
            (300, PeerChoice::Bounded),
        ] {
            let t = build(n, 3, 1024, 1 << 20, 4, choice).expect("topology");
            for (i, list) in t.peers.iter().enumerate() {
                assert!(!list.contains(&i));
                for &p in list {
                    assert!(t.peers[p].contains(&i), "{i} -> {p} not symmetric");
                }
            }
            let mut covered: Vec<(u32, u32)> = t.readers.iter().map(|r| (r.1, r.2)).collect();
            covered.sort();
            assert_eq!(covered.first().map(|r| r.0), Some(0));
            assert_eq!(covered.last().map(|r| r.1), Some(1024));
            assert!(covered.windows(2).all(|w| w[0].1 == w[1].0));
        }
        // With hash relay the operator bounds the authorities' lists too:
        // its choice is the bounded graph.
        let op = build(300, 3, 1024, 1 << 20, 4, PeerChoice::Operator).expect("topology");
        let bounded = build(300, 3, 1024, 1 << 20, 4, PeerChoice::Bounded).expect("topology");
        assert!(op.peers.iter().all(|p| p.len() <= 64));
        assert!(bounded.peers.iter().all(|p| p.len() <= 64));
        assert_eq!(op.peers, bounded.peers);
    }
}
