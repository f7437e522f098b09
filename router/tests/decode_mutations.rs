//! The engine-event decoders fed mutated real batches (the recorded vLLM
//! fixtures with bytes flipped, cut off, repeated or appended) and random
//! bytes: an answer or an error every time, never a panic, and never more
//! events than the limit allows.

use kvrouter::ingest::decode::decode_batch;
use kvrouter::ingest::msgpack;
use rand::{Rng, SeedableRng};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn mutated_batches_never_panic() {
    let seeds = [
        fixture("vllm032_map.msgpack"),
        fixture("legacy_array.msgpack"),
        fixture("legacy_short.msgpack"),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b76);
    let mut decoded = 0;
    for round in 0..100_000 {
        let mut b = if round % 10 == 0 {
            (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
        } else {
            seeds[rng.random_range(0..seeds.len())].clone()
        };
        for _ in 0..rng.random_range(1..4) {
            if b.is_empty() {
                b.push(rng.random());
            }
            match rng.random_range(0..5) {
                0 => {
                    let i = rng.random_range(0..b.len());
                    b[i] = rng.random();
                }
                1 => b.truncate(rng.random_range(0..b.len())),
                2 => b.extend((0..rng.random_range(1..9)).map(|_| rng.random::<u8>())),
                3 => {
                    // A run repeated: lengths and counts disagree with it.
                    let i = rng.random_range(0..b.len());
                    let j = (i + rng.random_range(1..16)).min(b.len());
                    let run = b[i..j].to_vec();
                    b.splice(i..i, run);
                }
                _ => {
                    // Markers of the largest containers and strings.
                    let i = rng.random_range(0..b.len());
                    b[i] = [0xdc, 0xdd, 0xde, 0xdf, 0xdb, 0xc6][rng.random_range(0..6)];
                }
            }
        }
        let _ = msgpack::decode(&b);
        let max = rng.random_range(1..64);
        if let Ok(batch) = decode_batch(&b, max) {
            assert!(
                batch.events.len() <= max,
                "{} events over {max}",
                batch.events.len()
            );
            decoded += 1;
        }
    }
    // Single flipped bytes often keep a batch valid: the check above ran.
    assert!(decoded > 1000, "only {decoded} mutated batches decoded");
}
