//! Disk copies as the table counts them: per host pool (a tenant's disk
//! quota), dropped when over quota or when the disk tier recycles their
//! region.

use super::*;

impl BlockTable {
    /// Drops disk copies in regions the disk tier recycled.
    pub fn regions_recycled(&mut self, recycled: &[(u32, u64)]) {
        let mut forget = Vec::new();
        let mut removed: HashMap<u32, Vec<Key>> = HashMap::new();
        for &(region, generation) in recycled {
            for id in self.regions.remove(&region).unwrap_or_default() {
                let e = self.index.get_mut(id);
                if e.state == State::Free
                    || e.disk().is_none_or(|d| {
                        d.region != region || !same_generation(d.generation, generation)
                    })
                {
                    continue;
                }
                let (ns, key) = (e.ns, e.key);
                self.disk_removed(id);
                self.index.get_mut(id).set_disk(None);
                self.counters.disk_evictions += 1;
                removed.entry(ns).or_default().push(key);
                // Blocks still in host memory keep a (now memory-only)
                // record; its disk location is stale and recovery ignores it
                // (the region's generation no longer matches).
                if !self.index.get(id).has_host() && self.index.get(id).pins == 0 {
                    self.index.remove(id);
                    forget.push((ns, key));
                }
            }
        }
        self.disk_copies_gone(forget, removed);
    }

    /// Counts a new disk copy of `id`, in its pool's quota.
    pub(super) fn disk_added(&mut self, id: u32) {
        self.disk_blocks += 1;
        let (ns, key) = {
            let e = self.index.get(id);
            (e.ns, e.key)
        };
        let Some(s) = self.sizes.get(&ns).copied() else {
            return;
        };
        let pool = &mut self.pools[s.pool as usize];
        pool.disk_bytes += s.block_bytes;
        pool.disk_count += 1;
        if pool.spec.disk_quota == 0 {
            return;
        }
        pool.disk_order.push_back((id, ns, key));
        // Copies gone another way (recycled regions, evictions, clears)
        // leave entries behind: drop them once they outnumber the live
        // ones, so the list never grows past about twice the most blocks
        // the pool has had on disk.
        if pool.disk_order.len() as u64 > 2 * pool.disk_count + 64 {
            let mut order = std::mem::take(&mut self.pools[s.pool as usize].disk_order);
            order.retain(|&(id, ns, key)| self.holds_disk_copy(id, ns, key));
            self.pools[s.pool as usize].disk_order = order;
        }
    }

    /// Whether `id` is still block `key` of `ns` with a disk copy (a list
    /// entry may outlive its block, and the id be reused).
    fn holds_disk_copy(&self, id: u32, ns: u32, key: Key) -> bool {
        let e = self.index.get(id);
        e.state == State::Ready && e.ns == ns && e.key == key && e.has_disk()
    }

    /// Uncounts `id`'s disk copy (gone, or about to be).
    pub(super) fn disk_removed(&mut self, id: u32) {
        self.disk_blocks = self.disk_blocks.saturating_sub(1);
        let ns = self.index.get(id).ns;
        if let Some(s) = self.sizes.get(&ns).copied() {
            let pool = &mut self.pools[s.pool as usize];
            pool.disk_bytes = pool.disk_bytes.saturating_sub(s.block_bytes);
            pool.disk_count = pool.disk_count.saturating_sub(1);
        }
    }

    /// Drops the oldest disk copies of `ns`'s pool while the pool holds more
    /// than its disk quota: a tenant over its quota loses its own blocks,
    /// never another's. Blocks being read stay (the quota is exceeded until
    /// they are done).
    pub(super) fn enforce_disk_quota(&mut self, ns: u32) {
        let Some(p) = self.sizes.get(&ns).map(|s| s.pool as usize) else {
            return;
        };
        let mut removed: HashMap<u32, Vec<Key>> = HashMap::new();
        let mut forget = Vec::new();
        while self.pools[p].spec.disk_quota > 0
            && self.pools[p].disk_bytes > self.pools[p].spec.disk_quota
        {
            let Some((id, ns, key)) = self.pools[p].disk_order.pop_front() else {
                break;
            };
            if !self.holds_disk_copy(id, ns, key) {
                continue;
            }
            let e = self.index.get(id);
            if e.pins > 0 || e.loading {
                self.pools[p].disk_order.push_front((id, ns, key));
                break;
            }
            self.disk_removed(id);
            self.index.get_mut(id).set_disk(None);
            self.counters.disk_evictions += 1;
            removed.entry(ns).or_default().push(key);
            forget.push((ns, key));
            if !self.index.get(id).has_host() {
                self.index.remove(id);
            }
        }
        self.disk_copies_gone(forget, removed);
    }

    /// Queues the notices of disk copies gone: records to delete, and the
    /// removals to publish per namespace.
    pub(super) fn disk_copies_gone(
        &mut self,
        forget: Vec<(u32, Key)>,
        removed: HashMap<u32, Vec<Key>>,
    ) {
        if !forget.is_empty() {
            self.notices.push(Notice::Forget(forget));
        }
        for (ns, keys) in removed {
            self.notices.push(Notice::Removed {
                ns,
                tier: Some(Tier::Disk),
                keys,
            });
        }
    }
}
