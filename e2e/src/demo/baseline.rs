//! The measured client-server baseline (`--measure-baseline`): N plain HTTP
//! clients download the artifact from the same (capped) origin at once,
//! each hashing what it receives; the time is from the first request to
//! the last byte, and every body must hash to the artifact's digest.
//!
//! The bodies are hashed and dropped, not written: the baseline measures
//! the origin's side, which is what the swarm relieves.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Why the baseline could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("client {client}: GET {url}: {detail}")]
    Request {
        client: usize,
        url: String,
        detail: String,
    },
    #[error(
        "client {client} received {got} bytes hashing to {digest}, expected {size} bytes of {want}"
    )]
    Mismatch {
        client: usize,
        got: u64,
        size: u64,
        digest: String,
        want: String,
    },
}

/// What the clients measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    pub clients: usize,
    /// First request to the last client's last byte.
    pub wall: Duration,
    /// Every client's own time, in client order.
    pub per_client: Vec<Duration>,
    /// Bytes all clients received together.
    pub bytes: u64,
}

/// Runs `clients` concurrent GETs of `url` and checks each body against
/// `size` bytes with digest `blake3` (`blake3:<hex>`).
pub async fn measure(
    url: &str,
    clients: usize,
    size: u64,
    blake3_digest: &str,
) -> Result<Baseline, BaselineError> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let start = Instant::now();
    let jobs = (0..clients).map(|i| {
        let client = client.clone();
        async move {
            let err = |detail: String| BaselineError::Request {
                client: i + 1,
                url: url.to_string(),
                detail,
            };
            let uri: http::Uri = url.parse().map_err(|e| err(format!("{e}")))?;
            let resp = client.get(uri).await.map_err(|e| err(format!("{e}")))?;
            if !resp.status().is_success() {
                return Err(err(format!("status {}", resp.status())));
            }
            let mut body = resp.into_body();
            let mut hasher = blake3::Hasher::new();
            let mut got = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| err(format!("reading the body: {e}")))?;
                if let Some(data) = frame.data_ref() {
                    got += data.len() as u64;
                    hasher.update(data);
                }
            }
            let digest = format!("blake3:{}", hasher.finalize().to_hex());
            if got != size || digest != blake3_digest {
                return Err(BaselineError::Mismatch {
                    client: i + 1,
                    got,
                    size,
                    digest,
                    want: blake3_digest.to_string(),
                });
            }
            Ok::<_, BaselineError>((start.elapsed(), got))
        }
    });
    let results = futures::future::join_all(jobs).await;
    let wall = start.elapsed();
    let mut per_client = Vec::with_capacity(clients);
    let mut bytes = 0;
    for r in results {
        let (t, n) = r?;
        per_client.push(t);
        bytes += n;
    }
    Ok(Baseline {
        clients,
        wall,
        per_client,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Origin;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_share_the_capped_origin_and_bodies_are_checked() {
        let origin = Origin::start().expect("origin");
        let blob = origin.add_blob("b.bin", 1 << 20, 7);
        let b = measure(&blob.url, 3, blob.size, &blob.blake3)
            .await
            .expect("baseline");
        assert_eq!(b.clients, 3);
        assert_eq!(b.bytes, 3 << 20);
        assert_eq!(b.per_client.len(), 3);
        assert!(b.per_client.iter().all(|t| *t <= b.wall));
        // The origin counted exactly the three bodies.
        assert_eq!(origin.served_of(&blob).bytes, 3 << 20);

        // A wrong digest is caught, not reported as a time.
        let wrong = format!("blake3:{}", "00".repeat(32));
        assert!(matches!(
            measure(&blob.url, 1, blob.size, &wrong).await,
            Err(BaselineError::Mismatch { client: 1, .. })
        ));
    }
}
