//! G3: the local NVMe tier.
//!
//! Blocks are appended to fixed-size regions of one preallocated data file
//! (`O_DIRECT`, falling back to buffered I/O where the file system refuses
//! it). Each entry is a checksummed 4 KiB header page followed by the block's
//! bytes padded to 4 KiB (format in [`entry`]). Regions are recycled
//! oldest-first (see [`region`]); nothing is rewritten in place. I/O runs on
//! dedicated io_uring threads (see [`uring`]) that sleep in the kernel when
//! idle.
//!
//! Callers never block: [`DiskTier::submit_write`] and
//! [`DiskTier::submit_read`] queue the request and return; completions are
//! delivered through callbacks run on a ring thread. Writes are bounded
//! (`DiskConfig::write_queue`): when the bound is reached the write is
//! dropped, counted, and `QueueFull` returned.
//!
//! # Failure model
//! * `ENOSPC` (when preallocating a region or writing) or any write/sync I/O
//!   error marks the tier *degraded*: later writes are refused (and counted as
//!   dropped), reads keep working, [`DiskTier::degraded`] says why. A failed
//!   write never touches other entries, so nothing already stored is damaged.
//! * Read I/O errors are returned to the caller and counted, but do not
//!   degrade the tier (one bad sector should not stop all offloads).
//! * A read returns data only after header and xxh3 data checksum verified
//!   (and, for an encoded entry, authenticated and decoded to exactly its
//!   raw length); otherwise `BadHeader`, `ChecksumMismatch`, `Stale`,
//!   `Foreign` or `Undecodable`, each a cache miss.
//!
//! # At rest
//! With a codec ([`DiskConfig::codec`]: compression, a key, or both) the
//! ring thread encodes each block into a bounce buffer before it places the
//! entry (its size is known only then) and decodes it after reading; see
//! [`codec`]. Without one, blocks go to and from the caller's memory
//! directly, as stored.
//!
//! # Recovery contract (warm restart)
//! Per block the catalog records the [`DiskLocation`] and checksum delivered
//! to the write's `on_done`. After [`DiskTier::sync`] returns, every entry
//! whose `on_done` ran before the call is durable. On restart pass every
//! `(region, generation)` that any recorded location refers to (or the
//! regions the catalog checkpointed from [`DiskTier::live_regions`]) to
//! [`DiskTier::open`]: those regions are kept, in generation order, until
//! FIFO eviction reaches them, and new generations start above them. Regions
//! reported by [`DiskTier::take_evicted`] no longer hold the catalog's
//! entries; their locations are stale (they would read as `Stale` anyway).

mod admission;
pub mod codec;
pub(crate) mod entry;
mod rate;
mod region;
mod uring;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

pub use admission::Admission;
pub use codec::DiskCodec;
pub use entry::{entry_bytes, AlignedBuf, Header, HeaderFault, Seal, MAX_KEY, PAGE};
pub use region::RegionState;
pub use uring::{ReadDone, WriteDone};

use admission::{Doorkeeper, DOORKEEPER_SLOTS};
use region::{AllocError, RegionTable, Slot};
use uring::{call_guarded, Key, Msg, ReadOp, RingHandle, WriteOp};

/// Errors of the G3 tier. Every variant except `Io` on the write path is a
/// plain cache miss / dropped write for the caller.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An I/O error, with what was being done.
    #[error("{1}: {0}")]
    Io(#[source] io::Error, String),
    /// No room: the file system is full (the tier is then degraded), or the
    /// oldest region still has I/O in flight and cannot be recycled yet.
    #[error("G3: no space")]
    NoSpace,
    /// The entry's data does not match its checksum.
    #[error("G3: checksum mismatch")]
    ChecksumMismatch,
    /// No valid entry header for this block at the location.
    #[error("G3: bad entry header")]
    BadHeader,
    /// The location's region has been recycled since it was recorded.
    #[error("G3: stale location")]
    Stale,
    /// The entry is not readable here: encrypted under another key,
    /// encrypted while this tier has no key, in the clear while it has one,
    /// or encoded by a build with the codec while this one has none. Not
    /// damage.
    #[error("G3: entry not readable here (another key, or not encrypted as configured)")]
    Foreign,
    /// The entry fails authentication under this tier's key, or does not
    /// decompress to exactly its raw length: damaged or forged.
    #[error("G3: entry fails authentication or decoding")]
    Undecodable,
    /// The tier refuses writes after an earlier failure (the reason).
    #[error("G3 degraded: {0}")]
    Degraded(String),
    /// The bounded write-behind queue is full; the write was dropped.
    #[error("G3: write queue full")]
    QueueFull,
    /// The block does not fit in a region (or in 4 GiB).
    #[error("G3: block too large for a region")]
    TooLarge,
    /// A caller error (bad key length, short destination buffer, config).
    #[error("G3: invalid argument: {0}")]
    Invalid(&'static str),
}

/// Configuration of the G3 tier.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The data file, e.g. `<data-dir>/g3.dat`. Created when missing; never
    /// truncated, so a restart finds its entries again.
    pub path: PathBuf,
    /// Bytes of the file to use; rounded down to whole regions.
    pub capacity: u64,
    /// Region size, a multiple of 4 KiB. Default 64 MiB: large enough that
    /// region bookkeeping and preallocation are rare, small enough that
    /// eviction drops only ~32 blocks of 2 MiB at a time.
    pub region_bytes: u64,
    /// Blocks in flight per ring. Default 32 (NVMe drives saturate at 8–32
    /// large requests).
    pub queue_depth: u32,
    /// Writes accepted but not yet completed before new ones are dropped.
    /// Default 1024 (2 GiB of 2 MiB blocks, all held as G2 leases).
    pub write_queue: usize,
    /// Admission policy of [`DiskTier::admit`]. Default `Frequency`.
    pub admit: Admission,
    /// Ring threads. Default 1: one thread keeps a drive busy with large
    /// blocks; add rings only for several devices behind one file system.
    pub rings: usize,
    /// How entries are stored at rest (compression, encryption). Default
    /// none: stored as they are, with no copy.
    pub codec: Option<Arc<DiskCodec>>,
}

impl DiskConfig {
    pub const DEFAULT_REGION_BYTES: u64 = 64 << 20;
    pub const DEFAULT_QUEUE_DEPTH: u32 = 32;
    pub const DEFAULT_WRITE_QUEUE: usize = 1024;

    /// A configuration with every default (see the field docs).
    pub fn new(path: impl Into<PathBuf>, capacity: u64) -> DiskConfig {
        DiskConfig {
            path: path.into(),
            capacity,
            region_bytes: Self::DEFAULT_REGION_BYTES,
            queue_depth: Self::DEFAULT_QUEUE_DEPTH,
            write_queue: Self::DEFAULT_WRITE_QUEUE,
            admit: Admission::default(),
            rings: 1,
            codec: None,
        }
    }
}

/// Where an entry lives and how long it is. `offset` is the absolute file
/// offset of its header page; the data follows at `offset + 4096`. `len` is
/// the stored (unpadded) length, `raw_len` the block's length once decoded:
/// equal unless the entry is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiskLocation {
    pub region: u32,
    pub generation: u64,
    pub offset: u64,
    pub len: u32,
    pub raw_len: u32,
}

/// Upper bounds (µs) of the latency histogram buckets; a last, implicit
/// bucket counts everything slower.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];

/// A latency histogram snapshot: `counts[i]` for `<= LATENCY_BUCKETS_US[i]`,
/// the last element for slower; not cumulative.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latency {
    pub counts: Vec<u64>,
    pub sum_ns: u64,
    pub count: u64,
}

struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn record(&self, since: Instant) {
        let ns = since.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        let us = ns / 1000;
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Latency {
        Latency {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
struct Counters {
    blocks_written: AtomicU64,
    bytes_written: AtomicU64,
    blocks_read: AtomicU64,
    bytes_read: AtomicU64,
    dropped_writes: AtomicU64,
    write_errors: AtomicU64,
    read_errors: AtomicU64,
    checksum_failures: AtomicU64,
    bad_headers: AtomicU64,
    stale_reads: AtomicU64,
    foreign_entries: AtomicU64,
    decode_failures: AtomicU64,
}

/// A snapshot of the tier's counters (monotonic unless noted).
#[derive(Debug, Clone, Default)]
pub struct DiskStats {
    /// Usable bytes (whole regions).
    pub capacity: u64,
    /// Bytes in open and sealed regions, headers and padding included
    /// (gauge).
    pub used_bytes: u64,
    pub blocks_written: u64,
    /// Block bytes of completed writes (before encoding).
    pub bytes_written: u64,
    pub blocks_read: u64,
    /// Block bytes of verified reads (decoded).
    pub bytes_read: u64,
    /// Writes refused: queue full, degraded, or no recyclable region.
    pub dropped_writes: u64,
    pub write_errors: u64,
    pub read_errors: u64,
    pub checksum_failures: u64,
    pub bad_headers: u64,
    pub stale_reads: u64,
    /// Reads of entries not readable here ([`DiskError::Foreign`]).
    pub foreign_entries: u64,
    /// Reads of entries that failed authentication or decompression
    /// ([`DiskError::Undecodable`]).
    pub decode_failures: u64,
    pub evicted_regions: u64,
    /// Writes accepted and not yet completed (gauge).
    pub pending_writes: u64,
    /// Why the tier refuses writes, if it does.
    pub degraded: Option<String>,
    /// Whether the file is open with `O_DIRECT`.
    pub direct_io: bool,
    /// Submit-to-completion latency of successful writes / verified reads.
    pub write_latency: Latency,
    pub read_latency: Latency,
    /// Measured throughput while busy, bytes per second (see [`rate`]);
    /// `None` before enough I/O or when the last measurement is old.
    pub write_bytes_per_s: Option<f64>,
    pub read_bytes_per_s: Option<f64>,
}

struct SyncState {
    next_seq: u64,
    outstanding: BTreeSet<u64>,
}

/// State shared between the API and the ring threads.
pub(crate) struct Shared {
    cfg: DiskConfig,
    file: File,
    direct: bool,
    capacity: u64,
    regions: Mutex<RegionTable>,
    counters: Counters,
    write_lat: Histogram,
    read_lat: Histogram,
    write_rate: rate::Throughput,
    read_rate: rate::Throughput,
    degraded_flag: AtomicBool,
    degraded: Mutex<Option<String>>,
    pending_writes: AtomicUsize,
    sync: Mutex<SyncState>,
    sync_cv: Condvar,
    doorkeeper: Option<Doorkeeper>,
}

impl Shared {
    fn degraded(&self) -> Option<String> {
        if !self.degraded_flag.load(Ordering::Acquire) {
            return None;
        }
        self.degraded.lock().clone()
    }

    /// Marks the tier degraded; the first reason is kept.
    fn degrade(&self, reason: String) {
        let mut d = self.degraded.lock();
        if d.is_none() {
            tracing::error!(%reason, path = %self.cfg.path.display(), "G3 tier degraded: writes disabled");
            *d = Some(reason);
        }
        self.degraded_flag.store(true, Ordering::Release);
    }

    /// Preallocates region `r` before it first receives appends, so a full
    /// file system shows up here, at a region boundary, as ENOSPC.
    fn prepare(&self, r: u32) -> io::Result<()> {
        let off = r as u64 * self.cfg.region_bytes;
        // SAFETY: plain syscall on our own descriptor.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                0,
                off as libc::off_t,
                self.cfg.region_bytes as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // No preallocation on this file system: writes extend the file
            // and ENOSPC surfaces on the write instead.
            Some(libc::EOPNOTSUPP) => Ok(()),
            Some(libc::EINTR) => self.prepare(r),
            _ => Err(e),
        }
    }

    /// Places an entry of `bytes` in the open region. A refusal is counted
    /// as a dropped write; a failed preallocation also degrades the tier.
    /// Preallocation of a newly opened region (once per region) runs under
    /// the lock; it is a short metadata operation, not data I/O.
    fn allocate(&self, bytes: u64) -> Result<Slot, DiskError> {
        let alloc = self.regions.lock().allocate(bytes, |r| self.prepare(r));
        alloc.map_err(|e| {
            self.counters.dropped_writes.fetch_add(1, Ordering::Relaxed);
            match e {
                AllocError::TooLarge => DiskError::TooLarge,
                AllocError::Busy => DiskError::NoSpace,
                AllocError::Prepare(r, e) => {
                    let nospace = e.raw_os_error() == Some(libc::ENOSPC);
                    self.degrade(format!("preallocating region {r}: {e}"));
                    if nospace {
                        DiskError::NoSpace
                    } else {
                        DiskError::Io(e, format!("preallocating G3 region {r}"))
                    }
                }
            }
        })
    }

    fn finish_write(&self, w: WriteOp, res: Result<(u32, u64), DiskError>) {
        if let Some(slot) = &w.slot {
            self.regions.lock().end_write(slot.region);
        }
        let moved = if res.is_ok() { w.len as u64 } else { 0 };
        self.write_rate.record(w.started, Instant::now(), moved);
        let c = &self.counters;
        match &res {
            Ok(_) => {
                c.blocks_written.fetch_add(1, Ordering::Relaxed);
                c.bytes_written.fetch_add(w.len as u64, Ordering::Relaxed);
                self.write_lat.record(w.started);
            }
            Err(DiskError::Degraded(_)) => {
                c.dropped_writes.fetch_add(1, Ordering::Relaxed);
            }
            // Out of memory for a bounce buffer is not the drive's fault.
            Err(DiskError::Io(e, _)) if e.kind() == io::ErrorKind::OutOfMemory => {
                c.write_errors.fetch_add(1, Ordering::Relaxed);
            }
            // Never placed (no `slot`): `allocate` counted the refusal.
            Err(e) => {
                if let Some(slot) = &w.slot {
                    c.write_errors.fetch_add(1, Ordering::Relaxed);
                    self.degrade(format!("write at offset {}: {e}", slot.offset));
                }
            }
        }
        let (raw_len, on_done) = (w.len, w.on_done);
        let res = match (res, w.slot) {
            (Ok((len, sum)), Some(slot)) => Ok((
                DiskLocation {
                    region: slot.region,
                    generation: slot.generation,
                    offset: slot.offset,
                    len,
                    raw_len,
                },
                sum,
            )),
            (Ok(_), None) => Err(DiskError::Degraded("G3 write never placed".into())),
            (Err(e), _) => Err(e),
        };
        // The callback runs before the write stops counting as outstanding,
        // so once `sync()` returns every earlier callback has run too.
        call_guarded(move || on_done(res));
        self.pending_writes.fetch_sub(1, Ordering::AcqRel);
        let mut s = self.sync.lock();
        s.outstanding.remove(&w.seq);
        drop(s);
        self.sync_cv.notify_all();
    }

    fn finish_read(&self, r: ReadOp, res: Result<(), DiskError>) {
        let current = {
            let mut t = self.regions.lock();
            t.end_read(r.loc.region);
            t.is_current(r.loc.region, r.loc.generation)
        };
        let moved = if res.is_ok() { r.loc.raw_len as u64 } else { 0 };
        self.read_rate.record(r.started, Instant::now(), moved);
        let c = &self.counters;
        let res = match res {
            Ok(()) => {
                c.blocks_read.fetch_add(1, Ordering::Relaxed);
                c.bytes_read
                    .fetch_add(r.loc.raw_len as u64, Ordering::Relaxed);
                self.read_lat.record(r.started);
                Ok(())
            }
            // The region was recycled under the read: a miss, not corruption.
            Err(
                DiskError::ChecksumMismatch
                | DiskError::BadHeader
                | DiskError::Stale
                | DiskError::Foreign
                | DiskError::Undecodable,
            ) if !current => {
                c.stale_reads.fetch_add(1, Ordering::Relaxed);
                Err(DiskError::Stale)
            }
            Err(e) => {
                let ctr = match e {
                    DiskError::ChecksumMismatch => &c.checksum_failures,
                    DiskError::BadHeader => &c.bad_headers,
                    DiskError::Stale => &c.stale_reads,
                    DiskError::Foreign => &c.foreign_entries,
                    DiskError::Undecodable => &c.decode_failures,
                    _ => &c.read_errors,
                };
                ctr.fetch_add(1, Ordering::Relaxed);
                if !matches!(e, DiskError::Stale) {
                    tracing::warn!(error = %e, ?r.loc, "G3 read failed verification");
                }
                Err(e)
            }
        };
        let on_done = r.on_done;
        call_guarded(move || on_done(res));
    }
}

/// The G3 tier. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct DiskTier {
    shared: Arc<Shared>,
    rings: Vec<RingHandle>,
    next_ring: AtomicUsize,
}

impl DiskTier {
    /// Opens (creating if needed) the data file and starts the ring threads.
    /// `recovered` lists the regions the catalog still references; see the
    /// module docs for the recovery contract.
    pub fn open(
        cfg: DiskConfig,
        recovered: impl IntoIterator<Item = RegionState>,
    ) -> Result<DiskTier, DiskError> {
        if cfg.region_bytes < 2 * PAGE as u64 || cfg.region_bytes & (PAGE as u64 - 1) != 0 {
            return Err(DiskError::Invalid(
                "region_bytes must be a multiple of 4 KiB, >= 8 KiB",
            ));
        }
        let count = cfg.capacity / cfg.region_bytes;
        if count == 0 || count > u32::MAX as u64 {
            return Err(DiskError::Invalid("capacity must hold 1..=2^32-1 regions"));
        }
        if cfg.queue_depth == 0 || cfg.write_queue == 0 || cfg.rings == 0 {
            return Err(DiskError::Invalid(
                "queue_depth, write_queue and rings must be > 0",
            ));
        }
        let (file, direct) = open_file(&cfg)?;
        let doorkeeper = match cfg.admit {
            Admission::Always => None,
            Admission::Frequency => Some(Doorkeeper::new(DOORKEEPER_SLOTS)),
        };
        let shared = Arc::new(Shared {
            capacity: count * cfg.region_bytes,
            regions: Mutex::new(RegionTable::new(count as u32, cfg.region_bytes, recovered)),
            cfg,
            file,
            direct,
            counters: Counters::default(),
            write_lat: Histogram::new(),
            read_lat: Histogram::new(),
            write_rate: rate::Throughput::default(),
            read_rate: rate::Throughput::default(),
            degraded_flag: AtomicBool::new(false),
            degraded: Mutex::new(None),
            pending_writes: AtomicUsize::new(0),
            sync: Mutex::new(SyncState {
                next_seq: 0,
                outstanding: BTreeSet::new(),
            }),
            sync_cv: Condvar::new(),
            doorkeeper,
        });
        let mut tier = DiskTier {
            shared: shared.clone(),
            rings: Vec::new(),
            next_ring: AtomicUsize::new(0),
        };
        for i in 0..shared.cfg.rings {
            // On error `tier` drops here and stops the rings already started.
            tier.rings.push(uring::spawn(shared.clone(), i)?);
        }
        Ok(tier)
    }

    /// Registers caller memory (e.g. the G2 pool mapping) as io_uring fixed
    /// buffers in every ring; I/O on blocks inside it then skips per-request
    /// page pinning. Ranges over 1 GiB are split. Returns the number of
    /// buffers registered per ring (0 where the kernel does not support
    /// fixed buffers; I/O still works with plain operations).
    ///
    /// # Safety
    /// Every range must stay mapped (not unmapped or remapped) until this
    /// `DiskTier` is dropped.
    pub unsafe fn register_buffers(
        &self,
        ranges: &[(*const u8, usize)],
    ) -> Result<usize, DiskError> {
        let ranges: Vec<(usize, usize)> = ranges.iter().map(|&(p, l)| (p as usize, l)).collect();
        let mut n = 0;
        for ring in &self.rings {
            let (tx, rx) = mpsc::sync_channel(1);
            ring.send(Msg::Register(ranges.clone(), tx))
                .map_err(|_| ring_gone())?;
            n = rx.recv().map_err(|_| ring_gone())??;
        }
        Ok(n)
    }

    /// The admission policy: whether a block offered for G3 should be
    /// written. Each call counts as a sighting of the block.
    pub fn admit(&self, ns: u32, key: &[u8]) -> bool {
        match &self.shared.doorkeeper {
            None => true,
            Some(d) => d.seen_before(ns, key),
        }
    }

    /// Queues a write of `len` bytes at `data` for block `(ns, key)`. Never
    /// blocks. On `Ok`, `on_done` runs exactly once, on a ring thread, with
    /// the entry's location and the checksum of its stored bytes (to be
    /// recorded in the catalog) or the error. On `Err` (`QueueFull`,
    /// `Degraded`, `NoSpace`, `TooLarge`, `Invalid`) nothing was queued,
    /// `on_done` is dropped uncalled, and refusals are counted as dropped
    /// writes. With a codec the entry is placed on the ring thread, once
    /// encoded: `NoSpace` then comes through `on_done`.
    ///
    /// Without a codec, `data` aligned to 4 KiB (a G2 slot) is written
    /// directly; any other address is copied into a bounce buffer first.
    ///
    /// # Safety
    /// `data` must be valid for reads of `len` bytes and not modified until
    /// `on_done` has run (the caller holds a lease on the G2 slot).
    pub unsafe fn submit_write(
        &self,
        ns: u32,
        key: &[u8],
        data: *const u8,
        len: usize,
        on_done: WriteDone,
    ) -> Result<(), DiskError> {
        let s = &self.shared;
        let Some(key) = Key::new(key) else {
            return Err(DiskError::Invalid("key longer than 32 bytes"));
        };
        if len > u32::MAX as usize - 2 * PAGE {
            return Err(DiskError::TooLarge);
        }
        if let Some(reason) = s.degraded() {
            s.counters.dropped_writes.fetch_add(1, Ordering::Relaxed);
            return Err(DiskError::Degraded(reason));
        }
        if s.pending_writes.fetch_add(1, Ordering::AcqRel) >= s.cfg.write_queue {
            s.pending_writes.fetch_sub(1, Ordering::AcqRel);
            s.counters.dropped_writes.fetch_add(1, Ordering::Relaxed);
            return Err(DiskError::QueueFull);
        }
        let slot = if s.cfg.codec.is_none() {
            match s.allocate(entry_bytes(len as u64)) {
                Ok(slot) => Some(slot),
                Err(e) => {
                    s.pending_writes.fetch_sub(1, Ordering::AcqRel);
                    return Err(e);
                }
            }
        } else if entry_bytes(len as u64) > s.cfg.region_bytes {
            // Encoding never makes an entry larger: what does not fit raw
            // may not fit encoded either, so it is refused here, not later.
            s.pending_writes.fetch_sub(1, Ordering::AcqRel);
            s.counters.dropped_writes.fetch_add(1, Ordering::Relaxed);
            return Err(DiskError::TooLarge);
        } else {
            None
        };
        let seq = {
            let mut st = s.sync.lock();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.outstanding.insert(seq);
            seq
        };
        let op = WriteOp {
            ns,
            key,
            data,
            len: len as u32,
            slot,
            seq,
            on_done,
            started: Instant::now(),
        };
        if let Err(Msg::Write(op)) = self.ring().send(Msg::Write(op)) {
            // The ring thread is gone (it never exits while we exist unless
            // it failed): undo the bookkeeping.
            if let Some(slot) = &op.slot {
                s.regions.lock().end_write(slot.region);
            }
            s.pending_writes.fetch_sub(1, Ordering::AcqRel);
            s.sync.lock().outstanding.remove(&op.seq);
            s.sync_cv.notify_all();
            s.degrade("G3 ring thread stopped".into());
            return Err(ring_gone());
        }
        Ok(())
    }

    /// Queues a read of the entry at `loc` for block `(ns, key)` into `dst`:
    /// `loc.raw_len` bytes, the length the caller expects the block to have
    /// (its namespace's block size). Never blocks. On `Ok`, `on_done` runs
    /// exactly once on a ring thread: `Ok(())` only when the header matched
    /// `(ns, key, loc)` (both lengths included), the stored data matched its
    /// checksum and, when encoded, authenticated and decoded to exactly
    /// `raw_len` bytes — otherwise the bytes in `dst` are garbage and must
    /// not be used. On `Err` (`Stale`, `Invalid`) `on_done` is dropped
    /// uncalled.
    ///
    /// A 4 KiB-aligned `dst` (a G2 slot) receives an entry that is not
    /// compressed directly (and is decrypted there, in place); a compressed
    /// one is read into a bounce buffer and decompressed into `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `dst_len` bytes and not accessed by
    /// anyone else until `on_done` has run.
    pub unsafe fn submit_read(
        &self,
        loc: DiskLocation,
        ns: u32,
        key: &[u8],
        dst: *mut u8,
        dst_len: usize,
        on_done: ReadDone,
    ) -> Result<(), DiskError> {
        let s = &self.shared;
        let Some(key) = Key::new(key) else {
            return Err(DiskError::Invalid("key longer than 32 bytes"));
        };
        if dst_len < loc.raw_len as usize {
            return Err(DiskError::Invalid("destination shorter than the entry"));
        }
        if loc.len > loc.raw_len {
            return Err(DiskError::Invalid("entry longer stored than decoded"));
        }
        if !s.regions.lock().begin_read(loc.region, loc.generation) {
            s.counters.stale_reads.fetch_add(1, Ordering::Relaxed);
            return Err(DiskError::Stale);
        }
        let op = ReadOp {
            loc,
            ns,
            key,
            dst,
            on_done,
            started: Instant::now(),
        };
        if let Err(Msg::Read(op)) = self.ring().send(Msg::Read(op)) {
            s.regions.lock().end_read(op.loc.region);
            return Err(ring_gone());
        }
        Ok(())
    }

    /// Writes a block and waits for completion (tests, tools). Fails fast
    /// with `QueueFull` instead of waiting for queue room.
    pub fn write_blocking(
        &self,
        ns: u32,
        key: &[u8],
        data: &[u8],
    ) -> Result<(DiskLocation, u64), DiskError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let done: WriteDone = Box::new(move |r| {
            let _ = tx.send(r);
        });
        // SAFETY: `data` is borrowed for this whole call and we wait below
        // until the callback has run, i.e. until the I/O has completed.
        unsafe { self.submit_write(ns, key, data.as_ptr(), data.len(), done)? };
        rx.recv().map_err(|_| ring_gone())?
    }

    /// Reads and verifies a block, waiting for completion (tests, tools).
    pub fn read_blocking(
        &self,
        loc: DiskLocation,
        ns: u32,
        key: &[u8],
        dst: &mut [u8],
    ) -> Result<(), DiskError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let done: ReadDone = Box::new(move |r| {
            let _ = tx.send(r);
        });
        // SAFETY: `dst` is mutably borrowed for this whole call and we wait
        // until the callback has run.
        unsafe { self.submit_read(loc, ns, key, dst.as_mut_ptr(), dst.len(), done)? };
        rx.recv().map_err(|_| ring_gone())?
    }

    /// Waits until every write submitted before this call has completed
    /// (and its `on_done` has run), then `fdatasync`s the file. Blocking: do
    /// not call from an async executor thread or from a completion callback.
    pub fn sync(&self) -> Result<(), DiskError> {
        let s = &self.shared;
        {
            let mut st = s.sync.lock();
            let target = st.next_seq;
            while st.outstanding.first().is_some_and(|&q| q < target) {
                s.sync_cv.wait(&mut st);
            }
        }
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::fdatasync(s.file.as_raw_fd()) } != 0 {
            let e = io::Error::last_os_error();
            s.degrade(format!("fdatasync: {e}"));
            return Err(DiskError::Io(e, "fdatasync of the G3 file".into()));
        }
        Ok(())
    }

    /// Whether `loc`'s region still holds the generation it was written in.
    /// A false answer means the entry is gone (a miss).
    pub fn is_current(&self, loc: &DiskLocation) -> bool {
        self.shared
            .regions
            .lock()
            .is_current(loc.region, loc.generation)
    }

    /// Drains the `(region, generation)` pairs recycled since the last call,
    /// oldest first. The catalog drops its locations in them. Reports are
    /// capped (oldest dropped) if never drained; stale locations are still
    /// detected on read.
    pub fn take_evicted(&self) -> Vec<(u32, u64)> {
        self.shared.regions.lock().take_evicted()
    }

    /// The regions currently holding entries, oldest first — what the
    /// catalog can checkpoint and pass back to [`DiskTier::open`].
    pub fn live_regions(&self) -> Vec<RegionState> {
        self.shared.regions.lock().live_regions()
    }

    /// Why the tier refuses writes, if it does.
    pub fn degraded(&self) -> Option<String> {
        self.shared.degraded()
    }

    pub fn stats(&self) -> DiskStats {
        let s = &self.shared;
        let c = &s.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (used_bytes, evicted_regions) = {
            let t = s.regions.lock();
            (t.used_bytes(), t.evicted_total())
        };
        DiskStats {
            capacity: s.capacity,
            used_bytes,
            blocks_written: l(&c.blocks_written),
            bytes_written: l(&c.bytes_written),
            blocks_read: l(&c.blocks_read),
            bytes_read: l(&c.bytes_read),
            dropped_writes: l(&c.dropped_writes),
            write_errors: l(&c.write_errors),
            read_errors: l(&c.read_errors),
            checksum_failures: l(&c.checksum_failures),
            bad_headers: l(&c.bad_headers),
            stale_reads: l(&c.stale_reads),
            foreign_entries: l(&c.foreign_entries),
            decode_failures: l(&c.decode_failures),
            evicted_regions,
            pending_writes: s.pending_writes.load(Ordering::Relaxed) as u64,
            degraded: s.degraded(),
            direct_io: s.direct,
            write_latency: s.write_lat.snapshot(),
            read_latency: s.read_lat.snapshot(),
            write_bytes_per_s: s.write_rate.bytes_per_s(Instant::now()),
            read_bytes_per_s: s.read_rate.bytes_per_s(Instant::now()),
        }
    }

    /// Stops the ring threads after all queued and in-flight I/O completed
    /// (every callback runs), then syncs the file.
    pub fn close(mut self) -> Result<(), DiskError> {
        self.stop();
        self.sync()
    }

    fn stop(&mut self) {
        for r in &self.rings {
            let _ = r.send(Msg::Shutdown);
        }
        for r in &mut self.rings {
            if let Some(t) = r.thread.take() {
                if t.join().is_err() {
                    tracing::error!("G3 ring thread panicked");
                }
            }
        }
    }

    fn ring(&self) -> &RingHandle {
        let i = self.next_ring.fetch_add(1, Ordering::Relaxed) % self.rings.len();
        &self.rings[i]
    }
}

// The tier is shared across threads (G2 write-behind, onboarding, metrics).
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<DiskTier>();
};

impl Drop for DiskTier {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ring_gone() -> DiskError {
    DiskError::Degraded("G3 ring thread stopped".into())
}

/// Opens the data file with `O_DIRECT`, falling back to buffered I/O (with a
/// warning) where the file system refuses it.
fn open_file(cfg: &DiskConfig) -> Result<(File, bool), DiskError> {
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(flags | libc::O_CLOEXEC)
            .open(&cfg.path)
            .and_then(private)
    };
    match open(libc::O_DIRECT) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %cfg.path.display(), "O_DIRECT refused by the file system; G3 uses buffered I/O");
            open(0)
                .map(|f| (f, false))
                .map_err(|e| DiskError::Io(e, format!("opening {}", cfg.path.display())))
        }
        Err(e) => Err(DiskError::Io(e, format!("opening {}", cfg.path.display()))),
    }
}

/// Blocks are users' prompts: a data file made readable to others (by an
/// older version or by hand) is made private again. A raw device keeps the
/// owner and mode its administrator gave it.
fn private(f: File) -> std::io::Result<File> {
    use std::os::unix::fs::PermissionsExt;
    let meta = f.metadata()?;
    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests;
