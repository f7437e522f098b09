//! Router index benchmarks (not timed tests):
//!
//! - ingest: `Stored` events of 4k-token prompts in 16-token blocks
//!   (256 blocks each, one event per prompt) applied to the index, on one
//!   thread and on two; reported in block events per second per core;
//! - route: `Index::lookup` and the full `Router::route` (lookup + TTFT
//!   scoring of 64 workers) of 4k-token prompts, with the index holding 1M
//!   and 10M blocks over 64 workers; p50/p99.
//!
//! `cargo bench -p kvtier-benches --bench router` (`-- --sizes 1000000` to
//! pick sizes).

use std::sync::Arc;
use std::time::Instant;

use kvrouter::config::Config;
use kvrouter::event::{EngineHash, Scope, Source, Tier, WorkerId};
use kvrouter::index::{Index, IndexConfig};
use kvrouter::route::{Input, RouteRequest, Router};
use kvrouter::workers::{WorkerSpec, Workers};
use kvtier_benches::percentile;

const WORKERS: usize = 64;
const BLOCK: usize = 16;
const PROMPT: usize = 4096;
const BLOCKS: usize = PROMPT / BLOCK;
const SYSTEMS: u32 = 16;
const SYSTEM_BLOCKS: usize = 32;

/// Prompt `p`: one of 16 shared system prefixes (512 tokens), then unique.
fn prompt(p: u64) -> Vec<u32> {
    let mut x = p.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let sys = (p % u64::from(SYSTEMS)) as u32;
    (0..PROMPT)
        .map(|i| {
            if i < SYSTEM_BLOCKS * BLOCK {
                sys * 100_000 + i as u32
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 150_000) as u32
            }
        })
        .collect()
}

fn scope() -> Scope {
    Scope {
        model: Arc::from("m"),
        lora_name: None,
        group: 0,
    }
}

fn ids() -> Vec<WorkerId> {
    (0..WORKERS)
        .map(|i| Arc::from(format!("w{i}").as_str()))
        .collect()
}

/// Fills `ix` with `holdings` blocks: prompt p stored by worker p % 64.
/// Returns (prompts stored, seconds, events).
fn fill(ix: &Index, holdings: usize, threads: usize, start_prompt: u64) -> (u64, f64, u64) {
    // each prompt adds its unique blocks (the system prefix is shared)
    let prompts = (holdings / (BLOCKS - SYSTEM_BLOCKS)) as u64;
    let ids = ids();
    let sc = scope();
    // tokens are generated before timing
    let per_thread: Vec<Vec<(u64, Vec<u32>)>> = (0..threads)
        .map(|t| {
            (0..prompts)
                .filter(|p| (*p as usize) % threads == t)
                .map(|p| (start_prompt + p, prompt(start_prompt + p)))
                .collect()
        })
        .collect();
    let t0 = Instant::now();
    let events: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = per_thread
            .iter()
            .map(|list| {
                let ids = &ids;
                let sc = &sc;
                s.spawn(move || {
                    let mut n = 0u64;
                    let mut hashes = vec![EngineHash(0); BLOCKS];
                    for (p, toks) in list {
                        for (i, h) in hashes.iter_mut().enumerate() {
                            *h = EngineHash(p * 1000 + i as u64);
                        }
                        let src = Source {
                            worker: ids[(*p as usize) % WORKERS].clone(),
                            dp_rank: 0,
                        };
                        n += ix.store(&src, Tier::Gpu, sc, &hashes, None, toks, BLOCK as u32, None)
                            as u64;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    (prompts, t0.elapsed().as_secs_f64(), events)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<usize> = args
        .iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000_000, 10_000_000]);

    println!("## router index benchmark: {WORKERS} workers, {PROMPT}-token prompts, {BLOCK}-token blocks");
    // Ingest rate on a fresh index, 1 and 2 threads.
    for threads in [1usize, 2] {
        let ix = Index::new(IndexConfig {
            shards: 64,
            max_blocks: 50_000_000,
        });
        let (_, secs, ev) = fill(&ix, 2_000_000, threads, 0);
        println!(
            "ingest threads={threads}: {ev} block events in {secs:.3} s = {:.2} M block events/s total, {:.2} M/s per core",
            ev as f64 / secs / 1e6,
            ev as f64 / secs / 1e6 / threads as f64
        );
    }

    for &size in &sizes {
        let ix = Arc::new(Index::new(IndexConfig {
            shards: 64,
            max_blocks: size * 2,
        }));
        let (prompts, secs, ev) = fill(&ix, size, 2, 0);
        println!(
            "\nindex of {} holdings ({} keys), filled with 2 threads in {secs:.2} s ({:.2} M block events/s)",
            ix.holdings(),
            ix.keys(),
            ev as f64 / secs / 1e6
        );
        // Router with 64 workers over that index.
        let workers = Arc::new(Workers::new(ix.clone(), None));
        for i in 0..WORKERS {
            let _ = workers.add(WorkerSpec {
                worker_id: format!("w{i}"),
                endpoint: format!("10.0.0.{i}:8000"),
                model: "m".into(),
                zmq_endpoint: None,
                zmq_replay_endpoint: None,
                dp_ranks: 1,
                kvbm: None,
                metrics_url: None,
                remote_group: None,
            });
        }
        let router = Router::new(&Config::default(), ix.clone(), workers.clone());
        // Queries: half stored prompts (256-block match), half new prompts
        // sharing only a system prefix.
        let queries: Vec<Vec<u32>> = (0..4000u64)
            .map(|q| {
                if q % 2 == 0 {
                    prompt((q * 7919) % prompts)
                } else {
                    prompt(1_000_000_000 + q)
                }
            })
            .collect();
        let mut lat = Vec::with_capacity(queries.len());
        let mut matched = 0u64;
        for q in &queries {
            let t = Instant::now();
            let r = ix.lookup("m", None, None, 0, q);
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            matched += r.iter().map(|m| u64::from(m.blocks[0])).max().unwrap_or(0);
        }
        lat.sort_by(f64::total_cmp);
        println!(
            "Index::lookup: p50 {:.1} us, p99 {:.1} us (mean best match {:.0} blocks)",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            matched as f64 / queries.len() as f64
        );
        let mut lat = Vec::with_capacity(queries.len());
        for q in &queries {
            let req = RouteRequest {
                model: "m".into(),
                input: Input::Tokens(q.clone()),
                lora_name: None,
                cache_salt: None,
                subset: None,
            };
            let t = Instant::now();
            let d = router.route(&req);
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            if let Ok(d) = d {
                router.done(d.request_id);
            }
        }
        lat.sort_by(f64::total_cmp);
        println!(
            "Router::route (lookup + scoring of {WORKERS} workers): p50 {:.1} us, p99 {:.1} us",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
        // Lookups while two writers keep ingesting.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut lat = Vec::with_capacity(queries.len());
        std::thread::scope(|s| {
            let ixw = ix.clone();
            let stop = &stop;
            s.spawn(move || {
                let mut p = 2_000_000_000u64;
                let ids = ids();
                let sc = scope();
                let hashes: Vec<EngineHash> = (0..BLOCKS as u64).map(EngineHash).collect();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let toks = prompt(p);
                    let src = Source {
                        worker: ids[(p as usize) % WORKERS].clone(),
                        dp_rank: 1,
                    };
                    ixw.store(
                        &src,
                        Tier::Host,
                        &sc,
                        &hashes,
                        None,
                        &toks,
                        BLOCK as u32,
                        None,
                    );
                    p += 1;
                }
            });
            for q in &queries {
                let t = Instant::now();
                let _ = ix.lookup("m", None, None, 0, q);
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        lat.sort_by(f64::total_cmp);
        println!(
            "Index::lookup with a concurrent writer: p50 {:.1} us, p99 {:.1} us",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
    }
}
