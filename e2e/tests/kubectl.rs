//! The real kubectl on the machine against the in-memory API server:
//! apply, get (Tables with the CRD's printer columns), -o yaml, patch of the
//! status subresource, wait, delete, and refusal of invalid manifests.

mod common;

use common::kubectl::{Kubectl, kubectl_path};

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

fn docs(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))?;
    Ok(docs.into_iter().filter(|d| d.is_object()).collect())
}

#[tokio::test]
async fn examples_apply_get_wait_delete() -> anyhow::Result<()> {
    let server = common::start_with_project_crds().await?;
    let k = Kubectl::new(&server)?;
    let examples = common::yaml_files(&common::workspace_root().join("examples"))?;
    ensure!(!examples.is_empty(), "no example manifests found");
    let mut dists: Vec<(String, String)> = Vec::new();
    for f in &examples {
        for d in docs(f)? {
            if d.get("kind").and_then(Value::as_str) == Some("Distribution") {
                let name = d
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let ns = d
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                dists.push((ns.to_string(), name.to_string()));
                if ns != "default" {
                    // Namespaces must exist before content is created in them.
                    let nsfile = k.dir.path().join(format!("ns-{ns}.yaml"));
                    std::fs::write(
                        &nsfile,
                        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"),
                    )?;
                    k.ok(&["apply", "-f", &nsfile.to_string_lossy()]).await?;
                }
            }
        }
    }
    for f in &examples {
        let p = f.to_string_lossy();
        let out = k.ok(&["apply", "-f", &p]).await?;
        ensure!(out.contains("created"), "apply {p}: {out}");
    }
    ensure!(!dists.is_empty(), "the examples hold no Distribution");

    let table = k.ok(&["get", "dist", "-A"]).await?;
    let header = table.lines().next().unwrap_or("");
    for col in ["NAME", "PHASE", "READY", "PROGRESS", "THROUGHPUT", "AGE"] {
        ensure!(header.contains(col), "header {header:?} lacks {col}");
    }
    for (ns, name) in &dists {
        ensure!(
            table.contains(name.as_str()),
            "{name} missing from:\n{table}"
        );
        let _ = ns;
    }

    let (ns, name) = dists[0].clone();
    let yaml = k
        .ok(&["get", "dist", &name, "-n", &ns, "-o", "yaml"])
        .await?;
    ensure!(yaml.contains("kind: Distribution"), "{yaml}");
    ensure!(yaml.contains(&format!("name: {name}")), "{yaml}");
    ensure!(yaml.contains("generation: 1"), "{yaml}");

    // wait blocks until the status patch lands.
    let target = format!("dist/{name}");
    let waiter = {
        let args: Vec<String> = [
            "wait",
            "--for=condition=Complete",
            &target,
            "-n",
            &ns,
            "--timeout=20s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let kc = k.dir.path().join("kubeconfig");
        let cache = k.dir.path().join("cache");
        tokio::spawn(async move {
            let mut cmd = tokio::process::Command::new(kubectl_path());
            cmd.arg("--kubeconfig")
                .arg(kc)
                .arg("--cache-dir")
                .arg(cache)
                .args(&args)
                .kill_on_drop(true);
            tokio::time::timeout(Duration::from_secs(40), cmd.output()).await
        })
    };
    // What the operator would write, as a merge patch of the status.
    let patch_status = async |patch: &str| {
        k.ok(&[
            "patch",
            "dist",
            &name,
            "-n",
            &ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            patch,
        ])
        .await
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = r#"{"status":{"phase":"Complete","conditions":[{"type":"Complete","status":"True","reason":"AllNodesHoldContent","message":"done","lastTransitionTime":"2026-01-01T00:00:00Z","observedGeneration":1}]}}"#;
    let out = patch_status(status).await?;
    ensure!(out.contains("patched"), "{out}");
    let waited = waiter.await?.context("kubectl wait timed out")??;
    ensure!(
        waited.status.success(),
        "wait failed: {}{}",
        String::from_utf8_lossy(&waited.stdout),
        String::from_utf8_lossy(&waited.stderr)
    );
    ensure!(String::from_utf8_lossy(&waited.stdout).contains("condition met"));

    // get -w streams Table rows as the status changes.
    let mut watch = k.spawn(&[
        "get",
        "dist",
        &name,
        "-n",
        &ns,
        "-w",
        "--output-watch-events",
    ])?;
    let stdout = watch.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = common::within(20, "first watch row", lines.next_line()).await??;
    ensure!(
        first
            .as_deref()
            .is_some_and(|l| l.contains("EVENT") && l.contains("PHASE")),
        "{first:?}"
    );
    patch_status(r#"{"status":{"ready":"3/3"}}"#).await?;
    let seen = common::within(20, "MODIFIED row", async {
        while let Some(l) = lines.next_line().await? {
            if l.starts_with("MODIFIED") && l.contains("3/3") {
                return Ok::<_, std::io::Error>(true);
            }
        }
        Ok(false)
    })
    .await??;
    ensure!(seen, "no MODIFIED row from get -w");
    watch.kill().await?;

    // Events about the object show in describe (core/v1 Events).
    let uid = k
        .ok(&[
            "get",
            "dist",
            &name,
            "-n",
            &ns,
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .await?;
    let ev = k.dir.path().join("event.yaml");
    std::fs::write(
        &ev,
        format!(
            "apiVersion: v1\nkind: Event\nmetadata: {{name: {name}.1, namespace: {ns}}}\ninvolvedObject: {{apiVersion: peerfill.dev/v1alpha1, kind: Distribution, name: {name}, namespace: {ns}, uid: {uid}}}\nreason: Completed\nmessage: all nodes hold the content\ntype: Normal\nsource: {{component: peerfill-operator}}\n"
        ),
    )?;
    k.ok(&["apply", "-f", &ev.to_string_lossy()]).await?;
    let described = k.ok(&["describe", "dist", &name, "-n", &ns]).await?;
    ensure!(
        described.contains("all nodes hold the content"),
        "{described}"
    );

    let row = k.ok(&["get", "dist", &name, "-n", &ns]).await?;
    ensure!(row.contains("Complete"), "phase column: {row}");
    // `Files` has priority 1: shown by `-o wide` only.
    patch_status(r#"{"status":{"files":1000}}"#).await?;
    let row = k.ok(&["get", "dist", &name, "-n", &ns]).await?;
    ensure!(!row.contains("FILES"), "Files without -o wide: {row}");
    let wide = k
        .ok(&["get", "dist", &name, "-n", &ns, "-o", "wide"])
        .await?;
    // Columns are aligned: the cell starts where its header does.
    let mut wide_lines = wide.lines();
    let header = wide_lines.next().unwrap_or("");
    let cells = wide_lines.next().unwrap_or("");
    let cell = header
        .find("FILES")
        .and_then(|at| cells.get(at..))
        .and_then(|rest| rest.split_whitespace().next());
    ensure!(cell == Some("1000"), "-o wide: {wide}");
    let gen_after = k
        .ok(&[
            "get",
            "dist",
            &name,
            "-n",
            &ns,
            "-o",
            "jsonpath={.metadata.generation}",
        ])
        .await?;
    ensure!(
        gen_after.trim() == "1",
        "status write bumped generation: {gen_after}"
    );

    let out = k
        .ok(&["delete", "dist", &name, "-n", &ns, "--timeout=20s"])
        .await?;
    ensure!(out.contains("deleted"), "{out}");
    let gone = k.run(&["get", "dist", &name, "-n", &ns]).await?;
    ensure!(
        !gone.ok && gone.stderr.contains("NotFound"),
        "{}",
        gone.stderr
    );
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn invalid_manifests_are_refused_naming_the_field() -> anyhow::Result<()> {
    let server = common::start_with_project_crds().await?;
    let k = Kubectl::new(&server)?;
    common::kubectl::check_invalid_examples_refused(&k).await?;
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn builtin_kinds_via_kubectl() -> anyhow::Result<()> {
    let server = common::start_with_project_crds().await?;
    let k = Kubectl::new(&server)?;
    let dir = tempfile::tempdir()?;
    let manifest = dir.path().join("builtins.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {zone: a, node-role.kubernetes.io/worker: \"\"}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: creds}\nstringData: {token: abc}\n---\napiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {name: leader}\nspec: {holderIdentity: op-1, leaseDurationSeconds: 15}\n",
    )?;
    let out = k.ok(&["apply", "-f", &manifest.to_string_lossy()]).await?;
    ensure!(out.contains("node/node-a created"), "{out}");
    ensure!(out.contains("secret/creds created"), "{out}");
    ensure!(
        out.contains("lease.coordination.k8s.io/leader created"),
        "{out}"
    );

    let nodes = k.ok(&["get", "nodes"]).await?;
    ensure!(
        nodes
            .lines()
            .next()
            .is_some_and(|h| h.contains("STATUS") && h.contains("ROLES")),
        "{nodes}"
    );
    ensure!(nodes.contains("worker"), "{nodes}");
    let token = k
        .ok(&["get", "secret", "creds", "-o", "jsonpath={.data.token}"])
        .await?;
    ensure!(token == "YWJj", "stringData not encoded into data: {token}");
    let lease = k.ok(&["get", "lease", "leader"]).await?;
    ensure!(lease.contains("op-1"), "{lease}");

    // Re-apply unchanged: nothing to do. Then label, select, and delete.
    let out = k.ok(&["apply", "-f", &manifest.to_string_lossy()]).await?;
    ensure!(out.contains("node/node-a unchanged"), "{out}");
    k.ok(&["label", "node", "node-a", "zone=b", "--overwrite"])
        .await?;
    let sel = k
        .ok(&["get", "nodes", "-l", "zone in (b,c)", "-o", "name"])
        .await?;
    ensure!(sel.trim() == "node/node-a", "{sel}");
    let none = k
        .ok(&["get", "nodes", "-l", "zone=a", "-o", "name"])
        .await?;
    ensure!(none.trim().is_empty(), "{none}");

    // A finalizer holds the deletion until it is removed.
    k.ok(&[
        "patch",
        "lease",
        "leader",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["test.peerfill.dev/hold"]}}"#,
    ])
    .await?;
    k.ok(&["delete", "lease", "leader", "--wait=false"]).await?;
    let ts = k
        .ok(&[
            "get",
            "lease",
            "leader",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ])
        .await?;
    ensure!(!ts.trim().is_empty(), "no deletionTimestamp");
    k.ok(&[
        "patch",
        "lease",
        "leader",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])
    .await?;
    let gone = k.run(&["get", "lease", "leader"]).await?;
    ensure!(
        !gone.ok && gone.stderr.contains("NotFound"),
        "{}",
        gone.stderr
    );

    k.ok(&[
        "delete",
        "-f",
        &manifest.to_string_lossy(),
        "--ignore-not-found",
    ])
    .await?;
    let nodes = k.ok(&["get", "nodes", "-o", "name"]).await?;
    ensure!(nodes.trim().is_empty(), "{nodes}");

    // Content in a missing namespace is refused as the real server does.
    let secret = dir.path().join("secret.yaml");
    std::fs::write(
        &secret,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n",
    )?;
    let o = k
        .run(&["apply", "-n", "nope", "-f", &secret.to_string_lossy()])
        .await?;
    ensure!(
        !o.ok && o.stderr.contains("namespaces \"nope\" not found"),
        "{}",
        o.stderr
    );

    // Typed generators send protobuf bodies.
    k.ok(&["create", "namespace", "gen"]).await?;
    k.ok(&[
        "create",
        "secret",
        "generic",
        "tok",
        "-n",
        "gen",
        "--from-literal=Authorization=Bearer x",
    ])
    .await?;
    let data = k
        .ok(&[
            "get",
            "secret",
            "tok",
            "-n",
            "gen",
            "-o",
            "jsonpath={.type} {.data.Authorization}",
        ])
        .await?;
    ensure!(data == "Opaque QmVhcmVyIHg=", "{data}");
    k.ok(&[
        "create",
        "configmap",
        "cfg",
        "-n",
        "gen",
        "--from-literal=a=b",
    ])
    .await?;
    let cm = k
        .ok(&[
            "get",
            "configmap",
            "cfg",
            "-n",
            "gen",
            "-o",
            "jsonpath={.data.a}",
        ])
        .await?;
    ensure!(cm == "b", "{cm}");
    k.ok(&["delete", "namespace", "gen", "--timeout=20s"])
        .await?;
    let gone = k.run(&["get", "namespace", "gen"]).await?;
    ensure!(!gone.ok, "namespace survived deletion");
    server.shutdown().await;
    Ok(())
}
