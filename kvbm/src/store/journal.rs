//! The journal: one thread that turns the table's notices, in order, into
//! published events and catalog writes (batched), and follows the disk
//! tier's region recycling. Nothing here runs under the table's lock.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Weak;
use std::time::Duration;

use kvtier_proto::v1::{self as pb, event};
use parking_lot::Mutex;

use super::{chained_events, memory_record, pb_tier, Store};
use crate::catalog::{BlockRecord, RegionRecord};
use crate::error::{Error, Result};
use crate::table::Notice;

enum Op {
    Notices(Vec<Notice>),
    /// Reply once everything queued before is applied.
    Barrier(mpsc::Sender<()>),
}

pub(super) struct Journal {
    store: Weak<Store>,
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    rx: Mutex<Option<mpsc::Receiver<Op>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The region records in the catalog: written only when a region's
    /// generation changes, deleted when it is recycled.
    regions: Mutex<HashMap<u32, u64>>,
}

impl Journal {
    pub fn new(store: Weak<Store>, regions: impl Iterator<Item = (u32, u64)>) -> Journal {
        let (tx, rx) = mpsc::channel();
        Journal {
            store,
            tx: Mutex::new(Some(tx)),
            rx: Mutex::new(Some(rx)),
            thread: Mutex::new(None),
            regions: Mutex::new(regions.collect()),
        }
    }

    pub fn start(&self) -> Result<()> {
        let Some(rx) = self.rx.lock().take() else {
            return Ok(());
        };
        let store = self.store.clone();
        let handle = std::thread::Builder::new()
            .name("kvbm-journal".into())
            .spawn(move || run(store, rx))
            .map_err(|e| Error::io("spawning the journal thread", e))?;
        *self.thread.lock() = Some(handle);
        Ok(())
    }

    pub fn send(&self, notices: Vec<Notice>) {
        if let Some(tx) = self.tx.lock().as_ref() {
            let _ = tx.send(Op::Notices(notices));
        }
    }

    /// Waits (up to `timeout`) until everything sent before is applied.
    pub fn barrier(&self, timeout: Duration) {
        let (tx, rx) = mpsc::channel();
        if let Some(jtx) = self.tx.lock().as_ref() {
            let _ = jtx.send(Op::Barrier(tx));
        }
        let _ = rx.recv_timeout(timeout);
    }

    /// Stops the thread after it applied everything sent before.
    pub fn stop(&self) {
        drop(self.tx.lock().take());
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
    }

    /// Records the disk regions in use whose generation the catalog does
    /// not have yet, so a restart keeps the blocks in them.
    pub fn record_regions(&self, store: &Store) {
        let Some(disk) = &store.disk else { return };
        let mut known = self.regions.lock();
        for r in disk.live_regions() {
            if known.get(&r.region) == Some(&r.generation) {
                continue;
            }
            let rec = RegionRecord {
                region: r.region,
                generation: r.generation,
            };
            match store.catalog.put_region(rec) {
                Ok(()) => {
                    known.insert(r.region, r.generation);
                }
                Err(e) => tracing::error!(error = %e, region = r.region, "cannot record region"),
            }
        }
    }

    /// Drops disk copies in regions the disk tier recycled, and their
    /// region records.
    fn apply_recycled(&self, store: &Store) {
        let Some(disk) = &store.disk else { return };
        let recycled = disk.take_evicted();
        if recycled.is_empty() {
            return;
        }
        store.with_table(|c| c.table.regions_recycled(&recycled));
        let mut known = self.regions.lock();
        for (region, _) in recycled {
            if let Err(e) = store.catalog.delete_region(region) {
                tracing::warn!(error = %e, region, "cannot drop region record");
            }
            known.remove(&region);
        }
    }
}

/// Catalog writes gathered from one batch of notices.
#[derive(Default)]
struct Pending {
    volatile: Vec<BlockRecord>,
    durable: Vec<BlockRecord>,
}

fn run(store: Weak<Store>, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let Some(store) = store.upgrade() else { return };
        let mut ops = vec![first];
        while ops.len() < 256 {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut events = Vec::new();
        let mut pending = Pending::default();
        let mut barriers = Vec::new();
        for op in ops {
            match op {
                Op::Notices(notices) => {
                    for n in notices {
                        apply(&store, n, &mut events, &mut pending);
                    }
                }
                Op::Barrier(tx) => barriers.push(tx),
            }
        }
        // Events first: subscribers wait on them, nobody waits on RocksDB.
        store.events.publish(events);
        flush(&store, &mut pending);
        store.journal.apply_recycled(&store);
        for b in barriers {
            let _ = b.send(());
        }
    }
}

fn apply(store: &Store, notice: Notice, events: &mut Vec<event::Kind>, pending: &mut Pending) {
    match notice {
        Notice::Committed { ns, blocks } => {
            let Some(ns) = store.namespace_by_id(ns) else {
                return;
            };
            let stored = chained_events(
                pb::Tier::Host,
                &ns,
                blocks.iter().map(|b| {
                    (
                        b.key.as_bytes().to_vec(),
                        b.parent.clone(),
                        b.tokens.clone(),
                    )
                }),
            );
            pending
                .volatile
                .extend(blocks.into_iter().map(|b| memory_record(&ns, b)));
            events.extend(stored.into_iter().map(event::Kind::Stored));
        }
        Notice::Durable(record) => {
            if let Some(ns) = store.namespace_by_id(record.ns) {
                events.push(event::Kind::Stored(pb::BlockStored {
                    tier: pb::Tier::Disk as i32,
                    namespace: ns.name.clone(),
                    model: ns.layout.model.clone(),
                    keys: vec![record.key.clone()],
                    parent: record.parent.clone(),
                    token_ids: record.tokens.clone(),
                    tokens_per_block: ns.layout.tokens_per_block,
                }));
            }
            pending.durable.push(record);
        }
        Notice::Removed { ns, tier, keys } => {
            let name = store.namespace_by_id(ns).map(|n| n.name.clone());
            events.push(event::Kind::Removed(pb::BlockRemoved {
                tier: pb_tier(tier) as i32,
                namespace: name.unwrap_or_default(),
                keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            }));
        }
        Notice::Forget(keys) => {
            // Pending puts first, so a delete is never undone.
            flush(store, pending);
            let keys: Vec<_> = keys
                .into_iter()
                .map(|(ns, k)| (ns, k.as_bytes().to_vec()))
                .collect();
            if let Err(e) = store.catalog.delete_blocks(&keys) {
                tracing::error!(error = %e, "catalog delete failed");
            }
        }
        Notice::Cleared(tier) => {
            events.push(event::Kind::Cleared(pb::TierCleared {
                tier: pb_tier(tier) as i32,
            }));
        }
    }
}

fn flush(store: &Store, pending: &mut Pending) {
    if !pending.volatile.is_empty() {
        if let Err(e) = store.catalog.put_blocks(&pending.volatile, false) {
            tracing::error!(error = %e, "catalog write failed");
        }
        pending.volatile.clear();
    }
    if !pending.durable.is_empty() {
        store.journal.record_regions(store);
        if let Err(e) = store.catalog.put_blocks(&pending.durable, true) {
            tracing::error!(error = %e, "catalog write failed");
        }
        pending.durable.clear();
    }
}
