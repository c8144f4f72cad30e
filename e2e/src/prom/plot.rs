//! A PNG of the dashboard's main panels drawn from a real run's Prometheus
//! data: swarm throughput (received and sent), bytes by source (peers vs
//! origin) and progress per distribution, one above the other. The queries
//! are the dashboard's own (read from the shipped JSON, variables filled
//! in), fetched with `query_range` at 1 s steps; the style follows the
//! network benchmark's plots (`netbench::report`).
//!
//! `peerfill-demo --dashboard-png docs/dashboard.png` makes the picture in
//! docs/ (see docs/dashboard.md).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::dashboard::{self, PanelQuery, Vars};
use super::{NAMESPACE, PromError, Prometheus, Series};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(transparent)]
    Prom(#[from] PromError),
    #[error("reading the dashboard {path}: {detail}")]
    Dashboard { path: PathBuf, detail: String },
    #[error("panel {0:?} not in the dashboard")]
    NoPanel(String),
    #[error("drawing {path}: {reason}")]
    Draw { path: PathBuf, reason: String },
}

/// Panels drawn, by title, with the unit their values are scaled to.
const PANELS: [(&str, Unit); 3] = [
    ("Swarm throughput", Unit::MibPerSecond),
    ("Bytes by source", Unit::MibPerSecond),
    ("Progress per distribution", Unit::Percent),
];

#[derive(Clone, Copy)]
enum Unit {
    MibPerSecond,
    Percent,
}

impl Unit {
    fn scale(self, v: f64) -> f64 {
        match self {
            Unit::MibPerSecond => v / f64::from(1u32 << 20),
            Unit::Percent => v * 100.0,
        }
    }
    fn desc(self) -> &'static str {
        match self {
            Unit::MibPerSecond => "MiB/s",
            Unit::Percent => "% held",
        }
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(30, 100, 200),
    RGBColor(200, 60, 40),
    RGBColor(40, 150, 70),
    RGBColor(150, 80, 170),
    RGBColor(220, 150, 30),
    RGBColor(60, 60, 60),
];

/// One line of a panel, ready to draw.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
}

/// Fetches the main panels over `[start, end]` and writes the PNG.
pub async fn dashboard_png(
    p: &Prometheus,
    start: f64,
    end: f64,
    path: &Path,
) -> Result<(), PlotError> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(dashboard::DASHBOARD);
    let dash_err = |detail: String| PlotError::Dashboard {
        path: file.clone(),
        detail,
    };
    let text = std::fs::read_to_string(&file).map_err(|e| dash_err(e.to_string()))?;
    let vars = Vars {
        namespace: NAMESPACE.to_string(),
        rate_interval: "4s".to_string(),
        range: format!("{:.0}s", (end - start).max(1.0)),
    };
    let queries = dashboard::queries(&text, &vars).map_err(|e| dash_err(e.to_string()))?;
    let mut panels = Vec::new();
    for (title, unit) in PANELS {
        let qs: Vec<&PanelQuery> = queries.iter().filter(|q| q.panel == title).collect();
        if qs.is_empty() {
            return Err(PlotError::NoPanel(title.to_string()));
        }
        let mut lines = Vec::new();
        for q in qs {
            for s in p.query_range(&q.expr, start, end, 1.0).await? {
                lines.push(line(q, &s, start, unit));
            }
        }
        panels.push((title, unit, lines));
    }
    draw(path, &panels)
}

fn line(q: &PanelQuery, s: &Series, start: f64, unit: Unit) -> Line {
    let label = dashboard::legend(&q.legend, &s.labels);
    Line {
        label: if label.is_empty() {
            q.expr.clone()
        } else {
            label
        },
        points: s
            .points
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(t, v)| (t - start, unit.scale(*v)))
            .collect(),
    }
}

fn draw(path: &Path, panels: &[(&str, Unit, Vec<Line>)]) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    crate::netbench::report::register_font().map_err(|e| err(&e))?;
    let root = BitMapBackend::new(path, (1000, 960)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((panels.len(), 1));
    let x_max = panels
        .iter()
        .flat_map(|(_, _, ls)| ls.iter().flat_map(|l| l.points.iter().map(|p| p.0)))
        .fold(1.0, f64::max);
    for ((title, unit, lines), area) in panels.iter().zip(&areas) {
        let y_max = lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .fold(0.0, f64::max)
            .max(1.0)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 19))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(unit.desc())
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, l) in lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(l.points.clone(), color.stroke_width(3)))
                .map_err(|e| err(&e))?
                .label(l.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
        }
        crate::netbench::report::legend(&mut chart, SeriesLabelPosition::UpperRight, 14)
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_of_three_panels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.png");
        let ramp = |k: f64| Line {
            label: "x".into(),
            points: (0..20).map(|i| (f64::from(i), k * f64::from(i))).collect(),
        };
        let panels = vec![
            ("a", Unit::MibPerSecond, vec![ramp(1.0), ramp(2.0)]),
            ("b", Unit::MibPerSecond, vec![ramp(3.0)]),
            ("c", Unit::Percent, vec![]),
        ];
        draw(&path, &panels).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    }
}
