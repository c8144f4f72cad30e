//! `peerfill-netbench`: peerfill agents against one HTTP server (nginx +
//! curl) on an emulated network of Linux namespaces, against the Kumar–Ross
//! lower bound. Root only. See `e2e/netbench/README.md`.
//!
//! ```text
//! cargo build --release -p peerfill-agent --bin peerfill-agent
//! cargo run --release -p peerfill-e2e --bin peerfill-netbench -- short
//! cargo run --release -p peerfill-e2e --bin peerfill-netbench -- sweep
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use peerfill_crds::validation::MAX_ORIGIN_CONNECTIONS_DEFAULT;
use peerfill_e2e::netbench::floor;
use peerfill_e2e::netbench::memory::{self, MemorySpec};
use peerfill_e2e::netbench::report::{self, Machine, Render, Sweep};
use peerfill_e2e::netbench::results::{self, Links, Results};
use peerfill_e2e::netbench::scenario::{self, DEFAULT_PIECE_KIB, RunMeta, RunResult, RunSpec};
use peerfill_e2e::netbench::testbed::{self, Caps, ETHERNET_MTU};
use peerfill_e2e::netbench::{
    Deadline, MIB, NetbenchError, PREFIX, Result, install_signal_handlers,
};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "peerfill-netbench",
    about = "peerfill vs one server on an emulated network (root only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs N in `--nodes` at `--mib` (then `--extra`), appends each run to
    /// the results JSON under `--label`, and re-renders BENCHMARKS.md and the
    /// plots after every run.
    Sweep {
        #[command(flatten)]
        common: Common,
        /// Node counts of the sweep.
        #[arg(long, value_delimiter = ',', default_value = "2,4,8,16")]
        nodes: Vec<usize>,
        /// Artifact size of the sweep, MiB.
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Extra runs after the sweep, as NODESxMIB (e.g. 32x32,8x1024).
        #[arg(long, value_delimiter = ',')]
        extra: Vec<String>,
        #[command(flatten)]
        out: Output,
    },
    /// Agent memory at a large content and many peers, on loopback (no
    /// root): S seeders holding the file, R receivers with all as peers.
    Memory {
        /// The peerfill-agent binary (default: next to this one).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// File size, MiB.
        #[arg(long, default_value_t = 4096)]
        mib: u64,
        #[arg(long, default_value_t = 64)]
        seeders: usize,
        #[arg(long, default_value_t = 1)]
        receivers: usize,
        /// Piece size, KiB; 0: the product's default, chosen from the size.
        #[arg(long, default_value_t = DEFAULT_PIECE_KIB)]
        piece_kib: u32,
        /// Stored with the result (e.g. `before` / `after`).
        #[arg(long, default_value = "dev")]
        label: String,
        /// Where the scratch directory `pfnb-<pid>` goes (needs the file
        /// size times 1 + receivers, plus 2 GiB, free).
        #[arg(long, default_value = "/var/tmp")]
        work_root: PathBuf,
        /// Hard timeout, seconds.
        #[arg(long, default_value_t = 1200)]
        timeout_secs: u64,
        /// Keep the scratch dir (agent logs; the received copies are deleted).
        #[arg(long)]
        keep_work: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Re-renders the markdown and the plot from a sweep's results JSON
    /// (e.g. after editing the notes); no root needed.
    Render {
        #[command(flatten)]
        out: Output,
    },
    /// CI form: N=4, 32 MiB, 200 Mbit/s links; asserts every copy verified and
    /// the namespaces gone, prints figures, never asserts timings.
    Short {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        #[arg(long, default_value_t = 32)]
        mib: u64,
    },
    /// One run of both methods; prints its figures as JSON (`--record`
    /// also appends it to the results and re-renders).
    Run {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        nodes: usize,
        #[arg(long)]
        mib: u64,
        /// Append the run to the results JSON and re-render.
        #[arg(long)]
        record: bool,
        #[command(flatten)]
        out: Output,
    },
    /// The testbed's CPU floor: every node sends `--mib` spread over the
    /// others with no agent (`--transport udp`: quinn's UDP layer, GSO and
    /// `recvmmsg`; `quic`: the agent's QUIC and TLS carrying plain streams;
    /// `tcp`: kernel TCP), and the CPU per GiB received per node is
    /// printed and appended to `--out`.
    Floor {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        nodes: usize,
        /// Bytes each node sends (and receives), MiB.
        #[arg(long, default_value_t = 256)]
        mib: u64,
        #[arg(long, value_delimiter = ',', default_value = "udp,quic,tcp")]
        transport: Vec<floor::Transport>,
        /// Results of floor runs, appended to.
        #[arg(long, default_value = "docs/bench/netbench-floor.json")]
        out: PathBuf,
    },
    /// One node of `floor`, started by it inside the node's namespace.
    #[command(hide = true)]
    FloorNode {
        #[arg(long)]
        transport: floor::Transport,
        #[arg(long, value_delimiter = ',')]
        peers: Vec<std::net::Ipv4Addr>,
        #[arg(long)]
        bytes_per_peer: u64,
        #[arg(long)]
        mbit: f64,
        #[arg(long, default_value_t = ETHERNET_MTU)]
        mtu: u32,
        /// The node's `tls.crt`, `tls.key` and `ca.crt` (QUIC).
        #[arg(long)]
        identity: Option<PathBuf>,
        #[arg(long)]
        deadline_secs: u64,
    },
    /// Deletes namespaces and work dirs of earlier runs whose process is gone.
    Cleanup {
        /// Where the scratch directories `pfnb-<pid>` are.
        #[arg(long, default_value = "/var/tmp")]
        work_root: PathBuf,
    },
}

#[derive(Args, Clone)]
struct Output {
    /// Results JSON (runs and memory runs, each with its label).
    #[arg(long, default_value = "docs/bench/netbench.json")]
    results: PathBuf,
    /// Markdown report to write.
    #[arg(long, default_value = "BENCHMARKS.md")]
    markdown: PathBuf,
    /// Plot of last node / T* against N, per label and link rate.
    #[arg(long, default_value = "docs/bench/time-vs-bound.png")]
    ratio_plot: PathBuf,
    /// Plot of uplink utilization over time at N = 16.
    #[arg(long, default_value = "docs/bench/utilization-n16.png")]
    util_plot: PathBuf,
    /// The integrator's analysis, put under "Analysis" if the file exists.
    #[arg(long, default_value = "e2e/netbench/analysis.md")]
    analysis: PathBuf,
    /// The issue-6 sweep (old format), rendered as an earlier section.
    #[arg(long, default_value = "docs/bench/netbench-issue6.json")]
    legacy: PathBuf,
    /// Its plot (not re-rendered) and hand-written notes.
    #[arg(long, default_value = "docs/bench/netbench-issue6.png")]
    legacy_plot: PathBuf,
    #[arg(long, default_value = "e2e/netbench/notes-issue6.md")]
    legacy_notes: PathBuf,
}

#[derive(Args, Clone)]
struct Common {
    /// The peerfill-agent binary (default: next to this one).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Origin link cap, Mbit/s (default 100; 200 for `short`).
    #[arg(long)]
    origin_mbit: Option<f64>,
    /// Every node's link cap, Mbit/s (default 100; 200 for `short`).
    #[arg(long)]
    node_mbit: Option<f64>,
    /// One-way delay on each host's uplink, ms (needs sch_netem).
    #[arg(long, default_value_t = 1.0)]
    delay_ms: f64,
    /// MTU of every link, bytes (576..=9000).
    #[arg(long, default_value_t = ETHERNET_MTU, value_parser = clap::value_parser!(u32).range(576..=9000))]
    mtu: u32,
    /// peerfill origin readers: the first min(N, readers) nodes (default:
    /// `strategy.maxOriginConnections`'s).
    #[arg(long, default_value_t = MAX_ORIGIN_CONNECTIONS_DEFAULT as usize)]
    readers: usize,
    /// Where the per-run scratch directory `pfnb-<pid>` goes.
    #[arg(long, default_value = "/var/tmp")]
    work_root: PathBuf,
    /// Hard timeout of the whole command, seconds (default 3600; 180 for `short`).
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Keep each run's scratch dir (agent logs and status files).
    #[arg(long)]
    keep_work: bool,
    /// Agents' piece size, KiB; 0: the product's default, chosen from the size.
    #[arg(long, default_value_t = DEFAULT_PIECE_KIB)]
    piece_kib: u32,
    /// Stored with every run (e.g. `before` / `after`); runs are keyed by it.
    #[arg(long, default_value = "dev")]
    label: String,
    /// Measure peerfill only; the one-server time is computed (N·F/u_origin).
    #[arg(long)]
    skip_one_server: bool,
}

impl Common {
    fn caps(&self, default_mbit: f64) -> Caps {
        Caps {
            origin_mbit: self.origin_mbit.unwrap_or(default_mbit),
            node_mbit: self.node_mbit.unwrap_or(default_mbit),
            delay_ms: self.delay_ms,
            mtu: self.mtu,
        }
    }
}

/// The scratch directory of this process, removed when dropped unless kept.
struct WorkDir(PathBuf, bool);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.1 {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(dir = %self.0.display(), error = %e, "cannot remove the work dir");
        }
    }
}

fn agent_bin(given: Option<&Path>) -> Result<PathBuf> {
    let bin = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|source| NetbenchError::Io {
                what: "locating this binary".into(),
                source,
            })?
            .with_file_name("peerfill-agent"),
    };
    if !bin.exists() {
        return Err(NetbenchError::Config(format!(
            "{} not found: run `cargo build --release -p peerfill-agent --bin peerfill-agent` first",
            bin.display()
        )));
    }
    Ok(bin)
}

/// Removes work dirs `pfnb-<pid>` under `root` whose process is gone.
fn remove_stale_work_dirs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            info!(dir = %e.path().display(), "removing a stale work dir");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Checks for root, removes what earlier runs left and makes this
/// process's scratch directory.
fn fresh_work_dir(common: &Common) -> Result<WorkDir> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(NetbenchError::NotRoot);
    }
    let removed = testbed::remove_stale()?;
    if !removed.is_empty() {
        warn!(?removed, "removed namespaces of an earlier run");
    }
    remove_stale_work_dirs(&common.work_root);
    let dir = common
        .work_root
        .join(format!("{PREFIX}{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| NetbenchError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    Ok(WorkDir(dir, common.keep_work))
}

fn preflight(common: &Common) -> Result<(PathBuf, WorkDir)> {
    let work = fresh_work_dir(common)?;
    for tool in ["ip", "tc", "curl"] {
        peerfill_e2e::netbench::procs::run("sh", &["-c", &format!("command -v {tool}")]).map_err(
            |_| NetbenchError::Config(format!("{tool} not found (apt-get install iproute2 curl)")),
        )?;
    }
    if !Path::new(peerfill_e2e::netbench::nginx::NGINX_BIN).exists() {
        return Err(NetbenchError::Config(
            "nginx not found: apt-get install nginx-light".into(),
        ));
    }
    let bin = agent_bin(common.agent_bin.as_deref())?;
    Ok((bin, work))
}

fn spec(common: &Common, bin: &Path, work: &Path, nodes: usize, mib: u64, caps: Caps) -> RunSpec {
    let run_dir = work.join(format!("n{nodes}-{mib}mib"));
    RunSpec {
        nodes,
        size: mib * MIB,
        caps,
        readers: common.readers,
        agent_bin: bin.to_path_buf(),
        work: run_dir,
        // About 2 s at the node cap, at least 8 MiB.
        calib_size: ((caps.node_mbit * 1e6 / 8.0 * 2.0) as u64).max(8 * MIB) / MIB * MIB,
        skip_one_server: common.skip_one_server,
        piece_size: scenario::piece_size(common.piece_kib, mib * MIB),
    }
}

/// One run; its scratch dir is removed afterwards, whatever happened.
fn one_run(spec: &RunSpec, deadline: Deadline, keep: bool) -> Result<RunResult> {
    println!(
        "run: N={} size={} MiB, caps origin {} / nodes {} Mbit/s, delay {} ms, MTU {}",
        spec.nodes,
        spec.size / MIB,
        spec.caps.origin_mbit,
        spec.caps.node_mbit,
        spec.caps.delay_ms,
        spec.caps.mtu
    );
    let guard = WorkDir(spec.work.clone(), keep);
    let r = scenario::run(spec, deadline);
    if keep {
        println!("kept {}", spec.work.display());
    }
    drop(guard);
    r
}

/// Our namespaces still present (must be none after a run).
fn leftovers() -> Result<Vec<String>> {
    let own = testbed::own_prefix();
    Ok(testbed::list_ours()?
        .into_iter()
        .filter(|n| n.starts_with(&own))
        .collect())
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!(
        "cargo build --release -p peerfill-agent --bin peerfill-agent\n\
         cargo run --release -p peerfill-e2e --bin peerfill-netbench -- {}",
        args.join(" ")
    )
}

fn utc_now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M").to_string()
}

/// `floor`: one run per transport on its own testbed, each appended to `out`.
fn floor_cmd(
    common: &Common,
    nodes: usize,
    mib: u64,
    transports: &[floor::Transport],
    out: &Path,
) -> Result<()> {
    let work = fresh_work_dir(common)?;
    let exe = std::env::current_exe().map_err(|source| NetbenchError::Io {
        what: "locating this binary".into(),
        source,
    })?;
    let deadline = Deadline::after(Duration::from_secs(common.timeout_secs.unwrap_or(1800)));
    let caps = common.caps(100.0);
    let mut runs: Vec<serde_json::Value> = std::fs::read_to_string(out)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for &t in transports {
        let r = floor::run_floor(&exe, &work.0, t, nodes, mib, caps, deadline)?;
        println!(
            "floor {:?}: N={} x {} MiB at {} Mbit/s, MTU {}: {:.2} CPU s/GiB/node ({:.2}..{:.2}), {:.1} % delivered, {:.1} s, machine {:.0} % busy",
            r.transport,
            r.nodes,
            mib,
            r.node_mbit,
            r.mtu,
            r.cpu_secs_per_gib_per_node,
            r.cpu_min,
            r.cpu_max,
            r.delivered * 100.0,
            r.secs,
            r.machine_busy * 100.0
        );
        let mut v = serde_json::to_value(&r).map_err(|e| NetbenchError::Config(e.to_string()))?;
        v["label"] = common.label.clone().into();
        v["started"] = utc_now().into();
        runs.push(v);
        let text = serde_json::to_string_pretty(&runs)
            .map_err(|e| NetbenchError::Config(e.to_string()))?;
        std::fs::write(out, text + "\n").map_err(|source| NetbenchError::Io {
            what: format!("writing {}", out.display()),
            source,
        })?;
    }
    let left = leftovers()?;
    if !left.is_empty() {
        return Err(NetbenchError::Leftovers(left));
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    install_signal_handlers();
    let cli = Cli::parse();
    let started = Instant::now();
    let result = match cli.command {
        Cmd::Cleanup { work_root } => testbed::remove_stale().map(|removed| {
            remove_stale_work_dirs(&work_root);
            println!("removed {} namespaces: {removed:?}", removed.len());
        }),
        Cmd::Short { common, nodes, mib } => short(&common, nodes, mib),
        Cmd::Run {
            common,
            nodes,
            mib,
            record,
            out,
        } => single(&common, nodes, mib, record.then_some(&out)),
        Cmd::Memory {
            agent_bin,
            mib,
            seeders,
            receivers,
            piece_kib,
            label,
            work_root,
            timeout_secs,
            keep_work,
            out,
        } => memory_cmd(
            agent_bin.as_deref(),
            MemorySpec {
                size: mib * MIB,
                seeders,
                receivers,
                piece_size: scenario::piece_size(piece_kib, mib * MIB),
                agent_bin: PathBuf::new(),
                work: work_root,
            },
            &label,
            Duration::from_secs(timeout_secs),
            keep_work,
            &out,
        ),
        Cmd::Sweep {
            common,
            nodes,
            mib,
            extra,
            out,
        } => sweep(&common, &nodes, mib, &extra, &out),
        Cmd::Render { out } => render_from(&out),
        Cmd::Floor {
            common,
            nodes,
            mib,
            transport,
            out,
        } => floor_cmd(&common, nodes, mib, &transport, &out),
        Cmd::FloorNode {
            transport,
            peers,
            bytes_per_peer,
            mbit,
            mtu,
            identity,
            deadline_secs,
        } => floor::node_main(
            transport,
            &peers,
            bytes_per_peer,
            (mbit, mtu),
            identity.as_deref(),
            Duration::from_secs(deadline_secs),
        )
        .and_then(|r| {
            serde_json::to_string(&r)
                .map(|line| println!("{line}"))
                .map_err(|e| NetbenchError::Config(e.to_string()))
        }),
    };
    match result {
        Ok(()) => {
            println!("done in {:.1} s", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = %e, "netbench failed");
            eprintln!("netbench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn short(common: &Common, nodes: usize, mib: u64) -> Result<()> {
    let deadline = Deadline::after(Duration::from_secs(common.timeout_secs.unwrap_or(180)));
    let (bin, work) = preflight(common)?;
    let spec = spec(common, &bin, &work.0, nodes, mib, common.caps(200.0));
    let outcome = one_run(&spec, deadline, common.keep_work);
    // Namespaces must be gone whether the run passed or not.
    let left = leftovers()?;
    let r = outcome?;
    if !left.is_empty() {
        return Err(NetbenchError::Leftovers(left));
    }
    for (method, f) in [("one server", &r.one_server), ("peerfill", &r.peerfill)] {
        if method == "one server" && r.one_server_computed {
            continue;
        }
        if f.verified != r.nodes {
            return Err(NetbenchError::NodeFailed {
                node: method.into(),
                reason: format!("{} of {} copies verified", f.verified, r.nodes),
            });
        }
    }
    println!(
        "short: ok: {} nodes x {} MiB, every copy verified by both methods, no namespace left",
        r.nodes, mib
    );
    Ok(())
}

fn single(common: &Common, nodes: usize, mib: u64, record: Option<&Output>) -> Result<()> {
    let deadline = Deadline::after(Duration::from_secs(common.timeout_secs.unwrap_or(3600)));
    let (bin, work) = preflight(common)?;
    let agent = AgentId::of(&bin)?;
    let spec = spec(common, &bin, &work.0, nodes, mib, common.caps(100.0));
    let r = measured(&spec, deadline, common, &agent)?;
    println!(
        "{}",
        serde_json::to_string(&r).unwrap_or_else(|e| format!("(json: {e})"))
    );
    if let Some(out) = record {
        let mut res = load_results(&out.results)?;
        res.add_run(r);
        save_and_render(&res, out)?;
    }
    Ok(())
}

/// The agent binary's path and BLAKE3, recorded with every run.
struct AgentId {
    path: String,
    blake3: String,
}

impl AgentId {
    fn of(bin: &Path) -> Result<AgentId> {
        let bytes = std::fs::read(bin).map_err(|source| NetbenchError::Io {
            what: format!("reading {}", bin.display()),
            source,
        })?;
        Ok(AgentId {
            path: std::fs::canonicalize(bin)
                .unwrap_or_else(|_| bin.to_path_buf())
                .display()
                .to_string(),
            blake3: blake3::hash(&bytes).to_hex().to_string(),
        })
    }

    fn meta(&self, label: &str) -> RunMeta {
        RunMeta {
            label: label.to_string(),
            agent_path: self.path.clone(),
            agent_blake3: self.blake3.clone(),
            started: utc_now(),
            load_before: report::loadavg(),
            load_after: String::new(),
            command: command_line(),
        }
    }
}

/// One run with its label, agent, time and load average.
fn measured(
    spec: &RunSpec,
    deadline: Deadline,
    common: &Common,
    agent: &AgentId,
) -> Result<RunResult> {
    let mut meta = agent.meta(&common.label);
    let mut r = one_run(spec, deadline, common.keep_work)?;
    meta.load_after = report::loadavg();
    r.meta = meta;
    Ok(r)
}

fn load_results(path: &Path) -> Result<Results> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| NetbenchError::Parse {
            cmd: format!("reading {}", path.display()),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Results::new(Machine::read())),
        Err(source) => Err(NetbenchError::Io {
            what: format!("reading {}", path.display()),
            source,
        }),
    }
}

fn save_and_render(res: &Results, out: &Output) -> Result<()> {
    write_file(
        &out.results,
        &serde_json::to_vec_pretty(res).map_err(|e| NetbenchError::Parse {
            cmd: "serialising the results".into(),
            reason: e.to_string(),
        })?,
    )?;
    render(res, out)
}

fn memory_cmd(
    agent_bin_arg: Option<&Path>,
    mut spec: MemorySpec,
    label: &str,
    timeout: Duration,
    keep: bool,
    out: &Output,
) -> Result<()> {
    let deadline = Deadline::after(timeout);
    let bin = agent_bin(agent_bin_arg)?;
    let agent = AgentId::of(&bin)?;
    remove_stale_work_dirs(&spec.work);
    spec.work = spec.work.join(format!("{PREFIX}{}", std::process::id()));
    spec.agent_bin = bin;
    let guard = WorkDir(spec.work.clone(), keep);
    let mut meta = agent.meta(label);
    let outcome = memory::run(&spec, deadline);
    if keep {
        println!("kept {}", spec.work.display());
    }
    drop(guard);
    let mut r = outcome?;
    meta.load_after = report::loadavg();
    r.meta = meta;
    memory::print(&r);
    let mut res = load_results(&out.results)?;
    res.add_memory(r);
    save_and_render(&res, out)
}

fn parse_extra(s: &str) -> Result<(usize, u64)> {
    s.split_once('x')
        .and_then(|(n, m)| Some((n.trim().parse().ok()?, m.trim().parse().ok()?)))
        .ok_or_else(|| NetbenchError::Config(format!("--extra {s:?}: expected NODESxMIB")))
}

fn sweep(common: &Common, nodes: &[usize], mib: u64, extra: &[String], out: &Output) -> Result<()> {
    let deadline = Deadline::after(Duration::from_secs(common.timeout_secs.unwrap_or(3600)));
    let mut plan: Vec<(usize, u64)> = nodes.iter().map(|&n| (n, mib)).collect();
    for e in extra.iter().filter(|e| !e.trim().is_empty()) {
        plan.push(parse_extra(e)?);
    }
    let (bin, work) = preflight(common)?;
    let agent = AgentId::of(&bin)?;
    let mut res = load_results(&out.results)?;
    res.machine = Machine::read();
    for (n, m) in plan {
        let spec = spec(common, &bin, &work.0, n, m, common.caps(100.0));
        let r = measured(&spec, deadline, common, &agent)?;
        res.add_run(r);
        // Written after every run, so an interrupted sweep keeps its figures.
        save_and_render(&res, out)?;
    }
    let left = leftovers()?;
    if !left.is_empty() {
        return Err(NetbenchError::Leftovers(left));
    }
    println!(
        "wrote {}, {}, {} and {}; load average now {}",
        out.results.display(),
        out.markdown.display(),
        out.ratio_plot.display(),
        out.util_plot.display(),
        report::loadavg()
    );
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| NetbenchError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
    }
    std::fs::write(path, bytes).map_err(|source| NetbenchError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}

/// Writes BENCHMARKS.md (issue 15's results, then the issue-6 sweep if its
/// JSON is there) and the plots.
fn render(res: &Results, out: &Output) -> Result<()> {
    let analysis = std::fs::read_to_string(&out.analysis).ok();
    let results_rel = relative_to(&out.results, &out.markdown);
    let ratio_rel = relative_to(&out.ratio_plot, &out.markdown);
    let util_rel = relative_to(&out.util_plot, &out.markdown);
    let mut text = String::from("# Benchmarks\n\n");
    // Sections other tools keep in the same file stay above this report.
    let existing = std::fs::read_to_string(&out.markdown).unwrap_or_default();
    text.push_str(results::sections_above(&existing));
    text.push_str(&results::markdown(
        res,
        &Links {
            results: &results_rel,
            ratio_plot: &ratio_rel,
            util_plot: &util_rel,
        },
        analysis.as_deref(),
    ));
    if let Ok(bytes) = std::fs::read(&out.legacy) {
        let sw: Sweep = serde_json::from_slice(&bytes).map_err(|e| NetbenchError::Parse {
            cmd: format!("reading {}", out.legacy.display()),
            reason: e.to_string(),
        })?;
        let notes = std::fs::read_to_string(&out.legacy_notes).ok();
        let plot_rel = relative_to(&out.legacy_plot, &out.markdown);
        let legacy_rel = relative_to(&out.legacy, &out.markdown);
        text.push_str("\n## Earlier: the issue-6 sweep (100 Mbit/s, agent of commit 05528c0)\n\n");
        text.push_str(
            "_Kept as it was measured. Today's netbench reruns it with `sweep --label issue6 \
             --nodes 2,4,8,16 --mib 256 --extra 8x1024` (results go to the section above)._\n\n",
        );
        text.push_str(&report::legacy_section(
            &sw,
            &Render {
                plot: Some(&plot_rel),
                results: Some(&legacy_rel),
                notes: notes.as_deref(),
            },
        ));
    }
    write_file(&out.markdown, text.as_bytes())?;
    for plot in [&out.ratio_plot, &out.util_plot] {
        if let Some(dir) = plot.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| NetbenchError::Io {
                what: format!("creating {}", dir.display()),
                source,
            })?;
        }
    }
    results::plot_ratio(&out.ratio_plot, res)?;
    results::plot_utilization(&out.util_plot, res, 16)
}

fn render_from(out: &Output) -> Result<()> {
    let res = load_results(&out.results)?;
    render(&res, out)?;
    println!(
        "wrote {}, {} and {}",
        out.markdown.display(),
        out.ratio_plot.display(),
        out.util_plot.display()
    );
    Ok(())
}

/// `target` as a path relative to the directory of `from` when `target` is
/// under it (the markdown links to the plot).
fn relative_to(target: &Path, from: &Path) -> String {
    let base = from.parent().unwrap_or(Path::new(""));
    target
        .strip_prefix(base)
        .unwrap_or(target)
        .to_string_lossy()
        .into_owned()
}
