//! Scoring: an estimated time to first token (TTFT) per candidate worker.
//!
//! ```text
//! ttft = queue + prefill(recomputed tokens) + onboard(loaded tokens) + decode + pressure
//! queue    = max(router backlog, engine waiting * mean_prompt_tokens) / prefill_rate
//! prefill  = (prompt tokens - GPU tokens - loaded tokens) / prefill_rate
//! onboard  = host part * kv_bytes_per_token / host_bandwidth
//!          + disk part * kv_bytes_per_token * (1 / disk_bandwidth + 1 / host_bandwidth)
//!          + remote tokens * min(kv_bytes_per_token / remote_bandwidth, 1 / prefill_rate)
//! decode   = max(router in flight, engine running) * decode_interference_s
//! pressure = kv_pressure_s if engine kv_cache_usage >= kv_usage_threshold else 0
//! cost       = ttft + congestion
//! congestion = (prefill + onboard) * u / (1 - u),  u = min(utilization, 0.9)
//! ```
//!
//! GPU-resident tokens cost nothing. What the engine loads from host memory
//! and disk is decided by the connectors' own cost model
//! (`kvtier_client::cost::CostModel::plan`, here with the configured rates):
//! nothing, the host part, or host and disk, whichever saves the most, so the
//! router scores a worker by what its engine will actually do. A remote tier
//! slower than recomputing costs what recomputing costs.
//!
//! The TTFT alone is one request's view: it sends a long conversation to an
//! idle worker to recompute it rather than wait behind a short queue where
//! its prefix lives, and that extra work then delays every request queued
//! behind it. Under load those moves compound until the fleet recomputes
//! more than it can serve. `congestion` charges the work a request adds to
//! a worker with the delay it imposes on the requests that will queue behind
//! it, about `u / (1 - u)` of them on a worker busy a share `u` of the time
//! (the mean number in an M/M/1 queue), `u` measured from the work routed to
//! the worker over the last `utilization_window_s`. The charge is per
//! worker, so busy workers' prefixes cost more to reuse and idle workers
//! draw new prefixes: the same term keeps the load even. The worker with the
//! lowest cost wins (`temperature` 0), or one is drawn with probability
//! `softmax(-cost / (temperature * max(min cost, 1 ms)))`. See
//! `docs/router.md`.

use kvtier_client::cost::{CostModel, Source};
use serde::{Deserialize, Serialize};

/// Utilization at which the congestion charge stops growing (9 times the
/// work): past it, queues (which grow without bound on an overloaded
/// worker) must still be able to move a request.
const MAX_UTILIZATION: f64 = 0.9;

/// Parameters of the TTFT model. Every default is the value after `=` in
/// `docs/router.md` and below.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoringConfig {
    /// Prefill throughput of one worker, tokens/s. Default 10,000.
    pub prefill_tokens_per_s: f64,
    /// KV bytes per token (all layers, K and V). Default 131,072 (Llama-3-8B,
    /// bf16).
    pub kv_bytes_per_token: f64,
    /// Onboard bandwidth of G2 host memory to GPU, bytes/s. Default 25e9.
    pub host_bandwidth: f64,
    /// Onboard bandwidth of G3 local disk, bytes/s. Default 5e9.
    pub disk_bandwidth: f64,
    /// Onboard bandwidth of G4 remote store, bytes/s. Default 1e9.
    pub remote_bandwidth: f64,
    /// Prompt tokens assumed for each request an engine reports waiting.
    /// Default 2,048.
    pub mean_prompt_tokens: f64,
    /// TTFT added per request running on the worker (decode batches slow
    /// prefill down). Default 0.002 s.
    pub decode_interference_s: f64,
    /// KV cache usage (0..1) from which a worker is penalized. Default 0.95.
    pub kv_usage_threshold: f64,
    /// The penalty. Default 1.0 s.
    pub kv_pressure_s: f64,
    /// Softmax temperature; 0 picks the lowest estimate. Default 0.
    pub temperature: f64,
    /// Window of the utilization behind the congestion charge (an
    /// exponential moving average), seconds. Default 30.
    pub utilization_window_s: f64,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        Self {
            prefill_tokens_per_s: 10_000.0,
            kv_bytes_per_token: 131_072.0,
            host_bandwidth: 25e9,
            disk_bandwidth: 5e9,
            remote_bandwidth: 1e9,
            mean_prompt_tokens: 2048.0,
            decode_interference_s: 0.002,
            kv_usage_threshold: 0.95,
            kv_pressure_s: 1.0,
            temperature: 0.0,
            utilization_window_s: 30.0,
        }
    }
}

/// A worker's load as the router sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Prefill tokens routed to the worker and not yet drained (the router's
    /// virtual backlog, see `workers::InFlight`).
    pub backlog_tokens: f64,
    /// Requests routed to the worker and not yet done.
    pub in_flight: f64,
    /// `vllm:num_requests_waiting` (0 when not scraped).
    pub engine_waiting: f64,
    /// `vllm:num_requests_running`.
    pub engine_running: f64,
    /// `vllm:kv_cache_usage_perc`, 0..1.
    pub kv_usage: f64,
    /// Share of the recent past the worker spends on the prefill and
    /// onboard work routed to it ([`Utilization`]), 0..1 (above 1 when
    /// overloaded).
    pub utilization: f64,
}

/// Work routed to one worker per second: the prefill and onboard seconds of
/// its requests, an exponential moving average over a window. Times are
/// seconds from any fixed origin.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Utilization {
    level: f64,
    at_s: f64,
}

impl Utilization {
    /// Counts `work_s` seconds of work routed at `now_s`.
    pub fn add(&mut self, now_s: f64, work_s: f64, window_s: f64) {
        self.level = self.get(now_s, window_s) + work_s.max(0.0) / window_s.max(1e-3);
        self.at_s = now_s.max(self.at_s);
    }

    /// Work per second at `now_s`.
    pub fn get(&self, now_s: f64, window_s: f64) -> f64 {
        let dt = (now_s - self.at_s).max(0.0);
        self.level * (-dt / window_s.max(1e-3)).exp()
    }
}

/// The parts of one estimate, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimate {
    pub queue_s: f64,
    pub prefill_s: f64,
    pub onboard_s: f64,
    pub decode_s: f64,
    pub pressure_s: f64,
    /// Not part of the TTFT: the delay the request's work imposes on the
    /// worker's later requests (see the module documentation).
    pub congestion_s: f64,
}

impl Estimate {
    pub fn ttft_s(&self) -> f64 {
        self.queue_s + self.prefill_s + self.onboard_s + self.decode_s + self.pressure_s
    }

    /// What the choice compares: the TTFT and the congestion charge.
    pub fn cost_s(&self) -> f64 {
        self.ttft_s() + self.congestion_s
    }
}

impl ScoringConfig {
    fn rate(&self) -> f64 {
        if self.prefill_tokens_per_s.is_finite() && self.prefill_tokens_per_s > 0.0 {
            self.prefill_tokens_per_s
        } else {
            1.0
        }
    }

    /// Seconds to bring one token's KV from tier `t` (`[gpu, host, disk,
    /// remote]`) to the GPU, capped at the cost of recomputing it.
    pub fn onboard_s_per_token(&self, t: usize) -> f64 {
        let recompute = 1.0 / self.rate();
        let bw = match t {
            0 => return 0.0,
            1 => self.host_bandwidth,
            2 => self.disk_bandwidth,
            _ => self.remote_bandwidth,
        };
        if bw.is_finite() && bw > 0.0 {
            (self.kv_bytes_per_token / bw).min(recompute)
        } else {
            recompute
        }
    }

    /// The TTFT estimate of a `prompt_tokens` request on a worker holding
    /// `matched` tokens per tier under `load`.
    pub fn estimate(&self, prompt_tokens: u64, matched: [u64; 4], load: &Load) -> Estimate {
        let rate = self.rate();
        let [gpu, host, disk, remote] = matched;
        // Host memory and disk: what the engine's connector would load.
        let model = CostModel::from_rates(self.host_bandwidth, self.disk_bandwidth, rate);
        let bpt = self.kv_bytes_per_token.max(0.0) as u64;
        let (first, in_host, all) = (gpu, gpu + host, gpu + host + disk);
        // G4 is priced below, on its own: the plan ends at the disk's end.
        let (f, h, a) = (first as usize, in_host as usize, all as usize);
        let end = model.plan(f, h, a, a, bpt, 1) as u64;
        let from_host = end.min(in_host).saturating_sub(first);
        let from_disk = end.saturating_sub(in_host);
        let bring = |source, tokens: u64| {
            model
                .load_secs(source, tokens * bpt)
                .unwrap_or(tokens as f64 / rate)
        };
        let onboard_s = bring(Source::Host, from_host)
            + bring(Source::Disk, from_disk)
            + remote as f64 * self.onboard_s_per_token(3);
        let held = end + remote;
        let recompute = prompt_tokens.saturating_sub(held) as f64;
        let engine_queue = load.engine_waiting.max(0.0) * self.mean_prompt_tokens;
        let queue_s = load.backlog_tokens.max(engine_queue).max(0.0) / rate;
        let decode_s =
            load.in_flight.max(load.engine_running).max(0.0) * self.decode_interference_s;
        let pressure_s = if load.kv_usage >= self.kv_usage_threshold {
            self.kv_pressure_s
        } else {
            0.0
        };
        let prefill_s = recompute / rate;
        let u = if load.utilization.is_finite() {
            load.utilization.clamp(0.0, MAX_UTILIZATION)
        } else {
            MAX_UTILIZATION
        };
        Estimate {
            queue_s,
            prefill_s,
            onboard_s,
            decode_s,
            pressure_s,
            congestion_s: (prefill_s + onboard_s) * u / (1.0 - u),
        }
    }

    /// Picks among costs (seconds, one per candidate): the lowest with
    /// temperature 0 (ties go to the fewest `in_flight`, then to the first
    /// at or after `tie_start`), else a softmax draw with `uniform` in
    /// `[0, 1)`. None when `ttft` is empty.
    pub fn choose(
        &self,
        ttft: &[f64],
        in_flight: &[f64],
        tie_start: usize,
        uniform: f64,
    ) -> Option<usize> {
        if ttft.is_empty() {
            return None;
        }
        let min = ttft.iter().copied().fold(f64::INFINITY, f64::min);
        if self.temperature > 0.0 && self.temperature.is_finite() && ttft.len() > 1 {
            let scale = self.temperature * min.max(1e-3);
            let w: Vec<f64> = ttft.iter().map(|t| (-(t - min) / scale).exp()).collect();
            let total: f64 = w.iter().sum();
            if total.is_finite() && total > 0.0 {
                let mut x = uniform.clamp(0.0, 1.0) * total;
                for (i, wi) in w.iter().enumerate() {
                    if x < *wi {
                        return Some(i);
                    }
                    x -= wi;
                }
                return Some(w.len() - 1);
            }
        }
        let n = ttft.len();
        let eps = 1e-9 + min.abs() * 1e-9;
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = (tie_start + k) % n;
            if ttft[i].is_nan() || ttft[i] > min + eps {
                continue;
            }
            let fl = |j: usize| in_flight.get(j).copied().unwrap_or(0.0);
            match best {
                Some(b) if fl(b) <= fl(i) => {}
                _ => best = Some(i),
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_prefix_beats_cold_worker_until_queue_grows() {
        let c = ScoringConfig::default();
        let idle = Load::default();
        let cold = c.estimate(4096, [0; 4], &idle).ttft_s();
        let warm = c.estimate(4096, [4000, 0, 0, 0], &idle).ttft_s();
        assert!(warm < cold);
        assert!((cold - 0.4096).abs() < 1e-9);
        // a warm worker with 5k tokens of backlog loses to an idle cold one
        let busy = Load {
            backlog_tokens: 5000.0,
            ..Load::default()
        };
        assert!(c.estimate(4096, [4000, 0, 0, 0], &busy).ttft_s() > cold);
    }

    #[test]
    fn tiers_cost_bandwidth_but_never_more_than_recompute() {
        let c = ScoringConfig {
            remote_bandwidth: 1e6,
            ..ScoringConfig::default()
        };
        let l = Load::default();
        let gpu = c.estimate(1000, [1000, 0, 0, 0], &l).ttft_s();
        let host = c.estimate(1000, [0, 1000, 0, 0], &l).ttft_s();
        let disk = c.estimate(1000, [0, 0, 1000, 0], &l).ttft_s();
        let remote = c.estimate(1000, [0, 0, 0, 1000], &l).ttft_s();
        let none = c.estimate(1000, [0; 4], &l).ttft_s();
        assert!(gpu < host && host < disk && disk < remote);
        assert!(
            (remote - none).abs() < 1e-12,
            "slow tier capped at recompute"
        );
    }

    /// The router scores a worker by what its engine's connector would do
    /// (the same cost model): a disk slower than recomputing is not loaded,
    /// the host part in front of it is.
    #[test]
    fn scores_agree_with_the_connectors_plan() {
        let c = ScoringConfig {
            disk_bandwidth: 1e9, // 131 µs a token, against 100 to recompute
            ..ScoringConfig::default()
        };
        let e = c.estimate(3000, [0, 1000, 1000, 0], &Load::default());
        assert!((e.prefill_s - 0.2).abs() < 1e-9, "{e:?}");
        assert!(
            (e.onboard_s - 1000.0 * 131_072.0 / 25e9).abs() < 1e-9,
            "{e:?}"
        );
        let plan = CostModel::from_rates(25e9, 1e9, 10_000.0).plan(0, 1000, 2000, 2000, 131_072, 1);
        assert_eq!(plan, 1000);
        // A fast disk is loaded, paying the disk and then the host copy.
        let fast = ScoringConfig::default();
        let e = fast.estimate(3000, [0, 1000, 1000, 0], &Load::default());
        let bytes = 1000.0 * 131_072.0;
        let want = bytes / 25e9 + bytes * (1.0 / 5e9 + 1.0 / 25e9);
        assert!((e.onboard_s - want).abs() < 1e-9, "{e:?}");
        assert!((e.prefill_s - 0.1).abs() < 1e-9, "{e:?}");
    }

    /// A long conversation whose prefix sits behind a queue: by TTFT alone
    /// an idle worker recomputing it all is a little faster; on a busy
    /// fleet that recomputation delays the requests behind it, so it stays.
    /// On an idle fleet the TTFT decides as before.
    #[test]
    fn busy_fleet_reuses_prefixes_behind_short_queues() {
        let c = ScoringConfig::default();
        let est = |matched: u64, backlog: f64, utilization: f64| {
            let l = Load {
                backlog_tokens: backlog,
                utilization,
                ..Load::default()
            };
            c.estimate(20_000, [matched, 0, 0, 0], &l)
        };
        let (warm, cold) = (est(19_000, 20_000.0, 0.0), est(0, 0.0, 0.0));
        assert!(cold.ttft_s() < warm.ttft_s());
        assert!(cold.cost_s() < warm.cost_s());
        assert_eq!(cold.congestion_s, 0.0);
        let (warm, cold) = (est(19_000, 20_000.0, 0.7), est(0, 0.0, 0.7));
        assert!(cold.ttft_s() < warm.ttft_s());
        assert!(warm.cost_s() < cold.cost_s(), "{warm:?} {cold:?}");
        // per worker: an idle worker's work is not charged
        assert!(est(0, 0.0, 0.0).cost_s() < warm.cost_s());
        // overloaded (or unknown) counts as the cap, never infinite
        let over = est(0, 0.0, 5.0);
        assert!((over.congestion_s - 2.0 * 9.0).abs() < 1e-9, "{over:?}");
        assert!(est(0, 0.0, f64::NAN).cost_s().is_finite());
    }

    #[test]
    fn utilization_is_work_per_second_over_the_window() {
        let mut u = Utilization::default();
        u.add(0.0, 15.0, 30.0);
        u.add(0.0, 15.0, 30.0);
        assert!((u.get(0.0, 30.0) - 1.0).abs() < 1e-12);
        assert!((u.get(30.0, 30.0) - (-1.0f64).exp()).abs() < 1e-12);
        u.add(30.0, 3.0, 30.0);
        assert!((u.get(30.0, 30.0) - (-1.0f64).exp() - 0.1).abs() < 1e-12);
    }

    #[test]
    fn engine_metrics_count() {
        let c = ScoringConfig::default();
        let a = c.estimate(100, [0; 4], &Load::default()).ttft_s();
        let waiting = Load {
            engine_waiting: 2.0,
            ..Load::default()
        };
        let full = Load {
            kv_usage: 0.99,
            ..Load::default()
        };
        assert!(c.estimate(100, [0; 4], &waiting).ttft_s() > a + 0.4);
        assert!(c.estimate(100, [0; 4], &full).ttft_s() >= a + 1.0);
    }

    #[test]
    fn choose_argmin_ties_and_softmax() {
        let c = ScoringConfig::default();
        assert_eq!(c.choose(&[], &[], 0, 0.5), None);
        assert_eq!(c.choose(&[0.3, 0.1, 0.2], &[0.0; 3], 0, 0.5), Some(1));
        // ties: fewest in flight, then rotation
        assert_eq!(
            c.choose(&[0.1, 0.1, 0.1], &[2.0, 1.0, 1.0], 0, 0.0),
            Some(1)
        );
        assert_eq!(c.choose(&[0.1, 0.1, 0.1], &[0.0; 3], 2, 0.0), Some(2));
        let s = ScoringConfig {
            temperature: 1.0,
            ..ScoringConfig::default()
        };
        assert_eq!(s.choose(&[0.1, 0.2], &[0.0; 2], 0, 0.0), Some(0));
        assert_eq!(s.choose(&[0.1, 0.2], &[0.0; 2], 0, 0.9999), Some(1));
        assert_eq!(s.choose(&[f64::NAN, 0.2], &[0.0; 2], 0, 0.5), Some(1));
    }
}
