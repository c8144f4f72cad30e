//! What `peerfill-versions` reports, per node and per source kind.

use serde::Serialize;

use super::SourceKind;

/// Bytes one node received for the new version.
#[derive(Clone, Debug, Serialize)]
pub struct NodeBytes {
    pub node: String,
    /// Origin reader of the new version (reads its range from the origin).
    pub reader: bool,
    pub from_origin: u64,
    pub from_peers: u64,
    /// (from_origin + from_peers) / size.
    pub network_share: f64,
}

/// One source kind's run.
#[derive(Clone, Debug, Serialize)]
pub struct SourceReport {
    pub source: SourceKind,
    pub size: u64,
    pub piece_size: u64,
    pub changed_bytes: u64,
    pub changed_share: f64,
    /// Bytes of the pieces that contain a changed byte: what a node
    /// without the new hashes' authority role needs at least.
    pub touched_piece_bytes: u64,
    pub touched_share: f64,
    pub first_version_secs: f64,
    pub new_version_secs: f64,
    /// Body bytes the origin served for the new version (HTTP only).
    pub origin_served_new_version: u64,
    pub nodes: Vec<NodeBytes>,
    /// Largest network share of a node that is not an origin reader.
    pub max_share_non_reader: f64,
    /// Largest network share of any node.
    pub max_share: f64,
}

/// The report `peerfill-versions` writes.
#[derive(Clone, Debug, Serialize)]
pub struct VersionsReport {
    pub nodes: usize,
    pub runs: Vec<SourceReport>,
}

impl SourceReport {
    /// Lines for the terminal.
    pub fn render(&self) -> Vec<String> {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut out = vec![format!(
            "{:?} source: {:.0} MiB, {} KiB pieces; {:.2} MiB changed ({:.2} %), pieces touched {:.2} MiB ({:.2} %); first version {:.1} s, new version {:.1} s; origin served {:.1} MiB for it",
            self.source,
            mib(self.size),
            self.piece_size >> 10,
            mib(self.changed_bytes),
            self.changed_share * 100.0,
            mib(self.touched_piece_bytes),
            self.touched_share * 100.0,
            self.first_version_secs,
            self.new_version_secs,
            mib(self.origin_served_new_version),
        )];
        for b in &self.nodes {
            out.push(format!(
                "  {:<8} {:<7} origin {:>8.2} MiB  peers {:>8.2} MiB  = {:>6.2} % of the size",
                b.node,
                if b.reader { "reader" } else { "" },
                mib(b.from_origin),
                mib(b.from_peers),
                b.network_share * 100.0
            ));
        }
        out.push(format!(
            "  largest share: {:.2} % (nodes that are not origin readers: {:.2} %)",
            self.max_share * 100.0,
            self.max_share_non_reader * 100.0
        ));
        out
    }
}
