//! Dynamo's indexers as [`Subject`]s.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use dynamo_kv_router::indexer::positional::{LevelIndex, PositionalIndexer, SearchMode};
use dynamo_kv_router::indexer::{SyncIndexer, ThreadPoolIndexer};
use dynamo_kv_router::protocols::{
    compute_block_hash_for_seq, compute_seq_hash_for_block, BlockHashOptions,
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, OverlapScores, RouterEvent, WorkerWithDpRank,
};
use dynamo_kv_router::{ConcurrentRadixTreeCompressed, RadixTree};
use kvtier_benches::harness::Subject;
use kvtier_benches::inputs::Input;
use kvtier_benches::stream::Op;
use rustc_hash::FxHashMap;

/// Jump size of the positional index's strided search (the value its
/// README's examples use).
const JUMP: usize = 32;

fn hashes(tokens: &[u32]) -> Vec<LocalBlockHash> {
    compute_block_hash_for_seq(tokens, 1, BlockHashOptions::default())
}

/// Block id -> Dynamo's sequence hash of the block (its rolling hash over the
/// local hashes of the prompt up to it). Events carry these as the engine's
/// block hashes: the positional index recomputes them on lookup and matches
/// nothing otherwise; the trees treat them as opaque ids.
#[derive(Clone)]
pub struct Canon(Arc<FxHashMap<u64, u64>>);

impl Canon {
    pub fn of(input: &Input) -> Self {
        let mut m = FxHashMap::default();
        for p in input.stream.prompts.iter().chain(&input.writer.prompts) {
            for (id, seq) in p.iter().zip(compute_seq_hash_for_block(&hashes(p))) {
                m.insert(u64::from(*id), seq);
            }
        }
        Self(Arc::new(m))
    }
    fn seq(&self, id: u64) -> ExternalSequenceBlockHash {
        ExternalSequenceBlockHash(self.0[&id])
    }
}

fn event(op: &Op, canon: &Canon) -> RouterEvent {
    let (worker, data) = match op {
        Op::Store {
            worker,
            parent,
            ids,
        } => {
            let tokens: Vec<u32> = ids.iter().map(|h| *h as u32).collect();
            let blocks = ids
                .iter()
                .zip(hashes(&tokens))
                .map(|(id, local)| KvCacheStoredBlockData {
                    block_hash: canon.seq(*id),
                    tokens_hash: local,
                    mm_extra_info: None,
                })
                .collect();
            (
                *worker,
                KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: parent.map(|p| canon.seq(p)),
                    start_position: None,
                    blocks,
                }),
            )
        }
        Op::Remove { worker, ids } => (
            *worker,
            KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: ids.iter().map(|h| canon.seq(*h)).collect(),
            }),
        ),
        Op::Lookup(_) => unreachable!("lookups are not events"),
    };
    RouterEvent::new(
        u64::from(worker),
        KvCacheEvent {
            event_id: 0,
            data,
            dp_rank: 0,
        },
    )
}

fn depths(a: &OverlapScores) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = a
        .scores
        .iter()
        .filter(|(_, d)| **d > 0)
        .map(|(w, d)| (w.worker_id as u32, *d))
        .collect();
    out.sort_unstable();
    out
}

/// `RadixTree`, single-threaded: one core only.
pub struct Radix {
    tree: RefCell<RadixTree>,
    canon: Canon,
}

impl Radix {
    pub fn new(canon: &Canon) -> Self {
        Self {
            tree: RefCell::new(RadixTree::new()),
            canon: canon.clone(),
        }
    }
}

impl Subject for Radix {
    type Event = RouterEvent;
    type Answer = OverlapScores;
    fn name(&self) -> String {
        "Dynamo RadixTree".into()
    }
    fn event(&self, op: &Op) -> RouterEvent {
        event(op, &self.canon)
    }
    fn apply(&self, ev: RouterEvent) {
        let _ = self.tree.borrow_mut().apply_event(ev);
    }
    fn drain(&self) {}
    fn lookup(&self, prompt: &[u32]) -> OverlapScores {
        self.tree.borrow().find_matches(hashes(prompt), false)
    }
    fn depths(&self, a: &OverlapScores) -> Vec<(u32, u32)> {
        depths(a)
    }
    fn write_lanes(&self, _: usize) -> usize {
        1
    }
}

/// A `ThreadPoolIndexer` over a backend: writes queued to `threads` threads.
pub struct Pooled<T: SyncIndexer> {
    pool: ThreadPoolIndexer<T>,
    name: String,
    canon: Canon,
}

impl<T: SyncIndexer> Subject for Pooled<T> {
    type Event = RouterEvent;
    type Answer = OverlapScores;
    fn name(&self) -> String {
        self.name.clone()
    }
    fn event(&self, op: &Op) -> RouterEvent {
        event(op, &self.canon)
    }
    fn apply(&self, ev: RouterEvent) {
        self.pool.enqueue_event(ev).expect("indexer threads alive");
    }
    fn drain(&self) {
        futures::executor::block_on(self.pool.flush_and_wait()).expect("indexer threads alive");
    }
    fn lookup(&self, prompt: &[u32]) -> OverlapScores {
        self.pool.backend().find_matches(&hashes(prompt), false)
    }
    fn depths(&self, a: &OverlapScores) -> Vec<(u32, u32)> {
        depths(a)
    }
    fn write_lanes(&self, _: usize) -> usize {
        1
    }
}

/// `ThreadPoolIndexer<ConcurrentRadixTreeCompressed>` (Dynamo's default).
pub struct Crtc;

impl Crtc {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(canon: &Canon, threads: usize) -> Pooled<ConcurrentRadixTreeCompressed> {
        Pooled {
            canon: canon.clone(),
            pool: ThreadPoolIndexer::new(ConcurrentRadixTreeCompressed::new(), threads, 1),
            name: format!("Dynamo CRTC, pool of {threads}"),
        }
    }
}

/// `ThreadPoolIndexer<PositionalIndexer>`.
pub struct Positional;

impl Positional {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(canon: &Canon, threads: usize) -> Pooled<PositionalIndexer> {
        Pooled {
            canon: canon.clone(),
            pool: ThreadPoolIndexer::new(
                PositionalIndexer::new_with_mode(JUMP, SearchMode::Strided),
                threads,
                1,
            ),
            name: format!("Dynamo Positional, pool of {threads}"),
        }
    }
}

/// `PositionalIndexer` written directly by the caller's threads (no queue);
/// each worker's block map is its own, as its pool threads keep them.
pub struct PositionalDirect {
    index: PositionalIndexer,
    canon: Canon,
    maps: Vec<Mutex<FxHashMap<WorkerWithDpRank, LevelIndex>>>,
}

impl PositionalDirect {
    pub fn new(canon: &Canon, workers: u32) -> Self {
        Self {
            index: PositionalIndexer::new_with_mode(JUMP, SearchMode::Strided),
            canon: canon.clone(),
            maps: (0..workers).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Subject for PositionalDirect {
    type Event = RouterEvent;
    type Answer = OverlapScores;
    fn name(&self) -> String {
        "Dynamo Positional, direct".into()
    }
    fn event(&self, op: &Op) -> RouterEvent {
        event(op, &self.canon)
    }
    fn apply(&self, ev: RouterEvent) {
        let w = ev.worker_id as usize;
        let mut map = self.maps[w].lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.index.apply_event(&mut map, ev, None);
    }
    fn drain(&self) {}
    fn lookup(&self, prompt: &[u32]) -> OverlapScores {
        self.index.find_matches(&hashes(prompt), false)
    }
    fn depths(&self, a: &OverlapScores) -> Vec<(u32, u32)> {
        depths(a)
    }
    fn write_lanes(&self, cores: usize) -> usize {
        cores
    }
}
