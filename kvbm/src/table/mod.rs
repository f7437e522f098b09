//! The block table: every block kvbm holds, which tiers hold it, who may use
//! it. Synchronous and free of I/O: an operation changes the table and
//! returns what the caller (the [`Store`](crate::store::Store)) must carry
//! out — a disk read ([`LoadJob`]) or write ([`WriteJob`]) — and queues
//! [`Notice`]s (events to publish, catalog records to write or delete) in
//! the order the changes happened. Completions come back as
//! [`BlockTable::load_done`] and [`BlockTable::write_done`].
//!
//! Invariants (checked against a model in `tests.rs`):
//! - a pinned block (leased, reserved, loading or being written) keeps its
//!   host copy; the host pool is never over-committed and no slot is held
//!   by two blocks;
//! - a reserved block is invisible to readers until its owner commits it;
//! - host eviction is least recently used, parents after their children;
//!   an allocation evicts only blocks whose room it can actually use;
//! - host pools (the shared one, one per tenant) are separate: a block
//!   lives in its namespace's pool and evicts only blocks of that pool; a
//!   pool over its disk quota drops its own oldest disk copies.

mod disk;
mod host;
mod read;
pub mod session;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::catalog::{BlockRecord, DiskLoc};
use crate::error::{Error, ErrorKind, Result};
use crate::index::{same_generation, DiskRef, Index, Key, State};
use crate::pool::{slot_bytes, Extents};
pub use session::{Owner, Session};
use session::{Reservation, Sessions};

/// A storage tier below the engine's GPU memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// The shared host pool (G2).
    Host,
    /// The local disk tier (G3).
    Disk,
}

/// A block about to be written: what the caller wants stored.
#[derive(Debug, Clone)]
pub struct NewBlock {
    pub key: Vec<u8>,
    pub parent: Vec<u8>,
    pub tokens: Vec<u32>,
}

/// A granted host slot: `length` 0 when the block is already present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotGrant {
    pub key: Vec<u8>,
    pub offset: u64,
    pub length: u64,
}

/// A committed block, as the catalog and the event stream describe it.
#[derive(Debug, Clone)]
pub struct Committed {
    pub id: u32,
    pub key: Key,
    pub parent: Vec<u8>,
    pub tokens: Vec<u32>,
}

/// What happened, in order, for the event stream and the catalog.
#[derive(Debug)]
pub enum Notice {
    /// Blocks became readable in host memory: publish them and record them
    /// (memory-only) in the catalog.
    Committed { ns: u32, blocks: Vec<Committed> },
    /// A block reached the disk: publish it and record it durably.
    Durable(BlockRecord),
    /// Copies gone from `tier` (all tiers when `None`): publish.
    Removed {
        ns: u32,
        tier: Option<Tier>,
        keys: Vec<Key>,
    },
    /// Blocks gone from every tier, or whose disk copy is gone: delete
    /// their catalog records.
    Forget(Vec<(u32, Key)>),
    /// A tier (all when `None`) was cleared.
    Cleared(Option<Tier>),
}

/// A disk read into a fresh host slot, to be submitted by the caller.
#[derive(Debug, Clone)]
pub struct LoadJob {
    pub id: u32,
    pub ns: u32,
    pub key: Key,
    pub disk: DiskRef,
    pub slot: u64,
    pub block_bytes: u64,
    pub slot_bytes: u64,
}

/// A write-behind of a host block, to be submitted by the caller. The slot
/// stays pinned until [`BlockTable::write_done`].
#[derive(Debug, Clone)]
pub struct WriteJob {
    pub id: u32,
    pub ns: u32,
    pub key: Key,
    pub slot: u64,
    pub block_bytes: u64,
}

/// What [`BlockTable::start_write`] decided.
#[derive(Debug)]
pub enum StartWrite {
    Job(WriteJob),
    /// Gone, replaced, already on disk or being written.
    NotNeeded,
    /// Writes in flight already pin their share of the pool.
    Busy,
}

/// How a write-behind ended.
#[derive(Debug, Clone, Copy)]
pub enum WriteOutcome {
    Written {
        disk: DiskRef,
        /// xxh3-64 of the stored bytes (what the catalog records).
        checksum: u64,
    },
    /// Never queued (full queue, degraded disk, no room) or failed.
    NotWritten,
}

/// How a disk read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadOutcome {
    Loaded,
    /// The bytes failed verification, or the location was recycled: the
    /// disk copy is gone.
    Corrupt,
    /// The entry is intact but not readable here (another key): the disk
    /// copy is dropped, not counted as damage.
    Foreign,
    /// The read failed (I/O error, not submitted): the disk copy may still
    /// be good.
    Failed,
}

/// The start of a read: a lease on the present prefix, the disk reads it
/// needs, and the blocks whose loads (new or already running) it waits for.
#[derive(Debug, Default)]
pub struct Acquire {
    pub lease: u64,
    pub loads: Vec<LoadJob>,
    /// `(position in the prefix, block id)` of blocks still loading.
    pub waits: Vec<(usize, u32)>,
    from_disk: Vec<bool>,
}

/// The longest present prefix of a lookup.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lookup {
    /// Where each matched block is fastest to read.
    pub locations: Vec<Tier>,
    /// Length of the prefix held in host memory.
    pub host: u32,
    /// Length of the prefix held on disk.
    pub disk: u32,
    /// Matched blocks only in host memory and not being written.
    pub host_only: Vec<(u32, Key)>,
}

/// Counters, each counted once, where the event happens.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub host_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub host_evictions: u64,
    pub disk_evictions: u64,
    /// Write-behinds that did not reach the disk (dropped or failed).
    pub dropped_writes: u64,
    /// Blocks evicted from host memory while their write-behind had been
    /// dropped: never durable, now gone.
    pub lost_writes: u64,
    pub checksum_failures: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct TableStats {
    pub host_blocks: u64,
    pub disk_blocks: u64,
    pub index_blocks: u64,
    pub index_bytes: u64,
    pub host_free_bytes: u64,
    pub counters: Counters,
}

/// A namespace's sizes and host pool, as the table needs them.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    block_bytes: u64,
    slot_bytes: u64,
    pool: u8,
}

/// One host pool as the table is given it: the shared pool (0) or a
/// tenant's, with the tenant's disk quota.
#[derive(Debug, Clone, Copy)]
pub struct PoolSpec {
    /// Where the pool's segment starts within the host pool mapping.
    pub start: u64,
    pub len: u64,
    /// Bytes of this pool's blocks the disk tier may hold; 0: no limit.
    pub disk_quota: u64,
}

/// A host pool's free space and what pins or fills it. Blocks of one pool
/// evict only blocks of the same pool.
struct HostPool {
    spec: PoolSpec,
    extents: Extents,
    /// Bytes of host slots pinned by writes in flight, and their limit.
    writing_bytes: u64,
    write_budget: u64,
    /// Bytes and number of this pool's blocks on disk, and the blocks in
    /// the order they reached it (`(id, namespace, key)`; entries of copies
    /// gone since are skipped, and pruned as they pile up): what a disk
    /// quota drops first.
    disk_bytes: u64,
    disk_count: u64,
    disk_order: VecDeque<(u32, u32, Key)>,
}

pub struct BlockTable {
    index: Index,
    pools: Vec<HostPool>,
    /// Offset → block of every host slot in use (reserved, loading, ready),
    /// to find neighbours when blocks of different sizes share the pool.
    slots: BTreeMap<u64, u32>,
    sizes: HashMap<u32, Sizes>,
    sessions: Sessions,
    /// Blocks written to each disk region (may hold stale ids; checked
    /// against the entry's own location when used).
    regions: HashMap<u32, Vec<u32>>,
    notices: Vec<Notice>,
    lease_ttl: Duration,
    host_blocks: u64,
    disk_blocks: u64,
    counters: Counters,
}

pub fn key_of(b: &[u8]) -> Result<Key> {
    Key::new(b)
        .ok_or_else(|| Error::invalid(format!("block key must be 1 to 32 bytes, got {}", b.len())))
}

impl BlockTable {
    /// A table over one shared host pool of `pool_bytes`.
    pub fn new(pool_bytes: u64, lease_ttl: Duration) -> BlockTable {
        BlockTable::with_pools(
            &[PoolSpec {
                start: 0,
                len: pool_bytes,
                disk_quota: 0,
            }],
            lease_ttl,
        )
    }

    /// A table over the host pools `pools` (the shared one first; at most
    /// 256).
    pub fn with_pools(pools: &[PoolSpec], lease_ttl: Duration) -> BlockTable {
        BlockTable {
            index: Index::new(),
            pools: pools
                .iter()
                .take(256)
                .map(|&spec| HostPool {
                    spec,
                    extents: Extents::span(spec.start, spec.len),
                    writing_bytes: 0,
                    write_budget: spec.len / 2,
                    disk_bytes: 0,
                    disk_count: 0,
                    disk_order: VecDeque::new(),
                })
                .collect(),
            slots: BTreeMap::new(),
            sizes: HashMap::new(),
            sessions: Sessions::default(),
            regions: HashMap::new(),
            notices: Vec::new(),
            lease_ttl,
            host_blocks: 0,
            disk_blocks: 0,
            counters: Counters::default(),
        }
    }

    /// What happened since the last call, in order.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Registers namespace `ns`, whose blocks live in host pool `pool` (a
    /// pool the table does not have means the shared one).
    pub fn add_namespace(&mut self, ns: u32, block_bytes: u64, pool: u8) {
        let pool = if (pool as usize) < self.pools.len() {
            pool
        } else {
            0
        };
        self.sizes.insert(
            ns,
            Sizes {
                block_bytes,
                slot_bytes: slot_bytes(block_bytes),
                pool,
            },
        );
    }

    /// The host pool of a session's mapping its namespace must live in, and
    /// where that pool starts (what its offsets are relative to); `None`
    /// for the daemon's own sessions (absolute offsets, every pool).
    fn session_pool(&self, session: Session, sizes: Sizes) -> Result<u64> {
        match self.sessions.pool(session.id) {
            None => Ok(0),
            Some(p) if p == sizes.pool => Ok(self.pools[p as usize].spec.start),
            Some(_) => Err(Error::new(
                ErrorKind::FailedPrecondition,
                "this namespace's blocks live in another host pool than the one \
                 this session mapped (a tenant's pool, or the shared one)",
            )),
        }
    }

    fn sizes(&self, ns: u32) -> Result<Sizes> {
        self.sizes
            .get(&ns)
            .copied()
            .ok_or_else(|| Error::not_found(format!("unknown namespace id {ns}")))
    }

    /// Adds a block found durable on disk at start-up; `false` when the
    /// namespace is unknown or the key already present.
    pub fn recover(&mut self, ns: u32, key: Key, disk: DiskRef, hits: u32) -> Option<u32> {
        if !self.sizes.contains_key(&ns) || self.index.find(ns, &key).is_some() {
            return None;
        }
        let id = self.index.insert(ns, key, State::Ready, None);
        let e = self.index.get_mut(id);
        e.set_disk(Some(disk));
        e.hits = hits;
        self.regions.entry(disk.region).or_default().push(id);
        self.disk_added(id);
        Some(id)
    }

    /// Links a recovered block to its parent, when the parent is present.
    pub fn recover_parent(&mut self, id: u32, parent: &[u8]) {
        let ns = self.index.get(id).ns;
        if let Some(p) = Key::new(parent).and_then(|k| self.index.find(ns, &k)) {
            self.index.relink(id, p);
        }
    }

    // --- sessions ----------------------------------------------------------

    /// Opens a session for `owner`, who mapped host pool `pool` (`None`:
    /// the daemon's own, which sees every pool).
    pub fn open_session(&mut self, owner: Owner, pool: Option<u8>) -> Session {
        self.sessions.open(owner, pool)
    }

    /// Ends a session: its reservations are aborted, its leases released.
    /// A claim that does not own the session ends nothing.
    pub fn close_session(&mut self, session: Session) {
        if self.sessions.check(session).is_err() {
            return;
        }
        let Some(s) = self.sessions.open.remove(&session.id) else {
            return;
        };
        for (_, r) in s.reservations {
            self.drop_reserved(r.id);
        }
        for lease in s.leases {
            if let Some(l) = self.sessions.leases.remove(&lease) {
                self.unpin_all(&l.ids);
            }
        }
    }

    /// Drops leases and reservations past their deadline (clients that hung
    /// or died without closing their pool connection). Returns how many
    /// leases expired.
    pub fn expire(&mut self, now: Instant) -> usize {
        let (leases, reserved) = self.sessions.take_expired(now);
        for l in &leases {
            self.unpin_all(&l.ids);
        }
        for id in reserved {
            self.drop_reserved(id);
        }
        leases.len()
    }

    // --- writing -----------------------------------------------------------

    /// Grants host slots for new blocks. A block already present (or being
    /// written) gets a zero-length slot. All or nothing: when the pool
    /// cannot hold them all (the rest is pinned), nothing is reserved.
    pub fn reserve(
        &mut self,
        session: Session,
        ns: u32,
        blocks: Vec<NewBlock>,
        now: Instant,
    ) -> Result<Vec<SlotGrant>> {
        let sizes = self.sizes(ns)?;
        let mut keys = Vec::with_capacity(blocks.len());
        for b in &blocks {
            keys.push(key_of(&b.key)?);
            if b.parent.len() > crate::index::MAX_KEY {
                return Err(Error::invalid("parent key longer than 32 bytes"));
            }
        }
        self.sessions.check(session)?;
        let base = self.session_pool(session, sizes)?;
        let deadline = now + self.lease_ttl;
        let mut grants = Vec::with_capacity(blocks.len());
        let mut made: Vec<(Key, Reservation)> = Vec::new();
        for (b, key) in blocks.into_iter().zip(keys) {
            // A key repeated in this batch finds its own fresh reservation.
            if self.index.find(ns, &key).is_some() {
                grants.push(SlotGrant {
                    key: b.key,
                    offset: 0,
                    length: 0,
                });
                continue;
            }
            let Some(slot) = self.alloc_slot(sizes.slot_bytes, sizes.pool) else {
                for (_, r) in made {
                    self.drop_reserved(r.id);
                }
                return Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    "host pool full: every block is pinned by leases or reservations",
                ));
            };
            let parent = Key::new(&b.parent).and_then(|p| self.index.find(ns, &p));
            let id = self.index.insert(ns, key, State::Reserved, parent);
            self.give_host(id, slot, sizes.pool);
            self.index.get_mut(id).pins = 1;
            grants.push(SlotGrant {
                key: b.key,
                offset: slot - base,
                length: sizes.block_bytes,
            });
            made.push((
                key,
                Reservation {
                    id,
                    parent: b.parent,
                    tokens: b.tokens,
                    deadline,
                },
            ));
        }
        if let Some(s) = self.sessions.open.get_mut(&session.id) {
            for (key, r) in made {
                s.reservations.insert((ns, key), r);
            }
        }
        Ok(grants)
    }

    /// Makes reserved blocks readable and queues their `Committed` notice.
    /// Keys not reserved by this session are ignored.
    pub fn commit(&mut self, session: Session, ns: u32, keys: &[Key]) -> Result<Vec<Committed>> {
        self.sessions.check(session)?;
        let mut committed = Vec::new();
        for &key in keys {
            let Some(r) = self.sessions.take_reservation(session.id, ns, key) else {
                continue;
            };
            let e = self.index.get_mut(r.id);
            if e.state != State::Reserved {
                continue;
            }
            e.state = State::Ready;
            e.pins -= 1;
            self.host_blocks += 1;
            self.index.refresh(r.id, true);
            committed.push(Committed {
                id: r.id,
                key,
                parent: r.parent,
                tokens: r.tokens,
            });
        }
        if !committed.is_empty() {
            self.notices.push(Notice::Committed {
                ns,
                blocks: committed.clone(),
            });
        }
        Ok(committed)
    }

    pub fn abort(&mut self, session: Session, ns: u32, keys: &[Key]) -> Result<u32> {
        self.sessions.check(session)?;
        let mut n = 0;
        for &key in keys {
            if let Some(r) = self.sessions.take_reservation(session.id, ns, key) {
                self.drop_reserved(r.id);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Starts the write-behind of a committed host block: pins it until
    /// [`BlockTable::write_done`]. Writes in flight pin at most half the
    /// pool, so they never leave writers without room: past that, the
    /// write is dropped (counted, and the block marked not durable) unless
    /// the caller `wait`s for room, and then it is `Busy`.
    pub fn start_write(&mut self, id: u32, key: Key, wait: bool) -> StartWrite {
        let e = self.index.get(id);
        if e.state != State::Ready || e.key != key || !e.has_host() || e.has_disk() || e.writing {
            return StartWrite::NotNeeded;
        }
        let (ns, slot) = (e.ns, e.host);
        let Some(sizes) = self.sizes.get(&ns).copied() else {
            return StartWrite::NotNeeded;
        };
        let pool = &mut self.pools[sizes.pool as usize];
        if pool.writing_bytes + sizes.slot_bytes > pool.write_budget {
            if !wait {
                self.counters.dropped_writes += 1;
                self.index.get_mut(id).undurable = true;
            }
            return StartWrite::Busy;
        }
        pool.writing_bytes += sizes.slot_bytes;
        let e = self.index.get_mut(id);
        e.pins += 1;
        e.writing = true;
        self.index.refresh(id, false);
        StartWrite::Job(WriteJob {
            id,
            ns,
            key,
            slot,
            block_bytes: sizes.block_bytes,
        })
    }

    /// Applies the end of a write-behind started by `start_write`. On
    /// success `record` (the block's catalog record) is completed and queued
    /// as a `Durable` notice.
    pub fn write_done(&mut self, job: &WriteJob, outcome: WriteOutcome, mut record: BlockRecord) {
        let same = {
            let e = self.index.get(job.id);
            e.state == State::Ready && e.key == job.key && e.ns == job.ns && e.writing
        };
        if !same {
            return;
        }
        self.index.get_mut(job.id).writing = false;
        if let Some(s) = self.sizes.get(&job.ns) {
            self.pools[s.pool as usize].writing_bytes -= s.slot_bytes;
        }
        match outcome {
            WriteOutcome::Written { disk, checksum } => {
                let e = self.index.get_mut(job.id);
                e.set_disk(Some(disk));
                e.undurable = false;
                record.hits = e.hits;
                record.checksum = checksum;
                record.disk = Some(DiskLoc {
                    region: disk.region,
                    generation: disk.generation,
                    offset: disk.offset,
                    len: disk.len,
                });
                self.regions.entry(disk.region).or_default().push(job.id);
                self.disk_added(job.id);
                self.notices.push(Notice::Durable(record));
            }
            WriteOutcome::NotWritten => {
                self.counters.dropped_writes += 1;
                self.index.get_mut(job.id).undurable = true;
            }
        }
        self.unpin(job.id);
        self.enforce_disk_quota(job.ns);
    }

    /// Committed blocks in host memory whose write-behind was dropped.
    pub fn undurable(&self) -> Vec<(u32, u32, Key)> {
        self.index
            .ids()
            .into_iter()
            .map(|id| (id, self.index.get(id)))
            .filter(|(_, e)| e.state == State::Ready && e.undurable && !e.has_disk())
            .map(|(id, e)| (id, e.ns, e.key))
            .collect()
    }

    // --- removal -----------------------------------------------------------

    /// Removes blocks from every tier. Pinned blocks are skipped.
    pub fn evict(&mut self, ns: u32, keys: &[Key]) -> u32 {
        let mut removed = Vec::new();
        for key in keys {
            if let Some(id) = self.index.find(ns, key) {
                if self.drop_block(id) {
                    removed.push(*key);
                }
            }
        }
        let n = removed.len() as u32;
        if n > 0 {
            self.notices
                .push(Notice::Forget(removed.iter().map(|&k| (ns, k)).collect()));
            self.notices.push(Notice::Removed {
                ns,
                tier: None,
                keys: removed,
            });
        }
        n
    }

    /// Drops every copy of an unpinned, ready block. False if it is busy.
    fn drop_block(&mut self, id: u32) -> bool {
        let e = self.index.get(id);
        if e.state != State::Ready || e.pins > 0 || e.loading || e.writing {
            return false;
        }
        if e.has_disk() {
            self.disk_removed(id);
        }
        self.drop_host_copy(id);
        self.index.remove(id);
        true
    }

    /// Empties a tier (all tiers when `None`) of namespace `only` (all when
    /// `None`): pinned blocks stay.
    pub fn clear(&mut self, tier: Option<Tier>, only: Option<u32>) -> u64 {
        let mut gone = Vec::new();
        let mut forget = Vec::new();
        for id in self.index.ids() {
            let e = self.index.get(id);
            if e.state != State::Ready || e.pins > 0 || e.loading || e.writing {
                continue;
            }
            let (ns, key, has_host, has_disk) = (e.ns, e.key, e.has_host(), e.has_disk());
            if only.is_some_and(|o| o != ns) {
                continue;
            }
            match tier {
                Some(Tier::Host) if has_host => {
                    self.drop_host_copy(id);
                    gone.push(key);
                    if !has_disk {
                        self.index.remove(id);
                        forget.push((ns, key));
                    }
                }
                Some(Tier::Disk) if has_disk => {
                    self.disk_removed(id);
                    self.index.get_mut(id).set_disk(None);
                    gone.push(key);
                    if !has_host {
                        self.index.remove(id);
                    }
                    forget.push((ns, key));
                }
                None if self.drop_block(id) => {
                    gone.push(key);
                    forget.push((ns, key));
                }
                _ => {}
            }
        }
        let removed = gone.len() as u64;
        match only {
            // Subscribers learn of one namespace's clear block by block.
            Some(ns) if !gone.is_empty() => self.notices.push(Notice::Removed {
                ns,
                tier,
                keys: gone,
            }),
            Some(_) => {}
            None => self.notices.push(Notice::Cleared(tier)),
        }
        if !forget.is_empty() {
            self.notices.push(Notice::Forget(forget));
        }
        removed
    }

    // --- introspection -----------------------------------------------------

    pub fn stats(&self) -> TableStats {
        TableStats {
            host_blocks: self.host_blocks,
            disk_blocks: self.disk_blocks,
            index_blocks: self.index.len() as u64,
            index_bytes: self.index.memory_bytes() as u64,
            host_free_bytes: self.pools.iter().map(|p| p.extents.free_bytes()).sum(),
            counters: self.counters,
        }
    }

    /// Every readable block: namespace, key, in host memory, on disk.
    pub fn blocks(&self) -> Vec<(u32, Key, bool, bool)> {
        self.index
            .ids()
            .into_iter()
            .map(|id| self.index.get(id))
            .filter(|e| e.state == State::Ready)
            .map(|e| (e.ns, e.key, e.has_host() && !e.loading, e.has_disk()))
            .collect()
    }
}
