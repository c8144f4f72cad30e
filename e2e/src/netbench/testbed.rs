//! The emulated network: one origin host and N node hosts, each a network
//! namespace with one veth link to a bridge that lives in its own namespace
//! (the root namespace gets no interface at all). Addresses come from
//! 198.18.0.0/15 only: the origin is 198.18.0.1, node i is 198.18.1.(i+1).
//!
//! Each host's link is capped in both directions: HTB on the host's `eth0`
//! caps what it sends (its uplink), HTB on the bridge-side port caps what it
//! receives (its downlink). The leaf queue is netem with the configured
//! one-way delay when the kernel has `sch_netem`, a 256 KiB byte FIFO
//! otherwise (recorded in [`Testbed::delay_emulated`]).

use std::net::Ipv4Addr;

use tracing::{info, warn};

use super::procs::run;
use super::{NetbenchError, PREFIX, Result};

/// Link caps of the testbed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Caps {
    /// Origin uplink and downlink, Mbit/s.
    pub origin_mbit: f64,
    /// Every node's uplink and downlink, Mbit/s.
    pub node_mbit: f64,
    /// One-way delay added on each host's uplink, ms.
    pub delay_ms: f64,
    /// MTU of every link, bytes (1500: Ethernet; 9000: jumbo frames, as in
    /// many data-centre networks). Per-packet costs scale with 1/MTU.
    pub mtu: u32,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            origin_mbit: 100.0,
            node_mbit: 100.0,
            delay_ms: 1.0,
            mtu: ETHERNET_MTU,
        }
    }
}

/// The links' MTU unless asked otherwise.
pub const ETHERNET_MTU: u32 = 1500;

pub const ORIGIN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PREFIX_LEN: u8 = 15;
/// Bytes a leaf FIFO may hold: ~20 ms at 100 Mbit/s, so TCP and QUIC see
/// drops instead of seconds of queueing.
const FIFO_BYTES: u64 = 256 << 10;

/// Address of node `i` (0-based).
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1 + (i / 250) as u8, (i % 250) as u8 + 1)
}

/// The namespace-name prefix of this process: `pfnb-<pid>-`.
pub fn own_prefix() -> String {
    format!("{PREFIX}{}-", std::process::id())
}

/// A testbed; dropping it deletes its namespaces (and with them every veth
/// and qdisc in them).
#[derive(Debug)]
pub struct Testbed {
    pub bridge_ns: String,
    pub origin_ns: String,
    pub node_ns: Vec<String>,
    pub caps: Caps,
    /// Whether netem added the configured delay (false: no `sch_netem`).
    pub delay_emulated: bool,
    created: Vec<String>,
}

impl Testbed {
    /// Builds the network for `nodes` node hosts.
    pub fn create(nodes: usize, caps: Caps) -> Result<Testbed> {
        if nodes == 0 || nodes > 500 {
            return Err(NetbenchError::Config(format!(
                "nodes must be 1..=500, got {nodes}"
            )));
        }
        let p = own_prefix();
        let mut tb = Testbed {
            bridge_ns: format!("{p}br"),
            origin_ns: format!("{p}origin"),
            node_ns: (0..nodes).map(|i| format!("{p}n{}", i + 1)).collect(),
            caps,
            delay_emulated: caps.delay_ms > 0.0,
            created: Vec::new(),
        };
        // On error the partly built testbed is dropped, which deletes it.
        tb.build()?;
        info!(
            nodes,
            origin_mbit = caps.origin_mbit,
            node_mbit = caps.node_mbit,
            delay_ms = caps.delay_ms,
            mtu = caps.mtu,
            delay_emulated = tb.delay_emulated,
            "testbed up"
        );
        Ok(tb)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        run("ip", &["netns", "add", ns])?;
        self.created.push(ns.to_string());
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let br = self.bridge_ns.clone();
        self.add_ns(&br)?;
        run("ip", &["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &br, "link", "set", "br0", "up"])?;
        let origin = self.origin_ns.clone();
        let origin_mbit = self.caps.origin_mbit;
        self.add_host(&origin, "ho", ORIGIN_IP, origin_mbit)?;
        for (i, ns) in self.node_ns.clone().iter().enumerate() {
            self.add_host(ns, &format!("h{}", i + 1), node_ip(i), self.caps.node_mbit)?;
        }
        Ok(())
    }

    /// A host namespace with `eth0` at `ip`, linked to the bridge through
    /// port `port`, capped at `mbit` both ways.
    fn add_host(&mut self, ns: &str, port: &str, ip: Ipv4Addr, mbit: f64) -> Result<()> {
        self.add_ns(ns)?;
        let br = self.bridge_ns.clone();
        let mtu = self.caps.mtu.to_string();
        run(
            "ip",
            &[
                "-n", &br, "link", "add", port, "mtu", &mtu, "type", "veth", "peer", "name",
                "eth0", "mtu", &mtu, "netns", ns,
            ],
        )?;
        run(
            "ip",
            &["-n", &br, "link", "set", port, "master", "br0", "up"],
        )?;
        let cidr = format!("{ip}/{PREFIX_LEN}");
        run("ip", &["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
        run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        // Uplink (with the delay), then downlink.
        let delay = self.caps.delay_ms;
        self.shape(ns, "eth0", mbit, delay)?;
        self.shape(&br, port, mbit, 0.0)?;
        Ok(())
    }

    fn shape(&mut self, ns: &str, dev: &str, mbit: f64, delay_ms: f64) -> Result<()> {
        let rate = format!("{}kbit", (mbit * 1000.0).round() as u64);
        run(
            "tc",
            &[
                "-n", ns, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default",
                "1",
            ],
        )?;
        // quantum: one MTU-sized frame per round keeps HTB fair and quiet.
        run(
            "tc",
            &[
                "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                "rate", &rate, "ceil", &rate, "quantum", "1514",
            ],
        )?;
        let fifo = || {
            run(
                "tc",
                &[
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "parent",
                    "1:1",
                    "handle",
                    "10:",
                    "bfifo",
                    "limit",
                    &FIFO_BYTES.to_string(),
                ],
            )
        };
        if delay_ms > 0.0 && self.delay_emulated {
            let delay = format!("{}us", (delay_ms * 1000.0).round() as u64);
            let netem = run(
                "tc",
                &[
                    "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
                    "netem", "delay", &delay, "limit", "1000",
                ],
            );
            if let Err(e) = netem {
                warn!(error = %e, "no netem: the delay is not emulated, links are rate-capped only");
                self.delay_emulated = false;
                fifo()?;
            }
        } else {
            fifo()?;
        }
        Ok(())
    }

    /// Bytes the origin host has sent on its link (IP packets incl. headers
    /// and retransmissions, from the kernel's interface counters).
    pub fn origin_tx_bytes(&self) -> Result<u64> {
        link_tx_bytes(&self.origin_ns, "eth0")
    }

    /// Deletes the namespaces (idempotent).
    pub fn destroy(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        // Hosts first: deleting a host's namespace removes its veth pair.
        while let Some(ns) = self.created.pop() {
            if let Err(e) = run("ip", &["netns", "del", &ns]) {
                warn!(ns, error = %e, "cannot delete namespace");
                failed.push(ns);
            }
        }
        failed
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// tx bytes of `dev` in namespace `ns`, from `ip -j -s link`.
pub fn link_tx_bytes(ns: &str, dev: &str) -> Result<u64> {
    let out = run("ip", &["-n", ns, "-j", "-s", "link", "show", "dev", dev])?;
    parse_tx_bytes(&out).ok_or_else(|| NetbenchError::Parse {
        cmd: format!("ip -n {ns} -j -s link show dev {dev}"),
        reason: "no stats64.tx.bytes".into(),
    })
}

pub fn parse_tx_bytes(json: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.get(0)?.get("stats64")?.get("tx")?.get("bytes")?.as_u64()
}

/// Names of the benchmark's namespaces on this machine.
pub fn list_ours() -> Result<Vec<String>> {
    let out = run("ip", &["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(String::from)
        .collect())
}

/// The pid in a `pfnb-<pid>-…` name.
pub fn owner_pid(ns: &str) -> Option<u32> {
    ns.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Deletes namespaces of earlier runs whose process is gone (a crash or a
/// SIGKILL skips the guards); those of live runs are left alone.
pub fn remove_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for ns in list_ours()? {
        let alive = owner_pid(&ns)
            .map(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
            .unwrap_or(false);
        if !alive {
            // Kill what still runs inside (agents, nginx) before deleting.
            if let Ok(pids) = run("ip", &["netns", "pids", &ns]) {
                for pid in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: SIGKILL to a process inside a stale namespace.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            run("ip", &["netns", "del", &ns])?;
            removed.push(ns);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_the_benchmark_range() {
        let net = u32::from(Ipv4Addr::new(198, 18, 0, 0));
        let mask = !0u32 << (32 - PREFIX_LEN);
        for ip in [
            ORIGIN_IP,
            node_ip(0),
            node_ip(15),
            node_ip(249),
            node_ip(499),
        ] {
            assert_eq!(u32::from(ip) & mask, net, "{ip}");
        }
        assert_eq!(node_ip(0), Ipv4Addr::new(198, 18, 1, 1));
        assert_eq!(node_ip(250), Ipv4Addr::new(198, 18, 2, 1));
        assert_ne!(node_ip(249), node_ip(250));
    }

    #[test]
    fn owner_pid_reads_the_prefix() {
        assert_eq!(owner_pid("pfnb-4242-n3"), Some(4242));
        assert_eq!(owner_pid("pfnb-4242-origin"), Some(4242));
        assert_eq!(owner_pid("pfnb-x-n3"), None);
        assert_eq!(owner_pid("other-1-n3"), None);
    }

    #[test]
    fn tx_bytes_from_ip_json() {
        let j = r#"[{"ifname":"eth0","stats64":{"rx":{"bytes":10},"tx":{"bytes":123456,"packets":9}}}]"#;
        assert_eq!(parse_tx_bytes(j), Some(123456));
        assert_eq!(parse_tx_bytes("[]"), None);
    }
}
