//! Emulated-network benchmark (issue #6): peerfill agents against one HTTP
//! server (nginx + curl), on Linux network namespaces with `tc` caps, measured
//! against the Kumar–Ross lower bound.
//!
//! Needs root, `ip`/`tc` (iproute2), `nginx` and `curl`. Everything it creates
//! is named `pfnb-<pid>-…` and removed on exit, on error, on panic and on
//! SIGINT/SIGTERM; namespaces left by an earlier run whose process is gone are
//! removed at start.
//!
//! - [`testbed`]: namespaces, veth links through a bridge, `tc` caps.
//! - [`procs`]: processes inside a namespace, their CPU time and peak RSS.
//! - [`nginx`]: the origin server and its access-log byte count.
//! - [`scenario`]: one run on one testbed: one server, then peerfill.
//! - [`report`]: the bound, `BENCHMARKS.md` and the PNG plot.

pub mod floor;
pub mod links;
pub mod memory;
pub mod nginx;
pub mod procs;
pub mod report;
pub mod results;
pub mod scenario;
pub mod testbed;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Name prefix of everything the benchmark creates (namespaces, work dirs).
pub const PREFIX: &str = "pfnb-";

/// Errors of the benchmark; each names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum NetbenchError {
    #[error("the netbench needs root (network namespaces and tc)")]
    NotRoot,
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: timed out after {secs:.0} s")]
    Timeout { what: String, secs: f64 },
    #[error("interrupted by a signal")]
    Interrupted,
    #[error("{node}: {reason}")]
    NodeFailed { node: String, reason: String },
    #[error("{node}: copy at {path} is wrong: {reason}")]
    Verify {
        node: String,
        path: PathBuf,
        reason: String,
    },
    #[error("unexpected output of `{cmd}`: {reason}")]
    Parse { cmd: String, reason: String },
    #[error("agent config: {0}")]
    Config(String),
    #[error("plot {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
    #[error("namespaces left behind: {0:?}")]
    Leftovers(Vec<String>),
}

pub type Result<T, E = NetbenchError> = std::result::Result<T, E>;

/// Wraps an I/O error with what was being done.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetbenchError {
    let what = what.into();
    move |source| NetbenchError::Io { what, source }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe. The poll loops see it and
    // return `Interrupted`, so every guard is dropped on the normal path.
    STOP.store(true, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag the wait loops check, so a
/// Ctrl-C unwinds through the guards that delete namespaces and processes.
pub fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(sig, handler);
        }
    }
}

/// `Err(Interrupted)` once a stop signal arrived.
pub fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        Err(NetbenchError::Interrupted)
    } else {
        Ok(())
    }
}

/// A point in time every wait of a run must finish by.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn after(d: Duration) -> Self {
        Deadline(Instant::now() + d)
    }

    /// The earlier of the two.
    pub fn min(self, other: Deadline) -> Deadline {
        Deadline(self.0.min(other.0))
    }

    pub fn expired(&self) -> bool {
        Instant::now() >= self.0
    }

    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// Sleeps `d` in short steps, returning early with `Interrupted` on a signal.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_stop()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
