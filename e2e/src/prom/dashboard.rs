//! The chart's Grafana dashboard as queries: every panel's PromQL with the
//! dashboard variables substituted the way Grafana would for one view.

use serde::Deserialize;

/// Path of the dashboard JSON inside the repository.
pub const DASHBOARD: &str = "charts/peerfill/dashboards/peerfill.json";

/// One query of one panel.
#[derive(Debug, Clone, PartialEq)]
pub struct PanelQuery {
    pub panel: String,
    pub panel_type: String,
    pub expr: String,
    pub legend: String,
}

/// What Grafana would put in for the variables.
#[derive(Debug, Clone)]
pub struct Vars {
    /// `$namespace` (a regex: the panels use `=~`).
    pub namespace: String,
    /// `$__rate_interval`, e.g. `4s` (Grafana: max(4 x scrape, step + scrape)).
    pub rate_interval: String,
    /// `$__range`, the dashboard's time range, e.g. `60s`.
    pub range: String,
}

#[derive(Deserialize)]
struct Dashboard {
    panels: Vec<Panel>,
}

#[derive(Deserialize)]
struct Panel {
    #[serde(default)]
    title: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    targets: Vec<Target>,
    /// Panels nested in collapsed rows.
    #[serde(default)]
    panels: Vec<Panel>,
}

#[derive(Deserialize)]
struct Target {
    #[serde(default)]
    expr: String,
    #[serde(default, rename = "legendFormat")]
    legend: String,
}

/// Every query of every panel (rows and collapsed rows included), with the
/// variables substituted.
pub fn queries(dashboard_json: &str, vars: &Vars) -> Result<Vec<PanelQuery>, serde_json::Error> {
    let d: Dashboard = serde_json::from_str(dashboard_json)?;
    let mut out = Vec::new();
    collect(&d.panels, vars, &mut out);
    Ok(out)
}

fn collect(panels: &[Panel], vars: &Vars, out: &mut Vec<PanelQuery>) {
    for p in panels {
        for t in p.targets.iter().filter(|t| !t.expr.trim().is_empty()) {
            out.push(PanelQuery {
                panel: p.title.clone(),
                panel_type: p.kind.clone(),
                expr: substitute(&t.expr, vars),
                legend: t.legend.clone(),
            });
        }
        collect(&p.panels, vars, out);
    }
}

/// Replaces `$var` and `${var}` forms of the dashboard's variables.
pub fn substitute(expr: &str, vars: &Vars) -> String {
    let mut s = expr.to_string();
    // Longest names first: `$__range` must not eat `$__rate_interval`.
    for (name, value) in [
        ("__rate_interval", &vars.rate_interval),
        ("__range", &vars.range),
        ("namespace", &vars.namespace),
    ] {
        s = s.replace(&format!("${{{name}}}"), value);
        s = s.replace(&format!("${name}"), value);
    }
    s
}

/// Grafana's legend: `{{label}}` replaced by the series' label values.
pub fn legend(format: &str, labels: &std::collections::BTreeMap<String, String>) -> String {
    let mut s = format.to_string();
    for (k, v) in labels {
        s = s.replace(&format!("{{{{{k}}}}}"), v);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars {
            namespace: "ns".into(),
            rate_interval: "4s".into(),
            range: "60s".into(),
        }
    }

    #[test]
    fn substitutes_every_form() {
        let e = r#"rate(x{namespace=~"$namespace"}[$__rate_interval]) + increase(y[${__range}])"#;
        assert_eq!(
            substitute(e, &vars()),
            r#"rate(x{namespace=~"ns"}[4s]) + increase(y[60s])"#
        );
    }

    #[test]
    fn finds_nested_panels_and_skips_rows() {
        let j = r#"{"panels": [
            {"type": "row", "title": "r", "panels": [
                {"type": "stat", "title": "s", "targets": [{"expr": "a", "legendFormat": "{{pod}}"}]}
            ]},
            {"type": "timeseries", "title": "t", "targets": [{"expr": "b[$__range]"}, {"expr": ""}]}
        ]}"#;
        let q = queries(j, &vars()).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].panel, "s");
        assert_eq!(q[1].expr, "b[60s]");
        let labels = [("pod".to_string(), "p1".to_string())].into();
        assert_eq!(legend(&q[0].legend, &labels), "p1");
    }

    #[test]
    fn the_shipped_dashboard_has_queries() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(DASHBOARD);
        let text = std::fs::read_to_string(&path).unwrap();
        let q = queries(&text, &vars()).unwrap();
        assert!(q.len() >= 10, "{q:?}");
        assert!(q.iter().all(|q| !q.expr.contains('$')), "{q:?}");
    }
}
