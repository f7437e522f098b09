//! The routing decision shared by every API: tokens -> index lookup -> TTFT
//! estimate per worker of the model -> choice, and in-flight bookkeeping.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{Config, LoadConfig};
use crate::index::Index;
use crate::metrics::RouterMetrics;
use crate::scoring::ScoringConfig;
use crate::tokenize::{ChatOptions, TokenizeError, Tokenizers};
use crate::workers::Workers;

/// Longest prompt accepted, in tokens.
pub const MAX_PROMPT_TOKENS: usize = 4 << 20;

/// Largest request body accepted, on every API (HTTP, gRPC messages, the
/// ext_proc buffered body): room for [`MAX_PROMPT_TOKENS`] tokens at 4 bytes
/// each (about a token's worth of prompt text, or a JSON token id below
/// 1000 with its comma), 16 MiB. Larger bodies are refused before parsing.
pub const MAX_BODY_BYTES: usize = MAX_PROMPT_TOKENS * 4;

/// What the request carries instead of token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Tokens(Vec<u32>),
    Prompt(String),
    /// Chat messages, and what else the template sees.
    Messages(Vec<Value>, ChatOptions),
}

/// One route request, whatever API it came through.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRequest {
    pub model: String,
    pub input: Input,
    pub lora_name: Option<String>,
    pub cache_salt: Option<String>,
    /// Endpoints (`host:port`) the caller allows (ext_proc subset hint);
    /// None: any.
    pub subset: Option<Vec<String>>,
}

/// Per-tier block counts, as JSON `{"gpu", "host", "disk", "remote"}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierBlocks {
    pub gpu: u32,
    pub host: u32,
    pub disk: u32,
    pub remote: u32,
}

impl From<[u32; 4]> for TierBlocks {
    fn from(b: [u32; 4]) -> Self {
        Self {
            gpu: b[0],
            host: b[1],
            disk: b[2],
            remote: b[3],
        }
    }
}

/// One scored worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub worker_id: String,
    pub matched_blocks: TierBlocks,
    /// Matched prefix in tokens (blocks x the events' block size).
    pub matched_tokens: u64,
    /// Estimated TTFT plus the congestion charge, in milliseconds (lower
    /// is better; see `scoring`).
    pub score: f64,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Pass to `POST /v1/route/{request_id}/done` when the request ends.
    pub request_id: u64,
    pub worker_id: String,
    pub endpoint: String,
    /// Every worker of the model, best first.
    pub candidates: Vec<Candidate>,
}

/// Why no decision.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// 400 / INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// 503 / UNAVAILABLE: no worker serves the model.
    #[error("no worker serves model {0:?}")]
    NoWorkers(String),
    /// 503 / UNAVAILABLE: workers exist but none is in the allowed subset.
    #[error("no eligible endpoint for model {0:?}")]
    NoEligible(String),
    /// 500 / INTERNAL: the router's own setup (tokenizer files) is broken.
    #[error("{0}")]
    Setup(String),
}

impl From<TokenizeError> for RouteError {
    fn from(e: TokenizeError) -> Self {
        match e {
            TokenizeError::Setup(s) => RouteError::Setup(s),
            other => RouteError::Invalid(other.to_string()),
        }
    }
}

/// The router: index, workers, tokenizers, scoring.
pub struct Router {
    pub index: Arc<Index>,
    pub workers: Arc<Workers>,
    pub tokenizers: Tokenizers,
    pub scoring: ScoringConfig,
    pub load: LoadConfig,
    pub metrics: RouterMetrics,
    groups: HashMap<String, u32>,
    next_id: AtomicU64,
    rng: AtomicU64,
}

impl Router {
    pub fn new(cfg: &Config, index: Arc<Index>, workers: Arc<Workers>) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            | 1;
        Self {
            index,
            workers,
            tokenizers: Tokenizers::new(&cfg.models),
            scoring: cfg.scoring.clone(),
            load: cfg.load.clone(),
            metrics: RouterMetrics::default(),
            groups: cfg
                .models
                .iter()
                .map(|m| (m.name.clone(), m.kv_group))
                .collect(),
            next_id: AtomicU64::new(1),
            rng: AtomicU64::new(seed),
        }
    }

    fn uniform(&self) -> f64 {
        // xorshift64*; races only make it more random.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Token ids of the request's input.
    pub fn tokens(&self, model: &str, input: &Input) -> Result<Vec<u32>, RouteError> {
        let t = match input {
            Input::Tokens(t) => t.clone(),
            Input::Prompt(p) => self.tokenizers.encode_prompt(model, p)?,
            Input::Messages(m, options) => self.tokenizers.encode_messages(model, m, options)?,
        };
        if t.len() > MAX_PROMPT_TOKENS {
            return Err(RouteError::Invalid(format!(
                "prompt of {} tokens exceeds {MAX_PROMPT_TOKENS}",
                t.len()
            )));
        }
        Ok(t)
    }

    /// Routes one request and counts it in flight on the chosen worker.
    pub fn route(&self, req: &RouteRequest) -> Result<Decision, RouteError> {
        let start = Instant::now();
        let r = self.route_inner(req);
        self.metrics
            .route_latency
            .observe(start.elapsed().as_secs_f64());
        match &r {
            Ok(_) => self.metrics.outcome("routed"),
            Err(RouteError::Invalid(_)) => self.metrics.outcome("invalid"),
            Err(_) => self.metrics.outcome("no_worker"),
        }
        r
    }

    fn route_inner(&self, req: &RouteRequest) -> Result<Decision, RouteError> {
        if req.model.is_empty() {
            return Err(RouteError::Invalid("model must not be empty".into()));
        }
        let mut workers = self.workers.for_model(&req.model);
        if workers.is_empty() {
            return Err(RouteError::NoWorkers(req.model.clone()));
        }
        if let Some(subset) = &req.subset {
            workers.retain(|w| subset.iter().any(|s| s == w.spec.host_port()));
            if workers.is_empty() {
                return Err(RouteError::NoEligible(req.model.clone()));
            }
        }
        let tokens = self.tokens(&req.model, &req.input)?;
        let group = self.groups.get(&req.model).copied().unwrap_or(0);
        let matches = self.index.lookup(
            &req.model,
            req.lora_name.as_deref(),
            req.cache_salt.as_deref(),
            group,
            &tokens,
        );
        let rate = self.scoring.prefill_tokens_per_s;
        let window = self.scoring.utilization_window_s;
        let ttl = Duration::from_secs(self.load.in_flight_ttl_s);
        let prompt = tokens.len() as u64;
        let mut scored = Vec::with_capacity(workers.len());
        for w in &workers {
            let m = matches.get(&w.id);
            let (blocks, tok) = m.map_or(([0; 4], [0; 4]), |m| (m.blocks, m.tokens()));
            let load = w.load(rate, window, ttl);
            let est = self.scoring.estimate(prompt, tok, &load);
            scored.push((w.clone(), blocks, tok, est, load.in_flight));
        }
        let cost: Vec<f64> = scored.iter().map(|s| s.3.cost_s()).collect();
        let fl: Vec<f64> = scored.iter().map(|s| s.4).collect();
        let tie = self.next_id.load(Ordering::Relaxed) as usize;
        let pick = self
            .scoring
            .choose(&cost, &fl, tie, self.uniform())
            .ok_or_else(|| RouteError::NoWorkers(req.model.clone()))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (chosen, blocks, tok, est, _) = &scored[pick];
        let held: u64 = tok.iter().sum();
        let work = est.prefill_s + est.onboard_s;
        chosen.begin(id, prompt.saturating_sub(held) as f64, work, rate, window);
        self.metrics.matched(*blocks);
        let mut candidates: Vec<Candidate> = scored
            .iter()
            .map(|(w, b, t, s, _)| Candidate {
                worker_id: w.id.to_string(),
                matched_blocks: (*b).into(),
                matched_tokens: t.iter().sum(),
                score: s.cost_s() * 1e3,
            })
            .collect();
        candidates.sort_by(|a, b| a.score.total_cmp(&b.score));
        Ok(Decision {
            request_id: id,
            worker_id: chosen.id.to_string(),
            endpoint: chosen.spec.endpoint.clone(),
            candidates,
        })
    }

    /// The routed request `id` has ended; false when unknown (or expired).
    pub fn done(&self, id: u64) -> bool {
        self.workers.list().iter().any(|w| w.end(id))
    }
}
