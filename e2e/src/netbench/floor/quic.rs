//! The `quic` floor transport: the agent's QUIC (its `tls` configs and
//! quinn on a multi-thread tokio runtime, as the agent runs it) carrying
//! plain streams, without anything else the agent does.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use peerfill_agent::tls::{self, ClusterCa, NodeIdentity, TlsError};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::PORT;
use crate::netbench::{NetbenchError, Result, io_err};

/// Where node `i`'s identity is written.
pub fn identity_dir(work: &Path, i: usize) -> PathBuf {
    work.join(format!("floor-id-{i}"))
}

fn name(i: usize) -> String {
    format!("n{}", i + 1)
}

/// The index `testbed::node_ip` gave this address.
fn index_of(ip: Ipv4Addr) -> usize {
    let o = ip.octets();
    (usize::from(o[2]).saturating_sub(1)) * 250 + usize::from(o[3]).saturating_sub(1)
}

fn tls_err(e: TlsError) -> NetbenchError {
    NetbenchError::Config(format!("floor identity: {e}"))
}

/// One cluster CA and an identity per node, as the operator issues them.
pub fn issue_identities(work: &Path, nodes: usize) -> Result<()> {
    let ca = ClusterCa::generate("peerfill-netbench-floor").map_err(tls_err)?;
    for i in 0..nodes {
        let id = ca.issue(&name(i)).map_err(tls_err)?;
        id.write(&identity_dir(work, i)).map_err(tls_err)?;
    }
    Ok(())
}

/// Sends `bytes_per_peer` to every peer and receives as much from each
/// over one connection per pair: this node dials the peers after it and
/// accepts the ones before it. Returns (sent, received).
pub fn node(
    dir: &Path,
    peers: &[Ipv4Addr],
    bytes_per_peer: u64,
    expected: u64,
    deadline: Duration,
) -> Result<(u64, u64)> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting the tokio runtime"))?
        .block_on(run(dir, peers, (bytes_per_peer, expected), deadline))
}

async fn run(
    dir: &Path,
    peers: &[Ipv4Addr],
    (bytes_per_peer, expected): (u64, u64),
    deadline: Duration,
) -> Result<(u64, u64)> {
    let id = NodeIdentity::load(
        &dir.join("tls.crt"),
        &dir.join("tls.key"),
        &dir.join("ca.crt"),
    )
    .map_err(tls_err)?;
    let indexes: Vec<usize> = peers.iter().map(|p| index_of(*p)).collect();
    let me = (0..=peers.len())
        .find(|i| !indexes.contains(i))
        .unwrap_or(peers.len());
    let socket = super::bind_udp()?;
    let server = tls::server_config(&id).map_err(tls_err)?;
    let endpoint = quinn::Endpoint::new(
        tls::endpoint_config(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(io_err("starting the QUIC endpoint"))?;
    let client = tls::client_config(&id).map_err(tls_err)?;
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let chunk = Bytes::from(vec![0x3cu8; 256 << 10]);
    let end = Instant::now() + deadline;
    let mut tasks = JoinSet::new();
    for (&peer, &j) in peers.iter().zip(&indexes).filter(|(_, j)| **j > me) {
        let (endpoint, client) = (endpoint.clone(), client.clone());
        let (chunk, sent, received) = (chunk.clone(), sent.clone(), received.clone());
        tasks.spawn(async move {
            let addr = SocketAddr::from((peer, PORT));
            // The peer may not listen yet.
            let conn = loop {
                let dial = endpoint.connect_with(client.clone(), addr, &name(j));
                match dial {
                    Ok(connecting) => match connecting.await {
                        Ok(conn) => break conn,
                        Err(_) if Instant::now() < end => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        Err(_) => return,
                    },
                    Err(_) => return,
                }
            };
            exchange(conn, chunk, bytes_per_peer, &sent, &received).await;
        });
    }
    let below = indexes.iter().filter(|j| **j < me).count();
    for _ in 0..below {
        let Ok(Some(incoming)) = tokio::time::timeout_at(end, endpoint.accept()).await else {
            break;
        };
        let (chunk, sent, received) = (chunk.clone(), sent.clone(), received.clone());
        tasks.spawn(async move {
            if let Ok(conn) = incoming.await {
                exchange(conn, chunk, bytes_per_peer, &sent, &received).await;
            }
        });
    }
    while let Ok(Some(_)) = tokio::time::timeout_at(end, tasks.join_next()).await {}
    // Let the last acknowledgements go out before closing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    endpoint.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    let got = received.load(Ordering::Relaxed);
    if got < expected {
        tracing::warn!(got, expected, "QUIC floor node received less than expected");
    }
    Ok((sent.load(Ordering::Relaxed), got))
}

/// One stream each way over `conn`, `bytes` long, in `chunk`-sized writes
/// (shared, not copied: as the agent sends pieces).
async fn exchange(
    conn: quinn::Connection,
    chunk: Bytes,
    bytes: u64,
    sent: &AtomicU64,
    received: &AtomicU64,
) {
    let send = async {
        let mut s = conn.open_uni().await.ok()?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64);
            s.write_chunk(chunk.slice(..n as usize)).await.ok()?;
            sent.fetch_add(n, Ordering::Relaxed);
            left -= n;
        }
        s.finish().ok()?;
        s.stopped().await.ok()
    };
    let recv = async {
        let mut r = conn.accept_uni().await.ok()?;
        while let Some(c) = r.read_chunk(usize::MAX, false).await.ok()? {
            received.fetch_add(c.bytes.len() as u64, Ordering::Relaxed);
        }
        Some(())
    };
    let _ = tokio::join!(send, recv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netbench::testbed::node_ip;

    #[test]
    fn a_node_index_is_read_back_from_its_address() {
        for i in [0, 1, 15, 249, 250, 499] {
            assert_eq!(index_of(node_ip(i)), i);
        }
    }

    #[test]
    fn node_names_are_valid_certificate_names() {
        for i in [0, 31, 499] {
            tls::validate_node_name(&name(i)).expect("valid node name");
        }
    }
}
