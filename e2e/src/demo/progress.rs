//! Live progress of one Distribution, read from the API only: the
//! Distribution's status (written by the operator) and every NodeFill's
//! status entry for it (written by that node's agent). On a terminal: one
//! indicatif bar per node plus the Distribution line; otherwise (CI, a pipe)
//! plain lines every few seconds.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use peerfill_crds::{Distribution, NodeFill, NodePhase};

use super::units::{bytes, mib_per_s};

/// One node's progress on the Distribution being watched.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeProgress {
    /// Node name.
    pub node: String,
    /// `Pending` until the agent reports the distribution.
    pub phase: String,
    /// Verified bytes on disk.
    pub bytes_done: u64,
    /// Content size, once known.
    pub size: Option<u64>,
    /// Current download rate the agent reports.
    pub bytes_per_second: u64,
    /// Bytes from the origin so far.
    pub from_origin: u64,
    /// Bytes from peers so far.
    pub from_peers: u64,
    /// Whole-content digest the agent computed, once complete.
    pub digest: Option<String>,
    /// Reason of the last transition (e.g. `WaitingForSize`).
    pub reason: Option<String>,
}

/// The Distribution line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DistributionProgress {
    /// `Pending`, `Progressing`, `Complete`, `Failed`, or `-` before the
    /// operator wrote a phase.
    pub phase: String,
    /// `complete/desired`.
    pub ready: String,
    /// Percentage as the operator wrote it.
    pub progress: String,
    /// Aggregate rate as the operator wrote it.
    pub throughput: String,
    /// The operator's message of the deciding condition, if any.
    pub message: Option<String>,
}

/// Everything shown at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The Distribution line.
    pub distribution: DistributionProgress,
    /// One entry per node named in `nodes`, in that order.
    pub nodes: Vec<NodeProgress>,
}

impl Snapshot {
    /// Reads the progress of Distribution `uid` on `nodes` (the nodes of the
    /// demo cluster, in display order) from the observed objects. A node
    /// without a NodeFill or without an entry for `uid` shows as `Pending`.
    pub fn from_objects(
        dist: Option<&Distribution>,
        uid: &str,
        nodes: &[String],
        fills: &[NodeFill],
    ) -> Snapshot {
        let by_node: BTreeMap<&str, &NodeFill> = fills
            .iter()
            .filter_map(|f| Some((f.metadata.name.as_deref()?, f)))
            .collect();
        let nodes = nodes
            .iter()
            .map(|node| {
                let entry = by_node
                    .get(node.as_str())
                    .and_then(|f| f.status.as_ref())
                    .and_then(|s| s.distributions.iter().find(|d| d.uid == uid));
                match entry {
                    Some(d) => NodeProgress {
                        node: node.clone(),
                        phase: d.phase.as_str().to_owned(),
                        bytes_done: d.bytes_done,
                        size: d.size,
                        bytes_per_second: if d.phase == NodePhase::Complete {
                            0
                        } else {
                            d.bytes_per_second
                        },
                        from_origin: d.bytes_from_origin,
                        from_peers: d.bytes_from_peers,
                        digest: d.digest.clone(),
                        reason: d.reason.clone(),
                    },
                    None => NodeProgress {
                        node: node.clone(),
                        phase: NodePhase::Pending.as_str().to_owned(),
                        bytes_done: 0,
                        size: None,
                        bytes_per_second: 0,
                        from_origin: 0,
                        from_peers: 0,
                        digest: None,
                        reason: None,
                    },
                }
            })
            .collect();
        let status = dist.and_then(|d| d.status.as_ref());
        let distribution = DistributionProgress {
            phase: status
                .and_then(|s| s.phase)
                .map_or("-".to_owned(), |p| p.as_str().to_owned()),
            ready: status
                .and_then(|s| s.ready.clone())
                .unwrap_or_else(|| "-".into()),
            progress: status
                .and_then(|s| s.progress.clone())
                .unwrap_or_else(|| "-".into()),
            throughput: status
                .and_then(|s| s.throughput.clone())
                .unwrap_or_else(|| "-".into()),
            // The condition that explains the phase: Failed beats Progressing.
            message: status.and_then(|s| {
                ["Failed", "Progressing"].iter().find_map(|t| {
                    s.conditions
                        .iter()
                        .find(|c| c.type_ == *t && c.status == "True" && !c.message.is_empty())
                        .map(|c| c.message.clone())
                })
            }),
        };
        Snapshot {
            distribution,
            nodes,
        }
    }

    /// The Distribution line, e.g. `model-weights  Progressing  3/8  45%  812 MiB/s`.
    pub fn distribution_line(&self, name: &str) -> String {
        let d = &self.distribution;
        let mut line = format!(
            "{name}  phase {}  ready {}  progress {}  throughput {}",
            d.phase, d.ready, d.progress, d.throughput
        );
        if let Some(m) = &d.message {
            line.push_str("  (");
            line.push_str(m);
            line.push(')');
        }
        line
    }
}

impl NodeProgress {
    /// Percent done, when the size is known.
    fn percent(&self) -> Option<f64> {
        match self.size {
            Some(0) => Some(100.0),
            Some(size) => Some(100.0 * self.bytes_done as f64 / size as f64),
            None => None,
        }
    }

    /// What a bar shows after its byte counts: phase, rate, origin/peer split.
    fn detail(&self) -> String {
        let mut s = format!(
            "{:<11} {:>11}  origin {:>9}  peers {:>9}",
            self.phase,
            mib_per_s(self.bytes_per_second as f64),
            bytes(self.from_origin),
            bytes(self.from_peers)
        );
        if self.phase != NodePhase::Complete.as_str()
            && let Some(r) = &self.reason
        {
            s.push_str("  ");
            s.push_str(r);
        }
        s
    }

    /// A compact form for plain lines: `node-1 Downloading 42%`.
    fn compact(&self) -> String {
        match self.percent() {
            Some(p) => format!("{} {} {p:.0}%", self.node, self.phase),
            None => format!("{} {}", self.node, self.phase),
        }
    }
}

/// Shows snapshots on a terminal (bars) or as plain lines.
pub enum Display {
    /// indicatif bars: the Distribution line, then one bar per node.
    Bars {
        /// Owner of the bars.
        multi: MultiProgress,
        /// The Distribution line.
        header: ProgressBar,
        /// One per node, in snapshot order.
        bars: Vec<ProgressBar>,
        /// Distribution name, for the header.
        name: String,
    },
    /// Plain lines every `every`.
    Plain {
        /// Distribution name, for the lines.
        name: String,
        /// Start of the watch, for the elapsed time in each line.
        started: Instant,
        /// When the last line was printed.
        last: Option<Instant>,
        /// Interval between lines.
        every: Duration,
        /// The last snapshot printed, to skip repeating an unchanged one.
        printed: Option<Snapshot>,
    },
}

impl Display {
    /// Bars when `terminal`, else plain lines every `every`. `size` is the
    /// expected content size, the bars' length until a node reports one.
    pub fn new(
        name: &str,
        nodes: &[String],
        size: u64,
        terminal: bool,
        every: Duration,
    ) -> Display {
        if !terminal {
            return Display::Plain {
                name: name.to_owned(),
                started: Instant::now(),
                last: None,
                every,
                printed: None,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(10));
        let header = multi.add(ProgressBar::new_spinner());
        header.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        header.enable_steady_tick(Duration::from_millis(200));
        let style = ProgressStyle::with_template(
            // wide_msg is cut to the terminal width, so a line never wraps.
            "  {prefix} [{bar:16.cyan/blue}] {bytes:>9}/{total_bytes:<9} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let width = nodes.iter().map(String::len).max().unwrap_or(0);
        let bars = nodes
            .iter()
            .map(|node| {
                let bar = multi.add(ProgressBar::new(size));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{node:<width$}"));
                bar
            })
            .collect();
        Display::Bars {
            multi,
            header,
            bars,
            name: name.to_owned(),
        }
    }

    /// Shows `snap` (plain mode prints only every `every`, and only when
    /// something changed).
    pub fn update(&mut self, snap: &Snapshot) {
        match self {
            Display::Bars {
                header, bars, name, ..
            } => {
                header.set_message(snap.distribution_line(name));
                for (bar, node) in bars.iter().zip(&snap.nodes) {
                    if let Some(size) = node.size {
                        bar.set_length(size);
                    }
                    bar.set_position(node.bytes_done);
                    bar.set_message(node.detail());
                }
            }
            Display::Plain {
                name,
                started,
                last,
                every,
                printed,
            } => {
                let due = last.is_none_or(|t| t.elapsed() >= *every);
                if !due || printed.as_ref() == Some(snap) {
                    return;
                }
                *last = Some(Instant::now());
                *printed = Some(snap.clone());
                let nodes: Vec<String> = snap.nodes.iter().map(NodeProgress::compact).collect();
                let mut out = std::io::stdout().lock();
                // A closed stdout must not stop the demo; the summary is
                // written the same way.
                let _ = writeln!(
                    out,
                    "[{:>6.1}s] {}\n          {}",
                    started.elapsed().as_secs_f64(),
                    snap.distribution_line(name),
                    nodes.join(", ")
                );
            }
        }
    }

    /// Prints a line above the bars (or plainly).
    pub fn println(&self, line: &str) {
        match self {
            Display::Bars { multi, .. } => {
                if multi.println(line).is_err() {
                    println!("{line}");
                }
            }
            Display::Plain { .. } => println!("{line}"),
        }
    }

    /// Leaves the final state of the bars on screen and stops drawing.
    pub fn finish(&mut self, last: &Snapshot) {
        if let Display::Plain { last: when, .. } = self {
            // Always print the final state.
            *when = None;
        }
        self.update(last);
        if let Display::Bars { header, bars, .. } = self {
            header.finish();
            bars.iter().for_each(ProgressBar::finish);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerfill_crds::{
        DistributionStatus, NodeDistributionStatus, NodeFillSpec, NodeFillStatus, Phase,
    };

    fn fill(node: &str, entries: Vec<NodeDistributionStatus>) -> NodeFill {
        let mut f = NodeFill::new(node, NodeFillSpec::default());
        f.status = Some(NodeFillStatus {
            distributions: entries,
            ..NodeFillStatus::default()
        });
        f
    }

    fn entry(uid: &str, phase: NodePhase, done: u64) -> NodeDistributionStatus {
        NodeDistributionStatus {
            namespace: "default".into(),
            name: "d".into(),
            uid: uid.into(),
            phase,
            bytes_done: done,
            content_id: None,
            root: None,
            origin_version: None,
            size: Some(1000),
            files: None,
            pieces_done: 0,
            piece_count: 0,
            bytes_from_origin: 100,
            bytes_from_peers: done.saturating_sub(100),
            bytes_per_second: 50,
            manifest_digest: None,
            digest: None,
            reason: None,
            message: None,
            last_transition_time: None,
        }
    }

    #[test]
    fn snapshot_reads_only_the_watched_uid_and_keeps_node_order() {
        let nodes = vec!["n2".to_owned(), "n1".to_owned(), "n3".to_owned()];
        let fills = vec![
            fill(
                "n1",
                vec![
                    entry("other", NodePhase::Complete, 1000),
                    entry("u", NodePhase::Downloading, 400),
                ],
            ),
            fill("n2", vec![entry("u", NodePhase::Complete, 1000)]),
            // n3 has a NodeFill but nothing for `u` yet.
            fill("n3", vec![entry("other", NodePhase::Downloading, 10)]),
        ];
        let mut dist = Distribution::new(
            "d",
            serde_json::from_value(serde_json::json!({
                "source": {"http": {"url": "http://127.0.0.1:1/a"}},
                "target": {"path": "a"}
            }))
            .expect("spec"),
        );
        dist.status = Some(DistributionStatus {
            phase: Some(Phase::Progressing),
            ready: Some("1/3".into()),
            progress: Some("47%".into()),
            throughput: Some("1 MiB/s".into()),
            ..DistributionStatus::default()
        });
        let snap = Snapshot::from_objects(Some(&dist), "u", &nodes, &fills);
        let names: Vec<&str> = snap.nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(names, ["n2", "n1", "n3"]);
        assert_eq!(snap.nodes[0].phase, "Complete");
        // A complete node no longer downloads, whatever rate it last wrote.
        assert_eq!(snap.nodes[0].bytes_per_second, 0);
        assert_eq!(snap.nodes[1].phase, "Downloading");
        assert_eq!(snap.nodes[1].bytes_done, 400);
        assert_eq!(snap.nodes[1].from_peers, 300);
        assert_eq!(snap.nodes[2].phase, "Pending");
        assert_eq!(snap.nodes[2].size, None);
        assert_eq!(
            snap.distribution_line("d"),
            "d  phase Progressing  ready 1/3  progress 47%  throughput 1 MiB/s"
        );
        assert_eq!(snap.nodes[1].compact(), "n1 Downloading 40%");
        assert_eq!(snap.nodes[2].compact(), "n3 Pending");
    }

    #[test]
    fn no_distribution_status_yet_shows_dashes() {
        let snap = Snapshot::from_objects(None, "u", &["a".to_owned()], &[]);
        assert_eq!(
            snap.distribution_line("d"),
            "d  phase -  ready -  progress -  throughput -"
        );
        assert_eq!(snap.nodes[0].phase, "Pending");
    }
}
