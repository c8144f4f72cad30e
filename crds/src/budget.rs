//! The cluster-wide status write budget.
//!
//! Every agent writes its NodeFill status: on a change of state at once, and
//! otherwise once per report interval (progress and heartbeat). The operator
//! sets the interval in each NodeFill's spec from the number of nodes, so
//! the periodic writes of the whole cluster stay at
//! [`CLUSTER_STATUS_WRITES_PER_SECOND`] whatever its size, leaving headroom
//! under the ~50 writes/s the API server is promised for changes of state.

/// Periodic status writes per second of the whole cluster.
pub const CLUSTER_STATUS_WRITES_PER_SECOND: u32 = 40;
/// Shortest report interval (small clusters report briskly).
pub const MIN_REPORT_INTERVAL_SECONDS: u32 = 2;
/// Longest report interval, whatever the node count.
pub const MAX_REPORT_INTERVAL_SECONDS: u32 = 600;

/// Report interval of every agent in a cluster of `nodes` nodes:
/// `nodes / CLUSTER_STATUS_WRITES_PER_SECOND`, rounded up, within
/// `[MIN, MAX]`.
pub fn report_interval_seconds(nodes: usize) -> u32 {
    let nodes = u32::try_from(nodes).unwrap_or(u32::MAX);
    nodes
        .div_ceil(CLUSTER_STATUS_WRITES_PER_SECOND)
        .clamp(MIN_REPORT_INTERVAL_SECONDS, MAX_REPORT_INTERVAL_SECONDS)
}

/// How long after its last heartbeat an agent counts as down: three missed
/// reports plus slack for a slow API server.
pub fn agent_stale_after_seconds(report_interval_seconds: u32) -> u32 {
    report_interval_seconds.saturating_mul(3).saturating_add(15)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Periodic writes per second of the whole cluster.
    fn cluster_writes_per_second(nodes: usize) -> f64 {
        nodes as f64 / f64::from(report_interval_seconds(nodes))
    }

    #[test]
    fn five_thousand_nodes_stay_under_fifty_writes_per_second() {
        // 5,000 nodes / 40 writes/s = 125 s between two reports of a node,
        // so 5,000 / 125 = 40 writes/s in all, under the ~50 budget.
        assert_eq!(report_interval_seconds(5_000), 125);
        assert_eq!(cluster_writes_per_second(5_000), 40.0);
        // An agent is declared down after 3 * 125 + 15 s without a report.
        assert_eq!(agent_stale_after_seconds(125), 390);
    }

    #[test]
    fn the_interval_grows_with_the_node_count() {
        for (nodes, interval) in [
            (0, 2),
            (1, 2),
            (8, 2),
            (80, 2),
            (81, 3),
            (1_000, 25),
            (5_000, 125),
            (24_000, 600),
            (1_000_000, 600),
        ] {
            assert_eq!(report_interval_seconds(nodes), interval, "{nodes} nodes");
        }
        // Up to the cap, the cluster never exceeds its periodic budget.
        for nodes in (1..=24_000).step_by(97) {
            let rate = cluster_writes_per_second(nodes);
            assert!(rate <= 40.0, "{nodes} nodes write {rate}/s");
        }
    }
}
