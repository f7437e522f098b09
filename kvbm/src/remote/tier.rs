//! The G4 tier driver: what this node knows of the bucket, and the tasks
//! that move blocks to and from it.
//!
//! - The *catalog* of the tier is in memory ([`RemoteTier::locate`] never
//!   touches the network) and in the RocksDB catalog (one record per
//!   segment, so a restart is warm and then catches up by listing).
//! - Uploads are write-behind: [`RemoteTier::offer`] queues a copy of a
//!   block and returns; a full queue drops the block (counted). A writer
//!   task packs queued blocks, in the order offered, into segments of
//!   `segment_bytes` (or what waited `linger`), encodes each block (the
//!   [`Codec`]: compression, encryption; on the blocking pool, as it costs
//!   CPU) and publishes them.
//! - A discovery task lists other nodes' index objects every `poll` and
//!   adds their segments.
//! - An encrypted block's token ids are sealed in its footer entry. They
//!   are opened (the [`Codec`]) before the block enters the catalog, this
//!   node's own blocks included; a block whose token ids do not open
//!   (another key, no key here, tampered) is never listed, and another
//!   node's segment with no block listed is refused.
//! - Reads ([`RemoteTier::plan`], [`RemoteTier::read`]) take a chain in one
//!   ranged GET per run of adjacent blocks of a segment, up to `READS` in
//!   flight, all under one deadline, and stream each block's bytes to the
//!   caller as they arrive, then whether the block verified: its stored
//!   bytes checked against their checksum, then decoded. A segment that is
//!   gone or damaged (404, a block failing its checksum, its authentication
//!   or its decompression) leaves the catalog; so does one this node can
//!   never read (encrypted under another key, or not encrypted where this
//!   node has a key; not counted as damage). A
//!   slow or failing server (timeout, 5xx, open breaker) is a miss that
//!   keeps the entries, since the data is likely fine and dropping it would
//!   forget other nodes' segments for good.
//! - Capacity: this node's own segments past `bytes` are deleted, oldest
//!   first; other nodes' segments are never deleted here.
//!
//! The network runs on the tier's own runtime, so callers on any runtime
//! (or none) can use it, and it is stopped with the tier.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, Semaphore};

use super::bucket::{Bucket, Miss};
use super::codec::{Codec, Refused};
use super::discovery::Discovery;
use super::segment::{Announcement, Builder, Footer, Origin, CODEC_ENCRYPTED, CODEC_RAW};
use crate::catalog::Catalog;
use crate::config::RemoteConfig;
use crate::error::{Error, Result};
use crate::index::{BlockId, BlockMap, Key};

pub use super::bucket::{READS, UPLOADS};
/// How far back each listing reaches behind the newest index object seen:
/// covers clocks that disagree and a segment upload that outlasts the
/// next poll.
const SKEW: Duration = Duration::from_secs(30);
/// A segment of this node that nothing lists is an orphan once this old.
const ORPHAN_AGE: Duration = Duration::from_secs(600);
/// Blocks the catalog of the tier holds at most; segments past that are
/// refused (a bucket filled by a hostile node bounds nothing else).
const MAX_BLOCKS: usize = 8 << 20;
/// Catalog record keys: segments, and the node id.
const SEGMENT_KEY: &[u8] = b"s/";
const NODE_KEY: &[u8] = b"node";

/// A block to upload, copied out of the host pool.
#[derive(Debug, Clone)]
pub struct Upload {
    pub namespace: String,
    pub key: Key,
    pub parent: Vec<u8>,
    pub tokens: Vec<u32>,
    pub data: Bytes,
}

/// A chain the catalog lists in the bucket, planned for reading
/// ([`RemoteTier::plan`]); empty when the first key is not listed.
#[derive(Debug, Default)]
pub struct Plan {
    /// The listed blocks, in chain order.
    pub blocks: Vec<Planned>,
    parts: Vec<Part>,
    block_bytes: u64,
}

/// A block of a [`Plan`].
#[derive(Debug, Clone)]
pub struct Planned {
    pub key: Key,
    pub parent: Vec<u8>,
    pub tokens: Vec<u32>,
}

/// What a read of a [`Plan`] delivers ([`RemoteTier::read`]); blocks are
/// numbered by their place in the plan.
#[derive(Debug)]
pub enum Piece {
    /// Bytes of block `block`'s content from byte `at` on, not verified
    /// yet.
    Data {
        block: usize,
        at: usize,
        bytes: Bytes,
    },
    /// All of block `block` arrived, passed its checksum and decoded to the
    /// block size: what the `Data` pieces of this block said is its
    /// content.
    Verified(usize),
}

/// What changed in the tier, for the event stream: blocks of `namespace`
/// became readable from the bucket, or stopped being.
#[derive(Debug, Clone)]
pub enum Change {
    Stored {
        namespace: String,
        /// `(key, parent, tokens)`, in segment order.
        blocks: Vec<(Vec<u8>, Vec<u8>, Vec<u32>)>,
    },
    Removed {
        namespace: String,
        keys: Vec<Vec<u8>>,
    },
}

/// The tier's figures, for stats and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct RemoteStats {
    /// Blocks readable from the bucket (every node's).
    pub blocks: u64,
    /// Segments known, and this node's share of them.
    pub segments: u64,
    pub own_segments: u64,
    pub own_bytes: u64,
    /// Blocks read from the bucket, and reads that came back short.
    pub hits: u64,
    pub misses: u64,
    pub uploaded_blocks: u64,
    /// Blocks offered that never reached the bucket (full queue, failed
    /// upload).
    pub dropped_uploads: u64,
    pub evicted_segments: u64,
    pub checksum_failures: u64,
    /// Index objects of other nodes that could not be read or decoded, or
    /// whose segments hold no block usable here (token ids that do not
    /// open under this node's key).
    pub refused_index: u64,
    /// The breaker is open: the bucket is not used until a probe succeeds.
    pub degraded: bool,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    uploaded: AtomicU64,
    dropped: AtomicU64,
    evicted: AtomicU64,
    checksum: AtomicU64,
    refused: AtomicU64,
}

/// A segment the tier knows.
struct Segment {
    name: String,
    origin: Origin,
    len: u64,
    footer: Arc<Footer>,
    /// Written by this node (its capacity counts it; eviction may delete it).
    own: bool,
    /// Catalog namespace ids of the footer's namespaces.
    ns: Vec<u32>,
}

/// The in-memory catalog of the tier.
#[derive(Default)]
struct Index {
    /// Namespace name → id (ids are this catalog's own, not the store's).
    namespaces: HashMap<String, u32>,
    segments: HashMap<u64, Segment>,
    by_name: HashMap<String, u64>,
    /// `(namespace, key)` → `(segment, index in its footer)`.
    blocks: BlockMap<(u64, u32)>,
    /// This node's segments, oldest first, and their bytes.
    own: VecDeque<u64>,
    own_bytes: u64,
    next: u64,
}

impl Index {
    fn namespace(&self, name: &str) -> Option<u32> {
        self.namespaces.get(name).copied()
    }

    fn intern(&mut self, name: &str) -> u32 {
        let next = self.namespaces.len() as u32;
        *self.namespaces.entry(name.to_owned()).or_insert(next)
    }

    /// Adds a segment's usable blocks; `None` when it is known already,
    /// would overfill the catalog, or is another node's and has no usable
    /// block. A key already held by another segment keeps it.
    fn add(&mut self, name: String, o: Opened, own: bool) -> Option<Vec<Change>> {
        let Opened {
            announcement: a,
            usable,
        } = o;
        let n = usable.iter().filter(|&&u| u).count();
        if self.by_name.contains_key(&name)
            || self.blocks.len() + n > MAX_BLOCKS
            || (!own && n == 0 && !a.footer.blocks.is_empty())
        {
            return None;
        }
        let id = self.next;
        self.next += 1;
        let ns: Vec<u32> = a.footer.namespaces.iter().map(|n| self.intern(n)).collect();
        let mut changes: Vec<Change> = Vec::new();
        for (i, b) in a.footer.blocks.iter().enumerate() {
            let Some(key) = Key::new(&b.key).filter(|_| usable[i]) else {
                continue;
            };
            let nsid = ns[usize::from(b.namespace)];
            if self.blocks.contains_key(&BlockId(nsid, key)) {
                continue;
            }
            self.blocks.insert(BlockId(nsid, key), (id, i as u32));
            let namespace = &a.footer.namespaces[usize::from(b.namespace)];
            let entry = (b.key.clone(), b.parent.clone(), b.tokens.clone());
            match changes.last_mut() {
                Some(Change::Stored {
                    namespace: n,
                    blocks,
                }) if n == namespace => blocks.push(entry),
                _ => changes.push(Change::Stored {
                    namespace: namespace.clone(),
                    blocks: vec![entry],
                }),
            }
        }
        if own {
            self.own.push_back(id);
            self.own_bytes += a.len;
        }
        self.by_name.insert(name.clone(), id);
        self.segments.insert(
            id,
            Segment {
                name,
                origin: a.origin,
                len: a.len,
                footer: Arc::new(a.footer),
                own,
                ns,
            },
        );
        Some(changes)
    }

    /// Forgets a segment and the entries that point to it.
    fn remove(&mut self, id: u64) -> Option<(Segment, Vec<Change>)> {
        let seg = self.segments.remove(&id)?;
        self.by_name.remove(&seg.name);
        if seg.own {
            self.own.retain(|&s| s != id);
            self.own_bytes -= seg.len;
        }
        let mut changes: Vec<Change> = Vec::new();
        for b in &seg.footer.blocks {
            let Some(key) = Key::new(&b.key) else {
                continue;
            };
            let nsid = seg.ns[usize::from(b.namespace)];
            if self
                .blocks
                .get(&BlockId(nsid, key))
                .is_some_and(|&(s, _)| s == id)
            {
                self.blocks.remove(&BlockId(nsid, key));
                let namespace = &seg.footer.namespaces[usize::from(b.namespace)];
                match changes.last_mut() {
                    Some(Change::Removed { namespace: n, keys }) if n == namespace => {
                        keys.push(b.key.clone())
                    }
                    _ => changes.push(Change::Removed {
                        namespace: namespace.clone(),
                        keys: vec![b.key.clone()],
                    }),
                }
            }
        }
        Some((seg, changes))
    }
}

/// An announcement whose encrypted blocks' token ids were opened: which
/// blocks this node can use (their tokens known).
struct Opened {
    announcement: Announcement,
    /// Per block of the footer.
    usable: Vec<bool>,
}

impl Opened {
    /// Opens the sealed token ids of `a`'s encrypted blocks into their
    /// `tokens`; a block whose token ids do not open is not usable.
    fn new(codec: &Codec, mut a: Announcement) -> Opened {
        let f = &mut a.footer;
        let usable = f
            .blocks
            .iter_mut()
            .map(|b| {
                if b.codec & CODEC_ENCRYPTED == 0 {
                    return true;
                }
                let ns = &f.namespaces[usize::from(b.namespace)];
                match codec.open_tokens(ns, &b.key, &b.parent, &b.sealed_tokens) {
                    Ok(tokens) => {
                        b.tokens = tokens;
                        true
                    }
                    Err(_) => false,
                }
            })
            .collect();
        Opened {
            announcement: a,
            usable,
        }
    }

    /// Blocks not usable here.
    fn refused(&self) -> usize {
        self.usable.iter().filter(|&&u| !u).count()
    }
}

/// What the tasks share.
struct Shared {
    cfg: RemoteConfig,
    node: u64,
    bucket: Bucket,
    /// How blocks are stored at rest (compression, encryption).
    codec: Codec,
    catalog: Arc<dyn Catalog>,
    index: RwLock<Index>,
    /// Blocks offered and not yet uploaded (or dropped): not offered twice.
    pending: Mutex<HashSet<(String, Key)>>,
    queued_bytes: AtomicU64,
    next_seq: AtomicU64,
    counters: Counters,
    on_change: Box<dyn Fn(Vec<Change>) + Send + Sync>,
    stopping: AtomicBool,
}

/// See the module documentation.
pub struct RemoteTier {
    shared: Arc<Shared>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    tx: Mutex<Option<mpsc::UnboundedSender<Upload>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn segment_key(name: &str) -> Vec<u8> {
    [SEGMENT_KEY, name.as_bytes()].concat()
}

impl RemoteTier {
    /// Opens the tier: the client (nothing sent yet), the node id and the
    /// segments from the catalog. [`RemoteTier::start`] starts the tasks.
    /// `on_change` receives what became readable or went away.
    pub fn open(
        cfg: RemoteConfig,
        catalog: Arc<dyn Catalog>,
        on_change: Box<dyn Fn(Vec<Change>) + Send + Sync>,
    ) -> Result<RemoteTier> {
        let bucket =
            Bucket::open(cfg.clone()).map_err(|e| Error::invalid(format!("remote tier: {e}")))?;
        let codec = Codec::from_config(&cfg)?;
        let mut node = None;
        let mut index = Index::default();
        let mut undecodable = Vec::new();
        catalog.scan_remote(&mut |k, v| {
            if k == NODE_KEY {
                node = v.try_into().ok().map(u64::from_le_bytes);
                return;
            }
            let (Some(name), Some((&own, body))) = (k.strip_prefix(SEGMENT_KEY), v.split_first())
            else {
                return undecodable.push(k.to_vec());
            };
            match (std::str::from_utf8(name), Announcement::decode(body)) {
                (Ok(name), Ok(a)) => {
                    // Another node's segment none of whose blocks is
                    // usable (the key changed) is forgotten.
                    if index
                        .add(name.to_owned(), Opened::new(&codec, a), own == 1)
                        .is_none()
                    {
                        undecodable.push(k.to_vec());
                    }
                }
                _ => undecodable.push(k.to_vec()),
            }
        })?;
        for k in undecodable {
            catalog.delete_remote(&k)?;
        }
        // The node id is this data directory's for good: what it wrote
        // before a restart is still its own (capacity, cleanup).
        let node = match node {
            Some(n) => n,
            None => {
                let n = rand::random::<u64>() | 1;
                catalog.put_remote(NODE_KEY, &n.to_le_bytes())?;
                n
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvbm-g4")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the remote tier's runtime", e))?;
        let handle = runtime.handle().clone();
        tracing::info!(
            url = %cfg.url,
            node = format!("{node:016x}"),
            segments = index.segments.len(),
            blocks = index.blocks.len(),
            compression = ?cfg.compression,
            key_id = codec.key_id().as_deref().unwrap_or("none"),
            "remote tier (G4) open"
        );
        Ok(RemoteTier {
            shared: Arc::new(Shared {
                // Sequence numbers start at the clock (microseconds), so a
                // restart never reuses one (a name is written once).
                next_seq: AtomicU64::new(now_ms() * 1000),
                cfg,
                node,
                bucket,
                codec,
                catalog,
                index: RwLock::new(index),
                pending: Mutex::new(HashSet::new()),
                queued_bytes: AtomicU64::new(0),
                counters: Counters::default(),
                on_change,
                stopping: AtomicBool::new(false),
            }),
            runtime: Mutex::new(Some(runtime)),
            handle,
            tx: Mutex::new(None),
            writer: Mutex::new(None),
        })
    }

    /// Starts the writer and discovery tasks.
    pub fn start(&self) {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.tx.lock() = Some(tx);
        let shared = self.shared.clone();
        *self.writer.lock() = Some(self.handle.spawn(write_loop(shared, rx)));
        let since = {
            let index = self.shared.index.read();
            index
                .segments
                .values()
                .map(|s| s.origin.created_ms)
                .max()
                .unwrap_or(0)
        };
        self.handle.spawn(discover_loop(
            self.shared.clone(),
            Discovery::new(since, SKEW),
        ));
        let shared = self.shared.clone();
        // Segments over capacity at start (a smaller `bytes` than before).
        self.handle.spawn(async move { enforce_capacity(&shared) });
        self.handle.spawn(sweep_loop(self.shared.clone()));
    }

    /// The node id segment names carry.
    pub fn node(&self) -> u64 {
        self.shared.node
    }

    /// The admission threshold (sightings).
    pub fn admit(&self) -> u32 {
        self.shared.cfg.admit
    }

    /// Length of the prefix of `keys` readable from the bucket. Never
    /// touches the network.
    pub fn locate(&self, namespace: &str, keys: &[Key]) -> usize {
        let index = self.shared.index.read();
        let Some(ns) = index.namespace(namespace) else {
            return 0;
        };
        keys.iter()
            .take_while(|k| index.blocks.contains_key(&BlockId(ns, **k)))
            .count()
    }

    /// Which of `keys` are worth offering: neither in the bucket nor
    /// queued. Each lock is taken once for the whole batch (an acquire asks
    /// for every block it leased).
    pub fn wanted(&self, namespace: &str, keys: &[Key]) -> Vec<bool> {
        let Some(&first) = keys.first() else {
            return Vec::new();
        };
        let index = self.shared.index.read();
        let ns = index.namespace(namespace);
        let pending = self.shared.pending.lock();
        let mut probe = (namespace.to_owned(), first);
        keys.iter()
            .map(|k| {
                probe.1 = *k;
                !ns.is_some_and(|ns| index.blocks.contains_key(&BlockId(ns, *k)))
                    && !pending.contains(&probe)
            })
            .collect()
    }

    /// Queues a block for upload. Never blocks: past `queue_bytes` waiting,
    /// the block is dropped and counted. Returns whether it was queued.
    pub fn offer(&self, up: Upload) -> bool {
        let s = &self.shared;
        let len = up.data.len() as u64;
        let queued = s.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        let tx = self.tx.lock();
        let fits = queued <= s.cfg.queue_bytes && !s.stopping.load(Ordering::Relaxed);
        let Some(tx) = tx.as_ref().filter(|_| fits) else {
            s.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            s.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        if !s.pending.lock().insert((up.namespace.clone(), up.key)) {
            s.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        let key = (up.namespace.clone(), up.key);
        if tx.send(up).is_err() {
            s.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            s.pending.lock().remove(&key);
            s.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// What the catalog holds of the chain `keys` of `namespace` (blocks
    /// of `block_bytes`): the listed prefix, in chain order, and the reads
    /// that bring it. No network.
    pub fn plan(&self, namespace: &str, keys: &[Key], block_bytes: u64) -> Plan {
        plan(&self.shared, namespace, keys, block_bytes)
    }

    /// Starts reading `plan` from the bucket: its blocks' bytes come out of
    /// the receiver in pieces as they arrive, each block followed by
    /// [`Piece::Verified`] once all of it passed its checksum (and
    /// decoded). Everything stops after one deadline for the whole chain,
    /// `limit` at most, or once the receiver is dropped; the receiver then
    /// ends. Segments found gone or damaged leave the catalog.
    pub fn read(&self, plan: Plan, limit: Duration) -> mpsc::Receiver<Piece> {
        let (tx, rx) = mpsc::channel(PIECES);
        let shared = self.shared.clone();
        self.handle
            .spawn(async move { read_plan(&shared, plan, limit, tx).await });
        rx
    }

    /// Runs `f` on the tier's blocking pool (copies out of the host pool).
    pub fn spawn_blocking(&self, f: impl FnOnce() + Send + 'static) {
        self.handle.spawn_blocking(f);
    }

    pub fn stats(&self) -> RemoteStats {
        let s = &self.shared;
        let c = &s.counters;
        let index = s.index.read();
        RemoteStats {
            blocks: index.blocks.len() as u64,
            segments: index.segments.len() as u64,
            own_segments: index.own.len() as u64,
            own_bytes: index.own_bytes,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            uploaded_blocks: c.uploaded.load(Ordering::Relaxed),
            dropped_uploads: c.dropped.load(Ordering::Relaxed),
            evicted_segments: c.evicted.load(Ordering::Relaxed),
            checksum_failures: c.checksum.load(Ordering::Relaxed),
            refused_index: c.refused.load(Ordering::Relaxed),
            degraded: s.bucket.breaker().is_open(),
        }
    }

    /// Capacity this node may fill.
    pub fn capacity(&self) -> u64 {
        self.shared.cfg.bytes
    }

    /// Every block readable from the bucket, for a subscriber's snapshot.
    pub fn blocks(&self) -> Vec<Change> {
        let index = self.shared.index.read();
        let mut ids: Vec<&u64> = index.segments.keys().collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            let seg = &index.segments[id];
            for (i, b) in seg.footer.blocks.iter().enumerate() {
                let Some(key) = Key::new(&b.key) else {
                    continue;
                };
                let nsid = seg.ns[usize::from(b.namespace)];
                if index.blocks.get(&BlockId(nsid, key)) == Some(&(*id, i as u32)) {
                    out.push(Change::Stored {
                        namespace: seg.footer.namespaces[usize::from(b.namespace)].clone(),
                        blocks: vec![(b.key.clone(), b.parent.clone(), b.tokens.clone())],
                    });
                }
            }
        }
        out
    }

    /// Uploads what is queued (up to `timeout`), then stops the tasks.
    pub fn shutdown(&self, timeout: Duration) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        drop(self.tx.lock().take());
        if let Some(w) = self.writer.lock().take() {
            let _ = self
                .handle
                .block_on(async { tokio::time::timeout(timeout, w).await });
        }
    }
}

impl Drop for RemoteTier {
    fn drop(&mut self) {
        // Dropping a runtime from inside another one's worker would panic.
        if let Some(rt) = self.runtime.lock().take() {
            rt.shutdown_background();
        }
    }
}

/// Adds a segment to the catalog (durable first) and tells the store. Its
/// encrypted blocks' token ids are opened first (outside the lock); blocks
/// whose token ids do not open are left out.
fn admit_segment(s: &Shared, name: String, a: Announcement, own: bool) {
    let mut record = vec![own as u8];
    record.extend_from_slice(&a.encode());
    let opened = Opened::new(&s.codec, a);
    let refused = opened.refused();
    if refused > 0 {
        // Not damage as such (most likely another fleet's key), but none
        // of those blocks can ever be read here.
        tracing::warn!(
            segment = %name,
            blocks = refused,
            encrypted_here = s.codec.encrypts(),
            "G4 blocks whose token ids do not open under this node's key \
             (another key, no key here, or tampered); not listed"
        );
    }
    if let Err(e) = s.catalog.put_remote(&segment_key(&name), &record) {
        tracing::warn!(error = %e, "catalog write of a G4 segment failed");
        return;
    }
    let added = s.index.write().add(name.clone(), opened, own);
    match added {
        Some(changes) => (s.on_change)(changes),
        // Known already, the catalog is full, or nothing of it is usable
        // here: nothing of it is used.
        None => {
            if !s.index.read().by_name.contains_key(&name) {
                let _ = s.catalog.delete_remote(&segment_key(&name));
                s.counters.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Forgets a segment (a read found it gone or damaged, or it is evicted).
fn forget_segment(s: &Shared, id: u64) -> Option<Segment> {
    let (seg, changes) = s.index.write().remove(id)?;
    if let Err(e) = s.catalog.delete_remote(&segment_key(&seg.name)) {
        tracing::warn!(error = %e, "catalog delete of a G4 segment failed");
    }
    (s.on_change)(changes);
    Some(seg)
}

/// Deletes this node's oldest segments while it holds more than allowed.
fn enforce_capacity(s: &Arc<Shared>) {
    loop {
        let oldest = {
            let index = s.index.read();
            if index.own_bytes <= s.cfg.bytes {
                return;
            }
            index.own.front().copied()
        };
        let Some(id) = oldest else { return };
        let Some(seg) = forget_segment(s, id) else {
            return;
        };
        s.counters.evicted.fetch_add(1, Ordering::Relaxed);
        let shared = s.clone();
        tokio::spawn(async move {
            if let Err(e) = shared.bucket.retract(&seg.origin).await {
                // Left behind: orphan collection finds it again.
                tracing::debug!(error = %e, segment = %seg.name, "segment delete failed");
            }
        });
    }
}

async fn write_loop(s: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Upload>) {
    let permits = Arc::new(Semaphore::new(UPLOADS));
    let mut batch: Vec<Upload> = Vec::new();
    let mut bytes = 0u64;
    let mut first = Instant::now();
    let mut closed = false;
    while !closed {
        // Wait for a block; with blocks waiting, no longer than `linger`
        // after the first of them.
        let got = if batch.is_empty() {
            rx.recv().await
        } else {
            let until = tokio::time::Instant::from_std(first + s.cfg.linger);
            tokio::select! {
                up = rx.recv() => up,
                _ = tokio::time::sleep_until(until) => None,
            }
        };
        match got {
            Some(up) => {
                s.queued_bytes
                    .fetch_sub(up.data.len() as u64, Ordering::Relaxed);
                if batch.is_empty() {
                    first = Instant::now();
                }
                bytes += super::segment::round_up(up.data.len() as u64);
                batch.push(up);
                if bytes < s.cfg.segment_bytes {
                    continue;
                }
            }
            // Closed (the tier stops) or lingered long enough.
            None => closed = rx.is_closed() && rx.is_empty(),
        }
        if batch.is_empty() {
            continue;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let ups = std::mem::take(&mut batch);
        bytes = 0;
        let shared = s.clone();
        tokio::spawn(async move {
            upload(&shared, ups).await;
            drop(permit);
        });
    }
    // Wait for the uploads still out.
    let _ = permits.acquire_many(UPLOADS as u32).await;
}

/// Seals `ups` into one segment and publishes it.
async fn upload(s: &Arc<Shared>, ups: Vec<Upload>) {
    let origin = Origin {
        node: s.node,
        seq: s.next_seq.fetch_add(1, Ordering::Relaxed),
        created_ms: now_ms(),
    };
    let ups = chain_order(ups);
    let keys: Vec<(String, Key)> = ups.iter().map(|u| (u.namespace.clone(), u.key)).collect();
    // Compressing or encrypting a segment (32 MiB by default) takes tens of
    // milliseconds: not on the runtime's workers, which also serve reads.
    let b = if s.codec.is_noop() {
        pack(s, origin, ups)
    } else {
        let shared = s.clone();
        match tokio::task::spawn_blocking(move || pack(&shared, origin, ups)).await {
            Ok(b) => b,
            Err(e) => {
                s.counters
                    .dropped
                    .fetch_add(keys.len() as u64, Ordering::Relaxed);
                tracing::warn!(error = %e, "encoding a G4 segment failed; blocks dropped");
                return unpend(s, &keys);
            }
        }
    };
    if b.is_empty() {
        return unpend(s, &keys);
    }
    let sealed = b.finish();
    // What the segment holds: blocks `pack` refused are counted already.
    let n = sealed.footer.blocks.len() as u64;
    match s.bucket.publish(&sealed).await {
        Ok(name) => {
            s.counters.uploaded.fetch_add(n, Ordering::Relaxed);
            admit_segment(s, name, Announcement::of(&sealed), true);
            enforce_capacity(s);
        }
        Err(e) => {
            s.counters.dropped.fetch_add(n, Ordering::Relaxed);
            tracing::debug!(error = %e, blocks = n, "segment upload failed; blocks dropped");
        }
    }
    unpend(s, &keys);
}

/// `ups` with every chain contiguous, parent first: blocks arrive in
/// chain order per offer, but offers of concurrent requests interleave, and
/// a chain read back takes one range per run of adjacent blocks. Chains
/// keep the order their first block arrived in; a block whose parent is
/// not in the batch starts a chain.
fn chain_order(ups: Vec<Upload>) -> Vec<Upload> {
    let at: HashMap<(&str, &[u8]), usize> = ups
        .iter()
        .enumerate()
        .map(|(i, u)| ((u.namespace.as_str(), u.key.as_bytes()), i))
        .collect();
    // The first child of each block in the batch (a key has one parent;
    // a parent with several children keeps the later ones as their own runs).
    let mut child: Vec<Option<usize>> = vec![None; ups.len()];
    let mut follows = vec![false; ups.len()];
    for (i, u) in ups.iter().enumerate() {
        if let Some(&p) = at.get(&(u.namespace.as_str(), u.parent.as_slice())) {
            if p != i && child[p].is_none() {
                child[p] = Some(i);
                follows[i] = true;
            }
        }
    }
    let mut order = Vec::with_capacity(ups.len());
    let mut placed = vec![false; ups.len()];
    // Chain starts first, then whatever a cycle of keys (hostile or
    // broken input) left unplaced.
    let starts = (0..ups.len()).filter(|&i| !follows[i]).chain(0..ups.len());
    for start in starts {
        let mut next = Some(start);
        while let Some(i) = next.filter(|&i| !placed[i]) {
            placed[i] = true;
            order.push(i);
            next = child[i];
        }
    }
    drop(at);
    let mut slots: Vec<Option<Upload>> = ups.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// Encodes `ups` and packs them, in order, into a segment of `origin`. A
/// block that cannot be encoded or packed is dropped and counted.
fn pack(s: &Shared, origin: Origin, ups: Vec<Upload>) -> Builder {
    let mut b = Builder::new(origin);
    let mut enc = s.codec.encoder();
    for up in ups {
        let key = up.key.as_bytes();
        let pushed = enc
            .encode(&up.namespace, key, up.data)
            .and_then(|(codec, raw_len, stored)| {
                // An encrypted block's token ids are sealed with it.
                let (tokens, sealed) = if codec & CODEC_ENCRYPTED != 0 {
                    let sealed = s
                        .codec
                        .seal_tokens(&up.namespace, key, &up.parent, &up.tokens)?;
                    (&[][..], sealed)
                } else {
                    (&up.tokens[..], Vec::new())
                };
                b.push_encoded(
                    &up.namespace,
                    key,
                    &up.parent,
                    tokens,
                    &sealed,
                    stored,
                    codec,
                    raw_len,
                )
                .ok()
            })
            .is_some();
        if !pushed {
            s.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
    b
}

fn unpend(s: &Shared, keys: &[(String, Key)]) {
    let mut p = s.pending.lock();
    for k in keys {
        p.remove(k);
    }
}

/// Deletes this node's orphans — segments it uploaded but never announced
/// or recorded (it died between the PUTs) — a minute after start, then
/// hourly. Only segments older than [`ORPHAN_AGE`]: a younger one may be an
/// upload whose announcement is on its way.
async fn sweep_loop(s: Arc<Shared>) {
    tokio::time::sleep(Duration::from_secs(60)).await;
    loop {
        let known = |name: &str| s.index.read().by_name.contains_key(name);
        match s.bucket.orphans(s.node, ORPHAN_AGE, &known).await {
            Ok(orphans) => {
                for name in orphans {
                    if s.bucket.delete(&name).await.is_ok() {
                        tracing::info!(segment = %name, "deleted an orphaned G4 segment");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "orphan sweep failed"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

async fn discover_loop(s: Arc<Shared>, mut d: Discovery) {
    let mut tick = tokio::time::interval(s.cfg.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(found) = d.poll(&s.bucket).await else {
            continue;
        };
        s.counters
            .refused
            .fetch_add(found.refused as u64, Ordering::Relaxed);
        for (name, a) in found.segments {
            if s.index.read().by_name.contains_key(&name) {
                continue;
            }
            // One of ours the catalog missed (a crash between the upload
            // and the catalog write) is ours again.
            let own = a.origin.node == s.node;
            admit_segment(&s, name, a, own);
        }
        if found.refused > 0 {
            tracing::debug!(refused = found.refused, "unreadable index objects skipped");
        }
    }
}

/// Pieces a read keeps in flight toward its consumer.
const PIECES: usize = 256;

/// One segment's share of a plan: block indexes in the footer, ascending
/// and in chain order; the first is the plan's block `first`.
#[derive(Debug)]
struct Part {
    seg: u64,
    name: String,
    footer: Arc<Footer>,
    blocks: Vec<usize>,
    first: usize,
}

fn plan(s: &Shared, namespace: &str, keys: &[Key], block_bytes: u64) -> Plan {
    let mut out = Plan {
        block_bytes,
        ..Plan::default()
    };
    let index = s.index.read();
    let Some(ns) = index.namespace(namespace) else {
        return out;
    };
    for key in keys {
        let Some(&(seg, i)) = index.blocks.get(&BlockId(ns, *key)) else {
            break;
        };
        let Some(sg) = index.segments.get(&seg) else {
            break;
        };
        let i = i as usize;
        let b = &sg.footer.blocks[i];
        // Another layout under the same namespace name: not ours to use.
        if u64::from(b.raw_len) != block_bytes {
            break;
        }
        match out.parts.last_mut() {
            Some(p) if p.seg == seg && p.blocks.last().is_some_and(|&l| l < i) => p.blocks.push(i),
            _ => out.parts.push(Part {
                seg,
                name: sg.name.clone(),
                footer: sg.footer.clone(),
                blocks: vec![i],
                first: out.blocks.len(),
            }),
        }
        out.blocks.push(Planned {
            key: *key,
            parent: b.parent.clone(),
            tokens: b.tokens.clone(),
        });
    }
    out
}

/// How one part's read ended.
enum Ended {
    /// Every block delivered and verified.
    Whole,
    /// The consumer went away.
    Stopped,
    /// A block failed its checksum, authentication or decompression.
    Damaged,
    /// A block is under another key (or not encrypted as required here).
    Foreign,
}

async fn read_plan(s: &Arc<Shared>, plan: Plan, limit: Duration, tx: mpsc::Sender<Piece>) {
    if plan.blocks.is_empty() {
        return;
    }
    let total = plan.blocks.len() as u64 * plan.block_bytes;
    let deadline = s.bucket.deadline(total, 1).min(limit);
    let bb = plan.block_bytes;
    // Owned futures: the spawned task must not hold a borrow of `plan`
    // in its stream (the compiler cannot prove that one general enough).
    let reads: Vec<_> = plan
        .parts
        .into_iter()
        .map(|p| {
            let (s, tx) = (s.clone(), tx.clone());
            async move {
                let r = read_part(&s, &p, bb, &tx).await;
                (p, r)
            }
        })
        .collect();
    // The consumer sees the end once the last part's sender goes.
    drop(tx);
    let mut ended = Vec::new();
    let all = futures::stream::iter(reads)
        .buffer_unordered(READS)
        .for_each(|e| {
            ended.push(e);
            futures::future::ready(())
        });
    // Past the deadline, the parts not done are dropped (and with them
    // the sender): the consumer sees the end.
    let _ = tokio::time::timeout(deadline, all).await;
    // Parts in chain order: the verified prefix ends at the first part not
    // read whole.
    ended.sort_by_key(|(p, _)| p.first);
    let mut hits = 0;
    for (p, r) in &ended {
        let forget = match r {
            // Whole, and every block before it too (else `hits` stopped
            // short of its first block).
            Ok(Ended::Whole) if hits == p.first => {
                hits += p.blocks.len();
                continue;
            }
            Err(Miss::NotFound) | Ok(Ended::Damaged) => {
                tracing::warn!(segment = %p.name, "G4 segment gone or damaged; its blocks are forgotten");
                true
            }
            // Not damage, but no read here will ever succeed, so the segment
            // leaves this node's catalog (lookups stop offering it); the
            // object stays for the nodes that can read it.
            Ok(Ended::Foreign) => {
                tracing::warn!(
                    segment = %p.name,
                    encrypted_here = s.codec.encrypts(),
                    "G4 segment written under another key (or encrypted otherwise than here); \
                     this node forgets its blocks"
                );
                true
            }
            // A slow or failing server: the data is likely fine.
            Ok(Ended::Whole | Ended::Stopped) | Err(_) => false,
        };
        if forget {
            forget_segment(s, p.seg);
        }
    }
    s.counters.hits.fetch_add(hits as u64, Ordering::Relaxed);
    if hits < plan.blocks.len() {
        s.counters.misses.fetch_add(1, Ordering::Relaxed);
    }
}

/// Streams the blocks of one part to `tx`: one ranged GET per run of
/// adjacent blocks, each block's stored bytes checksummed as they pass.
/// Blocks stored raw in the clear go out as they arrive (no copy here);
/// encoded ones are gathered, checked, then decoded on the blocking pool.
async fn read_part(
    s: &Arc<Shared>,
    p: &Part,
    block_bytes: u64,
    tx: &mpsc::Sender<Piece>,
) -> std::result::Result<Ended, Miss> {
    let mut next = 0; // index into p.blocks of the block being read
    for range in p.footer.ranges(&p.blocks) {
        let len = range.end - range.start;
        let ended = s
            .bucket
            .guarded(s.bucket.deadline(len, READS), async {
                let mut body = s.bucket.read_range(&p.name, range.clone()).await?;
                let mut pos = range.start;
                let mut block = Block::default();
                while let Some(chunk) = body.next().await {
                    let mut rest = chunk?;
                    while !rest.is_empty() && next < p.blocks.len() {
                        let i = p.blocks[next];
                        let b = &p.footer.blocks[i];
                        let end = b.offset + u64::from(b.len);
                        if pos < b.offset {
                            // Padding between blocks.
                            let skip = (b.offset - pos).min(rest.len() as u64);
                            pos += skip;
                            let _ = rest.split_to(skip as usize);
                            continue;
                        }
                        if pos >= range.end || pos >= end {
                            break;
                        }
                        let take = (end - pos).min(rest.len() as u64) as usize;
                        let piece = rest.split_to(take);
                        let at = (pos - b.offset) as usize;
                        pos += take as u64;
                        block.hash.update(&piece);
                        let n = p.first + next;
                        if b.codec == CODEC_RAW {
                            if tx
                                .send(Piece::Data {
                                    block: n,
                                    at,
                                    bytes: piece,
                                })
                                .await
                                .is_err()
                            {
                                return Ok(Ended::Stopped);
                            }
                        } else {
                            block.stored.extend_from_slice(&piece);
                        }
                        if pos < end {
                            continue;
                        }
                        let stored = std::mem::take(&mut block).finish(b.checksum);
                        let Some(stored) = stored else {
                            s.counters.checksum.fetch_add(1, Ordering::Relaxed);
                            return Ok(Ended::Damaged);
                        };
                        if b.codec != CODEC_RAW {
                            let bytes = match open_block(s, p, i, stored, block_bytes).await {
                                Ok(bytes) => bytes,
                                // Fails authentication or decompression:
                                // damaged or forged, like a bad checksum.
                                Err(Refused::Damaged) => {
                                    s.counters.checksum.fetch_add(1, Ordering::Relaxed);
                                    return Ok(Ended::Damaged);
                                }
                                Err(Refused::Foreign) => return Ok(Ended::Foreign),
                                // The plan checked the raw length.
                                Err(Refused::Layout) => return Ok(Ended::Stopped),
                            };
                            let data = Piece::Data {
                                block: n,
                                at: 0,
                                bytes,
                            };
                            if tx.send(data).await.is_err() {
                                return Ok(Ended::Stopped);
                            }
                        }
                        if tx.send(Piece::Verified(n)).await.is_err() {
                            return Ok(Ended::Stopped);
                        }
                        next += 1;
                    }
                }
                Ok(Ended::Whole)
            })
            .await?;
        if !matches!(ended, Ended::Whole) {
            return Ok(ended);
        }
        // Every block starting in the range must be done.
        if p.blocks
            .get(next)
            .is_some_and(|&i| p.footer.blocks[i].offset < range.end)
        {
            return Err(Miss::Store("short range answer".into()));
        }
    }
    Ok(Ended::Whole)
}

/// Decodes block `i` of part `p` from its verified stored bytes, on the
/// blocking pool (decryption and decompression cost CPU).
async fn open_block(
    s: &Arc<Shared>,
    p: &Part,
    i: usize,
    stored: Bytes,
    block_bytes: u64,
) -> std::result::Result<Bytes, Refused> {
    let b = &p.footer.blocks[i];
    let ns = p.footer.namespaces[usize::from(b.namespace)].clone();
    let (key, codec, raw_len) = (b.key.clone(), b.codec, b.raw_len);
    let shared = s.clone();
    tokio::task::spawn_blocking(move || {
        shared
            .codec
            .open(&ns, &key, codec, raw_len, stored, block_bytes)
    })
    .await
    .unwrap_or(Err(Refused::Damaged))
}

/// One block's stored bytes as they pass: their running checksum, and the
/// bytes themselves when they must be decoded.
#[derive(Default)]
struct Block {
    hash: xxhash_rust::xxh3::Xxh3,
    stored: Vec<u8>,
}

impl Block {
    /// The stored bytes (empty for raw blocks, which went out as they
    /// came) when the checksum matches.
    fn finish(self, checksum: u64) -> Option<Bytes> {
        (self.hash.digest() == checksum).then(|| Bytes::from(self.stored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Compression;
    use crate::remote::segment::Builder;

    fn announcement(node: u64, seq: u64, keys: &[u8]) -> Announcement {
        let mut b = Builder::new(Origin {
            node,
            seq,
            created_ms: seq,
        });
        for &k in keys {
            b.push(
                "ns",
                &[k; 8],
                &[],
                &[u32::from(k)],
                Bytes::from(vec![k; 100]),
            )
            .unwrap();
        }
        Announcement::of(&b.finish())
    }

    #[test]
    fn interleaved_chains_are_packed_contiguously() {
        let up = |chain: u8, i: u8| Upload {
            namespace: "ns".into(),
            key: Key::new(&[chain, i]).unwrap(),
            parent: if i == 0 { vec![] } else { vec![chain, i - 1] },
            tokens: vec![],
            data: Bytes::new(),
        };
        // Two requests' chains, offered in alternating pieces; chain 3
        // continues a parent uploaded earlier (not in the batch).
        let ups = vec![
            up(1, 0),
            up(2, 0),
            up(1, 1),
            up(3, 5),
            up(2, 1),
            up(1, 2),
            up(3, 6),
        ];
        let got: Vec<Vec<u8>> = chain_order(ups)
            .iter()
            .map(|u| u.key.as_bytes().to_vec())
            .collect();
        let want: Vec<Vec<u8>> = [[1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [3, 5], [3, 6]]
            .iter()
            .map(|k| k.to_vec())
            .collect();
        assert_eq!(got, want);
        // A cycle of parents still places every block once.
        let mut a = up(9, 1);
        a.parent = vec![9, 2];
        let mut b = up(9, 2);
        b.parent = vec![9, 1];
        assert_eq!(chain_order(vec![a, b]).len(), 2);
    }

    #[test]
    fn a_key_stays_with_its_first_segment_and_goes_with_it() {
        let mut ix = Index::default();
        let a = announcement(1, 1, &[1, 2]);
        let b = announcement(2, 1, &[2, 3]);
        let open =
            |a: &Announcement| Opened::new(&Codec::new(Compression::None, 3, None), a.clone());
        let ch = ix.add("a".into(), open(&a), true).unwrap();
        assert!(matches!(&ch[0], Change::Stored { blocks, .. } if blocks.len() == 2));
        let ch = ix.add("b".into(), open(&b), false).unwrap();
        // Key 2 is a's already: b brings only key 3.
        assert!(matches!(&ch[0], Change::Stored { blocks, .. } if blocks.len() == 1));
        assert!(ix.add("a".into(), open(&a), true).is_none(), "known");
        assert_eq!(ix.own_bytes, a.len);
        let ns = ix.namespace("ns").unwrap();
        let id_a = ix.by_name["a"];
        let (_, ch) = ix.remove(id_a).unwrap();
        assert!(matches!(&ch[0], Change::Removed { keys, .. } if keys.len() == 2));
        assert_eq!(ix.own_bytes, 0);
        assert!(ix.own.is_empty());
        let k = |b: u8| Key::new(&[b; 8]).unwrap();
        assert!(!ix.blocks.contains_key(&BlockId(ns, k(2))));
        assert!(ix.blocks.contains_key(&BlockId(ns, k(3))));
    }

    /// A chain of `keys` encrypted under `key`, each block's tokens sealed.
    fn sealed_announcement(key: &[u8; 32], keys: &[u8]) -> Announcement {
        let c = Codec::new(Compression::Lz4, 3, Some(key));
        let mut b = Builder::new(Origin {
            node: 9,
            seq: 1,
            created_ms: 1,
        });
        for (i, &k) in keys.iter().enumerate() {
            let parent = if i == 0 { vec![] } else { vec![keys[i - 1]; 8] };
            let tokens: Vec<u32> = (0..4).map(|t| u32::from(k) << 8 | t).collect();
            let (codec, raw_len, stored) =
                c.encode("ns", &[k; 8], Bytes::from(vec![k; 100])).unwrap();
            let sealed = c.seal_tokens("ns", &[k; 8], &parent, &tokens).unwrap();
            b.push_encoded("ns", &[k; 8], &parent, &[], &sealed, stored, codec, raw_len)
                .unwrap();
        }
        Announcement::of(&b.finish())
    }

    #[test]
    fn sealed_token_ids_are_opened_or_the_block_is_not_listed() {
        let (ka, kb) = ([0x11; 32], [0x22; 32]);
        let a = sealed_announcement(&ka, &[1, 2, 3]);
        assert!(a.footer.blocks.iter().all(|b| b.tokens.is_empty()));
        let with = |k: Option<&[u8; 32]>| Codec::new(Compression::None, 3, k);
        // The key: every block listed, its tokens opened.
        let mut ix = Index::default();
        let ch = ix
            .add("a".into(), Opened::new(&with(Some(&ka)), a.clone()), false)
            .unwrap();
        let Change::Stored { blocks, .. } = &ch[0] else {
            panic!("{ch:?}")
        };
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[1].1, vec![1u8; 8]);
        assert_eq!(blocks[1].2, vec![0x200, 0x201, 0x202, 0x203]);
        let seg = &ix.segments[&ix.by_name["a"]];
        assert_eq!(
            seg.footer.blocks[2].tokens,
            vec![0x300, 0x301, 0x302, 0x303]
        );
        // Another key, or none: nothing listed; another node's segment is
        // refused, one of this node's own kept (its bytes count).
        for k in [Some(&kb), None] {
            let mut ix = Index::default();
            let o = Opened::new(&with(k), a.clone());
            assert_eq!(o.refused(), 3);
            assert!(ix.add("a".into(), o, false).is_none());
            let o = Opened::new(&with(k), a.clone());
            assert!(ix.add("a".into(), o, true).unwrap().is_empty());
            assert!(ix.blocks.is_empty());
            assert_eq!(ix.own_bytes, a.len);
        }
        // A parent rewritten, tokens moved between blocks: those blocks
        // are not listed, the others are.
        let mut bad = a.clone();
        bad.footer.blocks[1].parent = vec![9; 8];
        let moved = bad.footer.blocks[0].sealed_tokens.clone();
        bad.footer.blocks[2].sealed_tokens = moved;
        let mut ix = Index::default();
        let o = Opened::new(&with(Some(&ka)), bad);
        assert_eq!(o.usable, [true, false, false]);
        let ch = ix.add("a".into(), o, false).unwrap();
        assert!(matches!(&ch[0], Change::Stored { blocks, .. } if blocks.len() == 1));
        assert_eq!(ix.blocks.len(), 1);
    }
}
