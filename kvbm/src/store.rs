//! The block store: ties the host pool, the disk tier, the catalog and the
//! event stream together behind the operations the API serves.
//!
//! Concurrency: one mutex guards the index and the pool allocator. It is
//! held for index updates only (microseconds, never across I/O or a block
//! copy); block bytes are copied by the caller outside it, under a pin.
//! Disk I/O completes on the disk tier's ring threads, which hand results to
//! the catalog thread; that thread applies them to the index and writes the
//! catalog in batches, so no RPC handler ever waits on RocksDB's log.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_proto::v1::{self as pb, event};
use parking_lot::{Condvar, Mutex, RwLock};
use prost::Message;
use tokio::sync::oneshot;

use crate::catalog::{BlockRecord, Catalog, DiskLoc, NamespaceRecord, RegionRecord};
use crate::config::Config;
use crate::disk::{DiskConfig, DiskError, DiskLocation, DiskTier, RegionState};
use crate::error::{Error, ErrorKind, Result};
use crate::events::EventBus;
use crate::index::{same_generation, DiskRef, Index, Key, State};
use crate::metrics::{tier, Metrics, OpLabel, OpLabels, TierLabel};
use crate::pool::{slot_bytes, Extents, Pool};

/// Who owns a session. Only the owner may use it: a session's slots are
/// mapped memory its owner writes, and its leases keep blocks from eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The daemon's own copying paths (Put, Get, Prefetch), one session per
    /// call; never reachable from a request.
    Daemon,
    /// The process at the other end of a pool-socket connection, as the
    /// kernel reports it (`SO_PEERCRED`). A pid the daemon cannot see (a
    /// peer in another pid namespace) reads as 0; such a claim still needs
    /// the session's random id.
    Process { pid: u32, uid: u32 },
}

/// A claim to a session: its id and who is asking. Every operation on a
/// session checks the claim against the owner under the same lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub id: u64,
    pub owner: Owner,
}

/// See [`Store::daemon_session`].
struct DaemonSession<'a> {
    store: &'a Store,
    session: Session,
}

impl Drop for DaemonSession<'_> {
    fn drop(&mut self) {
        self.store.close_session(self.session);
    }
}

/// A registered namespace.
#[derive(Debug)]
pub struct Namespace {
    pub id: u32,
    pub name: String,
    pub block_bytes: u64,
    pub slot_bytes: u64,
    pub layout: pb::Layout,
}

impl Namespace {
    pub fn to_proto(&self) -> pb::Namespace {
        pb::Namespace {
            name: self.name.clone(),
            id: self.id,
            block_bytes: self.block_bytes,
            layout: Some(self.layout.clone()),
        }
    }
}

/// A granted host slot.
#[derive(Debug, Clone)]
pub struct SlotGrant {
    pub key: Vec<u8>,
    pub offset: u64,
    pub length: u64,
}

struct Lease {
    session: u64,
    ids: Vec<u32>,
    deadline: Instant,
}

struct Reservation {
    id: u32,
    parent: Vec<u8>,
    tokens: Vec<u32>,
    deadline: Instant,
}

#[derive(Default)]
struct Sessions {
    open: HashMap<u64, SessionState>,
}

struct SessionState {
    owner: Owner,
    reservations: HashMap<(u32, Key), Reservation>,
    leases: BTreeSet<u64>,
}

/// What the index mutex protects.
struct State_ {
    index: Index,
    extents: Extents,
    leases: HashMap<u64, Lease>,
    next_lease: u64,
    sessions: Sessions,
    /// Entries written to each disk region (may hold stale ids; checked
    /// against the entry's own location when used).
    regions: HashMap<u32, Vec<u32>>,
    /// Readers waiting for a block being loaded from disk.
    waiters: HashMap<u32, Vec<oneshot::Sender<bool>>>,
    host_blocks: u64,
    disk_blocks: u64,
}

/// In-flight write-behind, numbered so `sync` waits for exactly the writes
/// issued before it.
#[derive(Default)]
struct Inflight {
    next: u64,
    pending: BTreeSet<u64>,
}

enum CatalogOp {
    /// A block was committed to the host tier (memory-only record).
    Volatile(BlockRecord),
    /// A write-behind finished (or failed): apply it and record it durably.
    Written {
        ticket: u64,
        id: u32,
        key: Key,
        record: BlockRecord,
        result: std::result::Result<(DiskLocation, u64), DiskError>,
        started: Instant,
    },
    Delete(Vec<(u32, Vec<u8>)>),
    /// Reply once everything queued before is applied.
    Barrier(mpsc::Sender<()>),
}

pub struct Store {
    /// This store, for completions that outlive a call.
    me: std::sync::Weak<Store>,
    cfg: Config,
    pool: Pool,
    state: Mutex<State_>,
    namespaces: RwLock<Namespaces>,
    catalog: Arc<dyn Catalog>,
    disk: Option<DiskTier>,
    events: EventBus,
    metrics: Metrics,
    inflight: Mutex<Inflight>,
    inflight_done: Condvar,
    catalog_tx: Mutex<Option<mpsc::Sender<CatalogOp>>>,
    catalog_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    durable_blocks: AtomicU64,
}

#[derive(Default)]
struct Namespaces {
    by_name: HashMap<String, Arc<Namespace>>,
    by_id: HashMap<u32, Arc<Namespace>>,
}

fn key_of(b: &[u8]) -> Result<Key> {
    Key::new(b)
        .ok_or_else(|| Error::invalid(format!("block key must be 1 to 32 bytes, got {}", b.len())))
}

fn tier_num(t: pb::Tier) -> i32 {
    t as i32
}

impl Store {
    /// Opens the store: creates the data directory and the host pool,
    /// recovers the catalog and the disk tier (warm restart), and starts the
    /// catalog thread.
    pub fn open(cfg: Config, catalog: Arc<dyn Catalog>) -> Result<Arc<Store>> {
        let pool = Pool::create(cfg.host_bytes)?;
        let mut index = Index::new();
        let mut regions: HashMap<u32, Vec<u32>> = HashMap::new();

        let mut namespaces = Namespaces::default();
        for rec in catalog.namespaces()? {
            let layout = pb::Layout::decode(rec.layout.as_slice()).unwrap_or_default();
            let ns = Arc::new(Namespace {
                id: rec.id,
                slot_bytes: slot_bytes(rec.block_bytes),
                block_bytes: rec.block_bytes,
                name: rec.name,
                layout,
            });
            namespaces.by_id.insert(ns.id, ns.clone());
            namespaces.by_name.insert(ns.name.clone(), ns);
        }

        // Disk regions the catalog knows; the disk tier keeps them until
        // FIFO eviction reaches them.
        let region_records = catalog.regions()?;
        let live: HashMap<u32, u64> = region_records
            .iter()
            .map(|r| (r.region, r.generation))
            .collect();
        let disk = if cfg.disk_bytes > 0 {
            let mut dcfg = DiskConfig::new(cfg.disk_path.clone(), cfg.disk_bytes);
            dcfg.region_bytes = cfg.region_bytes;
            dcfg.queue_depth = cfg.disk_queue_depth;
            dcfg.write_queue = cfg.write_queue;
            dcfg.admit = match cfg.disk_admit {
                crate::config::Admission::Always => crate::disk::Admission::Always,
                crate::config::Admission::Frequency => crate::disk::Admission::Frequency,
            };
            let recovered = region_records.iter().map(|r| RegionState {
                region: r.region,
                generation: r.generation,
            });
            let tier = DiskTier::open(dcfg, recovered)
                .map_err(|e| Error::new(ErrorKind::Io, format!("disk tier: {e}")))?;
            // SAFETY: the pool mapping lives as long as the store, which
            // owns both; registered buffers let the rings skip page pinning.
            if let Err(e) =
                unsafe { tier.register_buffers(&[(pool.base() as *const u8, pool.len() as usize)]) }
            {
                tracing::warn!(error = %e, "cannot register the host pool with io_uring");
            }
            Some(tier)
        } else {
            None
        };

        // Blocks that were durable on disk come back; everything else in the
        // catalog was memory-only and is gone.
        let mut stale = Vec::new();
        let mut bad = Vec::new();
        let mut links: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut disk_blocks = 0;
        catalog.scan_blocks(
            &mut |rec| {
                let ok_ns = namespaces.by_id.contains_key(&rec.ns);
                let key = Key::new(&rec.key);
                match (rec.disk, key, disk.is_some() && ok_ns) {
                    (Some(d), Some(key), true)
                        if live.get(&d.region) == Some(&d.generation)
                            && index.find(rec.ns, &key).is_none() =>
                    {
                        let id = index.insert(rec.ns, key, State::Ready, None);
                        let e = index.get_mut(id);
                        e.set_disk(Some(DiskRef {
                            region: d.region,
                            generation: d.generation,
                            offset: d.offset,
                        }));
                        e.checksum = rec.checksum;
                        e.hits = rec.hits;
                        regions.entry(d.region).or_default().push(id);
                        disk_blocks += 1;
                        if !rec.parent.is_empty() {
                            links.push((id, rec.parent));
                        }
                    }
                    _ => stale.push((rec.ns, rec.key)),
                }
            },
            &mut |raw| bad.push(raw),
        )?;
        catalog.delete_blocks(&stale)?;
        catalog.delete_raw_block_keys(&bad)?;
        for (id, parent) in links {
            let ns = index.get(id).ns;
            if let Some(p) = Key::new(&parent).and_then(|k| index.find(ns, &k)) {
                index.relink(id, p);
            }
        }
        if !stale.is_empty() || !bad.is_empty() {
            tracing::info!(
                dropped = stale.len(),
                undecodable = bad.len(),
                "dropped catalog records of blocks that were not durable"
            );
        }
        tracing::info!(blocks = disk_blocks, "recovered disk blocks");

        let extents = Extents::new(pool.len());
        let (tx, rx) = mpsc::channel();
        let store = Arc::new_cyclic(|me| Store {
            me: me.clone(),
            events: EventBus::new(cfg.event_ring),
            metrics: Metrics::new(),
            state: Mutex::new(State_ {
                index,
                extents,
                leases: HashMap::new(),
                next_lease: 1,
                sessions: Sessions::default(),
                regions,
                waiters: HashMap::new(),
                host_blocks: 0,
                disk_blocks,
            }),
            namespaces: RwLock::new(namespaces),
            catalog,
            disk,
            inflight: Mutex::new(Inflight::default()),
            inflight_done: Condvar::new(),
            catalog_tx: Mutex::new(Some(tx)),
            catalog_thread: Mutex::new(None),
            durable_blocks: AtomicU64::new(disk_blocks),
            pool,
            cfg,
        });
        store
            .metrics
            .capacity_bytes
            .get_or_create(&tier(TierLabel::host))
            .set(store.pool.len() as i64);
        store
            .metrics
            .capacity_bytes
            .get_or_create(&tier(TierLabel::disk))
            .set(store.cfg.disk_bytes as i64);
        let weak = Arc::downgrade(&store);
        let handle = std::thread::Builder::new()
            .name("kvbm-catalog".into())
            .spawn(move || catalog_thread(weak, rx))
            .map_err(|e| Error::io("spawning the catalog thread", e))?;
        *store.catalog_thread.lock() = Some(handle);
        Ok(store)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn events(&self) -> &EventBus {
        &self.events
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn send(&self, op: CatalogOp) {
        if let Some(tx) = self.catalog_tx.lock().as_ref() {
            let _ = tx.send(op);
        }
    }

    // --- namespaces --------------------------------------------------------

    pub fn register_namespace(
        &self,
        name: &str,
        block_bytes: u64,
        layout: Option<pb::Layout>,
    ) -> Result<Arc<Namespace>> {
        if name.is_empty() || name.len() > 256 {
            return Err(Error::invalid("namespace name must be 1 to 256 bytes"));
        }
        let most = (self.pool.len() / 2).min(self.cfg.max_block_bytes);
        if block_bytes == 0 || block_bytes > most {
            return Err(Error::invalid(format!(
                "block_bytes must be between 1 and {most} (max_block_bytes, at most half \
                 the host pool), got {block_bytes}"
            )));
        }
        let layout = layout.unwrap_or_default();
        let mut nss = self.namespaces.write();
        if let Some(ns) = nss.by_name.get(name) {
            if ns.block_bytes != block_bytes || ns.layout != layout {
                return Err(Error::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "namespace {name:?} exists with block_bytes {} and another layout",
                        ns.block_bytes
                    ),
                ));
            }
            return Ok(ns.clone());
        }
        let id = nss.by_id.keys().max().map_or(1, |m| m + 1);
        self.catalog.put_namespace(&NamespaceRecord {
            id,
            name: name.to_string(),
            block_bytes,
            layout: layout.encode_to_vec(),
        })?;
        let ns = Arc::new(Namespace {
            id,
            name: name.to_string(),
            block_bytes,
            slot_bytes: slot_bytes(block_bytes),
            layout,
        });
        nss.by_id.insert(id, ns.clone());
        nss.by_name.insert(name.to_string(), ns.clone());
        Ok(ns)
    }

    pub fn namespace(&self, name: &str) -> Result<Arc<Namespace>> {
        self.namespaces
            .read()
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("unknown namespace {name:?}")))
    }

    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        let mut v: Vec<_> = self.namespaces.read().by_id.values().cloned().collect();
        v.sort_by_key(|n| n.id);
        v
    }

    fn namespace_by_id(&self, id: u32) -> Option<Arc<Namespace>> {
        self.namespaces.read().by_id.get(&id).cloned()
    }

    // --- sessions ----------------------------------------------------------

    /// Opens a session for `owner`. Ids are random, never 0 and never
    /// reused: one cannot be guessed from another, and a restarted daemon
    /// never hands out an id an old client still holds.
    pub fn open_session(&self, owner: Owner) -> Session {
        let mut st = self.state.lock();
        let id = loop {
            let id = rand::random::<u64>();
            if id != 0 && !st.sessions.open.contains_key(&id) {
                break id;
            }
        };
        st.sessions.open.insert(
            id,
            SessionState {
                owner,
                reservations: HashMap::new(),
                leases: BTreeSet::new(),
            },
        );
        Session { id, owner }
    }

    /// Ends a session: its reservations are aborted, its leases released.
    /// A claim that does not own the session ends nothing.
    pub fn close_session(&self, session: Session) {
        let mut st = self.state.lock();
        if Self::check_session(&st, session).is_err() {
            return;
        }
        if let Some(s) = st.sessions.open.remove(&session.id) {
            for ((_, _), r) in s.reservations {
                self.drop_reserved(&mut st, r.id);
            }
            for lease in s.leases {
                if let Some(l) = st.leases.remove(&lease) {
                    self.unpin_all(&mut st, &l.ids);
                }
            }
        }
    }

    /// A session the claim owns. An unknown id and someone else's id get
    /// the same answer, so the error tells an attacker nothing.
    fn check_session(st: &State_, session: Session) -> Result<()> {
        match st.sessions.open.get(&session.id) {
            Some(s) if s.owner == session.owner => Ok(()),
            _ => Err(Error::not_found(format!(
                "unknown session {}: attach the pool socket first (sessions \
                 belong to the process that opened them)",
                session.id
            ))),
        }
    }

    /// A session for one of the daemon's own copying calls, closed (its
    /// reservation or lease released) when dropped, even when the call's
    /// future is cancelled half-way.
    fn daemon_session(&self) -> DaemonSession<'_> {
        DaemonSession {
            store: self,
            session: self.open_session(Owner::Daemon),
        }
    }

    /// Drops expired leases and reservations (clients that hung or died
    /// without closing their pool connection).
    pub fn expire(&self) {
        let now = Instant::now();
        let mut st = self.state.lock();
        let expired: Vec<u64> = st
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in &expired {
            if let Some(l) = st.leases.remove(id) {
                if let Some(s) = st.sessions.open.get_mut(&l.session) {
                    s.leases.remove(id);
                }
                self.unpin_all(&mut st, &l.ids);
            }
        }
        let mut dead = Vec::new();
        for s in st.sessions.open.values_mut() {
            let keys: Vec<_> = s
                .reservations
                .iter()
                .filter(|(_, r)| r.deadline <= now)
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                if let Some(r) = s.reservations.remove(&k) {
                    dead.push(r.id);
                }
            }
        }
        for id in dead {
            self.drop_reserved(&mut st, id);
        }
        if !expired.is_empty() {
            tracing::warn!(
                leases = expired.len(),
                "expired leases of unresponsive clients"
            );
        }
    }

    // --- host slots --------------------------------------------------------

    /// Takes a slot of `size` bytes, evicting host blocks as needed.
    fn alloc_slot(&self, st: &mut State_, size: u64) -> Option<u64> {
        loop {
            if let Some(off) = st.extents.alloc(size) {
                return Some(off);
            }
            let victim = st.index.lru_victim()?;
            self.evict_host(st, victim);
        }
    }

    /// Drops the host copy of `id` (evictable, unpinned). A block with no
    /// disk copy leaves the index. Publishes the removal.
    fn evict_host(&self, st: &mut State_, id: u32) {
        let (ns, key) = (st.index.get(id).ns, st.index.get(id).key);
        self.drop_host_copy(st, id);
        self.metrics
            .evictions
            .get_or_create(&tier(TierLabel::host))
            .inc();
        let gone = st.index.get(id).disk().is_none() && !st.index.get(id).writing;
        if gone {
            st.index.remove(id);
            self.send(CatalogOp::Delete(vec![(ns, key.as_bytes().to_vec())]));
        }
        self.publish_removed(ns, pb::Tier::Host, vec![key.as_bytes().to_vec()]);
    }

    fn publish_removed(&self, ns: u32, t: pb::Tier, keys: Vec<Vec<u8>>) {
        let name = self
            .namespace_by_id(ns)
            .map(|n| n.name.clone())
            .unwrap_or_default();
        self.events
            .publish(vec![event::Kind::Removed(pb::BlockRemoved {
                tier: tier_num(t),
                namespace: name,
                keys,
            })]);
    }

    fn unpin(&self, st: &mut State_, id: u32) {
        let e = st.index.get_mut(id);
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
            st.index.remove(id);
            return;
        }
        st.index.refresh(id, false);
    }

    fn unpin_all(&self, st: &mut State_, ids: &[u32]) {
        for &id in ids {
            self.unpin(st, id);
        }
    }

    /// Frees a reserved (never committed) block.
    fn drop_reserved(&self, st: &mut State_, id: u32) {
        if st.index.get(id).state != State::Reserved {
            return;
        }
        self.drop_host_copy(st, id);
        st.index.remove(id);
    }

    /// Frees `id`'s host slot, if it has one. Ready blocks are counted in
    /// `host_blocks`; reserved ones are not counted yet.
    fn drop_host_copy(&self, st: &mut State_, id: u32) {
        let (ns, counted) = {
            let e = st.index.get(id);
            (e.ns, e.state == State::Ready)
        };
        if let Some(slot) = st.index.clear_host(id) {
            let size = self.namespace_by_id(ns).map_or(0, |n| n.slot_bytes);
            st.extents.release(slot, size);
            if counted {
                st.host_blocks -= 1;
            }
        }
    }

    // --- writing -----------------------------------------------------------

    /// Grants host slots for new blocks. A block already present (or being
    /// written) gets a zero-length slot. All or nothing: when the pool
    /// cannot hold them all (the rest is pinned), nothing is reserved.
    pub fn reserve(
        &self,
        session: Session,
        namespace: &str,
        blocks: Vec<pb::BlockMeta>,
    ) -> Result<Vec<SlotGrant>> {
        let ns = self.namespace(namespace)?;
        let mut keys = Vec::with_capacity(blocks.len());
        for b in &blocks {
            keys.push(key_of(&b.key)?);
            if b.parent.len() > 32 {
                return Err(Error::invalid("parent key longer than 32 bytes"));
            }
        }
        let deadline = Instant::now() + self.cfg.lease_ttl;
        let mut st = self.state.lock();
        Self::check_session(&st, session)?;
        let mut grants = Vec::with_capacity(blocks.len());
        let mut made: Vec<(Key, Reservation)> = Vec::new();
        for (b, key) in blocks.into_iter().zip(keys) {
            // A key repeated in this batch finds its own fresh reservation.
            if st.index.find(ns.id, &key).is_some() {
                grants.push(SlotGrant {
                    key: b.key,
                    offset: 0,
                    length: 0,
                });
                continue;
            }
            let Some(slot) = self.alloc_slot(&mut st, ns.slot_bytes) else {
                for (_, r) in made {
                    self.drop_reserved(&mut st, r.id);
                }
                return Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    "host pool full: every block is pinned by leases or reservations",
                ));
            };
            let parent = Key::new(&b.parent).and_then(|p| st.index.find(ns.id, &p));
            let id = st.index.insert(ns.id, key, State::Reserved, parent);
            st.index.set_host(id, slot);
            st.index.get_mut(id).pins = 1;
            grants.push(SlotGrant {
                key: b.key,
                offset: slot,
                length: ns.block_bytes,
            });
            made.push((
                key,
                Reservation {
                    id,
                    parent: b.parent,
                    tokens: b.token_ids,
                    deadline,
                },
            ));
        }
        if let Some(s) = st.sessions.open.get_mut(&session.id) {
            for (key, r) in made {
                s.reservations.insert((ns.id, key), r);
            }
        }
        Ok(grants)
    }

    /// Makes reserved blocks readable, publishes them and starts their
    /// write-behind. Keys not reserved by this session are ignored.
    pub fn commit<K: AsRef<[u8]>>(
        &self,
        session: Session,
        namespace: &str,
        keys: &[K],
    ) -> Result<u32> {
        let ns = self.namespace(namespace)?;
        let mut committed = Vec::new();
        {
            let mut st = self.state.lock();
            Self::check_session(&st, session)?;
            for k in keys {
                let key = key_of(k.as_ref())?;
                let Some(r) = st
                    .sessions
                    .open
                    .get_mut(&session.id)
                    .and_then(|s| s.reservations.remove(&(ns.id, key)))
                else {
                    continue;
                };
                let e = st.index.get_mut(r.id);
                if e.state != State::Reserved {
                    continue;
                }
                e.state = State::Ready;
                e.pins -= 1;
                st.host_blocks += 1;
                st.index.refresh(r.id, true);
                committed.push((r.id, key, r));
            }
        }
        if committed.is_empty() {
            return Ok(0);
        }
        let n = committed.len() as u32;
        self.publish_stored(&ns, pb::Tier::Host, &committed);
        for (id, key, r) in committed {
            let record = BlockRecord {
                ns: ns.id,
                key: key.as_bytes().to_vec(),
                parent: r.parent,
                tokens: r.tokens,
                size: ns.block_bytes,
                checksum: 0,
                disk: None,
                hits: 0,
            };
            self.send(CatalogOp::Volatile(record.clone()));
            self.write_behind(&ns, id, key, record);
        }
        Ok(n)
    }

    pub fn abort<K: AsRef<[u8]>>(
        &self,
        session: Session,
        namespace: &str,
        keys: &[K],
    ) -> Result<u32> {
        let ns = self.namespace(namespace)?;
        let mut st = self.state.lock();
        Self::check_session(&st, session)?;
        let mut n = 0;
        for k in keys {
            let key = key_of(k.as_ref())?;
            let r = st
                .sessions
                .open
                .get_mut(&session.id)
                .and_then(|s| s.reservations.remove(&(ns.id, key)));
            if let Some(r) = r {
                self.drop_reserved(&mut st, r.id);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Publishes `Stored` events, one per run of chained blocks.
    fn publish_stored(&self, ns: &Namespace, t: pb::Tier, blocks: &[(u32, Key, Reservation)]) {
        let mut events: Vec<pb::BlockStored> = Vec::new();
        for (_, key, r) in blocks {
            let chained = events
                .last()
                .and_then(|e| e.keys.last())
                .is_some_and(|last| *last == r.parent);
            match events.last_mut() {
                Some(e) if chained => {
                    e.keys.push(key.as_bytes().to_vec());
                    e.token_ids.extend_from_slice(&r.tokens);
                }
                _ => events.push(pb::BlockStored {
                    tier: tier_num(t),
                    namespace: ns.name.clone(),
                    model: ns.layout.model.clone(),
                    keys: vec![key.as_bytes().to_vec()],
                    parent: r.parent.clone(),
                    token_ids: r.tokens.clone(),
                    tokens_per_block: ns.layout.tokens_per_block,
                }),
            }
        }
        self.events
            .publish(events.into_iter().map(event::Kind::Stored).collect());
    }

    /// Queues the block's copy to disk when the disk tier admits it. Never
    /// blocks: a full queue or a degraded disk drops the write (counted).
    fn write_behind(&self, ns: &Namespace, id: u32, key: Key, record: BlockRecord) {
        let Some(disk) = &self.disk else { return };
        if !disk.admit(ns.id, key.as_bytes()) {
            return;
        }
        let (ptr, ticket) = {
            let mut st = self.state.lock();
            let e = st.index.get_mut(id);
            if e.state != State::Ready || e.key != key || !e.has_host() || e.has_disk() || e.writing
            {
                return;
            }
            e.pins += 1;
            e.writing = true;
            let off = e.host;
            st.index.refresh(id, false);
            let mut inf = self.inflight.lock();
            inf.next += 1;
            let ticket = inf.next;
            inf.pending.insert(ticket);
            // SAFETY: `off` is a live slot of the pool, pinned until the
            // write completes.
            (
                unsafe { self.pool.base().add(off as usize) } as usize,
                ticket,
            )
        };
        let tx = self.catalog_tx.lock().clone();
        let started = Instant::now();
        let nsid = ns.id;
        let done = Box::new(
            move |result: std::result::Result<(DiskLocation, u64), DiskError>| {
                if let Some(tx) = tx {
                    let _ = tx.send(CatalogOp::Written {
                        ticket,
                        id,
                        key,
                        record,
                        result,
                        started,
                    });
                }
            },
        );
        let len = ns.block_bytes as usize;
        // SAFETY: the slot stays pinned (and so neither evicted nor reused)
        // until the completion above has been applied.
        let submitted =
            unsafe { disk.submit_write(nsid, key.as_bytes(), ptr as *const u8, len, done) };
        if let Err(e) = submitted {
            // Not queued: the completion will never run, undo here.
            self.metrics.dropped_writes.inc();
            tracing::debug!(error = %e, "write-behind dropped");
            let mut st = self.state.lock();
            let en = st.index.get_mut(id);
            en.writing = false;
            self.unpin(&mut st, id);
            self.finish_ticket(ticket);
        }
    }

    fn finish_ticket(&self, ticket: u64) {
        let mut inf = self.inflight.lock();
        inf.pending.remove(&ticket);
        self.inflight_done.notify_all();
    }

    /// Applies a finished write-behind (catalog thread).
    fn apply_written(
        &self,
        id: u32,
        key: Key,
        mut record: BlockRecord,
        result: std::result::Result<(DiskLocation, u64), DiskError>,
        started: Instant,
        durable: &mut Vec<BlockRecord>,
    ) {
        self.metrics
            .disk_latency
            .get_or_create(&OpLabels { op: OpLabel::write })
            .observe(started.elapsed().as_secs_f64());
        let mut st = self.state.lock();
        let same = {
            let e = st.index.get(id);
            e.state == State::Ready && e.key == key && e.ns == record.ns
        };
        if !same {
            return;
        }
        st.index.get_mut(id).writing = false;
        match result {
            Ok((loc, checksum)) => {
                let e = st.index.get_mut(id);
                e.set_disk(Some(DiskRef {
                    region: loc.region,
                    generation: loc.generation,
                    offset: loc.offset,
                }));
                e.checksum = checksum;
                record.hits = e.hits;
                record.checksum = checksum;
                record.disk = Some(DiskLoc {
                    region: loc.region,
                    generation: loc.generation,
                    offset: loc.offset,
                    len: loc.len,
                });
                st.regions.entry(loc.region).or_default().push(id);
                st.disk_blocks += 1;
                self.unpin(&mut st, id);
                drop(st);
                durable.push(record.clone());
                if let Some(ns) = self.namespace_by_id(record.ns) {
                    self.events
                        .publish(vec![event::Kind::Stored(pb::BlockStored {
                            tier: tier_num(pb::Tier::Disk),
                            namespace: ns.name.clone(),
                            model: ns.layout.model.clone(),
                            keys: vec![record.key],
                            parent: record.parent,
                            token_ids: record.tokens,
                            tokens_per_block: ns.layout.tokens_per_block,
                        })]);
                }
            }
            Err(e) => {
                self.metrics.dropped_writes.inc();
                tracing::warn!(error = %e, "write-behind failed");
                self.unpin(&mut st, id);
            }
        }
    }

    /// Drops disk locations in regions the disk tier recycled.
    fn apply_evicted_regions(&self) {
        let Some(disk) = &self.disk else { return };
        let evicted = disk.take_evicted();
        if evicted.is_empty() {
            return;
        }
        let mut deletes = Vec::new();
        let mut removed: HashMap<u32, Vec<Vec<u8>>> = HashMap::new();
        let mut st = self.state.lock();
        for (region, generation) in evicted {
            let ids = st.regions.remove(&region).unwrap_or_default();
            for id in ids {
                let e = st.index.get_mut(id);
                if e.state == State::Free
                    || e.disk().is_none_or(|d| {
                        d.region != region || !same_generation(d.generation, generation)
                    })
                {
                    continue;
                }
                e.set_disk(None);
                let (ns, key) = (e.ns, e.key);
                st.disk_blocks -= 1;
                removed.entry(ns).or_default().push(key.as_bytes().to_vec());
                self.metrics
                    .evictions
                    .get_or_create(&tier(TierLabel::disk))
                    .inc();
                if !st.index.get(id).has_host() {
                    st.index.remove(id);
                    deletes.push((ns, key.as_bytes().to_vec()));
                }
            }
            if let Err(e) = self.catalog.delete_region(region) {
                tracing::warn!(error = %e, region, "cannot drop region record");
            }
        }
        drop(st);
        // Blocks still in host memory keep a (now volatile) record; the
        // catalog's disk location for them is stale and recovery ignores it
        // (the region generation no longer matches).
        if !deletes.is_empty() {
            if let Err(e) = self.catalog.delete_blocks(&deletes) {
                tracing::warn!(error = %e, "cannot delete evicted blocks from the catalog");
            }
        }
        for (ns, keys) in removed {
            self.publish_removed(ns, pb::Tier::Disk, keys);
        }
    }

    /// Records the regions the disk tier is using now, so a restart keeps
    /// them.
    fn record_regions(&self) {
        let Some(disk) = &self.disk else { return };
        for r in disk.live_regions() {
            let _ = self.catalog.put_region(RegionRecord {
                region: r.region,
                generation: r.generation,
            });
        }
    }

    // --- reading -----------------------------------------------------------

    /// Longest prefix of `keys` present: overall, per tier, and the fastest
    /// tier of each matched block.
    pub fn lookup<K: AsRef<[u8]>>(
        &self,
        namespace: &str,
        keys: &[K],
    ) -> Result<pb::LookupResponse> {
        let ns = self.namespace(namespace)?;
        let mut parsed = Vec::with_capacity(keys.len());
        for k in keys {
            parsed.push(key_of(k.as_ref())?);
        }
        let mut locations = Vec::new();
        let mut host_prefix = 0u32;
        let mut disk_prefix = 0u32;
        let (mut host_run, mut disk_run) = (true, true);
        let mut second_sightings = Vec::new();
        {
            let st = self.state.lock();
            for key in &parsed {
                let Some(id) = st.index.find(ns.id, key) else {
                    break;
                };
                let e = st.index.get(id);
                if e.state != State::Ready {
                    break;
                }
                let in_host = e.has_host() && !e.loading;
                let on_disk = e.has_disk();
                if !in_host && !on_disk {
                    break;
                }
                host_run &= in_host;
                disk_run &= on_disk;
                host_prefix += host_run as u32;
                disk_prefix += disk_run as u32;
                locations.push(if in_host {
                    pb::Tier::Host
                } else {
                    pb::Tier::Disk
                } as i32);
                if in_host && !on_disk && !e.writing {
                    second_sightings.push((id, *key));
                }
            }
        }
        // A lookup is a sighting: under the frequency policy, a block seen
        // again is now worth writing to disk.
        if self.cfg.disk_admit == crate::config::Admission::Frequency {
            for (id, key) in second_sightings {
                if let Ok(Some(rec)) = self.catalog.get_block(ns.id, key.as_bytes()) {
                    self.write_behind(&ns, id, key, rec);
                }
            }
        }
        Ok(pb::LookupResponse {
            matched: locations.len() as u32,
            tiers: vec![
                pb::TierPrefix {
                    tier: tier_num(pb::Tier::Host),
                    blocks: host_prefix,
                },
                pb::TierPrefix {
                    tier: tier_num(pb::Tier::Disk),
                    blocks: disk_prefix,
                },
            ],
            locations,
        })
    }

    /// Leases the longest present prefix of `keys` in host memory, loading
    /// disk blocks into the pool. A block that fails verification ends the
    /// prefix (and is dropped). Returns the lease id (0 if empty) and slots.
    pub async fn acquire(
        &self,
        session: Session,
        namespace: &str,
        keys: &[Vec<u8>],
    ) -> Result<(u64, Vec<SlotGrant>)> {
        let ns = self.namespace(namespace)?;
        let mut parsed = Vec::with_capacity(keys.len());
        for k in keys {
            parsed.push(key_of(k)?);
        }
        let mut pinned: Vec<u32> = Vec::new();
        let mut from_disk: Vec<bool> = Vec::new();
        let mut waits: Vec<(usize, oneshot::Receiver<bool>)> = Vec::new();
        {
            let mut st = self.state.lock();
            Self::check_session(&st, session)?;
            for key in &parsed {
                let Some(id) = st.index.find(ns.id, key) else {
                    break;
                };
                let e = st.index.get(id);
                if e.state != State::Ready {
                    break;
                }
                let loaded = e.loading || !e.has_host();
                if e.loading {
                    let (tx, rx) = oneshot::channel();
                    st.waiters.entry(id).or_default().push(tx);
                    waits.push((pinned.len(), rx));
                } else if !e.has_host() {
                    let Some(d) = e.disk() else { break };
                    match self.start_load(&mut st, &ns, id, d) {
                        Some(rx) => waits.push((pinned.len(), rx)),
                        None => break,
                    }
                }
                from_disk.push(loaded);
                let e = st.index.get_mut(id);
                e.pins += 1;
                e.hits = e.hits.saturating_add(1);
                st.index.refresh(id, true);
                pinned.push(id);
            }
        }
        // Wait for loads; the prefix ends at the first that failed.
        let mut good = pinned.len();
        for (pos, rx) in waits {
            let ok = rx.await.unwrap_or(false);
            if !ok && pos < good {
                good = pos;
            }
        }
        let mut st = self.state.lock();
        let mut host_hits = 0u64;
        let mut disk_hits = 0u64;
        for (i, &id) in pinned.iter().enumerate() {
            if i >= good || !st.index.get(id).has_host() {
                self.unpin(&mut st, id);
                good = good.min(i);
            }
        }
        pinned.truncate(good);
        let grants: Vec<SlotGrant> = pinned
            .iter()
            .zip(&from_disk)
            .map(|(&id, &loaded)| {
                let e = st.index.get(id);
                if loaded {
                    disk_hits += 1;
                } else {
                    host_hits += 1;
                }
                SlotGrant {
                    key: e.key.as_bytes().to_vec(),
                    offset: e.host,
                    length: ns.block_bytes,
                }
            })
            .collect();
        let misses = parsed.len() - grants.len();
        self.metrics
            .hits
            .get_or_create(&tier(TierLabel::host))
            .inc_by(host_hits);
        self.metrics
            .hits
            .get_or_create(&tier(TierLabel::disk))
            .inc_by(disk_hits);
        self.metrics.misses.inc_by(misses as u64);
        if pinned.is_empty() {
            return Ok((0, grants));
        }
        let lease = st.next_lease;
        st.next_lease += 1;
        st.leases.insert(
            lease,
            Lease {
                session: session.id,
                ids: pinned,
                deadline: Instant::now() + self.cfg.lease_ttl,
            },
        );
        if let Some(s) = st.sessions.open.get_mut(&session.id) {
            s.leases.insert(lease);
        }
        Ok((lease, grants))
    }

    /// Ends a lease of `session`. Someone else's lease is as unknown as a
    /// lease that never existed.
    pub fn release(&self, session: Session, lease: u64) -> Result<()> {
        let mut st = self.state.lock();
        let owned = Self::check_session(&st, session).is_ok()
            && st
                .leases
                .get(&lease)
                .is_some_and(|l| l.session == session.id);
        if !owned {
            return Err(Error::not_found(format!("unknown lease {lease}")));
        }
        if let Some(l) = st.leases.remove(&lease) {
            if let Some(s) = st.sessions.open.get_mut(&session.id) {
                s.leases.remove(&lease);
            }
            self.unpin_all(&mut st, &l.ids);
        }
        Ok(())
    }

    /// Starts reading block `id` from disk into a new host slot. `None` when
    /// no slot can be had.
    fn start_load(
        &self,
        st: &mut State_,
        ns: &Namespace,
        id: u32,
        d: DiskRef,
    ) -> Option<oneshot::Receiver<bool>> {
        let disk = self.disk.as_ref()?;
        // Pin first so the eviction below cannot pick this block's parent
        // chain apart under us.
        let slot = self.alloc_slot(st, ns.slot_bytes)?;
        st.index.set_host(id, slot);
        let e = st.index.get_mut(id);
        e.loading = true;
        e.pins += 1;
        let (ns_id, key) = (e.ns, e.key);
        st.index.refresh(id, false);
        st.host_blocks += 1;
        let (tx, rx) = oneshot::channel();
        st.waiters.entry(id).or_default().push(tx);
        let loc = DiskLocation {
            region: d.region,
            generation: d.generation,
            offset: d.offset,
            len: ns.block_bytes as u32,
        };
        // SAFETY: `slot` is a fresh pool slot of `slot_bytes`, pinned and
        // marked loading so nobody else touches it until the completion.
        let dst = unsafe { self.pool.base().add(slot as usize) } as usize;
        let store = self.self_ref();
        let started = Instant::now();
        let done = Box::new(move |res: std::result::Result<(), DiskError>| {
            if let Some(store) = store.upgrade() {
                store.finish_load(id, key, res, started);
            }
        });
        // SAFETY: see above; the slot is `slot_bytes >= block_bytes` long.
        let submitted = unsafe {
            disk.submit_read(
                loc,
                ns_id,
                key.as_bytes(),
                dst as *mut u8,
                ns.slot_bytes as usize,
                done,
            )
        };
        if let Err(e) = submitted {
            tracing::debug!(error = %e, "disk read not submitted");
            self.fail_load(st, id, false);
            return None;
        }
        Some(rx)
    }

    fn finish_load(
        &self,
        id: u32,
        key: Key,
        res: std::result::Result<(), DiskError>,
        started: Instant,
    ) {
        self.metrics
            .disk_latency
            .get_or_create(&OpLabels { op: OpLabel::read })
            .observe(started.elapsed().as_secs_f64());
        let mut st = self.state.lock();
        if st.index.get(id).key != key || !st.index.get(id).loading {
            return;
        }
        match res {
            Ok(()) => {
                st.index.get_mut(id).loading = false;
                self.unpin(&mut st, id);
                for w in st.waiters.remove(&id).unwrap_or_default() {
                    let _ = w.send(true);
                }
            }
            Err(e) => {
                let corrupt = matches!(
                    e,
                    DiskError::ChecksumMismatch | DiskError::BadHeader | DiskError::Stale
                );
                if corrupt {
                    self.metrics.checksum_failures.inc();
                    tracing::warn!(error = %e, key = ?key, "disk block failed verification; dropped");
                } else {
                    tracing::warn!(error = %e, key = ?key, "disk read failed");
                }
                self.fail_load(&mut st, id, corrupt);
            }
        }
    }

    /// Undoes a load: frees the slot, wakes waiters with failure. When the
    /// disk copy is corrupt (or gone), the block leaves the index.
    fn fail_load(&self, st: &mut State_, id: u32, corrupt: bool) {
        let ns = st.index.get(id).ns;
        {
            let e = st.index.get_mut(id);
            e.loading = false;
            e.pins = e.pins.saturating_sub(1);
        }
        self.drop_host_copy(st, id);
        for w in st.waiters.remove(&id).unwrap_or_default() {
            let _ = w.send(false);
        }
        if corrupt {
            let key = st.index.get(id).key;
            st.index.get_mut(id).set_disk(None);
            st.disk_blocks = st.disk_blocks.saturating_sub(1);
            if st.index.get(id).pins == 0 {
                st.index.remove(id);
            }
            self.send(CatalogOp::Delete(vec![(ns, key.as_bytes().to_vec())]));
            self.publish_removed(ns, pb::Tier::Disk, vec![key.as_bytes().to_vec()]);
        }
    }

    fn self_ref(&self) -> std::sync::Weak<Store> {
        self.me.clone()
    }

    // --- copying paths -----------------------------------------------------

    /// Stores one block from bytes. Returns false when already present.
    pub fn put(&self, namespace: &str, meta: pb::BlockMeta, data: &[u8]) -> Result<bool> {
        let ns = self.namespace(namespace)?;
        if data.len() as u64 != ns.block_bytes {
            return Err(Error::invalid(format!(
                "block of {} bytes in namespace {:?} of {}-byte blocks",
                data.len(),
                ns.name,
                ns.block_bytes
            )));
        }
        let key = meta.key.clone();
        let s = self.daemon_session();
        let grants = self.reserve(s.session, namespace, vec![meta])?;
        let Some(g) = grants.first().filter(|g| g.length > 0) else {
            return Ok(false);
        };
        // SAFETY: the slot is reserved by this call's own session until
        // commit; no other session can commit or abort it.
        unsafe { self.pool.slice_mut(g.offset, g.length) }.copy_from_slice(data);
        Ok(self.commit(s.session, namespace, &[key])? == 1)
    }

    /// Reads one block as bytes.
    pub async fn get(&self, namespace: &str, key: &[u8]) -> Result<(Vec<u8>, pb::Tier)> {
        let was_host = {
            let ns = self.namespace(namespace)?;
            let k = key_of(key)?;
            let st = self.state.lock();
            st.index
                .find(ns.id, &k)
                .is_some_and(|id| st.index.get(id).has_host())
        };
        let s = self.daemon_session();
        let (_, grants) = self.acquire(s.session, namespace, &[key.to_vec()]).await?;
        let Some(g) = grants.first() else {
            return Err(Error::not_found(format!("block {} not found", hex(key))));
        };
        // SAFETY: leased by this call's session until it is dropped.
        let data = unsafe { self.pool.slice(g.offset, g.length) }.to_vec();
        drop(s);
        Ok((
            data,
            if was_host {
                pb::Tier::Host
            } else {
                pb::Tier::Disk
            },
        ))
    }

    /// Promotes the longest present prefix into host memory.
    pub async fn prefetch(&self, namespace: &str, keys: &[Vec<u8>]) -> Result<u32> {
        let s = self.daemon_session();
        let (_, grants) = self.acquire(s.session, namespace, keys).await?;
        Ok(grants.len() as u32)
    }

    // --- removal -----------------------------------------------------------

    /// Removes blocks from every tier. Pinned blocks are skipped.
    pub fn evict(&self, namespace: &str, keys: &[Vec<u8>]) -> Result<u32> {
        let ns = self.namespace(namespace)?;
        let mut removed = Vec::new();
        {
            let mut st = self.state.lock();
            for k in keys {
                let key = key_of(k)?;
                let Some(id) = st.index.find(ns.id, &key) else {
                    continue;
                };
                if self.drop_block(&mut st, id) {
                    removed.push(key.as_bytes().to_vec());
                }
            }
        }
        let n = removed.len() as u32;
        if n > 0 {
            self.send(CatalogOp::Delete(
                removed.iter().map(|k| (ns.id, k.clone())).collect(),
            ));
            self.publish_removed(ns.id, pb::Tier::Unspecified, removed);
        }
        Ok(n)
    }

    /// Drops every copy of an unpinned, ready block. False if it is busy.
    fn drop_block(&self, st: &mut State_, id: u32) -> bool {
        let e = st.index.get(id);
        if e.state != State::Ready || e.pins > 0 || e.loading || e.writing {
            return false;
        }
        if e.has_disk() {
            st.disk_blocks -= 1;
        }
        self.drop_host_copy(st, id);
        st.index.remove(id);
        true
    }

    /// Empties a tier (or all tiers): pinned blocks stay.
    pub fn clear(&self, t: pb::Tier) -> Result<u64> {
        let mut removed = 0u64;
        let mut deletes = Vec::new();
        {
            let mut st = self.state.lock();
            for id in st.index.ids() {
                let e = st.index.get(id);
                if e.state != State::Ready || e.pins > 0 || e.loading || e.writing {
                    continue;
                }
                let (ns, key) = (e.ns, e.key);
                let has_disk = e.has_disk();
                let has_host = e.has_host();
                match t {
                    pb::Tier::Host if has_host => {
                        self.drop_host_copy(&mut st, id);
                        removed += 1;
                        if !has_disk {
                            st.index.remove(id);
                            deletes.push((ns, key.as_bytes().to_vec()));
                        }
                    }
                    pb::Tier::Disk if has_disk => {
                        st.index.get_mut(id).set_disk(None);
                        st.disk_blocks -= 1;
                        removed += 1;
                        if !has_host {
                            st.index.remove(id);
                        }
                        deletes.push((ns, key.as_bytes().to_vec()));
                    }
                    pb::Tier::Unspecified if self.drop_block(&mut st, id) => {
                        removed += 1;
                        deletes.push((ns, key.as_bytes().to_vec()));
                    }
                    _ => {}
                }
            }
        }
        if !deletes.is_empty() {
            self.send(CatalogOp::Delete(deletes));
        }
        self.events
            .publish(vec![event::Kind::Cleared(pb::TierCleared {
                tier: tier_num(t),
            })]);
        Ok(removed)
    }

    // --- durability --------------------------------------------------------

    /// Waits until every write-behind issued before the call is applied,
    /// then makes the disk and the catalog durable. Blocking: call it from a
    /// blocking thread. Returns the number of blocks durable on disk.
    pub fn sync(&self) -> Result<u64> {
        let mine = self.inflight.lock().next;
        {
            let mut inf = self.inflight.lock();
            while inf.pending.first().is_some_and(|&t| t <= mine) {
                self.inflight_done.wait(&mut inf);
            }
        }
        // Everything the catalog thread received before is applied.
        let (tx, rx) = mpsc::channel();
        self.send(CatalogOp::Barrier(tx));
        let _ = rx.recv_timeout(Duration::from_secs(60));
        if let Some(disk) = &self.disk {
            disk.sync()
                .map_err(|e| Error::new(ErrorKind::Io, format!("disk sync: {e}")))?;
        }
        self.record_regions();
        self.catalog.sync()?;
        Ok(self.state.lock().disk_blocks)
    }

    /// Clean stop: finishes in-flight writes, flushes the catalog, stops the
    /// catalog thread.
    pub fn shutdown(&self) -> Result<()> {
        let r = self.sync();
        drop(self.catalog_tx.lock().take());
        if let Some(h) = self.catalog_thread.lock().take() {
            let _ = h.join();
        }
        // The disk tier's ring threads stop when the store is dropped.
        r.map(|_| ())
    }

    // --- introspection -----------------------------------------------------

    pub fn stats(&self) -> pb::StatsResponse {
        let (host_blocks, disk_blocks, index_blocks, index_bytes, free) = {
            let st = self.state.lock();
            (
                st.host_blocks,
                st.disk_blocks,
                st.index.len() as u64,
                st.index.memory_bytes() as u64,
                st.extents.free_bytes(),
            )
        };
        let m = &self.metrics;
        let host = pb::TierStats {
            tier: tier_num(pb::Tier::Host),
            capacity_bytes: self.pool.len(),
            used_bytes: self.pool.len() - free,
            blocks: host_blocks,
            hits: m.hits.get_or_create(&tier(TierLabel::host)).get(),
            misses: m.misses.get(),
            evictions: m.evictions.get_or_create(&tier(TierLabel::host)).get(),
            ..Default::default()
        };
        let mut tiers = vec![host];
        if let Some(disk) = &self.disk {
            let ds = disk.stats();
            tiers.push(pb::TierStats {
                tier: tier_num(pb::Tier::Disk),
                capacity_bytes: ds.capacity,
                used_bytes: ds.used_bytes,
                blocks: disk_blocks,
                hits: m.hits.get_or_create(&tier(TierLabel::disk)).get(),
                misses: 0,
                evictions: m.evictions.get_or_create(&tier(TierLabel::disk)).get(),
                dropped_writes: m.dropped_writes.get() + ds.dropped_writes,
                checksum_failures: m.checksum_failures.get(),
                degraded: ds.degraded.is_some(),
                degraded_reason: ds.degraded.unwrap_or_default(),
            });
        }
        pb::StatsResponse {
            incarnation: self.events.incarnation().to_string(),
            event_seq: self.events.seq(),
            namespaces: self.namespaces.read().by_id.len() as u32,
            tiers,
            index_blocks,
            index_bytes,
        }
    }

    /// Brings the gauges up to date (before a scrape).
    pub fn refresh_metrics(&self) {
        let s = self.stats();
        let m = &self.metrics;
        for t in &s.tiers {
            let label = if t.tier == tier_num(pb::Tier::Host) {
                TierLabel::host
            } else {
                TierLabel::disk
            };
            m.bytes.get_or_create(&tier(label)).set(t.used_bytes as i64);
            m.blocks.get_or_create(&tier(label)).set(t.blocks as i64);
            m.degraded
                .get_or_create(&tier(label))
                .set(t.degraded as i64);
        }
        m.index_bytes.set(s.index_bytes as i64);
    }

    /// Degraded tiers and why (for `/healthz`).
    pub fn degraded(&self) -> Vec<(String, String)> {
        self.disk
            .as_ref()
            .and_then(|d| d.stats().degraded)
            .map(|r| vec![("disk".to_string(), r)])
            .unwrap_or_default()
    }

    /// The present content as events (for a subscriber's snapshot): what
    /// each tier holds, with parents and tokens from the catalog.
    pub fn snapshot(&self) -> Vec<event::Kind> {
        let blocks: Vec<(u32, Key, bool, bool)> = {
            let st = self.state.lock();
            st.index
                .ids()
                .into_iter()
                .map(|id| st.index.get(id))
                .filter(|e| e.state == State::Ready)
                .map(|e| (e.ns, e.key, e.has_host() && !e.loading, e.has_disk()))
                .collect()
        };
        let mut out = vec![event::Kind::Cleared(pb::TierCleared {
            tier: tier_num(pb::Tier::Unspecified),
        })];
        for (nsid, key, host, disk) in blocks {
            let Some(ns) = self.namespace_by_id(nsid) else {
                continue;
            };
            let rec = self.catalog.get_block(nsid, key.as_bytes()).ok().flatten();
            let (parent, tokens) = rec.map(|r| (r.parent, r.tokens)).unwrap_or_default();
            for (present, t) in [(host, pb::Tier::Host), (disk, pb::Tier::Disk)] {
                if present {
                    out.push(event::Kind::Stored(pb::BlockStored {
                        tier: tier_num(t),
                        namespace: ns.name.clone(),
                        model: ns.layout.model.clone(),
                        keys: vec![key.as_bytes().to_vec()],
                        parent: parent.clone(),
                        token_ids: tokens.clone(),
                        tokens_per_block: ns.layout.tokens_per_block,
                    }));
                }
            }
        }
        out
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Applies catalog operations in order, batching what arrives together.
fn catalog_thread(store: std::sync::Weak<Store>, rx: mpsc::Receiver<CatalogOp>) {
    while let Ok(first) = rx.recv() {
        let Some(store) = store.upgrade() else { return };
        let mut ops = vec![first];
        while ops.len() < 256 {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut volatile = Vec::new();
        let mut durable = Vec::new();
        let mut tickets = Vec::new();
        let mut barriers = Vec::new();
        for op in ops {
            match op {
                CatalogOp::Volatile(r) => volatile.push(r),
                CatalogOp::Written {
                    ticket,
                    id,
                    key,
                    record,
                    result,
                    started,
                } => {
                    store.apply_written(id, key, record, result, started, &mut durable);
                    tickets.push(ticket);
                }
                CatalogOp::Delete(keys) => {
                    // Flush pending puts first so a delete is never undone.
                    flush(&store, &mut volatile, &mut durable);
                    if let Err(e) = store.catalog.delete_blocks(&keys) {
                        tracing::error!(error = %e, "catalog delete failed");
                    }
                }
                CatalogOp::Barrier(tx) => barriers.push(tx),
            }
        }
        flush(&store, &mut volatile, &mut durable);
        store.apply_evicted_regions();
        for t in tickets {
            store.finish_ticket(t);
        }
        for b in barriers {
            let _ = b.send(());
        }
    }
}

fn flush(store: &Store, volatile: &mut Vec<BlockRecord>, durable: &mut Vec<BlockRecord>) {
    if !volatile.is_empty() {
        if let Err(e) = store.catalog.put_blocks(volatile, false) {
            tracing::error!(error = %e, "catalog write failed");
        }
        volatile.clear();
    }
    if !durable.is_empty() {
        store.record_regions();
        match store.catalog.put_blocks(durable, true) {
            Ok(()) => {
                store
                    .durable_blocks
                    .fetch_add(durable.len() as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "catalog write failed"),
        }
        durable.clear();
    }
}
