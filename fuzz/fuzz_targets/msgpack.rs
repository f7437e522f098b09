//! The router's MessagePack reader (`kvrouter::ingest::msgpack::decode`),
//! fed engine event payloads from the network. Decoding allocates at most
//! one `Value` per input byte, whether it succeeds or not (a declared length
//! never sizes an allocation on its own); a value that decodes holds no more
//! bytes than the input, and re-encodes (widest forms) to bytes that decode
//! and re-encode to the same bytes.
#![no_main]

use kvrouter::ingest::msgpack::{self, Value};
use kvtier_fuzz::{encode_msgpack, peak_during, PeakAlloc};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

fuzz_target!(|data: &[u8]| {
    let (res, peak) = peak_during(|| msgpack::decode(data));
    let bound = std::mem::size_of::<Value>() * data.len();
    assert!(
        peak <= bound,
        "{peak} bytes allocated for {} input bytes",
        data.len()
    );
    let Ok(v) = res else {
        return;
    };
    assert!(leaf_bytes(&v) <= data.len());
    let mut enc = Vec::new();
    encode_msgpack(&v, &mut enc);
    let again = msgpack::decode(&enc).expect("re-encoded value decodes");
    let mut enc2 = Vec::new();
    encode_msgpack(&again, &mut enc2);
    assert_eq!(enc, enc2);
});

/// Bytes borrowed from the input, plus one per value (each takes at least
/// its marker byte).
fn leaf_bytes(v: &Value<'_>) -> usize {
    1 + match v {
        Value::Str(b) | Value::Bin(b) | Value::Ext(_, b) => b.len(),
        Value::Array(items) => items.iter().map(leaf_bytes).sum(),
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| leaf_bytes(k) + leaf_bytes(v))
            .sum(),
        _ => 0,
    }
}
