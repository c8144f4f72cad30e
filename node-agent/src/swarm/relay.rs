//! Hash relay: how a node learns the piece hashes of a content from any
//! peer, not only from the hash authorities (origin readers, seeder).
//!
//! Before the content's BLAKE3 root is pinned (without a user `blake3:`
//! digest it is pinned only once every origin reader has read its whole
//! range), a single piece hash cannot be checked against anything but
//! the word of its authority. So authorities *sign* what they vouch for:
//!
//! - An authority signs each batch of hashes it announces — a run of
//!   consecutive pieces it is the authority for — with its node key (the
//!   key of its TLS certificate from the cluster CA), over
//!   [`batch_message`]: a domain-separated message binding the content id,
//!   the layout, the signer, the first piece and the hashes. Once it holds
//!   every hash of its range it signs the whole range again (at most
//!   [`wire::MAX_HASHES_PER_FRAME`] per batch), which supersedes the small
//!   batches, so a session start carries a few batches, not one per piece.
//! - Every node keeps the batches it verified ([`BatchStore`]) and sends
//!   each to each peer once, with the first announcement of a piece it
//!   covers (the signer's certificate once per stream, `AuthorityCert`,
//!   then `SignedHashes`, then the `Have`; see `announcers`). No node needs
//!   a connection to an authority: hashes spread hop by hop with the
//!   pieces they check.
//! - A receiver accepts a batch ([`BatchVerifier::check`]) only if the
//!   signer is, in its own assignment, the authority of exactly those
//!   pieces, the certificate chains to the cluster CA, is valid now, names
//!   the signer and matches the fingerprint the operator published for it
//!   (`spec.peers`, when published), and the signature verifies. Nothing
//!   else is trusted: not the relaying peer, not the size of the batch.
//!
//! What a rejection means depends on who could have caused it
//! ([`Rejection::is_lie`]): an honest relay verified the signature before
//! forwarding, so a bad signature, a certificate that is not the CA's, or
//! pieces outside the layout prove the sender lied (a strike, as for a bad
//! piece; banned after repeats). A signer that is not the authority in our
//! view (a reader replaced since), a certificate whose pin changed (a
//! renewal) or that expired are views that differ honestly: the batch is
//! dropped and counted, the sender not blamed. Either way nothing stalls:
//! the next batch, from any peer, is judged on its own.
//!
//! When an authority renews its certificate mid-transfer, it signs its own
//! batches again with the new key; a node holding batches whose
//! certificate is no longer the published one takes a fresh batch over
//! the same pieces in their place, so the fresh ones spread as the old
//! ones did.
//!
//! Once the root is pinned, a *complete* unsigned hash list (`Hashes`,
//! one hash per piece) from any peer is also accepted when it merges to
//! the root (`content::root_from_pieces`): the root is the check. A node
//! that learned its hashes that way (a verified file on disk) has no
//! signed batches to relay and sends the list instead.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use super::fill::Authority;
use crate::content::Layout;
use crate::tls::{self, LiveIdentity, NodeSignatureVerifier, SignatureError};
use crate::wire::{self, Hash32, Message};

/// Domain separation of batch signatures: a node key signs TLS handshakes
/// too, and a batch signature must never be mistaken for anything else.
pub const BATCH_DOMAIN: &[u8] = b"peerfill hash batch v1\0";

/// Certificates whose chain was checked, remembered per verifier (a few per
/// content: the authorities). Cleared when full.
const CHAIN_CACHE_MAX: usize = 1024;

/// The bytes an authority signs for the hashes of pieces
/// `first..first + hashes.len()` of `content`.
pub fn batch_message(
    content: &str,
    layout: &Layout,
    signer: &str,
    first: u32,
    hashes: &[Hash32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(BATCH_DOMAIN.len() + 64 + content.len() + 32 * hashes.len());
    m.extend_from_slice(BATCH_DOMAIN);
    for s in [content, signer] {
        m.extend_from_slice(&(s.len() as u32).to_be_bytes());
        m.extend_from_slice(s.as_bytes());
    }
    m.extend_from_slice(&layout.size.to_be_bytes());
    m.extend_from_slice(&layout.piece_size.to_be_bytes());
    m.extend_from_slice(&first.to_be_bytes());
    m.extend_from_slice(&(hashes.len() as u32).to_be_bytes());
    for h in hashes {
        m.extend_from_slice(h);
    }
    m
}

/// Hashes of consecutive pieces signed by their authority, with the
/// certificate that verifies the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedBatch {
    pub signer: String,
    pub first: u32,
    pub hashes: Vec<Hash32>,
    pub scheme: u16,
    pub signature: Bytes,
    /// The signer's certificate (DER).
    pub cert: Bytes,
    /// `sha256:<hex>` of `cert`.
    pub fingerprint: String,
}

impl SignedBatch {
    /// One past the last piece.
    pub fn end(&self) -> u64 {
        u64::from(self.first) + self.hashes.len() as u64
    }

    /// The `SignedHashes` frame (the certificate travels separately).
    pub fn message(&self) -> Message {
        Message::SignedHashes {
            signer: self.signer.clone(),
            first: self.first,
            hashes: self.hashes.clone(),
            scheme: self.scheme,
            signature: self.signature.clone(),
        }
    }

    /// A batch as received: `cert` is what the sender sent for `signer`.
    pub fn received(
        signer: String,
        first: u32,
        hashes: Vec<Hash32>,
        scheme: u16,
        signature: Bytes,
        cert: Bytes,
    ) -> SignedBatch {
        SignedBatch {
            fingerprint: tls::cert_fingerprint(&cert),
            signer,
            first,
            hashes,
            scheme,
            signature,
            cert,
        }
    }
}

/// Signs the hashes of pieces `first..` of `content` as `signer`, with the
/// key `live` presents now.
pub fn sign_batch(
    live: &LiveIdentity,
    signer: &str,
    content: &str,
    layout: &Layout,
    first: u32,
    hashes: Vec<Hash32>,
) -> Result<SignedBatch, tls::TlsError> {
    let sig = live.sign(&batch_message(content, layout, signer, first, &hashes))?;
    let cert = Bytes::copy_from_slice(sig.cert.as_ref());
    Ok(SignedBatch {
        signer: signer.to_string(),
        first,
        hashes,
        scheme: u16::from(sig.scheme),
        signature: Bytes::from(sig.signature),
        fingerprint: tls::cert_fingerprint(&cert),
        cert,
    })
}

/// Splits `(piece, hash)` entries (any order) into runs of consecutive
/// pieces of at most [`wire::MAX_HASHES_PER_FRAME`] hashes.
pub fn runs(entries: &[(u32, Hash32)]) -> Vec<(u32, Vec<Hash32>)> {
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|(p, _)| *p);
    sorted.dedup_by_key(|(p, _)| *p);
    let mut out: Vec<(u32, Vec<Hash32>)> = Vec::new();
    for (p, h) in sorted {
        match out.last_mut() {
            Some((first, hs))
                if u64::from(*first) + hs.len() as u64 == u64::from(p)
                    && hs.len() < wire::MAX_HASHES_PER_FRAME =>
            {
                hs.push(h)
            }
            _ => out.push((p, vec![h])),
        }
    }
    out
}

/// Why a signed batch was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("pieces {first}..{end} are outside the content's {pieces} pieces")]
    OutOfRange { first: u32, end: u64, pieces: u32 },
    #[error("{signer} is not the authority of pieces {first}..{end} here")]
    NotAuthority {
        signer: String,
        first: u32,
        end: u64,
    },
    #[error("no certificate of {0} was sent before its batch")]
    NoCertificate(String),
    #[error("certificate: {0}")]
    Certificate(SignatureError),
    #[error("signature: {0}")]
    Signature(SignatureError),
    #[error("the complete hash list merges to blake3:{got}, not to the pinned root")]
    RootMismatch { got: String },
}

impl Rejection {
    /// Whether only a lying sender can have caused this (see the module
    /// docs): an honest relay forwards only batches it verified.
    pub fn is_lie(&self) -> bool {
        match self {
            Rejection::OutOfRange { .. }
            | Rejection::NoCertificate(_)
            | Rejection::Signature(_)
            | Rejection::RootMismatch { .. } => true,
            // A chain that is not the CA's, or names another node, is a
            // lie; an expired certificate, or a pin moved by a renewal, is
            // not (see the module docs).
            Rejection::Certificate(e) => !matches!(
                e,
                SignatureError::Validity { .. } | SignatureError::NotPinned(_)
            ),
            Rejection::NotAuthority { .. } => false,
        }
    }

    /// Label of `peerfill_agent_pieces_rejected_total` (the hashes of
    /// pieces rejected).
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::OutOfRange { .. } => "hash_batch_out_of_range",
            Rejection::NotAuthority { .. } => "hash_batch_not_authority",
            Rejection::NoCertificate(_) => "hash_batch_no_certificate",
            Rejection::Certificate(_) => "hash_batch_certificate",
            Rejection::Signature(_) => "hash_batch_signature",
            Rejection::RootMismatch { .. } => "hash_list_root",
        }
    }
}

/// Checks signed batches against the cluster CA, the published pins and
/// each content's authorities. Cheap to clone; clones share the cache.
#[derive(Debug, Clone)]
pub struct BatchVerifier {
    certs: NodeSignatureVerifier,
    /// (signer, fingerprint) whose chain, name and validity passed.
    chain_ok: Arc<Mutex<HashSet<(String, String)>>>,
}

impl BatchVerifier {
    pub fn new(certs: NodeSignatureVerifier) -> BatchVerifier {
        BatchVerifier {
            certs,
            chain_ok: Arc::default(),
        }
    }

    /// The pins certificates are checked against.
    pub fn pins(&self) -> &tls::PeerPins {
        self.certs.pins()
    }

    /// The checks that need no cryptography: the pieces exist and `signer`
    /// is their authority under `authority`.
    pub fn check_claim(
        layout: &Layout,
        authority: &Authority,
        batch: &SignedBatch,
    ) -> Result<(), Rejection> {
        let pieces = layout.piece_count();
        if batch.hashes.is_empty() || batch.end() > u64::from(pieces) {
            return Err(Rejection::OutOfRange {
                first: batch.first,
                end: batch.end(),
                pieces,
            });
        }
        let covered = authority.ranges_of(&batch.signer).any(|r| {
            u64::from(r.start) <= u64::from(batch.first) && batch.end() <= u64::from(r.end)
        });
        if !covered {
            return Err(Rejection::NotAuthority {
                signer: batch.signer.clone(),
                first: batch.first,
                end: batch.end(),
            });
        }
        Ok(())
    }

    /// Every check of the module docs.
    pub fn check(
        &self,
        content: &str,
        layout: &Layout,
        authority: &Authority,
        batch: &SignedBatch,
    ) -> Result<(), Rejection> {
        Self::check_claim(layout, authority, batch)?;
        let key = (batch.signer.clone(), batch.fingerprint.clone());
        let cached = self
            .chain_ok
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&key);
        if cached {
            // The pin may have moved since; the chain has not.
            self.certs
                .pins()
                .check(&batch.signer, &batch.cert)
                .map_err(|e| Rejection::Certificate(SignatureError::NotPinned(e)))?;
        } else {
            self.certs
                .check_certificate(&batch.signer, &batch.cert)
                .map_err(Rejection::Certificate)?;
            let mut ok = self.chain_ok.lock().unwrap_or_else(PoisonError::into_inner);
            if ok.len() >= CHAIN_CACHE_MAX {
                ok.clear();
            }
            ok.insert(key);
        }
        let msg = batch_message(content, layout, &batch.signer, batch.first, &batch.hashes);
        self.certs
            .verify(&batch.cert, batch.scheme, &msg, &batch.signature)
            .map_err(Rejection::Signature)
    }
}

/// The last piece `b` covers (batches are never empty: `check_claim`).
fn last_piece(b: &SignedBatch) -> u32 {
    u32::try_from(b.end().saturating_sub(1)).unwrap_or(u32::MAX)
}

/// The verified batches one content holds, by (signer, first piece). A
/// batch covered by a stored one of the same signer is not kept; one that
/// covers stored ones replaces them.
#[derive(Debug, Default)]
pub struct BatchStore {
    by_start: BTreeMap<(String, u32), Arc<SignedBatch>>,
}

impl BatchStore {
    fn of_signer<'a>(&'a self, signer: &'a str) -> impl Iterator<Item = &'a Arc<SignedBatch>> + 'a {
        self.starting_in(signer, 0, u32::MAX)
    }

    /// Stored batches of `signer` whose first piece is in `lo..=hi`, by first
    /// piece. A batch is offered once per peer that holds it, so the checks
    /// on that path look only at the batches that can matter, not at every
    /// batch of the signer (hundreds while per-piece batches are in flight).
    fn starting_in<'a>(
        &'a self,
        signer: &str,
        lo: u32,
        hi: u32,
    ) -> impl DoubleEndedIterator<Item = &'a Arc<SignedBatch>> + 'a {
        // `range` panics on an inverted range (an empty batch's last piece).
        (lo <= hi)
            .then(|| {
                self.by_start
                    .range((signer.to_string(), lo)..=(signer.to_string(), hi))
            })
            .into_iter()
            .flatten()
            .map(|(_, b)| b)
    }

    /// Stored batches `b` would replace (its range covers theirs).
    pub fn superseded_by(&self, b: &SignedBatch) -> usize {
        self.starting_in(&b.signer, b.first, last_piece(b))
            .filter(|s| s.end() <= b.end() && s.as_ref() != b)
            .count()
    }

    /// Stored batches of `signer` inside pieces `start..end`.
    pub fn count_within(&self, signer: &str, start: u32, end: u32) -> usize {
        if start >= end {
            return 0;
        }
        self.starting_in(signer, start, end - 1)
            .filter(|b| b.end() <= u64::from(end))
            .count()
    }

    /// Stored batches of `b`'s signer overlapping it whose certificate is
    /// no longer the published one (`pins`): an authority renewed its
    /// certificate, and `b`, signed with the new one, replaces them.
    pub fn stale_overlaps(&self, b: &SignedBatch, pins: &tls::PeerPins) -> Vec<(String, u32)> {
        // No stored batch of a signer covers another (see `insert`), so by
        // first piece their ends grow too: walking back from the last one
        // starting inside `b`, the overlaps end at the first that ends
        // before `b` starts.
        self.starting_in(&b.signer, 0, last_piece(b))
            .rev()
            .take_while(|s| s.end() > u64::from(b.first))
            .filter(|s| s.fingerprint != b.fingerprint && pins.check(&s.signer, &s.cert).is_err())
            .map(|s| (s.signer.clone(), s.first))
            .collect()
    }

    /// Drops the batches `keys` (from [`BatchStore::stale_overlaps`]).
    pub fn remove(&mut self, keys: &[(String, u32)]) {
        for k in keys {
            self.by_start.remove(k);
        }
    }

    /// Keeps `b` unless a stored batch of its signer covers it; drops the
    /// stored batches it covers. Returns whether it was kept.
    pub fn insert(&mut self, b: Arc<SignedBatch>) -> bool {
        // Of the batches starting at or before `b`, the last ends latest.
        if self
            .starting_in(&b.signer, 0, b.first)
            .next_back()
            .is_some_and(|s| b.end() <= s.end())
        {
            return false;
        }
        let covered: Vec<(String, u32)> = self
            .starting_in(&b.signer, b.first, last_piece(&b))
            .filter(|s| s.end() <= b.end())
            .map(|s| (s.signer.clone(), s.first))
            .collect();
        for k in covered {
            self.by_start.remove(&k);
        }
        self.by_start.insert((b.signer.clone(), b.first), b);
        true
    }

    /// The stored batch of `signer` holding the hash of `piece`, if any.
    /// No stored batch of a signer covers another (see `insert`), so
    /// ordered by first piece their ends grow too: the last one starting
    /// at or before `piece` is the only candidate.
    pub fn covering(&self, signer: &str, piece: u32) -> Option<&Arc<SignedBatch>> {
        self.by_start
            .range((signer.to_string(), 0)..=(signer.to_string(), piece))
            .next_back()
            .map(|(_, b)| b)
            .filter(|b| b.end() > u64::from(piece))
    }

    /// Every stored batch, by signer and first piece.
    pub fn all(&self) -> impl Iterator<Item = &Arc<SignedBatch>> {
        self.by_start.values()
    }

    /// Pieces covered by stored batches (batches of one signer may overlap
    /// only when neither covers the other; counted once each).
    pub fn covered(&self, pieces: u32) -> u32 {
        let mut seen = vec![false; pieces as usize];
        for b in self.all() {
            for p in b.first..(b.end().min(u64::from(pieces)) as u32) {
                seen[p as usize] = true;
            }
        }
        seen.iter().filter(|s| **s).count() as u32
    }

    /// Whether some batch of `signer` was signed with a certificate other
    /// than `fingerprint` (an authority's own, after its renewal).
    pub fn has_stale(&self, signer: &str, fingerprint: &str) -> bool {
        self.of_signer(signer).any(|b| b.fingerprint != fingerprint)
    }

    /// Drops every batch of `signer`.
    pub fn remove_of(&mut self, signer: &str) {
        self.by_start.retain(|(s, _), _| s != signer);
    }
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
