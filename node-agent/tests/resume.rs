//! An agent killed half way through resumes from its persisted bitmap: it
//! keeps every piece it had reported, fetches only the rest, and ends with
//! the right bytes (checked against a `sha256:` digest by the agent itself
//! and by the test).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use peerfill_agent::agent::Phase;
use sha2::Digest as _;

const SIZE: usize = 128 << 20;
const PIECE: u32 = 1 << 20;
const ID: &str = "resume-128m";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_resumes_and_completes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = Arc::new(random_bytes(SIZE, 2));
    let sha = hex::encode(sha2::Sha256::digest(&data[..]));
    let want = blake3::hash(&data).to_hex().to_string();
    let origin = Origin::start(data.clone()).await;

    let nodes = nodes(tmp.path(), 4);
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    make_identities(&tmp.path().join("certs"), &names);
    let readers = vec![names[0].clone()];
    let mut agents: Vec<Agent> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut cfg = http_config(
                n,
                &nodes,
                &tmp.path().join("certs"),
                ID,
                &origin.url(),
                &readers,
                Some(format!("sha256:{sha}")),
            );
            cfg.contents[0].piece_size = PIECE;
            if i == 3 {
                // The victim downloads slowly so the kill lands mid-transfer.
                cfg.limits.download_bytes_per_sec = Some(24 << 20);
            }
            Agent::spawn(n, &cfg)
        })
        .collect();

    // Kill the victim once it holds about half of the pieces.
    let half = wait_until(Duration::from_secs(60), || {
        agents[3]
            .status(ID)
            .is_some_and(|s| s.piece_count > 0 && s.pieces_done >= s.piece_count / 2)
    })
    .await;
    assert!(
        half,
        "victim never got half way: {:?}\n{}",
        agents[3].status(ID),
        agents[3].log_tail()
    );
    let before = agents[3].status(ID).expect("status before kill");
    agents[3].kill();
    assert!(
        before.phase == Phase::Fetching,
        "killed too late: {before:?}"
    );
    assert!(before.pieces_done < before.piece_count);

    agents[3].start();
    let after = assert_all_complete(&[&agents[3]], ID, &want, Duration::from_secs(120))
        .await
        .remove(0);
    // Of what the agent had reported as held before the kill, at most the
    // unflushed durability batch (`store::FLUSH_BYTES`) plus the pieces in
    // flight was lost (and fetched and verified again).
    let tuning = peerfill_agent::agent::Tuning::default();
    let may_lose =
        peerfill_agent::store::FLUSH_BYTES / u64::from(PIECE) + tuning.max_inflight as u64;
    assert!(
        after.resumed_pieces + may_lose >= u64::from(before.pieces_done),
        "resumed {} pieces but had {} before the kill",
        after.resumed_pieces,
        before.pieces_done
    );
    // The second run fetched exactly the pieces it did not have on disk
    // (plus at most a few endgame duplicates, counted as wasted).
    let fetched = after.bytes_from_peers + after.bytes_from_origin;
    let missing = (u64::from(after.piece_count) - after.resumed_pieces) * u64::from(PIECE);
    assert_eq!(fetched, missing, "{after:?}");
    assert!(
        after.bytes_wasted <= tuning.max_inflight as u64 * u64::from(PIECE),
        "{after:?}"
    );
    eprintln!(
        "killed at {}/{} pieces, resumed with {}, fetched {} again",
        before.pieces_done,
        before.piece_count,
        after.resumed_pieces,
        u64::from(after.piece_count) - after.resumed_pieces
    );
    // Every other agent completed too.
    for a in &agents[..3] {
        assert!(
            wait_until(Duration::from_secs(30), || a
                .status(ID)
                .is_some_and(|s| s.phase == Phase::Complete))
            .await,
            "{}: {:?}",
            a.node.name,
            a.status(ID)
        );
        assert_eq!(file_blake3(&a.dest(ID)).as_deref(), Some(want.as_str()));
    }
    drop(agents);
}
