//! Request traces turned into one stream of index operations.
//!
//! A trace is Mooncake-format requests (`hash_ids` = prefix-chained ids of
//! 512-token blocks). [`Stream::build`] serves each request on one of `workers`
//! workers (a deterministic assignment), and keeps each worker's cache as a
//! block-level LRU of `capacity` blocks. Per request it emits a lookup of the
//! prompt, a store of the blocks the worker did not hold (with the parent block
//! it did hold), and a remove of the blocks the capacity then evicts.
//!
//! A request touches its blocks last to first, so a block is always at least as
//! recent as every block after it in any prompt: the LRU victim is always a
//! leaf of what its worker holds, as in an engine that frees a prompt's tail
//! first, and no remove ever orphans a held child.
//!
//! [`conversation_trace`] generates the conversation-shaped input: multi-turn
//! sessions whose prompts grow turn by turn (the history is the next prompt's
//! prefix) and start with one of a few shared system prompts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use kvrouter::replay::TraceRequest;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Tokens per trace block (Mooncake).
pub const BLOCK_TOKENS: u64 = 512;

/// One index operation.
#[derive(Debug, Clone)]
pub enum Op {
    /// Look up prompt `n` of [`Stream::prompts`].
    Lookup(u32),
    /// `worker` stores `ids` (a chain continuing `parent`, or a root chain).
    Store {
        worker: u32,
        parent: Option<u64>,
        ids: Vec<u64>,
    },
    /// `worker` evicts `ids`.
    Remove { worker: u32, ids: Vec<u64> },
}

impl Op {
    /// The worker a write belongs to (`None` for lookups).
    pub fn worker(&self) -> Option<u32> {
        match self {
            Op::Lookup(_) => None,
            Op::Store { worker, .. } | Op::Remove { worker, .. } => Some(*worker),
        }
    }
}

/// How requests are assigned to workers.
#[derive(Debug, Clone, Copy)]
pub enum Assign {
    /// By request number: requests spread over the fleet, so shared prefixes
    /// end up held by many workers.
    Spread,
    /// By the given key per request (a session id): every turn of a session
    /// on one worker, as a KV-aware router would place it.
    Sticky,
}

/// Stream parameters.
#[derive(Debug, Clone, Copy)]
pub struct StreamConfig {
    pub workers: u32,
    /// Blocks each worker's cache holds.
    pub capacity: usize,
    /// Added to every worker number (a second writer's disjoint fleet).
    pub worker_base: u32,
    /// Added to every block id (disjoint content).
    pub id_base: u64,
    /// Evict everything at the end, so the stream can be replayed again.
    pub drain_at_end: bool,
}

/// Operations of a trace, in serving order.
pub struct Stream {
    pub ops: Vec<Op>,
    /// One prompt per request: its block ids as tokens of one-token blocks.
    pub prompts: Vec<Vec<u32>>,
    /// Holdings (block x worker) left at the end.
    pub holdings: usize,
    /// Distinct blocks left at the end.
    pub distinct: usize,
    /// Blocks stored and removed over the stream.
    pub stored: u64,
    pub removed: u64,
}

#[derive(Default)]
struct Lru {
    stamp_of: HashMap<u64, u64>,
    by_stamp: BTreeMap<u64, u64>,
}

impl Lru {
    fn touch(&mut self, id: u64, stamp: u64) {
        if let Some(old) = self.stamp_of.insert(id, stamp) {
            self.by_stamp.remove(&old);
        }
        self.by_stamp.insert(stamp, id);
    }
    fn pop_oldest(&mut self) -> Option<u64> {
        let (_, id) = self.by_stamp.pop_first()?;
        self.stamp_of.remove(&id);
        Some(id)
    }
}

fn mix(x: u64) -> u64 {
    let x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Stream {
    /// Serves `reqs` in order; `keys[i]` places request `i` under
    /// [`Assign::Sticky`].
    pub fn build(reqs: &[TraceRequest], keys: &[u64], assign: Assign, cfg: StreamConfig) -> Self {
        let mut caches: Vec<Lru> = (0..cfg.workers).map(|_| Lru::default()).collect();
        let mut ops = Vec::with_capacity(reqs.len() * 3);
        let mut prompts = Vec::with_capacity(reqs.len());
        let (mut stamp, mut stored, mut removed) = (0u64, 0u64, 0u64);
        for (i, r) in reqs.iter().enumerate() {
            let ids: Vec<u64> = r.hash_ids.iter().map(|h| h + cfg.id_base).collect();
            let key = match assign {
                Assign::Spread => i as u64,
                Assign::Sticky => keys.get(i).copied().unwrap_or(i as u64),
            };
            let w = (mix(key) % u64::from(cfg.workers)) as u32;
            ops.push(Op::Lookup(prompts.len() as u32));
            prompts.push(
                ids.iter()
                    .map(|h| u32::try_from(*h).expect("block ids fit in u32"))
                    .collect(),
            );
            let cache = &mut caches[w as usize];
            let held = ids
                .iter()
                .take_while(|h| cache.stamp_of.contains_key(h))
                .count();
            if held < ids.len() {
                stored += (ids.len() - held) as u64;
                ops.push(Op::Store {
                    worker: w + cfg.worker_base,
                    parent: held.checked_sub(1).map(|p| ids[p]),
                    ids: ids[held..].to_vec(),
                });
            }
            for h in ids.iter().rev() {
                stamp += 1;
                cache.touch(*h, stamp);
            }
            let mut evicted = Vec::new();
            while cache.stamp_of.len() > cfg.capacity {
                evicted.extend(cache.pop_oldest());
            }
            if !evicted.is_empty() {
                removed += evicted.len() as u64;
                ops.push(Op::Remove {
                    worker: w + cfg.worker_base,
                    ids: evicted,
                });
            }
        }
        if cfg.drain_at_end {
            for (w, cache) in caches.iter_mut().enumerate() {
                let mut ids = Vec::new();
                while let Some(id) = cache.pop_oldest() {
                    ids.push(id);
                }
                if !ids.is_empty() {
                    removed += ids.len() as u64;
                    ops.push(Op::Remove {
                        worker: w as u32 + cfg.worker_base,
                        ids,
                    });
                }
            }
        }
        let holdings = caches.iter().map(|c| c.stamp_of.len()).sum();
        let distinct = caches
            .iter()
            .flat_map(|c| c.stamp_of.keys())
            .collect::<HashSet<_>>()
            .len();
        Self {
            ops,
            prompts,
            holdings,
            distinct,
            stored,
            removed,
        }
    }

    /// The writes only, in order.
    pub fn writes(&self) -> impl Iterator<Item = &Op> {
        self.ops.iter().filter(|o| o.worker().is_some())
    }
}

/// `n` copies of a trace with disjoint ids (copy `c` adds `c * (max id + 1)`),
/// interleaved by timestamp.
pub fn copies(reqs: &[TraceRequest], n: u64) -> Vec<TraceRequest> {
    let span = reqs
        .iter()
        .flat_map(|r| r.hash_ids.iter())
        .max()
        .map_or(1, |m| m + 1);
    let mut out: Vec<TraceRequest> = (0..n.max(1))
        .flat_map(|c| {
            reqs.iter().map(move |r| TraceRequest {
                hash_ids: r.hash_ids.iter().map(|h| h + c * span).collect(),
                ..r.clone()
            })
        })
        .collect();
    out.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    out
}

/// Shape of the generated conversations. Lengths in tokens.
#[derive(Debug, Clone, Copy)]
pub struct ConversationConfig {
    pub sessions: u64,
    /// Shared system prompts; each session starts with one of them.
    pub system_prompts: u64,
    pub system_tokens: (u64, u64),
    pub turns: (u64, u64),
    pub user_tokens: (u64, u64),
    pub output_tokens: (u64, u64),
    /// Mean seconds between session starts and between a session's turns.
    pub session_gap_s: f64,
    pub think_s: (f64, f64),
    pub seed: u64,
}

impl Default for ConversationConfig {
    /// 4,000 sessions of 2–24 turns over 32 system prompts of 1–4k tokens;
    /// each turn adds a 64–1,024-token message and the previous 32–512-token
    /// answer; a session every 50 ms, 5–60 s between turns.
    fn default() -> Self {
        Self {
            sessions: 4000,
            system_prompts: 32,
            system_tokens: (1024, 4096),
            turns: (2, 24),
            user_tokens: (64, 1024),
            output_tokens: (32, 512),
            session_gap_s: 0.05,
            think_s: (5.0, 60.0),
            seed: 7,
        }
    }
}

/// Generates multi-turn sessions as Mooncake requests; returns them in time
/// order with each request's session id.
pub fn conversation_trace(cfg: &ConversationConfig) -> (Vec<TraceRequest>, Vec<u64>) {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut next_id = 0u64;
    let mut fresh = || {
        next_id += 1;
        next_id - 1
    };
    let systems: Vec<(u64, Vec<u64>)> = (0..cfg.system_prompts)
        .map(|_| {
            let len = rng.random_range(cfg.system_tokens.0..=cfg.system_tokens.1);
            (len, (0..len / BLOCK_TOKENS).map(|_| fresh()).collect())
        })
        .collect();
    let mut out: Vec<(TraceRequest, u64)> = Vec::new();
    let mut start = 0.0f64;
    for s in 0..cfg.sessions {
        start += cfg.session_gap_s * rng.random_range(0.0..2.0);
        let (sys_len, sys_ids) = &systems[rng.random_range(0..systems.len())];
        let turns = rng.random_range(cfg.turns.0..=cfg.turns.1);
        let mut len = *sys_len;
        let mut full: Vec<u64> = Vec::new();
        let mut t = start;
        for turn in 0..turns {
            if turn > 0 {
                t += rng.random_range(cfg.think_s.0..cfg.think_s.1);
            }
            len += rng.random_range(cfg.user_tokens.0..=cfg.user_tokens.1);
            let nfull = (len / BLOCK_TOKENS) as usize;
            while full.len() < nfull {
                let j = full.len();
                full.push(match sys_ids.get(j) {
                    Some(id) => *id,
                    None => fresh(),
                });
            }
            let mut hash_ids = full.clone();
            if len % BLOCK_TOKENS != 0 {
                hash_ids.push(fresh());
            }
            let output = rng.random_range(cfg.output_tokens.0..=cfg.output_tokens.1);
            out.push((
                TraceRequest {
                    timestamp: t * 1000.0,
                    input_length: len,
                    output_length: output,
                    hash_ids,
                },
                s,
            ));
            len += output;
        }
    }
    out.sort_by(|a, b| a.0.timestamp.total_cmp(&b.0.timestamp));
    out.into_iter().unzip()
}

/// Writes requests as Mooncake JSONL.
pub fn write_jsonl(path: &Path, reqs: &[TraceRequest]) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in reqs {
        let v = serde_json::json!({
            "timestamp": r.timestamp.round() as u64,
            "input_length": r.input_length,
            "output_length": r.output_length,
            "hash_ids": r.hash_ids,
        });
        writeln!(f, "{v}")?;
    }
    f.flush()?;
    Ok(())
}
