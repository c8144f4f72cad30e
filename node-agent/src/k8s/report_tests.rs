use super::*;
use peerfill_crds::budget;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn entry(uid: &str, phase: NodePhase) -> NodeDistributionStatus {
    NodeDistributionStatus {
        namespace: "default".into(),
        name: uid.into(),
        uid: uid.into(),
        phase,
        content_id: Some(format!("{uid}-v1")),
        bytes_done: 0,
        root: None,
        origin_version: None,
        size: None,
        files: None,
        pieces_done: 0,
        piece_count: 0,
        bytes_from_origin: 0,
        bytes_from_peers: 0,
        bytes_per_second: 0,
        manifest_digest: None,
        digest: None,
        reason: None,
        message: None,
        last_transition_time: None,
    }
}

fn proj(entries: &[(&NodeDistributionStatus, bool)]) -> Projection {
    projection(
        Some("198.18.0.1:7443"),
        Some("sha256:f"),
        "sha256:r",
        entries,
    )
}

#[test]
fn the_first_write_is_immediate() {
    let now = Instant::now();
    for change in [Change::Progress, Change::Routine, Change::Urgent] {
        assert_eq!(next_write(now, None, secs(250.0), change, None), now);
    }
}

#[test]
fn urgent_changes_go_out_at_once_but_at_most_once_a_second() {
    let t0 = Instant::now();
    let now = t0 + secs(0.5);
    assert_eq!(
        next_write(now, Some(t0), secs(250.0), Change::Urgent, Some(now)),
        t0 + secs(1.0)
    );
    let now = t0 + secs(7.0);
    assert_eq!(
        next_write(now, Some(t0), secs(250.0), Change::Urgent, Some(now)),
        now
    );
}

#[test]
fn routine_changes_are_held_then_written_before_the_next_report() {
    let t0 = Instant::now();
    let seen = t0 + secs(100.0);
    // 250 s interval (5,000 nodes): held 25 s from when first seen.
    assert_eq!(
        next_write(
            seen + secs(3.0),
            Some(t0),
            secs(250.0),
            Change::Routine,
            Some(seen)
        ),
        seen + secs(25.0)
    );
    // Seen shortly before the periodic write: that one carries it.
    let late = t0 + secs(240.0);
    assert_eq!(
        next_write(late, Some(t0), secs(250.0), Change::Routine, Some(late)),
        t0 + secs(250.0)
    );
    // Small clusters: one second.
    assert_eq!(
        next_write(seen, Some(t0), secs(2.0), Change::Routine, Some(seen)),
        t0 + secs(2.0)
    );
}

#[test]
fn progress_and_heartbeats_wait_for_the_interval() {
    let t0 = Instant::now();
    let now = t0 + secs(3.0);
    let next = |interval| next_write(now, Some(t0), secs(interval), Change::Progress, None);
    assert_eq!(next(125.0), t0 + secs(125.0));
    assert_eq!(next(2.0), t0 + secs(2.0));
    // A zero interval from a broken spec still never beats the spacing.
    assert_eq!(next(0.0), t0 + secs(1.0));
    assert_eq!(report_interval(None), secs(2.0));
    assert_eq!(report_interval(Some(0)), secs(1.0));
    assert_eq!(report_interval(Some(250)), secs(250.0));
}

#[test]
fn what_each_status_difference_is() {
    let pending = entry("a", NodePhase::Pending);
    let downloading = entry("a", NodePhase::Downloading);
    let complete = NodeDistributionStatus {
        digest: Some("blake3:r".into()),
        ..entry("a", NodePhase::Complete)
    };
    let failed = NodeDistributionStatus {
        reason: Some("InsufficientSpace".into()),
        ..entry("a", NodePhase::Failed)
    };
    let other = entry("b", NodePhase::Downloading);
    let base = proj(&[(&downloading, false)]);
    // Before the first write everything is urgent.
    assert_eq!(classify(None, &base), Change::Urgent);
    // Taking an assignment on, and Pending -> Downloading, ride along.
    assert_eq!(
        classify(Some(&proj(&[])), &proj(&[(&pending, false)])),
        Change::Progress
    );
    assert_eq!(
        classify(Some(&proj(&[(&pending, false)])), &base),
        Change::Progress
    );
    assert_eq!(
        classify(
            Some(&base),
            &proj(&[(&downloading, false), (&other, false)])
        ),
        Change::Progress
    );
    // A completion is routine; a failure, a drop and the endpoint urgent.
    assert_eq!(
        classify(Some(&base), &proj(&[(&complete, false)])),
        Change::Routine
    );
    assert_eq!(
        classify(Some(&base), &proj(&[(&failed, false)])),
        Change::Urgent
    );
    assert_eq!(classify(Some(&base), &proj(&[])), Change::Urgent);
    let moved = projection(
        Some("198.18.0.2:7443"),
        Some("sha256:f"),
        "sha256:r",
        &[(&downloading, false)],
    );
    assert_eq!(classify(Some(&base), &moved), Change::Urgent);
    // Back from Complete (a restart) is no news before the next report.
    assert_eq!(
        classify(Some(&proj(&[(&complete, false)])), &base),
        Change::Progress
    );
}

#[test]
fn only_an_authority_reports_its_pins_at_once() {
    let before = entry("a", NodePhase::Downloading);
    let learnt = NodeDistributionStatus {
        size: Some(1 << 30),
        root: Some("blake3:r".into()),
        ..before.clone()
    };
    assert_eq!(
        classify(Some(&proj(&[(&before, true)])), &proj(&[(&learnt, true)])),
        Change::Urgent
    );
    // Anyone else takes the size from the spec: nothing to hurry.
    assert_eq!(
        classify(Some(&proj(&[(&before, false)])), &proj(&[(&learnt, false)])),
        Change::Progress
    );
}

/// Simulates one agent for `horizon` s with completions at the given
/// instants (seconds), polling every 100 ms as the agent does; returns the
/// write instants.
fn simulate(interval: Duration, completions: &[f64], horizon: f64) -> Vec<f64> {
    let t0 = Instant::now();
    let mut last_write: Option<Instant> = None;
    let mut last: Option<Projection> = None;
    let mut dirty_since: Option<Instant> = None;
    let mut writes = Vec::new();
    let end_ms = (horizon * 1000.0) as u64;
    for t_ms in (0..=end_ms).step_by(100) {
        let t = t_ms as f64 / 1000.0;
        let now = t0 + Duration::from_millis(t_ms);
        let entries: Vec<NodeDistributionStatus> = completions
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let phase = if *c <= t {
                    NodePhase::Complete
                } else {
                    NodePhase::Downloading
                };
                entry(&format!("d{i}"), phase)
            })
            .collect();
        let with: Vec<Entry<'_>> = entries.iter().map(|e| (e, false)).collect();
        let p = proj(&with);
        let change = classify(last.as_ref(), &p);
        if change == Change::Progress {
            dirty_since = None;
        } else {
            dirty_since.get_or_insert(now);
        }
        if next_write(now, last_write, interval, change, dirty_since) <= now {
            writes.push(t);
            last_write = Some(now);
            last = Some(p);
            dirty_since = None;
        }
    }
    writes
}

#[test]
fn completions_close_together_share_one_write() {
    // 5,000 nodes: interval 250 s, hold 25 s. Three completions within
    // 20 s cost one write (25 s after the first), which also restarts
    // the periodic schedule.
    let interval = report_interval(Some(budget::report_interval_seconds(5_000)));
    let writes = simulate(interval, &[100.0, 110.0, 120.0], 400.0);
    assert_eq!(writes.len(), 3, "{writes:?}");
    assert!((writes[1] - 125.0).abs() < 0.11, "{writes:?}");
    assert!((writes[2] - 375.0).abs() < 0.11, "{writes:?}");
}

#[test]
fn five_thousand_agents_stay_within_the_cluster_budget() {
    let nodes = 5_000u32;
    let interval = budget::report_interval_seconds(nodes as usize);
    assert_eq!(interval, 250);
    // One agent with nothing changing writes once per interval...
    let horizon = 1_000.0;
    let writes = simulate(report_interval(Some(interval)), &[], horizon);
    assert_eq!(writes.len(), 5, "{writes:?}");
    assert_eq!((writes.len() - 1) as f64 / horizon, 1.0 / 250.0);
    // ...so the cluster writes 5,000 / 250 = 20 per second periodically.
    assert_eq!(f64::from(nodes) / f64::from(interval), 20.0);
}
