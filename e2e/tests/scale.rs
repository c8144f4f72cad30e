//! `peerfill-scale` run small (40 nodes, the three Distributions of a full
//! run, one from a node source), as a user runs it: the report has every
//! key, every node completed every Distribution, and the figures are
//! consistent with each other. No timing is asserted: the speed figures
//! live in BENCHMARKS.md.

use std::process::Command;

use serde_json::Value;

const SCALE: &str = env!("CARGO_BIN_EXE_peerfill-scale");

#[test]
fn a_small_scale_run_reports_every_key_and_completes_every_node() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("scale-40.json");
    let status = Command::new(SCALE)
        .args([
            "run",
            "--nodes",
            "40",
            "--distributions",
            "3",
            "--size-mib",
            "64",
        ])
        .args(["--limit-secs", "240", "--out"])
        .arg(&out)
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .status()?;
    assert!(status.success(), "peerfill-scale exited with {status}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    for key in [
        "nodes",
        "writes_per_s_mean",
        "writes_per_s_peak_10s",
        "writes_by_kind",
        "watch_events_per_s",
        "operator_rss_mib",
        "operator_cpu_cores_mean",
        "largest_object_bytes",
        "apply_to_all_specified_s",
        "status_lag_s",
    ] {
        assert!(report.get(key).is_some(), "{key} missing");
    }
    let num = |key: &str| report[key].as_f64().unwrap_or(f64::NAN);
    assert_eq!(report["nodes"], 40);
    assert_eq!(report["all_complete"], true, "{report}");
    let complete = report["complete_nodes"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert_eq!(complete.len(), 3);
    assert!(complete.values().all(|n| n == 40), "{complete:?}");
    assert!(num("writes_per_s_mean") > 0.0);
    assert!(num("writes_per_s_peak_10s") >= num("writes_per_s_mean") * 0.999);
    assert!(num("watch_events_per_s") > 0.0);
    assert!(num("operator_rss_mib") > 0.0);
    assert!(num("operator_cpu_cores_mean") > 0.0);
    assert!(num("apply_to_all_specified_s") >= 0.0);
    assert!(num("status_lag_s") >= 0.0);
    // Every node's NodeFill carries three assignments and its peers.
    let largest = num("largest_object_bytes");
    assert!(largest > 1000.0 && largest <= 64.0 * 1024.0, "{largest}");
    // The writers the contract names all wrote: the operator's specs and
    // Distribution statuses, the agents' statuses and node labels.
    let kinds = report["writes_by_kind"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    for kind in [
        "patch nodefills",
        "patch nodefills/status",
        "patch distributions/status",
        "patch nodes",
    ] {
        assert!(
            kinds.get(kind).and_then(Value::as_u64).unwrap_or(0) > 0,
            "{kind}: {kinds:?}"
        );
    }
    Ok(())
}
