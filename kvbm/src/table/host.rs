//! Host slots: allocation, least-recently-used eviction (with blocks of
//! different sizes sharing the pool), pins.

use super::*;

impl BlockTable {
    pub(super) fn give_host(&mut self, id: u32, slot: u64, pool: u8) {
        self.index.set_host(id, slot, pool);
        self.slots.insert(slot, id);
    }

    /// Frees `id`'s host slot, if it has one. Ready blocks are counted in
    /// `host_blocks`; reserved ones are not counted yet.
    pub(super) fn drop_host_copy(&mut self, id: u32) {
        let (ns, counted, pool) = {
            let e = self.index.get(id);
            (e.ns, e.state == State::Ready, self.index.pool_of(id))
        };
        if let Some(slot) = self.index.clear_host(id) {
            self.slots.remove(&slot);
            let size = self.sizes.get(&ns).map_or(0, |s| s.slot_bytes);
            self.pools[pool as usize].extents.release(slot, size);
            if counted {
                self.host_blocks -= 1;
            }
        }
    }

    pub(super) fn slot_len(&self, id: u32) -> u64 {
        let ns = self.index.get(id).ns;
        self.sizes.get(&ns).map_or(0, |s| s.slot_bytes)
    }

    /// Takes a slot of `size` bytes in host pool `pool`, evicting least
    /// recently used blocks of that pool as needed. Evicts nothing when the
    /// room it would free could not hold the request (the rest of the pool
    /// is pinned, or the evictable blocks are too small and not adjacent).
    pub(super) fn alloc_slot(&mut self, size: u64, pool: u8) -> Option<u64> {
        loop {
            if let Some(off) = self.pools[pool as usize].extents.alloc(size) {
                return Some(off);
            }
            let victims = self.victims_for(size, pool)?;
            for v in victims {
                self.evict_host(v);
            }
        }
    }

    /// The blocks to evict so that `size` contiguous bytes become free.
    /// The common case — the next victim's slot is large enough — costs one
    /// step; mixed block sizes look for a run of free and evictable space
    /// around one of the oldest victims.
    pub(super) fn victims_for(&self, size: u64, pool: u8) -> Option<Vec<u32>> {
        const CANDIDATES: usize = 256;
        let mut run_anchors = Vec::new();
        for id in self.index.lru_iter(pool, CANDIDATES) {
            if self.slot_len(id) >= size {
                return Some(vec![id]);
            }
            run_anchors.push(id);
        }
        for id in run_anchors {
            if let Some(v) = self.window_around(id, size, pool) {
                return Some(v);
            }
        }
        self.behind_pinned_leaf(size, pool).map(|id| vec![id])
    }

    /// The last resort when no leaf can go: a chain whose newest blocks are
    /// pinned (being written, leased) keeps every ancestor from eviction,
    /// and one long chain under write-behind would fail every new write.
    /// Rather than fail, evict an unpinned block all of whose host children
    /// are pinned — the block just above a chain's pinned tail — least
    /// recently used first. That leaves a hole only above those pinned
    /// children, which lookups then stop at; the rest of the chain stays a
    /// usable prefix. A scan of the host blocks, taken only in this state.
    fn behind_pinned_leaf(&self, size: u64, pool: u8) -> Option<u32> {
        let mut pinned_children: HashMap<u32, u32> = HashMap::new();
        for &id in self.slots.values() {
            if self.index.get(id).pins > 0 {
                if let Some(p) = self.index.parent_of(id) {
                    *pinned_children.entry(p).or_default() += 1;
                }
            }
        }
        pinned_children
            .into_iter()
            .filter(|&(p, n)| {
                let e = self.index.get(p);
                e.state == State::Ready
                    && e.has_host()
                    && self.index.pool_of(p) == pool
                    && e.pins == 0
                    && !e.loading
                    && e.host_children == n
                    && self.slot_len(p) >= size
            })
            .min_by_key(|&(p, _)| self.index.last_use(p))
            .map(|(p, _)| p)
    }

    /// Evictable blocks of host pool `pool` that, with the free space
    /// between them, give a window of `size` contiguous bytes containing
    /// `anchor`'s slot.
    pub(super) fn window_around(&self, anchor: u32, size: u64, pool: u8) -> Option<Vec<u32>> {
        let extents = &self.pools[pool as usize].extents;
        // Pools sit side by side: a slot of the next pool is never ours.
        let ours = |id: u32| self.index.pool_of(id) == pool && self.index.is_evictable(id);
        let start = self.index.get(anchor).host;
        let mut lo = start;
        let mut hi = start + self.slot_len(anchor);
        let mut blocks = vec![anchor];
        // Grow right, then left, over free extents and evictable slots.
        while hi - lo < size {
            if let Some(len) = extents.free_at(hi) {
                hi += len;
            } else if let Some(&id) = self.slots.get(&hi).filter(|&&id| ours(id)) {
                hi += self.slot_len(id);
                blocks.push(id);
            } else {
                break;
            }
        }
        while hi - lo < size {
            if let Some(off) = extents.free_ending_at(lo) {
                lo = off;
            } else if let Some((&off, &id)) = self.slots.range(..lo).next_back() {
                if off + self.slot_len(id) != lo || !ours(id) {
                    return None;
                }
                lo = off;
                blocks.push(id);
            } else {
                return None;
            }
        }
        // Every block listed is evictable now (a leaf, unpinned), and
        // evicting one cannot pin another.
        (hi - lo >= size).then_some(blocks)
    }

    /// Drops the host copy of `id` (evictable, unpinned). A block with no
    /// disk copy leaves the index.
    pub(super) fn evict_host(&mut self, id: u32) {
        let (ns, key, undurable) = {
            let e = self.index.get(id);
            (e.ns, e.key, e.undurable)
        };
        self.drop_host_copy(id);
        self.counters.host_evictions += 1;
        let e = self.index.get(id);
        if e.disk().is_none() && !e.writing {
            if undurable {
                self.counters.lost_writes += 1;
            }
            self.index.remove(id);
            self.notices.push(Notice::Forget(vec![(ns, key)]));
        }
        self.notices.push(Notice::Removed {
            ns,
            tier: Some(Tier::Host),
            keys: vec![key],
        });
    }

    pub(super) fn unpin(&mut self, id: u32) {
        let e = self.index.get_mut(id);
        e.pins = e.pins.saturating_sub(1);
        // A block that lost its last copy while pinned (a failed load)
        // leaves the index with its last pin.
        if e.pins == 0
            && e.state == State::Ready
            && !e.has_host()
            && e.disk().is_none()
            && !e.writing
            && !e.loading
        {
            self.index.remove(id);
            return;
        }
        self.index.refresh(id, false);
    }

    pub(super) fn unpin_all(&mut self, ids: &[u32]) {
        for &id in ids {
            self.unpin(id);
        }
    }

    /// Frees a reserved (never committed) block.
    pub(super) fn drop_reserved(&mut self, id: u32) {
        if self.index.get(id).state != State::Reserved {
            return;
        }
        self.drop_host_copy(id);
        self.index.remove(id);
    }
}
