//! Piece manifests (`source.http.manifestUrl`) between real agents: a new
//! version of a file with a few pieces changed costs the origin readers
//! only those pieces (the rest comes from the previous copy on disk), and
//! a manifest that does not describe the origin's bytes fails the readers
//! with `OriginManifestMismatch` instead of spreading.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use peerfill_agent::agent::{Phase, SourceConfig};
use peerfill_agent::content::Layout;
use peerfill_agent::origin::manifest::PieceManifest;

const PIECE: u32 = 1 << 20;
const SIZE: usize = 16 << 20;

/// `data` with the first bytes of pieces `pieces` rewritten.
fn edited(data: &[u8], pieces: &[usize], seed: u64) -> Vec<u8> {
    let mut out = data.to_vec();
    for &p in pieces {
        let at = p * PIECE as usize;
        out[at..at + 4096].copy_from_slice(&random_bytes(4096, seed + p as u64));
    }
    out
}

/// Runs content `id` (at one path for every version) on fresh agents and
/// waits until the first `settle` of them settle; returns the agents.
async fn run_version(
    settle: usize,
    tmp: &std::path::Path,
    nodes: &[Node],
    id: &str,
    url: &str,
    manifest_url: Option<String>,
) -> Vec<Agent> {
    let readers: Vec<String> = nodes[..2].iter().map(|n| n.name.clone()).collect();
    let agents: Vec<Agent> = nodes
        .iter()
        .map(|n| {
            let mut cfg = http_config(n, nodes, &tmp.join("certs"), id, url, &readers, None);
            let c = &mut cfg.contents[0];
            c.path = PathBuf::from("out/model.bin");
            c.piece_size = PIECE;
            if let SourceConfig::Http {
                manifest_url: m, ..
            } = &mut c.source
            {
                *m = manifest_url.clone();
            }
            Agent::spawn(n, &cfg)
        })
        .collect();
    wait_until(Duration::from_secs(120), || {
        agents[..settle].iter().all(|a| {
            a.status(id)
                .is_some_and(|s| matches!(s.phase, Phase::Complete | Phase::Failed))
        })
    })
    .await;
    agents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_with_a_manifest_reads_only_changed_pieces_from_the_origin() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let nodes = nodes(tmp.path(), 3);
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    make_identities(&tmp.path().join("certs"), &names);
    let layout = Layout::new(SIZE as u64, PIECE).expect("layout");

    let v1 = random_bytes(SIZE, 7);
    let o1 = Origin::start(Arc::new(v1.clone())).await;
    let agents = run_version(3, tmp.path(), &nodes, "v1", &o1.url(), None).await;
    for a in &agents {
        let st = a.status("v1").expect("status");
        assert_eq!(st.phase, Phase::Complete, "{st:?}\n{}", a.log_tail());
    }
    drop(agents);

    // Version 2: pieces 3 and 10 changed, with a manifest next to it.
    let v2 = edited(&v1, &[3, 10], 100);
    let o2 = Origin::start(Arc::new(v2.clone())).await;
    let m2 = serde_json::to_vec(&PieceManifest::of(&layout, &v2)).expect("json");
    let om = Origin::start(Arc::new(m2)).await;
    let agents = run_version(3, tmp.path(), &nodes, "v2", &o2.url(), Some(om.url())).await;
    let want = blake3::hash(&v2).to_hex().to_string();
    for a in &agents {
        let st = a.status("v2").expect("status");
        assert_eq!(st.phase, Phase::Complete, "{st:?}\n{}", a.log_tail());
        assert_eq!(
            file_blake3(&a.node.data_dir.join("out/model.bin")).as_deref(),
            Some(want.as_str())
        );
        println!(
            "{}: from origin {} B, from peers {} B, reused {} pieces",
            a.node.name, st.bytes_from_origin, st.bytes_from_peers, st.reused_pieces
        );
        assert!(
            st.bytes_from_origin + st.bytes_from_peers <= 2 * u64::from(PIECE),
            "{}: moved more than the two changed pieces: {st:?}",
            a.node.name
        );
    }
    println!("origin served {} B for the new version", o2.served());
    assert!(
        o2.served() <= 2 * u64::from(PIECE),
        "origin served {}",
        o2.served()
    );
    drop(agents);

    // Version 3: the manifest describes other bytes than the origin serves
    // for a changed piece: the reader of that piece fails, naming why.
    let v3 = edited(&v2, &[5], 200);
    let o3 = Origin::start(Arc::new(v3)).await;
    let lie = edited(&v2, &[5], 300);
    let om3 = Origin::start(Arc::new(
        serde_json::to_vec(&PieceManifest::of(&layout, &lie)).expect("json"),
    ))
    .await;
    let agents = run_version(1, tmp.path(), &nodes, "v3", &o3.url(), Some(om3.url())).await;
    let reader = &agents[0];
    let st = reader.status("v3").expect("status");
    assert_eq!(st.phase, Phase::Failed, "{st:?}\n{}", reader.log_tail());
    assert_eq!(
        st.reason.as_deref(),
        Some("OriginManifestMismatch"),
        "{st:?}"
    );
    // The previous version stays in place, whole.
    assert_eq!(
        file_blake3(&reader.node.data_dir.join("out/model.bin")).as_deref(),
        Some(want.as_str())
    );
}
