//! The block table against simple models, under random operations.
//!
//! - `lru_matches_a_model`: one namespace, no chains. Puts, reads (leases
//!   held for a while or released at once), write-behinds finishing in any
//!   order, loads from disk. The host tier must hold exactly what a plain
//!   least-recently-used model holds: a read or a load makes a block
//!   recent, a pinned block is never evicted.
//! - `random_operations_keep_invariants`: two namespaces of different block
//!   sizes, chains, sessions, aborts, evictions, clears, recycled regions,
//!   corrupt and failed loads. After every step the table's own structures
//!   agree (no slot held twice, the pool never over-committed, counts
//!   right, leased blocks in host memory, each parent knowing its children
//!   in host memory), and every lookup is a prefix of present blocks.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const SLOT: u64 = 4096;

fn key(i: u64) -> Key {
    Key::new(&i.to_be_bytes()).unwrap()
}

fn new_block(i: u64, parent: Option<u64>) -> NewBlock {
    NewBlock {
        key: i.to_be_bytes().to_vec(),
        parent: parent.map(|p| p.to_be_bytes().to_vec()).unwrap_or_default(),
        tokens: vec![i as u32],
    }
}

fn record(ns: u32, k: Key) -> BlockRecord {
    BlockRecord {
        ns,
        key: k.as_bytes().to_vec(),
        parent: vec![],
        tokens: vec![],
        sealed_tokens: vec![],
        size: SLOT,
        checksum: 0,
        disk: None,
        hits: 0,
    }
}

impl BlockTable {
    /// Checks the table's structures against each other.
    fn check(&self) {
        let mut used = vec![0u64; self.pools.len()];
        let mut end = 0u64;
        let mut host_ready = 0u64;
        for (&off, &id) in &self.slots {
            let e = self.index.get(id);
            assert_eq!(e.host, off, "slot map and entry disagree");
            assert!(off >= end, "slots overlap at {off}");
            let len = self.slot_len(id);
            end = off + len;
            let p = self.index.pool_of(id) as usize;
            let spec = self.pools[p].spec;
            assert_eq!(self.sizes[&e.ns].pool as usize, p, "block outside its pool");
            assert!(
                off >= spec.start && end <= spec.start + spec.len,
                "slot past its pool"
            );
            used[p] += len;
            if e.state == State::Ready {
                host_ready += 1;
            }
        }
        for (p, pool) in self.pools.iter().enumerate() {
            let len = pool.spec.len / SLOT * SLOT;
            assert_eq!(used[p] + pool.extents.free_bytes(), len, "pool {p} bytes");
        }
        assert_eq!(host_ready, self.host_blocks, "host block count");
        let mut on_disk = 0;
        let mut pins: HashMap<u32, u32> = HashMap::new();
        let mut children: HashMap<u32, u32> = HashMap::new();
        for id in self.index.ids() {
            let e = self.index.get(id);
            on_disk += e.has_disk() as u64;
            if e.has_host() {
                assert_eq!(self.slots.get(&e.host), Some(&id), "entry's slot unmapped");
            }
            *pins.entry(id).or_default() += e.writing as u32 + e.loading as u32;
            if e.has_host() {
                if let Some(p) = self.index.parent_of(id) {
                    *children.entry(p).or_default() += 1;
                }
            }
        }
        // Each block counts its children in host memory right, so a parent
        // is never a victim before its children there.
        for id in self.index.ids() {
            let e = self.index.get(id);
            let n = children.get(&id).copied().unwrap_or(0);
            assert_eq!(e.host_children, n, "host children of {id}");
            assert!(!self.index.is_evictable(id) || n == 0);
        }
        assert_eq!(on_disk, self.disk_blocks, "disk block count");
        for (p, pool) in self.pools.iter().enumerate() {
            let of_pool = |id: &u32| self.sizes[&self.index.get(*id).ns].pool as usize == p;
            let writing: u64 = self
                .index
                .ids()
                .into_iter()
                .filter(|id| of_pool(id) && self.index.get(*id).writing)
                .map(|id| self.slot_len(id))
                .sum();
            assert_eq!(writing, pool.writing_bytes, "bytes pinned by writes");
            assert!(writing <= pool.write_budget);
            let on_disk: u64 = self
                .index
                .ids()
                .into_iter()
                .filter(|id| of_pool(id) && self.index.get(*id).has_disk())
                .map(|id| self.sizes[&self.index.get(id).ns].block_bytes)
                .sum();
            assert_eq!(on_disk, pool.disk_bytes, "pool {p} bytes on disk");
            let count = self
                .index
                .ids()
                .into_iter()
                .filter(|id| of_pool(id) && self.index.get(*id).has_disk())
                .count() as u64;
            assert_eq!(count, pool.disk_count, "pool {p} blocks on disk");
        }
        for l in self.sessions.leases.values() {
            for &id in &l.ids {
                *pins.entry(id).or_default() += 1;
                let e = self.index.get(id);
                assert!(
                    e.state == State::Ready && e.has_host(),
                    "leased block lost its slot"
                );
            }
        }
        for s in self.sessions.open.values() {
            for r in s.reservations.values() {
                *pins.entry(r.id).or_default() += 1;
                assert_eq!(self.index.get(r.id).state, State::Reserved);
            }
        }
        for (id, n) in pins {
            assert_eq!(self.index.get(id).pins, n, "pins of {id}");
        }
    }

    fn host_keys(&self, ns: u32) -> HashSet<Key> {
        self.blocks()
            .into_iter()
            .filter(|&(n, _, host, _)| n == ns && host)
            .map(|(_, k, _, _)| k)
            .collect()
    }
}

fn put(t: &mut BlockTable, s: Session, ns: u32, blocks: Vec<NewBlock>) -> Result<Vec<Committed>> {
    let keys: Vec<Key> = blocks.iter().map(|b| Key::new(&b.key).unwrap()).collect();
    t.reserve(s, ns, blocks, Instant::now())?;
    t.commit(s, ns, &keys)
}

/// Acquires `keys`, completing loads with `outcome`; returns the lease.
fn read(
    t: &mut BlockTable,
    s: Session,
    ns: u32,
    keys: &[Key],
    outcome: LoadOutcome,
) -> (u64, usize) {
    let a = t.acquire(s, ns, keys, Instant::now()).unwrap();
    let mut good = usize::MAX;
    for job in &a.loads {
        if t.load_done(job, outcome) != Some(true) {
            let pos = a.waits.iter().find(|w| w.1 == job.id).unwrap().0;
            good = good.min(pos);
        }
    }
    let (lease, grants, _) = t.finish_acquire(s, &a, keys.len(), good).unwrap();
    (lease, grants.len())
}

fn disk_at(n: u64) -> WriteOutcome {
    WriteOutcome::Written {
        disk: DiskRef {
            region: (n % 4) as u32,
            generation: 1,
            offset: n * SLOT,
            len: SLOT as u32,
        },
        checksum: n,
    }
}

#[test]
fn lru_matches_a_model() {
    for seed in 0..40 {
        let mut rng = StdRng::seed_from_u64(seed);
        let slots = 12u64;
        let mut t = BlockTable::new(slots * SLOT, Duration::from_secs(60));
        t.add_namespace(1, SLOT, 0);
        let s = t.open_session(Owner::Daemon, None);
        // Model: last use of every block in host memory; pins; disk copies.
        let mut clock = 0u64;
        let mut host: HashMap<u64, u64> = HashMap::new();
        let mut disk: HashSet<u64> = HashSet::new();
        let mut pins: HashMap<u64, u32> = HashMap::new();
        let mut leases: Vec<(u64, u64)> = Vec::new();
        let mut writes: Vec<(WriteJob, u64)> = Vec::new();
        let mut writes_done = 0u64;

        // The model's victim: least recently used unpinned host block.
        let evict_one = |host: &mut HashMap<u64, u64>, pins: &HashMap<u64, u32>| -> bool {
            let victim = host
                .iter()
                .filter(|(k, _)| pins.get(k).copied().unwrap_or(0) == 0)
                .min_by_key(|(_, &used)| used)
                .map(|(&k, _)| k);
            victim.is_some_and(|v| host.remove(&v).is_some())
        };

        for _ in 0..600 {
            let k = rng.random_range(0..30u64);
            match rng.random_range(0..10) {
                0..=3 => {
                    let present = host.contains_key(&k) || disk.contains(&k);
                    let full = host.len() as u64 == slots;
                    let ok = put(&mut t, s, 1, vec![new_block(k, None)]);
                    if present {
                        assert!(ok.unwrap().is_empty());
                        continue;
                    }
                    if full && !evict_one(&mut host, &pins) {
                        assert!(ok.is_err(), "seed {seed}: put must fail, all pinned");
                        continue;
                    }
                    assert_eq!(ok.unwrap().len(), 1);
                    clock += 1;
                    host.insert(k, clock);
                }
                4..=6 => {
                    let in_host = host.contains_key(&k);
                    if !in_host && !disk.contains(&k) {
                        continue;
                    }
                    if !in_host && host.len() as u64 == slots && !evict_one(&mut host, &pins) {
                        let (lease, n) = read(&mut t, s, 1, &[key(k)], LoadOutcome::Loaded);
                        assert_eq!((lease, n), (0, 0), "seed {seed}: no room to load");
                        continue;
                    }
                    let (lease, n) = read(&mut t, s, 1, &[key(k)], LoadOutcome::Loaded);
                    assert_eq!(n, 1, "seed {seed}: read of a present block");
                    clock += 1;
                    host.insert(k, clock);
                    if rng.random_bool(0.3) {
                        *pins.entry(k).or_default() += 1;
                        leases.push((lease, k));
                    } else {
                        t.release(s, lease).unwrap();
                    }
                }
                7 => {
                    if !leases.is_empty() {
                        let (lease, k) = leases.swap_remove(rng.random_range(0..leases.len()));
                        t.release(s, lease).unwrap();
                        *pins.get_mut(&k).unwrap() -= 1;
                    }
                }
                8 => {
                    let Some(id) = t.index.find(1, &key(k)) else {
                        continue;
                    };
                    if let StartWrite::Job(job) = t.start_write(id, key(k), false) {
                        *pins.entry(k).or_default() += 1;
                        writes.push((job, k));
                    }
                }
                _ => {
                    if writes.is_empty() {
                        continue;
                    }
                    let (job, k) = writes.swap_remove(rng.random_range(0..writes.len()));
                    let written = rng.random_bool(0.7);
                    writes_done += 1;
                    let outcome = if written {
                        disk_at(writes_done)
                    } else {
                        WriteOutcome::NotWritten
                    };
                    t.write_done(&job, outcome, record(1, key(k)));
                    *pins.get_mut(&k).unwrap() -= 1;
                    if written {
                        disk.insert(k);
                    }
                }
            }
            t.check();
            // Blocks evicted from host without a disk copy are gone.
            let model: HashSet<Key> = host.keys().map(|&k| key(k)).collect();
            assert_eq!(
                t.host_keys(1),
                model,
                "seed {seed}: host tier differs from LRU"
            );
            disk.retain(|k| t.index.find(1, &key(*k)).is_some());
            host.retain(|k, _| t.index.find(1, &key(*k)).is_some());
        }
    }
}

#[test]
fn random_operations_keep_invariants() {
    let mut seen = Counters::default();
    for seed in 0..60 {
        let mut rng = StdRng::seed_from_u64(seed);
        let pool = 24 * SLOT;
        // The shared pool, and a tenant's pool of 8 pages right after it
        // that may keep 3 pages' worth of blocks on disk.
        let quota = 3 * SLOT;
        let mut t = BlockTable::with_pools(
            &[
                PoolSpec {
                    start: 0,
                    len: pool,
                    disk_quota: 0,
                },
                PoolSpec {
                    start: pool,
                    len: 8 * SLOT,
                    disk_quota: quota,
                },
            ],
            Duration::from_secs(60),
        );
        // Namespace 1: one-page blocks; namespace 2: three pages; both in
        // the shared pool. Namespace 3: the tenant's, one-page blocks.
        t.add_namespace(1, SLOT, 0);
        t.add_namespace(2, 3 * SLOT - 100, 0);
        t.add_namespace(3, SLOT, 1);
        let pool_of = |ns: u32| u8::from(ns == 3);
        let mut sessions = vec![
            t.open_session(Owner::Process { pid: 1, uid: 1 }, Some(0)),
            t.open_session(Owner::Process { pid: 3, uid: 2 }, Some(1)),
        ];
        let mut leases: Vec<(Session, u64)> = Vec::new();
        let mut writes: Vec<WriteJob> = Vec::new();
        let mut next_disk = 0u64;
        let mut reserved: Vec<(Session, u32, Key)> = Vec::new();
        for _ in 0..800 {
            let s = sessions[rng.random_range(0..sessions.len())];
            let ns = rng.random_range(1..=3u32);
            // A session works on its own pool's namespaces.
            let own_pool = t.sessions.pool(s.id) == Some(pool_of(ns));
            let base = rng.random_range(0..12u64) * 4;
            let len = rng.random_range(1..=4u64);
            let chain: Vec<u64> = (base..base + len).collect();
            let keys: Vec<Key> = chain.iter().map(|&k| key(k)).collect();
            // Host blocks of the other namespaces, and of the other pool.
            let others = |t: &BlockTable| -> Vec<HashSet<Key>> {
                (1..=3)
                    .filter(|&n| n != ns)
                    .map(|n| t.host_keys(n))
                    .collect()
            };
            let other_pool = |t: &BlockTable| -> Vec<HashSet<Key>> {
                (1..=3)
                    .filter(|&n| pool_of(n) != pool_of(ns))
                    .map(|n| t.host_keys(n))
                    .collect()
            };
            let before = others(&t);
            let before_pool = other_pool(&t);
            match rng.random_range(0..14) {
                0..=2 => {
                    let blocks = chain
                        .iter()
                        .map(|&k| new_block(k, (k > base).then(|| k - 1)))
                        .collect();
                    match t.reserve(s, ns, blocks, Instant::now()) {
                        Ok(grants) => {
                            assert!(own_pool, "seed {seed}: reserved in another pool");
                            for (g, k) in grants.iter().zip(&keys) {
                                if g.length > 0 {
                                    // Offsets are relative to the session's pool.
                                    assert!(
                                        g.offset + SLOT <= t.pools[pool_of(ns) as usize].spec.len
                                    );
                                    reserved.push((s, ns, *k));
                                }
                            }
                        }
                        // A failed allocation of one block evicts nothing
                        // (a batch may have evicted for its first blocks).
                        Err(_) if len == 1 => assert_eq!(others(&t), before, "seed {seed}"),
                        Err(_) => {}
                    }
                    // A pool's allocations never evict another pool's blocks.
                    assert_eq!(other_pool(&t), before_pool, "seed {seed}");
                }
                3..=4 => {
                    let mine: Vec<Key> = reserved
                        .iter()
                        .filter(|r| r.0 == s && r.1 == ns)
                        .map(|r| r.2)
                        .collect();
                    if rng.random_bool(0.8) {
                        t.commit(s, ns, &mine).unwrap();
                    } else {
                        t.abort(s, ns, &mine).unwrap();
                    }
                    reserved.retain(|r| !(r.0 == s && r.1 == ns));
                }
                5..=6 => {
                    let outcome = match rng.random_range(0..6) {
                        0 => LoadOutcome::Corrupt,
                        1 => LoadOutcome::Failed,
                        _ => LoadOutcome::Loaded,
                    };
                    if !own_pool {
                        assert!(t.acquire(s, ns, &keys, Instant::now()).is_err());
                        continue;
                    }
                    let (lease, n) = read(&mut t, s, ns, &keys, outcome);
                    let found = t.lookup(ns, &keys);
                    assert!(n <= found.locations.len() || outcome != LoadOutcome::Loaded);
                    if lease != 0 {
                        leases.push((s, lease));
                    }
                    assert_eq!(other_pool(&t), before_pool, "seed {seed}");
                }
                7 => {
                    if !leases.is_empty() {
                        let (s, l) = leases.swap_remove(rng.random_range(0..leases.len()));
                        t.release(s, l).unwrap();
                    }
                }
                8 => {
                    for k in &keys {
                        if let Some(id) = t.index.find(ns, k) {
                            if let StartWrite::Job(job) = t.start_write(id, *k, false) {
                                writes.push(job);
                            }
                        }
                    }
                }
                9 => {
                    if !writes.is_empty() {
                        let job = writes.swap_remove(rng.random_range(0..writes.len()));
                        next_disk += 1;
                        let outcome = if rng.random_bool(0.8) {
                            disk_at(next_disk)
                        } else {
                            WriteOutcome::NotWritten
                        };
                        t.write_done(&job, outcome, record(job.ns, job.key));
                        let busy = t.index.ids().into_iter().any(|id| {
                            let e = t.index.get(id);
                            e.ns == 3 && e.has_disk() && (e.pins > 0 || e.loading)
                        });
                        if job.ns == 3 && !busy {
                            assert!(t.pools[1].disk_bytes <= quota, "seed {seed}: over quota");
                        }
                    }
                }
                10 => {
                    t.evict(ns, &keys);
                }
                11 => {
                    let region = rng.random_range(0..4u32);
                    t.regions_recycled(&[(region, 1)]);
                }
                12 => {
                    if rng.random_bool(0.5) {
                        let tier =
                            [None, Some(Tier::Host), Some(Tier::Disk)][rng.random_range(0..3)];
                        let only = [None, Some(ns)][rng.random_range(0..2)];
                        t.clear(tier, only);
                        if only.is_some() {
                            // The other namespaces are untouched.
                            assert_eq!(others(&t), before, "seed {seed}");
                        }
                    } else if sessions.len() < 4 {
                        let pool = rng.random_range(0..2u8);
                        sessions
                            .push(t.open_session(Owner::Process { pid: 2, uid: 1 }, Some(pool)));
                    }
                }
                _ => {
                    if sessions.len() > 2 {
                        let gone = sessions.swap_remove(rng.random_range(2..sessions.len()));
                        t.close_session(gone);
                        leases.retain(|l| l.0 != gone);
                        reserved.retain(|r| r.0 != gone);
                    }
                }
            }
            t.check();
            // Lookups report a prefix, each block present where it says.
            let found = t.lookup(ns, &keys);
            assert!(found.host as usize <= found.locations.len());
            for (k, tier) in keys.iter().zip(&found.locations) {
                let id = t.index.find(ns, k).expect("matched block is indexed");
                let e = t.index.get(id);
                match tier {
                    Tier::Host => assert!(e.has_host() && !e.loading),
                    Tier::Disk => assert!(e.has_disk()),
                }
            }
            t.take_notices();
        }
        // Everything released, the pool holds only evictable blocks: a
        // reservation of the whole pool in small blocks succeeds.
        for (s, l) in leases {
            t.release(s, l).unwrap();
        }
        for s in sessions {
            t.close_session(s);
        }
        for job in writes {
            t.write_done(&job, WriteOutcome::NotWritten, record(job.ns, job.key));
        }
        let s = t.open_session(Owner::Daemon, None);
        let blocks = (1000..1024).map(|k| new_block(k, None)).collect();
        t.reserve(s, 1, blocks, Instant::now())
            .unwrap_or_else(|e| panic!("seed {seed}: whole pool after release: {e}"));
        let blocks = (1000..1008).map(|k| new_block(k, None)).collect();
        t.reserve(s, 3, blocks, Instant::now())
            .unwrap_or_else(|e| panic!("seed {seed}: whole tenant pool after release: {e}"));
        t.check();
        let c = t.stats().counters;
        seen.host_hits += c.host_hits;
        seen.disk_hits += c.disk_hits;
        seen.host_evictions += c.host_evictions;
        seen.disk_evictions += c.disk_evictions;
        seen.checksum_failures += c.checksum_failures;
        seen.dropped_writes += c.dropped_writes;
    }
    // The walk reached every kind of event it is meant to test.
    for (what, n) in [
        ("host hits", seen.host_hits),
        ("disk hits", seen.disk_hits),
        ("host evictions", seen.host_evictions),
        ("disk evictions", seen.disk_evictions),
        ("checksum failures", seen.checksum_failures),
        ("dropped writes", seen.dropped_writes),
    ] {
        assert!(n > 0, "no {what} in the random walk");
    }
}

/// A large block needs contiguous room: small blocks of another namespace
/// that cannot make room are not evicted for nothing.
#[test]
fn mixed_sizes_evict_only_what_makes_room() {
    let mut t = BlockTable::new(8 * SLOT, Duration::from_secs(60));
    t.add_namespace(1, SLOT, 0);
    t.add_namespace(2, 4 * SLOT, 0);
    let s = t.open_session(Owner::Daemon, None);
    // Eight small blocks fill the pool; lease every other one.
    put(&mut t, s, 1, (0..8).map(|k| new_block(k, None)).collect()).unwrap();
    let mut leases = Vec::new();
    for k in [0u64, 2, 4, 6] {
        leases.push(read(&mut t, s, 1, &[key(k)], LoadOutcome::Loaded).0);
    }
    // No four adjacent pages can be freed: the big block fails, and no
    // small block was evicted trying.
    assert!(put(&mut t, s, 2, vec![new_block(100, None)]).is_err());
    assert_eq!(t.host_keys(1).len(), 8);
    // With the leases gone, exactly the four oldest-window blocks go.
    for l in leases {
        t.release(s, l).unwrap();
    }
    put(&mut t, s, 2, vec![new_block(100, None)]).unwrap();
    assert_eq!(t.host_keys(1).len(), 4);
    assert_eq!(t.stats().counters.host_evictions, 4);
    t.check();
}

/// A block read after every put stays in host memory while unread blocks
/// cycle through (the outside test's 8 hot blocks on a 64-slot pool).
#[test]
fn hot_blocks_stay() {
    let mut t = BlockTable::new(64 * SLOT, Duration::from_secs(60));
    t.add_namespace(1, SLOT, 0);
    let s = t.open_session(Owner::Daemon, None);
    put(&mut t, s, 1, (0..8).map(|k| new_block(k, None)).collect()).unwrap();
    let mut hot_hits = 0;
    for cold in 100..1100u64 {
        put(&mut t, s, 1, vec![new_block(cold, None)]).unwrap();
        for k in 0..8 {
            let (lease, n) = read(&mut t, s, 1, &[key(k)], LoadOutcome::Loaded);
            hot_hits += n;
            if lease != 0 {
                t.release(s, lease).unwrap();
            }
        }
    }
    assert_eq!(hot_hits, 8000, "every hot read served from host memory");
}

/// One long chain fills the pool while its newest blocks are being written
/// (pinned): new writes still find room, taken just above the pinned tail,
/// and the chain's older part stays a usable prefix.
#[test]
fn long_chain_with_pinned_tail_still_takes_writes() {
    let mut t = BlockTable::new(16 * SLOT, Duration::from_secs(60));
    t.add_namespace(1, SLOT, 0);
    let s = t.open_session(Owner::Daemon, None);
    let mut writes = Vec::new();
    for k in 0..64u64 {
        put(&mut t, s, 1, vec![new_block(k, k.checked_sub(1))])
            .unwrap_or_else(|e| panic!("put {k}: {e}"));
        let id = t.index.find(1, &key(k)).unwrap();
        if let StartWrite::Job(job) = t.start_write(id, key(k), false) {
            writes.push(job);
        }
        // The disk keeps up with all but the last two writes.
        while writes.len() > 2 {
            let job = writes.remove(0);
            t.write_done(
                &job,
                disk_at(job.key.as_bytes()[7] as u64),
                record(1, job.key),
            );
        }
        t.check();
    }
    let chain: Vec<Key> = (0..64).map(key).collect();
    assert!(
        t.lookup(1, &chain).locations.len() >= 16,
        "an older prefix stays"
    );
}

/// A tenant under its disk quota whose blocks keep leaving the disk another
/// way (recycled regions) does not grow the quota's list without bound, and
/// an entry whose id now names another tenant's block with the same key
/// never drops that block.
#[test]
fn quota_list_stays_bounded_and_never_crosses_pools() {
    let mut t = BlockTable::with_pools(
        &[
            PoolSpec {
                start: 0,
                len: 64 * SLOT,
                disk_quota: 0,
            },
            PoolSpec {
                start: 64 * SLOT,
                len: 64 * SLOT,
                disk_quota: 1 << 40,
            },
        ],
        Duration::from_secs(60),
    );
    t.add_namespace(1, SLOT, 0);
    t.add_namespace(3, SLOT, 1);
    let s = t.open_session(Owner::Daemon, None);
    let mut n = 0u64;
    for round in 0..200u64 {
        for k in 0..8 {
            let key_n = round * 8 + k;
            put(&mut t, s, 3, vec![new_block(key_n, None)]).unwrap();
            let id = t.index.find(3, &key(key_n)).unwrap();
            let StartWrite::Job(job) = t.start_write(id, key(key_n), false) else {
                panic!("write of {key_n}");
            };
            n += 1;
            t.write_done(&job, disk_at(n), record(3, key(key_n)));
        }
        // Every region recycled: the disk copies are gone, the entries stay.
        t.regions_recycled(&[(0, 1), (1, 1), (2, 1), (3, 1)]);
        t.take_notices();
        t.check();
        assert!(
            t.pools[1].disk_order.len() <= 2 * 8 + 64 + 8,
            "round {round}"
        );
    }
    // Tenant 3's stale entry for key 0 and a block of the shared pool with
    // the same key: over quota, tenant 3 drops only its own copies.
    put(&mut t, s, 1, vec![new_block(0, None)]).unwrap();
    let id = t.index.find(1, &key(0)).unwrap();
    if let StartWrite::Job(job) = t.start_write(id, key(0), false) {
        t.write_done(&job, disk_at(9999), record(1, key(0)));
    }
    t.pools[1].spec.disk_quota = 1;
    t.enforce_disk_quota(3);
    assert!(t.index.get(t.index.find(1, &key(0)).unwrap()).has_disk());
    t.check();
}
