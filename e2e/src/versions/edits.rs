//! The edits a new version makes, and the pieces they touch.

use crate::cluster::Edits;

/// The edits of a new version: `regions` runs of whole 64 KiB blocks
/// adding up to at least `changed` of `size`, evenly spread and offset by
/// three blocks so they straddle piece boundaries.
pub fn spread_edits(size: u64, changed: f64, regions: u64) -> Edits {
    let blocks = size.div_ceil(Edits::BLOCK);
    let regions = regions.clamp(1, blocks.max(1));
    let want = ((size as f64 * changed) / Edits::BLOCK as f64).ceil() as u64;
    let per = want.div_ceil(regions).max(1);
    let ranges = (0..regions)
        .map(|i| {
            let start = (blocks * i / regions + 3).min(blocks.saturating_sub(per));
            start..(start + per).min(blocks)
        })
        .collect();
    Edits {
        seed: 0xed17,
        blocks: ranges,
    }
}

/// Bytes of the pieces of `piece_size` that hold an edited byte.
pub fn touched_piece_bytes(size: u64, piece_size: u64, edits: &Edits) -> u64 {
    let pieces: std::collections::BTreeSet<u64> = edits
        .blocks
        .iter()
        .flat_map(|r| {
            let first = r.start * Edits::BLOCK / piece_size;
            let last = ((r.end * Edits::BLOCK).min(size) - 1) / piece_size;
            first..=last
        })
        .collect();
    pieces
        .iter()
        .map(|p| (size - p * piece_size).min(piece_size))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_add_up_to_the_share_and_straddle_pieces() {
        let size = 1 << 30;
        let e = spread_edits(size, 0.01, 8);
        assert_eq!(e.blocks.len(), 8);
        let changed = e.bytes(size);
        assert!(changed as f64 >= 0.01 * size as f64, "{changed}");
        assert!((changed as f64) < 0.0105 * size as f64, "{changed}");
        // 1 MiB pieces: each run of 21 blocks (1.31 MiB) starting 3 blocks
        // into a piece touches 2 pieces.
        assert_eq!(touched_piece_bytes(size, 1 << 20, &e), 8 * 2 * (1 << 20));
    }

    #[test]
    fn touched_pieces_count_a_short_last_piece_as_it_is() {
        let size = 3 * Edits::BLOCK + 10;
        let e = Edits {
            seed: 1,
            blocks: std::iter::once(3..4).collect(),
        };
        assert_eq!(
            touched_piece_bytes(size, 2 * Edits::BLOCK, &e),
            Edits::BLOCK + 10
        );
    }
}
