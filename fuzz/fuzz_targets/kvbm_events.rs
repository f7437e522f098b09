//! kvbm's event stream as the router reads it
//! (`kvrouter::ingest::kvbm`): each message decoded as an `EventBatch` and
//! applied in order to one subscription's state over a real index. Input:
//! messages, each prefixed by its length (u16 LE). Whatever they hold
//! (sequence gaps, restarts, snapshots, bad keys, token counts that do not
//! match), a later restart of the daemon leaves the index holding nothing
//! of this worker.
#![no_main]

use std::sync::Arc;

use kvrouter::event::WorkerId;
use kvrouter::index::{Index, IndexConfig};
use kvrouter::ingest::apply_kvbm_batches;
use kvtier_fuzz::{encode_restart, split_u16_prefixed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let index = Arc::new(Index::new(IndexConfig::default()));
    let worker = WorkerId::from("w");
    index.set_worker(&worker, None);
    let mut batches = split_u16_prefixed(data);
    // Two restarts: whichever incarnation the input ended on, one of them
    // is new and purges what the daemon reported.
    let (a, b) = (encode_restart("end-a"), encode_restart("end-b"));
    batches.push(&a);
    batches.push(&b);
    apply_kvbm_batches("w", index.clone(), &batches);
    assert_eq!(
        index.holdings(),
        0,
        "a restarted daemon's blocks outlived it"
    );
});
