//! The cluster-wide API write budget of the agents.
//!
//! Every agent writes its NodeFill status once per report interval
//! (progress and heartbeat in one write). The operator sets the interval in
//! each NodeFill's spec from the number of nodes, so the periodic writes of
//! the whole cluster stay at [`CLUSTER_STATUS_WRITES_PER_SECOND`] whatever
//! its size. That leaves the rest of the ~50 writes/s the API server is
//! promised for the operator's spec writes (20/s) and for changes of
//! state, which come once per node and distribution, not per second:
//!
//! - *urgent* (endpoint, identity, a failure, an authority's size / root /
//!   origin version, an assignment dropped): written at once, at most one
//!   write per agent per second;
//! - *routine* (a distribution `Complete` here): held for
//!   [`state_hold_seconds`] so that completions close together share one
//!   write (and one node label patch);
//! - everything else (taking an assignment on, `Pending` → `Downloading`,
//!   byte counters) rides on the next periodic write.

/// Periodic status writes per second of the whole cluster.
pub const CLUSTER_STATUS_WRITES_PER_SECOND: u32 = 20;
/// Shortest report interval (small clusters report briskly).
pub const MIN_REPORT_INTERVAL_SECONDS: u32 = 2;
/// Longest report interval, whatever the node count.
pub const MAX_REPORT_INTERVAL_SECONDS: u32 = 600;
/// Longest a routine change of state is held back.
pub const MAX_STATE_HOLD_SECONDS: u32 = 30;

/// Report interval of every agent in a cluster of `nodes` nodes:
/// `nodes / CLUSTER_STATUS_WRITES_PER_SECOND`, rounded up, within
/// `[MIN, MAX]`.
pub fn report_interval_seconds(nodes: usize) -> u32 {
    let nodes = u32::try_from(nodes).unwrap_or(u32::MAX);
    nodes
        .div_ceil(CLUSTER_STATUS_WRITES_PER_SECOND)
        .clamp(MIN_REPORT_INTERVAL_SECONDS, MAX_REPORT_INTERVAL_SECONDS)
}

/// How long an agent holds a routine change of state (a completion)
/// before writing it: a tenth of the report interval, 1 s to
/// [`MAX_STATE_HOLD_SECONDS`] (1 s up to 200 nodes, 5 s at 1,000, 25 s at
/// 5,000).
pub fn state_hold_seconds(report_interval_seconds: u32) -> u32 {
    (report_interval_seconds / 10).clamp(1, MAX_STATE_HOLD_SECONDS)
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
        // 5,000 nodes / 20 writes/s = 250 s between two reports of a node,
        // so 5,000 / 250 = 20 periodic writes/s in all; with the
        // operator's 20 spec writes/s still under the ~50 budget.
        assert_eq!(report_interval_seconds(5_000), 250);
        assert_eq!(cluster_writes_per_second(5_000), 20.0);
        // An agent is declared down after 3 * 250 + 15 s without a report.
        assert_eq!(agent_stale_after_seconds(250), 765);
        assert_eq!(state_hold_seconds(250), 25);
    }

    #[test]
    fn the_interval_grows_with_the_node_count() {
        for (nodes, interval, hold) in [
            (0, 2, 1),
            (1, 2, 1),
            (8, 2, 1),
            (40, 2, 1),
            (41, 3, 1),
            (1_000, 50, 5),
            (2_000, 100, 10),
            (5_000, 250, 25),
            (12_000, 600, 30),
            (1_000_000, 600, 30),
        ] {
            assert_eq!(report_interval_seconds(nodes), interval, "{nodes} nodes");
            assert_eq!(state_hold_seconds(interval), hold, "{nodes} nodes");
        }
        // Up to the cap, the cluster never exceeds its periodic budget.
        for nodes in (1..=12_000).step_by(97) {
            let rate = cluster_writes_per_second(nodes);
            assert!(rate <= 20.0, "{nodes} nodes write {rate}/s");
        }
    }
}
