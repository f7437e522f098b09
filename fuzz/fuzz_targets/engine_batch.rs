//! Engine `KVEventBatch` payloads (`kvrouter::ingest::decode::decode_batch`):
//! what vLLM and SGLang publish over ZMQ. Input: the event limit (first
//! byte), then the msgpack payload. A decoded batch respects the limit, its
//! events are usable as the index expects, and the result depends only on
//! the msgpack value, not on how it was encoded.
#![no_main]

use kvrouter::ingest::decode::{decode_batch, EngineEvent};
use kvrouter::ingest::msgpack;
use kvtier_fuzz::encode_msgpack;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&max, payload)) = data.split_first() else {
        return;
    };
    let max = max as usize;
    let res = decode_batch(payload, max);
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
