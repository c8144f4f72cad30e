//! The closing summary: what the run moved, from where, and how that
//! compares with one server sending every node its own copy.
//!
//! Everything here is computed from figures the run measured; nothing is
//! assumed. The client-server comparison uses this run's own origin rate
//! (bytes the origin served over the time it was serving), so it says what
//! the same origin would have needed to send N copies itself. With the
//! origin capped (the demo's default, like a WAN link or an object store)
//! the cap gives the one-server lower bound N x size / cap, printed next to
//! the swarm's time; `--measure-baseline` adds a measured one.

use std::path::PathBuf;
use std::time::Duration;

use super::baseline::Baseline;
use super::units::{bytes, mib_per_s};

/// What one node reported and what the demo found on its disk.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeFigures {
    /// Node name.
    pub node: String,
    /// Bytes this node received from the origin (its NodeFill status).
    pub from_origin: u64,
    /// Bytes this node received from peers (its NodeFill status).
    pub from_peers: u64,
    /// Where the file is.
    pub path: PathBuf,
    /// Whether the file on disk hashes to the expected digest.
    pub verified: bool,
}

/// The measured figures of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunFigures {
    /// Artifact size in bytes.
    pub size: u64,
    /// From `kubectl apply` (the create) to the Distribution's `Complete`.
    pub wall: Duration,
    /// Body bytes the HTTP origin sent, counted by the origin server.
    pub origin_served: u64,
    /// How long the origin was sending: first to last byte it served.
    pub origin_busy: Duration,
    /// Expected digest of the artifact (`blake3:<hex>`).
    pub digest: String,
    /// One entry per target node.
    pub nodes: Vec<NodeFigures>,
    /// The origin's rate cap, bytes per second (`None`: uncapped).
    pub origin_cap: Option<u64>,
    /// N plain HTTP clients against the same origin, if measured.
    pub baseline: Option<Baseline>,
}

/// Figures derived from [`RunFigures`].
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Nodes that got the artifact.
    pub nodes: usize,
    /// `nodes × size`.
    pub delivered: u64,
    /// `delivered / wall`, bytes per second.
    pub aggregate_rate: f64,
    /// Sum of the nodes' bytes from the origin.
    pub nodes_from_origin: u64,
    /// Sum of the nodes' bytes from peers.
    pub nodes_from_peers: u64,
    /// Origin bytes served over the artifact size.
    pub origin_copies: f64,
    /// The origin's own rate in this run: served bytes over busy time.
    pub origin_rate: f64,
    /// Time one server at `origin_rate` needs for `nodes` copies.
    pub client_server: Duration,
    /// `client_server / wall`.
    pub speedup: f64,
    /// Nodes whose file hashed to the digest.
    pub verified: usize,
}

impl RunFigures {
    /// Derives the summary. Rates of a zero-length interval count as 0.
    pub fn summarize(&self) -> Summary {
        let nodes = self.nodes.len();
        let delivered = self.size.saturating_mul(nodes as u64);
        let per_second = |b: u64, d: Duration| {
            let s = d.as_secs_f64();
            if s > 0.0 { b as f64 / s } else { 0.0 }
        };
        let origin_rate = per_second(self.origin_served, self.origin_busy);
        let client_server = if origin_rate > 0.0 {
            Duration::from_secs_f64(delivered as f64 / origin_rate)
        } else {
            Duration::ZERO
        };
        let wall = self.wall.as_secs_f64();
        Summary {
            nodes,
            delivered,
            aggregate_rate: per_second(delivered, self.wall),
            nodes_from_origin: self.nodes.iter().map(|n| n.from_origin).sum(),
            nodes_from_peers: self.nodes.iter().map(|n| n.from_peers).sum(),
            origin_copies: if self.size > 0 {
                self.origin_served as f64 / self.size as f64
            } else {
                0.0
            },
            origin_rate,
            client_server,
            speedup: if wall > 0.0 {
                client_server.as_secs_f64() / wall
            } else {
                0.0
            },
            verified: self.nodes.iter().filter(|n| n.verified).count(),
        }
    }

    /// The summary as printed at the end of the demo, one line per figure.
    pub fn render(&self) -> Vec<String> {
        let s = self.summarize();
        let received = s.nodes_from_origin + s.nodes_from_peers;
        let share = |part: u64| {
            if received > 0 {
                100.0 * part as f64 / received as f64
            } else {
                0.0
            }
        };
        let mut lines = vec![
            "Summary".to_owned(),
            format!(
                "  wall time (apply -> Complete): {:.1} s",
                self.wall.as_secs_f64()
            ),
            format!(
                "  delivered:                     {} nodes x {} = {}, aggregate {}",
                s.nodes,
                bytes(self.size),
                bytes(s.delivered),
                mib_per_s(s.aggregate_rate)
            ),
            format!(
                "  nodes received from origin:    {} ({:.1}%)",
                bytes(s.nodes_from_origin),
                share(s.nodes_from_origin)
            ),
            format!(
                "  nodes received from peers:     {} ({:.1}%)",
                bytes(s.nodes_from_peers),
                share(s.nodes_from_peers)
            ),
            format!(
                "  origin server sent:            {} = {:.2} copies, in {:.1} s at {} (this run's origin rate)",
                bytes(self.origin_served),
                s.origin_copies,
                self.origin_busy.as_secs_f64(),
                mib_per_s(s.origin_rate)
            ),
        ];
        if s.origin_rate > 0.0 {
            lines.push(format!(
                "  one server at this run's origin rate {} would need {} x {} / {} = {:.1} s",
                mib_per_s(s.origin_rate),
                s.nodes,
                bytes(self.size),
                mib_per_s(s.origin_rate),
                s.client_server.as_secs_f64()
            ));
            lines.push(format!(
                "  speed-up over one server (computed, not measured): {:.1} s / {:.1} s = {:.1}x",
                s.client_server.as_secs_f64(),
                self.wall.as_secs_f64(),
                s.speedup
            ));
        }
        let swarm = self.wall.as_secs_f64();
        if let Some(cap) = self.origin_cap.filter(|c| *c > 0) {
            let one_server = s.delivered as f64 / cap as f64;
            lines.push(format!(
                "  one server capped at {} needs at least {} x {} / {} = {:.1} s; the swarm took {:.1} s ({:.1}x)",
                mib_per_s(cap as f64),
                s.nodes,
                bytes(self.size),
                mib_per_s(cap as f64),
                one_server,
                swarm,
                if swarm > 0.0 { one_server / swarm } else { 0.0 }
            ));
        }
        if let Some(b) = &self.baseline {
            let t = b.wall.as_secs_f64();
            lines.push(format!(
                "  measured: {} plain HTTP clients at once from the same origin took {:.1} s ({} verified); the swarm took {:.1} s ({:.1}x)",
                b.clients,
                t,
                bytes(b.bytes),
                swarm,
                if swarm > 0.0 { t / swarm } else { 0.0 }
            ));
        }
        lines.push(format!(
            "  files: {}/{} verified against {}",
            s.verified, s.nodes, self.digest
        ));
        for node in &self.nodes {
            lines.push(format!(
                "    {:<10} {} {}",
                node.node,
                if node.verified { "ok  " } else { "BAD " },
                node.path.display()
            ));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn run() -> RunFigures {
        RunFigures {
            size: GIB,
            wall: Duration::from_secs(10),
            origin_served: GIB,
            origin_busy: Duration::from_secs(4),
            digest: "blake3:00".into(),
            nodes: (0..8)
                .map(|i| NodeFigures {
                    node: format!("node-{i}"),
                    from_origin: GIB / 8,
                    from_peers: GIB - GIB / 8,
                    path: PathBuf::from(format!("/w/node-{i}/f")),
                    verified: i != 3,
                })
                .collect(),
            origin_cap: None,
            baseline: None,
        }
    }

    #[test]
    fn figures_follow_from_the_measurements() {
        let s = run().summarize();
        assert_eq!(s.nodes, 8);
        assert_eq!(s.delivered, 8 * GIB);
        assert_eq!(s.nodes_from_origin, GIB);
        assert_eq!(s.nodes_from_peers, 7 * GIB);
        assert!((s.origin_copies - 1.0).abs() < 1e-9);
        // The origin sent 1 GiB in 4 s: 256 MiB/s; 8 GiB at that rate take
        // 32 s, against the 10 s the swarm took.
        assert!((s.origin_rate - 256.0 * 1024.0 * 1024.0).abs() < 1e-3);
        assert!((s.client_server.as_secs_f64() - 32.0).abs() < 1e-9);
        assert!((s.speedup - 3.2).abs() < 1e-9);
        assert!((s.aggregate_rate - 8.0 * GIB as f64 / 10.0).abs() < 1e-3);
        assert_eq!(s.verified, 7);
    }

    #[test]
    fn rendering_names_the_method_and_every_node() {
        let lines = run().render();
        let text = lines.join("\n");
        assert!(
            text.contains("wall time (apply -> Complete): 10.0 s"),
            "{text}"
        );
        assert!(text.contains("8 nodes x 1.00 GiB = 8.00 GiB"), "{text}");
        assert!(
            text.contains(
                "one server at this run's origin rate 256.0 MiB/s would need 8 x 1.00 GiB / 256.0 MiB/s = 32.0 s"
            ),
            "{text}"
        );
        assert!(text.contains("= 3.2x"), "{text}");
        assert!(
            text.contains("files: 7/8 verified against blake3:00"),
            "{text}"
        );
        assert!(text.contains("node-3     BAD  /w/node-3/f"), "{text}");
        assert_eq!(lines.iter().filter(|l| l.contains("/w/node-")).count(), 8);
    }

    #[test]
    fn idle_origin_gives_no_comparison_instead_of_dividing_by_zero() {
        let mut r = run();
        r.origin_served = 0;
        r.origin_busy = Duration::ZERO;
        let s = r.summarize();
        assert_eq!(s.origin_rate, 0.0);
        assert_eq!(s.client_server, Duration::ZERO);
        assert!(!r.render().iter().any(|l| l.contains("one server")));
    }

    #[test]
    fn the_cap_and_the_measured_baseline_sit_next_to_the_swarm() {
        let mut r = run();
        r.origin_cap = Some(100 << 20);
        r.baseline = Some(Baseline {
            clients: 8,
            wall: Duration::from_secs(90),
            per_client: vec![Duration::from_secs(90); 8],
            bytes: 8 * GIB,
        });
        let text = r.render().join("\n");
        // 8 GiB at 100 MiB/s: 81.92 s, against the swarm's 10 s.
        assert!(
            text.contains(
                "one server capped at 100.0 MiB/s needs at least 8 x 1.00 GiB / 100.0 MiB/s = 81.9 s; the swarm took 10.0 s (8.2x)"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "measured: 8 plain HTTP clients at once from the same origin took 90.0 s (8.00 GiB verified); the swarm took 10.0 s (9.0x)"
            ),
            "{text}"
        );
        assert!(!run().render().join("\n").contains("capped at"));
    }
}
