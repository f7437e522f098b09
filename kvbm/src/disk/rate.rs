//! The disk's measured throughput, per direction, from kvbm's own I/O: what
//! the connectors and the router compare against recomputing a prefix.
//!
//! Throughput while busy, not bytes per second of wall time: an idle disk
//! is not a slow one. Each completed operation covers its own interval from
//! submission to completion; the union of those intervals is the time the
//! disk was busy for kvbm, however many operations overlapped (queue depth
//! 1 or 32 alike). Bytes over busy time, folded into a moving average every
//! [`WINDOW_BYTES`], is the rate; one older than [`STALE_AFTER`] is not
//! reported (the disk may have changed, or be shared with someone else).

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Bytes per measurement: enough operations (32 blocks of 2 MiB) that one
/// slow completion does not decide the figure.
const WINDOW_BYTES: u64 = 64 << 20;
/// Weight of a new window in the moving average.
const ALPHA: f64 = 0.3;
/// A rate not refreshed for this long is not reported.
pub const STALE_AFTER: Duration = Duration::from_secs(300);

#[derive(Default)]
struct State {
    /// End of the busy intervals folded in so far.
    covered_until: Option<Instant>,
    bytes: u64,
    busy: Duration,
    /// Bytes per second, and when it was last updated.
    rate: Option<(f64, Instant)>,
}

#[derive(Default)]
pub(crate) struct Throughput(Mutex<State>);

impl Throughput {
    /// An operation submitted at `started` moved `bytes` (0 if it failed)
    /// and completed at `done`.
    pub fn record(&self, started: Instant, done: Instant, bytes: u64) {
        let mut s = self.0.lock();
        let from = s.covered_until.map_or(started, |c| c.max(started));
        if done > from {
            s.busy += done - from;
        }
        s.covered_until = Some(s.covered_until.map_or(done, |c| c.max(done)));
        s.bytes += bytes;
        if s.bytes >= WINDOW_BYTES && !s.busy.is_zero() {
            let r = s.bytes as f64 / s.busy.as_secs_f64();
            let avg = match s.rate {
                Some((old, _)) => (1.0 - ALPHA) * old + ALPHA * r,
                None => r,
            };
            s.rate = Some((avg, done));
            s.bytes = 0;
            s.busy = Duration::ZERO;
        }
    }

    /// Bytes per second while busy; `None` before a window completed or
    /// when the last one is older than [`STALE_AFTER`] at `now`.
    pub fn bytes_per_s(&self, now: Instant) -> Option<f64> {
        let (r, at) = self.0.lock().rate?;
        (now.saturating_duration_since(at) < STALE_AFTER).then_some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn overlapping_operations_count_their_busy_time_once() {
        let t = Throughput::default();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // 32 reads of 2 MiB, 8 at a time, each taking 8 ms: 64 MiB in 32 ms.
        for batch in 0..4 {
            for _ in 0..8 {
                t.record(ms(batch * 8), ms(batch * 8 + 8), 2 * MIB);
            }
        }
        let r = t.bytes_per_s(ms(32)).unwrap();
        assert!((r - 64.0 * MIB as f64 / 0.032).abs() < 1.0, "{r}");
    }

    #[test]
    fn idle_time_is_not_slowness_and_old_rates_expire() {
        let t = Throughput::default();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert_eq!(t.bytes_per_s(t0), None);
        // Two bursts of 32 MiB in 10 ms each, a second apart.
        t.record(ms(0), ms(10), 32 * MIB);
        assert_eq!(t.bytes_per_s(ms(10)), None, "half a window");
        t.record(ms(1000), ms(1010), 32 * MIB);
        let r = t.bytes_per_s(ms(1010)).unwrap();
        assert!((r - 64.0 * MIB as f64 / 0.020).abs() < 1.0, "{r}");
        assert_eq!(t.bytes_per_s(ms(1010) + STALE_AFTER), None);
    }
}
