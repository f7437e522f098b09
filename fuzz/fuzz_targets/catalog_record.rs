//! Catalog block records (`kvbm::catalog::decode_block`), read back from
//! RocksDB at every warm restart. Input: a byte giving the catalog key's
//! length (mod 40), the key, then the value. A record that decodes
//! re-encodes to the bytes it was read from (trailing bytes aside) and to
//! itself.
#![no_main]

use kvbm::catalog::{block_db_key, decode_block, encode_block};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&klen, rest)) = data.split_first() else {
        return;
    };
    let klen = (klen as usize % 40).min(rest.len());
    let (key, value) = rest.split_at(klen);
    let Ok(b) = decode_block(key, value) else {
        return;
    };
    assert_eq!(block_db_key(b.ns, &b.key), key);
    let enc = encode_block(&b);
    assert_eq!(enc, value[..enc.len()]);
    assert_eq!(decode_block(key, &enc).expect("re-decodes"), b);
});
