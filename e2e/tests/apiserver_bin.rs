//! The `peerfill-apiserver` process: writes a kubeconfig, serves, loads the
//! CRDs directory, and exits cleanly on SIGINT.

mod common;

use std::time::Duration;

use anyhow::{Context, ensure};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn process_serves_and_exits_on_sigint() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_peerfill-apiserver"))
        .arg("--port")
        .arg("0")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--crds")
        .arg(common::workspace_root().join("crds"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let url = common::within(20, "server URL on stdout", async {
        BufReader::new(stdout).lines().next_line().await
    })
    .await??
    .context("server exited before printing its URL")?;
    ensure!(url.starts_with("http://127.0.0.1:"), "{url}");
    let text = std::fs::read_to_string(&kubeconfig)?;
    ensure!(text.contains(&format!("server: {url}")), "{text}");

    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("/usr/bin/kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .args(["get", "crd", "-o", "name"])
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let names = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(names.contains("distributions.peerfill.dev"), "{names}");

    let pid = child.id().context("no pid")?;
    let killed = tokio::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await?;
    ensure!(killed.success());
    let status = common::within(20, "exit after SIGINT", child.wait()).await??;
    ensure!(status.success(), "exit status {status:?}");
    Ok(())
}

/// The in-process server has its own runtime thread: a current-thread test
/// that blocks on a child process is still served.
#[tokio::test(flavor = "current_thread")]
async fn in_process_server_survives_a_blocking_caller() -> anyhow::Result<()> {
    let server = common::start_with_project_crds().await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    // Deliberately blocking: this thread cannot drive any server task.
    let out = std::process::Command::new("/usr/bin/kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .args(["get", "namespaces", "-o", "name", "--request-timeout=20s"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).contains("namespace/default"));
    server.shutdown().await;
    Ok(())
}
