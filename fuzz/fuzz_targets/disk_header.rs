//! Disk-tier entry headers (`kvbm::disk::Header`), read back from the data
//! file on every G3 read. The first input byte picks a mode: odd, the rest
//! is a header page whose checksum (bytes 120..128) is fixed up first, so
//! the fuzzer gets past the xxh3 check to the field checks; even, the rest
//! is decoded as it is. A header that decodes re-encodes to itself.
#![no_main]

use kvbm::disk::{Header, MAX_KEY, PAGE};
use libfuzzer_sys::fuzz_target;
use xxhash_rust::xxh3::xxh3_64;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut page = rest.to_vec();
    if mode & 1 == 1 {
        page.resize(page.len().max(PAGE), 0);
        let sum = xxh3_64(&page[..120]);
        page[120..128].copy_from_slice(&sum.to_le_bytes());
    }
    let Ok(h) = Header::decode(&page) else {
        return;
    };
    assert!(h.key.len() <= MAX_KEY);
    let mut again = vec![0u8; PAGE];
    h.encode(&mut again);
    assert_eq!(Header::decode(&again), Ok(h.clone()));
    // Every field the decoder read comes back in its place (reserved bytes
    // and key padding are the encoder's zeros, whatever the page held).
    assert_eq!(again[..38], page[..38]);
    assert_eq!(again[40..48 + h.key.len()], page[40..48 + h.key.len()]);
    assert_eq!(again[80..120], page[80..120]);
});
