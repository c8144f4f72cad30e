//! Issue 14: a real Prometheus in the loop. One local cluster, one
//! Prometheus scraping its operator and agents every second (targets
//! labelled like the chart's PodMonitors), with the chart's alert rules as
//! `helm template` renders them (short `for:` and windows via values):
//!
//! 1. A distribution from a rate-capped origin; then every query of every
//!    panel of the shipped Grafana dashboard, run through the HTTP API over
//!    that window, returns data (the origin-error queries excepted: a
//!    healthy run has none), and the swarm-throughput panel's mean agrees
//!    with the bytes the agents received / the time within 20 %. No alert
//!    fires.
//! 2. Faults, all at once: a Distribution whose origin stops sending
//!    (stuck), one whose origin bytes do not match the pinned digest
//!    (verification failure, nodes failing), one whose URL answers 404
//!    (origin errors), an agent killed (not ready). Each alert of the chart
//!    must be reported firing; then every dashboard query (errors included)
//!    returns data over the whole run.
//!
//! Prometheus is Debian's package (`e2e/tools/install-prometheus.sh`);
//! `e2e/run-tests` exports `$PROMETHEUS` and `PEERFILL_REQUIRE_PROMETHEUS=1`,
//! under which a missing binary fails the test. Elsewhere it is skipped
//! with the reason printed. helm comes from `$HELM` or `.tools/bin/helm`.
//! Needs the binaries: `cargo build --workspace --bins`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use common::cluster::{MIB, start, wait_complete};
use peerfill_e2e::cluster::{Cluster, LocalCluster, Origin, generate, http_distribution};
use peerfill_e2e::prom::dashboard::{self, PanelQuery, Vars};
use peerfill_e2e::prom::{self, Prometheus};

const REQUIRE_ENV: &str = "PEERFILL_REQUIRE_PROMETHEUS";
const NODES: usize = 4;
/// Content of the healthy run, and the origin's cap: about 8 s for the one
/// copy that leaves the origin, long enough for 1 s scrapes to see a curve.
const SIZE: u64 = 64 * MIB;
const ORIGIN_RATE: u64 = 8 * MIB;
/// Grafana's `$__rate_interval` for a 1 s scrape: max(4 x scrape, step + scrape).
const RATE_INTERVAL: f64 = 4.0;
/// Bound of the wait for every alert to fire.
const ALERTS_WAIT: Duration = Duration::from_secs(150);
/// The alerts the chart ships.
const ALERTS: [&str; 5] = [
    "PeerfillDistributionStuck",
    "PeerfillNodesFailing",
    "PeerfillOriginErrors",
    "PeerfillVerificationFailures",
    "PeerfillAgentNotReady",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_panels_and_alerts_on_a_real_prometheus() -> Result<()> {
    let Some(binary) = prometheus_or_skip()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let rules = render_rules(dir.path(), &binary)?;

    let mut cluster = start(NODES, |o| o.wait_ready = Some(Duration::from_secs(90))).await?;
    let local = cluster.local().context("needs the local cluster")?;
    let targets = prom::cluster_targets(local);
    let p = Prometheus::start(&binary, &dir.path().join("prom"), &targets, &[rules]).await?;
    println!(
        "prometheus at {} scraping {} targets",
        p.url(),
        targets.len()
    );
    wait_targets_up(&p, targets.len()).await?;

    let healthy = healthy_run(&cluster, &p)
        .await
        .map_err(|e| anyhow!("{e:#}\nprometheus log:\n{}", p.log_tail(30)))?;
    let faults_from = prom::now();
    let _keep = faults(&mut cluster, &p).await?;

    // Every query, the error ones included, over the whole run.
    let vars = vars(prom::now() - healthy.0);
    for q in panel_queries(&vars)? {
        let got = p.query_range(&q.expr, healthy.0, prom::now(), 1.0).await?;
        ensure!(
            !got.is_empty(),
            "panel {:?}: no data over the whole run: {}",
            q.panel,
            q.expr
        );
    }
    println!(
        "every dashboard query returned data; faults phase took {:.0}s",
        prom::now() - faults_from
    );
    Ok(())
}

/// The prometheus binary, `None` (test skipped, reason printed) when it is
/// missing and the test command did not ask for it.
fn prometheus_or_skip() -> Result<Option<PathBuf>> {
    match prom::find_binary() {
        Ok(p) => Ok(Some(p)),
        Err(e) if std::env::var_os(REQUIRE_ENV).is_some() => {
            bail!("{e} ({REQUIRE_ENV} is set: e2e/run-tests installs it)")
        }
        Err(e) => {
            println!("SKIPPED: {e}");
            Ok(None)
        }
    }
}

/// The chart's PrometheusRule, rendered by helm with short durations, as a
/// Prometheus rule file (checked by promtool when it is next to prometheus).
fn render_rules(dir: &Path, prometheus: &Path) -> Result<PathBuf> {
    let helm = helm()?;
    let chart = common::workspace_root().join("charts/peerfill");
    let mut sets = vec![
        "prometheusRule.enabled=true".to_string(),
        "prometheusRule.rateWindow=30s".to_string(),
    ];
    for alert in [
        "stuck",
        "nodesFailing",
        "originErrors",
        "verification",
        "agentNotReady",
    ] {
        sets.push(format!("prometheusRule.{alert}.for=5s"));
    }
    let mut cmd = Command::new(&helm);
    cmd.args(["template", prom::RELEASE])
        .arg(&chart)
        .args(["--namespace", prom::NAMESPACE])
        .args(["--show-only", "templates/prometheusrule.yaml"])
        .env("HELM_CACHE_HOME", dir.join("helm-cache"))
        .env("HELM_CONFIG_HOME", dir.join("helm-config"))
        .env("HELM_DATA_HOME", dir.join("helm-data"))
        .env("KUBECONFIG", "/dev/null");
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().context("running helm")?;
    ensure!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_saphyr::from_str(&String::from_utf8(out.stdout)?)
        .context("parsing the rendered PrometheusRule")?;
    ensure!(doc["kind"] == "PrometheusRule", "rendered {doc}");
    let path = dir.join("rules.yml");
    std::fs::write(&path, serde_json::to_string_pretty(&doc["spec"])?)?;
    if let Some(promtool) = prometheus.parent().map(|d| d.join("promtool"))
        && promtool.is_file()
    {
        let out = Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&path)
            .output()
            .context("running promtool")?;
        ensure!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(path)
}

fn helm() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HELM").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let local = common::workspace_root().join(".tools/bin/helm");
    if local.is_file() {
        return Ok(local);
    }
    let script = common::workspace_root().join("e2e/tools/install-helm.sh");
    let out = Command::new("bash").arg(&script).output()?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout)?;
    Ok(PathBuf::from(path.trim()))
}

async fn wait_targets_up(p: &Prometheus, n: usize) -> Result<()> {
    let start = Instant::now();
    loop {
        let up = p.query("sum(up)", prom::now()).await?;
        let count = up.first().map_or(0.0, |s| s.value);
        if count as usize == n {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "{count} of {n} targets up after 30s: {:?}",
            p.query("up", prom::now()).await?
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn vars(range_secs: f64) -> Vars {
    Vars {
        namespace: prom::NAMESPACE.to_string(),
        rate_interval: format!("{RATE_INTERVAL}s"),
        range: format!("{}s", range_secs.ceil().max(1.0)),
    }
}

fn panel_queries(vars: &Vars) -> Result<Vec<PanelQuery>> {
    let path = common::workspace_root().join(dashboard::DASHBOARD);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let q = dashboard::queries(&text, vars)?;
    ensure!(q.len() >= 10, "only {} queries in the dashboard", q.len());
    Ok(q)
}

/// Total `peerfill_agent_received_bytes_total` over the agents, read from
/// their endpoints directly (not through Prometheus).
fn received_bytes(local: &LocalCluster) -> f64 {
    local
        .nodes()
        .keys()
        .flat_map(|n| {
            local
                .agent_metrics(n)
                .lines()
                .filter(|l| l.starts_with("peerfill_agent_received_bytes_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Phase 1; returns the run's (start, end) timestamps.
async fn healthy_run(cluster: &Cluster, p: &Prometheus) -> Result<(f64, f64)> {
    let local = cluster.local().context("local cluster")?;
    let origin = cluster.origin();
    origin.set_rate_limit(Some(ORIGIN_RATE));
    let blob = origin.add_blob("healthy.bin", SIZE, 11);
    let before = received_bytes(local);
    let t0 = prom::now();
    let d = cluster
        .apply_distribution(&http_distribution("healthy", &blob.url, "healthy.bin"))
        .await?;
    wait_complete(cluster, &d, NODES).await?;
    let t1 = prom::now();
    let moved = received_bytes(local) - before;
    origin.set_rate_limit(None);
    ensure!(
        moved >= (NODES as u64 * SIZE) as f64,
        "agents received {moved} bytes, expected at least {}",
        NODES as u64 * SIZE
    );
    // Let the last scrapes and the rate window catch up.
    tokio::time::sleep(Duration::from_secs_f64(RATE_INTERVAL + 2.0)).await;

    let vars = vars(t1 - t0);
    let mut empty = Vec::new();
    for q in panel_queries(&vars)? {
        let got = p.query_range(&q.expr, t0, t1 + RATE_INTERVAL, 1.0).await?;
        if got.is_empty() {
            empty.push(q);
        }
    }
    for q in &empty {
        println!("healthy run: no data for {:?}: {}", q.panel, q.expr);
    }
    // Only the origin-error queries may be empty: a healthy run has none.
    ensure!(
        empty.iter().all(|q| q.expr.contains(r#"outcome!="ok""#)),
        "panels without data after a healthy run: {:?}",
        empty.iter().map(|q| &q.panel).collect::<Vec<_>>()
    );

    // The swarm-throughput panel against bytes / time. rate() over a
    // window lags by half the window, so its mean is taken over the run
    // shifted by that much.
    let q = panel_queries(&vars)?
        .into_iter()
        .find(|q| q.panel == "Swarm throughput" && q.legend == "received")
        .context("no 'Swarm throughput' received query in the dashboard")?;
    let half = RATE_INTERVAL / 2.0;
    let series = p.query_range(&q.expr, t0 + half, t1 + half, 1.0).await?;
    let points: Vec<f64> = series
        .first()
        .map(|s| s.points.iter().map(|(_, v)| *v).collect())
        .unwrap_or_default();
    ensure!(!points.is_empty(), "no throughput points");
    let panel = points.iter().sum::<f64>() / points.len() as f64;
    let truth = moved / (t1 - t0);
    let err = (panel - truth).abs() / truth;
    println!(
        "healthy run: {:.0} MiB in {:.1}s = {:.1} MiB/s; swarm-throughput panel mean {:.1} MiB/s ({:+.1} %)",
        moved / MIB as f64,
        t1 - t0,
        truth / MIB as f64,
        panel / MIB as f64,
        (panel - truth) / truth * 100.0
    );
    ensure!(
        err <= 0.20,
        "throughput panel {panel:.0} B/s vs {truth:.0} B/s measured: {:.1} % off",
        err * 100.0
    );

    let firing: Vec<String> = p
        .alerts()
        .await?
        .into_iter()
        .filter(|a| a.state == "firing")
        .map(|a| format!("{} {:?}", a.name(), a.labels))
        .collect();
    ensure!(
        firing.is_empty(),
        "alerts firing on a healthy cluster: {firing:?}"
    );
    Ok((t0, t1))
}

/// Waits until the instant query `expr` returns something.
async fn wait_query(p: &Prometheus, expr: &str, bound: Duration) -> Result<()> {
    let start = Instant::now();
    while p.query(expr, prom::now()).await?.is_empty() {
        ensure!(start.elapsed() < bound, "{expr}: nothing after {bound:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// Labels of the firing alerts named `name`.
async fn firing(p: &Prometheus, name: &str) -> Result<Vec<BTreeMap<String, String>>> {
    Ok(p.alerts()
        .await?
        .into_iter()
        .filter(|a| a.state == "firing" && a.name() == name)
        .map(|a| a.labels)
        .collect())
}

/// What the faults phase keeps alive until the end of the test.
struct Faults {
    _stuck_origin: Origin,
}

/// Phase 2: injects every fault and waits until each alert fires.
async fn faults(cluster: &mut Cluster, p: &Prometheus) -> Result<Faults> {
    // Stuck: a slow origin of its own, paused once bytes flow.
    let stuck_origin = Origin::start()?;
    stuck_origin.set_rate_limit(Some(MIB));
    let blob = stuck_origin.add_blob("stuck.bin", 32 * MIB, 21);
    let stuck = cluster
        .apply_distribution(&http_distribution("stuck", &blob.url, "stuck.bin"))
        .await?;
    common::cluster::wait_moving(cluster, &stuck, 1, 1).await?;
    // Moving as the operator sees it, and so not stuck, before the pause.
    let moving = r#"peerfill_operator_distribution_bytes_per_second{distribution="stuck"} > 0"#;
    wait_query(p, moving, Duration::from_secs(60)).await?;
    // A slow start (0 B/s for longer than the test's 5 s `for:`) may have
    // fired it already; while bytes move it must resolve.
    let start = Instant::now();
    loop {
        let early = firing(p, "PeerfillDistributionStuck").await?;
        if early.is_empty() {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "stuck still firing 30 s after bytes moved: {early:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stuck_origin.pause();

    // Corrupt origin bytes: the digest pins other content than served.
    let origin = cluster.origin();
    let blob = origin.add_blob("corrupt.bin", 4 * MIB, 31);
    let pinned = blake3::hash(&generate(32, 0, 4 * MIB));
    let mut corrupt = http_distribution("corrupt", &blob.url, "corrupt.bin");
    if let Some(h) = corrupt.spec.source.http.as_mut() {
        h.digest = Some(format!("blake3:{}", pinned.to_hex()));
    }
    cluster.apply_distribution(&corrupt).await?;

    // Origin errors: a URL that answers 404.
    let missing = http_distribution("missing", &origin.not_found_url(), "missing.bin");
    cluster.apply_distribution(&missing).await?;

    // Not ready: an agent gone.
    let victim = format!("node-{NODES}");
    cluster.kill_agent(&victim).await?;

    let start = Instant::now();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    loop {
        let alerts = p.alerts().await?;
        // Each alert must name the fault's object where it has one.
        let firing: BTreeMap<String, String> = alerts
            .iter()
            .filter(|a| a.state == "firing")
            .filter(|a| match a.name() {
                "PeerfillDistributionStuck" => {
                    a.labels.get("distribution").is_some_and(|d| d == "stuck")
                }
                "PeerfillAgentNotReady" => a.labels.get("node") == Some(&victim),
                "PeerfillVerificationFailures" => {
                    a.labels.get("distribution").is_some_and(|d| d == "corrupt")
                }
                _ => true,
            })
            .map(|a| (a.name().to_string(), format!("{:?}", a.labels)))
            .collect();
        for (name, labels) in &firing {
            if seen.insert(name.clone()) {
                println!(
                    "{:5.1}s firing: {name} {labels}",
                    start.elapsed().as_secs_f64()
                );
            }
        }
        if ALERTS.iter().all(|a| firing.contains_key(*a)) {
            break;
        }
        if start.elapsed() > ALERTS_WAIT {
            let missing: Vec<_> = ALERTS
                .iter()
                .filter(|a| !firing.contains_key(**a))
                .collect();
            bail!(
                "not firing after {}s: {missing:?}; alerts: {alerts:#?}\n{}",
                ALERTS_WAIT.as_secs(),
                cluster.diagnostics(None).await
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(Faults {
        _stuck_origin: stuck_origin,
    })
}
