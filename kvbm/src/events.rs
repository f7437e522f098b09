//! Block events: numbered batches, a replay ring, live fan-out.
//!
//! Each batch gets the next sequence number of this incarnation (a random id
//! chosen at start). Subscribers resume from a sequence number while the ring
//! still holds it; otherwise they get a snapshot of the present content first
//! (built by the store) and then the live stream.

use std::collections::VecDeque;
use std::sync::Arc;

use kvtier_proto::v1::{event, Event, EventBatch};
use parking_lot::Mutex;
use tokio::sync::broadcast;

pub struct EventBus {
    incarnation: String,
    inner: Mutex<Ring>,
    live: broadcast::Sender<Arc<EventBatch>>,
}

struct Ring {
    /// Sequence number of the last batch published (0: none yet).
    seq: u64,
    batches: VecDeque<Arc<EventBatch>>,
    capacity: usize,
}

/// Where a subscription starts.
pub enum Resume {
    /// The ring holds every batch after `from_seq - 1`: these, then live.
    Replay(Vec<Arc<EventBatch>>),
    /// Too old, unknown incarnation or a fresh subscriber: a snapshot must
    /// come first; the live stream continues after `seq`.
    Snapshot { seq: u64 },
}

impl EventBus {
    pub fn new(capacity: usize) -> EventBus {
        let incarnation = format!("{:016x}", rand::random::<u64>());
        let (live, _) = broadcast::channel(1024);
        EventBus {
            incarnation,
            inner: Mutex::new(Ring {
                seq: 0,
                batches: VecDeque::new(),
                capacity,
            }),
            live,
        }
    }

    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    pub fn seq(&self) -> u64 {
        self.inner.lock().seq
    }

    /// Publishes one batch (nothing when `events` is empty).
    pub fn publish(&self, events: Vec<event::Kind>) {
        if events.is_empty() {
            return;
        }
        let mut ring = self.inner.lock();
        ring.seq += 1;
        let batch = Arc::new(EventBatch {
            incarnation: self.incarnation.clone(),
            seq: ring.seq,
            events: events
                .into_iter()
                .map(|k| Event { kind: Some(k) })
                .collect(),
            snapshot: false,
        });
        if ring.batches.len() == ring.capacity {
            ring.batches.pop_front();
        }
        ring.batches.push_back(batch.clone());
        // Sent under the ring lock so live order equals sequence order. No
        // receivers is fine.
        let _ = self.live.send(batch);
    }

    /// Registers a live receiver and decides how a subscriber that asked for
    /// `from_seq` of `incarnation` starts. The receiver is created first, so
    /// nothing published in between is lost (duplicates are skipped by seq).
    pub fn subscribe(
        &self,
        from_seq: u64,
        incarnation: &str,
    ) -> (broadcast::Receiver<Arc<EventBatch>>, Resume) {
        let ring = self.inner.lock();
        let rx = self.live.subscribe();
        let same = incarnation.is_empty() || incarnation == self.incarnation;
        let oldest = ring.batches.front().map(|b| b.seq).unwrap_or(ring.seq + 1);
        let resume = if from_seq == 0 || !same || from_seq < oldest || from_seq > ring.seq + 1 {
            Resume::Snapshot { seq: ring.seq }
        } else {
            Resume::Replay(
                ring.batches
                    .iter()
                    .filter(|b| b.seq >= from_seq)
                    .cloned()
                    .collect(),
            )
        };
        (rx, resume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_proto::v1::TierCleared;

    fn cleared() -> event::Kind {
        event::Kind::Cleared(TierCleared { tier: 2 })
    }

    #[test]
    fn replay_from_ring_then_snapshot_when_too_old() {
        let bus = EventBus::new(3);
        for _ in 0..5 {
            bus.publish(vec![cleared()]);
        }
        let inc = bus.incarnation().to_string();
        match bus.subscribe(4, &inc).1 {
            Resume::Replay(b) => assert_eq!(b.iter().map(|b| b.seq).collect::<Vec<_>>(), [4, 5]),
            Resume::Snapshot { .. } => panic!("4 is in the ring"),
        }
        assert!(matches!(bus.subscribe(6, &inc).1, Resume::Replay(b) if b.is_empty()));
        assert!(matches!(
            bus.subscribe(2, &inc).1,
            Resume::Snapshot { seq: 5 }
        ));
        assert!(matches!(
            bus.subscribe(0, &inc).1,
            Resume::Snapshot { seq: 5 }
        ));
        assert!(matches!(
            bus.subscribe(4, "other").1,
            Resume::Snapshot { seq: 5 }
        ));
        assert!(matches!(
            bus.subscribe(9, &inc).1,
            Resume::Snapshot { seq: 5 }
        ));
    }
}
