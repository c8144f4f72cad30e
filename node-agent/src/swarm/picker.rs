//! Piece selection, free of I/O: which piece to ask a given peer for next.
//!
//! Rarest first (fewest connected holders, random among equals so agents
//! that see the same swarm do not all pick the same piece), only pieces whose
//! hash is already known (a piece we cannot verify is never requested), one
//! outstanding request per piece until the endgame, then up to
//! [`ENDGAME_DUPLICATES`] requests per piece on distinct peers so a slow peer
//! does not hold up the last pieces; the first verified copy wins and the
//! others are cancelled.
//!
//! Zones: a peer known to sit in another zone ([`Picker::set_remote`]) is
//! asked only when no peer of our own zone offers anything we could ask
//! for now (a requestable piece nobody is fetching yet), so a piece
//! crosses into a zone about once and then spreads inside it; in the
//! endgame a remote peer duplicates only pieces no same-zone peer holds.
//! Cross-zone links are the scarce, metered ones, and inside a zone of
//! thousands of nodes there is almost always a near holder. Peers of
//! unknown zone count as near: without zone labels (one-zone clusters)
//! the picker behaves as if zones did not exist.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use rand::Rng;

/// Identifies one peer session (a connection to one node for one content).
pub type PeerId = u64;

/// Most concurrent requests for one piece during the endgame.
pub const ENDGAME_DUPLICATES: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Missing,
    /// Verified data is being written; no more requests.
    Writing,
    Have,
}

/// The selection state of one content.
#[derive(Debug)]
pub struct Picker {
    state: Vec<State>,
    hash_known: Vec<bool>,
    /// Connected peers holding each piece.
    availability: Vec<u32>,
    /// Peers with an outstanding request for each piece.
    inflight: Vec<Vec<PeerId>>,
    peers: HashMap<PeerId, Vec<bool>>,
    /// Peers known to be in another zone.
    remote: HashSet<PeerId>,
    /// Connected near (not remote) peers holding each piece.
    near_availability: Vec<u32>,
    /// Pieces a peer refused for now, not to be asked of it again before
    /// the instant (other holders first).
    refused: HashMap<PeerId, HashMap<u32, Instant>>,
    missing: usize,
}

impl Picker {
    /// A picker for `pieces` pieces, none held, no hash known.
    pub fn new(pieces: u32) -> Self {
        let n = pieces as usize;
        Picker {
            state: vec![State::Missing; n],
            hash_known: vec![false; n],
            availability: vec![0; n],
            inflight: vec![Vec::new(); n],
            peers: HashMap::new(),
            remote: HashSet::new(),
            near_availability: vec![0; n],
            refused: HashMap::new(),
            missing: n,
        }
    }

    pub fn piece_count(&self) -> u32 {
        self.state.len() as u32
    }

    fn valid(&self, piece: u32) -> bool {
        (piece as usize) < self.state.len()
    }

    fn requestable(&self, i: usize) -> bool {
        self.state[i] == State::Missing && self.hash_known[i]
    }

    /// Marks a piece as held (resumed from disk, read from the origin, or
    /// written after verification).
    pub fn set_have(&mut self, piece: u32) {
        if !self.valid(piece) {
            return;
        }
        let i = piece as usize;
        if self.state[i] == State::Have {
            return;
        }
        self.missing -= 1;
        self.state[i] = State::Have;
        self.inflight[i].clear();
    }

    /// Records that the hash of a piece is known, so it may be requested.
    pub fn set_hash_known(&mut self, piece: u32) {
        if !self.valid(piece) {
            return;
        }
        let i = piece as usize;
        self.hash_known[i] = true;
    }

    pub fn hash_known(&self, piece: u32) -> bool {
        self.valid(piece) && self.hash_known[piece as usize]
    }

    pub fn have(&self, piece: u32) -> bool {
        self.valid(piece) && self.state[piece as usize] == State::Have
    }

    pub fn missing(&self) -> usize {
        self.missing
    }

    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// Every requestable missing piece already has a request outstanding and
    /// no piece is waiting for its hash.
    pub fn is_endgame(&self) -> bool {
        self.missing > 0
            && (0..self.state.len()).all(|i| {
                self.state[i] != State::Missing
                    || (self.hash_known[i] && !self.inflight[i].is_empty())
            })
    }

    /// Adds a peer with its bitfield (one bool per piece; shorter is padded).
    /// A bitfield sent again replaces the first; the peer's zone is kept.
    pub fn add_peer(&mut self, peer: PeerId, has: impl Fn(usize) -> bool) {
        self.forget_bits(peer);
        let near = !self.remote.contains(&peer);
        let bits: Vec<bool> = (0..self.state.len()).map(has).collect();
        for (i, b) in bits.iter().enumerate() {
            if *b {
                self.availability[i] += 1;
                self.near_availability[i] += u32::from(near);
            }
        }
        self.peers.insert(peer, bits);
    }

    /// Marks a peer as being in another zone (`true`) or not. Either may be
    /// set before or after the peer's bitfield arrives.
    pub fn set_remote(&mut self, peer: PeerId, remote: bool) {
        let changed = if remote {
            self.remote.insert(peer)
        } else {
            self.remote.remove(&peer)
        };
        if !changed {
            return;
        }
        if let Some(bits) = self.peers.get(&peer) {
            for (i, b) in bits.iter().enumerate() {
                if *b {
                    if remote {
                        self.near_availability[i] -= 1;
                    } else {
                        self.near_availability[i] += 1;
                    }
                }
            }
        }
    }

    pub fn is_remote(&self, peer: PeerId) -> bool {
        self.remote.contains(&peer)
    }

    fn forget_bits(&mut self, peer: PeerId) {
        let near = !self.remote.contains(&peer);
        if let Some(bits) = self.peers.remove(&peer) {
            for (i, b) in bits.iter().enumerate() {
                if *b {
                    self.availability[i] -= 1;
                    self.near_availability[i] -= u32::from(near);
                }
            }
        }
    }

    /// Forgets a peer: its availability, its zone and its outstanding
    /// requests (the caller drops those requests; the pieces go back to
    /// the pool).
    pub fn remove_peer(&mut self, peer: PeerId) {
        self.refused.remove(&peer);
        self.forget_bits(peer);
        self.remote.remove(&peer);
        for i in 0..self.state.len() {
            if self.inflight[i].contains(&peer) {
                self.release_index(i, peer);
            }
        }
    }

    /// The peer announced a new piece.
    pub fn peer_has(&mut self, peer: PeerId, piece: u32) {
        if !self.valid(piece) {
            return;
        }
        if let Some(bits) = self.peers.get_mut(&peer)
            && !bits[piece as usize]
        {
            bits[piece as usize] = true;
            self.availability[piece as usize] += 1;
            self.near_availability[piece as usize] += u32::from(!self.remote.contains(&peer));
        }
    }

    /// Whether a near peer holds a requestable piece nobody is fetching:
    /// while one does, remote peers are not asked.
    fn near_offers(&self) -> bool {
        (0..self.state.len()).any(|i| {
            self.near_availability[i] > 0 && self.requestable(i) && self.inflight[i].is_empty()
        })
    }

    /// Whether the peer announced `piece`.
    pub fn peer_holds(&self, peer: PeerId, piece: u32) -> bool {
        self.peers
            .get(&peer)
            .and_then(|bits| bits.get(piece as usize))
            .copied()
            .unwrap_or(false)
    }

    /// Whether the peer holds a piece we could request now.
    pub fn interesting(&self, peer: PeerId) -> bool {
        let Some(bits) = self.peers.get(&peer) else {
            return false;
        };
        if self.remote.contains(&peer) && self.near_offers() {
            return false;
        }
        (0..self.state.len()).any(|i| bits[i] && self.requestable(i))
    }

    /// The peer refused `piece` for now: the request ends, and the piece is
    /// not asked of that peer again before `until` (other holders may be).
    pub fn refused(&mut self, piece: u32, peer: PeerId, until: Instant) {
        if !self.valid(piece) {
            return;
        }
        self.release_index(piece as usize, peer);
        self.refused.entry(peer).or_default().insert(piece, until);
    }

    /// Chooses the next piece to request from `peer` and records the request.
    pub fn pick(&mut self, peer: PeerId, rng: &mut impl Rng, now: Instant) -> Option<u32> {
        if let Some(r) = self.refused.get_mut(&peer) {
            r.retain(|_, until| *until > now);
        }
        let refused = self.refused.get(&peer);
        let is_refused = |i: usize| refused.is_some_and(|r| r.contains_key(&(i as u32)));
        let bits = self.peers.get(&peer)?;
        let remote = self.remote.contains(&peer);
        if remote && self.near_offers() {
            return None;
        }
        let mut best: Option<(u32, usize)> = None; // (availability, index)
        let mut ties = 0u32;
        for (i, &has) in bits.iter().enumerate() {
            if !has || !self.requestable(i) || !self.inflight[i].is_empty() || is_refused(i) {
                continue;
            }
            let a = self.availability[i];
            match best {
                Some((b, _)) if a > b => {}
                Some((b, _)) if a == b => {
                    ties += 1;
                    if rng.random_range(0..ties) == 0 {
                        best = Some((a, i));
                    }
                }
                _ => {
                    best = Some((a, i));
                    ties = 1;
                }
            }
        }
        if best.is_none() && self.is_endgame() {
            // Duplicate the request with the fewest copies out.
            let mut fewest = usize::MAX;
            ties = 0;
            for (i, &has) in bits.iter().enumerate() {
                let out = &self.inflight[i];
                if !has
                    || !self.requestable(i)
                    || out.len() >= ENDGAME_DUPLICATES
                    || out.contains(&peer)
                    || is_refused(i)
                    || (remote && self.near_availability[i] > 0)
                {
                    continue;
                }
                if out.len() < fewest {
                    fewest = out.len();
                    best = Some((0, i));
                    ties = 1;
                } else if out.len() == fewest {
                    ties += 1;
                    if rng.random_range(0..ties) == 0 {
                        best = Some((0, i));
                    }
                }
            }
        }
        let (_, i) = best?;
        self.inflight[i].push(peer);
        Some(i as u32)
    }

    fn release_index(&mut self, i: usize, peer: PeerId) {
        self.inflight[i].retain(|p| *p != peer);
    }

    /// A request ended without a usable piece (error, reject, bad data,
    /// cancelled): the piece is requestable again.
    pub fn release(&mut self, piece: u32, peer: PeerId) {
        if self.valid(piece) {
            self.release_index(piece as usize, peer);
        }
    }

    /// A verified copy arrived from `peer`: stop further requests while it is
    /// written. Returns false when another copy is already being written or
    /// held (a duplicate from the endgame), in which case the data is dropped.
    pub fn begin_write(&mut self, piece: u32, peer: PeerId) -> bool {
        if !self.valid(piece) {
            return false;
        }
        let i = piece as usize;
        self.inflight[i].retain(|p| *p != peer);
        if self.state[i] != State::Missing {
            return false;
        }
        self.state[i] = State::Writing;
        true
    }

    /// The write of a piece failed: it is missing again.
    pub fn abort_write(&mut self, piece: u32) {
        if !self.valid(piece) {
            return;
        }
        let i = piece as usize;
        if self.state[i] == State::Writing {
            self.state[i] = State::Missing;
        }
    }

    /// The piece is written and held. Returns the other peers that still
    /// have a request out for it (endgame losers, to cancel).
    pub fn finish_write(&mut self, piece: u32) -> Vec<PeerId> {
        if !self.valid(piece) {
            return Vec::new();
        }
        let i = piece as usize;
        let losers = std::mem::take(&mut self.inflight[i]);
        if self.state[i] != State::Have {
            self.state[i] = State::Have;
            self.missing -= 1;
        }
        losers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn known(p: &mut Picker) {
        for i in 0..p.piece_count() {
            p.set_hash_known(i);
        }
    }

    #[test]
    fn picks_rarest_first() {
        let mut p = Picker::new(4);
        known(&mut p);
        p.add_peer(1, |_| true);
        p.add_peer(2, |i| i != 2);
        p.add_peer(3, |i| i != 2 && i != 1);
        // Piece 2 is held by one peer only, piece 1 by two, 0 and 3 by three.
        assert_eq!(p.pick(1, &mut rng(), Instant::now()), Some(2));
        assert_eq!(p.pick(1, &mut rng(), Instant::now()), Some(1));
        let third = p.pick(1, &mut rng(), Instant::now()).unwrap();
        assert!(third == 0 || third == 3);
    }

    #[test]
    fn never_picks_pieces_without_hash_or_held() {
        let mut p = Picker::new(3);
        p.add_peer(1, |_| true);
        assert_eq!(p.pick(1, &mut rng(), Instant::now()), None);
        p.set_hash_known(1);
        p.set_have(0);
        p.set_hash_known(0);
        assert_eq!(p.pick(1, &mut rng(), Instant::now()), Some(1));
        assert_eq!(p.pick(1, &mut rng(), Instant::now()), None);
    }

    #[test]
    fn endgame_duplicates_on_distinct_peers_and_reports_losers() {
        let mut p = Picker::new(2);
        known(&mut p);
        p.add_peer(1, |_| true);
        p.add_peer(2, |_| true);
        p.add_peer(3, |_| true);
        let a = p.pick(1, &mut rng(), Instant::now()).unwrap();
        let b = p.pick(2, &mut rng(), Instant::now()).unwrap();
        assert_ne!(a, b);
        assert!(p.is_endgame());
        // Peer 1 may duplicate the other piece but not its own.
        assert_eq!(p.pick(1, &mut rng(), Instant::now()), Some(b));
        // Peer 3 duplicates piece a (b already has two copies out).
        assert_eq!(p.pick(3, &mut rng(), Instant::now()), Some(a));
        assert_eq!(p.pick(3, &mut rng(), Instant::now()), None);
        assert!(p.begin_write(b, 2));
        assert!(!p.begin_write(b, 1), "second copy is a duplicate");
        assert_eq!(p.finish_write(b), Vec::<PeerId>::new());
        assert!(p.begin_write(a, 3));
        assert_eq!(p.finish_write(a), vec![1]);
        assert!(p.is_complete());
    }

    #[test]
    fn released_and_removed_peer_pieces_return_to_pool() {
        let mut p = Picker::new(2);
        known(&mut p);
        p.add_peer(1, |_| true);
        p.add_peer(2, |_| true);
        let a = p.pick(1, &mut rng(), Instant::now()).unwrap();
        p.release(a, 1);
        assert!(!p.is_endgame());
        let a2 = p.pick(1, &mut rng(), Instant::now()).unwrap();
        let b = p.pick(1, &mut rng(), Instant::now()).unwrap();
        assert_ne!(a2, b);
        p.remove_peer(1);
        assert!(!p.is_endgame());
        assert!(p.interesting(2));
        let mut got = vec![
            p.pick(2, &mut rng(), Instant::now()).unwrap(),
            p.pick(2, &mut rng(), Instant::now()).unwrap(),
        ];
        got.sort();
        assert_eq!(got, vec![0, 1]);
    }

    #[test]
    fn no_endgame_while_hashes_are_missing() {
        let mut p = Picker::new(3);
        p.set_hash_known(0);
        p.add_peer(1, |_| true);
        p.add_peer(2, |_| true);
        assert_eq!(p.pick(1, &mut rng(), Instant::now()), Some(0));
        assert!(!p.is_endgame());
        assert_eq!(p.pick(2, &mut rng(), Instant::now()), None);
    }

    #[test]
    fn failed_write_makes_piece_missing_again() {
        let mut p = Picker::new(1);
        known(&mut p);
        p.add_peer(1, |_| true);
        assert_eq!(p.pick(1, &mut rng(), Instant::now()), Some(0));
        assert!(p.begin_write(0, 1));
        p.abort_write(0);
        assert!(!p.have(0));
        assert_eq!(p.pick(1, &mut rng(), Instant::now()), Some(0));
    }

    #[test]
    fn a_refused_piece_is_asked_of_other_holders_until_the_backoff_ends() {
        let mut p = Picker::new(2);
        p.set_hash_known(0);
        p.set_hash_known(1);
        p.add_peer(1, |i| i == 0);
        p.add_peer(2, |i| i == 0);
        let now = Instant::now();
        assert_eq!(p.pick(1, &mut rng(), now), Some(0));
        p.refused(0, 1, now + std::time::Duration::from_secs(1));
        // Not again from peer 1 while refused; another holder may have it.
        assert_eq!(p.pick(1, &mut rng(), now), None);
        assert_eq!(p.pick(2, &mut rng(), now), Some(0));
        p.release(0, 2);
        assert_eq!(
            p.pick(1, &mut rng(), now + std::time::Duration::from_secs(2)),
            Some(0)
        );
    }

    #[test]
    fn a_remote_peer_is_asked_only_when_no_near_peer_offers_anything() {
        let mut p = Picker::new(3);
        known(&mut p);
        let now = Instant::now();
        p.set_remote(9, true); // before its bitfield
        p.add_peer(1, |i| i == 0);
        p.add_peer(9, |_| true);
        // Piece 0 is rarer at the near peer... and also at the remote one:
        // while the near peer offers it, the remote peer is not asked,
        // not even for pieces only it holds.
        assert!(!p.interesting(9));
        assert_eq!(p.pick(9, &mut rng(), now), None);
        assert_eq!(p.pick(1, &mut rng(), now), Some(0));
        // Nothing left to ask of the near peer: the remote one may help
        // with what no near peer holds.
        assert!(p.interesting(9));
        let a = p.pick(9, &mut rng(), now).unwrap();
        let b = p.pick(9, &mut rng(), now).unwrap();
        assert_eq!([a.min(b), a.max(b)], [1, 2]);
        // A new piece at the near peer blocks the remote one again.
        p.release(a, 9);
        p.peer_has(1, a);
        assert_eq!(p.pick(9, &mut rng(), now), None);
        assert_eq!(p.pick(1, &mut rng(), now), Some(a));
    }

    #[test]
    fn peers_of_unknown_zone_are_near_and_the_zone_survives_a_new_bitfield() {
        let mut p = Picker::new(2);
        known(&mut p);
        let now = Instant::now();
        p.add_peer(1, |_| true);
        p.add_peer(2, |_| true);
        // No zone known: both are asked, as in a one-zone cluster.
        assert!(p.pick(1, &mut rng(), now).is_some());
        assert!(p.pick(2, &mut rng(), now).is_some());
        let mut p = Picker::new(2);
        known(&mut p);
        p.add_peer(1, |i| i == 0);
        p.add_peer(9, |_| false);
        p.set_remote(9, true); // after its (empty) bitfield
        p.add_peer(9, |_| true); // a new bitfield keeps the zone
        assert!(p.is_remote(9));
        assert_eq!(p.pick(9, &mut rng(), now), None);
        // Back to near (the peer list changed): asked like any other.
        p.set_remote(9, false);
        assert!(p.pick(9, &mut rng(), now).is_some());
        p.remove_peer(9);
        assert!(!p.is_remote(9));
    }

    #[test]
    fn in_the_endgame_a_remote_peer_duplicates_only_what_no_near_peer_holds() {
        let mut p = Picker::new(2);
        known(&mut p);
        let now = Instant::now();
        p.add_peer(1, |i| i == 0);
        p.add_peer(2, |_| true);
        p.set_remote(2, true);
        p.add_peer(9, |_| true);
        p.set_remote(9, true);
        assert_eq!(p.pick(1, &mut rng(), now), Some(0));
        assert_eq!(p.pick(2, &mut rng(), now), Some(1));
        assert!(p.is_endgame());
        // Piece 1 has no near holder: another remote peer may duplicate
        // it; piece 0 is fetched from a near peer and is not duplicated
        // across zones.
        assert_eq!(p.pick(9, &mut rng(), now), Some(1));
        assert_eq!(p.pick(9, &mut rng(), now), None);
    }
}
