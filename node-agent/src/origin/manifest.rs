//! Piece manifests: the piece hashes of a content, published next to it on
//! the origin (`source.http.manifestUrl`; `peerfill-agent manifest FILE`
//! writes one).
//!
//! Without one, an origin reader must read its whole range to learn the
//! hashes it vouches for, so a new version of a 1 GiB file costs each
//! reader its share of the file even when 1 % changed. With one, a reader
//! takes its range's hashes from the manifest, reuses every piece of the
//! previous version that verifies against them, and reads only the rest
//! from the origin — checking each against the manifest, so a manifest
//! that does not describe the origin's bytes fails the reader
//! (`OriginManifestMismatch`) instead of spreading.
//!
//! The manifest is no more trusted than the origin it comes from: its
//! hashes merge to the content's root like any reader's, the operator pins
//! that root only when every reader agrees, and a user's `blake3:` digest
//! must equal it.

use serde::{Deserialize, Serialize};

use crate::content::{self, Layout, PieceHash};

/// Largest manifest accepted (about 4 million pieces).
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// Errors of a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("piece manifest does not parse: {0}")]
    Parse(#[from] serde_json::Error),
    #[error(
        "piece manifest is for {got_size} bytes in {got_piece}-byte pieces; the content has {size} bytes in {piece}-byte pieces"
    )]
    Layout {
        got_size: u64,
        got_piece: u32,
        size: u64,
        piece: u32,
    },
    #[error("piece manifest has {got} hex digits of hashes, {want} expected")]
    Length { got: usize, want: usize },
    #[error("piece manifest hashes are not hex")]
    Hex,
    #[error("piece manifest of {0} bytes exceeds {MAX_MANIFEST_BYTES}")]
    TooLarge(u64),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Content(#[from] content::ContentError),
}

/// The manifest as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PieceManifest {
    /// Format version, 1.
    pub peerfill_manifest: u32,
    pub size: u64,
    pub piece_size: u32,
    /// `blake3:<hex>` of the whole content (informative: the hashes are
    /// what is checked, and they merge to it).
    pub root: String,
    /// Every piece's hash, hex, concatenated in piece order.
    pub pieces: String,
}

impl PieceManifest {
    /// The manifest of `data` cut as `layout`.
    pub fn of(layout: &Layout, data: &[u8]) -> PieceManifest {
        let hashes: Vec<PieceHash> = (0..layout.piece_count())
            .map(|i| {
                let r = layout.piece_range(i);
                content::piece_hash(layout, i, &data[r.start as usize..r.end as usize])
            })
            .collect();
        Self::from_hashes(layout, &hashes)
    }

    /// The manifest of the file at `path`, read piece by piece (`piece_size`
    /// 0: the one the size gives).
    pub fn of_file(
        path: &std::path::Path,
        piece_size: u32,
    ) -> Result<PieceManifest, ManifestError> {
        use std::os::unix::fs::FileExt;
        let io = |source| ManifestError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let layout = Layout::for_content(size, piece_size)?;
        let mut buf = vec![0u8; layout.piece_size as usize];
        let mut hashes = Vec::with_capacity(layout.piece_count() as usize);
        for i in 0..layout.piece_count() {
            let r = layout.piece_range(i);
            let b = &mut buf[..(r.end - r.start) as usize];
            file.read_exact_at(b, r.start).map_err(io)?;
            hashes.push(content::piece_hash(&layout, i, b));
        }
        Ok(Self::from_hashes(&layout, &hashes))
    }

    fn from_hashes(layout: &Layout, hashes: &[PieceHash]) -> PieceManifest {
        let root = content::root_from_pieces(layout, hashes)
            .map(|r| format!("blake3:{}", r.to_hex()))
            .unwrap_or_default();
        PieceManifest {
            peerfill_manifest: 1,
            size: layout.size,
            piece_size: layout.piece_size,
            root,
            pieces: hashes.iter().map(hex::encode).collect(),
        }
    }

    /// Parses a manifest and returns its hashes for `layout` (which it must
    /// describe exactly).
    pub fn hashes_for(body: &[u8], layout: &Layout) -> Result<Vec<PieceHash>, ManifestError> {
        let m: PieceManifest = serde_json::from_slice(body)?;
        if m.size != layout.size || m.piece_size != layout.piece_size {
            return Err(ManifestError::Layout {
                got_size: m.size,
                got_piece: m.piece_size,
                size: layout.size,
                piece: layout.piece_size,
            });
        }
        let want = layout.piece_count() as usize * 64;
        if m.pieces.len() != want {
            return Err(ManifestError::Length {
                got: m.pieces.len(),
                want,
            });
        }
        m.pieces
            .as_bytes()
            .chunks(64)
            .map(|c| {
                let mut h = [0u8; 32];
                hex::decode_to_slice(c, &mut h).map_err(|_| ManifestError::Hex)?;
                Ok(h)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_round_trips_and_must_match_the_layout() {
        let layout = Layout::new(100_000, 16 << 10).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let m = PieceManifest::of(&layout, &data);
        assert_eq!(m.root, format!("blake3:{}", blake3::hash(&data).to_hex()));
        let body = serde_json::to_vec(&m).unwrap();
        let hashes = PieceManifest::hashes_for(&body, &layout).unwrap();
        assert_eq!(
            content::root_from_pieces(&layout, &hashes).unwrap(),
            blake3::hash(&data)
        );
        let other = Layout::new(100_000, 32 << 10).unwrap();
        assert!(matches!(
            PieceManifest::hashes_for(&body, &other),
            Err(ManifestError::Layout { .. })
        ));
        let mut cut = m.clone();
        cut.pieces.truncate(64);
        assert!(matches!(
            PieceManifest::hashes_for(&serde_json::to_vec(&cut).unwrap(), &layout),
            Err(ManifestError::Length { .. })
        ));
    }
}
