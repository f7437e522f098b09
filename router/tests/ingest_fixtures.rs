//! Recorded engine batches (router/tests/fixtures, written by
//! router/tests/py/make_fixtures.py with vllm 0.32.0) and malformed input,
//! decoded in plain Rust.

use kvrouter::event::{EngineHash, Tier};
use kvrouter::ingest::decode::{bytes_hash, decode_batch, DecodeErrorKind, EngineEvent};

const MAX: usize = 1 << 20;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn bh(range: std::ops::Range<u8>) -> EngineHash {
    let b: Vec<u8> = range.collect();
    bytes_hash(&b).expect("non-empty")
}

#[test]
fn vllm_032_map_encoding() {
    let b = decode_batch(&fixture("vllm032_map.msgpack"), MAX).expect("decodes");
    assert!(b.errors.is_empty(), "{:?}", b.errors);
    assert_eq!(b.ts, Some(1700000000.5));
    assert_eq!(b.dp_rank, Some(2));
    assert_eq!(
        b.events,
        vec![
            EngineEvent::Stored {
                hashes: vec![bh(0..32), bh(32..64)],
                parent: None,
                token_ids: (0..8).collect(),
                block_size: 4,
                lora_name: None,
                tier: Tier::Gpu,
                group: 0,
            },
            EngineEvent::Stored {
                hashes: vec![bh(64..80)],
                parent: Some(bh(32..64)),
                token_ids: vec![100, 101, 102, 103],
                block_size: 4,
                lora_name: Some("sql-lora".into()),
                tier: Tier::Host,
                group: 1,
            },
            EngineEvent::Removed {
                hashes: vec![bh(0..32)],
                tier: Tier::Gpu,
                group: Some(0),
            },
            EngineEvent::AllCleared,
        ]
    );
}

#[test]
fn legacy_array_encoding() {
    let b = decode_batch(&fixture("legacy_array.msgpack"), MAX).expect("decodes");
    assert!(b.errors.is_empty(), "{:?}", b.errors);
    assert_eq!(b.dp_rank, Some(1));
    assert_eq!(
        b.events,
        vec![
            EngineEvent::Stored {
                hashes: vec![EngineHash(1), EngineHash(-2i64 as u64)],
                parent: Some(EngineHash(i64::MIN as u64)),
                token_ids: vec![1, 2, 3, 4],
                block_size: 2,
                lora_name: None,
                tier: Tier::Gpu,
                group: 0,
            },
            EngineEvent::Stored {
                // u64::MAX and -1 are the same hash
                hashes: vec![EngineHash(u64::MAX)],
                parent: Some(EngineHash(-2i64 as u64)),
                token_ids: vec![5, 6],
                block_size: 2,
                lora_name: Some("ad".into()),
                tier: Tier::Host,
                group: 0,
            },
            EngineEvent::Removed {
                hashes: vec![EngineHash(1)],
                tier: Tier::Gpu,
                group: None,
            },
            EngineEvent::AllCleared,
        ]
    );
}

#[test]
fn oldest_array_encoding() {
    let b = decode_batch(&fixture("legacy_short.msgpack"), MAX).expect("decodes");
    assert!(b.errors.is_empty(), "{:?}", b.errors);
    assert_eq!(b.dp_rank, None);
    assert_eq!(
        b.events,
        vec![EngineEvent::Stored {
            hashes: vec![EngineHash(10), EngineHash(11)],
            parent: None,
            token_ids: vec![1, 2, 3, 4, 5, 6],
            block_size: 3,
            // only the deprecated lora_id: kept apart from the base model
            lora_name: Some("3".into()),
            tier: Tier::Gpu,
            group: 0,
        }]
    );
}

// --- hand-built msgpack for malformed input -------------------------------

fn arr(n: usize) -> Vec<u8> {
    assert!(n < 16);
    vec![0x90 | n as u8]
}
fn s(v: &str) -> Vec<u8> {
    assert!(v.len() < 32);
    let mut o = vec![0xa0 | v.len() as u8];
    o.extend_from_slice(v.as_bytes());
    o
}
fn int(v: u8) -> Vec<u8> {
    assert!(v < 128);
    vec![v]
}
fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}
fn batch(events: &[Vec<u8>]) -> Vec<u8> {
    let mut o = cat(&[
        arr(2),
        vec![0xcb, 0, 0, 0, 0, 0, 0, 0, 0],
        arr(events.len()),
    ]);
    for e in events {
        o.extend_from_slice(e);
    }
    o
}
fn stored(hashes: &[u8], tokens: &[u8], block_size: u8) -> Vec<u8> {
    let mut o = cat(&[arr(5), s("BlockStored"), arr(hashes.len())]);
    for h in hashes {
        o.extend(int(*h));
    }
    o.push(0xc0);
    o.extend(arr(tokens.len()));
    for t in tokens {
        o.extend(int(*t));
    }
    o.extend(int(block_size));
    o
}

#[test]
fn malformed_batches_are_errors_not_panics() {
    let kinds = |b: &[u8]| decode_batch(b, MAX).err().map(|e| e.kind);
    assert_eq!(kinds(b"\xc1garbage"), Some(DecodeErrorKind::Msgpack));
    assert_eq!(kinds(&[]), Some(DecodeErrorKind::Msgpack));
    assert_eq!(kinds(&int(5)), Some(DecodeErrorKind::Batch));
    assert_eq!(kinds(&cat(&[arr(1), int(1)])), Some(DecodeErrorKind::Batch));
    assert_eq!(
        kinds(&cat(&[arr(2), int(1), int(2)])),
        Some(DecodeErrorKind::Batch)
    );
    // a map without events
    assert_eq!(
        kinds(&cat(&[vec![0x81], s("ts"), int(1)])),
        Some(DecodeErrorKind::Batch)
    );
    // a lying array32 header
    assert_eq!(
        kinds(&[0x92, 0x00, 0xdd, 0x7f, 0xff, 0xff, 0xff]),
        Some(DecodeErrorKind::Msgpack)
    );
    // too many events
    let many = batch(&vec![cat(&[arr(1), s("AllBlocksCleared")]); 10]);
    assert_eq!(
        decode_batch(&many, 5).err().map(|e| e.kind),
        Some(DecodeErrorKind::TooLarge)
    );
    // random bytes never panic
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for len in 0..2000usize {
        let buf: Vec<u8> = (0..len % 97)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = decode_batch(&buf, MAX);
    }
}

#[test]
fn bad_events_are_skipped_and_reported() {
    let good = stored(&[1], &[7, 8], 2);
    let b = decode_batch(
        &batch(&[
            good.clone(),
            cat(&[arr(1), s("BlockExploded")]), // unknown type
            stored(&[1, 2], &[7, 8], 2),        // 2 blocks, 2 tokens
            cat(&[arr(5), s("BlockStored"), s("x"), vec![0xc0], arr(0), int(2)]), // hashes: str
            cat(&[
                arr(2),
                s("BlockRemoved"),
                arr(1),
                vec![0xcb, 0, 0, 0, 0, 0, 0, 0, 0],
            ]), // float hash
            cat(&[arr(3), s("BlockRemoved"), arr(1), int(1), s("TAPE")]), // unknown medium
            cat(&[
                arr(5),
                s("BlockStored"),
                arr(1),
                int(1),
                vec![0xc0],
                arr(2),
                s("a"),
                int(1),
                int(2),
            ]), // token str
            int(3),                             // not an event
            cat(&[vec![0x81], s("type"), s("AllBlocksCleared")]),
        ]),
        MAX,
    )
    .expect("batch decodes");
    assert_eq!(b.events.len(), 2, "{:?}", b.events);
    assert!(matches!(b.events[1], EngineEvent::AllCleared));
    let kinds: Vec<_> = b.errors.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            DecodeErrorKind::UnknownEvent,
            DecodeErrorKind::TokenCount,
            DecodeErrorKind::Field,
            DecodeErrorKind::Hash,
            DecodeErrorKind::Medium,
            DecodeErrorKind::Field,
            DecodeErrorKind::Field,
        ]
    );
}

#[test]
fn map_events_ignore_unknown_keys_and_default_absent_ones() {
    // {"type": "BlockStored", "block_hashes": [5], "token_ids": [1], "block_size": 1,
    //  "future_field": 9}
    let ev = cat(&[
        vec![0x85],
        s("type"),
        s("BlockStored"),
        s("block_hashes"),
        arr(1),
        int(5),
        s("token_ids"),
        arr(1),
        int(1),
        s("block_size"),
        int(1),
        s("future_field"),
        int(9),
    ]);
    // batch as a map: {"ts": 0, "events": [ev], "data_parallel_rank": 3}
    let mut b = cat(&[vec![0x83], s("ts"), int(0), s("events"), arr(1)]);
    b.extend(ev);
    b.extend(cat(&[s("data_parallel_rank"), int(3)]));
    let d = decode_batch(&b, MAX).expect("decodes");
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.dp_rank, Some(3));
    assert_eq!(
        d.events,
        vec![EngineEvent::Stored {
            hashes: vec![EngineHash(5)],
            parent: None,
            token_ids: vec![1],
            block_size: 1,
            lora_name: None,
            tier: Tier::Gpu,
            group: 0,
        }]
    );
}
