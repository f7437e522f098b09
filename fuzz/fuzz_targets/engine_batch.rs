//! Engine `KVEventBatch` payloads (`kvrouter::ingest::decode::decode_batch`):
//! what vLLM and SGLang publish over ZMQ. Input: the event limit (first
//! byte), then the msgpack payload. Decoding allocates a small multiple of
//! the payload's size at most. A decoded batch respects the limit, its
//! events are usable as the index expects, and the result depends only on
//! the msgpack value, not on how it was encoded.
#![no_main]

use kvrouter::ingest::decode::{decode_batch, EngineEvent};
use kvrouter::ingest::msgpack;
use kvtier_fuzz::{encode_msgpack, peak_during, PeakAlloc};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Bytes a batch may allocate per payload byte while it decodes: the
/// msgpack tree (one value per byte at most) and the events taken from it.
const BYTES_PER_INPUT_BYTE: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&max, payload)) = data.split_first() else {
        return;
    };
    let max = max as usize;
    let (res, peak) = peak_during(|| decode_batch(payload, max));
    assert!(
        peak <= BYTES_PER_INPUT_BYTE * payload.len() + 4096,
        "{peak} bytes allocated for a payload of {}",
        payload.len()
    );
    if let Ok(b) = &res {
        assert!(b.events.len() + b.errors.len() <= max);
        for e in &b.events {
            match e {
                EngineEvent::Stored {
                    hashes,
                    token_ids,
                    block_size,
                    ..
                } => {
                    assert!(!hashes.is_empty() && *block_size > 0);
                    assert_eq!(token_ids.len(), hashes.len() * *block_size as usize);
                }
                EngineEvent::Removed { hashes, .. } => assert!(!hashes.is_empty()),
                EngineEvent::AllCleared => {}
            }
        }
    }
    if let Ok(v) = msgpack::decode(payload) {
        let mut enc = Vec::new();
        encode_msgpack(&v, &mut enc);
        // Debug, not ==: a NaN timestamp is still the same answer.
        let again = decode_batch(&enc, max);
        assert_eq!(format!("{again:?}"), format!("{res:?}"));
    }
});
