//! The real kubectl (`/usr/bin/kubectl`, else `kubectl` on PATH) against a
//! kubeconfig, with its own HOME and cache dir, every call bounded in time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};

/// A kubectl bound to one kubeconfig.
pub struct Kubectl {
    /// HOME and cache of the kubectl runs (holds `kubeconfig` when made by
    /// [`Kubectl::new`]).
    pub dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

/// What a kubectl run printed.
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

pub fn kubectl_path() -> PathBuf {
    let p = PathBuf::from("/usr/bin/kubectl");
    if p.exists() {
        p
    } else {
        PathBuf::from("kubectl")
    }
}

impl Kubectl {
    /// kubectl against the API stand-in (its kubeconfig written into `dir`).
    pub fn new(server: &peerfill_e2e::apiserver::ApiServerHandle) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        Ok(Self { dir, kubeconfig })
    }

    /// kubectl against an existing kubeconfig (a local or a real cluster).
    pub fn with_kubeconfig(kubeconfig: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            dir: tempfile::tempdir()?,
            kubeconfig: kubeconfig.to_path_buf(),
        })
    }

    /// The kubeconfig it uses.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A command with kubeconfig, cache dir and HOME set.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(kubectl_path());
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .env("HOME", self.dir.path())
            .kill_on_drop(true);
        cmd
    }

    /// Runs to completion (at most 60 s, or 90 s beyond a `--timeout=`
    /// kubectl is given).
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<Out> {
        let limit = args
            .iter()
            .find_map(|a| a.strip_prefix("--timeout="))
            .and_then(|t| t.strip_suffix('s'))
            .and_then(|t| t.parse::<u64>().ok())
            .map_or(60, |t| t + 30);
        let out = tokio::time::timeout(Duration::from_secs(limit), self.command(args).output())
            .await
            .with_context(|| format!("kubectl {args:?} timed out"))?
            .with_context(|| format!("running kubectl {args:?}"))?;
        Ok(Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// A long-running kubectl (e.g. `get -w`) with piped stdout.
    pub fn spawn(&self, args: &[&str]) -> anyhow::Result<tokio::process::Child> {
        Ok(self
            .command(args)
            .stdout(std::process::Stdio::piped())
            .spawn()?)
    }

    /// Runs and requires success; its stdout.
    pub async fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let o = self.run(args).await?;
        ensure!(o.ok, "kubectl {args:?} failed: {}{}", o.stdout, o.stderr);
        Ok(o.stdout)
    }
}

/// Applies every `examples/invalid/*.yaml` and checks each is refused with
/// the field of its `# expect-field:` comment named in the error.
pub async fn check_invalid_examples_refused(k: &Kubectl) -> anyhow::Result<usize> {
    let files = super::yaml_files(&super::workspace_root().join("examples/invalid"))?;
    ensure!(!files.is_empty(), "no invalid example manifests found");
    for f in &files {
        let text = std::fs::read_to_string(f)?;
        let field = super::expected_field(&text)
            .with_context(|| format!("{} lacks '# expect-field:'", f.display()))?;
        let o = k.run(&["apply", "-f", &f.to_string_lossy()]).await?;
        ensure!(!o.ok, "{} was accepted: {}", f.display(), o.stdout);
        ensure!(
            o.stderr.contains(&field),
            "{}: error does not name {field:?}: {}",
            f.display(),
            o.stderr
        );
    }
    Ok(files.len())
}
