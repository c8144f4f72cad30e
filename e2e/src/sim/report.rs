//! A run's figures against the yardstick, as JSON, and the plots of several
//! runs (same style as the netbench's, `e2e/src/netbench/report.rs`).
//!
//! T* is the Kumar–Ross bound from the configured caps, as the netbench
//! computes it: `max(F/u_origin, F/d_min, N·F/(u_origin + Σ u_i))`. It
//! ignores the cross-zone links and wire overhead, so a run limited by
//! either shows it as time / T* above 1.

use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::swarm::Outcome;
use super::topology::Topology;
use super::{Config, SimError};
use crate::netbench::report::{Chart, finish_chart, marked_series, reference_line, register_font};

/// Kumar–Ross lower bound for `cfg`, seconds.
pub fn kumar_ross_secs(cfg: &Config) -> f64 {
    let f = cfg.size as f64;
    let n = cfg.nodes as f64;
    (f / cfg.origin)
        .max(f / cfg.node_down)
        .max(n * f / (cfg.origin + n * cfg.node_up))
}

/// Smallest, median and largest of a list.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(f64::total_cmp);
        let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
        Spread {
            min: at(0),
            median: at(v.len() / 2),
            max: at(v.len().saturating_sub(1)),
        }
    }
}

/// The JSON report of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub config: Config,
    pub piece_size: u64,
    pub pieces: u64,
    /// T*, seconds.
    pub bound_secs: f64,
    /// Last node's copy, seconds.
    pub time_secs: f64,
    pub first_secs: f64,
    pub time_over_bound: f64,
    pub first_over_bound: f64,
    /// Bytes the origin served / content size.
    pub origin_copies: f64,
    /// Bytes into each zone from other zones / content size.
    pub cross_zone_per_zone: Vec<f64>,
    /// Bytes each node uploaded / content size.
    pub upload_copies: Spread,
    /// Σ bytes the nodes uploaded / content size.
    pub upload_total_copies: f64,
    /// Origin readers' uploads / content size, in reader order.
    pub reader_upload_copies: Vec<f64>,
    /// Bytes sent but not used (endgame duplicates, cancelled) / size.
    pub wasted_copies: f64,
    pub refusals: u64,
    /// Σ node uplink payload bytes / Σ uplink payload capacity, per
    /// simulated second.
    pub uplink_utilization: Vec<f64>,
    pub events: u64,
    /// Wall time of the simulation, seconds.
    pub wall_secs: f64,
}

impl Report {
    pub fn new(
        cfg: &Config,
        topo: &Topology,
        piece_size: u64,
        out: &Outcome,
        wall_secs: f64,
    ) -> Report {
        let f = cfg.size as f64;
        let bound = kumar_ross_secs(cfg);
        let done: Vec<f64> = out.done_at.iter().map(|t| t.unwrap_or(out.end)).collect();
        let last = done.iter().copied().fold(0.0, f64::max);
        let first = done.iter().copied().fold(f64::INFINITY, f64::min);
        let capacity = cfg.nodes as f64 * cfg.node_up * cfg.peer_efficiency;
        Report {
            config: cfg.clone(),
            piece_size,
            pieces: cfg.size.div_ceil(piece_size),
            bound_secs: bound,
            time_secs: last,
            first_secs: first,
            time_over_bound: last / bound,
            first_over_bound: first / bound,
            origin_copies: out.origin_bytes / f,
            cross_zone_per_zone: out.cross_zone_in.iter().map(|b| b / f).collect(),
            upload_copies: Spread::of(out.uploaded.iter().map(|b| b / f).collect()),
            upload_total_copies: out.uploaded.iter().sum::<f64>() / f,
            reader_upload_copies: topo.readers.iter().map(|r| out.uploaded[r.0] / f).collect(),
            wasted_copies: out.wasted_bytes / f,
            refusals: out.refusals,
            uplink_utilization: out.uplink_series.iter().map(|b| b / capacity).collect(),
            events: out.events,
            wall_secs,
        }
    }

    /// One line for the terminal.
    pub fn summary(&self) -> String {
        let xz: Vec<String> = self
            .cross_zone_per_zone
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect();
        format!(
            "N = {}: last {:.2} T* (first {:.2}), T* = {:.1} s, origin {:.3} copies, cross-zone per zone [{}] x size, uploads {:.2}/{:.2}/{:.2} copies (min/median/max), wasted {:.3} copies, {} events in {:.1} s",
            self.config.nodes,
            self.time_over_bound,
            self.first_over_bound,
            self.bound_secs,
            self.origin_copies,
            xz.join(" "),
            self.upload_copies.min,
            self.upload_copies.median,
            self.upload_copies.max,
            self.wasted_copies,
            self.events,
            self.wall_secs,
        )
    }

    /// Writes the report as JSON.
    pub fn write(&self, path: &Path) -> Result<(), SimError> {
        let json = serde_json::to_vec_pretty(self).map_err(|source| SimError::Json {
            path: path.display().to_string(),
            source,
        })?;
        std::fs::write(path, json).map_err(|source| SimError::Io {
            what: format!("writing {}", path.display()),
            source,
        })
    }

    pub fn read(path: &Path) -> Result<Report, SimError> {
        let bytes = std::fs::read(path).map_err(|source| SimError::Io {
            what: format!("reading {}", path.display()),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| SimError::Json {
            path: path.display().to_string(),
            source,
        })
    }

    /// The series name of a run in the plots: what distinguishes it.
    pub fn label(&self) -> String {
        format!(
            "{} peers{}, {} zone{}, {} KiB pieces, {} in flight",
            match self.config.peers {
                super::PeerChoice::Operator => "operator",
                super::PeerChoice::Bounded => "bounded",
            },
            if self.config.zone_blind {
                ", zone-blind"
            } else {
                ""
            },
            self.config.zones,
            if self.config.zones == 1 { "" } else { "s" },
            self.piece_size >> 10,
            self.config.max_inflight,
        )
    }
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(200, 60, 40),
    RGBColor(30, 100, 200),
    RGBColor(40, 150, 60),
    RGBColor(150, 60, 180),
    RGBColor(230, 140, 20),
    RGBColor(60, 60, 60),
];

fn plot_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> SimError + '_ {
    move |e| SimError::Plot {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn font(path: &Path) -> Result<(), SimError> {
    register_font().map_err(|e| plot_err(path)(&e))
}

/// Last node / T* against N (log scale), one series per label.
pub fn plot_ratio(path: &Path, reports: &[Report]) -> Result<(), SimError> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in reports {
        let pt = ((r.config.nodes as f64).log10(), r.time_over_bound);
        match series.iter_mut().find(|s| s.0 == r.label()) {
            Some(s) => s.1.push(pt),
            None => series.push((r.label(), vec![pt])),
        }
    }
    for s in &mut series {
        s.1.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    font(path)?;
    let err = plot_err(path);
    let x_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        + 0.3;
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(1.5, f64::max)
        * 1.15;
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart: Chart<'_> = ChartBuilder::on(&root)
        .caption(
            "Simulated: last node's copy / Kumar–Ross bound T*, against N",
            ("sans-serif", 19),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(1f64..x_max, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("nodes N (log scale)")
        .y_desc("time / T*")
        .x_label_formatter(&|x| format!("{:.0}", 10f64.powf(*x)))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(|e| err(&e))?;
    for (y, label, dy) in [(1.0, "T*", -0.035), (1.3, "target 1.3 T*", 0.012)] {
        reference_line(&mut chart, y, x_max, label, (x_max - 0.45, y + y_max * dy))
            .map_err(|e| err(&e))?;
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        marked_series(
            &mut chart,
            pts,
            color,
            name.clone(),
            13,
            (0.03, y_max * 0.01),
            |y| format!("{y:.2}"),
        )
        .map_err(|e| err(&e))?;
    }
    finish_chart(&mut chart, &root, SeriesLabelPosition::LowerRight, 16).map_err(|e| err(&e))
}

/// Uplink utilization per simulated second, one series per run, the time
/// axis in units of each run's T*.
pub fn plot_utilization(path: &Path, reports: &[Report]) -> Result<(), SimError> {
    font(path)?;
    let err = plot_err(path);
    let x_max = reports
        .iter()
        .map(|r| r.time_over_bound)
        .fold(1.0, f64::max)
        * 1.05;
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart: Chart<'_> = ChartBuilder::on(&root)
        .caption(
            "Simulated uplink utilization: Σ node uplink / Σ caps, per simulated second",
            ("sans-serif", 19),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..1.1f64)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("time / T*")
        .y_desc("uplink utilization")
        .x_label_formatter(&|x| format!("{x:.1}"))
        .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, r) in reports.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = r
            .uplink_utilization
            .iter()
            .enumerate()
            .map(|(s, u)| ((s as f64 + 0.5) / r.bound_secs, *u))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("N = {}, {}", r.config.nodes, r.label()))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    finish_chart(&mut chart, &root, SeriesLabelPosition::LowerRight, 16).map_err(|e| err(&e))
}
