//! Per-distribution caps and priority, measured on real agent processes on
//! loopback: three agents hold two contents each.
//! - Caps: download caps of 4 and 8 MiB/s; every node receives each
//!   content at its cap (±20 %), peers and origin together.
//! - Priority: no caps, a node-wide download limit of 8 MiB/s; the
//!   higher-priority content gets most of every node's bytes while it is
//!   incomplete, and completes first everywhere.
//!
//! Rates are bytes received (status files, written every 500 ms) over a
//! window of the transfer; no assertion is on how long the test took.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use peerfill_agent::agent::{AgentConfig, ContentCaps, ContentStatus, Phase};

const MIB: u64 = 1 << 20;
const AGENTS: usize = 3;
const BOUND: Duration = Duration::from_secs(120);

/// One content of the test: id, size, caps, and its origin reader's index.
struct Content {
    id: &'static str,
    size: usize,
    caps: ContentCaps,
    reader: usize,
}

/// Starts an origin per content and one agent per node holding them all.
async fn swarm(
    root: &Path,
    contents: &[Content],
    node_limit: Option<u64>,
) -> (Vec<Agent>, Vec<Origin>, Vec<String>) {
    let (nodes, certs) = nodes_with_identities(root, AGENTS);
    let mut origins = Vec::new();
    let mut digests = Vec::new();
    for (i, c) in contents.iter().enumerate() {
        let data = Arc::new(random_bytes(c.size, 40 + i as u64));
        digests.push(blake3::hash(&data).to_hex().to_string());
        origins.push(Origin::start(data).await);
    }
    let agents = nodes
        .iter()
        .map(|n| {
            let mut cfg: Option<AgentConfig> = None;
            for (c, o) in contents.iter().zip(&origins) {
                let mut one = http_config(
                    n,
                    &nodes,
                    &certs,
                    c.id,
                    &o.url(),
                    std::slice::from_ref(&nodes[c.reader].name),
                    None,
                );
                one.contents[0].piece_size = MIB as u32;
                one.contents[0].caps = c.caps;
                match &mut cfg {
                    None => cfg = Some(one),
                    Some(cfg) => cfg.contents.extend(one.contents),
                }
            }
            let mut cfg = cfg.expect("at least one content");
            // Keep serving after completing, so every node's peers stay.
            cfg.stay = true;
            cfg.limits.download_bytes_per_sec = node_limit;
            Agent::spawn(n, &cfg)
        })
        .collect();
    (agents, origins, digests)
}

fn received(s: &ContentStatus) -> u64 {
    s.bytes_from_origin + s.bytes_from_peers
}

fn complete(a: &Agent, id: &str) -> bool {
    a.status(id).is_some_and(|s| s.phase == Phase::Complete)
}

/// Waits until every agent holds every content, then checks the bytes.
async fn check_all_complete(agents: &[Agent], contents: &[Content], digests: &[String]) {
    let done = wait_until(BOUND, || {
        agents
            .iter()
            .all(|a| contents.iter().all(|c| complete(a, c.id)))
    })
    .await;
    for a in agents {
        for (c, want) in contents.iter().zip(digests) {
            assert!(
                done,
                "{} {}: {:?}\n{}",
                a.node.name,
                c.id,
                a.status(c.id),
                a.log_tail()
            );
            assert_eq!(
                file_blake3(&a.dest(c.id)).as_deref(),
                Some(want.as_str()),
                "{} has wrong bytes of {}",
                a.node.name,
                c.id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_caps_hold_per_distribution_on_every_node() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cap = |mib: u64| ContentCaps {
        download_bytes_per_sec: Some(mib * MIB),
        ..ContentCaps::default()
    };
    // 12 s of transfer each; different readers, so each node both reads
    // from the origin and fetches from peers.
    let contents = [
        Content {
            id: "capped-4",
            size: 48 << 20,
            caps: cap(4),
            reader: 0,
        },
        Content {
            id: "capped-8",
            size: 96 << 20,
            caps: cap(8),
            reader: 1,
        },
    ];
    let (agents, _origins, digests) = swarm(tmp.path(), &contents, None).await;

    // Window: from 2 s into the transfer (past the initial burst) for 6 s.
    let started = wait_until(BOUND, || {
        agents.iter().all(|a| {
            contents
                .iter()
                .all(|c| a.status(c.id).is_some_and(|s| received(&s) > 0))
        })
    })
    .await;
    assert!(started, "the transfer did not start");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sample = || -> Vec<Vec<u64>> {
        agents
            .iter()
            .map(|a| {
                contents
                    .iter()
                    .map(|c| a.status(c.id).map_or(0, |s| received(&s)))
                    .collect()
            })
            .collect()
    };
    let (t0, before) = (Instant::now(), sample());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (secs, after) = (t0.elapsed().as_secs_f64(), sample());

    for (i, a) in agents.iter().enumerate() {
        for (j, c) in contents.iter().enumerate() {
            let rate = (after[i][j] - before[i][j]) as f64 / secs;
            let want = c.caps.download_bytes_per_sec.expect("cap") as f64;
            eprintln!(
                "{} {}: {:.2} MiB/s (cap {:.0} MiB/s, {:.0} %)",
                a.node.name,
                c.id,
                rate / MIB as f64,
                want / MIB as f64,
                100.0 * rate / want
            );
            assert!(
                (0.8 * want..=1.2 * want).contains(&rate),
                "{} {}: {rate} B/s against a cap of {want} B/s",
                a.node.name,
                c.id
            );
        }
    }
    check_all_complete(&agents, &contents, &digests).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_higher_priority_gets_the_node_bandwidth_first() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let prio = |p: i32| ContentCaps {
        priority: p,
        ..ContentCaps::default()
    };
    let contents = [
        Content {
            id: "low",
            size: 32 << 20,
            caps: prio(0),
            reader: 1,
        },
        Content {
            id: "high",
            size: 32 << 20,
            caps: prio(10),
            reader: 0,
        },
    ];
    let (agents, _origins, digests) = swarm(tmp.path(), &contents, Some(8 * MIB)).await;

    // Until the first node completes the high one: what each node got.
    let mut last: Vec<(u64, u64)> = vec![(0, 0); AGENTS];
    let high_done = wait_until(BOUND, || {
        for (i, a) in agents.iter().enumerate() {
            if let (Some(l), Some(h)) = (a.status("low"), a.status("high")) {
                last[i] = (received(&l), received(&h));
            }
        }
        agents.iter().any(|a| complete(a, "high"))
    })
    .await;
    assert!(high_done, "the high-priority content did not complete");
    let (low, high): (u64, u64) = last
        .iter()
        .fold((0, 0), |(l, h), (li, hi)| (l + li, h + hi));
    let share = high as f64 / (low + high).max(1) as f64;
    eprintln!(
        "until the first node completed the high-priority content: high {:.1} MiB, low {:.1} MiB, high's share {:.0} %",
        high as f64 / MIB as f64,
        low as f64 / MIB as f64,
        100.0 * share
    );
    for (a, (l, h)) in agents.iter().zip(&last) {
        eprintln!(
            "  {}: high {:.1} MiB, low {:.1} MiB",
            a.node.name,
            *h as f64 / MIB as f64,
            *l as f64 / MIB as f64
        );
    }
    // Without priority the two would share about evenly.
    assert!(share >= 0.75, "high's share {share}");

    // And it completes first on every node.
    let all_high = wait_until(BOUND, || agents.iter().all(|a| complete(a, "high"))).await;
    assert!(all_high, "high did not complete everywhere");
    for a in &agents {
        let low = a.status("low").expect("status");
        assert!(
            low.phase != Phase::Complete,
            "{}: the low-priority content completed no later than the high one: {low:?}",
            a.node.name
        );
    }
    check_all_complete(&agents, &contents, &digests).await;
}
