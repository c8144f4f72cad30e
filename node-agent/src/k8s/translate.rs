//! NodeFill spec → engine contents: a pure translation of one assignment
//! into the [`ContentConfig`] the swarm engine runs, or why it cannot run
//! yet.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use peerfill_crds::distribution::file_url;
use peerfill_crds::nodefill::Assignment;

use crate::agent::{
    ContentCaps, ContentConfig, Headers, HttpFile, PeerConfig, SourceConfig, dest_path,
};
use crate::content::{Digest, Layout};

/// What to do with one assignment.
#[derive(Debug, Clone)]
// Few of these exist (one per assignment); boxing the config buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Desired {
    /// Run this content.
    Run(ContentConfig),
    /// Not startable yet; shown as Pending with this reason.
    Wait {
        reason: &'static str,
        message: String,
    },
    /// Never startable as written; shown as Failed with this reason.
    Invalid {
        reason: &'static str,
        message: String,
    },
}

/// Translates `a` for node `me` with data root `data_root`. `peer_addrs`
/// holds the resolved QUIC address of every node in `spec.peers`; peers
/// named by the assignment without a known address are left out until
/// they have one.
pub fn translate(
    a: &Assignment,
    me: &str,
    data_root: &Path,
    peer_addrs: &HashMap<String, SocketAddr>,
) -> Desired {
    let invalid = |reason, message: String| Desired::Invalid { reason, message };
    // With a pinned size the piece size is the operator's choice (an older
    // operator's `0` meant its rule); without one, `0` leaves it to the
    // size this node learns, and the operator's choice follows.
    let chosen = a.effective_piece_size().unwrap_or(a.piece_size);
    let Ok(piece_size) = u32::try_from(chosen) else {
        return invalid(
            "InvalidPieceSize",
            format!("piece size {chosen} is too large"),
        );
    };
    let path = PathBuf::from(&a.path);
    if let Err(e) = dest_path(data_root, &path) {
        return invalid("InvalidPath", e.to_string());
    }
    let (source, digest, can_learn_size) = match (&a.source.http, &a.source.node) {
        (Some(http), None) => {
            let digest = match http.digest.as_deref().map(str::parse::<Digest>) {
                None => None,
                Some(Ok(d)) => Some(d),
                Some(Err(e)) => return invalid("InvalidDigest", e.to_string()),
            };
            if a.origin_readers.is_empty() {
                return Desired::Wait {
                    reason: "WaitingForReaders",
                    message: "the operator has not chosen origin readers yet".into(),
                };
            }
            let readers: Vec<String> = a.origin_readers.iter().map(|r| r.node.clone()).collect();
            let reader = readers.iter().any(|r| r == me);
            let source = SourceConfig::Http {
                url: http.url.clone(),
                headers: Headers::default(),
                readers,
                whole: http.whole_read,
                manifest_url: http.manifest_url.clone(),
                files: http
                    .files
                    .iter()
                    .map(|f| HttpFile {
                        path: f.path.clone(),
                        url: f
                            .url
                            .clone()
                            .unwrap_or_else(|| file_url(&http.url, &f.path)),
                        digest: f.digest.clone(),
                    })
                    .collect(),
            };
            (source, digest, reader)
        }
        (None, Some(seed)) => {
            let seeder = seed.node_name == me;
            let seed_path = if seeder {
                match dest_path(data_root, Path::new(&seed.path)) {
                    Ok(p) => Some(p),
                    Err(e) => return invalid("InvalidPath", e.to_string()),
                }
            } else {
                None
            };
            let source = SourceConfig::Node {
                node: seed.node_name.clone(),
                path: seed_path,
            };
            (source, None, seeder)
        }
        _ => {
            return invalid(
                "InvalidSource",
                "the assignment must have exactly one of source.http and source.node".into(),
            );
        }
    };
    // The pinned identity: the user's blake3 digest at once, else the root
    // the operator published once the authorities agreed.
    let published = match a.manifest_digest.as_deref().map(str::parse::<Digest>) {
        None => None,
        Some(Ok(d @ Digest::Blake3(_))) => Some(d),
        Some(Ok(_)) => {
            return invalid(
                "InvalidManifestDigest",
                "manifestDigest must be a blake3 root".into(),
            );
        }
        Some(Err(e)) => return invalid("InvalidManifestDigest", e.to_string()),
    };
    let root = match digest {
        Some(d @ Digest::Blake3(_)) => Some(d),
        _ => published,
    };
    let origin_version = a
        .source
        .http
        .as_ref()
        .and_then(|h| h.origin_version.clone());
    if a.size.is_none() && !can_learn_size {
        return Desired::Wait {
            reason: "WaitingForSize",
            message: "waiting for an origin reader or the seeder to report the size".into(),
        };
    }
    let peers = a
        .peers
        .iter()
        .filter(|n| n.as_str() != me)
        .filter_map(|n| {
            peer_addrs.get(n).map(|addr| PeerConfig {
                node: n.clone(),
                addr: *addr,
            })
        })
        .collect();
    Desired::Run(ContentConfig {
        id: a.content_id.clone(),
        path,
        size: a.size,
        piece_size,
        digest,
        source,
        peers,
        allowed_peers: a
            .peers
            .iter()
            .filter(|n| n.as_str() != me)
            .cloned()
            .collect(),
        root,
        origin_version,
        reuse_from: Vec::new(),
        caps: ContentCaps {
            download_bytes_per_sec: a.max_download_bytes_per_second,
            upload_bytes_per_sec: a.max_upload_bytes_per_second,
            priority: a.priority,
        },
        directory: a.files.is_some() || a.source.http.as_ref().is_some_and(|h| h.directory),
    })
}

/// Whether two paths under the data root overlap: equal, or one is a
/// directory holding the other (compared by components, so `a/b` and
/// `a/bc` do not overlap).
pub fn paths_overlap(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The paths an assignment claims on node `me`: its target, and the source
/// file when `me` seeds it.
pub fn claimed_paths(a: &Assignment, me: &str) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from(&a.path)];
    if let Some(seed) = &a.source.node
        && seed.node_name == me
    {
        out.push(PathBuf::from(&seed.path));
    }
    out
}

/// Assignments whose paths overlap an earlier assignment's (in spec order)
/// on node `me`: uid → the `namespace/name` of the one that holds the path.
/// The operator never assigns overlapping paths; this is defence in depth
/// so that a second Distribution on a path touches nothing.
pub fn path_conflicts(assignments: &[Assignment], me: &str) -> HashMap<String, String> {
    let mut held: Vec<(PathBuf, &Assignment)> = Vec::new();
    let mut out = HashMap::new();
    for a in assignments {
        let mine = claimed_paths(a, me);
        let clash = held
            .iter()
            .find(|(p, other)| other.uid != a.uid && mine.iter().any(|m| paths_overlap(m, p)));
        if let Some((_, other)) = clash {
            out.insert(a.uid.clone(), format!("{}/{}", other.namespace, other.name));
            continue;
        }
        held.extend(mine.into_iter().map(|p| (p, a)));
    }
    out
}

/// Whether a running content must be restarted to follow `new`: anything
/// but its peers, its pinned root or origin version (applied live, see
/// `Engine::pin`) changed. A size the running content learnt itself (an
/// origin reader, the seeder) and the operator now copies in is no change.
pub fn needs_restart(
    running: &ContentConfig,
    learnt_size: Option<u64>,
    new: &ContentConfig,
) -> bool {
    let size_same = running.size == new.size || (running.size.is_none() && new.size == learnt_size);
    // A piece size left to the learnt size, which the operator now
    // publishes as the same choice, is no change either: compared with the
    // cut the running content actually made.
    let piece_same = running.piece_size == new.piece_size
        || (running.piece_size == 0
            && running
                .size
                .or(learnt_size)
                .and_then(|size| Layout::for_content(size, 0).ok())
                .is_some_and(|cut| cut.piece_size == new.piece_size));
    // A seeder learns by itself that its source is a directory; the
    // operator's pin of the file count then says so too.
    let kind_same = running.directory == new.directory || running.size.is_none();
    !(size_same
        && kind_same
        && running.id == new.id
        && running.path == new.path
        && piece_same
        && running.digest == new.digest
        && same_source(&running.source, &new.source))
}

fn same_source(a: &SourceConfig, b: &SourceConfig) -> bool {
    // SourceConfig has no PartialEq (it is a config type); compare by value.
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// Whether the peers or allowed nodes differ.
pub fn peers_changed(running: &ContentConfig, new: &ContentConfig) -> bool {
    let key = |c: &ContentConfig| {
        let mut p: Vec<(String, SocketAddr)> =
            c.peers.iter().map(|p| (p.node.clone(), p.addr)).collect();
        p.sort();
        let mut a = c.allowed_peers.clone();
        a.sort();
        (p, a)
    };
    key(running) != key(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerfill_crds::nodefill::{
        OriginReader, ResolvedHttpSource, ResolvedSource, Role, SeedNode,
    };

    const ROOT: &str = "/var/lib/peerfill";

    fn http(readers: &[&str], size: Option<u64>) -> Assignment {
        Assignment {
            namespace: "default".into(),
            name: "model".into(),
            uid: "u-1".into(),
            generation: 1,
            content_id: Assignment::content_id_for_uid("u-1"),
            source: ResolvedSource {
                http: Some(ResolvedHttpSource {
                    url: "http://127.0.0.1:8080/m.bin".into(),
                    manifest_url: None,
                    digest: Some(format!("sha256:{}", "ab".repeat(32))),
                    headers_secret: None,
                    origin_version: None,
                    whole_read: false,
                    files: Vec::new(),
                    directory: false,
                }),
                node: None,
            },
            path: "models/m.bin".into(),
            size,
            piece_size: 1 << 20,
            origin_readers: readers
                .iter()
                .map(|n| OriginReader {
                    node: (*n).into(),
                    start: 0,
                    end: 0,
                })
                .collect(),
            peers: vec!["n1".into(), "n2".into(), "n3".into()],
            ..Assignment::default()
        }
    }

    fn addrs() -> HashMap<String, SocketAddr> {
        [
            ("n1", "127.0.1.1:7443"),
            ("n2", "127.0.1.2:7443"),
            ("n3", "127.0.1.3:7443"),
        ]
        .into_iter()
        .map(|(n, a)| (n.to_string(), a.parse().expect("addr")))
        .collect()
    }

    fn run(d: Desired) -> ContentConfig {
        match d {
            Desired::Run(c) => c,
            other => panic!("expected a content, got {other:?}"),
        }
    }

    #[test]
    fn an_origin_reader_starts_without_a_size() {
        let c = run(translate(
            &http(&["n2", "n1"], None),
            "n1",
            Path::new(ROOT),
            &addrs(),
        ));
        assert_eq!(c.id, Assignment::content_id_for_uid("u-1"));
        assert_eq!(c.path, PathBuf::from("models/m.bin"));
        assert_eq!(c.size, None);
        assert_eq!(c.piece_size, 1 << 20);
        assert!(matches!(c.digest, Some(Digest::Sha256(_))));
        match &c.source {
            SourceConfig::Http { url, readers, .. } => {
                assert_eq!(url, "http://127.0.0.1:8080/m.bin");
                // Reader order is the operator's: it fixes the ranges.
                assert_eq!(readers, &["n2", "n1"]);
            }
            other => panic!("{other:?}"),
        }
        // Itself is neither a peer nor allowed.
        let peers: Vec<_> = c.peers.iter().map(|p| (p.node.as_str(), p.addr)).collect();
        assert_eq!(
            peers,
            [
                ("n2", "127.0.1.2:7443".parse().expect("addr")),
                ("n3", "127.0.1.3:7443".parse().expect("addr"))
            ]
        );
        assert_eq!(c.allowed_peers, ["n2", "n3"]);
    }

    #[test]
    fn other_nodes_wait_for_the_size_then_run() {
        let a = http(&["n2"], None);
        assert!(matches!(
            translate(&a, "n1", Path::new(ROOT), &addrs()),
            Desired::Wait {
                reason: "WaitingForSize",
                ..
            }
        ));
        let a = http(&["n2"], Some(5 << 20));
        let c = run(translate(&a, "n1", Path::new(ROOT), &addrs()));
        assert_eq!(c.size, Some(5 << 20));
        let no_readers = http(&[], Some(5 << 20));
        assert!(matches!(
            translate(&no_readers, "n1", Path::new(ROOT), &addrs()),
            Desired::Wait {
                reason: "WaitingForReaders",
                ..
            }
        ));
    }

    #[test]
    fn peers_without_an_endpoint_are_left_out_but_stay_allowed() {
        let mut known = addrs();
        known.remove("n3");
        let c = run(translate(
            &http(&["n1"], None),
            "n1",
            Path::new(ROOT),
            &known,
        ));
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.allowed_peers, ["n2", "n3"]);
    }

    #[test]
    fn node_sources_seed_under_the_data_root() {
        let mut a = http(&[], None);
        a.source = ResolvedSource {
            http: None,
            node: Some(SeedNode {
                node_name: "n1".into(),
                path: "builds/b.tar".into(),
            }),
        };
        a.role = Role {
            seed: true,
            ..Role::default()
        };
        let c = run(translate(&a, "n1", Path::new(ROOT), &addrs()));
        assert!(matches!(
            &c.source,
            SourceConfig::Node { node, path: Some(p) }
                if node == "n1" && p == Path::new("/var/lib/peerfill/builds/b.tar")
        ));
        // Elsewhere: waits for the size the seeder reports.
        assert!(matches!(
            translate(&a, "n2", Path::new(ROOT), &addrs()),
            Desired::Wait { .. }
        ));
        a.source.node = Some(SeedNode {
            node_name: "n1".into(),
            path: "../etc/shadow".into(),
        });
        assert!(matches!(
            translate(&a, "n1", Path::new(ROOT), &addrs()),
            Desired::Invalid {
                reason: "InvalidPath",
                ..
            }
        ));
    }

    #[test]
    fn bad_assignments_are_invalid() {
        let mut a = http(&["n1"], None);
        a.path = "../../etc/passwd".into();
        assert!(matches!(
            translate(&a, "n1", Path::new(ROOT), &addrs()),
            Desired::Invalid {
                reason: "InvalidPath",
                ..
            }
        ));
        let mut a = http(&["n1"], None);
        a.source.http.as_mut().expect("http").digest = Some("md5:00".into());
        assert!(matches!(
            translate(&a, "n1", Path::new(ROOT), &addrs()),
            Desired::Invalid {
                reason: "InvalidDigest",
                ..
            }
        ));
        let mut a = http(&["n1"], None);
        a.source.node = Some(SeedNode::default());
        assert!(matches!(
            translate(&a, "n1", Path::new(ROOT), &addrs()),
            Desired::Invalid {
                reason: "InvalidSource",
                ..
            }
        ));
    }

    #[test]
    fn restarts_only_for_changes_beyond_peers_and_a_learnt_size() {
        let running = run(translate(
            &http(&["n1"], None),
            "n1",
            Path::new(ROOT),
            &addrs(),
        ));
        let sized = run(translate(
            &http(&["n1"], Some(9 << 20)),
            "n1",
            Path::new(ROOT),
            &addrs(),
        ));
        assert!(!needs_restart(&running, Some(9 << 20), &sized));
        assert!(needs_restart(&running, Some(8 << 20), &sized));
        let other_readers = run(translate(
            &http(&["n1", "n2"], None),
            "n1",
            Path::new(ROOT),
            &addrs(),
        ));
        assert!(needs_restart(&running, None, &other_readers));

        let mut moved = addrs();
        moved.insert("n2".into(), "127.0.1.2:7555".parse().expect("addr"));
        let re_peered = run(translate(
            &http(&["n1"], None),
            "n1",
            Path::new(ROOT),
            &moved,
        ));
        assert!(!needs_restart(&running, None, &re_peered));
        assert!(peers_changed(&running, &re_peered));
        assert!(!peers_changed(&running, &running.clone()));
    }

    #[test]
    fn a_pinned_size_comes_with_the_operators_piece_size() {
        let auto = |size: Option<u64>| {
            let mut a = http(&["n1"], size);
            a.piece_size = 0;
            run(translate(&a, "n1", Path::new(ROOT), &addrs()))
        };
        // An origin reader learns 4 GiB itself and cuts it by today's rule.
        let running = auto(None);
        assert_eq!(running.piece_size, 0);
        let learnt = Some(4 << 30);
        // Today's operator pins the size with the piece size it chose.
        let mut a = http(&["n1"], learnt);
        a.piece_size = peerfill_crds::validation::auto_piece_size(4 << 30);
        let published = run(translate(&a, "n1", Path::new(ROOT), &addrs()));
        assert_eq!(published.piece_size, 1 << 20);
        assert!(!needs_restart(&running, learnt, &published));
        // An operator from before left `0` beside the size: its own rule
        // (4 MiB here), never this agent's, so both cut the content alike;
        // the reader re-cuts its range.
        let older = auto(learnt);
        assert_eq!(older.piece_size, 4 << 20);
        assert!(needs_restart(&running, learnt, &older));
        // Content published with a piece size keeps it.
        assert!(!needs_restart(&older, None, &older.clone()));
        assert!(needs_restart(&older, None, &published));
    }

    #[test]
    fn reader_ranges_agree_with_the_operator() {
        // The engine splits by reader order like the operator does.
        for (pieces, readers) in [(1u64, 3u32), (10, 3), (1000, 7), (5, 5)] {
            let layout = crate::content::Layout::new(pieces * (1 << 20), 1 << 20).expect("layout");
            let ours: Vec<(u64, u64)> = crate::origin::split_ranges(&layout, readers)
                .into_iter()
                .map(|r| (u64::from(r.start), u64::from(r.end)))
                .collect();
            let theirs: Vec<(u64, u64)> = peerfill_crds::nodefill::split_ranges(pieces, readers)
                .into_iter()
                .map(|r| (r.start, r.end))
                .collect();
            assert_eq!(ours, theirs, "{pieces} pieces, {readers} readers");
        }
    }

    #[test]
    fn the_pinned_identity_comes_from_a_blake3_digest_or_the_published_root() {
        let b3 = format!("blake3:{}", "cd".repeat(32));
        // sha256 digest, nothing published: no pin yet.
        let a = http(&["n1"], Some(10 << 20));
        let c = run(translate(&a, "n2", Path::new(ROOT), &addrs()));
        assert_eq!(c.root, None);
        assert_eq!(c.origin_version, None);
        // Published root and origin version.
        let mut a = http(&["n1"], Some(10 << 20));
        a.manifest_digest = Some(b3.clone());
        if let Some(h) = a.source.http.as_mut() {
            h.origin_version = Some("\"v1\"".into());
        }
        let c = run(translate(&a, "n2", Path::new(ROOT), &addrs()));
        assert_eq!(c.root.map(|d| d.to_string()), Some(b3.clone()));
        assert_eq!(c.origin_version.as_deref(), Some("\"v1\""));
        // A pin arriving later is applied live, not by a restart.
        let before = run(translate(
            &http(&["n1"], Some(10 << 20)),
            "n2",
            Path::new(ROOT),
            &addrs(),
        ));
        assert!(!needs_restart(&before, None, &c));
        // The user's blake3 digest pins at once.
        let mut a = http(&["n1"], None);
        if let Some(h) = a.source.http.as_mut() {
            h.digest = Some(b3.clone());
        }
        let c = run(translate(&a, "n1", Path::new(ROOT), &addrs()));
        assert_eq!(c.root.map(|d| d.to_string()), Some(b3));
        // A published sha256 or garbage is refused.
        for bad in [format!("sha256:{}", "ab".repeat(32)), "blake3:zz".into()] {
            let mut a = http(&["n1"], Some(10));
            a.manifest_digest = Some(bad.clone());
            assert!(
                matches!(
                    translate(&a, "n2", Path::new(ROOT), &addrs()),
                    Desired::Invalid {
                        reason: "InvalidManifestDigest",
                        ..
                    }
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn overlapping_paths_conflict_and_the_later_one_is_refused() {
        let mk = |uid: &str, name: &str, path: &str| Assignment {
            uid: uid.into(),
            namespace: "ns".into(),
            name: name.into(),
            path: path.into(),
            ..http(&["n1"], None)
        };
        let list = vec![
            mk("u1", "a", "models/m.bin"),
            mk("u2", "b", "models/m.bin"),
            mk("u3", "c", "models"),
            mk("u4", "d", "models/m.bin2"),
            mk("u5", "e", "other/x"),
        ];
        let c = path_conflicts(&list, "n1");
        assert_eq!(c.get("u2").map(String::as_str), Some("ns/a"));
        assert_eq!(c.get("u3").map(String::as_str), Some("ns/a"));
        assert!(!c.contains_key("u1"));
        assert!(!c.contains_key("u4"), "a/b and a/bc do not overlap");
        assert!(!c.contains_key("u5"));
        // A seeder's source path is claimed on the seeding node only.
        let mut seed = mk("s1", "seed", "out/copy");
        seed.source = ResolvedSource {
            http: None,
            node: Some(SeedNode {
                node_name: "n1".into(),
                path: "src/build.tar".into(),
            }),
        };
        let list = vec![seed, mk("u6", "f", "src/build.tar")];
        assert_eq!(
            path_conflicts(&list, "n1").get("u6").map(String::as_str),
            Some("ns/seed")
        );
        assert!(path_conflicts(&list, "n2").is_empty());
        assert!(paths_overlap(Path::new("a/b"), Path::new("a")));
        assert!(!paths_overlap(Path::new("a/b"), Path::new("a/bc")));
    }
}
