//! The host pool (G2 memory): one memfd per segment — the shared pool, and
//! one per tenant — mapped side by side once by the daemon, and each mapped
//! by the clients allowed to see it; carved into block slots.
//!
//! Slots are 4 KiB-aligned extents (so the disk tier can do `O_DIRECT` I/O
//! straight from and into them). Free space is kept as coalesced extents;
//! blocks of one namespace all have the same size, so in steady state a freed
//! slot is exactly the size the next block of that namespace needs.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{Error, ErrorKind, Result};

/// Slot alignment: the `O_DIRECT` unit.
pub const ALIGN: u64 = 4096;

/// Rounds a block size up to the slot size that holds it.
pub fn slot_bytes(block_bytes: u64) -> u64 {
    block_bytes.div_ceil(ALIGN) * ALIGN
}

pub struct Pool {
    segments: Vec<Segment>,
    /// Start of the reserved address range every segment is mapped into.
    base: *mut u8,
    /// The reserved range as mapped (for unmapping): `base` may sit above
    /// its start, aligned for huge pages.
    reserved: (*mut libc::c_void, usize),
    len: u64,
    huge_pages: bool,
}

/// One memfd of the pool, mapped at `start` bytes into it: the shared pool
/// (segment 0) or a tenant's. A client is handed one segment's memfd and
/// sees nothing else.
struct Segment {
    fd: OwnedFd,
    start: u64,
    len: u64,
}

// SAFETY: the mapping is shared memory whose slots are handed out by the
// allocator below; concurrent access to one slot is ruled out by the block
// index (a slot is written only while reserved, read only while leased).
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

const HUGE_PAGE: u64 = 2 << 20;

impl Pool {
    /// A pool of one segment of `len` bytes.
    pub fn create(len: u64) -> Result<Pool> {
        Pool::with_segments(&[len])
    }

    /// Creates one memfd per segment (huge pages when the system has them
    /// reserved), maps them one after the other in one address range, and
    /// faults every page in now so the first block copies do not pay for
    /// page faults.
    pub fn with_segments(lens: &[u64]) -> Result<Pool> {
        // Huge pages first; most machines have none reserved, so this
        // commonly fails and normal memfds are used.
        if let Ok(pool) = Pool::build(lens, true) {
            return Ok(pool);
        }
        Pool::build(lens, false)
    }

    fn build(lens: &[u64], huge: bool) -> Result<Pool> {
        let unit = if huge { HUGE_PAGE } else { ALIGN };
        let lens: Vec<u64> = lens.iter().map(|l| l.div_ceil(unit) * unit).collect();
        let total: u64 = lens.iter().sum();
        let map_failed = |what: &str| {
            Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "cannot map {what} of {total} bytes: {}",
                    std::io::Error::last_os_error()
                ),
            )
        };
        // Reserve the whole range first (no memory behind it), with room to
        // align it for huge pages; each segment is then mapped over its part.
        let reserved_len = (total + unit) as usize;
        // SAFETY: an anonymous reservation at an address of the kernel's
        // choosing.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(map_failed("an address range for the host pool"));
        }
        let base = (raw as u64).div_ceil(unit) * unit;
        let mut pool = Pool {
            segments: Vec::with_capacity(lens.len()),
            base: base as *mut u8,
            reserved: (raw, reserved_len),
            len: total,
            huge_pages: huge,
        };
        let mut start = 0;
        for (i, &len) in lens.iter().enumerate() {
            let fd = memfd(i, len, huge)?;
            let at = (base + start) as *mut libc::c_void;
            // SAFETY: mapping our memfd over our own reservation.
            let p = unsafe {
                libc::mmap(
                    at,
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(map_failed("a host pool segment"));
            }
            // MAP_POPULATE maps the pages, yet the first write to each page
            // through a mapping stays slow (no page fault is counted).
            // Measured on the H200 host (a VM, 2026-11-30,
            // benches/probes/pool_first_touch.c, 1 GiB in 2 MiB copies):
            // 3.5–3.7 GB/s for the first pass against 6.0 GB/s after, and
            // 5.8 GB/s on the first pass after MADV_POPULATE_WRITE.
            // Write-fault every page now (Linux 5.14+; older kernels refuse
            // the advice, harmlessly).
            // SAFETY: advising on our own mapping.
            unsafe {
                libc::madvise(p, len as usize, libc::MADV_POPULATE_WRITE);
            }
            if !huge {
                // Transparent huge pages for shared memory where the system
                // allows them (`shmem_enabled` = advise): fewer TLB misses
                // when a put or get sweeps a whole block. Advice only.
                // SAFETY: advising on our own mapping.
                unsafe {
                    libc::madvise(p, len as usize, libc::MADV_HUGEPAGE);
                }
            }
            pool.segments.push(Segment { fd, start, len });
            start += len;
        }
        Ok(pool)
    }

    /// Bytes of every segment together.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// `(start, len)` of each segment within the pool, in order.
    pub fn segments(&self) -> Vec<(u64, u64)> {
        self.segments.iter().map(|s| (s.start, s.len)).collect()
    }

    /// Segment `i`'s memfd and length, to pass to local clients over the
    /// pool socket.
    pub fn segment_fd(&self, i: usize) -> Option<(&OwnedFd, u64)> {
        self.segments.get(i).map(|s| (&s.fd, s.len))
    }

    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// A slot's bytes.
    ///
    /// # Safety
    /// The caller must hold the slot (reserved or leased) so no one else
    /// writes it for the slice's lifetime, and `offset + len <= self.len()`.
    pub unsafe fn slice(&self, offset: u64, len: u64) -> &[u8] {
        debug_assert!(offset + len <= self.len);
        std::slice::from_raw_parts(self.base.add(offset as usize), len as usize)
    }

    /// A slot's bytes, for writing.
    ///
    /// # Safety
    /// As [`Pool::slice`], and the slot must be reserved by the caller.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: u64) -> &mut [u8] {
        debug_assert!(offset + len <= self.len);
        std::slice::from_raw_parts_mut(self.base.add(offset as usize), len as usize)
    }
}

/// A memfd of `len` bytes for segment `i`.
fn memfd(i: usize, len: u64, huge: bool) -> Result<OwnedFd> {
    let name = if i == 0 {
        c"kvbm-host-pool"
    } else {
        c"kvbm-tenant-pool"
    };
    let flags = libc::MFD_CLOEXEC | if huge { libc::MFD_HUGETLB } else { 0 };
    // SAFETY: plain syscall with a valid C string.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if raw < 0 {
        return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sizing our own memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(Error::io(
            "sizing the host pool",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(fd)
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: unmapping our own reservation (and the segments over it).
        unsafe {
            libc::munmap(self.reserved.0, self.reserved.1);
        }
    }
}

/// First-fit extent allocator over a span of the pool, with coalescing
/// frees.
#[derive(Debug)]
pub struct Extents {
    /// offset → length of each free extent; never two adjacent ones.
    free: BTreeMap<u64, u64>,
    free_bytes: u64,
}

impl Extents {
    pub fn new(len: u64) -> Extents {
        Extents::span(0, len)
    }

    /// Free space `[start, start + len)` (`start` aligned).
    pub fn span(start: u64, len: u64) -> Extents {
        let mut free = BTreeMap::new();
        let len = len / ALIGN * ALIGN;
        if len > 0 {
            free.insert(start, len);
        }
        Extents {
            free,
            free_bytes: len,
        }
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    /// Takes `size` bytes (a multiple of [`ALIGN`]); `None` when no extent
    /// is large enough.
    pub fn alloc(&mut self, size: u64) -> Option<u64> {
        let (&off, &len) = self.free.iter().find(|(_, &len)| len >= size)?;
        self.free.remove(&off);
        if len > size {
            self.free.insert(off + size, len - size);
        }
        self.free_bytes -= size;
        Some(off)
    }

    /// The length of the free extent starting at `off`, if one does.
    pub fn free_at(&self, off: u64) -> Option<u64> {
        self.free.get(&off).copied()
    }

    /// The start of the free extent ending at `end`, if one does.
    pub fn free_ending_at(&self, end: u64) -> Option<u64> {
        self.free
            .range(..end)
            .next_back()
            .filter(|(&off, &len)| off + len == end)
            .map(|(&off, _)| off)
    }

    /// Returns `[off, off + size)` to the free space.
    pub fn release(&mut self, off: u64, size: u64) {
        let mut start = off;
        let mut len = size;
        if let Some((&prev, &plen)) = self.free.range(..off).next_back() {
            if prev + plen == off {
                self.free.remove(&prev);
                start = prev;
                len += plen;
            }
        }
        if let Some(&nlen) = self.free.get(&(off + size)) {
            self.free.remove(&(off + size));
            len += nlen;
        }
        self.free.insert(start, len);
        self.free_bytes += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_maps_and_is_zeroed() {
        let pool = Pool::create(8 << 20).unwrap();
        assert!(pool.len() >= 8 << 20);
        // SAFETY: test owns the whole pool.
        let s = unsafe { pool.slice_mut(4096, 4096) };
        assert!(s.iter().all(|&b| b == 0));
        s[0] = 7;
        assert_eq!(unsafe { pool.slice(4096, 1) }[0], 7);
    }

    /// Each segment is its own memfd: a client mapping one sees that
    /// segment's bytes from its offset 0, and nothing of the others.
    #[test]
    fn segments_are_separate_memfds() {
        let pool = Pool::with_segments(&[1 << 20, 2 << 20]).unwrap();
        let segs = pool.segments();
        assert_eq!(segs.len(), 2);
        let (start, len) = segs[1];
        assert!(start >= 1 << 20 && len >= 2 << 20);
        // SAFETY: test owns the whole pool.
        unsafe {
            pool.slice_mut(start + 8192, 1)[0] = 42;
            pool.slice_mut(0, 1)[0] = 7;
        }
        let (fd, flen) = pool.segment_fd(1).unwrap();
        assert_eq!(flen, len);
        // SAFETY: mapping the segment's memfd read-only, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: within the mapping just made.
        let seen = unsafe { std::slice::from_raw_parts(p as *const u8, len as usize) };
        assert_eq!(seen[8192], 42);
        assert!(
            !seen.contains(&7),
            "segment 0's byte seen through segment 1"
        );
        // SAFETY: our own mapping.
        unsafe { libc::munmap(p, len as usize) };
    }

    #[test]
    fn extents_coalesce() {
        let mut e = Extents::new(4 * ALIGN);
        let a = e.alloc(ALIGN).unwrap();
        let b = e.alloc(ALIGN).unwrap();
        let c = e.alloc(2 * ALIGN).unwrap();
        assert_eq!((a, b, c), (0, ALIGN, 2 * ALIGN));
        assert!(e.alloc(ALIGN).is_none());
        e.release(b, ALIGN);
        e.release(a, ALIGN);
        assert_eq!(e.alloc(2 * ALIGN), Some(0));
        e.release(0, 2 * ALIGN);
        e.release(c, 2 * ALIGN);
        assert_eq!(e.free_bytes(), 4 * ALIGN);
        assert_eq!(e.alloc(4 * ALIGN), Some(0));
    }
}
