//! Directory contents between real agents: a model-shaped tree (shards and
//! small files, nested) read from many origin URLs, and a node-source
//! directory seeded by one node. Every node must end with every file's
//! exact bytes at the target directory, nothing staged left behind, the
//! origin serving one copy; a symlink inside a source directory fails the
//! seeder with a reason that names it, and nothing appears at the target.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use peerfill_agent::agent::{AgentConfig, ContentConfig, HttpFile, Phase, SourceConfig};
use peerfill_agent::fsroot::DataRoot;
use peerfill_agent::tree::disk::TreeFiles;
use peerfill_agent::tree::{FileEntry, FileTable, TABLE_FILE};

const PIECE: u32 = 1 << 20;

/// Three 3 MiB shards and ten small files, some nested, one empty.
fn model_files() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            (
                format!("model-0000{i}-of-00003.safetensors"),
                random_bytes(3 << 20, 10 + i),
            )
        })
        .collect();
    let small = [
        ("config.json", 612),
        ("generation_config.json", 0),
        ("tokenizer.json", 900 << 10),
        ("tokenizer_config.json", 3_100),
        ("special_tokens_map.json", 414),
        ("README.md", 7_000),
        ("LICENSE", 11_357),
        ("nested/a/vocab.txt", 231_508),
        ("nested/a/merges.txt", 456_318),
        ("nested/b.bin", 1),
    ];
    for (i, (p, len)) in small.into_iter().enumerate() {
        out.push((p.to_string(), random_bytes(len, 100 + i as u64)));
    }
    out
}

fn config(me: &Node, all: &[Node], certs: &Path, c: ContentConfig) -> AgentConfig {
    let mut c = c;
    c.peers = all
        .iter()
        .filter(|n| n.name != me.name)
        .map(|n| peerfill_agent::agent::PeerConfig {
            node: n.name.clone(),
            addr: n.addr,
        })
        .collect();
    c.allowed_peers = all.iter().map(|n| n.name.clone()).collect();
    AgentConfig {
        metrics_addr: Some(me.metrics),
        allow_private_origins: true,
        ..AgentConfig::new(
            me.name.clone(),
            me.addr,
            me.data_dir.clone(),
            peerfill_agent::agent::IdentityFiles::in_dir(&certs.join(&me.name)),
            vec![c],
        )
    }
}

fn content(id: &str, size: Option<u64>, source: SourceConfig) -> ContentConfig {
    ContentConfig {
        id: id.into(),
        path: PathBuf::from(format!("models/{id}")),
        size,
        piece_size: PIECE,
        digest: None,
        source,
        peers: Vec::new(),
        allowed_peers: Vec::new(),
        root: None,
        origin_version: None,
        reuse_from: Vec::new(),
        caps: Default::default(),
        directory: true,
    }
}

/// One test origin per file, and the files as an origin reader gets them.
async fn serve_files(files: &[(String, Vec<u8>)]) -> (Vec<Origin>, Vec<HttpFile>) {
    let mut origins = Vec::new();
    let mut http_files = Vec::new();
    for (p, data) in files {
        let o = Origin::start(Arc::new(data.clone())).await;
        http_files.push(HttpFile {
            path: p.clone(),
            url: o.url(),
            digest: None,
        });
        origins.push(o);
    }
    (origins, http_files)
}

/// The file table of `files` (what the non-readers are told the size of).
fn table_of(files: &[(String, Vec<u8>)]) -> FileTable {
    FileTable::new(
        files
            .iter()
            .map(|(p, d)| FileEntry {
                path: p.clone(),
                size: d.len() as u64,
                executable: false,
                digest: None,
            })
            .collect(),
    )
    .expect("table")
}

/// Content `id` at `path` from `http_files` on `nodes`, the first two
/// reading the origin: only readers get the list; the others learn the
/// table from the content's first pieces.
fn spawn_readers_and_peers(
    nodes: &[Node],
    certs: &Path,
    id: &str,
    path: &str,
    http_files: &[HttpFile],
    table: &FileTable,
) -> Vec<Agent> {
    let readers = vec![nodes[0].name.clone(), nodes[1].name.clone()];
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let reader = i < 2;
            let source = SourceConfig::Http {
                url: "http://127.0.0.1:1/unused/".into(),
                headers: Default::default(),
                readers: readers.clone(),
                whole: false,
                manifest_url: None,
                files: if reader {
                    http_files.to_vec()
                } else {
                    Vec::new()
                },
            };
            let mut c = content(id, (!reader).then_some(table.size()), source);
            c.path = PathBuf::from(path);
            Agent::spawn(n, &config(n, nodes, certs, c))
        })
        .collect()
}

async fn wait_settled(agents: &[&Agent], id: &str) -> bool {
    wait_until(Duration::from_secs(120), || {
        agents.iter().all(|a| {
            a.status(id)
                .is_some_and(|s| matches!(s.phase, Phase::Complete | Phase::Failed))
        })
    })
    .await
}

/// Every file of `files` has its bytes under `dir`, the table file is
/// there, and nothing else is.
fn assert_tree(dir: &Path, files: &[(String, Vec<u8>)], who: &str) {
    for (p, data) in files {
        let got = std::fs::read(dir.join(p)).unwrap_or_else(|e| panic!("{who}: {p}: {e}"));
        assert!(got == *data, "{who}: {p} has wrong bytes");
    }
    assert!(dir.join(TABLE_FILE).is_file(), "{who}: no table file");
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let e = e.expect("entry");
            if e.file_type().expect("type").is_dir() {
                stack.push(e.path());
            } else if e.file_name() != TABLE_FILE {
                count += 1;
            }
        }
    }
    assert_eq!(count, files.len(), "{who}: extra files in the directory");
}

fn no_stage_left(data_dir: &Path, who: &str) {
    let partial = data_dir.join(".peerfill-partial");
    let left: Vec<_> = std::fs::read_dir(&partial)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "{who}: left in the partial directory: {left:?}"
    );
}

/// Waits until `id` settles on every agent, then checks it is `Complete`
/// everywhere with exactly `files` at `rel` and nothing staged left.
async fn assert_all_trees(agents: &[Agent], id: &str, rel: &str, files: &[(String, Vec<u8>)]) {
    let all: Vec<&Agent> = agents.iter().collect();
    let settled = wait_settled(&all, id).await;
    for a in agents {
        let st = a.status(id).expect("status");
        assert!(settled, "{}: {st:?}\n{}", a.node.name, a.log_tail());
        assert_eq!(
            st.phase,
            Phase::Complete,
            "{}: {st:?}\n{}",
            a.node.name,
            a.log_tail()
        );
        assert_tree(&a.node.data_dir.join(rel), files, &a.node.name);
        no_stage_left(&a.node.data_dir, &a.node.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_from_many_urls_arrives_whole_on_every_node() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let files = model_files();
    let (origins, http_files) = serve_files(&files).await;
    let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    let table = table_of(&files);
    let (nodes, certs) = nodes_with_identities(tmp.path(), 3);
    let id = "model";
    let agents = spawn_readers_and_peers(&nodes, &certs, id, "models/model", &http_files, &table);
    assert_all_trees(&agents, id, "models/model", &files).await;
    for a in &agents[..2] {
        let st = a.status(id).expect("status");
        assert_eq!(
            st.files,
            Some(files.len() as u64),
            "readers report the file count"
        );
    }
    let served: u64 = origins.iter().map(Origin::served).sum();
    println!("origin served {served} bytes for {total} bytes of files");
    // One copy, give or take a retried request.
    assert!(
        served >= total && served <= total + total / 20,
        "served {served} of {total}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_source_directory_is_seeded_and_a_symlink_inside_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let files = model_files();
    let (nodes, certs) = nodes_with_identities(tmp.path(), 3);
    let src = nodes[0].data_dir.join("build/model");
    for (p, data) in &files {
        let path = src.join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, data).expect("write");
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.join("LICENSE"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    // A second source with a symlink inside.
    let bad = nodes[0].data_dir.join("build/bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(bad.join("ok.bin"), b"ok").expect("write");
    std::os::unix::fs::symlink("/etc/hostname", bad.join("escape")).expect("symlink");

    let root = DataRoot::open(&nodes[0].data_dir).expect("root");
    let size = TreeFiles::walk(&root, Path::new("build/model"))
        .expect("walk")
        .table()
        .size();
    let seed = |path: &str, i: usize| SourceConfig::Node {
        node: nodes[0].name.clone(),
        path: (i == 0).then(|| nodes[0].data_dir.join(path)),
    };
    let agents: Vec<Agent> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let good = content("seeded", (i > 0).then_some(size), seed("build/model", i));
            let mut cfg = config(n, &nodes, &certs, good);
            if i == 0 {
                // The seeder learns the size (and the file table) itself.
                let bad = content("bad", None, seed("build/bad", i));
                cfg.contents.extend(config(n, &nodes, &certs, bad).contents);
            }
            Agent::spawn(n, &cfg)
        })
        .collect();
    let all: Vec<&Agent> = agents.iter().collect();
    let settled = wait_settled(&all, "seeded").await;
    for a in &agents[1..] {
        let st = a.status("seeded").expect("status");
        assert!(settled, "{}: {st:?}\n{}", a.node.name, a.log_tail());
        assert_eq!(
            st.phase,
            Phase::Complete,
            "{}: {st:?}\n{}",
            a.node.name,
            a.log_tail()
        );
        let dir = a.node.data_dir.join("models/seeded");
        assert_tree(&dir, &files, &a.node.name);
        let mode = std::fs::metadata(dir.join("LICENSE"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "the executable bit travels");
        no_stage_left(&a.node.data_dir, &a.node.name);
    }
    let seeder = &agents[0];
    assert_eq!(
        seeder.status("seeded").map(|s| s.files),
        Some(Some(files.len() as u64))
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            seeder
                .status("bad")
                .is_some_and(|s| s.phase == Phase::Failed)
        })
        .await,
        "{:?}\n{}",
        seeder.status("bad"),
        seeder.log_tail()
    );
    let st = seeder.status("bad").expect("status");
    assert_eq!(st.reason.as_deref(), Some("SourceUnreadable"), "{st:?}");
    assert!(
        st.message.as_deref().unwrap_or("").contains("escape"),
        "{st:?}"
    );
    assert!(!seeder.node.data_dir.join("models/bad").exists());
}

/// A new version of a directory (a file added that sorts first, so every
/// offset moves; one shard changed): a node that does not read the origin
/// takes every unchanged file from its previous copy and fetches only the
/// table, the new file, the changed shard and the pieces they share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_of_a_directory_reuses_unchanged_files_by_path() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let v1 = model_files();
    let mut v2 = v1.clone();
    v2[1].1 = random_bytes(v2[1].1.len(), 999);
    v2.push(("aaa-added.txt".into(), random_bytes(300 << 10, 998)));
    let (nodes, certs) = nodes_with_identities(tmp.path(), 3);

    let mut changed_bytes = 0u64;
    for (id, files) in [("v1", &v1), ("v2", &v2)] {
        let (_origins, http_files) = serve_files(files).await;
        let table = table_of(files);
        // Both versions go to the same directory.
        let agents = spawn_readers_and_peers(&nodes, &certs, id, "models/m", &http_files, &table);
        assert_all_trees(&agents, id, "models/m", files).await;
        if id == "v2" {
            let st = agents[2].status(id).expect("status");
            let fetched = st.bytes_from_peers + st.bytes_from_origin;
            println!(
                "new version of {} bytes: the non-reader fetched {fetched} bytes, reused {} pieces; changed files {changed_bytes} bytes",
                table.size(),
                st.reused_pieces
            );
            // The changed shard and the new file, plus the table's piece
            // and at most one piece on each side of every changed file.
            let bound = changed_bytes + 6 * u64::from(PIECE);
            assert!(fetched <= bound, "fetched {fetched} > {bound}: {st:?}");
            assert!(st.reused_pieces > 0, "{st:?}");
        } else {
            changed_bytes = v2[1].1.len() as u64 + (300 << 10);
        }
        drop(agents);
    }
}

/// The origin's files no longer add up to the published version of the
/// directory (one of them changed since): the readers stop with
/// `OriginChanged` and nothing appears at the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_whose_files_changed_since_the_pin_fails_the_readers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let files: Vec<(String, Vec<u8>)> = model_files().into_iter().skip(3).collect();
    let (_origins, http_files) = serve_files(&files).await;
    let nodes = nodes(tmp.path(), 1);
    let certs = tmp.path().join("certs");
    make_identities(&certs, &[nodes[0].name.clone()]);
    let source = SourceConfig::Http {
        url: "http://127.0.0.1:1/unused/".into(),
        headers: Default::default(),
        readers: vec![nodes[0].name.clone()],
        whole: false,
        manifest_url: None,
        files: http_files,
    };
    let mut c = content("changed", None, source);
    // What the operator published from an earlier read of the files.
    c.origin_version = Some("tree:00000000000000000000000000000000".into());
    let agent = Agent::spawn(&nodes[0], &config(&nodes[0], &nodes, &certs, c));
    assert!(
        wait_settled(&[&agent], "changed").await,
        "{}",
        agent.log_tail()
    );
    let st = agent.status("changed").expect("status");
    assert_eq!(st.phase, Phase::Failed, "{st:?}");
    assert_eq!(st.reason.as_deref(), Some("OriginChanged"), "{st:?}");
    assert!(
        st.origin_version
            .as_deref()
            .is_some_and(|v| v.starts_with("tree:")),
        "{st:?}"
    );
    assert!(!nodes[0].data_dir.join("models/changed").exists());
}

/// A node killed half-way through a directory resumes after a restart:
/// the pieces it had stay (re-verified), the directory appears whole, and
/// nothing staged is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_directory_resumes_and_completes_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let files = model_files();
    let (_origins, http_files) = serve_files(&files).await;
    let table = table_of(&files);
    let (nodes, certs) = nodes_with_identities(tmp.path(), 3);
    let id = "resumed";
    let mut agents =
        spawn_readers_and_peers(&nodes, &certs, id, "models/resumed", &http_files, &table);
    // Slow the third node down so it can be killed half-way: 1 MiB/s.
    agents[2].kill();
    let mut cfg: peerfill_agent::agent::AgentConfig =
        serde_json::from_slice(&std::fs::read(&agents[2].config).expect("config")).expect("json");
    cfg.contents[0].caps.download_bytes_per_sec = Some(1 << 20);
    std::fs::write(&agents[2].config, serde_json::to_vec(&cfg).expect("json")).expect("write");
    agents[2].start();
    // Half-way, and long enough after its first piece that a durability
    // batch (1 s, see `store`) was written: a kill loses at most one batch.
    assert!(
        wait_until(Duration::from_secs(60), || {
            agents[2].status(id).is_some_and(|s| s.pieces_done >= 1)
        })
        .await,
        "{}",
        agents[2].log_tail()
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = agents[2].status(id).expect("status");
    assert!(
        before.pieces_done < before.piece_count,
        "not half-way any more: {before:?}"
    );
    agents[2].kill();
    assert!(
        !nodes[2].data_dir.join("models/resumed").exists(),
        "nothing at the target before it is complete"
    );
    agents[2].start();
    assert_all_trees(&agents, id, "models/resumed", &files).await;
    let after = agents[2].status(id).expect("status");
    println!(
        "killed at {} of {} pieces; after the restart {} resumed from disk",
        before.pieces_done, before.piece_count, after.resumed_pieces
    );
    // (The status file may lag the kill by one write, so the pieces held
    // then are not an upper bound here.)
    assert!(
        after.resumed_pieces > 0,
        "{after:?}\n{}",
        agents[2].log_tail()
    );
    assert!(
        after.bytes_from_peers + after.bytes_from_origin < table.size(),
        "only what was not resumed is fetched again: {after:?}"
    );
}
