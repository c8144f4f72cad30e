//! Events on the agent's NodeFill, aggregated as Kubernetes event series.
//!
//! A failure that repeats (a full disk retried every few seconds, an
//! origin that keeps timing out) must not cost one API write per attempt:
//! at 5,000 nodes that alone would exceed the cluster's write budget. So
//! there is one `events.k8s.io/v1` Event per reason per NodeFill (the
//! Events API's "isomorphic" events): the first occurrence creates it, the
//! following ones only count in memory, and the count (`series.count`,
//! `series.lastObservedTime`, the latest note) is patched at most once per
//! [`SERIES_FLUSH`] — client-go's event broadcaster does the same with a
//! 30-minute heartbeat. Only Warnings are recorded: a distribution
//! completing on a node is in the NodeFill status (phase and transition
//! time) and in the Node label, and the Distribution gets its own
//! `Complete` Event from the operator; one more Event per node would add
//! 5,000 writes per Distribution at 5,000 nodes and tell no one anything
//! new.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::time::Instant;
use tracing::debug;

/// Longest an unwritten count stays in memory.
pub const SERIES_FLUSH: Duration = Duration::from_secs(600);

/// What to write for a series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventWrite {
    /// The first occurrence: a new Event.
    Create { reason: String, note: String },
    /// Later occurrences: the count of the Event `name`.
    Count {
        reason: String,
        name: String,
        count: u32,
        note: String,
    },
}

#[derive(Clone, Debug)]
struct Series {
    /// The Event's name once it was created.
    name: Option<String>,
    count: u32,
    written: u32,
    last_written: Instant,
    note: String,
}

/// The series of one NodeFill's Warnings, by reason (pure; no I/O).
#[derive(Clone, Debug, Default)]
pub struct Aggregator {
    series: BTreeMap<String, Series>,
}

impl Aggregator {
    /// One occurrence of `reason` at `now`: the write it needs at once
    /// (only the first occurrence has one).
    pub fn record(&mut self, reason: &str, note: String, now: Instant) -> Option<EventWrite> {
        match self.series.get_mut(reason) {
            Some(s) => {
                s.count = s.count.saturating_add(1);
                s.note = note;
                None
            }
            None => {
                self.series.insert(
                    reason.to_string(),
                    Series {
                        name: None,
                        count: 1,
                        written: 1,
                        last_written: now,
                        note: note.clone(),
                    },
                );
                Some(EventWrite::Create {
                    reason: reason.to_string(),
                    note,
                })
            }
        }
    }

    /// The Event `name` of `reason` exists.
    pub fn created(&mut self, reason: &str, name: String) {
        if let Some(s) = self.series.get_mut(reason) {
            s.name = Some(name);
        }
    }

    /// The counts due at `now`: moved since their last write, which was at
    /// least [`SERIES_FLUSH`] ago; marked written.
    pub fn due(&mut self, now: Instant) -> Vec<EventWrite> {
        let mut out = Vec::new();
        for (reason, s) in &mut self.series {
            let Some(name) = &s.name else { continue };
            if s.count > s.written && now.saturating_duration_since(s.last_written) >= SERIES_FLUSH
            {
                s.written = s.count;
                s.last_written = now;
                out.push(EventWrite::Count {
                    reason: reason.clone(),
                    name: name.clone(),
                    count: s.count,
                    note: s.note.clone(),
                });
            }
        }
        out
    }
}

/// Writes one series update for the NodeFill `regarding`; returns the
/// name of a created Event. Events are best effort: errors are logged.
pub async fn write(
    client: &Client,
    regarding: &ObjectReference,
    instance: &str,
    w: EventWrite,
) -> Option<String> {
    // A NodeFill is cluster-scoped: its Events live in `default`, as
    // kube's and client-go's recorders put them.
    let namespace = regarding
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let now = Timestamp::now();
    match w {
        EventWrite::Create { reason, note } => {
            let name = format!(
                "{}.{:x}",
                regarding.name.as_deref().unwrap_or("peerfill-agent"),
                now.as_nanosecond()
            );
            let ev = Event {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace),
                    ..ObjectMeta::default()
                },
                action: Some("Fill".into()),
                reason: Some(reason),
                note: Some(note.chars().take(1000).collect()),
                event_time: Some(MicroTime(now)),
                regarding: Some(regarding.clone()),
                reporting_controller: Some("peerfill-agent".into()),
                reporting_instance: Some(instance.to_string()),
                type_: Some("Warning".into()),
                ..Event::default()
            };
            match api.create(&PostParams::default(), &ev).await {
                Ok(_) => Some(name),
                Err(e) => {
                    debug!(error = %e, "cannot record an event");
                    None
                }
            }
        }
        EventWrite::Count {
            name, count, note, ..
        } => {
            let series = EventSeries {
                count: i32::try_from(count).unwrap_or(i32::MAX),
                last_observed_time: MicroTime(now),
            };
            let patch =
                json!({ "series": series, "note": note.chars().take(1000).collect::<String>() });
            if let Err(e) = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                debug!(error = %e, "cannot update an event series");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_reason_and_counts_at_most_every_ten_minutes() {
        let t0 = Instant::now();
        let mut a = Aggregator::default();
        let first = a.record("InsufficientSpace", "disk full".into(), t0);
        assert_eq!(
            first,
            Some(EventWrite::Create {
                reason: "InsufficientSpace".into(),
                note: "disk full".into()
            })
        );
        a.created("InsufficientSpace", "n1.abc".into());
        // Retried every 5 s for 20 minutes: no write per retry...
        let mut writes = Vec::new();
        for i in 1..=240u32 {
            let now = t0 + Duration::from_secs(u64::from(i) * 5);
            assert_eq!(a.record("InsufficientSpace", format!("try {i}"), now), None);
            writes.extend(a.due(now));
        }
        // ...but one count update per ten minutes, the latest note with it.
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert_eq!(
            writes[0],
            EventWrite::Count {
                reason: "InsufficientSpace".into(),
                name: "n1.abc".into(),
                count: 121,
                note: "try 120".into()
            }
        );
        // Another reason is its own Event; nothing moved, nothing due.
        assert!(matches!(
            a.record("StorageError", "eio".into(), t0),
            Some(EventWrite::Create { .. })
        ));
        assert!(a.due(t0 + Duration::from_secs(1_250)).is_empty());
    }
}
