//! Loopback benchmark of the swarm engine with real agent processes.
//!
//! ```text
//! cargo build --release -p peerfill-agent --bin peerfill-agent
//! cargo run --release -p peerfill-agent --example loopback_bench
//! ```
//!
//! Scenario 1: one seeder, one downloader (`BENCH_SINGLE_MIB`, default 4096).
//! Scenario 2: an HTTP origin and 8 agents (`BENCH_SWARM_MIB`, default 512),
//! two of them origin readers. For each it prints the wall time, MiB/s per
//! agent, CPU seconds per GiB moved (received + sent, from /proc/<pid>/stat)
//! and peak RSS (VmHWM from /proc/<pid>/status). Figures, not assertions.
//!
//! `BENCH_PERF=1`: in scenario 1, `perf stat` is attached to the downloader
//! (from its start) and to the seeder (once it has hashed its file), and
//! instructions, cycles, context switches and page faults per GiB are
//! printed for both: counts are stable on a shared machine, wall time is
//! not. `BENCH_SWARM_MIB=0` skips scenario 2.

use std::convert::Infallible;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use peerfill_agent::agent::{
    AgentConfig, ContentConfig, ContentStatus, IdentityFiles, Phase, STATUS_DIR, SourceConfig,
    status_path,
};
use peerfill_agent::tls::ClusterCa;
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;
const ID: &str = "bench";

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

fn env_mib(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The release agent binary next to this example (target/release).
fn agent_bin() -> BenchResult<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory")?;
    let bin = dir.join("peerfill-agent");
    if !bin.exists() {
        return Err(format!(
            "{} not found: run `cargo build --release -p peerfill-agent --bin peerfill-agent` first",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

struct Proc {
    child: Child,
    name: String,
    data_dir: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn status(&self) -> Option<ContentStatus> {
        ContentStatus::read(&status_path(&self.data_dir.join(STATUS_DIR), ID)).ok()
    }

    /// (CPU seconds, peak RSS in MiB) so far.
    fn usage(&self) -> (f64, f64) {
        let pid = self.child.id();
        let ticks = 100.0; // USER_HZ on Linux
        let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                let u: f64 = f.get(11)?.parse().ok()?;
                let k: f64 = f.get(12)?.parse().ok()?;
                Some((u + k) / ticks)
            })
            .unwrap_or(0.0);
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0);
        (cpu, rss)
    }
}

fn free_addr(ip: Ipv4Addr) -> BenchResult<SocketAddr> {
    Ok(UdpSocket::bind((ip, 0))?.local_addr()?)
}

fn spawn(bin: &Path, cfg: &AgentConfig) -> BenchResult<Proc> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let path = cfg.data_dir.join("agent.json");
    std::fs::write(&path, serde_json::to_vec_pretty(cfg)?)?;
    let log = std::fs::File::create(cfg.data_dir.join("agent.log"))?;
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--config"])
        .arg(&path)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    kill_with_parent(&mut cmd);
    let child = cmd.spawn()?;
    Ok(Proc {
        child,
        name: cfg.node.clone(),
        data_dir: cfg.data_dir.clone(),
    })
}

fn config(
    name: &str,
    addr: SocketAddr,
    root: &Path,
    size: u64,
    source: SourceConfig,
    peers: &[(String, SocketAddr)],
) -> AgentConfig {
    let certs = root.join("certs").join(name);
    let cfg = AgentConfig::new(
        name,
        addr,
        root.join(name),
        IdentityFiles::in_dir(&certs),
        vec![ContentConfig {
            id: ID.into(),
            path: PathBuf::from("out/bench.bin"),
            size: Some(size),
            piece_size: 4 << 20,
            digest: None,
            source,
            peers: peers
                .iter()
                .filter(|(n, _)| n != name)
                .map(|(n, a)| peerfill_agent::agent::PeerConfig {
                    node: n.clone(),
                    addr: *a,
                })
                .collect(),
            allowed_peers: peers.iter().map(|(n, _)| n.clone()).collect(),
            root: None,
            origin_version: None,
            reuse_from: Vec::new(),
            caps: Default::default(),
            directory: false,
        }],
    );
    // The bench origin listens on loopback.
    AgentConfig {
        allow_private_origins: true,
        ..cfg
    }
}

async fn wait_complete(procs: &[&Proc], timeout: Duration) -> BenchResult<Vec<Duration>> {
    let start = Instant::now();
    let mut done: Vec<Option<Duration>> = vec![None; procs.len()];
    while done.iter().any(Option::is_none) {
        if start.elapsed() > timeout {
            return Err("timed out".into());
        }
        for (p, d) in procs.iter().zip(done.iter_mut()) {
            if d.is_none() {
                match p.status().map(|s| s.phase) {
                    Some(Phase::Complete) => *d = Some(start.elapsed()),
                    Some(Phase::Failed) => {
                        return Err(format!("{} failed: {:?}", p.name, p.status()).into());
                    }
                    _ => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(done.into_iter().flatten().collect())
}

fn write_random_file(path: &Path, size: u64) -> BenchResult<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

async fn single(bin: &Path, root: &Path, size: u64) -> BenchResult<()> {
    let names = ["seed", "leech"].map(String::from);
    let ca = ClusterCa::generate("bench-ca")?;
    for n in &names {
        ca.issue(n)?.write(&root.join("certs").join(n))?;
    }
    let seed_file = root.join("seed.bin");
    write_random_file(&seed_file, size)?;
    let peers: Vec<(String, SocketAddr)> = vec![
        (names[0].clone(), free_addr(Ipv4Addr::new(127, 0, 0, 21))?),
        (names[1].clone(), free_addr(Ipv4Addr::new(127, 0, 0, 22))?),
    ];
    let source = SourceConfig::Node {
        node: names[0].clone(),
        path: Some(seed_file.clone()),
    };
    let seeder = spawn(
        bin,
        &config(&names[0], peers[0].1, root, size, source.clone(), &peers),
    )?;
    wait_complete(&[&seeder], Duration::from_secs(300)).await?;
    let (seed_cpu0, _) = seeder.usage();
    let perf = std::env::var_os("BENCH_PERF").is_some();
    let seed_perf = perf
        .then(|| PerfStat::attach(seeder.child.id(), &root.join("perf-seed.csv")))
        .transpose()?;
    let leech = spawn(
        bin,
        &config(&names[1], peers[1].1, root, size, source, &peers),
    )?;
    let leech_perf = perf
        .then(|| PerfStat::attach(leech.child.id(), &root.join("perf-leech.csv")))
        .transpose()?;
    let t = wait_complete(&[&leech], Duration::from_secs(600)).await?[0];
    let (leech_cpu, leech_rss) = leech.usage();
    let (seed_cpu, seed_rss) = seeder.usage();
    let gib = size as f64 / (1u64 << 30) as f64;
    println!(
        "single: {} MiB seeder -> 1 agent in {:.2}s = {:.0} MiB/s (includes process start and connect)",
        size / MIB,
        t.as_secs_f64(),
        (size / MIB) as f64 / t.as_secs_f64()
    );
    println!(
        "  downloader: {:.2} CPU s/GiB received, peak RSS {:.1} MiB",
        leech_cpu / gib,
        leech_rss
    );
    println!(
        "  seeder:     {:.2} CPU s/GiB sent, peak RSS {:.1} MiB",
        (seed_cpu - seed_cpu0) / gib,
        seed_rss
    );
    for (who, p) in [("downloader", leech_perf), ("seeder", seed_perf)] {
        if let Some(p) = p {
            let counts = p.finish()?;
            let per_gib: Vec<String> = counts
                .iter()
                .map(|(event, v)| format!("{event} {:.3e}", v / gib))
                .collect();
            println!("  perf {who} per GiB: {}", per_gib.join(", "));
        }
    }
    Ok(())
}

/// `perf stat` attached to a running process until [`PerfStat::finish`].
struct PerfStat {
    child: Child,
    out: PathBuf,
}

const PERF_EVENTS: &str = "instructions,cycles,context-switches,page-faults";

impl PerfStat {
    fn attach(pid: u32, out: &Path) -> BenchResult<PerfStat> {
        let mut cmd = Command::new("perf");
        cmd.args(["stat", "-x", ",", "-e", PERF_EVENTS, "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        kill_with_parent(&mut cmd);
        let child = cmd.spawn()?;
        // perf needs a moment to attach before the transfer starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(PerfStat {
            child,
            out: out.to_path_buf(),
        })
    }

    /// Stops counting (SIGINT, as perf expects) and returns (event, count).
    fn finish(mut self) -> BenchResult<Vec<(String, f64)>> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        self.child.wait()?;
        let text = std::fs::read_to_string(&self.out)?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                Some((f.get(2)?.to_string(), f.first()?.parse::<f64>().ok()?))
            })
            .collect())
    }
}

async fn swarm(bin: &Path, root: &Path, size: u64, agents: usize) -> BenchResult<()> {
    let names: Vec<String> = (0..agents).map(|i| format!("agent-{i}")).collect();
    let ca = ClusterCa::generate("bench-ca")?;
    for n in &names {
        ca.issue(n)?.write(&root.join("certs").join(n))?;
    }
    let mut data = vec![0u8; size as usize];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
    let data = Bytes::from(data);
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let origin_addr = listener.local_addr()?;
    {
        let (data, served) = (data.clone(), served.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (data, served) = (data.clone(), served.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<_>| {
                        let (data, served) = (data.clone(), served.clone());
                        async move { Ok::<_, Infallible>(origin(req, &data, &served)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    let peers: Vec<(String, SocketAddr)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            Ok((
                n.clone(),
                free_addr(Ipv4Addr::new(127, 0, 0, 30 + i as u8))?,
            ))
        })
        .collect::<BenchResult<_>>()?;
    let source = SourceConfig::Http {
        url: format!("http://{origin_addr}/blob"),
        headers: Default::default(),
        readers: names[..2].to_vec(),
        whole: false,
        files: Vec::new(),
        manifest_url: None,
    };
    let procs: Vec<Proc> = peers
        .iter()
        .map(|(n, a)| spawn(bin, &config(n, *a, root, size, source.clone(), &peers)))
        .collect::<BenchResult<_>>()?;
    let times = wait_complete(&procs.iter().collect::<Vec<_>>(), Duration::from_secs(900)).await?;
    let slowest = times.iter().max().copied().unwrap_or_default();
    let mut cpu = 0.0;
    let mut moved = 0u64;
    let mut peak = 0.0f64;
    for p in &procs {
        let (c, rss) = p.usage();
        cpu += c;
        peak = peak.max(rss);
        if let Some(s) = p.status() {
            moved += s.bytes_from_origin + s.bytes_from_peers + s.bytes_sent;
        }
    }
    let gib = moved as f64 / (1u64 << 30) as f64;
    println!(
        "swarm: HTTP origin + {agents} agents x {} MiB: all complete in {:.2}s = {:.0} MiB/s per agent, {:.0} MiB/s aggregate",
        size / MIB,
        slowest.as_secs_f64(),
        (size / MIB) as f64 / slowest.as_secs_f64(),
        (agents as u64 * size / MIB) as f64 / slowest.as_secs_f64()
    );
    println!(
        "  origin served {:.3} copies; {:.2} CPU s per GiB moved (received + sent, all agents); max peak RSS {:.1} MiB",
        served.load(std::sync::atomic::Ordering::SeqCst) as f64 / size as f64,
        cpu / gib,
        peak
    );
    Ok(())
}

fn origin(
    req: Request<hyper::body::Incoming>,
    data: &Bytes,
    served: &std::sync::atomic::AtomicU64,
) -> Response<Full<Bytes>> {
    let total = data.len() as u64;
    let range = req
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .filter(|(a, b)| a <= b && *b < total);
    let head = req.method() == hyper::Method::HEAD;
    let (status, body, cr) = match range {
        Some((a, b)) => (
            StatusCode::PARTIAL_CONTENT,
            data.slice(a as usize..=b as usize),
            Some(format!("bytes {a}-{b}/{total}")),
        ),
        None => (StatusCode::OK, data.clone(), None),
    };
    let mut resp = Response::builder()
        .status(status)
        .header(hyper::header::ACCEPT_RANGES, "bytes")
        .header(hyper::header::CONTENT_LENGTH, body.len());
    if let Some(cr) = cr {
        resp = resp.header(hyper::header::CONTENT_RANGE, cr);
    }
    let body = if head {
        Bytes::new()
    } else {
        served.fetch_add(body.len() as u64, std::sync::atomic::Ordering::SeqCst);
        body
    };
    resp.body(Full::new(body)).unwrap_or_default()
}

#[tokio::main]
async fn main() -> BenchResult<()> {
    let bin = agent_bin()?;
    let single_size = env_mib("BENCH_SINGLE_MIB", 4096) * MIB;
    let swarm_size = env_mib("BENCH_SWARM_MIB", 512) * MIB;
    let tmp = tempfile::tempdir()?;
    single(&bin, &tmp.path().join("single"), single_size).await?;
    if swarm_size > 0 {
        swarm(&bin, &tmp.path().join("swarm"), swarm_size, 8).await?;
    }
    if std::env::var_os("BENCH_KEEP").is_some() {
        println!("kept {}", tmp.keep().display());
    }
    Ok(())
}

/// Makes the kernel kill the child if this process dies without running
/// destructors (e.g. the test runner kills it on timeout).
fn kill_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}
