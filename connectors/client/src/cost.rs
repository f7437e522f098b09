//! Whether loading a cached prefix beats recomputing it.
//!
//! One model for whoever decides with it: the engine connectors (how much of
//! a match to load) and the router (how much a worker's cached prefix is
//! worth). Both sides of the comparison are measured where the engine runs:
//!
//! - loading: seconds per byte from each tier to the engine, end to end
//!   (daemon, copies, the engine step that waits), observed on real loads;
//!   a block from disk, or from the shared object store (G4), pays that
//!   tier's read into host memory and then the host's rate;
//! - recomputing: the engine's seconds per prefill token, by prompt length
//!   (attention makes long prefills dearer per token), observed on real
//!   prefill steps.
//!
//! Until a rate is measured the model assumes loading wins: a cache that is
//! never tried is never measured. A disk or G4 rate not refreshed for
//! [`STALE_AFTER`] counts as unmeasured again, so a tier that got faster (or
//! a load that was slow once) is tried again. G4 has a rate of its own: it
//! is typically several times slower than a local disk, and a node's match
//! often continues there past what the node holds.

use std::time::{Duration, Instant};

/// Weight of a new observation in the moving averages.
const ALPHA: f64 = 0.3;
/// After this long without a disk (or G4) load, its rate is tried again.
pub const STALE_AFTER: Duration = Duration::from_secs(300);
/// Prefill lengths are bucketed by powers of two up to 2^BUCKETS tokens.
const BUCKETS: usize = 24;
/// Prefill steps shorter than this say little about prefill speed.
pub const MIN_PREFILL_TOKENS: u64 = 256;

#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    /// Seconds per unit (byte or token), averaged.
    secs_per_unit: f64,
    last: Option<Instant>,
}

impl Rate {
    fn observe(&mut self, secs_per_unit: f64, now: Instant) {
        if !secs_per_unit.is_finite() || secs_per_unit < 0.0 {
            return;
        }
        self.secs_per_unit = match self.last {
            None => secs_per_unit,
            Some(_) => (1.0 - ALPHA) * self.secs_per_unit + ALPHA * secs_per_unit,
        };
        self.last = Some(now);
    }

    fn get(&self) -> Option<f64> {
        self.last.map(|_| self.secs_per_unit)
    }
}

/// Where a prefix is loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Host,
    Disk,
    /// The object store every node shares (G4).
    Remote,
}

/// The measured costs of loading and of recomputing.
#[derive(Debug, Clone, Default)]
pub struct CostModel {
    host: Rate,
    disk: Rate,
    remote: Rate,
    prefill: [Rate; BUCKETS],
}

fn bucket(tokens: u64) -> usize {
    (64 - tokens.max(1).leading_zeros() as usize - 1).min(BUCKETS - 1)
}

impl CostModel {
    pub fn new() -> CostModel {
        CostModel::default()
    }

    /// A model that knows its rates already: loads at `host_bytes_per_s`
    /// from host memory and `disk_bytes_per_s` more from disk (0 or less:
    /// unknown), prefill at `prefill_tokens_per_s` at every length; G4 is
    /// left unmeasured. What a decider that observes no loads itself (the
    /// router, which prices G4 on its own) starts from.
    pub fn from_rates(
        host_bytes_per_s: f64,
        disk_bytes_per_s: f64,
        prefill_tokens_per_s: f64,
    ) -> CostModel {
        let now = Instant::now();
        let mut m = CostModel::new();
        let rate = |per_s: f64| (per_s.is_finite() && per_s > 0.0).then(|| 1.0 / per_s);
        if let Some(r) = rate(host_bytes_per_s) {
            m.host.observe(r, now);
        }
        if let Some(r) = rate(disk_bytes_per_s) {
            m.disk.observe(r, now);
        }
        if let Some(r) = rate(prefill_tokens_per_s) {
            for b in m.prefill.iter_mut() {
                b.observe(r, now);
            }
        }
        m
    }

    /// A load of `host_bytes` from host memory and `disk_bytes` from disk
    /// took `secs`, end to end.
    pub fn observe_load(&mut self, host_bytes: u64, disk_bytes: u64, secs: f64) {
        self.observe_load_at(host_bytes, disk_bytes, secs, Instant::now())
    }

    fn observe_load_at(&mut self, host_bytes: u64, disk_bytes: u64, secs: f64, now: Instant) {
        let total = host_bytes + disk_bytes;
        if total == 0 {
            return;
        }
        if disk_bytes == 0 {
            return self.host.observe(secs / total as f64, now);
        }
        // Every byte crosses host memory; what is left is the disk's share.
        // With no host rate yet, the disk takes the blame for all of it.
        let via_host = self.host.get().unwrap_or(0.0) * total as f64;
        self.disk
            .observe((secs - via_host).max(0.0) / disk_bytes as f64, now);
    }

    /// Reading `bytes` from disk into host memory took `secs` (a promotion
    /// measured on its own, without the copy to the engine).
    pub fn observe_disk_read(&mut self, bytes: u64, secs: f64) {
        self.observe_promotion(bytes, 0, secs)
    }

    /// Reading `bytes` from the object store (G4) into host memory took
    /// `secs`.
    pub fn observe_remote_read(&mut self, bytes: u64, secs: f64) {
        self.observe_promotion(0, bytes, secs)
    }

    /// One promotion (one Acquire) read `disk_bytes` from disk and
    /// `remote_bytes` from G4 into host memory in `secs`. The daemon does
    /// not time the two reads apart, so with G4 bytes in it the disk's share
    /// is taken at the disk's last rate (even a stale one) and the rest is
    /// G4's; a disk never measured adds its share to G4's, which errs
    /// towards recomputing. Only a promotion without G4 bytes measures the
    /// disk: G4's rate is the less certain, and would spoil it.
    pub fn observe_promotion(&mut self, disk_bytes: u64, remote_bytes: u64, secs: f64) {
        self.observe_promotion_at(disk_bytes, remote_bytes, secs, Instant::now())
    }

    fn observe_promotion_at(
        &mut self,
        disk_bytes: u64,
        remote_bytes: u64,
        secs: f64,
        now: Instant,
    ) {
        if remote_bytes == 0 {
            if disk_bytes > 0 {
                self.disk.observe(secs / disk_bytes as f64, now);
            }
            return;
        }
        let disk_secs = self.disk.get().unwrap_or(0.0) * disk_bytes as f64;
        self.remote
            .observe((secs - disk_secs).max(0.0) / remote_bytes as f64, now);
    }

    /// Whether loads from `source` have a current measurement; without one
    /// [`CostModel::plan`] assumes loading wins.
    pub fn knows(&self, source: Source) -> bool {
        match self.read_rate(source) {
            None => self.host.last.is_some(),
            Some(r) => r.last.is_some_and(|at| at.elapsed() < STALE_AFTER),
        }
    }

    /// The rate of reading `source` into host memory; `None` for host
    /// memory itself.
    fn read_rate(&self, source: Source) -> Option<&Rate> {
        match source {
            Source::Host => None,
            Source::Disk => Some(&self.disk),
            Source::Remote => Some(&self.remote),
        }
    }

    /// A prefill step of `tokens` tokens took `secs`.
    pub fn observe_prefill(&mut self, tokens: u64, secs: f64) {
        if tokens >= MIN_PREFILL_TOKENS {
            self.prefill[bucket(tokens)].observe(secs / tokens as f64, Instant::now());
        }
    }

    /// Seconds to prefill `tokens` from scratch, from the nearest measured
    /// length; `None` before any prefill was measured.
    pub fn recompute_secs(&self, tokens: u64) -> Option<f64> {
        let b = bucket(tokens);
        let nearest = (0..BUCKETS)
            .filter(|&i| self.prefill[i].last.is_some())
            .min_by_key(|&i| i.abs_diff(b))?;
        Some(self.prefill[nearest].secs_per_unit * tokens as f64)
    }

    /// Seconds to bring `bytes` from `source`, `None` when not measured (or,
    /// for the disk and G4, measured too long ago).
    pub fn load_secs(&self, source: Source, bytes: u64) -> Option<f64> {
        self.load_secs_at(source, bytes, Instant::now())
    }

    fn load_secs_at(&self, source: Source, bytes: u64, now: Instant) -> Option<f64> {
        let Some(read) = self.read_rate(source) else {
            return Some(self.host.get()? * bytes as f64);
        };
        let at = read.last?;
        // A tier measured before any host load (a layer-by-layer engine
        // measures host loads only with the prefill they overlap) still
        // counts: the read is the slow part, and a load judged as if the
        // host copy were free errs towards loading by no more than that copy.
        let host = self.host.get().unwrap_or(0.0);
        (now.duration_since(at) < STALE_AFTER).then_some((read.secs_per_unit + host) * bytes as f64)
    }

    /// How far to load a match: blocks `[first, host)` are in host memory,
    /// `[host, local)` need the disk and `[local, matched)` the object store
    /// (G4); `first` are already on the GPU. Returns the end of the prefix
    /// worth loading — `first` when none is — choosing among "nothing",
    /// "the host part", "what the node holds" and "all of it" the one that
    /// saves the most time. Unmeasured costs count as loading winning.
    pub fn plan(
        &self,
        first: usize,
        host: usize,
        local: usize,
        matched: usize,
        block_bytes: u64,
        tokens_per_block: u64,
    ) -> usize {
        let now = Instant::now();
        self.plan_at(
            [first, host, local, matched],
            block_bytes,
            tokens_per_block,
            now,
        )
    }

    /// [`CostModel::plan`] of the bounds `[first, host, local, matched]`.
    fn plan_at(
        &self,
        bounds: [usize; 4],
        block_bytes: u64,
        tokens_per_block: u64,
        now: Instant,
    ) -> usize {
        let [first, host, local, matched] = bounds;
        let host = host.clamp(first, matched);
        let local = local.clamp(host, matched);
        let prefill = |blocks: usize| self.recompute_secs(blocks as u64 * tokens_per_block);
        let mut best = (first, 0.0);
        for end in [host, local, matched] {
            if end <= first {
                continue;
            }
            let bytes = |from: usize, to: usize| (to.min(end) - from.min(end)) as u64 * block_bytes;
            // An unmeasured host copy counts as free (loading wins); an
            // unmeasured disk or G4 makes the whole option unmeasured.
            let host_secs = self
                .load_secs_at(Source::Host, bytes(first, host), now)
                .unwrap_or(0.0);
            let read = |source, b| match b {
                0 => Some(0.0),
                b => self.load_secs_at(source, b, now),
            };
            let load = read(Source::Disk, bytes(host, local))
                .zip(read(Source::Remote, bytes(local, matched)))
                .map(|(d, r)| host_secs + d + r);
            let saved = match (prefill(end), prefill(first)) {
                (Some(e), Some(f)) => Some(e - f.min(e)),
                _ => None,
            };
            let gain = match (saved, load) {
                (Some(s), Some(l)) => s - l,
                // Unmeasured: assume loading wins, the longer the better.
                _ => 1e12 + end as f64,
            };
            if gain > best.1 {
                best = (end, gain);
            }
        }
        best.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// An 8B model's shape on an H200, roughly: 2 MiB blocks of 16 tokens,
    /// host copies at 40 GB/s, prefill at 30 µs per token.
    fn measured(disk_gbps: f64) -> CostModel {
        let mut m = CostModel::new();
        let now = Instant::now();
        m.observe_load_at(1024 * MIB, 0, 1024.0 * MIB as f64 / 40e9, now);
        let disk_bytes = 1024 * MIB;
        let secs = disk_bytes as f64 / 40e9 + disk_bytes as f64 / (disk_gbps * 1e9);
        m.observe_load_at(0, disk_bytes, secs, now);
        for tokens in [1024u64, 4096, 16384] {
            m.observe_prefill(tokens, tokens as f64 * 30e-6);
        }
        m
    }

    /// [`measured`] with G4 read at `remote_gbps` too.
    fn measured_g4(disk_gbps: f64, remote_gbps: f64) -> CostModel {
        let mut m = measured(disk_gbps);
        m.observe_remote_read(256 * MIB, 256.0 * MIB as f64 / (remote_gbps * 1e9));
        m
    }

    /// `plan` at `now` of the bounds `[first, host, local, matched]` for
    /// 2 MiB blocks of 16 tokens.
    fn plan(m: &CostModel, bounds: [usize; 4], now: Instant) -> usize {
        m.plan_at(bounds, 2 * MIB, 16, now)
    }

    #[test]
    fn a_promotion_measures_the_disk_alone() {
        let mut m = CostModel::new();
        assert!(!m.knows(Source::Disk));
        m.observe_load(MIB, 0, MIB as f64 / 40e9);
        m.observe_disk_read(MIB, MIB as f64 / 2e9);
        assert!(m.knows(Source::Disk));
        assert!(!m.knows(Source::Remote));
        let secs = m.load_secs(Source::Disk, MIB).unwrap();
        assert!((secs - (MIB as f64 / 2e9 + MIB as f64 / 40e9)).abs() < 1e-9);
    }

    #[test]
    fn unmeasured_loads_everything() {
        assert_eq!(CostModel::new().plan(0, 10, 50, 100, 2 * MIB, 16), 100);
    }

    #[test]
    fn host_pays_slow_disk_does_not() {
        let now = Instant::now();
        // 2 MiB per 16 tokens at 2.8 GB/s: 47 µs per token, prefill 30.
        let slow = measured(2.8);
        assert_eq!(plan(&slow, [0, 400, 1000, 1000], now), 400);
        // Nothing in host: recompute everything.
        assert_eq!(plan(&slow, [0, 0, 1000, 1000], now), 0);
        // A fast disk (20 GB/s: 6.5 µs per token) pays for itself.
        let fast = measured(20.0);
        assert_eq!(plan(&fast, [0, 400, 1000, 1000], now), 1000);
        // Blocks the GPU holds already cost and save nothing.
        assert_eq!(plan(&fast, [900, 400, 1000, 1000], now), 1000);
        assert_eq!(plan(&slow, [900, 950, 1000, 1000], now), 950);
    }

    /// G4 at 0.4 GB/s (327 µs per token against 30 to recompute) ends the
    /// plan where the node's own blocks end; at 20 GB/s it extends it.
    #[test]
    fn g4_is_priced_at_its_own_rate() {
        let now = Instant::now();
        let slow = measured_g4(20.0, 0.4);
        assert_eq!(plan(&slow, [0, 400, 700, 1000], now), 700);
        // Nothing local: the whole match is recomputed.
        assert_eq!(plan(&slow, [0, 0, 0, 1000], now), 0);
        // The GPU holds the node's part: G4 alone is left, and loses.
        assert_eq!(plan(&slow, [800, 400, 700, 1000], now), 800);
        let fast = measured_g4(20.0, 20.0);
        assert_eq!(plan(&fast, [0, 400, 700, 1000], now), 1000);
        assert_eq!(plan(&fast, [0, 0, 0, 1000], now), 1000);
        // Each G4 block pays its read and then the host copy.
        let want = MIB as f64 / 20e9 + MIB as f64 / 40e9;
        let got = fast.load_secs(Source::Remote, MIB).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} {want}");
    }

    /// A plan is a prefix: fast G4 blocks behind a slow disk part are not
    /// worth reading through it (the 2.8 GB/s disk loses 20 µs a token over
    /// 300 blocks, 20 GB/s G4 gains 20 over 100).
    #[test]
    fn fast_g4_behind_a_slow_disk() {
        let m = measured_g4(2.8, 20.0);
        assert_eq!(plan(&m, [0, 400, 700, 800], Instant::now()), 400);
    }

    /// An unmeasured G4 counts as loading winning, as an unmeasured disk
    /// does: the connector, seeing it unknown, measures it rather than bet
    /// a request on it, and plans up to the node's own blocks meanwhile.
    #[test]
    fn unmeasured_g4_counts_as_winning_and_is_not_known() {
        let now = Instant::now();
        let m = measured(20.0);
        assert!(m.knows(Source::Disk) && !m.knows(Source::Remote));
        assert_eq!(m.load_secs(Source::Remote, MIB), None);
        assert_eq!(plan(&m, [0, 400, 700, 1000], now), 1000);
        assert_eq!(plan(&m, [0, 400, 700, 700], now), 700);
        // A slow disk is still skipped when G4 is unknown and the plan ends
        // at the node's blocks.
        assert_eq!(plan(&measured(2.8), [0, 400, 700, 700], now), 400);
    }

    #[test]
    fn a_stale_g4_rate_is_tried_again() {
        let m = measured_g4(20.0, 0.4);
        assert!(m.knows(Source::Remote));
        let later = Instant::now() + STALE_AFTER + Duration::from_secs(1);
        assert_eq!(m.load_secs_at(Source::Remote, MIB, later), None);
        // The disk was measured at the same time: both are tried again.
        assert_eq!(plan(&m, [0, 400, 700, 1000], later), 1000);
        // A fresh disk measure leaves G4 stale.
        let mut m = m;
        m.observe_promotion_at(MIB, 0, MIB as f64 / 20e9, later);
        assert!(m.load_secs_at(Source::Disk, MIB, later).is_some());
        assert_eq!(m.load_secs_at(Source::Remote, MIB, later), None);
    }

    /// One Acquire that read from both: the disk's share at its known rate,
    /// the rest is G4's; the disk's own rate is left alone.
    #[test]
    fn a_mixed_promotion_measures_g4_after_the_disk() {
        let mut m = CostModel::new();
        m.observe_disk_read(100 * MIB, 100.0 * MIB as f64 / 2e9);
        let disk = m.load_secs(Source::Disk, MIB).unwrap();
        let secs = 50.0 * MIB as f64 / 2e9 + 10.0 * MIB as f64 / 0.5e9;
        m.observe_promotion(50 * MIB, 10 * MIB, secs);
        let g4 = m.load_secs(Source::Remote, MIB).unwrap();
        assert!((g4 - MIB as f64 / 0.5e9).abs() < 1e-12, "{g4}");
        assert_eq!(m.load_secs(Source::Disk, MIB), Some(disk));
        // With no disk rate, G4 takes the blame for the whole read.
        let mut m = CostModel::new();
        m.observe_promotion(50 * MIB, 10 * MIB, secs);
        assert!(!m.knows(Source::Disk));
        let g4 = m.load_secs(Source::Remote, MIB).unwrap();
        assert!((g4 - secs / 10.0).abs() < 1e-12, "{g4}");
        // Nothing read: nothing measured.
        let mut m = CostModel::new();
        m.observe_promotion(0, 0, 1.0);
        assert!(!m.knows(Source::Disk) && !m.knows(Source::Remote));
    }

    #[test]
    fn a_slow_disk_is_skipped_before_any_host_load_was_measured() {
        let now = Instant::now();
        let mut m = CostModel::new();
        for tokens in [1024u64, 16384] {
            m.observe_prefill(tokens, tokens as f64 * 30e-6);
        }
        m.observe_disk_read(256 * MIB, 256.0 * MIB as f64 / 2e9);
        assert_eq!(m.load_secs(Source::Host, MIB), None);
        // All on a 2 GB/s disk: 65 µs per token against 30 to recompute.
        assert_eq!(plan(&m, [0, 0, 1088, 1088], now), 0);
        // The host part (unmeasured: assumed to win) and no disk.
        assert_eq!(plan(&m, [0, 704, 1088, 1088], now), 704);
    }

    #[test]
    fn a_stale_disk_rate_is_tried_again() {
        let m = measured(2.8);
        let later = Instant::now() + STALE_AFTER + Duration::from_secs(1);
        assert_eq!(plan(&m, [0, 0, 1000, 1000], later), 1000);
    }

    #[test]
    fn recompute_uses_the_nearest_length() {
        let mut m = CostModel::new();
        assert_eq!(m.recompute_secs(1000), None);
        m.observe_prefill(100, 1.0); // too short to count
        assert_eq!(m.recompute_secs(1000), None);
        m.observe_prefill(1024, 0.03);
        m.observe_prefill(16384, 0.9);
        let short = m.recompute_secs(2000).unwrap();
        let long = m.recompute_secs(20000).unwrap();
        assert!((short - 2000.0 * 0.03 / 1024.0).abs() < 1e-9);
        assert!((long - 20000.0 * 0.9 / 16384.0).abs() < 1e-9);
        m.observe_load(0, 0, 1.0); // nothing loaded: ignored
        m.observe_load(MIB, 0, f64::NAN);
        assert_eq!(m.load_secs(Source::Host, MIB), None);
    }
}
