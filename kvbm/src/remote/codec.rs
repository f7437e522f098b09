//! How G4 blocks are stored at rest: each block optionally compressed (lz4
//! or zstd), then optionally encrypted (AES-256-GCM), recorded per block in
//! the segment footer's codec byte and raw length (byte layout in
//! [`super::segment`]).
//!
//! - Compression is kept only when it makes the block smaller; otherwise
//!   the block is stored as is (codec bits 0-1 zero).
//! - Encryption: the key comes from a file (`remote_key_file`: 32 raw bytes,
//!   or 64 hex digits and an optional newline; see [`crate::at_rest`]). The
//!   block key proper and an 8-byte key id are derived from it with
//!   HKDF-SHA256 under G4's own salt (G3 derives others from the same
//!   file, so a block cannot move between the tiers); the key id is
//!   stored with each block, so a reader tells a block written under
//!   another key (a node of another fleet on the same bucket: not for it,
//!   not damage) from one that fails authentication under its own key
//!   (damaged or forged). Each block gets a random 96-bit nonce; the
//!   associated data binds the codec byte, the raw length, the namespace
//!   and the block key, so a block cannot be replayed under another key or
//!   namespace, nor its footer entry rewritten to decode it differently.
//! - An encrypted block's token ids (the prompt) are sealed too, in its
//!   footer entry: same key, their own random nonce, associated data
//!   binding namespace, block key and parent key, so neither parent nor
//!   tokens can be rewritten, nor moved to another block, undetected. A
//!   reader opens them before it lists the block ([`Codec::open_tokens`]).
//!   Random nonces stay safe for 2^32 sealings per key, two per block:
//!   rotate keys well before 2^31 blocks (at 2 MiB blocks, 4 PiB written).
//! - Reading: with a key configured, only blocks encrypted under that key
//!   are served; without one, an encrypted block is never served. Every
//!   allocation is bounded by the raw length, which must equal the length
//!   the reader expects (its namespace's block size) before anything is
//!   decompressed, and a compressed block must inflate to exactly that
//!   length.
//!
//! The key never leaves this module: not in `Debug`, not in logs.

use bytes::Bytes;

use super::segment::{
    codec_known, CODEC_COMPRESSION, CODEC_ENCRYPTED, CODEC_LZ4, CODEC_RAW, CODEC_ZSTD, MAX_RAW,
    MAX_TOKENS, SEALED_OVERHEAD,
};
use crate::at_rest::{self, Compressor, Scheme};
pub use crate::at_rest::{Refused, KEY_ID_LEN, KEY_LEN, TAG_LEN};
use crate::config::{Compression, RemoteConfig};
use crate::error::Result;

/// Bytes encryption adds to a block: key id, nonce and tag.
pub const OVERHEAD: usize = at_rest::SEALED_OVERHEAD;
const _: () = assert!(OVERHEAD == SEALED_OVERHEAD as usize);

/// What the associated data starts with (then codec, raw length, namespace
/// and key, each length-prefixed where variable).
const AAD_DOMAIN: &[u8] = b"kvtier-g4-block";
/// What the associated data of sealed token ids starts with (then
/// namespace, key and parent, each length-prefixed).
const TOKENS_DOMAIN: &[u8] = b"kvtier-g4-tokens";

/// How this node stores blocks, and reads any block's codec. Built once
/// per tier; shared by the upload and read tasks.
#[derive(Debug)]
pub struct Codec {
    scheme: Scheme,
}

impl Codec {
    /// A codec with `key` (the key file's 32 bytes) or none.
    pub fn new(compression: Compression, zstd_level: i32, key: Option<&[u8; KEY_LEN]>) -> Codec {
        Codec {
            scheme: Scheme::new(compression, zstd_level, key, AAD_DOMAIN),
        }
    }

    /// The codec `cfg` asks for, its key read from `cfg.key_file`.
    pub fn from_config(cfg: &RemoteConfig) -> Result<Codec> {
        let key = match &cfg.key_file {
            Some(path) => Some(at_rest::read_key_file(path, "remote_key_file")?),
            None => None,
        };
        Ok(Codec::new(cfg.compression, cfg.zstd_level, key.as_ref()))
    }

    /// Whether encoding leaves every block as it is (no compression, no
    /// key): uploads then skip the blocking pool.
    pub fn is_noop(&self) -> bool {
        self.scheme.is_noop()
    }

    /// Whether blocks are encrypted (and only encrypted blocks are read).
    pub fn encrypts(&self) -> bool {
        self.scheme.sealer.is_some()
    }

    /// The key's id, as stored with each block (hex), for logs.
    pub fn key_id(&self) -> Option<String> {
        self.scheme.key_id()
    }

    /// An encoder for a run of blocks (a segment): it keeps its compression
    /// state between blocks.
    pub fn encoder(&self) -> Encoder<'_> {
        Encoder {
            codec: self,
            compressor: self.scheme.compressor(),
            scratch: Vec::new(),
        }
    }

    /// Encodes one block: `(codec byte, raw length, stored bytes)`. With
    /// neither compression nor a key, `raw` itself (no copy). `None` when
    /// the block cannot be stored: empty or longer than the format allows,
    /// or no random nonce could be had (never stored unencrypted then).
    pub fn encode(&self, namespace: &str, key: &[u8], raw: Bytes) -> Option<(u8, u32, Bytes)> {
        self.encoder().encode(namespace, key, raw)
    }

    /// Seals a block's token ids for its footer entry (key id, nonce,
    /// ciphertext of the u32 LE tokens, tag). `None` without a key, past
    /// [`MAX_TOKENS`], or when no random nonce could be had.
    pub fn seal_tokens(
        &self,
        namespace: &str,
        key: &[u8],
        parent: &[u8],
        tokens: &[u32],
    ) -> Option<Vec<u8>> {
        let s = self.scheme.sealer.as_ref()?;
        if tokens.len() > MAX_TOKENS as usize {
            return None;
        }
        let plain: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        s.seal(&tokens_aad(namespace, key, parent), &plain)
    }

    /// Opens a block's sealed token ids (from a footer: hostile bytes).
    /// [`Refused::Foreign`] without a key or under another key id,
    /// [`Refused::Damaged`] when they fail authentication — tampered, or
    /// moved from another block, or the parent rewritten.
    pub fn open_tokens(
        &self,
        namespace: &str,
        key: &[u8],
        parent: &[u8],
        sealed: &[u8],
    ) -> std::result::Result<Vec<u32>, Refused> {
        let s = self.scheme.sealer.as_ref().ok_or(Refused::Foreign)?;
        let plain = s.open(&tokens_aad(namespace, key, parent), sealed)?;
        if plain.len() % 4 != 0 || plain.len() > 4 * MAX_TOKENS as usize {
            return Err(Refused::Damaged);
        }
        Ok(plain
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Decodes one block's stored bytes (already checked against their
    /// checksum) into its `raw_len` raw bytes, which must be `expected_len`
    /// (checked before anything is allocated). A raw, unencrypted block
    /// comes back without a copy.
    pub fn open(
        &self,
        namespace: &str,
        key: &[u8],
        codec: u8,
        raw_len: u32,
        stored: Bytes,
        expected_len: u64,
    ) -> std::result::Result<Bytes, Refused> {
        if u64::from(raw_len) != expected_len {
            return Err(Refused::Layout);
        }
        if !codec_known(codec) || raw_len == 0 || raw_len > MAX_RAW {
            return Err(Refused::Damaged);
        }
        let plain = match (codec & CODEC_ENCRYPTED != 0, &self.scheme.sealer) {
            (true, Some(s)) => Bytes::from(s.open(&aad(namespace, key, codec, raw_len), &stored)?),
            (false, None) => stored,
            (true, None) | (false, Some(_)) => return Err(Refused::Foreign),
        };
        let compression = match codec & CODEC_COMPRESSION {
            CODEC_RAW if plain.len() == raw_len as usize => return Ok(plain),
            CODEC_LZ4 => Compression::Lz4,
            CODEC_ZSTD => Compression::Zstd,
            _ => return Err(Refused::Damaged),
        };
        let mut out = vec![0u8; raw_len as usize];
        at_rest::decompress(compression, &plain, &mut out)?;
        Ok(Bytes::from(out))
    }
}

/// Encodes blocks one after another, reusing compression state and a
/// scratch buffer. See [`Codec::encode`].
pub struct Encoder<'a> {
    codec: &'a Codec,
    compressor: Compressor,
    scratch: Vec<u8>,
}

impl Encoder<'_> {
    /// See [`Codec::encode`].
    pub fn encode(&mut self, namespace: &str, key: &[u8], raw: Bytes) -> Option<(u8, u32, Bytes)> {
        let raw_len = u32::try_from(raw.len())
            .ok()
            .filter(|n| (1..=MAX_RAW).contains(n))?;
        let c = self.codec;
        if c.is_noop() {
            return Some((CODEC_RAW, raw_len, raw));
        }
        let compressed = self.compress(&raw);
        let (codec, body): (u8, &[u8]) = match compressed {
            Some((codec, n)) => (codec, &self.scratch[..n]),
            None => (CODEC_RAW, &raw),
        };
        match &c.scheme.sealer {
            Some(s) => {
                let codec = codec | CODEC_ENCRYPTED;
                let sealed = s.seal(&aad(namespace, key, codec, raw_len), body)?;
                Some((codec, raw_len, Bytes::from(sealed)))
            }
            None if codec == CODEC_RAW => Some((CODEC_RAW, raw_len, raw)),
            None => Some((codec, raw_len, Bytes::copy_from_slice(body))),
        }
    }

    /// Compresses `raw` into the scratch buffer: the codec bits and the
    /// length, or `None` when it would not come out smaller.
    fn compress(&mut self, raw: &[u8]) -> Option<(u8, usize)> {
        let bits = match self.codec.scheme.compression {
            Compression::None => return None,
            Compression::Lz4 => CODEC_LZ4,
            Compression::Zstd => CODEC_ZSTD,
        };
        let room = self.compressor.room(raw.len());
        if self.scratch.len() < room {
            self.scratch.resize(room, 0);
        }
        let n = self.compressor.compress(raw, &mut self.scratch)?;
        Some((bits, n))
    }
}

/// The associated data of a block: what it is and how it is stored.
fn aad(namespace: &str, key: &[u8], codec: u8, raw_len: u32) -> Vec<u8> {
    let mut a = Vec::with_capacity(AAD_DOMAIN.len() + 8 + namespace.len() + key.len());
    a.extend_from_slice(AAD_DOMAIN);
    a.push(codec);
    a.extend_from_slice(&raw_len.to_le_bytes());
    a.extend_from_slice(&(namespace.len() as u32).to_le_bytes());
    a.extend_from_slice(namespace.as_bytes());
    a.extend_from_slice(&(key.len() as u32).to_le_bytes());
    a.extend_from_slice(key);
    a
}

/// The associated data of a block's sealed token ids: where the block is
/// and what it follows.
fn tokens_aad(namespace: &str, key: &[u8], parent: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(TOKENS_DOMAIN.len() + 12 + namespace.len() + 2 * 32);
    a.extend_from_slice(TOKENS_DOMAIN);
    for part in [namespace.as_bytes(), key, parent] {
        a.extend_from_slice(&(part.len() as u32).to_le_bytes());
        a.extend_from_slice(part);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "llama/tp0";
    const KEY_A: [u8; KEY_LEN] = [0x11; KEY_LEN];
    const KEY_B: [u8; KEY_LEN] = [0x22; KEY_LEN];

    /// Compressible, KV-like bytes: bf16 of small values, some repeats.
    fn kv_like(len: usize, seed: u64) -> Bytes {
        let mut v = Vec::with_capacity(len);
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Sign, an exponent near 1.0, a few mantissa bits.
            let hi = 0x3c | ((x >> 60) as u8 & 0x80);
            let lo = (x >> 8) as u8 & 0xf0;
            v.extend_from_slice(&[lo, hi]);
        }
        v.truncate(len);
        Bytes::from(v)
    }

    fn random(len: usize, seed: u64) -> Bytes {
        let mut v = vec![0u8; len];
        let mut x = seed | 1;
        for b in &mut v {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        Bytes::from(v)
    }

    fn codecs() -> Vec<(Compression, Option<[u8; KEY_LEN]>)> {
        let mut out = Vec::new();
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            for k in [None, Some(KEY_A)] {
                out.push((c, k));
            }
        }
        out
    }

    #[test]
    fn every_combination_round_trips() {
        for (comp, key) in codecs() {
            let c = Codec::new(comp, 3, key.as_ref());
            for raw in [
                kv_like(65536, 1),
                random(65536, 2),
                kv_like(1, 3),
                random(4097, 4),
            ] {
                let (codec, raw_len, stored) = c.encode(NS, b"k1", raw.clone()).unwrap();
                assert_eq!(raw_len as usize, raw.len());
                assert_eq!(codec & CODEC_ENCRYPTED != 0, key.is_some(), "{comp:?}");
                assert!(codec_known(codec));
                let got = c
                    .open(NS, b"k1", codec, raw_len, stored.clone(), raw.len() as u64)
                    .unwrap_or_else(|e| panic!("{comp:?} {key:?}: {e:?}"));
                assert_eq!(got, raw, "{comp:?}");
                // Another node, configured otherwise but with the same key,
                // reads it too: reading follows the block's codec byte.
                let other = Codec::new(Compression::None, 1, key.as_ref());
                assert_eq!(
                    other.open(NS, b"k1", codec, raw_len, stored.clone(), raw.len() as u64),
                    Ok(raw.clone())
                );
                let overhead = if key.is_some() { OVERHEAD } else { 0 };
                // Compressed only when smaller, so never longer than raw.
                assert!(stored.len() <= raw.len() + overhead);
                if comp != Compression::None && raw.len() == 65536 && raw != random(65536, 2) {
                    assert_ne!(codec & CODEC_COMPRESSION, CODEC_RAW, "{comp:?} compresses");
                    assert!(
                        stored.len() < raw.len() * 3 / 4,
                        "{comp:?}: {}",
                        stored.len()
                    );
                }
                if raw == random(65536, 2) {
                    assert_eq!(codec & CODEC_COMPRESSION, CODEC_RAW, "random stays raw");
                }
            }
        }
    }

    #[test]
    fn no_options_is_zero_copy() {
        let c = Codec::new(Compression::None, 3, None);
        assert!(c.is_noop());
        let raw = kv_like(8192, 5);
        let (codec, raw_len, stored) = c.encode(NS, b"k", raw.clone()).unwrap();
        assert_eq!((codec, raw_len), (CODEC_RAW, 8192));
        assert_eq!(stored.as_ptr(), raw.as_ptr());
        let back = c.open(NS, b"k", codec, raw_len, stored, 8192).unwrap();
        assert_eq!(back.as_ptr(), raw.as_ptr());
        // Random bytes under lz4: stored raw, still without a copy.
        let c = Codec::new(Compression::Lz4, 3, None);
        let raw = random(8192, 6);
        let (codec, _, stored) = c.encode(NS, b"k", raw.clone()).unwrap();
        assert_eq!(codec, CODEC_RAW);
        assert_eq!(stored.as_ptr(), raw.as_ptr());
        assert!(c.encode(NS, b"k", Bytes::new()).is_none());
    }

    #[test]
    fn the_wrong_key_tampering_and_another_place_are_misses() {
        for comp in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let a = Codec::new(comp, 3, Some(&KEY_A));
            let b = Codec::new(comp, 3, Some(&KEY_B));
            let raw = kv_like(16384, 7);
            let n = raw.len() as u64;
            let (codec, raw_len, stored) = a.encode(NS, b"key-1", raw.clone()).unwrap();
            let open = |c: &Codec, ns: &str, key: &[u8], codec: u8, s: &Bytes| {
                c.open(ns, key, codec, raw_len, s.clone(), n)
            };
            assert_eq!(open(&a, NS, b"key-1", codec, &stored), Ok(raw.clone()));
            // Another key: foreign, not damage.
            assert_eq!(
                open(&b, NS, b"key-1", codec, &stored),
                Err(Refused::Foreign)
            );
            // No key at all: never served.
            let none = Codec::new(comp, 3, None);
            assert_eq!(
                open(&none, NS, b"key-1", codec, &stored),
                Err(Refused::Foreign)
            );
            // Another block key or namespace (a replay), another codec byte.
            assert_eq!(
                open(&a, NS, b"key-2", codec, &stored),
                Err(Refused::Damaged)
            );
            assert_eq!(
                open(&a, "llama/tp1", b"key-1", codec, &stored),
                Err(Refused::Damaged)
            );
            // none → lz4, lz4 → zstd, zstd → 3 (unknown).
            let flipped = if codec & CODEC_COMPRESSION == CODEC_LZ4 {
                codec ^ CODEC_LZ4 ^ CODEC_ZSTD
            } else {
                codec ^ CODEC_LZ4
            };
            assert_eq!(
                open(&a, NS, b"key-1", flipped, &stored),
                Err(Refused::Damaged)
            );
            // Every tampered byte past the key id (nonce, ciphertext, tag).
            for i in KEY_ID_LEN..stored.len() {
                let mut bad = stored.to_vec();
                bad[i] ^= 0x01;
                assert_eq!(
                    open(&a, NS, b"key-1", codec, &Bytes::from(bad)),
                    Err(Refused::Damaged),
                    "{comp:?} byte {i}"
                );
            }
            // A truncated block.
            let short = stored.slice(..OVERHEAD - 1);
            assert_eq!(open(&a, NS, b"key-1", codec, &short), Err(Refused::Damaged));
        }
    }

    #[test]
    fn an_unencrypted_block_is_a_miss_where_a_key_is_configured() {
        let plain = Codec::new(Compression::Lz4, 3, None);
        let keyed = Codec::new(Compression::Lz4, 3, Some(&KEY_A));
        for raw in [kv_like(8192, 8), random(8192, 9)] {
            let (codec, raw_len, stored) = plain.encode(NS, b"k", raw.clone()).unwrap();
            assert_eq!(codec & CODEC_ENCRYPTED, 0);
            assert_eq!(
                keyed.open(NS, b"k", codec, raw_len, stored.clone(), 8192),
                Err(Refused::Foreign)
            );
            assert_eq!(plain.open(NS, b"k", codec, raw_len, stored, 8192), Ok(raw));
        }
    }

    #[test]
    fn decompression_is_bounded_by_the_raw_length() {
        let c = Codec::new(Compression::None, 3, None);
        let raw = vec![7u8; 1 << 20];
        // A block that inflates past its stated raw length: 1 MiB of
        // sevens, claimed to be 4 KiB.
        let lz = Bytes::from(lz4_flex::block::compress(&raw));
        let zs = Bytes::from(zstd::bulk::compress(&raw, 3).unwrap());
        for (codec, stored) in [(CODEC_LZ4, lz.clone()), (CODEC_ZSTD, zs.clone())] {
            assert_eq!(
                c.open(NS, b"k", codec, 4096, stored.clone(), 4096),
                Err(Refused::Damaged)
            );
            // ... or short of it.
            assert_eq!(
                c.open(NS, b"k", codec, (2 << 20) as u32, stored.clone(), 2 << 20),
                Err(Refused::Damaged)
            );
            // Exactly right.
            assert_eq!(
                c.open(NS, b"k", codec, 1 << 20, stored.clone(), 1 << 20)
                    .map(|b| b.len()),
                Ok(1 << 20)
            );
            // A raw length other than the namespace's block size is refused
            // before anything is allocated.
            assert_eq!(
                c.open(NS, b"k", codec, 1 << 20, stored, 4096),
                Err(Refused::Layout)
            );
        }
        // Garbage is damage, not a panic.
        for codec in [CODEC_LZ4, CODEC_ZSTD] {
            for len in [0, 1, 7, 100] {
                let junk = random(len, len as u64 + 11);
                assert_eq!(
                    c.open(NS, b"k", codec, 4096, junk, 4096),
                    Err(Refused::Damaged)
                );
            }
        }
        // A raw block whose length is not its raw length; unknown bits.
        assert_eq!(
            c.open(NS, b"k", CODEC_RAW, 4096, random(4095, 1), 4096),
            Err(Refused::Damaged)
        );
        assert_eq!(
            c.open(NS, b"k", 0x40, 4096, random(4096, 1), 4096),
            Err(Refused::Damaged)
        );
    }

    #[test]
    fn token_ids_are_sealed_and_open_only_where_they_were_sealed() {
        let a = Codec::new(Compression::Lz4, 3, Some(&KEY_A));
        let tokens: Vec<u32> = (0..16).map(|t| 0x0123_4500 + t).collect();
        let sealed = a.seal_tokens(NS, b"key-1", b"key-0", &tokens).unwrap();
        assert_eq!(sealed.len(), OVERHEAD + 4 * tokens.len());
        // Nothing of the plaintext shows, and each sealing is fresh.
        let plain: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        assert!(!sealed.windows(8).any(|w| plain.windows(8).any(|p| p == w)));
        assert_ne!(
            a.seal_tokens(NS, b"key-1", b"key-0", &tokens),
            Some(sealed.clone())
        );
        // Round trip, on a node configured otherwise with the same key;
        // no tokens at all round trip too.
        let same = Codec::new(Compression::None, 3, Some(&KEY_A));
        assert_eq!(
            same.open_tokens(NS, b"key-1", b"key-0", &sealed),
            Ok(tokens.clone())
        );
        let none = a.seal_tokens(NS, b"root", b"", &[]).unwrap();
        assert_eq!(a.open_tokens(NS, b"root", b"", &none), Ok(vec![]));
        // Another key, or none: foreign.
        let b = Codec::new(Compression::Lz4, 3, Some(&KEY_B));
        assert_eq!(
            b.open_tokens(NS, b"key-1", b"key-0", &sealed),
            Err(Refused::Foreign)
        );
        let plain_node = Codec::new(Compression::Lz4, 3, None);
        assert_eq!(
            plain_node.open_tokens(NS, b"key-1", b"key-0", &sealed),
            Err(Refused::Foreign)
        );
        assert_eq!(plain_node.seal_tokens(NS, b"k", b"", &tokens), None);
        // Parent rewritten (or dropped), moved to another block or
        // namespace: refused.
        for (ns, key, parent) in [
            (NS, &b"key-1"[..], &b"key-9"[..]),
            (NS, b"key-1", b""),
            (NS, b"key-2", b"key-0"),
            ("llama/tp1", b"key-1", b"key-0"),
        ] {
            assert_eq!(
                a.open_tokens(ns, key, parent, &sealed),
                Err(Refused::Damaged),
                "{ns} {key:?} {parent:?}"
            );
        }
        // A block's sealed bytes are no token ids (another domain).
        let (codec, raw_len, stored) = a.encode(NS, b"key-1", kv_like(64, 3)).unwrap();
        assert!(codec & CODEC_ENCRYPTED != 0 && raw_len == 64);
        assert_eq!(
            a.open_tokens(NS, b"key-1", b"", &stored),
            Err(Refused::Damaged)
        );
        // Every tampered byte past the key id; truncated.
        for i in KEY_ID_LEN..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert_eq!(
                a.open_tokens(NS, b"key-1", b"key-0", &bad),
                Err(Refused::Damaged),
                "byte {i}"
            );
        }
        assert_eq!(
            a.open_tokens(NS, b"key-1", b"key-0", &sealed[..OVERHEAD - 1]),
            Err(Refused::Damaged)
        );
        assert_eq!(
            a.seal_tokens(NS, b"k", b"", &vec![0; MAX_TOKENS as usize + 1]),
            None
        );
    }

    #[test]
    fn the_key_file_names_the_option_and_debug_shows_only_the_key_id() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short");
        std::fs::write(&p, b"0123").unwrap();
        let mut cfg = RemoteConfig::new("s3://b/p");
        cfg.key_file = Some(p);
        let err = Codec::from_config(&cfg).unwrap_err().to_string();
        assert!(err.contains("remote_key_file"), "{err}");
        // Debug shows the key id, never the key.
        let c = Codec::new(Compression::Zstd, 3, Some(&KEY_A));
        let dbg = format!("{c:?}");
        assert!(
            dbg.contains(&c.key_id().unwrap()) && !dbg.contains("1111"),
            "{dbg}"
        );
        assert_ne!(
            c.key_id(),
            Codec::new(Compression::Zstd, 3, Some(&KEY_B)).key_id()
        );
    }
}
