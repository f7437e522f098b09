//! The region table: which part of the data file receives appends, and which
//! region is recycled next.
//!
//! The file is cut into `capacity / region_bytes` equal regions. Exactly one
//! region is *open* and receives appends; when the next entry does not fit it
//! is *sealed* and the next free region is opened. With no free region left
//! the oldest sealed region (FIFO by generation) is recycled: it gets a new
//! generation and its old `(region, generation)` pair is reported as evicted.
//! Nothing is ever rewritten in place, so a crash can only lose the tail of
//! the open region, never an entry of another region.
//!
//! Every (re)opening of a region takes a new, strictly increasing generation
//! number. A location carries the generation it was written under; once the
//! region has been recycled the location is stale, which the table (and, after
//! a restart, the generation stored in each entry header) detects.

use std::collections::VecDeque;
use std::io;

/// A region the catalog knows to hold live entries, passed to
/// [`super::DiskTier::open`] after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionState {
    pub region: u32,
    pub generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Free,
    Open,
    Sealed,
}

#[derive(Debug, Clone)]
struct Region {
    phase: Phase,
    generation: u64,
    /// Bytes appended (including headers and padding).
    fill: u64,
    /// Writes allocated in this region and not yet completed.
    writes: u32,
    /// Reads submitted against this region and not yet completed.
    reads: u32,
}

/// Where a new entry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub region: u32,
    pub generation: u64,
    /// Absolute file offset of the entry's header page.
    pub offset: u64,
}

#[derive(Debug)]
pub enum AllocError {
    /// The entry is larger than a region.
    TooLarge,
    /// The region FIFO would have to recycle a region that still has I/O in
    /// flight; the write is dropped rather than waiting.
    Busy,
    /// Preparing (preallocating) a free region failed.
    Prepare(u32, io::Error),
}

/// At most this many evicted regions are remembered for `take_evicted`;
/// older reports are dropped. Dropping is safe: a location in a recycled
/// region is detected as stale on read anyway, the report only lets the
/// catalog forget such locations early.
const EVICTED_KEEP: usize = 4096;

pub struct RegionTable {
    region_bytes: u64,
    regions: Vec<Region>,
    open: Option<u32>,
    free: VecDeque<u32>,
    sealed: VecDeque<u32>,
    next_generation: u64,
    used: u64,
    evicted: VecDeque<(u32, u64)>,
    evicted_total: u64,
}

impl RegionTable {
    /// Builds the table for `count` regions. Regions listed in `recovered`
    /// (ids out of range are ignored; for a region listed twice the newest
    /// generation wins) are sealed, ordered by generation, and counted as
    /// full; new generations start above the highest recovered one, so the
    /// catalog must pass every generation any of its locations refers to.
    pub fn new(
        count: u32,
        region_bytes: u64,
        recovered: impl IntoIterator<Item = RegionState>,
    ) -> RegionTable {
        let mut regions = vec![
            Region {
                phase: Phase::Free,
                generation: 0,
                fill: 0,
                writes: 0,
                reads: 0,
            };
            count as usize
        ];
        let mut max_gen = 0u64;
        for st in recovered {
            max_gen = max_gen.max(st.generation);
            if let Some(r) = regions.get_mut(st.region as usize) {
                if r.phase == Phase::Free || st.generation > r.generation {
                    r.phase = Phase::Sealed;
                    r.generation = st.generation;
                    r.fill = region_bytes;
                }
            }
        }
        let mut sealed: Vec<u32> = (0..count)
            .filter(|&i| regions[i as usize].phase == Phase::Sealed)
            .collect();
        sealed.sort_by_key(|&i| regions[i as usize].generation);
        let free = (0..count)
            .filter(|&i| regions[i as usize].phase == Phase::Free)
            .collect();
        let used = sealed.len() as u64 * region_bytes;
        RegionTable {
            region_bytes,
            regions,
            open: None,
            free,
            sealed: sealed.into(),
            next_generation: max_gen + 1,
            used,
            evicted: VecDeque::new(),
            evicted_total: 0,
        }
    }

    /// Reserves `bytes` (a whole entry) for a write and counts it in flight
    /// until [`Self::end_write`]. `prepare` is called with a free region's id
    /// before it is first opened (the owner preallocates it there); when it
    /// fails the region stays free and the error is returned.
    pub fn allocate(
        &mut self,
        bytes: u64,
        mut prepare: impl FnMut(u32) -> io::Result<()>,
    ) -> Result<Slot, AllocError> {
        if bytes > self.region_bytes || bytes == 0 {
            return Err(AllocError::TooLarge);
        }
        loop {
            if let Some(r) = self.open {
                let reg = &mut self.regions[r as usize];
                if reg.fill + bytes <= self.region_bytes {
                    let slot = Slot {
                        region: r,
                        generation: reg.generation,
                        offset: r as u64 * self.region_bytes + reg.fill,
                    };
                    reg.fill += bytes;
                    reg.writes += 1;
                    self.used += bytes;
                    return Ok(slot);
                }
                reg.phase = Phase::Sealed;
                self.sealed.push_back(r);
                self.open = None;
            }
            if let Some(&r) = self.free.front() {
                prepare(r).map_err(|e| AllocError::Prepare(r, e))?;
                self.free.pop_front();
                self.open_region(r);
                continue;
            }
            let Some(&r) = self.sealed.front() else {
                // Only reachable with zero regions, which `open` rejects.
                return Err(AllocError::Busy);
            };
            let reg = &self.regions[r as usize];
            if reg.writes > 0 || reg.reads > 0 {
                return Err(AllocError::Busy);
            }
            self.sealed.pop_front();
            if self.evicted.len() >= EVICTED_KEEP {
                self.evicted.pop_front();
            }
            self.evicted.push_back((r, reg.generation));
            self.evicted_total += 1;
            self.used -= reg.fill;
            self.open_region(r);
        }
    }

    fn open_region(&mut self, r: u32) {
        let reg = &mut self.regions[r as usize];
        reg.phase = Phase::Open;
        reg.generation = self.next_generation;
        reg.fill = 0;
        self.next_generation += 1;
        self.open = Some(r);
    }

    /// A write allocated by [`Self::allocate`] in `region` has completed.
    pub fn end_write(&mut self, region: u32) {
        if let Some(r) = self.regions.get_mut(region as usize) {
            r.writes = r.writes.saturating_sub(1);
        }
    }

    /// Whether `(region, generation)` still names live content.
    pub fn is_current(&self, region: u32, generation: u64) -> bool {
        self.regions
            .get(region as usize)
            .is_some_and(|r| r.phase != Phase::Free && r.generation == generation)
    }

    /// Counts a read in flight on a current region (which holds off its
    /// recycling); false (and nothing counted) when the location is stale.
    pub fn begin_read(&mut self, region: u32, generation: u64) -> bool {
        if !self.is_current(region, generation) {
            return false;
        }
        self.regions[region as usize].reads += 1;
        true
    }

    pub fn end_read(&mut self, region: u32) {
        if let Some(r) = self.regions.get_mut(region as usize) {
            r.reads = r.reads.saturating_sub(1);
        }
    }

    /// Bytes held by open and sealed regions (recovered regions count full).
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// Regions recycled since start.
    pub fn evicted_total(&self) -> u64 {
        self.evicted_total
    }

    /// Drains the evicted `(region, old generation)` reports, oldest first.
    pub fn take_evicted(&mut self) -> Vec<(u32, u64)> {
        self.evicted.drain(..).collect()
    }

    /// Regions currently holding entries (open and sealed) with their
    /// generations, oldest first — what a catalog checkpoint would record.
    pub fn live_regions(&self) -> Vec<RegionState> {
        let mut v: Vec<RegionState> = self
            .sealed
            .iter()
            .chain(self.open.iter())
            .map(|&r| RegionState {
                region: r,
                generation: self.regions[r as usize].generation,
            })
            .collect();
        v.sort_by_key(|s| s.generation);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: u32) -> io::Result<()> {
        Ok(())
    }

    #[test]
    fn appends_then_fifo_recycles() {
        let mut t = RegionTable::new(3, 100, []);
        let a = t.allocate(60, ok).unwrap();
        assert_eq!((a.region, a.generation, a.offset), (0, 1, 0));
        let b = t.allocate(40, ok).unwrap();
        assert_eq!((b.region, b.offset), (0, 60));
        let c = t.allocate(50, ok).unwrap();
        assert_eq!((c.region, c.generation, c.offset), (1, 2, 100));
        let d = t.allocate(80, ok).unwrap();
        assert_eq!((d.region, d.generation), (2, 3));
        // All regions used: region 0 has writes in flight, so recycling waits.
        assert!(matches!(t.allocate(80, ok), Err(AllocError::Busy)));
        for s in [a, b, c, d] {
            t.end_write(s.region);
        }
        let e = t.allocate(80, ok).unwrap();
        assert_eq!((e.region, e.generation, e.offset), (0, 4, 0));
        assert_eq!(t.take_evicted(), vec![(0, 1)]);
        assert!(!t.is_current(0, 1));
        assert!(t.is_current(0, 4));
        assert!(t.is_current(1, 2));
        assert!(matches!(t.allocate(101, ok), Err(AllocError::TooLarge)));
    }

    #[test]
    fn reads_hold_off_recycling() {
        let mut t = RegionTable::new(1, 100, []);
        let a = t.allocate(100, ok).unwrap();
        t.end_write(a.region);
        assert!(t.begin_read(0, a.generation));
        assert!(matches!(t.allocate(10, ok), Err(AllocError::Busy)));
        t.end_read(0);
        let b = t.allocate(10, ok).unwrap();
        assert_eq!(b.generation, a.generation + 1);
        assert!(!t.begin_read(0, a.generation));
    }

    #[test]
    fn recovered_regions_are_kept_and_recycled_oldest_first() {
        let rec = [
            RegionState {
                region: 2,
                generation: 9,
            },
            RegionState {
                region: 0,
                generation: 5,
            },
            RegionState {
                region: 0,
                generation: 3,
            },
            RegionState {
                region: 77,
                generation: 1,
            },
        ];
        let mut t = RegionTable::new(3, 100, rec);
        assert_eq!(t.used_bytes(), 200);
        assert!(t.is_current(0, 5) && !t.is_current(0, 3) && t.is_current(2, 9));
        let a = t.allocate(100, ok).unwrap();
        assert_eq!((a.region, a.generation), (1, 10));
        t.end_write(1);
        let b = t.allocate(100, ok).unwrap();
        assert_eq!((b.region, b.generation), (0, 11));
        t.end_write(0);
        let c = t.allocate(100, ok).unwrap();
        assert_eq!((c.region, c.generation), (2, 12));
        assert_eq!(t.take_evicted(), vec![(0, 5), (2, 9)]);
    }

    #[test]
    fn failed_prepare_leaves_region_free() {
        let mut t = RegionTable::new(2, 100, []);
        let e = t.allocate(10, |_| Err(io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(matches!(e, Err(AllocError::Prepare(0, _))));
        assert_eq!(t.used_bytes(), 0);
        let a = t.allocate(10, ok).unwrap();
        assert_eq!(a.region, 0);
    }
}
