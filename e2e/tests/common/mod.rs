//! Shared helpers for the API stand-in's integration tests.
#![allow(dead_code)]

pub mod cluster;
pub mod consumer;
pub mod kubectl;

use std::path::{Path, PathBuf};
use std::time::Duration;

use peerfill_e2e::apiserver::{ApiServer, ApiServerHandle, ApiServerOptions};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The `.yaml`/`.yml` files directly in `dir`, sorted.
pub fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    use anyhow::Context as _;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// The field an invalid example's `# expect-field:` comment says its
/// refusal names.
pub fn expected_field(manifest: &str) -> Option<String> {
    manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("# expect-field:"))
        .map(|f| f.trim().to_string())
}

/// A server with the project's CRDs loaded, bookmarks every second.
pub async fn start_with_project_crds() -> anyhow::Result<ApiServerHandle> {
    Ok(ApiServer::start(ApiServerOptions {
        crd_dir: Some(workspace_root().join("crds")),
        bookmark_interval: Duration::from_secs(1),
        ..ApiServerOptions::default()
    })
    .await?)
}

/// A server with only the tests' own Widget CRD loaded.
pub async fn start_with_widgets() -> anyhow::Result<ApiServerHandle> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/widgets-crd.yaml"),
        dir.path().join("widgets-crd.yaml"),
    )?;
    Ok(ApiServer::start(ApiServerOptions {
        crd_dir: Some(dir.path().to_path_buf()),
        bookmark_interval: Duration::from_secs(1),
        ..ApiServerOptions::default()
    })
    .await?)
}

/// Runs a bounded future, failing the test instead of hanging.
pub async fn within<T>(
    secs: u64,
    what: &str,
    f: impl std::future::Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {secs}s: {what}"))
}
