//! The in-memory block index: every block kvbm holds, where its copies are,
//! who pins it, and the host tier's eviction order.
//!
//! Entries live in a slab (`Vec<Entry>`, ids are `u32`) found through a hash
//! table of ids, so the per-block cost stays near 110 bytes (see
//! [`Index::memory_bytes`]). Parent links are ids tagged with the number of
//! the parent's insertion: an id reused after its parent was removed — by
//! another block, or by the same key put again — is detected and ignored,
//! so a child never counts toward a parent it was not linked to.
//!
//! Host eviction respects prefixes: a block is evictable only when no child
//! of it is in host memory and nobody pins it; among those, least recently
//! used first (an intrusive list kept in order of each block's last use).
//! A use is a commit or a read; a block that becomes evictable again (its
//! lease released, its write-behind done, its last host child evicted) goes
//! back to the place its last use gives it, not to either end: a block just
//! read is never the next victim, and a chain is trimmed from its tail.

use hashbrown::HashTable;
use xxhash_rust::xxh3::xxh3_64;

pub const NONE: u32 = u32::MAX;
pub const NO_SLOT: u64 = u64::MAX;
pub const MAX_KEY: usize = 32;

/// A block key: the engine's block hash, 1 to 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    bytes: [u8; MAX_KEY],
    len: u8,
}

impl Key {
    pub fn new(b: &[u8]) -> Option<Key> {
        if b.is_empty() || b.len() > MAX_KEY {
            return None;
        }
        let mut bytes = [0u8; MAX_KEY];
        bytes[..b.len()].copy_from_slice(b);
        Some(Key {
            bytes,
            len: b.len() as u8,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn hash(ns: u32, key: &Key) -> u64 {
    xxh3_64(key.as_bytes()) ^ (ns as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A block's identity, `(namespace, key)`, as the key of a `HashMap`
/// ([`BlockMap`]): hashed once with the index's own hash rather than
/// SipHash over 37 bytes, which a 512-key lookup would pay 512 times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockId(pub u32, pub Key);

impl std::hash::Hash for BlockId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(hash(self.0, &self.1));
    }
}

/// The hasher of [`BlockMap`]: passes a [`BlockId`]'s hash through.
#[derive(Default)]
pub struct BlockIdHasher(u64);

impl std::hash::Hasher for BlockIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `BlockId`; anything else still hashes.
        self.0 = xxh3_64(bytes) ^ self.0.rotate_left(5);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A map keyed by block identity.
pub type BlockMap<V> =
    std::collections::HashMap<BlockId, V, std::hash::BuildHasherDefault<BlockIdHasher>>;

/// Where a block stands in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Slot unused (on the free list).
    Free,
    /// Host slot granted to a writer; invisible to readers until commit.
    Reserved,
    /// Readable.
    Ready,
}

/// Disk copy of a block: region, its generation, byte offset in the file,
/// and the entry's stored length (less than the block's when compressed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRef {
    pub region: u32,
    pub generation: u64,
    pub offset: u64,
    pub len: u32,
}

/// [`DiskRef`] as the index stores it: 16 bytes instead of 32, to keep the
/// per-block cost under 128 bytes. The generation keeps its low 32 bits (a
/// region would have to be recycled 2^32 times to alias; a stale read is
/// caught by the entry header anyway) and the offset is counted in 4 KiB
/// pages (files up to 16 TiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PackedDisk {
    region: u32,
    generation: u32,
    page: u32,
    len: u32,
}

const NO_REGION: u32 = u32::MAX;

impl PackedDisk {
    const NONE: PackedDisk = PackedDisk {
        region: NO_REGION,
        generation: 0,
        page: 0,
        len: 0,
    };

    fn pack(d: Option<DiskRef>) -> PackedDisk {
        match d {
            Some(d) if d.offset % 4096 == 0 && d.offset / 4096 <= u32::MAX as u64 => PackedDisk {
                region: d.region,
                generation: d.generation as u32,
                page: (d.offset / 4096) as u32,
                len: d.len,
            },
            _ => PackedDisk::NONE,
        }
    }

    fn unpack(self) -> Option<DiskRef> {
        (self.region != NO_REGION).then_some(DiskRef {
            region: self.region,
            generation: self.generation as u64,
            offset: self.page as u64 * 4096,
            len: self.len,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub key: Key,
    pub state: State,
    /// The host copy is being read from disk; readers wait for it.
    pub loading: bool,
    /// A write-behind of this block is in flight.
    pub writing: bool,
    /// The block's write-behind was dropped or failed: it is not durable
    /// (what `Sync` reports, and what it can retry).
    pub undurable: bool,
    pub ns: u32,
    parent: u32,
    parent_tag: u32,
    /// This entry's insertion number (wrapping), what children's
    /// `parent_tag` refers to.
    tag: u32,
    /// Children of this block that have a host copy.
    pub host_children: u32,
    /// Leases, reservations and in-flight I/O holding the host copy.
    pub pins: u32,
    /// Offset of the host slot, or [`NO_SLOT`].
    pub host: u64,
    disk: PackedDisk,
    pub hits: u32,
    /// The index clock at the block's last use (commit or read).
    last_use: u64,
    lru_prev: u32,
    lru_next: u32,
    in_lru: bool,
    /// The host pool holding the host copy (0: the shared pool); each pool
    /// has its own eviction order.
    pool: u8,
}

impl Entry {
    pub fn has_host(&self) -> bool {
        self.host != NO_SLOT
    }

    /// The disk copy, if any. Its generation holds only the low 32 bits of
    /// the region's: compare with [`same_generation`].
    pub fn disk(&self) -> Option<DiskRef> {
        self.disk.unpack()
    }

    pub fn has_disk(&self) -> bool {
        self.disk.region != NO_REGION
    }

    pub fn set_disk(&mut self, d: Option<DiskRef>) {
        self.disk = PackedDisk::pack(d);
    }
}

/// Whether a stored (truncated) generation is the region's generation `g`.
pub fn same_generation(stored: u64, g: u64) -> bool {
    stored == g & u32::MAX as u64
}

#[derive(Default)]
pub struct Index {
    entries: Vec<Entry>,
    free: Vec<u32>,
    table: HashTable<u32>,
    /// The eviction order of each host pool.
    lrus: Vec<Lru>,
    live: usize,
    /// Counts uses; orders the eviction list.
    clock: u64,
    /// Counts insertions; tags entries.
    inserts: u32,
}

/// One pool's eviction order: a list from the next victim (`head`) to the
/// most recently used block (`tail`).
#[derive(Debug, Clone, Copy)]
struct Lru {
    head: u32,
    tail: u32,
}

const EMPTY: Lru = Lru {
    head: NONE,
    tail: NONE,
};

impl Index {
    pub fn new() -> Index {
        Index::default()
    }

    fn lru(&self, pool: u8) -> Lru {
        self.lrus.get(pool as usize).copied().unwrap_or(EMPTY)
    }

    fn lru_mut(&mut self, pool: u8) -> &mut Lru {
        let i = pool as usize;
        if self.lrus.len() <= i {
            self.lrus.resize(i + 1, EMPTY);
        }
        &mut self.lrus[i]
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Estimated heap memory of the index: slab, free list and hash table.
    pub fn memory_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.free.capacity() * 4
            + self.table.capacity() * (std::mem::size_of::<u32>() + 1)
    }

    pub fn find(&self, ns: u32, key: &Key) -> Option<u32> {
        let entries = &self.entries;
        self.table
            .find(hash(ns, key), |&id| {
                let e = &entries[id as usize];
                e.ns == ns && e.key == *key
            })
            .copied()
    }

    pub fn get(&self, id: u32) -> &Entry {
        &self.entries[id as usize]
    }

    pub fn get_mut(&mut self, id: u32) -> &mut Entry {
        &mut self.entries[id as usize]
    }

    /// Ids of every live entry (for snapshots and clears).
    pub fn ids(&self) -> Vec<u32> {
        (0..self.entries.len() as u32)
            .filter(|&id| self.entries[id as usize].state != State::Free)
            .collect()
    }

    /// Adds a block (the caller checked it is absent). `parent` is the
    /// parent's id when the parent is present.
    pub fn insert(&mut self, ns: u32, key: Key, state: State, parent: Option<u32>) -> u32 {
        let (parent, parent_tag) = match parent {
            Some(p) => (p, self.tag_of(p)),
            None => (NONE, 0),
        };
        let entry = Entry {
            key,
            state,
            loading: false,
            writing: false,
            undurable: false,
            ns,
            parent,
            parent_tag,
            tag: self.inserts,
            host_children: 0,
            pins: 0,
            host: NO_SLOT,
            disk: PackedDisk::NONE,
            hits: 0,
            last_use: 0,
            lru_prev: NONE,
            lru_next: NONE,
            in_lru: false,
            pool: 0,
        };
        self.inserts = self.inserts.wrapping_add(1);
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = entry;
                id
            }
            None => {
                self.entries.push(entry);
                (self.entries.len() - 1) as u32
            }
        };
        let entries = &self.entries;
        self.table.insert_unique(hash(ns, &key), id, |&i| {
            let e = &entries[i as usize];
            hash(e.ns, &e.key)
        });
        self.live += 1;
        id
    }

    /// Removes a block from the index. Its host copy must already be gone.
    pub fn remove(&mut self, id: u32) {
        let (ns, key) = {
            let e = &self.entries[id as usize];
            debug_assert!(!e.has_host());
            (e.ns, e.key)
        };
        self.lru_unlink(id);
        let entries = &self.entries;
        if let Ok(slot) = self.table.find_entry(hash(ns, &key), |&i| {
            let e = &entries[i as usize];
            e.ns == ns && e.key == key
        }) {
            slot.remove();
        }
        let e = &mut self.entries[id as usize];
        e.state = State::Free;
        e.disk = PackedDisk::NONE;
        self.free.push(id);
        self.live -= 1;
    }

    fn tag_of(&self, id: u32) -> u32 {
        self.entries[id as usize].tag
    }

    /// The parent's id, when it is still the block this entry was linked to.
    pub fn parent_of(&self, id: u32) -> Option<u32> {
        let e = &self.entries[id as usize];
        if e.parent == NONE {
            return None;
        }
        let p = &self.entries[e.parent as usize];
        (p.state != State::Free && self.tag_of(e.parent) == e.parent_tag).then_some(e.parent)
    }

    /// Links `id` to its parent (recovery, where parents may be found after
    /// their children).
    pub fn relink(&mut self, id: u32, parent: u32) {
        let tag = self.tag_of(parent);
        let e = &mut self.entries[id as usize];
        e.parent = parent;
        e.parent_tag = tag;
    }

    /// Records that `id` got a host copy at `slot` of host pool `pool`.
    pub fn set_host(&mut self, id: u32, slot: u64, pool: u8) {
        let e = &mut self.entries[id as usize];
        e.host = slot;
        e.pool = pool;
        if let Some(p) = self.parent_of(id) {
            self.entries[p as usize].host_children += 1;
            self.lru_unlink(p);
        }
    }

    /// Records that `id` lost its host copy; returns the slot it had.
    pub fn clear_host(&mut self, id: u32) -> Option<u64> {
        let slot = std::mem::replace(&mut self.entries[id as usize].host, NO_SLOT);
        if slot == NO_SLOT {
            return None;
        }
        self.lru_unlink(id);
        if let Some(p) = self.parent_of(id) {
            let pe = &mut self.entries[p as usize];
            pe.host_children = pe.host_children.saturating_sub(1);
            // The parent may be evictable now, in the place its last use
            // gives it (no later than the child it outlived).
            self.refresh(p, false);
        }
        Some(slot)
    }

    /// Records a use of `id` now (a commit or a read).
    pub fn touch(&mut self, id: u32) {
        self.clock += 1;
        self.entries[id as usize].last_use = self.clock;
    }

    /// Puts `id` in the eviction order if it is evictable (a ready, unpinned
    /// host copy with no host children), at the place its last use gives it;
    /// takes it out otherwise. `used`: it is being used now.
    pub fn refresh(&mut self, id: u32, used: bool) {
        if used {
            self.touch(id);
        }
        let e = &self.entries[id as usize];
        let evictable = e.state == State::Ready
            && e.has_host()
            && !e.loading
            && e.pins == 0
            && e.host_children == 0;
        if !evictable {
            self.lru_unlink(id);
            return;
        }
        if e.in_lru && !used {
            return;
        }
        self.lru_unlink(id);
        self.lru_insert_by_use(id);
    }

    /// Inserts `id` after the last block used before it. The walk starts at
    /// the nearer end (a block is usually just used, or long unused) and is
    /// bounded: past `MAX_WALK` steps the order is approximate, which can
    /// only make an eviction slightly early or late, never wrong.
    fn lru_insert_by_use(&mut self, id: u32) {
        const MAX_WALK: usize = 4096;
        let (mine, pool) = {
            let e = &self.entries[id as usize];
            (e.last_use, e.pool)
        };
        let Lru { head, tail } = self.lru(pool);
        if tail == NONE || self.entries[tail as usize].last_use <= mine {
            return self.lru_push_back(id);
        }
        if self.entries[head as usize].last_use > mine {
            return self.lru_push_front(id);
        }
        let from_tail = self.entries[tail as usize].last_use - mine
            <= mine - self.entries[head as usize].last_use;
        // `after`: the block to insert behind (used at or before `mine`).
        let mut after;
        if from_tail {
            after = tail;
            for _ in 0..MAX_WALK {
                if self.entries[after as usize].last_use <= mine {
                    break;
                }
                let prev = self.entries[after as usize].lru_prev;
                if prev == NONE {
                    return self.lru_push_front(id);
                }
                after = prev;
            }
        } else {
            after = head;
            for _ in 0..MAX_WALK {
                let next = self.entries[after as usize].lru_next;
                if next == NONE || self.entries[next as usize].last_use > mine {
                    break;
                }
                after = next;
            }
        }
        let next = self.entries[after as usize].lru_next;
        {
            let e = &mut self.entries[id as usize];
            e.lru_prev = after;
            e.lru_next = next;
            e.in_lru = true;
        }
        self.entries[after as usize].lru_next = id;
        if next == NONE {
            self.lru_mut(pool).tail = id;
        } else {
            self.entries[next as usize].lru_prev = id;
        }
    }

    /// Evictable blocks of host pool `pool` from the next victim on, at
    /// most `n`.
    pub fn lru_iter(&self, pool: u8, n: usize) -> impl Iterator<Item = u32> + '_ {
        let mut at = self.lru(pool).head;
        std::iter::from_fn(move || {
            if at == NONE {
                return None;
            }
            let id = at;
            at = self.entries[id as usize].lru_next;
            Some(id)
        })
        .take(n)
    }

    /// The index clock at `id`'s last use.
    pub fn last_use(&self, id: u32) -> u64 {
        self.entries[id as usize].last_use
    }

    /// Whether `id` is in the eviction order (evictable now).
    pub fn is_evictable(&self, id: u32) -> bool {
        self.entries[id as usize].in_lru
    }

    /// The host pool holding `id`'s host copy (meaningful while it has one).
    pub fn pool_of(&self, id: u32) -> u8 {
        self.entries[id as usize].pool
    }

    /// The next victim of host pool `pool`, if any block there is evictable.
    #[cfg(test)]
    pub fn lru_victim(&self, pool: u8) -> Option<u32> {
        let head = self.lru(pool).head;
        (head != NONE).then_some(head)
    }

    fn lru_unlink(&mut self, id: u32) {
        let (prev, next, in_lru, pool) = {
            let e = &self.entries[id as usize];
            (e.lru_prev, e.lru_next, e.in_lru, e.pool)
        };
        if !in_lru {
            return;
        }
        if prev == NONE {
            self.lru_mut(pool).head = next;
        } else {
            self.entries[prev as usize].lru_next = next;
        }
        if next == NONE {
            self.lru_mut(pool).tail = prev;
        } else {
            self.entries[next as usize].lru_prev = prev;
        }
        let e = &mut self.entries[id as usize];
        e.lru_prev = NONE;
        e.lru_next = NONE;
        e.in_lru = false;
    }

    fn lru_push_back(&mut self, id: u32) {
        let pool = self.entries[id as usize].pool;
        let tail = self.lru(pool).tail;
        {
            let e = &mut self.entries[id as usize];
            e.lru_prev = tail;
            e.lru_next = NONE;
            e.in_lru = true;
        }
        if tail == NONE {
            self.lru_mut(pool).head = id;
        } else {
            self.entries[tail as usize].lru_next = id;
        }
        self.lru_mut(pool).tail = id;
    }

    fn lru_push_front(&mut self, id: u32) {
        let pool = self.entries[id as usize].pool;
        let head = self.lru(pool).head;
        {
            let e = &mut self.entries[id as usize];
            e.lru_prev = NONE;
            e.lru_next = head;
            e.in_lru = true;
        }
        if head == NONE {
            self.lru_mut(pool).tail = id;
        } else {
            self.entries[head as usize].lru_prev = id;
        }
        self.lru_mut(pool).head = id;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> Key {
        Key::new(&i.to_be_bytes()).unwrap()
    }

    /// Inserts a ready host block with the given parent.
    fn put(ix: &mut Index, i: u32, parent: Option<u32>) -> u32 {
        let id = ix.insert(1, key(i), State::Ready, parent);
        ix.set_host(id, i as u64 * 4096, 0);
        ix.refresh(id, true);
        id
    }

    #[test]
    fn find_insert_remove() {
        let mut ix = Index::new();
        let a = put(&mut ix, 1, None);
        assert_eq!(ix.find(1, &key(1)), Some(a));
        assert_eq!(ix.find(2, &key(1)), None);
        ix.clear_host(a);
        ix.remove(a);
        assert_eq!(ix.find(1, &key(1)), None);
        assert!(ix.is_empty());
        assert!(Key::new(&[]).is_none() && Key::new(&[0; 33]).is_none());
    }

    #[test]
    fn parents_outlive_children() {
        let mut ix = Index::new();
        let a = put(&mut ix, 1, None);
        let b = put(&mut ix, 2, Some(a));
        let c = put(&mut ix, 3, Some(b));
        let x = put(&mut ix, 9, None);
        // Only leaves are victims, oldest first: c (older than x).
        assert_eq!(ix.lru_victim(0), Some(c));
        ix.clear_host(c);
        // b lost its last host child: it goes next, before x.
        assert_eq!(ix.lru_victim(0), Some(b));
        ix.clear_host(b);
        assert_eq!(ix.lru_victim(0), Some(a));
        ix.clear_host(a);
        assert_eq!(ix.lru_victim(0), Some(x));
    }

    #[test]
    fn pinned_and_used_blocks() {
        let mut ix = Index::new();
        let a = put(&mut ix, 1, None);
        let b = put(&mut ix, 2, None);
        ix.get_mut(a).pins += 1;
        ix.refresh(a, false);
        assert_eq!(ix.lru_victim(0), Some(b));
        ix.get_mut(a).pins -= 1;
        ix.refresh(a, true);
        assert_eq!(ix.lru_victim(0), Some(b));
        ix.refresh(b, true);
        assert_eq!(ix.lru_victim(0), Some(a));
    }

    #[test]
    fn reused_parent_id_is_not_a_parent() {
        let mut ix = Index::new();
        let a = put(&mut ix, 1, None);
        let b = ix.insert(1, key(2), State::Ready, Some(a));
        ix.clear_host(a);
        ix.remove(a);
        let z = ix.insert(1, key(77), State::Ready, None);
        assert_eq!(z, a, "slab reuses the id");
        assert_eq!(ix.parent_of(b), None);
    }

    #[test]
    fn memory_per_block_is_bounded() {
        let mut ix = Index::new();
        let n = 100_000u32;
        for i in 0..n {
            ix.insert(1, key(i), State::Ready, None);
        }
        let per = ix.memory_bytes() as f64 / n as f64;
        println!("index bytes per block: {per:.1}");
        assert!(per < 200.0, "{per}");
    }
}
