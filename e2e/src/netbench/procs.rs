//! Commands and long-running processes, inside a network namespace or not.
//!
//! A process in a namespace is started as `ip netns exec <ns> <program>`:
//! `ip` enters the namespace and execs the program, so the child's pid is the
//! program's pid and its `/proc/<pid>` CPU and RSS figures are the program's.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{NetbenchError, Result, io_err};

/// Runs a command to completion; its stdout on success, a typed error with
/// its stderr otherwise.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let cmd = || format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("starting `{}`", cmd())))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetbenchError::Command {
            cmd: cmd(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs a command inside namespace `ns`.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// CPU seconds and peak resident set size of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu_secs: f64,
    pub peak_rss_mib: f64,
}

/// How a reaped process ended, with its resource use.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub success: bool,
    pub code: i32,
    pub usage: Usage,
}

/// A child process that is killed (and reaped) when dropped.
#[derive(Debug)]
pub struct NsProc {
    pub name: String,
    child: Child,
    exit: Option<Exit>,
}

impl NsProc {
    /// Starts `program args` in namespace `ns` with stdout and stderr into
    /// `log`. The kernel kills it if this process dies without unwinding.
    pub fn spawn(
        name: &str,
        ns: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<NsProc> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program).args(args);
        Self::spawn_cmd(
            name,
            cmd,
            env,
            log,
            &format!("{} in {ns}", program.display()),
        )
    }

    /// Starts `program args` in this namespace (loopback benchmarks).
    pub fn spawn_here(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<NsProc> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Self::spawn_cmd(name, cmd, env, log, &program.display().to_string())
    }

    fn spawn_cmd(
        name: &str,
        mut cmd: Command,
        env: &[(&str, &str)],
        log: &Path,
        what: &str,
    ) -> Result<NsProc> {
        let log_file =
            std::fs::File::create(log).map_err(io_err(format!("creating {}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(io_err(format!("cloning {}", log.display())))?;
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
        // PDEATHSIG survives the exec of `ip` and of the program (neither is
        // set-uid nor has file capabilities).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io_err(format!("starting {what}")))?;
        Ok(NsProc {
            name: name.to_string(),
            child,
            exit: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time and peak RSS so far, from `/proc` (zero once reaped: use
    /// [`Exit::usage`] then).
    pub fn usage(&self) -> Usage {
        if let Some(e) = self.exit {
            return e.usage;
        }
        proc_usage(self.child.id())
    }

    /// Reaps the process if it has exited, with its rusage; `None` while it
    /// runs.
    pub fn try_reap(&mut self) -> Result<Option<Exit>> {
        if let Some(e) = self.exit {
            return Ok(Some(e));
        }
        let pid = self.child.id() as libc::pid_t;
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain data; wait4 fills it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to locals; pid is our own child.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == 0 {
            return Ok(None);
        }
        if r < 0 {
            return Err(NetbenchError::Io {
                what: format!("waiting for {}", self.name),
                source: std::io::Error::last_os_error(),
            });
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let success = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        let exit = Exit {
            success,
            code,
            usage: Usage {
                cpu_secs: tv(ru.ru_utime) + tv(ru.ru_stime),
                // ru_maxrss is in KiB on Linux.
                peak_rss_mib: ru.ru_maxrss as f64 / 1024.0,
            },
        };
        self.exit = Some(exit);
        Ok(Some(exit))
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps it.
    pub fn stop(&mut self, grace: Duration) {
        stop_all(std::slice::from_mut(self), grace);
    }

    fn terminate(&self) {
        if self.exit.is_none() {
            // SAFETY: a signal to our own unreaped child (its pid cannot be
            // reused before we reap it).
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
    }

    fn kill(&mut self) {
        if self.exit.is_some() {
            return;
        }
        let _ = self.child.kill();
        // Blocking wait: after SIGKILL the exit is immediate.
        let _ = self.child.wait();
        self.exit = Some(Exit {
            success: false,
            code: 128 + libc::SIGKILL,
            usage: Usage::default(),
        });
    }
}

impl Drop for NsProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGTERM to all at once (agents close their connections in parallel),
/// SIGKILL to those still running after `grace`; reaps them all.
pub fn stop_all(procs: &mut [NsProc], grace: Duration) {
    for p in procs.iter() {
        p.terminate();
    }
    let end = std::time::Instant::now() + grace;
    while std::time::Instant::now() < end {
        let mut running = 0;
        for p in procs.iter_mut() {
            if matches!(p.try_reap(), Ok(None)) {
                running += 1;
            }
        }
        if running == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in procs.iter_mut() {
        p.kill();
    }
}

/// utime+stime (from `/proc/<pid>/stat`) and VmHWM (from `/proc/<pid>/status`).
pub fn proc_usage(pid: u32) -> Usage {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_secs = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat_cpu(&s, ticks))
        .unwrap_or(0.0);
    let peak_rss_mib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| parse_vm_hwm_kib(&s))
        .map(|kib| kib as f64 / 1024.0)
        .unwrap_or(0.0);
    Usage {
        cpu_secs,
        peak_rss_mib,
    }
}

/// utime + stime in seconds from a `/proc/<pid>/stat` line (fields 14 and
/// 15; the command name in parentheses may contain spaces).
pub fn parse_stat_cpu(stat: &str, ticks_per_sec: f64) -> Option<f64> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let u: f64 = f.get(11)?.parse().ok()?;
    let k: f64 = f.get(12)?.parse().ok()?;
    Some((u + k) / ticks_per_sec)
}

/// VmHWM in KiB from `/proc/<pid>/status`.
pub fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Memory figures of a live process from `/proc/<pid>/status`, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mem {
    /// VmHWM: peak resident set.
    pub hwm_kib: u64,
    /// VmRSS: resident set now.
    pub rss_kib: u64,
    /// RssAnon: anonymous (heap, stacks) part of VmRSS.
    pub anon_kib: u64,
    /// RssFile: file-backed (mapped files) part of VmRSS.
    pub file_kib: u64,
}

/// [`Mem`] from the text of `/proc/<pid>/status` (None without VmRSS: a
/// zombie or kernel thread).
pub fn parse_status_mem(status: &str) -> Option<Mem> {
    let field = |key: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some(Mem {
        hwm_kib: field("VmHWM:")?,
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
        file_kib: field("RssFile:").unwrap_or(0),
    })
}

/// [`Mem`] of process `pid` now.
pub fn proc_mem(pid: u32) -> Option<Mem> {
    parse_status_mem(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Busy and total jiffies of all CPUs, from the first line of `/proc/stat`.
pub fn cpu_jiffies() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat(s.lines().next()?)
}

/// (busy, total) from the `cpu ` line of `/proc/stat`; idle and iowait are
/// not busy.
pub fn parse_proc_stat(line: &str) -> Option<(u64, u64)> {
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_handles_spaces_in_the_name() {
        let line = "4242 (peerfill agent) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 99";
        assert_eq!(parse_stat_cpu(line, 100.0), Some(3.0));
    }

    #[test]
    fn vm_hwm_is_read_in_kib() {
        let s = "Name:\tx\nVmPeak:\t 9000 kB\nVmHWM:\t   43008 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_vm_hwm_kib(s), Some(43008));
        assert_eq!(parse_vm_hwm_kib("Name: x\n"), None);
    }

    #[test]
    fn status_memory_fields_in_kib() {
        let s = "Name:\tx\nVmHWM:\t   43008 kB\nVmRSS:\t 30000 kB\nRssAnon:\t 20000 kB\n\
                 RssFile:\t 9000 kB\nRssShmem:\t 1000 kB\n";
        assert_eq!(
            parse_status_mem(s),
            Some(Mem {
                hwm_kib: 43008,
                rss_kib: 30000,
                anon_kib: 20000,
                file_kib: 9000
            })
        );
        assert_eq!(parse_status_mem("Name: x\nState: Z\n"), None);
    }

    #[test]
    fn proc_stat_busy_excludes_idle_and_iowait() {
        let (busy, total) = parse_proc_stat("cpu  100 5 50 800 40 3 2 0 0 0").unwrap();
        assert_eq!(total, 1000);
        assert_eq!(busy, 160);
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4 5"), None);
    }

    #[test]
    fn a_failing_command_names_itself_and_its_stderr() {
        let err = run("sh", &["-c", "echo nope >&2; exit 3"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("nope"), "{msg}");
    }
}
