//! What ingestion hands the index: block events normalized from every source
//! (engine ZMQ streams, kvbm `SubscribeEvents` streams).
//!
//! This module is the contract between `ingest` (decoding, replay, gap and
//! restart handling) and `index` (the router's own chain keys and lookups).

use std::sync::Arc;

/// A worker as the operator names it (`POST /v1/workers`, config file).
pub type WorkerId = Arc<str>;

/// Where a worker holds a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// G1: the engine's own GPU prefix cache (engine ZMQ events).
    Gpu,
    /// G2: kvbm host memory.
    Host,
    /// G3: kvbm local disk.
    Disk,
    /// G4: a remote store, possibly shared by several workers.
    Remote,
}

/// An engine's block hash, normalized to 64 bits: integer hashes as their
/// two's-complement `u64`, byte-string hashes (16 or 32 bytes) as the xxh3-64
/// of the bytes. Only used to join `Removed` events to the blocks that
/// `Stored` events introduced from the same source; routing never depends on
/// an engine's hash algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EngineHash(pub u64);

/// What a block belongs to: blocks of different scopes never match.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Scope {
    pub model: Arc<str>,
    pub lora_name: Option<Arc<str>>,
    /// KV-cache group index (hybrid models have several); 0 by default.
    pub group: u32,
}

/// The source of an event stream: a worker, the data-parallel rank within it
/// (0 when the engine has none) and the tier family it reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    pub worker: WorkerId,
    pub dp_rank: u32,
}

/// One normalized event.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexEvent {
    /// A chain of full blocks was stored. `token_ids` holds the tokens of all
    /// blocks concatenated, `block_size` tokens each; `parent` is the engine
    /// hash of the block before `hashes[0]` (None for a root).
    Stored {
        source: Source,
        tier: Tier,
        scope: Scope,
        hashes: Vec<EngineHash>,
        parent: Option<EngineHash>,
        token_ids: Vec<u32>,
        block_size: u32,
    },
    /// Blocks were removed from one tier of this source.
    Removed {
        source: Source,
        tier: Tier,
        /// `None` when the stream does not say (vLLM's `BlockRemoved` carries
        /// no model): remove the hashes from every scope of this source.
        scope: Option<Scope>,
        hashes: Vec<EngineHash>,
    },
    /// Every block of this source in `tier` (all tiers when `None`) is gone.
    Cleared { source: Source, tier: Option<Tier> },
}

/// Where ingestion delivers events. Implemented by the index. Must not block
/// for long: ingestion calls it from its socket tasks.
pub trait EventSink: Send + Sync + 'static {
    fn apply(&self, event: IndexEvent);
}
