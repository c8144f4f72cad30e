//! `peerfill-sim` end to end at a small scale: the agent's picker and
//! upload rule over the operator's peer choice, on capped links. Checks the
//! invariants any correct schedule has, never a time.

use peerfill_e2e::sim::{self, Config, Fairness, PeerChoice, report};

const MBIT: f64 = 1e6 / 8.0;

fn small(zones: usize, fairness: Fairness) -> Config {
    let mut cfg = Config::new(20, zones, 16 << 20, 100.0 * MBIT, 300.0 * MBIT);
    cfg.fairness = fairness;
    cfg
}

#[test]
fn twenty_nodes_all_complete_within_the_physics() {
    for (zones, fairness) in [
        (1, Fairness::Local),
        (3, Fairness::Local),
        (3, Fairness::Exact),
    ] {
        let cfg = small(zones, fairness);
        let r = sim::run(&cfg, |_, _, _| {}).expect("every node completes");
        let what = format!("{zones} zone(s), {fairness:?}: {}", r.summary());
        // The content's layout is the agent's: about 4096 pieces, at
        // least 256 KiB.
        assert_eq!(r.piece_size, 256 << 10, "{what}");
        assert_eq!(r.pieces, 64, "{what}");
        // Nothing beats the bound, and the first node is not after the last.
        assert!(r.bound_secs > 0.0 && r.time_over_bound >= 1.0, "{what}");
        assert!(r.first_secs <= r.time_secs, "{what}");
        // The readers read disjoint ranges covering the content: at least
        // one copy leaves the origin (exactly one: nothing fails here).
        assert!(r.origin_copies >= 1.0 - 1e-9, "{what}");
        assert!((r.origin_copies - 1.0).abs() < 1e-6, "{what}");
        // Each node holds a copy and only one came from the origin: the
        // peers uploaded at least N - 1 copies.
        assert!(r.upload_total_copies >= 19.0 - 1e-6, "{what}");
        assert!(r.upload_copies.min >= 0.0, "{what}");
        // Cross-zone bytes: none with one zone, and never more than all of
        // a zone's copies plus the waste.
        assert_eq!(r.cross_zone_per_zone.len(), zones.max(1), "{what}");
        if zones == 1 {
            assert_eq!(r.cross_zone_per_zone, vec![0.0], "{what}");
        }
        for x in &r.cross_zone_per_zone {
            assert!(*x >= 0.0 && *x <= 20.0 / zones as f64 + 1.0, "{what}");
        }
        // Utilization is a share of capacity.
        assert!(
            r.uplink_utilization
                .iter()
                .all(|u| (0.0..=1.0 + 1e-9).contains(u)),
            "{what}"
        );
        assert!(r.uplink_utilization.iter().any(|u| *u > 0.0), "{what}");
    }
}

#[test]
fn the_bound_follows_kumar_ross() {
    // 16 x 64 MiB at 20 Mbit/s (the netbench's validation setup): F / u.
    let cfg = Config::new(16, 1, 64 << 20, 20.0 * MBIT, 20.0 * MBIT);
    let t = report::kumar_ross_secs(&cfg);
    assert!((t - (64 << 20) as f64 / (20.0 * MBIT)).abs() < 1e-9);
    // A slow origin dominates.
    let mut slow = cfg.clone();
    slow.origin = 2.0 * MBIT;
    assert!((report::kumar_ross_secs(&slow) - (64 << 20) as f64 / (2.0 * MBIT)).abs() < 1e-9);
}

#[test]
fn a_larger_swarm_with_bounded_peer_lists_completes() {
    // Beyond 65 nodes the lists are bounded (ring and chords); with
    // `Bounded` even the readers' are, as after hash relay.
    for peers in [PeerChoice::Operator, PeerChoice::Bounded] {
        let mut cfg = Config::new(90, 3, 8 << 20, 100.0 * MBIT, 300.0 * MBIT);
        cfg.peers = peers;
        let r = sim::run(&cfg, |_, _, _| {}).expect("every node completes");
        assert!(r.time_over_bound >= 1.0, "{peers:?}: {}", r.summary());
        assert!((r.origin_copies - 1.0).abs() < 1e-6, "{peers:?}");
    }
}
