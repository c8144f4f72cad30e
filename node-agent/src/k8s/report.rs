//! When the agent writes its NodeFill status (docs/control-path.md "Status
//! and budget"; the budget itself is `peerfill_crds::budget`).
//!
//! Each write carries the whole status, so what matters is only when the
//! next one is due. The status is reduced to a [`Projection`]; comparing it
//! with the one last written classifies the difference as a [`Change`]:
//!
//! - [`Change::Urgent`] — the endpoint, the identity (request,
//!   fingerprint), an assignment dropped, a distribution `Failed`, or what
//!   only a hash authority reports (size, root, origin version): others
//!   wait on it, so it goes out at once, never more than once per
//!   [`MIN_WRITE_SPACING`];
//! - [`Change::Routine`] — a distribution `Complete` here: held for
//!   `state_hold_seconds(interval)` from when it was first seen, so that
//!   completions close together share one write (and one label patch);
//! - [`Change::Progress`] — anything else (an assignment taken on,
//!   `Pending` → `Downloading`, reasons while waiting, counters): written
//!   with the next periodic write, one report interval after the last.
//!
//! A periodic write is also the heartbeat, so every agent writes at least
//! once per interval and the operator's staleness bound
//! (`agent_stale_after_seconds`) holds. The simulated agents of
//! `peerfill-scale` call the same functions.

use std::collections::BTreeSet;
use std::time::Duration;

use peerfill_crds::{NodeDistributionStatus, NodePhase, budget};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Shortest time between two status writes of one agent.
pub const MIN_WRITE_SPACING: Duration = Duration::from_secs(1);

/// Report interval when the spec does not say
/// (`peerfill_crds::budget::MIN_REPORT_INTERVAL_SECONDS`).
pub fn report_interval(spec_seconds: Option<u32>) -> Duration {
    let secs = spec_seconds
        .unwrap_or(budget::MIN_REPORT_INTERVAL_SECONDS)
        .max(1);
    Duration::from_secs(u64::from(secs))
}

/// How long a routine change is held at this report interval.
pub fn state_hold(interval: Duration) -> Duration {
    let secs = u32::try_from(interval.as_secs()).unwrap_or(u32::MAX);
    Duration::from_secs(u64::from(budget::state_hold_seconds(secs)))
}

/// What a status differs in from the one last written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Nothing that needs a write before the periodic one.
    Progress,
    Routine,
    Urgent,
}

/// The parts of a status that decide the [`Change`].
#[derive(Clone, Debug, PartialEq)]
pub struct Projection {
    /// Endpoint, identity, and the entries others wait on.
    urgent: Value,
    /// Every listed uid.
    uids: BTreeSet<String>,
    /// `(uid, content id, digest)` of every entry complete here.
    complete: BTreeSet<(String, Option<String>, Option<String>)>,
}

/// One entry as the projection sees it: the entry and whether this node
/// is a hash authority of it (an origin reader or the seeder).
pub type Entry<'a> = (&'a NodeDistributionStatus, bool);

/// The projection of a status with `endpoint`, `fingerprint`, the
/// certificate `request` (its digest) and `entries`.
pub fn projection(
    endpoint: Option<&str>,
    fingerprint: Option<&str>,
    request: &str,
    entries: &[Entry<'_>],
) -> Projection {
    // Only an authority's size, root and origin version are read
    // (control-path.md "Trust model"); a failure is news from anyone.
    let loud: Vec<Value> = entries
        .iter()
        .filter(|(e, authority)| *authority || e.phase == NodePhase::Failed)
        .map(|(e, authority)| {
            let pins = authority.then(|| json!([e.size, e.root, e.origin_version]));
            let failed = (e.phase == NodePhase::Failed).then_some(&e.reason);
            json!([e.uid, e.content_id, pins, failed])
        })
        .collect();
    Projection {
        urgent: json!({
            "endpoint": endpoint,
            "fingerprint": fingerprint,
            "request": request,
            "entries": loud,
        }),
        uids: entries.iter().map(|(e, _)| e.uid.clone()).collect(),
        complete: entries
            .iter()
            .filter(|(e, _)| e.phase == NodePhase::Complete)
            .map(|(e, _)| (e.uid.clone(), e.content_id.clone(), e.digest.clone()))
            .collect(),
    }
}

/// The change from `last` (the last status written; `None` before the
/// first) to `new`. An entry gone is urgent: the operator waits for it to
/// release a finalizer.
pub fn classify(last: Option<&Projection>, new: &Projection) -> Change {
    let Some(last) = last else {
        return Change::Urgent;
    };
    if last.urgent != new.urgent || !last.uids.is_subset(&new.uids) {
        Change::Urgent
    } else if !new.complete.is_subset(&last.complete) {
        Change::Routine
    } else {
        Change::Progress
    }
}

/// The instant of the next status write: now when nothing was written yet;
/// an urgent change one [`MIN_WRITE_SPACING`] after the last write at the
/// earliest; a routine one [`state_hold`] after it was first seen
/// (`dirty_since`); otherwise (progress and heartbeat) one `interval`
/// after the last write. Never later than the periodic write. The caller
/// writes when the returned instant is not in the future.
pub fn next_write(
    now: Instant,
    last_write: Option<Instant>,
    interval: Duration,
    change: Change,
    dirty_since: Option<Instant>,
) -> Instant {
    let Some(last) = last_write else {
        return now;
    };
    let periodic = last + interval.max(MIN_WRITE_SPACING);
    let spaced = last + MIN_WRITE_SPACING;
    match change {
        Change::Urgent => spaced.max(now),
        Change::Routine => {
            let held = dirty_since.unwrap_or(now) + state_hold(interval);
            held.max(spaced).min(periodic)
        }
        Change::Progress => periodic,
    }
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
