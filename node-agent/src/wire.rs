//! The agent-to-agent wire protocol.
//!
//! Every message travels in one frame:
//!
//! ```text
//! +----------------+-----------+--------+-------------------+
//! | length: u32 BE | version u8| type u8| payload (length-2)|
//! +----------------+-----------+--------+-------------------+
//! ```
//!
//! `length` counts the version and type bytes and the payload. It is checked
//! against [`MAX_FRAME_LEN`] *before* anything is allocated, so a peer cannot
//! make us reserve memory by announcing a huge frame. Decoding never panics: every
//! malformed input maps to a [`WireError`], and the caller closes that stream
//! or connection with the error as its logged reason.
//!
//! Streams (see `swarm`): each agent opens one unidirectional *announce*
//! stream per content towards each peer (`Hello`, then `Bitfield`, the hash
//! batches it holds — `AuthorityCert` once per signer and stream, then
//! `SignedHashes` — and `Have` and new batches as they arrive; a complete
//! unsigned `Hashes` list when it holds one but not the batches), and one
//! bidirectional stream per piece request
//! (`Request` → `Piece` or `Reject`). Cancelling a request is stopping its
//! stream, so there is no cancel message. A unidirectional stream may also
//! carry a single `Resync`: the receiver opens a fresh announce stream for
//! that content (a node that stopped progressing asks its peers to repeat
//! their announcements).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::{Decoder, Encoder};

/// Protocol version carried in every frame. A peer speaking another version
/// is refused with [`WireError::UnsupportedVersion`]. Version 2: `Hashes`
/// is an unsigned complete list and authorities' hashes travel as
/// `AuthorityCert` + `SignedHashes` (hash relay); a version-1 agent would
/// take neither, so mixed versions refuse each other at once instead of
/// never completing.
pub const PROTOCOL_VERSION: u8 = 2;

/// Largest piece the protocol carries (64 MiB).
pub const MAX_PIECE_SIZE: u32 = 64 * 1024 * 1024;

/// Largest frame accepted: a full piece plus room for its header.
pub const MAX_FRAME_LEN: u32 = MAX_PIECE_SIZE + 1024;

/// Longest content id (ids are Kubernetes object names, at most 253 bytes).
pub const MAX_CONTENT_ID_LEN: usize = 253;

/// Most piece hashes in one `Hashes` message (keeps control frames small).
pub const MAX_HASHES_PER_FRAME: usize = 4096;

/// Most pieces in one content (1 TiB at the smallest sensible piece size).
pub const MAX_PIECES: u32 = 1 << 22;

/// Largest certificate (DER) an `AuthorityCert` carries; node certificates
/// are well under 1 KiB.
pub const MAX_CERT_LEN: usize = 16 * 1024;

/// Largest signature a `SignedHashes` carries (RSA-4096 needs 512 bytes).
pub const MAX_SIGNATURE_LEN: usize = 1024;

const HEADER_LEN: usize = 4;

/// A BLAKE3 piece hash (a subtree chaining value, see `content`).
pub type Hash32 = [u8; 32];

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The requester is not in the content's allowed-peer list.
    NotAllowed = 1,
    /// The content is not known here.
    UnknownContent = 2,
    /// The piece is not held (yet).
    NotHeld = 3,
    /// The agent is shutting down or the piece could not be read.
    Unavailable = 4,
}

impl RejectReason {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => Self::NotAllowed,
            2 => Self::UnknownContent,
            3 => Self::NotHeld,
            4 => Self::Unavailable,
            other => return Err(WireError::BadField("reject reason", u64::from(other))),
        })
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Opens an announce stream for one content and states its layout.
    Hello {
        content: String,
        size: u64,
        piece_size: u32,
    },
    /// The sender's pieces, one bit per piece, most significant bit first.
    Bitfield { bits: Bytes },
    /// The sender now holds (verified) this piece.
    Have { piece: u32 },
    /// Unsigned piece hashes. Anyone may send them, so they are used only
    /// as a *complete* list (one per piece) that merges to the content's
    /// pinned root (`content::manifest_root_matches`).
    Hashes { entries: Vec<(u32, Hash32)> },
    /// The certificate (DER) of hash authority `node`, sent on an announce
    /// stream before the first `SignedHashes` of that signer (and again
    /// when the signer's certificate changed). Receivers check it against
    /// the cluster CA, the node name and the fingerprint the operator
    /// published for `node`.
    AuthorityCert { node: String, cert: Bytes },
    /// Hashes of pieces `first..first + hashes.len()`, signed by their
    /// authority `signer` (origin reader of that range, or the seeder) with
    /// its node key (TLS `scheme`) over `swarm::relay::batch_message`.
    /// Relayed unchanged by every node that verified it, so a node learns
    /// them from any peer.
    SignedHashes {
        signer: String,
        first: u32,
        hashes: Vec<Hash32>,
        scheme: u16,
        signature: Bytes,
    },
    /// Asks for one piece of one content.
    Request { content: String, piece: u32 },
    /// The data of one piece.
    Piece { piece: u32, data: Bytes },
    /// The request was refused.
    Reject { piece: u32, reason: RejectReason },
    /// Asks the receiver to announce `content` again on a new stream.
    Resync { content: String },
}

mod tag {
    pub const HELLO: u8 = 1;
    pub const BITFIELD: u8 = 2;
    pub const HAVE: u8 = 3;
    pub const HASHES: u8 = 4;
    pub const REQUEST: u8 = 5;
    pub const PIECE: u8 = 6;
    pub const REJECT: u8 = 7;
    pub const RESYNC: u8 = 8;
    pub const AUTHORITY_CERT: u8 = 9;
    pub const SIGNED_HASHES: u8 = 10;
}

/// Everything that can be wrong with a frame. Each variant is a reason to
/// close the stream it came on.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    FrameTooLarge(u64),
    #[error("frame of {0} bytes is too short for a header")]
    FrameTooShort(u32),
    #[error("unsupported protocol version {0} (this agent speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("message truncated: needed {needed} more bytes for {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("{0} trailing bytes after message")]
    TrailingBytes(usize),
    #[error("invalid {0}: {1}")]
    BadField(&'static str, u64),
    #[error("content id is not valid UTF-8")]
    BadUtf8,
    #[error("stream ended in the middle of a frame")]
    UnexpectedEof,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), WireError> {
        if self.buf.remaining() < n {
            return Err(WireError::Truncated {
                what,
                needed: n - self.buf.remaining(),
            });
        }
        Ok(())
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, WireError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }
    fn hash(&mut self) -> Result<Hash32, WireError> {
        self.need(32, "piece hash")?;
        let mut h = [0u8; 32];
        self.buf.copy_to_slice(&mut h);
        Ok(h)
    }
    fn content_id(&mut self) -> Result<String, WireError> {
        let len = usize::from(self.u16("content id length")?);
        if len == 0 || len > MAX_CONTENT_ID_LEN {
            return Err(WireError::BadField("content id length", len as u64));
        }
        let raw = self.bytes(len, "content id")?;
        String::from_utf8(raw.to_vec()).map_err(|_| WireError::BadUtf8)
    }
    /// A u16-length-prefixed blob of at most `max` bytes.
    fn blob(&mut self, max: usize, what: &'static str) -> Result<Bytes, WireError> {
        let len = usize::from(self.u16(what)?);
        if len == 0 || len > max {
            return Err(WireError::BadField(what, len as u64));
        }
        self.bytes(len, what)
    }
    fn piece(&mut self) -> Result<u32, WireError> {
        let p = self.u32("piece index")?;
        if p >= MAX_PIECES {
            return Err(WireError::BadField("piece index", u64::from(p)));
        }
        Ok(p)
    }
    fn finish(self) -> Result<(), WireError> {
        if self.buf.has_remaining() {
            return Err(WireError::TrailingBytes(self.buf.remaining()));
        }
        Ok(())
    }
}

impl Message {
    /// Decodes a frame body (everything after the length prefix).
    pub fn decode_body(body: Bytes) -> Result<Self, WireError> {
        let mut r = Reader { buf: body };
        let version = r.u8("version")?;
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let msg = match r.u8("type")? {
            tag::HELLO => {
                let content = r.content_id()?;
                let size = r.u64("size")?;
                let piece_size = r.u32("piece size")?;
                if piece_size == 0 || piece_size > MAX_PIECE_SIZE {
                    return Err(WireError::BadField("piece size", u64::from(piece_size)));
                }
                if size.div_ceil(u64::from(piece_size)) > u64::from(MAX_PIECES) {
                    return Err(WireError::BadField("size", size));
                }
                Message::Hello {
                    content,
                    size,
                    piece_size,
                }
            }
            tag::BITFIELD => {
                let len = r.buf.remaining();
                if len > (MAX_PIECES as usize).div_ceil(8) {
                    return Err(WireError::BadField("bitfield length", len as u64));
                }
                Message::Bitfield {
                    bits: r.bytes(len, "bitfield")?,
                }
            }
            tag::HAVE => Message::Have { piece: r.piece()? },
            tag::HASHES => {
                let n = usize::from(r.u16("hash count")?);
                if n > MAX_HASHES_PER_FRAME {
                    return Err(WireError::BadField("hash count", n as u64));
                }
                // Check the length before reserving the vector.
                r.need(n * 36, "hash entries")?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let piece = r.piece()?;
                    entries.push((piece, r.hash()?));
                }
                Message::Hashes { entries }
            }
            tag::REQUEST => {
                let content = r.content_id()?;
                Message::Request {
                    content,
                    piece: r.piece()?,
                }
            }
            tag::PIECE => {
                let piece = r.piece()?;
                let len = r.buf.remaining();
                Message::Piece {
                    piece,
                    data: r.bytes(len, "piece data")?,
                }
            }
            tag::REJECT => {
                let piece = r.piece()?;
                Message::Reject {
                    piece,
                    reason: RejectReason::from_u8(r.u8("reject reason")?)?,
                }
            }
            tag::RESYNC => Message::Resync {
                content: r.content_id()?,
            },
            tag::AUTHORITY_CERT => Message::AuthorityCert {
                // Node names share the content ids' form and limit.
                node: r.content_id()?,
                cert: r.blob(MAX_CERT_LEN, "certificate")?,
            },
            tag::SIGNED_HASHES => {
                let signer = r.content_id()?;
                let first = r.piece()?;
                let n = usize::from(r.u16("hash count")?);
                if n == 0
                    || n > MAX_HASHES_PER_FRAME
                    || u64::from(first) + n as u64 > u64::from(MAX_PIECES)
                {
                    return Err(WireError::BadField("hash count", n as u64));
                }
                r.need(n * 32, "hashes")?;
                let mut hashes = Vec::with_capacity(n);
                for _ in 0..n {
                    hashes.push(r.hash()?);
                }
                let scheme = r.u16("signature scheme")?;
                let signature = r.blob(MAX_SIGNATURE_LEN, "signature")?;
                Message::SignedHashes {
                    signer,
                    first,
                    hashes,
                    scheme,
                    signature,
                }
            }
            other => return Err(WireError::UnknownType(other)),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Encodes the whole frame, length prefix included. For `Piece` this copies
    /// the data; the hot path uses [`piece_header`] and writes the data as its
    /// own chunk instead.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode_into(&mut out);
        out.freeze()
    }

    /// Appends the whole frame to `out` (several frames go out as one
    /// write).
    pub fn encode_into(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0); // patched below
        out.put_u8(PROTOCOL_VERSION);
        match self {
            Message::Hello {
                content,
                size,
                piece_size,
            } => {
                out.put_u8(tag::HELLO);
                put_content_id(out, content);
                out.put_u64(*size);
                out.put_u32(*piece_size);
            }
            Message::Bitfield { bits } => {
                out.put_u8(tag::BITFIELD);
                out.put_slice(bits);
            }
            Message::Have { piece } => {
                out.put_u8(tag::HAVE);
                out.put_u32(*piece);
            }
            Message::Hashes { entries } => {
                out.put_u8(tag::HASHES);
                // Callers chunk with MAX_HASHES_PER_FRAME; clamp defensively.
                let n = entries.len().min(MAX_HASHES_PER_FRAME);
                out.put_u16(n as u16);
                for (piece, hash) in &entries[..n] {
                    out.put_u32(*piece);
                    out.put_slice(hash);
                }
            }
            Message::Request { content, piece } => {
                out.put_u8(tag::REQUEST);
                put_content_id(out, content);
                out.put_u32(*piece);
            }
            Message::Piece { piece, data } => {
                out.put_u8(tag::PIECE);
                out.put_u32(*piece);
                out.put_slice(data);
            }
            Message::Resync { content } => {
                out.put_u8(tag::RESYNC);
                put_content_id(out, content);
            }
            Message::AuthorityCert { node, cert } => {
                out.put_u8(tag::AUTHORITY_CERT);
                put_content_id(out, node);
                put_blob(out, cert, MAX_CERT_LEN);
            }
            Message::SignedHashes {
                signer,
                first,
                hashes,
                scheme,
                signature,
            } => {
                out.put_u8(tag::SIGNED_HASHES);
                put_content_id(out, signer);
                out.put_u32(*first);
                // Batches are built with at most MAX_HASHES_PER_FRAME.
                let n = hashes.len().min(MAX_HASHES_PER_FRAME);
                out.put_u16(n as u16);
                for h in &hashes[..n] {
                    out.put_slice(h);
                }
                out.put_u16(*scheme);
                put_blob(out, signature, MAX_SIGNATURE_LEN);
            }
            Message::Reject { piece, reason } => {
                out.put_u8(tag::REJECT);
                out.put_u32(*piece);
                out.put_u8(*reason as u8);
            }
        }
        let body_len = (out.len() - start - HEADER_LEN) as u32;
        out[start..start + HEADER_LEN].copy_from_slice(&body_len.to_be_bytes());
    }
}

fn put_content_id(out: &mut BytesMut, id: &str) {
    // Content ids are validated by the agent config; truncating here only
    // guards against a caller bug producing an undecodable frame.
    let raw = &id.as_bytes()[..id.len().min(MAX_CONTENT_ID_LEN)];
    out.put_u16(raw.len() as u16);
    out.put_slice(raw);
}

fn put_blob(out: &mut BytesMut, blob: &[u8], max: usize) {
    // Callers respect `max`; clamping only keeps a bug decodable.
    let raw = &blob[..blob.len().min(max)];
    out.put_u16(raw.len() as u16);
    out.put_slice(raw);
}

/// The frame header of a `Piece` message carrying `data_len` bytes: write it,
/// then the data as a separate chunk (no copy of the piece).
pub fn piece_header(piece: u32, data_len: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + 6);
    out.put_u32((2 + 4 + data_len) as u32);
    out.put_u8(PROTOCOL_VERSION);
    out.put_u8(tag::PIECE);
    out.put_u32(piece);
    out.freeze()
}

/// Splits hash announcements into frames of at most [`MAX_HASHES_PER_FRAME`].
pub fn hash_messages(entries: &[(u32, Hash32)]) -> Vec<Message> {
    entries
        .chunks(MAX_HASHES_PER_FRAME)
        .map(|c| Message::Hashes {
            entries: c.to_vec(),
        })
        .collect()
}

fn check_len(len: u32) -> Result<(), WireError> {
    if len > MAX_FRAME_LEN {
        return Err(WireError::FrameTooLarge(u64::from(len)));
    }
    if len < 2 {
        return Err(WireError::FrameTooShort(len));
    }
    Ok(())
}

/// Reads one frame from a stream. `Ok(None)` on a clean end of stream between
/// frames; the length is checked against `max_len` (at most
/// [`MAX_FRAME_LEN`]) before the body buffer is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: u32,
) -> Result<Option<Message>, WireError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(WireError::UnexpectedEof);
        }
        got += n;
    }
    let len = u32::from_be_bytes(header);
    check_len(len)?;
    if len > max_len.min(MAX_FRAME_LEN) {
        return Err(WireError::FrameTooLarge(u64::from(len)));
    }
    // A piece: its data goes to an aligned buffer of the pool (reused, and
    // the store can write it with O_DIRECT); it returns to the pool when
    // the piece is dropped. Decoding the 6-byte prefix alone applies the
    // same checks as a whole frame.
    const PIECE_PREFIX: usize = 6;
    let pool = crate::bufpool::global();
    if len as usize > PIECE_PREFIX {
        let mut prefix = [0u8; PIECE_PREFIX];
        r.read_exact(&mut prefix).await.map_err(eof)?;
        if prefix[1] == tag::PIECE {
            let Message::Piece { piece, .. } =
                Message::decode_body(Bytes::copy_from_slice(&prefix))?
            else {
                return Err(WireError::BadField("piece frame", u64::from(len)));
            };
            let mut data = pool.take(len as usize - PIECE_PREFIX);
            r.read_exact(data.as_mut_slice()).await.map_err(eof)?;
            return Ok(Some(Message::Piece {
                piece,
                data: pool.freeze(data),
            }));
        }
        let mut body = BytesMut::with_capacity(len as usize);
        body.extend_from_slice(&prefix);
        read_rest(r, &mut body, len).await?;
        return Message::decode_body(body.freeze()).map(Some);
    }
    let mut body = BytesMut::with_capacity(len as usize);
    read_rest(r, &mut body, len).await?;
    Message::decode_body(body.freeze()).map(Some)
}

/// Reads the frame body into `body` up to `len` bytes, into uninitialised
/// capacity (no zeroing), never past the frame.
async fn read_rest<R: AsyncRead + Unpin>(
    r: &mut R,
    body: &mut BytesMut,
    len: u32,
) -> Result<(), WireError> {
    let mut limited = r.take(u64::from(len) - body.len() as u64);
    while body.len() < len as usize {
        if limited.read_buf(body).await? == 0 {
            return Err(WireError::UnexpectedEof);
        }
    }
    Ok(())
}

fn eof(e: std::io::Error) -> WireError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::UnexpectedEof
    } else {
        WireError::Io(e)
    }
}

/// A `tokio_util` codec for the same frames, for buffered streams and tests.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_len: u32,
}

impl FrameCodec {
    /// A codec refusing frames longer than `max_len` (capped at [`MAX_FRAME_LEN`]).
    pub fn new(max_len: u32) -> Self {
        Self {
            max_len: max_len.min(MAX_FRAME_LEN),
        }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&src[..HEADER_LEN]);
        let len = u32::from_be_bytes(header);
        check_len(len)?;
        if len > self.max_len {
            return Err(WireError::FrameTooLarge(u64::from(len)));
        }
        let total = HEADER_LEN + len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(len as usize).freeze();
        Message::decode_body(body).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        match self.decode(src)? {
            Some(m) => Ok(Some(m)),
            None if src.is_empty() => Ok(None),
            None => Err(WireError::UnexpectedEof),
        }
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), WireError> {
        item.encode_into(dst);
        Ok(())
    }
}

/// Packs a list of booleans into a bitfield (MSB first).
pub fn pack_bits(bits: impl ExactSizeIterator<Item = bool>) -> Bytes {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, b) in bits.enumerate() {
        if b {
            out[i / 8] |= 0x80 >> (i % 8);
        }
    }
    Bytes::from(out)
}

/// Reads bit `i` of a packed bitfield; bits past the end are unset.
pub fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                content: "model-a".into(),
                size: 1 << 33,
                piece_size: 4 << 20,
            },
            Message::Bitfield {
                bits: pack_bits([true, false, true].into_iter()),
            },
            Message::Have { piece: 7 },
            Message::Hashes {
                entries: vec![(1, [3u8; 32]), (9, [7u8; 32])],
            },
            Message::Request {
                content: "c".into(),
                piece: 3,
            },
            Message::Piece {
                piece: 3,
                data: Bytes::from_static(b"hello piece"),
            },
            Message::Reject {
                piece: 2,
                reason: RejectReason::NotAllowed,
            },
            Message::Resync {
                content: "model-a".into(),
            },
            Message::AuthorityCert {
                node: "node-1".into(),
                cert: Bytes::from_static(b"not really DER"),
            },
            Message::SignedHashes {
                signer: "node-1".into(),
                first: 12,
                hashes: vec![[1u8; 32], [2u8; 32]],
                scheme: 0x0403,
                signature: Bytes::from_static(&[9u8; 72]),
            },
        ]
    }

    #[test]
    fn signed_batches_beyond_the_piece_limit_are_refused() {
        let m = Message::SignedHashes {
            signer: "n".into(),
            first: MAX_PIECES - 1,
            hashes: vec![[0u8; 32]; 2],
            scheme: 0x0403,
            signature: Bytes::from_static(&[1u8; 8]),
        };
        let err = FrameCodec::default()
            .decode(&mut BytesMut::from(&m.encode()[..]))
            .unwrap_err();
        assert!(matches!(err, WireError::BadField("hash count", 2)));
    }

    #[test]
    fn round_trips_every_message() {
        for m in samples() {
            let mut buf = BytesMut::from(&m.encode()[..]);
            let got = FrameCodec::default().decode(&mut buf).unwrap();
            assert_eq!(got, Some(m));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn piece_header_matches_full_encoding() {
        let data = Bytes::from_static(b"0123456789");
        let full = Message::Piece {
            piece: 5,
            data: data.clone(),
        }
        .encode();
        let mut split = piece_header(5, data.len()).to_vec();
        split.extend_from_slice(&data);
        assert_eq!(&full[..], &split[..]);
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME_LEN + 1);
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge(_)));
        // Nothing was reserved for the announced body.
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut raw = Message::Have { piece: 1 }.encode().to_vec();
        raw[4] = 99;
        let err = FrameCodec::default()
            .decode(&mut BytesMut::from(&raw[..]))
            .unwrap_err();
        assert!(matches!(err, WireError::UnsupportedVersion(99)));
    }

    #[tokio::test]
    async fn read_frame_reads_a_sequence_then_eof() {
        let mut raw = Vec::new();
        for m in samples() {
            raw.extend_from_slice(&m.encode());
        }
        let mut cur = std::io::Cursor::new(raw);
        let mut got = Vec::new();
        while let Some(m) = read_frame(&mut cur, MAX_FRAME_LEN).await.unwrap() {
            got.push(m);
        }
        assert_eq!(got, samples());
    }

    #[tokio::test]
    async fn read_frame_reports_truncation() {
        let raw = Message::Have { piece: 1 }.encode();
        let mut cur = std::io::Cursor::new(raw[..raw.len() - 1].to_vec());
        let err = read_frame(&mut cur, MAX_FRAME_LEN).await.unwrap_err();
        assert!(matches!(err, WireError::UnexpectedEof));
    }

    #[test]
    fn bits_pack_and_read() {
        let b = pack_bits((0..11).map(|i| i % 3 == 0));
        assert_eq!(b.len(), 2);
        for i in 0..11 {
            assert_eq!(bit(&b, i), i % 3 == 0);
        }
        assert!(!bit(&b, 100));
    }
}
