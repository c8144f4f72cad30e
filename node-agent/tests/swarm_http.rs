//! Eight agents fill a 256 MiB random file from an HTTP origin: every agent
//! ends with the right bytes, and the origin serves about one copy.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use peerfill_agent::agent::Phase;

const SIZE: usize = 256 << 20;
const AGENTS: usize = 8;
const ID: &str = "blob-256m";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_agents_fill_from_one_origin_copy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = Arc::new(random_bytes(SIZE, 1));
    let want = blake3::hash(&data).to_hex().to_string();
    let origin = Origin::start(data.clone()).await;

    let nodes = nodes(tmp.path(), AGENTS);
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    make_identities(&tmp.path().join("certs"), &names);
    // Two origin readers, each reading half of the pieces.
    let readers = vec![names[0].clone(), names[1].clone()];
    let started = Instant::now();
    let agents: Vec<Agent> = nodes
        .iter()
        .map(|n| {
            let cfg = http_config(
                n,
                &nodes,
                &tmp.path().join("certs"),
                ID,
                &origin.url(),
                &readers,
                None,
            );
            Agent::spawn(n, &cfg)
        })
        .collect();

    let done = wait_until(
        Duration::from_secs(
            std::env::var("PEERFILL_TIMEOUT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(240),
        ),
        || {
            agents.iter().all(|a| {
                a.status(ID)
                    .is_some_and(|s| s.phase != Phase::Fetching && s.phase != Phase::Pending)
            })
        },
    )
    .await;
    let elapsed = started.elapsed();
    if !done {
        for a in &agents {
            eprintln!(
                "{}: {:?}",
                a.node.name,
                a.status(ID).map(|s| (
                    s.phase,
                    s.pieces_done,
                    s.bytes_from_origin,
                    s.bytes_from_peers,
                    s.connected_peers
                ))
            );
        }
        if std::env::var_os("PEERFILL_KEEP").is_some() {
            eprintln!("kept {}", tmp.keep().display());
            panic!("timed out");
        }
    }
    for a in &agents {
        let st = a.status(ID);
        assert!(
            done,
            "timed out; {} status {:?}\n{}",
            a.node.name,
            st,
            a.log_tail()
        );
        let st = st.expect("status");
        assert_eq!(
            st.phase,
            Phase::Complete,
            "{}: {:?}\n{}",
            a.node.name,
            st,
            a.log_tail()
        );
        assert_eq!(st.pieces_done, st.piece_count);
        assert_eq!(
            file_blake3(&a.dest(ID)).as_deref(),
            Some(want.as_str()),
            "{} has wrong bytes",
            a.node.name
        );
    }
    let served = origin.served();
    eprintln!(
        "8 agents x {} MiB in {:.1}s; origin served {:.2} copies",
        SIZE >> 20,
        elapsed.as_secs_f64(),
        served as f64 / SIZE as f64
    );
    assert!(
        served as f64 <= 1.1 * SIZE as f64,
        "origin served {served} bytes for a {SIZE}-byte content"
    );
    // Non-readers got everything from peers, readers only their own half
    // from the origin.
    for a in &agents[2..] {
        let st = a.status(ID).expect("status");
        assert_eq!(st.bytes_from_origin, 0, "{} read the origin", a.node.name);
        assert!(
            st.bytes_from_peers >= SIZE as u64,
            "{}: {:?}",
            a.node.name,
            st
        );
    }
    // Metrics agree with the status.
    let m = agents[2].metrics();
    let peer_bytes = metric_value(&m, "peerfill_agent_received_bytes_total{source=\"peer\"}");
    assert!(
        peer_bytes.is_some_and(|v| v >= SIZE as f64),
        "metrics:\n{m}"
    );
}
