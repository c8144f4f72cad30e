//! One run: a testbed of N nodes, nginx on the origin serving one random
//! artifact, a calibration download, then the one-server baseline (N curls at
//! once) and peerfill (N agents) on the same testbed, one after the other.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use peerfill_agent::agent::{
    AgentConfig, ContentConfig, ContentStatus, IdentityFiles, PeerConfig, Phase, STATUS_DIR,
    SourceConfig, status_path,
};
use peerfill_agent::content::Digest;
use rand::{RngCore, SeedableRng};
use tracing::info;

use super::links::{LinkSampler, LinkSeries, SamplerThread};
use super::nginx::Nginx;
use super::procs::{NsProc, Usage, cpu_jiffies, run_in, stop_all};
use super::report::kumar_ross_secs;
use super::testbed::{Caps, ETHERNET_MTU, ORIGIN_IP, Testbed, node_ip};
use super::{Deadline, GIB, MIB, NetbenchError, Result, io_err, sleep};

const ARTIFACT: &str = "artifact.bin";
const CALIB: &str = "calib.bin";
const CONTENT_ID: &str = "artifact";
const AGENT_PORT: u16 = 7000;
/// The netbench's piece size unless `--piece-kib` says otherwise: `0`, the
/// product's default (a Distribution without `pieceSize`: chosen from the
/// size). The run records the piece size it used.
pub const DEFAULT_PIECE_KIB: u32 = 0;

/// The piece size a run uses: `piece_kib` KiB, or for `0` what the operator
/// and agents choose for a content of `size` bytes.
pub fn piece_size(piece_kib: u32, size: u64) -> u32 {
    match piece_kib {
        0 => u32::try_from(peerfill_crds::validation::auto_piece_size(size)).unwrap_or(u32::MAX),
        kib => kib.saturating_mul(1024),
    }
}

fn ethernet_mtu() -> u32 {
    ETHERNET_MTU
}

/// What one run is asked to do.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub nodes: usize,
    pub size: u64,
    pub caps: Caps,
    /// Origin readers of peerfill: the first `readers` nodes.
    pub readers: usize,
    /// The `peerfill-agent` binary.
    pub agent_bin: PathBuf,
    /// Scratch directory of this run (removed by the caller).
    pub work: PathBuf,
    /// Size of the calibration download, bytes.
    pub calib_size: u64,
    /// Measure peerfill only; the one-server time is then computed
    /// (N·F/u_origin) and marked so.
    pub skip_one_server: bool,
    /// Piece size of the agents, bytes.
    pub piece_size: u32,
}

/// Figures of one method in one run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Figures {
    /// Start of the downloads to the last verified copy, seconds.
    pub time_secs: f64,
    /// Fastest node, seconds.
    pub first_secs: f64,
    /// Nodes whose copy had the right size and digest.
    pub verified: usize,
    /// Artifact bytes nginx sent (sum of `$body_bytes_sent`).
    pub origin_body_bytes: u64,
    /// Bytes the origin's link sent (kernel counter: IP packets incl.
    /// headers, retransmissions, and everything else the origin sent).
    pub origin_link_bytes: u64,
    /// CPU seconds of the clients (curl or agent) per GiB received, mean
    /// over nodes.
    pub cpu_secs_per_gib_per_node: f64,
    /// Largest peak RSS of one client process, MiB.
    pub peak_rss_mib: f64,
    /// Share of the machine's CPU time that was busy during the run (all
    /// processes, all cores), 0..1.
    pub machine_busy: f64,
    /// peerfill: when the origin's link had sent as many bytes as the
    /// artifact (wire bytes, per-second samples, linear within a second);
    /// the rest of the time is the swarm spreading the last pieces. Zero
    /// when not measured.
    #[serde(default)]
    pub origin_copy_secs: f64,
    /// When each node finished (its verified copy), seconds, by node index.
    #[serde(default)]
    pub node_done_secs: Vec<f64>,
    /// Time-weighted mean uplink utilization from the start to the last
    /// node: Σ node uplink wire bytes / (N · node cap · time), 0..1.
    #[serde(default)]
    pub mean_utilization: f64,
    /// Per-second link counters of every host (see [`LinkSeries`]).
    #[serde(default)]
    pub links: Option<LinkSeries>,
}

/// Everything measured in one run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    pub nodes: usize,
    pub size: u64,
    pub origin_mbit: f64,
    pub node_mbit: f64,
    pub delay_ms: f64,
    pub delay_emulated: bool,
    /// Links' MTU, bytes (runs recorded before it was a setting: 1500).
    #[serde(default = "ethernet_mtu")]
    pub mtu: u32,
    pub readers: usize,
    /// Goodput of one curl from the origin to node 1 alone, Mbit/s.
    pub calib_mbit: f64,
    pub bound_secs: f64,
    pub one_server: Figures,
    pub peerfill: Figures,
    /// The one-server method was not run: its time is N·F/u_origin.
    #[serde(default)]
    pub one_server_computed: bool,
    /// Piece size of the agents, bytes (0: not recorded, the old 4 MiB).
    #[serde(default)]
    pub piece_size: u32,
    /// What was measured and when (set by the caller).
    #[serde(default)]
    pub meta: RunMeta,
}

/// Who, when and with what a run was measured.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunMeta {
    /// `--label` (e.g. `before` / `after`).
    #[serde(default)]
    pub label: String,
    /// The agent binary's path and BLAKE3.
    #[serde(default)]
    pub agent_path: String,
    #[serde(default)]
    pub agent_blake3: String,
    /// UTC `YYYY-MM-DD HH:MM` at the start.
    #[serde(default)]
    pub started: String,
    /// `/proc/loadavg` (1/5/15 min) before and after the run.
    #[serde(default)]
    pub load_before: String,
    #[serde(default)]
    pub load_after: String,
    /// The command line.
    #[serde(default)]
    pub command: String,
}

/// The artifact on the origin and its digest.
pub(crate) struct Artifact {
    pub(crate) size: u64,
    pub(crate) blake3: blake3::Hash,
}

/// Runs both methods on one fresh testbed; the testbed and every process
/// are gone when this returns, whatever the outcome.
pub fn run(spec: &RunSpec, global: Deadline) -> Result<RunResult> {
    let www = spec.work.join("www");
    std::fs::create_dir_all(&www).map_err(io_err(format!("creating {}", www.display())))?;
    let art = write_artifact(&www.join(ARTIFACT), spec.size, spec.nodes as u64)?;
    write_artifact(&www.join(CALIB), spec.calib_size, 0)?;
    let bound = kumar_ross_secs(spec.size, spec.nodes, &spec.caps);

    let tb = Testbed::create(spec.nodes, spec.caps)?;
    let mut nginx = Nginx::start(&tb.origin_ns, &spec.work.join("nginx"), &www)?;
    let calib_mbit = calibrate(&tb, spec, global)?;
    info!(
        calib_mbit,
        cap = spec.caps.node_mbit,
        "calibration: one curl alone"
    );

    // Generous per-method hard timeouts: 3x the one-server time (its own
    // lower bound) plus start-up slack.
    let cs_ideal = spec.nodes as f64 * spec.size as f64 * 8.0 / (spec.caps.origin_mbit * 1e6);
    let one_server = if spec.skip_one_server {
        Figures {
            time_secs: cs_ideal,
            first_secs: cs_ideal,
            ..Figures::default()
        }
    } else {
        let f = one_server(
            &tb,
            &nginx,
            &art,
            spec,
            global.min(Deadline::after(secs(3.0 * cs_ideal + 60.0))),
        )?;
        print_figures("one server", spec, bound, &f);
        f
    };
    let peerfill = peerfill(
        &tb,
        &nginx,
        &art,
        spec,
        global.min(Deadline::after(secs(
            3.0 * cs_ideal.max(bound * 4.0) + 60.0,
        ))),
    )?;
    print_figures("peerfill", spec, bound, &peerfill);
    nginx.stop();
    let delay_emulated = tb.delay_emulated;
    drop(tb);
    Ok(RunResult {
        nodes: spec.nodes,
        size: spec.size,
        origin_mbit: spec.caps.origin_mbit,
        node_mbit: spec.caps.node_mbit,
        delay_ms: spec.caps.delay_ms,
        delay_emulated,
        mtu: spec.caps.mtu,
        readers: spec.readers.min(spec.nodes),
        calib_mbit,
        bound_secs: bound,
        one_server,
        peerfill,
        one_server_computed: spec.skip_one_server,
        piece_size: spec.piece_size,
        meta: RunMeta::default(),
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(1.0))
}

fn print_figures(method: &str, spec: &RunSpec, bound: f64, f: &Figures) {
    println!(
        "  {method:<10} N={:<2} {:>5} MiB: {:7.2} s ({:.2}x bound {:.2} s; first node {:.2} s), \
         origin {:.3} copies (nginx body) / {:.3} (link), {:.2} CPU s/GiB/node, peak RSS {:.1} MiB, \
         machine CPU busy {:.0}%, verified {}/{}",
        spec.nodes,
        spec.size / MIB,
        f.time_secs,
        f.time_secs / bound,
        bound,
        f.first_secs,
        f.origin_body_bytes as f64 / spec.size as f64,
        f.origin_link_bytes as f64 / spec.size as f64,
        f.cpu_secs_per_gib_per_node,
        f.peak_rss_mib,
        f.machine_busy * 100.0,
        f.verified,
        spec.nodes,
    );
    if f.origin_copy_secs > 0.0 {
        println!(
            "  {method:<10} the origin link had sent one copy after {:.2} s",
            f.origin_copy_secs
        );
    }
    if let Some(l) = &f.links {
        let up: Vec<String> = l
            .node_up_totals()
            .iter()
            .map(|b| format!("{:.0}", *b as f64 / MIB as f64))
            .collect();
        println!(
            "  {method:<10} mean uplink utilization {:.0}% (wire bytes / caps); \
             first node {:.2}x bound, last {:.2}x; MiB sent per node: {}",
            f.mean_utilization * 100.0,
            f.first_secs / bound,
            f.time_secs / bound,
            up.join(" ")
        );
    }
}

/// Writes `size` seeded random bytes and returns their BLAKE3 hash.
pub(crate) fn write_artifact(path: &Path, size: u64, seed: u64) -> Result<Artifact> {
    let what = || format!("writing {}", path.display());
    let file = std::fs::File::create(path).map_err(io_err(what()))?;
    let mut out = std::io::BufWriter::with_capacity(MIB as usize, file);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed ^ seed);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(what()))?;
        left -= n as u64;
    }
    out.flush().map_err(io_err(what()))?;
    Ok(Artifact {
        size,
        blake3: hasher.finalize(),
    })
}

/// BLAKE3 of a file, streamed.
fn hash_file(path: &Path) -> std::io::Result<(u64, blake3::Hash)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hasher.finalize()))
}

pub(crate) fn verify(node: &str, path: &Path, art: &Artifact) -> Result<()> {
    let fail = |reason: String| NetbenchError::Verify {
        node: node.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let (len, hash) = hash_file(path).map_err(|e| fail(e.to_string()))?;
    if len != art.size {
        return Err(fail(format!("{len} bytes, expected {}", art.size)));
    }
    if hash != art.blake3 {
        return Err(fail(format!(
            "blake3 {}, expected {}",
            hash.to_hex(),
            art.blake3.to_hex()
        )));
    }
    Ok(())
}

/// One curl of the calibration file from the origin to node 1, alone on
/// the network: the goodput the caps allow (Mbit/s).
fn calibrate(tb: &Testbed, spec: &RunSpec, global: Deadline) -> Result<f64> {
    let ideal =
        spec.calib_size as f64 * 8.0 / (spec.caps.origin_mbit.min(spec.caps.node_mbit) * 1e6);
    let max_time = format!(
        "{:.0}",
        (ideal * 5.0 + 10.0)
            .min(global.remaining().as_secs_f64())
            .max(1.0)
    );
    let url = format!("http://{ORIGIN_IP}/{CALIB}");
    let out = run_in(
        &tb.node_ns[0],
        "curl",
        &[
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "--max-time",
            &max_time,
            "-w",
            "%{size_download} %{time_starttransfer} %{time_total}",
            &url,
        ],
    )?;
    let parse_err = |reason: &str| NetbenchError::Parse {
        cmd: "curl -w (calibration)".into(),
        reason: format!("{reason}: {out:?}"),
    };
    let f: Vec<f64> = out
        .split_whitespace()
        .map(|x| x.parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| parse_err("not numbers"))?;
    let [bytes, first_byte, total] = f[..] else {
        return Err(parse_err("expected 3 fields"));
    };
    let span = total - first_byte;
    if bytes as u64 != spec.calib_size || span <= 0.0 {
        return Err(parse_err("wrong size or zero time"));
    }
    Ok(bytes * 8.0 / span / 1e6)
}

struct Window {
    start: Instant,
    jiffies: Option<(u64, u64)>,
    log_mark: u64,
    link0: u64,
    links: Option<SamplerThread>,
}

impl Window {
    fn open(tb: &Testbed, nginx: &Nginx) -> Result<Window> {
        let ports = (0..tb.node_ns.len())
            .map(|i| format!("h{}", i + 1))
            .collect();
        Ok(Window {
            log_mark: nginx.log_mark()?,
            link0: tb.origin_tx_bytes()?,
            jiffies: cpu_jiffies(),
            links: Some(LinkSampler::start(&tb.bridge_ns, "ho", ports, tb.caps.node_mbit)?.spawn()),
            start: Instant::now(),
        })
    }

    /// The last link sample (at the end of the method) and what follows
    /// from the series: per-node times and the mean utilization.
    fn close_links(&mut self, f: &mut Figures, node_done: Vec<f64>) -> Result<()> {
        let Some(sampler) = self.links.take() else {
            return Ok(());
        };
        let series = sampler.finish()?;
        f.mean_utilization = series.mean_utilization(f64::INFINITY);
        f.node_done_secs = node_done;
        f.links = Some(series);
        Ok(())
    }

    fn busy(&self) -> f64 {
        match (self.jiffies, cpu_jiffies()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
            _ => 0.0,
        }
    }

    /// Origin figures; called once every download finished.
    fn origin(&self, tb: &Testbed, nginx: &Nginx, f: &mut Figures) -> Result<()> {
        // nginx logs a request when its response is done; the last ones
        // may land a moment after the client saw the last byte.
        sleep(Duration::from_millis(300))?;
        f.origin_body_bytes = nginx.body_bytes_since(self.log_mark, &format!("/{ARTIFACT}"))?;
        f.origin_link_bytes = tb.origin_tx_bytes()?.saturating_sub(self.link0);
        Ok(())
    }
}

fn one_server(
    tb: &Testbed,
    nginx: &Nginx,
    art: &Artifact,
    spec: &RunSpec,
    deadline: Deadline,
) -> Result<Figures> {
    let dir = spec.work.join("curl");
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let url = format!("http://{ORIGIN_IP}/{ARTIFACT}");
    let max_time = format!("{:.0}", deadline.remaining().as_secs_f64().max(1.0));
    let mut win = Window::open(tb, nginx)?;
    let mut procs = Vec::with_capacity(spec.nodes);
    for (i, ns) in tb.node_ns.iter().enumerate() {
        let out = dir.join(format!("n{}.bin", i + 1));
        let out_s = out.to_string_lossy().into_owned();
        let p = NsProc::spawn(
            &format!("curl n{}", i + 1),
            ns,
            Path::new("curl"),
            &["-sS", "--fail", "--max-time", &max_time, "-o", &out_s, &url],
            &[],
            &dir.join(format!("n{}.log", i + 1)),
        )?;
        procs.push((p, out));
    }
    let mut done: Vec<Option<(f64, Usage)>> = vec![None; procs.len()];
    while done.iter().any(Option::is_none) {
        for ((p, _), d) in procs.iter_mut().zip(done.iter_mut()) {
            if d.is_some() {
                continue;
            }
            if let Some(exit) = p.try_reap()? {
                if !exit.success {
                    return Err(NetbenchError::NodeFailed {
                        node: p.name.clone(),
                        reason: format!("curl exited with {}", exit.code),
                    });
                }
                *d = Some((win.start.elapsed().as_secs_f64(), exit.usage));
            }
        }
        if deadline.expired() {
            return Err(NetbenchError::Timeout {
                what: format!("one server, {} nodes", spec.nodes),
                secs: win.start.elapsed().as_secs_f64(),
            });
        }
        sleep(Duration::from_millis(20))?;
    }
    let busy = win.busy();
    let done: Vec<(f64, Usage)> = done.into_iter().flatten().collect();
    let mut f = Figures {
        time_secs: done.iter().map(|d| d.0).fold(0.0, f64::max),
        first_secs: done.iter().map(|d| d.0).fold(f64::INFINITY, f64::min),
        machine_busy: busy,
        ..Figures::default()
    };
    win.close_links(&mut f, done.iter().map(|d| d.0).collect())?;
    win.origin(tb, nginx, &mut f)?;
    let cpu: f64 = done.iter().map(|d| d.1.cpu_secs).sum();
    f.cpu_secs_per_gib_per_node = cpu / spec.nodes as f64 / (spec.size as f64 / GIB as f64);
    f.peak_rss_mib = done.iter().map(|d| d.1.peak_rss_mib).fold(0.0, f64::max);
    for (p, out) in &procs {
        verify(&p.name, out, art)?;
        f.verified += 1;
        std::fs::remove_file(out).map_err(io_err(format!("removing {}", out.display())))?;
    }
    Ok(f)
}

fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

/// Per-node agent configs: every other node a peer, the first `readers`
/// nodes origin readers, the digest given so every copy is verified.
fn agent_configs(spec: &RunSpec, art: &Artifact, certs: &Path) -> Result<Vec<AgentConfig>> {
    let digest: Digest = format!("blake3:{}", art.blake3.to_hex())
        .parse()
        .map_err(|e| NetbenchError::Config(format!("digest: {e}")))?;
    let names: Vec<String> = (0..spec.nodes).map(node_name).collect();
    let addr = |i: usize| SocketAddr::from((node_ip(i), AGENT_PORT));
    let readers = names[..spec.readers.clamp(1, spec.nodes)].to_vec();
    let source = SourceConfig::Http {
        url: format!("http://{ORIGIN_IP}/{ARTIFACT}"),
        headers: Default::default(),
        readers,
        whole: false,
        files: Vec::new(),
        manifest_url: None,
    };
    let mut out = Vec::with_capacity(spec.nodes);
    for (i, name) in names.iter().enumerate() {
        let peers = names
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, n)| PeerConfig {
                node: n.clone(),
                addr: addr(j),
            })
            .collect();
        let mut cfg = AgentConfig::new(
            name.clone(),
            addr(i),
            spec.work.join("agents").join(name),
            IdentityFiles::in_dir(&certs.join(name)),
            vec![ContentConfig {
                id: CONTENT_ID.into(),
                path: PathBuf::from(ARTIFACT),
                size: Some(art.size),
                piece_size: spec.piece_size,
                digest: Some(digest),
                source: source.clone(),
                peers,
                allowed_peers: names.clone(),
                root: None,
                origin_version: None,
                reuse_from: Vec::new(),
                caps: Default::default(),
                directory: false,
            }],
        );
        // Keep serving after completion: a node that is done still uploads
        // to the others until the whole run is over (as a DaemonSet does).
        cfg.stay = true;
        // Experiments: agent tuning overrides (partial JSON of the agent's
        // `tuning`), e.g. NETBENCH_AGENT_TUNING='{"uploadSlots":2}'.
        if let Ok(t) = std::env::var("NETBENCH_AGENT_TUNING") {
            cfg.tuning = serde_json::from_str(&t)
                .map_err(|e| NetbenchError::Config(format!("NETBENCH_AGENT_TUNING: {e}")))?;
        }
        cfg.validate()
            .map_err(|e| NetbenchError::Config(format!("{name}: {e}")))?;
        out.push(cfg);
    }
    Ok(out)
}

fn peerfill(
    tb: &Testbed,
    nginx: &Nginx,
    art: &Artifact,
    spec: &RunSpec,
    deadline: Deadline,
) -> Result<Figures> {
    let certs = spec.work.join("certs");
    let names: Vec<String> = (0..spec.nodes).map(node_name).collect();
    let agent = spec.agent_bin.to_string_lossy().into_owned();
    super::procs::run(
        &agent,
        &[
            "gen-certs",
            "--out",
            &certs.to_string_lossy(),
            "--nodes",
            &names.join(","),
        ],
    )?;
    let cfgs = agent_configs(spec, art, &certs)?;
    let mut files = Vec::with_capacity(cfgs.len());
    for cfg in &cfgs {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(io_err(format!("creating {}", cfg.data_dir.display())))?;
        let path = cfg.data_dir.with_extension("json");
        let json = serde_json::to_vec_pretty(cfg)
            .map_err(|e| NetbenchError::Config(format!("{}: {e}", cfg.node)))?;
        std::fs::write(&path, json).map_err(io_err(format!("writing {}", path.display())))?;
        files.push(path);
    }
    let log_level = std::env::var("NETBENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into());
    let mut win = Window::open(tb, nginx)?;
    let mut agents = Vec::with_capacity(cfgs.len());
    for ((cfg, file), ns) in cfgs.iter().zip(&files).zip(&tb.node_ns) {
        agents.push(NsProc::spawn(
            &cfg.node,
            ns,
            &spec.agent_bin,
            &["run", "--config", &file.to_string_lossy()],
            &[("RUST_LOG", log_level.as_str())],
            &cfg.data_dir.with_extension("log"),
        )?);
    }
    let status_files: Vec<PathBuf> = cfgs
        .iter()
        .map(|c| status_path(&c.data_dir.join(STATUS_DIR), CONTENT_ID))
        .collect();
    let mut done: Vec<Option<f64>> = vec![None; agents.len()];
    let mut usage = vec![Usage::default(); agents.len()];
    while done.iter().any(Option::is_none) {
        for (i, a) in agents.iter_mut().enumerate() {
            if done[i].is_some() {
                continue;
            }
            if let Some(exit) = a.try_reap()? {
                return Err(NetbenchError::NodeFailed {
                    node: a.name.clone(),
                    reason: format!(
                        "agent exited with {} before completing (log: {})",
                        exit.code,
                        cfgs[i].data_dir.with_extension("log").display()
                    ),
                });
            }
            usage[i] = a.usage();
            match ContentStatus::read(&status_files[i]) {
                Ok(st) if st.phase == Phase::Complete => {
                    done[i] = Some(win.start.elapsed().as_secs_f64());
                }
                Ok(st) if st.phase == Phase::Failed => {
                    return Err(NetbenchError::NodeFailed {
                        node: a.name.clone(),
                        reason: format!(
                            "content failed: {} {}",
                            st.reason.unwrap_or_default(),
                            st.message.unwrap_or_default()
                        ),
                    });
                }
                // Not written yet, being replaced, or still fetching.
                _ => {}
            }
        }
        if deadline.expired() {
            let left: Vec<String> = done
                .iter()
                .zip(&status_files)
                .filter(|(d, _)| d.is_none())
                .map(|(_, s)| match ContentStatus::read(s) {
                    Ok(st) => format!(
                        "{}: {:?} {}/{} pieces {}",
                        st.id,
                        st.phase,
                        st.pieces_done,
                        st.piece_count,
                        st.message.unwrap_or_default()
                    ),
                    Err(_) => format!("{}: no status", s.display()),
                })
                .collect();
            return Err(NetbenchError::Timeout {
                what: format!("peerfill, {} nodes; not complete: {left:?}", spec.nodes),
                secs: win.start.elapsed().as_secs_f64(),
            });
        }
        sleep(Duration::from_millis(20))?;
    }
    let busy = win.busy();
    for (u, a) in usage.iter_mut().zip(&agents) {
        *u = a.usage();
    }
    // Before the stop: agents that stay keep uploading until then.
    let mut links_figures = Figures::default();
    win.close_links(&mut links_figures, done.iter().flatten().copied().collect())?;
    stop_all(&mut agents, Duration::from_secs(5));
    let times: Vec<f64> = done.into_iter().flatten().collect();
    let mut f = Figures {
        time_secs: times.iter().copied().fold(0.0, f64::max),
        first_secs: times.iter().copied().fold(f64::INFINITY, f64::min),
        machine_busy: busy,
        // From the origin's bridge port (wire bytes, per-second samples).
        origin_copy_secs: links_figures
            .links
            .as_ref()
            .and_then(|l| l.origin_sent_secs(art.size))
            .unwrap_or(0.0),
        ..links_figures
    };
    win.origin(tb, nginx, &mut f)?;
    let cpu: f64 = usage.iter().map(|u| u.cpu_secs).sum();
    f.cpu_secs_per_gib_per_node = cpu / spec.nodes as f64 / (spec.size as f64 / GIB as f64);
    f.peak_rss_mib = usage.iter().map(|u| u.peak_rss_mib).fold(0.0, f64::max);
    for cfg in &cfgs {
        let out = cfg.data_dir.join(ARTIFACT);
        verify(&cfg.node, &out, art)?;
        f.verified += 1;
    }
    Ok(f)
}
