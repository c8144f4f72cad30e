//! The demo binary as a user runs it (small settings): it completes with
//! the summary, and on SIGINT it stops; either way no process and no work
//! dir is left behind.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DEMO: &str = env!("CARGO_BIN_EXE_peerfill-demo");
/// Upper bound of one demo run in these tests: the build step (a no-op
/// after `e2e/run-tests` built every binary, minutes when sources changed),
/// cluster start, a transfer of a few dozen MiB, hashing. Below nextest's
/// 600 s limit, so the test fails with its own message.
const RUN_LIMIT: Duration = Duration::from_secs(480);

/// Pids of processes whose command line or environment names `dir` (the
/// agents get data dirs under it, every child a kubeconfig in it).
fn processes_using(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let read = |f: &str| {
            std::fs::read(e.path().join(f))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default()
        };
        let cmdline = read("cmdline");
        // A zombie has an empty command line and is already dead.
        if cmdline.is_empty() {
            continue;
        }
        if cmdline.contains(&needle) || read("environ").contains(&needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Polls for a few seconds: SIGKILLed children vanish once reaped.
fn assert_nothing_left(work: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_using(work);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes left behind: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!work.exists(), "work dir {} left behind", work.display());
}

/// Kills the demo (and, through PR_SET_PDEATHSIG, its children) if a test
/// fails before it exits.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the demo on 3 nodes with an artifact of `size`; `extra` flags
/// after the defaults.
fn start(work: &Path, size: &str, extra: &[&str]) -> Running {
    let child = Command::new(DEMO)
        .args([
            "--nodes",
            "3",
            "--size",
            size,
            "--timeout",
            "180",
            "--work-dir",
        ])
        .arg(work)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the demo");
    Running(child)
}

/// Lines of the child's stdout as they come, on a channel; stderr collected
/// by a second thread.
fn stream_output(r: &mut Running) -> (mpsc::Receiver<String>, std::thread::JoinHandle<String>) {
    let stdout = r.0.stdout.take().expect("stdout piped");
    let mut stderr = r.0.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    (rx, err)
}

fn wait_exit(r: &mut Running, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = r.0.try_wait().expect("wait for the demo") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the demo ran longer than {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn work_dir(base: &tempfile::TempDir) -> PathBuf {
    // A name the demo creates itself (and so removes).
    base.path().join("work")
}

#[test]
fn demo_runs_to_a_summary_and_leaves_nothing_behind() {
    let base = tempfile::tempdir().expect("tempdir");
    let work = work_dir(&base);
    let mut demo = start(&work, "32MiB", &["--measure-baseline"]);
    let (lines, err) = stream_output(&mut demo);
    let status = wait_exit(&mut demo, RUN_LIMIT);
    // The reader ends at EOF, once the demo and everything it started
    // closed the pipe.
    let out: Vec<String> = lines.iter().collect();
    let out = out.join("\n");
    let err = err.join().unwrap_or_default();
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    for expected in [
        "[1/5] Building the operator and agent binaries",
        "build --workspace --bins",
        "get dist -w",
        "Summary",
        "wall time (apply -> Complete): ",
        "delivered:                     3 nodes x 32.0 MiB = 96.0 MiB",
        "nodes received from peers:",
        "origin server sent:",
        "one server at this run's origin rate ",
        "capped at 100.0 MiB/s in total",
        "one server capped at 100.0 MiB/s needs at least 3 x 32.0 MiB / 100.0 MiB/s = 1.0 s; the swarm took ",
        "[baseline] 3 plain HTTP clients download the artifact from the same origin at once",
        "measured: 3 plain HTTP clients at once from the same origin took ",
        "files: 3/3 verified against blake3:",
        "Stopped every process and removed ",
    ] {
        assert!(
            out.contains(expected),
            "missing {expected:?} in:\n{out}\nstderr:\n{err}"
        );
    }
    // Not a terminal: plain progress lines, no bar drawing codes.
    assert!(out.contains("model-weights  phase "), "{out}");
    assert!(
        !out.contains('\u{1b}'),
        "escape codes in piped output:\n{out}"
    );
    // Every node's file was under the work dir.
    for node in ["node-1", "node-2", "node-3"] {
        let file = work
            .join("nodes")
            .join(node)
            .join("data/models/llama-3-8b/model.safetensors");
        assert!(
            out.contains(&file.display().to_string()),
            "{node} file not listed:\n{out}"
        );
    }
    assert_nothing_left(&work);
}

#[test]
fn sigint_mid_transfer_stops_everything_and_removes_the_work_dir() {
    let base = tempfile::tempdir().expect("tempdir");
    let work = work_dir(&base);
    // The first test covers the build step; this one measures the stop,
    // so it uses the binaries as built (e2e/run-tests builds them first).
    let mut demo = start(&work, "512MiB", &["--no-build"]);
    let (lines, err) = stream_output(&mut demo);
    // Wait until the Distribution is applied (agents and operator run).
    let deadline = Instant::now() + RUN_LIMIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let applied = line.starts_with("[4/5]");
                seen.push(line);
                if applied {
                    break;
                }
            }
            Err(_) => {
                // Stop it first: its stderr closes only when it exits.
                let _ = demo.0.kill();
                let _ = demo.0.wait();
                let err = err.join().unwrap_or_default();
                panic!(
                    "the demo never applied:\n{}\nstderr:\n{err}",
                    seen.join("\n")
                );
            }
        }
    }
    let running = processes_using(&work);
    // The operator and three agents at least.
    assert!(running.len() >= 4, "{running:#?}");
    assert!(work.join("kubeconfig").is_file());
    std::thread::sleep(Duration::from_millis(500));
    let pid = demo.0.id().to_string();
    let sent = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let status = wait_exit(&mut demo, Duration::from_secs(30));
    let err = err.join().unwrap_or_default();
    assert_eq!(status.code(), Some(130), "stderr:\n{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_nothing_left(&work);
}
