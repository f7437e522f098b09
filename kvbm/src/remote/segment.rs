//! Segments: the immutable objects of the G4 tier. A segment packs blocks in
//! prefix-chain order, each at a 4 KiB boundary, so a chain comes back with
//! one coalesced range GET, and ends with a footer that says, per block, what
//! it is and where it lies:
//!
//! ```text
//! offset         size  what
//!      0         4096  header page
//!   4096            …  blocks, each at a 4 KiB boundary, zero padded
//!   footer_at       …  footer
//!   len - 32       32  trailer
//!
//! header page
//!      0    8  magic              b"KVTG4SEG"
//!      8    4  format version     u32 LE (3)
//!     12    4  block count        u32 LE
//!     16    8  node id            u64 LE (the writing daemon)
//!     24    8  sequence number    u64 LE (per node)
//!     32    8  created            u64 LE, Unix milliseconds
//!     40    8  footer offset      u64 LE
//!     48   72  zero
//!    120    8  header checksum    xxh3-64 of bytes 0..120
//!
//! footer (all integers LE)
//!   u16 namespace count, then per namespace: u16 length, UTF-8 name
//!   u32 block count, then per block:
//!     u16 namespace (index into the names), u64 offset, u32 stored length,
//!     u64 xxh3-64 of the stored bytes, u8 codec, u32 raw length,
//!     u8 key length, key, u8 parent length, parent (empty: a root),
//!     then the token ids: in the clear (codec bit 7 clear) u32 token
//!     count, u32 tokens; encrypted (bit 7 set) u32 length, sealed token
//!     ids (below)
//!
//! codec (how the stored bytes become the block's raw bytes)
//!   bits 0-1  compression: 0 none, 1 lz4 block, 2 zstd frame (3: refused)
//!   bit  7    encrypted, after compression: the stored bytes are a key
//!             id (8), a random nonce (12), the AES-256-GCM ciphertext
//!             and its tag (16); key and key id derive from the key file
//!             by HKDF-SHA256; the associated data binds codec, raw
//!             length, namespace and key (`remote::codec`)
//!   bits 2-6  zero
//! sealed token ids (an encrypted block's): a key id (8), a random nonce
//!   (12), the AES-256-GCM ciphertext of the u32 LE tokens and its tag
//!   (16), under the blocks' key; the associated data binds namespace, key
//!   and parent; 36 to 36 + 4 * 65536 bytes, a multiple of 4 past 36
//! raw length: the block's length once decoded, 1 to 1 GiB; with codec 0
//!   it equals the stored length
//!
//! trailer
//!      0    8  footer offset      u64 LE
//!      8    4  footer length      u32 LE
//!     12    4  format version     u32 LE (3)
//!     16    8  footer checksum    xxh3-64 of the footer
//!     24    8  magic              b"KVTG4END"
//! ```
//!
//! A reader needs only the trailer and the footer (the object's tail) to
//! learn every block, and one range per run of adjacent blocks to read them.
//! The footer is the part read from other nodes' objects, so its decoder
//! treats every byte as hostile: limits are checked before anything is
//! allocated, blocks must lie in the data area in ascending order without
//! overlapping, a codec byte or raw length out of range is refused, and a
//! version it does not know is refused (the caller counts the segment as a
//! miss). Version 2 added the codec and the raw length, version 3 sealed the
//! token ids of encrypted blocks; older versions are no longer read. What
//! the codec means is `remote::codec`'s business; the checksum covers the
//! stored bytes, so damage is found before decoding. The footer decoder
//! needs no key: it yields sealed token ids as they are.

use std::ops::Range;

use bytes::Bytes;
use xxhash_rust::xxh3::xxh3_64;

use crate::disk::entry::{le4, le8};

/// Alignment of every block and the size of the header page.
pub const PAGE: u64 = 4096;
/// Current format version (2: per-block codec and raw length; 3: sealed
/// token ids of encrypted blocks). The only one read.
pub const VERSION: u32 = 3;
/// Bytes of the trailer.
pub const TRAILER: u64 = 32;

const MAGIC: [u8; 8] = *b"KVTG4SEG";
const END_MAGIC: [u8; 8] = *b"KVTG4END";
const HDR_SUM_AT: usize = 120;

/// Longest key or parent (kvbm's keys are engine block hashes, ≤ 32 bytes).
pub const MAX_KEY: usize = 32;
/// Most tokens one block may carry.
pub const MAX_TOKENS: u32 = 1 << 16;
/// Bytes sealing adds to a block's token ids: key id (8), nonce (12) and
/// tag (16), as for the block's bytes.
pub const SEALED_OVERHEAD: u32 = 8 + 12 + 16;
/// Longest sealed token ids.
pub const MAX_SEALED_TOKENS: u32 = SEALED_OVERHEAD + 4 * MAX_TOKENS;
/// Most blocks in one segment.
pub const MAX_BLOCKS: u32 = 1 << 16;
/// Most namespaces in one segment, and the longest name.
pub const MAX_NAMESPACES: u16 = 1024;
pub const MAX_NAME: u16 = 1024;
/// Largest segment a reader accepts, and largest footer.
pub const MAX_OBJECT: u64 = 1 << 32;
pub const MAX_FOOTER: u32 = 64 << 20;

/// Largest raw (decoded) block length.
pub const MAX_RAW: u32 = 1 << 30;

/// Codec byte: stored as is.
pub const CODEC_RAW: u8 = 0;
/// Codec byte, bits 0-1: the compression.
pub const CODEC_COMPRESSION: u8 = 0x03;
pub const CODEC_LZ4: u8 = 1;
pub const CODEC_ZSTD: u8 = 2;
/// Codec byte, bit 7: encrypted.
pub const CODEC_ENCRYPTED: u8 = 0x80;

/// Whether a reader knows codec byte `c`.
pub const fn codec_known(c: u8) -> bool {
    c & !(CODEC_COMPRESSION | CODEC_ENCRYPTED) == 0 && c & CODEC_COMPRESSION != 3
}

/// Bytes a footer entry takes at least (no key, parent or tokens).
const MIN_ENTRY: usize = 2 + 8 + 4 + 8 + 1 + 4 + 1 + 1 + 4;

static ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];

/// Why bytes were refused as (part of) a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A format version this reader does not know.
    Version(u32),
    /// The tail given does not reach back to the footer's start: read at
    /// least this many bytes from the end of the object and try again.
    Short(u64),
    /// Not a segment, or a damaged one: wrong magic, checksum or geometry,
    /// a field past its limit.
    Invalid,
}

/// Who wrote a segment, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub node: u64,
    pub seq: u64,
    pub created_ms: u64,
}

/// One block of a segment, as its footer lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Index into [`Footer::namespaces`].
    pub namespace: u16,
    pub offset: u64,
    /// Bytes stored in the object.
    pub len: u32,
    /// xxh3-64 of the stored bytes.
    pub checksum: u64,
    /// How the stored bytes encode the block (`CODEC_*` bits).
    pub codec: u8,
    /// The block's length once decoded.
    pub raw_len: u32,
    pub key: Vec<u8>,
    /// The parent block's key; empty for the first block of a chain.
    pub parent: Vec<u8>,
    /// The block's token ids. For an encrypted block, empty as decoded;
    /// a reader with the key fills them in by opening `sealed_tokens`.
    pub tokens: Vec<u32>,
    /// An encrypted block's token ids, sealed, as stored (see the module
    /// documentation); empty for a block in the clear.
    pub sealed_tokens: Vec<u8>,
}

impl Block {
    /// Whether the block is encrypted (and its token ids sealed).
    pub fn encrypted(&self) -> bool {
        self.codec & CODEC_ENCRYPTED != 0
    }

    /// Where the block's bytes lie in the object.
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.len)
    }

    /// Whether `data` is this block's stored content (length and checksum):
    /// integrity, checked before anything decodes it.
    pub fn verify(&self, data: &[u8]) -> bool {
        data.len() as u64 == u64::from(self.len) && xxh3_64(data) == self.checksum
    }
}

/// What a segment holds: its namespaces and blocks, in object order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub namespaces: Vec<String>,
    pub blocks: Vec<Block>,
}

/// A segment laid out by [`Builder::finish`]: the object's bytes as parts
/// (header page, each block and its padding, footer and trailer), ready for
/// one PUT without copying the blocks.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub origin: Origin,
    pub footer: Footer,
    pub parts: Vec<Bytes>,
    /// Bytes of the whole object.
    pub len: u64,
}

/// Packs blocks into a segment, in the order they are pushed (a chain's
/// blocks parent first, so the chain is one range).
#[derive(Debug)]
pub struct Builder {
    origin: Origin,
    namespaces: Vec<String>,
    blocks: Vec<Block>,
    data: Vec<Bytes>,
    /// End of the data area so far (a multiple of [`PAGE`]).
    end: u64,
}

impl Builder {
    pub fn new(origin: Origin) -> Self {
        Builder {
            origin,
            namespaces: Vec::new(),
            blocks: Vec::new(),
            data: Vec::new(),
            end: PAGE,
        }
    }

    /// Appends a block stored as is; returns its offset. See
    /// [`Builder::push_encoded`].
    pub fn push(
        &mut self,
        namespace: &str,
        key: &[u8],
        parent: &[u8],
        tokens: &[u32],
        data: Bytes,
    ) -> Result<u64, Fault> {
        let raw_len = u32::try_from(data.len()).map_err(|_| Fault::Invalid)?;
        self.push_encoded(
            namespace,
            key,
            parent,
            tokens,
            &[],
            data,
            CODEC_RAW,
            raw_len,
        )
    }

    /// Appends a block whose stored bytes `data` decode (by `codec`) to
    /// `raw_len` bytes; returns its offset. An encrypted block (`codec`
    /// bit 7) carries its token ids sealed (`sealed_tokens`, `tokens`
    /// empty), any other in the clear (`tokens`, `sealed_tokens` empty).
    /// Refuses what a reader would refuse (limits), so every sealed
    /// segment decodes.
    #[allow(clippy::too_many_arguments)]
    pub fn push_encoded(
        &mut self,
        namespace: &str,
        key: &[u8],
        parent: &[u8],
        tokens: &[u32],
        sealed_tokens: &[u8],
        data: Bytes,
        codec: u8,
        raw_len: u32,
    ) -> Result<u64, Fault> {
        let len = u32::try_from(data.len()).map_err(|_| Fault::Invalid)?;
        let tokens_ok = if codec & CODEC_ENCRYPTED != 0 {
            tokens.is_empty() && sealed_len_ok(sealed_tokens.len())
        } else {
            sealed_tokens.is_empty() && tokens.len() <= MAX_TOKENS as usize
        };
        if !entry_codec_ok(codec, len, raw_len)
            || !tokens_ok
            || key.len() > MAX_KEY
            || parent.len() > MAX_KEY
            || self.blocks.len() >= MAX_BLOCKS as usize
            || namespace.is_empty()
            || namespace.len() > usize::from(MAX_NAME)
            || len == 0
        {
            return Err(Fault::Invalid);
        }
        let ns = match self.namespaces.iter().position(|n| n == namespace) {
            Some(i) => i,
            None if self.namespaces.len() < usize::from(MAX_NAMESPACES) => {
                self.namespaces.push(namespace.to_owned());
                self.namespaces.len() - 1
            }
            None => return Err(Fault::Invalid),
        };
        let offset = self.end;
        self.end = offset + round_up(u64::from(len));
        self.blocks.push(Block {
            namespace: ns as u16,
            offset,
            len,
            checksum: xxh3_64(&data),
            codec,
            raw_len,
            key: key.to_vec(),
            parent: parent.to_vec(),
            tokens: tokens.to_vec(),
            sealed_tokens: sealed_tokens.to_vec(),
        });
        self.data.push(data);
        Ok(offset)
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Bytes of the object without its footer: what sealing decisions
    /// (segment size) are made on.
    pub fn data_len(&self) -> u64 {
        self.end
    }

    /// Lays the segment out.
    pub fn finish(self) -> Sealed {
        let footer = Footer {
            namespaces: self.namespaces,
            blocks: self.blocks,
        };
        let footer_at = self.end;
        let body = footer.encode();
        let mut tail = body.clone();
        tail.extend_from_slice(&footer_at.to_le_bytes());
        tail.extend_from_slice(&(body.len() as u32).to_le_bytes());
        tail.extend_from_slice(&VERSION.to_le_bytes());
        tail.extend_from_slice(&xxh3_64(&body).to_le_bytes());
        tail.extend_from_slice(&END_MAGIC);
        let mut parts = Vec::with_capacity(2 + 2 * self.data.len());
        parts.push(Bytes::from(header_page(
            &self.origin,
            footer.blocks.len() as u32,
            footer_at,
        )));
        for d in self.data {
            let pad = (round_up(d.len() as u64) - d.len() as u64) as usize;
            parts.push(d);
            if pad > 0 {
                parts.push(Bytes::from_static(&ZEROS[..pad]));
            }
        }
        let len = footer_at + tail.len() as u64;
        parts.push(Bytes::from(tail));
        Sealed {
            origin: self.origin,
            footer,
            parts,
            len,
        }
    }
}

/// Whether a footer entry's codec byte and raw length are possible for
/// `len` stored bytes.
fn entry_codec_ok(codec: u8, len: u32, raw_len: u32) -> bool {
    codec_known(codec) && (1..=MAX_RAW).contains(&raw_len) && (codec != CODEC_RAW || raw_len == len)
}

/// Whether `n` bytes can be sealed token ids: the overhead and whole
/// tokens, at most [`MAX_TOKENS`] of them.
fn sealed_len_ok(n: usize) -> bool {
    (SEALED_OVERHEAD as usize..=MAX_SEALED_TOKENS as usize).contains(&n)
        && (n - SEALED_OVERHEAD as usize).is_multiple_of(4)
}

/// Rounds `n` up to the next multiple of [`PAGE`].
pub const fn round_up(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

fn header_page(origin: &Origin, blocks: u32, footer_at: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE as usize];
    p[0..8].copy_from_slice(&MAGIC);
    p[8..12].copy_from_slice(&VERSION.to_le_bytes());
    p[12..16].copy_from_slice(&blocks.to_le_bytes());
    p[16..24].copy_from_slice(&origin.node.to_le_bytes());
    p[24..32].copy_from_slice(&origin.seq.to_le_bytes());
    p[32..40].copy_from_slice(&origin.created_ms.to_le_bytes());
    p[40..48].copy_from_slice(&footer_at.to_le_bytes());
    let sum = xxh3_64(&p[..HDR_SUM_AT]);
    p[HDR_SUM_AT..HDR_SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
    p
}

/// Reads a segment's header page: who wrote it, and where its footer starts.
pub fn decode_header(page: &[u8]) -> Result<(Origin, u64), Fault> {
    let mut r = Reader(page.get(..HDR_SUM_AT + 8).ok_or(Fault::Invalid)?);
    if r.bytes(8)? != MAGIC {
        return Err(Fault::Invalid);
    }
    if xxh3_64(&page[..HDR_SUM_AT]) != u64::from_le_bytes(le8(&page[HDR_SUM_AT..])) {
        return Err(Fault::Invalid);
    }
    let version = r.u32()?;
    if version != VERSION {
        return Err(Fault::Version(version));
    }
    let _blocks = r.u32()?;
    let origin = Origin {
        node: r.u64()?,
        seq: r.u64()?,
        created_ms: r.u64()?,
    };
    let footer_at = r.u64()?;
    if footer_at < PAGE || !footer_at.is_multiple_of(PAGE) || footer_at >= MAX_OBJECT {
        return Err(Fault::Invalid);
    }
    Ok((origin, footer_at))
}

/// Reads the footer of an object of `object_len` bytes from `tail`, its last
/// `tail.len()` bytes. [`Fault::Short`] says how much tail is needed when
/// `tail` does not reach back to the footer.
pub fn decode_tail(tail: &[u8], object_len: u64) -> Result<Footer, Fault> {
    if object_len > MAX_OBJECT || (tail.len() as u64) > object_len {
        return Err(Fault::Invalid);
    }
    let t = tail
        .len()
        .checked_sub(TRAILER as usize)
        .map(|at| &tail[at..])
        .ok_or(Fault::Short(TRAILER))?;
    if t[24..32] != END_MAGIC {
        return Err(Fault::Invalid);
    }
    let version = u32::from_le_bytes(le4(&t[12..16]));
    if version != VERSION {
        return Err(Fault::Version(version));
    }
    let footer_at = u64::from_le_bytes(le8(&t[0..8]));
    let footer_len = u32::from_le_bytes(le4(&t[8..12]));
    if footer_len > MAX_FOOTER
        || footer_at < PAGE
        || !footer_at.is_multiple_of(PAGE)
        || footer_at.checked_add(u64::from(footer_len) + TRAILER) != Some(object_len)
    {
        return Err(Fault::Invalid);
    }
    let need = u64::from(footer_len) + TRAILER;
    if (tail.len() as u64) < need {
        return Err(Fault::Short(need));
    }
    let body = &tail[tail.len() - need as usize..tail.len() - TRAILER as usize];
    if xxh3_64(body) != u64::from_le_bytes(le8(&t[16..24])) {
        return Err(Fault::Invalid);
    }
    Footer::decode(body, footer_at)
}

impl Footer {
    /// The footer's bytes (without the trailer).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.namespaces.len() as u16).to_le_bytes());
        for n in &self.namespaces {
            out.extend_from_slice(&(n.len() as u16).to_le_bytes());
            out.extend_from_slice(n.as_bytes());
        }
        out.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for b in &self.blocks {
            out.extend_from_slice(&b.namespace.to_le_bytes());
            out.extend_from_slice(&b.offset.to_le_bytes());
            out.extend_from_slice(&b.len.to_le_bytes());
            out.extend_from_slice(&b.checksum.to_le_bytes());
            out.push(b.codec);
            out.extend_from_slice(&b.raw_len.to_le_bytes());
            out.push(b.key.len() as u8);
            out.extend_from_slice(&b.key);
            out.push(b.parent.len() as u8);
            out.extend_from_slice(&b.parent);
            if b.encrypted() {
                out.extend_from_slice(&(b.sealed_tokens.len() as u32).to_le_bytes());
                out.extend_from_slice(&b.sealed_tokens);
            } else {
                out.extend_from_slice(&(b.tokens.len() as u32).to_le_bytes());
                for t in &b.tokens {
                    out.extend_from_slice(&t.to_le_bytes());
                }
            }
        }
        out
    }

    /// Decodes a footer whose data area ends at `footer_at`. Exposed for the
    /// fuzz target; readers go through [`decode_tail`].
    pub fn decode(body: &[u8], footer_at: u64) -> Result<Footer, Fault> {
        let mut r = Reader(body);
        let nns = r.u16()?;
        if nns > MAX_NAMESPACES {
            return Err(Fault::Invalid);
        }
        // Names are at least 3 bytes each (length and one byte).
        let mut namespaces = Vec::with_capacity(usize::from(nns).min(r.0.len() / 3));
        for _ in 0..nns {
            let len = r.u16()?;
            if len == 0 || len > MAX_NAME {
                return Err(Fault::Invalid);
            }
            let name =
                std::str::from_utf8(r.bytes(usize::from(len))?).map_err(|_| Fault::Invalid)?;
            namespaces.push(name.to_owned());
        }
        let n = r.u32()?;
        // Every entry takes at least MIN_ENTRY bytes: a count the rest of the
        // input cannot hold is refused before anything is reserved for it.
        if n > MAX_BLOCKS || n as usize > r.0.len() / MIN_ENTRY {
            return Err(Fault::Invalid);
        }
        let mut blocks = Vec::with_capacity(n as usize);
        let mut end = PAGE;
        for _ in 0..n {
            let namespace = r.u16()?;
            let offset = r.u64()?;
            let len = r.u32()?;
            let checksum = r.u64()?;
            let codec = r.u8()?;
            let raw_len = r.u32()?;
            if !entry_codec_ok(codec, len, raw_len) {
                return Err(Fault::Invalid);
            }
            let klen = usize::from(r.u8()?);
            if klen > MAX_KEY {
                return Err(Fault::Invalid);
            }
            let key = r.bytes(klen)?.to_vec();
            let plen = usize::from(r.u8()?);
            if plen > MAX_KEY {
                return Err(Fault::Invalid);
            }
            let parent = r.bytes(plen)?.to_vec();
            // Token ids: sealed (opaque here) or in the clear, each
            // length checked before anything is read or allocated.
            let n = r.u32()?;
            let (tokens, sealed_tokens) = if codec & CODEC_ENCRYPTED != 0 {
                if !sealed_len_ok(n as usize) {
                    return Err(Fault::Invalid);
                }
                (Vec::new(), r.bytes(n as usize)?.to_vec())
            } else {
                if n > MAX_TOKENS {
                    return Err(Fault::Invalid);
                }
                let raw = r.bytes(n as usize * 4)?;
                let tokens = raw
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(le4(c)))
                    .collect();
                (tokens, Vec::new())
            };
            // In the data area, in order, page aligned, not overlapping.
            let stop = offset.checked_add(round_up(u64::from(len)));
            if namespace >= nns
                || len == 0
                || offset < end
                || !offset.is_multiple_of(PAGE)
                || stop.is_none_or(|s| s > footer_at)
            {
                return Err(Fault::Invalid);
            }
            end = stop.unwrap_or(footer_at);
            blocks.push(Block {
                namespace,
                offset,
                len,
                checksum,
                codec,
                raw_len,
                key,
                parent,
                tokens,
                sealed_tokens,
            });
        }
        if !r.0.is_empty() {
            return Err(Fault::Invalid);
        }
        Ok(Footer { namespaces, blocks })
    }

    /// Byte ranges covering `blocks` (indexes into [`Footer::blocks`]),
    /// adjacent blocks merged into one range.
    pub fn ranges(&self, blocks: &[usize]) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for b in blocks.iter().filter_map(|&i| self.blocks.get(i)) {
            let r = b.offset..b.offset + round_up(u64::from(b.len));
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }
}

/// What a node announces after writing a segment: a small *index object*
/// that other nodes list and read instead of the segment itself.
///
/// ```text
///      0    8  magic              b"KVTG4IDX"
///      8    4  format version     u32 LE (the segment format's, 3)
///     12    8  node id            u64 LE
///     20    8  sequence number    u64 LE
///     28    8  created            u64 LE, Unix milliseconds
///     36    8  segment length     u64 LE
///     44    8  footer offset      u64 LE (in the segment)
///     52    4  footer length      u32 LE
///     56    …  the segment's footer, as in the segment
///    end - 8   xxh3-64 of everything before
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub origin: Origin,
    /// Bytes of the segment object.
    pub len: u64,
    pub footer: Footer,
}

const INDEX_MAGIC: [u8; 8] = *b"KVTG4IDX";
const INDEX_HEAD: usize = 56;

impl Announcement {
    /// The announcement of a sealed segment.
    pub fn of(s: &Sealed) -> Announcement {
        Announcement {
            origin: s.origin,
            len: s.len,
            footer: s.footer.clone(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let body = self.footer.encode();
        let footer_at = self.len - body.len() as u64 - TRAILER;
        let mut out = Vec::with_capacity(INDEX_HEAD + body.len() + 8);
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.origin.node.to_le_bytes());
        out.extend_from_slice(&self.origin.seq.to_le_bytes());
        out.extend_from_slice(&self.origin.created_ms.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&footer_at.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads an index object (from any node: hostile bytes).
    pub fn decode(bytes: &[u8]) -> Result<Announcement, Fault> {
        let at = bytes.len().checked_sub(8).ok_or(Fault::Invalid)?;
        if at < INDEX_HEAD || bytes[..8] != INDEX_MAGIC {
            return Err(Fault::Invalid);
        }
        if xxh3_64(&bytes[..at]) != u64::from_le_bytes(le8(&bytes[at..])) {
            return Err(Fault::Invalid);
        }
        let mut r = Reader(&bytes[8..at]);
        let version = r.u32()?;
        if version != VERSION {
            return Err(Fault::Version(version));
        }
        let origin = Origin {
            node: r.u64()?,
            seq: r.u64()?,
            created_ms: r.u64()?,
        };
        let len = r.u64()?;
        let footer_at = r.u64()?;
        let footer_len = r.u32()?;
        if len > MAX_OBJECT
            || footer_len > MAX_FOOTER
            || r.0.len() != footer_len as usize
            || footer_at < PAGE
            || !footer_at.is_multiple_of(PAGE)
            || footer_at.checked_add(u64::from(footer_len) + TRAILER) != Some(len)
        {
            return Err(Fault::Invalid);
        }
        let footer = Footer::decode(r.0, footer_at)?;
        Ok(Announcement {
            origin,
            len,
            footer,
        })
    }
}

/// Object names, under the bucket's prefix. A segment's name comes from its
/// origin, which no other node produces (node ids are random, one per data
/// directory);
/// two hex digits of a hash of it spread segments over 256 key prefixes,
/// which S3 partitions separately. Index objects sort by creation time, so
/// a reader lists only what is newer than what it has seen.
pub fn segment_name(o: &Origin) -> String {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&o.node.to_le_bytes());
    id[8..].copy_from_slice(&o.seq.to_le_bytes());
    format!(
        "seg/{:02x}/{:016x}-{:016x}.kvs",
        xxh3_64(&id) & 0xff,
        o.node,
        o.seq
    )
}

/// See [`segment_name`].
pub fn index_name(o: &Origin) -> String {
    format!(
        "{INDEX_DIR}/{:013}-{:016x}-{:016x}.kvi",
        o.created_ms, o.node, o.seq
    )
}

/// The key prefix of index objects.
pub const INDEX_DIR: &str = "idx";

/// The creation time an index object's name carries.
pub fn index_time(name: &str) -> Option<u64> {
    let file = name.rsplit('/').next()?;
    file.get(..13)?.parse().ok()
}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Fault> {
        if n > self.0.len() {
            return Err(Fault::Invalid);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Fault> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Fault> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Fault> {
        Ok(u32::from_le_bytes(le4(self.bytes(4)?)))
    }
    fn u64(&mut self) -> Result<u64, Fault> {
        Ok(u64::from_le_bytes(le8(self.bytes(8)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            node: 7,
            seq: 42,
            created_ms: 1_764_000_000_000,
        }
    }

    fn object(s: &Sealed) -> Vec<u8> {
        s.parts.iter().flat_map(|p| p.iter().copied()).collect()
    }

    fn sealed_chain(n: usize) -> (Sealed, Vec<Vec<u8>>) {
        let mut b = Builder::new(origin());
        let mut datas = Vec::new();
        for i in 0..n {
            // Lengths on and off page boundaries.
            let len = [4096, 5000, 1, 8192 + 17][i % 4];
            let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            let key = [i as u8; 16];
            let parent = if i == 0 {
                vec![]
            } else {
                vec![i as u8 - 1; 16]
            };
            let ns = if i % 2 == 0 { "llama/tp0" } else { "llama/tp1" };
            let tokens: Vec<u32> = (0..16).map(|t| (i * 16 + t) as u32).collect();
            let off = b
                .push(ns, &key, &parent, &tokens, Bytes::from(data.clone()))
                .unwrap();
            assert_eq!(off % PAGE, 0);
            datas.push(data);
        }
        (b.finish(), datas)
    }

    #[test]
    fn round_trip_every_block_bit_exact() {
        let (s, datas) = sealed_chain(9);
        let obj = object(&s);
        assert_eq!(obj.len() as u64, s.len);
        let (o, footer_at) = decode_header(&obj[..PAGE as usize]).unwrap();
        assert_eq!(o, origin());
        let f = decode_tail(&obj, s.len).unwrap();
        assert_eq!(f, s.footer);
        assert_eq!(f.namespaces, ["llama/tp0", "llama/tp1"]);
        for (b, d) in f.blocks.iter().zip(&datas) {
            let r = b.range();
            assert!(b.verify(&obj[r.start as usize..r.end as usize]));
            assert_eq!(&obj[r.start as usize..r.end as usize], &d[..]);
            assert!(r.end <= footer_at);
        }
        // A chain of adjacent blocks is one range.
        let all: Vec<usize> = (0..9).collect();
        assert_eq!(f.ranges(&all), vec![PAGE..footer_at]);
        assert_eq!(f.ranges(&[0, 2]).len(), 2);
    }

    #[test]
    fn a_short_tail_says_how_much_is_needed() {
        let (s, _) = sealed_chain(5);
        let obj = object(&s);
        let Err(Fault::Short(need)) = decode_tail(&obj[obj.len() - 40..], s.len) else {
            panic!("a 40-byte tail cannot hold the footer");
        };
        let f = decode_tail(&obj[obj.len() - need as usize..], s.len).unwrap();
        assert_eq!(f, s.footer);
        assert_eq!(
            decode_tail(&obj[obj.len() - 8..], s.len),
            Err(Fault::Short(TRAILER))
        );
    }

    #[test]
    fn damage_is_refused_never_misread() {
        let (s, _) = sealed_chain(4);
        let obj = object(&s);
        let footer_at = decode_header(&obj).unwrap().1 as usize;
        // Every single flipped bit in the footer or trailer is caught.
        for i in footer_at..obj.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = obj.clone();
                bad[i] ^= bit;
                let r = decode_tail(&bad, s.len);
                assert!(
                    matches!(r, Err(Fault::Invalid) | Err(Fault::Version(_))),
                    "byte {i}: {r:?}"
                );
            }
        }
        // A flipped bit in a block is caught by its checksum.
        let f = decode_tail(&obj, s.len).unwrap();
        let b = &f.blocks[1];
        let mut bad = obj.clone();
        bad[b.offset as usize + 3] ^= 1;
        assert!(!b.verify(&bad[b.offset as usize..b.range().end as usize]));
        // A damaged header page.
        let mut bad = obj.clone();
        bad[20] ^= 1;
        assert_eq!(decode_header(&bad), Err(Fault::Invalid));
        // Wrong object length.
        assert!(decode_tail(&obj, s.len + 1).is_err());
        assert!(decode_tail(&obj[1..], s.len - 1).is_err());
    }

    #[test]
    fn an_unknown_version_is_refused() {
        // 1: the format before codecs, 2: before sealed token ids (no
        // longer read); 4: a future one.
        for v in [1u32, 2, 4] {
            let (s, _) = sealed_chain(2);
            let mut obj = object(&s);
            let at = obj.len() - 20;
            obj[at..at + 4].copy_from_slice(&v.to_le_bytes());
            assert_eq!(decode_tail(&obj, s.len), Err(Fault::Version(v)));
            let mut page = obj[..PAGE as usize].to_vec();
            page[8..12].copy_from_slice(&v.to_le_bytes());
            let sum = xxh3_64(&page[..HDR_SUM_AT]);
            page[HDR_SUM_AT..HDR_SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
            assert_eq!(decode_header(&page), Err(Fault::Version(v)));
            let mut idx = Announcement::of(&s).encode();
            idx[8..12].copy_from_slice(&v.to_le_bytes());
            let at = idx.len() - 8;
            let sum = xxh3_64(&idx[..at]);
            idx[at..].copy_from_slice(&sum.to_le_bytes());
            assert_eq!(Announcement::decode(&idx), Err(Fault::Version(v)));
        }
    }

    #[test]
    fn codec_and_raw_length_round_trip_and_are_checked() {
        let mut b = Builder::new(origin());
        let stored = Bytes::from(vec![9u8; 300]);
        let lz4_enc = CODEC_LZ4 | CODEC_ENCRYPTED;
        let sealed = [0xa5u8; 40];
        b.push_encoded("n", &[1], &[], &[], &sealed, stored.clone(), lz4_enc, 4096)
            .unwrap();
        b.push_encoded("n", &[2], &[1], &[6], &[], stored.clone(), CODEC_ZSTD, 8192)
            .unwrap();
        b.push("n", &[3], &[2], &[7], stored.clone()).unwrap();
        let s = b.finish();
        let obj = object(&s);
        let f = decode_tail(&obj, s.len).unwrap();
        assert_eq!(f, s.footer);
        let got: Vec<(u8, u32, u32)> = f
            .blocks
            .iter()
            .map(|b| (b.codec, b.raw_len, b.len))
            .collect();
        assert_eq!(
            got,
            [
                (lz4_enc, 4096, 300),
                (CODEC_ZSTD, 8192, 300),
                (CODEC_RAW, 300, 300)
            ]
        );
        assert_eq!(
            Announcement::decode(&Announcement::of(&s).encode())
                .unwrap()
                .footer,
            f
        );

        // The builder and the decoder refuse the same things.
        let mut b = Builder::new(origin());
        for (codec, raw_len) in [
            (0x04, 4096),              // an unknown bit
            (0x40 | CODEC_LZ4, 4096),  // another
            (0x03, 4096),              // compression 3
            (CODEC_LZ4, 0),            // empty once decoded
            (CODEC_ZSTD, MAX_RAW + 1), // too large once decoded
            (CODEC_RAW, 301),          // raw, yet another length
            (CODEC_ENCRYPTED, 0),
        ] {
            let sealed: &[u8] = if codec & CODEC_ENCRYPTED != 0 {
                &sealed
            } else {
                &[]
            };
            assert_eq!(
                b.push_encoded("n", &[1], &[], &[], sealed, stored.clone(), codec, raw_len),
                Err(Fault::Invalid),
                "{codec:#x} {raw_len}"
            );
            let mut f = s.footer.clone();
            f.blocks[0].codec = codec;
            f.blocks[0].raw_len = raw_len;
            assert_eq!(
                Footer::decode(&f.encode(), decode_header(&obj).unwrap().1),
                Err(Fault::Invalid),
                "{codec:#x} {raw_len}"
            );
        }
        assert!(b.is_empty());
        assert!(codec_known(CODEC_ZSTD | CODEC_ENCRYPTED) && codec_known(CODEC_ENCRYPTED));
    }

    #[test]
    fn encrypted_blocks_carry_their_token_ids_sealed() {
        let mut b = Builder::new(origin());
        let stored = Bytes::from(vec![9u8; 300]);
        let enc = CODEC_ZSTD | CODEC_ENCRYPTED;
        // 16 tokens, sealed; 0 tokens, sealed; 3 tokens in the clear.
        let sealed: Vec<u8> = (0..SEALED_OVERHEAD + 64).map(|i| i as u8).collect();
        let empty = vec![7u8; SEALED_OVERHEAD as usize];
        b.push_encoded("n", &[1], &[], &[], &sealed, stored.clone(), enc, 4096)
            .unwrap();
        b.push_encoded("n", &[2], &[1], &[], &empty, stored.clone(), enc, 4096)
            .unwrap();
        b.push("n", &[3], &[2], &[1, 2, 3], stored.clone()).unwrap();
        let s = b.finish();
        let obj = object(&s);
        let f = decode_tail(&obj, s.len).unwrap();
        assert_eq!(f, s.footer);
        assert_eq!(f.blocks[0].sealed_tokens, sealed);
        assert!(f.blocks[0].tokens.is_empty() && f.blocks[0].encrypted());
        assert_eq!(f.blocks[1].sealed_tokens, empty);
        assert_eq!(
            (&f.blocks[2].tokens[..], f.blocks[2].encrypted()),
            (&[1, 2, 3][..], false)
        );
        assert!(f.blocks[2].sealed_tokens.is_empty());
        // The sealed bytes are stored as they are, in segment and index.
        assert!(obj.windows(sealed.len()).any(|w| w == sealed));
        let idx = Announcement::of(&s).encode();
        assert_eq!(Announcement::decode(&idx).unwrap().footer, f);

        // The builder refuses tokens in the clear on an encrypted block,
        // sealed ones on a block in the clear, and impossible lengths.
        let mut b = Builder::new(origin());
        let d = || stored.clone();
        for (tokens, sealed, codec) in [
            (&[5u32][..], &sealed[..], enc),
            (&[][..], &sealed[..], CODEC_ZSTD),
            (&[][..], &sealed[..SEALED_OVERHEAD as usize - 1], enc),
            (&[][..], &sealed[..SEALED_OVERHEAD as usize + 3], enc),
            (&[][..], &[][..], enc),
        ] {
            assert_eq!(
                b.push_encoded("n", &[1], &[], tokens, sealed, d(), codec, 4096),
                Err(Fault::Invalid),
                "{tokens:?} {} {codec:#x}",
                sealed.len()
            );
        }
        let long = vec![0u8; MAX_SEALED_TOKENS as usize + 4];
        assert!(b
            .push_encoded("n", &[1], &[], &[], &long, d(), enc, 4096)
            .is_err());
        assert!(b.is_empty());

        // The decoder refuses the same lengths before reading them.
        let at = decode_header(&obj).unwrap().1;
        for n in [
            0,
            SEALED_OVERHEAD - 1,
            SEALED_OVERHEAD + 3,
            MAX_SEALED_TOKENS + 4,
            u32::MAX,
        ] {
            let mut bad = s.footer.clone();
            bad.blocks[0].sealed_tokens = vec![0; (n as usize).min(1 << 20)];
            let mut enc = bad.encode();
            // The length field of block 0's sealed token ids.
            let field = footer_sealed_at(&bad);
            enc[field..field + 4].copy_from_slice(&n.to_le_bytes());
            assert_eq!(Footer::decode(&enc, at), Err(Fault::Invalid), "{n}");
        }
    }

    /// Where block 0's token field starts in `f`'s encoding.
    fn footer_sealed_at(f: &Footer) -> usize {
        let names: usize = f.namespaces.iter().map(|n| 2 + n.len()).sum();
        let b = &f.blocks[0];
        2 + names + 4 + MIN_ENTRY - 4 + b.key.len() + b.parent.len()
    }

    #[test]
    fn geometry_is_checked_on_decode() {
        let f = |blocks: Vec<(u64, u32)>| Footer {
            namespaces: vec!["n".into()],
            blocks: blocks
                .into_iter()
                .map(|(offset, len)| Block {
                    namespace: 0,
                    offset,
                    len,
                    checksum: 0,
                    codec: CODEC_RAW,
                    raw_len: len,
                    key: vec![1],
                    parent: vec![],
                    tokens: vec![],
                    sealed_tokens: vec![],
                })
                .collect(),
        };
        let at = 4 * PAGE;
        let ok = f(vec![(PAGE, 10), (2 * PAGE, 4096), (3 * PAGE, 1)]).encode();
        assert!(Footer::decode(&ok, at).is_ok());
        for bad in [
            vec![(0, 10)],                     // inside the header page
            vec![(PAGE + 1, 10)],              // unaligned
            vec![(2 * PAGE, 10), (PAGE, 10)],  // out of order
            vec![(PAGE, 4097), (2 * PAGE, 1)], // overlapping
            vec![(3 * PAGE, 4097)],            // into the footer
            vec![(PAGE, 0)],                   // empty
            vec![(u64::MAX - 100, 1)],         // overflowing
        ] {
            assert_eq!(
                Footer::decode(&f(bad.clone()).encode(), at),
                Err(Fault::Invalid),
                "{bad:?}"
            );
        }
        // Trailing bytes, a namespace out of range, an absurd count.
        let mut extra = ok.clone();
        extra.push(0);
        assert_eq!(Footer::decode(&extra, at), Err(Fault::Invalid));
        let mut bad_ns = f(vec![(PAGE, 10)]);
        bad_ns.blocks[0].namespace = 1;
        assert_eq!(Footer::decode(&bad_ns.encode(), at), Err(Fault::Invalid));
        let mut huge = vec![0u8, 0];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Footer::decode(&huge, at), Err(Fault::Invalid));
    }

    #[test]
    fn announcements_round_trip_and_refuse_damage() {
        let (s, _) = sealed_chain(6);
        let a = Announcement::of(&s);
        let enc = a.encode();
        assert_eq!(Announcement::decode(&enc), Ok(a.clone()));
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x04;
            assert!(Announcement::decode(&bad).is_err(), "byte {i}");
        }
        assert!(Announcement::decode(&enc[..enc.len() - 1]).is_err());
        assert!(Announcement::decode(&[]).is_err());
        // Names: index objects sort by time, segments by nothing a reader
        // relies on.
        let o = origin();
        assert!(segment_name(&o).starts_with("seg/"));
        assert_eq!(index_time(&index_name(&o)), Some(o.created_ms));
        let later = Origin {
            created_ms: o.created_ms + 1,
            ..o
        };
        assert!(index_name(&later) > index_name(&o));
    }

    #[test]
    fn the_builder_refuses_what_readers_refuse() {
        let mut b = Builder::new(origin());
        let d = || Bytes::from_static(b"x");
        assert!(b.push("n", &[0; 33], &[], &[], d()).is_err());
        assert!(b.push("n", &[1], &[0; 33], &[], d()).is_err());
        assert!(b.push("n", &[1], &[], &[], Bytes::new()).is_err());
        assert!(b.push(&"n".repeat(2000), &[1], &[], &[], d()).is_err());
        assert!(b.push("", &[1], &[], &[], d()).is_err());
        assert!(b.is_empty());
        assert_eq!(b.push("n", &[1], &[], &[], d()), Ok(PAGE));
        assert_eq!(b.push("n", &[2], &[1], &[], d()), Ok(2 * PAGE));
        assert_eq!(b.data_len(), 3 * PAGE);
    }
}
