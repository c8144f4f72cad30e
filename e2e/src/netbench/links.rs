//! Per-second link use during a method: every bridge port's kernel counters
//! from ONE `ip -s -j link show` in the bridge namespace per sample.
//!
//! A host's uplink is what its bridge-side port receives (rx); its downlink
//! what that port sends (tx). The counters count whole frames (Ethernet +
//! IP + UDP/TCP headers + payload), the same bytes HTB's caps count, so
//! utilization = Σ node uplink bytes / Σ node uplink caps is on the wire
//! (headers included), not payload.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::procs::run;
use super::{NetbenchError, Result};

/// rx/tx byte counters of one interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub rx: u64,
    pub tx: u64,
}

/// `ifname -> counters` from `ip -s -j link show` output.
pub fn parse_counters(json: &str) -> Option<BTreeMap<String, Counters>> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let mut out = BTreeMap::new();
    for link in v.as_array()? {
        let name = link.get("ifname")?.as_str()?;
        let s = link.get("stats64")?;
        let rx = s.get("rx")?.get("bytes")?.as_u64()?;
        let tx = s.get("tx")?.get("bytes")?.as_u64()?;
        out.insert(name.to_string(), Counters { rx, tx });
    }
    Some(out)
}

/// The per-interval link series of one method, as stored in the results.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkSeries {
    /// Sample times, seconds since the method started (first ≈ 0);
    /// interval k is `(t_secs[k], t_secs[k+1]]`.
    pub t_secs: Vec<f64>,
    /// Bytes the origin sent per interval (wire bytes).
    pub origin_up: Vec<u64>,
    /// `node_up[i][k]`: bytes node i sent in interval k (wire bytes).
    pub node_up: Vec<Vec<u64>>,
    /// `node_down[i][k]`: bytes node i received in interval k (wire bytes).
    pub node_down: Vec<Vec<u64>>,
    /// Node uplink cap, bytes/s (what utilization divides by).
    pub node_cap_bytes_per_sec: f64,
}

impl LinkSeries {
    pub fn new(nodes: usize, node_mbit: f64) -> LinkSeries {
        LinkSeries {
            node_up: vec![Vec::new(); nodes],
            node_down: vec![Vec::new(); nodes],
            node_cap_bytes_per_sec: node_mbit * 1e6 / 8.0,
            ..LinkSeries::default()
        }
    }

    /// Appends the interval from the previous sample (`prev`) to `now`.
    /// `origin` and `nodes` are (previous, current) counters of the bridge
    /// ports; a counter that went backwards counts as zero.
    pub fn push(&mut self, t: f64, origin: (Counters, Counters), nodes: &[(Counters, Counters)]) {
        if self.t_secs.is_empty() {
            // The first call only fixes the start of the first interval.
            self.t_secs.push(0.0);
        }
        self.t_secs.push(t);
        self.origin_up.push(origin.1.rx.saturating_sub(origin.0.rx));
        for (i, (a, b)) in nodes.iter().enumerate() {
            if let Some(up) = self.node_up.get_mut(i) {
                up.push(b.rx.saturating_sub(a.rx));
            }
            if let Some(down) = self.node_down.get_mut(i) {
                down.push(b.tx.saturating_sub(a.tx));
            }
        }
    }

    /// Number of intervals.
    pub fn intervals(&self) -> usize {
        self.origin_up.len()
    }

    fn dt(&self, k: usize) -> f64 {
        self.t_secs[k + 1] - self.t_secs[k]
    }

    /// Utilization of interval k: Σ node uplink bytes / (N · cap · Δt).
    pub fn utilization(&self, k: usize) -> f64 {
        let n = self.node_up.len() as f64;
        let cap = n * self.node_cap_bytes_per_sec * self.dt(k);
        if cap <= 0.0 {
            return 0.0;
        }
        let sent: u64 = self.node_up.iter().filter_map(|u| u.get(k)).sum();
        sent as f64 / cap
    }

    /// Time-weighted mean utilization over the intervals ending by `until`
    /// seconds (the method's end): Σ bytes / (N · cap · span).
    pub fn mean_utilization(&self, until: f64) -> f64 {
        let n = self.node_up.len() as f64;
        let mut sent = 0u64;
        let mut span = 0.0;
        for k in 0..self.intervals() {
            if self.t_secs[k + 1] > until + 1e-9 {
                break;
            }
            sent += self.node_up.iter().filter_map(|u| u.get(k)).sum::<u64>();
            span += self.dt(k);
        }
        let cap = n * self.node_cap_bytes_per_sec * span;
        if cap <= 0.0 { 0.0 } else { sent as f64 / cap }
    }

    /// When the origin had sent `bytes` in all (linear within the interval
    /// that crossed it), seconds; None if it never did.
    pub fn origin_sent_secs(&self, bytes: u64) -> Option<f64> {
        let mut sent = 0u64;
        for (k, &b) in self.origin_up.iter().enumerate() {
            if b > 0 && sent + b >= bytes {
                let frac = (bytes.saturating_sub(sent)) as f64 / b as f64;
                return Some(self.t_secs[k] + frac * self.dt(k));
            }
            sent += b;
        }
        None
    }

    /// Total bytes each node sent (wire).
    pub fn node_up_totals(&self) -> Vec<u64> {
        self.node_up.iter().map(|u| u.iter().sum()).collect()
    }

    /// A step line for a plot: each interval's utilization from its start
    /// to its end (a long interval, e.g. a slow sample, shows as one step).
    pub fn utilization_points(&self) -> Vec<(f64, f64)> {
        (0..self.intervals())
            .flat_map(|k| {
                let u = self.utilization(k);
                [(self.t_secs[k], u), (self.t_secs[k + 1], u)]
            })
            .collect()
    }
}

/// Samples the bridge ports about once a second while a method runs.
pub struct LinkSampler {
    bridge_ns: String,
    origin_port: String,
    node_ports: Vec<String>,
    start: Instant,
    next: Instant,
    last: Option<BTreeMap<String, Counters>>,
    pub series: LinkSeries,
}

const EVERY: Duration = Duration::from_secs(1);

impl LinkSampler {
    /// Starts sampling now (the method's start), with a first reading.
    pub fn start(
        bridge_ns: &str,
        origin_port: &str,
        node_ports: Vec<String>,
        node_mbit: f64,
    ) -> Result<LinkSampler> {
        let mut s = LinkSampler {
            bridge_ns: bridge_ns.to_string(),
            origin_port: origin_port.to_string(),
            series: LinkSeries::new(node_ports.len(), node_mbit),
            node_ports,
            start: Instant::now(),
            next: Instant::now(),
            last: None,
        };
        s.sample()?;
        Ok(s)
    }

    fn read(&self) -> Result<BTreeMap<String, Counters>> {
        let out = run("ip", &["-n", &self.bridge_ns, "-s", "-j", "link", "show"])?;
        parse_counters(&out).ok_or_else(|| NetbenchError::Parse {
            cmd: format!("ip -n {} -s -j link show", self.bridge_ns),
            reason: "no ifname/stats64 rx/tx bytes".into(),
        })
    }

    /// Takes a sample now, whatever the time since the last one.
    pub fn sample(&mut self) -> Result<()> {
        let now = self.read()?;
        let t = self.start.elapsed().as_secs_f64();
        self.next = Instant::now() + EVERY;
        if let Some(prev) = self.last.take() {
            let pair = |port: &str| {
                (
                    prev.get(port).copied().unwrap_or_default(),
                    now.get(port).copied().unwrap_or_default(),
                )
            };
            let nodes: Vec<(Counters, Counters)> =
                self.node_ports.iter().map(|p| pair(p)).collect();
            self.series.push(t, pair(&self.origin_port), &nodes);
        }
        self.last = Some(now);
        Ok(())
    }

    /// Samples if a second has passed since the last sample.
    pub fn tick(&mut self) -> Result<()> {
        if Instant::now() >= self.next {
            self.sample()?;
        }
        Ok(())
    }

    /// Samples on a thread of its own, so a slow `ip` (the RTNL lock is
    /// shared with every namespace operation on the machine) never delays
    /// the caller's completion checks.
    pub fn spawn(self) -> SamplerThread {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut s = self;
            while !flag.load(Ordering::SeqCst) {
                s.tick()?;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(s)
        });
        SamplerThread { stop, handle }
    }
}

/// A [`LinkSampler`] running on its own thread.
pub struct SamplerThread {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<LinkSampler>>,
}

impl SamplerThread {
    /// Stops the thread, takes a last sample now and returns the series.
    pub fn finish(self) -> Result<LinkSeries> {
        self.stop.store(true, Ordering::SeqCst);
        let mut s = self.handle.join().map_err(|_| NetbenchError::Parse {
            cmd: "link sampler thread".into(),
            reason: "panicked".into(),
        })??;
        s.sample()?;
        Ok(s.series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(rx: u64, tx: u64) -> Counters {
        Counters { rx, tx }
    }

    #[test]
    fn counters_of_every_port_from_one_ip_json() {
        let j = r#"[
          {"ifname":"br0","stats64":{"rx":{"bytes":1},"tx":{"bytes":2}}},
          {"ifname":"h1","stats64":{"rx":{"bytes":1000,"packets":3},"tx":{"bytes":50}}},
          {"ifname":"ho","stats64":{"rx":{"bytes":7},"tx":{"bytes":9}}}]"#;
        let m = parse_counters(j).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m["h1"], c(1000, 50));
        assert_eq!(m["ho"], c(7, 9));
        assert!(parse_counters("not json").is_none());
        assert!(parse_counters(r#"[{"ifname":"x"}]"#).is_none());
    }

    #[test]
    fn utilization_is_node_uplink_bytes_over_node_caps() {
        // 2 nodes at 8 Mbit/s = 1e6 bytes/s each.
        let mut s = LinkSeries::new(2, 8.0);
        s.push(
            1.0,
            (c(0, 0), c(500, 0)),
            &[(c(0, 0), c(1_000_000, 10)), (c(0, 0), c(0, 20))],
        );
        s.push(
            3.0,
            (c(500, 0), c(500, 0)),
            &[
                (c(1_000_000, 10), c(3_000_000, 10)),
                (c(0, 20), c(2_000_000, 20)),
            ],
        );
        assert_eq!(s.t_secs, vec![0.0, 1.0, 3.0]);
        assert_eq!(s.origin_up, vec![500, 0]);
        assert_eq!(s.node_down[0], vec![10, 0]);
        // Interval 0: 1e6 of 2e6 possible; interval 1: 4e6 of 4e6.
        assert!((s.utilization(0) - 0.5).abs() < 1e-12);
        assert!((s.utilization(1) - 1.0).abs() < 1e-12);
        // Time-weighted: 5e6 bytes of 6e6 over 3 s; only the first second: 0.5.
        assert!((s.mean_utilization(3.0) - 5.0 / 6.0).abs() < 1e-12);
        assert!((s.mean_utilization(1.0) - 0.5).abs() < 1e-12);
        assert_eq!(s.node_up_totals(), vec![3_000_000, 2_000_000]);
        assert_eq!(s.origin_sent_secs(250), Some(0.5));
        assert_eq!(s.origin_sent_secs(500), Some(1.0));
        assert_eq!(s.origin_sent_secs(501), None);
        let pts = s.utilization_points();
        assert_eq!(pts.len(), 4);
        assert_eq!((pts[1].0, pts[2].0, pts[3].0), (1.0, 1.0, 3.0));
        assert!((pts[3].1 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_counter_that_goes_backwards_counts_zero_and_no_intervals_mean_zero() {
        let mut s = LinkSeries::new(1, 8.0);
        assert_eq!(s.mean_utilization(10.0), 0.0);
        s.push(1.0, (c(10, 0), c(5, 0)), &[(c(10, 0), c(5, 0))]);
        assert_eq!(s.origin_up, vec![0]);
        assert_eq!(s.node_up[0], vec![0]);
    }
}
