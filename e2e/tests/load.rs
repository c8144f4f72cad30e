//! Load figures for the in-memory API server (printed, not asserted on
//! time): concurrent status writes and watch fan-out, with their results
//! checked for correctness.

mod common;

use std::time::Instant;

use anyhow::ensure;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use serde_json::json;

#[tokio::test]
async fn concurrent_status_writes() -> anyhow::Result<()> {
    let server = common::start_with_widgets().await?;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("test.peerfill.dev", "v1", "Widget"),
        "widgets",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(server.client()?, "default", &ar);
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 250;
    for w in 0..WRITERS {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "test.peerfill.dev/v1", "kind": "Widget",
            "metadata": {"name": format!("w{w}")}, "spec": {"size": 1},
        }))?;
        api.create(&PostParams::default(), &obj).await?;
    }
    let rv0 = server.resource_version();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                let st = json!({"status": {"phase": format!("p{i}")}});
                api.patch_status(&format!("w{w}"), &PatchParams::default(), &Patch::Merge(st))
                    .await?;
            }
            Ok::<_, kube::Error>(())
        }));
    }
    for t in tasks {
        common::within(120, "status writers", t).await???;
    }
    let secs = start.elapsed().as_secs_f64();
    let total = WRITERS * PER_WRITER;
    println!(
        "status writes: {total} in {secs:.2}s = {:.0} writes/s",
        total as f64 / secs
    );
    ensure!(
        server.resource_version() - rv0 == total as u64,
        "every write must bump the resourceVersion once"
    );
    for w in 0..WRITERS {
        let o = api.get(&format!("w{w}")).await?;
        ensure!(o.data["status"]["phase"] == json!(format!("p{}", PER_WRITER - 1)));
        ensure!(o.metadata.generation == Some(1));
    }
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn watch_fan_out() -> anyhow::Result<()> {
    let server = common::start_with_widgets().await?;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    const WATCHERS: usize = 20;
    const OBJECTS: usize = 200;
    let rv = server.resource_version().to_string();
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let s = api
            .watch(&WatchParams::default().timeout(60), &rv)
            .await?
            .boxed();
        watchers.push(tokio::spawn(async move {
            let mut s = s;
            let mut added = 0usize;
            while added < OBJECTS {
                match s.try_next().await? {
                    Some(WatchEvent::Added(_)) => added += 1,
                    Some(_) => {}
                    None => break,
                }
            }
            Ok::<_, kube::Error>(added)
        }));
    }
    let start = Instant::now();
    for i in 0..OBJECTS {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}}))?;
        api.create(&PostParams::default(), &cm).await?;
    }
    for w in watchers {
        let added = common::within(60, "watchers", w).await???;
        ensure!(added == OBJECTS, "a watcher saw {added} of {OBJECTS}");
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "watch fan-out: {OBJECTS} creates x {WATCHERS} watchers delivered in {secs:.2}s = {:.0} events/s",
        (OBJECTS * WATCHERS) as f64 / secs
    );
    server.shutdown().await;
    Ok(())
}
