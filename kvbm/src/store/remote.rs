//! The object-store driver: what the store does with the G4 tier. Lookups
//! extend their prefix with it (no network), an acquire first promotes the
//! chain's G4 continuation into host memory (one deadline for the chain),
//! admitted blocks are copied out of the pool and offered for upload, and
//! what the tier gains or loses is published like any tier's events.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use bytes::Bytes;
use kvtier_proto::v1::{self as pb, event};

use super::{Namespace, Store};
use crate::catalog::Catalog;
use crate::config::RemoteConfig;
use crate::error::Result;
use crate::index::Key;
use crate::remote::tier::{Change, Piece, RemoteTier, Upload};
use crate::table::NewBlock;

/// A block to offer: its key, and its parent and tokens when the caller has
/// them (otherwise they come from the catalog).
pub(super) type Offer = (Key, Option<(Vec<u8>, Vec<u32>)>);

/// Opens the tier; its changes reach the store once `hook` is set.
pub(super) fn open_remote(
    cfg: &RemoteConfig,
    catalog: Arc<dyn Catalog>,
    hook: Arc<OnceLock<Weak<Store>>>,
) -> Result<RemoteTier> {
    RemoteTier::open(
        cfg.clone(),
        catalog,
        Box::new(move |changes| {
            if let Some(store) = hook.get().and_then(Weak::upgrade) {
                store.publish_remote(changes);
            }
        }),
    )
}

impl Store {
    /// How many of `keys` after the first `from` the bucket holds.
    pub(super) fn remote_run(&self, ns: &Namespace, keys: &[Key], from: usize) -> usize {
        match &self.remote {
            Some(r) if from < keys.len() => r.locate(&ns.name, &keys[from..]),
            _ => 0,
        }
    }

    /// Extends a lookup's answer: the bucket continues the local prefix,
    /// and its own prefix is counted from the first key, as the other
    /// tiers' are.
    pub(super) fn extend_lookup(
        &self,
        ns: &Namespace,
        keys: &[Key],
        tiers: &mut Vec<pb::TierPrefix>,
        locations: &mut Vec<i32>,
    ) {
        if self.remote.is_none() {
            return;
        }
        let local = locations.len();
        let more = self.remote_run(ns, keys, local);
        locations.extend(std::iter::repeat_n(pb::Tier::Remote as i32, more));
        // With nothing local (the common case for a node that never saw the
        // prefix), both walks are the same one.
        let from_first = if local == 0 {
            more
        } else {
            self.remote_run(ns, keys, 0)
        };
        tiers.push(pb::TierPrefix {
            tier: pb::Tier::Remote as i32,
            blocks: from_first as u32,
        });
    }

    /// Brings the G4 continuation of the prefix of `keys` held locally into
    /// host memory, so the acquire that follows finds it there. The blocks
    /// are reserved first and the bytes copied into their slots as they
    /// arrive; what verified, from the first block on, is committed. Whatever
    /// fails (a miss, a slow server, a full pool) leaves the rest as it was:
    /// the engine computes it.
    pub(super) async fn promote_remote(&self, ns: &Namespace, keys: &[Key]) {
        let Some(r) = &self.remote else { return };
        let local = self.core.lock().table.lookup(ns.id, keys).locations.len();
        let n = self.remote_run(ns, keys, local);
        if n == 0 {
            return;
        }
        let plan = r.plan(&ns.name, &keys[local..local + n], ns.block_bytes);
        if plan.blocks.is_empty() {
            return;
        }
        let s = self.daemon_session();
        let keys: Vec<Vec<u8>> = plan
            .blocks
            .iter()
            .map(|b| b.key.as_bytes().to_vec())
            .collect();
        let blocks = plan
            .blocks
            .iter()
            .zip(&keys)
            .map(|(b, key)| NewBlock {
                key: key.clone(),
                parent: b.parent.clone(),
                tokens: b.tokens.clone(),
            })
            .collect();
        let started = Instant::now();
        let Ok(grants) = self.with_table(|c| c.table.reserve(s.session, ns.id, blocks, started))
        else {
            // The pool is pinned full: nothing to promote into.
            return;
        };
        // Reservations expire after the lease TTL and their slots go to
        // others: every copy into them ends well before.
        let limit = self.cfg.lease_ttl / 2;
        let mut pieces = r.read(plan, limit);
        let mut verified = vec![false; grants.len()];
        let copy = async {
            while let Some(piece) = pieces.recv().await {
                match piece {
                    Piece::Data { block, at, bytes } => {
                        let Some(g) = grants.get(block).filter(|g| g.length > 0) else {
                            // Already in the pool (another writer was first).
                            continue;
                        };
                        if at as u64 + bytes.len() as u64 > g.length {
                            return;
                        }
                        // SAFETY: reserved by this call's own session until
                        // commit, within the reservation's lifetime (`limit`).
                        unsafe {
                            self.pool
                                .slice_mut(g.offset + at as u64, bytes.len() as u64)
                        }
                        .copy_from_slice(&bytes);
                    }
                    Piece::Verified(block) => {
                        if let Some(v) = verified.get_mut(block) {
                            *v = true;
                        }
                    }
                }
            }
        };
        let _ = tokio::time::timeout(limit.saturating_sub(started.elapsed()), copy).await;
        drop(pieces);
        let ok = verified.iter().take_while(|&&v| v).count();
        let _ = self.commit(s.session, &ns.name, &keys[..ok]);
        // The session's end releases the rest of the reservations.
    }

    /// Offers those of `blocks` the bucket lacks and that were seen
    /// `min_seen` times for upload: pinned now, copied out of the pool on
    /// the tier's blocking pool, then unpinned. Never waits for the copy.
    pub(super) fn offer_remote(&self, ns: &Arc<Namespace>, blocks: Vec<Offer>, min_seen: u32) {
        let Some(r) = &self.remote else { return };
        let keys: Vec<Key> = blocks.iter().map(|(k, _)| *k).collect();
        let wanted = r.wanted(&ns.name, &keys);
        let mut blocks: Vec<Offer> = blocks
            .into_iter()
            .zip(wanted)
            .filter_map(|(b, w)| w.then_some(b))
            .collect();
        if blocks.is_empty() {
            return;
        }
        let keys: Vec<Key> = blocks.iter().map(|(k, _)| *k).collect();
        let held = self.with_table(|c| c.table.hold(ns.id, &keys, min_seen));
        if held.is_empty() {
            return;
        }
        let Some(store) = self.me.upgrade() else {
            self.with_table(|c| {
                c.table
                    .unhold(&held.iter().map(|h| h.0).collect::<Vec<_>>())
            });
            return;
        };
        let ns = ns.clone();
        r.spawn_blocking(move || {
            let Some(r) = &store.remote else { return };
            for &(_, key, slot) in &held {
                let Some(i) = blocks.iter().position(|(k, _)| *k == key) else {
                    continue;
                };
                let (parent, tokens) = match blocks[i].1.take() {
                    Some(pt) => pt,
                    None => match store.catalog.get_block(ns.id, key.as_bytes()) {
                        Ok(Some(rec)) => (rec.parent, rec.tokens),
                        _ => continue,
                    },
                };
                // SAFETY: pinned by `hold` until the `unhold` below.
                let data =
                    Bytes::copy_from_slice(unsafe { store.pool.slice(slot, ns.block_bytes) });
                r.offer(Upload {
                    namespace: ns.name.clone(),
                    key,
                    parent,
                    tokens,
                    data,
                });
            }
            let ids: Vec<u32> = held.iter().map(|h| h.0).collect();
            store.with_table(|c| c.table.unhold(&ids));
        });
    }

    /// Publishes what the tier gained or lost, for namespaces registered
    /// here (a block of a namespace this daemon does not know is of no
    /// use to its engines).
    fn publish_remote(&self, changes: Vec<Change>) {
        let events = changes
            .into_iter()
            .flat_map(|c| self.remote_events(c))
            .collect();
        self.events.publish(events);
    }

    /// One change as events (one per run of chained blocks); none for a
    /// namespace not registered here.
    pub(super) fn remote_events(&self, c: Change) -> Vec<event::Kind> {
        match c {
            Change::Stored { namespace, blocks } => {
                let Ok(ns) = self.namespace(&namespace) else {
                    return Vec::new();
                };
                super::chained_events(pb::Tier::Remote, &ns, blocks)
                    .into_iter()
                    .map(event::Kind::Stored)
                    .collect()
            }
            Change::Removed { namespace, keys } => {
                if self.namespace(&namespace).is_err() {
                    return Vec::new();
                }
                vec![event::Kind::Removed(pb::BlockRemoved {
                    tier: pb::Tier::Remote as i32,
                    namespace,
                    keys,
                })]
            }
        }
    }

    /// The tier's line in the stats.
    pub(super) fn remote_stats(&self) -> Option<pb::TierStats> {
        let r = self.remote.as_ref()?;
        let s = r.stats();
        Some(pb::TierStats {
            tier: pb::Tier::Remote as i32,
            capacity_bytes: r.capacity(),
            used_bytes: s.own_bytes,
            blocks: s.blocks,
            hits: s.hits,
            misses: s.misses,
            evictions: s.evicted_segments,
            dropped_writes: s.dropped_uploads,
            checksum_failures: s.checksum_failures,
            degraded: s.degraded,
            degraded_reason: if s.degraded {
                "object store unreachable: requests stopped until a probe succeeds".into()
            } else {
                String::new()
            },
            read_bytes_per_s: 0,
            write_bytes_per_s: 0,
        })
    }
}
