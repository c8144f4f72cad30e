//! Property tests of the frame decoder: random, truncated and mutated input
//! never panics, and every message round-trips.

use bytes::{Bytes, BytesMut};
use peerfill_agent::wire::{self, FrameCodec, Message, RejectReason};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

fn message() -> impl Strategy<Value = Message> {
    let id = "[a-z0-9][a-z0-9.-]{0,40}";
    prop_oneof![
        (id, 1u32..=wire::MAX_PIECE_SIZE)
            .prop_flat_map(|(c, ps)| {
                (
                    Just(c),
                    0..=u64::from(ps) * u64::from(wire::MAX_PIECES),
                    Just(ps),
                )
            })
            .prop_map(|(content, size, piece_size)| Message::Hello {
                content,
                size,
                piece_size,
            }),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Message::Bitfield {
            bits: Bytes::from(b)
        }),
        (0..wire::MAX_PIECES).prop_map(|piece| Message::Have { piece }),
        proptest::collection::vec((0..wire::MAX_PIECES, any::<[u8; 32]>()), 0..8)
            .prop_map(|entries| Message::Hashes { entries }),
        (id, proptest::collection::vec(any::<u8>(), 1..64)).prop_map(|(node, c)| {
            Message::AuthorityCert {
                node,
                cert: Bytes::from(c),
            }
        }),
        (
            id,
            0..wire::MAX_PIECES - 8,
            proptest::collection::vec(any::<[u8; 32]>(), 1..8),
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 1..80)
        )
            .prop_map(
                |(signer, first, hashes, scheme, sig)| Message::SignedHashes {
                    signer,
                    first,
                    hashes,
                    scheme,
                    signature: Bytes::from(sig),
                }
            ),
        (id, 0..wire::MAX_PIECES).prop_map(|(content, piece)| Message::Request { content, piece }),
        id.prop_map(|content| Message::Resync { content }),
        (
            0..wire::MAX_PIECES,
            proptest::collection::vec(any::<u8>(), 0..256)
        )
            .prop_map(|(piece, d)| Message::Piece {
                piece,
                data: Bytes::from(d)
            }),
        (
            0..wire::MAX_PIECES,
            prop_oneof![
                Just(RejectReason::NotAllowed),
                Just(RejectReason::UnknownContent),
                Just(RejectReason::NotHeld),
                Just(RejectReason::Unavailable)
            ]
        )
            .prop_map(|(piece, reason)| Message::Reject { piece, reason }),
    ]
}

/// Feeds `input` to the codec the way a stream would, in `chunk`-sized
/// pieces; returns the messages decoded until the first error.
fn decode_stream(input: &[u8], chunk: usize) -> Vec<Message> {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for part in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(part);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(_) => return out,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..64) {
        let _ = decode_stream(&input, chunk);
        let _ = Message::decode_body(Bytes::from(input));
    }

    #[test]
    fn plausible_headers_never_panic(ty in 0u8..12, len in 0u32..4096, tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        // A valid length and version with an arbitrary type and body.
        let mut input = len.to_be_bytes().to_vec();
        input.push(wire::PROTOCOL_VERSION);
        input.push(ty);
        input.extend_from_slice(&tail);
        let _ = decode_stream(&input, 7);
    }

    #[test]
    fn messages_round_trip(msgs in proptest::collection::vec(message(), 1..8), chunk in 1usize..100) {
        let mut input = Vec::new();
        for m in &msgs {
            input.extend_from_slice(&m.encode());
        }
        prop_assert_eq!(decode_stream(&input, chunk), msgs);
    }

    #[test]
    fn truncated_messages_never_decode_wrongly(m in message(), cut in any::<prop::sample::Index>()) {
        let full = m.encode();
        let cut = cut.index(full.len());
        let truncated = &full[..cut];
        // A strict prefix never yields a message.
        prop_assert!(decode_stream(truncated, 5).is_empty());
        // Nor does a body with its tail cut off.
        if cut > 4 {
            let body = Bytes::copy_from_slice(&full[4..cut]);
            if let Ok(got) = Message::decode_body(body) {
                // Only possible where the cut falls at the end of a
                // variable-length field (bitfield or piece data).
                prop_assert!(matches!(got, Message::Bitfield { .. } | Message::Piece { .. }), "{:?}", got);
            }
        }
    }

    #[test]
    fn mutated_messages_never_panic(m in message(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut raw = m.encode().to_vec();
        let i = pos.index(raw.len());
        raw[i] = byte;
        let _ = decode_stream(&raw, 3);
    }
}

#[tokio::test]
async fn read_frame_rejects_oversized_and_truncated_streams() {
    let mut huge = (wire::MAX_FRAME_LEN + 1).to_be_bytes().to_vec();
    huge.extend_from_slice(&[1, 3]);
    let err = wire::read_frame(&mut std::io::Cursor::new(huge), wire::MAX_FRAME_LEN).await;
    assert!(
        matches!(err, Err(wire::WireError::FrameTooLarge(_))),
        "{err:?}"
    );

    // A per-stream cap below the global one (piece streams use the piece length).
    let frame = Message::Piece {
        piece: 1,
        data: Bytes::from(vec![0u8; 100]),
    }
    .encode();
    let err = wire::read_frame(&mut std::io::Cursor::new(frame.to_vec()), 50).await;
    assert!(
        matches!(err, Err(wire::WireError::FrameTooLarge(_))),
        "{err:?}"
    );

    let cut = &frame[..frame.len() - 10];
    let err = wire::read_frame(&mut std::io::Cursor::new(cut.to_vec()), wire::MAX_FRAME_LEN).await;
    assert!(
        matches!(err, Err(wire::WireError::UnexpectedEof)),
        "{err:?}"
    );
}
