//! Admission policy of the G3 tier: which blocks are worth a write to the
//! drive.
//!
//! `Frequency` admits a block on its second sighting. Sightings are kept in a
//! direct-mapped table of key hashes (a "doorkeeper"): slot `h % N` remembers
//! the last hash that landed there. A collision simply forgets the older key,
//! which can only delay an admission, never admit a block seen once (short of
//! a 64-bit hash collision). The table is fixed-size, lock-free and ages by
//! itself as new keys overwrite old ones.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Which blocks [`super::DiskTier::admit`] lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Admission {
    /// Every block offered is written.
    Always,
    /// Only blocks offered at least twice (recently) are written, sparing the
    /// drive one-hit wonders. The default.
    #[default]
    Frequency,
}

/// Slots of the doorkeeper: 64 Ki × 8 B = 512 KiB, enough to remember the
/// last ~64 K distinct blocks (≈128 GiB of 2 MiB blocks).
pub const DOORKEEPER_SLOTS: usize = 1 << 16;

pub struct Doorkeeper {
    slots: Box<[AtomicU64]>,
}

impl Doorkeeper {
    pub fn new(slots: usize) -> Doorkeeper {
        let n = slots.max(1).next_power_of_two();
        Doorkeeper {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Records a sighting of `(ns, key)`; true when it was already recorded.
    pub fn seen_before(&self, ns: u32, key: &[u8]) -> bool {
        // `| 1` keeps 0 free as the "empty slot" marker.
        let h = xxh3_64_with_seed(key, ns as u64) | 1;
        let slot = &self.slots[(h >> 1) as usize & (self.slots.len() - 1)];
        slot.swap(h, Ordering::Relaxed) == h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_sighting_admits() {
        let d = Doorkeeper::new(1024);
        assert!(!d.seen_before(1, b"a"));
        assert!(d.seen_before(1, b"a"));
        assert!(!d.seen_before(2, b"a"), "namespaces are distinct");
        assert!(!d.seen_before(1, b"b"));
        assert!(d.seen_before(1, b"b"));
    }
}
