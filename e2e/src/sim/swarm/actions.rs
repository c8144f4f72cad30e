//! What each agent does on an event: ask for pieces (the picker), admit,
//! queue or refuse requests (the upload rule), forward what it received.

use super::{Ev, FlowOf, REFUSAL_BACKOFF, Sim, Waiter};
use peerfill_agent::swarm::picker::PeerId;
use peerfill_agent::swarm::uploads::{self, Arrival};
use peerfill_agent::swarm::{OriginRequests, pipeline_for};
use rand::seq::SliceRandom;

impl Sim<'_> {
    /// Sends reader `i`'s next range request, if its range has one left.
    pub(super) fn next_origin_request(&mut self, i: usize) {
        let (reader, next, end) = self.reader_next[i];
        if next >= end {
            return;
        }
        self.reader_next[i].1 += 1;
        self.at(
            self.cfg.rtt,
            Ev::OriginStart {
                reader,
                piece: next,
            },
        );
    }

    /// A reader got a piece of its range from the origin.
    pub(super) fn origin_piece(&mut self, reader: u32, piece: u32) -> bool {
        self.origin_bytes += self.piece_len(piece) as f64;
        let a = &mut self.agents[reader as usize];
        a.picker.set_hash_known(piece);
        a.picker.set_have(piece);
        let completed = self.check_done(reader);
        self.at(
            self.cfg.rtt / 2.0,
            Ev::Announce {
                node: reader,
                piece,
                fresh: true,
            },
        );
        if let Some(i) = self.reader_next.iter().position(|r| r.0 == reader) {
            self.next_origin_request(i);
            self.reader_done[i] += 1;
            if self.reader_done[i] == 1 {
                // The first piece came alone; the others start together.
                let share = OriginRequests {
                    per_reader: self.cfg.origin_concurrency,
                    total: self.cfg.origin_requests,
                }
                .per_reader(self.reader_next.len(), self.reader_next.len());
                for _ in 1..share {
                    self.at(0.0, Ev::OriginNext { i: i as u32 });
                }
            }
        }
        completed
    }

    fn check_done(&mut self, node: u32) -> bool {
        let a = &mut self.agents[node as usize];
        if a.done_at.is_none() && a.picker.is_complete() {
            a.done_at = Some(self.now);
            return true;
        }
        false
    }

    /// Bytes of the download budget one request takes (the agent's
    /// `buffer_units`: a full piece, at most the whole budget).
    fn request_bytes(&self) -> u64 {
        self.piece_size.min(self.cfg.download_budget)
    }

    fn release_permit(&mut self, node: u32, session: usize) {
        let need = self.request_bytes();
        let a = &mut self.agents[node as usize];
        a.outstanding[session] = a.outstanding[session].saturating_sub(1);
        a.inflight = a.inflight.saturating_sub(1);
        a.inflight_bytes = a.inflight_bytes.saturating_sub(need);
    }

    /// Asks for pieces while download permits are free: from session
    /// `only`, or round robin over all sessions.
    pub(super) fn fill(&mut self, node: u32, only: Option<u32>) {
        let need = self.request_bytes();
        let (max_inflight, budget) = (self.cfg.max_inflight, self.cfg.download_budget);
        let now = self.instant(self.now);
        let Sim { agents, rng, .. } = self;
        let a = &mut agents[node as usize];
        let k = a.peers.len();
        let pipeline = pipeline_for(max_inflight, k, self.cfg.pipeline);
        if k == 0 || a.picker.is_complete() {
            return;
        }
        let mut asked = Vec::new();
        let mut misses = 0;
        loop {
            let permit =
                a.inflight < max_inflight && (a.inflight == 0 || a.inflight_bytes + need <= budget);
            if !permit {
                break;
            }
            let s = match only {
                Some(s) => s as usize,
                None => {
                    if misses >= k {
                        break;
                    }
                    let s = a.rr % k;
                    a.rr = (s + 1) % k;
                    s
                }
            };
            let picked = if a.dry[s] || usize::from(a.outstanding[s]) >= pipeline {
                None
            } else {
                let p = a.picker.pick(s as PeerId, rng, now);
                // A remote session may be held back only while near peers
                // offer something, which changes with any request: it is
                // looked at again each time (the agent wakes every session
                // on any change).
                a.dry[s] = p.is_none() && !a.picker.is_remote(s as PeerId);
                p
            };
            match picked {
                Some(p) => {
                    a.outstanding[s] += 1;
                    a.inflight += 1;
                    a.inflight_bytes += need;
                    a.pending.insert((s as u32, p));
                    asked.push((a.peers[s], p));
                    misses = 0;
                    // The endgame (duplicates) may start once every missing
                    // piece is asked for: fewer missing than requests out.
                    if a.picker.missing() <= max_inflight && a.picker.is_endgame() {
                        a.dry.iter_mut().for_each(|d| *d = false);
                    }
                }
                None if only.is_some() => break,
                None => misses += 1,
            }
        }
        for (to, piece) in asked {
            self.at(
                self.cfg.rtt / 2.0,
                Ev::Request {
                    from: node,
                    to,
                    piece,
                },
            );
        }
    }

    /// A request reached `holder` (the agent's `UploadQueue::admit`).
    pub(super) fn admit(&mut self, holder: u32, node: u32, piece: u32) {
        let len = self.piece_len(piece);
        let limits = self.limits;
        let a = &mut self.agents[holder as usize];
        if a.waiting.is_empty() && limits.fits(a.busy, a.busy_bytes, len) {
            a.busy += 1;
            a.busy_bytes += len;
            a.sent[piece as usize] += 1;
            self.start_upload(holder, node, piece);
            return;
        }
        if uploads::on_arrival(a.sent[piece as usize]) == Arrival::Refuse {
            self.refusals += 1;
            self.at(
                self.cfg.rtt / 2.0,
                Ev::Refused {
                    node,
                    holder,
                    piece,
                },
            );
            return;
        }
        let seq = a.next_seq;
        a.next_seq += 1;
        a.waiting.push(Waiter {
            seq,
            node,
            piece,
            len,
        });
        self.dispatch(holder);
    }

    /// Hands free upload slots to the best waiting requests.
    pub(super) fn dispatch(&mut self, holder: u32) {
        let limits = self.limits;
        loop {
            let a = &mut self.agents[holder as usize];
            if a.busy >= limits.slots {
                return;
            }
            let keys: Vec<(u32, u64)> = a
                .waiting
                .iter()
                .map(|w| (a.sent[w.piece as usize], w.seq))
                .collect();
            let Some(i) = uploads::next_to_serve(&keys) else {
                return;
            };
            // The best request waits for room rather than be overtaken.
            if !limits.fits(a.busy, a.busy_bytes, a.waiting[i].len) {
                return;
            }
            let w = a.waiting.swap_remove(i);
            a.busy += 1;
            a.busy_bytes += w.len;
            a.sent[w.piece as usize] += 1;
            self.start_upload(holder, w.node, w.piece);
        }
    }

    fn start_upload(&mut self, holder: u32, node: u32, piece: u32) {
        let (h, r) = (holder as usize, node as usize);
        let mut links = vec![self.up[h], self.down[r]];
        if let Some(x) = self.cross[self.topo.zone[h]][self.topo.zone[r]] {
            links.push(x);
        }
        let len = self.piece_len(piece) as f64;
        let (id, moved) = self.net.start(self.now, &links, len);
        self.flows.insert(
            id,
            FlowOf::Upload {
                holder,
                node,
                piece,
            },
        );
        self.uploads.insert((holder, node, piece), id);
        self.reschedule(moved);
    }

    fn session(&self, node: u32, peer: u32) -> Option<usize> {
        self.agents[node as usize].peers.binary_search(&peer).ok()
    }

    /// The holder refused for now: other holders first for a while.
    pub(super) fn refused(&mut self, node: u32, holder: u32, piece: u32) {
        let Some(s) = self.session(node, holder) else {
            return;
        };
        if !self.agents[node as usize]
            .pending
            .remove(&(s as u32, piece))
        {
            return;
        }
        let until = self.instant(self.now + REFUSAL_BACKOFF);
        self.agents[node as usize]
            .picker
            .refused(piece, s as PeerId, until);
        self.release_permit(node, s);
        // Look again when the backoff ends (the agent polls every 50 ms);
        // other holders may be asked now.
        let t = self.now + REFUSAL_BACKOFF + 1e-6;
        let a = &mut self.agents[node as usize];
        a.dry.iter_mut().for_each(|d| *d = false);
        match a.recheck_at {
            None => {
                a.recheck_at = Some(t);
                self.at(t - self.now, Ev::Recheck { node });
            }
            Some(_) => a.recheck_again = Some(t),
        }
        self.fill(node, None);
    }

    /// A piece reached `node`: written and announced, or a duplicate.
    pub(super) fn delivered(&mut self, node: u32, holder: u32, piece: u32) -> bool {
        let len = self.piece_len(piece) as f64;
        let Some(s) = self.session(node, holder) else {
            return false;
        };
        if !self.agents[node as usize]
            .pending
            .remove(&(s as u32, piece))
        {
            // Cancelled meanwhile (an endgame loser): the bytes are wasted.
            self.wasted += len;
            return false;
        }
        self.release_permit(node, s);
        let a = &mut self.agents[node as usize];
        let mut completed = false;
        if a.picker.begin_write(piece, s as PeerId) {
            let losers = a.picker.finish_write(piece);
            for l in losers {
                let l = l as usize;
                if self.agents[node as usize]
                    .pending
                    .remove(&(l as u32, piece))
                {
                    self.release_permit(node, l);
                    let holder = self.agents[node as usize].peers[l];
                    self.at(
                        self.cfg.rtt / 2.0,
                        Ev::Cancel {
                            holder,
                            node,
                            piece,
                        },
                    );
                }
            }
            completed = self.check_done(node);
            self.at(
                self.cfg.rtt / 2.0,
                Ev::Announce {
                    node,
                    piece,
                    fresh: false,
                },
            );
        } else {
            self.wasted += len;
        }
        self.fill(node, None);
        completed
    }

    /// `node`'s announcement of `piece` reached its peers (and, for a
    /// piece fresh from the origin, its hash every node).
    pub(super) fn announce(&mut self, node: u32, piece: u32, fresh: bool) {
        if fresh {
            for (m, a) in self.agents.iter_mut().enumerate() {
                if m != node as usize {
                    a.picker.set_hash_known(piece);
                }
            }
        }
        // Peers hear of it in no fixed order: in the agents, scheduling
        // and the network decide who asks first, and a fixed order would
        // put the same nodes at the back of every holder's queue.
        let mut order: Vec<usize> = (0..self.agents[node as usize].peers.len()).collect();
        order.shuffle(&mut self.rng);
        for j in order {
            let (m, b) = {
                let a = &self.agents[node as usize];
                (a.peers[j], a.back[j])
            };
            let peer = &mut self.agents[m as usize];
            peer.picker.peer_has(PeerId::from(b), piece);
            peer.dry[b as usize] = false;
            self.fill(m, Some(b));
        }
    }

    /// The requester cancelled (it got the piece elsewhere).
    pub(super) fn cancel(&mut self, holder: u32, node: u32, piece: u32) {
        let a = &mut self.agents[holder as usize];
        if let Some(i) = a
            .waiting
            .iter()
            .position(|w| w.node == node && w.piece == piece)
        {
            a.waiting.swap_remove(i);
            return;
        }
        let Some(id) = self.uploads.remove(&(holder, node, piece)) else {
            return;
        };
        self.flows.remove(&id);
        let (left, moved) = self.net.stop(self.now, id);
        self.reschedule(moved);
        let len = self.piece_len(piece);
        self.wasted += len as f64 - left;
        let a = &mut self.agents[holder as usize];
        a.busy = a.busy.saturating_sub(1);
        a.busy_bytes = a.busy_bytes.saturating_sub(len);
        self.dispatch(holder);
    }
}
