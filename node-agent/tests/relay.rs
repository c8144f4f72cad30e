//! Hash relay with real agents over QUIC: a node that is no peer of the
//! origin reader (the only hash authority) learns the piece hashes through
//! a relay, completes and verifies; a lying relay that tampers with the
//! signed batches it forwards is refused, counted and banned, and neither
//! corrupts nor stalls it.
//!
//! Peer lists (dial and allow):
//!
//! ```text
//! reader(node-0) -- relay(node-1) -- target(node-2)
//!        \                              /
//!         `------- liar(node-3) -------'
//! ```
//!
//! The target starts with the liar as its only peer that holds hashes, so
//! the tampered batches are all it sees until the honest relay starts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use peerfill_agent::agent::{AgentConfig, PeerConfig};
use peerfill_agent::swarm::Fault;

const SIZE: usize = 24 << 20;
const PIECE: u32 = 1 << 20;
const ID: &str = "relay-24m";

const READER: usize = 0;
const RELAY: usize = 1;
const TARGET: usize = 2;
const LIAR: usize = 3;

/// Who dials and may exchange the content with whom (symmetric).
const LINKS: [(usize, usize); 4] = [
    (READER, RELAY),
    (RELAY, TARGET),
    (READER, LIAR),
    (LIAR, TARGET),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_reach_a_node_through_relays_only_and_a_lying_relay_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = Arc::new(random_bytes(SIZE, 17));
    let want = blake3::hash(&data).to_hex().to_string();
    let origin = Origin::start(data.clone()).await;
    let nodes = nodes(tmp.path(), 4);
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    make_identities(&tmp.path().join("certs"), &names);
    let readers = vec![names[READER].clone()];
    let config = |i: usize| -> AgentConfig {
        // No digest: the root is not pinned, so signed batches are the
        // only way hashes travel.
        let mut cfg = http_config(
            &nodes[i],
            &nodes,
            &tmp.path().join("certs"),
            ID,
            &origin.url(),
            &readers,
            None,
        );
        let peers: Vec<usize> = LINKS
            .iter()
            .filter_map(|&(a, b)| match i {
                _ if a == i => Some(b),
                _ if b == i => Some(a),
                _ => None,
            })
            .collect();
        let c = &mut cfg.contents[0];
        c.piece_size = PIECE;
        c.peers = peers
            .iter()
            .map(|&p| PeerConfig {
                node: nodes[p].name.clone(),
                addr: nodes[p].addr,
            })
            .collect();
        c.allowed_peers = peers.iter().map(|&p| nodes[p].name.clone()).collect();
        if i == LIAR {
            cfg.fault = Some(Fault::TamperHashes);
        }
        if i == READER {
            // Pieces (and their signed hashes) appear over a couple of
            // seconds, so batches are relayed as they arrive, not only at
            // session start.
            cfg.limits.origin_bytes_per_sec = Some(8 << 20);
        }
        cfg
    };

    let reader = Agent::spawn(&nodes[READER], &config(READER));
    let liar = Agent::spawn(&nodes[LIAR], &config(LIAR));
    // The liar holds verified batches before the target meets it.
    assert!(
        wait_until(Duration::from_secs(60), || liar
            .status(ID)
            .is_some_and(|s| s.pieces_done > 0))
        .await,
        "the liar got nothing from the reader: {:?}\n{}",
        liar.status(ID),
        liar.log_tail()
    );
    let target = Agent::spawn(&nodes[TARGET], &config(TARGET));
    let signature_rejects = |a: &Agent| {
        metric_value(
            &a.metrics(),
            "peerfill_agent_pieces_rejected_total{reason=\"hash_batch_signature\"}",
        )
        .unwrap_or(0.0)
    };
    assert!(
        wait_until(Duration::from_secs(60), || signature_rejects(&target)
            >= 1.0
            && target
                .status(ID)
                .is_some_and(|s| s.banned_peers.contains(&names[LIAR])))
        .await,
        "the target did not refuse and ban the liar: {:?}\n{}",
        target.status(ID),
        target.log_tail()
    );
    let st = target.status(ID).expect("target status");
    assert_eq!(
        st.pieces_done, 0,
        "no hash was trusted from the liar: {st:?}"
    );

    // The honest relay comes up: the target completes through it.
    let relay = Agent::spawn(&nodes[RELAY], &config(RELAY));
    assert_all_complete(
        &[&reader, &relay, &target],
        ID,
        &want,
        Duration::from_secs(120),
    )
    .await;
    let st = target.status(ID).expect("target status");
    // Never connected to the authority, never read the origin.
    assert!(!st.connected_peers.contains(&names[READER]), "{st:?}");
    assert_eq!(st.bytes_from_origin, 0, "{st:?}");
    assert_eq!(st.bytes_from_peers, SIZE as u64, "{st:?}");
    // Only the liar was ever blamed.
    assert!(
        st.rejected_from.keys().all(|n| n == &names[LIAR])
            && st.rejected_from.contains_key(&names[LIAR]),
        "{st:?}"
    );
    for a in [&reader, &relay] {
        let st = a.status(ID).expect("status");
        assert!(
            st.rejected_from.keys().all(|n| n == &names[LIAR]),
            "{}: {st:?}",
            a.node.name
        );
    }
    assert!(signature_rejects(&target) >= 1.0);
}
