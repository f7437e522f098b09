//! The shared host pool (G2 memory): one memfd, mapped once by the daemon and
//! once by every attached client, carved into block slots.
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
    fd: OwnedFd,
    base: *mut u8,
    len: u64,
    huge_pages: bool,
}

// SAFETY: the mapping is shared memory whose slots are handed out by the
// allocator below; concurrent access to one slot is ruled out by the block
// index (a slot is written only while reserved, read only while leased).
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

impl Pool {
    /// Creates the memfd (huge pages when the system has them reserved),
    /// sizes it and maps it, faulting every page in now so the first block
    /// copies do not pay for page faults.
    pub fn create(len: u64) -> Result<Pool> {
        let len = len.div_ceil(ALIGN) * ALIGN;
        let huge_len = len.div_ceil(2 << 20) * (2 << 20);
        // Huge pages first; most machines have none reserved, so this
        // commonly fails and the normal memfd is used.
        if let Ok(pool) = Pool::create_with(huge_len, libc::MFD_HUGETLB) {
            return Ok(pool);
        }
        Pool::create_with(len, 0)
    }

    fn create_with(len: u64, extra_flags: libc::c_uint) -> Result<Pool> {
        let name = c"kvbm-host-pool";
        // SAFETY: plain syscall with a valid C string.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | extra_flags) };
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
        // SAFETY: mapping the memfd we just sized.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "cannot map a host pool of {len} bytes: {}",
                    std::io::Error::last_os_error()
                ),
            ));
        }
        // MAP_POPULATE maps the pages, yet the first write to each page
        // through a mapping stays slow (no page fault is counted). Measured on
        // the H200 host (a VM, 2026-11-30, benches/probes/pool_first_touch.c, 1 GiB
        // in 2 MiB copies): 3.5–3.7 GB/s for the first pass against 6.0 GB/s
        // after, and 5.8 GB/s on the first pass after MADV_POPULATE_WRITE.
        // Write-fault every page now (Linux 5.14+; older kernels refuse the
        // advice, harmlessly).
        // SAFETY: advising on our own mapping.
        unsafe {
            libc::madvise(base, len as usize, libc::MADV_POPULATE_WRITE);
        }
        if extra_flags & libc::MFD_HUGETLB == 0 {
            // Transparent huge pages for shared memory where the system
            // allows them (`shmem_enabled` = advise): fewer TLB misses when
            // a put or get sweeps a whole block. Advice only; failure is fine.
            // SAFETY: advising on our own mapping.
            unsafe {
                libc::madvise(base, len as usize, libc::MADV_HUGEPAGE);
            }
        }
        Ok(Pool {
            fd,
            base: base as *mut u8,
            len,
            huge_pages: extra_flags & libc::MFD_HUGETLB != 0,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// The memfd, to pass to local clients over the pool socket.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
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

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len as usize);
        }
    }
}

/// First-fit extent allocator over `[0, len)`, with coalescing frees.
#[derive(Debug)]
pub struct Extents {
    /// offset → length of each free extent; never two adjacent ones.
    free: BTreeMap<u64, u64>,
    free_bytes: u64,
}

impl Extents {
    pub fn new(len: u64) -> Extents {
        let mut free = BTreeMap::new();
        let len = len / ALIGN * ALIGN;
        if len > 0 {
            free.insert(0, len);
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
