//! Whole-content reads of an origin that ignores Range requests.
//!
//! Such an origin answers a range GET with `200` and the whole body
//! ([`OriginError::NoRangeSupport`]). The operator then plans one origin
//! reader with every piece (`ResolvedHttpSource.wholeRead`), which reads
//! the body in one streaming GET ([`OriginClient::open_whole`]) while
//! every other node takes the pieces from peers. The read is pinned to the
//! origin version like a range read, and its length is checked against the
//! content size as it streams.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::StatusCode;

use super::{OriginClient, OriginError};

/// The body of a whole-content GET, read chunk by chunk.
pub struct WholeBody {
    client: OriginClient,
    stream: BoxStream<'static, reqwest::Result<Bytes>>,
    read_timeout: Duration,
    expected: u64,
    got: u64,
}

impl std::fmt::Debug for WholeBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WholeBody")
            .field("url", &self.client.shown)
            .field("expected", &self.expected)
            .field("got", &self.got)
            .finish_non_exhaustive()
    }
}

impl OriginClient {
    /// Sends one GET of the whole content (no `Range`), pinned to the
    /// version like a range read: the answer must be `200` with `size`
    /// bytes (its `Content-Length`, when sent). One attempt; the caller
    /// retries (a body cut half-way must be read again from the start).
    pub async fn open_whole(&self, size: u64) -> Result<WholeBody, OriginError> {
        let r = self.open_whole_once(size).await;
        self.record(&r);
        r
    }

    async fn open_whole_once(&self, size: u64) -> Result<WholeBody, OriginError> {
        let resp = self
            .send(self.conditional(self.client.get(self.url.clone())))
            .await?;
        let status = resp.status();
        if status == StatusCode::PRECONDITION_FAILED {
            return Err(self.changed(resp.headers()));
        }
        if status != StatusCode::OK {
            return Err(self.status_error(status));
        }
        self.check_version(resp.headers())?;
        if let Some(len) = resp.content_length()
            && len != size
        {
            return Err(OriginError::WrongLength {
                url: self.shown.clone(),
                expected: size,
                got: len,
            });
        }
        Ok(WholeBody {
            client: self.clone(),
            stream: resp.bytes_stream().boxed(),
            read_timeout: self.opts.read_timeout,
            expected: size,
            got: 0,
        })
    }

    /// The policy of this client's own retries, for reads it cannot retry
    /// itself ([`OriginClient::open_whole`]).
    pub fn retry_policy(&self) -> crate::retry::Policy {
        crate::retry::Policy::new(self.opts.initial_backoff, self.opts.max_backoff)
            .with_max_times(self.opts.max_retries as usize)
    }
}

impl WholeBody {
    /// The next chunk of the body, `None` once all of it arrived. A body
    /// that ends early, runs long or stalls for the read timeout is an
    /// error.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, OriginError> {
        let wrong = |got| OriginError::WrongLength {
            url: self.client.shown.clone(),
            expected: self.expected,
            got,
        };
        match tokio::time::timeout(self.read_timeout, self.stream.next()).await {
            Err(_) => Err(OriginError::Timeout {
                url: self.client.shown.clone(),
            }),
            Ok(None) if self.got == self.expected => Ok(None),
            Ok(None) => Err(wrong(self.got)),
            Ok(Some(Err(e))) => Err(self.client.classify(e)),
            Ok(Some(Ok(chunk))) => {
                let got = self.got + chunk.len() as u64;
                if got > self.expected {
                    return Err(wrong(got));
                }
                self.got = got;
                Ok(Some(chunk))
            }
        }
    }
}
