//! The agents in the simulator: the agent's own [`Picker`] per node, its
//! upload admission rule ([`uploads::Limits`], `on_arrival`,
//! `next_to_serve`), its download permits and pipeline (`pipeline_for`), and
//! origin readers reading their ranges with several requests in flight.
//!
//! Timeline of one piece from a peer (RTT = `rtt`): the requester picks it
//! and sends the request (a download permit is held from here), which
//! arrives RTT/2 later; the holder admits it (a flow starts on its uplink),
//! queues it, or refuses it for now (the refusal reaches the requester
//! RTT/2 later, which then asks other holders for
//! [`REFUSAL_BACKOFF`] s). The flow ends when its bytes drained through
//! the links; the piece is at the requester RTT/2 later (verified, written,
//! announced: the announcement reaches its peers another RTT/2 later), and
//! the holder's upload slot frees a full RTT after the flow ended. (The
//! agent frees the slot once the piece's bytes are all sent and its budget
//! share once they are acknowledged; this model has no queues, so both
//! come within an RTT of the flow's end.) An origin reader's range request
//! starts its flow one RTT after it is sent (the HTTP request and the
//! first byte).
//!
//! Zones: every agent is told its peers' zones (as the operator's
//! `spec.peers[].zone` tells the real one), so its picker asks another
//! zone's peers only when its own zone's offer nothing (`zone_blind`: the
//! A/B run without zones).
//!
//! Simplifications: CPU, disk and verification take no time; every node
//! starts at 0 with the size known and its sessions open; a hash becomes
//! known everywhere when its reader's announcement arrives (the authority
//! peers with every node today; with relayed hash lists it would trail by
//! a hop or two); nothing fails. The download loop's permit queue is
//! modelled as a round robin over the node's sessions.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use peerfill_agent::swarm::picker::{PeerId, Picker};
use peerfill_agent::swarm::uploads::Limits;
use rand::SeedableRng;
use rand::rngs::StdRng;

mod actions;

use super::net::{FlowId, LinkId, Net, Reschedule};
use super::topology::Topology;
use super::{Config, SimError};

/// How long a refused piece is asked of other holders only (the agent's
/// `swarm::fill::REFUSAL_BACKOFF`, private there).
pub const REFUSAL_BACKOFF: f64 = 0.5;

/// Class of node uplinks in the per-second series.
pub const UPLINKS: usize = 0;

#[derive(Debug, Clone, Copy)]
enum Ev {
    FlowEnd {
        flow: FlowId,
        version: u64,
    },
    Request {
        from: u32,
        to: u32,
        piece: u32,
    },
    Refused {
        node: u32,
        holder: u32,
        piece: u32,
    },
    Delivered {
        node: u32,
        holder: u32,
        piece: u32,
    },
    SlotFree {
        node: u32,
        len: u64,
    },
    Announce {
        node: u32,
        piece: u32,
        fresh: bool,
    },
    Cancel {
        holder: u32,
        node: u32,
        piece: u32,
    },
    OriginStart {
        reader: u32,
        piece: u32,
    },
    /// Reader `i` sends its next range request.
    OriginNext {
        i: u32,
    },
    Recheck {
        node: u32,
    },
}

struct Queued {
    at: f64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    // Earliest first (BinaryHeap is a max-heap), then in scheduling order.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.at.total_cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Debug, Clone, Copy)]
enum FlowOf {
    Upload { holder: u32, node: u32, piece: u32 },
    Origin { reader: u32, piece: u32 },
}

struct Waiter {
    seq: u64,
    node: u32,
    piece: u32,
    len: u64,
}

/// One simulated agent.
struct Agent {
    picker: Picker,
    /// Peers as node indices; a session's `PeerId` is the index here.
    peers: Vec<u32>,
    /// For each peer: our index in that peer's list.
    back: Vec<u32>,
    outstanding: Vec<u8>,
    /// Sessions whose last pick found nothing, skipped until something
    /// that could change that happens (saves O(pieces) picks that the
    /// agent would not make: a session that has nothing to ask for does
    /// not stand in the permit queue).
    dry: Vec<bool>,
    /// Requests out: (session, piece).
    pending: HashSet<(u32, u32)>,
    inflight: usize,
    inflight_bytes: u64,
    rr: usize,
    recheck_at: Option<f64>,
    recheck_again: Option<f64>,
    // Upload side.
    sent: Vec<u32>,
    busy: usize,
    busy_bytes: u64,
    waiting: Vec<Waiter>,
    next_seq: u64,
    done_at: Option<f64>,
}

/// What a run measured (turned into the report by `super::report`).
pub struct Outcome {
    pub done_at: Vec<Option<f64>>,
    pub origin_bytes: f64,
    /// Bytes into each zone from other zones.
    pub cross_zone_in: Vec<f64>,
    /// Bytes each node uploaded.
    pub uploaded: Vec<f64>,
    pub uplink_series: Vec<f64>,
    pub wasted_bytes: f64,
    pub refusals: u64,
    pub events: u64,
    pub end: f64,
}

pub struct Sim<'a> {
    cfg: &'a Config,
    topo: &'a Topology,
    piece_size: u64,
    size: u64,
    net: Net,
    up: Vec<LinkId>,
    down: Vec<LinkId>,
    origin_up: LinkId,
    /// Directed link between zones `[from][to]`.
    cross: Vec<Vec<Option<LinkId>>>,
    agents: Vec<Agent>,
    flows: HashMap<FlowId, FlowOf>,
    uploads: HashMap<(u32, u32, u32), FlowId>,
    /// Next piece of each reader's range to request, and its end.
    reader_next: Vec<(u32, u32, u32)>,
    /// Pieces each reader has read from the origin.
    reader_done: Vec<u32>,
    queue: BinaryHeap<Queued>,
    seq: u64,
    now: f64,
    base: Instant,
    rng: StdRng,
    origin_bytes: f64,
    wasted: f64,
    refusals: u64,
    limits: Limits,
}

impl<'a> Sim<'a> {
    pub fn new(cfg: &'a Config, topo: &'a Topology, pieces: u32, piece_size: u64) -> Self {
        let n = topo.names.len();
        let mut net = Net::new(cfg.fairness, 1);
        let peer_eff = cfg.peer_efficiency;
        let up: Vec<LinkId> = (0..n)
            .map(|_| net.add_link(cfg.node_up * peer_eff, Some(UPLINKS)))
            .collect();
        let down: Vec<LinkId> = (0..n)
            .map(|_| net.add_link(cfg.node_down * peer_eff, None))
            .collect();
        let origin_up = net.add_link(cfg.origin * cfg.origin_efficiency, None);
        let zones = topo.zone.iter().copied().max().map_or(1, |z| z + 1);
        let cross = (0..zones)
            .map(|a| {
                (0..zones)
                    .map(|b| (a != b).then(|| net.add_link(cfg.cross_zone * peer_eff, None)))
                    .collect()
            })
            .collect();
        let agents = (0..n)
            .map(|i| {
                let peers: Vec<u32> = topo.peers[i].iter().map(|&p| p as u32).collect();
                let back = topo.peers[i]
                    .iter()
                    .map(|&p| {
                        topo.peers[p]
                            .binary_search(&i)
                            .map_or(u32::MAX, |b| b as u32)
                    })
                    .collect();
                let mut picker = Picker::new(pieces);
                for (s, &p) in peers.iter().enumerate() {
                    picker.add_peer(s as PeerId, |_| false);
                    // The agent learns its peers' zones from its NodeFill.
                    let remote = topo.zone[p as usize] != topo.zone[i];
                    picker.set_remote(s as PeerId, remote && !cfg.zone_blind);
                }
                Agent {
                    picker,
                    outstanding: vec![0; peers.len()],
                    dry: vec![false; peers.len()],
                    peers,
                    back,
                    pending: HashSet::new(),
                    inflight: 0,
                    inflight_bytes: 0,
                    rr: i,
                    recheck_at: None,
                    recheck_again: None,
                    sent: vec![0; pieces as usize],
                    busy: 0,
                    busy_bytes: 0,
                    waiting: Vec::new(),
                    next_seq: 0,
                    done_at: None,
                }
            })
            .collect();
        let reader_next: Vec<(u32, u32, u32)> = topo
            .readers
            .iter()
            .map(|&(r, a, b)| (r as u32, a, b))
            .collect();
        Sim {
            cfg,
            topo,
            piece_size,
            size: cfg.size,
            net,
            up,
            down,
            origin_up,
            cross,
            agents,
            flows: HashMap::new(),
            uploads: HashMap::new(),
            reader_done: vec![0; reader_next.len()],
            reader_next,
            queue: BinaryHeap::new(),
            seq: 0,
            now: 0.0,
            base: Instant::now(),
            rng: StdRng::seed_from_u64(cfg.seed),
            origin_bytes: 0.0,
            wasted: 0.0,
            refusals: 0,
            limits: Limits::new(cfg.upload_slots, cfg.upload_budget),
        }
    }

    fn at(&mut self, delay: f64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Queued {
            at: self.now + delay.max(0.0),
            seq: self.seq,
            ev,
        });
    }

    fn instant(&self, t: f64) -> Instant {
        self.base + Duration::from_secs_f64(t.max(0.0))
    }

    fn piece_len(&self, piece: u32) -> u64 {
        let start = u64::from(piece) * self.piece_size;
        self.piece_size.min(self.size.saturating_sub(start))
    }

    fn reschedule(&mut self, list: Vec<Reschedule>) {
        for r in list {
            if r.at.is_finite() {
                self.seq += 1;
                self.queue.push(Queued {
                    at: r.at,
                    seq: self.seq,
                    ev: Ev::FlowEnd {
                        flow: r.id,
                        version: r.version,
                    },
                });
            }
        }
    }

    /// Runs to the last node's copy, or fails at the configured limit.
    /// `progress` is called about once per simulated second.
    pub fn run(mut self, mut progress: impl FnMut(f64, usize, usize)) -> Result<Outcome, SimError> {
        for i in 0..self.reader_next.len() {
            // The agent reads the first piece alone, then keeps
            // its share of the origin's requests in flight (`origin_piece`).
            self.next_origin_request(i);
        }
        let n = self.agents.len();
        let mut done = 0;
        let mut events = 0u64;
        let mut next_progress = 1.0;
        while done < n {
            let Some(q) = self.queue.pop() else {
                return Err(SimError::Stuck {
                    at: self.now,
                    done,
                    nodes: n,
                });
            };
            self.now = q.at;
            if self.now > self.cfg.limit_secs {
                return Err(SimError::Limit {
                    limit: self.cfg.limit_secs,
                    done,
                    nodes: n,
                });
            }
            if self.now >= next_progress {
                progress(self.now, done, self.net.active_flows());
                next_progress = self.now.floor() + 1.0;
            }
            events += 1;
            if self.handle(q.ev) {
                done += 1;
            }
        }
        self.net.settle_all(self.now);
        let zones = self.cross.len();
        let cross_zone_in = (0..zones)
            .map(|to| {
                (0..zones)
                    .filter_map(|from| self.cross[from][to])
                    .map(|l| self.net.carried(l))
                    .fold(0.0, |a, b| a + b)
            })
            .collect();
        Ok(Outcome {
            done_at: self.agents.iter().map(|a| a.done_at).collect(),
            origin_bytes: self.origin_bytes,
            cross_zone_in,
            uploaded: self.up.iter().map(|&l| self.net.carried(l)).collect(),
            uplink_series: self.net.series(UPLINKS).to_vec(),
            wasted_bytes: self.wasted,
            refusals: self.refusals,
            events,
            end: self.now,
        })
    }

    /// Handles one event; true when it completed a node.
    fn handle(&mut self, ev: Ev) -> bool {
        let half = self.cfg.rtt / 2.0;
        match ev {
            Ev::FlowEnd { flow, version } => {
                if !self.net.is_current(flow, version) {
                    return false;
                }
                let (left, moved) = self.net.stop(self.now, flow);
                debug_assert!(left < 1.0, "flow ended with {left} bytes left");
                self.reschedule(moved);
                match self.flows.remove(&flow) {
                    Some(FlowOf::Upload {
                        holder,
                        node,
                        piece,
                    }) => {
                        self.uploads.remove(&(holder, node, piece));
                        self.at(
                            half,
                            Ev::Delivered {
                                node,
                                holder,
                                piece,
                            },
                        );
                        let len = self.piece_len(piece);
                        self.at(2.0 * half, Ev::SlotFree { node: holder, len });
                        false
                    }
                    Some(FlowOf::Origin { reader, piece }) => self.origin_piece(reader, piece),
                    None => false,
                }
            }
            Ev::OriginStart { reader, piece } => {
                let len = self.piece_len(piece) as f64;
                let links = [self.origin_up, self.down[reader as usize]];
                let (id, moved) = self.net.start(self.now, &links, len);
                self.flows.insert(id, FlowOf::Origin { reader, piece });
                self.reschedule(moved);
                false
            }
            Ev::OriginNext { i } => {
                self.next_origin_request(i as usize);
                false
            }
            Ev::Request { from, to, piece } => {
                self.admit(to, from, piece);
                false
            }
            Ev::Refused {
                node,
                holder,
                piece,
            } => {
                self.refused(node, holder, piece);
                false
            }
            Ev::Delivered {
                node,
                holder,
                piece,
            } => self.delivered(node, holder, piece),
            Ev::SlotFree { node, len } => {
                let a = &mut self.agents[node as usize];
                a.busy = a.busy.saturating_sub(1);
                a.busy_bytes = a.busy_bytes.saturating_sub(len);
                self.dispatch(node);
                false
            }
            Ev::Announce { node, piece, fresh } => {
                self.announce(node, piece, fresh);
                false
            }
            Ev::Cancel {
                holder,
                node,
                piece,
            } => {
                self.cancel(holder, node, piece);
                false
            }
            Ev::Recheck { node } => {
                let a = &mut self.agents[node as usize];
                a.recheck_at = None;
                a.dry.iter_mut().for_each(|d| *d = false);
                if let Some(t) = a.recheck_again.take()
                    && t > self.now
                {
                    a.recheck_at = Some(t);
                    let delay = t - self.now;
                    self.at(delay, Ev::Recheck { node });
                }
                self.fill(node, None);
                false
            }
        }
    }
}
