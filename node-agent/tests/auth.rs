//! Mutual TLS and per-content authorisation: a client without a certificate
//! of the cluster CA gets nothing (refused in the handshake), a valid node
//! not allowed a content is refused that content, an allowed node gets it.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use peerfill_agent::agent::{AgentConfig, ContentConfig, IdentityFiles, Phase, SourceConfig};
use peerfill_agent::tls::{self, ClusterCa, NodeIdentity};
use peerfill_agent::wire::{self, Message, RejectReason};

const ID: &str = "seeded";
const PIECE: u32 = 1 << 20;

/// Connects as `client`, asks for piece 0 and returns what came back.
async fn ask_piece(addr: SocketAddr, client: quinn::ClientConfig) -> Result<Message, String> {
    let endpoint =
        quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into()).map_err(|e| e.to_string())?;
    let attempt = async {
        let conn = endpoint
            .connect_with(client, addr, "node-0")
            .map_err(|e| format!("connect: {e}"))?
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open: {e}"))?;
        let req = Message::Request {
            content: ID.into(),
            piece: 0,
        };
        send.write_all(&req.encode())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let _ = send.finish();
        match wire::read_frame(&mut recv, wire::MAX_FRAME_LEN).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err("no response".to_string()),
            Err(e) => Err(format!("read: {e}")),
        }
    };
    let out = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    endpoint.close(0u32.into(), b"");
    // Let the close reach the agent: otherwise the next connection with the
    // same certificate can arrive while this one still looks alive there,
    // and is refused as a duplicate (the agent's rule, not what is tested).
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    out
}

/// Sends raw bytes on a request stream and returns why the agent closed
/// the connection.
async fn send_raw(addr: SocketAddr, client: quinn::ClientConfig, raw: &[u8]) -> String {
    let endpoint =
        quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into()).expect("client endpoint");
    let attempt = async {
        let conn = endpoint
            .connect_with(client, addr, "node-0")
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, _recv) = conn.open_bi().await.expect("open");
        send.write_all(raw).await.expect("write");
        conn.closed().await.to_string()
    };
    let out = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| "not closed".into());
    endpoint.close(0u32.into(), b"");
    // Let the close reach the agent: otherwise the next connection with the
    // same certificate can arrive while this one still looks alive there,
    // and is refused as a duplicate (the agent's rule, not what is tested).
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    out
}

/// A client presenting no certificate at all (but trusting the cluster CA).
fn anonymous_client(ca_pem: &str) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("add root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![tls::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    quinn::ClientConfig::new(Arc::new(quic))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_valid_allowed_nodes_get_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path().join("certs");
    let names: Vec<String> = ["node-0", "node-1", "node-2"].map(String::from).to_vec();
    let ca = make_identities(&certs, &names);
    let data = random_bytes(8 * PIECE as usize, 4);
    let seed_file = tmp.path().join("seed.bin");
    std::fs::write(&seed_file, &data).expect("seed file");

    let node = &nodes(tmp.path(), 1)[0];
    let contents = vec![ContentConfig {
        id: ID.into(),
        path: PathBuf::from("out/seeded.bin"),
        size: None,
        piece_size: PIECE,
        digest: Some(
            format!("blake3:{}", blake3::hash(&data).to_hex())
                .parse()
                .expect("digest"),
        ),
        source: SourceConfig::Node {
            node: "node-0".into(),
            path: Some(seed_file),
        },
        peers: vec![],
        // node-2 holds a valid certificate but is not allowed this content.
        allowed_peers: vec!["node-1".into()],
        root: None,
        origin_version: None,
        reuse_from: Vec::new(),
        caps: Default::default(),
        directory: false,
    }];
    let cfg = AgentConfig {
        metrics_addr: Some(node.metrics),
        ..AgentConfig::new(
            "node-0",
            node.addr,
            node.data_dir.clone(),
            IdentityFiles::in_dir(&certs.join("node-0")),
            contents,
        )
    };
    let agent = Agent::spawn(node, &cfg);
    assert!(
        wait_until(Duration::from_secs(30), || agent
            .status(ID)
            .is_some_and(|s| s.phase == Phase::Complete))
        .await,
        "seeder not ready: {:?}\n{}",
        agent.status(ID),
        agent.log_tail()
    );
    let addr = node.addr;

    // 1. A certificate from another CA: refused before any data moves.
    let rogue_ca = ClusterCa::generate("rogue-ca").expect("rogue ca");
    let rogue = rogue_ca.issue("mallory").expect("rogue cert");
    let mallory = NodeIdentity {
        ca_pem: ca.cert_pem().to_string(),
        ..rogue
    };
    let got = ask_piece(addr, tls::client_config(&mallory).expect("client cfg")).await;
    assert!(got.is_err(), "rogue-CA client got {got:?}");

    // 2. No certificate at all.
    let got = ask_piece(addr, anonymous_client(ca.cert_pem())).await;
    assert!(got.is_err(), "anonymous client got {got:?}");

    // 3. A cluster node not allowed this content: an explicit refusal.
    let id2 = NodeIdentity::load(
        &certs.join("node-2/tls.crt"),
        &certs.join("node-2/tls.key"),
        &certs.join("node-2/ca.crt"),
    )
    .expect("node-2 identity");
    let got = ask_piece(addr, tls::client_config(&id2).expect("client cfg")).await;
    assert!(
        matches!(
            got,
            Ok(Message::Reject {
                reason: RejectReason::NotAllowed,
                ..
            })
        ),
        "node-2 got {got:?}"
    );

    // Nothing has been served so far.
    let sent = metric_value(&agent.metrics(), "peerfill_agent_sent_bytes_total");
    assert_eq!(sent, Some(0.0), "bytes served to refused clients");

    // 4. An allowed node gets the verified piece.
    let id1 = NodeIdentity::load(
        &certs.join("node-1/tls.crt"),
        &certs.join("node-1/tls.key"),
        &certs.join("node-1/ca.crt"),
    )
    .expect("node-1 identity");
    match ask_piece(addr, tls::client_config(&id1).expect("client cfg")).await {
        Ok(Message::Piece {
            piece: 0,
            data: got,
        }) => assert_eq!(&got[..], &data[..PIECE as usize]),
        other => panic!("allowed node got {other:?}\n{}", agent.log_tail()),
    }

    // 5. Malformed and oversized frames close that connection, logged, and
    // nothing else: the agent keeps serving on new connections.
    for garbage in [
        vec![0u8, 0, 0, 3, 99, 5, 0],         // unknown protocol version
        vec![0xffu8, 0xff, 0xff, 0xff, 1, 5], // 4 GiB frame
        vec![0u8, 0, 0, 4, wire::PROTOCOL_VERSION, 42, 0, 0], // unknown type
    ] {
        let reason = send_raw(
            addr,
            tls::client_config(&id1).expect("client cfg"),
            &garbage,
        )
        .await;
        assert!(
            reason.contains("malformed frame"),
            "garbage {garbage:?} closed with {reason:?}"
        );
    }
    match ask_piece(addr, tls::client_config(&id1).expect("client cfg")).await {
        Ok(Message::Piece { piece: 0, .. }) => {}
        other => panic!("agent stopped serving after bad frames: {other:?}"),
    }

    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(
        log.contains("refused incoming connection"),
        "refusals are logged:\n{}",
        agent.log_tail()
    );
}

/// Accepts QUIC connections on `server` and reports each handshake's
/// outcome: the client's node name, or the error.
fn report_handshakes(
    server: quinn::Endpoint,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let outcome = match incoming.await {
                Ok(conn) => tls::peer_node(&conn).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if tx.send(outcome).is_err() {
                break;
            }
        }
    });
    (task, rx)
}

/// The next handshake outcome the server reported (bounded wait).
async fn next_outcome(
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
) -> Result<String, String> {
    tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("handshake outcome")
        .expect("server running")
}

/// Dials `addr` as node `name` with `cfg`; the handshake result.
async fn handshake(cfg: quinn::ClientConfig, addr: SocketAddr, name: &str) -> Result<(), String> {
    let endpoint =
        quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into()).map_err(|e| e.to_string())?;
    let attempt = async {
        let conn = endpoint
            .connect_with(cfg, addr, name)
            .map_err(|e| format!("connect: {e}"))?
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // In TLS 1.3 the client is done before the server has checked the
        // client certificate: the server's verdict is what it reports.
        drop(conn);
        Ok(())
    };
    let out = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    endpoint.close(0u32.into(), b"");
    // Let the close reach the agent: otherwise the next connection with the
    // same certificate can arrive while this one still looks alive there,
    // and is refused as a duplicate (the agent's rule, not what is tested).
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    out
}

/// `spec.peers[].certificateFingerprint` is enforced on both ends: a node
/// presenting a valid certificate of the cluster CA for node X, but not X's
/// pinned one, is refused; the pinned certificate is accepted; a node
/// without a pin is accepted on the chain alone.
#[tokio::test]
async fn certificate_fingerprints_are_pinned() {
    let ca = ClusterCa::generate("peerfill-test-ca").expect("ca");
    let server_id = ca.issue("node-0").expect("node-0");
    let real_x = ca.issue("node-x").expect("node-x");
    // Same CA, same node name, another key: what a stolen CA signature or a
    // replayed CSR would give an attacker.
    let impostor_x = ca.issue("node-x").expect("impostor");
    let unpinned = ca.issue("node-y").expect("node-y");

    // Server side: node-0 pins node-x.
    server_id
        .pins
        .set([("node-x", real_x.fingerprint().expect("fp"))]);
    let server = quinn::Endpoint::server(
        tls::server_config(&server_id).expect("server cfg"),
        (Ipv4Addr::LOCALHOST, 0).into(),
    )
    .expect("server endpoint");
    let addr = server.local_addr().expect("addr");
    let (task, mut seen) = report_handshakes(server.clone());

    let _ = handshake(
        tls::client_config(&impostor_x).expect("cfg"),
        addr,
        "node-0",
    )
    .await;
    let outcome = next_outcome(&mut seen).await;
    assert!(
        outcome.is_err(),
        "server accepted the impostor: {outcome:?}"
    );

    handshake(tls::client_config(&real_x).expect("cfg"), addr, "node-0")
        .await
        .expect("the pinned node-x is accepted");
    assert_eq!(next_outcome(&mut seen).await, Ok("node-x".to_string()));
    handshake(tls::client_config(&unpinned).expect("cfg"), addr, "node-0")
        .await
        .expect("a node without a pin is accepted on the chain");
    assert_eq!(next_outcome(&mut seen).await, Ok("node-y".to_string()));

    // Client side: a client pinning node-0 to another certificate refuses
    // the (CA-valid) server; pinned to the real one, it connects.
    let client = ca.issue("node-y").expect("client");
    let other_0 = ca.issue("node-0").expect("other node-0");
    client
        .pins
        .set([("node-0", other_0.fingerprint().expect("fp"))]);
    let got = handshake(tls::client_config(&client).expect("cfg"), addr, "node-0").await;
    assert!(got.is_err(), "client accepted an unpinned node-0: {got:?}");
    let _ = next_outcome(&mut seen).await;
    // Pins are live: updating them applies to the next handshake.
    client
        .pins
        .set([("node-0", server_id.fingerprint().expect("fp"))]);
    let cfg = tls::client_config(&client).expect("cfg");
    handshake(cfg, addr, "node-0")
        .await
        .expect("pinned server accepted");
    assert_eq!(next_outcome(&mut seen).await, Ok("node-y".to_string()));

    // And the server's pins are live too: pinning node-x to the impostor
    // now refuses the former one.
    server_id
        .pins
        .set([("node-x", impostor_x.fingerprint().expect("fp"))]);
    let _ = handshake(tls::client_config(&real_x).expect("cfg"), addr, "node-0").await;
    let outcome = next_outcome(&mut seen).await;
    assert!(
        outcome.is_err(),
        "re-pinned node-x still accepted: {outcome:?}"
    );

    server.close(0u32.into(), b"");
    task.abort();
}
