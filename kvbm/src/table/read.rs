//! Reading: lookups, leases, and the disk reads that fill them.

use super::*;

impl BlockTable {
    /// The committed block `key` of `ns`, if there is one.
    fn readable(&self, ns: u32, key: &Key) -> Option<u32> {
        let id = self.index.find(ns, key)?;
        (self.index.get(id).state == State::Ready).then_some(id)
    }

    /// Longest present prefix of `keys`, and where each block is.
    pub fn lookup(&self, ns: u32, keys: &[Key]) -> Lookup {
        let mut out = Lookup::default();
        let (mut host_run, mut disk_run) = (true, true);
        for key in keys {
            let Some(id) = self.readable(ns, key) else {
                break;
            };
            let e = self.index.get(id);
            let in_host = e.has_host() && !e.loading;
            let on_disk = e.has_disk();
            if !in_host && !on_disk {
                break;
            }
            host_run &= in_host;
            disk_run &= on_disk;
            out.host += host_run as u32;
            out.disk += disk_run as u32;
            out.locations
                .push(if in_host { Tier::Host } else { Tier::Disk });
            if in_host && !on_disk && !e.writing {
                out.host_only.push((id, *key));
            }
        }
        out
    }

    /// Pins the host copies of those `keys` that are readable and were seen
    /// at least `min_seen` times (the commit is the first sighting, each
    /// acquire one more), so their bytes can be copied outside the lock;
    /// [`BlockTable::unhold`] unpins them. Returns `(id, key, slot)`.
    pub fn hold(&mut self, ns: u32, keys: &[Key], min_seen: u32) -> Vec<(u32, Key, u64)> {
        let mut out = Vec::new();
        for key in keys {
            let Some(id) = self.readable(ns, key) else {
                continue;
            };
            let e = self.index.get_mut(id);
            if e.has_host() && !e.loading && e.hits.saturating_add(1) >= min_seen {
                e.pins += 1;
                out.push((id, *key, e.host));
            }
        }
        out
    }

    /// Ends what [`BlockTable::hold`] pinned.
    pub fn unhold(&mut self, ids: &[u32]) {
        self.unpin_all(ids);
    }

    /// Leases the longest present prefix of `keys`, starting disk reads
    /// into host slots for blocks only on disk. The lease exists from now
    /// on (closing the session releases it); [`BlockTable::finish_acquire`]
    /// trims it to the blocks that arrived.
    pub fn acquire(
        &mut self,
        session: Session,
        ns: u32,
        keys: &[Key],
        now: Instant,
    ) -> Result<Acquire> {
        let sizes = self.sizes(ns)?;
        self.sessions.check(session)?;
        self.session_pool(session, sizes)?;
        let mut out = Acquire::default();
        let mut pinned = Vec::new();
        for key in keys {
            let Some(id) = self.readable(ns, key) else {
                break;
            };
            let e = self.index.get(id);
            let from_disk = e.loading || !e.has_host();
            if e.loading {
                out.waits.push((pinned.len(), id));
            } else if !e.has_host() {
                let Some(disk) = e.disk() else { break };
                let Some(slot) = self.alloc_slot(sizes.slot_bytes, sizes.pool) else {
                    break;
                };
                // The eviction above never takes `id` (it has no host copy)
                // nor a pinned block of this prefix.
                self.give_host(id, slot, sizes.pool);
                let e = self.index.get_mut(id);
                e.loading = true;
                e.pins += 1;
                self.host_blocks += 1;
                out.loads.push(LoadJob {
                    id,
                    ns,
                    key: *key,
                    disk,
                    slot,
                    block_bytes: sizes.block_bytes,
                    slot_bytes: sizes.slot_bytes,
                });
                out.waits.push((pinned.len(), id));
            }
            let e = self.index.get_mut(id);
            e.pins += 1;
            e.hits = e.hits.saturating_add(1);
            self.index.refresh(id, true);
            pinned.push(id);
            out.from_disk.push(from_disk);
        }
        if pinned.is_empty() {
            self.counters.misses += keys.len() as u64;
            return Ok(out);
        }
        out.lease = self
            .sessions
            .add_lease(session.id, pinned, now + self.lease_ttl);
        Ok(out)
    }

    /// Ends an acquire once its loads are done: the lease keeps the first
    /// `good` blocks (fewer if one lost its host copy) and the slots are
    /// returned, with how many of them came from disk. A lease of nothing
    /// is dropped and reported as 0.
    pub fn finish_acquire(
        &mut self,
        session: Session,
        acquire: &Acquire,
        wanted: usize,
        mut good: usize,
    ) -> Result<(u64, Vec<SlotGrant>, u32)> {
        if acquire.lease == 0 {
            return Ok((0, Vec::new(), 0));
        }
        self.sessions.check(session)?;
        let Some(mut lease) = self.sessions.take_lease(session.id, acquire.lease) else {
            return Err(Error::not_found(
                "lease ended while its blocks were loading",
            ));
        };
        good = good.min(lease.ids.len());
        for (i, &id) in lease.ids.iter().enumerate() {
            if i >= good || !self.index.get(id).has_host() || self.index.get(id).loading {
                good = good.min(i);
            }
        }
        let dropped = lease.ids.split_off(good);
        self.unpin_all(&dropped);
        // Offsets are relative to the pool the session mapped.
        let base = self
            .sessions
            .pool(session.id)
            .map_or(0, |p| self.pools[p as usize].spec.start);
        let mut grants = Vec::with_capacity(good);
        let mut disk = 0;
        for (&id, &from_disk) in lease.ids.iter().zip(&acquire.from_disk) {
            let e = self.index.get(id);
            if from_disk {
                self.counters.disk_hits += 1;
                disk += 1;
            } else {
                self.counters.host_hits += 1;
            }
            grants.push(SlotGrant {
                key: e.key.as_bytes().to_vec(),
                offset: e.host - base,
                length: self.sizes.get(&e.ns).map_or(0, |s| s.block_bytes),
            });
        }
        self.counters.misses += (wanted - grants.len()) as u64;
        if lease.ids.is_empty() {
            return Ok((0, grants, disk));
        }
        let id = self
            .sessions
            .add_lease(session.id, lease.ids, lease.deadline);
        Ok((id, grants, disk))
    }

    /// Ends a lease of `session`. Someone else's lease is as unknown as a
    /// lease that never existed.
    pub fn release(&mut self, session: Session, lease: u64) -> Result<()> {
        let taken = self
            .sessions
            .check(session)
            .ok()
            .and_then(|()| self.sessions.take_lease(session.id, lease));
        let Some(l) = taken else {
            return Err(Error::not_found(format!("unknown lease {lease}")));
        };
        self.unpin_all(&l.ids);
        Ok(())
    }

    /// Applies the end of a disk read started by `acquire`. Returns whether
    /// the block is now readable (`None` when the job is stale: the block
    /// was dropped meanwhile).
    pub fn load_done(&mut self, job: &LoadJob, outcome: LoadOutcome) -> Option<bool> {
        let e = self.index.get(job.id);
        if e.key != job.key || e.ns != job.ns || !e.loading || e.host != job.slot {
            return None;
        }
        if outcome == LoadOutcome::Loaded {
            self.index.get_mut(job.id).loading = false;
            self.unpin(job.id);
            return Some(true);
        }
        {
            let e = self.index.get_mut(job.id);
            e.loading = false;
            e.pins = e.pins.saturating_sub(1);
        }
        self.drop_host_copy(job.id);
        if matches!(outcome, LoadOutcome::Corrupt | LoadOutcome::Foreign) {
            if outcome == LoadOutcome::Corrupt {
                self.counters.checksum_failures += 1;
            }
            self.disk_removed(job.id);
            self.index.get_mut(job.id).set_disk(None);
            if self.index.get(job.id).pins == 0 {
                self.index.remove(job.id);
            }
            self.notices.push(Notice::Forget(vec![(job.ns, job.key)]));
            self.notices.push(Notice::Removed {
                ns: job.ns,
                tier: Some(Tier::Disk),
                keys: vec![job.key],
            });
        }
        Some(false)
    }
}
