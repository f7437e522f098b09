//! Seeded generators of Mooncake traces of three shapes the synthetic
//! Mooncake trace does not cover, for the replay comparison
//! (`cargo bench -p kvtier-benches --bench gen_trace`, `docs/router.md`):
//!
//! - [`Shape::MultiTurn`]: long conversations under one shared system
//!   prompt; each turn's prompt is the previous prompt, its answer and a new
//!   user message.
//! - [`Shape::ToolAgent`]: agent loops; a tool-spec prompt (one of a few
//!   agent kinds), a task, then short steps (tool call + tool result)
//!   appended to a growing context every few seconds, many agents at once.
//! - [`Shape::ManyTenants`]: hundreds of tenants, each with its own system
//!   prompt, drawn with Zipf-like popularity; each request is the tenant's
//!   prompt and a fresh user message.
//!
//! Prompts are sequences of content segments (a system prompt, a user
//! message, an answer ...). A block's id stands for its parent's id and the
//! pieces of segments it covers, so equal ids mean equal prefixes, the last
//! partial block of a prompt gets its own id (its content grows next turn),
//! and `hash_ids.len() == ceil(input_length / 512)`, as in Mooncake traces.
//! The same seed and parameters give the same trace, byte for byte (ChaCha8
//! is specified to be reproducible across platforms and versions).

use std::collections::HashMap;
use std::fmt::Write as _;

use kvrouter::replay::{TraceRequest, TRACE_BLOCK};
use rand::distr::weighted::WeightedIndex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Decode time per output token the generator assumes between a turn and
/// the next one (the replay's default, `--decode-ms-per-token 20`).
const DECODE_S_PER_TOKEN: f64 = 0.02;

/// The trace shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    MultiTurn,
    ToolAgent,
    ManyTenants,
}

impl Shape {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "multi_turn" => Some(Self::MultiTurn),
            "tool_agent" => Some(Self::ToolAgent),
            "many_tenants" => Some(Self::ManyTenants),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::MultiTurn => "multi_turn",
            Self::ToolAgent => "tool_agent",
            Self::ManyTenants => "many_tenants",
        }
    }

    /// Arrivals per second (conversations, agents or requests) that keep
    /// the replay's default fleet (8 workers of 10k prefill tokens/s) busy
    /// without swamping it: the prompt tokens left to prefill under ideal
    /// reuse are 30–45% of its capacity. Half of it is light, 1.5–2 times
    /// heavy (`docs/benchmarks.md`).
    pub fn default_rate(self) -> f64 {
        match self {
            Self::MultiTurn => 4.0,
            Self::ToolAgent => 1.0,
            Self::ManyTenants => 25.0,
        }
    }
}

/// Generator parameters.
#[derive(Debug, Clone)]
pub struct GenConfig {
    pub shape: Shape,
    /// Default 1.
    pub seed: u64,
    /// Seconds during which sessions, agents or requests start; sessions
    /// and agents started in time run to their end. Default 600.
    pub duration_s: f64,
    /// Arrivals per second (Poisson): conversations (`multi_turn`), agents
    /// (`tool_agent`) or requests (`many_tenants`). Default
    /// [`Shape::default_rate`].
    pub rate: f64,
    /// Distinct tenants of `many_tenants` (default 400) or agent kinds of
    /// `tool_agent` (default 4).
    pub tenants: usize,
    /// Zipf exponent of tenant popularity (`many_tenants`). Default 1.1.
    pub zipf_s: f64,
}

impl GenConfig {
    pub fn new(shape: Shape) -> Self {
        Self {
            shape,
            seed: 1,
            duration_s: 600.0,
            rate: shape.default_rate(),
            tenants: if shape == Shape::ToolAgent { 4 } else { 400 },
            zipf_s: 1.1,
        }
    }
}

/// A piece of content: (segment id, first token, end token).
type Piece = (u64, u32, u32);

/// Assigns prefix-chained block ids to prompts made of segments.
struct Blocks {
    ids: HashMap<(u32, Vec<Piece>), u32>,
    next_segment: u64,
}

impl Blocks {
    fn new() -> Self {
        Self {
            ids: HashMap::new(),
            next_segment: 0,
        }
    }

    /// A fresh segment of `len` tokens (new content nobody has sent yet).
    fn segment(&mut self, len: u32) -> (u64, u32) {
        self.next_segment += 1;
        (self.next_segment, len)
    }

    /// The block ids of a prompt made of `segments` (id, tokens) in order.
    fn hash_ids(&mut self, segments: &[(u64, u32)]) -> Vec<u64> {
        let block = TRACE_BLOCK as u32;
        let mut out = Vec::new();
        let mut parent = u32::MAX;
        let mut pieces: Vec<Piece> = Vec::new();
        let mut filled = 0u32;
        let mut close = |pieces: &mut Vec<Piece>, parent: &mut u32| {
            let n = self.ids.len() as u32;
            let id = *self
                .ids
                .entry((*parent, std::mem::take(pieces)))
                .or_insert(n);
            *parent = id;
            out.push(u64::from(id));
        };
        for &(seg, len) in segments {
            let mut at = 0;
            while at < len {
                let take = (block - filled).min(len - at);
                pieces.push((seg, at, at + take));
                at += take;
                filled += take;
                if filled == block {
                    close(&mut pieces, &mut parent);
                    filled = 0;
                }
            }
        }
        if filled > 0 {
            close(&mut pieces, &mut parent);
        }
        out
    }
}

/// One request as generated, before sorting by time.
fn request(ts_s: f64, segments: &[(u64, u32)], output: u32, b: &mut Blocks) -> TraceRequest {
    TraceRequest {
        timestamp: (ts_s * 1e3).round(),
        input_length: segments.iter().map(|s| u64::from(s.1)).sum(),
        output_length: u64::from(output),
        hash_ids: b.hash_ids(segments),
    }
}

/// Exponential draw of mean `mean`.
fn exp(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

/// Poisson arrival times in `[0, duration)`.
fn arrivals(rng: &mut ChaCha8Rng, rate: f64, duration: f64) -> Vec<f64> {
    let mut out = Vec::new();
    if rate <= 0.0 {
        return out;
    }
    let mut t = exp(rng, 1.0 / rate);
    while t < duration {
        out.push(t);
        t += exp(rng, 1.0 / rate);
    }
    out
}

/// Generates the trace of `cfg`, sorted by timestamp.
pub fn generate(cfg: &GenConfig) -> Vec<TraceRequest> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut b = Blocks::new();
    let mut out = match cfg.shape {
        Shape::MultiTurn => multi_turn(cfg, &mut rng, &mut b),
        Shape::ToolAgent => tool_agent(cfg, &mut rng, &mut b),
        Shape::ManyTenants => many_tenants(cfg, &mut rng, &mut b),
    };
    // stable: a session's turns keep their order at equal timestamps
    out.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    out
}

/// One system prompt (2,000 tokens); per conversation 4–16 turns; the first
/// user message 200–3,000 tokens (often a pasted document), later ones
/// 50–800; answers 100–800 tokens; the next turn comes after the answer is
/// decoded and the user thinks (exponential, mean 20 s).
fn multi_turn(cfg: &GenConfig, rng: &mut ChaCha8Rng, b: &mut Blocks) -> Vec<TraceRequest> {
    let system = b.segment(2000);
    let mut out = Vec::new();
    for start in arrivals(rng, cfg.rate, cfg.duration_s) {
        let turns = rng.random_range(4..=16);
        let mut ctx = vec![system, b.segment(rng.random_range(200..=3000))];
        let mut t = start;
        for turn in 0..turns {
            if turn > 0 {
                ctx.push(b.segment(rng.random_range(50..=800)));
            }
            let answer = rng.random_range(100..=800);
            out.push(request(t, &ctx, answer, b));
            ctx.push(b.segment(answer));
            t += 1.0 + f64::from(answer) * DECODE_S_PER_TOKEN + exp(rng, 20.0);
        }
    }
    out
}

/// `tenants` agent kinds, each with a tool-spec prompt of 3,000–6,000
/// tokens; per agent a task of 300–2,000 tokens and 10–50 steps, each a tool
/// call of 20–200 output tokens and a tool result of 50–1,500 tokens, the
/// next step after the call is decoded and the tool answers (exponential,
/// mean 2 s).
fn tool_agent(cfg: &GenConfig, rng: &mut ChaCha8Rng, b: &mut Blocks) -> Vec<TraceRequest> {
    let kinds: Vec<_> = (0..cfg.tenants.max(1))
        .map(|_| b.segment(rng.random_range(3000..=6000)))
        .collect();
    let mut out = Vec::new();
    for start in arrivals(rng, cfg.rate, cfg.duration_s) {
        let kind = kinds[rng.random_range(0..kinds.len())];
        let mut ctx = vec![kind, b.segment(rng.random_range(300..=2000))];
        let steps = rng.random_range(10..=50);
        let mut t = start;
        for _ in 0..steps {
            let call = rng.random_range(20..=200);
            out.push(request(t, &ctx, call, b));
            ctx.push(b.segment(call));
            ctx.push(b.segment(rng.random_range(50..=1500)));
            t += 0.5 + f64::from(call) * DECODE_S_PER_TOKEN + exp(rng, 2.0);
        }
    }
    out
}

/// `tenants` system prompts of 500–8,000 tokens, tenant `k` (from 0) drawn
/// with weight `1 / (k + 1)^zipf_s`; each request is its tenant's prompt and
/// a new user message of 100–2,000 tokens, answered in 50–500 tokens.
fn many_tenants(cfg: &GenConfig, rng: &mut ChaCha8Rng, b: &mut Blocks) -> Vec<TraceRequest> {
    let n = cfg.tenants.max(1);
    let prompts: Vec<_> = (0..n)
        .map(|_| b.segment(rng.random_range(500..=8000)))
        .collect();
    let weights = (0..n).map(|k| (k as f64 + 1.0).powf(-cfg.zipf_s));
    let Ok(pick) = WeightedIndex::new(weights) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in arrivals(rng, cfg.rate, cfg.duration_s) {
        let tenant = prompts[rng.sample(&pick)];
        let user = b.segment(rng.random_range(100..=2000));
        let answer = rng.random_range(50..=500);
        out.push(request(t, &[tenant, user], answer, b));
    }
    out
}

/// One Mooncake JSONL line (integer milliseconds, as Mooncake's traces).
pub fn jsonl_line(r: &TraceRequest) -> String {
    let mut s = format!(
        "{{\"timestamp\": {}, \"input_length\": {}, \"output_length\": {}, \"hash_ids\": [",
        r.timestamp as u64, r.input_length, r.output_length
    );
    for (i, h) in r.hash_ids.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{h}");
    }
    s.push_str("]}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrouter::replay::ideal_hit_ratio;

    fn small(shape: Shape) -> GenConfig {
        GenConfig {
            duration_s: 60.0,
            ..GenConfig::new(shape)
        }
    }

    #[test]
    fn same_seed_same_trace_other_seed_other_trace() {
        for shape in [Shape::MultiTurn, Shape::ToolAgent, Shape::ManyTenants] {
            let a: Vec<String> = generate(&small(shape)).iter().map(jsonl_line).collect();
            let b: Vec<String> = generate(&small(shape)).iter().map(jsonl_line).collect();
            assert!(!a.is_empty(), "{shape:?}");
            assert_eq!(a, b, "{shape:?}");
            let other = GenConfig {
                seed: 2,
                ..small(shape)
            };
            let c: Vec<String> = generate(&other).iter().map(jsonl_line).collect();
            assert_ne!(a, c, "{shape:?}");
        }
    }

    #[test]
    fn blocks_are_mooncake_shaped() {
        for shape in [Shape::MultiTurn, Shape::ToolAgent, Shape::ManyTenants] {
            let t = generate(&small(shape));
            let mut parent_of: HashMap<u64, Option<u64>> = HashMap::new();
            for w in t.windows(2) {
                assert!(w[0].timestamp <= w[1].timestamp);
            }
            for r in &t {
                let blocks = r.input_length.div_ceil(TRACE_BLOCK);
                assert_eq!(r.hash_ids.len() as u64, blocks, "{shape:?}");
                // an id always follows the same parent: ids are prefix-chained
                for (i, h) in r.hash_ids.iter().enumerate() {
                    let p = i.checked_sub(1).map(|j| r.hash_ids[j]);
                    assert_eq!(*parent_of.entry(*h).or_insert(p), p, "{shape:?}");
                }
            }
            assert!(ideal_hit_ratio(&t) > 0.5, "{shape:?}");
        }
    }

    #[test]
    fn a_turn_extends_the_previous_prompt() {
        let mut b = Blocks::new();
        let sys = b.segment(700);
        let user = b.segment(400);
        let first = b.hash_ids(&[sys, user]);
        let answer = b.segment(300);
        let second = b.hash_ids(&[sys, user, answer]);
        // 1,100 tokens: two full blocks, one partial; 1,400: the partial
        // block is full now and has a new id
        assert_eq!(first.len(), 3);
        assert_eq!(second.len(), 3);
        assert_eq!(first[..2], second[..2]);
        assert_ne!(first[2], second[2]);
        assert_eq!(b.hash_ids(&[sys, user]), first);
    }
}
