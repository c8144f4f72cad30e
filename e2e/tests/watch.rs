//! Watches against the in-memory API server: raw watch events, bookmarks,
//! selector transitions, 410 Gone, and the kube-runtime watcher resuming
//! after history is compacted.

mod common;

use std::time::Duration;

use anyhow::{Context, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::json;

fn cm(name: &str, labels: serde_json::Value) -> anyhow::Result<ConfigMap> {
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )?)
}

#[tokio::test]
async fn raw_watch_events_bookmarks_and_gone() -> anyhow::Result<()> {
    let server = common::start_with_widgets().await?;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    let rv = api
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut wp = WatchParams::default().labels("app=demo").timeout(20);
    wp.bookmarks = true;
    let mut stream = api.watch(&wp, &rv).await?.boxed();

    api.create(&PostParams::default(), &cm("a", json!({"app": "demo"}))?)
        .await?;
    api.create(
        &PostParams::default(),
        &cm("other", json!({"app": "else"}))?,
    )
    .await?;
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v2"}})),
    )
    .await?;
    // Leaving the selection is seen as DELETED, entering as ADDED.
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "gone"}}})),
    )
    .await?;
    api.patch(
        "other",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "demo"}}})),
    )
    .await?;
    api.delete("other", &DeleteParams::default()).await?;

    let mut seen = Vec::new();
    let mut bookmark = None;
    common::within(15, "watch events and a bookmark", async {
        while let Some(ev) = stream.try_next().await? {
            match ev {
                WatchEvent::Added(o) => {
                    seen.push(format!("ADDED {}", o.metadata.name.unwrap_or_default()))
                }
                WatchEvent::Modified(o) => {
                    seen.push(format!("MODIFIED {}", o.metadata.name.unwrap_or_default()))
                }
                WatchEvent::Deleted(o) => {
                    seen.push(format!("DELETED {}", o.metadata.name.unwrap_or_default()))
                }
                WatchEvent::Bookmark(b) => {
                    if seen.len() >= 5 {
                        bookmark = Some(b.metadata.resource_version);
                        break;
                    }
                }
                WatchEvent::Error(e) => anyhow::bail!("watch error {e:?}"),
            }
        }
        Ok::<_, anyhow::Error>(())
    })
    .await??;
    ensure!(
        seen == [
            "ADDED a",
            "MODIFIED a",
            "DELETED a",
            "ADDED other",
            "DELETED other"
        ],
        "{seen:?}"
    );
    let bm: u64 = bookmark.context("no bookmark")?.parse()?;
    ensure!(
        bm >= server.resource_version(),
        "bookmark {bm} behind the last event"
    );

    // A watch from a compacted resourceVersion: 200, then an ERROR 410 event.
    server.compact();
    let mut old = api.watch(&WatchParams::default(), &rv).await?.boxed();
    let first = common::within(10, "410 event", old.try_next()).await??;
    match first {
        Some(WatchEvent::Error(e)) => ensure!(e.code == 410 && e.reason == "Expired", "{e:?}"),
        other => anyhow::bail!("expected a 410 ERROR event, got {other:?}"),
    }
    server.shutdown().await;
    Ok(())
}

/// Waits for `want` on the watcher's message channel; returns what came before.
async fn expect_msg(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    want: &str,
) -> anyhow::Result<anyhow::Result<Vec<String>>> {
    common::within(20, want, async {
        let mut log = Vec::new();
        while let Some(m) = rx.recv().await {
            let hit = m == want;
            log.push(m);
            if hit {
                return Ok(log);
            }
        }
        anyhow::bail!("watcher ended before {want}: {log:?}")
    })
    .await
}

#[tokio::test]
async fn runtime_watcher_recovers_from_gone() -> anyhow::Result<()> {
    let server = common::start_with_widgets().await?;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    api.create(&PostParams::default(), &cm("before", json!({}))?)
        .await?;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let watch_api = api.clone();
    let task = tokio::spawn(async move {
        let mut s = watcher(watch_api, watcher::Config::default()).boxed();
        while let Some(ev) = s.next().await {
            let msg = match ev {
                Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::InitApply(o)) => {
                    format!("apply {}", o.metadata.name.unwrap_or_default())
                }
                Ok(watcher::Event::Delete(o)) => {
                    format!("delete {}", o.metadata.name.unwrap_or_default())
                }
                Ok(watcher::Event::Init) => "init".into(),
                Ok(watcher::Event::InitDone) => "init-done".into(),
                Err(watcher::Error::WatchError(s)) => format!("error {}", s.code),
                Err(e) => format!("other-error {e}"),
            };
            if tx.send(msg).is_err() {
                break;
            }
        }
    });
    expect_msg(&mut rx, "apply before").await??;
    expect_msg(&mut rx, "init-done").await??;

    api.create(&PostParams::default(), &cm("live", json!({}))?)
        .await?;
    expect_msg(&mut rx, "apply live").await??;
    api.patch(
        "live",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "x"}})),
    )
    .await?;
    expect_msg(&mut rx, "apply live").await??;
    api.delete("live", &DeleteParams::default()).await?;
    expect_msg(&mut rx, "delete live").await??;

    // Compaction ends the open watch with 410; the watcher relists and
    // carries on with objects created afterwards.
    server.compact();
    let log = expect_msg(&mut rx, "error 410").await??;
    ensure!(!log.is_empty());
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.create(&PostParams::default(), &cm("after", json!({}))?)
        .await?;
    let log = expect_msg(&mut rx, "apply after").await??;
    ensure!(
        log.iter().any(|m| m == "init"),
        "no relist after 410: {log:?}"
    );
    task.abort();
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn streaming_list_initial_events() -> anyhow::Result<()> {
    let server = common::start_with_widgets().await?;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    for n in ["s1", "s2"] {
        api.create(&PostParams::default(), &cm(n, json!({}))?)
            .await?;
    }
    let cfg = watcher::Config::default().streaming_lists();
    let mut s = watcher(api.clone(), cfg).boxed();
    let mut got = Vec::new();
    common::within(15, "streaming list", async {
        while let Some(ev) = s.try_next().await? {
            match ev {
                watcher::Event::InitApply(o) => got.push(o.metadata.name.unwrap_or_default()),
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>(())
    })
    .await??;
    ensure!(got == ["s1", "s2"], "{got:?}");
    api.create(&PostParams::default(), &cm("s3", json!({}))?)
        .await?;
    let next = common::within(10, "event after the streaming list", s.try_next()).await??;
    ensure!(
        matches!(&next, Some(watcher::Event::Apply(o)) if o.metadata.name.as_deref() == Some("s3")),
        "{next:?}"
    );
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn abandoned_watches_end_promptly() -> anyhow::Result<()> {
    let server = common::start_with_widgets().await?;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client()?);
    let stream = api
        .watch(&WatchParams::default().timeout(290), "0")
        .await?
        .boxed();
    common::within(10, "watch registered", async {
        while server.active_watches() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    // Dropping the stream closes the connection; the server notices without
    // waiting for the 290 s timeout or an event to write.
    drop(stream);
    common::within(10, "watch released", async {
        while server.active_watches() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    server.shutdown().await;
    Ok(())
}
