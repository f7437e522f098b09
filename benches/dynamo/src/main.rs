//! kvtier's router index and NVIDIA Dynamo's KV indexers (dynamo-kv-router
//! 1.6.1, used as a library) replay the same store/remove/lookup stream in one
//! process: `cargo run --release -- [--trace FILE] [--copies N] [--sessions N]
//! [--cores 1,2]` (flags in `kvtier_benches::inputs::Args`).
//!
//! Dynamo's indexers run as their crate ships them: `RadixTree` on the
//! calling thread (single-threaded by design), `ConcurrentRadixTreeCompressed`
//! and `PositionalIndexer` behind `ThreadPoolIndexer` (writes queued to its
//! threads, lookups inline), and `PositionalIndexer` driven directly (its
//! public `apply_event`, one per-worker map each, no queue). Trace block ids
//! become one-token blocks on both sides; Dynamo's lookups hash those tokens
//! with its own `compute_block_hash_for_seq`, as kvtier's hash them into chain
//! keys. A pooled index's clock stops after `flush_and_wait`, i.e. when every
//! queued write is applied.

mod dynamo;

use kvtier_benches::harness::{
    answers, bench_cores, bench_one_core, CountingAlloc, Row, Subject, TABLE_HEADER,
};
use kvtier_benches::inputs::{describe, inputs, Args, Input};
use kvtier_benches::kvtier::Kvtier;

use dynamo::{Canon, Crtc, Positional, PositionalDirect, Radix};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Prompts whose answers differ from kvtier's.
/// Prompts whose answers differ from kvtier's, and the first such pair
/// (theirs, kvtier's; matched blocks per worker).
fn mismatches<S: Subject>(s: &S, input: &Input, reference: &[Vec<(u32, u32)>]) -> (usize, String) {
    let theirs = answers(s, &input.stream.prompts, reference.len());
    let mut bad = theirs.iter().zip(reference).filter(|(a, b)| a != b);
    let first = bad
        .next()
        .map(|(a, b)| format!("first: {a:?} vs kvtier {b:?}"))
        .unwrap_or_default();
    (usize::from(!first.is_empty()) + bad.count(), first)
}

fn one_core<S: Subject>(
    make: impl Fn() -> S,
    input: &Input,
    reference: &[Vec<(u32, u32)>],
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let (row, s) = bench_one_core(make, &input.stream)?;
    let (bad, first) = mismatches(&s, input, reference);
    println!("{}", row.markdown(&input.name));
    if bad > 0 {
        println!(
            "  ({}: {bad} of {} answers differ from kvtier's; {first})",
            row.subject,
            reference.len()
        );
    }
    rows.push(row);
    Ok(())
}

fn cores<S: Subject + Sync>(
    make: impl Fn() -> S,
    input: &Input,
    n: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let row = bench_cores(make, &input.stream, &input.writer, n)?;
    println!("{}", row.markdown(&input.name));
    rows.push(row);
    Ok(())
}

/// kvtier's figures over the best Dynamo index's, per core count.
fn ratios(rows: &[Row]) {
    for c in rows
        .iter()
        .map(|r| r.cores)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let of = |f: &dyn Fn(&Row) -> f64, kv: bool| {
            rows.iter()
                .filter(|r| r.cores == c && r.subject.starts_with("kvtier") == kv)
                .map(f)
                .fold(f64::NAN, f64::max)
        };
        let best = |f: &dyn Fn(&Row) -> f64| {
            let d = rows
                .iter()
                .filter(|r| r.cores == c && !r.subject.starts_with("kvtier"))
                .max_by(|a, b| f(a).total_cmp(&f(b)));
            d.map_or(("-".to_string(), f64::NAN), |d| (d.subject.clone(), f(d)))
        };
        let (sn, sv) = best(&|r| r.store_blocks_per_s);
        let (ln, lv) = best(&|r| r.lookups_per_s);
        println!(
            "  {c} core(s): kvtier/Dynamo best: stores {:.2}x (best {sn}), lookups {:.2}x (best {ln})",
            of(&|r| r.store_blocks_per_s, true) / sv,
            of(&|r| r.lookups_per_s, true) / lv,
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::from_env();
    let fleet = args.workers * 2;
    for input in inputs(&args)? {
        println!("\n{}", describe(&input));
        println!("{TABLE_HEADER}");
        let mut rows = Vec::new();
        let canon = Canon::of(&input);
        let canon = &canon;
        for &n in &args.cores {
            if n == 1 {
                let (row, kv) = bench_one_core(|| Kvtier::new(fleet), &input.stream)?;
                println!("{}", row.markdown(&input.name));
                rows.push(row);
                let reference = answers(&kv, &input.stream.prompts, args.check);
                drop(kv);
                one_core(|| Radix::new(canon), &input, &reference, &mut rows)?;
                one_core(|| Crtc::new(canon, 1), &input, &reference, &mut rows)?;
                one_core(|| Positional::new(canon, 1), &input, &reference, &mut rows)?;
                one_core(
                    || PositionalDirect::new(canon, fleet),
                    &input,
                    &reference,
                    &mut rows,
                )?;
            } else {
                cores(|| Kvtier::new(fleet), &input, n, &mut rows)?;
                cores(|| Crtc::new(canon, n), &input, n, &mut rows)?;
                cores(|| Crtc::new(canon, 1), &input, n, &mut rows)?;
                cores(|| Positional::new(canon, n), &input, n, &mut rows)?;
                cores(|| PositionalDirect::new(canon, fleet), &input, n, &mut rows)?;
            }
        }
        ratios(&rows);
    }
    Ok(())
}
