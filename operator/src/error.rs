//! Errors of the operator.

/// Everything that can go wrong in the operator's shell.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kube client: {0}")]
    Client(#[source] kube::Error),
    #[error("{verb} {kind} {name}: {source}")]
    Kube {
        verb: &'static str,
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("lease {name}: {source}")]
    Lease {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("lost the leader lease (now held by {holder:?})")]
    LostLease { holder: String },
    #[error("CA Secret {name}: {reason}")]
    CaSecret { name: String, reason: String },
    #[error("cluster CA: {0}")]
    Ca(#[from] peerfill_agent::tls::TlsError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("waiting for {remaining} node(s) to remove the content: {nodes}")]
    CleanupPending { remaining: usize, nodes: String },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("binding metrics address {addr}: {source}")]
    MetricsBind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the {what} watch ended")]
    WatchEnded { what: &'static str },
    #[error("{what} timed out after {after:?}")]
    Timeout {
        what: &'static str,
        after: std::time::Duration,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("task failed: {0}")]
    Task(String),
}

impl Error {
    /// A helper for `map_err` on kube calls.
    pub fn kube(
        verb: &'static str,
        kind: &'static str,
        name: impl Into<String>,
    ) -> impl FnOnce(kube::Error) -> Error {
        let name = name.into();
        move |source| Error::Kube {
            verb,
            kind,
            name,
            source,
        }
    }

    /// Not a failure: the finalizer waits for agents.
    pub fn is_waiting(&self) -> bool {
        match self {
            Error::CleanupPending { .. } => true,
            Error::Finalizer(e) => matches!(
                e.as_ref(),
                kube::runtime::finalizer::Error::CleanupFailed(Error::CleanupPending { .. })
            ),
            _ => false,
        }
    }
}
