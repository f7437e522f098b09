//! kvtier's router index ([`kvrouter::index::Index`]) as a [`Subject`].
//!
//! Each trace block is one index block whose single token is its id (the ids
//! are already prefix-chained); the index computes its own chain keys from
//! those tokens on store and on lookup. Writes go through `store` (the parent
//! resolved through the worker's join table, as for an engine's `Stored`
//! event) and `remove`; lookups through `lookup_keys`.

use std::sync::Arc;

use kvrouter::event::{EngineHash, Scope, Source, Tier};
use kvrouter::index::{scope_seed, Index, IndexConfig, Matches};

use crate::harness::Subject;
use crate::stream::Op;

const MODEL: &str = "trace";

/// The index and one source per worker.
pub struct Kvtier {
    index: Index,
    sources: Vec<Source>,
    scope: Scope,
    seed: u64,
}

/// One write, decoded.
#[derive(Clone)]
pub struct KvEvent {
    worker: u32,
    parent: Option<EngineHash>,
    hashes: Vec<EngineHash>,
    tokens: Vec<u32>,
    remove: bool,
}

impl Kvtier {
    /// An index with default limits for workers `0..workers`.
    pub fn new(workers: u32) -> Self {
        Self {
            index: Index::new(IndexConfig::default()),
            sources: (0..workers)
                .map(|w| Source {
                    worker: Arc::from(format!("w{w}").as_str()),
                    dp_rank: 0,
                })
                .collect(),
            scope: Scope {
                model: Arc::from(MODEL),
                lora_name: None,
                group: 0,
            },
            seed: scope_seed(MODEL, None, 0, 1, None),
        }
    }
}

impl Subject for Kvtier {
    type Event = KvEvent;
    type Answer = Matches;

    fn name(&self) -> String {
        "kvtier Index".into()
    }

    fn event(&self, op: &Op) -> KvEvent {
        let (worker, parent, ids, remove) = match op {
            Op::Store {
                worker,
                parent,
                ids,
            } => (*worker, parent.map(EngineHash), ids, false),
            Op::Remove { worker, ids } => (*worker, None, ids, true),
            Op::Lookup(_) => unreachable!("lookups are not events"),
        };
        KvEvent {
            worker,
            parent,
            hashes: ids.iter().map(|h| EngineHash(*h)).collect(),
            tokens: if remove {
                Vec::new()
            } else {
                ids.iter().map(|h| *h as u32).collect()
            },
            remove,
        }
    }

    fn apply(&self, ev: KvEvent) {
        let src = &self.sources[ev.worker as usize];
        if ev.remove {
            self.index.remove(src, Tier::Gpu, None, &ev.hashes);
        } else {
            self.index.store(
                src,
                Tier::Gpu,
                &self.scope,
                &ev.hashes,
                ev.parent,
                &ev.tokens,
                1,
                None,
            );
        }
    }

    fn drain(&self) {}

    fn lookup(&self, prompt: &[u32]) -> Matches {
        self.index.lookup_keys(self.seed, prompt, 1)
    }

    fn depths(&self, a: &Matches) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = a
            .iter()
            .filter_map(|m| {
                let w = m.worker.strip_prefix('w')?.parse().ok()?;
                Some((w, m.blocks.iter().sum()))
            })
            .collect();
        out.sort_unstable();
        out
    }

    fn write_lanes(&self, cores: usize) -> usize {
        cores
    }
}
