//! On-disk entry format of the G3 tier and the aligned buffers used for
//! `O_DIRECT` I/O.
//!
//! An entry is a 4 KiB header page followed by the block's bytes, padded with
//! zeros to the next 4 KiB boundary:
//!
//! ```text
//! offset  size  field
//!      0     8  magic            b"KVTG3ENT"
//!      8     4  format version   1 (u32 LE)
//!     12     4  namespace id     u32 LE
//!     16     8  region generation u64 LE (the region's generation when written)
//!     24     8  entry offset     u64 LE (absolute file offset of this header)
//!     32     4  data length      u32 LE (unpadded)
//!     36     1  key length       0..=32
//!     37     3  reserved         zero
//!     40     8  data checksum    xxh3-64 of the unpadded data
//!     48    32  key              key bytes, zero padded
//!     80    40  reserved         zero
//!    120     8  header checksum  xxh3-64 of bytes 0..120
//!    128  3968  zero
//! ```
//!
//! The generation and the entry offset are part of the header so that a
//! location that outlived its region (the region was recycled, or the file was
//! recreated with another geometry) can never match a newer entry by accident.

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
pub const VERSION: u32 = 1;

/// Longest key accepted (engine block hashes are at most 32 bytes).
pub const MAX_KEY: usize = 32;

/// Bytes of the header covered by the header checksum.
const HDR_SUM_AT: usize = 120;

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
    pub len: u32,
    pub checksum: u64,
    pub key: Vec<u8>,
}

/// Why a header page was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderFault {
    /// Not an entry at all: wrong magic, unknown version, bad header checksum
    /// or impossible field values.
    Invalid,
}

impl Header {
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
        page[40..48].copy_from_slice(&self.checksum.to_le_bytes());
        page[48..48 + klen].copy_from_slice(&self.key[..klen]);
        let sum = xxh3_64(&page[..HDR_SUM_AT]);
        page[HDR_SUM_AT..HDR_SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
    }

    /// Parses and self-verifies a header page (magic, version, header
    /// checksum, field ranges). Whether it is the *expected* entry is the
    /// caller's check.
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
        Ok(Header {
            namespace: u32::from_le_bytes(le4(&page[12..16])),
            generation: u64::from_le_bytes(le8(&page[16..24])),
            offset: u64::from_le_bytes(le8(&page[24..32])),
            len: u32::from_le_bytes(le4(&page[32..36])),
            checksum: u64::from_le_bytes(le8(&page[40..48])),
            key: page[48..48 + klen].to_vec(),
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
        Header {
            namespace: 7,
            generation: 42,
            offset: 64 << 20,
            len: 2 << 20,
            checksum: 0xdead_beef_cafe_f00d,
            key: (0u8..32).collect(),
        }
    }

    #[test]
    fn header_round_trip() {
        let mut page = vec![0u8; PAGE];
        sample().encode(&mut page);
        assert_eq!(Header::decode(&page), Ok(sample()));
    }

    #[test]
    fn header_detects_every_flipped_byte() {
        let mut page = vec![0u8; PAGE];
        sample().encode(&mut page);
        for i in 0..128 {
            let mut p = page.clone();
            p[i] ^= 0x40;
            assert!(Header::decode(&p).is_err(), "flip at {i} undetected");
        }
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
