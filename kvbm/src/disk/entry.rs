//! On-disk entry format of the G3 tier and the aligned buffers used for
//! `O_DIRECT` I/O.
//!
//! An entry is a 4 KiB header page followed by the block's stored bytes,
//! padded with zeros to the next 4 KiB boundary:
//!
//! ```text
//! offset  size  field
//!      0     8  magic            b"KVTG3ENT"
//!      8     4  format version   2 (u32 LE)
//!     12     4  namespace id     u32 LE
//!     16     8  region generation u64 LE (the region's generation when written)
//!     24     8  entry offset     u64 LE (absolute file offset of this header)
//!     32     4  data length      u32 LE (stored bytes, unpadded)
//!     36     1  key length       0..=32
//!     37     1  codec            bits 0-1 compression (0 none, 1 lz4, 2 zstd),
//!                                bit 7 encrypted (AES-256-GCM); others zero
//!     38     2  reserved         zero
//!     40     8  data checksum    xxh3-64 of the stored (unpadded) data
//!     48    32  key              key bytes, zero padded
//!     80     4  raw length       u32 LE: the block's length once decoded
//!                                (equal to the data length unless compressed,
//!                                and larger when compressed)
//!     84     8  key id           encrypted: the id of the key (see below); else zero
//!     92    12  nonce            encrypted: random, fresh per entry; else zero
//!    104    16  tag              encrypted: the AES-256-GCM tag; else zero
//!    120     8  header checksum  xxh3-64 of bytes 0..120
//!    128  3968  zero
//! ```
//!
//! The generation and the entry offset are part of the header so that a
//! location that outlived its region (the region was recycled, or the file was
//! recreated with another geometry) can never match a newer entry by accident.
//!
//! An encrypted entry's associated data binds the namespace id, the block
//! key, the generation and entry offset, the codec byte, the raw and the
//! stored length (see [`super::codec`]): an entry copied to another place
//! in the file, or its header rewritten to name another block or to decode
//! it differently, fails authentication. Version 1 entries (no codec, no
//! raw length) are refused like any unknown version: a miss.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use xxhash_rust::xxh3::xxh3_64;

/// Size of the header page and the alignment unit of every on-disk offset and
/// length. 4 KiB satisfies the `O_DIRECT` alignment of every common NVMe drive
/// and file system (logical blocks are 512 B or 4 KiB).
pub const PAGE: usize = 4096;

/// Magic number opening every entry header.
pub const MAGIC: [u8; 8] = *b"KVTG3ENT";

/// Current header format version.
pub const VERSION: u32 = 2;

/// Longest key accepted (engine block hashes are at most 32 bytes).
pub const MAX_KEY: usize = 32;

/// Bytes of the header covered by the header checksum.
const HDR_SUM_AT: usize = 120;

/// Codec bits 0-1: how the data is compressed.
pub const CODEC_COMPRESSION: u8 = 0x03;
pub const CODEC_LZ4: u8 = 1;
pub const CODEC_ZSTD: u8 = 2;
/// Codec bit 7: the data is encrypted.
pub const CODEC_ENCRYPTED: u8 = 0x80;

/// Bytes of an encrypted entry's key id, nonce and tag.
pub const KEY_ID_LEN: usize = 8;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// Rounds `n` up to the next multiple of [`PAGE`].
pub const fn round_up(n: u64) -> u64 {
    (n + PAGE as u64 - 1) & !(PAGE as u64 - 1)
}

/// On-disk size of an entry holding `len` data bytes (header page + padded
/// data).
pub const fn entry_bytes(len: u64) -> u64 {
    PAGE as u64 + round_up(len)
}

/// The decoded content of a header page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub namespace: u32,
    pub generation: u64,
    pub offset: u64,
    /// Stored bytes (unpadded).
    pub len: u32,
    pub checksum: u64,
    pub key: Vec<u8>,
    /// The block's length once decoded: `len` unless compressed.
    pub raw_len: u32,
    /// Codec bits 0-1 ([`CODEC_LZ4`], [`CODEC_ZSTD`] or 0).
    pub compression: u8,
    /// Key id, nonce and tag of an encrypted entry.
    pub sealed: Option<Seal>,
}

/// What opening an encrypted entry takes besides its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    pub key_id: [u8; KEY_ID_LEN],
    pub nonce: [u8; NONCE_LEN],
    pub tag: [u8; TAG_LEN],
}

/// Why a header page was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderFault {
    /// Not an entry at all: wrong magic, unknown version, bad header checksum
    /// or impossible field values.
    Invalid,
}

impl Header {
    /// The header of an entry stored as is (no compression, no encryption).
    pub fn plain(
        namespace: u32,
        generation: u64,
        offset: u64,
        len: u32,
        checksum: u64,
        key: Vec<u8>,
    ) -> Header {
        Header {
            namespace,
            generation,
            offset,
            len,
            checksum,
            key,
            raw_len: len,
            compression: 0,
            sealed: None,
        }
    }

    /// The codec byte.
    pub fn codec(&self) -> u8 {
        self.compression
            | if self.sealed.is_some() {
                CODEC_ENCRYPTED
            } else {
                0
            }
    }

    /// Writes the header into the first bytes of `page` and zeros the rest.
    /// `page` must be exactly one [`PAGE`] long; the key must be at most
    /// [`MAX_KEY`] bytes (checked by the caller before anything is queued).
    pub fn encode(&self, page: &mut [u8]) {
        debug_assert_eq!(page.len(), PAGE);
        debug_assert!(self.key.len() <= MAX_KEY);
        page.fill(0);
        page[0..8].copy_from_slice(&MAGIC);
        page[8..12].copy_from_slice(&VERSION.to_le_bytes());
        page[12..16].copy_from_slice(&self.namespace.to_le_bytes());
        page[16..24].copy_from_slice(&self.generation.to_le_bytes());
        page[24..32].copy_from_slice(&self.offset.to_le_bytes());
        page[32..36].copy_from_slice(&self.len.to_le_bytes());
        let klen = self.key.len().min(MAX_KEY);
        page[36] = klen as u8;
        page[37] = self.codec();
        page[40..48].copy_from_slice(&self.checksum.to_le_bytes());
        page[48..48 + klen].copy_from_slice(&self.key[..klen]);
        page[80..84].copy_from_slice(&self.raw_len.to_le_bytes());
        if let Some(s) = &self.sealed {
            page[84..92].copy_from_slice(&s.key_id);
            page[92..104].copy_from_slice(&s.nonce);
            page[104..120].copy_from_slice(&s.tag);
        }
        let sum = xxh3_64(&page[..HDR_SUM_AT]);
        page[HDR_SUM_AT..HDR_SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
    }

    /// Parses and self-verifies a header page (magic, version, header
    /// checksum, field ranges, a codec byte consistent with the lengths and
    /// the seal). Whether it is the *expected* entry is the caller's check.
    pub fn decode(page: &[u8]) -> Result<Header, HeaderFault> {
        if page.len() < HDR_SUM_AT + 8 || page[0..8] != MAGIC {
            return Err(HeaderFault::Invalid);
        }
        let sum = u64::from_le_bytes(le8(&page[HDR_SUM_AT..HDR_SUM_AT + 8]));
        if xxh3_64(&page[..HDR_SUM_AT]) != sum {
            return Err(HeaderFault::Invalid);
        }
        if u32::from_le_bytes(le4(&page[8..12])) != VERSION {
            return Err(HeaderFault::Invalid);
        }
        let klen = page[36] as usize;
        if klen > MAX_KEY {
            return Err(HeaderFault::Invalid);
        }
        let codec = page[37];
        let compression = codec & CODEC_COMPRESSION;
        if codec & !(CODEC_COMPRESSION | CODEC_ENCRYPTED) != 0
            || !matches!(compression, 0 | CODEC_LZ4 | CODEC_ZSTD)
        {
            return Err(HeaderFault::Invalid);
        }
        let len = u32::from_le_bytes(le4(&page[32..36]));
        let raw_len = u32::from_le_bytes(le4(&page[80..84]));
        // Compression is kept only when it made the entry smaller, so the
        // stored length alone says whether a read must decompress.
        let lengths_ok = if compression == 0 {
            raw_len == len
        } else {
            len < raw_len
        };
        if !lengths_ok {
            return Err(HeaderFault::Invalid);
        }
        let sealed = if codec & CODEC_ENCRYPTED != 0 {
            let mut s = Seal {
                key_id: [0; KEY_ID_LEN],
                nonce: [0; NONCE_LEN],
                tag: [0; TAG_LEN],
            };
            s.key_id.copy_from_slice(&page[84..92]);
            s.nonce.copy_from_slice(&page[92..104]);
            s.tag.copy_from_slice(&page[104..120]);
            Some(s)
        } else if page[84..120].iter().any(|&b| b != 0) {
            return Err(HeaderFault::Invalid);
        } else {
            None
        };
        Ok(Header {
            namespace: u32::from_le_bytes(le4(&page[12..16])),
            generation: u64::from_le_bytes(le8(&page[16..24])),
            offset: u64::from_le_bytes(le8(&page[24..32])),
            len,
            checksum: u64::from_le_bytes(le8(&page[40..48])),
            key: page[48..48 + klen].to_vec(),
            raw_len,
            compression,
            sealed,
        })
    }
}

// Slices handed to these are always exactly 4 / 8 bytes long (fixed ranges
// above), so copying instead of `try_into().unwrap()` keeps the decoder free
// of panicking paths without changing behaviour.
pub(crate) fn le4(s: &[u8]) -> [u8; 4] {
    let mut b = [0u8; 4];
    b.copy_from_slice(&s[..4]);
    b
}

pub(crate) fn le8(s: &[u8]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[..8]);
    b
}

/// A zero-initialised heap buffer aligned to [`PAGE`], usable for `O_DIRECT`
/// I/O. Its length is rounded up to whole pages.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` bytes rounded up to whole pages (at least one page).
    /// Returns `None` when the allocator refuses (no panic on huge sizes).
    pub fn new(len: usize) -> Option<AlignedBuf> {
        let len = (round_up(len as u64) as usize).max(PAGE);
        let layout = Layout::from_size_align(len, PAGE).ok()?;
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        NonNull::new(raw).map(|ptr| AlignedBuf { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed at allocation) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout (already valid).
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, PAGE),
            )
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header::plain(
            7,
            42,
            64 << 20,
            2 << 20,
            0xdead_beef_cafe_f00d,
            (0u8..32).collect(),
        )
    }

    /// An lz4-compressed, encrypted entry.
    fn sealed() -> Header {
        Header {
            len: 1 << 20,
            compression: CODEC_LZ4,
            sealed: Some(Seal {
                key_id: [1; KEY_ID_LEN],
                nonce: [2; NONCE_LEN],
                tag: [3; TAG_LEN],
            }),
            ..sample()
        }
    }

    fn encoded(h: &Header) -> Vec<u8> {
        let mut page = vec![0u8; PAGE];
        h.encode(&mut page);
        page
    }

    /// `page` with its header checksum made right again.
    fn resummed(mut page: Vec<u8>) -> Vec<u8> {
        let sum = xxh3_64(&page[..HDR_SUM_AT]);
        page[HDR_SUM_AT..HDR_SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
        page
    }

    #[test]
    fn header_round_trip() {
        for h in [sample(), sealed()] {
            assert_eq!(Header::decode(&encoded(&h)), Ok(h.clone()));
        }
        let page = encoded(&sealed());
        assert_eq!(page[37], CODEC_LZ4 | CODEC_ENCRYPTED);
        assert_eq!(page[80..84], (2u32 << 20).to_le_bytes());
        assert_eq!(page[84..92], [1; 8]);
        assert_eq!(page[104..120], [3; 16]);
        // Zstd, or encrypted only: the stored length is the raw length.
        let zstd = Header {
            compression: CODEC_ZSTD,
            sealed: None,
            ..sealed()
        };
        let enc_only = Header {
            len: 2 << 20,
            compression: 0,
            ..sealed()
        };
        for h in [zstd, enc_only] {
            assert_eq!(Header::decode(&encoded(&h)), Ok(h.clone()));
        }
    }

    #[test]
    fn header_detects_every_flipped_byte() {
        for h in [sample(), sealed()] {
            let page = encoded(&h);
            for i in 0..128 {
                let mut p = page.clone();
                p[i] ^= 0x40;
                assert!(Header::decode(&p).is_err(), "flip at {i} undetected");
            }
        }
    }

    #[test]
    fn inconsistent_codec_bytes_are_invalid_even_with_a_good_checksum() {
        let bad = |f: &dyn Fn(&mut Vec<u8>), h: &Header| {
            let mut p = encoded(h);
            f(&mut p);
            Header::decode(&resummed(p))
        };
        // Unknown bits, compression 3.
        for c in [0x04, 0x40, 0x03, 0x83] {
            assert_eq!(bad(&|p| p[37] = c, &sample()), Err(HeaderFault::Invalid));
        }
        // Compressed but not smaller; stored as is but of another length.
        assert_eq!(
            bad(&|p| p[37] = CODEC_LZ4, &sample()),
            Err(HeaderFault::Invalid)
        );
        assert_eq!(
            bad(
                &|p| p[80..84].copy_from_slice(&1u32.to_le_bytes()),
                &sample()
            ),
            Err(HeaderFault::Invalid)
        );
        // A seal on an entry that says it is not encrypted.
        assert_eq!(
            bad(&|p| p[37] = CODEC_LZ4, &sealed()),
            Err(HeaderFault::Invalid)
        );
        // Version 1, whatever else the page holds: refused.
        assert_eq!(
            bad(
                &|p| p[8..12].copy_from_slice(&1u32.to_le_bytes()),
                &sample()
            ),
            Err(HeaderFault::Invalid)
        );
    }

    #[test]
    fn zero_page_is_invalid() {
        assert_eq!(Header::decode(&[0u8; PAGE]), Err(HeaderFault::Invalid));
        assert_eq!(Header::decode(&[]), Err(HeaderFault::Invalid));
    }

    #[test]
    fn sizes() {
        assert_eq!(round_up(0), 0);
        assert_eq!(round_up(1), 4096);
        assert_eq!(round_up(4096), 4096);
        assert_eq!(entry_bytes(2 << 20), (2 << 20) + 4096);
        let b = AlignedBuf::new(5000).expect("alloc");
        assert_eq!(b.len(), 8192);
        assert_eq!(b.as_ptr() as usize % PAGE, 0);
    }
}
