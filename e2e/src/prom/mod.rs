//! A real Prometheus scraping the local cluster, for the tests and the demo.
//!
//! The binary is Debian's `prometheus` package, unpacked without root by
//! `e2e/tools/install-prometheus.sh` (`e2e/run-tests` exports its path as
//! `$PROMETHEUS`). [`find_binary`] looks there, then in `.tools/`, then on
//! `PATH`.
//!
//! [`Prometheus::start`] writes a config with static targets shaped like
//! what the chart's PodMonitors produce (job `<namespace>/<release>-agent`,
//! labels `namespace`, `pod`, `node`), so the dashboard's queries and the
//! chart's alert rules run unchanged. Scrape and rule evaluation every
//! second keep tests short. It listens on a free port of 127.0.0.1 and its
//! TSDB lives in the caller's directory; the process is killed on drop.
//!
//! Queries go through the HTTP API (`/api/v1/query`, `query_range`,
//! `/api/v1/alerts`), decoded into [`Sample`]s and [`Series`].

pub mod dashboard;
pub mod plot;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cluster::{ChildProcess, ClusterError, LocalCluster};

/// Environment variable naming the prometheus binary.
pub const PROMETHEUS_ENV: &str = "PROMETHEUS";
/// Where `e2e/tools/install-prometheus.sh` unpacks it, under the repo.
pub const TOOLS_PATH: &str = ".tools/prometheus/usr/bin/prometheus";
/// Namespace and release the scrape labels pretend the chart ran in.
pub const NAMESPACE: &str = "peerfill-system";
pub const RELEASE: &str = "peerfill";

#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error(
        "prometheus not found (${PROMETHEUS_ENV}, <repo>/{TOOLS_PATH}, PATH); install it with e2e/tools/install-prometheus.sh"
    )]
    NotFound,
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("prometheus did not become ready within {secs}s; its log:\n{log}")]
    NotReady { secs: u64, log: String },
    #[error("GET {url}: {detail}")]
    Http { url: String, detail: String },
    #[error("query {query:?} failed: {detail}")]
    Query { query: String, detail: String },
}

/// The prometheus binary: `$PROMETHEUS`, else `<repo>/.tools/...`, else
/// `prometheus` on `PATH`.
pub fn find_binary() -> Result<PathBuf, PromError> {
    if let Some(p) = std::env::var_os(PROMETHEUS_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(PromError::NotFound)
        };
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let local = repo.join(TOOLS_PATH);
    if local.is_file() {
        return Ok(local);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .ok_or(PromError::NotFound)
}

/// One scrape target.
#[derive(Debug, Clone)]
pub struct Target {
    pub job: String,
    pub addr: SocketAddr,
    pub labels: BTreeMap<String, String>,
}

/// The operator and agent endpoints of `cluster`, labelled like the chart's
/// PodMonitors would label them.
pub fn cluster_targets(cluster: &LocalCluster) -> Vec<Target> {
    let mut out = Vec::new();
    let labels = |pod: String, node: &str| {
        BTreeMap::from([
            ("namespace".to_string(), NAMESPACE.to_string()),
            ("pod".to_string(), pod),
            ("node".to_string(), node.to_string()),
        ])
    };
    for (k, name) in cluster.operator_names().into_iter().enumerate() {
        if let Ok(addr) = cluster.operator_metrics(k) {
            out.push(Target {
                job: format!("{NAMESPACE}/{RELEASE}-operator"),
                addr,
                labels: labels(name, "control-plane"),
            });
        }
    }
    for (name, node) in cluster.nodes() {
        out.push(Target {
            job: format!("{NAMESPACE}/{RELEASE}-agent"),
            addr: node.metrics,
            labels: labels(format!("{RELEASE}-agent-{name}"), name),
        });
    }
    out
}

/// The config file (JSON is YAML): 1 s scrapes and evaluations.
pub fn config(targets: &[Target], rule_files: &[PathBuf]) -> Value {
    let mut jobs: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for t in targets {
        jobs.entry(&t.job)
            .or_default()
            .push(json!({"targets": [t.addr.to_string()], "labels": t.labels}));
    }
    json!({
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": rule_files,
        "scrape_configs": jobs.into_iter().map(|(job, statics)| json!({
            "job_name": job, "static_configs": statics,
        })).collect::<Vec<_>>(),
    })
}

/// A running Prometheus (killed on drop).
pub struct Prometheus {
    process: ChildProcess,
    addr: SocketAddr,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Prometheus {
    /// Starts `binary` with `targets` and the rule files in `dir` (config,
    /// TSDB and log go there too) and waits until it is ready.
    pub async fn start(
        binary: &Path,
        dir: &Path,
        targets: &[Target],
        rule_files: &[PathBuf],
    ) -> Result<Prometheus, PromError> {
        let io = |what: String| move |source| PromError::Io { what, source };
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let cfg = dir.join("prometheus.yml");
        let text = serde_json::to_string_pretty(&config(targets, rule_files))
            .map_err(|e| io("encoding the config".into())(std::io::Error::other(e)))?;
        std::fs::write(&cfg, text).map_err(io(format!("writing {}", cfg.display())))?;
        let addr = crate::cluster::free_tcp(std::net::Ipv4Addr::LOCALHOST)?;
        // The classic UI's assets from the same package, when unpacked.
        let assets = binary
            .parent()
            .and_then(Path::parent)
            .map(|usr| usr.join("share/prometheus/web"))
            .filter(|p| p.is_dir());
        let mut args: Vec<std::ffi::OsString> = vec![
            format!("--config.file={}", cfg.display()).into(),
            format!("--storage.tsdb.path={}", dir.join("data").display()).into(),
            "--storage.tsdb.retention.time=2h".into(),
            format!("--web.listen-address={addr}").into(),
            "--log.level=warn".into(),
        ];
        if let Some(a) = assets {
            args.push(format!("--web.local-assets={}/", a.display()).into());
        }
        let mut process = ChildProcess::new(
            "prometheus",
            binary.to_path_buf(),
            args,
            Vec::new(),
            dir.join("prometheus.log"),
        );
        process.start()?;
        let prom = Prometheus {
            process,
            addr,
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        prom.wait_ready(Duration::from_secs(60)).await?;
        Ok(prom)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    async fn wait_ready(&self, bound: Duration) -> Result<(), PromError> {
        let start = Instant::now();
        while start.elapsed() < bound {
            if self.get("/-/ready").await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(PromError::NotReady {
            secs: bound.as_secs(),
            log: self.log_tail(40),
        })
    }

    async fn get(&self, path_and_query: &str) -> Result<Bytes, PromError> {
        let url = format!("{}{path_and_query}", self.url());
        let err = |detail: String| PromError::Http {
            url: url.clone(),
            detail,
        };
        let uri: http::Uri = url.parse().map_err(|e| err(format!("{e}")))?;
        let fut = self.client.get(uri);
        let resp = tokio::time::timeout(Duration::from_secs(20), fut)
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(format!("{e}")))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| err(format!("reading the body: {e}")))?
            .to_bytes();
        if !status.is_success() && status != http::StatusCode::UNPROCESSABLE_ENTITY {
            return Err(err(format!("{status}: {}", String::from_utf8_lossy(&body))));
        }
        Ok(body)
    }

    async fn api(&self, path: &str, params: &[(&str, String)]) -> Result<Value, PromError> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())))
            .finish();
        let body = self.get(&format!("{path}?{query}")).await?;
        let what = params
            .iter()
            .find(|(k, _)| *k == "query")
            .map_or(path.to_string(), |(_, q)| q.clone());
        let v: ApiResponse = serde_json::from_slice(&body).map_err(|e| PromError::Query {
            query: what.clone(),
            detail: format!("undecodable answer: {e}"),
        })?;
        if v.status != "success" {
            return Err(PromError::Query {
                query: what,
                detail: format!("{}: {}", v.error_type, v.error),
            });
        }
        Ok(v.data)
    }

    /// An instant query at `at` (seconds since the epoch).
    pub async fn query(&self, expr: &str, at: f64) -> Result<Vec<Sample>, PromError> {
        let data = self
            .api(
                "/api/v1/query",
                &[("query", expr.to_string()), ("time", format!("{at:.3}"))],
            )
            .await?;
        decode(expr, &data, |r: VectorItem| Sample {
            labels: r.metric,
            value: parse_value(&r.value.1),
        })
    }

    /// A range query over `[start, end]` with `step` seconds.
    pub async fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<Series>, PromError> {
        let data = self
            .api(
                "/api/v1/query_range",
                &[
                    ("query", expr.to_string()),
                    ("start", format!("{start:.3}")),
                    ("end", format!("{end:.3}")),
                    ("step", format!("{step}")),
                ],
            )
            .await?;
        decode(expr, &data, |r: MatrixItem| Series {
            labels: r.metric,
            points: r
                .values
                .into_iter()
                .map(|(t, v)| (t, parse_value(&v)))
                .collect(),
        })
    }

    /// The alerts Prometheus holds now (pending and firing).
    pub async fn alerts(&self) -> Result<Vec<Alert>, PromError> {
        let data = self.api("/api/v1/alerts", &[]).await?;
        let alerts = data.get("alerts").cloned().unwrap_or(Value::Null);
        serde_json::from_value(alerts).map_err(|e| PromError::Query {
            query: "/api/v1/alerts".into(),
            detail: format!("undecodable alerts: {e}"),
        })
    }
}

/// Now, as Prometheus timestamps (seconds since the epoch).
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One element of an instant vector.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One series of a range query: (timestamp, value) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub points: Vec<(f64, f64)>,
}

/// An alert as `/api/v1/alerts` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// `pending` or `firing`.
    pub state: String,
}

impl Alert {
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map_or("", String::as_str)
    }
}

#[derive(Deserialize)]
struct ApiResponse {
    status: String,
    #[serde(default)]
    data: Value,
    #[serde(default, rename = "errorType")]
    error_type: String,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize)]
struct VectorItem {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

#[derive(Deserialize)]
struct MatrixItem {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    values: Vec<(f64, String)>,
}

/// Decodes `data.result` (a vector or a matrix; a scalar becomes one
/// unlabelled sample).
fn decode<I: serde::de::DeserializeOwned, O>(
    expr: &str,
    data: &Value,
    f: impl Fn(I) -> O,
) -> Result<Vec<O>, PromError> {
    let err = |detail: String| PromError::Query {
        query: expr.to_string(),
        detail,
    };
    let result = data.get("result").cloned().unwrap_or(Value::Null);
    let result = match data.get("resultType").and_then(Value::as_str) {
        Some("scalar") => json!([{"metric": {}, "value": result}]),
        _ => result,
    };
    let items: Vec<I> =
        serde_json::from_value(result).map_err(|e| err(format!("undecodable result: {e}")))?;
    Ok(items.into_iter().map(f).collect())
}

/// Prometheus writes values as strings ("NaN", "+Inf" included).
fn parse_value(s: &str) -> f64 {
    s.parse().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_groups_targets_by_job() {
        let t = |job: &str, port: u16| Target {
            job: job.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            labels: BTreeMap::from([("pod".into(), format!("p{port}"))]),
        };
        let cfg = config(
            &[t("a", 1), t("b", 2), t("a", 3)],
            &[PathBuf::from("r.yml")],
        );
        let jobs = cfg["scrape_configs"].as_array().unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0]["job_name"], "a");
        assert_eq!(jobs[0]["static_configs"].as_array().unwrap().len(), 2);
        assert_eq!(jobs[0]["static_configs"][1]["targets"][0], "127.0.0.1:3");
        assert_eq!(cfg["rule_files"][0], "r.yml");
    }

    #[test]
    fn decodes_vectors_and_scalars() {
        let v = json!({"resultType": "vector", "result": [
            {"metric": {"pod": "a"}, "value": [1.5, "2"]},
        ]});
        let s: Vec<Sample> = decode("x", &v, |r: VectorItem| Sample {
            labels: r.metric,
            value: parse_value(&r.value.1),
        })
        .unwrap();
        assert_eq!(s[0].labels["pod"], "a");
        assert_eq!(s[0].value, 2.0);
        let sc = json!({"resultType": "scalar", "result": [1.0, "NaN"]});
        let s: Vec<Sample> = decode("x", &sc, |r: VectorItem| Sample {
            labels: r.metric,
            value: parse_value(&r.value.1),
        })
        .unwrap();
        assert!(s[0].value.is_nan());
    }
}
