//! Rules that decide whether a Distribution may get work at all, and what a
//! node's failure reason means: private origins, path ownership, and the
//! classification of reasons (control-path.md "Operator decisions"). Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use kube::ResourceExt;
use peerfill_crds::{Distribution, NodeFill};

/// Reason of a Distribution refused for its origin address.
pub const REASON_ORIGIN_FORBIDDEN: &str = "OriginForbidden";
/// Reason of a Distribution whose target path another Distribution owns.
pub const REASON_PATH_CONFLICT: &str = "PathConflict";
/// Reason an origin reader reports when the origin's version changed under
/// the pinned one.
pub const REASON_ORIGIN_CHANGED: &str = "OriginChanged";
/// Reason an origin reader reports when the origin answered a range request
/// with the whole body: the content is then read whole by one reader.
pub const REASON_ORIGIN_NO_RANGES: &str = "OriginNoRangeSupport";

/// Reasons that are the origin's (or the content's) fault, not a node's:
/// reported by an origin reader (or the seeder) they fail the whole
/// Distribution, since no other node could do better. Everything not listed
/// here, in [`ORIGIN_TRANSIENT_REASONS`] or [`REASON_ORIGIN_CHANGED`] is a
/// *local* fault of the reporting node (disk full, storage error, failed
/// verification, ...): that node is replaced as an authority and listed in
/// `failingNodes`, the others go on.
pub const ORIGIN_PERMANENT_REASONS: &[&str] = &[
    "OriginNotFound",
    "OriginForbidden",
    "OriginUnauthorized",
    "OriginWrongLength",
    "OriginAddressForbidden",
    "OriginRedirectForbidden",
    "OriginTooManyRedirects",
    "InvalidUrl",
    "DigestMismatch",
    "InvalidOriginUrl",
    "InvalidOriginHeaders",
    // A reader cannot get the headers of `headersFrom`: the Secret is
    // missing, or outside the namespaces the chart lets agents read.
    "OriginHeadersSecretNotFound",
    "OriginHeadersSecretForbidden",
    // The agent's reason for a node source it cannot read (missing, not a
    // regular file, a symlink): the seeder is the only source.
    "SourceUnreadable",
];

/// Origin reasons the agents retry with backoff (the origin is down or
/// overloaded for everyone): they keep the Distribution Progressing with
/// that reason and do not replace the reader, since another one would see
/// the same origin.
pub const ORIGIN_TRANSIENT_REASONS: &[&str] = &[
    "OriginUnreachable",
    "OriginTimeout",
    "OriginHttpError",
    "OriginThrottled",
];

/// What a node's failure reason means for the Distribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasonKind {
    /// The origin or content is wrong: the Distribution fails.
    OriginPermanent,
    /// The origin is down for now: wait, do not replace.
    OriginTransient,
    /// The origin's version changed: restart on a new revision.
    OriginChanged,
    /// The origin ignores Range requests: read it whole with one reader
    /// (`plan`); the reader restarts, nothing fails. Never for a directory
    /// ([`reason_kind_of`]), which needs ranges.
    OriginNoRanges,
    /// The node's own fault: replace it as an authority, others go on.
    Local,
}

/// Classifies a node's failure reason.
pub fn reason_kind(reason: &str) -> ReasonKind {
    if reason == REASON_ORIGIN_CHANGED {
        ReasonKind::OriginChanged
    } else if reason == REASON_ORIGIN_NO_RANGES {
        ReasonKind::OriginNoRanges
    } else if ORIGIN_PERMANENT_REASONS.contains(&reason) {
        ReasonKind::OriginPermanent
    } else if ORIGIN_TRANSIENT_REASONS.contains(&reason) {
        ReasonKind::OriginTransient
    } else {
        ReasonKind::Local
    }
}

/// Classifies a node's failure reason on a content that is a directory
/// (`directory`) or not: a directory needs Range requests (it is never
/// read whole), so there `OriginNoRangeSupport` is the origin's permanent
/// fault.
pub fn reason_kind_of(reason: &str, directory: bool) -> ReasonKind {
    match reason_kind(reason) {
        ReasonKind::OriginNoRanges if directory => ReasonKind::OriginPermanent,
        kind => kind,
    }
}

/// Why an origin URL is refused without `--allow-private-origins`, if it is:
/// `localhost`, or a literal address that is loopback, link-local,
/// unspecified, or a cloud metadata endpoint. RFC 1918 / unique-local
/// ranges stay allowed (on-premises origins are normal there). Host names
/// that merely resolve to such addresses, and redirects, are checked by the
/// agent when it connects.
pub fn private_origin(url_text: &str) -> Option<String> {
    let url = url::Url::parse(url_text).ok()?;
    let why = match url.host()? {
        url::Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            (d == "localhost" || d.ends_with(".localhost")).then(|| "localhost".to_string())
        }
        url::Host::Ipv4(ip) => forbidden_ip(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => forbidden_ip(IpAddr::V6(ip)),
    }?;
    Some(format!(
        "spec.source.http.url: the origin host is {why}; refused unless the operator runs with --allow-private-origins"
    ))
}

/// Cloud metadata endpoints (AWS/GCP/Azure/OpenStack, AWS IPv6, Alibaba).
const METADATA_V4: [Ipv4Addr; 1] = [Ipv4Addr::new(100, 100, 100, 200)];
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

fn forbidden_ip(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some(format!("the loopback address {v4}"))
            } else if v4.is_link_local() {
                Some(format!("the link-local (cloud metadata) address {v4}"))
            } else if v4.is_unspecified() || v4.octets()[0] == 0 {
                Some(format!("the unspecified address {v4}"))
            } else if METADATA_V4.contains(&v4) {
                Some(format!("the cloud metadata address {v4}"))
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_ip(IpAddr::V4(v4));
            }
            if v6.is_loopback() {
                Some(format!("the loopback address {v6}"))
            } else if v6.is_unspecified() {
                Some(format!("the unspecified address {v6}"))
            } else if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                Some(format!("the link-local address {v6}"))
            } else if v6 == METADATA_V6 {
                Some(format!("the cloud metadata address {v6}"))
            } else {
                None
            }
        }
    }
}

/// Whether two relative paths overlap: equal, or one is a directory prefix
/// of the other (compared by whole components, so `a/b` and `a/bc` do not).
pub fn paths_overlap(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    long == short || (long.starts_with(short) && long.as_bytes().get(short.len()) == Some(&b'/'))
}

/// A Distribution that may not own its paths, and who does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathConflict {
    /// `namespace/name` of the owner.
    pub owner: String,
    /// The owner's path that overlaps.
    pub owner_path: String,
    /// This Distribution's path that overlaps.
    pub path: String,
}

/// The paths a Distribution claims: its target path (written on every
/// target) and, for a node source, its seed path (read on the source node).
/// Two seed paths may overlap (both only read); any other overlap is a
/// conflict. Paths are compared whatever the nodes: target node sets change
/// with labels, and an ownership that depends on them would move content
/// out from under a running Distribution.
fn claims(d: &Distribution) -> Vec<(&str, bool)> {
    let mut out = vec![(d.spec.target.path.as_str(), true)];
    if let Some(n) = &d.spec.source.node {
        out.push((n.path.as_str(), false));
    }
    out
}

/// Which Distributions may not own their paths (by uid). Every Distribution
/// with a uid and a valid spec takes part, those being deleted too (their
/// files are still on the nodes until the finalizer is released). Owners
/// are chosen greedily in order: first those that already hold assignments
/// for their current target path (so a late edit never takes a path away
/// from a running Distribution), then by creation time, then
/// `namespace/name`. The losers get no work at all.
pub fn path_conflicts(
    dists: &[Arc<Distribution>],
    fills: &BTreeMap<String, Arc<NodeFill>>,
) -> BTreeMap<String, PathConflict> {
    let incumbent: BTreeSet<(&str, &str)> = fills
        .values()
        .flat_map(|f| f.spec.distributions.iter())
        .map(|a| (a.uid.as_str(), a.path.as_str()))
        .collect();
    let mut order: Vec<(bool, Option<i128>, String, &Distribution)> = dists
        .iter()
        .filter(|d| d.metadata.uid.is_some() && d.validate().is_ok())
        .map(|d| {
            let uid = d.metadata.uid.as_deref().unwrap_or_default();
            let held = incumbent.contains(&(uid, d.spec.target.path.as_str()));
            let created = d
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_nanosecond());
            let key = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
            (!held, created, key, d.as_ref())
        })
        .collect();
    // Missing timestamps (never from an API server) sort last.
    order.sort_by(|a, b| (a.0, a.1.is_none(), a.1, &a.2).cmp(&(b.0, b.1.is_none(), b.1, &b.2)));
    // Owned paths -> (owner, written?). Lookups walk a claim's ancestors and
    // the range of its descendants, so the whole pass stays O(n log n).
    let mut owned: BTreeMap<&str, Vec<(&str, bool)>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (_, _, key, d) in &order {
        let mine = claims(d);
        let clash = mine
            .iter()
            .find_map(|(p, written)| find_clash(&owned, p, *written).map(|c| (p, c)));
        let uid = d.metadata.uid.clone().unwrap_or_default();
        match clash {
            Some((path, (owner, owner_path))) => {
                out.insert(
                    uid,
                    PathConflict {
                        owner: owner.to_string(),
                        owner_path: owner_path.to_string(),
                        path: path.to_string(),
                    },
                );
            }
            None => {
                for (p, written) in mine {
                    owned.entry(p).or_default().push((key.as_str(), written));
                }
            }
        }
    }
    out
}

/// An owner of a path overlapping `path` (equal, an ancestor directory or
/// a descendant), where at least one of the two claims writes.
fn find_clash<'a>(
    owned: &BTreeMap<&'a str, Vec<(&'a str, bool)>>,
    path: &str,
    written: bool,
) -> Option<(&'a str, &'a str)> {
    let pick = |q: &'a str, entries: &Vec<(&'a str, bool)>| {
        entries
            .iter()
            .find(|(_, w)| written || *w)
            .map(|(owner, _)| (*owner, q))
    };
    let ancestors = path
        .char_indices()
        .filter(|(_, c)| *c == '/')
        .map(|(i, _)| &path[..i])
        .chain(std::iter::once(path));
    for q in ancestors {
        if let Some((k, entries)) = owned.get_key_value(q)
            && let Some(hit) = pick(k, entries)
        {
            return Some(hit);
        }
    }
    // Descendants: keys in ["path/", "path0"), '0' being the byte after '/'.
    let (lo, hi) = (format!("{path}/"), format!("{path}0"));
    owned
        .range::<str, _>((
            std::ops::Bound::Included(lo.as_str()),
            std::ops::Bound::Excluded(hi.as_str()),
        ))
        .find_map(|(k, entries)| pick(k, entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use peerfill_crds::{Assignment, NodeFillSpec, NodeSource};

    #[test]
    fn reasons_are_classified() {
        for (reason, kind) in [
            ("OriginNotFound", ReasonKind::OriginPermanent),
            ("OriginForbidden", ReasonKind::OriginPermanent),
            ("DigestMismatch", ReasonKind::OriginPermanent),
            ("OriginUnreachable", ReasonKind::OriginTransient),
            ("OriginHttpError", ReasonKind::OriginTransient),
            ("OriginChanged", ReasonKind::OriginChanged),
            ("OriginNoRangeSupport", ReasonKind::OriginNoRanges),
            ("InsufficientSpace", ReasonKind::Local),
            ("StorageError", ReasonKind::Local),
            ("VerificationFailed", ReasonKind::Local),
            ("SomethingNew", ReasonKind::Local),
        ] {
            assert_eq!(reason_kind(reason), kind, "{reason}");
        }
    }

    #[test]
    fn private_origins_are_named() {
        for (url, refused) in [
            ("http://127.0.0.1:8080/x", true),
            ("http://127.1/x", true),
            ("http://2130706433/x", true),
            ("http://0x7f.0.0.1/x", true),
            ("http://localhost/x", true),
            ("http://LOCALHOST./x", true),
            ("http://api.localhost/x", true),
            ("http://169.254.169.254/latest/meta-data", true),
            ("http://169.254.1.1/", true),
            ("http://0.0.0.0/", true),
            ("http://100.100.100.200/", true),
            ("http://[::1]:8080/blob", true),
            ("http://[::]/", true),
            ("http://[fe80::1]/", true),
            ("http://[fd00:ec2::254]/", true),
            ("http://[::ffff:127.0.0.1]/", true),
            ("https://198.18.0.5/model.bin", false),
            ("https://198.19.1.2/model.bin", false),
            ("https://[fd12::1]/model.bin", false),
            ("https://origin.example.com/model.bin", false),
            ("https://198.18.100.201/", false),
        ] {
            let got = private_origin(url);
            assert_eq!(got.is_some(), refused, "{url}: {got:?}");
            if let Some(message) = got {
                assert!(message.starts_with("spec.source.http.url"), "{message}");
            }
        }
    }

    #[test]
    fn overlap_compares_components() {
        for (a, b, want) in [
            ("a/b", "a/b", true),
            ("a", "a/b", true),
            ("a/b/c", "a", true),
            ("a/b", "a/bc", false),
            ("a/bc", "a/b", false),
            ("x", "y", false),
            ("models", "models.bin", false),
        ] {
            assert_eq!(paths_overlap(a, b), want, "{a} vs {b}");
        }
    }

    fn dist(ns: &str, name: &str, uid: &str, created: i64, path: &str) -> Arc<Distribution> {
        let mut d = (*crate::plan::tests::http_dist(name, uid, 1)).clone();
        d.metadata.namespace = Some(ns.into());
        d.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        d.spec.target.path = path.into();
        Arc::new(d)
    }

    #[test]
    fn older_owns_overlapping_paths_and_incumbents_keep_theirs() {
        let a = dist("team-a", "a", "ua", 100, "models/m.bin");
        let b = dist("team-b", "b", "ub", 200, "models/m.bin");
        let c = dist("team-c", "c", "uc", 300, "models");
        let d = dist("team-d", "d", "ud", 50, "other/x");
        let e = dist("team-e", "e", "ue", 400, "models/m.binary");
        let none = BTreeMap::new();
        let got = path_conflicts(&[b.clone(), c.clone(), a.clone(), d, e], &none);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got["ub"].owner, "team-a/a");
        assert_eq!(got["uc"].owner, "team-a/a");
        assert_eq!(got["uc"].path, "models");
        // Ties on time: namespace/name decides.
        let x = dist("ns1", "x", "ux", 100, "p");
        let y = dist("ns0", "y", "uy", 100, "p");
        assert_eq!(
            path_conflicts(&[x.clone(), y.clone()], &none)["ux"].owner,
            "ns0/y"
        );

        // b already holds assignments for its path (a was edited onto it
        // later): b keeps it, a loses.
        let mut fill = NodeFill::new("n1", NodeFillSpec::default());
        fill.spec.distributions.push(Assignment {
            uid: "ub".into(),
            path: "models/m.bin".into(),
            ..Assignment::default()
        });
        let fills = [("n1".to_string(), Arc::new(fill))].into();
        let got = path_conflicts(&[a, b, c], &fills);
        assert_eq!(got["ua"].owner, "team-b/b");
        assert_eq!(got["uc"].owner, "team-b/b");
        assert!(!got.contains_key("ub"));
    }

    #[test]
    fn indexed_lookup_agrees_with_pairwise_overlap() {
        let paths = [
            "a", "a/b", "a/bc", "a/b/c", "a/b/c/d", "b", "ab", "a.b", "a-b/c",
        ];
        for p in paths {
            for q in paths {
                let first = dist("ns", "first", "u1", 1, p);
                let second = dist("ns", "second", "u2", 2, q);
                let got = path_conflicts(&[second, first], &BTreeMap::new());
                assert_eq!(got.contains_key("u2"), paths_overlap(p, q), "{p} then {q}");
                assert!(!got.contains_key("u1"), "{p} then {q}");
            }
        }
    }

    #[test]
    fn seed_paths_count_but_two_seeds_may_share() {
        let seeded = |uid: &str, created: i64, seed: &str, target: &str| {
            let mut d = (*dist("ns", uid, uid, created, target)).clone();
            d.spec.source.http = None;
            d.spec.source.node = Some(NodeSource {
                node_name: "build".into(),
                path: seed.into(),
            });
            Arc::new(d)
        };
        let s1 = seeded("s1", 1, "out/image.tar", "images/one.tar");
        let s2 = seeded("s2", 2, "out/image.tar", "images/two.tar");
        let writer = dist("ns", "w", "w", 3, "out/image.tar");
        let got = path_conflicts(&[s1, s2, writer], &BTreeMap::new());
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got["w"].owner, "ns/s1");
    }

    #[test]
    fn invalid_specs_own_nothing() {
        let a = dist("ns", "a", "ua", 1, "/etc/passwd");
        let b = dist("ns", "b", "ub", 2, "etc/passwd");
        assert!(path_conflicts(&[a, b], &BTreeMap::new()).is_empty());
    }
}
