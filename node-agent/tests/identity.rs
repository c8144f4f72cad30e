//! Correctness under change and faults, with engines in this process (real
//! QUIC on 127.0.0.0/8, a real HTTP origin on loopback): nothing on disk is
//! trusted by its size, Complete only against the pinned identity, an origin
//! that changes is caught, local faults recover by themselves, and a run
//! replaced under live sessions gets its peers back.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use peerfill_agent::agent::{
    AgentConfig, ContentConfig, Engine, EngineOptions, IdentityFiles, Phase,
};
use peerfill_agent::content::Digest;
use peerfill_agent::tls::NodeIdentity;

const PIECE: u32 = 64 << 10;

/// A temporary directory (kept while the test runs), `len` random bytes
/// (from `seed`), an origin serving them, `n` nodes and an identity for
/// each under the returned certificates directory.
type Fixture = (tempfile::TempDir, Arc<Vec<u8>>, Origin, Vec<Node>, PathBuf);

async fn fixture(len: usize, seed: u64, n: usize) -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = Arc::new(random_bytes(len, seed));
    let origin = Origin::start(data.clone()).await;
    let (nodes, certs) = nodes_with_identities(tmp.path(), n);
    (tmp, data, origin, nodes, certs)
}

/// Completes only against a pinned identity; retries a transient origin.
fn pinned() -> EngineOptions {
    EngineOptions {
        require_pin: true,
        retry_transient_origin: true,
        ..EngineOptions::default()
    }
}

fn start_engine(node: &Node, certs: &Path, opts: EngineOptions) -> Engine {
    start_engine_with(node, certs, opts, |_| {})
}

/// `start_engine` with the agent's configuration adjusted by `tune`.
fn start_engine_with(
    node: &Node,
    certs: &Path,
    opts: EngineOptions,
    tune: impl FnOnce(&mut AgentConfig),
) -> Engine {
    let dir = certs.join(&node.name);
    let files = IdentityFiles::in_dir(&dir);
    let mut cfg = AgentConfig::new(
        node.name.clone(),
        node.addr,
        node.data_dir.clone(),
        files.clone(),
        Vec::new(),
    );
    cfg.allow_private_origins = true;
    tune(&mut cfg);
    let identity = NodeIdentity::load(&files.cert, &files.key, &files.ca).expect("identity");
    Engine::start(
        &cfg,
        &identity,
        EngineOptions {
            allow_private_origins: true,
            ..opts
        },
    )
    .expect("engine")
}

fn content(nodes: &[Node], me: usize, certs: &Path, id: &str, url: &str) -> ContentConfig {
    let mut c = http_config(
        &nodes[me],
        nodes,
        certs,
        id,
        url,
        &[nodes[0].name.clone()],
        None,
    )
    .contents
    .remove(0);
    c.piece_size = PIECE;
    c
}

fn phase(e: &Engine, id: &str) -> Option<(Phase, Option<String>)> {
    e.status(id).map(|s| (s.phase, s.reason))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_on_disk_are_verified_piece_by_piece_never_trusted_by_size() {
    let (_tmp, data, origin, nodes, certs) = fixture(16 * PIECE as usize, 11, 2).await;
    let id = "reuse";

    // node-1 already has a file of the right size at the destination: its
    // first half is this content, its second half other bytes.
    let c1 = content(&nodes, 1, &certs, id, &origin.url());
    let dest1 = nodes[1].data_dir.join(&c1.path);
    std::fs::create_dir_all(dest1.parent().expect("parent")).expect("mkdir");
    let mut planted = data[..8 * PIECE as usize].to_vec();
    planted.extend(random_bytes(8 * PIECE as usize, 99));
    std::fs::write(&dest1, &planted).expect("plant");

    let a = start_engine(&nodes[0], &certs, EngineOptions::default());
    let b = start_engine(&nodes[1], &certs, EngineOptions::default());
    a.add(content(&nodes, 0, &certs, id, &origin.url()))
        .expect("add a");
    b.add(c1.clone()).expect("add b");
    assert!(
        wait_until(Duration::from_secs(60), || phase(&b, id)
            .is_some_and(|(p, _)| p == Phase::Complete))
        .await,
        "node-1 did not complete: {:?}",
        b.status(id)
    );
    let want = blake3::hash(&data).to_hex().to_string();
    assert_eq!(file_blake3(&dest1).as_deref(), Some(want.as_str()));
    let st = b.status(id).expect("status");
    // The matching half was reused after verifying, the rest fetched.
    assert_eq!(st.reused_pieces, 8, "{st:?}");
    assert_eq!(st.bytes_from_peers, 8 * u64::from(PIECE), "{st:?}");
    assert_eq!(st.root, Some(format!("blake3:{want}")));

    // After a restart of the content, the complete file is verified again
    // (all of it reused), not taken as complete because it exists.
    b.remove(id, false).await.expect("remove");
    b.add(c1).expect("re-add");
    assert!(
        wait_until(Duration::from_secs(60), || phase(&b, id)
            .is_some_and(|(p, _)| p == Phase::Complete))
        .await,
        "node-1 did not complete again: {:?}",
        b.status(id)
    );
    let st = b.status(id).expect("status");
    assert_eq!(st.reused_pieces, 16, "{st:?}");
    assert_eq!(st.bytes_from_peers, 0, "{st:?}");
    assert_eq!(file_blake3(&dest1).as_deref(), Some(want.as_str()));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_only_once_the_identity_is_pinned_and_matches() {
    let (_tmp, data, origin, nodes, certs) = fixture(5 * PIECE as usize + 17, 12, 1).await;
    let e = start_engine(&nodes[0], &certs, pinned());
    let good = content(&nodes, 0, &certs, "good", &origin.url());
    let mut bad = content(&nodes, 0, &certs, "bad", &origin.url());
    bad.path = "out/bad.bin".into();
    e.add(good.clone()).expect("add");
    e.add(bad.clone()).expect("add");
    let root = format!("blake3:{}", blake3::hash(&data).to_hex());
    for id in ["good", "bad"] {
        assert!(
            wait_until(Duration::from_secs(30), || e
                .status(id)
                .is_some_and(|s| s.reason.as_deref() == Some("WaitingForIdentity")))
            .await,
            "{id}: {:?}",
            e.status(id)
        );
        let st = e.status(id).expect("status");
        // Every piece held, the authority's vote reported, not Complete.
        assert_eq!(st.phase, Phase::Fetching);
        assert_eq!(st.pieces_done, st.piece_count);
        assert_eq!(st.root.as_deref(), Some(root.as_str()));
        assert_eq!(st.origin_version, Some(origin.etag()));
    }
    let dest = nodes[0].data_dir.join(&good.path);
    assert!(!dest.exists(), "nothing in place before the pin");
    e.pin("good", Some(root.parse().expect("root")), None);
    let wrong: Digest = format!("blake3:{}", "00".repeat(32))
        .parse()
        .expect("digest");
    e.pin("bad", Some(wrong), None);
    assert!(
        wait_until(Duration::from_secs(30), || phase(&e, "good")
            .is_some_and(|(p, _)| p == Phase::Complete))
        .await
    );
    assert_eq!(
        file_blake3(&dest).as_deref(),
        Some(blake3::hash(&data).to_hex().as_str())
    );
    assert!(
        wait_until(Duration::from_secs(30), || phase(&e, "bad")
            == Some((Phase::Failed, Some("IdentityMismatch".into()))))
        .await,
        "{:?}",
        e.status("bad")
    );
    assert!(!nodes[0].data_dir.join(&bad.path).exists());

    // Restarted with its identity pinned, the origin reader verifies the
    // file it holds as a whole and reads nothing from the origin again.
    let served = origin.served();
    e.remove("good", false).await.expect("remove");
    let mut again = good.clone();
    again.root = Some(root.parse().expect("root"));
    e.add(again).expect("re-add");
    assert!(
        wait_until(Duration::from_secs(30), || phase(&e, "good")
            .is_some_and(|(p, _)| p == Phase::Complete))
        .await,
        "{:?}",
        e.status("good")
    );
    let st = e.status("good").expect("status");
    assert_eq!(st.reused_pieces, u64::from(st.piece_count), "{st:?}");
    assert_eq!(st.bytes_from_origin, 0, "{st:?}");
    assert_eq!(origin.served(), served);
    assert_eq!(
        file_blake3(&dest).as_deref(),
        Some(blake3::hash(&data).to_hex().as_str())
    );
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_changing_mid_transfer_is_caught_never_mixed() {
    // Larger than the rate limiter's burst (4 MiB), so the limit bites.
    let (_tmp, _, origin, nodes, certs) = fixture(128 * PIECE as usize, 13, 1).await;
    let v2 = Arc::new(random_bytes(128 * PIECE as usize, 14));
    let e = start_engine_with(
        &nodes[0],
        &certs,
        EngineOptions {
            retry_transient_origin: true,
            ..EngineOptions::default()
        },
        // Slow enough past the burst that the change lands mid-transfer.
        |cfg| cfg.limits.origin_bytes_per_sec = Some(16 * u64::from(PIECE)),
    );
    let c = content(&nodes, 0, &certs, "changing", &origin.url());
    e.add(c.clone()).expect("add");
    assert!(
        wait_until(Duration::from_secs(30), || e
            .status("changing")
            .is_some_and(|s| s.pieces_done >= 2))
        .await
    );
    assert!(
        e.status("changing")
            .is_some_and(|s| s.pieces_done < s.piece_count),
        "the transfer must still be running when the origin changes"
    );
    origin.replace(v2.clone());
    assert!(
        wait_until(Duration::from_secs(30), || phase(&e, "changing")
            == Some((Phase::Failed, Some("OriginChanged".into()))))
        .await,
        "{:?}",
        e.status("changing")
    );
    let st = e.status("changing").expect("status");
    // The reader reports the version it found.
    assert_eq!(st.origin_version, Some(etag_of(&v2)));
    assert!(st.pieces_done < st.piece_count, "{st:?}");
    assert!(!nodes[0].data_dir.join(&c.path).exists());
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_fault_is_retried_until_it_clears() {
    let (_tmp, data, origin, nodes, certs) = fixture(4 * PIECE as usize, 15, 1).await;
    // The partial-file directory cannot be created: a storage fault.
    let blocker = nodes[0].data_dir.join(".peerfill-partial");
    std::fs::create_dir_all(&nodes[0].data_dir).expect("mkdir");
    std::fs::write(&blocker, b"not a directory").expect("blocker");
    let e = start_engine(
        &nodes[0],
        &certs,
        EngineOptions {
            retry_transient_origin: true,
            ..EngineOptions::default()
        },
    );
    let c = content(&nodes, 0, &certs, "faulty", &origin.url());
    e.add(c.clone()).expect("add");
    assert!(
        wait_until(Duration::from_secs(30), || phase(&e, "faulty")
            == Some((Phase::Failed, Some("StorageError".into()))))
        .await,
        "{:?}",
        e.status("faulty")
    );
    // The fault clears: the content recovers without intervention.
    std::fs::remove_file(&blocker).expect("clear the fault");
    assert!(
        wait_until(Duration::from_secs(60), || phase(&e, "faulty")
            .is_some_and(|(p, _)| p == Phase::Complete))
        .await,
        "{:?}",
        e.status("faulty")
    );
    assert_eq!(
        file_blake3(&nodes[0].data_dir.join(&c.path)).as_deref(),
        Some(blake3::hash(&data).to_hex().as_str())
    );
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_replaced_under_live_sessions_gets_its_peers_back() {
    // Larger than the rate limiter's burst (4 MiB), so the limit bites.
    let (_tmp, data, origin, nodes, certs) = fixture(128 * PIECE as usize, 16, 2).await;
    let id = "replaced";
    let a = start_engine(&nodes[0], &certs, EngineOptions::default());
    a.add(content(&nodes, 0, &certs, id, &origin.url()))
        .expect("add a");
    assert!(
        wait_until(Duration::from_secs(30), || phase(&a, id)
            .is_some_and(|(p, _)| p == Phase::Complete))
        .await
    );
    // node-1 downloads slowly, so the replacement lands mid-transfer.
    let b = start_engine_with(&nodes[1], &certs, EngineOptions::default(), |cfg| {
        cfg.limits.download_bytes_per_sec = Some(16 * u64::from(PIECE))
    });
    let c1 = content(&nodes, 1, &certs, id, &origin.url());
    b.add(c1.clone()).expect("add b");
    assert!(
        wait_until(Duration::from_secs(30), || b
            .status(id)
            .is_some_and(|s| s.pieces_done >= 70))
        .await,
        "{:?}",
        b.status(id)
    );
    assert!(
        b.status(id).is_some_and(|s| s.pieces_done < s.piece_count),
        "the run must be replaced mid-transfer"
    );
    // The run is replaced at once (a restart of the content): node-0's
    // announcement, made to the old run, must reach the new one.
    b.remove(id, false).await.expect("remove");
    b.add(c1).expect("re-add");
    assert!(
        wait_until(Duration::from_secs(60), || phase(&b, id)
            .is_some_and(|(p, _)| p == Phase::Complete))
        .await,
        "{:?}",
        b.status(id)
    );
    // Recovered by re-attaching, not by the stall watchdog.
    let resyncs = metric_value(
        &b.swarm().metrics().render(),
        "peerfill_agent_stall_resyncs_total",
    )
    .unwrap_or(0.0);
    assert_eq!(resyncs, 0.0);
    assert_eq!(
        file_blake3(&nodes[1].data_dir.join("out").join(format!("{id}.bin"))).as_deref(),
        Some(blake3::hash(&data).to_hex().as_str())
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_of_another_version_than_the_published_one_stops() {
    let (_tmp, _, origin, nodes, certs) = fixture(3 * PIECE as usize, 17, 1).await;
    let e = start_engine(&nodes[0], &certs, pinned());
    let c = content(&nodes, 0, &certs, "split", &origin.url());
    e.add(c.clone()).expect("add");
    assert!(
        wait_until(Duration::from_secs(30), || e
            .status("split")
            .is_some_and(|s| s.reason.as_deref() == Some("WaitingForIdentity")))
        .await
    );
    // The operator published another reader's version: the origin changed
    // between the readers, so this reader's pieces are of another version.
    e.pin("split", None, Some("\"another\"".into()));
    assert!(
        wait_until(Duration::from_secs(30), || phase(&e, "split")
            == Some((Phase::Failed, Some("OriginChanged".into()))))
        .await,
        "{:?}",
        e.status("split")
    );
    let st = e.status("split").expect("status");
    assert_eq!(st.origin_version, Some(origin.etag()));
    assert!(!nodes[0].data_dir.join(&c.path).exists());
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_a_nodes_certificate_does_not_replace_its_live_one() {
    use peerfill_agent::metrics::Metrics;
    use peerfill_agent::swarm::{Swarm, SwarmOptions};
    let tmp = tempfile::tempdir().expect("tempdir");
    let nodes = nodes(tmp.path(), 3);
    let certs = tmp.path().join("certs");
    make_identities(&certs, &[nodes[0].name.clone(), nodes[1].name.clone()]);
    let load = |name: &str| {
        let f = IdentityFiles::in_dir(&certs.join(name));
        NodeIdentity::load(&f.cert, &f.key, &f.ca).expect("identity")
    };
    let x = Swarm::start(
        SwarmOptions::new("node-0", nodes[0].addr),
        &load("node-0"),
        Metrics::new(),
    )
    .expect("x");
    let y_metrics = Metrics::new();
    let y = Swarm::start(
        SwarmOptions::new("node-1", nodes[1].addr),
        &load("node-1"),
        y_metrics.clone(),
    )
    .expect("y");
    x.connect([("node-1".to_string(), nodes[1].addr)]);
    assert!(
        wait_until(Duration::from_secs(20), || y.peer_addr("node-0")
            == Some(nodes[0].addr))
        .await
    );
    // Past the grace for simultaneous dials: only a probe decides now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Someone else presents node-0's certificate from another address.
    let impostor = Swarm::start(
        SwarmOptions::new("node-0", nodes[2].addr),
        &load("node-0"),
        Metrics::new(),
    )
    .expect("impostor");
    impostor.connect([("node-1".to_string(), nodes[1].addr)]);
    assert!(
        wait_until(Duration::from_secs(20), || metric_value(
            &y_metrics.render(),
            "peerfill_agent_duplicate_connections_refused_total"
        )
        .is_some_and(|v| v >= 1.0))
        .await,
        "the second connection was never refused"
    );
    // The live connection is the one kept.
    assert_eq!(y.peer_addr("node-0"), Some(nodes[0].addr));
    assert_eq!(x.connected(), vec!["node-1".to_string()]);
    impostor.shutdown().await;
    x.shutdown().await;
    y.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_readers_range_reassigned_completes_the_swarm() {
    let (_tmp, data, origin, nodes, certs) = fixture(24 * PIECE as usize, 18, 3).await;
    // node-0 reaches the origin only through a connection that never
    // answers (a paused origin, as node-0 sees it).
    let paused = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let paused_url = format!("http://{}/blob", paused.local_addr().expect("addr"));
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = paused.accept().await {
            held.push(s);
        }
    });
    let opts = EngineOptions {
        retry_transient_origin: true,
        ..EngineOptions::default()
    };
    let engines: Vec<Engine> = nodes
        .iter()
        .map(|n| start_engine(n, &certs, opts.clone()))
        .collect();
    let id = "reassigned";
    let config = |i: usize, readers: &[&str]| {
        let url = if i == 0 { &paused_url } else { &origin.url() };
        let mut c = content(&nodes, i, &certs, id, url);
        c.size = Some(data.len() as u64);
        c.source = peerfill_agent::agent::SourceConfig::Http {
            url: url.clone(),
            headers: Default::default(),
            readers: readers.iter().map(|r| r.to_string()).collect(),
            whole: false,
            files: Vec::new(),
            manifest_url: None,
        };
        c
    };
    for (i, e) in engines.iter().enumerate() {
        e.add(config(i, &["node-0", "node-1"])).expect("add");
    }
    // node-1's half arrives everywhere; node-0's never does.
    assert!(
        wait_until(Duration::from_secs(30), || engines[2]
            .status(id)
            .is_some_and(|s| s.pieces_done == s.piece_count / 2))
        .await,
        "{:?}",
        engines[2].status(id)
    );
    // The operator reassigns node-0's range: every node restarts the
    // content with node-1 as the only reader, within moments of each other.
    for (i, e) in engines.iter().enumerate() {
        e.remove(id, false).await.expect("remove");
        e.add(config(i, &["node-1"])).expect("re-add");
    }
    for (i, e) in engines.iter().enumerate() {
        assert!(
            wait_until(Duration::from_secs(60), || phase(e, id)
                .is_some_and(|(p, _)| p == Phase::Complete))
            .await,
            "node-{i}: {:?}",
            e.status(id)
        );
        assert_eq!(
            file_blake3(&nodes[i].data_dir.join("out").join(format!("{id}.bin"))).as_deref(),
            Some(blake3::hash(&data).to_hex().as_str()),
            "node-{i}"
        );
    }
    // node-1 read each byte of the origin once, but for the reads in
    // flight when the content restarted (at most the origin concurrency,
    // 2 pieces, are discarded and read again); the others kept what they
    // held across the restart.
    let served = origin.served();
    let in_flight = 2 * u64::from(PIECE);
    assert!(
        (data.len() as u64..=data.len() as u64 + in_flight).contains(&served),
        "origin served {served} bytes for {} ({} in flight at most)",
        data.len(),
        in_flight
    );
    hold.abort();
    for e in &engines {
        e.shutdown().await;
    }
}
