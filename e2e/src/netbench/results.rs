//! The results of the issue-15 sweeps (one JSON file: runs and memory runs,
//! each with its label), their `BENCHMARKS.md` section and plots: time / T*
//! against N per label and link rate, and uplink utilization over time at
//! N = 16.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::Result;
use super::memory::MemoryResult;
use super::report::{
    Machine, finish_plot, marked_series, plot_err, reference_line, register_font, size_label,
};
use super::scenario::RunResult;

/// The results JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Results {
    pub machine: Machine,
    #[serde(default)]
    pub runs: Vec<RunResult>,
    #[serde(default)]
    pub memory: Vec<MemoryResult>,
}

/// What makes two runs the same measurement (a rerun replaces the older).
fn run_key(r: &RunResult) -> (String, usize, u64, u64, u64, u32) {
    (
        r.meta.label.clone(),
        r.nodes,
        r.size,
        r.node_mbit.to_bits(),
        r.origin_mbit.to_bits(),
        r.piece_size,
    )
}

impl Results {
    pub fn new(machine: Machine) -> Results {
        Results {
            machine,
            runs: Vec::new(),
            memory: Vec::new(),
        }
    }

    /// Adds a run, replacing one with the same label, N, size, caps and
    /// piece size.
    pub fn add_run(&mut self, r: RunResult) {
        let key = run_key(&r);
        self.runs.retain(|o| run_key(o) != key);
        self.runs.push(r);
    }

    /// Adds a memory run, replacing one with the same label and shape.
    pub fn add_memory(&mut self, m: MemoryResult) {
        let key = |x: &MemoryResult| (x.meta.label.clone(), x.size, x.seeders, x.receivers);
        let k = key(&m);
        self.memory.retain(|o| key(o) != k);
        self.memory.push(m);
    }

    /// Labels in the order they first appear.
    pub fn labels(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let all = self
            .runs
            .iter()
            .map(|r| &r.meta.label)
            .chain(self.memory.iter().map(|m| &m.meta.label));
        for l in all {
            if !out.contains(l) {
                out.push(l.clone());
            }
        }
        out
    }

    /// Node link rates measured, ascending (Mbit/s).
    fn rates(&self) -> Vec<f64> {
        let set: BTreeSet<u64> = self.runs.iter().map(|r| r.node_mbit.to_bits()).collect();
        let mut v: Vec<f64> = set.into_iter().map(f64::from_bits).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Runs sorted by rate, size, N, then label order.
    fn sorted_runs(&self) -> Vec<&RunResult> {
        let labels = self.labels();
        let pos = |l: &str| labels.iter().position(|x| x == l).unwrap_or(usize::MAX);
        let mut v: Vec<&RunResult> = self.runs.iter().collect();
        v.sort_by(|a, b| {
            a.node_mbit
                .total_cmp(&b.node_mbit)
                .then(b.size.cmp(&a.size))
                .then(a.nodes.cmp(&b.nodes))
                .then(pos(&a.meta.label).cmp(&pos(&b.meta.label)))
        });
        v
    }

    fn find(&self, label: &str, rate: f64, nodes: usize, size: u64) -> Option<&RunResult> {
        self.runs.iter().find(|r| {
            r.meta.label == label && r.node_mbit == rate && r.nodes == nodes && r.size == size
        })
    }
}

/// Peerfill figures derived for the tables.
struct Derived {
    last: f64,
    first: f64,
    origin_copies: f64,
    origin_link_copies: f64,
}

fn derive(r: &RunResult) -> Derived {
    let p = &r.peerfill;
    Derived {
        last: p.time_secs / r.bound_secs,
        first: p.first_secs / r.bound_secs,
        origin_copies: p.origin_body_bytes as f64 / r.size as f64,
        origin_link_copies: p.origin_link_bytes as f64 / r.size as f64,
    }
}

/// The agents' CPU seconds over (wall time × cores) of the peerfill run:
/// how much of the machine the swarm itself used.
fn agents_share(r: &RunResult, cores: usize) -> f64 {
    let p = &r.peerfill;
    let cpu = p.cpu_secs_per_gib_per_node * r.nodes as f64 * r.size as f64 / (1u64 << 30) as f64;
    let capacity = p.time_secs * cores as f64;
    if capacity > 0.0 { cpu / capacity } else { 0.0 }
}

fn short_hash(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Paths of the generated files, relative to the markdown.
pub struct Links<'a> {
    pub results: &'a str,
    pub ratio_plot: &'a str,
    pub util_plot: &'a str,
}

/// The issue-15 part of `BENCHMARKS.md`.
/// How the section [`markdown`] writes begins.
pub const SECTION: &str = "## The swarm at the bound (issue 15)";

/// What other tools wrote between the title of an existing BENCHMARKS.md
/// and this report's section (`peerfill-scale`'s results, say): kept when
/// the report is rendered again.
pub fn sections_above(existing: &str) -> &str {
    let body = existing.strip_prefix("# Benchmarks\n\n").unwrap_or("");
    body.find(SECTION).map_or("", |i| &body[..i])
}

pub fn markdown(res: &Results, links: &Links<'_>, analysis: Option<&str>) -> String {
    let mut s = String::new();
    let m = &res.machine;
    let _ = writeln!(s, "{SECTION}: sweeps at 20 and 100 Mbit/s\n");
    let _ = writeln!(
        s,
        "Generated by `peerfill-netbench` from [`{}`]({}) (every run, with its per-second link \
         counters). Machine: {}, {} cores, {:.0} GiB, Linux {}. How to rerun: \
         `e2e/netbench/README.md`. Each run's label says which agent was measured (`before` = \
         the agent of `main` before issue 15, `after` = with it); the table gives its BLAKE3.\n",
        links.results, links.results, m.cpu, m.cores, m.mem_gib, m.kernel
    );
    if let Some(r) = res.runs.first() {
        let delay = if res.runs.iter().all(|r| r.delay_emulated) {
            format!("{} ms one-way delay (netem) on each uplink", r.delay_ms)
        } else {
            "**no delay**: this kernel has no `sch_netem`, so links are rate-capped only \
             (round trips come from queueing in the links' 256 KiB FIFOs and CPU scheduling)"
                .to_string()
        };
        // A run stores min(N, readers); a label's largest is its readers
        // (the product default changed: labels of different readers say so).
        let mut caps: Vec<(usize, Vec<String>)> = Vec::new();
        for label in res.labels() {
            let cap = res
                .runs
                .iter()
                .filter(|x| x.meta.label == label)
                .map(|x| x.readers)
                .max();
            let Some(cap) = cap else { continue };
            match caps.iter_mut().find(|(c, _)| *c == cap) {
                Some((_, labels)) => labels.push(label),
                None => caps.push((cap, vec![label])),
            }
        }
        let readers = match caps.as_slice() {
            [] => format!("min(N, {})", r.readers),
            [(cap, _)] => format!("min(N, {cap})"),
            _ => {
                let each: Vec<String> = caps
                    .iter()
                    .map(|(cap, labels)| format!("{cap} for {}", labels.join(", ")))
                    .collect();
                format!("min(N, R) (R = {})", each.join("; "))
            }
        };
        let _ = writeln!(
            s,
            "Testbed (as in the issue-6 section below): one origin and N node hosts, each a \
             network namespace with a veth link to a bridge, addresses from 198.18.0.0/15, every \
             link capped both ways by HTB at the rate in the table; {delay}. The origin is nginx; \
             the first {readers} nodes read it in disjoint ranges; every node lists every \
             other as a peer and keeps serving after it completes.\n"
        );
    }
    let _ = writeln!(
        s,
        "T* = the Kumar–Ross bound `max(F/u_origin, F/d_min, N·F/(u_origin + Σ u_i))` from the \
         caps. *last* / *first* = the last / first node's verified copy, over T*. *one server* \
         = N curls from nginx at once, or, marked (c), computed as N·F/u_origin when not run. \
         *origin* = copies the origin served (nginx payload · origin link, headers included). \
         *util* = mean uplink utilization from the start to the last node: Σ node uplink bytes / \
         Σ node uplink caps, wire bytes (Ethernet + IP + UDP/TCP headers counted, as HTB counts \
         them) from the bridge ports' kernel counters, sampled every second. *CPU* = agents' \
         utime+stime per GiB received per node. *RSS* = the largest agent VmHWM. *agents · busy* = \
         the agents' own CPU time over the run's wall time × cores, and the whole machine's \
         CPU busy share during the run (everything on it); *load* = load average before the \
         run (other sessions shared the machine).\n"
    );
    let _ = writeln!(
        s,
        "| label | link Mbit/s | N | size | piece | T* | last | last/T* | first/T* | one server \
         | origin copies | util | CPU s/GiB/node | RSS | agents · busy | load | agent |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in res.sorted_runs() {
        let d = derive(r);
        let p = &r.peerfill;
        let _ = writeln!(
            s,
            "| {} | {} / {} | {} | {} | {} KiB | {:.1} s | {:.1} s | {:.2} | {:.2} | {:.0} s{} \
             | {:.3} · {:.3} | {:.0}% | {:.2} | {:.1} MiB | {:.0}% · {:.0}% | {} | `{}` |",
            r.meta.label,
            r.origin_mbit,
            r.node_mbit,
            r.nodes,
            size_label(r.size),
            r.piece_size / 1024,
            r.bound_secs,
            p.time_secs,
            d.last,
            d.first,
            r.one_server.time_secs,
            if r.one_server_computed { " (c)" } else { "" },
            d.origin_copies,
            d.origin_link_copies,
            p.mean_utilization * 100.0,
            p.cpu_secs_per_gib_per_node,
            p.peak_rss_mib,
            agents_share(r, m.cores) * 100.0,
            p.machine_busy * 100.0,
            r.meta.load_before,
            short_hash(&r.meta.agent_blake3),
        );
    }
    side_by_side(&mut s, res);
    let _ = writeln!(
        s,
        "\n![last node / T* against N, per label and link rate]({})\n",
        links.ratio_plot
    );
    let _ = writeln!(
        s,
        "![uplink utilization over time at N = 16]({})\n",
        links.util_plot
    );
    uplinks(&mut s, res, 16);
    targets(&mut s, res);
    memory(&mut s, res);
    let _ = writeln!(s, "### Analysis\n");
    match analysis {
        Some(a) => {
            let _ = writeln!(s, "{}\n", a.trim_end());
        }
        None => {
            let _ = writeln!(
                s,
                "_Placeholder for the integrator: why the figures are what they are \
                 (write it in `e2e/netbench/analysis.md`; `peerfill-netbench render` puts it \
                 here)._\n"
            );
        }
    }
    s
}

/// Before and after (every label) side by side, per link rate, N and size.
fn side_by_side(s: &mut String, res: &Results) {
    let labels = res.labels();
    if labels.len() < 2 {
        return;
    }
    let _ = writeln!(
        s,
        "\n#### Side by side: {}\n\nEach cell: {}.\n",
        labels.join(" · "),
        labels.join(" · ")
    );
    let _ = writeln!(
        s,
        "| link Mbit/s | N | size | last/T* | first/T* | origin copies | util | CPU s/GiB/node | RSS MiB |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    let mut shapes: Vec<(u64, usize, u64)> = Vec::new();
    for r in res.sorted_runs() {
        let k = (r.node_mbit.to_bits(), r.nodes, r.size);
        if !shapes.contains(&k) {
            shapes.push(k);
        }
    }
    for (rate, nodes, size) in shapes {
        let rate = f64::from_bits(rate);
        let cells: Vec<Option<&RunResult>> = labels
            .iter()
            .map(|l| res.find(l, rate, nodes, size))
            .collect();
        let col = |f: &dyn Fn(&RunResult) -> String| -> String {
            cells
                .iter()
                .map(|c| c.map(f).unwrap_or_else(|| "–".into()))
                .collect::<Vec<_>>()
                .join(" · ")
        };
        let _ = writeln!(
            s,
            "| {rate} | {nodes} | {} | {} | {} | {} | {} | {} | {} |",
            size_label(size),
            col(&|r| format!("{:.2}", derive(r).last)),
            col(&|r| format!("{:.2}", derive(r).first)),
            col(&|r| format!("{:.3}", derive(r).origin_copies)),
            col(&|r| format!("{:.0}%", r.peerfill.mean_utilization * 100.0)),
            col(&|r| format!("{:.2}", r.peerfill.cpu_secs_per_gib_per_node)),
            col(&|r| format!("{:.1}", r.peerfill.peak_rss_mib)),
        );
    }
}

/// Who carried the swarm at N = `nodes`: MiB each node sent (wire bytes),
/// the origin readers first, and when the origin's one copy was out.
fn uplinks(s: &mut String, res: &Results, nodes: usize) {
    let runs: Vec<&RunResult> = res
        .sorted_runs()
        .into_iter()
        .filter(|r| r.nodes == nodes && r.peerfill.links.is_some())
        .collect();
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "#### Who uploaded at N = {nodes}\n\nMiB each node sent during the run (wire bytes, \
         from the link series), the {} origin readers first, then the others; and when the \
         origin link had sent one copy.\n",
        runs[0].readers
    );
    for r in runs {
        let Some(l) = &r.peerfill.links else { continue };
        let mib: Vec<String> = l
            .node_up_totals()
            .iter()
            .map(|b| format!("{:.0}", *b as f64 / (1u64 << 20) as f64))
            .collect();
        let (readers, others) = mib.split_at(r.readers.min(mib.len()));
        let _ = writeln!(
            s,
            "- `{}` {} Mbit/s, {}: readers {} · others {}; origin copy out after {:.1} s ({:.2} T*)",
            r.meta.label,
            r.node_mbit,
            size_label(r.size),
            readers.join(" "),
            others.join(" "),
            r.peerfill.origin_copy_secs,
            r.peerfill.origin_copy_secs / r.bound_secs
        );
    }
    let _ = writeln!(s);
}

/// The issue's targets, per label, reported (never asserted).
fn targets(s: &mut String, res: &Results) {
    let mark = |ok: bool| if ok { "met" } else { "**missed**" };
    let mut lines = Vec::new();
    for label in res.labels() {
        for r in res.runs.iter().filter(|r| r.meta.label == label) {
            let d = derive(r);
            let shape = format!(
                "`{label}` N = {} × {} at {} Mbit/s",
                r.nodes,
                size_label(r.size),
                r.node_mbit
            );
            if r.node_mbit == 20.0 && matches!((r.nodes, r.size >> 20), (16, 64) | (32, 32)) {
                lines.push(format!(
                    "- {shape}: last {:.2} ≤ 1.2 T* {}; first {:.2} ≤ 1.1 T* {}; origin {:.3} ≤ 1.02 copies {}",
                    d.last,
                    mark(d.last <= 1.2),
                    d.first,
                    mark(d.first <= 1.1),
                    d.origin_copies,
                    mark(d.origin_copies <= 1.02)
                ));
            }
            if r.node_mbit == 100.0 && r.nodes == 16 && r.size == 256 << 20 {
                let cpu = r.peerfill.cpu_secs_per_gib_per_node;
                lines.push(format!(
                    "- {shape}: last {:.2} ≤ 1.4 T* {}; CPU {:.2} ≤ 4 s/GiB/node {}",
                    d.last,
                    mark(d.last <= 1.4),
                    cpu,
                    mark(cpu <= 4.0)
                ));
            }
            if r.node_mbit == 100.0 && r.nodes == 8 && r.size == 1 << 30 {
                lines.push(format!(
                    "- {shape}: last {:.2} ≤ 1.25 T* {}",
                    d.last,
                    mark(d.last <= 1.25)
                ));
            }
        }
        for m in res.memory.iter().filter(|m| m.meta.label == label) {
            let peak = m.receivers_peak.max_hwm_mib.max(m.seeders_peak.max_hwm_mib);
            lines.push(format!(
                "- `{label}` memory, {} and {} peers: largest agent VmHWM {:.1} ≤ 64 MiB {}",
                size_label(m.size),
                m.seeders + m.receivers - 1,
                peak,
                mark(peak <= 64.0)
            ));
        }
    }
    if !lines.is_empty() {
        let _ = writeln!(s, "### Issue 15 targets (reported, not asserted)\n");
        let _ = writeln!(s, "{}\n", lines.join("\n"));
    }
}

fn memory(s: &mut String, res: &Results) {
    if res.memory.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "### Memory: agent RSS at a large content and many peers\n\n\
         `peerfill-netbench memory` on loopback: one pseudo-random file, S seeder agents each \
         holding it (hard links, each seeds its own), then R receiving agents with every \
         seeder and each other as peers. Every agent's `/proc/<pid>/status` is read once a \
         second; VmHWM is the kernel's peak resident set; RssAnon (heap, stacks) and RssFile \
         (mapped files) are the largest values sampled. Each received copy is re-hashed.\n"
    );
    let _ = writeln!(
        s,
        "| label | size | S | R | piece | seeders ready | received in | receiver VmHWM max | receiver RssAnon · RssFile max | seeder VmHWM max · median | seeder RssAnon · RssFile max | receiver CPU s/GiB | verified | load | agent |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for m in &res.memory {
        let (r, sd) = (&m.receivers_peak, &m.seeders_peak);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} KiB | {:.1} s | {:.1} s | {:.1} MiB | {:.1} · {:.1} MiB | {:.1} · {:.1} MiB | {:.1} · {:.1} MiB | {:.2} | {}/{} | {} | `{}` |",
            m.meta.label,
            size_label(m.size),
            m.seeders,
            m.receivers,
            m.piece_size / 1024,
            m.seed_ready_secs,
            m.receive_secs,
            r.max_hwm_mib,
            r.max_anon_mib,
            r.max_file_mib,
            sd.max_hwm_mib,
            sd.median_hwm_mib,
            sd.max_anon_mib,
            sd.max_file_mib,
            m.receiver_cpu_secs_per_gib,
            m.verified,
            m.receivers,
            m.meta.load_before,
            short_hash(&m.meta.agent_blake3),
        );
    }
    let _ = writeln!(s);
}

/// Twelve distinguishable colours: a sweep of six labels at two link rates
/// draws twelve series, and a repeated colour made two labels one.
const PALETTE: [RGBColor; 12] = [
    RGBColor(200, 60, 40),
    RGBColor(30, 100, 200),
    RGBColor(40, 150, 60),
    RGBColor(150, 60, 180),
    RGBColor(230, 140, 20),
    RGBColor(60, 60, 60),
    RGBColor(0, 170, 170),
    RGBColor(230, 80, 160),
    RGBColor(140, 110, 40),
    RGBColor(120, 170, 230),
    RGBColor(160, 200, 60),
    RGBColor(120, 0, 40),
];

/// Last node / T* against N, one series per (label, link rate).
pub fn plot_ratio(path: &Path, res: &Results) -> Result<()> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for label in res.labels() {
        for rate in res.rates() {
            let mut pts: Vec<(f64, f64)> = res
                .runs
                .iter()
                .filter(|r| r.meta.label == label && r.node_mbit == rate)
                .map(|r| (r.nodes as f64, derive(r).last))
                .collect();
            if pts.is_empty() {
                continue;
            }
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            series.push((format!("{label}, {rate} Mbit/s"), pts));
        }
    }
    if series.is_empty() {
        return Ok(());
    }
    register_font()?;
    let err = plot_err(path);
    let x_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        + 2.0;
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(1.5, f64::max)
        * 1.1;
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Last node's verified copy / Kumar–Ross bound T*, against N",
            ("sans-serif", 19),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("nodes N")
        .y_desc("time / T*")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(|e| err(&e))?;
    // The targets: 1.2 T* (20 Mbit/s) and the bound itself.
    // Labels: T* below its line, the target above its own.
    for (y, label, dy) in [(1.0, "T*", -0.035), (1.2, "target 1.2 T*", 0.012)] {
        reference_line(&mut chart, y, x_max, label, (x_max * 0.86, y + y_max * dy))
            .map_err(|e| err(&e))?;
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        marked_series(
            &mut chart,
            pts,
            color,
            name.clone(),
            13,
            (0.25, y_max * 0.01),
            |y| format!("{y:.2}"),
        )
        .map_err(|e| err(&e))?;
    }
    finish_plot(&mut chart, &root, SeriesLabelPosition::UpperLeft, 16, path)
}

/// Uplink utilization over time of every N = 16 peerfill run (one series
/// per label and link rate), with a mark where each run's last node ended.
pub fn plot_utilization(path: &Path, res: &Results, nodes: usize) -> Result<()> {
    let runs: Vec<&RunResult> = res
        .sorted_runs()
        .into_iter()
        .filter(|r| r.nodes == nodes && r.peerfill.links.is_some())
        .collect();
    if runs.is_empty() {
        return Ok(());
    }
    register_font()?;
    let err = plot_err(path);
    let x_max = runs
        .iter()
        .map(|r| r.peerfill.time_secs)
        .fold(1.0, f64::max)
        * 1.05;
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Uplink utilization at N = {nodes}: Σ node uplink / Σ caps, per second (wire bytes; tick at top: T*)"
            ),
            ("sans-serif", 19),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..1.1f64)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the agents started")
        .y_desc("utilization")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, r) in runs.iter().enumerate() {
        let Some(links) = &r.peerfill.links else {
            continue;
        };
        let color = PALETTE[i % PALETTE.len()];
        let pts = links.utilization_points();
        let name = format!(
            "{}, {} Mbit/s, {}: mean {:.0}%, last node {:.2} T*",
            r.meta.label,
            r.node_mbit,
            size_label(r.size),
            r.peerfill.mean_utilization * 100.0,
            r.peerfill.time_secs / r.bound_secs
        );
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        // T* of the run, dotted-ish: a short vertical tick at the top.
        let t = r.bound_secs;
        chart
            .draw_series(LineSeries::new(
                vec![(t, 1.0), (t, 1.08)],
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
    }
    finish_plot(&mut chart, &root, SeriesLabelPosition::UpperRight, 14, path)
}

#[cfg(test)]
mod tests {
    use super::super::links::LinkSeries;
    use super::super::scenario::{Figures, RunMeta};
    use super::*;
    use crate::netbench::MIB;
    use crate::netbench::memory::RolePeak;

    fn run(label: &str, rate: f64, nodes: usize, mib: u64, last: f64) -> RunResult {
        let size = mib * MIB;
        let bound = size as f64 * 8.0 / (rate * 1e6);
        let mut links = LinkSeries::new(nodes, rate);
        let cap = (rate * 1e6 / 8.0) as u64;
        let c = |rx| super::super::links::Counters { rx, tx: 0 };
        let nodes_c: Vec<_> = (0..nodes).map(|_| (c(0), c(cap / 2))).collect();
        links.push(1.0, (c(0), c(cap)), &nodes_c);
        RunResult {
            nodes,
            size,
            origin_mbit: rate,
            node_mbit: rate,
            delay_ms: 1.0,
            delay_emulated: false,
            mtu: crate::netbench::testbed::ETHERNET_MTU,
            readers: 4,
            calib_mbit: rate * 0.96,
            bound_secs: bound,
            one_server: Figures {
                time_secs: nodes as f64 * bound,
                ..Figures::default()
            },
            peerfill: Figures {
                time_secs: last * bound,
                first_secs: bound,
                verified: nodes,
                origin_body_bytes: size,
                origin_link_bytes: size + size / 50,
                mean_utilization: links.mean_utilization(f64::INFINITY),
                links: Some(links),
                cpu_secs_per_gib_per_node: 3.5,
                peak_rss_mib: 40.0,
                ..Figures::default()
            },
            one_server_computed: true,
            piece_size: 4 << 20,
            meta: RunMeta {
                label: label.into(),
                agent_blake3: "0123456789abcdef0123".into(),
                load_before: "1.00 1.00 1.00".into(),
                ..RunMeta::default()
            },
        }
    }

    fn results() -> Results {
        let mut res = Results::new(Machine::read());
        res.add_run(run("before", 20.0, 16, 64, 3.7));
        res.add_run(run("before", 20.0, 16, 64, 3.0)); // a rerun replaces
        res.add_run(run("after", 20.0, 16, 64, 1.15));
        res.add_run(run("before", 20.0, 32, 32, 4.0));
        res.add_memory(MemoryResult {
            size: 4 << 30,
            seeders: 64,
            receivers: 1,
            piece_size: 4 << 20,
            receivers_peak: RolePeak {
                max_hwm_mib: 70.0,
                ..RolePeak::default()
            },
            verified: 1,
            meta: RunMeta {
                label: "before".into(),
                ..RunMeta::default()
            },
            ..MemoryResult::default()
        });
        res
    }

    #[test]
    fn a_rerun_replaces_the_same_measurement_and_labels_keep_their_order() {
        let res = results();
        assert_eq!(res.runs.len(), 3);
        assert_eq!(
            res.labels(),
            vec!["before".to_string(), "after".to_string()]
        );
        let b = res.find("before", 20.0, 16, 64 * MIB).unwrap();
        assert!((derive(b).last - 3.0).abs() < 1e-9);
    }

    #[test]
    fn markdown_rows_side_by_side_targets_and_placeholder() {
        let md = markdown(
            &results(),
            &Links {
                results: "docs/bench/netbench.json",
                ratio_plot: "r.png",
                util_plot: "u.png",
            },
            None,
        );
        // Half the uplink cap during the one interval: 50%.
        assert!(
            md.contains("| before | 20 / 20 | 16 | 64 MiB | 4096 KiB | 26.8 s | 80.5 s | 3.00 | 1.00 | 429 s (c) | 1.000 · 1.020 | 50% | 3.50 | 40.0 MiB |"),
            "{md}"
        );
        assert!(
            md.contains("| 20 | 16 | 64 MiB | 3.00 · 1.15 | 1.00 · 1.00 |"),
            "{md}"
        );
        assert!(md.contains("| 20 | 32 | 32 MiB | 4.00 · – |"), "{md}");
        assert!(
            md.contains("`after` N = 16 × 64 MiB at 20 Mbit/s: last 1.15 ≤ 1.2 T* met"),
            "{md}"
        );
        assert!(
            md.contains("`before` N = 32 × 32 MiB at 20 Mbit/s: last 4.00 ≤ 1.2 T* **missed**")
        );
        assert!(md.contains("largest agent VmHWM 70.0 ≤ 64 MiB **missed**"));
        assert!(md.contains("`0123456789ab`"));
        // 16 nodes, each sent half a second's cap: 1.25 MiB at 20 Mbit/s → "1".
        assert!(
            md.contains(
                "- `before` 20 Mbit/s, 64 MiB: readers 1 1 1 1 · others 1 1 1 1 1 1 1 1 1 1 1 1;"
            ),
            "{md}"
        );
        assert!(md.contains("Placeholder for the integrator"));
        let with = markdown(
            &results(),
            &Links {
                results: "x",
                ratio_plot: "r",
                util_plot: "u",
            },
            Some("Because."),
        );
        assert!(with.contains("### Analysis\n\nBecause."));
    }

    #[test]
    fn sections_of_other_tools_above_the_report_are_kept() {
        let existing = format!("# Benchmarks\n\n## Scale\n\nrows\n\n{SECTION}: old\n\nold text\n");
        assert_eq!(sections_above(&existing), "## Scale\n\nrows\n\n");
        assert_eq!(
            sections_above(&format!("# Benchmarks\n\n{SECTION}: x\n")),
            ""
        );
        assert_eq!(sections_above("something else"), "");
    }

    #[test]
    fn plots_write_pngs() {
        let dir = tempfile::tempdir().unwrap();
        for (name, f) in [
            ("ratio.png", plot_ratio as fn(&Path, &Results) -> Result<()>),
            ("util.png", |p: &Path, r: &Results| {
                plot_utilization(p, r, 16)
            }),
        ] {
            let path = dir.path().join(name);
            f(&path, &results()).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name}");
        }
    }
}
