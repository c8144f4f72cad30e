//! Directories through the plan and the status: who gets the file list,
//! what makes a new version, how the file count is pinned, and what an
//! origin without Range support means for a directory.

use std::collections::BTreeMap;
use std::sync::Arc;

use peerfill_crds::{
    CONDITION_FAILED, Distribution, HttpFile, NodeDistributionStatus, NodeFill, NodePhase,
    NodeSource, Phase, Source,
};

use crate::plan::tests::{http_dist, node, report_on, world};
use crate::plan::{DistPlan, NoWork, World, content_id, plan, plan_distribution, version_key};
use crate::status::{REASON_INVALID_SPEC, aggregate};

const BASE: &str = "http://127.0.0.1:8080/model/";
const MODEL: [&str; 4] = [
    "config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "tokenizer.json",
];
const NODES: [&str; 4] = ["a", "b", "c", "d"];

fn file(path: &str) -> HttpFile {
    HttpFile {
        path: path.into(),
        url: None,
        digest: None,
    }
}

/// [`http_dist`] made a directory of `paths` under [`BASE`].
fn dir_dist(readers: u32, paths: &[&str]) -> Distribution {
    let mut d = (*http_dist("d", "u", readers)).clone();
    let http = d.spec.source.http.as_mut().expect("http source");
    http.url = BASE.into();
    http.files = paths.iter().map(|p| file(p)).collect();
    d
}

fn dir_world(readers: u32) -> World {
    let nodes = NODES.map(|n| node(n, &[])).to_vec();
    world(vec![Arc::new(dir_dist(readers, &MODEL))], nodes, &NODES)
}

/// Sets fields of `node`'s report on the current version of the world's
/// only Distribution, creating the report if needed.
fn set_report(w: &mut World, node: &str, f: impl FnOnce(&mut NodeDistributionStatus)) {
    let cid = content_id(&w.distributions[0], "u");
    let mut fill = (*w.fills[node]).clone();
    let current = fill.status.as_ref().is_some_and(|s| {
        s.distributions
            .iter()
            .any(|d| d.uid == "u" && d.content_id.as_deref() == Some(cid.as_str()))
    });
    if !current {
        report_on(&mut fill, "u", &cid, NodePhase::Downloading, None, 0);
    }
    let status = fill.status.as_mut().expect("status");
    let entry = status
        .distributions
        .iter_mut()
        .find(|d| d.uid == "u")
        .expect("entry");
    f(entry);
    w.fills.insert(node.into(), Arc::new(fill));
}

fn decisions(w: &World) -> DistPlan {
    plan_distribution(&w.distributions[0], w).expect("planned")
}

fn reader_names(w: &World) -> Vec<String> {
    decisions(w).readers.into_iter().map(|r| r.node).collect()
}

/// The world after the plan's specs were written and every agent
/// restarted (no reports): what survives is what the specs pin.
fn written(w: &World) -> World {
    let planned = plan(w);
    let mut out = w.clone();
    out.fills = w
        .fills
        .iter()
        .map(|(n, f)| {
            let mut f: NodeFill = (**f).clone();
            f.spec = planned.specs[n].clone();
            if let Some(s) = f.status.as_mut() {
                s.distributions.clear();
            }
            (n.clone(), Arc::new(f))
        })
        .collect();
    out
}

#[test]
fn readers_alone_get_the_file_list_every_node_the_directory_flag() {
    let mut w = dir_world(2);
    let readers = reader_names(&w);
    assert_eq!(readers.len(), 2);
    let want: Vec<(String, String)> = MODEL
        .iter()
        .map(|p| (p.to_string(), format!("{BASE}{p}")))
        .collect();
    let check = |w: &World, when: &str| {
        let planned = plan(w);
        for n in NODES {
            let a = &planned.specs[n].distributions[0];
            let http = a.source.http.as_ref().expect("http");
            assert!(http.directory, "{when}: {n}");
            assert!(!http.whole_read, "{when}: {n}");
            // The URL as the agent resolves it: its own, or base + path.
            let got: Vec<(String, String)> = http
                .files
                .iter()
                .map(|f| {
                    let url = f.url.clone().unwrap_or_else(|| {
                        peerfill_crds::distribution::file_url(&http.url, &f.path)
                    });
                    (f.path.clone(), url)
                })
                .collect();
            if readers.iter().any(|r| r == n) {
                assert!(!a.role.origin_ranges.is_empty(), "{when}: {n}");
                assert_eq!(got, want, "{when}: reader {n}");
            } else {
                assert!(got.is_empty(), "{when}: {n} reads nothing");
            }
        }
    };
    check(&w, "before the size");
    for r in &readers {
        set_report(&mut w, r, |e| {
            e.size = Some(10 << 20);
            e.files = Some(4);
        });
    }
    assert_eq!(decisions(&w).files, Some(4));
    check(&w, "once pinned");

    // A single file: no list, no flag, on readers too.
    let w = world(
        vec![http_dist("d", "u", 2)],
        NODES.map(|n| node(n, &[])).to_vec(),
        &NODES,
    );
    for a in plan(&w).specs.values().flat_map(|s| &s.distributions) {
        let http = a.source.http.as_ref().expect("http");
        assert!(!http.directory && http.files.is_empty());
    }
}

#[test]
fn version_key_covers_each_file_and_nothing_else() {
    // Pinned: a single file's key (hence every content id already out
    // there) is what it was before directories.
    assert_eq!(
        version_key(&http_dist("d", "u", 1)),
        r#"{"pieceSize":1048576,"source":{"http":{"digest":null,"url":"http://127.0.0.1:8080/model.bin"}},"targetPath":"models/model.bin"}"#
    );
    let base = dir_dist(2, &MODEL);
    let id = |d: &Distribution| content_id(d, "u");
    assert_ne!(id(&base), id(&http_dist("d", "u", 2)));
    type Edit = Box<dyn Fn(&mut Vec<HttpFile>, &mut String)>;
    let digest = format!("sha256:{}", "0".repeat(64));
    let edits: Vec<(&str, Edit, bool)> = vec![
        (
            "path",
            Box::new(|f, _| f[0].path = "conf.json".into()),
            true,
        ),
        (
            "own url",
            Box::new(|f, _| f[1].url = Some("http://127.0.0.1:9/x".into())),
            true,
        ),
        (
            "digest",
            Box::new(move |f, _| f[2].digest = Some(digest.clone())),
            true,
        ),
        (
            "file added",
            Box::new(|f, _| f.push(file("vocab.txt"))),
            true,
        ),
        ("file removed", Box::new(|f, _| drop(f.pop())), true),
        (
            "base url",
            Box::new(|_, u| *u = "http://127.0.0.1:8080/v2/".into()),
            true,
        ),
        ("order", Box::new(|f, _| f.reverse()), false),
        (
            "own url equal to base + path",
            Box::new(|f, _| f[3].url = Some(format!("{BASE}tokenizer.json"))),
            false,
        ),
        ("nothing", Box::new(|_, _| {}), false),
    ];
    for (what, edit, changes) in edits {
        let mut d = base.clone();
        let http = d.spec.source.http.as_mut().expect("http");
        edit(&mut http.files, &mut http.url);
        assert_eq!(d.validate(), Ok(()), "{what}");
        assert_eq!(id(&d) != id(&base), changes, "{what}");
    }
    // Other edits keep the id, as for a single file.
    let mut d = base.clone();
    d.spec.strategy.priority = 5;
    d.spec.strategy.max_origin_connections = 7;
    assert_eq!(id(&d), id(&base));
}

#[test]
fn the_file_count_is_pinned_with_the_size_when_all_authorities_agree() {
    let mut w = dir_world(2);
    let readers = reader_names(&w);
    let outsider = NODES
        .into_iter()
        .find(|n| !readers.iter().any(|r| r == n))
        .expect("a non-reader");
    let pinned = |w: &World| {
        let p = decisions(w);
        (p.size, p.files)
    };
    // A non-authority's count is never used.
    set_report(&mut w, outsider, |e| {
        e.size = Some(100);
        e.files = Some(4);
    });
    assert_eq!(pinned(&w), (None, None));
    // A size without the count is not yet a directory authority's report.
    set_report(&mut w, &readers[0], |e| {
        e.size = Some(100);
        e.files = Some(4);
    });
    set_report(&mut w, &readers[1], |e| e.size = Some(100));
    assert_eq!(pinned(&w), (None, None));
    assert_eq!(decisions(&w).disagreement, None);
    // Equal sizes, different counts: a disagreement.
    set_report(&mut w, &readers[1], |e| e.files = Some(5));
    assert_eq!(pinned(&w), (None, None));
    let why = decisions(&w).disagreement.expect("disagreement");
    assert!(
        why.starts_with("size:") && why.contains("(4 files)") && why.contains("(5 files)"),
        "{why}"
    );
    set_report(&mut w, &readers[1], |e| e.files = Some(4));
    assert_eq!(pinned(&w), (Some(100), Some(4)));
    let planned = plan(&w);
    for n in NODES {
        let a = &planned.specs[n].distributions[0];
        assert_eq!((a.size, a.files), (Some(100), Some(4)), "{n}");
    }
    let d = &w.distributions[0];
    let st = aggregate(d, plan_distribution(d, &w).as_ref(), &w);
    assert_eq!((st.size, st.files), (Some(100), Some(4)));

    // Sticky: read back from the specs once the reports are gone.
    let mut w = written(&w);
    assert_eq!(pinned(&w), (Some(100), Some(4)));
    // A new version (a file's digest edited) starts with nothing pinned.
    let mut d = (*w.distributions[0]).clone();
    d.spec.source.http.as_mut().expect("http").files[0].digest =
        Some(format!("blake3:{}", "1".repeat(64)));
    w.distributions[0] = Arc::new(d);
    assert_eq!(pinned(&w), (None, None));
}

#[test]
fn a_node_source_is_a_directory_when_its_seeder_counts_files() {
    for (files, want) in [(Some(12), Some(12)), (None, None)] {
        let mut d = (*http_dist("d", "u", 1)).clone();
        d.spec.source = Source {
            http: None,
            node: Some(NodeSource {
                node_name: "build".into(),
                path: "out/model".into(),
            }),
        };
        let mut w = world(
            vec![Arc::new(d)],
            vec![node("build", &[]), node("a", &[])],
            &["build", "a"],
        );
        set_report(&mut w, "build", |e| {
            e.size = Some(4096);
            e.files = files;
        });
        let p = decisions(&w);
        assert_eq!((p.size, p.files, p.directory), (Some(4096), want, false));
        assert_eq!(plan(&w).specs["a"].distributions[0].files, want);
    }
}

#[test]
fn a_directory_is_never_read_whole_and_no_ranges_fails_it() {
    let mut w = dir_world(3);
    let before = reader_names(&w);
    set_report(&mut w, &before[1], |e| {
        e.phase = NodePhase::Failed;
        e.reason = Some("OriginNoRangeSupport".into());
        e.message = Some("the origin answered a range with the whole body".into());
    });
    let p = decisions(&w);
    assert!(!p.whole_read);
    assert_eq!(reader_names(&w), before, "readers kept, none replaced");
    for a in plan(&w).specs.values().flat_map(|s| &s.distributions) {
        assert!(!a.source.http.as_ref().expect("http").whole_read);
    }
    let d = &w.distributions[0];
    let st = aggregate(d, Ok(&p), &w);
    assert_eq!(st.phase, Some(Phase::Failed));
    let failed = st.condition(CONDITION_FAILED).expect("Failed condition");
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("True", "OriginNoRangeSupport")
    );
    assert!(failed.message.contains("whole body"), "{}", failed.message);
    assert_eq!(st.failing_nodes.len(), 1);
    assert_eq!(st.failing_nodes[0].node, before[1]);
}

#[test]
fn a_file_beneath_another_fails_the_spec_naming_the_file() {
    let d = Arc::new(dir_dist(
        1,
        &["config.json", "tokenizer", "tokenizer/vocab.txt"],
    ));
    let w = world(vec![d.clone()], vec![node("a", &[])], &["a"]);
    let why = plan_distribution(&d, &w).expect_err("invalid");
    match &why {
        NoWork::InvalidSpec(m) => assert!(m.contains("spec.source.http.files[2].path"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(plan(&w).specs["a"].distributions.is_empty());
    let st = aggregate(&d, Err(&why), &w);
    assert_eq!(st.phase, Some(Phase::Failed));
    let failed = st.condition(CONDITION_FAILED).expect("Failed condition");
    assert_eq!(failed.reason, REASON_INVALID_SPEC);
    assert!(
        failed.message.contains("spec.source.http.files[2].path")
            && failed.message.contains("\"tokenizer\" is a file"),
        "{}",
        failed.message
    );
}

#[test]
fn a_reader_nodefill_with_1000_files_stays_small() {
    // 1000 files (the schema's limit) with ~60-character paths, each with
    // its own digest, from a base URL like a model hub's; 200 nodes, so
    // every node has the full 64 peers.
    let paths: Vec<String> = (0..1000)
        .map(|i| format!("checkpoints/step-120000/shard-{i:05}-of-01000.safetensors.part"))
        .collect();
    let mut d = dir_dist(4, &[]);
    let http = d.spec.source.http.as_mut().expect("http");
    http.url = "https://models.example.com/acme/llm-70b/resolve/main/".into();
    http.files = paths
        .iter()
        .map(|p| HttpFile {
            digest: Some(format!("sha256:{}", "ab".repeat(32))),
            ..file(p)
        })
        .collect();
    assert_eq!(d.validate(), Ok(()));
    let names: Vec<String> = (0..200).map(|i| format!("node-{i:05}")).collect();
    let up: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut w = world(
        vec![Arc::new(d)],
        names.iter().map(|n| node(n, &[])).collect(),
        &up,
    );
    for fill in w.fills.values_mut() {
        let status = Arc::make_mut(fill).status.get_or_insert_default();
        status.endpoint = Some("198.18.123.234:7443".into());
        status.certificate_fingerprint = Some(format!("sha256:{}", "ab".repeat(32)));
    }
    let readers = reader_names(&w);
    for r in &readers {
        set_report(&mut w, r, |e| {
            e.size = Some(140 << 30);
            e.files = Some(1000);
        });
    }
    let planned = plan(&w);
    let size = |name: &str| {
        let mut fill = NodeFill::new(name, planned.specs[name].clone());
        fill.status = w.fills[name].status.clone();
        serde_json::to_vec(&fill).map_or(usize::MAX, |v| v.len())
    };
    let sizes: BTreeMap<bool, usize> = names.iter().map(|n| (readers.contains(n), size(n))).fold(
        BTreeMap::new(),
        |mut m, (reader, s)| {
            let e = m.entry(reader).or_insert(0);
            *e = (*e).max(s);
            m
        },
    );
    println!(
        "largest NodeFill with a 1000-file directory: reader {} bytes, other node {} bytes",
        sizes[&true], sizes[&false]
    );
    // Far below what the API server and etcd take (1.5 MiB a request):
    // only the few origin readers carry the list.
    assert!(sizes[&true] <= 512 * 1024, "{sizes:?}");
    assert!(sizes[&false] <= 64 * 1024, "{sizes:?}");
}
