//! The disk driver: write-behind and reads of the disk tier, submitted to
//! its io_uring threads for the table's jobs; completions go back to the
//! table.

use std::time::{Duration, Instant};

use super::*;

impl Store {
    /// Queues the block's copy to disk when the disk tier admits it. Never
    /// blocks: a full queue or a degraded disk drops the write (counted,
    /// and reported by `sync`).
    pub(super) fn write_behind(&self, ns: &Namespace, id: u32, key: Key, record: BlockRecord) {
        let Some(disk) = &self.disk else { return };
        if !disk.admit(ns.id, key.as_bytes()) {
            return;
        }
        if let StartWrite::Job(job) = self.with_table(|c| c.table.start_write(id, key, false)) {
            self.submit_write(job, record, None);
        }
    }

    /// Submits a write started by the table. With `wait_until`, a full
    /// queue is waited out until then (back-pressure); otherwise it drops
    /// the write.
    pub(super) fn submit_write(
        &self,
        job: WriteJob,
        record: BlockRecord,
        wait_until: Option<Instant>,
    ) {
        let Some(disk) = &self.disk else {
            return self.write_finished(None, job, record, Err(DiskError::Invalid("no disk tier")));
        };
        let ticket = {
            let mut inf = self.inflight.lock();
            inf.next += 1;
            let t = inf.next;
            inf.pending.insert(t);
            t
        };
        let started = Instant::now();
        loop {
            let me = self.me.clone();
            let (j, r) = (job.clone(), record.clone());
            let done = Box::new(
                move |res: std::result::Result<(DiskLocation, u64), DiskError>| {
                    if let Some(store) = me.upgrade() {
                        store
                            .metrics
                            .disk_latency
                            .get_or_create(&OpLabels { op: OpLabel::write })
                            .observe(started.elapsed().as_secs_f64());
                        store.write_finished(Some(ticket), j, r, res);
                    }
                },
            );
            // SAFETY: the slot is pinned by the table's write job (neither
            // evicted nor reused) until `write_finished` applies the result.
            let ptr = unsafe { self.pool.base().add(job.slot as usize) };
            let submitted = unsafe {
                disk.submit_write(
                    job.ns,
                    job.key.as_bytes(),
                    ptr,
                    job.block_bytes as usize,
                    done,
                )
            };
            match submitted {
                Ok(()) => return,
                Err(DiskError::QueueFull) if wait_until.is_some_and(|t| Instant::now() < t) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "write-behind dropped");
                    return self.write_finished(Some(ticket), job, record, Err(e));
                }
            }
        }
    }

    /// Applies the end of a write-behind (a ring thread, or the submitter
    /// when it was not queued).
    pub(super) fn write_finished(
        &self,
        ticket: Option<u64>,
        job: WriteJob,
        record: BlockRecord,
        res: std::result::Result<(DiskLocation, u64), DiskError>,
    ) {
        let outcome = match res {
            Ok((loc, checksum)) => WriteOutcome::Written {
                disk: DiskRef {
                    region: loc.region,
                    generation: loc.generation,
                    offset: loc.offset,
                    len: loc.len,
                },
                checksum,
            },
            Err(e) => {
                if !matches!(e, DiskError::QueueFull | DiskError::Degraded(_)) {
                    tracing::warn!(error = %e, "write-behind failed");
                }
                WriteOutcome::NotWritten
            }
        };
        self.with_table(|c| c.table.write_done(&job, outcome, record));
        if let Some(t) = ticket {
            let mut inf = self.inflight.lock();
            inf.pending.remove(&t);
            self.inflight_done.notify_all();
        }
    }

    pub(super) fn submit_load(&self, job: LoadJob) {
        let Some(disk) = &self.disk else {
            return self.load_finished(job, Err(DiskError::Invalid("no disk tier")));
        };
        let me = self.me.clone();
        let started = Instant::now();
        let j = job.clone();
        let done = Box::new(move |res: std::result::Result<(), DiskError>| {
            if let Some(store) = me.upgrade() {
                store
                    .metrics
                    .disk_latency
                    .get_or_create(&OpLabels { op: OpLabel::read })
                    .observe(started.elapsed().as_secs_f64());
                store.load_finished(j, res);
            }
        });
        let loc = DiskLocation {
            region: job.disk.region,
            generation: job.disk.generation,
            offset: job.disk.offset,
            len: job.disk.len,
            raw_len: job.block_bytes as u32,
        };
        // SAFETY: the slot is a fresh pool slot of `slot_bytes`, pinned and
        // marked loading, so nobody else touches it until the completion.
        let dst = unsafe { self.pool.base().add(job.slot as usize) };
        let submitted = unsafe {
            disk.submit_read(
                loc,
                job.ns,
                job.key.as_bytes(),
                dst,
                job.slot_bytes as usize,
                done,
            )
        };
        if let Err(e) = submitted {
            self.load_finished(job, Err(e));
        }
    }

    pub(super) fn load_finished(&self, job: LoadJob, res: std::result::Result<(), DiskError>) {
        let outcome = match &res {
            Ok(()) => LoadOutcome::Loaded,
            Err(
                DiskError::ChecksumMismatch
                | DiskError::BadHeader
                | DiskError::Stale
                | DiskError::Undecodable,
            ) => LoadOutcome::Corrupt,
            Err(DiskError::Foreign) => LoadOutcome::Foreign,
            Err(_) => LoadOutcome::Failed,
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, key = ?job.key, "disk read failed; the block is a miss");
        }
        self.with_table(|c| {
            // A stale job (never expected: a loading block is pinned) still
            // wakes its readers, with a miss.
            let ok = c.table.load_done(&job, outcome).unwrap_or(false);
            for w in c.waiters.remove(&job.id).unwrap_or_default() {
                let _ = w.send(ok);
            }
        });
    }
}

/// Opens the disk tier (when configured) with the regions the catalog
/// recorded, and registers the host pool with its rings.
pub(super) fn open_disk(
    cfg: &Config,
    pool: &Pool,
    regions: &[RegionRecord],
    codec: Option<Arc<DiskCodec>>,
) -> Result<Option<DiskTier>> {
    if cfg.disk_bytes == 0 {
        return Ok(None);
    }
    let mut dcfg = DiskConfig::new(cfg.disk_path.clone(), cfg.disk_bytes);
    dcfg.codec = codec;
    dcfg.region_bytes = cfg.region_bytes;
    dcfg.queue_depth = cfg.disk_queue_depth;
    dcfg.write_queue = cfg.write_queue;
    dcfg.admit = match cfg.disk_admit {
        crate::config::Admission::Always => crate::disk::Admission::Always,
        crate::config::Admission::Frequency => crate::disk::Admission::Frequency,
    };
    let recovered = regions.iter().map(|r| RegionState {
        region: r.region,
        generation: r.generation,
    });
    let tier = DiskTier::open(dcfg, recovered)
        .map_err(|e| Error::new(ErrorKind::Io, format!("disk tier: {e}")))?;
    // SAFETY: the pool mapping lives as long as the store, which owns both;
    // registered buffers let the rings skip page pinning.
    // One buffer per segment: each is its own memfd mapping.
    let ranges: Vec<(*const u8, usize)> = pool
        .segments()
        .into_iter()
        .map(|(start, len)| {
            (
                unsafe { pool.base().add(start as usize) } as *const u8,
                len as usize,
            )
        })
        .collect();
    if let Err(e) = unsafe { tier.register_buffers(&ranges) } {
        tracing::warn!(error = %e, "cannot register the host pool with io_uring");
    }
    Ok(Some(tier))
}
