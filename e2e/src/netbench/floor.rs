//! The testbed's own CPU floor: what moving the swarm's bytes costs on
//! these emulated links with no QUIC, no TLS, no disk and no agent at all.
//!
//! Every node sends `bytes_per_peer` to every other node and receives as
//! much from each, the traffic pattern of a swarm where each node uploads
//! one copy. Two transports:
//!
//! - `udp`: quinn's own UDP layer (`quinn::udp`: GSO sends of 10 datagrams,
//!   `recvmmsg` receives on readiness), datagrams as large as the link's
//!   MTU allows (1472 bytes at 1500), paced in bursts of 10 at
//!   95 % of the uplink (quinn's pacer also sends bursts of 10 at low
//!   rates). Nothing is retransmitted: the figure is per byte received.
//! - `quic`: the agent's own QUIC (its `tls` endpoint, transport and
//!   mutual-TLS configs, quinn on a two-worker tokio runtime as in the
//!   agent), one connection per pair of nodes as in the swarm, each end
//!   sending one stream of 256 KiB chunks over it; congestion control
//!   paces. No pieces, requests, hashes, signatures or disk: the agent's
//!   figure minus this one is what the agent itself costs.
//! - `tcp`: the kernel's TCP, one connection per ordered pair, a thread
//!   per connection and direction, 256 KiB writes (TSO and GRO carry
//!   64 KiB segments through the veths). With hundreds of threads on two
//!   cores its figure at N = 16 is mostly theirs.
//!
//! The CPU is each node process's user + system time (its rusage when
//! reaped), as for the agents in a netbench run, so the emulated links'
//! softirq work charged to whoever runs is in both. Divided by the GiB the
//! node received, it is the floor any UDP (or TCP) transport pays on this
//! testbed before doing anything of its own.

use std::io::{IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use serde::{Deserialize, Serialize};

mod quic;

use super::procs::NsProc;
use super::testbed::{Caps, Testbed, node_ip};
use super::{Deadline, GIB, MIB, NetbenchError, Result, io_err, sleep};

/// Port every node listens on (UDP and TCP).
pub const PORT: u16 = 7700;
/// Datagrams per GSO send.
const BURST: usize = 10;
/// IP and UDP headers; Ethernet adds 14 on the wire.
const HEADERS: usize = 28;

/// UDP payload of one datagram on an `mtu` link: as large as fits, at most
/// the agent's `tls::MTU_UPPER_BOUND` (10 of them must fit one GSO send).
pub fn datagram(mtu: u32) -> usize {
    (mtu as usize).saturating_sub(HEADERS).clamp(512, 6550)
}
/// How long a receiver waits for more once nothing arrives.
const QUIET: Duration = Duration::from_secs(2);

/// The transport a floor run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Quic,
    Tcp,
}

/// What one node did (printed as its last line, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    pub sent: u64,
    pub received: u64,
    pub secs: f64,
}

/// One floor run's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloorResult {
    pub transport: Transport,
    pub nodes: usize,
    pub node_mbit: f64,
    pub mtu: u32,
    pub bytes_per_node: u64,
    /// Bytes received over bytes sent, all nodes.
    pub delivered: f64,
    /// Mean over nodes of CPU seconds per GiB received.
    pub cpu_secs_per_gib_per_node: f64,
    pub cpu_min: f64,
    pub cpu_max: f64,
    /// Slowest node's time.
    pub secs: f64,
    /// Non-idle share of the machine while it ran.
    pub machine_busy: f64,
}

/// A node of the floor run: sends to `peers`, receives from them, prints
/// a [`NodeReport`]. `identity` (QUIC only): the directory of this node's
/// `tls.crt`, `tls.key` and `ca.crt`.
pub fn node_main(
    transport: Transport,
    peers: &[Ipv4Addr],
    bytes_per_peer: u64,
    link: (f64, u32),
    identity: Option<&Path>,
    deadline: Duration,
) -> Result<NodeReport> {
    let started = Instant::now();
    let expected = bytes_per_peer * peers.len() as u64;
    let (sent, received) = match transport {
        Transport::Udp => udp_node(peers, bytes_per_peer, link, expected, deadline)?,
        Transport::Quic => {
            let dir = identity
                .ok_or_else(|| NetbenchError::Config("the QUIC floor needs --identity".into()))?;
            quic::node(dir, peers, bytes_per_peer, expected, deadline)?
        }
        Transport::Tcp => tcp_node(peers, bytes_per_peer, expected, deadline)?,
    };
    Ok(NodeReport {
        sent,
        received,
        secs: started.elapsed().as_secs_f64(),
    })
}

fn udp_node(
    peers: &[Ipv4Addr],
    bytes_per_peer: u64,
    (mbit, mtu): (f64, u32),
    expected: u64,
    deadline: Duration,
) -> Result<(u64, u64)> {
    let dgram = datagram(mtu);
    let socket = bind_udp()?;
    let state = UdpSocketState::new((&socket).into()).map_err(io_err("UDP socket state"))?;
    // Non-blocking with a readiness wait, as quinn's endpoint driver does:
    // a blocking `recvmmsg` would wait for a full batch and hide wake-ups.
    socket
        .set_nonblocking(true)
        .map_err(io_err("UDP non-blocking"))?;
    let socket = Arc::new(socket);
    let state = Arc::new(state);
    let end = Instant::now() + deadline;
    let receiver = {
        let (socket, state) = (socket.clone(), state.clone());
        std::thread::spawn(move || udp_receive(&socket, &state, expected, end))
    };
    // Give every node time to bind before the first datagram.
    std::thread::sleep(Duration::from_millis(500));
    let burst = vec![0xa5u8; dgram * BURST];
    let wire = (dgram + HEADERS + 14) * BURST;
    let interval = Duration::from_secs_f64((wire * 8) as f64 / (0.95 * mbit * 1e6));
    let bursts_per_peer = bytes_per_peer.div_ceil(burst.len() as u64);
    let mut sent = 0;
    let mut next = Instant::now();
    'send: for _ in 0..bursts_per_peer {
        for peer in peers {
            if Instant::now() >= end {
                break 'send;
            }
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next += interval;
            let t = Transmit {
                destination: SocketAddr::from((*peer, PORT)),
                ecn: None,
                contents: &burst,
                segment_size: Some(dgram),
                src_ip: None,
            };
            // A full send buffer waits for room; a refused send (a local
            // qdisc drop) is a loss like any other here.
            while let Err(e) = state.send((&*socket).into(), &t) {
                if e.kind() != std::io::ErrorKind::WouldBlock || Instant::now() >= end {
                    break;
                }
                wait_ready(&socket, libc::POLLOUT);
            }
            sent += burst.len() as u64;
        }
    }
    let received = receiver
        .join()
        .map_err(|_| NetbenchError::Config("UDP receiver panicked".into()))?;
    Ok((sent, received))
}

fn udp_receive(socket: &UdpSocket, state: &UdpSocketState, expected: u64, end: Instant) -> u64 {
    let n = quinn::udp::BATCH_SIZE.max(1);
    let seg = 64 << 10;
    let mut storage = vec![0u8; n * seg];
    let mut meta = vec![RecvMeta::default(); n];
    let mut received = 0u64;
    let mut last = Instant::now();
    while received < expected && Instant::now() < end {
        let mut bufs: Vec<IoSliceMut> = storage.chunks_mut(seg).map(IoSliceMut::new).collect();
        match state.recv(socket.into(), &mut bufs, &mut meta) {
            Ok(count) => {
                received += meta[..count].iter().map(|m| m.len as u64).sum::<u64>();
                last = Instant::now();
            }
            Err(_) if received > 0 && last.elapsed() >= QUIET => break,
            Err(_) => wait_ready(socket, libc::POLLIN),
        }
    }
    received
}

/// The node's UDP socket on [`PORT`], with the agent's socket buffers.
fn bind_udp() -> Result<UdpSocket> {
    peerfill_agent::swarm::bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)))
        .map_err(io_err("binding UDP"))
}

/// Waits up to 200 ms for `events` on the socket.
fn wait_ready(socket: &UdpSocket, events: libc::c_short) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut fd, 1, 200);
    }
}

fn tcp_node(
    peers: &[Ipv4Addr],
    bytes_per_peer: u64,
    expected: u64,
    deadline: Duration,
) -> Result<(u64, u64)> {
    let listener =
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).map_err(io_err("binding TCP"))?;
    let received = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + deadline;
    let accepted = {
        let received = received.clone();
        let count = peers.len();
        std::thread::spawn(move || {
            let readers: Vec<_> = (0..count)
                .filter_map(|_| listener.accept().ok())
                .map(|(mut s, _)| {
                    let received = received.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 << 10];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for r in readers {
                let _ = r.join();
            }
        })
    };
    let sent = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = peers
        .iter()
        .map(|peer| {
            let (peer, sent) = (*peer, sent.clone());
            std::thread::spawn(move || {
                let addr = SocketAddr::from((peer, PORT));
                // The peer may not listen yet.
                let mut s = loop {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                        Ok(s) => break s,
                        Err(_) if Instant::now() < end => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        Err(_) => return,
                    }
                };
                let chunk = vec![0x5au8; 256 << 10];
                let mut left = bytes_per_peer;
                while left > 0 && Instant::now() < end {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                    left -= n as u64;
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            })
        })
        .collect();
    for w in writers {
        let _ = w.join();
    }
    let _ = accepted.join();
    let sent = sent.load(Ordering::Relaxed);
    let got = received.load(Ordering::Relaxed);
    if got < expected {
        tracing::warn!(got, expected, "TCP floor node received less than expected");
    }
    Ok((sent, got))
}

/// A node's report: the last line of its log that is one.
fn last_report(log: &str) -> Option<NodeReport> {
    log.lines().rev().find_map(|l| serde_json::from_str(l).ok())
}

/// Runs one floor measurement on a fresh testbed of `nodes` hosts.
pub fn run_floor(
    self_exe: &Path,
    work: &Path,
    transport: Transport,
    nodes: usize,
    mib: u64,
    caps: Caps,
    global: Deadline,
) -> Result<FloorResult> {
    if nodes < 2 {
        return Err(NetbenchError::Config(
            "the floor needs at least 2 nodes".into(),
        ));
    }
    let tb = Testbed::create(nodes, caps)?;
    if transport == Transport::Quic {
        quic::issue_identities(work, nodes)?;
    }
    let bytes_per_node = mib * MIB;
    let per_peer = bytes_per_node / (nodes as u64 - 1);
    // Ideal time at the cap, plus slack; the nodes stop by themselves.
    let ideal = (bytes_per_node as f64 * 8.0) / (caps.node_mbit * 1e6);
    let node_deadline = Duration::from_secs_f64(3.0 * ideal + 20.0);
    let busy_before = super::procs::cpu_jiffies();
    let mut procs = Vec::new();
    for (i, ns) in tb.node_ns.iter().enumerate() {
        let peers: Vec<String> = (0..nodes)
            .filter(|j| *j != i)
            .map(|j| node_ip(j).to_string())
            .collect();
        let args = [
            "floor-node".to_string(),
            "--transport".into(),
            format!("{transport:?}").to_lowercase(),
            "--peers".into(),
            peers.join(","),
            "--bytes-per-peer".into(),
            per_peer.to_string(),
            "--mbit".into(),
            caps.node_mbit.to_string(),
            "--mtu".into(),
            caps.mtu.to_string(),
            "--deadline-secs".into(),
            node_deadline.as_secs().to_string(),
            "--identity".into(),
            quic::identity_dir(work, i).display().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = work.join(format!("floor-{i}.log"));
        procs.push(NsProc::spawn(
            &format!("floor-{i}"),
            ns,
            self_exe,
            &args,
            &[],
            &log,
        )?);
    }
    let deadline = global.min(Deadline::after(node_deadline + Duration::from_secs(30)));
    let mut exits = vec![None; procs.len()];
    while exits.iter().any(Option::is_none) {
        if deadline.expired() {
            return Err(NetbenchError::Timeout {
                what: "floor nodes".into(),
                secs: node_deadline.as_secs_f64(),
            });
        }
        for (p, e) in procs.iter_mut().zip(exits.iter_mut()) {
            if e.is_none() {
                *e = p.try_reap()?;
            }
        }
        sleep(Duration::from_millis(100))?;
    }
    let busy = match (busy_before, super::procs::cpu_jiffies()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => 0.0,
    };
    let mut cpu = Vec::new();
    let (mut sent, mut received, mut secs) = (0u64, 0u64, 0f64);
    for (i, e) in exits.iter().enumerate() {
        let e = e.ok_or_else(|| NetbenchError::Config("unreaped floor node".into()))?;
        let log = work.join(format!("floor-{i}.log"));
        let text =
            std::fs::read_to_string(&log).map_err(io_err(format!("reading {}", log.display())))?;
        let report = last_report(&text).ok_or_else(|| NetbenchError::NodeFailed {
            node: format!("floor-{i}"),
            reason: format!("no report (exit {}): {}", e.code, text.trim()),
        })?;
        // QUIC and TCP are reliable: anything short is a broken run.
        let expected = per_peer * (nodes as u64 - 1);
        if transport != Transport::Udp && report.received < expected {
            return Err(NetbenchError::NodeFailed {
                node: format!("floor-{i}"),
                reason: format!("received {} of {expected} bytes", report.received),
            });
        }
        sent += report.sent;
        received += report.received;
        secs = secs.max(report.secs);
        cpu.push(e.usage.cpu_secs / (report.received.max(1) as f64 / GIB as f64));
    }
    drop(tb);
    let mean = cpu.iter().sum::<f64>() / cpu.len() as f64;
    Ok(FloorResult {
        transport,
        nodes,
        node_mbit: caps.node_mbit,
        mtu: caps.mtu,
        bytes_per_node,
        delivered: received as f64 / sent.max(1) as f64,
        cpu_secs_per_gib_per_node: mean,
        cpu_min: cpu.iter().copied().fold(f64::INFINITY, f64::min),
        cpu_max: cpu.iter().copied().fold(0.0, f64::max),
        secs,
        machine_busy: busy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_fill_the_link_mtu_and_ten_fit_one_gso_send() {
        assert_eq!(datagram(1500), 1472);
        assert_eq!(datagram(9000), 6550);
        assert!(datagram(9000) * BURST <= 65_507);
        assert_eq!(datagram(576), 548);
    }

    #[test]
    fn a_node_report_is_read_from_the_last_json_line_of_its_log() {
        let log = "some warning\n{\"sent\":10,\"received\":9,\"secs\":1.5}\n";
        let r = last_report(log).expect("report");
        assert_eq!((r.sent, r.received), (10, 9));
    }
}
