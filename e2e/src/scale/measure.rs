//! The measured phase of a scale run: apply the Distributions, sample the
//! stand-in's counters and the operator's `/proc/<pid>/stat` once a second
//! until every Distribution is `Complete` (or the limit), then size the
//! stored objects. The figures are computed by pure functions
//! ([`window_rate`], [`peak_rate`], [`parse_stat`]) from the samples.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use peerfill_crds::{Distribution, NodeFill, Phase};

use super::agent::Shared;
use super::report::{Report, Sample};
use super::{Options, ScaleError, dist_name, kube_err};
use crate::apiserver::ApiServerHandle;

/// Verbs that write.
const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// Writes served so far by `verb resource[/subresource]`.
fn writes(api: &ApiServerHandle) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (k, n) in api.request_counts() {
        if WRITE_VERBS.contains(&k.verb.as_str()) {
            let sub = if k.subresource.is_empty() {
                String::new()
            } else {
                format!("/{}", k.subresource)
            };
            *out.entry(format!("{} {}{sub}", k.verb, k.resource))
                .or_default() += n;
        }
    }
    out
}

/// CPU time (clock ticks, user + system) and resident pages from the text
/// of `/proc/<pid>/stat` (fields 14, 15 and 24; the command name, field 2,
/// may hold spaces and parentheses, so fields are counted after its `)`).
pub fn parse_stat(text: &str) -> Option<(u64, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some((field(14)? + field(15)?, field(24)?))
}

fn proc_sample(pid: u32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (ticks, pages) = parse_stat(&text)?;
    // SAFETY: sysconf has no side effects.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    Some((
        ticks as f64 / hz.max(1) as f64,
        (pages as f64 * page.max(1) as f64) / (1024.0 * 1024.0),
    ))
}

/// Mean rate of a counter over the samples `(t, value)`.
pub fn window_rate(samples: &[(f64, f64)]) -> f64 {
    match (samples.first(), samples.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) / (b.0 - a.0),
        _ => 0.0,
    }
}

/// Highest rate of a counter over any `window` seconds (samples about a
/// second apart); the mean rate when the run is shorter.
pub fn peak_rate(samples: &[(f64, f64)], window: f64) -> f64 {
    let mut peak: f64 = 0.0;
    let mut j = 0;
    for i in 0..samples.len() {
        while j < samples.len() && samples[j].0 - samples[i].0 < window {
            j += 1;
        }
        let Some(end) = samples.get(j) else { break };
        peak = peak.max((end.1 - samples[i].1) / (end.0 - samples[i].0));
    }
    if peak == 0.0 {
        window_rate(samples)
    } else {
        peak
    }
}

/// Applies the Distributions and measures until they are all `Complete`.
pub async fn measure(
    opts: &Options,
    api: &ApiServerHandle,
    client: &kube::Client,
    shared: &Arc<Shared>,
    pid: u32,
    bringup: Duration,
) -> Result<Report, ScaleError> {
    let dists: Api<Distribution> = Api::namespaced(client.clone(), "default");
    let complete_at: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let watch = {
        let complete_at = complete_at.clone();
        let dists = dists.clone();
        tokio::spawn(async move {
            let mut s = std::pin::pin!(
                watcher(dists, watcher::Config::default())
                    .default_backoff()
                    .applied_objects()
            );
            while let Some(Ok(d)) = s.next().await {
                if d.status.as_ref().and_then(|s| s.phase) == Some(Phase::Complete)
                    && let Some(name) = d.metadata.name.clone()
                    && let Ok(mut map) = complete_at.lock()
                {
                    map.entry(name).or_insert_with(Instant::now);
                }
            }
        })
    };
    let w0 = writes(api);
    let e0 = api.watch_events_sent() as f64;
    let start = Instant::now();
    for d in super::distributions(opts, &shared.root)? {
        dists
            .create(&PostParams::default(), &d)
            .await
            .map_err(kube_err("creating a Distribution"))?;
    }
    let mut samples: Vec<Sample> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let t = start.elapsed().as_secs_f64();
        let (cpu, rss) = proc_sample(pid).unwrap_or((f64::NAN, f64::NAN));
        samples.push(Sample {
            t,
            writes: writes(api).values().sum::<u64>() as f64,
            watch_events: api.watch_events_sent() as f64 - e0,
            operator_cpu_s: cpu,
            operator_rss_mib: rss,
            nodes_complete: shared
                .record
                .lock()
                .map(|r| r.complete.values().map(BTreeMap::len).sum::<usize>())
                .unwrap_or_default(),
        });
        let done = complete_at.lock().map(|m| m.len()).unwrap_or_default();
        if done == opts.distributions || start.elapsed() > opts.limit {
            break;
        }
    }
    watch.abort();
    let duration = start.elapsed().as_secs_f64();
    let w1 = writes(api);
    let by_kind: BTreeMap<String, u64> = w1
        .iter()
        .map(|(k, n)| (k.clone(), n - w0.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    // The figures are in: a failed listing costs only this one.
    let largest = largest_object(client).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "sizing the stored objects");
        (0, format!("unmeasured: {e}"))
    });

    let series = |f: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        samples
            .iter()
            .map(|s| (s.t, f(s)))
            .filter(|p| p.1.is_finite())
            .collect()
    };
    let writes_series = series(|s| s.writes);
    let cpu = series(|s| s.operator_cpu_s);
    let rss_max = samples
        .iter()
        .map(|s| s.operator_rss_mib)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let interval = peerfill_crds::budget::report_interval_seconds(opts.nodes);

    let record = shared
        .record
        .lock()
        .map_err(|_| ScaleError::Agent("record lock poisoned".into()))?;
    let complete_at = complete_at.lock().map(|m| m.clone()).unwrap_or_default();
    let mut apply_to_all = Vec::new();
    let mut lags = Vec::new();
    let mut complete_nodes = BTreeMap::new();
    for d in (0..opts.distributions).map(dist_name) {
        let specified = record.specified.get(&d);
        if specified.is_some_and(|m| m.len() == opts.nodes) {
            let last = specified.and_then(|m| m.values().max()).copied();
            apply_to_all.extend(last.map(|l| l.duration_since(start).as_secs_f64()));
        }
        let done = record.complete.get(&d);
        complete_nodes.insert(d.clone(), done.map_or(0, BTreeMap::len));
        if let (Some(last), Some(at)) = (done.and_then(|m| m.values().max()), complete_at.get(&d)) {
            lags.push(at.saturating_duration_since(*last).as_secs_f64());
        }
    }
    let max = |v: &[f64]| (!v.is_empty()).then(|| v.iter().copied().fold(0.0, f64::max));
    Ok(Report {
        nodes: opts.nodes,
        distributions: opts.distributions,
        size_bytes: opts.size,
        report_interval_s: interval,
        bringup_s: bringup.as_secs_f64(),
        duration_s: duration,
        all_complete: complete_at.len() == opts.distributions,
        complete_nodes,
        writes_per_s_mean: window_rate(&writes_series),
        writes_per_s_peak_10s: peak_rate(&writes_series, 10.0),
        writes_by_kind: by_kind,
        agent_status_writes_state: record.state_writes,
        agent_status_writes_periodic: record.periodic_writes,
        watch_events_per_s: window_rate(&series(|s| s.watch_events)),
        operator_rss_mib: rss_max,
        operator_cpu_cores_mean: window_rate(&cpu),
        largest_object_bytes: largest.0,
        largest_object: largest.1,
        apply_to_all_specified_s: max(&apply_to_all),
        status_lag_s: max(&lags),
        samples,
    })
}

/// The largest stored Node, NodeFill or Distribution, as JSON bytes.
async fn largest_object(client: &kube::Client) -> Result<(usize, String), ScaleError> {
    let candidates = [
        largest_of::<NodeFill>(client, "NodeFill").await?,
        largest_of::<Node>(client, "Node").await?,
        largest_of::<Distribution>(client, "Distribution").await?,
    ];
    // The first of equals wins, in the order above.
    Ok(candidates.into_iter().fold(
        (0, String::new()),
        |best, c| if c.0 > best.0 { c } else { best },
    ))
}

/// The largest object of one kind, as JSON bytes and `Kind/name`.
async fn largest_of<K>(client: &kube::Client, kind: &str) -> Result<(usize, String), ScaleError>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let objects = Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(kube_err(format!("listing {kind}s")))?;
    Ok(objects.into_iter().fold((0, String::new()), |best, o| {
        let len = serde_json::to_vec(&o).map_or(0, |v| v.len());
        if len > best.0 {
            let name = o.meta().name.clone().unwrap_or_default();
            (len, format!("{kind}/{name}"))
        } else {
            best
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with a space and a parenthesis.
        let text = "42 (a b)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 123456789 3000 18446744073709551615";
        assert_eq!(parse_stat(text), Some((300, 3000)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn rates_over_the_run_and_the_busiest_ten_seconds() {
        // 5 writes/s for 20 s, then 50/s for 10 s, then idle for 10 s.
        let mut samples = Vec::new();
        let mut total = 0.0;
        for t in 0..=40 {
            samples.push((f64::from(t), total));
            total += match t {
                0..20 => 5.0,
                20..30 => 50.0,
                _ => 0.0,
            };
        }
        assert!((window_rate(&samples) - 600.0 / 40.0).abs() < 1e-9);
        assert!((peak_rate(&samples, 10.0) - 50.0).abs() < 1e-9);
        assert_eq!(window_rate(&samples[..1]), 0.0);
    }
}
