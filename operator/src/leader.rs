//! Leader election on a `coordination.k8s.io/v1` Lease, in the manner of
//! client-go: optimistic concurrency on `resourceVersion`, expiry judged by
//! the local clock from when this replica last saw the record change (so a
//! skewed clock elsewhere cannot steal or keep a lease).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};

use crate::error::Error;

/// What to do with the Lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it holding it.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Free or expired: take it over (one more transition).
    TakeOver,
    /// Someone else holds it and it has not expired.
    Standby { holder: String },
}

/// The decision for `me`, given the Lease (if any), the moment this replica
/// first saw its current record (`observed_at`) and the local time `now`.
pub fn decide(lease: Option<&LeaseSpec>, me: &str, observed_at: Instant, now: Instant) -> Decision {
    let Some(spec) = lease else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let duration =
        Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
    if now.saturating_duration_since(observed_at) >= duration {
        Decision::TakeOver
    } else {
        Decision::Standby {
            holder: holder.to_string(),
        }
    }
}

/// The Lease spec after `decision` (not for `Standby`).
pub fn next_spec(
    current: Option<&LeaseSpec>,
    decision: &Decision,
    me: &str,
    duration_seconds: i32,
    now: Timestamp,
) -> LeaseSpec {
    let mut spec = current.cloned().unwrap_or_default();
    match decision {
        Decision::Renew => {}
        Decision::Create | Decision::TakeOver | Decision::Standby { .. } => {
            let transitions = spec.lease_transitions.unwrap_or(0);
            spec.lease_transitions = Some(if current.is_some() {
                transitions + 1
            } else {
                0
            });
            spec.acquire_time = Some(MicroTime(now));
            spec.holder_identity = Some(me.to_string());
        }
    }
    if spec.acquire_time.is_none() {
        spec.acquire_time = Some(MicroTime(now));
    }
    spec.lease_duration_seconds = Some(duration_seconds);
    spec.renew_time = Some(MicroTime(now));
    spec
}

/// Timing of the election.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    namespace: String,
    identity: String,
    timing: Timing,
    /// The record last seen and when it was first seen.
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
    /// Whether this replica has acquired the lease (a restarted replica
    /// with the same identity renews the old record: still an acquisition).
    holding: bool,
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            timing,
            observed: None,
            holding: false,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One attempt: true when we hold the lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, Error> {
        let lease_err = |source| Error::Lease {
            name: format!("{}/{}", self.namespace, self.name),
            source,
        };
        let current = self.api.get_opt(&self.name).await.map_err(lease_err)?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let now = Instant::now();
        let record = (
            spec.and_then(|s| s.holder_identity.clone()),
            spec.and_then(|s| s.renew_time.clone()),
        );
        let observed_at = match &self.observed {
            Some((h, r, at)) if (h, r) == (&record.0, &record.1) => *at,
            _ => {
                self.observed = Some((record.0.clone(), record.1.clone(), now));
                now
            }
        };
        let decision = decide(
            current
                .as_ref()
                .map(|l| l.spec.clone().unwrap_or_default())
                .as_ref(),
            &self.identity,
            observed_at,
            now,
        );
        if let Decision::Standby { .. } = decision {
            return Ok(false);
        }
        let duration = i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let next = next_spec(spec, &decision, &self.identity, duration, Timestamp::now());
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(next),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                // replace carries metadata.resourceVersion: a concurrent
                // writer makes this fail with 409 instead of both winning.
                lease.spec = Some(next);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(lease) => {
                let s = lease.spec.as_ref();
                self.observed = Some((
                    s.and_then(|s| s.holder_identity.clone()),
                    s.and_then(|s| s.renew_time.clone()),
                    Instant::now(),
                ));
                if decision != Decision::Renew || !self.holding {
                    self.holding = true;
                    tracing::info!(
                        lease = %format!("{}/{}", self.namespace, self.name),
                        identity = %self.identity,
                        "acquired lease {}/{} as {}",
                        self.namespace,
                        self.name,
                        self.identity
                    );
                }
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(lease_err(e)),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&mut self) -> Result<(), Error> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "lease acquisition attempt failed"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews every retry period; returns (an error) once the lease is lost
    /// or could not be renewed within the renew deadline.
    pub async fn hold(mut self) -> Result<(), Error> {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => {
                    // Someone else holds it now (or a conflict): check again
                    // until the deadline passes.
                    if self
                        .observed
                        .as_ref()
                        .is_some_and(|(h, _, _)| h.as_deref() != Some(self.identity.as_str()))
                    {
                        return Err(Error::LostLease {
                            holder: self.observed.and_then(|o| o.0).unwrap_or_default(),
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
            if last_renewal.elapsed() >= self.timing.renew_deadline {
                return Err(Error::LostLease {
                    holder: String::from("<unknown: renew deadline passed>"),
                });
            }
        }
    }
}

/// The Lease API of `namespace`.
pub fn lease_api(client: &Client, namespace: &str) -> Api<Lease> {
    Api::namespaced(client.clone(), namespace)
}

/// Gives up Lease `name` if `identity` holds it: clears the holder so a
/// standby takes it over at its next retry.
pub async fn release(api: &Api<Lease>, name: &str, identity: &str) -> Result<(), Error> {
    let lease_err = |source| Error::Lease {
        name: name.to_string(),
        source,
    };
    let Some(mut lease) = api.get_opt(name).await.map_err(lease_err)? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => {
            tracing::info!(lease = name, %identity, "released the leader lease");
            Ok(())
        }
        // Someone changed it meanwhile: it is not ours to release any more.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(lease_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: (!holder.is_empty()).then(|| holder.to_string()),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let cases: Vec<(&str, Option<LeaseSpec>, Instant, Decision)> = vec![
            ("no lease", None, at(0), Decision::Create),
            ("ours", Some(spec("me", 15)), at(100), Decision::Renew),
            ("free", Some(spec("", 15)), at(0), Decision::TakeOver),
            (
                "held, fresh",
                Some(spec("other", 15)),
                at(14),
                Decision::Standby {
                    holder: "other".into(),
                },
            ),
            (
                "held, expired",
                Some(spec("other", 15)),
                at(15),
                Decision::TakeOver,
            ),
            (
                "held, no duration",
                Some(spec("other", 0)),
                at(0),
                Decision::TakeOver,
            ),
        ];
        for (what, lease, now, want) in cases {
            assert_eq!(decide(lease.as_ref(), "me", t0, now), want, "{what}");
        }
    }

    #[test]
    fn specs_after_decisions() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let created = next_spec(None, &Decision::Create, "me", 15, now);
        assert_eq!(created.holder_identity.as_deref(), Some("me"));
        assert_eq!(created.lease_transitions, Some(0));
        assert_eq!(created.lease_duration_seconds, Some(15));
        assert_eq!(created.acquire_time, Some(MicroTime(now)));

        let later = Timestamp::from_second(1_700_000_010).unwrap();
        let renewed = next_spec(Some(&created), &Decision::Renew, "me", 15, later);
        assert_eq!(
            renewed.acquire_time,
            Some(MicroTime(now)),
            "renewal keeps acquireTime"
        );
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));
        assert_eq!(renewed.lease_transitions, Some(0));

        let taken = next_spec(
            Some(&spec("other", 15)),
            &Decision::TakeOver,
            "me",
            15,
            later,
        );
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(later)));
    }
}
