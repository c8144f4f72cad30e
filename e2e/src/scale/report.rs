//! The JSON report of a scale run, and the plots of several runs against
//! the node count (BENCHMARKS.md, `docs/bench/scale-*.png`; drawn like the
//! netbench's).

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::ScaleError;
use crate::netbench::report::{finish_chart, marked_series, reference_line};

/// One second of the measured phase.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the Distributions were applied.
    pub t: f64,
    /// Writes served by the stand-in since it started (all writers).
    pub writes: f64,
    /// Live watch events sent since the measured phase began.
    pub watch_events: f64,
    /// Operator CPU seconds (user + system) since it started.
    pub operator_cpu_s: f64,
    pub operator_rss_mib: f64,
    /// Node × Distribution pairs complete.
    pub nodes_complete: usize,
}

/// What a run measured. Rates are over the measured phase (from applying
/// the Distributions to the last one `Complete`), after bring-up.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub nodes: usize,
    pub distributions: usize,
    pub size_bytes: u64,
    /// The agents' report interval at this node count (crds `budget`).
    pub report_interval_s: u32,
    /// Agents started and certified (not in the rates).
    pub bringup_s: f64,
    pub duration_s: f64,
    pub all_complete: bool,
    /// Nodes that wrote `Complete`, by Distribution.
    pub complete_nodes: BTreeMap<String, usize>,
    pub writes_per_s_mean: f64,
    pub writes_per_s_peak_10s: f64,
    /// `verb resource[/subresource]` → writes in the measured phase.
    pub writes_by_kind: BTreeMap<String, u64>,
    /// Simulated agents' status writes since they started, by cause.
    pub agent_status_writes_state: u64,
    pub agent_status_writes_periodic: u64,
    pub watch_events_per_s: f64,
    /// Highest sampled resident set.
    pub operator_rss_mib: f64,
    pub operator_cpu_cores_mean: f64,
    pub largest_object_bytes: usize,
    /// `Kind/name` of the largest object.
    pub largest_object: String,
    /// Apply → the last node's NodeFill lists the assignment (slowest
    /// Distribution); null when some node never got it.
    pub apply_to_all_specified_s: Option<f64>,
    /// Last node `Complete` → Distribution `Complete` (slowest).
    pub status_lag_s: Option<f64>,
    pub samples: Vec<Sample>,
}

impl Report {
    /// Pretty JSON.
    pub fn to_json(&self) -> Result<String, ScaleError> {
        serde_json::to_string_pretty(self)
            .map_err(|e| ScaleError::Invalid(format!("serialising the report: {e}")))
    }

    /// One line for the terminal.
    pub fn summary(&self) -> String {
        format!(
            "nodes {}: writes/s mean {:.1} peak(10s) {:.1}, watch events/s {:.0}, operator {:.2} cores {:.0} MiB, largest object {} B ({}), apply->all specified {}, status lag {}, complete {:?}",
            self.nodes,
            self.writes_per_s_mean,
            self.writes_per_s_peak_10s,
            self.watch_events_per_s,
            self.operator_cpu_cores_mean,
            self.operator_rss_mib,
            self.largest_object_bytes,
            self.largest_object,
            self.apply_to_all_specified_s
                .map_or("-".into(), |s| format!("{s:.1} s")),
            self.status_lag_s
                .map_or("-".into(), |s| format!("{s:.1} s")),
            self.complete_nodes,
        )
    }
}

const PALETTE: [RGBColor; 3] = [
    RGBColor(200, 60, 40),
    RGBColor(30, 100, 200),
    RGBColor(40, 150, 60),
];

/// Draws `series` (name, points by node count) with an optional target
/// line, to a PNG at `path`.
fn line_plot(
    path: &Path,
    title: &str,
    y_desc: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    target: Option<(f64, &str)>,
) -> Result<(), ScaleError> {
    crate::netbench::report::register_font().map_err(|e| ScaleError::Invalid(e.to_string()))?;
    let err = |e: &dyn std::fmt::Display| ScaleError::Invalid(format!("{}: {e}", path.display()));
    let x_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(100.0, f64::max)
        * 1.08;
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .chain(target.map(|t| t.0))
        .fold(0.0, f64::max)
        * 1.2
        + 1e-9;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 19))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("nodes")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(|e| err(&e))?;
    if let Some((y, label)) = target {
        reference_line(
            &mut chart,
            y,
            x_max,
            label,
            (x_max * 0.02, y + y_max * 0.015),
        )
        .map_err(|e| err(&e))?;
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        marked_series(
            &mut chart,
            pts,
            color,
            name.to_string(),
            13,
            (x_max * 0.01, y_max * 0.02),
            |y| format!("{y:.1}"),
        )
        .map_err(|e| err(&e))?;
    }
    finish_chart(&mut chart, &root, SeriesLabelPosition::UpperLeft, 15).map_err(|e| err(&e))
}

/// `scale-writes.png`, `scale-operator-cpu.png` and
/// `scale-operator-rss.png` in `dir`, from reports at several node counts.
pub fn plot(dir: &Path, reports: &[Report]) -> Result<(), ScaleError> {
    let mut reports: Vec<&Report> = reports.iter().collect();
    reports.sort_by_key(|r| r.nodes);
    let pts = |f: fn(&Report) -> f64| -> Vec<(f64, f64)> {
        reports.iter().map(|r| (r.nodes as f64, f(r))).collect()
    };
    line_plot(
        &dir.join("scale-writes.png"),
        "API writes per second (all writers), measured phase",
        "writes / s",
        &[
            ("mean", pts(|r| r.writes_per_s_mean)),
            ("busiest 10 s", pts(|r| r.writes_per_s_peak_10s)),
        ],
        Some((50.0, "budget 50 writes/s")),
    )?;
    line_plot(
        &dir.join("scale-operator-cpu.png"),
        "Operator CPU, mean over the measured phase",
        "cores",
        &[("operator", pts(|r| r.operator_cpu_cores_mean))],
        Some((0.5, "target 0.5 core")),
    )?;
    line_plot(
        &dir.join("scale-operator-rss.png"),
        "Operator resident memory, highest sample",
        "MiB",
        &[("operator", pts(|r| r.operator_rss_mib))],
        Some((256.0, "target 256 MiB")),
    )
}
