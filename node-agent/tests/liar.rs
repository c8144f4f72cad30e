//! An agent that claims every piece and serves corrupted bytes: honest
//! agents reject its pieces, ban it, fetch those pieces elsewhere and finish
//! with the right bytes; no honest agent ever passes a bad piece on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use peerfill_agent::agent::Phase;
use peerfill_agent::swarm::Fault;

const SIZE: usize = 64 << 20;
const PIECE: u32 = 1 << 20;
const ID: &str = "liar-64m";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liar_is_banned_and_honest_agents_complete() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = Arc::new(random_bytes(SIZE, 3));
    let want = blake3::hash(&data).to_hex().to_string();
    let origin = Origin::start(data.clone()).await;

    let nodes = nodes(tmp.path(), 5);
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    make_identities(&tmp.path().join("certs"), &names);
    let liar = names[4].clone();
    let readers = vec![names[0].clone()];
    let config = |i: usize| {
        let mut cfg = http_config(
            &nodes[i],
            &nodes,
            &tmp.path().join("certs"),
            ID,
            &origin.url(),
            &readers,
            Some(format!("blake3:{want}")),
        );
        cfg.contents[0].piece_size = PIECE;
        if i == 4 {
            cfg.fault = Some(Fault::CorruptUploads);
        }
        if i == 0 {
            // The reader releases pieces (and their hashes) over a few
            // seconds, so every honest agent deals with the liar repeatedly.
            cfg.limits.origin_bytes_per_sec = Some(16 << 20);
        }
        cfg
    };
    // The liar is up first, so every honest agent meets it.
    let liar_agent = Agent::spawn(&nodes[4], &config(4));
    assert!(
        wait_until(Duration::from_secs(30), || liar_agent
            .status(ID)
            .is_some_and(|s| s.phase == Phase::Fetching))
        .await,
        "liar did not start: {}",
        liar_agent.log_tail()
    );
    let mut agents: Vec<Agent> = (0..4)
        .map(|i| Agent::spawn(&nodes[i], &config(i)))
        .collect();
    agents.push(liar_agent);
    let honest = &agents[..4];
    let refs: Vec<&Agent> = honest.iter().collect();
    let statuses = assert_all_complete(&refs, ID, &want, Duration::from_secs(120)).await;
    for (a, st) in honest.iter().zip(&statuses) {
        // Only the liar's pieces were ever rejected: no honest agent
        // forwarded a corrupted piece.
        for from in st.rejected_from.keys() {
            assert_eq!(
                from, &liar,
                "{} rejected a piece from honest {from}",
                a.node.name
            );
        }
    }
    // The downloaders (not the origin reader, which never asks peers) met
    // the liar, rejected its pieces and banned it.
    for a in &honest[1..] {
        let st = a.status(ID).expect("status");
        assert!(
            st.rejected_from.get(&liar).is_some_and(|n| *n >= 1),
            "{}: {st:?}",
            a.node.name
        );
        assert!(
            st.banned_peers.contains(&liar),
            "{} did not ban the liar: {st:?}",
            a.node.name
        );
        assert!(
            !st.connected_peers.contains(&liar),
            "{}: {st:?}",
            a.node.name
        );
        let m = a.metrics();
        assert!(
            metric_value(&m, "peerfill_agent_peers_banned_total").is_some_and(|v| v >= 1.0),
            "{} metrics:\n{m}",
            a.node.name
        );
    }
}
