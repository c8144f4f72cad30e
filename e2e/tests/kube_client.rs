//! kube-rs `Api` calls against the in-memory API server: CRUD, conflicts,
//! selectors, the status subresource and generation, patches (merge, JSON,
//! server-side apply), finalizers, garbage collection, namespaces, metrics.

mod common;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::core::Status;
use serde_json::json;

fn widgets(client: kube::Client) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("test.peerfill.dev", "v1", "Widget"),
        "widgets",
    );
    Api::namespaced_with(client, "default", &ar)
}

fn widget(name: &str, size: i64) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "test.peerfill.dev/v1",
        "kind": "Widget",
        "metadata": {"name": name, "labels": {"app": "demo", "tier": if size > 5 { "big" } else { "small" }}},
        "spec": {"size": size},
    }))?)
}

fn api_err(e: kube::Error) -> anyhow::Result<Box<Status>> {
    match e {
        kube::Error::Api(s) => Ok(s),
        other => bail!("expected an API error, got {other}"),
    }
}

fn generation(o: &DynamicObject) -> i64 {
    o.metadata.generation.unwrap_or_default()
}

#[tokio::test]
async fn crud_conflicts_and_status_subresource() -> anyhow::Result<()> {
    let server = common::start_with_widgets().await?;
    let api = widgets(server.client()?);
    let created = api
        .create(&PostParams::default(), &widget("w1", 3)?)
        .await?;
    ensure!(generation(&created) == 1);
    ensure!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    // The schema default was applied.
    ensure!(
        created.data["spec"]["max"] == json!(100),
        "{:?}",
        created.data
    );

    let dup = api.create(&PostParams::default(), &widget("w1", 3)?).await;
    let e = api_err(dup.err().context("duplicate create succeeded")?)?;
    ensure!(e.code == 409 && e.reason == "AlreadyExists", "{e:?}");
    ensure!(
        e.message == r#"widgets.test.peerfill.dev "w1" already exists"#,
        "{}",
        e.message
    );

    // Replace with the current resourceVersion works; with a stale one, 409.
    let mut upd = created.clone();
    upd.data["spec"]["size"] = json!(4);
    let replaced = api.replace("w1", &PostParams::default(), &upd).await?;
    ensure!(
        generation(&replaced) == 2,
        "spec change must bump generation"
    );
    let stale = api.replace("w1", &PostParams::default(), &upd).await;
    let e = api_err(stale.err().context("stale replace succeeded")?)?;
    ensure!(e.code == 409 && e.reason == "Conflict", "{e:?}");
    ensure!(
        e.message
            == r#"Operation cannot be fulfilled on widgets.test.peerfill.dev "w1": the object has been modified; please apply your changes to the latest version and try again"#,
        "{}",
        e.message
    );

    // Custom resources refuse unconditional updates.
    let mut unconditional = replaced.clone();
    unconditional.metadata.resource_version = None;
    let e = api_err(
        api.replace("w1", &PostParams::default(), &unconditional)
            .await
            .err()
            .context("update without resourceVersion accepted")?,
    )?;
    ensure!(
        e.code == 422 && e.message.contains("metadata.resourceVersion"),
        "{}",
        e.message
    );

    // Status is ignored on the main endpoint and written only via /status,
    // which leaves generation alone.
    let mut with_status = replaced.clone();
    with_status.data["status"] = json!({"phase": "Sneaky"});
    let r = api
        .replace("w1", &PostParams::default(), &with_status)
        .await?;
    ensure!(
        r.data.get("status").is_none(),
        "status written via main endpoint"
    );
    let patched = api
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready"}})),
        )
        .await?;
    ensure!(patched.data["status"]["phase"] == json!("Ready"));
    ensure!(generation(&patched) == 2, "status write bumped generation");
    let spec_via_status = api
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 9}})),
        )
        .await?;
    ensure!(
        spec_via_status.data["spec"]["size"] == json!(4),
        "spec written via /status"
    );

    // Validation failures are 422 with the field named.
    let bad = api
        .create(&PostParams::default(), &widget("w-bad", 500)?)
        .await;
    let e = api_err(bad.err().context("invalid widget accepted")?)?;
    ensure!(e.code == 422 && e.reason == "Invalid", "{e:?}");
    ensure!(
        e.message.contains("size must not exceed max"),
        "{}",
        e.message
    );
    let bad_name = api
        .create(&PostParams::default(), &widget("Bad_Name", 1)?)
        .await;
    let e = api_err(bad_name.err().context("invalid name accepted")?)?;
    ensure!(
        e.code == 422 && e.message.contains("metadata.name"),
        "{}",
        e.message
    );

    // generateName.
    let mut g = widget("", 2)?;
    g.metadata.name = None;
    g.metadata.generate_name = Some("gen-".into());
    let gen_obj = api.create(&PostParams::default(), &g).await?;
    let gname = gen_obj.metadata.name.clone().unwrap_or_default();
    ensure!(gname.starts_with("gen-") && gname.len() == 9, "{gname}");

    // Not found shape.
    let e = api_err(
        api.get("missing")
            .await
            .err()
            .context("get missing succeeded")?,
    )?;
    ensure!(e.code == 404 && e.reason == "NotFound", "{e:?}");
    ensure!(api.get_opt("missing").await?.is_none());
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn selectors_and_pagination() -> anyhow::Result<()> {
    let server = common::start_with_widgets().await?;
    let client = server.client()?;
    let api = widgets(client.clone());
    for (n, s) in [("a", 1), ("b", 7), ("c", 9), ("d", 2)] {
        api.create(&PostParams::default(), &widget(n, s)?).await?;
    }
    let names = |l: kube::core::ObjectList<DynamicObject>| {
        l.items
            .into_iter()
            .filter_map(|o| o.metadata.name)
            .collect::<Vec<_>>()
    };
    ensure!(names(api.list(&ListParams::default().labels("tier=big")).await?) == ["b", "c"]);
    ensure!(
        names(
            api.list(&ListParams::default().labels("tier!=big,app"))
                .await?
        ) == ["a", "d"]
    );
    ensure!(
        names(
            api.list(&ListParams::default().labels("tier in (small),app notin (x)"))
                .await?
        ) == ["a", "d"]
    );
    ensure!(names(api.list(&ListParams::default().labels("!app")).await?).is_empty());
    ensure!(
        names(
            api.list(&ListParams::default().fields("metadata.name=c"))
                .await?
        ) == ["c"]
    );
    ensure!(
        names(
            api.list(&ListParams::default().fields("metadata.namespace=default,metadata.name!=c"))
                .await?
        )
        .len()
            == 3
    );
    let e = api_err(
        api.list(&ListParams::default().fields("spec.size=1"))
            .await
            .err()
            .context("unsupported field selector accepted")?,
    )?;
    ensure!(e.code == 400, "{e:?}");

    // limit/continue pages through everything once.
    let mut seen = Vec::new();
    let mut lp = ListParams::default().limit(3);
    loop {
        let page = api.list(&lp).await?;
        let token = page.metadata.continue_.clone();
        seen.extend(names(page));
        match token {
            Some(t) if !t.is_empty() => lp = lp.continue_token(&t),
            _ => break,
        }
    }
    ensure!(seen == ["a", "b", "c", "d"], "{seen:?}");

    // dryRun=All answers as if written but stores nothing.
    let dry = api
        .create(
            &PostParams {
                dry_run: true,
                field_manager: None,
            },
            &widget("dry", 1)?,
        )
        .await?;
    ensure!(dry.metadata.name.as_deref() == Some("dry") && api.get_opt("dry").await?.is_none());

    // deletecollection with a selector.
    api.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("tier=small"),
    )
    .await?;
    ensure!(names(api.list(&ListParams::default()).await?) == ["b", "c"]);

    // Across namespaces, and nodes (cluster-scoped) by label.
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "other"}}))?,
    )
    .await?;
    let other = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        "other",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("test.peerfill.dev", "v1", "Widget"),
            "widgets",
        ),
    );
    other
        .create(&PostParams::default(), &widget("e", 1)?)
        .await?;
    let all = Api::<DynamicObject>::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("test.peerfill.dev", "v1", "Widget"),
            "widgets",
        ),
    );
    ensure!(all.list(&ListParams::default()).await?.items.len() == 3);

    let nodes: Api<Node> = Api::all(client);
    for (n, zone) in [("n1", "a"), ("n2", "b"), ("n3", "c")] {
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": n, "labels": {"zone": zone}}}),
                )?,
            )
            .await?;
    }
    let l = nodes
        .list(&ListParams::default().labels("zone in (a,c)"))
        .await?;
    let got: Vec<_> = l
        .items
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    ensure!(got == ["n1", "n3"], "{got:?}");
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn patches_merge_json_and_apply() -> anyhow::Result<()> {
    let server = common::start_with_widgets().await?;
    let api = widgets(server.client()?);
    api.create(&PostParams::default(), &widget("p", 2)?).await?;

    let m = api
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"color": "red", "tags": ["x"]}})),
        )
        .await?;
    ensure!(m.data["spec"]["color"] == json!("red") && generation(&m) == 2);

    let jp: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/color", "value": "red"},
        {"op": "replace", "path": "/spec/size", "value": 5},
        {"op": "add", "path": "/spec/tags/-", "value": "y"},
    ]))?;
    let j = api
        .patch("p", &PatchParams::default(), &Patch::Json::<()>(jp))
        .await?;
    ensure!(j.data["spec"]["size"] == json!(5) && j.data["spec"]["tags"] == json!(["x", "y"]));

    // Server-side apply: create, then a conflicting manager, then force.
    let cfg = json!({"apiVersion": "test.peerfill.dev/v1", "kind": "Widget", "metadata": {"name": "s"}, "spec": {"size": 3, "color": "blue"}});
    let a = api
        .patch("s", &PatchParams::apply("alice"), &Patch::Apply(&cfg))
        .await?;
    ensure!(a.data["spec"]["size"] == json!(3));
    let managers: Vec<_> = a
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect();
    ensure!(
        managers.contains(&("alice".into(), "Apply".into())),
        "{managers:?}"
    );

    let bob = json!({"apiVersion": "test.peerfill.dev/v1", "kind": "Widget", "metadata": {"name": "s"}, "spec": {"size": 4}});
    let e = api_err(
        api.patch("s", &PatchParams::apply("bob"), &Patch::Apply(&bob))
            .await
            .err()
            .context("conflicting apply succeeded")?,
    )?;
    ensure!(
        e.code == 409
            && e.message.contains("conflict with \"alice\"")
            && e.message.contains(".spec.size"),
        "{}",
        e.message
    );
    let forced = api
        .patch("s", &PatchParams::apply("bob").force(), &Patch::Apply(&bob))
        .await?;
    ensure!(forced.data["spec"]["size"] == json!(4));

    // alice drops color from her config: it is removed; size now belongs to bob.
    let alice2 = json!({"apiVersion": "test.peerfill.dev/v1", "kind": "Widget", "metadata": {"name": "s"}, "spec": {}});
    let a2 = api
        .patch("s", &PatchParams::apply("alice"), &Patch::Apply(&alice2))
        .await?;
    ensure!(
        a2.data["spec"].get("color").is_none() && a2.data["spec"]["size"] == json!(4),
        "{:?}",
        a2.data
    );

    // Apply to the status subresource.
    let st = json!({"apiVersion": "test.peerfill.dev/v1", "kind": "Widget", "metadata": {"name": "s"}, "status": {"phase": "Applied"}});
    let s = api
        .patch_status("s", &PatchParams::apply("agent"), &Patch::Apply(&st))
        .await?;
    ensure!(s.data["status"]["phase"] == json!("Applied"));

    // Strategic merge on a built-in: lists merge by key.
    let leases: Api<Lease> = Api::default_namespaced(server.client()?);
    leases
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "l", "finalizers": ["a/b"]}, "spec": {"holderIdentity": "x"}}))?)
        .await?;
    let sp = leases
        .patch(
            "l",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"metadata": {"finalizers": ["c/d"]}, "spec": {"leaseDurationSeconds": 10}}),
            ),
        )
        .await?;
    ensure!(
        sp.metadata.finalizers == Some(vec!["a/b".into(), "c/d".into()]),
        "{:?}",
        sp.metadata.finalizers
    );
    ensure!(sp.spec.as_ref().and_then(|s| s.holder_identity.clone()) == Some("x".into()));
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn finalizers_gc_and_namespaces() -> anyhow::Result<()> {
    let server = common::start_with_widgets().await?;
    let client = server.client()?;
    let api = widgets(client.clone());
    let mut w = widget("f", 1)?;
    w.metadata.finalizers = Some(vec!["test.peerfill.dev/cleanup".into()]);
    api.create(&PostParams::default(), &w).await?;
    let pending = api.delete("f", &DeleteParams::default()).await?;
    let obj = pending
        .left()
        .context("delete with a finalizer should return the object")?;
    ensure!(obj.metadata.deletion_timestamp.is_some());
    ensure!(
        obj.metadata.generation == Some(2),
        "deletion must bump generation"
    );
    ensure!(api.get("f").await?.metadata.deletion_timestamp.is_some());
    // No new finalizers once deleting.
    let e = api_err(
        api.patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"finalizers": ["test.peerfill.dev/cleanup", "x/y"]}}),
            ),
        )
        .await
        .err()
        .context("finalizer added while deleting")?,
    )?;
    ensure!(e.code == 422, "{e:?}");
    api.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    ensure!(
        api.get_opt("f").await?.is_none(),
        "object survived its last finalizer"
    );

    // Owner references: deleting the owner removes dependents (background)...
    let owner = api
        .create(&PostParams::default(), &widget("owner", 1)?)
        .await?;
    let uid = owner.metadata.uid.clone().unwrap_or_default();
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for n in ["dep1", "dep2"] {
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": n, "ownerReferences": [
                {"apiVersion": "test.peerfill.dev/v1", "kind": "Widget", "name": "owner", "uid": uid, "blockOwnerDeletion": true}
            ]}}))?,
        )
        .await?;
    }
    let done = api.delete("owner", &DeleteParams::default()).await?;
    ensure!(done.is_right(), "immediate deletion answers a Status");
    ensure!(cms.get_opt("dep1").await?.is_none() && cms.get_opt("dep2").await?.is_none());

    // ...orphan keeps them and drops the reference.
    let owner = api
        .create(&PostParams::default(), &widget("owner2", 1)?)
        .await?;
    let uid = owner.metadata.uid.clone().unwrap_or_default();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "kept", "ownerReferences": [
            {"apiVersion": "test.peerfill.dev/v1", "kind": "Widget", "name": "owner2", "uid": uid}
        ]}}))?,
    )
    .await?;
    api.delete("owner2", &DeleteParams::orphan()).await?;
    let kept = cms.get("kept").await?;
    ensure!(
        kept.metadata.owner_references.is_none(),
        "{:?}",
        kept.metadata.owner_references
    );

    // ...and foreground deletion waits for dependents, whose own
    // finalizers are honoured.
    let owner = api
        .create(&PostParams::default(), &widget("owner3", 1)?)
        .await?;
    let uid = owner.metadata.uid.clone().unwrap_or_default();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "held", "finalizers": ["test.peerfill.dev/hold"], "ownerReferences": [
            {"apiVersion": "test.peerfill.dev/v1", "kind": "Widget", "name": "owner3", "uid": uid, "blockOwnerDeletion": true}
        ]}}))?,
    )
    .await?;
    let pending = api.delete("owner3", &DeleteParams::foreground()).await?;
    let o = pending
        .left()
        .context("foreground delete should leave the owner pending")?;
    ensure!(
        o.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == "foregroundDeletion"),
        "{:?}",
        o.metadata.finalizers
    );
    ensure!(cms.get("held").await?.metadata.deletion_timestamp.is_some());
    ensure!(
        api.get_opt("owner3").await?.is_some(),
        "owner gone before its dependent"
    );
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    ensure!(cms.get_opt("held").await?.is_none() && api.get_opt("owner3").await?.is_none());

    // Namespaces: content needs one; deleting it removes the content.
    let ns: Api<Namespace> = Api::all(client.clone());
    let in_missing: Api<ConfigMap> = Api::namespaced(client.clone(), "gone");
    let e = api_err(
        in_missing
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "x"}}))?,
            )
            .await
            .err()
            .context("create in a missing namespace succeeded")?,
    )?;
    ensure!(
        e.code == 404 && e.message == r#"namespaces "gone" not found"#,
        "{}",
        e.message
    );
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "tmp"}}))?,
    )
    .await?;
    let in_tmp: Api<ConfigMap> = Api::namespaced(client.clone(), "tmp");
    in_tmp
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "x"}}))?,
        )
        .await?;
    ns.delete("tmp", &DeleteParams::default()).await?;
    ensure!(ns.get_opt("tmp").await?.is_none() && in_tmp.get_opt("x").await?.is_none());

    // Preconditions.
    let c = cms.get("kept").await?;
    let e = api_err(
        cms.delete(
            "kept",
            &DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid: Some("wrong".into()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            },
        )
        .await
        .err()
        .context("delete with a wrong uid precondition succeeded")?,
    )?;
    ensure!(e.code == 409, "{e:?}");
    ensure!(c.metadata.uid.is_some());
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn leases_metrics_and_expired_lists() -> anyhow::Result<()> {
    let server = common::start_with_widgets().await?;
    let client = server.client()?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let l = leases
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "peerfill-operator"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}))?)
        .await?;
    let mut l2 = l.clone();
    if let Some(spec) = l2.spec.as_mut() {
        spec.holder_identity = Some("b".into());
    }
    let r = leases
        .replace("peerfill-operator", &PostParams::default(), &l2)
        .await?;
    ensure!(r.spec.and_then(|s| s.holder_identity) == Some("b".into()));
    // A second writer with the old resourceVersion loses.
    ensure!(
        api_err(
            leases
                .replace("peerfill-operator", &PostParams::default(), &l2)
                .await
                .err()
                .context("stale lease write")?
        )?
        .code
            == 409
    );

    let api = widgets(client.clone());
    api.create(&PostParams::default(), &widget("m", 1)?).await?;
    for i in 0..3 {
        api.patch_status(
            "m",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": format!("p{i}")}})),
        )
        .await?;
    }
    let counts = server.request_counts();
    let status_patches = counts
        .iter()
        .filter(|(k, _)| k.verb == "patch" && k.resource == "widgets" && k.subresource == "status")
        .map(|(_, v)| *v)
        .sum::<u64>();
    ensure!(status_patches == 3, "{counts:?}");
    let text = reqwest_get(&format!("{}/metrics", server.url())).await?;
    ensure!(
        text.contains(r#"apiserver_request_total{verb="patch",group="test.peerfill.dev",resource="widgets",subresource="status"} 3"#),
        "{text}"
    );

    // An exact list at a compacted resourceVersion is 410 Gone.
    let rv = api
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    api.create(&PostParams::default(), &widget("m2", 1)?)
        .await?;
    server.compact();
    let e = api_err(
        api.list(
            &ListParams::default()
                .at(&rv)
                .matching(kube::api::VersionMatch::Exact),
        )
        .await
        .err()
        .context("exact list at a compacted RV succeeded")?,
    )?;
    ensure!(e.code == 410 && e.reason == "Expired", "{e:?}");
    server.shutdown().await;
    Ok(())
}

/// Plain HTTP GET over loopback without extra dependencies.
async fn reqwest_get(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("http URL expected")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    common::within(10, "GET /metrics", s.read_to_end(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[tokio::test]
async fn recorder_events_visible_as_core_events() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let server = common::start_with_widgets().await?;
    let client = server.client()?;
    let api = widgets(client.clone());
    let w = api
        .create(&PostParams::default(), &widget("ev", 1)?)
        .await?;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "peerfill-operator".into(),
            instance: Some("op-0".into()),
        },
    );
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("test.peerfill.dev/v1".into()),
        kind: Some("Widget".into()),
        name: Some("ev".into()),
        namespace: Some("default".into()),
        uid: w.metadata.uid.clone(),
        ..Default::default()
    };
    let ev = Event {
        type_: EventType::Normal,
        reason: "Progressing".into(),
        note: Some("3/10 nodes hold the content".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    // The second identical event is folded into a series (a merge patch).
    recorder.publish(&ev, &reference).await?;
    recorder.publish(&ev, &reference).await?;
    let core: Api<CoreEvent> = Api::default_namespaced(client);
    let list = core
        .list(&ListParams::default().fields("involvedObject.kind=Widget,involvedObject.name=ev"))
        .await?;
    ensure!(list.items.len() == 1, "{:?}", list.items);
    let e = &list.items[0];
    ensure!(
        e.message.as_deref() == Some("3/10 nodes hold the content"),
        "{e:?}"
    );
    ensure!(
        e.reporting_component.as_deref() == Some("peerfill-operator"),
        "{e:?}"
    );
    ensure!(e.series.as_ref().map(|s| s.count) == Some(Some(2)), "{e:?}");
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn crd_applied_at_runtime_is_discovered_and_served() -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let server = kube_server_without_crds().await?;
    let client = server.client()?;
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/widgets-crd.yaml"),
    )?;
    let crd: CustomResourceDefinition =
        serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("fixture: {e}"))?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let created = crds.create(&PostParams::default(), &crd).await?;
    let established = created
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    ensure!(established, "CRD not Established");

    let discovery = kube::Discovery::new(client.clone()).run().await?;
    let found = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .any(|(ar, caps)| {
            ar.kind == "Widget"
                && ar.plural == "widgets"
                && caps.scope == kube::discovery::Scope::Namespaced
        });
    ensure!(found, "widgets not in discovery");

    let api = widgets(client.clone());
    api.create(&PostParams::default(), &widget("rt", 1)?)
        .await?;
    ensure!(api.get("rt").await?.data["spec"]["max"] == json!(100));

    // Deleting the CRD removes the kind and its objects.
    crds.delete("widgets.test.peerfill.dev", &DeleteParams::default())
        .await?;
    let e = api_err(
        api.get("rt")
            .await
            .err()
            .context("kind still served after CRD deletion")?,
    )?;
    ensure!(e.code == 404, "{e:?}");
    server.shutdown().await;
    Ok(())
}

async fn kube_server_without_crds() -> anyhow::Result<peerfill_e2e::apiserver::ApiServerHandle> {
    Ok(peerfill_e2e::apiserver::ApiServer::start(
        peerfill_e2e::apiserver::ApiServerOptions::default(),
    )
    .await?)
}

#[tokio::test]
async fn aggregated_discovery_when_asked() -> anyhow::Result<()> {
    let server = common::start_with_project_crds().await?;
    let client = server.client()?;
    let req = http::Request::get("/apis")
        .header(
            "Accept",
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
        )
        .body(Vec::new())?;
    let doc: serde_json::Value = client.request(req).await?;
    ensure!(doc["kind"] == json!("APIGroupDiscoveryList"), "{doc}");
    let peerfill = doc["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["metadata"]["name"] == json!("peerfill.dev"))
        .context("peerfill.dev missing")?;
    let dist = peerfill["versions"][0]["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["resource"] == json!("distributions"))
        .context("distributions missing")?;
    ensure!(
        dist["scope"] == json!("Namespaced") && dist["shortNames"] == json!(["dist"]),
        "{dist}"
    );
    ensure!(
        dist["subresources"][0]["subresource"] == json!("status"),
        "{dist}"
    );
    // Without the media type, the legacy group list.
    let legacy: serde_json::Value = client
        .request(http::Request::get("/apis").body(Vec::new())?)
        .await?;
    ensure!(legacy["kind"] == json!("APIGroupList"), "{legacy}");
    server.shutdown().await;
    Ok(())
}
