//! The indexer trace replay, kvtier's index alone (the side-by-side run with
//! NVIDIA Dynamo's indexers is `benches/dynamo`, which CI does not build):
//! `cargo bench -p kvtier-benches --bench indexer -- [--trace FILE]
//! [--copies N] [--sessions N] [--cores 1,2]`.

use kvtier_benches::harness::{bench_cores, bench_one_core, CountingAlloc, TABLE_HEADER};
use kvtier_benches::inputs::{describe, inputs, Args};
use kvtier_benches::kvtier::Kvtier;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() -> anyhow::Result<()> {
    let args = Args::from_env();
    let fleet = args.workers * 2;
    for input in inputs(&args)? {
        println!("{}", describe(&input));
        println!("{TABLE_HEADER}");
        for &cores in &args.cores {
            let row = if cores == 1 {
                bench_one_core(|| Kvtier::new(fleet), &input.stream)?.0
            } else {
                bench_cores(|| Kvtier::new(fleet), &input.stream, &input.writer, cores)?
            };
            println!("{}", row.markdown(&input.name));
        }
    }
    Ok(())
}
