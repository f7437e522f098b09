//! The store: the block table and the drivers that carry out what it
//! decides — the host pool (block copies), the disk tier (reads and
//! write-behind on io_uring threads), and the journal (events and catalog,
//! on its own thread).
//!
//! Concurrency: one mutex guards the [`BlockTable`]. It is held for table
//! operations only (microseconds, no I/O, no protobuf, no RocksDB); what an
//! operation decided is carried out after the lock is released, except the
//! table's notices, which are handed to the journal under the lock so the
//! event stream and the catalog see changes in the order they happened.

mod disk;
mod journal;
#[cfg(feature = "remote")]
mod remote;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_proto::v1 as pb;
use parking_lot::{Condvar, Mutex, RwLock};
use prost::Message;
use tokio::sync::oneshot;

use crate::catalog::{
    BlockRecord, Catalog, NamespaceRecord, RegionRecord, SealedCatalog, TokenSeal,
};
use crate::config::Config;
use crate::disk::{DiskCodec, DiskConfig, DiskError, DiskLocation, DiskTier, RegionState};
use crate::error::{Error, ErrorKind, Result};
use crate::events::EventBus;
use crate::index::{DiskRef, Key};
use crate::metrics::{tier, Metrics, OpLabel, OpLabels, TierLabel};
use crate::pool::{slot_bytes, Pool};
use crate::table::{
    key_of, BlockTable, Committed, LoadJob, LoadOutcome, NewBlock, PoolSpec, StartWrite, Tier,
    WriteJob, WriteOutcome,
};
pub use crate::table::{Owner, Session, SlotGrant};
use crate::tenant::Tenants;
use disk::open_disk;
use journal::Journal;

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

#[derive(Default)]
struct Namespaces {
    by_name: HashMap<String, Arc<Namespace>>,
    by_id: HashMap<u32, Arc<Namespace>>,
}

/// The table and the readers waiting for its loads, under one lock so a
/// reader registers before the load it waits for can complete.
struct Core {
    table: BlockTable,
    waiters: HashMap<u32, Vec<oneshot::Sender<bool>>>,
}

/// In-flight write-behind, numbered so `sync` waits for exactly the writes
/// issued before it.
#[derive(Default)]
struct Inflight {
    next: u64,
    pending: BTreeSet<u64>,
}

/// What [`Store::sync`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub durable_blocks: u64,
    pub not_durable: u64,
    pub lost: u64,
    /// `(namespace, key)` of blocks not durable, when asked for.
    pub not_durable_blocks: Vec<(String, Vec<u8>)>,
}

/// At most this many blocks are listed by a sync.
const MAX_LISTED: usize = 10_000;

pub struct Store {
    /// This store, for completions that outlive a call.
    me: std::sync::Weak<Store>,
    cfg: Config,
    pool: Pool,
    tenants: Tenants,
    core: Mutex<Core>,
    namespaces: RwLock<Namespaces>,
    catalog: Arc<dyn Catalog>,
    disk: Option<DiskTier>,
    events: EventBus,
    metrics: Metrics,
    inflight: Mutex<Inflight>,
    inflight_done: Condvar,
    journal: Journal,
    /// The object-store tier (G4), when configured.
    #[cfg(feature = "remote")]
    remote: Option<crate::remote::tier::RemoteTier>,
}

impl Store {
    /// Opens the store: creates the host pool, recovers the catalog and the
    /// disk tier (warm restart), and starts the journal thread.
    pub fn open(cfg: Config, catalog: Arc<dyn Catalog>) -> Result<Arc<Store>> {
        let tenants = Tenants::load(&cfg.tenants)?;
        // The disk key seals the catalog's token ids too, whether or not
        // the disk tier is on: host-only blocks are in the catalog as well.
        let disk_codec = DiskCodec::from_config(&cfg)?;
        let token_seal = disk_codec
            .clone()
            .filter(|c| c.encrypts())
            .map(|c| c as Arc<dyn TokenSeal>);
        if let Some(c) = &disk_codec {
            tracing::info!(
                compression = ?cfg.disk_compression,
                key_id = c.key_id().as_deref().unwrap_or("none"),
                "G3 entries encoded at rest"
            );
        }
        if token_seal.is_some() && cfg.remote.as_ref().is_some_and(|r| r.key_file.is_none()) {
            tracing::warn!(
                "disk_key_file is set but remote_key_file is not: G4 blocks, and the \
                 catalog's copies of their segment footers (token ids included), stay in \
                 the clear (the same key file may serve both)"
            );
        }
        let catalog: Arc<dyn Catalog> = Arc::new(SealedCatalog::new(catalog, token_seal));
        // The shared pool, then one per tenant, each its own memfd.
        let lens: Vec<u64> = std::iter::once(cfg.host_bytes)
            .chain(tenants.iter().map(|t| t.host_bytes))
            .collect();
        let pool = Pool::with_segments(&lens)?;
        let quotas = std::iter::once(0).chain(tenants.iter().map(|t| t.disk_bytes));
        let specs: Vec<PoolSpec> = pool
            .segments()
            .into_iter()
            .zip(quotas)
            .map(|((start, len), disk_quota)| PoolSpec {
                start,
                len,
                disk_quota,
            })
            .collect();
        let mut table = BlockTable::with_pools(&specs, cfg.lease_ttl);

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
            table.add_namespace(ns.id, ns.block_bytes, tenants.pool_of_namespace(&ns.name));
            namespaces.by_id.insert(ns.id, ns.clone());
            namespaces.by_name.insert(ns.name.clone(), ns);
        }

        let region_records = catalog.regions()?;
        let disk = open_disk(&cfg, &pool, &region_records, disk_codec)?;

        // Blocks that were durable on disk come back; everything else in the
        // catalog was memory-only and is gone.
        let live: HashMap<u32, u64> = region_records
            .iter()
            .map(|r| (r.region, r.generation))
            .collect();
        let mut stale = Vec::new();
        let mut bad = Vec::new();
        let mut links: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut recovered = 0u64;
        catalog.scan_blocks(
            &mut |rec| {
                let found = match (rec.disk, Key::new(&rec.key)) {
                    (Some(d), Some(key))
                        if disk.is_some() && live.get(&d.region) == Some(&d.generation) =>
                    {
                        let at = DiskRef {
                            region: d.region,
                            generation: d.generation,
                            offset: d.offset,
                            len: d.len,
                        };
                        table.recover(rec.ns, key, at, rec.hits)
                    }
                    _ => None,
                };
                match found {
                    Some(id) => {
                        recovered += 1;
                        if !rec.parent.is_empty() {
                            links.push((id, rec.parent));
                        }
                    }
                    None => stale.push((rec.ns, rec.key)),
                }
            },
            &mut |raw| bad.push(raw),
        )?;
        catalog.delete_blocks(&stale)?;
        catalog.delete_raw_block_keys(&bad)?;
        for (id, parent) in links {
            table.recover_parent(id, &parent);
        }
        if !stale.is_empty() || !bad.is_empty() {
            tracing::info!(
                dropped = stale.len(),
                undecodable = bad.len(),
                "dropped catalog records of blocks that were not durable"
            );
        }
        tracing::info!(blocks = recovered, "recovered disk blocks");

        #[cfg(feature = "remote")]
        let hook = Arc::new(std::sync::OnceLock::new());
        #[cfg(feature = "remote")]
        let remote = cfg
            .remote
            .as_ref()
            .map(|r| remote::open_remote(r, catalog.clone(), hook.clone()))
            .transpose()?;
        #[cfg(not(feature = "remote"))]
        if cfg.remote.is_some() {
            return Err(Error::invalid(
                "remote-url given, but this kvbm was built without the object-store tier",
            ));
        }

        let store = Arc::new_cyclic(|me: &std::sync::Weak<Store>| Store {
            me: me.clone(),
            events: EventBus::new(cfg.event_ring),
            metrics: Metrics::new(),
            core: Mutex::new(Core {
                table,
                waiters: HashMap::new(),
            }),
            namespaces: RwLock::new(namespaces),
            journal: Journal::new(
                me.clone(),
                region_records.iter().map(|r| (r.region, r.generation)),
            ),
            catalog,
            disk,
            inflight: Mutex::new(Inflight::default()),
            inflight_done: Condvar::new(),
            pool,
            tenants,
            cfg,
            #[cfg(feature = "remote")]
            remote,
        });
        let m = &store.metrics;
        m.capacity_bytes
            .get_or_create(&tier(TierLabel::host))
            .set(store.pool.len() as i64);
        m.capacity_bytes
            .get_or_create(&tier(TierLabel::disk))
            .set(store.cfg.disk_bytes as i64);
        store.journal.start()?;
        #[cfg(feature = "remote")]
        if let Some(r) = &store.remote {
            let _ = hook.set(Arc::downgrade(&store));
            m.capacity_bytes
                .get_or_create(&tier(TierLabel::remote))
                .set(r.capacity() as i64);
            r.start();
        }
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

    pub fn tenants(&self) -> &Tenants {
        &self.tenants
    }

    /// Runs `f` on the table; its notices go to the journal before the lock
    /// is released, so they keep the order of the changes.
    fn with_table<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        let mut core = self.core.lock();
        let r = f(&mut core);
        let notices = core.table.take_notices();
        if !notices.is_empty() {
            self.journal.send(notices);
        }
        r
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
        let pool = self.tenants.pool_of_namespace(name);
        let pool_len = self.pool.segments()[pool as usize].1;
        let most = (pool_len / 2).min(self.cfg.max_block_bytes);
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
        self.core.lock().table.add_namespace(id, block_bytes, pool);
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

    /// Opens a session for `owner`, who mapped host pool `pool` (see
    /// [`crate::table::session`]).
    pub fn open_session(&self, owner: Owner, pool: u8) -> Session {
        self.with_table(|c| c.table.open_session(owner, Some(pool)))
    }

    /// Ends a session: its reservations are aborted, its leases released.
    pub fn close_session(&self, session: Session) {
        self.with_table(|c| c.table.close_session(session))
    }

    /// A session for one of the daemon's own copying calls, closed (its
    /// reservation or lease released) when dropped, even when the call's
    /// future is cancelled half-way.
    fn daemon_session(&self) -> DaemonSession<'_> {
        DaemonSession {
            store: self,
            session: self.with_table(|c| c.table.open_session(Owner::Daemon, None)),
        }
    }

    /// Drops expired leases and reservations.
    pub fn expire(&self) {
        let n = self.with_table(|c| c.table.expire(Instant::now()));
        if n > 0 {
            tracing::warn!(leases = n, "expired leases of unresponsive clients");
        }
    }

    // --- writing -----------------------------------------------------------

    /// Grants host slots for new blocks (see [`BlockTable::reserve`]).
    pub fn reserve(
        &self,
        session: Session,
        namespace: &str,
        blocks: Vec<pb::BlockMeta>,
    ) -> Result<Vec<SlotGrant>> {
        let ns = self.namespace(namespace)?;
        let blocks = blocks
            .into_iter()
            .map(|b| NewBlock {
                key: b.key,
                parent: b.parent,
                tokens: b.token_ids,
            })
            .collect();
        let now = Instant::now();
        self.with_table(|c| c.table.reserve(session, ns.id, blocks, now))
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
        let keys = parse_keys(keys)?;
        let committed = self.with_table(|c| c.table.commit(session, ns.id, &keys))?;
        let n = committed.len() as u32;
        #[cfg(feature = "remote")]
        if self.remote.as_ref().is_some_and(|r| r.admit() <= 1) {
            let offers = committed
                .iter()
                .map(|b| (b.key, Some((b.parent.clone(), b.tokens.clone()))))
                .collect();
            self.offer_remote(&ns, offers, 1);
        }
        for b in committed {
            let (id, key) = (b.id, b.key);
            self.write_behind(&ns, id, key, memory_record(&ns, b));
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
        let keys = parse_keys(keys)?;
        self.with_table(|c| c.table.abort(session, ns.id, &keys))
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
        let keys = parse_keys(keys)?;
        let found = self.core.lock().table.lookup(ns.id, &keys);
        // A lookup is a sighting: under the frequency policy, a block seen
        // again is now worth writing to disk.
        if self.cfg.disk_admit == crate::config::Admission::Frequency {
            for (id, key) in found.host_only {
                if let Ok(Some(rec)) = self.catalog.get_block(ns.id, key.as_bytes()) {
                    self.write_behind(&ns, id, key, rec);
                }
            }
        }
        let mut tiers = vec![
            pb::TierPrefix {
                tier: pb::Tier::Host as i32,
                blocks: found.host,
            },
            pb::TierPrefix {
                tier: pb::Tier::Disk as i32,
                blocks: found.disk,
            },
        ];
        let mut locations: Vec<i32> = found
            .locations
            .iter()
            .map(|&t| pb_tier(Some(t)) as i32)
            .collect();
        self.extend_lookup(&ns, &keys, &mut tiers, &mut locations);
        Ok(pb::LookupResponse {
            matched: locations.len() as u32,
            tiers,
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
    ) -> Result<(u64, Vec<SlotGrant>, u32)> {
        let ns = self.namespace(namespace)?;
        let keys = parse_keys(keys)?;
        #[cfg(feature = "remote")]
        self.promote_remote(&ns, &keys).await;
        let now = Instant::now();
        let (acquire, waits) = self.with_table(|c| {
            let a = c.table.acquire(session, ns.id, &keys, now)?;
            let mut waits = Vec::with_capacity(a.waits.len());
            for &(pos, id) in &a.waits {
                let (tx, rx) = oneshot::channel();
                c.waiters.entry(id).or_default().push(tx);
                waits.push((pos, rx));
            }
            Ok::<_, Error>((a, waits))
        })?;
        // Should this call be dropped while it waits, its session's close
        // (or the lease's expiry) releases what it pinned.
        for job in &acquire.loads {
            self.submit_load(job.clone());
        }
        let mut good = usize::MAX;
        for (pos, rx) in waits {
            if !rx.await.unwrap_or(false) {
                good = good.min(pos);
            }
        }
        let out =
            self.with_table(|c| c.table.finish_acquire(session, &acquire, keys.len(), good))?;
        // A read is a sighting: blocks seen often enough go to the bucket.
        #[cfg(feature = "remote")]
        if let Some(r) = &self.remote {
            let offers = keys[..out.1.len()].iter().map(|&k| (k, None)).collect();
            self.offer_remote(&ns, offers, r.admit());
        }
        Ok(out)
    }

    /// Ends a lease of `session`. Someone else's lease is as unknown as a
    /// lease that never existed.
    pub fn release(&self, session: Session, lease: u64) -> Result<()> {
        self.with_table(|c| c.table.release(session, lease))
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

    /// Reads one block as bytes, with the tier it came from.
    pub async fn get(&self, namespace: &str, key: &[u8]) -> Result<(Vec<u8>, pb::Tier)> {
        let ns = self.namespace(namespace)?;
        let k = key_of(key)?;
        let was = self.core.lock().table.lookup(ns.id, &[k]);
        let s = self.daemon_session();
        let (_, grants, _) = self.acquire(s.session, namespace, &[key.to_vec()]).await?;
        let Some(g) = grants.first() else {
            return Err(Error::not_found(format!("block {} not found", hex(key))));
        };
        // SAFETY: leased by this call's session until it is dropped.
        let data = unsafe { self.pool.slice(g.offset, g.length) }.to_vec();
        drop(s);
        let tier = if was.host == 1 {
            pb::Tier::Host
        } else if was.disk == 1 {
            pb::Tier::Disk
        } else {
            pb::Tier::Remote
        };
        Ok((data, tier))
    }

    /// Promotes the longest present prefix into host memory.
    pub async fn prefetch(&self, namespace: &str, keys: &[Vec<u8>]) -> Result<u32> {
        let s = self.daemon_session();
        let (_, grants, _) = self.acquire(s.session, namespace, keys).await?;
        Ok(grants.len() as u32)
    }

    // --- removal -----------------------------------------------------------

    /// Removes blocks from every tier. Pinned blocks are skipped.
    pub fn evict(&self, namespace: &str, keys: &[Vec<u8>]) -> Result<u32> {
        let ns = self.namespace(namespace)?;
        let keys = parse_keys(keys)?;
        Ok(self.with_table(|c| c.table.evict(ns.id, &keys)))
    }

    /// Empties a tier (or all tiers), of one namespace or all: pinned
    /// blocks stay.
    pub fn clear(&self, t: pb::Tier, namespace: Option<&str>) -> Result<u64> {
        let ns = namespace.map(|n| self.namespace(n)).transpose()?;
        let tier = match t {
            pb::Tier::Host => Some(Tier::Host),
            pb::Tier::Disk => Some(Tier::Disk),
            pb::Tier::Unspecified => None,
            // The bucket is shared with other nodes: not one daemon's to
            // empty.
            pb::Tier::Gpu | pb::Tier::Remote => {
                return Err(Error::invalid(
                    "only the host and disk tiers (or all local tiers) can be cleared",
                ))
            }
        };
        Ok(self.with_table(|c| c.table.clear(tier, ns.map(|n| n.id))))
    }

    // --- durability --------------------------------------------------------

    /// Waits until every write-behind issued before the call is applied,
    /// then makes the disk and the catalog durable, and reports what is not
    /// durable. With `retry_dropped`, dropped writes of blocks still in host
    /// memory are written again first, waiting for queue room (up to a
    /// minute). Blocking: call it from a blocking thread.
    pub fn sync(&self, retry_dropped: bool, list: bool) -> Result<SyncReport> {
        if retry_dropped {
            let until = Instant::now() + Duration::from_secs(60);
            let undurable = self.core.lock().table.undurable();
            for (id, ns, key) in undurable {
                let Ok(Some(record)) = self.catalog.get_block(ns, key.as_bytes()) else {
                    continue;
                };
                loop {
                    match self.with_table(|c| c.table.start_write(id, key, true)) {
                        StartWrite::Job(job) => break self.submit_write(job, record, Some(until)),
                        StartWrite::Busy if Instant::now() < until => {
                            std::thread::sleep(Duration::from_millis(1))
                        }
                        _ => break,
                    }
                }
            }
        }
        let mine = self.inflight.lock().next;
        {
            let mut inf = self.inflight.lock();
            while inf.pending.first().is_some_and(|&t| t <= mine) {
                self.inflight_done.wait(&mut inf);
            }
        }
        // Everything the journal received before is applied.
        self.journal.barrier(Duration::from_secs(60));
        if let Some(disk) = &self.disk {
            disk.sync()
                .map_err(|e| Error::new(ErrorKind::Io, format!("disk sync: {e}")))?;
        }
        self.journal.record_regions(self);
        self.catalog.sync()?;
        let (stats, undurable) = {
            let core = self.core.lock();
            (core.table.stats(), core.table.undurable())
        };
        let mut report = SyncReport {
            durable_blocks: stats.disk_blocks,
            not_durable: undurable.len() as u64,
            lost: stats.counters.lost_writes,
            not_durable_blocks: Vec::new(),
        };
        if list {
            for (_, ns, key) in undurable.into_iter().take(MAX_LISTED) {
                let name = self.namespace_by_id(ns).map(|n| n.name.clone());
                report
                    .not_durable_blocks
                    .push((name.unwrap_or_default(), key.as_bytes().to_vec()));
            }
        }
        Ok(report)
    }

    /// Clean stop: finishes in-flight writes, flushes the catalog, stops the
    /// journal thread.
    pub fn shutdown(&self) -> Result<()> {
        let r = self.sync(false, false);
        #[cfg(feature = "remote")]
        if let Some(remote) = &self.remote {
            remote.shutdown(Duration::from_secs(10));
        }
        self.journal.stop();
        // The disk tier's ring threads stop when the store is dropped.
        r.map(|_| ())
    }

    // --- introspection -----------------------------------------------------

    pub fn stats(&self) -> pb::StatsResponse {
        // The table lock is released before `stats_of` takes the namespace
        // lock: `register_namespace` takes them in the other order.
        let table = self.core.lock().table.stats();
        self.stats_of(table)
    }

    fn stats_of(&self, s: crate::table::TableStats) -> pb::StatsResponse {
        let c = s.counters;
        let host = pb::TierStats {
            tier: pb::Tier::Host as i32,
            capacity_bytes: self.pool.len(),
            used_bytes: self.pool.len() - s.host_free_bytes,
            blocks: s.host_blocks,
            hits: c.host_hits,
            misses: c.misses,
            evictions: c.host_evictions,
            ..Default::default()
        };
        let mut tiers = vec![host];
        if let Some(disk) = &self.disk {
            let ds = disk.stats();
            tiers.push(pb::TierStats {
                tier: pb::Tier::Disk as i32,
                capacity_bytes: ds.capacity,
                used_bytes: ds.used_bytes,
                blocks: s.disk_blocks,
                hits: c.disk_hits,
                misses: 0,
                evictions: c.disk_evictions,
                dropped_writes: c.dropped_writes,
                checksum_failures: c.checksum_failures,
                degraded: ds.degraded.is_some(),
                degraded_reason: ds.degraded.unwrap_or_default(),
                read_bytes_per_s: ds.read_bytes_per_s.unwrap_or(0.0) as u64,
                write_bytes_per_s: ds.write_bytes_per_s.unwrap_or(0.0) as u64,
            });
        }
        tiers.extend(self.remote_stats());
        pb::StatsResponse {
            incarnation: self.events.incarnation().to_string(),
            event_seq: self.events.seq(),
            namespaces: self.namespaces.read().by_id.len() as u32,
            tiers,
            index_blocks: s.index_blocks,
            index_bytes: s.index_bytes,
        }
    }

    /// Brings the metrics up to date (before a scrape): gauges and the
    /// table's counters.
    pub fn refresh_metrics(&self) {
        let table = self.core.lock().table.stats();
        let s = self.stats_of(table);
        let m = &self.metrics;
        for t in &s.tiers {
            let label = match pb::Tier::try_from(t.tier) {
                Ok(pb::Tier::Host) => TierLabel::host,
                Ok(pb::Tier::Remote) => TierLabel::remote,
                _ => TierLabel::disk,
            };
            m.bytes.get_or_create(&tier(label)).set(t.used_bytes as i64);
            m.blocks.get_or_create(&tier(label)).set(t.blocks as i64);
            m.degraded
                .get_or_create(&tier(label))
                .set(t.degraded as i64);
            if label == TierLabel::disk {
                let rate = |op| m.disk_throughput.get_or_create(&OpLabels { op });
                rate(OpLabel::read).set(t.read_bytes_per_s as i64);
                rate(OpLabel::write).set(t.write_bytes_per_s as i64);
            }
        }
        m.index_bytes.set(s.index_bytes as i64);
        let c = table.counters;
        let set = |counter: &prometheus_client::metrics::counter::Counter, v: u64| {
            counter
                .inner()
                .store(v, std::sync::atomic::Ordering::Relaxed);
        };
        set(&m.hits.get_or_create(&tier(TierLabel::host)), c.host_hits);
        set(&m.hits.get_or_create(&tier(TierLabel::disk)), c.disk_hits);
        set(&m.misses, c.misses);
        if let Some(r) = s.tiers.iter().find(|t| t.tier == pb::Tier::Remote as i32) {
            set(&m.hits.get_or_create(&tier(TierLabel::remote)), r.hits);
            set(
                &m.evictions.get_or_create(&tier(TierLabel::remote)),
                r.evictions,
            );
            set(&m.remote_dropped_uploads, r.dropped_writes);
        }
        set(
            &m.evictions.get_or_create(&tier(TierLabel::host)),
            c.host_evictions,
        );
        set(
            &m.evictions.get_or_create(&tier(TierLabel::disk)),
            c.disk_evictions,
        );
        set(&m.dropped_writes, c.dropped_writes);
        set(&m.lost_writes, c.lost_writes);
        set(&m.checksum_failures, c.checksum_failures);
    }

    /// Degraded tiers and why (for `/healthz`).
    pub fn degraded(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .disk
            .as_ref()
            .and_then(|d| d.stats().degraded)
            .map(|r| ("disk".to_string(), r))
            .into_iter()
            .collect();
        if let Some(t) = self.remote_stats().filter(|t| t.degraded) {
            out.push(("remote".to_string(), t.degraded_reason));
        }
        out
    }

    /// The present content as events (for a subscriber's snapshot): what
    /// each tier holds, with parents and tokens from the catalog.
    pub fn snapshot(&self) -> Vec<pb::event::Kind> {
        let blocks = self.core.lock().table.blocks();
        let mut out = vec![pb::event::Kind::Cleared(pb::TierCleared {
            tier: pb::Tier::Unspecified as i32,
        })];
        for (nsid, key, host, disk) in blocks {
            let Some(ns) = self.namespace_by_id(nsid) else {
                continue;
            };
            let rec = self.catalog.get_block(nsid, key.as_bytes()).ok().flatten();
            let (parent, tokens) = rec.map(|r| (r.parent, r.tokens)).unwrap_or_default();
            for (present, t) in [(host, pb::Tier::Host), (disk, pb::Tier::Disk)] {
                if present {
                    out.push(pb::event::Kind::Stored(pb::BlockStored {
                        tier: t as i32,
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
        #[cfg(feature = "remote")]
        if let Some(r) = &self.remote {
            for c in r.blocks() {
                out.extend(self.remote_events(c));
            }
        }
        out
    }
}

/// Without the object-store tier, nothing extends the local tiers.
#[cfg(not(feature = "remote"))]
impl Store {
    fn extend_lookup(
        &self,
        _: &Namespace,
        _: &[Key],
        _: &mut Vec<pb::TierPrefix>,
        _: &mut Vec<i32>,
    ) {
    }

    fn remote_stats(&self) -> Option<pb::TierStats> {
        None
    }
}

/// `Stored` events of `tier` for blocks of `ns` given in order as
/// `(key, parent, tokens)`: one event per run of chained blocks (each
/// block's parent the previous block's key).
pub(crate) fn chained_events(
    tier: pb::Tier,
    ns: &Namespace,
    blocks: impl IntoIterator<Item = (Vec<u8>, Vec<u8>, Vec<u32>)>,
) -> Vec<pb::BlockStored> {
    let mut out: Vec<pb::BlockStored> = Vec::new();
    for (key, parent, tokens) in blocks {
        match out.last_mut() {
            Some(e) if e.keys.last() == Some(&parent) => {
                e.keys.push(key);
                e.token_ids.extend_from_slice(&tokens);
            }
            _ => out.push(pb::BlockStored {
                tier: tier as i32,
                namespace: ns.name.clone(),
                model: ns.layout.model.clone(),
                keys: vec![key],
                parent,
                token_ids: tokens,
                tokens_per_block: ns.layout.tokens_per_block,
            }),
        }
    }
    out
}

/// The catalog record of a block just committed to host memory.
fn memory_record(ns: &Namespace, b: Committed) -> BlockRecord {
    BlockRecord {
        ns: ns.id,
        key: b.key.as_bytes().to_vec(),
        parent: b.parent,
        tokens: b.tokens,
        sealed_tokens: vec![],
        size: ns.block_bytes,
        checksum: 0,
        disk: None,
        hits: 0,
    }
}

fn parse_keys<K: AsRef<[u8]>>(keys: &[K]) -> Result<Vec<Key>> {
    keys.iter().map(|k| key_of(k.as_ref())).collect()
}

/// The wire's tier (`None`: every tier).
pub(crate) fn pb_tier(t: Option<Tier>) -> pb::Tier {
    match t {
        Some(Tier::Host) => pb::Tier::Host,
        Some(Tier::Disk) => pb::Tier::Disk,
        None => pb::Tier::Unspecified,
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
