//! Trace replay: N simulated engines, the router's real index and scoring
//! in-process, several routing policies compared on one trace.
//!
//! # Trace
//!
//! Mooncake format, one JSON object per line: `timestamp` (ms),
//! `input_length`, `output_length`, `hash_ids` (prefix-chained ids of
//! 512-token blocks; the last may be partial). Each trace block is one index
//! block of one "token" (its hash id), so the index's chain keys are exactly
//! the trace's prefix identity.
//!
//! # Engines (documented timing model)
//!
//! - Per worker: G1 (`gpu_tokens`), G2 (`host_tokens`), G3 (`disk_tokens`),
//!   each a block-level LRU; one G4 (`remote_tokens`) LRU shared by all
//!   workers. A tier of 0 tokens is absent. A block evicted from G1 moves to
//!   G2 (and is written to G4), from G2 to G3, from G3 it is dropped.
//! - A request's hit is its leading run of blocks found in G1, else G2, G3,
//!   G4 (per block the fastest tier); hit blocks are promoted to G1, every
//!   block of the prompt is in G1 after the request is scheduled.
//! - Prefill is one FIFO server per worker: `start = max(arrival, free)`;
//!   `onboard = sum over hit blocks below G1 of min(tokens * kv_bytes /
//!   bandwidth_tier, tokens / prefill_rate)`; `prefill = (input - hit tokens)
//!   / prefill_rate`; `ttft = start - arrival + onboard + prefill`. Decode
//!   runs beside it (batched) for `output_length * decode_s_per_token`.
//! - The index learns blocks as a real deployment would: `Stored` events at
//!   the end of the prefill that computed or onboarded them (skipped if the
//!   block left that tier meanwhile), `Removed` at eviction, G4 blocks from a
//!   store source whose remote group every worker belongs to.
//!
//! # Policies
//!
//! - `kv`: the router's scoring (estimated TTFT from the index's per-tier
//!   match and the worker's queued prefill tokens and running requests,
//!   plus the congestion charge of the work routed to it recently).
//! - `round_robin`; `least_loaded` (fewest requests queued or running);
//! - `prefix_only`: longest indexed prefix, ties to the least loaded.
//!
//! # Figures
//!
//! Hit ratio: reused prompt tokens (any tier) / prompt tokens. TTFT mean,
//! p50, p99.
//! Load imbalance: max / mean over workers of busy time (onboard + prefill
//! seconds). The ideal hit ratio: an unbounded shared cache, requests in
//! timestamp order, leading run of seen ids.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::{EngineHash, Scope, Source, Tier, WorkerId};
use crate::index::{chain_key, scope_seed, Index, IndexConfig};
use crate::scoring::{Load, ScoringConfig, Utilization};

/// Tokens per trace block.
pub const TRACE_BLOCK: u64 = 512;
const MODEL: &str = "trace";
const G4_WORKER: &str = "g4-store";

/// One trace request.
#[derive(Debug, Clone, Deserialize)]
pub struct TraceRequest {
    pub timestamp: f64,
    pub input_length: u64,
    #[serde(default)]
    pub output_length: u64,
    pub hash_ids: Vec<u64>,
}

/// Reads a Mooncake JSONL trace (blank lines skipped), sorted by timestamp.
pub fn read_trace(path: &Path) -> anyhow::Result<Vec<TraceRequest>> {
    let f = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let r: TraceRequest = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        if r.hash_ids.iter().any(|h| *h > u64::from(u32::MAX)) {
            anyhow::bail!("{}:{}: hash id above 2^32", path.display(), i + 1);
        }
        out.push(r);
    }
    out.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    Ok(out)
}

/// Simulation parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub workers: usize,
    pub gpu_tokens: u64,
    pub host_tokens: u64,
    pub disk_tokens: u64,
    pub remote_tokens: u64,
    /// Prefill throughput per worker, tokens/s (default 10,000).
    pub prefill_tokens_per_s: f64,
    /// Decode time per output token, s (default 0.02).
    pub decode_s_per_token: f64,
    /// KV bytes per token (default 131,072).
    pub kv_bytes_per_token: f64,
    /// Onboard bandwidths G2, G3, G4, bytes/s (defaults 25e9, 5e9, 1e9).
    pub bandwidth: [f64; 3],
    /// The kv policy's scoring (its prefill rate and bandwidths are set
    /// from the fields above).
    pub scoring: ScoringConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            workers: 8,
            gpu_tokens: 3_000_000,
            host_tokens: 0,
            disk_tokens: 0,
            remote_tokens: 0,
            prefill_tokens_per_s: 10_000.0,
            decode_s_per_token: 0.02,
            kv_bytes_per_token: 131_072.0,
            bandwidth: [25e9, 5e9, 1e9],
            scoring: ScoringConfig::default(),
        }
    }
}

/// The routing policies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Kv,
    RoundRobin,
    LeastLoaded,
    PrefixOnly,
}

impl Policy {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "kv" => Some(Self::Kv),
            "round_robin" => Some(Self::RoundRobin),
            "least_loaded" => Some(Self::LeastLoaded),
            "prefix_only" => Some(Self::PrefixOnly),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Kv => "kv",
            Self::RoundRobin => "round_robin",
            Self::LeastLoaded => "least_loaded",
            Self::PrefixOnly => "prefix_only",
        }
    }
}

/// The figures of one policy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PolicyResult {
    pub hit_ratio: f64,
    pub ttft_mean_ms: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub load_imbalance: f64,
}

/// Ideal prefix hit ratio of an unbounded shared cache.
pub fn ideal_hit_ratio(trace: &[TraceRequest]) -> f64 {
    let mut seen = HashSet::new();
    let (mut hit, mut total) = (0u64, 0u64);
    for r in trace {
        total += r.input_length;
        for (i, h) in r.hash_ids.iter().enumerate() {
            if !seen.contains(h) {
                break;
            }
            hit += block_tokens(r, i);
        }
        seen.extend(r.hash_ids.iter().copied());
    }
    if total == 0 {
        0.0
    } else {
        hit as f64 / total as f64
    }
}

fn block_tokens(r: &TraceRequest, i: usize) -> u64 {
    r.input_length
        .saturating_sub(i as u64 * TRACE_BLOCK)
        .min(TRACE_BLOCK)
}

/// A block-level LRU (capacity in blocks; 0 = absent tier).
struct Lru {
    cap: usize,
    tick: u64,
    at: HashMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
}

impl Lru {
    fn new(tokens: u64) -> Self {
        Self {
            cap: (tokens / TRACE_BLOCK) as usize,
            tick: 0,
            at: HashMap::new(),
            order: VecDeque::new(),
        }
    }
    fn enabled(&self) -> bool {
        self.cap > 0
    }
    fn contains(&self, b: u64) -> bool {
        self.at.contains_key(&b)
    }
    /// Inserts or refreshes `b`; returns the evicted blocks.
    fn touch(&mut self, b: u64, evicted: &mut Vec<u64>) {
        if !self.enabled() {
            return;
        }
        self.tick += 1;
        self.at.insert(b, self.tick);
        self.order.push_back((b, self.tick));
        while self.at.len() > self.cap {
            let Some((old, t)) = self.order.pop_front() else {
                break;
            };
            if self.at.get(&old) == Some(&t) {
                self.at.remove(&old);
                evicted.push(old);
            }
        }
        if self.order.len() > 4 * self.at.len() + 1024 {
            let at = &self.at;
            self.order.retain(|(b, t)| at.get(b) == Some(t));
        }
    }
    fn remove(&mut self, b: u64) -> bool {
        self.at.remove(&b).is_some()
    }
}

struct Engine {
    tiers: [Lru; 3],
    free_at: f64,
    busy_s: f64,
    /// Onboard and prefill seconds routed here per second, as the router
    /// tracks them.
    work: Utilization,
    /// Requests queued or running (finish times).
    active: BinaryHeap<Reverse<OrdF64>>,
}

#[derive(Debug, Clone, Copy)]
struct OrdF64(f64);
impl PartialEq for OrdF64 {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o).is_eq()
    }
}
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// A Stored event waiting for the end of the prefill that produced it.
struct Pending {
    at: f64,
    worker: usize,
    tier: usize,
    block: u64,
    parent_key: u64,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    index: Index,
    engines: Vec<Engine>,
    g4: Lru,
    ids: Vec<WorkerId>,
    scope: Scope,
    seed: u64,
    /// Chain key of each block's parent (block ids are prefix-chained in
    /// the trace).
    parents: HashMap<u64, u64>,
    pending: VecDeque<Pending>,
    scoring: ScoringConfig,
}

const TIER_OF: [Tier; 4] = [Tier::Gpu, Tier::Host, Tier::Disk, Tier::Remote];

impl<'a> Sim<'a> {
    fn new(cfg: &'a SimConfig) -> Self {
        let index = Index::new(IndexConfig {
            shards: 64,
            max_blocks: 50_000_000,
        });
        let ids: Vec<WorkerId> = (0..cfg.workers)
            .map(|i| Arc::from(format!("w{i}").as_str()))
            .collect();
        for id in &ids {
            index.set_worker(id, Some("g4"));
        }
        index.set_worker(&Arc::from(G4_WORKER), Some("g4"));
        let engines = (0..cfg.workers)
            .map(|_| Engine {
                tiers: [
                    Lru::new(cfg.gpu_tokens),
                    Lru::new(cfg.host_tokens),
                    Lru::new(cfg.disk_tokens),
                ],
                free_at: 0.0,
                busy_s: 0.0,
                work: Utilization::default(),
                active: BinaryHeap::new(),
            })
            .collect();
        let mut scoring = cfg.scoring.clone();
        scoring.prefill_tokens_per_s = cfg.prefill_tokens_per_s;
        scoring.kv_bytes_per_token = cfg.kv_bytes_per_token;
        scoring.host_bandwidth = cfg.bandwidth[0];
        scoring.disk_bandwidth = cfg.bandwidth[1];
        scoring.remote_bandwidth = cfg.bandwidth[2];
        Self {
            cfg,
            index,
            engines,
            g4: Lru::new(cfg.remote_tokens),
            ids,
            scope: Scope {
                model: Arc::from(MODEL),
                lora_name: None,
                group: 0,
            },
            seed: scope_seed(MODEL, None, 0, 1, None),
            parents: HashMap::new(),
            pending: VecDeque::new(),
            scoring,
        }
    }

    fn source(&self, w: usize) -> Source {
        Source {
            worker: if w == usize::MAX {
                Arc::from(G4_WORKER)
            } else {
                self.ids[w].clone()
            },
            dp_rank: 0,
        }
    }

    fn emit_store(&self, w: usize, tier: usize, block: u64, parent_key: u64) {
        let src = self.source(w);
        let tok = [block as u32];
        self.index.store_with_seed(
            &src,
            TIER_OF[tier],
            &self.scope,
            &[EngineHash(block)],
            parent_key,
            &tok,
            1,
        );
    }

    fn emit_remove(&self, w: usize, tier: usize, block: u64) {
        self.index
            .remove(&self.source(w), TIER_OF[tier], None, &[EngineHash(block)]);
    }

    fn flush_pending(&mut self, now: f64) {
        while self.pending.front().is_some_and(|p| p.at <= now) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let present = if p.worker == usize::MAX {
                self.g4.contains(p.block)
            } else {
                self.engines[p.worker].tiers[p.tier].contains(p.block)
            };
            if present {
                self.emit_store(p.worker, p.tier, p.block, p.parent_key);
            }
        }
    }

    fn load(&self, w: usize, now: f64) -> Load {
        let e = &self.engines[w];
        let rate = self.cfg.prefill_tokens_per_s;
        // queued prefill tokens not yet done at `now`
        let backlog = (e.free_at - now).max(0.0) * rate;
        let running = e.active.iter().filter(|Reverse(t)| t.0 > now).count() as f64;
        Load {
            backlog_tokens: backlog,
            in_flight: running,
            utilization: e.work.get(now, self.scoring.utilization_window_s),
            ..Load::default()
        }
    }

    fn in_flight(&self, w: usize, now: f64) -> usize {
        self.engines[w]
            .active
            .iter()
            .filter(|Reverse(t)| t.0 > now)
            .count()
    }

    /// Demotes evicted G1/G2 blocks down the hierarchy.
    fn insert(&mut self, w: usize, tier: usize, block: u64, at: f64, parent_key: u64) {
        let mut ev = Vec::new();
        let e = &mut self.engines[w];
        let was = e.tiers[tier].contains(block);
        e.tiers[tier].touch(block, &mut ev);
        if !was && e.tiers[tier].enabled() {
            self.pending.push_back(Pending {
                at,
                worker: w,
                tier,
                block,
                parent_key,
            });
        }
        for b in ev {
            self.emit_remove(w, tier, b);
            let pk = self.parent_key_of(b);
            if tier == 0 && self.g4.enabled() && !self.g4.contains(b) {
                let mut gev = Vec::new();
                self.g4.touch(b, &mut gev);
                self.pending.push_back(Pending {
                    at,
                    worker: usize::MAX,
                    tier: 3,
                    block: b,
                    parent_key: pk,
                });
                for g in gev {
                    self.emit_remove(usize::MAX, 3, g);
                }
            }
            if tier + 1 < 3 && self.engines[w].tiers[tier + 1].enabled() {
                self.insert(w, tier + 1, b, at, pk);
            }
        }
    }

    fn parent_key_of(&self, block: u64) -> u64 {
        self.parents.get(&block).copied().unwrap_or(self.seed)
    }
}

impl Sim<'_> {
    #[allow(clippy::too_many_lines)]
    fn run(mut self, trace: &[TraceRequest], policy: Policy) -> PolicyResult {
        let n = self.cfg.workers.max(1);
        let rate = self.cfg.prefill_tokens_per_s.max(1.0);
        let mut ttfts = Vec::with_capacity(trace.len());
        let (mut hit_tokens, mut total_tokens) = (0u64, 0u64);
        let mut rr = 0usize;
        for r in trace {
            let now = r.timestamp / 1e3;
            self.flush_pending(now);
            // keys of this request's blocks
            let mut prev = self.seed;
            let tokens: Vec<u32> = r.hash_ids.iter().map(|h| *h as u32).collect();
            for h in &r.hash_ids {
                let k = chain_key(prev, &[*h as u32]);
                self.parents.entry(*h).or_insert(prev);
                prev = k;
            }
            let w = match policy {
                Policy::RoundRobin => {
                    rr += 1;
                    (rr - 1) % n
                }
                Policy::LeastLoaded => (0..n)
                    .min_by_key(|w| (self.in_flight(*w, now), (*w + rr) % n))
                    .unwrap_or(0),
                Policy::PrefixOnly | Policy::Kv => {
                    let matches = self.index.lookup(MODEL, None, None, 0, &tokens);
                    let matched = |w: usize| -> [u64; 4] {
                        let id = &self.ids[w];
                        matches
                            .get(id)
                            .map_or([0; 4], |m| m.blocks.map(|b| u64::from(b) * TRACE_BLOCK))
                    };
                    if policy == Policy::PrefixOnly {
                        (0..n)
                            .max_by_key(|w| {
                                let t: u64 = matched(*w).iter().sum();
                                (t, Reverse(self.in_flight(*w, now)), Reverse((*w + rr) % n))
                            })
                            .unwrap_or(0)
                    } else {
                        let ests: Vec<f64> = (0..n)
                            .map(|w| {
                                let mut m = matched(w);
                                // the last block may be partial
                                let total: u64 = m.iter().sum();
                                if total > r.input_length {
                                    let over = total - r.input_length;
                                    for t in m.iter_mut().rev() {
                                        let cut = over.min(*t);
                                        *t -= cut;
                                        if cut > 0 {
                                            break;
                                        }
                                    }
                                }
                                self.scoring
                                    .estimate(r.input_length, m, &self.load(w, now))
                                    .cost_s()
                            })
                            .collect();
                        let fl: Vec<f64> = (0..n).map(|w| self.load(w, now).in_flight).collect();
                        self.scoring.choose(&ests, &fl, rr, 0.5).unwrap_or(0)
                    }
                }
            };
            rr += 1;
            // the engine's view: leading run of blocks in some tier
            let mut onboard = 0.0;
            let mut hit = 0u64;
            let mut found = Vec::new();
            for (i, h) in r.hash_ids.iter().enumerate() {
                let e = &self.engines[w];
                let tier = (0..3)
                    .find(|t| e.tiers[*t].contains(*h))
                    .or_else(|| self.g4.contains(*h).then_some(3));
                let Some(t) = tier else { break };
                let bt = block_tokens(r, i);
                if t > 0 {
                    let bw = self.cfg.bandwidth[t - 1];
                    let load_s = bt as f64 * self.cfg.kv_bytes_per_token / bw.max(1.0);
                    onboard += load_s.min(bt as f64 / rate);
                }
                hit += bt;
                found.push(t);
            }
            let prefill = (r.input_length - hit.min(r.input_length)) as f64 / rate;
            let start = now.max(self.engines[w].free_at);
            let end = start + onboard + prefill;
            ttfts.push(end - now);
            hit_tokens += hit;
            total_tokens += r.input_length;
            {
                let e = &mut self.engines[w];
                e.free_at = end;
                e.busy_s += onboard + prefill;
                e.work
                    .add(now, onboard + prefill, self.scoring.utilization_window_s);
                e.active.push(Reverse(OrdF64(
                    end + r.output_length as f64 * self.cfg.decode_s_per_token,
                )));
                while e.active.peek().is_some_and(|Reverse(t)| t.0 <= now) {
                    e.active.pop();
                }
            }
            // every block of the prompt lands in G1 (promoted from below)
            for (i, h) in r.hash_ids.iter().enumerate() {
                if let Some(&t) = found.get(i) {
                    if (1..3).contains(&t) {
                        self.engines[w].tiers[t].remove(*h);
                        self.emit_remove(w, t, *h);
                    }
                }
                let pk = self.parent_key_of(*h);
                self.insert(w, 0, *h, end, pk);
            }
            self.pending
                .make_contiguous()
                .sort_by(|a, b| a.at.total_cmp(&b.at));
        }
        let mut sorted = ttfts.clone();
        sorted.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if sorted.is_empty() {
                return 0.0;
            }
            let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
            sorted[i.min(sorted.len() - 1)] * 1e3
        };
        let busy: Vec<f64> = self.engines.iter().map(|e| e.busy_s).collect();
        let mean = busy.iter().sum::<f64>() / busy.len().max(1) as f64;
        let max = busy.iter().copied().fold(0.0, f64::max);
        PolicyResult {
            hit_ratio: if total_tokens == 0 {
                0.0
            } else {
                hit_tokens as f64 / total_tokens as f64
            },
            ttft_mean_ms: sorted.iter().sum::<f64>() * 1e3 / sorted.len().max(1) as f64,
            ttft_p50_ms: pct(0.5),
            ttft_p99_ms: pct(0.99),
            load_imbalance: if mean > 0.0 { max / mean } else { 1.0 },
        }
    }
}

/// Replays `trace` under `policy`.
pub fn simulate(trace: &[TraceRequest], cfg: &SimConfig, policy: Policy) -> PolicyResult {
    Sim::new(cfg).run(trace, policy)
}

/// The figures of every policy on one trace.
#[derive(Debug, Clone)]
pub struct Report {
    pub ideal_hit_ratio: f64,
    pub policies: Vec<(Policy, PolicyResult)>,
}

impl Report {
    /// `{"ideal_hit_ratio": f, "policies": {"kv": {...}, ...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut p = serde_json::Map::new();
        for (pol, r) in &self.policies {
            p.insert(
                pol.name().to_string(),
                serde_json::to_value(r).unwrap_or_default(),
            );
        }
        serde_json::json!({ "ideal_hit_ratio": self.ideal_hit_ratio, "policies": p })
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "ideal hit ratio (unbounded shared cache): {:.3}\n{:<14} {:>9} {:>14} {:>14} {:>14} {:>15}\n",
            self.ideal_hit_ratio,
            "policy",
            "hit ratio",
            "TTFT mean ms",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "load max/mean"
        );
        for (pol, r) in &self.policies {
            s.push_str(&format!(
                "{:<14} {:>9.3} {:>14.1} {:>14.1} {:>14.1} {:>15.3}\n",
                pol.name(),
                r.hit_ratio,
                r.ttft_mean_ms,
                r.ttft_p50_ms,
                r.ttft_p99_ms,
                r.load_imbalance
            ));
        }
        s
    }
}

/// Replays `trace` once per policy (in parallel threads).
pub fn compare(trace: &[TraceRequest], cfg: &SimConfig, policies: &[Policy]) -> Report {
    let results = std::thread::scope(|s| {
        let hs: Vec<_> = policies
            .iter()
            .map(|p| s.spawn(move || (*p, simulate(trace, cfg, *p))))
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    Report {
        ideal_hit_ratio: ideal_hit_ratio(trace),
        policies: results,
    }
}

/// Parses `kv,round_robin,...`.
pub fn parse_policies(s: &str) -> Result<Vec<Policy>, String> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            Policy::parse(x).ok_or_else(|| {
                format!("unknown policy {x:?} (kv, round_robin, least_loaded, prefix_only)")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ts: f64, ids: &[u64]) -> TraceRequest {
        TraceRequest {
            timestamp: ts,
            input_length: ids.len() as u64 * TRACE_BLOCK,
            output_length: 10,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn kv_policy_follows_prefixes() {
        // two families of prompts, alternating; 2 workers with room for one
        // family each: kv keeps each family on one worker.
        let mut t = Vec::new();
        for i in 0..40u64 {
            let fam = i % 2;
            let base = fam * 1000;
            t.push(req(
                i as f64 * 2000.0,
                &[base, base + 1, base + 2, base + 3, 10_000 + i],
            ));
        }
        let cfg = SimConfig {
            workers: 2,
            gpu_tokens: 6 * TRACE_BLOCK,
            ..SimConfig::default()
        };
        let ideal = ideal_hit_ratio(&t);
        assert!((ideal - (38.0 * 4.0) / (40.0 * 5.0)).abs() < 1e-9);
        let kv = simulate(&t, &cfg, Policy::Kv);
        let rr = simulate(&t, &cfg, Policy::RoundRobin);
        assert!(kv.hit_ratio > 0.7, "{kv:?}");
        assert!(kv.hit_ratio >= rr.hit_ratio);
        let r = compare(
            &t,
            &cfg,
            &[Policy::Kv, Policy::PrefixOnly, Policy::LeastLoaded],
        );
        assert_eq!(r.policies.len(), 3);
        assert!(r.to_json()["policies"]["kv"]["hit_ratio"].is_f64());
        assert!(parse_policies("kv,nope").is_err());
    }

    #[test]
    fn lower_tiers_and_remote_hold_blocks() {
        let t: Vec<_> = (0..20u64)
            .map(|i| req(i as f64 * 5000.0, &[1, 2, 3, 100 + i]))
            .collect();
        let cfg = SimConfig {
            workers: 2,
            gpu_tokens: 2 * TRACE_BLOCK,
            host_tokens: 4 * TRACE_BLOCK,
            remote_tokens: 100 * TRACE_BLOCK,
            ..SimConfig::default()
        };
        for p in [Policy::Kv, Policy::RoundRobin] {
            let r = simulate(&t, &cfg, p);
            assert!(r.hit_ratio > 0.6, "{p:?} {r:?}");
        }
    }
}
