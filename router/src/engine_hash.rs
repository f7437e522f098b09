//! vLLM's prefix-cache block hashes (`sha256_cbor`, `xxhash_cbor`),
//! reproduced so a request's tokens can be turned into the engine's own
//! block hashes. Checked against vLLM 0.32.0's `hash_block_tokens` by
//! `tests/engine_hash.rs`.
//!
//! What vLLM 0.32.0 does (`vllm/v1/core/kv_cache_utils.py`,
//! `vllm/utils/hashing.py`):
//!
//! - `hash_fn(obj)` = SHA-256 (`sha256_cbor`) or XXH3-128, big-endian digest
//!   (`xxhash_cbor`) of `cbor2.dumps(obj, canonical=True)`;
//! - `NONE_HASH` = `hash_fn(seed)` of a CBOR text string; the seed is
//!   `PYTHONHASHSEED` when set, else `"vllm-none-hash"` for `sha256_cbor`.
//!   For `xxhash_cbor` without `PYTHONHASHSEED` vLLM picks a random seed per
//!   process: those hashes cannot be reproduced (here the default seed is
//!   used, which matches no engine);
//! - block i's hash = `hash_fn((parent or NONE_HASH, tuple(tokens), extra))`
//!   where `extra` is `None` or a tuple of, in order: `("lora", name, path)`
//!   for a LoRA request, multimodal keys (not reproduced here: requests with
//!   images, audio or prompt embeddings get no engine hashes), and
//!   `("cache_salt", salt)` on the first block only.
//!
//! Events publish the hashes as the raw digest bytes, or, with
//! `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`, as the low 64 bits of the
//! big-endian digest: [`event_hash`] maps a digest to the [`EngineHash`] the
//! ingestion produces for either form.

use sha2::{Digest, Sha256};

use crate::event::EngineHash;

/// vLLM's `--prefix-caching-hash-algo` values that are reproducible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlgo {
    /// `sha256_cbor`: 32-byte digests.
    Sha256Cbor,
    /// `xxhash_cbor`: 16-byte XXH3-128 digests.
    XxhashCbor,
}

impl HashAlgo {
    /// Parses vLLM's name of the algorithm.
    pub fn from_name(name: &str) -> Option<HashAlgo> {
        match name {
            "sha256_cbor" => Some(HashAlgo::Sha256Cbor),
            "xxhash_cbor" => Some(HashAlgo::XxhashCbor),
            _ => None,
        }
    }

    fn digest(self, bytes: &[u8]) -> Vec<u8> {
        match self {
            HashAlgo::Sha256Cbor => Sha256::digest(bytes).to_vec(),
            HashAlgo::XxhashCbor => xxhash_rust::xxh3::xxh3_128(bytes).to_be_bytes().to_vec(),
        }
    }
}

/// The seed vLLM derives `NONE_HASH` from when `PYTHONHASHSEED` is unset
/// (for `sha256_cbor`).
pub const DEFAULT_NONE_HASH_SEED: &str = "vllm-none-hash";

/// A LoRA adapter as vLLM folds it into block hashes: its name and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraKey<'a> {
    pub name: &'a str,
    pub path: &'a str,
}

/// The hash of the (missing) parent of a first block: `hash_fn(seed)`, the
/// seed being the engine's `PYTHONHASHSEED` or, when `None`,
/// [`DEFAULT_NONE_HASH_SEED`].
pub fn none_hash(algo: HashAlgo, seed: Option<&str>) -> Vec<u8> {
    let mut buf = Vec::new();
    cbor_text(&mut buf, seed.unwrap_or(DEFAULT_NONE_HASH_SEED));
    algo.digest(&buf)
}

/// The engine's hashes of every full block of `token_ids`, in order (a
/// trailing partial block gets none; `block_size` 0 gives none).
pub fn block_hashes(
    algo: HashAlgo,
    seed: Option<&str>,
    token_ids: &[u32],
    block_size: usize,
    lora: Option<LoraKey<'_>>,
    cache_salt: Option<&str>,
) -> Vec<Vec<u8>> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut parent = none_hash(algo, seed);
    let mut out = Vec::with_capacity(token_ids.len() / block_size);
    let mut buf = Vec::with_capacity(64 + block_size * 5);
    for (i, block) in token_ids.chunks_exact(block_size).enumerate() {
        buf.clear();
        cbor_head(&mut buf, 4, 3);
        cbor_bytes(&mut buf, &parent);
        cbor_head(&mut buf, 4, block.len() as u64);
        for t in block {
            cbor_head(&mut buf, 0, *t as u64);
        }
        // vLLM: `if not cache_salt` — an empty salt is no salt
        let salt = cache_salt.filter(|s| i == 0 && !s.is_empty());
        let n_extra = lora.is_some() as u64 + salt.is_some() as u64;
        if n_extra == 0 {
            buf.push(0xf6); // None
        } else {
            cbor_head(&mut buf, 4, n_extra);
            if let Some(l) = lora {
                cbor_head(&mut buf, 4, 3);
                cbor_text(&mut buf, "lora");
                cbor_text(&mut buf, l.name);
                cbor_text(&mut buf, l.path);
            }
            if let Some(s) = salt {
                cbor_head(&mut buf, 4, 2);
                cbor_text(&mut buf, "cache_salt");
                cbor_text(&mut buf, s);
            }
        }
        let h = algo.digest(&buf);
        parent.clone_from(&h);
        out.push(h);
    }
    out
}

/// The low 64 bits of a big-endian digest: vLLM's
/// `maybe_convert_block_hash` with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`.
pub fn int_block_hash(digest: &[u8]) -> u64 {
    let mut v = 0u64;
    for b in digest.iter().rev().take(8).rev() {
        v = (v << 8) | *b as u64;
    }
    v
}

/// The [`EngineHash`] ingestion gives a block whose engine digest is
/// `digest`, when the engine publishes digests (`int_hashes` false) or
/// 64-bit integers (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`).
pub fn event_hash(digest: &[u8], int_hashes: bool) -> EngineHash {
    if int_hashes {
        EngineHash(int_block_hash(digest))
    } else {
        crate::ingest::decode::bytes_hash(digest).unwrap_or(EngineHash(0))
    }
}

/// A CBOR head: major type and argument, in the shortest form (RFC 8949
/// §4.2.1, what `cbor2.dumps(canonical=True)` writes).
fn cbor_head(buf: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    if arg < 24 {
        buf.push(m | arg as u8);
    } else if arg <= u8::MAX as u64 {
        buf.push(m | 24);
        buf.push(arg as u8);
    } else if arg <= u16::MAX as u64 {
        buf.push(m | 25);
        buf.extend_from_slice(&(arg as u16).to_be_bytes());
    } else if arg <= u32::MAX as u64 {
        buf.push(m | 26);
        buf.extend_from_slice(&(arg as u32).to_be_bytes());
    } else {
        buf.push(m | 27);
        buf.extend_from_slice(&arg.to_be_bytes());
    }
}

fn cbor_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    cbor_head(buf, 2, b.len() as u64);
    buf.extend_from_slice(b);
}

fn cbor_text(buf: &mut Vec<u8>, s: &str) {
    cbor_head(buf, 3, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cbor_heads_are_minimal() {
        let mut b = Vec::new();
        for v in [0u64, 23, 24, 255, 256, 65535, 65536, u32::MAX as u64 + 1] {
            cbor_head(&mut b, 0, v);
        }
        assert_eq!(
            b,
            [
                0x00, 0x17, 0x18, 24, 0x18, 0xff, 0x19, 1, 0, 0x19, 0xff, 0xff, 0x1a, 0, 1, 0, 0,
                0x1b, 0, 0, 0, 1, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn shapes() {
        let t: Vec<u32> = (0..40).collect();
        let h = block_hashes(HashAlgo::Sha256Cbor, None, &t, 16, None, None);
        assert_eq!(h.len(), 2);
        assert!(h.iter().all(|d| d.len() == 32));
        let x = block_hashes(HashAlgo::XxhashCbor, Some("0"), &t, 16, None, Some("s"));
        assert_eq!(x.len(), 2);
        assert!(x.iter().all(|d| d.len() == 16));
        // the salt only changes the chain through the first block
        let y = block_hashes(HashAlgo::XxhashCbor, Some("0"), &t, 16, None, None);
        assert_ne!(x[0], y[0]);
        assert!(block_hashes(HashAlgo::Sha256Cbor, None, &t, 0, None, None).is_empty());
        assert_eq!(int_block_hash(&[9, 0, 0, 0, 0, 0, 0, 0, 1, 2]), 0x0102);
    }
}
