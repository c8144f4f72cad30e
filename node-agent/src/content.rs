//! Content layout and verification: how a content is cut into pieces, the
//! BLAKE3 hash of each piece, and the user-facing `sha256:`/`blake3:` digests.
//!
//! Piece hashes are BLAKE3 *chaining values*: a piece is a power-of-two
//! multiple of the 1 KiB BLAKE3 chunk and starts at a multiple of its own
//! size, so it is exactly one subtree of the BLAKE3 tree of the whole content.
//! Merging the piece hashes up that tree gives `blake3::hash(content)`, which
//! lets an agent check a piece-hash list against a `blake3:` digest the user
//! gave before trusting any entry of it, and then check each piece on its own.

use std::fmt;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use blake3::hazmat::{HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Default piece size: 4 MiB, big enough that per-piece overhead (a request,
/// a hash, a bitmap write) is negligible, small enough to pipeline well.
pub const DEFAULT_PIECE_SIZE: u32 = 4 << 20;
/// Smallest piece size accepted (16 KiB).
pub const MIN_PIECE_SIZE: u32 = 16 << 10;
/// Largest piece size accepted (64 MiB): one piece is held in memory per
/// in-flight transfer, so this bounds memory.
pub const MAX_PIECE_SIZE: u32 = 64 << 20;

/// The BLAKE3 chaining value of one piece (or, for single-piece content, the
/// root hash; see [`piece_hash`]).
pub type PieceHash = [u8; 32];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(
        "invalid piece size {piece_size}: must be a power of two between {MIN_PIECE_SIZE} and {MAX_PIECE_SIZE} bytes"
    )]
    InvalidPieceSize { piece_size: u32 },
    #[error("content of {size} bytes with {piece_size}-byte pieces has more than 2^32-1 pieces")]
    TooManyPieces { size: u64, piece_size: u32 },
    #[error("piece index {index} out of range: the content has {count} pieces")]
    PieceOutOfRange { index: u32, count: u32 },
    #[error("piece {index} has {got} bytes, expected {expected}")]
    WrongLength { index: u32, expected: u32, got: u64 },
    #[error("piece {index} does not match its expected BLAKE3 hash")]
    HashMismatch { index: u32 },
    #[error("expected {expected} piece hashes, got {got}")]
    WrongHashCount { expected: u32, got: usize },
    #[error("invalid digest {input:?}: {reason}")]
    InvalidDigest { input: String, reason: &'static str },
    #[error("reading {path} to compute its digest: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("digest task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// How a content of `size` bytes is cut into pieces of `piece_size` bytes
/// (the last piece may be shorter; a 0-byte content has no pieces).
///
/// Deserialising validates (a layout from a peer cannot smuggle in a piece
/// size that breaks the hash tree); one built by hand should go through
/// [`Layout::new`] or [`Layout::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawLayout")]
pub struct Layout {
    pub size: u64,
    pub piece_size: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLayout {
    size: u64,
    piece_size: u32,
}

impl TryFrom<RawLayout> for Layout {
    type Error = ContentError;

    fn try_from(raw: RawLayout) -> Result<Self, Self::Error> {
        Layout::new(raw.size, raw.piece_size)
    }
}

impl Layout {
    /// Validates the piece size (power of two in [16 KiB, 64 MiB]) and that
    /// the piece count fits a `u32`.
    pub fn new(size: u64, piece_size: u32) -> Result<Layout, ContentError> {
        if !piece_size.is_power_of_two() || !(MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&piece_size)
        {
            return Err(ContentError::InvalidPieceSize { piece_size });
        }
        if size.div_ceil(u64::from(piece_size)) > u64::from(u32::MAX) {
            return Err(ContentError::TooManyPieces { size, piece_size });
        }
        Ok(Layout { size, piece_size })
    }

    /// The layout of a content whose piece size may be left to the size
    /// (`0`: [`peerfill_crds::validation::auto_piece_size`], the rule the
    /// operator uses for the origin readers' ranges).
    pub fn for_content(size: u64, piece_size: u32) -> Result<Layout, ContentError> {
        if piece_size != 0 {
            return Layout::new(size, piece_size);
        }
        let auto = peerfill_crds::validation::auto_piece_size(size);
        // Within [256 KiB, 4 MiB] by construction.
        Layout::new(size, u32::try_from(auto).unwrap_or(MAX_PIECE_SIZE))
    }

    /// Re-checks a layout that came from outside (deserialised, from the wire).
    pub fn validate(&self) -> Result<(), ContentError> {
        Layout::new(self.size, self.piece_size).map(|_| ())
    }

    /// Number of pieces (0 for empty content).
    pub fn piece_count(&self) -> u32 {
        // Layout::new bounds this; saturate for a Layout built by hand.
        u32::try_from(self.size.div_ceil(u64::from(self.piece_size.max(1)))).unwrap_or(u32::MAX)
    }

    /// Byte range of piece `index` in the content. Indexes past the end give
    /// an empty range at the end of the content.
    pub fn piece_range(&self, index: u32) -> Range<u64> {
        let start = (u64::from(index) * u64::from(self.piece_size)).min(self.size);
        let end = start
            .saturating_add(u64::from(self.piece_size))
            .min(self.size);
        start..end
    }

    /// Length of piece `index` (0 for an index past the end).
    pub fn piece_len(&self, index: u32) -> u32 {
        let r = self.piece_range(index);
        // A range is at most piece_size long, which is a u32.
        (r.end - r.start) as u32
    }

    /// Checks that `index` names a piece of this content.
    pub fn check_index(&self, index: u32) -> Result<(), ContentError> {
        let count = self.piece_count();
        if index >= count {
            return Err(ContentError::PieceOutOfRange { index, count });
        }
        Ok(())
    }
}

/// Hash of piece `index` whose bytes are `data`.
///
/// Normally the BLAKE3 chaining value of the subtree the piece forms in the
/// content's tree. When the whole content is a single piece there is no
/// parent node to merge into, so the piece hash is the ordinary BLAKE3 root
/// hash of the content (`blake3::hash(data)`), and [`root_from_pieces`]
/// returns it unchanged.
///
/// `data` must be the piece's exact bytes (`layout.piece_len(index)` long,
/// for a valid layout and index). Anything else cannot be a subtree at that
/// place in the tree (BLAKE3's hazmat API would panic on it), so it gets a
/// hash from a separate domain that matches no genuine piece hash; this
/// function never panics on untrusted input. [`verify_piece`] reports such
/// cases as precise errors instead.
pub fn piece_hash(layout: &Layout, index: u32, data: &[u8]) -> PieceHash {
    if layout.validate().is_err() {
        return invalid_piece_hash(data);
    }
    if layout.piece_count() <= 1 {
        return *blake3::hash(data).as_bytes();
    }
    let len = layout.piece_len(index);
    if len == 0 || data.len() != len as usize {
        return invalid_piece_hash(data);
    }
    let offset = u64::from(index) * u64::from(layout.piece_size);
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(offset);
    hasher.update(data);
    hasher.finalize_non_root()
}

fn invalid_piece_hash(data: &[u8]) -> PieceHash {
    blake3::derive_key("peerfill 2026 piece of invalid length or layout", data)
}

/// Checks a received piece: its length, then its hash.
pub fn verify_piece(
    layout: &Layout,
    index: u32,
    data: &[u8],
    expected: &PieceHash,
) -> Result<(), ContentError> {
    layout.validate()?;
    layout.check_index(index)?;
    let want = layout.piece_len(index);
    if data.len() as u64 != u64::from(want) {
        return Err(ContentError::WrongLength {
            index,
            expected: want,
            got: data.len() as u64,
        });
    }
    let got = piece_hash(layout, index, data);
    // Constant-time comparison is not needed (hashes are public), but
    // blake3::Hash gives it for free.
    if blake3::Hash::from_bytes(got) != blake3::Hash::from_bytes(*expected) {
        return Err(ContentError::HashMismatch { index });
    }
    Ok(())
}

/// Merges the piece hashes up the BLAKE3 tree into the root hash of the
/// whole content; equals `blake3::hash(content)`.
pub fn root_from_pieces(
    layout: &Layout,
    hashes: &[PieceHash],
) -> Result<blake3::Hash, ContentError> {
    layout.validate()?;
    let count = layout.piece_count();
    if hashes.len() != count as usize {
        return Err(ContentError::WrongHashCount {
            expected: count,
            got: hashes.len(),
        });
    }
    match count {
        0 => Ok(blake3::hash(&[])),
        1 => Ok(blake3::Hash::from_bytes(hashes[0])),
        _ => {
            let (left, right) = split_subtree(layout, 0, count);
            Ok(merge_subtrees_root(
                &subtree_cv(layout, hashes, left),
                &subtree_cv(layout, hashes, right),
                Mode::Hash,
            ))
        }
    }
}

/// Splits pieces `[lo, hi)` (at least two) the way BLAKE3 splits the bytes
/// they cover: the left subtree is the largest power-of-two number of chunks
/// strictly smaller than the input. Because pieces are power-of-two multiples
/// of the chunk, that split always falls on a piece boundary.
fn split_subtree(layout: &Layout, lo: u32, hi: u32) -> ((u32, u32), (u32, u32)) {
    let start = layout.piece_range(lo).start;
    let end = layout.piece_range(hi - 1).end;
    let left_len = blake3::hazmat::left_subtree_len(end - start);
    let mid = lo + (left_len / u64::from(layout.piece_size)) as u32;
    ((lo, mid), (mid, hi))
}

fn subtree_cv(layout: &Layout, hashes: &[PieceHash], (a, b): (u32, u32)) -> [u8; 32] {
    if b - a == 1 {
        return hashes[a as usize];
    }
    let (left, right) = split_subtree(layout, a, b);
    merge_subtrees_non_root(
        &subtree_cv(layout, hashes, left),
        &subtree_cv(layout, hashes, right),
        Mode::Hash,
    )
}

/// Whether `hashes` merge to the `blake3:` digest `digest`. A `sha256:`
/// digest cannot be checked against piece hashes, so this returns false for
/// it (the caller checks the finished file with [`digest_file`] instead).
pub fn manifest_root_matches(layout: &Layout, hashes: &[PieceHash], digest: &Digest) -> bool {
    match digest {
        Digest::Blake3(want) => match root_from_pieces(layout, hashes) {
            Ok(root) => root == blake3::Hash::from_bytes(*want),
            Err(_) => false,
        },
        Digest::Sha256(_) => false,
    }
}

/// Digest algorithms users can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestAlgo {
    Sha256,
    Blake3,
}

/// A content digest as users write it: `sha256:<64 hex>` or `blake3:<64 hex>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Digest {
    Sha256([u8; 32]),
    Blake3([u8; 32]),
}

impl Digest {
    pub fn algo(&self) -> DigestAlgo {
        match self {
            Digest::Sha256(_) => DigestAlgo::Sha256,
            Digest::Blake3(_) => DigestAlgo::Blake3,
        }
    }

    pub fn bytes(&self) -> &[u8; 32] {
        match self {
            Digest::Sha256(b) | Digest::Blake3(b) => b,
        }
    }
}

impl FromStr for Digest {
    type Err = ContentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ContentError::InvalidDigest {
            input: s.chars().take(80).collect(),
            reason,
        };
        let (algo, hexpart) = s
            .split_once(':')
            .ok_or_else(|| err("expected `sha256:<64 hex digits>` or `blake3:<64 hex digits>`"))?;
        if hexpart.len() != 64 {
            return Err(err("the hash must be exactly 64 hex digits"));
        }
        if !hexpart
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err("the hash must be lowercase hex digits (0-9, a-f)"));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hexpart, &mut bytes).map_err(|_| err("invalid hex"))?;
        match algo {
            "sha256" => Ok(Digest::Sha256(bytes)),
            "blake3" => Ok(Digest::Blake3(bytes)),
            _ => Err(err("unknown algorithm: use `sha256` or `blake3`")),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Digest::Sha256(_) => "sha256",
            Digest::Blake3(_) => "blake3",
        };
        write!(f, "{name}:{}", hex::encode(self.bytes()))
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental digest for bytes that arrive in order.
#[derive(Clone)]
pub enum StreamingDigest {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl StreamingDigest {
    pub fn new(algo: DigestAlgo) -> Self {
        match algo {
            DigestAlgo::Sha256 => StreamingDigest::Sha256(sha2::Sha256::new()),
            DigestAlgo::Blake3 => StreamingDigest::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            StreamingDigest::Sha256(h) => h.update(data),
            StreamingDigest::Blake3(h) => {
                h.update(data);
            }
        }
    }

    pub fn finalize(self) -> Digest {
        match self {
            StreamingDigest::Sha256(h) => Digest::Sha256(h.finalize().into()),
            StreamingDigest::Blake3(h) => Digest::Blake3(*h.finalize().as_bytes()),
        }
    }
}

/// Digest of a file, read in 1 MiB blocks on a blocking thread so memory
/// stays bounded whatever the file size.
pub async fn digest_file(path: &Path, algo: DigestAlgo) -> Result<Digest, ContentError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let io = |source| ContentError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let mut digest = StreamingDigest::new(algo);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(e)),
            };
            digest.update(&buf[..n]);
        }
        Ok(digest.finalize())
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(size: usize) -> Vec<u8> {
        // Deterministic, non-repeating at chunk granularity.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn hashes_of(layout: &Layout, data: &[u8]) -> Vec<PieceHash> {
        (0..layout.piece_count())
            .map(|i| {
                let r = layout.piece_range(i);
                piece_hash(layout, i, &data[r.start as usize..r.end as usize])
            })
            .collect()
    }

    #[test]
    fn layout_rejects_bad_piece_sizes() {
        assert!(Layout::new(10, 1000).is_err());
        assert!(Layout::new(10, 8 << 10).is_err());
        assert!(Layout::new(10, 128 << 20).is_err());
        assert!(Layout::new(10, (16 << 10) + 1).is_err());
        assert!(Layout::new(10, 16 << 10).is_ok());
        assert!(Layout::new(10, 64 << 20).is_ok());
        assert!(matches!(
            Layout::new(u64::MAX, 16 << 10),
            Err(ContentError::TooManyPieces { .. })
        ));
    }

    #[test]
    fn layout_geometry() {
        let l = Layout::new(10 * 1024 * 1024 + 5, DEFAULT_PIECE_SIZE).unwrap();
        assert_eq!(l.piece_count(), 3);
        assert_eq!(l.piece_range(0), 0..4 << 20);
        assert_eq!(l.piece_range(2), 8 << 20..(10 << 20) + 5);
        assert_eq!(l.piece_len(2), (2 << 20) + 5);
        assert_eq!(l.piece_len(3), 0);
        assert!(l.check_index(3).is_err());
        let empty = Layout::new(0, DEFAULT_PIECE_SIZE).unwrap();
        assert_eq!(empty.piece_count(), 0);
    }

    #[test]
    fn root_from_pieces_matches_blake3() {
        let ps: u64 = 16 << 10;
        let sizes = [
            0,
            1,
            ps,
            ps + 1,
            ps * 7 / 2,
            ps * 8,
            ps * 13,
            ps * 13 - 1,
            ps * 5 + 1023,
            ps * 17 + 1025,
        ];
        for size in sizes {
            let layout = Layout::new(size, ps as u32).unwrap();
            let data = content(size as usize);
            let hashes = hashes_of(&layout, &data);
            let root = root_from_pieces(&layout, &hashes).unwrap();
            assert_eq!(root, blake3::hash(&data), "size {size}");
            assert!(manifest_root_matches(
                &layout,
                &hashes,
                &Digest::Blake3(*root.as_bytes())
            ));
            for i in 0..layout.piece_count() {
                let r = layout.piece_range(i);
                verify_piece(
                    &layout,
                    i,
                    &data[r.start as usize..r.end as usize],
                    &hashes[i as usize],
                )
                .unwrap();
            }
        }
    }

    #[test]
    fn root_with_larger_pieces() {
        let layout = Layout::new((1 << 20) * 5 + 3, 1 << 20).unwrap();
        let data = content(layout.size as usize);
        let hashes = hashes_of(&layout, &data);
        assert_eq!(
            root_from_pieces(&layout, &hashes).unwrap(),
            blake3::hash(&data)
        );
    }

    #[test]
    fn tampered_piece_or_list_is_caught() {
        let ps = 16u32 << 10;
        let layout = Layout::new(u64::from(ps) * 3 + 100, ps).unwrap();
        let mut data = content(layout.size as usize);
        let hashes = hashes_of(&layout, &data);
        let root = blake3::hash(&data);

        // A piece hash list with one wrong entry no longer matches the root.
        let mut bad = hashes.clone();
        bad[1][0] ^= 1;
        assert!(!manifest_root_matches(
            &layout,
            &bad,
            &Digest::Blake3(*root.as_bytes())
        ));
        assert!(!manifest_root_matches(
            &layout,
            &hashes[..2],
            &Digest::Blake3(*root.as_bytes())
        ));
        assert!(!manifest_root_matches(
            &layout,
            &hashes,
            &Digest::Sha256(*root.as_bytes())
        ));

        // A flipped byte fails its piece.
        data[ps as usize + 5] ^= 0xff;
        let r = layout.piece_range(1);
        assert!(matches!(
            verify_piece(
                &layout,
                1,
                &data[r.start as usize..r.end as usize],
                &hashes[1]
            ),
            Err(ContentError::HashMismatch { index: 1 })
        ));
        // The right bytes under the wrong index fail too (offset is hashed in).
        let r0 = layout.piece_range(0);
        let p0 = &data[r0.start as usize..r0.end as usize];
        assert!(verify_piece(&layout, 0, p0, &hashes[0]).is_ok());
        assert!(verify_piece(&layout, 2, p0, &hashes[0]).is_err());
        // Wrong length.
        assert!(matches!(
            verify_piece(&layout, 0, &p0[1..], &hashes[0]),
            Err(ContentError::WrongLength { .. })
        ));
        assert!(matches!(
            verify_piece(&layout, 9, p0, &hashes[0]),
            Err(ContentError::PieceOutOfRange { .. })
        ));
    }

    #[test]
    fn hostile_inputs_never_panic() {
        let ps = 16u32 << 10;
        let layout = Layout::new(u64::from(ps) * 4, ps).unwrap();
        let good = piece_hash(&layout, 1, &vec![1u8; ps as usize]);
        // Empty, oversized, out-of-range pieces: a hash, never a panic, and
        // never the genuine one.
        for (i, len) in [
            (1u32, 0usize),
            (1, ps as usize * 3),
            (9, ps as usize),
            (u32::MAX, 5),
        ] {
            assert_ne!(piece_hash(&layout, i, &vec![1u8; len]), good);
        }
        // Hand-built invalid layouts.
        let bad = Layout {
            size: 5000,
            piece_size: 1000,
        };
        let _ = piece_hash(&bad, 1, &[0u8; 1000]);
        assert!(verify_piece(&bad, 1, &[0u8; 1000], &[0; 32]).is_err());
        assert!(root_from_pieces(&bad, &[[0; 32]; 5]).is_err());
        let zero = Layout {
            size: 10,
            piece_size: 0,
        };
        let _ = zero.piece_count();
        let _ = zero.piece_range(3);
        let huge = Layout {
            size: u64::MAX,
            piece_size: 64 << 20,
        };
        assert_eq!(
            huge.piece_range(u32::MAX),
            (u64::from(u32::MAX) << 26)..(u64::from(u32::MAX) + 1) << 26
        );
        let widest = Layout {
            size: u64::MAX,
            piece_size: u32::MAX,
        };
        let _ = widest.piece_range(u32::MAX);
        // Deserialising validates.
        assert!(serde_json::from_str::<Layout>(r#"{"size":10,"pieceSize":1000}"#).is_err());
        let ok: Layout = serde_json::from_str(r#"{"size":10,"pieceSize":16384}"#).unwrap();
        assert_eq!(ok, Layout::new(10, 16384).unwrap());
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"size":10,"pieceSize":16384}"#
        );
    }

    #[test]
    fn digest_parse_and_display() {
        let hexs = "ab".repeat(32);
        let d: Digest = format!("blake3:{hexs}").parse().unwrap();
        assert_eq!(d, Digest::Blake3([0xab; 32]));
        assert_eq!(d.to_string(), format!("blake3:{hexs}"));
        let s: Digest = format!("sha256:{hexs}").parse().unwrap();
        assert_eq!(s.algo(), DigestAlgo::Sha256);
        for bad in [
            String::new(),
            "blake3".into(),
            format!("md5:{hexs}"),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            format!("sha256:{}zz", "ab".repeat(31)),
            "sha256:é".repeat(40),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?}");
        }
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"blake3:{hexs}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"blake3:00\"").is_err());
    }

    #[tokio::test]
    async fn digest_file_matches_one_shot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = content(3 * (1 << 20) + 17);
        std::fs::write(&path, &data).unwrap();
        let b = digest_file(&path, DigestAlgo::Blake3).await.unwrap();
        assert_eq!(b, Digest::Blake3(*blake3::hash(&data).as_bytes()));
        let s = digest_file(&path, DigestAlgo::Sha256).await.unwrap();
        assert_eq!(s, Digest::Sha256(sha2::Sha256::digest(&data).into()));
        assert!(matches!(
            digest_file(&dir.path().join("missing"), DigestAlgo::Sha256).await,
            Err(ContentError::Io { .. })
        ));
    }

    /// Benchmark, not a check: prints piece hashing throughput.
    #[test]
    #[ignore = "benchmark: cargo nextest run -p peerfill-agent --run-ignored only --no-capture bench_"]
    fn bench_piece_hashing() {
        let layout = Layout::new(256 << 20, DEFAULT_PIECE_SIZE).unwrap();
        let piece = content(DEFAULT_PIECE_SIZE as usize);
        let start = std::time::Instant::now();
        for i in 0..layout.piece_count() {
            std::hint::black_box(piece_hash(&layout, i, &piece));
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "BENCH piece_hash: {} x 4 MiB pieces in {secs:.3}s = {:.0} MiB/s (one thread)",
            layout.piece_count(),
            256.0 / secs
        );
    }
}
