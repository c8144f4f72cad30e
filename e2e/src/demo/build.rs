//! Makes sure the operator and agent binaries exist and are current.
//!
//! `cargo run -p peerfill-e2e --bin peerfill-demo` builds only this package,
//! so the demo builds the other two binaries itself, with the same cargo,
//! the same profile and the same target directory as its own executable;
//! they then sit next to it.
//!
//! It builds `--workspace --bins`, not `-p peerfill-operator -p
//! peerfill-agent`: cargo unifies dependency features over the packages
//! selected, so the narrower build compiles kube, reqwest and the two
//! binaries a second time with other features (minutes on a small machine),
//! while the workspace build is the one `e2e/run-tests` already did.
//!
//! It also drops the variables `cargo run` sets for the program it runs
//! (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...; see [`RUN_ONLY_ENV`]): the
//! inner cargo would otherwise inherit them, and build scripts that track
//! one (ring's tracks `CARGO_MANIFEST_DIR`) would look changed, so ring,
//! rustls, kube, quinn and everything above them were compiled again on
//! every first demo run (18 crates, minutes on a small machine), and again
//! by the next plain `cargo build`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Binaries the local cluster runs.
pub const BINARIES: [&str; 2] = ["peerfill-operator", "peerfill-agent"];
/// What cargo builds (see the module docs for why not just those two).
const BUILD_ARGS: [&str; 3] = ["build", "--workspace", "--bins"];

/// Variables `cargo run` sets for the program it starts, not for cargo:
/// names, and prefixes ending in `_`.
pub const RUN_ONLY_ENV: [&str; 6] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PKG_",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
];

/// The names among `vars` that the inner cargo must not inherit.
pub fn run_only_vars<'a>(vars: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    vars.into_iter()
        .filter(|v| {
            RUN_ONLY_ENV.iter().any(|r| {
                if r.ends_with('_') {
                    v.starts_with(r)
                } else {
                    v == r
                }
            })
        })
        .collect()
}

/// Why the binaries could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The demo's own path says nothing about the profile.
    #[error("cannot tell the cargo profile from the demo's path {0}")]
    NoProfile(PathBuf),
    /// cargo could not be started.
    #[error("starting {cargo}: {source}")]
    Spawn {
        /// The cargo executable.
        cargo: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// cargo failed; its output went to the terminal.
    #[error("`{command}` failed ({status})")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// cargo succeeded but a binary is not where it should be.
    #[error("{0} is missing after the build")]
    Missing(PathBuf),
}

/// How to build the binaries and where they end up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildPlan {
    /// `$CARGO`, or `cargo`.
    pub cargo: String,
    /// The workspace manifest.
    pub manifest: PathBuf,
    /// cargo's `--target-dir`.
    pub target_dir: PathBuf,
    /// Profile arguments: none (dev), `--release`, or `--profile NAME`.
    pub profile_args: Vec<String>,
    /// Where the binaries land (the demo's own directory).
    pub bin_dir: PathBuf,
}

impl BuildPlan {
    /// The plan for a demo executable at `exe`
    /// (`<target>/<profile dir>/peerfill-demo`).
    pub fn for_exe(exe: &Path, cargo: Option<String>) -> Result<BuildPlan, BuildError> {
        let no_profile = || BuildError::NoProfile(exe.to_owned());
        let bin_dir = exe.parent().ok_or_else(no_profile)?;
        let profile_dir = bin_dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(no_profile)?;
        let target_dir = bin_dir.parent().ok_or_else(no_profile)?;
        let profile_args = match profile_dir {
            "debug" => vec![],
            "release" => vec!["--release".to_owned()],
            other => vec!["--profile".to_owned(), other.to_owned()],
        };
        Ok(BuildPlan {
            cargo: cargo
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "cargo".to_owned()),
            manifest: workspace_root().join("Cargo.toml"),
            target_dir: target_dir.to_owned(),
            profile_args,
            bin_dir: bin_dir.to_owned(),
        })
    }

    /// The plan for the running demo (`$CARGO` is set by `cargo run`).
    pub fn current() -> Result<BuildPlan, BuildError> {
        let exe = std::env::current_exe().map_err(|_| BuildError::NoProfile(PathBuf::new()))?;
        BuildPlan::for_exe(&exe, std::env::var("CARGO").ok())
    }

    /// cargo's arguments.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = BUILD_ARGS.iter().map(|a| (*a).to_owned()).collect();
        args.extend(self.profile_args.iter().cloned());
        args.extend([
            "--manifest-path".to_owned(),
            self.manifest.display().to_string(),
            "--target-dir".to_owned(),
            self.target_dir.display().to_string(),
        ]);
        args
    }

    /// The command as shown on screen (`cargo`, not the toolchain path
    /// `cargo run` puts in `$CARGO`).
    pub fn command_line(&self) -> String {
        let mut args: Vec<String> = BUILD_ARGS.iter().map(|a| (*a).to_owned()).collect();
        args.extend(self.profile_args.iter().cloned());
        let cargo = Path::new(&self.cargo)
            .file_name()
            .map_or(self.cargo.clone(), |n| n.to_string_lossy().into_owned());
        format!("{cargo} {}", args.join(" "))
    }

    /// Where binary `name` is after the build.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Runs cargo (its output goes to the terminal) and checks the binaries
    /// are there. Dropping the future kills cargo and its rustc jobs.
    pub async fn run(&self) -> Result<(), BuildError> {
        let mut cmd = tokio::process::Command::new(&self.cargo);
        let names: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .collect();
        for name in run_only_vars(names.iter().map(String::as_str)) {
            cmd.env_remove(name);
        }
        let mut child = cmd
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            // Its own process group, so that stopping the demo can stop
            // cargo's compiler jobs too, not only cargo.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BuildError::Spawn {
                cargo: self.cargo.clone(),
                source,
            })?;
        let group = GroupGuard(child.id());
        let status = child.wait().await.map_err(|source| BuildError::Spawn {
            cargo: self.cargo.clone(),
            source,
        })?;
        // cargo exited and took its jobs with it: nothing left to kill.
        std::mem::forget(group);
        if !status.success() {
            return Err(BuildError::Failed {
                command: self.command_line(),
                status,
            });
        }
        for name in BINARIES {
            let path = self.binary(name);
            if !path.is_file() {
                return Err(BuildError::Missing(path));
            }
        }
        Ok(())
    }
}

/// SIGKILLs a process group when dropped (the build was abandoned).
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) with a negative pid signals that process
            // group; it has no memory effects.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// The workspace this demo was built from.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_of_cargo_run_are_not_passed_to_the_inner_cargo() {
        let vars = [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_BIN_NAME",
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_TERM_COLOR",
            "PATH",
        ];
        assert_eq!(
            run_only_vars(vars),
            vec![
                "CARGO_MANIFEST_DIR",
                "CARGO_PKG_NAME",
                "CARGO_PKG_VERSION_MAJOR",
                "CARGO_BIN_NAME"
            ]
        );
    }

    #[test]
    fn profile_and_target_dir_follow_the_demo_binary() {
        let dev =
            BuildPlan::for_exe(Path::new("/w/target/debug/peerfill-demo"), None).expect("dev plan");
        assert_eq!(dev.cargo, "cargo");
        assert!(dev.profile_args.is_empty());
        assert_eq!(dev.target_dir, Path::new("/w/target"));
        assert_eq!(
            dev.binary("peerfill-agent"),
            Path::new("/w/target/debug/peerfill-agent")
        );
        assert_eq!(dev.command_line(), "cargo build --workspace --bins");

        let release = BuildPlan::for_exe(
            Path::new("/t/release/peerfill-demo"),
            Some("/x/cargo".into()),
        )
        .expect("release plan");
        assert_eq!(release.profile_args, ["--release"]);
        let args = release.args();
        assert_eq!(&args[..3], ["build", "--workspace", "--bins"]);
        assert!(args.windows(2).any(|w| w == ["--target-dir", "/t"]));
        assert!(args.contains(&"--release".to_owned()));
        assert_eq!(
            release.command_line(),
            "cargo build --workspace --bins --release"
        );

        let custom = BuildPlan::for_exe(Path::new("/t/bench/peerfill-demo"), Some(String::new()))
            .expect("custom plan");
        assert_eq!(custom.profile_args, ["--profile", "bench"]);
        assert_eq!(custom.cargo, "cargo");
    }

    #[test]
    fn the_manifest_is_the_workspace_one() {
        let plan = BuildPlan::for_exe(Path::new("/t/debug/peerfill-demo"), None).expect("plan");
        assert!(plan.manifest.is_file(), "{}", plan.manifest.display());
        let text = std::fs::read_to_string(&plan.manifest).expect("read manifest");
        assert!(text.contains("[workspace]"));
    }
}
