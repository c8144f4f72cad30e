//! When the agent writes its NodeFill status: at once on a change of state,
//! but never more than once per [`MIN_WRITE_SPACING`]; otherwise (progress
//! and heartbeat) once per report interval. The operator sizes that
//! interval with [`peerfill_crds::budget::report_interval_seconds`] so that
//! a whole cluster stays within its API write budget.

use std::time::Duration;

use tokio::time::Instant;

/// Shortest time between two status writes of one agent.
pub const MIN_WRITE_SPACING: Duration = Duration::from_secs(1);

/// Report interval when the spec does not say
/// (`peerfill_crds::budget::MIN_REPORT_INTERVAL_SECONDS`).
pub fn report_interval(spec_seconds: Option<u32>) -> Duration {
    let secs = spec_seconds
        .unwrap_or(peerfill_crds::budget::MIN_REPORT_INTERVAL_SECONDS)
        .max(1);
    Duration::from_secs(u64::from(secs))
}

/// The instant of the next status write: now when nothing was written yet;
/// for a change of state one [`MIN_WRITE_SPACING`] after the last write at
/// the earliest; otherwise one `interval` after the last write (progress
/// and heartbeat). The caller writes when the returned instant is not in
/// the future, and asks again whenever its state changes.
pub fn next_write(
    now: Instant,
    last_write: Option<Instant>,
    interval: Duration,
    dirty_state: bool,
) -> Instant {
    let Some(last) = last_write else {
        return now;
    };
    if dirty_state {
        (last + MIN_WRITE_SPACING).max(now)
    } else {
        last + interval.max(MIN_WRITE_SPACING)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerfill_crds::budget;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn the_first_write_is_immediate() {
        let now = Instant::now();
        assert_eq!(next_write(now, None, secs(125.0), false), now);
        assert_eq!(next_write(now, None, secs(125.0), true), now);
    }

    #[test]
    fn changes_of_state_go_out_at_once_but_at_most_once_a_second() {
        let t0 = Instant::now();
        // Half a second after a write: the change waits for the spacing.
        let now = t0 + secs(0.5);
        assert_eq!(next_write(now, Some(t0), secs(125.0), true), t0 + secs(1.0));
        // Long after: at once.
        let now = t0 + secs(7.0);
        assert_eq!(next_write(now, Some(t0), secs(125.0), true), now);
    }

    #[test]
    fn progress_and_heartbeats_wait_for_the_interval() {
        let t0 = Instant::now();
        let now = t0 + secs(3.0);
        assert_eq!(
            next_write(now, Some(t0), secs(125.0), false),
            t0 + secs(125.0)
        );
        assert_eq!(next_write(now, Some(t0), secs(2.0), false), t0 + secs(2.0));
        // A zero interval from a broken spec still never beats the spacing.
        assert_eq!(next_write(now, Some(t0), secs(0.0), false), t0 + secs(1.0));
        assert_eq!(report_interval(None), secs(2.0));
        assert_eq!(report_interval(Some(0)), secs(1.0));
        assert_eq!(report_interval(Some(125)), secs(125.0));
    }

    /// Simulates one agent for `horizon` with state changes at the given
    /// instants (seconds), polling every 100 ms as the agent does; returns
    /// the write instants.
    fn simulate(interval: Duration, changes: &[f64], horizon: f64) -> Vec<f64> {
        let t0 = Instant::now();
        let mut last: Option<Instant> = None;
        let mut written_changes = 0usize;
        let mut writes = Vec::new();
        // Whole milliseconds, so no float drift accumulates.
        let end_ms = (horizon * 1000.0) as u64;
        for t_ms in (0..=end_ms).step_by(100) {
            let t = t_ms as f64 / 1000.0;
            let now = t0 + Duration::from_millis(t_ms);
            let seen = changes.iter().filter(|c| **c <= t).count();
            let dirty = seen > written_changes;
            if next_write(now, last, interval, dirty) <= now {
                writes.push(t);
                last = Some(now);
                written_changes = seen;
            }
        }
        writes
    }

    #[test]
    fn a_burst_of_changes_costs_one_write_per_second() {
        // Ten changes within half a second, interval 125 s.
        let changes: Vec<f64> = (0..10).map(|i| 10.0 + f64::from(i) * 0.05).collect();
        let writes = simulate(secs(125.0), &changes, 20.0);
        // The first write, the first change at once, the rest one second later.
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert!((writes[1] - 10.0).abs() < 0.11, "{writes:?}");
        assert!((writes[2] - 11.0).abs() < 0.11, "{writes:?}");
    }

    #[test]
    fn five_thousand_agents_stay_within_the_cluster_budget() {
        // The operator gives every agent of a 5,000-node cluster this
        // interval: 5,000 / 40 = 125 s.
        let nodes = 5_000u32;
        let interval = budget::report_interval_seconds(nodes as usize);
        assert_eq!(interval, 125);
        // One agent with nothing changing writes once per interval...
        let horizon = 1_000.0;
        let writes = simulate(report_interval(Some(interval)), &[], horizon);
        assert_eq!(writes.len(), 9, "{writes:?}");
        let per_agent = (writes.len() - 1) as f64 / horizon;
        assert_eq!(per_agent, 1.0 / 125.0);
        // ...so the cluster writes 5,000 / 125 = 40 per second, under ~50.
        let cluster = f64::from(nodes) / f64::from(interval);
        assert_eq!(cluster, 40.0);
        assert!(cluster < 50.0);
        assert_eq!(
            budget::CLUSTER_STATUS_WRITES_PER_SECOND,
            40,
            "the periodic budget the operator sizes intervals with"
        );
    }
}
