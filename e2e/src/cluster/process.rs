//! Child processes of the local cluster: located next to the running
//! executable, logged to files, killed on drop and when this process dies.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::ClusterError;

/// Environment variable naming the directory of the project's binaries
/// (default: next to the running executable).
pub const BIN_DIR_ENV: &str = "PEERFILL_BIN_DIR";

/// Path of the workspace binary `name` (e.g. `peerfill-agent`): in
/// `$PEERFILL_BIN_DIR`, else in the running executable's directory, else its
/// parent (test executables live in `target/<profile>/deps/`).
pub fn binary_path(name: &str) -> Result<PathBuf, ClusterError> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os(BIN_DIR_ENV) {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        dirs.push(dir.to_path_buf());
        if let Some(parent) = dir.parent() {
            dirs.push(parent.to_path_buf());
        }
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ClusterError::BinaryMissing {
            name: name.to_string(),
            searched: dirs,
        })
}

/// A restartable child process: program, arguments and environment are
/// fixed; stdout and stderr are appended to `log`.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl ChildProcess {
    /// A process not started yet.
    pub fn new(
        name: impl Into<String>,
        program: PathBuf,
        args: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        log: PathBuf,
    ) -> Self {
        ChildProcess {
            name: name.into(),
            program,
            args,
            env,
            log,
            child: None,
            starts: 0,
        }
    }

    /// Name for messages, e.g. `agent node-3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file (stdout and stderr of every start, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts the process (no-op while it runs). The kernel kills it when
    /// the thread that started it exits, so start it from a long-lived
    /// thread (a test's thread or a runtime worker, not `spawn_blocking`).
    pub fn start(&mut self) -> Result<(), ClusterError> {
        if self.is_running() {
            return Ok(());
        }
        let io = |what: String| move |source| ClusterError::Io { what, source };
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io(format!("opening {}", self.log.display())))?;
        self.starts += 1;
        {
            use std::io::Write as _;
            let _ = writeln!(
                log,
                "=== start #{} of {} at {} ===",
                self.starts,
                self.name,
                chrono::Utc::now().to_rfc3339()
            );
        }
        let err = log
            .try_clone()
            .map_err(io(format!("cloning {}", self.log.display())))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| ClusterError::Spawn {
            name: self.name.clone(),
            program: self.program.clone(),
            source,
        })?;
        tracing::debug!(name = %self.name, pid = child.id(), "started");
        self.child = Some(child);
        Ok(())
    }

    /// Whether the process runs (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// The pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) to the running process.
    pub fn signal(&mut self, signal: libc::c_int) -> std::io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| std::io::Error::other(format!("{} is not running", self.name)))?;
        let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// SIGKILL, as a crash would; reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill, then start again with the same command line.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.kill();
        self.start()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a text file ("" if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_log_restart_and_die_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("sleep.log");
        let mut p = ChildProcess::new(
            "sleeper",
            PathBuf::from("/bin/sh"),
            vec!["-c".into(), "echo hello $GREETING; exec sleep 30".into()],
            vec![("GREETING".into(), "world".into())],
            log.clone(),
        );
        // Waits (bounded) until the log holds `n` greetings: a child killed
        // before its shell ran `echo` would not have written one.
        let greetings = |n: usize| {
            let mut text = String::new();
            for _ in 0..100 {
                text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.matches("hello world").count() >= n {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            text
        };
        p.start().expect("start");
        assert!(p.is_running());
        let first = p.pid().expect("pid");
        greetings(1);
        p.restart().expect("restart");
        let second = p.pid().expect("pid");
        assert_ne!(first, second);
        // The first one is gone (reaped), the second runs.
        assert!(!Path::new(&format!("/proc/{first}")).exists());
        let text = greetings(2);
        assert_eq!(text.matches("hello world").count(), 2, "{text}");
        assert!(text.contains("=== start #2 of sleeper"));
        drop(p);
        assert!(!Path::new(&format!("/proc/{second}")).exists());
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let e = binary_path("peerfill-no-such-binary").expect_err("missing");
        let text = e.to_string();
        assert!(text.contains("cargo build --workspace --bins"), "{text}");
        assert!(text.contains("peerfill-no-such-binary"), "{text}");
    }
}
