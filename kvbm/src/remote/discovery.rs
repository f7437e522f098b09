//! How a node learns other nodes' segments without ever putting the network
//! on a lookup's path: each writer puts a small index object
//! ([`Announcement`]) after each segment, under names that sort by creation
//! time; every node lists them incrementally (`start-after` the newest time it
//! has seen, less a clock-skew window, so a writer whose clock lags is not
//! missed), reads the ones it has not seen and hands their footers to its
//! catalog.

use std::collections::HashMap;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::bucket::{Bucket, Miss};
use super::segment::{
    index_name, index_time, segment_name, Announcement, Origin, Sealed, INDEX_DIR, MAX_FOOTER,
};

/// Index objects read per poll at most; the rest come with the next poll.
const PER_POLL: usize = 4096;

/// Index objects longer than this are refused unread (a footer and its
/// header, nothing more).
const MAX_INDEX: u64 = MAX_FOOTER as u64 + 4096;

/// Segment names one orphan sweep looks at, at most.
const SWEEP_MAX: usize = 1 << 20;

/// Deadline of one orphan sweep's listing (many pages).
const SWEEP_DEADLINE: Duration = Duration::from_secs(120);

/// What one poll found.
#[derive(Debug, Default)]
pub struct Found {
    /// Segments announced since the last poll: name and announcement.
    pub segments: Vec<(String, Announcement)>,
    /// Index objects that could not be read or decoded (skipped for good).
    pub refused: usize,
}

/// A node's incremental view of the bucket's index objects.
#[derive(Debug)]
pub struct Discovery {
    skew_ms: u64,
    /// The newest creation time seen (milliseconds).
    high_ms: u64,
    /// Index objects inside the skew window, already handled.
    seen: HashMap<String, u64>,
}

impl Discovery {
    /// Starts after `since_ms` (0: from the beginning; a restarted node
    /// passes what its catalog recorded), listing back `skew` before the
    /// newest time seen.
    pub fn new(since_ms: u64, skew: Duration) -> Self {
        Discovery {
            skew_ms: skew.as_millis() as u64,
            high_ms: since_ms,
            seen: HashMap::new(),
        }
    }

    /// The newest creation time seen, for the catalog to keep.
    pub fn high_ms(&self) -> u64 {
        self.high_ms
    }

    /// Lists index objects newer than the window's start and reads those
    /// not seen before. A failed listing fails the poll (nothing is marked
    /// seen); a failed or refused index object is skipped.
    pub async fn poll(&mut self, bucket: &Bucket) -> Result<Found, Miss> {
        let from = self.high_ms.saturating_sub(self.skew_ms);
        let dir = bucket.path(INDEX_DIR);
        // Exclusive start: every name of `from` or later sorts after it.
        let offset = bucket.path(&format!("{INDEX_DIR}/{:013}", from.saturating_sub(1)));
        let store = bucket.store().clone();
        // S3 lists in key order, so the first PER_POLL unseen names are the
        // oldest; the listing stops there (what other nodes wrote bounds
        // neither memory nor time).
        let seen = &self.seen;
        let fresh = bucket
            .guarded(bucket.timeout(), async {
                let mut list = store.list_with_offset(Some(&dir), &offset);
                let mut fresh = Vec::new();
                while let Some(m) = list.try_next().await? {
                    if !seen.contains_key(m.location.as_ref()) {
                        fresh.push(m);
                        if fresh.len() == PER_POLL {
                            break;
                        }
                    }
                }
                Ok(fresh)
            })
            .await?;
        let mut found = Found::default();
        for m in fresh {
            let name = m.location.to_string();
            let ms = index_time(&name).unwrap_or(0);
            self.seen.insert(name.clone(), ms);
            self.high_ms = self.high_ms.max(ms);
            if m.size > MAX_INDEX {
                found.refused += 1;
                continue;
            }
            let got = bucket
                .guarded(bucket.timeout(), async {
                    store.get(&m.location).await?.bytes().await
                })
                .await;
            match got.ok().and_then(|b| Announcement::decode(&b).ok()) {
                Some(a) => found.segments.push((segment_name(&a.origin), a)),
                None => found.refused += 1,
            }
        }
        let keep_from = self.high_ms.saturating_sub(2 * self.skew_ms);
        self.seen.retain(|_, ms| *ms >= keep_from);
        Ok(found)
    }
}

impl Bucket {
    /// Writes a sealed segment, then its index object: a segment is
    /// announced only once it is whole. Returns the segment's name.
    pub async fn publish(&self, s: &Sealed) -> Result<String, Miss> {
        let name = segment_name(&s.origin);
        self.put_segment(&name, s).await?;
        let idx: Path = self.path(&index_name(&s.origin));
        let body = Announcement::of(s).encode();
        let store = self.store().clone();
        self.guarded(
            self.timeout(),
            async move { store.put(&idx, body.into()).await },
        )
        .await?;
        Ok(name)
    }

    /// Segments `node` wrote that `known` does not list and that are older
    /// than `min_age`: uploads whose writer died before it announced or
    /// recorded them, which nothing will read. Lists `seg/` (every node's
    /// segments; at most a million names per sweep). Names are relative to
    /// the bucket's prefix, as [`segment_name`] makes them.
    pub async fn orphans(
        &self,
        node: u64,
        min_age: Duration,
        known: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<String>, Miss> {
        let dir = self.path("seg");
        let skip = self.path("").as_ref().len();
        let store = self.store().clone();
        let mine = format!("/{node:016x}-");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let cutoff_ms = now.saturating_sub(min_age).as_millis() as i64;
        self.guarded(SWEEP_DEADLINE, async {
            let mut list = store.list(Some(&dir));
            let (mut out, mut seen) = (Vec::new(), 0usize);
            while let Some(m) = list.try_next().await? {
                seen += 1;
                if seen > SWEEP_MAX {
                    break;
                }
                let full = m.location.as_ref();
                let name = full.get(skip..).unwrap_or(full).trim_start_matches('/');
                let old = m.last_modified.timestamp_millis() < cutoff_ms;
                if name.contains(&mine) && old && !known(name) {
                    out.push(name.to_owned());
                }
            }
            Ok(out)
        })
        .await
    }

    /// Deletes a segment this node wrote and its index object (index first:
    /// no reader learns of a segment that is going).
    pub async fn retract(&self, origin: &Origin) -> Result<(), Miss> {
        self.delete(&index_name(origin)).await?;
        self.delete(&segment_name(origin)).await
    }
}
