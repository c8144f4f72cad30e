//! Memory benchmark (issue 15, item 4): agent RSS at a large content and
//! many peers, on loopback (no namespaces, no root).
//!
//! One pseudo-random file of `size` bytes; `seeders` agents each hold it
//! (a hard link in their data dir, so it is stored once) and seed it (a
//! `node` source naming themselves); then `receivers` agents fetch it with
//! every seeder (and each other) as a peer. Every agent's memory is read
//! from `/proc/<pid>/status` once a second; the peak per role is reported.
//! Each agent listens on its own loopback address 127.77.x.y (port 7000).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use peerfill_agent::agent::{
    AgentConfig, ContentConfig, ContentStatus, IdentityFiles, PeerConfig, Phase, STATUS_DIR,
    SourceConfig, status_path,
};
use peerfill_agent::content::Digest;
use tracing::info;

use super::procs::{Mem, NsProc, proc_mem, stop_all};
use super::scenario::{RunMeta, verify, write_artifact};
use super::{Deadline, GIB, MIB, NetbenchError, Result, io_err, sleep};

const CONTENT_ID: &str = "big";
const FILE: &str = "big.bin";
const PORT: u16 = 7000;
/// Disk left free beyond what the run writes.
const DISK_MARGIN: u64 = 2 * GIB;

/// What the memory benchmark is asked to do.
#[derive(Debug, Clone)]
pub struct MemorySpec {
    pub size: u64,
    pub seeders: usize,
    pub receivers: usize,
    pub piece_size: u32,
    pub agent_bin: PathBuf,
    /// Scratch directory (removed by the caller).
    pub work: PathBuf,
}

/// Peak memory of one role (seeders or receivers), MiB.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RolePeak {
    /// Largest VmHWM of one agent of the role.
    pub max_hwm_mib: f64,
    /// Median VmHWM over the role's agents.
    pub median_hwm_mib: f64,
    /// Largest anonymous RSS (RssAnon) seen in one agent.
    pub max_anon_mib: f64,
    /// Largest file-backed RSS (RssFile) seen in one agent.
    pub max_file_mib: f64,
}

/// Figures of one memory run (stored in the results JSON).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MemoryResult {
    pub size: u64,
    pub seeders: usize,
    pub receivers: usize,
    pub piece_size: u32,
    /// Seeders started to every seeder Complete (hashing the file), s.
    pub seed_ready_secs: f64,
    /// Receivers started to the last receiver Complete, s.
    pub receive_secs: f64,
    pub seeders_peak: RolePeak,
    pub receivers_peak: RolePeak,
    /// Receivers' CPU seconds per GiB received.
    pub receiver_cpu_secs_per_gib: f64,
    /// Receivers whose copy had the right size and BLAKE3.
    pub verified: usize,
    #[serde(default)]
    pub meta: RunMeta,
}

/// Bytes the run writes: the source file plus one copy per receiver.
pub fn disk_needed(size: u64, receivers: usize) -> u64 {
    size * (1 + receivers as u64) + DISK_MARGIN
}

/// Free bytes for an unprivileged writer on the file system of `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| NetbenchError::Config(format!("{}: NUL in path", dir.display())))?;
    // SAFETY: statvfs is plain data, filled by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a pointer to a local.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(NetbenchError::Io {
            what: format!("statvfs {}", dir.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Loopback address of agent `i` (0-based): 127.77.(i / 250).(i % 250 + 1).
pub fn agent_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 77, (i / 250) as u8, (i % 250) as u8 + 1)
}

fn seeder_name(i: usize) -> String {
    format!("seed-{}", i + 1)
}

fn receiver_name(i: usize) -> String {
    format!("recv-{}", i + 1)
}

/// Per-role peak from per-agent peaks (VmHWM, max anon, max file), KiB.
pub fn role_peak(per_agent: &[Mem]) -> RolePeak {
    let mib = |k: u64| k as f64 / 1024.0;
    let mut hwm: Vec<u64> = per_agent.iter().map(|m| m.hwm_kib).collect();
    hwm.sort_unstable();
    let median = match hwm.len() {
        0 => 0.0,
        n if n % 2 == 1 => mib(hwm[n / 2]),
        n => (mib(hwm[n / 2 - 1]) + mib(hwm[n / 2])) / 2.0,
    };
    RolePeak {
        max_hwm_mib: mib(hwm.last().copied().unwrap_or(0)),
        median_hwm_mib: median,
        max_anon_mib: mib(per_agent.iter().map(|m| m.anon_kib).max().unwrap_or(0)),
        max_file_mib: mib(per_agent.iter().map(|m| m.file_kib).max().unwrap_or(0)),
    }
}

/// Keeps the largest value of each field seen.
fn fold_peak(peak: &mut Mem, now: Mem) {
    peak.hwm_kib = peak.hwm_kib.max(now.hwm_kib);
    peak.rss_kib = peak.rss_kib.max(now.rss_kib);
    peak.anon_kib = peak.anon_kib.max(now.anon_kib);
    peak.file_kib = peak.file_kib.max(now.file_kib);
}

struct Agent {
    proc: NsProc,
    cfg: AgentConfig,
    status: PathBuf,
    peak: Mem,
}

impl Agent {
    fn sample(&mut self) {
        if let Some(m) = proc_mem(self.proc.pid()) {
            fold_peak(&mut self.peak, m);
        }
    }

    /// Whether its content is Complete; a failure or an early exit is an error.
    fn complete(&mut self) -> Result<bool> {
        if let Some(exit) = self.proc.try_reap()? {
            return Err(NetbenchError::NodeFailed {
                node: self.cfg.node.clone(),
                reason: format!(
                    "agent exited with {} (log: {})",
                    exit.code,
                    self.cfg.data_dir.with_extension("log").display()
                ),
            });
        }
        match ContentStatus::read(&self.status) {
            Ok(st) if st.phase == Phase::Complete => Ok(true),
            Ok(st) if st.phase == Phase::Failed => Err(NetbenchError::NodeFailed {
                node: self.cfg.node.clone(),
                reason: format!(
                    "content failed: {} {}",
                    st.reason.unwrap_or_default(),
                    st.message.unwrap_or_default()
                ),
            }),
            _ => Ok(false),
        }
    }
}

/// Runs the benchmark; every agent is stopped when this returns.
pub fn run(spec: &MemorySpec, deadline: Deadline) -> Result<MemoryResult> {
    let total = spec.seeders + spec.receivers;
    if spec.seeders == 0 || spec.receivers == 0 || total > 60_000 {
        return Err(NetbenchError::Config(format!(
            "seeders and receivers must be >= 1 (got {} and {})",
            spec.seeders, spec.receivers
        )));
    }
    std::fs::create_dir_all(&spec.work)
        .map_err(io_err(format!("creating {}", spec.work.display())))?;
    let need = disk_needed(spec.size, spec.receivers);
    let free = free_bytes(&spec.work)?;
    if free < need {
        return Err(NetbenchError::Config(format!(
            "{} has {:.1} GiB free, the memory benchmark needs {:.1} GiB \
             (the file, one copy per receiver, {} GiB margin): use --work-root elsewhere \
             or a smaller --mib",
            spec.work.display(),
            free as f64 / GIB as f64,
            need as f64 / GIB as f64,
            DISK_MARGIN / GIB
        )));
    }
    let src = spec.work.join(FILE);
    let started = Instant::now();
    let art = write_artifact(&src, spec.size, 15)?;
    info!(
        secs = started.elapsed().as_secs_f64(),
        size = spec.size,
        "memory: source file written"
    );

    let seeders: Vec<String> = (0..spec.seeders).map(seeder_name).collect();
    let receivers: Vec<String> = (0..spec.receivers).map(receiver_name).collect();
    let all: Vec<String> = seeders.iter().chain(&receivers).cloned().collect();
    let certs = spec.work.join("certs");
    super::procs::run(
        &spec.agent_bin.to_string_lossy(),
        &[
            "gen-certs",
            "--out",
            &certs.to_string_lossy(),
            "--nodes",
            &all.join(","),
        ],
    )?;
    let digest: Digest = format!("blake3:{}", art.blake3.to_hex())
        .parse()
        .map_err(|e| NetbenchError::Config(format!("digest: {e}")))?;
    let addr = |i: usize| SocketAddr::from((agent_ip(i), PORT));
    let peer = |i: usize| PeerConfig {
        node: all[i].clone(),
        addr: addr(i),
    };
    let recv_idx = spec.seeders..total;
    let config = |i: usize| -> Result<AgentConfig> {
        let name = &all[i];
        let data_dir = spec.work.join("agents").join(name);
        let seeder = i < spec.seeders;
        let (source, peers, allowed, dig) = if seeder {
            // Seeds its own hard link; serves the receivers (who dial it).
            (
                SourceConfig::Node {
                    node: name.clone(),
                    path: None,
                },
                Vec::new(),
                receivers.clone(),
                // No digest: a seeder would hash the whole file twice.
                None,
            )
        } else {
            (
                SourceConfig::Node {
                    node: seeders[0].clone(),
                    path: None,
                },
                (0..total).filter(|&j| j != i).map(peer).collect(),
                all.clone(),
                Some(digest),
            )
        };
        let mut cfg = AgentConfig::new(
            name.clone(),
            addr(i),
            data_dir,
            IdentityFiles::in_dir(&certs.join(name)),
            vec![ContentConfig {
                id: CONTENT_ID.into(),
                path: PathBuf::from(FILE),
                size: Some(spec.size),
                piece_size: spec.piece_size,
                digest: dig,
                source,
                peers,
                allowed_peers: allowed,
                root: None,
                origin_version: None,
                reuse_from: Vec::new(),
                caps: Default::default(),
                directory: false,
            }],
        );
        cfg.stay = true;
        cfg.validate()
            .map_err(|e| NetbenchError::Config(format!("{name}: {e}")))?;
        Ok(cfg)
    };
    let log_level = std::env::var("NETBENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into());
    let start_agent = |cfg: AgentConfig| -> Result<Agent> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(io_err(format!("creating {}", cfg.data_dir.display())))?;
        let file = cfg.data_dir.with_extension("json");
        let json = serde_json::to_vec_pretty(&cfg)
            .map_err(|e| NetbenchError::Config(format!("{}: {e}", cfg.node)))?;
        std::fs::write(&file, json).map_err(io_err(format!("writing {}", file.display())))?;
        let proc = NsProc::spawn_here(
            &cfg.node,
            &spec.agent_bin,
            &["run", "--config", &file.to_string_lossy()],
            &[("RUST_LOG", log_level.as_str())],
            &cfg.data_dir.with_extension("log"),
        )?;
        let status = status_path(&cfg.data_dir.join(STATUS_DIR), CONTENT_ID);
        Ok(Agent {
            proc,
            cfg,
            status,
            peak: Mem::default(),
        })
    };

    // Seeders: a hard link each, then start; wait until all have hashed.
    let mut seeds = Vec::with_capacity(spec.seeders);
    for i in 0..spec.seeders {
        let cfg = config(i)?;
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(io_err(format!("creating {}", cfg.data_dir.display())))?;
        let link = cfg.data_dir.join(FILE);
        std::fs::hard_link(&src, &link).map_err(io_err(format!(
            "linking {} to {}",
            src.display(),
            link.display()
        )))?;
        seeds.push(start_agent(cfg)?);
    }
    let t_seed = Instant::now();
    wait_all(&mut seeds, &mut [], deadline, "seeders hashing")?;
    let seed_ready_secs = t_seed.elapsed().as_secs_f64();
    info!(seed_ready_secs, "memory: every seeder holds the file");

    let mut recvs = Vec::with_capacity(spec.receivers);
    for i in recv_idx {
        recvs.push(start_agent(config(i)?)?);
    }
    let t_recv = Instant::now();
    wait_all(&mut recvs, &mut seeds, deadline, "receivers")?;
    let receive_secs = t_recv.elapsed().as_secs_f64();
    for a in seeds.iter_mut().chain(recvs.iter_mut()) {
        a.sample();
    }
    let cpu: f64 = recvs.iter().map(|a| a.proc.usage().cpu_secs).sum();
    let mut procs: Vec<NsProc> = Vec::new();
    let (seed_mem, recv_mem): (Vec<Mem>, Vec<Mem>) = (
        seeds.iter().map(|a| a.peak).collect(),
        recvs.iter().map(|a| a.peak).collect(),
    );
    let recv_files: Vec<(String, PathBuf)> = recvs
        .iter()
        .map(|a| (a.cfg.node.clone(), a.cfg.data_dir.join(FILE)))
        .collect();
    procs.extend(seeds.into_iter().map(|a| a.proc));
    procs.extend(recvs.into_iter().map(|a| a.proc));
    stop_all(&mut procs, Duration::from_secs(5));
    let mut verified = 0;
    for (node, path) in &recv_files {
        verify(node, path, &art)?;
        verified += 1;
        // Disk is scarce: each copy goes as soon as it is checked.
        std::fs::remove_file(path).map_err(io_err(format!("removing {}", path.display())))?;
    }
    Ok(MemoryResult {
        size: spec.size,
        seeders: spec.seeders,
        receivers: spec.receivers,
        piece_size: spec.piece_size,
        seed_ready_secs,
        receive_secs,
        seeders_peak: role_peak(&seed_mem),
        receivers_peak: role_peak(&recv_mem),
        receiver_cpu_secs_per_gib: cpu / spec.receivers as f64 / (spec.size as f64 / GIB as f64),
        verified,
        meta: RunMeta::default(),
    })
}

/// Waits until every agent of `wait` is Complete, sampling the memory of
/// those and of `also` (already running) once a second.
fn wait_all(wait: &mut [Agent], also: &mut [Agent], deadline: Deadline, what: &str) -> Result<()> {
    let mut done = vec![false; wait.len()];
    let mut next_sample = Instant::now();
    let started = Instant::now();
    let mut next_log = Instant::now() + Duration::from_secs(10);
    loop {
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(1);
            for a in wait.iter_mut().chain(also.iter_mut()) {
                a.sample();
            }
        }
        for (a, d) in wait.iter_mut().zip(done.iter_mut()) {
            if !*d {
                *d = a.complete()?;
            }
        }
        // A seeder that dies while receivers run is a failure too.
        for a in also.iter_mut() {
            a.complete()?;
        }
        if done.iter().all(|d| *d) {
            return Ok(());
        }
        if Instant::now() >= next_log {
            next_log += Duration::from_secs(10);
            info!(
                what,
                done = done.iter().filter(|d| **d).count(),
                of = done.len(),
                secs = started.elapsed().as_secs_f64(),
                "memory: waiting"
            );
        }
        if deadline.expired() {
            return Err(NetbenchError::Timeout {
                what: format!(
                    "{what}: {} of {} complete",
                    done.iter().filter(|d| **d).count(),
                    done.len()
                ),
                secs: started.elapsed().as_secs_f64(),
            });
        }
        sleep(Duration::from_millis(100))?;
    }
}

/// Prints the figures of a memory run.
pub fn print(r: &MemoryResult) {
    println!(
        "memory: {} MiB, {} seeders, {} receivers, pieces {} KiB: seeders ready after {:.1} s, \
         received in {:.1} s ({:.0} MiB/s per receiver), verified {}/{}",
        r.size / MIB,
        r.seeders,
        r.receivers,
        r.piece_size / 1024,
        r.seed_ready_secs,
        r.receive_secs,
        r.size as f64 / MIB as f64 / r.receive_secs.max(1e-9),
        r.verified,
        r.receivers
    );
    for (role, p) in [("receiver", &r.receivers_peak), ("seeder", &r.seeders_peak)] {
        println!(
            "memory: {role:<8} peak VmHWM max {:.1} MiB, median {:.1} MiB; \
             max RssAnon {:.1} MiB, max RssFile {:.1} MiB",
            p.max_hwm_mib, p.median_hwm_mib, p.max_anon_mib, p.max_file_mib
        );
    }
    println!(
        "memory: receivers' CPU {:.2} s per GiB received",
        r.receiver_cpu_secs_per_gib
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(hwm: u64, anon: u64, file: u64) -> Mem {
        Mem {
            hwm_kib: hwm,
            rss_kib: 0,
            anon_kib: anon,
            file_kib: file,
        }
    }

    #[test]
    fn role_peak_takes_max_and_median_of_the_agents() {
        let p = role_peak(&[m(1024, 10, 0), m(3072, 5, 2048), m(2048, 1024, 1)]);
        assert_eq!(p.max_hwm_mib, 3.0);
        assert_eq!(p.median_hwm_mib, 2.0);
        assert_eq!(p.max_anon_mib, 1.0);
        assert_eq!(p.max_file_mib, 2.0);
        let even = role_peak(&[m(1024, 0, 0), m(2048, 0, 0)]);
        assert_eq!(even.median_hwm_mib, 1.5);
        assert_eq!(role_peak(&[]), RolePeak::default());
    }

    #[test]
    fn fold_keeps_each_fields_largest_value() {
        let mut p = m(10, 50, 1);
        fold_peak(&mut p, m(20, 5, 7));
        assert_eq!(p, m(20, 50, 7));
    }

    #[test]
    fn disk_need_and_addresses() {
        assert_eq!(disk_needed(4 * GIB, 1), 10 * GIB);
        assert_eq!(agent_ip(0), Ipv4Addr::new(127, 77, 0, 1));
        assert_eq!(agent_ip(64), Ipv4Addr::new(127, 77, 0, 65));
        assert_eq!(agent_ip(250), Ipv4Addr::new(127, 77, 1, 1));
        assert!(agent_ip(499).is_loopback());
    }

    #[test]
    fn free_bytes_of_a_real_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
    }
}
